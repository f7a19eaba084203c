//! The one place atomics are imported from.
//!
//! Under `--cfg loom` the protocol functions in [`crate::wake::protocol`] are checked by loom
//! with loom's atomics; everywhere else they are the standard library's. Code that views shared
//! memory as atomics (the ring) always uses the standard types, because loom's atomics cannot be
//! laid over raw mapped memory.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
