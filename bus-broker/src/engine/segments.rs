//! The broker as the memfd factory: where segments and wake sockets come from
//! ([`SegmentFactory`]), how a requested ring size is rounded, how segments are named for
//! people reading /proc/PID/fd, how many descriptors a subscriber costs, and how a failure to
//! create one is reported (out of descriptors is a limit, not a fault).

use super::*;

use bus_core::segment::SegmentError;
use bus_core::wake::{WakeError, WakeReceiver, WakeSender};

/// Where the engine gets the descriptors it creates: sealed memfds for rings and cursor pages,
/// and the socket pair of a subscriber's wake channel. Creating one is the engine's only
/// system call that can fail for reasons outside the protocol (descriptor and memory limits),
/// so it is a seam: the broker uses [`Memfd`]; the simulation test injects a factory that
/// fails on purpose, to prove a refused creation leaves nothing behind. Mapping and sealing a
/// segment the engine already holds stay direct calls: they act on its own descriptors.
pub trait SegmentFactory: Send {
    /// A sealable memfd for a ring of `data_bytes` (see `bus_core::segment::create_ring`).
    fn create_ring(&mut self, name: &str, data_bytes: usize) -> Result<OwnedFd, SegmentError>;
    /// A sealable memfd for a cursor page (see `bus_core::segment::create_cursor_page`).
    fn create_cursor_page(&mut self, name: &str) -> Result<OwnedFd, SegmentError>;
    /// A subscriber's wake socket pair (see `bus_core::wake::pair`).
    fn wake_pair(&mut self) -> Result<(WakeSender, WakeReceiver), WakeError>;
}

/// The real factory: `memfd_create` and `socketpair`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memfd;

impl SegmentFactory for Memfd {
    fn create_ring(&mut self, name: &str, data_bytes: usize) -> Result<OwnedFd, SegmentError> {
        create_ring(name, data_bytes)
    }

    fn create_cursor_page(&mut self, name: &str) -> Result<OwnedFd, SegmentError> {
        create_cursor_page(name)
    }

    fn wake_pair(&mut self) -> Result<(WakeSender, WakeReceiver), WakeError> {
        bus_core::wake::pair()
    }
}

/// The ring size a request for `ring_bytes` (non-zero) gets: the next power of two, at least
/// [`MIN_DATA_BYTES`]; `None` if that does not fit in a u64 (a request near 2^64 must be
/// refused, never wrapped).
pub(super) fn ring_size_for(ring_bytes: u64) -> Option<u64> {
    ring_bytes
        .max(MIN_DATA_BYTES as u64)
        .checked_next_power_of_two()
}

/// Longest memfd name Linux accepts (`memfd_create`: 249 bytes plus the NUL).
pub(super) const MEMFD_NAME_BYTES: usize = 249;

/// A memfd name for a topic's segment, `membus:<topic>:<suffix>`, with the topic cut on a
/// character boundary so that the name always fits (the name is for people reading
/// /proc/PID/fd; nothing looks a segment up by it).
pub(super) fn memfd_name(topic: &str, suffix: std::fmt::Arguments<'_>) -> String {
    let suffix = suffix.to_string();
    let room = MEMFD_NAME_BYTES - "membus:".len() - 1 - suffix.len();
    let topic = &topic[..topic.floor_char_boundary(room)];
    format!("membus:{topic}:{suffix}")
}

/// Descriptors the broker holds for a subscriber: cursor page and wake send end; for datagram
/// delivery also the wake receive end (which the driver watches).
pub(super) fn subscriber_fds(delivery: Transport) -> u32 {
    match delivery {
        Transport::Shm => 2,
        _ => 3,
    }
}

/// Whether a segment error (or one of its sources) is EMFILE / ENFILE.
pub(super) fn out_of_fds(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(23 | 24))
        {
            return true;
        }
        if let Some(errno) = err.downcast_ref::<rustix::io::Errno>()
            && matches!(*errno, rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A segment could not be created: out of descriptors is the broker's limit, not an internal
/// fault.
pub(super) fn segment_error(what: &str, e: impl std::fmt::Display, fds_out: bool) -> Reject {
    if fds_out {
        reject(
            ErrorCode::LimitReached,
            format!(
                "cannot create the {what}: the broker is out of file descriptors ({e}); raise \
                 its limit (ulimit -n, LimitNOFILE=) or lower limits.max_clients / \
                 limits.max_fds_per_client"
            ),
        )
    } else {
        reject(
            ErrorCode::Internal,
            format!("cannot create the {what}: {e}"),
        )
    }
}
