//! The ring: one writer, any number of readers, variable-length records in shared memory.
//!
//! # Protocol
//!
//! Positions are absolute byte offsets that only grow; a record at position `pos` lives at data
//! offset `pos % data_bytes`, and because the data area is mapped twice back to back
//! ([`crate::segment::RingMapping`]) a record that runs past the end is still one slice.
//!
//! * **Publish.** [`Writer::loan`] hands out the payload bytes of the next record in place;
//!   [`Loan::commit`] writes the record header and then publishes it with one Release store of
//!   its commit word (`pos + 1`). A reader polls the commit word of the record it expects next,
//!   so header and a small payload arrive in one cache-line transfer; there is no shared tail
//!   counter on the hot path. Because the commit word is the record's own absolute position,
//!   bytes left from an earlier lap can never look committed.
//! * **Overwrite detection (seqlock).** Before the writer overwrites bytes it raises the
//!   `claim` word in the ring header, in chunks of `data_bytes / 8` so that the line moves
//!   rarely. Bytes at positions `>= claim - data_bytes` are intact. A reader validates every
//!   record header after reading it, and a lossy [`Sample`] can be validated after the payload
//!   has been read ([`Sample::is_intact`]). A reader found lapped resynchronises at the
//!   writer's `next_pos` and reports the exact number of records it missed (sequence gap).
//! * **Reliable mode.** Each subscriber publishes, per ring, the position below which it has
//!   released everything (its cursor page, which the writer maps read-only). The writer caches
//!   the slowest cursor and rescans the cursor pages only when that cached value says the ring is
//!   full, so publish cost does not grow with subscribers. It also keeps `claim` at or below
//!   `slowest + data_bytes`, so a reliable reader is never told it was lapped when it was not.
//!   A cursor holds the writer back only if it is a record boundary the writer can prove in
//!   its own ring (`next_pos`, or a committed record inside the window): a subscriber that
//!   lies about its cursor only hurts itself.
//! * **Progress.** When [`Reader::has_pending`] or [`Reader::has_record`] says true, the next
//!   [`Reader::try_recv`] returns a sample, returns an error, or moves the reader forward. A
//!   ring state no honest writer can produce (a claim beyond what it could have raised given
//!   its `next_pos`, an implausible `next_pos`, a resync that would not move) makes the ring
//!   corrupt ([`RecvError::Corrupt`]), and a corrupt ring is skipped from then on; so no
//!   caller's poll loop can spin on a ring, and every call does bounded work.
//! * **Wakeups.** After each commit the writer runs the park check of [`crate::wake`].
//!
//! # Trust
//!
//! A reader never trusts the mapping: every value it takes from shared memory (commit word,
//! sequence, length, kind, `next_pos`, `claim`) is read once into a local, checked, and only the
//! local is used. Lengths are bounded by the geometry the broker vouched for (never re-read from
//! the ring), so every slice stays inside the double mapping. A ring whose writer writes garbage
//! yields [`RecvError`] for that ring, never a panic or an out-of-bounds read. The writer
//! likewise treats cursor and park words from subscribers' pages as untrusted numbers.
//!
//! The data path (loan, commit, try_recv, release) allocates nothing, takes no lock and makes no
//! syscall; a wake datagram is sent only to a parked subscriber.
#![allow(unsafe_code)]

use core::mem::offset_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use crate::layout::{
    CURSOR_DETACHED, CURSOR_FLAG_NEVER_PARKS, CURSOR_MAGIC, CURSOR_PAGE_BYTES, CURSOR_SLOTS,
    CURSOR_STATE_ACTIVE, CURSOR_STATE_CLOSED, CursorHeader, LAYOUT_VERSION, MAX_DATA_BYTES,
    MIN_DATA_BYTES, Mode, RECORD_ALIGN, RECORD_HEADER_BYTES, RECORD_KIND_MESSAGE,
    RING_HEADER_BYTES, RING_MAGIC, RecordHeader, RingHeader, RingInfo, cursor_slot_offset,
    max_message_bytes_for, record_bytes,
};
use crate::segment::{Access, Mapping, RingMapping};
use crate::sync::SharedWord;
use crate::sys::clock::StampClock;
use crate::wake::{WakeOutcome, WakeSender, protocol};

/// Geometry and mode of a ring, as the broker decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Delivery mode.
    pub mode: Mode,
    /// Size of the data area in bytes (power of two, [`MIN_DATA_BYTES`]..=[`MAX_DATA_BYTES`]).
    pub data_bytes: u64,
    /// Largest payload, at most [`max_message_bytes_for`]`(data_bytes)`.
    pub max_message_bytes: u32,
    /// Publisher id assigned by the broker (written into the header, checked by readers).
    pub publisher_id: u64,
}

impl RingConfig {
    /// Checks the geometry.
    pub fn validate(&self) -> Result<(), AttachError> {
        let d = self.data_bytes;
        if !d.is_power_of_two() || d < MIN_DATA_BYTES as u64 || d > MAX_DATA_BYTES as u64 {
            return Err(AttachError::BadGeometry {
                what: "data_bytes",
                value: d,
                expected: "a power of two between 4096 and 1 GiB",
            });
        }
        if self.max_message_bytes as u64 > max_message_bytes_for(d as usize) as u64 {
            return Err(AttachError::BadGeometry {
                what: "max_message_bytes",
                value: self.max_message_bytes as u64,
                expected: "at most data_bytes / 2 - 32",
            });
        }
        Ok(())
    }
}

/// Error attaching a writer or reader to a mapping.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachError {
    /// A geometry value is out of range.
    #[error("invalid ring geometry: {what} = {value}, expected {expected}")]
    BadGeometry {
        /// Which field.
        what: &'static str,
        /// The value found.
        value: u64,
        /// What is allowed.
        expected: &'static str,
    },
    /// The mapping does not have the access this side needs.
    #[error("{side} needs a {needed:?} mapping, got {got:?}")]
    WrongAccess {
        /// Writer or reader.
        side: &'static str,
        /// Access needed.
        needed: Access,
        /// Access of the mapping given.
        got: Access,
    },
    /// The header does not match what the broker said about this ring.
    #[error(
        "ring header mismatch: {field} is {found:#x} in shared memory but {expected:#x} was \
         granted; the publisher wrote a bad header or the fd is not the ring it claims to be"
    )]
    HeaderMismatch {
        /// Which header field.
        field: &'static str,
        /// Value in shared memory.
        found: u64,
        /// Value expected.
        expected: u64,
    },
    /// The cursor page header is wrong.
    #[error("cursor page header mismatch: {field} is {found:#x}, expected {expected:#x}")]
    CursorMismatch {
        /// Which header field.
        field: &'static str,
        /// Value in shared memory.
        found: u64,
        /// Value expected.
        expected: u64,
    },
    /// A publisher slot number is out of range.
    #[error("publisher slot {slot} is out of range (at most {})", CURSOR_SLOTS - 1)]
    BadSlot {
        /// The slot.
        slot: usize,
    },
    /// The writer already tracks as many readers as it may.
    #[error("too many readers on one ring (limit {limit})")]
    TooManyReaders {
        /// The limit.
        limit: usize,
    },
}

/// Error from [`Writer::loan`] and friends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoanError {
    /// The payload is larger than the ring's maximum message size.
    #[error(
        "message of {len} bytes exceeds this topic's maximum of {max} bytes; create the topic \
         with a larger max message size (and ring), or split the message"
    )]
    TooLarge {
        /// Requested length.
        len: usize,
        /// The ring's maximum.
        max: usize,
    },
    /// Reliable mode: a subscriber has not released enough space (non-blocking call).
    #[error("ring full: a subscriber has not released enough space yet (would block)")]
    WouldBlock,
    /// Reliable mode: space did not become free before the deadline.
    #[error("ring still full after {0:?}: a subscriber is not keeping up")]
    TimedOut(Duration),
}

