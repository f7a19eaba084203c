//! Wakeups: the park / wake protocol, the wake socket, and the wait strategies.
//!
//! A subscriber that finds all its rings empty does not sleep straight away: it
//!
//! 1. announces that it is parking by making the park word in its cursor page odd
//!    ([`protocol::announce_park`], which ends in a `SeqCst` fence),
//! 2. looks at every ring once more,
//! 3. and only if they are still empty blocks on its wake socket ([`WakeReceiver`]).
//!
//! A publisher, after committing a record ([`protocol::commit`]), issues a `SeqCst` fence
//! ([`protocol::publisher_fence`]) and reads each subscriber's park word; it sends a 1-byte
//! datagram ([`WakeSender::wake`]) only to subscribers whose park word is odd and not already
//! woken for this park. The two fences make this Dekker's pattern: either the subscriber's second
//! look sees the record, or the publisher sees the odd park word, or both. So a wakeup is never
//! lost, and a busy stream (subscriber never parked) costs no syscall. The loom models at the
//! bottom of this file check exactly these functions.
//!
//! The wake socket is an fd, so it works with poll, epoll, io_uring and async runtimes.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
#[cfg(not(loom))]
use std::time::{Duration, Instant};

/// How a subscriber waits when its rings are empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Poll the rings without ever sleeping: lowest latency, one CPU at 100%.
    BusySpin,
    /// Poll for `spin_iterations` rounds, then park on the wake socket (the default).
    SpinThenPark {
        /// Rounds of polling before parking.
        spin_iterations: u32,
    },
    /// Park as soon as the rings are empty: no CPU while idle, a syscall per wakeup.
    Park,
}

impl Default for WaitStrategy {
    fn default() -> Self {
        // About 20-50 us of polling on current x86 before paying for a syscall.
        WaitStrategy::SpinThenPark {
            spin_iterations: 20_000,
        }
    }
}

/// The ordering decisions of the cross-process protocol, as functions over [`crate::sync`]
/// atomics so that loom can check them. The ring calls these and nothing else for its
/// synchronising loads and stores.
pub mod protocol {
    use crate::sync::{AtomicU64, Ordering, fence};

    /// Writer: publishes a record by storing its commit word (`pos + 1`).
    ///
    /// SYNC POINT: Release; pairs with the Acquire in [`is_committed`]. Every header field and
    /// payload byte written before it is visible to a reader that sees the commit word.
    #[inline]
    pub fn commit(commit_word: &AtomicU64, value: u64) {
        commit_word.store(value, Ordering::Release);
    }

    /// Reader: has the record whose commit word should read `expected` been committed?
    ///
    /// SYNC POINT: Acquire; pairs with the Release in [`commit`].
    #[inline]
    pub fn is_committed(commit_word: &AtomicU64, expected: u64) -> bool {
        commit_word.load(Ordering::Acquire) == expected
    }

    /// Writer, after [`commit`] and before reading park words.
    ///
    /// SYNC POINT: SeqCst fence; pairs with the SeqCst fence in [`announce_park`]. Store-load
    /// ordering (Dekker): either the parking reader's second look sees this commit, or the
    /// writer's following [`park_word`] load sees the odd park word.
    #[inline]
    pub fn publisher_fence() {
        fence(Ordering::SeqCst);
    }

    /// Writer: reads a subscriber's park word (after [`publisher_fence`]).
    #[inline]
    pub fn park_word(park: &AtomicU64) -> u64 {
        park.load(Ordering::Relaxed)
    }

    /// Writer: should a wakeup be sent, given the park word just read and the park word value
    /// for which the last wakeup was sent?
    #[inline]
    pub fn needs_wake(park_value: u64, last_woken: u64) -> bool {
        park_value & 1 == 1 && park_value != last_woken
    }

