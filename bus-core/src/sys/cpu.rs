//! CPU pinning for benchmarks and latency-critical threads.

use rustix::thread::{CpuSet, sched_setaffinity};

/// Error from [`pin_current_thread`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The CPU number is not below `CpuSet::MAX_CPU`.
    #[error("cpu {cpu} is out of range (at most {max}); pick a CPU listed by `nproc`")]
    OutOfRange {
        /// The CPU asked for.
        cpu: usize,
        /// The largest CPU number a set can hold.
        max: usize,
    },
    /// The kernel refused (the CPU is offline or outside this process's cpuset).
    #[error("cannot pin to cpu {cpu}: {source}; check `taskset -p $$` for the CPUs allowed here")]
    Refused {
        /// The CPU asked for.
        cpu: usize,
        /// The kernel's answer.
        source: rustix::io::Errno,
    },
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<(), PinError> {
    if cpu >= CpuSet::MAX_CPU {
        return Err(PinError::OutOfRange {
            cpu,
            max: CpuSet::MAX_CPU - 1,
        });
    }
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).map_err(|source| PinError::Refused { cpu, source })
}

/// The number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_out_of_range_is_an_error() {
        let err = pin_current_thread(CpuSet::MAX_CPU + 5).unwrap_err();
        assert!(matches!(err, PinError::OutOfRange { .. }), "{err}");
    }

    /// Pins to a CPU this process may use (CPU 0 may be outside the cpuset) and checks that
    /// the kernel now runs the thread there alone.
    #[test]
    fn pin_to_an_allowed_cpu_works() {
        // In a thread of its own, so the test harness thread keeps its affinity.
        std::thread::spawn(|| {
            let allowed = rustix::thread::sched_getaffinity(None).expect("affinity");
            let cpu = (0..CpuSet::MAX_CPU)
                .find(|&c| allowed.is_set(c))
                .expect("some CPU is allowed");
            pin_current_thread(cpu).expect("pin to an allowed cpu");
            let now = rustix::thread::sched_getaffinity(None).expect("affinity");
            assert_eq!(now.count(), 1, "pinned to one CPU");
            assert!(now.is_set(cpu), "pinned to cpu {cpu}");
        })
        .join()
        .expect("thread");
    }
}