/// What is wrong with a record a reader found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// The record's length exceeds the ring's maximum message size.
    LengthTooLarge {
        /// Length found.
        len: u32,
        /// Maximum.
        max: u32,
    },
    /// Unknown record kind.
    UnknownKind(u16),
    /// The sequence number went backwards.
    SequenceBackwards {
        /// Expected at least.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// The writer's `next_pos` is misaligned, behind or at the position of a reader it lapped
    /// (a resync would not move), or beyond the claim; or a record ends past `u64::MAX`.
    BadNextPosition(u64),
    /// The writer's claim runs further past its `next_pos` than a writer can raise it (more
    /// than `data_bytes`): it says bytes were overwritten that no record could have reached.
    ClaimBeyondNextPosition {
        /// The claim found.
        claim: u64,
        /// The `next_pos` found after it.
        next_pos: u64,
    },
}

/// Error from [`Reader::try_recv`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecvError {
    /// The writer put invalid data in the ring; this ring cannot be read further.
    #[error(
        "ring of publisher {publisher_id} is corrupt at position {pos}: {what:?}; the \
         publisher is faulty or hostile, drop this ring"
    )]
    Corrupt {
        /// Publisher id of the ring.
        publisher_id: u64,
        /// Position of the bad record.
        pos: u64,
        /// What was wrong.
        what: Corruption,
    },
}

/// Counters kept by a writer (local memory, not shared).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records committed.
    pub committed: u64,
    /// Times a reliable loan found the ring full.
    pub full: u64,
    /// Wake datagrams sent.
    pub wakes_sent: u64,
}

/// Returns `&AtomicU64` at `base + off`, for memory this process may write: its own ring (the
/// writer) or its own cursor page (the subscriber).
///
/// # Safety
/// `base + off` must be 8-aligned, inside a live read-write mapping of at least `off + 8` bytes
/// that outlives `'a`, and only ever accessed atomically by membus processes.
#[inline(always)]
unsafe fn atomic_u64<'a>(base: *const u8, off: usize) -> &'a AtomicU64 {
    debug_assert!((base as usize + off).is_multiple_of(8));
    // SAFETY: the caller guarantees alignment, bounds, write access and lifetime (the
    // conditions of `AtomicU64::from_ptr`); AtomicU64 has the layout of u64 and permits shared
    // mutation, so a reference to memory other processes also access atomically is sound.
    unsafe { AtomicU64::from_ptr(base.add(off) as *mut u64) }
}

/// Returns `&AtomicU32` at `base + off`.
///
/// # Safety
/// As for [`atomic_u64`], with 4-byte alignment and size.
#[inline(always)]
unsafe fn atomic_u32<'a>(base: *const u8, off: usize) -> &'a AtomicU32 {
    debug_assert!((base as usize + off).is_multiple_of(4));
    // SAFETY: as in atomic_u64.
    unsafe { AtomicU32::from_ptr(base.add(off) as *mut u32) }
}

/// A 64-bit word of a mapping that may be read-only (`PROT_READ`) and that another process
/// writes: a reader's view of its ring, a publisher's view of a cursor page. It offers one
/// thing, a Relaxed atomic load, the only atomic access the standard library allows on
/// read-only memory ("Atomic accesses to read-only memory" in `core::sync::atomic`; 8 bytes
/// on the 64-bit targets `crate::sync` admits). Acquire is a Relaxed load plus a fence
/// (`wake::protocol`). No `&AtomicU64` over such memory is ever handed out, so nothing can
/// store through one.
#[repr(transparent)]
struct RoU64(AtomicU64);

