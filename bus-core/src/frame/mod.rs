//! The control-frame codec spoken on the broker's `SOCK_SEQPACKET` socket. Sans-IO: bytes in,
//! [`Frame`]s out, and back; the socket side (SCM_RIGHTS) lives in [`crate::sys::scm`].
//!
//! One frame is one datagram: a fixed 24-byte little-endian [`Header`], then a body whose layout
//! is fixed by the message type. `docs/protocol.md` documents every byte; the tests in
//! `tests/it/frame.rs` assert the hex examples given there.
//!
//! ```text
//!  off size field
//!  0   4    magic       0x5355424D ("MBUS" on the wire)
//!  4   1    version     PROTOCOL_VERSION (1)
//!  5   1    flags       bit 0 = MORE (STATS_REPLY only); other bits 0
//!  6   2    type        MsgType
//!  8   4    body_len    datagram length - 24, exactly
//!  12  2    fd_count    fds attached with SCM_RIGHTS (what the type requires)
//!  14  2    reserved    0
//!  16  8    request_id  chosen by the requester, echoed on the reply; 0 on events
//!  24  ...  body
//! ```
//!
//! Decoding never panics and never allocates: strings and payloads borrow from the datagram.
//! Anything [`Frame::encode`] accepts, [`decode`] accepts and returns equal; anything else is a
//! typed [`DecodeError`].
//!
//! ```
//! use bus_core::frame::{decode, Frame, Msg, Publish};
//!
//! let frame = Frame::new(7, Msg::Publish(Publish { publisher_id: 3, payload: b"hi" }));
//! let mut buf = Vec::new();
//! frame.encode(&mut buf).unwrap();
//! let back = decode(&buf).unwrap();
//! assert_eq!(back, frame);
//! // The payload is borrowed from `buf`, not copied.
//! let Msg::Publish(p) = back.msg else { unreachable!() };
//! assert_eq!(p.payload.as_ptr(), buf[buf.len() - 2..].as_ptr());
//! ```

mod codes;
mod wire;

pub use codes::{
    ErrorCode, EvictReason, ModeRequest, MsgType, PeerGoneReason, PeerKind, RingRole,
    ShutdownReason, SkipReason, Transport,
};

use crate::layout::{CURSOR_SLOTS, Mode};
use crate::limits::{
    MAX_BROKER_VERSION_BYTES, MAX_CLIENT_NAME_BYTES, MAX_ERROR_MESSAGE_BYTES, MAX_FDS_PER_FRAME,
    MAX_FRAME_BYTES, MAX_TOPIC_BYTES,
};
use wire::{Rd, Wr};

/// Header magic: the bytes `"MBUS"` on the wire, read as a little-endian u32.
pub const MAGIC: u32 = 0x5355_424D;
/// The protocol version this code speaks (header `version`, HELLO and WELCOME).
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the frame header.
pub const HEADER_BYTES: usize = 24;
/// Header flag: a STATS_REPLY continues in the next frame.
pub const FLAG_MORE: u8 = 0x01;
/// Fixed part of a PUBLISH body (the publisher id) before the payload.
pub const PUBLISH_FIXED_BYTES: usize = 8;
/// Fixed part of a DELIVER body before the payload.
pub const DELIVER_FIXED_BYTES: usize = 40;
/// Largest payload a PUBLISH frame can carry.
pub const MAX_PUBLISH_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - HEADER_BYTES - PUBLISH_FIXED_BYTES;
/// Largest message over the datagram fallback: what still fits in a DELIVER frame. The broker
/// announces it in WELCOME and rejects larger PUBLISH payloads with `too-large`.
pub const MAX_DATAGRAM_MESSAGE_BYTES: usize = MAX_FRAME_BYTES - HEADER_BYTES - DELIVER_FIXED_BYTES;
/// Largest JSON chunk one STATS_REPLY frame carries.
pub const MAX_STATS_CHUNK_BYTES: usize = MAX_FRAME_BYTES - HEADER_BYTES;

/// The 24-byte frame header, parsed and checked (everything but the message type and the
/// body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Protocol version ([`PROTOCOL_VERSION`]; anything else fails [`Header::parse`]).
    pub version: u8,
    /// Flag bits; only [`FLAG_MORE`] is defined.
    pub flags: u8,
    /// Raw message type (see [`MsgType::from_raw`]); not yet checked.
    pub msg_type: u16,
    /// Body length in bytes (equal to the datagram length minus [`HEADER_BYTES`]).
    pub body_len: u32,
    /// Number of fds the sender attached with SCM_RIGHTS (at most [`MAX_FDS_PER_FRAME`]).
    pub fd_count: u16,
    /// Request id: chosen by the requester, echoed on the reply, 0 on unsolicited events.
    pub request_id: u64,
}

