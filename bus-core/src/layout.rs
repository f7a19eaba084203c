//! The shared-memory format: every byte two membus processes share is defined here.
//!
//! Two kinds of segment exist, each a memfd with exactly one writer:
//!
//! ```text
//! RING SEGMENT (writer: one publisher, or the broker for its fallback ring)
//! memfd size = RING_HEADER_BYTES + data_bytes; data_bytes is a power of two, >= one page
//!
//!  offset  size  field                      written by     when
//!  ------  ----  -------------------------  -------------  ------------------------------------
//!  0x000   8     magic "MBUSRING"           writer         once, before the writer acknowledges
//!  0x008   4     layout_version (=1)        writer         once
//!  0x00c   4     mode (1 reliable, 2 lossy) writer         once
//!  0x010   4     header_bytes (=4096)       writer         once
//!  0x014   4     record_align (=64)         writer         once
//!  0x018   8     data_bytes                 writer         once
//!  0x020   4     max_message_bytes          writer         once
//!  0x024   4     writer_pid                 writer         once
//!  0x028   8     publisher_id               writer         once
//!  0x030   80    reserved (zero)
//!  0x080   8     next_pos   (atomic)        writer         after every commit (Release)
//!  0x088   8     next_seq   (atomic)        writer         after every commit, before next_pos
//!  0x090   8     last_pos   (atomic)        writer         after every commit, before next_pos
//!  0x098   104   padding (own cache pair)
//!  0x100   8     claim      (atomic)        writer         before overwriting, in chunks
//!  0x108   120   padding
//!  0x180   4     closed     (atomic)        writer         once, when the writer closes
//!  0x184   4     padding
//!  0x188   8     end_seq    (atomic)        writer         once, before `closed`: records written
//!  0x190   3696  padding to one page
//!  0x1000  data_bytes   data area: records, back to back, each aligned to RECORD_ALIGN
//!
//! The data area is mapped twice, back to back, right after the header page, so a record that
//! runs past the end of the data area continues in the second mapping and is one slice.
//!
//! RECORD (at absolute position `pos`, a multiple of RECORD_ALIGN; lives at data offset
//! pos % data_bytes)
//!
//!  +0   8  commit    = pos + 1 (atomic; stored last, with Release: it publishes the record)
//!  +8   8  seq       record sequence number within this ring, from 0, no gaps
//!  +16  8  timestamp CLOCK_MONOTONIC ns at commit (sys::clock::StampClock; ADR 0002)
//!  +24  4  len       payload length in bytes
//!  +28  2  kind      RECORD_KIND_MESSAGE
//!  +30  2  flags     0
//!  +32  len payload, then padding up to RECORD_ALIGN
//!
//! CURSOR PAGE (writer: one subscriber; publishers of the topic map it read-only)
//! memfd size = CURSOR_PAGE_BYTES
//!
//!  0x000   8     magic "MBUSCURS"           subscriber     once
//!  0x008   4     layout_version (=1)        subscriber     once
//!  0x00c   4     slots (=CURSOR_SLOTS)      subscriber     once
//!  0x010   8     subscriber_id              subscriber     once
//!  0x018   4     pid                        subscriber     once
//!  0x01c   4     flags                      subscriber     once (CURSOR_FLAG_*)
//!  0x020   96    reserved
//!  0x080   8     park       (atomic)        subscriber     odd = parked; +1 to park, +1 to wake
//!  0x100   4     state      (atomic)        subscriber     CURSOR_STATE_*
//!  0x200 + 128*i read_pos[i] (atomic)       subscriber     after releasing each record of the
//!                                                          ring in publisher slot i;
//!                                                          CURSOR_DETACHED = not reading it
//! ```
//!
//! Writer-hot and reader-hot words sit on separate 128-byte blocks (a cache-line pair: the
//! adjacent-line prefetcher on x86-64 moves lines in pairs). Offsets, never pointers, are stored.
//! Every value a reader takes from here is read once into a local and bounds-checked before use.

use core::mem::{offset_of, size_of};

