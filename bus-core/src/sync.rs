//! The atomics the cross-process protocols are written against.
//!
//! [`crate::wake::protocol`] holds every ordering decision of the publish / consume / park /
//! wake protocol as small functions over these types. Normally they are the standard library's;
//! under `--cfg loom` they are loom's, and the loom models in `wake::protocol` exercise exactly
//! the functions the ring calls. The ring itself (and `layout`) always views mapped memory
//! through the standard types, because loom's atomics cannot be laid over raw mapped memory; so
//! under `--cfg loom` only this module and the protocol are compiled.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU64, Ordering, fence};
