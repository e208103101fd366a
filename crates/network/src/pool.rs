//! A pool of prepared network slots.
//!
//! [`SlotPool::start`] sweeps the instance's leftovers, chooses its subnet, installs the
//! host rules and starts a background task that keeps `ready_target` slots prepared, so
//! that [`SlotPool::acquire`] normally only pops a queue. A released slot is deleted (its
//! namespace, veth pair, tap and conntrack state go with it) and the background task
//! prepares a fresh one, so no state of one sandbox reaches the next.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::Notify;

use crate::command::CommandError;
use crate::instance::{InstanceId, MAX_SLOT_INDEX};
use crate::setup::{self, SlotPlan};
use crate::slot::Slot;
use crate::subnet::{self, Ipv4Subnet, SubnetError, SubnetLease};
use crate::sweep::{self, SweepReport};

/// Default number of slots kept prepared.
pub const DEFAULT_READY_TARGET: usize = 8;

/// Default directory of the lock files that mark instances and subnets as in use.
pub const DEFAULT_LOCK_DIR: &str = "/run/hearth/network";

/// Pause after a failed background slot creation before the next attempt.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Settings of a [`SlotPool`].
#[derive(Clone, Debug)]
pub struct SlotPoolConfig {
    /// Instance whose names and subnet the pool uses.
    pub instance: InstanceId,
    /// Number of slots to keep prepared.
    pub ready_target: usize,
    /// Subnet for the slots' veth addresses; `None` chooses a free /20 of 10.200.0.0/13.
    pub subnet: Option<Ipv4Subnet>,
    /// Directory of the lock files that mark instances and subnets as in use.
    pub lock_dir: PathBuf,
}

impl SlotPoolConfig {
    /// Settings with the defaults: 8 ready slots, a chosen subnet, `/run/hearth/network`.
    pub fn new(instance: InstanceId) -> Self {
        Self {
            instance,
            ready_target: DEFAULT_READY_TARGET,
            subnet: None,
            lock_dir: PathBuf::from(DEFAULT_LOCK_DIR),
        }
    }
}

/// Error from the slot pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("instance {0} is already running a slot pool: is another server using the same data directory?")]
    InstanceHeld(InstanceId),

    #[error("failed to reserve a subnet for the slots")]
    Subnet(#[from] SubnetError),

    #[error("network setup failed")]
    Command(#[from] CommandError),

    #[error("no free slot: all {capacity} slots of subnet {subnet} are in use")]
    Exhausted { capacity: u32, subnet: Ipv4Subnet },

    #[error("slot {index} (namespace {netns}) is not in use in this pool")]
    UnknownSlot { index: u32, netns: String },

    #[error("the slot pool is shut down")]
    Closed,

    #[error("a blocking network task failed to complete")]
    TaskFailed(#[from] tokio::task::JoinError),
}

/// Counts of a pool's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Prepared slots waiting in the pool.
    pub ready: usize,
    /// Slots handed out and not yet released.
    pub in_use: usize,
    /// Slots being prepared in the background.
    pub creating: usize,
    /// Number of prepared slots the pool aims to keep.
    pub ready_target: usize,
    /// Maximum number of slots that can exist at once.
    pub capacity: u32,
}

/// Pool of prepared network slots for one server instance. Cheap to clone.
///
/// Dropping every handle stops the background task but leaves the slots in place; the
/// next [`SlotPool::start`] of the same instance sweeps them. Call [`SlotPool::shutdown`]
/// to delete them.
#[derive(Clone)]
pub struct SlotPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    instance: InstanceId,
    subnet: Ipv4Subnet,
    capacity: u32,
    ready_target: usize,
    state: Mutex<PoolState>,
    wake: Arc<Notify>,
    _instance_lock: Flock<File>,
    _subnet_lease: SubnetLease,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Slot>,
    in_use: HashSet<u32>,
    creating: usize,
    free_indices: BTreeSet<u32>,
    next_index: u32,
    closed: bool,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Wakes the background task so it notices that the pool is gone and exits.
        self.wake.notify_one();
    }
}

