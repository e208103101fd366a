//! Times `SlotPool::acquire` with prepared slots in the pool and without any.
//!
//! Run as root (it creates network namespaces, veth pairs, taps and nftables rules):
//!
//! ```sh
//! cargo bench -p hearth-network --bench slot_acquire
//! cargo bench -p hearth-network --bench slot_acquire -- --samples 100
//! ```
//!
//! - from the pool: `ready_target` 8, and before each timed `acquire` the bench waits until
//!   all 8 slots are prepared, so the call only takes one from the queue;
//! - without the pool: `ready_target` 0, so each `acquire` creates the slot's namespace,
//!   veth pair, tap and rules itself.
//!
//! Each slot is released after its sample, outside the timed part; the release times are
//! printed too. The pools use instance [`INSTANCE`] and subnet [`SUBNET`], which lies
//! outside the 10.200.0.0/13 range that `hearth serve` picks from by default, and keep
//! their lock files in a temporary directory. Everything of the instance is deleted at the
//! end, also after an error or Ctrl-C.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use hearth_network::sweep::sweep_instance;
use hearth_network::{InstanceId, Ipv4Subnet, PoolError, SlotPool, SlotPoolConfig};

/// Instance ID of the benchmark's pools; a run sweeps what an interrupted earlier run left.
const INSTANCE: &str = "be0a11";

/// Subnet of the benchmark's slots: 256 slots, outside `hearth serve`'s default range.
const SUBNET: &str = "10.210.0.0/22";

/// Number of prepared slots in the "from the pool" case (the server's default).
const READY_TARGET: usize = 8;

/// Default number of timed acquisitions per case.
const DEFAULT_SAMPLES: usize = 50;

/// Maximum wait for the pool to prepare its ready slots before a sample.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Samples of one timed operation, in milliseconds.
struct Samples {
    name: &'static str,
    millis: Vec<f64>,
}

impl Samples {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            millis: Vec::new(),
        }
    }

    fn push(&mut self, elapsed: Duration) {
        self.millis.push(elapsed.as_secs_f64() * 1000.0);
    }

    /// Formats a Markdown table row: name, count, p50, p90, max and mean in milliseconds.
    fn row(&self) -> String {
        let mut sorted = self.millis.clone();
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
        format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | ms |",
            self.name,
            sorted.len(),
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.9),
            sorted.last().copied().unwrap_or(f64::NAN),
            mean,
        )
    }
}

/// Percentile `q` (0 to 1) of sorted values, interpolated linearly between the closest ranks.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() - 1) as f64 * q;
    let low = rank.floor() as usize;
    let high = (low + 1).min(sorted.len() - 1);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

/// Parses `--samples N`; cargo passes `--bench`, which is ignored.
fn parse_samples() -> Result<usize, String> {
    let mut samples = DEFAULT_SAMPLES;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--samples" => {
                let value = args.next().ok_or("--samples needs a number")?;
                samples = value.parse().ok().filter(|&n| n > 0).ok_or(format!(
                    "invalid --samples {value:?}: expected a positive integer"
                ))?;
            }
            other => return Err(format!("unknown argument {other:?}; expected --samples N")),
        }
    }
    Ok(samples)
}

async fn start_pool(
    ready_target: usize,
    lock_dir: &std::path::Path,
) -> Result<SlotPool, PoolError> {
    let instance = InstanceId::parse(INSTANCE).expect("INSTANCE is a valid instance ID");
    let mut config = SlotPoolConfig::new(instance);
    config.ready_target = ready_target;
    config.subnet = Some(
        SUBNET
            .parse::<Ipv4Subnet>()
            .expect("SUBNET is a valid subnet"),
    );
    config.lock_dir = lock_dir.to_owned();
    config.sweep_interval = Duration::ZERO;
    SlotPool::start(config).await
}

async fn wait_until_ready(pool: &SlotPool, count: usize) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while pool.stats().ready < count {
        if Instant::now() >= deadline {
            return Err(format!(
                "the pool did not prepare {count} slots within {READY_TIMEOUT:?}: {:?}",
                pool.stats()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Times `samples` acquisitions from `pool`, waiting for `ready` prepared slots before each.
async fn measure(
    pool: &SlotPool,
    samples: usize,
    ready: usize,
    acquire: &mut Samples,
    release: &mut Samples,
) -> Result<(), String> {
    for _ in 0..samples {
        wait_until_ready(pool, ready).await?;

        let started = Instant::now();
        let slot = pool
            .acquire()
            .await
            .map_err(|e| format!("acquire failed: {e}"))?;
        acquire.push(started.elapsed());

        let started = Instant::now();
        pool.release(slot)
            .await
            .map_err(|e| format!("release failed: {e}"))?;
        release.push(started.elapsed());
    }
    Ok(())
}

/// Runs one case on a new pool and shuts the pool down afterwards, also when a sample fails.
async fn run_case(
    ready_target: usize,
    samples: usize,
    lock_dir: &std::path::Path,
    acquire: &mut Samples,
    release: &mut Samples,
) -> Result<(), String> {
    let pool = start_pool(ready_target, lock_dir)
        .await
        .map_err(|e| format!("failed to start the slot pool: {e}"))?;
    let measured = measure(&pool, samples, ready_target, acquire, release).await;
    let shutdown = pool.shutdown().await;
    measured?;
    shutdown.map_err(|e| format!("failed to shut the slot pool down: {e}"))?;
    Ok(())
}

async fn run(samples: usize, lock_dir: &std::path::Path) -> Result<Vec<Samples>, String> {
    let mut pooled = Samples::new("acquire, from the pool (8 prepared)");
    let mut pooled_release = Samples::new("release after a pooled acquire");
    run_case(
        READY_TARGET,
        samples,
        lock_dir,
        &mut pooled,
        &mut pooled_release,
    )
    .await?;
    eprintln!("from the pool: {} samples done", pooled.millis.len());

    let mut direct = Samples::new("acquire, without the pool (created on the spot)");
    let mut direct_release = Samples::new("release after a direct acquire");
    run_case(0, samples, lock_dir, &mut direct, &mut direct_release).await?;
    eprintln!("without the pool: {} samples done", direct.millis.len());

    Ok(vec![pooled, direct, pooled_release, direct_release])
}

fn main() -> ExitCode {
    let samples = match parse_samples() {
        Ok(samples) => samples,
        Err(message) => {
            eprintln!("slot_acquire: {message}");
            return ExitCode::FAILURE;
        }
    };
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "slot_acquire: run as root; the bench creates network namespaces and nftables rules"
        );
        return ExitCode::FAILURE;
    }
    let lock_dir = tempfile::tempdir().expect("a temporary directory can be created");
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");

    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(samples, lock_dir.path()) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
        }
    });
    drop(runtime);

    // A pool that was interrupted or failed may have left slots behind. After a normal
    // run, shutdown has already removed them and this sweep finds nothing.
    let instance = InstanceId::parse(INSTANCE).expect("INSTANCE is a valid instance ID");
    if let Err(error) = sweep_instance(&instance) {
        eprintln!("slot_acquire: failed to remove the slots of instance {INSTANCE}: {error}");
    }

    match outcome {
        Ok(results) => {
            println!("| metric | n | p50 | p90 | max | mean | unit |");
            println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
            for samples in &results {
                println!("{}", samples.row());
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("slot_acquire: {message}");
            ExitCode::FAILURE
        }
    }
}
