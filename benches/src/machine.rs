//! The machine record kept with every result: the machines here are shared VMs, so a number
//! without its machine and its steal time means little.

use std::time::{SystemTime, UNIX_EPOCH};

/// What the run ran on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs online (`processor` entries in /proc/cpuinfo).
    pub logical_cpus: usize,
    /// CPUs this process may run on.
    pub available_cpus: usize,
    /// /sys/devices/system/cpu/cpu0/topology/thread_siblings_list ("0" = no SMT sibling).
    pub cpu0_smt_siblings: String,
    /// `uname -srv`-like: kernel name, release and version.
    pub kernel: String,
    /// Host name.
    pub hostname: String,
}

impl Machine {
    /// Reads the record from /proc, /sys and uname. Missing files give "unknown", not errors.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let logical_cpus = cpuinfo
            .lines()
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(k, _)| k.trim() == "processor")
            })
            .count();
        let siblings =
            std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned());
        let u = rustix::system::uname();
        let kernel = format!(
            "{} {} {}",
            u.sysname().to_string_lossy(),
            u.release().to_string_lossy(),
            u.version().to_string_lossy()
        );
        Machine {
            cpu_model,
            logical_cpus,
            available_cpus: bus_core::sys::cpu::available_cpus(),
            cpu0_smt_siblings: siblings,
            kernel,
            hostname: u.nodename().to_string_lossy().into_owned(),
        }
    }
}

/// Steal time of all CPUs from the `cpu` line of /proc/stat, in clock ticks (USER_HZ).
pub fn steal_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal ...
    line.split_whitespace().nth(8)?.parse().ok()
}

/// Milliseconds in `ticks` of USER_HZ.
pub fn ticks_to_ms(ticks: u64) -> f64 {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    ticks as f64 * 1000.0 / hz as f64
}

/// `time` as an ISO 8601 UTC timestamp (seconds precision).
pub fn iso8601_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(iso8601_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29T12:34:56Z
        assert_eq!(iso8601_utc(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn machine_record_is_filled() {
        let m = Machine::detect();
        assert!(m.available_cpus >= 1);
        assert!(!m.kernel.is_empty());
    }
}
