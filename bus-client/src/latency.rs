//! Latency histograms: publish time to receive time, in nanoseconds.
//!
//! A subscriber made with [`crate::SubscriberOptions::record_latency`] records, for every
//! sample it hands out, `monotonic_ns() - sample.timestamp_ns()` (both CLOCK_MONOTONIC, one
//! time base for every process on the host). The histogram is allocated up front (1 ns to
//! 60 s, 3 significant digits) so recording never allocates; values above 60 s are clamped.
//!
//! Read it with [`crate::Subscriber::latency`], reset or merge with the `hdrhistogram` API
//! (`reset`, `add`), take one interval with [`crate::Subscriber::take_latency`], and write
//! intervals as an HdrHistogram interval log (`.hlog`, readable by HdrHistogram's
//! HistogramLogAnalyzer and `hdr-plot`) with [`write_interval_log`].
//!
//! ```
//! use std::time::Duration;
//! use bus_client::latency::{Interval, new_histogram, write_interval_log};
//! let mut h = new_histogram();
//! h.record(12_345).unwrap();
//! let mut out = Vec::new();
//! write_interval_log(&mut out, &[Interval { start: Duration::ZERO, duration: Duration::from_secs(1), histogram: &h }])?;
//! assert!(String::from_utf8(out).unwrap().contains("#[StartTime"));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;

/// Largest latency recorded exactly (larger values are clamped to it): 60 s.
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// A histogram with the bounds subscribers use (1 ns ..= 60 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant bounds are valid")
}

/// One interval of an interval log.
#[derive(Clone, Copy, Debug)]
pub struct Interval<'a> {
    /// Start, relative to the log's start time.
    pub start: Duration,
    /// Length of the interval.
    pub duration: Duration,
    /// Latencies recorded during it (nanoseconds).
    pub histogram: &'a Histogram<u64>,
}

/// Writes an HdrHistogram interval log (`.hlog`) with the given intervals; the log's start
/// time is now minus the end of the last interval.
pub fn write_interval_log<W: io::Write>(mut out: W, intervals: &[Interval<'_>]) -> io::Result<()> {
    let end = intervals
        .iter()
        .map(|i| i.start + i.duration)
        .max()
        .unwrap_or_default();
    let start = SystemTime::now()
        .checked_sub(end)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut serializer = V2DeflateSerializer::new();
    let mut builder = IntervalLogWriterBuilder::new();
    builder
        .add_comment("membus latency, publish to receive, nanoseconds")
        .with_start_time(start)
        .with_base_time(start)
        .with_max_value_divisor(1_000_000.0);
    let mut log = builder.begin_log_with(&mut out, &mut serializer)?;
    for i in intervals {
        log.write_histogram(i.histogram, i.start, i.duration, None)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
    }
    Ok(())
}

/// Formats a duration in nanoseconds for people, with a unit and about three significant
/// digits: "245 ns", "10.6 us", "320 us", "1.25 ms". The one formatter `bus` and the benchmark
/// report share.
pub fn format_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 100_000.0 {
        format!("{:.1} us", ns / 1e3)
    } else if ns < 1_000_000.0 {
        format!("{:.0} us", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}
