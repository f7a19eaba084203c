//! Percentile tables for people.

use hdrhistogram::Histogram;

/// Formats nanoseconds with a unit.
pub fn ns(v: u64) -> String {
    bus_client::latency::format_ns(v as f64)
}

/// Prints one row per histogram: count, p50, p90, p99, p99.9, max.
pub fn print_latency_table(rows: &[(&str, &Histogram<u64>)]) {
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "messages", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, h) in rows {
        let q = |p: f64| ns(h.value_at_quantile(p));
        println!(
            "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            h.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            ns(h.max())
        );
    }
}