    /// Reader: announces that it is about to park; the caller must look at its rings again
    /// before blocking. Returns the new (odd) park word.
    ///
    /// SYNC POINT: SeqCst fence after the increment; pairs with [`publisher_fence`].
    #[inline]
    pub fn announce_park(park: &AtomicU64) -> u64 {
        // Only the subscriber writes its park word, so load + store is race-free; a plain
        // store keeps it one instruction on the subscriber's own cache line.
        let value = park.load(Ordering::Relaxed) | 1;
        park.store(value, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        value
    }

    /// Reader: leaves the parked state (after a wakeup, or when the second look found data).
    #[inline]
    pub fn unpark(park: &AtomicU64) {
        let value = park.load(Ordering::Relaxed);
        if value & 1 == 1 {
            park.store(value + 1, Ordering::Relaxed);
        }
    }

    /// Writer, before overwriting bytes: raises the claim word.
    ///
    /// SYNC POINT: Relaxed store then Release fence (the seqlock writer's "begin"); pairs with
    /// the Acquire fence in [`still_intact`]. A reader that observed any byte written after this
    /// call also observes the raised claim.
    #[inline]
    pub fn raise_claim(claim: &AtomicU64, value: u64) {
        claim.store(value, Ordering::Relaxed);
        fence(Ordering::Release);
    }

    /// Reader, after reading a record: were the bytes at absolute positions `>= pos` left
    /// untouched by the writer, given a data area of `data_bytes`?
    ///
    /// SYNC POINT: Acquire fence then Relaxed load (the seqlock reader's "validate"); pairs
    /// with [`raise_claim`].
    #[inline]
    pub fn still_intact(claim: &AtomicU64, pos: u64, data_bytes: u64) -> bool {
        fence(Ordering::Acquire);
        claim.load(Ordering::Relaxed) <= pos.saturating_add(data_bytes)
    }

    /// Reader: publishes its read cursor (everything below `pos` is released).
    ///
    /// SYNC POINT: Release; pairs with the Acquire in [`read_cursor`]: the reader's reads of
    /// released records happen before the writer reuses their bytes.
    #[inline]
    pub fn release_cursor(cursor: &AtomicU64, pos: u64) {
        cursor.store(pos, Ordering::Release);
    }

    /// Writer: reads a subscriber's read cursor. SYNC POINT: Acquire; pairs with
    /// [`release_cursor`].
    #[inline]
    pub fn read_cursor(cursor: &AtomicU64) -> u64 {
        cursor.load(Ordering::Acquire)
    }

    #[cfg(all(test, loom))]
    mod loom_models {
        use super::*;
        use loom::sync::Arc;
        use loom::sync::atomic::AtomicBool;
        use loom::thread;

        /// No lost wakeup: whenever the subscriber decides to block, the publisher decides to
        /// send it a wakeup.
        #[test]
        fn park_wake_never_loses_a_wakeup() {
            loom::model(|| {
                let commit_word = Arc::new(AtomicU64::new(0));
                let park = Arc::new(AtomicU64::new(0));
                let woken = Arc::new(AtomicBool::new(false));

                let publisher = {
                    let (commit_word, park, woken) =
                        (commit_word.clone(), park.clone(), woken.clone());
                    thread::spawn(move || {
                        commit(&commit_word, 1);
                        publisher_fence();
                        if needs_wake(park_word(&park), 0) {
                            woken.store(true, Ordering::Relaxed);
                        }
                    })
                };

                let blocked = if is_committed(&commit_word, 1) {
                    false
                } else {
                    announce_park(&park);
                    let found = is_committed(&commit_word, 1);
                    if found {
                        unpark(&park);
                    }
                    !found
                };
                publisher.join().unwrap();
                if blocked {
                    assert!(woken.load(Ordering::Relaxed), "lost wakeup");
                }
            });
        }

        /// Publish / consume: a reader that sees the commit word sees the payload.
        #[test]
        fn commit_publishes_payload() {
            loom::model(|| {
                let commit_word = Arc::new(AtomicU64::new(0));
                let payload = Arc::new(loom::cell::UnsafeCell::new(0u64));
                let writer = {
                    let (commit_word, payload) = (commit_word.clone(), payload.clone());
                    thread::spawn(move || {
                        // SAFETY: loom checks that no reader touches the cell concurrently.
                        payload.with_mut(|p| unsafe { *p = 42 });
                        commit(&commit_word, 1);
                    })
                };
                if is_committed(&commit_word, 1) {
                    // SAFETY: the Acquire in is_committed orders this after the writer's write.
                    let v = payload.with(|p| unsafe { *p });
                    assert_eq!(v, 42);
                }
                writer.join().unwrap();
            });
        }

        /// Lossy validation: a reader that accepts a record (claim check passes) read the old
        /// bytes, never a mix with the overwrite.
        #[test]
        fn claim_check_rejects_overwritten_bytes() {
            loom::model(|| {
                let claim = Arc::new(AtomicU64::new(64));
                let a = Arc::new(AtomicU64::new(1));
                let b = Arc::new(AtomicU64::new(1));
                let writer = {
                    let (claim, a, b) = (claim.clone(), a.clone(), b.clone());
                    thread::spawn(move || {
                        raise_claim(&claim, 128);
                        a.store(2, Ordering::Relaxed);
                        b.store(2, Ordering::Relaxed);
                    })
                };
                let ra = a.load(Ordering::Relaxed);
                let rb = b.load(Ordering::Relaxed);
                // Record at pos 0 in a 64-byte data area is intact while claim <= 64.
                if still_intact(&claim, 0, 64) {
                    assert_eq!((ra, rb), (1, 1), "accepted overwritten bytes");
                }
                writer.join().unwrap();
            });
        }

        /// Cursor release: the writer that sees a released cursor may overwrite; the reader's
        /// earlier read is not affected.
        #[test]
        fn released_cursor_orders_reads_before_reuse() {
            loom::model(|| {
                let cursor = Arc::new(AtomicU64::new(0));
                let cell = Arc::new(loom::cell::UnsafeCell::new(7u64));
                let reader = {
                    let (cursor, cell) = (cursor.clone(), cell.clone());
                    thread::spawn(move || {
                        // SAFETY: loom checks the writer does not write concurrently.
                        let v = cell.with(|p| unsafe { *p });
                        assert_eq!(v, 7);
                        release_cursor(&cursor, 64);
                    })
                };
                if read_cursor(&cursor) == 64 {
                    // SAFETY: the Acquire in read_cursor orders this after the reader's read.
                    cell.with_mut(|p| unsafe { *p = 8 });
                }
                reader.join().unwrap();
            });
        }
    }
}

/// Error from a wake socket operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WakeError {
    /// The socketpair could not be created.
    #[error("cannot create a wake socket pair: {0}; check the process fd limit (`ulimit -n`)")]
    Create(#[source] io::Error),
    /// Waiting on the wake socket failed.
    #[error("waiting on the wake socket failed: {0}")]
    Wait(#[source] io::Error),
}

/// The publisher's end of a subscriber's wake socket.
#[derive(Debug)]
pub struct WakeSender {
    fd: OwnedFd,
}

/// The subscriber's end of its wake socket: block on it, or register its fd with a poller.
#[derive(Debug)]
pub struct WakeReceiver {
    fd: OwnedFd,
}

/// What [`WakeSender::wake`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeOutcome {
    /// A wake datagram was queued.
    Sent,
    /// The socket buffer is full: wakeups are already pending, nothing more is needed.
    AlreadyPending,
    /// The subscriber's end is closed: it has gone away.
    Gone,
}

/// Creates a connected wake socket pair (AF_UNIX SOCK_DGRAM, non-blocking, close-on-exec).
/// The broker makes one per subscriber and hands the sender end to each publisher.
#[cfg(not(loom))]
pub fn pair() -> Result<(WakeSender, WakeReceiver), WakeError> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    // Blocking mode on both ends: every send uses MSG_DONTWAIT and every non-blocking receive
    // MSG_DONTWAIT, so the only call that blocks is the parked receive, which then costs one
    // syscall instead of poll + recv.
    let (a, b) = socketpair(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| WakeError::Create(e.into()))?;
    Ok((WakeSender { fd: a }, WakeReceiver { fd: b }))
}