impl Header {
    /// Parses and checks the header of one datagram: length, magic, version, flag bits,
    /// reserved field, `body_len` against the datagram length, and the fd count bound.
    ///
    /// A receiver that fails to decode a frame can still use this to learn the request id (and
    /// reply with an ERROR frame that echoes it) when only the body was bad.
    pub fn parse(datagram: &[u8]) -> Result<Header, DecodeError> {
        let Some(h) = datagram.first_chunk::<HEADER_BYTES>() else {
            return Err(DecodeError::TooShort {
                len: datagram.len(),
            });
        };
        let le16 = |at: usize| u16::from_le_bytes([h[at], h[at + 1]]);
        let le32 = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let magic = le32(0);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = h[4];
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                seen: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let flags = h[5];
        if flags & !FLAG_MORE != 0 {
            return Err(DecodeError::UnknownFlags { flags });
        }
        let reserved = le16(14);
        if reserved != 0 {
            return Err(DecodeError::ReservedNotZero { value: reserved });
        }
        let body_len = le32(8);
        let actual = datagram.len() - HEADER_BYTES;
        if usize::try_from(body_len) != Ok(actual) {
            return Err(DecodeError::LengthMismatch {
                body_len,
                actual_body_len: actual,
            });
        }
        if datagram.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLong {
                len: datagram.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        let fd_count = le16(12);
        if usize::from(fd_count) > MAX_FDS_PER_FRAME {
            return Err(DecodeError::TooManyFds {
                fd_count,
                max: MAX_FDS_PER_FRAME,
            });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[16..24]);
        Ok(Header {
            version,
            flags,
            msg_type: le16(6),
            body_len,
            fd_count,
            request_id: u64::from_le_bytes(id),
        })
    }

    /// Whether the MORE flag is set.
    pub const fn more(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }
}

/// One decoded (or to-be-encoded) control frame: the request id and the message. Strings and
/// payloads borrow from the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Request id: chosen by the requester, echoed on the reply or error, 0 on events.
    pub request_id: u64,
    /// The message.
    pub msg: Msg<'a>,
}

/// Every message of protocol version 1. Which side sends which, and what it answers, is in
/// `docs/protocol.md`; the codec accepts every type in both directions (the session decides).
///
/// Deliberately exhaustive: a new message is a protocol change, and every `match` on this enum
/// in the workspace should have to handle it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// HELLO: first frame of every connection.
    Hello(Hello<'a>),
    /// WELCOME: reply to HELLO.
    Welcome(Welcome<'a>),
    /// ERROR: a request failed.
    Error(ErrorReply<'a>),
    /// OK: generic success.
    Ok,
    /// PING: liveness probe.
    Ping {
        /// Echoed in the PONG.
        token: u64,
    },
    /// PONG: reply to PING.
    Pong {
        /// The PING's token.
        token: u64,
    },
    /// SHUTDOWN: the broker is going away.
    Shutdown(Shutdown<'a>),
    /// CREATE_PUBLISHER: become a publisher of a topic.
    CreatePublisher(CreatePublisher<'a>),
    /// RING_GRANTED: a ring to write or read.
    RingGranted(RingGranted),
    /// PUBLISHER_READY: the publisher initialised its ring.
    PublisherReady {
        /// From RING_GRANTED.
        publisher_id: u64,
    },
    /// CLOSE_PUBLISHER: stop publishing.
    ClosePublisher {
        /// From RING_GRANTED.
        publisher_id: u64,
    },
    /// CURSOR_GRANTED: a subscriber's cursor page and wake socket, for a publisher.
    CursorGranted(CursorGranted),
    /// SUBSCRIBE: subscribe to a topic.
    Subscribe(Subscribe<'a>),
    /// SUBSCRIBED: reply to SUBSCRIBE.
    Subscribed(Subscribed),
    /// SUBSCRIBER_READY: the subscriber mapped its cursor page.
    SubscriberReady {
        /// From SUBSCRIBED.
        subscriber_id: u64,
    },
    /// UNSUBSCRIBE: stop subscribing.
    Unsubscribe {
        /// From SUBSCRIBED.
        subscriber_id: u64,
    },
    /// RING_RELEASED: the subscriber no longer reads this publisher's ring (notice, no reply).
    RingReleased {
        /// From SUBSCRIBED.
        subscriber_id: u64,
        /// The publisher whose ring was let go.
        publisher_id: u64,
    },
    /// PEER_GONE: a publisher or subscriber of one of your topics left.
    PeerGone(PeerGone),
    /// EVICTED: you were removed from a topic.
    Evicted(Evicted<'a>),
    /// PUBLISH: one message from a datagram publisher.
    Publish(Publish<'a>),
    /// DELIVER: one message to a datagram subscriber.
    Deliver(Deliver<'a>),
    /// SKIPPED: a message a datagram subscriber will not get as a DELIVER, and why.
    Skipped(Skipped),
    /// STATS_REQUEST: ask for statistics.
    StatsRequest,
    /// STATS_REPLY: one chunk of the statistics JSON document.
    StatsReply(StatsReply<'a>),
}

/// HELLO body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The protocol version the client speaks ([`PROTOCOL_VERSION`]).
    pub protocol_version: u16,
    /// The transport the client can use. A [`Transport::Datagram`] client is never sent fds.
    pub transport: Transport,
    /// A name for logs and `bus stat` (at most [`MAX_CLIENT_NAME_BYTES`]; may be empty).
    pub client_name: &'a str,
}

/// WELCOME body: who the client is and the limits it must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome<'a> {
    /// The protocol version the broker speaks.
    pub protocol_version: u16,
    /// This connection's client id (unique for the broker's lifetime, never 0).
    pub client_id: u64,
    /// Largest frame the broker accepts ([`MAX_FRAME_BYTES`]).
    pub max_frame_bytes: u32,
    /// Largest PUBLISH payload over the datagram fallback.
    pub max_datagram_message_bytes: u32,
    /// Ring data size used when CREATE_PUBLISHER asks for 0.
    pub default_ring_bytes: u64,
    /// Largest ring data size CREATE_PUBLISHER may ask for.
    pub max_ring_bytes: u64,
    /// Longest topic name ([`MAX_TOPIC_BYTES`]).
    pub max_topic_bytes: u16,
    /// The broker's version, e.g. `"bus-broker 0.1.0"` (at most [`MAX_BROKER_VERSION_BYTES`]).
    pub broker_version: &'a str,
}

/// ERROR body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReply<'a> {
    /// What went wrong.
    pub code: ErrorCode,
    /// For people: what went wrong and what to do (at most [`MAX_ERROR_MESSAGE_BYTES`]).
    pub message: &'a str,
}

/// SHUTDOWN body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shutdown<'a> {
    /// Why.
    pub reason: ShutdownReason,
    /// For people (at most [`MAX_ERROR_MESSAGE_BYTES`]).
    pub message: &'a str,
}

/// CREATE_PUBLISHER body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreatePublisher<'a> {
    /// Ring data area size in bytes; 0 = the broker's default. Only for a new topic's ring
    /// size: the broker may round it up to a power of two.
    pub ring_data_bytes: u64,
    /// Largest message this publisher will write; 0 = the most the ring allows.
    pub max_message_bytes: u32,
    /// The mode the topic must have (or gets, if this creates it).
    pub mode: ModeRequest,
    /// Shared-memory writer, or datagram fallback (PUBLISH frames).
    pub transport: Transport,
    /// Topic name (at most [`MAX_TOPIC_BYTES`]).
    pub topic: &'a str,
}

/// RING_GRANTED body. Carries 1 fd (the ring memfd) unless the role is
/// [`RingRole::Datagram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGranted {
    /// What to do with the ring.
    pub role: RingRole,
    /// The topic's mode.
    pub mode: Mode,
    /// The publisher's slot in every cursor page of the topic (< [`CURSOR_SLOTS`]).
    pub slot: u16,
    /// Largest message the ring holds.
    pub max_message_bytes: u32,
    /// The topic.
    pub topic_id: u64,
    /// The ring's publisher.
    pub publisher_id: u64,
    /// For [`RingRole::Reader`]: the subscriber this ring is for. 0 for a writer or fallback.
    pub subscriber_id: u64,
    /// Ring data area size in bytes (the memfd is [`crate::layout::RING_HEADER_BYTES`] more).
    pub data_bytes: u64,
}

/// CURSOR_GRANTED body. Carries 2 fds: the subscriber's sealed cursor page (map read-only),
/// then the wake socket end to send wakeups on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CursorGranted {
    /// The topic.
    pub topic_id: u64,
    /// The receiving publisher.
    pub publisher_id: u64,
    /// The subscriber whose cursor page this is.
    pub subscriber_id: u64,
    /// The publisher's slot: the cursor in the page to read (< [`CURSOR_SLOTS`]).
    pub slot: u16,
}

/// SUBSCRIBE body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscribe<'a> {
    /// The mode the topic must have (or gets, if this creates it).
    pub mode: ModeRequest,
    /// Read rings in shared memory, or get DELIVER frames.
    pub delivery: Transport,
    /// Topic name (at most [`MAX_TOPIC_BYTES`]).
    pub topic: &'a str,
}

/// SUBSCRIBED body. With [`Transport::Shm`] delivery it carries 2 fds: the subscriber's cursor
/// page memfd (map read-write), then its end of the wake socket. Datagram delivery: no fds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// The new subscriber's id.
    pub subscriber_id: u64,
    /// The topic.
    pub topic_id: u64,
    /// The topic's mode.
    pub mode: Mode,
    /// As requested.
    pub delivery: Transport,
}

