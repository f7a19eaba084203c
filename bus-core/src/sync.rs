//! The atomics the cross-process protocols are written against.
//!
//! [`crate::wake::protocol`] holds every ordering decision of the publish / consume / park /
//! wake protocol (and of the client's inbox handshake) as small functions over these types.
//! Normally they are the standard library's; under `--cfg loom` they are loom's, and the loom
//! models in `wake::protocol` exercise exactly the functions the ring and the client call. The
//! ring itself (and `layout`) always views mapped memory through the standard types, because
//! loom's atomics cannot be laid over raw mapped memory; so under `--cfg loom` only this module
//! and the protocol are compiled.
//!
//! # Words another process writes
//!
//! A reader maps a ring, and a publisher maps a subscriber's cursor page, `PROT_READ`. The
//! standard library guarantees only one kind of atomic access to read-only memory: a naturally
//! aligned load of at most 8 bytes (on 64-bit targets) with [`Ordering::Relaxed`] ("Atomic
//! accesses to read-only memory" in `core::sync::atomic`). An Acquire load must therefore be
//! written as a Relaxed load followed by an Acquire fence, which the same documentation names
//! as the replacement. [`SharedWord`] is the one capability the protocol's reader-side
//! functions ask of such a word, so none of them can do anything else with it.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

/// A 64-bit word written by another party that this side only reads: one Relaxed load is all
/// it offers. Implemented by [`AtomicU64`] (for words in writable memory and for the loom
/// models) and by the ring's view of words in read-only mappings.
pub trait SharedWord {
    /// One atomic load with [`Ordering::Relaxed`].
    fn load_relaxed(&self) -> u64;
}

impl SharedWord for AtomicU64 {
    #[inline(always)]
    fn load_relaxed(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

// Relaxed loads of 8 bytes on read-only memory are guaranteed only where the target's table in
// `core::sync::atomic` ("Atomic accesses to read-only memory") lists 8 bytes.
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "loongarch64",
    target_arch = "powerpc64",
    target_arch = "riscv64",
    target_arch = "s390x",
)))]
compile_error!(
    "membus maps shared memory read-only and needs 8-byte Relaxed atomic loads on it, which the \
     standard library guarantees only on 64-bit targets"
);