impl SharedWord for RoU64 {
    #[inline(always)]
    fn load_relaxed(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// [`RoU64`] for a 32-bit word.
#[repr(transparent)]
struct RoU32(AtomicU32);

impl RoU32 {
    /// A Relaxed load (see [`RoU64`]).
    #[inline(always)]
    fn load_relaxed(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// A Relaxed load, then an Acquire fence (an Acquire load is not allowed on read-only
    /// memory). The caller names the Release store it pairs with.
    #[inline(always)]
    fn load_acquire(&self) -> u32 {
        let v = self.load_relaxed();
        fence(Ordering::Acquire);
        v
    }
}

/// Returns a read-only view of the 64-bit word at `base + off`.
///
/// # Safety
/// `base + off` must be 8-aligned, inside a live mapping (read-only or read-write) of at least
/// `off + 8` bytes that outlives `'a`, and only ever written atomically by membus processes.
#[inline(always)]
unsafe fn ro_u64<'a>(base: *const u8, off: usize) -> &'a RoU64 {
    debug_assert!((base as usize + off).is_multiple_of(8));
    // SAFETY: the caller guarantees alignment, bounds and lifetime, so the reference is
    // dereferenceable for its whole life (a shared reference to a type with interior
    // mutability needs readable memory, not writable). RoU64 is a transparent AtomicU64 whose
    // only access is a Relaxed 8-byte load, which is defined on read-only memory on every
    // target crate::sync admits.
    unsafe { &*(base.add(off) as *const RoU64) }
}

/// [`ro_u64`] for a 32-bit word.
///
/// # Safety
/// As for [`ro_u64`], with 4-byte alignment and size.
#[inline(always)]
unsafe fn ro_u32<'a>(base: *const u8, off: usize) -> &'a RoU32 {
    debug_assert!((base as usize + off).is_multiple_of(4));
    // SAFETY: as in ro_u64 (a 4-byte Relaxed load is within the read-only limit everywhere).
    unsafe { &*(base.add(off) as *const RoU32) }
}

/// Splits a word read from memory into the two `u32` fields it holds, lower address first.
fn halves(word: u64) -> (u32, u32) {
    let b = word.to_ne_bytes();
    (
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    )
}

const NEXT_POS_OFF: usize = offset_of!(RingHeader, next_pos);
const NEXT_SEQ_OFF: usize = offset_of!(RingHeader, next_seq);
const LAST_POS_OFF: usize = offset_of!(RingHeader, last_pos);
const CLAIM_OFF: usize = offset_of!(RingHeader, claim);
const CLOSED_OFF: usize = offset_of!(RingHeader, closed);
const END_SEQ_OFF: usize = offset_of!(RingHeader, end_seq);
const SEQ_OFF: usize = offset_of!(RecordHeader, seq);
const TS_OFF: usize = offset_of!(RecordHeader, timestamp_ns);
const META_OFF: usize = offset_of!(RecordHeader, meta);
const PARK_OFF: usize = offset_of!(CursorHeader, park);
const FLAGS_OFF: usize = offset_of!(CursorHeader, flags);
const STATE_OFF: usize = offset_of!(CursorHeader, state);

/// Reads the write-once header info word by word with Relaxed atomic loads: a hostile writer
/// may change it while we read (a plain or volatile read racing its store would be a data
/// race); we take one copy and use only that. The reserved tail is not read.
fn read_info(map: &RingMapping) -> RingInfo {
    const _: () = assert!(
        offset_of!(RingInfo, layout_version) == 8
            && offset_of!(RingInfo, mode) == 12
            && offset_of!(RingInfo, header_bytes) == 16
            && offset_of!(RingInfo, record_align) == 20
            && offset_of!(RingInfo, data_bytes) == 24
            && offset_of!(RingInfo, max_message_bytes) == 32
            && offset_of!(RingInfo, writer_pid) == 36
            && offset_of!(RingInfo, publisher_id) == 40
    );
    // SAFETY: offsets 0..48 step 8 are 8-aligned inside the header page, mapped for the
    // mapping's life.
    let word = |off| unsafe { ro_u64(map.header_ptr(), off) }.load_relaxed();
    let (layout_version, mode) = halves(word(8));
    let (header_bytes, record_align) = halves(word(16));
    let (max_message_bytes, writer_pid) = halves(word(32));
    RingInfo {
        magic: word(0).to_ne_bytes(),
        layout_version,
        mode,
        header_bytes,
        record_align,
        data_bytes: word(24),
        max_message_bytes,
        writer_pid,
        publisher_id: word(40),
        reserved: [0; 80],
    }
}

// ---------------------------------------------------------------------------------------------
// Cursor pages
// ---------------------------------------------------------------------------------------------

/// A subscriber's own cursor page (mapped read-write by the subscriber alone).
#[derive(Debug)]
pub struct CursorPage {
    map: Mapping,
}

impl CursorPage {
    /// Initialises a freshly created cursor page: header, every slot detached, state active.
    pub fn init(map: Mapping, subscriber_id: u64) -> Result<Self, AttachError> {
        CursorPage::init_with(map, subscriber_id, false)
    }

    /// [`CursorPage::init`] for a subscriber that declares whether it will ever park. One that
    /// never parks (busy-spin) spares every publisher the park check and its `SeqCst` fence.
    pub fn init_with(
        map: Mapping,
        subscriber_id: u64,
        never_parks: bool,
    ) -> Result<Self, AttachError> {
        if map.access() != Access::ReadWrite {
            return Err(AttachError::WrongAccess {
                side: "cursor page owner",
                needed: Access::ReadWrite,
                got: map.access(),
            });
        }
        if map.len() < CURSOR_PAGE_BYTES {
            return Err(AttachError::BadGeometry {
                what: "cursor page size",
                value: map.len() as u64,
                expected: "CURSOR_PAGE_BYTES",
            });
        }
        let base = map.as_mut_ptr();
        let page = CursorPage { map };
        let mut header =
            CursorHeader::new(subscriber_id, rustix::process::getpid().as_raw_nonzero());
        if never_parks {
            header.flags |= CURSOR_FLAG_NEVER_PARKS;
        }
        // SAFETY: the mapping is read-write, at least CURSOR_PAGE_BYTES long, page-aligned, and
        // nobody else can write it (we are its only writer); CursorHeader fits at offset 0.
        unsafe { core::ptr::write_volatile(base as *mut CursorHeader, header) };
        for slot in 0..CURSOR_SLOTS {
            page.slot(slot).store(CURSOR_DETACHED, Ordering::Release);
        }
        Ok(page)
    }

    fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// The park word (see [`crate::wake`]).
    pub fn park_word(&self) -> &AtomicU64 {
        // SAFETY: PARK_OFF is 8-aligned inside the page, which lives as long as self.
        unsafe { atomic_u64(self.base(), PARK_OFF) }
    }

    /// The read cursor for the ring in publisher slot `slot` (< CURSOR_SLOTS).
    fn slot(&self, slot: usize) -> &AtomicU64 {
        assert!(slot < CURSOR_SLOTS, "slot checked by the caller");
        // SAFETY: slot < CURSOR_SLOTS so the offset is inside the page; 8-aligned by layout.
        unsafe { atomic_u64(self.base(), cursor_slot_offset(slot)) }
    }

    /// Marks the subscriber as gone: publishers stop waiting for its cursors.
    pub fn close(&self) {
        // SAFETY: STATE_OFF is 4-aligned inside the page.
        let state = unsafe { atomic_u32(self.base(), STATE_OFF) };
        state.store(CURSOR_STATE_CLOSED, Ordering::Release);
    }
}

impl CursorHeader {
    fn new(subscriber_id: u64, pid: core::num::NonZeroI32) -> Self {
        // SAFETY: CursorHeader is integers and atomics, all valid when zeroed.
        let mut h: CursorHeader = unsafe { core::mem::zeroed() };
        h.magic = CURSOR_MAGIC;
        h.layout_version = LAYOUT_VERSION;
        h.slots = CURSOR_SLOTS as u32;
        h.subscriber_id = subscriber_id;
        h.pid = pid.get() as u32;
        h.state = AtomicU32::new(CURSOR_STATE_ACTIVE);
        h
    }
}

/// A publisher's read-only view of one subscriber's cursor page.
#[derive(Debug)]
pub struct CursorView {
    map: Mapping,
    subscriber_id: u64,
    never_parks: bool,
}

impl CursorView {
    /// Verifies a cursor page received from the broker. The header is read once.
    pub fn attach(map: Mapping, subscriber_id: u64) -> Result<Self, AttachError> {
        if map.len() < CURSOR_PAGE_BYTES {
            return Err(AttachError::BadGeometry {
                what: "cursor page size",
                value: map.len() as u64,
                expected: "CURSOR_PAGE_BYTES",
            });
        }
        const _: () = assert!(FLAGS_OFF == 28);
        let base = map.as_ptr();
        // One Relaxed atomic load per header word: the subscriber may still be writing its
        // page (a volatile read racing that would be a data race). We take one copy.
        // SAFETY: offsets 0, 8, 16 and 24 are 8-aligned inside the page, which is mapped for at
        // least CURSOR_PAGE_BYTES while `map` lives.
        let word = |off| unsafe { ro_u64(base, off) }.load_relaxed();
        let magic = word(0).to_ne_bytes();
        let (version, slots) = halves(word(8));
        let id = word(16);
        let (_pid, flags) = halves(word(24));
        let checks = [
            (
                "magic",
                u64::from_le_bytes(magic),
                u64::from_le_bytes(CURSOR_MAGIC),
            ),
            ("layout_version", version as u64, LAYOUT_VERSION as u64),
            ("slots", slots as u64, CURSOR_SLOTS as u64),
            ("subscriber_id", id, subscriber_id),
        ];
        for (field, found, expected) in checks {
            if found != expected {
                return Err(AttachError::CursorMismatch {
                    field,
                    found,
                    expected,
                });
            }
        }
        Ok(CursorView {
            map,
            subscriber_id,
            never_parks: flags & CURSOR_FLAG_NEVER_PARKS != 0,
        })
    }

    /// The subscriber this page belongs to.
    pub fn subscriber_id(&self) -> u64 {
        self.subscriber_id
    }

    /// The subscriber's cursor for the ring in publisher slot `slot` ([`CURSOR_DETACHED`] if it
    /// does not read it). An untrusted number: the subscriber writes it.
    pub fn read_pos(&self, slot: usize) -> u64 {
        if slot >= CURSOR_SLOTS {
            return CURSOR_DETACHED;
        }
        // SAFETY: slot < CURSOR_SLOTS (checked above) so the offset is in the page, 8-aligned.
        protocol::read_cursor(unsafe { ro_u64(self.map.as_ptr(), cursor_slot_offset(slot)) })
    }

    /// The subscriber's park word (odd while parked).
    pub fn park(&self) -> u64 {
        // SAFETY: PARK_OFF is inside the page and 8-aligned.
        protocol::park_word(unsafe { ro_u64(self.map.as_ptr(), PARK_OFF) })
    }

    /// True once the subscriber marked its page closed.
    pub fn is_closed(&self) -> bool {
        // SAFETY: STATE_OFF is inside the page and 4-aligned.
        let state = unsafe { ro_u32(self.map.as_ptr(), STATE_OFF) };
        // SYNC POINT: Relaxed load + Acquire fence; pairs with the Release store in
        // CursorPage::close (nothing is read after it that the subscriber wrote before, but
        // the pairing keeps "closed" ordered after the subscriber's last cursor store).
        state.load_acquire() == CURSOR_STATE_CLOSED
    }
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Most readers one writer tracks (cursor pages it maps).
pub const MAX_READERS_PER_RING: usize = 4096;

struct ReaderLink {
    cursor: CursorView,
    slot: usize,
    wake: Option<WakeSender>,
    last_woken: u64,
    /// Where the reader counts as being while its cursor still reads "detached": `Some(0)` for
    /// a subscriber that was there before this publisher (it will read the ring from its first
    /// record, so nothing may be overwritten before it attaches); `None` for one that joins
    /// later (it starts at the writer's position when it attaches).
    until_attached: Option<u64>,
}

/// The single writer of a ring.
pub struct Writer {
    map: RingMapping,
    cfg: RingConfig,
    mask: u64,
    chunk: u64,
    next_pos: u64,
    next_seq: u64,
    claim: u64,
    /// Reliable mode: a lower bound of the slowest live reader's cursor.
    cached_min: u64,
    readers: Vec<ReaderLink>,
    /// Readers that may park (the park check runs only if this is non-zero).
    parking_readers: usize,
    /// Record timestamps (CLOCK_MONOTONIC, extrapolated with the TSC between exact reads).
    clock: StampClock,
    stats: WriterStats,
    /// With [`Writer::defer_wakes`]: subscribers due a wakeup, for the owner to send (the
    /// broker's relay does no I/O itself; its driver sends them).
    due_wakes: Option<Vec<u64>>,
}

impl core::fmt::Debug for Writer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Writer")
            .field("cfg", &self.cfg)
            .field("next_pos", &self.next_pos)
            .field("next_seq", &self.next_seq)
            .field("readers", &self.readers.len())
            .finish()
    }
}

impl Writer {
    /// Becomes the writer of a freshly created ring: writes its header. The caller then tells
    /// the broker it is ready (PUBLISHER_READY), after which the broker seals the ring
    /// read-only for everyone else.
    pub fn create(map: RingMapping, cfg: RingConfig) -> Result<Writer, AttachError> {
        cfg.validate()?;
        if map.access() != Access::ReadWrite {
            return Err(AttachError::WrongAccess {
                side: "ring writer",
                needed: Access::ReadWrite,
                got: map.access(),
            });
        }
        if map.data_bytes() as u64 != cfg.data_bytes {
            return Err(AttachError::HeaderMismatch {
                field: "data_bytes (mapping)",
                found: map.data_bytes() as u64,
                expected: cfg.data_bytes,
            });
        }
        let info = RingInfo {
            magic: RING_MAGIC,
            layout_version: LAYOUT_VERSION,
            mode: cfg.mode.to_raw(),
            header_bytes: RING_HEADER_BYTES as u32,
            record_align: RECORD_ALIGN as u32,
            data_bytes: cfg.data_bytes,
            max_message_bytes: cfg.max_message_bytes,
            writer_pid: rustix::process::getpid().as_raw_nonzero().get() as u32,
            publisher_id: cfg.publisher_id,
            reserved: [0; 80],
        };
        let header = map.header_mut_ptr();
        let w = Writer {
            mask: cfg.data_bytes - 1,
            chunk: cfg.data_bytes / 8,
            next_pos: 0,
            next_seq: 0,
            claim: cfg.data_bytes,
            cached_min: 0,
            readers: Vec::new(),
            parking_readers: 0,
            clock: StampClock::new(),
            stats: WriterStats::default(),
            due_wakes: None,
            map,
            cfg,
        };
        // SAFETY: the mapping is read-write with a RING_HEADER_BYTES header page; we are the
        // only writer and nobody reads before we acknowledge.
        unsafe { core::ptr::write_volatile(header as *mut RingInfo, info) };
        w.header_u64(NEXT_POS_OFF).store(0, Ordering::Release);
        protocol::raise_claim(w.header_u64(CLAIM_OFF), w.claim);
        Ok(w)
    }

    #[inline]
    fn header_u64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: off is one of the 8-aligned header offsets, inside the header page.
        unsafe { atomic_u64(self.map.header_ptr(), off) }
    }

    /// The ring's configuration.
    pub fn config(&self) -> &RingConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Starts tracking a subscriber: its cursor page (read-only), the slot this ring occupies in
    /// it, and the wake socket to nudge it with. Replaces an existing link to the same
    /// subscriber.
    pub fn add_reader(
        &mut self,
        cursor: CursorView,
        slot: usize,
        wake: Option<WakeSender>,
    ) -> Result<(), AttachError> {
        self.add_reader_at(cursor, slot, wake, None)
    }

    /// [`Writer::add_reader`] for a subscriber that was there before this publisher and will
    /// read the ring from its first record (`RING_GRANTED` role reader-from-start): until its
    /// cursor is attached it counts as being at position 0, so a reliable writer does not
    /// overwrite anything it has not read.
    pub fn add_reader_from_start(
        &mut self,
        cursor: CursorView,
        slot: usize,
        wake: Option<WakeSender>,
    ) -> Result<(), AttachError> {
        self.add_reader_at(cursor, slot, wake, Some(0))
    }

    fn add_reader_at(
        &mut self,
        cursor: CursorView,
        slot: usize,
        wake: Option<WakeSender>,
        until_attached: Option<u64>,
    ) -> Result<(), AttachError> {
        if slot >= CURSOR_SLOTS {
            return Err(AttachError::BadSlot { slot });
        }
        self.remove_reader(cursor.subscriber_id());
        if self.readers.len() >= MAX_READERS_PER_RING {
            return Err(AttachError::TooManyReaders {
                limit: MAX_READERS_PER_RING,
            });
        }
        self.readers.push(ReaderLink {
            cursor,
            slot,
            wake,
            last_woken: 0,
            until_attached,
        });
        self.parking_readers = self
            .readers
            .iter()
            .filter(|r| !r.cursor.never_parks)
            .count();
        // A new reader may be slower than the cached minimum.
        self.cached_min = self
            .cached_min
            .min(self.next_pos)
            .min(until_attached.unwrap_or(u64::MAX));
        Ok(())
    }

    /// Stops tracking a subscriber (it left, or the broker evicted it). Returns whether it was
    /// tracked.
    pub fn remove_reader(&mut self, subscriber_id: u64) -> bool {
        let before = self.readers.len();
        self.readers
            .retain(|r| r.cursor.subscriber_id() != subscriber_id);
        self.parking_readers = self
            .readers
            .iter()
            .filter(|r| !r.cursor.never_parks)
            .count();
        before != self.readers.len()
    }

    /// Number of subscribers tracked.
    pub fn reader_count(&self) -> usize {
        self.readers.len()
    }

    /// Rescans every cursor; returns the slowest position a live reader can be proven to hold,
    /// or `next_pos` with no such reader.
    ///
    /// A subscriber writes its own cursor, so the writer judges each value against its own ring
    /// (trusted memory it alone writes) before letting it hold anything back. An honest
    /// reliable reader's cursor is always a record boundary inside the window
    /// `[next_pos - data_bytes, next_pos]`: `next_pos` itself, or the position of a committed
    /// record whose commit word still reads `pos + 1` (the writer has not overwritten it,
    /// because the reader holds it). Any other value (behind the window, ahead of `next_pos`,
    /// misaligned, mid-record, or at a position the writer has since overwritten) is a
    /// subscriber lying about its own state: it does not hold the writer back, and can only
    /// hurt itself (it will be lapped, or read garbage that fails its own checks).
    ///
    /// A subscriber that was there before this publisher (`until_attached`) holds its start
    /// position, clamped into the window, until its cursor attaches.
    fn scan_min(&self) -> u64 {
        let lo = self.next_pos.saturating_sub(self.cfg.data_bytes);
        let mut min = self.next_pos;
        for r in &self.readers {
            if r.cursor.is_closed() {
                continue;
            }
            let pos = match (r.cursor.read_pos(r.slot), r.until_attached) {
                (CURSOR_DETACHED, None) => continue,
                (CURSOR_DETACHED, Some(start)) => start.clamp(lo, self.next_pos),
                (pos, _) if self.is_record_boundary(pos) => pos,
                _ => continue,
            };
            min = min.min(pos);
        }
        min
    }

    /// Is `pos` a position an honest reader's cursor can hold: `next_pos`, or a committed
    /// record inside the window whose commit word this writer wrote as `pos + 1` and has not
    /// overwritten since? Cold path (cursor rescans only).
    fn is_record_boundary(&self, pos: u64) -> bool {
        if pos == self.next_pos {
            return true;
        }
        let lo = self.next_pos.saturating_sub(self.cfg.data_bytes);
        if pos < lo || pos > self.next_pos || !pos.is_multiple_of(RECORD_ALIGN as u64) {
            return false;
        }
        let off = (pos & self.mask) as usize;
        // SAFETY: pos is RECORD_ALIGN-aligned, so off is 8-aligned and off + 8 <= data_bytes,
        // inside the first copy of our own read-write data area.
        let commit_word = unsafe { atomic_u64(self.map.data_ptr(), off) };
        // Relaxed: this thread is the only one that ever stores this word, so it reads its own
        // latest store; nothing else is read on the strength of it.
        commit_word.load(Ordering::Relaxed) == pos + 1
    }

    /// Loans space for a `len`-byte payload without blocking.
    #[inline]
    pub fn try_loan(&mut self, len: usize) -> Result<Loan<'_>, LoanError> {
        self.reserve(len)?;
        Ok(Loan { writer: self, len })
    }

