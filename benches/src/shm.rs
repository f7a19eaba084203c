//! Shared memory for the two-process baselines: one memfd, mapped `MAP_SHARED` by the parent
//! and by the peer process.
//!
//! This is one of the two modules of the crate where unsafe code is allowed (the other is
//! `peer`, which adopts inherited file descriptors). Everything unsafe is here: the mapping,
//! atomics placed in it, and byte-range writes and reads.
//!
//! # The contract with the benchmark protocols
//!
//! A [`Region`] hands out plain byte ranges of memory that another process can also write. The
//! protocols in `raw` hand each range over with a release store / acquire load on an atomic word
//! (or a syscall that orders the same way), so a range is never written while the other side
//! reads it. If a protocol were wrong, the result would be a torn payload and a checksum
//! mismatch, not memory unsafety in this process: the ranges are only ever read as `u8`, for
//! which every bit pattern is valid, and no reference to them outlives the call that made it.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, AtomicU64};

use anyhow::{Context, Result, bail, ensure};
use rustix::fs::{MemfdFlags, fstat, ftruncate, memfd_create};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

use crate::checksum;

/// Size of the false-sharing unit used to lay out shared words (two cache lines: x86-64's
/// adjacent-line prefetcher pairs lines, as crossbeam's `CachePadded` assumes).
pub const PAD: usize = 128;

/// Rounds `n` up to a multiple of [`PAD`].
pub const fn padded(n: usize) -> usize {
    n.div_ceil(PAD) * PAD
}

/// A memfd mapped read-write and shared. Offsets, never pointers, cross process boundaries.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

impl Region {
    /// Creates a zero-filled memfd of `len` bytes (close-on-exec; see `peer::Peer::spawn` for how
    /// the peer inherits it) and maps it.
    pub fn create(name: &str, len: usize) -> Result<Region> {
        let fd = memfd_create(name, MemfdFlags::CLOEXEC).context("memfd_create")?;
        ftruncate(&fd, len as u64).context("ftruncate memfd")?;
        Region::map(fd, len)
    }

    /// Maps a memfd inherited from the parent; fails if it is shorter than `len`.
    pub fn open(fd: OwnedFd, len: usize) -> Result<Region> {
        let st = fstat(&fd).context("fstat inherited memfd")?;
        ensure!(
            u64::try_from(st.st_size).unwrap_or(0) >= len as u64,
            "inherited memfd is {} bytes, the case needs {len}",
            st.st_size
        );
        Region::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Region> {
        ensure!(len > 0, "a shared region needs at least one byte");
        // SAFETY: a null hint lets the kernel pick an unused address range, so no existing
        // mapping is replaced; `fd` is a memfd of at least `len` bytes (ftruncate in `create`,
        // fstat in `open`). The mapping is released once, in `Drop`.
        let addr = unsafe {
            mmap(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .context("mmap memfd")?;
        let Some(ptr) = NonNull::new(addr.cast::<u8>()) else {
            bail!("mmap returned null");
        };
        Ok(Region { ptr, len, fd })
    }

    /// The memfd, to pass to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Panics unless `off..off + len` lies inside the mapping and `off` is `align`-aligned. The
    /// offsets come from the case's own layout constants, so a failure is our bug.
    #[inline]
    fn check(&self, off: usize, len: usize, align: usize) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "range {off}+{len} outside a {}-byte region",
            self.len
        );
        assert!(
            off.is_multiple_of(align),
            "offset {off} is not {align}-aligned"
        );
    }

    /// The 32-bit atomic word at `off` (futex words, sequence words).
    #[inline]
    pub fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: in bounds and 4-aligned (checked above; the mapping is page-aligned); the
        // mapping lives as long as `&self`. Both processes only ever access this word through
        // atomics (the protocols never `fill` over a word), and any u32 is a valid AtomicU32.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) }
    }

    /// The 64-bit atomic word at `off` (ring counters, per-slot sequences).
    #[inline]
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: as for `atomic_u32`: in bounds, 8-aligned, lives as long as `&self`, only
        // accessed atomically by either process, every u64 is a valid AtomicU64.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast::<u64>()) }
    }

    /// Writes `byte` into every byte of `off..off + len` (the sender's payload write).
    #[inline]
    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        self.check(off, len, 1);
        debug_assert!(off + len <= self.len);
        // SAFETY: in bounds (checked above). The protocol owning this range has handed it to
        // this process (module docs), so no one else writes or reads it now; u8 has no
        // invalid values.
        unsafe { ptr::write_bytes(self.ptr.as_ptr().add(off), byte, len) }
    }

    /// Reads every byte of `off..off + len` and returns its [`checksum::sum`].
    #[inline]
    pub fn sum(&self, off: usize, len: usize) -> u64 {
        self.check(off, len, 1);
        debug_assert!(off + len <= self.len);
        // SAFETY: in bounds (checked above); the range was handed to this process by an acquire
        // on the protocol's word, so the peer does not write it while the slice lives (module
        // docs); the slice does not outlive this call.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) };
        checksum::sum(bytes)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, unmapped only here; every
        // reference handed out borrows `self`, so none outlives this.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn fill_sum_and_atomics_round_trip() {
        let r = Region::create("bench-test", 8192).expect("region");
        r.fill(128, 4000, 7);
        assert_eq!(r.sum(128, 4000), checksum::pattern_sum(7, 4000));
        r.atomic_u64(0).store(42, Ordering::Relaxed);
        assert_eq!(r.atomic_u64(0).load(Ordering::Relaxed), 42);
        r.atomic_u32(8).store(7, Ordering::Relaxed);
        assert_eq!(r.atomic_u32(8).load(Ordering::Relaxed), 7);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_range_panics() {
        let r = Region::create("bench-test", 4096).expect("region");
        r.fill(4000, 200, 1);
    }
}
