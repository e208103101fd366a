//! The host's TSC rate and stability, passed to guests that QEMU emulates with TCG.
//!
//! Under TCG a guest's `rdtsc` returns the host's TSC, so the guest's TSC runs at the host's
//! rate. A guest kernel without kvmclock measures that rate against the PIT at boot. On a
//! busy host both PIT methods fail on the emulated timer's jitter, and Debian's 6.1 kernel
//! then hangs in its delay loop calibration (3 of 4 cold boots with two busy loops on a
//! 2-core host). `tsc_early_khz=` gives the kernel the rate, so no calibration can fail.
//!
//! Such a guest also marks its TSC unstable ("TSCs unsynchronized", because the emulated CPU
//! claims no invariant TSC and is not Intel) and keeps time with jiffies. Its clocks then
//! advance in 4 ms steps, and idle vCPUs keep their timer tick. Where the host's own TSC is
//! stable, `tsc=reliable` lets the guest use it. An idle sandbox then cost 1.4% of a core
//! instead of 7.1% in 30 s measurements on a 2-core test host. KVM guests read the rate
//! from kvmclock and get neither parameter.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kernel command line parameter that sets the TSC rate in kHz.
const TSC_EARLY_KHZ: &str = "tsc_early_khz=";
/// Kernel command line parameter that makes the guest trust its TSC.
const TSC_RELIABLE: &str = "tsc=reliable";
/// Length of one measurement.
const SAMPLE: Duration = Duration::from_millis(10);
/// Number of measurements. Their median is the result.
const SAMPLES: usize = 3;
/// Plausible TSC rates, in kHz: anything outside is a failed measurement.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u64> = 100_000..=10_000_000;

/// The host's TSC, as TCG guests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTsc {
    /// Rate in kHz.
    pub khz: u64,
    /// Whether the host kernel trusts its TSC: invariant, and a usable clock source.
    pub stable: bool,
}

/// Returns the host's TSC, measured on first use. Returns `None` where there is no TSC
/// (not x86_64) or the measurement gave an implausible value.
pub fn host_tsc() -> Option<HostTsc> {
    static TSC: OnceLock<Option<HostTsc>> = OnceLock::new();
    *TSC.get_or_init(|| {
        let tsc = measure().map(|khz| HostTsc { khz, stable: host_tsc_is_stable() });
        match tsc {
            Some(tsc) => tracing::info!(khz = tsc.khz, stable = tsc.stable, "measured the host's TSC for TCG guests"),
            None => tracing::warn!("failed to measure the host's TSC rate, so TCG guests calibrate it themselves"),
        }
        tsc
    })
}

/// Returns whether the host's CPUs have an invariant TSC and the host kernel still offers
/// it as a clock source. A kernel that finds its TSC unstable withdraws it from that list.
fn host_tsc_is_stable() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let sources = std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/available_clocksource")
        .unwrap_or_default();
    tsc_is_stable(&cpuinfo, &sources)
}

/// Returns whether `/proc/cpuinfo` text names an invariant TSC and the clock source list
/// contains `tsc`.
fn tsc_is_stable(cpuinfo: &str, available_clocksources: &str) -> bool {
    let Some(flags) = cpuinfo.lines().find(|line| line.starts_with("flags")) else {
        return false;
    };
    let has_flag = |name: &str| flags.split_whitespace().any(|flag| flag == name);
    let offered = available_clocksources.split_whitespace().any(|source| source == "tsc");

    has_flag("constant_tsc") && has_flag("nonstop_tsc") && offered
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    // SAFETY: `rdtsc` has no preconditions on x86_64.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let mut rates: Vec<u64> = (0..SAMPLES)
        .map(|_| {
            let start = Instant::now();
            let start_ticks = read();
            std::thread::sleep(SAMPLE);
            let ticks = read().wrapping_sub(start_ticks);
            let elapsed_ns = start.elapsed().as_nanos().max(1);
            (ticks as u128 * 1_000_000 / elapsed_ns) as u64
        })
        .collect();
    rates.sort_unstable();
    Some(rates[SAMPLES / 2]).filter(|khz| PLAUSIBLE_KHZ.contains(khz))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

/// Returns `cmdline` with the TSC parameters for a TCG guest added: `tsc_early_khz=` when
/// the rate is known, and `tsc=reliable` when the host's TSC is also stable. A parameter that
/// the command line already sets is left as it is.
pub fn tcg_cmdline(cmdline: &str, tsc: Option<HostTsc>) -> String {
    let Some(tsc) = tsc else {
        return cmdline.to_owned();
    };
    let sets = |prefix: &str| cmdline.split_whitespace().any(|word| word.starts_with(prefix));
    let mut words: Vec<String> = cmdline.split_whitespace().map(str::to_owned).collect();
    if !sets(TSC_EARLY_KHZ) {
        words.push(format!("{TSC_EARLY_KHZ}{}", tsc.khz));
    }
    if tsc.stable && !sets("tsc=") {
        words.push(TSC_RELIABLE.to_owned());
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STABLE: Option<HostTsc> = Some(HostTsc { khz: 2_596_138, stable: true });
    const UNSTABLE: Option<HostTsc> = Some(HostTsc { khz: 2_596_138, stable: false });

    #[test]
    fn stable_tsc_adds_rate_and_reliable() {
        assert_eq!(tcg_cmdline("console=ttyS0 quiet", STABLE), "console=ttyS0 quiet tsc_early_khz=2596138 tsc=reliable");
        assert_eq!(tcg_cmdline("", STABLE), "tsc_early_khz=2596138 tsc=reliable");
    }

    #[test]
    fn unstable_tsc_adds_only_the_rate() {
        assert_eq!(tcg_cmdline("console=ttyS0", UNSTABLE), "console=ttyS0 tsc_early_khz=2596138");
    }

    #[test]
    fn parameters_already_set_are_kept() {
        let cmdline = "console=ttyS0 tsc_early_khz=123456 tsc=unstable quiet";
        assert_eq!(tcg_cmdline(cmdline, STABLE), cmdline);
    }

    #[test]
    fn unknown_tsc_leaves_the_command_line_alone() {
        assert_eq!(tcg_cmdline("console=ttyS0", None), "console=ttyS0");
    }

    #[test]
    fn stable_needs_flags_and_clocksource() {
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc sse\n";
        assert!(tsc_is_stable(cpuinfo, "tsc kvm-clock\n"));
        assert!(!tsc_is_stable(cpuinfo, "kvm-clock hpet\n"));
        assert!(!tsc_is_stable("flags\t\t: fpu tsc constant_tsc sse\n", "tsc\n"));
        assert!(!tsc_is_stable("processor\t: 0\n", "tsc\n"));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn measurements_agree_within_half_a_percent() {
        let first = host_tsc().expect("an x86_64 host has a TSC").khz;
        let second = measure().expect("a second measurement");
        eprintln!("host TSC: {first} kHz, then {second} kHz");
        assert!(
            first.abs_diff(second) * 200 <= first,
            "two measurements of the TSC rate differ: {first} kHz and {second} kHz"
        );
    }
}
