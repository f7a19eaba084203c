//! Measurement loops shared by every case: ping-pong latency into a histogram, spin-waiting, and
//! the throughput figure from a peer's DONE.

use anyhow::{Result, ensure};
use bus_core::sys::clock::monotonic_ns;
use hdrhistogram::Histogram;

use crate::case::{Params, Throughput};
use crate::checksum::pattern_sum;
use crate::peer::Done;

/// Largest latency a histogram tracks: 60 s in ns (larger values are clamped, never dropped).
pub const MAX_TRACKABLE_NS: u64 = 60_000_000_000;

/// An empty one-way latency histogram: ns, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, 3).expect("static histogram bounds are valid")
}

/// Runs `round_trip(i)` for `p.warmup` unrecorded then `p.samples` recorded round trips and
/// returns the one-way latencies (RTT / 2).
///
/// One CLOCK_MONOTONIC read (vDSO, no syscall) per round trip: sample `k` is the time between
/// the reads before and after round trip `k`, so the clock read itself is inside every sample,
/// once. Timestamps go to a pre-faulted buffer; the histogram is filled after the loop.
pub fn pingpong(
    p: &Params,
    mut round_trip: impl FnMut(u64) -> Result<()>,
) -> Result<Histogram<u64>> {
    for i in 0..p.warmup {
        round_trip(i)?;
    }
    let n = usize::try_from(p.samples)?;
    let mut stamps: Vec<u64> = Vec::with_capacity(n + 1);
    // Write every element now so that no page fault lands inside a sample.
    stamps.resize(n + 1, u64::MAX);
    stamps[0] = monotonic_ns();
    for k in 0..n {
        round_trip(p.warmup + k as u64)?;
        stamps[k + 1] = monotonic_ns();
    }
    let mut h = new_histogram();
    for w in stamps.windows(2) {
        h.saturating_record(((w[1] - w[0]) / 2).max(1));
    }
    Ok(h)
}

/// The extras of a case that also records the product's own one-way figure (publish timestamp
/// in the record header -> receive) into `own`: its p50 and p99 in ns.
pub fn own_one_way(own: &Histogram<u64>) -> [(&'static str, f64); 2] {
    [
        ("own_one_way_p50_ns", own.value_at_quantile(0.5) as f64),
        ("own_one_way_p99_ns", own.value_at_quantile(0.99) as f64),
    ]
}

/// Busy-waits (with the CPU's spin hint) until `ready()` is true.
#[inline]
pub fn spin_until(mut ready: impl FnMut() -> bool) {
    while !ready() {
        std::hint::spin_loop();
    }
}

/// The throughput of a stream the parent started at `start_ns` and the peer finished with
/// `done`, after checking the peer read exactly what was written.
pub fn stream_result(
    p: &Params,
    start_ns: u64,
    done: Done,
    expected_checksum: u64,
    bytes_per_message: usize,
) -> Result<Throughput> {
    ensure!(
        done.checksum == expected_checksum,
        "{}: peer read checksum {:#x}, sender wrote {:#x}: payload torn or skipped",
        p.case,
        done.checksum,
        expected_checksum
    );
    ensure!(
        done.end_ns > start_ns,
        "{}: peer finished before the start",
        p.case
    );
    Ok(Throughput {
        messages: p.messages,
        bytes_per_message: bytes_per_message as u64,
        elapsed_ns: done.end_ns - start_ns,
    })
}

/// Checks a checksum the parent accumulated itself (e.g. of the pongs it read).
pub fn check_sum(p: &Params, what: &str, got: u64, expected: u64) -> Result<()> {
    ensure!(
        got == expected,
        "{}: {what} checksum {got:#x}, expected {expected:#x}: payload torn or skipped",
        p.case
    );
    Ok(())
}

/// The checksums of a ping-pong's parent side: what it sent, what it received and what it
/// should have received. [`Tally::check`] compares them, and the pings with the peer's DONE
/// checksum, so a torn or skipped payload fails the case instead of producing a number.
#[derive(Debug, Default)]
pub struct Tally {
    sent: u64,
    got: u64,
    expected: u64,
}

impl Tally {
    /// Counts a sent message of `len` bytes, every one `byte`.
    #[inline]
    pub fn sent(&mut self, byte: u8, len: usize) {
        self.sent = self.sent.wrapping_add(pattern_sum(byte, len));
    }

    /// Counts the checksum of a received message.
    #[inline]
    pub fn got(&mut self, sum: u64) {
        self.got = self.got.wrapping_add(sum);
    }

    /// Counts what a received message of `len` bytes of `byte` sums to.
    #[inline]
    pub fn expect(&mut self, byte: u8, len: usize) {
        self.expected = self.expected.wrapping_add(pattern_sum(byte, len));
    }

    /// Fails if the pongs received, or the pings the peer read (`peer_checksum`), differ from
    /// what was sent.
    pub fn check(&self, p: &Params, peer_checksum: u64) -> Result<()> {
        check_sum(p, "pong", self.got, self.expected)?;
        check_sum(p, "ping (read by peer)", peer_checksum, self.sent)
    }
}

/// A zeroed heap buffer of `len` bytes starting on a 4 KiB boundary. Socket cases receive into
/// and send from these, so that the kernel's copies see the same page offsets on every run
/// (glibc and kernel `rep movsb` copies are much slower for some source/destination offsets;
/// see `raw::memcpy`).
#[derive(Debug)]
pub struct PageBuf {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl PageBuf {
    /// Page size assumed for alignment.
    pub const ALIGN: usize = 4096;

    /// A page-aligned zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> PageBuf {
        let buf = vec![0u8; len + Self::ALIGN];
        let off = buf.as_ptr().align_offset(Self::ALIGN);
        PageBuf { buf, off, len }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

#[cfg(test)]
mod tally_tests {
    use super::*;

    fn params() -> Params {
        let case = crate::find_case("cacheline-pingpong").expect("a raw case");
        Params::new(&case, &crate::case::Options::new().expect("options"))
    }

    #[test]
    fn tally_accepts_what_was_sent_and_refuses_a_torn_payload() {
        let p = params();
        let mut t = Tally::default();
        t.sent(7, 64);
        t.got(crate::checksum::pattern_sum(9, 64));
        t.expect(9, 64);
        t.check(&p, crate::checksum::pattern_sum(7, 64))
            .expect("matching sums");
        assert!(
            t.check(&p, crate::checksum::pattern_sum(8, 64)).is_err(),
            "ping torn"
        );
        t.got(1);
        assert!(
            t.check(&p, crate::checksum::pattern_sum(7, 64)).is_err(),
            "pong torn"
        );
    }
}
