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
/// synchronising loads and stores, and the client's inbox calls the `inbox_*` ones.
///
/// Reader-side functions take a [`SharedWord`](crate::sync::SharedWord): words in read-only mappings allow Relaxed
/// loads only, so every Acquire here is a Relaxed load followed by an Acquire fence. On x86-64
/// both compile to the same plain `mov` as an Acquire load would.
pub mod protocol {
    use crate::sync::{AtomicBool, AtomicU64, Ordering, SharedWord, fence};

    /// Writer: publishes a record by storing its commit word (`pos + 1`).
    ///
    /// SYNC POINT: Release; pairs with the Acquire fence in [`is_committed`]. Every header field
    /// and payload byte written before it is visible to a reader that sees the commit word.
    #[inline]
    pub fn commit(commit_word: &AtomicU64, value: u64) {
        commit_word.store(value, Ordering::Release);
    }

    /// Reader: has the record whose commit word should read `expected` been committed?
    ///
    /// SYNC POINT: Relaxed load, then (only when it matches) an Acquire fence; pairs with the
    /// Release store in [`commit`]: the record's header and payload written before the commit
    /// word are visible to every load after this returns `true`.
    #[inline]
    pub fn is_committed<W: SharedWord + ?Sized>(commit_word: &W, expected: u64) -> bool {
        if commit_word.load_relaxed() == expected {
            fence(Ordering::Acquire);
            true
        } else {
            false
        }
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

    /// Writer: reads a subscriber's park word (after [`publisher_fence`], which orders it).
    #[inline]
    pub fn park_word<W: SharedWord + ?Sized>(park: &W) -> u64 {
        park.load_relaxed()
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
    /// SYNC POINT: SeqCst fence after the store; pairs with [`publisher_fence`].
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
    /// SYNC POINT, twice:
    /// - The store is Release; pairs with the Acquire fence in [`writer_position`] that follows
    ///   its first claim load: a reader that sees this claim also sees every `next_pos` the
    ///   writer published before raising it. That is what lets a reader call a claim above
    ///   `next_pos + data_bytes` impossible (no honest writer raises the claim further than one
    ///   record plus one chunk past the `next_pos` it has published).
    /// - The Release fence after it is the seqlock writer's "begin"; pairs with the Acquire fence
    ///   in [`still_intact`]: a reader that observed any byte written after this call also
    ///   observes the raised claim.
    #[inline]
    pub fn raise_claim(claim: &AtomicU64, value: u64) {
        claim.store(value, Ordering::Release);
        fence(Ordering::Release);
    }

    /// Reader, after reading a record: were the bytes at absolute positions `>= pos` left
    /// untouched by the writer, given a data area of `data_bytes`?
    ///
    /// SYNC POINT: Acquire fence then Relaxed load (the seqlock reader's "validate"); pairs
    /// with the Release fence in [`raise_claim`].
    #[inline]
    pub fn still_intact<W: SharedWord + ?Sized>(claim: &W, pos: u64, data_bytes: u64) -> bool {
        fence(Ordering::Acquire);
        claim.load_relaxed() <= pos.saturating_add(data_bytes)
    }

    /// Reader (lossy): copies record payload words out with one Relaxed atomic load each, so
    /// that a copy racing the writer is a race of atomics (some value per word), never a data
    /// race. `out` gets `out.len()` bytes from the first `out.len().div_ceil(8)` words (the
    /// tail of the last word is dropped). Validate the copy with [`still_intact`] afterwards:
    /// that fence orders these loads before the claim load.
    #[inline]
    pub fn copy_out<W: SharedWord>(words: &[W], out: &mut [u8]) {
        debug_assert!(words.len() * 8 >= out.len());
        for (chunk, word) in out.chunks_mut(8).zip(words) {
            let bytes = word.load_relaxed().to_ne_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Writer, after [`commit`]: publishes where it stands.
    ///
    /// SYNC POINT: `next_seq` and `last_pos` Relaxed, then `next_pos` Release; pairs with the
    /// Acquire fence in [`writer_position`]: a reader that sees this `next_pos` sees these
    /// `last_pos` and `next_seq` (or newer) and every claim raised before.
    #[inline]
    pub fn publish_progress(
        next_seq_word: &AtomicU64,
        last_pos_word: &AtomicU64,
        next_pos_word: &AtomicU64,
        next_seq: u64,
        last_pos: u64,
        next_pos: u64,
    ) {
        next_seq_word.store(next_seq, Ordering::Relaxed);
        last_pos_word.store(last_pos, Ordering::Relaxed);
        next_pos_word.store(next_pos, Ordering::Release);
    }

    /// What a reader that must resynchronise saw of the writer, in the order it loaded it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct WriterPosition {
        /// `claim`, loaded first.
        pub claim_before: u64,
        /// `next_pos`, loaded after `claim_before`.
        pub next_pos: u64,
        /// `last_pos`, loaded after `next_pos`.
        pub last_pos: u64,
        /// `claim` again, loaded after `next_pos`.
        pub claim_after: u64,
    }

    impl WriterPosition {
        /// Could an honest writer have produced these values? It never lets its claim run
        /// more than `data_bytes` past its published `next_pos` (`claim_before <= next_pos +
        /// data_bytes`), and raises the claim before publishing a `next_pos` up to it
        /// (`next_pos <= claim_after`). Both hold whatever the writer does concurrently,
        /// because of the load order (see [`writer_position`]).
        #[inline]
        pub fn is_plausible(&self, data_bytes: u64) -> bool {
            self.claim_before <= self.next_pos.saturating_add(data_bytes)
                && self.next_pos <= self.claim_after
        }
    }

    /// Reader: loads the writer's `claim`, `next_pos`, `last_pos` and `claim` again.
    ///
    /// SYNC POINT, in this order:
    /// 1. `claim` (Relaxed), then an Acquire fence: pairs with the Release store in
    ///    [`raise_claim`], so the `next_pos` loaded next is at least the one published before
    ///    that claim was raised. Loading `next_pos` first could pair a stale `next_pos` with a
    ///    fresh claim and call an honest fast writer lapping us corrupt.
    /// 2. `next_pos` (Relaxed), then an Acquire fence: pairs with the Release store in
    ///    [`publish_progress`], so `last_pos` and the second claim are at least as new.
    #[inline]
    pub fn writer_position<W: SharedWord + ?Sized>(
        claim: &W,
        next_pos: &W,
        last_pos: &W,
    ) -> WriterPosition {
        let claim_before = claim.load_relaxed();
        fence(Ordering::Acquire);
        let next = next_pos.load_relaxed();
        fence(Ordering::Acquire);
        WriterPosition {
            claim_before,
            next_pos: next,
            last_pos: last_pos.load_relaxed(),
            claim_after: claim.load_relaxed(),
        }
    }

    /// Any reader of a word published with a Release store (`next_pos` for monitoring, a
    /// ring's `closed` flag): a Relaxed load and an Acquire fence.
    ///
    /// SYNC POINT: Acquire fence; pairs with the Release store that wrote the value read.
    #[inline]
    pub fn load_acquire<W: SharedWord + ?Sized>(word: &W) -> u64 {
        let value = word.load_relaxed();
        fence(Ordering::Acquire);
        value
    }

    /// Reader: publishes its read cursor (everything below `pos` is released).
    ///
    /// SYNC POINT: Release; pairs with the Acquire fence in [`read_cursor`]: the reader's reads
    /// of released records happen before the writer reuses their bytes.
    #[inline]
    pub fn release_cursor(cursor: &AtomicU64, pos: u64) {
        cursor.store(pos, Ordering::Release);
    }

    /// Writer: reads a subscriber's read cursor.
    ///
    /// SYNC POINT: Relaxed load then Acquire fence; pairs with [`release_cursor`].
    #[inline]
    pub fn read_cursor<W: SharedWord + ?Sized>(cursor: &W) -> u64 {
        load_acquire(cursor)
    }

    /// Inbox owner, on its data path: the event generation. Relaxed: an owner that sees a new
    /// value then takes the inbox lock, and the lock's order makes the events pushed before
    /// the bump visible (the bump that was read is after the pusher's unlock, so the owner's
    /// lock cannot come before that unlock without the load coming before the bump).
    #[inline]
    pub fn inbox_generation(generation: &AtomicU64) -> u64 {
        generation.load(Ordering::Relaxed)
    }

    /// Inbox, the control thread after queueing an event (under and after the inbox lock):
    /// bumps the generation and tells whether the owner announced it is going to sleep, in
    /// which case the caller must signal it.
    ///
    /// SYNC POINT: SeqCst fence between the bump and the `sleeping` load; pairs with the SeqCst
    /// fence in [`inbox_second_look`] (Dekker): either the owner's second look sees the bump,
    /// or this load sees its `sleeping` flag.
    #[inline]
    pub fn inbox_bump(generation: &AtomicU64, sleeping: &AtomicBool) -> bool {
        generation.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        sleeping.load(Ordering::Relaxed)
    }

    /// Inbox owner, about to block: announces it. Follow with [`inbox_second_look`], which
    /// orders this store.
    #[inline]
    pub fn inbox_announce_sleep(sleeping: &AtomicBool) {
        sleeping.store(true, Ordering::Relaxed);
    }

    /// Inbox owner, after [`inbox_announce_sleep`]: the generation once more. If it still
    /// equals the one last seen, the owner may block: the control thread will signal it.
    ///
    /// SYNC POINT: SeqCst fence before the load; pairs with the SeqCst fence in [`inbox_bump`].
    #[inline]
    pub fn inbox_second_look(generation: &AtomicU64) -> u64 {
        fence(Ordering::SeqCst);
        generation.load(Ordering::Relaxed)
    }

    /// Inbox owner: no longer about to block.
    #[inline]
    pub fn inbox_end_sleep(sleeping: &AtomicBool) {
        sleeping.store(false, Ordering::Relaxed);
    }

    #[cfg(all(test, loom))]
    mod loom_models {
        use super::*;
        use loom::sync::Arc;
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
                        if needs_wake(park_word(&*park), 0) {
                            woken.store(true, Ordering::Relaxed);
                        }
                    })
                };

                let blocked = if is_committed(&*commit_word, 1) {
                    false
                } else {
                    announce_park(&park);
                    let found = is_committed(&*commit_word, 1);
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

        /// Publish / consume (reliable): a reader that sees the commit word sees the payload,
        /// which writer and reader both access non-atomically, as the real code does (the
        /// loan's `&mut [u8]`, the sample's `&[u8]`).
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
                if is_committed(&*commit_word, 1) {
                    // SAFETY: the fence in is_committed orders this after the writer's write.
                    let v = payload.with(|p| unsafe { *p });
                    assert_eq!(v, 42);
                }
                writer.join().unwrap();
            });
        }

        /// Lossy: the reader's real sequence against a writer that laps it. The reader takes
        /// the record at position 0 (commit word, header word, claim check), copies its
        /// payload out with [`copy_out`] and validates the copy with [`still_intact`], exactly
        /// as `Reader::try_recv` and `Sample::copy_to` do. The writer raises the claim and
        /// overwrites header and payload for the record of the next lap. A copy the check
        /// accepts holds the old bytes, never a mix.
        ///
        /// The writer's payload stores are Relaxed atomics here, while the real writer fills
        /// its loan with plain stores: in the real system the writer is another process, and
        /// from the reader's process (the only one whose loads race) those stores are the
        /// hardware's, each aligned word arriving whole or not at all as far as an atomic load
        /// can tell. docs/unsafe.md ("ring") states this boundary of the model.
        #[test]
        fn lossy_copy_is_accepted_only_if_untouched() {
            loom::model(|| {
                const D: u64 = 128;
                let claim = Arc::new(AtomicU64::new(D));
                let commit_word = Arc::new(AtomicU64::new(1));
                let seq = Arc::new(AtomicU64::new(7));
                let payload = Arc::new([AtomicU64::new(0x11), AtomicU64::new(0x22)]);
                let writer = {
                    let (claim, commit_word, seq, payload) = (
                        claim.clone(),
                        commit_word.clone(),
                        seq.clone(),
                        payload.clone(),
                    );
                    thread::spawn(move || {
                        // The record at position D reuses the bytes of the one at 0.
                        raise_claim(&claim, 2 * D);
                        payload[0].store(0x33, Ordering::Relaxed);
                        payload[1].store(0x44, Ordering::Relaxed);
                        seq.store(8, Ordering::Relaxed);
                        commit(&commit_word, D + 1);
                    })
                };
                if is_committed(&*commit_word, 1) {
                    let s = seq.load(Ordering::Relaxed);
                    if still_intact(&*claim, 0, D) {
                        assert_eq!(s, 7, "accepted an overwritten header");
                        let mut out = [0u8; 12];
                        copy_out(&payload[..], &mut out);
                        if still_intact(&*claim, 0, D) {
                            let mut want = [0u8; 12];
                            want[..8].copy_from_slice(&0x11u64.to_ne_bytes());
                            want[8..].copy_from_slice(&0x22u64.to_ne_bytes()[..4]);
                            assert_eq!(out, want, "accepted overwritten payload bytes");
                        }
                    }
                }
                writer.join().unwrap();
            });
        }

        /// Resynchronisation judges an honest writer plausible, however it interleaves: a
        /// writer of 64-byte records in a 128-byte ring (claim chunk 16, as
        /// `Writer::reserve` raises it) laps a reader parked at position 0. Whenever the
        /// reader finds position 0 not intact and looks at the writer, the values pass
        /// [`WriterPosition::is_plausible`] and `next_pos` is past the reader, so a resync
        /// always makes progress.
        #[test]
        fn resync_never_calls_an_honest_writer_corrupt() {
            loom::model(|| {
                const D: u64 = 128;
                const REC: u64 = 64;
                const CHUNK: u64 = D / 8;
                let claim = Arc::new(AtomicU64::new(D));
                let next_pos = Arc::new(AtomicU64::new(0));
                let next_seq = Arc::new(AtomicU64::new(0));
                let last_pos = Arc::new(AtomicU64::new(0));
                let writer = {
                    let (claim, next_pos, next_seq, last_pos) = (
                        claim.clone(),
                        next_pos.clone(),
                        next_seq.clone(),
                        last_pos.clone(),
                    );
                    thread::spawn(move || {
                        let mut local_claim = D;
                        let mut pos = 0;
                        for seq in 0..3 {
                            let end = pos + REC;
                            if end > local_claim {
                                local_claim = end.next_multiple_of(CHUNK);
                                raise_claim(&claim, local_claim);
                            }
                            publish_progress(&next_seq, &last_pos, &next_pos, seq + 1, pos, end);
                            pos = end;
                        }
                    })
                };
                if !still_intact(&*claim, 0, D) {
                    let w = writer_position(&*claim, &*next_pos, &*last_pos);
                    assert!(w.is_plausible(D), "honest writer judged corrupt: {w:?}");
                    assert!(w.next_pos > 0, "resync would make no progress: {w:?}");
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
                if read_cursor(&*cursor) == 64 {
                    // SAFETY: the fence in read_cursor orders this after the reader's read.
                    cell.with_mut(|p| unsafe { *p = 8 });
                }
                reader.join().unwrap();
            });
        }

        /// The client's inbox (`bus-client/src/conn.rs`, `Inbox`): the control thread queues
        /// an event under the lock and bumps the generation, signalling only an owner that
        /// announced it sleeps (a delivery's `bump(false)`). The owner checks the generation on
        /// its data path (Relaxed, then the lock) and, before blocking, announces and looks
        /// once more. It never blocks without being signalled, and whenever it sees a new
        /// generation the event is in the queue.
        #[test]
        fn inbox_owner_never_sleeps_through_an_event() {
            loom::model(|| {
                let generation = Arc::new(AtomicU64::new(0));
                let sleeping = Arc::new(AtomicBool::new(false));
                let events = Arc::new(loom::sync::Mutex::new(0u32));
                let signalled = Arc::new(AtomicBool::new(false));
                let control = {
                    let (generation, sleeping, events, signalled) = (
                        generation.clone(),
                        sleeping.clone(),
                        events.clone(),
                        signalled.clone(),
                    );
                    thread::spawn(move || {
                        *events.lock().unwrap() += 1;
                        if inbox_bump(&generation, &sleeping) {
                            signalled.store(true, Ordering::Relaxed);
                        }
                    })
                };
                let seen = 0;
                let blocked = if inbox_generation(&generation) != seen {
                    assert_eq!(*events.lock().unwrap(), 1, "new generation, no event");
                    false
                } else {
                    inbox_announce_sleep(&sleeping);
                    let quiet = inbox_second_look(&generation) == seen;
                    if !quiet {
                        inbox_end_sleep(&sleeping);
                        assert_eq!(*events.lock().unwrap(), 1, "new generation, no event");
                    }
                    quiet
                };
                control.join().unwrap();
                if blocked {
                    assert!(
                        signalled.load(Ordering::Relaxed),
                        "owner slept through an event"
                    );
                }
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

/// The publisher's end of a subscriber's wake socket. Shared: the broker keeps one fd per
/// subscriber and its relay (the writer for datagram publishers) wakes through that same fd,
/// so waking costs no descriptor per publisher.
#[derive(Clone, Debug)]
pub struct WakeSender {
    fd: std::sync::Arc<OwnedFd>,
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
    Ok((WakeSender::from_fd(a), WakeReceiver { fd: b }))
}

#[cfg(not(loom))]
impl WakeSender {
    /// Wraps a received fd (the broker's CURSOR_GRANTED). The fd should be non-blocking; the
    /// send uses MSG_DONTWAIT regardless.
    pub fn from_fd(fd: OwnedFd) -> Self {
        WakeSender {
            fd: std::sync::Arc::new(fd),
        }
    }

    /// Wakes through an fd that is also kept elsewhere (the broker's copy of a subscriber's
    /// wake socket).
    pub fn from_shared(fd: std::sync::Arc<OwnedFd>) -> Self {
        WakeSender { fd }
    }

    /// The fd, to keep or to pass on (SCM_RIGHTS) while this sender may go on waking.
    pub fn into_shared(self) -> std::sync::Arc<OwnedFd> {
        self.fd
    }

    /// Sends one wake byte without blocking.
    pub fn wake(&self) -> WakeOutcome {
        use rustix::io::Errno;
        use rustix::net::{SendFlags, send};
        match send(&*self.fd, &[1u8], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
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
/// Discards every wake datagram queued on the receive end `fd`, without blocking. Returns how
/// many there were. (For an owner that watches the fd itself, such as the broker's driver.)
pub fn drain(fd: BorrowedFd<'_>) -> usize {
    use rustix::net::{RecvFlags, recv};
    let mut buf = [0u8; 64];
    let mut n = 0;
    while recv(fd, &mut buf[..], RecvFlags::DONTWAIT).is_ok() {
        n += 1;
    }
    n
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
        drain(self.fd.as_fd())
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