impl SlotPool {
    /// Starts the pool: locks the instance, sweeps its leftovers, reserves its subnet,
    /// installs the host rules and starts preparing slots in the background.
    pub async fn start(config: SlotPoolConfig) -> Result<SlotPool, PoolError> {
        let instance = config.instance.clone();
        let ready_target = config.ready_target;
        let (instance_lock, lease, report) =
            tokio::task::spawn_blocking(move || prepare_host(&config)).await??;
        if report != SweepReport::default() {
            tracing::info!(
                instance = %instance,
                namespaces = report.namespaces,
                interfaces = report.interfaces,
                nft_table = report.nft_table,
                "removed network slots left by an earlier run"
            );
        }

        let subnet = lease.subnet;
        let capacity = subnet.slot_capacity().min(MAX_SLOT_INDEX + 1);
        let inner = Arc::new(PoolInner {
            instance,
            subnet,
            capacity,
            ready_target,
            state: Mutex::new(PoolState::default()),
            wake: Arc::new(Notify::new()),
            _instance_lock: instance_lock,
            _subnet_lease: lease,
        });
        tracing::info!(instance = %inner.instance, %subnet, ready_target = inner.ready_target, "slot pool started");

        tokio::spawn(fill(Arc::downgrade(&inner), inner.wake.clone()));
        inner.wake.notify_one();
        Ok(SlotPool { inner })
    }

    /// Takes a slot: a prepared one when available (microseconds), else one created now.
    pub async fn acquire(&self) -> Result<Slot, PoolError> {
        let plan = {
            let mut state = self.inner.lock_state();
            if state.closed {
                return Err(PoolError::Closed);
            }
            if let Some(slot) = state.ready.pop_front() {
                state.in_use.insert(slot.index);
                drop(state);
                self.inner.wake.notify_one();
                tracing::debug!(netns = %slot.netns, "slot acquired from the pool");
                return Ok(slot);
            }
            let index = self.inner.allocate_index(&mut state)?;
            state.in_use.insert(index);
            self.inner.plan(index)
        };

        tracing::info!(netns = %plan.netns, "no prepared slot left; creating one now");
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            setup::create_slot(&plan).map_err(|e| (plan.index, e))
        })
        .await?;
        match result {
            Ok(slot) => {
                tracing::debug!(netns = %slot.netns, elapsed_ms = started.elapsed().as_millis() as u64, "slot created");
                self.inner.wake.notify_one();
                Ok(slot)
            }
            Err((index, error)) => {
                let mut state = self.inner.lock_state();
                state.in_use.remove(&index);
                state.free_indices.insert(index);
                Err(error.into())
            }
        }
    }

    /// Returns a slot taken with [`SlotPool::acquire`]: deletes it, so that nothing of its
    /// sandbox remains, and lets the pool prepare a fresh one. Stop the VMM first.
    pub async fn release(&self, slot: Slot) -> Result<(), PoolError> {
        let expected_netns = self.inner.instance.netns_name(slot.index);
        {
            let mut state = self.inner.lock_state();
            if slot.netns != expected_netns || !state.in_use.remove(&slot.index) {
                return Err(PoolError::UnknownSlot {
                    index: slot.index,
                    netns: slot.netns,
                });
            }
        }

        let host_veth = self.inner.instance.host_veth_name(slot.index);
        let netns = slot.netns.clone();
        let result =
            tokio::task::spawn_blocking(move || setup::destroy_slot(&netns, &host_veth)).await?;
        match result {
            Ok(()) => {
                self.inner.lock_state().free_indices.insert(slot.index);
                self.inner.wake.notify_one();
                tracing::debug!(netns = %slot.netns, "slot released");
                Ok(())
            }
            Err(error) => {
                // The index stays out of use so a half-deleted slot is never reused; the
                // next start-up sweep removes what is left.
                tracing::error!(netns = %slot.netns, %error, "failed to delete a released slot");
                Err(error.into())
            }
        }
    }

    /// Current counts of the pool's slots.
    pub fn stats(&self) -> PoolStats {
        let state = self.inner.lock_state();
        PoolStats {
            ready: state.ready.len(),
            in_use: state.in_use.len(),
            creating: state.creating,
            ready_target: self.inner.ready_target,
            capacity: self.inner.capacity,
        }
    }

    /// Returns the instance this pool belongs to.
    pub fn instance(&self) -> &InstanceId {
        &self.inner.instance
    }

    /// Returns the subnet the pool's slot addresses come from.
    pub fn subnet(&self) -> Ipv4Subnet {
        self.inner.subnet
    }

    /// Stops preparing slots and deletes every slot of the instance, in use or not, and its
    /// host rules. Stop the VMMs first. Later calls to `acquire` fail with
    /// [`PoolError::Closed`].
    pub async fn shutdown(&self) -> Result<SweepReport, PoolError> {
        self.inner.lock_state().closed = true;
        self.inner.wake.notify_one();

        // A slot being created in the background would otherwise appear after the sweep.
        while self.inner.lock_state().creating > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let instance = self.inner.instance.clone();
        let report =
            tokio::task::spawn_blocking(move || sweep::sweep_instance(&instance)).await??;
        let mut state = self.inner.lock_state();
        state.ready.clear();
        state.in_use.clear();
        tracing::info!(instance = %self.inner.instance, namespaces = report.namespaces, "slot pool shut down");
        Ok(report)
    }
}