#[cfg(not(loom))]
impl WakeSender {
    /// Wraps a received fd (the broker's CURSOR_GRANTED). The fd should be non-blocking; the
    /// send uses MSG_DONTWAIT regardless.
    pub fn from_fd(fd: OwnedFd) -> Self {
        WakeSender { fd }
    }

    /// Sends one wake byte without blocking.
    pub fn wake(&self) -> WakeOutcome {
        use rustix::io::Errno;
        use rustix::net::{SendFlags, send};
        match send(&self.fd, &[1u8], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(_) => WakeOutcome::Sent,
            Err(Errno::AGAIN) => WakeOutcome::AlreadyPending,
            // ECONNREFUSED / EPIPE / ENOTCONN: the subscriber's end is gone. Anything else
            // (ENOBUFS under memory pressure) leaves the subscriber to its next timeout, which
            // the client's wait loop always has; never fail a publish over a wakeup.
            Err(Errno::CONNREFUSED | Errno::PIPE | Errno::NOTCONN) => WakeOutcome::Gone,
            Err(_) => WakeOutcome::AlreadyPending,
        }
    }
}

#[cfg(not(loom))]
impl WakeReceiver {
    /// Wraps a received fd (the broker's SUBSCRIBED). It is switched to blocking mode (every
    /// non-blocking use passes MSG_DONTWAIT; poll, epoll and async runtimes work either way).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&fd, false)?;
        Ok(WakeReceiver { fd })
    }

    /// Discards all pending wake bytes. Returns how many there were.
    pub fn drain(&self) -> usize {
        use rustix::net::{RecvFlags, recv};
        let mut buf = [0u8; 64];
        let mut n = 0;
        while recv(&self.fd, &mut buf[..], RecvFlags::DONTWAIT).is_ok() {
            n += 1;
        }
        n
    }

    /// Blocks until a wake byte arrives or `timeout` passes (`None`: no limit). Returns `true`
    /// if woken, `false` on timeout. EINTR is retried with the remaining time.
    ///
    /// Without a timeout this is a single blocking `recv` of one wake byte: the parked path's
    /// only syscall. A publisher sends at most one byte per park announcement, so normally
    /// nothing is left; a stale byte only causes one spurious wakeup (the caller looks at its
    /// rings again, as it must anyway).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, WakeError> {
        use rustix::io::Errno;
        use rustix::net::{RecvFlags, recv};
        let Some(timeout) = timeout else {
            let mut buf = [0u8; 16];
            loop {
                match recv(&self.fd, &mut buf[..], RecvFlags::empty()) {
                    Ok(_) => return Ok(true),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(WakeError::Wait(e.into())),
                }
            }
        };
        if !wait_readable(self.fd.as_fd(), Some(timeout)).map_err(WakeError::Wait)? {
            return Ok(false);
        }
        Ok(self.drain() > 0)
    }
}

