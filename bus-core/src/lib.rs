//! # bus-core: the membus data plane
//!
//! Everything that two membus processes must agree on byte for byte lives here, and nothing
//! else: no I/O loop, no runtime, no io_uring.
//!
//! - [`layout`]: the shared-memory format (ring header, record header, cursor page), with
//!   compile-time size and offset assertions.
//! - [`segment`]: memfd segments, their seals, and read-write / read-only mappings (the ring's
//!   data area is mapped twice back to back so a record is always one contiguous slice).
//! - [`ring`]: the single-writer, many-reader ring: [`ring::Writer`] loans and commits records in
//!   place, [`ring::Reader`] hands out zero-copy samples and never trusts the mapping.
//! - [`wake`]: the park / wake protocol over a datagram socket, and the wait strategies.
//! - [`frame`]: the control-frame codec (sans-IO) spoken on the broker's SEQPACKET socket.
//! - [`sys`]: thin syscall helpers over rustix (SCM_RIGHTS passing, clocks, CPU pinning).
//! - [`limits`]: every bound the protocol and the data plane enforce.
//! - [`naming`]: the default socket path, socket addresses, topic names.
//!
//! Unsafe code is denied at the crate root and allowed only in the modules that map or read
//! shared memory (`segment`, `ring`, `wake`, `sys`); `docs/unsafe.md` lists each use and its
//! invariants.
#![deny(unsafe_code)]

// Under `--cfg loom` only the protocol (and the atomics it is written against) is compiled:
// loom checks `wake::protocol`, the functions the ring uses for every synchronising access.
#[cfg(not(loom))]
pub mod frame;
#[cfg(not(loom))]
pub mod layout;
#[cfg(not(loom))]
pub mod limits;
#[cfg(not(loom))]
pub mod naming;
#[cfg(not(loom))]
pub mod ring;
#[cfg(not(loom))]
pub mod segment;
pub mod sync;
#[cfg(not(loom))]
pub mod sys;
pub mod wake;
