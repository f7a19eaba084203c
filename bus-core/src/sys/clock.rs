//! The publish clock: `CLOCK_MONOTONIC` in nanoseconds.
//!
//! Every record header carries the time of its commit from this clock, and every latency figure
//! membus reports is "receive time minus that", so all processes on the host share one time base.
//! rustix reads it through the vDSO: no syscall.
//!
//! [`monotonic_ns`] reads the clock. [`StampClock`] is what a ring writer stamps records with:
//! the same clock, read through the vDSO only every few hundred microseconds and extrapolated
//! with the CPU's time-stamp counter in between, because a vDSO read costs more than everything
//! else in a small publish (ADR 0002).

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

/// Reads the time-stamp counter, or `None` on targets without one we trust.
#[inline(always)]
fn ticks() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC is part of the x86-64 baseline; it reads a counter and has no memory
        // effects. Its ordering against neighbouring instructions does not matter here (see
        // StampClock: a stamp may be taken a few cycles early).
        #[allow(unused_unsafe)]
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// True if the kernel itself derives `CLOCK_MONOTONIC` from the TSC (current clocksource
/// `tsc`). The kernel switches away from the TSC when it finds it unsynchronised between CPUs or
/// unstable, so this also says that a thread that migrates between CPUs reads one counter.
/// Read once per process.
fn kernel_clock_is_tsc() -> bool {
    static TSC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TSC.get_or_init(|| {
        ticks().is_some()
            && std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .is_ok_and(|s| s.trim() == "tsc")
    })
}

/// Rate windows: the nanoseconds-per-tick rate is measured between two exact clock reads at
/// least this far apart (and at most twice this), so the read jitter (tens of ns) makes an
/// error of at most a few parts per million.
const RATE_WINDOW_NS: u64 = 8_000_000;
/// Longest extrapolation from an exact read, as a fraction of the rate window (and 1 ms at most).
const HORIZON_DIVISOR: u64 = 64;
/// An exact read that disagrees with the extrapolation by more than this means the counter or
/// the clock jumped (VM migration, a suspended VM): forget the rate and measure it again.
const MAX_DRIFT_NS: u64 = 2_000;

/// `CLOCK_MONOTONIC` nanoseconds for stamping records, cheap enough to read on every commit.
///
/// Where the kernel's own clocksource is the TSC, `now_ns` reads the TSC and converts it with a
/// rate measured against `CLOCK_MONOTONIC` over the last 8-16 ms, re-anchoring to an exact
/// `CLOCK_MONOTONIC` read whenever the last one is more than 1/64 of that window (125-250 us)
/// old. So a stamp is the clock's value give or take the jitter of one vDSO read divided by 32
/// plus the drift of the kernel's rate within 250 us (NTP slews by at most 500 ppm, so at most
/// 125 ns even in the worst case, normally under 1 ns). Stamps from one `StampClock` never go
/// backwards. Elsewhere, and until the first rate window is complete, `now_ns` is
/// [`monotonic_ns`].
#[derive(Debug)]
pub struct StampClock {
    tsc: bool,
    /// The last exact read: `base_ns` was the clock at tick `base_tick`.
    base_tick: u64,
    base_ns: u64,
    /// Nanoseconds per tick, 32.32 fixed point (0 until a rate is known).
    mult: u64,
    /// Extrapolate only up to this many ticks after `base_tick` (0: always read the clock).
    horizon: u64,
    /// Start of the rate window in use, and of the window being measured.
    rate_from: (u64, u64),
    measuring_from: (u64, u64),
    /// The last stamp handed out.
    last: u64,
}

impl Default for StampClock {
    fn default() -> Self {
        StampClock::new()
    }
}

impl StampClock {
    /// A clock for one writer.
    pub fn new() -> Self {
        let mut c = StampClock {
            tsc: kernel_clock_is_tsc(),
            base_tick: 0,
            base_ns: 0,
            mult: 0,
            horizon: 0,
            rate_from: (0, 0),
            measuring_from: (0, 0),
            last: 0,
        };
        if c.tsc {
            let anchor = Self::exact();
            c.rate_from = anchor;
            c.measuring_from = anchor;
            (c.base_tick, c.base_ns) = anchor;
        }
        c
    }

    /// True when stamps are extrapolated from the TSC (after the first rate window).
    pub fn is_extrapolating(&self) -> bool {
        self.mult != 0
    }