/// Blocks until `fd` is readable or `timeout` passes; `Ok(true)` when readable.
#[cfg(not(loom))]
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let ts = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            }
        });
        match poll(&mut fds, ts.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl AsFd for WakeReceiver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for WakeSender {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<WakeSender> for OwnedFd {
    fn from(s: WakeSender) -> OwnedFd {
        s.fd
    }
}

impl From<WakeReceiver> for OwnedFd {
    fn from(r: WakeReceiver) -> OwnedFd {
        r.fd
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn wake_then_wait_returns_woken_and_drains() {
        let (tx, rx) = pair().unwrap();
        assert_eq!(tx.wake(), WakeOutcome::Sent);
        assert_eq!(tx.wake(), WakeOutcome::Sent);
        assert!(rx.wait(Some(Duration::from_secs(5))).unwrap());
        assert_eq!(rx.drain(), 0, "wait must drain every pending byte");
    }

    #[test]
    fn wait_times_out_without_wake() {
        let (_tx, rx) = pair().unwrap();
        assert!(!rx.wait(Some(Duration::from_millis(20))).unwrap());
    }

    #[test]
    fn full_socket_reports_already_pending() {
        let (tx, _rx) = pair().unwrap();
        let mut outcomes = Vec::new();
        for _ in 0..100_000 {
            let o = tx.wake();
            outcomes.push(o);
            if o == WakeOutcome::AlreadyPending {
                break;
            }
        }
        assert_eq!(outcomes.last(), Some(&WakeOutcome::AlreadyPending));
    }

    #[test]
    fn closed_receiver_reports_gone() {
        let (tx, rx) = pair().unwrap();
        drop(rx);
        assert_eq!(tx.wake(), WakeOutcome::Gone);
    }

    #[test]
    fn needs_wake_only_for_new_odd_park_values() {
        use protocol::needs_wake;
        assert!(!needs_wake(0, 0));
        assert!(needs_wake(1, 0));
        assert!(!needs_wake(1, 1), "already woken for this park");
        assert!(!needs_wake(2, 1), "unparked");
        assert!(needs_wake(3, 1), "parked again");
    }

    #[test]
    fn announce_and_unpark_toggle_parity() {
        use crate::sync::AtomicU64;
        let park = AtomicU64::new(0);
        assert_eq!(protocol::announce_park(&park), 1);
        assert_eq!(protocol::announce_park(&park), 1, "idempotent while parked");
        protocol::unpark(&park);
        assert_eq!(park.load(std::sync::atomic::Ordering::Relaxed), 2);
        protocol::unpark(&park);
        assert_eq!(park.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(protocol::announce_park(&park), 3);
    }
}