impl PoolInner {
    fn lock_state(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves counts that are still consistent enough
        // to go on with; recover rather than poison every later call.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn allocate_index(&self, state: &mut PoolState) -> Result<u32, PoolError> {
        if let Some(index) = state.free_indices.pop_first() {
            return Ok(index);
        }
        if state.next_index < self.capacity {
            state.next_index += 1;
            return Ok(state.next_index - 1);
        }
        Err(PoolError::Exhausted {
            capacity: self.capacity,
            subnet: self.subnet,
        })
    }

    fn plan(&self, index: u32) -> SlotPlan {
        SlotPlan::new(&self.instance, &self.subnet, index)
            .expect("allocated index is within the subnet's capacity")
    }

    /// Reserves an index for a background creation when the pool is below its target.
    fn next_background_plan(&self) -> Option<SlotPlan> {
        let mut state = self.lock_state();
        if state.closed || state.ready.len() + state.creating >= self.ready_target {
            return None;
        }
        let index = self.allocate_index(&mut state).ok()?;
        state.creating += 1;
        Some(self.plan(index))
    }
}

/// Background task: keeps the pool at its ready target until the pool is dropped or closed.
async fn fill(pool: Weak<PoolInner>, wake: Arc<Notify>) {
    loop {
        let Some(inner) = pool.upgrade() else {
            return;
        };
        if let Some(plan) = inner.next_background_plan() {
            create_in_background(&inner, plan).await;
            continue;
        }
        if inner.lock_state().closed {
            return;
        }
        drop(inner);
        wake.notified().await;
    }
}

async fn create_in_background(inner: &PoolInner, plan: SlotPlan) {
    let index = plan.index;
    let netns = plan.netns.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || setup::create_slot(&plan)).await;

    let failed = {
        let mut state = inner.lock_state();
        state.creating -= 1;
        match result {
            Ok(Ok(slot)) => {
                tracing::debug!(netns = %slot.netns, elapsed_ms = started.elapsed().as_millis() as u64, "slot prepared");
                state.ready.push_back(slot);
                false
            }
            Ok(Err(error)) => {
                state.free_indices.insert(index);
                tracing::error!(%netns, %error, "failed to prepare a slot; retrying in {RETRY_DELAY:?}");
                true
            }
            Err(error) => {
                state.free_indices.insert(index);
                tracing::error!(%netns, %error, "slot preparation task failed; retrying in {RETRY_DELAY:?}");
                true
            }
        }
    };
    if failed {
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

/// Blocking part of [`SlotPool::start`].
fn prepare_host(
    config: &SlotPoolConfig,
) -> Result<(Flock<File>, SubnetLease, SweepReport), PoolError> {
    let instance = &config.instance;
    let lock_path = config.lock_dir.join(format!("instance-{instance}.lock"));
    let lock_file = subnet::open_lock_file(&lock_path)?;
    let instance_lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| PoolError::InstanceHeld(instance.clone()))?;

    let report = sweep::sweep_instance(instance)?;
    let lease = subnet::choose_subnet(instance, config.subnet, &config.lock_dir)?;
    setup::install_host_rules(instance, &lease.subnet)?;
    Ok((instance_lock, lease, report))
}