/// PEER_GONE body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerGone {
    /// The topic.
    pub topic_id: u64,
    /// Whether `peer_id` is a publisher or a subscriber id.
    pub peer: PeerKind,
    /// The id of the peer that left.
    pub peer_id: u64,
    /// Why.
    pub reason: PeerGoneReason,
}

/// EVICTED body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted<'a> {
    /// The topic.
    pub topic_id: u64,
    /// The subscriber removed (the receiver's).
    pub subscriber_id: u64,
    /// Why.
    pub reason: EvictReason,
    /// For people (at most [`MAX_ERROR_MESSAGE_BYTES`]).
    pub message: &'a str,
}

/// PUBLISH body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    /// From RING_GRANTED (role fallback).
    pub publisher_id: u64,
    /// The message: the rest of the datagram (at most [`MAX_PUBLISH_PAYLOAD_BYTES`]; the
    /// broker accepts at most [`MAX_DATAGRAM_MESSAGE_BYTES`]).
    pub payload: &'a [u8],
}

/// DELIVER body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deliver<'a> {
    /// The receiving subscriber.
    pub subscriber_id: u64,
    /// The publisher that wrote the message.
    pub publisher_id: u64,
    /// The message's sequence number in that publisher's ring.
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds at publish.
    pub timestamp_ns: u64,
    /// Messages of this publisher lost just before this one (lossy topics; else 0).
    pub lost_before: u64,
    /// The message: the rest of the datagram.
    pub payload: &'a [u8],
}

/// SKIPPED body: tells a datagram subscriber exactly which message of which publisher it
/// did not get, so that no gap in a stream is silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The receiving subscriber.
    pub subscriber_id: u64,
    /// The publisher that wrote the message.
    pub publisher_id: u64,
    /// The message's sequence number in that publisher's ring (for
    /// [`SkipReason::CorruptRing`]: the first sequence number not delivered).
    pub seq: u64,
    /// Messages of this publisher lost just before this one (lossy topics; else 0), as in
    /// DELIVER.
    pub lost_before: u64,
    /// The message's length in bytes (0 when unknown: a corrupt ring).
    pub len: u32,
    /// Why.
    pub reason: SkipReason,
}

/// STATS_REPLY body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsReply<'a> {
    /// The header's MORE flag: another chunk follows.
    pub more: bool,
    /// A chunk of the JSON document, split on a character boundary (at most
    /// [`MAX_STATS_CHUNK_BYTES`]). The document is the concatenation of the chunks.
    pub json: &'a str,
}