// Shared memory is always viewed through the standard atomics (loom cannot overlay mapped memory).
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Layout version written in both headers; a reader refuses any other.
pub const LAYOUT_VERSION: u32 = 1;
/// Magic at offset 0 of a ring segment.
pub const RING_MAGIC: [u8; 8] = *b"MBUSRING";
/// Magic at offset 0 of a cursor page.
pub const CURSOR_MAGIC: [u8; 8] = *b"MBUSCURS";

/// Size of the ring header: one page, so the data area starts page-aligned and can be mapped a
/// second time on its own.
pub const RING_HEADER_BYTES: usize = 4096;
/// Records start at multiples of this. One cache line: a reader polling the next record's
/// commit word receives the header and up to 32 payload bytes in one transfer.
pub const RECORD_ALIGN: usize = 64;
/// Size of [`RecordHeader`].
pub const RECORD_HEADER_BYTES: usize = 32;
/// Smallest data area: one page.
pub const MIN_DATA_BYTES: usize = 4096;
/// Largest data area: 1 GiB (so `2 * data_bytes` of address space always fits comfortably).
pub const MAX_DATA_BYTES: usize = 1 << 30;

/// Publisher slots per topic, i.e. read cursors per cursor page.
pub const CURSOR_SLOTS: usize = 64;
/// Offset of the first read cursor in a cursor page.
pub const CURSOR_SLOTS_OFFSET: usize = 0x200;
/// Distance between read cursors (each on its own cache-line pair).
pub const CURSOR_SLOT_STRIDE: usize = 128;
/// Size of a cursor page segment (rounded up to whole pages).
pub const CURSOR_PAGE_BYTES: usize =
    (CURSOR_SLOTS_OFFSET + CURSOR_SLOTS * CURSOR_SLOT_STRIDE).next_multiple_of(4096);
/// `CursorHeader::flags`: the subscriber busy-polls and never parks, so publishers skip the park
/// check (and its fence) for it. A subscriber that sets it and parks anyway only hurts itself.
pub const CURSOR_FLAG_NEVER_PARKS: u32 = 1;
/// `read_pos` value meaning "this subscriber does not read the ring in this slot".
pub const CURSOR_DETACHED: u64 = u64::MAX;

/// `CursorHeader::state`: the subscriber is attached and reading.
pub const CURSOR_STATE_ACTIVE: u32 = 1;
/// `CursorHeader::state`: the subscriber has left; publishers ignore its cursors.
pub const CURSOR_STATE_CLOSED: u32 = 2;

/// Record kind of an ordinary message.
pub const RECORD_KIND_MESSAGE: u16 = 1;

/// `RingInfo::mode` value for reliable rings.
pub const MODE_RELIABLE: u32 = 1;
/// `RingInfo::mode` value for lossy rings.
pub const MODE_LOSSY: u32 = 2;

/// Delivery mode of a ring (and of its topic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The writer never overwrites what a live subscriber has not released.
    Reliable,
    /// The writer never waits; lapped readers are told how many messages they lost.
    Lossy,
}

impl Mode {
    /// The value stored in the ring header.
    pub const fn to_raw(self) -> u32 {
        match self {
            Mode::Reliable => MODE_RELIABLE,
            Mode::Lossy => MODE_LOSSY,
        }
    }

    /// Parses the value stored in a ring header (or a frame).
    pub const fn from_raw(raw: u32) -> Option<Mode> {
        match raw {
            MODE_RELIABLE => Some(Mode::Reliable),
            MODE_LOSSY => Some(Mode::Lossy),
            _ => None,
        }
    }
}

/// The write-once part of the ring header (offset 0, 128 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RingInfo {
    /// [`RING_MAGIC`].
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// [`MODE_RELIABLE`] or [`MODE_LOSSY`].
    pub mode: u32,
    /// [`RING_HEADER_BYTES`].
    pub header_bytes: u32,
    /// [`RECORD_ALIGN`].
    pub record_align: u32,
    /// Size of the data area in bytes.
    pub data_bytes: u64,
    /// Largest payload a record may carry.
    pub max_message_bytes: u32,
    /// Pid of the writer process (informational; never trusted).
    pub writer_pid: u32,
    /// Publisher id assigned by the broker.
    pub publisher_id: u64,
    /// Zero.
    pub reserved: [u8; 80],
}