    /// Loans space, waiting for subscribers to release space (reliable mode) until `timeout`
    /// (`None`: wait forever — the broker evicts a subscriber that stalls past its limit, so
    /// this does not block forever on a dead peer).
    #[inline]
    pub fn loan(&mut self, len: usize, timeout: Option<Duration>) -> Result<Loan<'_>, LoanError> {
        match self.reserve(len) {
            Ok(()) => {}
            Err(LoanError::WouldBlock) => self.wait_for_space(len, timeout)?,
            Err(e) => return Err(e),
        }
        Ok(Loan { writer: self, len })
    }

    #[cold]
    #[inline(never)]
    fn wait_for_space(&mut self, len: usize, timeout: Option<Duration>) -> Result<(), LoanError> {
        // Readers do not signal writers. A reader that is merely slower, or was preempted for
        // a moment, frees space within microseconds: spin that long (looking at the clock only
        // every SPIN_CHECK rounds). Up to YIELD, offer the CPU with sched_yield on every check
        // (it returns at once when nothing else wants this CPU): a reader preempted by another
        // process for a scheduler slice (~1-3 ms) is back before that, and the writer notices
        // at once. A reader that stays stuck gets naps that grow with the time already waited
        // (1/32 of it, within NAP_MIN..=NAP_MAX): once it moves again the writer resumes at
        // most about 3% of the stall late (a fixed ladder of naps up to 1 ms left the writer
        // asleep long after a short preemption of its reader had ended, and the reader then
        // idled), and a long stall still costs at most 1,000 wakeups a second.
        const SPIN_CHECK: u32 = 64;
        const SPIN: Duration = Duration::from_micros(50);
        const YIELD: Duration = Duration::from_millis(2);
        const NAP_MIN: Duration = Duration::from_micros(20);
        const NAP_MAX: Duration = Duration::from_millis(1);
        // While spinning, wait for room for this record plus an eighth of the ring, and look at
        // the cursors only every SCAN_EVERY rounds. Every look pulls the readers' cursor lines
        // to this core, and a reader stores to its own line after every record: a writer that
        // trailed its reader record by record, rescanning on each, cost a cache-line round
        // trip per record on both sides (64 B streams ran at 1/20 of the raw ring). With the
        // margin, the writer then runs an eighth of a ring ahead on `cached_min` alone. Past
        // the spin phase, and for the last look before a timeout, room for the record is
        // enough, so the margin never makes a loan fail or wait longer than the reader's pace.
        const SCAN_EVERY: u32 = 8;
        let margin = (record_bytes(len) as u64 + self.cfg.data_bytes / 8).min(self.cfg.data_bytes);
        let start = Instant::now();
        let mut spinning = true;
        let mut round: u32 = 0;
        loop {
            if spinning {
                if round.is_multiple_of(SCAN_EVERY) {
                    self.cached_min = self.scan_min();
                    if self.next_pos + margin - self.cached_min <= self.cfg.data_bytes {
                        return self.reserve(len);
                    }
                }
            } else {
                match self.reserve(len) {
                    Err(LoanError::WouldBlock) => {}
                    other => return other,
                }
            }
            round = round.wrapping_add(1);
            if !round.is_multiple_of(SPIN_CHECK) {
                core::hint::spin_loop();
                continue;
            }
            let waited = start.elapsed();
            if let Some(t) = timeout
                && waited >= t
            {
                return match self.reserve(len) {
                    Err(LoanError::WouldBlock) => Err(LoanError::TimedOut(t)),
                    other => other,
                };
            }
            spinning = waited < SPIN;
            if waited < SPIN {
                core::hint::spin_loop();
            } else if waited < YIELD {
                std::thread::yield_now();
                // The next round is a check again: yield on every round in this phase.
                round = round.wrapping_add(SPIN_CHECK - 1);
            } else {
                let nap = (waited / 32).clamp(NAP_MIN, NAP_MAX);
                std::thread::sleep(match timeout {
                    Some(t) => nap.min(t.saturating_sub(waited)),
                    None => nap,
                });
            }
        }
    }

    /// Checks length and space for the next record and raises the claim if needed.
    #[inline]
    fn reserve(&mut self, len: usize) -> Result<(), LoanError> {
        if len > self.cfg.max_message_bytes as usize {
            return Err(LoanError::TooLarge {
                len,
                max: self.cfg.max_message_bytes as usize,
            });
        }
        let end = self.next_pos + record_bytes(len) as u64;
        let mut limit = u64::MAX;
        if self.cfg.mode == Mode::Reliable && !self.readers.is_empty() {
            if end - self.cached_min > self.cfg.data_bytes {
                self.cached_min = self.scan_min();
                if end - self.cached_min > self.cfg.data_bytes {
                    self.stats.full += 1;
                    return Err(LoanError::WouldBlock);
                }
            }
            limit = self.cached_min + self.cfg.data_bytes;
        }
        if end > self.claim {
            let raised = end.next_multiple_of(self.chunk).min(limit);
            debug_assert!(raised >= end);
            self.claim = raised;
            protocol::raise_claim(self.header_u64(CLAIM_OFF), raised);
        }
        Ok(())
    }

    /// Publishes a copy of `payload` (reliable mode: waits for space with no time limit).
    pub fn publish(&mut self, payload: &[u8]) -> Result<u64, LoanError> {
        let mut loan = self.loan(payload.len(), None)?;
        loan.copy_from_slice(payload);
        Ok(loan.commit())
    }

    /// Publishes a copy of `payload` without blocking.
    pub fn try_publish(&mut self, payload: &[u8]) -> Result<u64, LoanError> {
        let mut loan = self.try_loan(payload.len())?;
        loan.copy_from_slice(payload);
        Ok(loan.commit())
    }

    #[inline]
    fn payload_ptr(&self, len: usize) -> *mut u8 {
        let off = (self.next_pos & self.mask) as usize + RECORD_HEADER_BYTES;
        debug_assert!(off + len <= 2 * self.cfg.data_bytes as usize);
        // SAFETY: off + len < 2 * data_bytes (len <= data_bytes/2 - 32) so the pointer is
        // inside the double-mapped data area, which Writer::create checked is read-write.
        unsafe { self.map.data_mut_ptr().add(off) }
    }

    #[inline]
    fn commit(&mut self, len: usize) -> u64 {
        let pos = self.next_pos;
        let seq = self.next_seq;
        let base = self.map.data_ptr();
        let off = (pos & self.mask) as usize;
        // SAFETY: off is RECORD_ALIGN-aligned and off + 32 <= data_bytes: the header is inside
        // the first copy of the data area; we are the ring's only writer.
        let (commit_word, seq_w, ts_w, meta_w) = unsafe {
            (
                atomic_u64(base, off),
                atomic_u64(base, off + SEQ_OFF),
                atomic_u64(base, off + TS_OFF),
                atomic_u64(base, off + META_OFF),
            )
        };
        seq_w.store(seq, Ordering::Relaxed);
        ts_w.store(self.clock.now_ns(), Ordering::Relaxed);
        meta_w.store(
            RecordHeader::pack_meta(len as u32, RECORD_KIND_MESSAGE, 0),
            Ordering::Relaxed,
        );
        protocol::commit(commit_word, pos + 1);
        self.next_pos = pos + record_bytes(len) as u64;
        self.next_seq = seq + 1;
        // Read only by joining or resynchronising readers and by `bus stat`: these words share
        // a line that stays in our cache otherwise.
        protocol::publish_progress(
            self.header_u64(NEXT_SEQ_OFF),
            self.header_u64(LAST_POS_OFF),
            self.header_u64(NEXT_POS_OFF),
            self.next_seq,
            pos,
            self.next_pos,
        );
        self.stats.committed += 1;
        self.wake_parked();
        seq
    }

    /// The publisher half of the park protocol: nudge every parked reader once per park.
    #[inline]
    fn wake_parked(&mut self) {
        if self.parking_readers == 0 {
            return;
        }
        protocol::publisher_fence();
        for r in &mut self.readers {
            if r.cursor.never_parks {
                continue;
            }
            let park = r.cursor.park();
            if protocol::needs_wake(park, r.last_woken) {
                r.last_woken = park;
                if let Some(due) = &mut self.due_wakes {
                    due.push(r.cursor.subscriber_id());
                    self.stats.wakes_sent += 1;
                } else if let Some(w) = &r.wake
                    && w.wake() != WakeOutcome::Gone
                {
                    self.stats.wakes_sent += 1;
                }
            }
        }
    }

    /// From now on this writer sends no wake datagram itself: the subscribers a commit or
    /// [`Writer::close`] must wake are collected instead, for [`Writer::take_due_wakes`]. For an
    /// owner that does no I/O of its own (the broker's engine, whose driver sends them); the
    /// wake senders given to `add_reader` are then not used.
    pub fn defer_wakes(&mut self) {
        self.due_wakes.get_or_insert_with(Vec::new);
    }

    /// Moves the subscriber ids due a wakeup (see [`Writer::defer_wakes`]) into `out`, in the
    /// order they became due; a subscriber appears at most once per park (a close wakes every
    /// reader once more).
    pub fn take_due_wakes(&mut self, out: &mut Vec<u64>) {
        if let Some(due) = &mut self.due_wakes {
            out.append(due);
        }
    }

    /// Marks the ring closed: readers drain what is left and then see [`Reader::is_finished`].
    pub fn close(&mut self) {
        // SAFETY: CLOSED_OFF is 4-aligned inside the header page.
        let closed = unsafe { atomic_u32(self.map.header_ptr(), CLOSED_OFF) };
        self.header_u64(END_SEQ_OFF)
            .store(self.next_seq, Ordering::Relaxed);
        // SYNC POINT: Release; pairs with the Acquire in Reader::is_finished / lost_at_end.
        closed.store(1, Ordering::Release);
        protocol::publisher_fence();
        for r in &self.readers {
            if let Some(due) = &mut self.due_wakes {
                due.push(r.cursor.subscriber_id());
            } else if let Some(w) = &r.wake {
                let _ = w.wake();
            }
        }
    }
}

