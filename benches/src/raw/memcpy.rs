//! memcpy bandwidth, hot cache: one process copies a buffer into another of the same size, again
//! and again. Both buffers stay in L2; this is the ceiling for moving bytes on one core.
//!
//! The buffers are placed explicitly: `dst - src` is a multiple of 4096 plus `skew`. With
//! `skew = 0` (both page-aligned) this is the floor. `skew = 16` shows a trap found here: glibc
//! 2.36's `rep movsb` memcpy on this CPU runs ~15x slower when the destination starts just past
//! the source modulo 4 KiB (two `Vec`s from malloc land exactly like that). Any layout that
//! copies records between shared buffers must keep `(dst - src) % 4096` away from small values.

use std::hint::black_box;

use anyhow::{Result, ensure};
use bus_core::sys::clock::monotonic_ns;

use crate::case::{CaseResult, Params, Throughput};

const PAGE: usize = 4096;

/// Copies `p.size` bytes `p.messages` times, `dst - src` page-aligned.
pub fn run_aligned(p: &Params) -> Result<CaseResult> {
    run(p, 0)
}

/// Same, with `dst - src` equal to 16 modulo 4096.
pub fn run_skew16(p: &Params) -> Result<CaseResult> {
    run(p, 16)
}

fn run(p: &Params, skew: usize) -> Result<CaseResult> {
    let size = p.size;
    let mut arena = vec![0u8; 2 * size + 3 * PAGE + skew];
    // First page boundary in the arena, then the source, then the destination one page further
    // than the next boundary after the source, plus `skew`.
    let src_at = arena.as_ptr().align_offset(PAGE);
    let dst_at = src_at + size.next_multiple_of(PAGE) + PAGE + skew;
    ensure!(dst_at + size <= arena.len(), "arena too small");
    arena[src_at..src_at + size].fill(0x5a);
    let (head, tail) = arena.split_at_mut(dst_at);
    let src = &head[src_at..src_at + size];
    let dst = &mut tail[..size];
    // Warm both buffers into the cache.
    for _ in 0..16 {
        dst.copy_from_slice(black_box(src));
    }
    let start = monotonic_ns();
    for _ in 0..p.messages {
        dst.copy_from_slice(black_box(src));
        black_box(&mut *dst);
    }
    let elapsed_ns = monotonic_ns() - start;
    ensure!(dst == src, "memcpy result differs");
    Ok(CaseResult::throughput(Throughput {
        messages: p.messages,
        bytes_per_message: size as u64,
        elapsed_ns,
    }))
}
