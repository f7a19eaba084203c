//! The publish clock: `CLOCK_MONOTONIC` in nanoseconds.
//!
//! Every record header carries the time of its commit from this clock, and every latency figure
//! membus reports is "receive time minus that", so all processes on the host share one time base.
//! rustix reads it through the vDSO: no syscall.

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds since an arbitrary fixed point (boot), from `CLOCK_MONOTONIC`.
#[inline]
pub fn monotonic_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    // CLOCK_MONOTONIC is never negative; u64 nanoseconds last 584 years past boot.
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let mut last = monotonic_ns();
        assert!(last > 0, "CLOCK_MONOTONIC read as zero");
        for _ in 0..10_000 {
            let now = monotonic_ns();
            assert!(now >= last, "clock went back: {last} -> {now}");
            last = now;
        }
    }
}