/// Space for one record's payload, loaned from the ring. Fill it in place, then
/// [`commit`](Loan::commit). Dropping it publishes nothing.
pub struct Loan<'w> {
    writer: &'w mut Writer,
    len: usize,
}

impl Loan<'_> {
    /// Publishes the record; returns its sequence number.
    #[inline]
    pub fn commit(self) -> u64 {
        self.writer.commit(self.len)
    }
}

impl core::ops::Deref for Loan<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: reserve() checked len against the geometry, so the payload range is inside
        // the mapping; the loan borrows the writer mutably, so no other loan aliases it; readers
        // do not read these bytes before the commit store (they are not yet committed).
        unsafe { core::slice::from_raw_parts(self.writer.payload_ptr(self.len), self.len) }
    }
}

impl core::ops::DerefMut for Loan<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; the mapping is read-write (checked in Writer::create).
        unsafe { core::slice::from_raw_parts_mut(self.writer.payload_ptr(self.len), self.len) }
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// Where a new reader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// At the writer's current `next_pos`: only records committed from now on.
    Next,
    /// At position 0: everything still in the ring (tests, and rings made before the reader).
    Beginning,
}

/// A reader of one ring, with its read cursor (if the subscriber has a cursor page).
pub struct Reader {
    map: RingMapping,
    data_bytes: u64,
    mask: u64,
    max_message_bytes: u32,
    publisher_id: u64,
    pos: u64,
    expected_seq: Option<u64>,
    cursor: Option<(Arc<CursorPage>, usize)>,
    corrupt: bool,
}

