//! Throughput 1 -> 1 over bus-core rings: the parent is the ring's writer, the peer its only
//! subscriber, reliable mode, with a registered cursor page declared never-parking (busy-poll),
//! exactly as the client library sets up a busy-poll subscriber (sealed memfds, `Writer::loan`
//! with the library's own wait for space, `Reader::try_recv`, release on drop).
//!
//! ```text
//! fd 0  ring         written by the parent (sealed read-only before the peer maps it)
//! fd 1  cursor page  the peer's (sealed read-only after it initialised it)
//! ```
//!
//! The writer fills every payload byte in place (the loan), the reader sums every byte before
//! releasing the record; elapsed = the writer's first loan to the reader's last release. The
//! data area is 256 KiB for 64 B and 4 KiB records (the raw rings' size) and 1 MiB for 64 KiB
//! (a 64 KiB record needs at least 256 KiB; 1 MiB keeps 15 in flight).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use bus_core::layout::{Mode, max_message_bytes_for};
use bus_core::ring::{CursorPage, CursorView, Reader, RingConfig, StartAt, Writer};
use bus_core::segment::{
    Access, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use bus_core::sys::clock::monotonic_ns;

use crate::case::{Case, CaseResult, Group, Kind, Metric, Params, Pinning, Ratio};
use crate::checksum::{pattern_byte, pattern_sum, sum};
use crate::measure::stream_result;
use crate::peer::{Peer, PeerCtx};

const SALT: u8 = 0x69;
const SUB: u64 = 7;

/// Data area for records of `size` bytes.
pub fn ring_bytes(size: usize) -> u64 {
    (((size as u64) + 64) * 8)
        .next_power_of_two()
        .max(256 << 10)
}

fn config(size: usize, mode: Mode) -> RingConfig {
    let data_bytes = ring_bytes(size);
    RingConfig {
        mode,
        data_bytes,
        max_message_bytes: max_message_bytes_for(data_bytes as usize) as u32,
        publisher_id: 1,
    }
}

fn run(p: &Params) -> Result<CaseResult> {
    let cfg = config(p.size, Mode::Reliable);
    let ring_fd = create_ring("bench-stream", cfg.data_bytes as usize)?;
    let page_fd = create_cursor_page("bench-stream-cursor")?;
    let mut w = Writer::create(
        map_ring(&ring_fd, cfg.data_bytes as usize, Access::ReadWrite)?,
        cfg,
    )?;
    seal_read_only(&ring_fd)?;
    let mut peer = Peer::spawn(p, &[ring_fd.as_fd(), page_fd.as_fd()])?;
    peer.wait_ready()?;
    seal_read_only(&page_fd)?;
    w.add_reader(
        CursorView::attach(map_cursor_page(&page_fd, Access::ReadOnly)?, SUB)?,
        0,
        None,
    )?;
    let size = p.size;
    let mut sent = 0u64;
    let start = monotonic_ns();
    for i in 0..p.messages {
        let byte = pattern_byte(i, SALT);
        let mut loan = w
            .loan(size, Some(Duration::from_secs(10)))
            .map_err(|e| anyhow!("{e}"))?;
        loan.fill(byte);
        loan.commit();
        sent = sent.wrapping_add(pattern_sum(byte, size));
    }
    let publish_ns = monotonic_ns() - start;
    let done = peer.finish()?;
    let mut r = CaseResult::throughput(stream_result(p, start, done, sent, size)?);
    let stats = w.stats();
    r.extra.push(("writer_found_full", stats.full as f64));
    r.extra.push((
        "publish_ns_per_msg",
        publish_ns as f64 / p.messages.max(1) as f64,
    ));
    Ok(r)
}

fn peer(mut ctx: PeerCtx) -> Result<()> {
    let cfg = config(ctx.params.size, Mode::Reliable);
    let ring_fd = ctx.take_fd(0)?;
    let page_fd = ctx.take_fd(1)?;
    let page = Arc::new(CursorPage::init_with(
        map_cursor_page(&page_fd, Access::ReadWrite)?,
        SUB,
        true,
    )?);
    let mut r = Reader::attach(
        map_ring(&ring_fd, cfg.data_bytes as usize, Access::ReadOnly)?,
        cfg,
        Some((page, 0)),
        StartAt::Beginning,
    )?;
    ctx.ready()?;
    let mut got = 0u64;
    let mut n = 0u64;
    while n < ctx.params.messages {
        match r.try_recv().map_err(|e| anyhow!("{e}"))? {
            Some(s) => {
                ensure!(
                    s.lost_before() == 0,
                    "reliable ring lost {}",
                    s.lost_before()
                );
                got = got.wrapping_add(sum(&s));
                n += 1;
            }
            None => std::hint::spin_loop(),
        }
    }
    ctx.done(got)
}

/// The throughput cases.
pub fn cases() -> Vec<Case> {
    let case = |name, size, about| Case {
        name,
        group: Group::Membus,
        size,
        kind: Kind::Throughput,
        pinning: Pinning::Split,
        about,
        run,
        peer: Some(peer),
    };
    vec![
        case(
            "membus-stream-64",
            64,
            "bus-core ring 256 KiB, reliable, 1 -> 1 busy-poll reader, 64 B one-way stream",
        ),
        case(
            "membus-stream-4k",
            4096,
            "bus-core ring 256 KiB, reliable, 1 -> 1 busy-poll reader, 4 KiB one-way stream",
        ),
        case(
            "membus-stream-64k",
            65536,
            "bus-core ring 1 MiB, reliable, 1 -> 1 busy-poll reader, 64 KiB one-way stream",
        ),
    ]
}

/// Throughput ratios (PERFORMANCE.md section 3).
pub fn ratios() -> Vec<Ratio> {
    let r = |numerator, denominator, metric, target| {
        Ratio::new(numerator, denominator, metric, Some(target))
    };
    vec![
        r(
            "membus-stream-64",
            "ring-headtail-64",
            Metric::MsgsPerSec,
            ">= 1.0",
        ),
        r(
            "membus-stream-64",
            "ring-slots-64",
            Metric::MsgsPerSec,
            ">= 0.5 (stretch)",
        ),
        Ratio {
            numerator: "membus-stream-4k",
            denominator: "ring-slots-4k",
            metric: Metric::GbPerSec,
            target: None,
        },
        r(
            "membus-stream-64k",
            "seqpacket-stream-64k",
            Metric::GbPerSec,
            ">= 3.0",
        ),
        r(
            "membus-stream-64k",
            "ring-slots-4k",
            Metric::GbPerSec,
            ">= 0.5 (stretch)",
        ),
    ]
}