/// The ring header page.
#[repr(C, align(128))]
pub struct RingHeader {
    /// Write-once geometry.
    pub info: RingInfo,
    /// Absolute position of the next record the writer will write.
    pub next_pos: AtomicU64,
    /// Sequence number the next record will get (= records committed so far).
    pub next_seq: AtomicU64,
    /// Position of the newest committed record (where a lapped reader resumes: latest wins).
    pub last_pos: AtomicU64,
    _pad0: [u8; 104],
    /// Bytes at absolute positions below `claim - data_bytes` may have been overwritten.
    pub claim: AtomicU64,
    _pad1: [u8; 120],
    /// Non-zero once the writer has closed the ring.
    pub closed: AtomicU32,
    _pad2: u32,
    /// Number of records the writer committed in all, stored just before `closed`.
    pub end_seq: AtomicU64,
    _pad3: [u8; RING_HEADER_BYTES - 0x190],
}

/// The header in front of every record.
///
/// All four words are accessed as atomics (the last three with `Relaxed` ordering, ordered by
/// the `commit` store and load), so a reader racing a lapping writer reads stale or new values,
/// never undefined ones.
#[repr(C)]
pub struct RecordHeader {
    /// `pos + 1` once the record is committed.
    pub commit: AtomicU64,
    /// Sequence number within the ring.
    pub seq: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds at commit.
    pub timestamp_ns: AtomicU64,
    /// Payload length (bits 0-31), kind (bits 32-47), flags (bits 48-63): on a little-endian
    /// machine `len` is the u32 at +24, `kind` the u16 at +28, `flags` the u16 at +30.
    pub meta: AtomicU64,
}

impl RecordHeader {
    /// Packs `len`, `kind` and `flags` into the `meta` word.
    #[inline]
    pub const fn pack_meta(len: u32, kind: u16, flags: u16) -> u64 {
        (len as u64) | ((kind as u64) << 32) | ((flags as u64) << 48)
    }