impl<'a> StatsReply<'a> {
    /// Splits a JSON document into STATS_REPLY bodies of at most [`MAX_STATS_CHUNK_BYTES`],
    /// MORE set on all but the last. An empty document is one empty chunk.
    pub fn chunks(json: &'a str) -> StatsChunks<'a> {
        StatsReply::chunks_of(json, MAX_STATS_CHUNK_BYTES)
    }

    /// Like [`StatsReply::chunks`] with a chosen chunk size (at least 4, so a character fits).
    pub fn chunks_of(json: &'a str, max_chunk_bytes: usize) -> StatsChunks<'a> {
        StatsChunks {
            rest: Some(json),
            max: max_chunk_bytes.max(4),
        }
    }
}

/// Iterator from [`StatsReply::chunks`].
#[derive(Clone, Debug)]
pub struct StatsChunks<'a> {
    rest: Option<&'a str>,
    max: usize,
}

impl<'a> Iterator for StatsChunks<'a> {
    type Item = StatsReply<'a>;

    fn next(&mut self) -> Option<StatsReply<'a>> {
        let rest = self.rest.take()?;
        if rest.len() <= self.max {
            return Some(StatsReply {
                more: false,
                json: rest,
            });
        }
        let cut = rest.floor_char_boundary(self.max);
        let (chunk, tail) = rest.split_at(cut);
        self.rest = Some(tail);
        Some(StatsReply {
            more: true,
            json: chunk,
        })
    }
}