impl core::fmt::Debug for Reader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reader")
            .field("publisher_id", &self.publisher_id)
            .field("pos", &self.pos)
            .field("expected_seq", &self.expected_seq)
            .finish()
    }
}

/// One record, in place in the ring. Derefs to the payload bytes. Dropping it releases the
/// record (advances the reader and its cursor).
///
/// In a lossy ring the writer may overwrite the bytes while you read them: call
/// [`Sample::is_intact`] after reading to confirm that what you read was not overwritten (the
/// seqlock pattern). In a reliable ring the bytes stay put until the sample is dropped.
///
/// # The zero-copy view and the memory model
///
/// `Deref` gives the payload as `&[u8]` read with plain loads. That is exact while the writer
/// keeps its protocol and the ring is reliable (it does not touch the bytes before the sample
/// is dropped). When the writer overwrites them while they are read (a lossy ring that laps
/// the reader, or a writer that breaks the protocol), those plain loads race its stores, which
/// Rust's memory model calls a data race, as crossbeam's seqlock says of its own optimistic
/// reads. membus accepts this deliberately, and relies on exactly this: the bytes are `u8`,
/// valid for every bit pattern; nothing in membus derives a length, index or pointer from
/// them; the other process's stores cannot be seen by this process's compiler, so the only
/// effect is that the values read may be any mix of old and new bytes, and may differ between
/// two reads of the same byte; and [`Sample::is_intact`] after the read says whether that
/// happened. A caller that wants to stay inside the model uses [`Sample::copy_to`], which
/// copies with atomic loads. docs/unsafe.md ("ring") has the full statement.
pub struct Sample<'r> {
    reader: &'r mut Reader,
    payload: *const u8,
    len: usize,
    seq: u64,
    timestamp_ns: u64,
    lost: u64,
    next_pos: u64,
}

impl Sample<'_> {
    /// Sequence number of the record within its ring.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// CLOCK_MONOTONIC nanoseconds at the publisher's commit.
    pub fn timestamp_ns(&self) -> u64 {
        self.timestamp_ns
    }
    /// Records of this ring lost (overwritten, or published before the reader joined) since
    /// the previous sample.
    pub fn lost_before(&self) -> u64 {
        self.lost
    }
    /// Publisher id of the ring.
    pub fn publisher_id(&self) -> u64 {
        self.reader.publisher_id
    }
    /// True if the record's bytes have not been overwritten so far. Always true in a
    /// reliable ring with a registered cursor.
    pub fn is_intact(&self) -> bool {
        protocol::still_intact(
            self.reader.header_u64(CLAIM_OFF),
            self.reader.pos,
            self.reader.data_bytes,
        )
    }
    /// Copies the payload into `out` and confirms it was intact while copied; `false` means
    /// the copy may be torn and must be discarded (count it as lost).
    ///
    /// The copy is made with one Relaxed atomic load per 8-byte word
    /// ([`protocol::copy_out`]), so it is sound even while the writer overwrites the bytes (a
    /// lossy ring, or a hostile writer): this is the way to read a lossy payload that stays
    /// inside Rust's memory model, unlike the zero-copy `&[u8]` of `Deref` (see the type's
    /// documentation).
    pub fn copy_to(&self, out: &mut Vec<u8>) -> bool {
        out.clear();
        out.resize(self.len, 0);
        let words = self.len.div_ceil(8);
        // SAFETY: the payload starts at data offset off + 32 with off RECORD_ALIGN-aligned, so
        // it is 8-aligned; its `words` words end at off + 32 + 8 * words <= off +
        // record_bytes(len) (records are padded to RECORD_ALIGN), and off + record_bytes(len)
        // <= off + data_bytes / 2 < 2 * data_bytes: inside the double mapping, which the
        // borrowed reader keeps alive. RoU64 is a transparent AtomicU64 whose only access is a
        // Relaxed load, allowed on the read-only mapping.
        let src = unsafe { core::slice::from_raw_parts(self.payload as *const RoU64, words) };
        protocol::copy_out(src, out);
        self.is_intact()
    }
}

impl core::fmt::Debug for Sample<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sample")
            .field("publisher_id", &self.reader.publisher_id)
            .field("seq", &self.seq)
            .field("len", &self.len)
            .field("timestamp_ns", &self.timestamp_ns)
            .field("lost_before", &self.lost)
            .finish()
    }
}

impl core::ops::Deref for Sample<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: payload/len were bounds-checked against the reader's own geometry (len <=
        // max_message_bytes <= data_bytes/2 - 32) so the range is inside the double mapping,
        // which lives as long as the reader this sample borrows. The bytes are u8 (any bit
        // pattern is valid); in lossy mode they may change under us, which is why is_intact
        // exists — see docs/unsafe.md, "ring: payload slices".
        unsafe { core::slice::from_raw_parts(self.payload, self.len) }
    }
}

impl Drop for Sample<'_> {
    #[inline]
    fn drop(&mut self) {
        self.reader
            .advance(self.next_pos, self.seq.saturating_add(1));
    }
}

