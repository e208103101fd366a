//! The host's TSC frequency, passed to guests that QEMU emulates with TCG.
//!
//! Under TCG a guest's `rdtsc` returns the host's TSC, so the guest's TSC runs at the host's
//! rate. A guest kernel without kvmclock measures that rate against the PIT at boot. When the
//! host's cores are busy (other guests, a build), both PIT methods fail on the emulated
//! timer's jitter; Debian's 6.1 kernel then prints "Marking TSC unstable due to could not
//! calculate TSC khz" and hangs in the delay loop calibration. In a run with two busy loops
//! on this 2-core machine, 3 of 4 cold boots hung there.
//!
//! `tsc_early_khz=` on the kernel command line gives the kernel the rate, so neither
//! measurement can fail. Hearth measures the rate once per process, against the monotonic
//! clock. KVM guests read it from kvmclock and get no such argument.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kernel command line parameter that sets the TSC rate in kHz.
const TSC_EARLY_KHZ: &str = "tsc_early_khz=";
/// Length of one measurement.
const SAMPLE: Duration = Duration::from_millis(10);
/// Number of measurements; their median is the result.
const SAMPLES: usize = 3;
/// Plausible TSC rates, in kHz: anything outside is a failed measurement.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u64> = 100_000..=10_000_000;

/// Returns the host's TSC rate in kHz, measured on first use. Returns `None` where there is
/// no TSC (not x86_64) or the measurement gave an implausible value.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let khz = measure();
        match khz {
            Some(khz) => tracing::info!(khz, "measured the host's TSC rate for TCG guests"),
            None => tracing::warn!("could not measure the host's TSC rate; TCG guests calibrate it themselves"),
        }
        khz
    })
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    // SAFETY: `rdtsc` has no preconditions on x86_64.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let mut rates: Vec<u64> = (0..SAMPLES)
        .map(|_| {
            let (start, start_ticks) = (Instant::now(), read());
            std::thread::sleep(SAMPLE);
            let (ticks, elapsed) = (read().wrapping_sub(start_ticks), start.elapsed());
            (ticks as u128 * 1_000_000 / elapsed.as_nanos().max(1)) as u64
        })
        .collect();
    rates.sort_unstable();
    Some(rates[SAMPLES / 2]).filter(|khz| PLAUSIBLE_KHZ.contains(khz))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

/// Returns `cmdline` with `tsc_early_khz=` added, unless the rate is unknown or the command
/// line already sets it.
pub fn with_tsc_khz(cmdline: &str, khz: Option<u64>) -> String {
    match khz {
        Some(khz) if !cmdline.split_whitespace().any(|word| word.starts_with(TSC_EARLY_KHZ)) => {
            let rest = cmdline.trim_end();
            let separator = if rest.is_empty() { "" } else { " " };
            format!("{rest}{separator}{TSC_EARLY_KHZ}{khz}")
        }
        _ => cmdline.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_rate_once() {
        assert_eq!(with_tsc_khz("console=ttyS0 quiet", Some(2_596_138)), "console=ttyS0 quiet tsc_early_khz=2596138");
        assert_eq!(with_tsc_khz("", Some(1_000_000)), "tsc_early_khz=1000000");
    }

    #[test]
    fn keeps_a_rate_the_command_line_sets() {
        let cmdline = "console=ttyS0 tsc_early_khz=123456 quiet";
        assert_eq!(with_tsc_khz(cmdline, Some(2_596_138)), cmdline);
    }

    #[test]
    fn unknown_rate_leaves_the_command_line_alone() {
        assert_eq!(with_tsc_khz("console=ttyS0", None), "console=ttyS0");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn measurements_agree_within_half_a_percent() {
        let first = host_tsc_khz().expect("an x86_64 host has a TSC");
        let second = measure().expect("a second measurement");
        eprintln!("host TSC: {first} kHz, then {second} kHz");
        assert!(
            first.abs_diff(second) * 200 <= first,
            "two measurements of the TSC rate differ: {first} kHz and {second} kHz"
        );
    }
}
