//! Raw single-producer single-consumer rings in shared memory, one-way streams: the parent
//! writes records, the peer reads them. Both rings hold [`RING_BYTES`] of records (L2-resident).
//!
//! Fixed slots with a per-slot sequence (Vyukov / Disruptor style), slot `i` of `cap`:
//!
//! ```text
//!   i * size   [seq u64 | payload: size - 8 bytes]
//! ```
//!
//! `seq == pos` means free for the writer's `pos`; the writer fills the payload and stores
//! `pos + 1` (release); the reader waits for `pos + 1` (acquire), sums, and stores `pos + cap`.
//! No shared counters: each slot's line carries its own handshake.
//!
//! Head/tail counters (Lamport style, with cached copies of the other side's counter):
//!
//! ```text
//!   0     [head u64]   written by the writer: records published
//!   128   [tail u64]   written by the reader: records consumed
//!   256   [records: cap * size bytes, all payload]
//! ```
//!
//! The writer publishes `head` every `batch` records (1 = per record); the reader publishes
//! `tail` after every record. Each side reloads the other's counter only when its cached copy
//! says the ring is full (writer) or empty (reader).

use std::sync::atomic::Ordering;

use anyhow::{Result, ensure};
use bus_core::sys::clock::monotonic_ns;

use crate::case::{CaseResult, Params};
use crate::checksum::{pattern_byte, pattern_sum};
use crate::measure::{spin_until, stream_result};
use crate::peer::{Peer, PeerCtx};
use crate::shm::{PAD, Region};

/// Bytes of records in each ring.
pub const RING_BYTES: usize = 256 * 1024;

const SALT: u8 = 0x69;

fn slots(size: usize) -> Result<usize> {
    ensure!(
        size >= 16 && size.is_multiple_of(8),
        "ring record size {size} must be a multiple of 8, >= 16"
    );
    ensure!(
        RING_BYTES.is_multiple_of(size),
        "ring record size {size} must divide {RING_BYTES}"
    );
    Ok(RING_BYTES / size)
}

/// Parent side of the per-slot-sequence ring: writes `p.messages` records.
pub fn slots_run(p: &Params) -> Result<CaseResult> {
    let cap = slots(p.size)?;
    let region = Region::create("membus-bench-ring-slots", RING_BYTES)?;
    for i in 0..cap {
        region
            .atomic_u64(i * p.size)
            .store(i as u64, Ordering::Relaxed);
    }
    let mut peer = Peer::spawn(p, &[region.fd()])?;
    peer.wait_ready()?;
    let len = p.size - 8;
    let mut sent = 0u64;
    let start = monotonic_ns();
    for pos in 0..p.messages {
        let off = (pos as usize % cap) * p.size;
        let seq = region.atomic_u64(off);
        // SYNC POINT: acquire pairs with the reader's release of `pos + cap` (slot free).
        spin_until(|| seq.load(Ordering::Acquire) == pos);
        let byte = pattern_byte(pos, SALT);
        region.fill(off + 8, len, byte);
        sent = sent.wrapping_add(pattern_sum(byte, len));
        // SYNC POINT: release publishes the payload; pairs with the reader's acquire.
        seq.store(pos + 1, Ordering::Release);
    }
    let done = peer.finish()?;
    Ok(CaseResult::throughput(stream_result(
        p, start, done, sent, p.size,
    )?))
}

/// Peer side of [`slots_run`].
pub fn slots_peer(mut ctx: PeerCtx) -> Result<()> {
    let size = ctx.params.size;
    let cap = slots(size)?;
    let region = Region::open(ctx.take_fd(0)?, RING_BYTES)?;
    ctx.ready()?;
    let mut got = 0u64;
    for pos in 0..ctx.params.messages {
        let off = (pos as usize % cap) * size;
        let seq = region.atomic_u64(off);
        // SYNC POINT: acquire pairs with the writer's release of `pos + 1`.
        spin_until(|| seq.load(Ordering::Acquire) == pos + 1);
        got = got.wrapping_add(region.sum(off + 8, size - 8));
        // SYNC POINT: release hands the slot back; pairs with the writer's acquire.
        seq.store(pos + cap as u64, Ordering::Release);
    }
    ctx.done(got)
}

const HEAD: usize = 0;
const TAIL: usize = PAD;
const DATA: usize = 2 * PAD;

/// Parent side of the head/tail ring, publishing `head` every `batch` records.
pub fn headtail_run(p: &Params, batch: u64) -> Result<CaseResult> {
    let cap = slots(p.size)? as u64;
    let region = Region::create("membus-bench-ring-headtail", DATA + RING_BYTES)?;
    let mut peer = Peer::spawn(p, &[region.fd()])?;
    peer.wait_ready()?;
    let (head, tail) = (region.atomic_u64(HEAD), region.atomic_u64(TAIL));
    let mut cached_tail = 0u64;
    let mut sent = 0u64;
    let start = monotonic_ns();
    for pos in 0..p.messages {
        if pos - cached_tail == cap {
            // SYNC POINT: acquire pairs with the reader's release of `tail`: the slot we are
            // about to overwrite has been read.
            spin_until(|| {
                cached_tail = tail.load(Ordering::Acquire);
                pos - cached_tail < cap
            });
        }
        let off = DATA + (pos % cap) as usize * p.size;
        let byte = pattern_byte(pos, SALT);
        region.fill(off, p.size, byte);
        sent = sent.wrapping_add(pattern_sum(byte, p.size));
        if (pos + 1) % batch == 0 || pos + 1 == p.messages {
            // SYNC POINT: release publishes every record below `pos + 1`; pairs with the
            // reader's acquire of `head`.
            head.store(pos + 1, Ordering::Release);
        }
    }
    let done = peer.finish()?;
    Ok(CaseResult::throughput(stream_result(
        p, start, done, sent, p.size,
    )?))
}

/// Peer side of [`headtail_run`] (the same for every batch size).
pub fn headtail_peer(mut ctx: PeerCtx) -> Result<()> {
    let size = ctx.params.size;
    let cap = slots(size)? as u64;
    let region = Region::open(ctx.take_fd(0)?, DATA + RING_BYTES)?;
    let (head, tail) = (region.atomic_u64(HEAD), region.atomic_u64(TAIL));
    ctx.ready()?;
    let mut cached_head = 0u64;
    let mut got = 0u64;
    for pos in 0..ctx.params.messages {
        if pos == cached_head {
            // SYNC POINT: acquire pairs with the writer's release of `head`.
            spin_until(|| {
                cached_head = head.load(Ordering::Acquire);
                cached_head > pos
            });
            ensure!(
                cached_head - pos <= cap,
                "head {cached_head} ran past the ring"
            );
        }
        let off = DATA + (pos % cap) as usize * size;
        got = got.wrapping_add(region.sum(off, size));
        // SYNC POINT: release returns the slot; pairs with the writer's acquire of `tail`.
        tail.store(pos + 1, Ordering::Release);
    }
    ctx.done(got)
}