impl Reader {
    /// Attaches to a ring received from the broker, checking its header against what the
    /// broker granted (`cfg`). `cursor` is the subscriber's cursor page and this ring's
    /// publisher slot in it (reliable back-pressure and wakeups need it).
    pub fn attach(
        map: RingMapping,
        cfg: RingConfig,
        cursor: Option<(Arc<CursorPage>, usize)>,
        start: StartAt,
    ) -> Result<Reader, AttachError> {
        cfg.validate()?;
        if map.data_bytes() as u64 != cfg.data_bytes {
            return Err(AttachError::HeaderMismatch {
                field: "data_bytes (mapping)",
                found: map.data_bytes() as u64,
                expected: cfg.data_bytes,
            });
        }
        if let Some((_, slot)) = &cursor
            && *slot >= CURSOR_SLOTS
        {
            return Err(AttachError::BadSlot { slot: *slot });
        }
        let info = read_info(&map);
        let checks = [
            (
                "magic",
                u64::from_le_bytes(info.magic),
                u64::from_le_bytes(RING_MAGIC),
            ),
            (
                "layout_version",
                info.layout_version as u64,
                LAYOUT_VERSION as u64,
            ),
            ("mode", info.mode as u64, cfg.mode.to_raw() as u64),
            (
                "header_bytes",
                info.header_bytes as u64,
                RING_HEADER_BYTES as u64,
            ),
            (
                "record_align",
                info.record_align as u64,
                RECORD_ALIGN as u64,
            ),
            ("data_bytes", info.data_bytes, cfg.data_bytes),
            (
                "max_message_bytes",
                info.max_message_bytes as u64,
                cfg.max_message_bytes as u64,
            ),
            ("publisher_id", info.publisher_id, cfg.publisher_id),
        ];
        for (field, found, expected) in checks {
            if found != expected {
                return Err(AttachError::HeaderMismatch {
                    field,
                    found,
                    expected,
                });
            }
        }
        let mut r = Reader {
            map,
            data_bytes: cfg.data_bytes,
            mask: cfg.data_bytes - 1,
            max_message_bytes: cfg.max_message_bytes,
            publisher_id: cfg.publisher_id,
            pos: 0,
            expected_seq: None,
            cursor,
            corrupt: false,
        };
        match start {
            StartAt::Next => {
                let next = protocol::load_acquire(r.header_u64(NEXT_POS_OFF));
                // A bad next_pos is harmless here: the record there will not validate.
                r.pos = next - next % RECORD_ALIGN as u64;
            }
            // From the beginning, every record counts: a gap before the first is a loss.
            StartAt::Beginning => r.expected_seq = Some(0),
        }
        // Register the cursor before the first read: the writer must not overwrite from here.
        r.publish_cursor();
        Ok(r)
    }

    #[inline]
    fn header_u64(&self, off: usize) -> &RoU64 {
        // SAFETY: off is an 8-aligned offset inside the header page, mapped while self lives.
        unsafe { ro_u64(self.map.header_ptr(), off) }
    }

    /// The commit word of the record at `pos`, which must be RECORD_ALIGN-aligned (R2).
    #[inline]
    fn commit_word(&self, pos: u64) -> &RoU64 {
        debug_assert!(pos.is_multiple_of(RECORD_ALIGN as u64));
        // SAFETY: pos is RECORD_ALIGN-aligned, so off = pos % data_bytes is 8-aligned and
        // off + 8 <= data_bytes: inside the first copy of the data area, mapped while self lives.
        unsafe { ro_u64(self.map.data_ptr(), (pos & self.mask) as usize) }
    }

    #[inline]
    fn publish_cursor(&self) {
        if let Some((page, slot)) = &self.cursor {
            protocol::release_cursor(page.slot(*slot), self.pos);
        }
    }

    /// Publisher id of this ring.
    pub fn publisher_id(&self) -> u64 {
        self.publisher_id
    }

    /// Position of the next record this reader will read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The writer's published `(next_pos, next_seq)`: where it writes next and how many records
    /// it has committed. For monitoring (lag, message counts); untrusted numbers.
    pub fn writer_progress(&self) -> (u64, u64) {
        let pos = protocol::load_acquire(self.header_u64(NEXT_POS_OFF));
        let seq = self.header_u64(NEXT_SEQ_OFF).load_relaxed();
        (pos, seq)
    }

    /// Is `pos` the position of a committed record in this ring: aligned to `RECORD_ALIGN`,
    /// with a commit word (the first 8 bytes at data offset `pos % data_bytes`) that reads
    /// `pos + 1`? Loaded like every commit word (Relaxed, then an Acquire fence when it
    /// matches). For the broker's monitoring of a ring it reads (stall detection: is a
    /// subscriber's cursor a record it could be holding?); an untrusted answer, as the writer
    /// may change the word at any time, but never an out-of-bounds read.
    pub fn committed_record_at(&self, pos: u64) -> bool {
        pos.is_multiple_of(RECORD_ALIGN as u64)
            && protocol::is_committed(self.commit_word(pos), pos.wrapping_add(1))
    }

    #[inline]
    fn advance(&mut self, next_pos: u64, next_seq: u64) {
        self.pos = next_pos;
        self.expected_seq = Some(next_seq);
        self.publish_cursor();
    }

    fn corrupt(&mut self, what: Corruption) -> RecvError {
        self.corrupt = true;
        RecvError::Corrupt {
            publisher_id: self.publisher_id,
            pos: self.pos,
            what,
        }
    }

    /// Is a record ready (or must the reader resynchronise)? Cheap: one load of the commit word
    /// and, when empty, of `claim`. Used for the second look of the park protocol.
    ///
    /// Invariant (progress): when this returns `true`, the next [`Reader::try_recv`] returns a
    /// sample, returns an error, or moves [`Reader::position`] forward, unless the ring changed
    /// in between. No caller loop of "has_pending, then try_recv" can spin on a ring that
    /// stays as it is: a state no honest writer can produce (a claim beyond what the writer
    /// could have raised given its `next_pos`, an implausible `next_pos`, a resync that would
    /// not move) makes the ring corrupt, and a corrupt ring is never pending again.
    pub fn has_pending(&self) -> bool {
        if self.corrupt {
            return false;
        }
        protocol::is_committed(self.commit_word(self.pos), self.pos.wrapping_add(1))
            || !protocol::still_intact(self.header_u64(CLAIM_OFF), self.pos, self.data_bytes)
    }

    /// Is the record at the reader's position committed? One load of its commit word (no claim
    /// check): [`Reader::try_recv`] can then still find the reader lapped (lossy) or the record
    /// corrupt, but it will not find the ring empty. Lets a caller that polls pick a ring
    /// without taking a record twice. The progress invariant of [`Reader::has_pending`] holds
    /// for it too.
    #[inline]
    pub fn has_record(&self) -> bool {
        if self.corrupt {
            return false;
        }
        protocol::is_committed(self.commit_word(self.pos), self.pos.wrapping_add(1))
    }

    /// True once the writer has closed the ring and everything in it has been read.
    pub fn is_finished(&self) -> bool {
        // SAFETY: CLOSED_OFF is 4-aligned inside the header page.
        let closed = unsafe { ro_u32(self.map.header_ptr(), CLOSED_OFF) };
        // SYNC POINT: Relaxed load + Acquire fence; pairs with the Release store in
        // Writer::close: every record committed before the close is visible to has_pending.
        closed.load_acquire() != 0 && !self.has_pending()
    }

    /// After [`Reader::is_finished`]: how many records at the end of the stream this reader
    /// never saw (it was lapped and the writer closed before anything newer came). With
    /// [`Sample::lost_before`] of every sample this makes the account exact:
    /// delivered + lost = committed. `None` while the writer has not closed.
    pub fn lost_at_end(&self) -> Option<u64> {
        // SAFETY: CLOSED_OFF is 4-aligned inside the header page.
        let closed = unsafe { ro_u32(self.map.header_ptr(), CLOSED_OFF) };
        // SYNC POINT: Relaxed load + Acquire fence; pairs with the Release store in
        // Writer::close, which stored end_seq before it.
        if closed.load_acquire() == 0 {
            return None;
        }
        let end = self.header_u64(END_SEQ_OFF).load_relaxed();
        Some(end.saturating_sub(self.expected_seq.unwrap_or(end)))
    }