/// Why a datagram is not a valid frame. Header errors (see [`DecodeError::breaks_framing`])
/// mean the peer does not speak this protocol; body errors concern one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the header.
    #[error(
        "frame of {len} bytes is shorter than the {HEADER_BYTES}-byte header; \
         the peer does not speak the membus protocol"
    )]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// Longer than [`MAX_FRAME_BYTES`].
    #[error(
        "frame of {len} bytes is over the {max}-byte limit; send larger messages through \
         shared memory"
    )]
    TooLong {
        /// Datagram length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The first four bytes are not `"MBUS"`.
    #[error(
        "bad frame magic {found:#010x} (expected {MAGIC:#010x}, \"MBUS\"); \
         the peer does not speak the membus protocol"
    )]
    BadMagic {
        /// The magic seen.
        found: u32,
    },
    /// The header's version is not [`PROTOCOL_VERSION`].
    #[error(
        "peer speaks membus protocol version {seen}, this side speaks version {supported}; \
         upgrade the older side"
    )]
    UnsupportedVersion {
        /// The version in the frame.
        seen: u8,
        /// The version this side speaks.
        supported: u8,
    },
    /// Flag bits other than MORE are set.
    #[error("undefined flag bits set in {flags:#04x} (only bit 0, MORE, is defined)")]
    UnknownFlags {
        /// The flags byte.
        flags: u8,
    },
    /// The reserved header field is not zero.
    #[error("reserved header field is {value:#06x}, must be 0")]
    ReservedNotZero {
        /// Its value.
        value: u16,
    },
    /// `body_len` does not match the datagram length.
    #[error(
        "header says the body is {body_len} bytes but the datagram carries {actual_body_len}; \
         a frame must be exactly one datagram"
    )]
    LengthMismatch {
        /// The header's `body_len`.
        body_len: u32,
        /// Datagram length minus the header.
        actual_body_len: usize,
    },
    /// `fd_count` above [`MAX_FDS_PER_FRAME`].
    #[error("header announces {fd_count} fds; a frame carries at most {max}")]
    TooManyFds {
        /// The header's `fd_count`.
        fd_count: u16,
        /// The limit.
        max: usize,
    },
    /// The message type is not defined in this protocol version.
    #[error("unknown message type {raw:#06x}")]
    UnknownType {
        /// The header's `type`.
        raw: u16,
    },
    /// MORE set on a type other than STATS_REPLY.
    #[error("MORE flag set on {msg_type}; only STATS_REPLY continues across frames")]
    MoreNotAllowed {
        /// The type.
        msg_type: MsgType,
    },
    /// `fd_count` is not what this message carries.
    #[error("{msg_type} frame announces {fd_count} fds but carries exactly {expected}")]
    FdCountMismatch {
        /// The type.
        msg_type: MsgType,
        /// The header's `fd_count`.
        fd_count: u16,
        /// What [`Frame::fd_count`] says this message carries.
        expected: usize,
    },
    /// The body ends inside a field.
    #[error(
        "{msg_type} body ends inside field `{field}` (needs {needed} more bytes, {available} left)"
    )]
    Truncated {
        /// The type.
        msg_type: MsgType,
        /// The field that did not fit.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the body.
        available: usize,
    },
    /// Bytes left after the last field.
    #[error("{extra} unexpected bytes after the last field of a {msg_type} body")]
    TrailingBytes {
        /// The type.
        msg_type: MsgType,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A string field is not UTF-8.
    #[error("field `{field}` is not valid UTF-8 (valid up to byte {valid_up_to})")]
    BadUtf8 {
        /// The field.
        field: &'static str,
        /// Length of its valid prefix.
        valid_up_to: usize,
    },
    /// A string field is longer than its limit.
    #[error("field `{field}` is {len} bytes, over its {max}-byte limit")]
    StringTooLong {
        /// The field.
        field: &'static str,
        /// Its declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An enum field holds an undefined value, or a field breaks a rule of its message.
    #[error("field `{field}` has invalid value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

impl DecodeError {
    /// Whether the header itself was bad: the peer does not speak this protocol (version) and
    /// later frames cannot be trusted either. The broker answers with an ERROR frame and then
    /// disconnects. Other errors concern one frame: ERROR reply, connection kept.
    pub const fn breaks_framing(&self) -> bool {
        matches!(
            self,
            DecodeError::TooShort { .. }
                | DecodeError::TooLong { .. }
                | DecodeError::BadMagic { .. }
                | DecodeError::UnsupportedVersion { .. }
                | DecodeError::UnknownFlags { .. }
                | DecodeError::ReservedNotZero { .. }
                | DecodeError::LengthMismatch { .. }
                | DecodeError::TooManyFds { .. }
        )
    }

    /// The ERROR code that reports this error to the peer.
    pub const fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::TooManyFds { .. } | DecodeError::FdCountMismatch { .. } => {
                ErrorCode::BadFds
            }
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Why a frame cannot be encoded. Each is a bug in the caller (or an over-long user string),
/// never a peer fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string is over its limit.
    #[error("field `{field}` is {len} bytes, over its {max}-byte limit; shorten it")]
    StringTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The whole frame would be over [`MAX_FRAME_BYTES`].
    #[error(
        "frame would be {len} bytes, over the {max}-byte limit; send large messages through \
         shared memory"
    )]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The slice given to [`Frame::encode_to_slice`] is too small.
    #[error("buffer of {available} bytes is too small for a {needed}-byte frame")]
    BufferTooSmall {
        /// The frame's length.
        needed: usize,
        /// The buffer's length.
        available: usize,
    },
    /// A field breaks a rule of its message (e.g. a slot >= 64).
    #[error("field `{field}` has invalid value {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// A field that breaks a rule of its message; shared by encode and decode.
struct Invalid {
    field: &'static str,
    value: u64,
}

/// Decodes one datagram. Never panics, never allocates; strings and payloads borrow from
/// `datagram`. Does not look at fds: compare [`Header::fd_count`] (equal to
/// [`Frame::fd_count`] on success) with what arrived, see [`crate::sys::scm::frame_fd_check`].
pub fn decode(datagram: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let header = Header::parse(datagram)?;
    let msg_type = MsgType::from_raw(header.msg_type).ok_or(DecodeError::UnknownType {
        raw: header.msg_type,
    })?;
    if header.more() && msg_type != MsgType::StatsReply {
        return Err(DecodeError::MoreNotAllowed { msg_type });
    }
    let mut rd = Rd::new(&datagram[HEADER_BYTES..], msg_type);
    let msg = decode_body(&mut rd, msg_type, header.more())?;
    rd.finish()?;
    msg.check()
        .map_err(|Invalid { field, value }| DecodeError::InvalidValue { field, value })?;
    let expected = msg.fd_count();
    if usize::from(header.fd_count) != expected {
        return Err(DecodeError::FdCountMismatch {
            msg_type,
            fd_count: header.fd_count,
            expected,
        });
    }
    Ok(Frame {
        request_id: header.request_id,
        msg,
    })
}

fn u8_enum<T>(
    rd: &mut Rd<'_>,
    field: &'static str,
    from_raw: fn(u8) -> Option<T>,
) -> Result<T, DecodeError> {
    let raw = rd.u8(field)?;
    from_raw(raw).ok_or(DecodeError::InvalidValue {
        field,
        value: raw.into(),
    })
}

fn u16_enum<T>(
    rd: &mut Rd<'_>,
    field: &'static str,
    from_raw: fn(u16) -> Option<T>,
) -> Result<T, DecodeError> {
    let raw = rd.u16(field)?;
    from_raw(raw).ok_or(DecodeError::InvalidValue {
        field,
        value: raw.into(),
    })
}

fn mode(rd: &mut Rd<'_>, field: &'static str) -> Result<Mode, DecodeError> {
    u8_enum(rd, field, |raw| Mode::from_raw(raw.into()))
}

fn decode_body<'a>(rd: &mut Rd<'a>, ty: MsgType, more: bool) -> Result<Msg<'a>, DecodeError> {
    Ok(match ty {
        MsgType::Hello => Msg::Hello(Hello {
            protocol_version: rd.u16("protocol_version")?,
            transport: u8_enum(rd, "transport", Transport::from_raw)?,
            client_name: rd.str("client_name", MAX_CLIENT_NAME_BYTES)?,
        }),
        MsgType::Welcome => Msg::Welcome(Welcome {
            protocol_version: rd.u16("protocol_version")?,
            client_id: rd.u64("client_id")?,
            max_frame_bytes: rd.u32("max_frame_bytes")?,
            max_datagram_message_bytes: rd.u32("max_datagram_message_bytes")?,
            default_ring_bytes: rd.u64("default_ring_bytes")?,
            max_ring_bytes: rd.u64("max_ring_bytes")?,
            max_topic_bytes: rd.u16("max_topic_bytes")?,
            broker_version: rd.str("broker_version", MAX_BROKER_VERSION_BYTES)?,
        }),
        MsgType::Error => Msg::Error(ErrorReply {
            code: u16_enum(rd, "code", ErrorCode::from_raw)?,
            message: rd.str("message", MAX_ERROR_MESSAGE_BYTES)?,
        }),
        MsgType::Ok => Msg::Ok,
        MsgType::Ping => Msg::Ping {
            token: rd.u64("token")?,
        },
        MsgType::Pong => Msg::Pong {
            token: rd.u64("token")?,
        },
        MsgType::Shutdown => Msg::Shutdown(Shutdown {
            reason: u16_enum(rd, "reason", ShutdownReason::from_raw)?,
            message: rd.str("message", MAX_ERROR_MESSAGE_BYTES)?,
        }),
        MsgType::CreatePublisher => Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: rd.u64("ring_data_bytes")?,
            max_message_bytes: rd.u32("max_message_bytes")?,
            mode: u8_enum(rd, "mode", ModeRequest::from_raw)?,
            transport: u8_enum(rd, "transport", Transport::from_raw)?,
            topic: rd.str("topic", MAX_TOPIC_BYTES)?,
        }),
        MsgType::RingGranted => Msg::RingGranted(RingGranted {
            role: u8_enum(rd, "role", RingRole::from_raw)?,
            mode: mode(rd, "mode")?,
            slot: rd.u16("slot")?,
            max_message_bytes: rd.u32("max_message_bytes")?,
            topic_id: rd.u64("topic_id")?,
            publisher_id: rd.u64("publisher_id")?,
            subscriber_id: rd.u64("subscriber_id")?,
            data_bytes: rd.u64("data_bytes")?,
        }),
        MsgType::PublisherReady => Msg::PublisherReady {
            publisher_id: rd.u64("publisher_id")?,
        },
        MsgType::ClosePublisher => Msg::ClosePublisher {
            publisher_id: rd.u64("publisher_id")?,
        },
        MsgType::CursorGranted => Msg::CursorGranted(CursorGranted {
            topic_id: rd.u64("topic_id")?,
            publisher_id: rd.u64("publisher_id")?,
            subscriber_id: rd.u64("subscriber_id")?,
            slot: rd.u16("slot")?,
        }),
        MsgType::Subscribe => Msg::Subscribe(Subscribe {
            mode: u8_enum(rd, "mode", ModeRequest::from_raw)?,
            delivery: u8_enum(rd, "delivery", Transport::from_raw)?,
            topic: rd.str("topic", MAX_TOPIC_BYTES)?,
        }),
        MsgType::Subscribed => Msg::Subscribed(Subscribed {
            subscriber_id: rd.u64("subscriber_id")?,
            topic_id: rd.u64("topic_id")?,
            mode: mode(rd, "mode")?,
            delivery: u8_enum(rd, "delivery", Transport::from_raw)?,
        }),
        MsgType::SubscriberReady => Msg::SubscriberReady {
            subscriber_id: rd.u64("subscriber_id")?,
        },
        MsgType::Unsubscribe => Msg::Unsubscribe {
            subscriber_id: rd.u64("subscriber_id")?,
        },
        MsgType::RingReleased => Msg::RingReleased {
            subscriber_id: rd.u64("subscriber_id")?,
            publisher_id: rd.u64("publisher_id")?,
        },
        MsgType::PeerGone => Msg::PeerGone(PeerGone {
            topic_id: rd.u64("topic_id")?,
            peer: u8_enum(rd, "peer", PeerKind::from_raw)?,
            peer_id: rd.u64("peer_id")?,
            reason: u16_enum(rd, "reason", PeerGoneReason::from_raw)?,
        }),
        MsgType::Evicted => Msg::Evicted(Evicted {
            topic_id: rd.u64("topic_id")?,
            subscriber_id: rd.u64("subscriber_id")?,
            reason: u16_enum(rd, "reason", EvictReason::from_raw)?,
            message: rd.str("message", MAX_ERROR_MESSAGE_BYTES)?,
        }),
        MsgType::Publish => Msg::Publish(Publish {
            publisher_id: rd.u64("publisher_id")?,
            payload: rd.rest(),
        }),
        MsgType::Deliver => Msg::Deliver(Deliver {
            subscriber_id: rd.u64("subscriber_id")?,
            publisher_id: rd.u64("publisher_id")?,
            seq: rd.u64("seq")?,
            timestamp_ns: rd.u64("timestamp_ns")?,
            lost_before: rd.u64("lost_before")?,
            payload: rd.rest(),
        }),
        MsgType::Skipped => Msg::Skipped(Skipped {
            subscriber_id: rd.u64("subscriber_id")?,
            publisher_id: rd.u64("publisher_id")?,
            seq: rd.u64("seq")?,
            lost_before: rd.u64("lost_before")?,
            len: rd.u32("len")?,
            reason: u16_enum(rd, "reason", SkipReason::from_raw)?,
        }),
        MsgType::StatsRequest => Msg::StatsRequest,
        MsgType::StatsReply => Msg::StatsReply(StatsReply {
            more,
            json: rd.rest_str("json")?,
        }),
    })
}