    /// Splits a `meta` word into `(len, kind, flags)`.
    #[inline]
    pub const fn unpack_meta(meta: u64) -> (u32, u16, u16) {
        (meta as u32, (meta >> 32) as u16, (meta >> 48) as u16)
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!(
    "membus's shared-memory layout is little-endian; big-endian targets are not supported"
);

/// The cursor page header (the part before the read cursors).
#[repr(C, align(128))]
pub struct CursorHeader {
    /// [`CURSOR_MAGIC`].
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// [`CURSOR_SLOTS`].
    pub slots: u32,
    /// Subscriber id assigned by the broker.
    pub subscriber_id: u64,
    /// Pid of the subscriber (informational; never trusted).
    pub pid: u32,
    /// `CURSOR_FLAG_*` bits, written once at initialisation.
    pub flags: u32,
    _reserved: [u8; 96],
    /// Park word: odd while the subscriber is (about to be) blocked on its wake socket.
    pub park: AtomicU64,
    _pad0: [u8; 120],
    /// [`CURSOR_STATE_ACTIVE`] or [`CURSOR_STATE_CLOSED`].
    pub state: AtomicU32,
    _pad1: [u8; CURSOR_SLOTS_OFFSET - 0x104],
}

/// Rounds a payload length up to the space its record takes in the data area.
#[inline]
pub const fn record_bytes(payload_len: usize) -> usize {
    (RECORD_HEADER_BYTES + payload_len).next_multiple_of(RECORD_ALIGN)
}

/// Largest payload a data area of `data_bytes` may carry: a record may take at most half the
/// data area, so a reliable writer can always have one record in flight beside a slow reader's.
#[inline]
pub const fn max_message_bytes_for(data_bytes: usize) -> usize {
    data_bytes / 2 - RECORD_HEADER_BYTES
}

/// Offset of read cursor `slot` in a cursor page.
#[inline]
pub const fn cursor_slot_offset(slot: usize) -> usize {
    CURSOR_SLOTS_OFFSET + slot * CURSOR_SLOT_STRIDE
}

// Compile-time checks: the documented offsets are the real ones.
const _: () = {
    assert!(size_of::<RingInfo>() == 128);
    assert!(offset_of!(RingInfo, layout_version) == 0x08);
    assert!(offset_of!(RingInfo, mode) == 0x0c);
    assert!(offset_of!(RingInfo, header_bytes) == 0x10);
    assert!(offset_of!(RingInfo, record_align) == 0x14);
    assert!(offset_of!(RingInfo, data_bytes) == 0x18);
    assert!(offset_of!(RingInfo, max_message_bytes) == 0x20);
    assert!(offset_of!(RingInfo, writer_pid) == 0x24);
    assert!(offset_of!(RingInfo, publisher_id) == 0x28);
    assert!(offset_of!(RingHeader, next_pos) == 0x80);
    assert!(offset_of!(RingHeader, next_seq) == 0x88);
    assert!(offset_of!(RingHeader, last_pos) == 0x90);
    assert!(offset_of!(RingHeader, claim) == 0x100);
    assert!(offset_of!(RingHeader, closed) == 0x180);
    assert!(offset_of!(RingHeader, end_seq) == 0x188);
    assert!(size_of::<RingHeader>() == RING_HEADER_BYTES);
    assert!(size_of::<RecordHeader>() == RECORD_HEADER_BYTES);
    assert!(offset_of!(RecordHeader, seq) == 8);
    assert!(offset_of!(RecordHeader, timestamp_ns) == 16);
    assert!(offset_of!(RecordHeader, meta) == 24);
    assert!(offset_of!(CursorHeader, slots) == 0x0c);
    assert!(offset_of!(CursorHeader, subscriber_id) == 0x10);
    assert!(offset_of!(CursorHeader, pid) == 0x18);
    assert!(offset_of!(CursorHeader, flags) == 0x1c);
    assert!(offset_of!(CursorHeader, park) == 0x80);
    assert!(offset_of!(CursorHeader, state) == 0x100);
    assert!(size_of::<CursorHeader>() == CURSOR_SLOTS_OFFSET);
    assert!(CURSOR_PAGE_BYTES.is_multiple_of(4096));
    assert!(cursor_slot_offset(CURSOR_SLOTS - 1) + 8 <= CURSOR_PAGE_BYTES);
    assert!(RING_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
    assert!(RECORD_HEADER_BYTES < RECORD_ALIGN);
    assert!(MIN_DATA_BYTES.is_power_of_two() && MAX_DATA_BYTES.is_power_of_two());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_bytes_rounds_to_alignment() {
        assert_eq!(record_bytes(0), 64);
        assert_eq!(record_bytes(32), 64);
        assert_eq!(record_bytes(33), 128);
        assert_eq!(record_bytes(64), 128);
        assert_eq!(record_bytes(4096), 4096 + 64);
    }

    #[test]
    fn meta_packs_len_kind_flags_at_documented_bytes() {
        let meta = RecordHeader::pack_meta(0x0102_0304, 0x0506, 0x0708);
        let b = meta.to_le_bytes();
        assert_eq!(&b[0..4], &0x0102_0304u32.to_le_bytes(), "len at +24");
        assert_eq!(&b[4..6], &0x0506u16.to_le_bytes(), "kind at +28");
        assert_eq!(&b[6..8], &0x0708u16.to_le_bytes(), "flags at +30");
        assert_eq!(
            RecordHeader::unpack_meta(meta),
            (0x0102_0304, 0x0506, 0x0708)
        );
    }

    #[test]
    fn mode_round_trips_and_rejects_unknown() {
        for m in [Mode::Reliable, Mode::Lossy] {
            assert_eq!(Mode::from_raw(m.to_raw()), Some(m));
        }
        assert_eq!(Mode::from_raw(0), None);
        assert_eq!(Mode::from_raw(3), None);
    }

    #[test]
    fn max_message_leaves_room_for_two_records() {
        let data = MIN_DATA_BYTES;
        assert!(2 * record_bytes(max_message_bytes_for(data)) <= data);
    }
}