    /// Takes the next record if one is committed. Never blocks.
    #[inline]
    pub fn try_recv(&mut self) -> Result<Option<Sample<'_>>, RecvError> {
        if self.corrupt {
            return Ok(None);
        }
        // At most two rounds: the second after one resynchronisation.
        for _ in 0..2 {
            let pos = self.pos;
            let off = (pos & self.mask) as usize;
            let base = self.map.data_ptr();
            // SAFETY: pos is RECORD_ALIGN-aligned (an invariant of advance/resync), so off + 32
            // <= data_bytes and every word below is 8-aligned inside the first data copy.
            let (commit_word, seq_w, ts_w, meta_w) = unsafe {
                (
                    ro_u64(base, off),
                    ro_u64(base, off + SEQ_OFF),
                    ro_u64(base, off + TS_OFF),
                    ro_u64(base, off + META_OFF),
                )
            };
            let claim = self.header_u64(CLAIM_OFF);
            if !protocol::is_committed(commit_word, pos.wrapping_add(1)) {
                if protocol::still_intact(claim, pos, self.data_bytes) {
                    return Ok(None);
                }
                self.resync()?;
                continue;
            }
            // One read of each header word; only these locals are used from here on.
            let seq = seq_w.load_relaxed();
            let timestamp_ns = ts_w.load_relaxed();
            let (len, kind, _flags) = RecordHeader::unpack_meta(meta_w.load_relaxed());
            if !protocol::still_intact(claim, pos, self.data_bytes) {
                self.resync()?;
                continue;
            }
            if len > self.max_message_bytes {
                return Err(self.corrupt(Corruption::LengthTooLarge {
                    len,
                    max: self.max_message_bytes,
                }));
            }
            if kind != RECORD_KIND_MESSAGE {
                return Err(self.corrupt(Corruption::UnknownKind(kind)));
            }
            let lost = match self.expected_seq {
                Some(expected) if seq < expected => {
                    return Err(self.corrupt(Corruption::SequenceBackwards {
                        expected,
                        found: seq,
                    }));
                }
                Some(expected) => seq - expected,
                None => 0,
            };
            let len = len as usize;
            // A record that would end past u64::MAX is one no writer can have committed (and
            // a wrapped position would let the reader run backwards).
            let Some(next_pos) = pos.checked_add(record_bytes(len) as u64) else {
                return Err(self.corrupt(Corruption::BadNextPosition(pos)));
            };
            debug_assert!(off + RECORD_HEADER_BYTES + len <= 2 * self.data_bytes as usize);
            // SAFETY: len <= max_message_bytes <= data_bytes/2 - 32 and off < data_bytes, so
            // the payload lies inside the double-mapped data area.
            let payload = unsafe { base.add(off + RECORD_HEADER_BYTES) };
            return Ok(Some(Sample {
                next_pos,
                reader: self,
                payload,
                len,
                seq,
                timestamp_ns,
                lost,
            }));
        }
        Ok(None)
    }

    /// The reader was lapped (its position is not intact): jump to the writer's newest record
    /// (`last_pos`; latest wins), or to `next_pos`. The loss is counted exactly from the
    /// sequence gap of the next record read. (A reader that has not read anything yet has no
    /// expected sequence, so its first gap is not counted: it joined mid-stream.)
    ///
    /// A resync always moves the reader forward, or finds the ring corrupt. The caller saw a
    /// claim `c0 > pos + data_bytes`. The writer's values are loaded claim first, then
    /// `next_pos`, then the claim again ([`protocol::writer_position`] has the SYNC POINTs),
    /// so an honest writer, however fast, shows `claim_before <= next_pos + data_bytes` (it
    /// never raises the claim further than one record and one chunk past a `next_pos` it has
    /// published) and `next_pos <= claim_after` (it raises the claim before it publishes a
    /// `next_pos` up to it); the claim only grows, so `claim_before >= c0` and `next_pos >
    /// pos`. Values breaking any of this come from no honest writer: the ring is corrupt.
    fn resync(&mut self) -> Result<(), RecvError> {
        let w = protocol::writer_position(
            self.header_u64(CLAIM_OFF),
            self.header_u64(NEXT_POS_OFF),
            self.header_u64(LAST_POS_OFF),
        );
        let align = RECORD_ALIGN as u64;
        let next = w.next_pos;
        // Misaligned, behind us, not past us (a resync that would not move), or beyond the
        // claim raised before it was published.
        if !next.is_multiple_of(align) || next <= self.pos || next > w.claim_after {
            return Err(self.corrupt(Corruption::BadNextPosition(next)));
        }
        if !w.is_plausible(self.data_bytes) {
            return Err(self.corrupt(Corruption::ClaimBeyondNextPosition {
                claim: w.claim_before,
                next_pos: next,
            }));
        }
        // Latest wins: resume at the newest record if it is plausible (aligned, ahead of us,
        // before next_pos); otherwise at next_pos. A bad last_pos is not trusted, only skipped
        // (an honest one can be stale or already newer than the next_pos we loaded).
        self.pos = if last_is_plausible(w.last_pos, self.pos, next) {
            w.last_pos
        } else {
            next
        };
        self.publish_cursor();
        Ok(())
    }
}

/// May a resync from `pos` resume at the writer's `last_pos`: aligned, strictly ahead of the
/// reader (the reader's own position is the one found overwritten) and before `next_pos`?
#[inline]
fn last_is_plausible(last: u64, pos: u64, next: u64) -> bool {
    last.is_multiple_of(RECORD_ALIGN as u64) && last > pos && last < next
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some((page, slot)) = &self.cursor {
            page.slot(*slot).store(CURSOR_DETACHED, Ordering::Release);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading several rings
// ---------------------------------------------------------------------------------------------

/// All rings of one topic as seen by one subscriber: one per publisher, read fairly
/// (round-robin), each publisher's order preserved.
#[derive(Debug, Default)]
pub struct ReaderSet {
    readers: Vec<Reader>,
    next: usize,
}

impl ReaderSet {
    /// An empty set.
    pub fn new() -> Self {
        ReaderSet::default()
    }

    /// Adds a ring (a publisher joined).
    pub fn insert(&mut self, reader: Reader) {
        self.readers.push(reader);
    }

    /// Removes the ring of a publisher; returns it so the caller can drain it first if it wants.
    pub fn remove(&mut self, publisher_id: u64) -> Option<Reader> {
        let i = self
            .readers
            .iter()
            .position(|r| r.publisher_id == publisher_id)?;
        if self.next > i {
            self.next -= 1;
        }
        let r = self.readers.remove(i);
        if self.next >= self.readers.len() {
            self.next = 0;
        }
        Some(r)
    }

    /// Removes every ring whose writer has closed it and that has been read to the end.
    /// Returns the publisher ids removed (into a caller-provided buffer, to stay allocation-free
    /// when nothing changes).
    pub fn remove_finished(&mut self, removed: &mut Vec<u64>) {
        removed.clear();
        let mut i = 0;
        while i < self.readers.len() {
            if self.readers[i].is_finished() {
                removed.push(self.readers[i].publisher_id);
                self.readers.remove(i);
                if self.next > i {
                    self.next -= 1;
                }
            } else {
                i += 1;
            }
        }
        if self.next >= self.readers.len() {
            self.next = 0;
        }
    }

    /// Number of rings.
    pub fn len(&self) -> usize {
        self.readers.len()
    }

    /// True with no rings.
    pub fn is_empty(&self) -> bool {
        self.readers.is_empty()
    }

    /// The readers, for inspection.
    pub fn readers(&self) -> &[Reader] {
        &self.readers
    }

    /// True if any ring has a record ready.
    pub fn has_pending(&self) -> bool {
        self.readers.iter().any(Reader::has_pending)
    }

    /// Takes the next record from the next ring that has one, starting after the ring that
    /// delivered last. A corrupt ring's error is returned once (with its publisher id) and
    /// that ring is skipped from then on.
    pub fn try_recv(&mut self) -> Result<Option<Sample<'_>>, RecvError> {
        let n = self.readers.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.readers[i].has_pending() {
                self.next = (i + 1) % n;
                return self.readers[i].try_recv();
            }
        }
        Ok(None)
    }
}
