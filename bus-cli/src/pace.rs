//! Rate pacing for generated messages (`bus pub --rate`, the demo's publisher): message `i` is
//! due at `start + i / rate`, computed from the start rather than from the previous message, so
//! late messages do not push the schedule back and the long-run rate is exact.
//!
//! The wait sleeps while the next message is far off and spins only for the last
//! [`SPIN_WINDOW`]: `--rate 5` costs next to no CPU, and high rates (intervals shorter than the
//! window) are met to within a clock read, which sleeping alone cannot do (a sleep overshoots by
//! the timer slack, tens of microseconds).

use std::time::{Duration, Instant};

/// How long before a due time the pacer stops sleeping and spins. Larger than the usual
/// overshoot of a short sleep (timer slack is 50 µs by default), so a sleep that overshoots
/// still wakes before the due time.
pub const SPIN_WINDOW: Duration = Duration::from_micros(200);

/// Due times are clamped to this far after the start, so absurdly low rates wait (for a
/// century) instead of overflowing `Instant`.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Time, as the pacer sees it: the real monotonic clock, or a simulated one in tests.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Instant;
    /// Sleeps for about `d` (possibly longer).
    fn sleep(&self, d: Duration);
}

/// The monotonic clock and `std::thread::sleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Paces a loop to `rate` iterations per second; a rate of 0 (or less, or NaN) does not pace.
#[derive(Debug)]
pub struct Pacer<C: Clock = RealClock> {
    clock: C,
    start: Instant,
    rate: Option<f64>,
    next: u64,
}

impl Pacer {
    /// A pacer on the real clock, starting now.
    pub fn new(rate: f64) -> Pacer {
        Pacer::with_clock(rate, RealClock)
    }
}

impl<C: Clock> Pacer<C> {
    /// A pacer on `clock`, starting at its current time.
    pub fn with_clock(rate: f64, clock: C) -> Pacer<C> {
        let start = clock.now();
        Pacer {
            clock,
            start,
            rate: (rate > 0.0).then_some(rate),
            next: 0,
        }
    }

    /// When message `i` is due (`None` if unpaced).
    pub fn due(&self, i: u64) -> Option<Instant> {
        let rate = self.rate?;
        let offset = Duration::try_from_secs_f64(i as f64 / rate).map_or(FAR, |d| d.min(FAR));
        Some(self.start + offset)
    }

    /// Waits until the next message is due (at once for the first, and always when unpaced),
    /// then counts it as sent.
    pub fn wait_next(&mut self) {
        if let Some(due) = self.due(self.next) {
            loop {
                let now = self.clock.now();
                let Some(left) = due.checked_duration_since(now).filter(|l| !l.is_zero()) else {
                    break;
                };
                if left > SPIN_WINDOW {
                    self.clock.sleep(left - SPIN_WINDOW);
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        self.next += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A simulated clock: every read costs `READ` (so a spin makes progress), every sleep
    /// overshoots by `OVERSHOOT`; it counts reads and sleeps.
    struct SimClock {
        now: Cell<Instant>,
        reads: Cell<u64>,
        sleeps: Cell<u64>,
    }

    const READ: Duration = Duration::from_micros(1);
    const OVERSHOOT: Duration = Duration::from_micros(60);

    impl SimClock {
        fn new() -> SimClock {
            SimClock {
                now: Cell::new(Instant::now()),
                reads: Cell::new(0),
                sleeps: Cell::new(0),
            }
        }
        /// The time without advancing it.
        fn peek(&self) -> Instant {
            self.now.get()
        }
    }

    impl Clock for &SimClock {
        fn now(&self) -> Instant {
            self.reads.set(self.reads.get() + 1);
            self.now.set(self.now.get() + READ);
            self.now.get()
        }
        fn sleep(&self, d: Duration) {
            self.sleeps.set(self.sleeps.get() + 1);
            self.now.set(self.now.get() + d + OVERSHOOT);
        }
    }

    #[test]
    fn a_slow_rate_sleeps_and_spins_only_at_the_end() {
        let clock = SimClock::new();
        let mut p = Pacer::with_clock(5.0, &clock);
        let start = clock.peek();
        p.wait_next();
        assert!(
            clock.peek() - start < Duration::from_micros(10),
            "first is due at once"
        );
        for i in 1..=3u64 {
            let reads = clock.reads.get();
            let sleeps = clock.sleeps.get();
            p.wait_next();
            let due = start + Duration::from_millis(200 * i);
            assert_eq!(p.due(i), Some(due));
            assert!(clock.peek() >= due, "message {i} waited until due");
            assert!(
                clock.peek() - due <= READ,
                "message {i} late by {:?}",
                clock.peek() - due
            );
            assert_eq!(clock.sleeps.get() - sleeps, 1, "one sleep for 200 ms");
            // Only the spin window (minus the overshoot) is spun: about 140 reads, not 200,000.
            let spun = clock.reads.get() - reads;
            assert!(
                spun <= (SPIN_WINDOW.as_micros() as u64) + 2,
                "message {i}: {spun} clock reads"
            );
        }
    }

    #[test]
    fn a_high_rate_spins_and_meets_every_due_time() {
        let clock = SimClock::new();
        let mut p = Pacer::with_clock(100_000.0, &clock);
        let start = clock.peek();
        for i in 0..1000u64 {
            p.wait_next();
            let due = start + Duration::from_micros(10 * i);
            assert!(clock.peek() >= due, "message {i} before it was due");
            assert!(clock.peek() - due <= READ, "message {i} late");
        }
        assert_eq!(
            clock.sleeps.get(),
            0,
            "10 µs intervals are spun, never slept"
        );
    }

    #[test]
    fn counts_the_rate_over_a_simulated_second() {
        let clock = SimClock::new();
        let mut p = Pacer::with_clock(1000.0, &clock);
        let end = clock.peek() + Duration::from_secs(1);
        let mut sent = 0u64;
        loop {
            p.wait_next();
            if clock.peek() >= end {
                break;
            }
            sent += 1;
        }
        assert_eq!(sent, 1000, "messages 0..999 are due within the second");
        assert_eq!(clock.sleeps.get(), 1000, "every 1 ms interval is slept");
    }

    #[test]
    fn no_rate_never_waits() {
        for rate in [0.0, -1.0, f64::NAN] {
            let clock = SimClock::new();
            let mut p = Pacer::with_clock(rate, &clock);
            let reads = clock.reads.get();
            for _ in 0..100 {
                p.wait_next();
            }
            assert_eq!(p.due(5), None);
            assert_eq!(
                clock.reads.get(),
                reads,
                "rate {rate}: the clock is not read"
            );
            assert_eq!(clock.sleeps.get(), 0);
        }
    }

    #[test]
    fn an_absurdly_low_rate_does_not_overflow() {
        let clock = SimClock::new();
        let p = Pacer::with_clock(1e-300, &clock);
        assert_eq!(p.due(1), Some(clock.peek() + FAR));
    }
}