    /// The current `CLOCK_MONOTONIC` time in nanoseconds (see the type's documentation).
    #[inline]
    pub fn now_ns(&mut self) -> u64 {
        if let Some(t) = ticks() {
            let d = t.wrapping_sub(self.base_tick);
            if d < self.horizon {
                let ns = self
                    .base_ns
                    .wrapping_add(((d as u128 * self.mult as u128) >> 32) as u64)
                    .max(self.last);
                self.last = ns;
                return ns;
            }
        }
        self.reanchor()
    }

    /// One exact read, paired with the tick in the middle of it: the best of three attempts
    /// (the one with the fewest ticks around the read), so that a thread preempted during one
    /// read does not pair the clock with a tick from much later.
    fn exact() -> (u64, u64) {
        let mut best = (u64::MAX, 0, 0);
        for _ in 0..3 {
            let t0 = ticks().unwrap_or(0);
            let ns = monotonic_ns();
            let width = ticks().unwrap_or(0).wrapping_sub(t0);
            if width < best.0 {
                best = (width, t0.wrapping_add(width / 2), ns);
            }
        }
        (best.1, best.2)
    }

    #[cold]
    #[inline(never)]
    fn reanchor(&mut self) -> u64 {
        if !self.tsc {
            let ns = monotonic_ns().max(self.last);
            self.last = ns;
            return ns;
        }
        let (t, ns) = Self::exact();
        if self.mult != 0 {
            let predicted = self.base_ns.wrapping_add(
                ((t.wrapping_sub(self.base_tick) as u128 * self.mult as u128) >> 32) as u64,
            );
            if predicted.abs_diff(ns) > MAX_DRIFT_NS + (t.wrapping_sub(self.base_tick) >> 16) {
                // The extrapolation was far off (a long gap is expected to drift a little
                // more; a jump of the counter or the clock much more): measure afresh.
                self.mult = 0;
                self.horizon = 0;
                self.rate_from = (t, ns);
                self.measuring_from = (t, ns);
            }
        }
        if ns.saturating_sub(self.measuring_from.1) >= RATE_WINDOW_NS {
            // The window being measured is complete: rate over [rate_from, now] (8-16 ms, or
            // longer after an idle stretch), then slide.
            let (t0, ns0) = self.rate_from;
            let (dt, dns) = (t.wrapping_sub(t0), ns.saturating_sub(ns0));
            let mult = if dt == 0 || dt > i64::MAX as u64 {
                0
            } else {
                u64::try_from((u128::from(dns) << 32) / u128::from(dt)).unwrap_or(0)
            };
            self.mult = mult;
            self.horizon = if mult == 0 {
                0
            } else {
                let max_ticks = ((1_000_000u128 << 32) / u128::from(mult)) as u64;
                (dt / HORIZON_DIVISOR).min(max_ticks)
            };
            self.rate_from = self.measuring_from;
            self.measuring_from = (t, ns);
        }
        self.base_tick = t;
        self.base_ns = ns;
        let out = ns.max(self.last);
        self.last = out;
        out
    }
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

    /// Stamps never go back and always lie between two exact reads around them (give or take
    /// the documented error), across the calibration and many re-anchorings.
    #[test]
    fn stamps_track_the_clock() {
        let mut c = StampClock::new();
        let mut last = 0;
        // Long enough for several rate windows even on a loaded machine; ends as soon as the
        // stamps have been extrapolated for a while.
        let give_up = monotonic_ns() + 5_000_000_000;
        let mut extrapolated = 0u64;
        let mut n = 0u64;
        while n < 1_000 || (extrapolated < 100_000 && monotonic_ns() < give_up) {
            let before = monotonic_ns();
            let s = c.now_ns();
            let after = monotonic_ns();
            assert!(s >= last, "stamp went back: {last} -> {s}");
            // Slack for the extrapolation error (a stamp off by more than MAX_DRIFT_NS resets the
            // rate); a preempted test thread only widens the interval.
            let slack = 2 * MAX_DRIFT_NS;
            assert!(
                s + slack >= before && s <= after + slack,
                "stamp {s} outside [{before}, {after}] (extrapolating: {})",
                c.is_extrapolating()
            );
            last = s;
            n += 1;
            extrapolated += u64::from(c.is_extrapolating());
        }
        if kernel_clock_is_tsc() {
            assert!(extrapolated > 0, "never extrapolated from the TSC");
        }
    }
}