/// Encoded size of a length-prefixed string, or the error if it is over its limit.
fn str_len(field: &'static str, s: &str, max: usize) -> Result<usize, EncodeError> {
    debug_assert!(max <= usize::from(u16::MAX));
    if s.len() > max {
        return Err(EncodeError::StringTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(2 + s.len())
}

impl<'a> Frame<'a> {
    /// A frame with a request id (a request, or the reply to one).
    pub const fn new(request_id: u64, msg: Msg<'a>) -> Self {
        Frame { request_id, msg }
    }

    /// An unsolicited frame (request id 0).
    pub const fn event(msg: Msg<'a>) -> Self {
        Frame { request_id: 0, msg }
    }

    /// The message type.
    pub const fn msg_type(&self) -> MsgType {
        self.msg.msg_type()
    }

    /// How many fds this frame must carry (SCM_RIGHTS). A receiver that got a different number
    /// closes them all and rejects the frame.
    pub const fn fd_count(&self) -> usize {
        self.msg.fd_count()
    }

    /// Size of the encoded frame (header included), after checking every field against its
    /// limit.
    pub fn encoded_len(&self) -> Result<usize, EncodeError> {
        self.msg
            .check()
            .map_err(|Invalid { field, value }| EncodeError::InvalidValue { field, value })?;
        let len = HEADER_BYTES + self.msg.body_len()?;
        if len > MAX_FRAME_BYTES {
            return Err(EncodeError::FrameTooLarge {
                len,
                max: MAX_FRAME_BYTES,
            });
        }
        Ok(len)
    }

    /// Encodes into `buf` and returns the frame's length (`buf[..len]` is the datagram).
    pub fn encode_to_slice(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        let len = self.encoded_len()?;
        let Some(out) = buf.get_mut(..len) else {
            return Err(EncodeError::BufferTooSmall {
                needed: len,
                available: buf.len(),
            });
        };
        let mut w = Wr::new(out);
        w.u32(MAGIC);
        w.u8(PROTOCOL_VERSION);
        let more = matches!(self.msg, Msg::StatsReply(StatsReply { more: true, .. }));
        w.u8(if more { FLAG_MORE } else { 0 });
        w.u16(self.msg_type().to_raw());
        // Fits: len <= MAX_FRAME_BYTES, checked above.
        w.u32((len - HEADER_BYTES) as u32);
        // Fits: at most 2.
        w.u16(self.fd_count() as u16);
        w.u16(0);
        w.u64(self.request_id);
        self.msg.write_body(&mut w);
        debug_assert_eq!(w.pos(), len, "encoded_len disagrees with write_body");
        Ok(len)
    }

    /// Clears `out` and encodes into it; returns the frame's length (= `out.len()`). `out`
    /// grows only if its capacity is below the frame's length: reuse one buffer.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
        out.clear();
        let len = self.encoded_len()?;
        out.resize(len, 0);
        self.encode_to_slice(out)
    }

    /// Decodes one datagram; see [`decode`].
    pub fn decode(datagram: &'a [u8]) -> Result<Frame<'a>, DecodeError> {
        decode(datagram)
    }
}

impl Msg<'_> {
    /// The message type.
    pub const fn msg_type(&self) -> MsgType {
        match self {
            Msg::Hello(_) => MsgType::Hello,
            Msg::Welcome(_) => MsgType::Welcome,
            Msg::Error(_) => MsgType::Error,
            Msg::Ok => MsgType::Ok,
            Msg::Ping { .. } => MsgType::Ping,
            Msg::Pong { .. } => MsgType::Pong,
            Msg::Shutdown(_) => MsgType::Shutdown,
            Msg::CreatePublisher(_) => MsgType::CreatePublisher,
            Msg::RingGranted(_) => MsgType::RingGranted,
            Msg::PublisherReady { .. } => MsgType::PublisherReady,
            Msg::ClosePublisher { .. } => MsgType::ClosePublisher,
            Msg::CursorGranted(_) => MsgType::CursorGranted,
            Msg::Subscribe(_) => MsgType::Subscribe,
            Msg::Subscribed(_) => MsgType::Subscribed,
            Msg::SubscriberReady { .. } => MsgType::SubscriberReady,
            Msg::Unsubscribe { .. } => MsgType::Unsubscribe,
            Msg::RingReleased { .. } => MsgType::RingReleased,
            Msg::PeerGone(_) => MsgType::PeerGone,
            Msg::Evicted(_) => MsgType::Evicted,
            Msg::Publish(_) => MsgType::Publish,
            Msg::Deliver(_) => MsgType::Deliver,
            Msg::Skipped(_) => MsgType::Skipped,
            Msg::StatsRequest => MsgType::StatsRequest,
            Msg::StatsReply(_) => MsgType::StatsReply,
        }
    }

    /// How many fds this message must carry: RING_GRANTED 1 (0 for the fallback role),
    /// CURSOR_GRANTED 2, SUBSCRIBED 2 (0 for datagram delivery), everything else 0.
    pub const fn fd_count(&self) -> usize {
        match self {
            Msg::RingGranted(RingGranted {
                role: RingRole::Writer | RingRole::Reader | RingRole::ReaderFromStart,
                ..
            }) => 1,
            Msg::CursorGranted(_) => 2,
            Msg::Subscribed(Subscribed {
                delivery: Transport::Shm,
                ..
            }) => 2,
            _ => 0,
        }
    }

    /// Rules beyond field ranges, checked by both encode and decode so the two agree.
    fn check(&self) -> Result<(), Invalid> {
        match self {
            Msg::RingGranted(g) => {
                if usize::from(g.slot) >= CURSOR_SLOTS {
                    return Err(Invalid {
                        field: "slot",
                        value: g.slot.into(),
                    });
                }
                if !g.role.is_reader() && g.subscriber_id != 0 {
                    return Err(Invalid {
                        field: "subscriber_id",
                        value: g.subscriber_id,
                    });
                }
                Ok(())
            }
            Msg::CursorGranted(g) if usize::from(g.slot) >= CURSOR_SLOTS => Err(Invalid {
                field: "slot",
                value: g.slot.into(),
            }),
            _ => Ok(()),
        }
    }

    /// Body length, after checking every string against its limit.
    fn body_len(&self) -> Result<usize, EncodeError> {
        Ok(match self {
            Msg::Hello(m) => 3 + str_len("client_name", m.client_name, MAX_CLIENT_NAME_BYTES)?,
            Msg::Welcome(m) => {
                36 + str_len("broker_version", m.broker_version, MAX_BROKER_VERSION_BYTES)?
            }
            Msg::Error(m) => 2 + str_len("message", m.message, MAX_ERROR_MESSAGE_BYTES)?,
            Msg::Ok | Msg::StatsRequest => 0,
            Msg::Ping { .. } | Msg::Pong { .. } => 8,
            Msg::Shutdown(m) => 2 + str_len("message", m.message, MAX_ERROR_MESSAGE_BYTES)?,
            Msg::CreatePublisher(m) => 14 + str_len("topic", m.topic, MAX_TOPIC_BYTES)?,
            Msg::RingGranted(_) => 40,
            Msg::PublisherReady { .. }
            | Msg::ClosePublisher { .. }
            | Msg::SubscriberReady { .. }
            | Msg::Unsubscribe { .. } => 8,
            Msg::CursorGranted(_) => 26,
            Msg::Subscribe(m) => 2 + str_len("topic", m.topic, MAX_TOPIC_BYTES)?,
            Msg::Subscribed(_) => 18,
            Msg::RingReleased { .. } => 16,
            Msg::PeerGone(_) => 19,
            Msg::Evicted(m) => 18 + str_len("message", m.message, MAX_ERROR_MESSAGE_BYTES)?,
            Msg::Publish(m) => PUBLISH_FIXED_BYTES + m.payload.len(),
            Msg::Deliver(m) => DELIVER_FIXED_BYTES + m.payload.len(),
            Msg::Skipped(_) => 38,
            Msg::StatsReply(m) => m.json.len(),
        })
    }

    /// Writes the body; [`Msg::body_len`] sized the buffer and checked the strings.
    fn write_body(&self, w: &mut Wr<'_>) {
        match self {
            Msg::Hello(m) => {
                w.u16(m.protocol_version);
                w.u8(m.transport.to_raw());
                w.str(m.client_name);
            }
            Msg::Welcome(m) => {
                w.u16(m.protocol_version);
                w.u64(m.client_id);
                w.u32(m.max_frame_bytes);
                w.u32(m.max_datagram_message_bytes);
                w.u64(m.default_ring_bytes);
                w.u64(m.max_ring_bytes);
                w.u16(m.max_topic_bytes);
                w.str(m.broker_version);
            }
            Msg::Error(m) => {
                w.u16(m.code.to_raw());
                w.str(m.message);
            }
            Msg::Ok | Msg::StatsRequest => {}
            Msg::Ping { token } | Msg::Pong { token } => w.u64(*token),
            Msg::Shutdown(m) => {
                w.u16(m.reason.to_raw());
                w.str(m.message);
            }
            Msg::CreatePublisher(m) => {
                w.u64(m.ring_data_bytes);
                w.u32(m.max_message_bytes);
                w.u8(m.mode.to_raw());
                w.u8(m.transport.to_raw());
                w.str(m.topic);
            }
            Msg::RingGranted(m) => {
                w.u8(m.role.to_raw());
                w.u8(mode_raw(m.mode));
                w.u16(m.slot);
                w.u32(m.max_message_bytes);
                w.u64(m.topic_id);
                w.u64(m.publisher_id);
                w.u64(m.subscriber_id);
                w.u64(m.data_bytes);
            }
            Msg::PublisherReady { publisher_id } | Msg::ClosePublisher { publisher_id } => {
                w.u64(*publisher_id)
            }
            Msg::SubscriberReady { subscriber_id } | Msg::Unsubscribe { subscriber_id } => {
                w.u64(*subscriber_id)
            }
            Msg::CursorGranted(m) => {
                w.u64(m.topic_id);
                w.u64(m.publisher_id);
                w.u64(m.subscriber_id);
                w.u16(m.slot);
            }
            Msg::Subscribe(m) => {
                w.u8(m.mode.to_raw());
                w.u8(m.delivery.to_raw());
                w.str(m.topic);
            }
            Msg::Subscribed(m) => {
                w.u64(m.subscriber_id);
                w.u64(m.topic_id);
                w.u8(mode_raw(m.mode));
                w.u8(m.delivery.to_raw());
            }
            Msg::RingReleased {
                subscriber_id,
                publisher_id,
            } => {
                w.u64(*subscriber_id);
                w.u64(*publisher_id);
            }
            Msg::PeerGone(m) => {
                w.u64(m.topic_id);
                w.u8(m.peer.to_raw());
                w.u64(m.peer_id);
                w.u16(m.reason.to_raw());
            }
            Msg::Evicted(m) => {
                w.u64(m.topic_id);
                w.u64(m.subscriber_id);
                w.u16(m.reason.to_raw());
                w.str(m.message);
            }
            Msg::Publish(m) => {
                w.u64(m.publisher_id);
                w.bytes(m.payload);
            }
            Msg::Deliver(m) => {
                w.u64(m.subscriber_id);
                w.u64(m.publisher_id);
                w.u64(m.seq);
                w.u64(m.timestamp_ns);
                w.u64(m.lost_before);
                w.bytes(m.payload);
            }
            Msg::Skipped(m) => {
                w.u64(m.subscriber_id);
                w.u64(m.publisher_id);
                w.u64(m.seq);
                w.u64(m.lost_before);
                w.u32(m.len);
                w.u16(m.reason.to_raw());
            }
            Msg::StatsReply(m) => w.bytes(m.json.as_bytes()),
        }
    }
}

/// A topic mode on the wire: one byte, the ring header's value (1 reliable, 2 lossy).
const fn mode_raw(mode: Mode) -> u8 {
    // Fits: MODE_RELIABLE and MODE_LOSSY are 1 and 2.
    mode.to_raw() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rejects_body_len_that_overflows_usize_compare() {
        let mut b = [0u8; HEADER_BYTES];
        b[..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = PROTOCOL_VERSION;
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(DecodeError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn stats_chunks_split_on_char_boundaries() {
        let doc = "{\"é\":\"ééé\"}";
        let chunks: Vec<_> = StatsReply::chunks_of(doc, 4).collect();
        assert!(chunks.iter().all(|c| c.json.len() <= 4));
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.more));
        assert!(!chunks.last().unwrap().more);
        let joined: String = chunks.iter().map(|c| c.json).collect();
        assert_eq!(joined, doc);
        let empty: Vec<_> = StatsReply::chunks("").collect();
        assert_eq!(
            empty,
            [StatsReply {
                more: false,
                json: ""
            }]
        );
    }
}
