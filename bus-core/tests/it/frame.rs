//! Control-frame codec: exact bytes of every message (the hex examples of docs/protocol.md),
//! round trips, every malformed case, and property tests over arbitrary and mutated input.

use bus_core::frame::{
    CreatePublisher, CursorGranted, DecodeError, Deliver, EncodeError, ErrorCode, ErrorReply,
    EvictReason, Evicted, FLAG_MORE, Frame, HEADER_BYTES, Header, Hello, MAGIC,
    MAX_DATAGRAM_MESSAGE_BYTES, MAX_PUBLISH_PAYLOAD_BYTES, MAX_STATS_CHUNK_BYTES, ModeRequest, Msg,
    MsgType, PROTOCOL_VERSION, PeerGone, PeerGoneReason, PeerKind, Publish, RingGranted, RingRole,
    Shutdown, ShutdownReason, SkipReason, Skipped, StatsReply, Subscribe, Subscribed, Transport,
    Welcome, decode,
};
use bus_core::layout::Mode;
use bus_core::limits::{
    MAX_BROKER_VERSION_BYTES, MAX_CLIENT_NAME_BYTES, MAX_ERROR_MESSAGE_BYTES, MAX_FDS_PER_FRAME,
    MAX_FRAME_BYTES, MAX_TOPIC_BYTES,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Helpers

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {s:?}"
    );
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let len = frame.encode(&mut out).expect("valid frame encodes");
    assert_eq!(len, out.len());
    out
}

/// A datagram with a consistent header (`body_len` = body length) around `body`.
fn raw(msg_type: u16, flags: u8, fd_count: u16, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(PROTOCOL_VERSION);
    out.push(flags);
    out.extend_from_slice(&msg_type.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&fd_count.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// `frame` encoded, with `bytes` written over it at `at`.
fn patched(frame: &Frame<'_>, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut out = encode(frame);
    out[at..at + bytes.len()].copy_from_slice(bytes);
    out
}

/// Body of a frame with one string field at the end, built by hand.
fn body_with_string(prefix: &[u8], declared_len: u16, string: &[u8]) -> Vec<u8> {
    let mut body = prefix.to_vec();
    body.extend_from_slice(&declared_len.to_le_bytes());
    body.extend_from_slice(string);
    body
}

// ---------------------------------------------------------------------------------------------
// The examples: one per message type (two for RING_GRANTED). These exact bytes are in
// docs/protocol.md; header and body are grouped by field, spaces are ignored.

struct Example {
    name: &'static str,
    frame: Frame<'static>,
    header: &'static str,
    body: &'static str,
}

#[rustfmt::skip]
fn examples() -> Vec<Example> {
    let ex = |name, frame, header, body| Example { name, frame, header, body };
    vec![
        ex("hello",
            Frame::new(1, Msg::Hello(Hello {
                protocol_version: 1, transport: Transport::Datagram, client_name: "py",
            })),
            "4d425553 01 00 0100 07000000 0000 0000 0100000000000000",
            "0100 02 0200 7079"),
        ex("welcome",
            Frame::new(1, Msg::Welcome(Welcome {
                protocol_version: 1, client_id: 7, max_frame_bytes: 65536,
                max_datagram_message_bytes: MAX_DATAGRAM_MESSAGE_BYTES as u32,
                default_ring_bytes: 1 << 20, max_ring_bytes: 1 << 30, max_topic_bytes: 255,
                broker_version: "0.1.0",
            })),
            "4d425553 01 00 0200 2b000000 0000 0000 0100000000000000",
            "0100 0700000000000000 00000100 c0ff0000 0000100000000000 0000004000000000 ff00 \
             0500 302e312e30"),
        ex("error",
            Frame::new(2, Msg::Error(ErrorReply { code: ErrorCode::NoSuchTopic, message: "no topic" })),
            "4d425553 01 00 0300 0c000000 0000 0000 0200000000000000",
            "0800 0800 6e6f20746f706963"),
        ex("ok",
            Frame::new(3, Msg::Ok),
            "4d425553 01 00 0400 00000000 0000 0000 0300000000000000",
            ""),
        ex("ping",
            Frame::new(4, Msg::Ping { token: 0x1122_3344_5566_7788 }),
            "4d425553 01 00 0500 08000000 0000 0000 0400000000000000",
            "8877665544332211"),
        ex("pong",
            Frame::new(4, Msg::Pong { token: 0x1122_3344_5566_7788 }),
            "4d425553 01 00 0600 08000000 0000 0000 0400000000000000",
            "8877665544332211"),
        ex("shutdown",
            Frame::event(Msg::Shutdown(Shutdown { reason: ShutdownReason::Requested, message: "bye" })),
            "4d425553 01 00 0700 07000000 0000 0000 0000000000000000",
            "0100 0300 627965"),
        ex("create_publisher",
            Frame::new(5, Msg::CreatePublisher(CreatePublisher {
                ring_data_bytes: 0, max_message_bytes: 0, mode: ModeRequest::Any,
                transport: Transport::Datagram, topic: "t",
            })),
            "4d425553 01 00 0101 11000000 0000 0000 0500000000000000",
            "0000000000000000 00000000 00 02 0100 74"),
        ex("ring_granted_fallback",
            Frame::new(5, Msg::RingGranted(RingGranted {
                role: RingRole::Datagram, mode: Mode::Reliable, slot: 0,
                max_message_bytes: MAX_DATAGRAM_MESSAGE_BYTES as u32, topic_id: 1,
                publisher_id: 2, subscriber_id: 0, data_bytes: 1 << 20,
            })),
            "4d425553 01 00 0201 28000000 0000 0000 0500000000000000",
            "03 01 0000 c0ff0000 0100000000000000 0200000000000000 0000000000000000 \
             0000100000000000"),
        ex("ring_granted_writer",
            Frame::new(5, Msg::RingGranted(RingGranted {
                role: RingRole::Writer, mode: Mode::Lossy, slot: 1, max_message_bytes: 4096,
                topic_id: 1, publisher_id: 2, subscriber_id: 0, data_bytes: 1 << 16,
            })),
            "4d425553 01 00 0201 28000000 0100 0000 0500000000000000",
            "01 02 0100 00100000 0100000000000000 0200000000000000 0000000000000000 \
             0000010000000000"),
        ex("publisher_ready",
            Frame::new(6, Msg::PublisherReady { publisher_id: 2 }),
            "4d425553 01 00 0301 08000000 0000 0000 0600000000000000",
            "0200000000000000"),
        ex("close_publisher",
            Frame::new(7, Msg::ClosePublisher { publisher_id: 2 }),
            "4d425553 01 00 0401 08000000 0000 0000 0700000000000000",
            "0200000000000000"),
        ex("cursor_granted",
            Frame::event(Msg::CursorGranted(CursorGranted {
                topic_id: 1, publisher_id: 2, subscriber_id: 3, slot: 1,
            })),
            "4d425553 01 00 0501 1a000000 0200 0000 0000000000000000",
            "0100000000000000 0200000000000000 0300000000000000 0100"),
        ex("subscribe",
            Frame::new(8, Msg::Subscribe(Subscribe {
                mode: ModeRequest::Lossy, delivery: Transport::Datagram, topic: "t",
            })),
            "4d425553 01 00 0102 05000000 0000 0000 0800000000000000",
            "02 02 0100 74"),
        ex("subscribed",
            Frame::new(8, Msg::Subscribed(Subscribed {
                subscriber_id: 3, topic_id: 1, mode: Mode::Lossy, delivery: Transport::Datagram,
            })),
            "4d425553 01 00 0202 12000000 0000 0000 0800000000000000",
            "0300000000000000 0100000000000000 02 02"),
        ex("subscriber_ready",
            Frame::new(9, Msg::SubscriberReady { subscriber_id: 3 }),
            "4d425553 01 00 0302 08000000 0000 0000 0900000000000000",
            "0300000000000000"),
        ex("unsubscribe",
            Frame::new(10, Msg::Unsubscribe { subscriber_id: 3 }),
            "4d425553 01 00 0402 08000000 0000 0000 0a00000000000000",
            "0300000000000000"),
        ex("ring_released",
            Frame::new(12, Msg::RingReleased { subscriber_id: 3, publisher_id: 2 }),
            "4d425553 01 00 0502 10000000 0000 0000 0c00000000000000",
            "0300000000000000 0200000000000000"),
        ex("peer_gone",
            Frame::event(Msg::PeerGone(PeerGone {
                topic_id: 1, peer: PeerKind::Publisher, peer_id: 2,
                reason: PeerGoneReason::Disconnected,
            })),
            "4d425553 01 00 0103 13000000 0000 0000 0000000000000000",
            "0100000000000000 01 0200000000000000 0200"),
        ex("evicted",
            Frame::event(Msg::Evicted(Evicted {
                topic_id: 1, subscriber_id: 3, reason: EvictReason::Stalled, message: "stalled",
            })),
            "4d425553 01 00 0203 1b000000 0000 0000 0000000000000000",
            "0100000000000000 0300000000000000 0100 0700 7374616c6c6564"),
        ex("publish",
            Frame::new(0, Msg::Publish(Publish { publisher_id: 2, payload: b"hello" })),
            "4d425553 01 00 0104 0d000000 0000 0000 0000000000000000",
            "0200000000000000 68656c6c6f"),
        ex("deliver",
            Frame::event(Msg::Deliver(Deliver {
                subscriber_id: 3, publisher_id: 2, seq: 5, timestamp_ns: 1000, lost_before: 0,
                payload: b"hello",
            })),
            "4d425553 01 00 0204 2d000000 0000 0000 0000000000000000",
            "0300000000000000 0200000000000000 0500000000000000 e803000000000000 \
             0000000000000000 68656c6c6f"),
        ex("skipped",
            Frame::event(Msg::Skipped(Skipped {
                subscriber_id: 3, publisher_id: 2, seq: 5, lost_before: 0, len: 70000,
                reason: SkipReason::TooLarge,
            })),
            "4d425553 01 00 0304 26000000 0000 0000 0000000000000000",
            "0300000000000000 0200000000000000 0500000000000000 0000000000000000 70110100 0100"),
        ex("stats_request",
            Frame::new(11, Msg::StatsRequest),
            "4d425553 01 00 0105 00000000 0000 0000 0b00000000000000",
            ""),
        ex("stats_reply",
            Frame::new(11, Msg::StatsReply(StatsReply { more: true, json: "{\"topics\":" })),
            "4d425553 01 01 0205 0a000000 0000 0000 0b00000000000000",
            "7b22746f70696373223a"),
    ]
}

fn example(name: &str) -> Example {
    examples()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no example {name}"))
}

fn check_example(name: &str) {
    let ex = example(name);
    let expected = unhex(&format!("{} {}", ex.header, ex.body));
    let bytes = encode(&ex.frame);
    assert_eq!(
        hex(&bytes),
        hex(&expected),
        "{name}: encoded bytes differ from the documented ones"
    );
    assert_eq!(
        decode(&expected),
        Ok(ex.frame),
        "{name}: documented bytes decode differently"
    );
    let header = Header::parse(&expected).unwrap();
    assert_eq!(
        usize::from(header.fd_count),
        ex.frame.fd_count(),
        "{name}: fd_count"
    );
    assert_eq!(header.request_id, ex.frame.request_id);
}

macro_rules! hex_tests {
    ($($name:ident)*) => {
        $(
            #[test]
            fn $name() {
                check_example(stringify!($name));
            }
        )*
    };
}

mod hex_example {
    use super::check_example;

    hex_tests! {
        hello welcome error ok ping pong shutdown create_publisher ring_granted_fallback
        ring_granted_writer publisher_ready close_publisher cursor_granted subscribe subscribed
        subscriber_ready unsubscribe ring_released peer_gone evicted publish deliver skipped
        stats_request stats_reply
    }
}

#[test]
fn examples_cover_every_message_type() {
    let examples = examples();
    for ty in MsgType::ALL {
        assert!(
            examples.iter().any(|e| e.frame.msg_type() == *ty),
            "no hex example for {ty}"
        );
    }
}

#[test]
fn every_example_round_trips() {
    for ex in examples() {
        let bytes = encode(&ex.frame);
        assert_eq!(ex.frame.encoded_len(), Ok(bytes.len()), "{}", ex.name);
        assert_eq!(decode(&bytes), Ok(ex.frame), "{}", ex.name);
        let mut slice = [0u8; 256];
        let len = ex.frame.encode_to_slice(&mut slice).unwrap();
        assert_eq!(
            &slice[..len],
            &bytes[..],
            "{}: slice and Vec encodings differ",
            ex.name
        );
    }
}

#[test]
fn fd_counts_per_type() {
    let fds = |name: &str| example(name).frame.fd_count();
    assert_eq!(fds("ring_granted_writer"), 1);
    assert_eq!(fds("ring_granted_fallback"), 0);
    assert_eq!(fds("cursor_granted"), 2);
    assert_eq!(fds("subscribed"), 0, "datagram delivery carries no fds");
    let shm = Frame::new(
        8,
        Msg::Subscribed(Subscribed {
            subscriber_id: 3,
            topic_id: 1,
            mode: Mode::Reliable,
            delivery: Transport::Shm,
        }),
    );
    assert_eq!(shm.fd_count(), 2);
    let reader = Frame::event(Msg::RingGranted(RingGranted {
        role: RingRole::Reader,
        mode: Mode::Reliable,
        slot: 63,
        max_message_bytes: 1,
        topic_id: 1,
        publisher_id: 2,
        subscriber_id: 3,
        data_bytes: 4096,
    }));
    assert_eq!(reader.fd_count(), 1);
    assert_eq!(decode(&encode(&reader)), Ok(reader));
    for name in [
        "hello",
        "welcome",
        "error",
        "ok",
        "publish",
        "deliver",
        "stats_reply",
    ] {
        assert_eq!(fds(name), 0, "{name}");
    }
}

#[test]
fn payloads_are_borrowed_not_copied() {
    let bytes = encode(&example("deliver").frame);
    let Ok(Frame {
        msg: Msg::Deliver(d),
        ..
    }) = decode(&bytes)
    else {
        panic!("deliver example did not decode as DELIVER")
    };
    assert_eq!(d.payload, b"hello");
    assert_eq!(d.payload.as_ptr(), bytes[bytes.len() - 5..].as_ptr());

    let bytes = encode(&example("publish").frame);
    let Ok(Frame {
        msg: Msg::Publish(p),
        ..
    }) = decode(&bytes)
    else {
        panic!("publish example did not decode as PUBLISH")
    };
    assert_eq!(p.payload.as_ptr(), bytes[HEADER_BYTES + 8..].as_ptr());
}

#[test]
fn encode_into_a_reused_vec_does_not_reallocate() {
    let mut out = Vec::with_capacity(MAX_FRAME_BYTES);
    let (ptr, cap) = (out.as_ptr(), out.capacity());
    for ex in examples() {
        out.push(0xAA); // stale content must be cleared
        ex.frame.encode(&mut out).unwrap();
        assert_eq!(decode(&out), Ok(ex.frame));
        assert_eq!((out.as_ptr(), out.capacity()), (ptr, cap), "{}", ex.name);
    }
}

#[test]
fn largest_payloads_fit_and_one_more_byte_does_not() {
    let big = vec![0x5A; MAX_PUBLISH_PAYLOAD_BYTES + 1];
    let publish = |n: usize| {
        Frame::new(
            1,
            Msg::Publish(Publish {
                publisher_id: 1,
                payload: &big[..n],
            }),
        )
    };
    let bytes = encode(&publish(MAX_PUBLISH_PAYLOAD_BYTES));
    assert_eq!(bytes.len(), MAX_FRAME_BYTES);
    assert_eq!(decode(&bytes), Ok(publish(MAX_PUBLISH_PAYLOAD_BYTES)));
    assert_eq!(
        publish(MAX_PUBLISH_PAYLOAD_BYTES + 1).encoded_len(),
        Err(EncodeError::FrameTooLarge {
            len: MAX_FRAME_BYTES + 1,
            max: MAX_FRAME_BYTES
        })
    );

    let deliver = |n: usize| {
        Frame::event(Msg::Deliver(Deliver {
            subscriber_id: 1,
            publisher_id: 2,
            seq: 3,
            timestamp_ns: 4,
            lost_before: 5,
            payload: &big[..n],
        }))
    };
    let bytes = encode(&deliver(MAX_DATAGRAM_MESSAGE_BYTES));
    assert_eq!(bytes.len(), MAX_FRAME_BYTES);
    assert_eq!(decode(&bytes), Ok(deliver(MAX_DATAGRAM_MESSAGE_BYTES)));
    assert!(matches!(
        deliver(MAX_DATAGRAM_MESSAGE_BYTES + 1).encoded_len(),
        Err(EncodeError::FrameTooLarge { .. })
    ));
}

/// Builds a frame around one string field.
type MakeFrame = fn(&str) -> Frame<'_>;

#[test]
fn longest_strings_fit_and_one_more_byte_does_not() {
    let long = "x".repeat(MAX_ERROR_MESSAGE_BYTES + 1);
    let cases: [(&str, usize, MakeFrame); 6] = [
        ("client_name", MAX_CLIENT_NAME_BYTES, |s| {
            Frame::new(
                1,
                Msg::Hello(Hello {
                    protocol_version: 1,
                    transport: Transport::Shm,
                    client_name: s,
                }),
            )
        }),
        ("broker_version", MAX_BROKER_VERSION_BYTES, |s| {
            let Msg::Welcome(w) = example("welcome").frame.msg else {
                unreachable!()
            };
            Frame::new(
                1,
                Msg::Welcome(Welcome {
                    broker_version: s,
                    ..w
                }),
            )
        }),
        ("message", MAX_ERROR_MESSAGE_BYTES, |s| {
            Frame::new(
                1,
                Msg::Error(ErrorReply {
                    code: ErrorCode::Internal,
                    message: s,
                }),
            )
        }),
        ("topic", MAX_TOPIC_BYTES, |s| {
            Frame::new(
                1,
                Msg::Subscribe(Subscribe {
                    mode: ModeRequest::Any,
                    delivery: Transport::Shm,
                    topic: s,
                }),
            )
        }),
        ("topic", MAX_TOPIC_BYTES, |s| {
            Frame::new(
                1,
                Msg::CreatePublisher(CreatePublisher {
                    ring_data_bytes: 0,
                    max_message_bytes: 0,
                    mode: ModeRequest::Any,
                    transport: Transport::Shm,
                    topic: s,
                }),
            )
        }),
        ("message", MAX_ERROR_MESSAGE_BYTES, |s| {
            Frame::event(Msg::Evicted(Evicted {
                topic_id: 1,
                subscriber_id: 2,
                reason: EvictReason::TooSlow,
                message: s,
            }))
        }),
    ];
    for (field, max, make) in cases {
        let ok = make(&long[..max]);
        assert_eq!(decode(&encode(&ok)), Ok(ok), "{field} at its limit");
        assert_eq!(
            make(&long[..max + 1]).encoded_len(),
            Err(EncodeError::StringTooLong {
                field,
                len: max + 1,
                max
            }),
        );
        // The same over-long string forced onto the wire is rejected by decode.
        let mut bytes = encode(&make(&long[..max]));
        let len_at = bytes.len() - max - 2;
        bytes[len_at..len_at + 2].copy_from_slice(&((max + 1) as u16).to_le_bytes());
        bytes.push(b'x');
        let body_len = (bytes.len() - HEADER_BYTES) as u32;
        bytes[8..12].copy_from_slice(&body_len.to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::StringTooLong {
                field,
                len: max + 1,
                max
            }),
        );
    }
}

#[test]
fn encode_rejects_what_decode_would_reject() {
    let Msg::RingGranted(g) = example("ring_granted_writer").frame.msg else {
        unreachable!()
    };
    let slot = Frame::new(1, Msg::RingGranted(RingGranted { slot: 64, ..g }));
    assert_eq!(
        slot.encoded_len(),
        Err(EncodeError::InvalidValue {
            field: "slot",
            value: 64
        })
    );
    let sub = Frame::new(
        1,
        Msg::RingGranted(RingGranted {
            subscriber_id: 9,
            ..g
        }),
    );
    assert_eq!(
        sub.encoded_len(),
        Err(EncodeError::InvalidValue {
            field: "subscriber_id",
            value: 9
        })
    );
    let cursor = Frame::event(Msg::CursorGranted(CursorGranted {
        topic_id: 1,
        publisher_id: 2,
        subscriber_id: 3,
        slot: 64,
    }));
    assert_eq!(
        cursor.encoded_len(),
        Err(EncodeError::InvalidValue {
            field: "slot",
            value: 64
        })
    );
}

#[test]
fn encode_to_a_short_slice_fails_cleanly() {
    let frame = example("welcome").frame;
    let need = frame.encoded_len().unwrap();
    let mut buf = vec![0u8; need - 1];
    assert_eq!(
        frame.encode_to_slice(&mut buf),
        Err(EncodeError::BufferTooSmall {
            needed: need,
            available: need - 1
        })
    );
    assert!(buf.iter().all(|&b| b == 0), "nothing written on failure");
}

#[test]
fn stats_reply_chunks_reassemble_and_flag_more() {
    let doc = format!("{{\"pad\":\"{}\"}}", "é".repeat(MAX_STATS_CHUNK_BYTES));
    let mut joined = String::new();
    let mut out = Vec::new();
    let mut frames = 0;
    for chunk in StatsReply::chunks(&doc) {
        Frame::new(3, Msg::StatsReply(chunk))
            .encode(&mut out)
            .unwrap();
        let frame = decode(&out).unwrap();
        let Msg::StatsReply(back) = frame.msg else {
            panic!("not a STATS_REPLY")
        };
        assert_eq!(back, chunk);
        assert_eq!(out[5] & FLAG_MORE != 0, chunk.more);
        joined.push_str(back.json);
        frames += 1;
    }
    assert_eq!(joined, doc);
    assert_eq!(
        frames, 3,
        "2 * MAX_STATS_CHUNK_BYTES of JSON needs 3 frames"
    );
}

#[test]
fn wire_enums_round_trip_and_have_unique_names() {
    fn check<T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display, R: Copy>(
        all: &[T],
        to: fn(T) -> R,
        from: fn(R) -> Option<T>,
    ) {
        let mut names = std::collections::HashSet::new();
        for &v in all {
            assert_eq!(from(to(v)), Some(v));
            assert!(names.insert(v.to_string()), "duplicate name {v}");
        }
    }
    check(MsgType::ALL, MsgType::to_raw, MsgType::from_raw);
    check(ErrorCode::ALL, ErrorCode::to_raw, ErrorCode::from_raw);
    check(Transport::ALL, Transport::to_raw, Transport::from_raw);
    check(ModeRequest::ALL, ModeRequest::to_raw, ModeRequest::from_raw);
    check(RingRole::ALL, RingRole::to_raw, RingRole::from_raw);
    check(PeerKind::ALL, PeerKind::to_raw, PeerKind::from_raw);
    check(
        PeerGoneReason::ALL,
        PeerGoneReason::to_raw,
        PeerGoneReason::from_raw,
    );
    check(EvictReason::ALL, EvictReason::to_raw, EvictReason::from_raw);
    check(
        ShutdownReason::ALL,
        ShutdownReason::to_raw,
        ShutdownReason::from_raw,
    );
    assert_eq!(ErrorCode::from_raw(0), None);
    assert_eq!(ErrorCode::BadFrame.name(), "bad-frame");
    assert_eq!(MsgType::StatsReply.to_string(), "STATS_REPLY");
    assert!(ModeRequest::Any.accepts(Mode::Lossy));
    assert!(!ModeRequest::Reliable.accepts(Mode::Lossy));
}

// ---------------------------------------------------------------------------------------------
// Malformed input: each case returns its own error.

#[test]
fn short_datagrams() {
    assert_eq!(decode(&[]), Err(DecodeError::TooShort { len: 0 }));
    let ok = encode(&example("ok").frame);
    assert_eq!(
        decode(&ok[..HEADER_BYTES - 1]),
        Err(DecodeError::TooShort { len: 23 })
    );
}

#[test]
fn wrong_magic() {
    let bytes = patched(&example("ping").frame, 0, b"MBUT");
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::BadMagic { found: 0x5455_424D })
    );
}

#[test]
fn unknown_version_reports_seen_and_supported() {
    let bytes = patched(&example("hello").frame, 4, &[2]);
    let err = decode(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedVersion {
            seen: 2,
            supported: 1
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("version 2") && text.contains("version 1"),
        "{text}"
    );
    assert_eq!(err.error_code(), ErrorCode::UnsupportedVersion);
    assert!(err.breaks_framing());
}

#[test]
fn unknown_flag_bits() {
    for flags in [0x02, 0x80, 0x03] {
        let bytes = patched(&example("stats_reply").frame, 5, &[flags]);
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownFlags { flags }));
    }
}

#[test]
fn more_flag_only_on_stats_reply() {
    let bytes = patched(&example("ping").frame, 5, &[FLAG_MORE]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::MoreNotAllowed {
            msg_type: MsgType::Ping
        })
    );
}

#[test]
fn reserved_field_not_zero() {
    let bytes = patched(&example("ok").frame, 14, &[0, 1]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::ReservedNotZero { value: 0x0100 })
    );
}

#[test]
fn unknown_message_types() {
    for raw_type in [0x0000, 0x0008, 0x0100, 0x0106, 0x0503, 0xffff] {
        let bytes = raw(raw_type, 0, 0, 9, &[]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnknownType { raw: raw_type })
        );
        // The header is fine, so the request id can still be echoed in the ERROR reply.
        assert_eq!(Header::parse(&bytes).unwrap().request_id, 9);
        assert!(!decode(&bytes).unwrap_err().breaks_framing());
    }
}

#[test]
fn body_len_must_match_the_datagram() {
    let good = encode(&example("ping").frame);
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(
        decode(&longer),
        Err(DecodeError::LengthMismatch {
            body_len: 8,
            actual_body_len: 9
        })
    );
    assert_eq!(
        decode(&good[..good.len() - 1]),
        Err(DecodeError::LengthMismatch {
            body_len: 8,
            actual_body_len: 7
        })
    );
    let claims_more = patched(&example("ping").frame, 8, &100u32.to_le_bytes());
    assert_eq!(
        decode(&claims_more),
        Err(DecodeError::LengthMismatch {
            body_len: 100,
            actual_body_len: 8
        })
    );
}

#[test]
fn datagram_over_the_frame_limit() {
    let bytes = raw(
        MsgType::Publish.to_raw(),
        0,
        0,
        1,
        &vec![0; MAX_FRAME_BYTES - HEADER_BYTES + 1],
    );
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TooLong {
            len: MAX_FRAME_BYTES + 1,
            max: MAX_FRAME_BYTES
        })
    );
}

#[test]
fn trailing_bytes_inside_a_body() {
    let cases: [(MsgType, Vec<u8>, usize); 5] = [
        (MsgType::Ping, vec![0; 9], 1),
        (MsgType::Ok, vec![0], 1),
        (MsgType::StatsRequest, vec![1, 2], 2),
        (MsgType::PublisherReady, vec![0; 10], 2),
        // A string shorter than the bytes that follow it.
        (MsgType::Hello, body_with_string(&[1, 0, 1], 2, b"abc"), 1),
    ];
    for (ty, body, extra) in cases {
        assert_eq!(
            decode(&raw(ty.to_raw(), 0, 0, 1, &body)),
            Err(DecodeError::TrailingBytes {
                msg_type: ty,
                extra
            }),
            "{ty}"
        );
    }
}

#[test]
fn bodies_that_end_inside_a_field() {
    assert_eq!(
        decode(&raw(MsgType::Ping.to_raw(), 0, 0, 1, &[0; 7])),
        Err(DecodeError::Truncated {
            msg_type: MsgType::Ping,
            field: "token",
            needed: 8,
            available: 7
        })
    );
    assert_eq!(
        decode(&raw(MsgType::Deliver.to_raw(), 0, 0, 1, &[0; 39])),
        Err(DecodeError::Truncated {
            msg_type: MsgType::Deliver,
            field: "lost_before",
            needed: 8,
            available: 7
        })
    );
    // A string whose declared length runs past the end of the body.
    let body = body_with_string(&[2, 2], 5, b"abc");
    assert_eq!(
        decode(&raw(MsgType::Subscribe.to_raw(), 0, 0, 1, &body)),
        Err(DecodeError::Truncated {
            msg_type: MsgType::Subscribe,
            field: "topic",
            needed: 5,
            available: 3
        })
    );
    // PUBLISH needs at least its publisher id.
    assert_eq!(
        decode(&raw(MsgType::Publish.to_raw(), 0, 0, 1, &[1, 2, 3])),
        Err(DecodeError::Truncated {
            msg_type: MsgType::Publish,
            field: "publisher_id",
            needed: 8,
            available: 3
        })
    );
}

#[test]
fn strings_must_be_utf8() {
    let body = body_with_string(&[1, 0, 1], 3, b"a\xff\xfe");
    assert_eq!(
        decode(&raw(MsgType::Hello.to_raw(), 0, 0, 1, &body)),
        Err(DecodeError::BadUtf8 {
            field: "client_name",
            valid_up_to: 1
        })
    );
    let body = body_with_string(&[2, 2], 2, b"\xc3\x28");
    assert_eq!(
        decode(&raw(MsgType::Subscribe.to_raw(), 0, 0, 1, &body)),
        Err(DecodeError::BadUtf8 {
            field: "topic",
            valid_up_to: 0
        })
    );
    // A STATS_REPLY chunk is UTF-8 too (the sender splits on character boundaries).
    assert_eq!(
        decode(&raw(
            MsgType::StatsReply.to_raw(),
            FLAG_MORE,
            0,
            1,
            b"{\"a\":\"\xc3"
        )),
        Err(DecodeError::BadUtf8 {
            field: "json",
            valid_up_to: 6
        })
    );
}

#[test]
fn over_long_strings_are_rejected_before_reading_them() {
    // The declared length alone is enough: the bytes need not even be there.
    let body = body_with_string(&[1, 0, 1], (MAX_CLIENT_NAME_BYTES + 1) as u16, b"");
    assert_eq!(
        decode(&raw(MsgType::Hello.to_raw(), 0, 0, 1, &body)),
        Err(DecodeError::StringTooLong {
            field: "client_name",
            len: 65,
            max: MAX_CLIENT_NAME_BYTES
        })
    );
    let body = body_with_string(&[0, 1], u16::MAX, b"");
    assert_eq!(
        decode(&raw(MsgType::Subscribe.to_raw(), 0, 0, 1, &body)),
        Err(DecodeError::StringTooLong {
            field: "topic",
            len: 65535,
            max: MAX_TOPIC_BYTES
        })
    );
}

#[test]
fn invalid_enum_values() {
    let cases: [(&str, usize, u8, &str, u64); 10] = [
        // (example, body offset, byte, field, value)
        ("hello", 2, 0, "transport", 0),
        ("hello", 2, 3, "transport", 3),
        ("subscribe", 0, 3, "mode", 3),
        ("subscribe", 1, 9, "delivery", 9),
        ("create_publisher", 12, 0xff, "mode", 0xff),
        ("ring_granted_writer", 0, 5, "role", 5),
        ("ring_granted_writer", 1, 0, "mode", 0), // "any" is not a topic's mode
        ("subscribed", 16, 3, "mode", 3),
        ("peer_gone", 8, 0, "peer", 0),
        ("peer_gone", 8, 3, "peer", 3),
    ];
    for (name, at, byte, field, value) in cases {
        let bytes = patched(&example(name).frame, HEADER_BYTES + at, &[byte]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::InvalidValue { field, value }),
            "{name}.{field}"
        );
    }
    let u16_cases: [(&str, usize, u16, &str); 5] = [
        ("error", 0, 0, "code"),
        ("error", 0, 18, "code"),
        ("shutdown", 0, 0, "reason"),
        ("peer_gone", 17, 5, "reason"),
        ("evicted", 16, 0, "reason"),
    ];
    for (name, at, raw_value, field) in u16_cases {
        let bytes = patched(
            &example(name).frame,
            HEADER_BYTES + at,
            &raw_value.to_le_bytes(),
        );
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::InvalidValue {
                field,
                value: raw_value.into()
            }),
            "{name}.{field}"
        );
    }
}

#[test]
fn ring_and_cursor_rules() {
    // Publisher slot must be < 64.
    let bytes = patched(
        &example("ring_granted_writer").frame,
        HEADER_BYTES + 2,
        &64u16.to_le_bytes(),
    );
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::InvalidValue {
            field: "slot",
            value: 64
        })
    );
    let bytes = patched(
        &example("cursor_granted").frame,
        HEADER_BYTES + 24,
        &0xffffu16.to_le_bytes(),
    );
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::InvalidValue {
            field: "slot",
            value: 0xffff
        })
    );
    // A writer's RING_GRANTED names no subscriber.
    let bytes = patched(
        &example("ring_granted_writer").frame,
        HEADER_BYTES + 24,
        &[7],
    );
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::InvalidValue {
            field: "subscriber_id",
            value: 7
        })
    );
}

#[test]
fn fd_count_over_the_limit() {
    let too_many = (MAX_FDS_PER_FRAME + 1) as u16;
    let bytes = patched(&example("ok").frame, 12, &too_many.to_le_bytes());
    let err = decode(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooManyFds {
            fd_count: too_many,
            max: MAX_FDS_PER_FRAME
        }
    );
    assert_eq!(err.error_code(), ErrorCode::BadFds);
    assert!(err.breaks_framing());
}

#[test]
fn fd_count_must_be_what_the_type_carries() {
    let bytes = patched(&example("ping").frame, 12, &[1, 0]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::FdCountMismatch {
            msg_type: MsgType::Ping,
            fd_count: 1,
            expected: 0
        })
    );
    let bytes = patched(&example("ring_granted_writer").frame, 12, &[0, 0]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::FdCountMismatch {
            msg_type: MsgType::RingGranted,
            fd_count: 0,
            expected: 1
        })
    );
    let bytes = patched(&example("cursor_granted").frame, 12, &[1, 0]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::FdCountMismatch {
            msg_type: MsgType::CursorGranted,
            fd_count: 1,
            expected: 2
        })
    );
    // SUBSCRIBED: 2 fds for shm delivery, none for datagram.
    let bytes = patched(&example("subscribed").frame, 12, &[2, 0]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::FdCountMismatch {
            msg_type: MsgType::Subscribed,
            fd_count: 2,
            expected: 0
        })
    );
    let err = decode(&bytes).unwrap_err();
    assert_eq!(err.error_code(), ErrorCode::BadFds);
    assert!(!err.breaks_framing());
}

#[test]
fn header_errors_break_framing_and_body_errors_do_not() {
    let ping = example("ping").frame;
    let framing = [
        decode(&[0; 3]).unwrap_err(),
        decode(&patched(&ping, 0, b"XXXX")).unwrap_err(),
        decode(&patched(&ping, 4, &[9])).unwrap_err(),
        decode(&patched(&ping, 5, &[4])).unwrap_err(),
        decode(&patched(&ping, 8, &[9])).unwrap_err(),
        decode(&patched(&ping, 14, &[1])).unwrap_err(),
    ];
    assert!(
        framing.iter().all(DecodeError::breaks_framing),
        "{framing:?}"
    );
    let body = [
        decode(&raw(0x7777, 0, 0, 1, &[])).unwrap_err(),
        decode(&raw(MsgType::Ping.to_raw(), 0, 0, 1, &[0; 3])).unwrap_err(),
        decode(&raw(MsgType::Ok.to_raw(), 0, 0, 1, &[0; 3])).unwrap_err(),
    ];
    assert!(!body.iter().any(DecodeError::breaks_framing), "{body:?}");
    assert!(body.iter().all(|e| e.error_code() == ErrorCode::BadFrame));
}

// ---------------------------------------------------------------------------------------------
// Property tests

/// Raw material for one frame of any type; [`build`] turns it into a valid frame.
#[derive(Clone, Debug)]
struct Parts {
    kind: usize,
    request_id: u64,
    n: [u64; 8],
    text: String,
    payload: Vec<u8>,
    more: bool,
}

fn parts() -> impl Strategy<Value = Parts> {
    (
        0..MsgType::ALL.len() + 2,
        any::<u64>(),
        any::<[u64; 8]>(),
        ".{0,300}",
        proptest::collection::vec(any::<u8>(), 0..512),
        any::<bool>(),
    )
        .prop_map(|(kind, request_id, n, text, payload, more)| Parts {
            kind,
            request_id,
            n,
            text,
            payload,
            more,
        })
}

fn cut(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

fn pick<T: Copy>(all: &[T], n: u64) -> T {
    all[(n % all.len() as u64) as usize]
}

/// A valid frame of type `p.kind` from arbitrary parts.
fn build(p: &Parts) -> Frame<'_> {
    let n = p.n;
    let mode = pick(&[Mode::Reliable, Mode::Lossy], n[7]);
    let msg = match p.kind {
        0 => Msg::Hello(Hello {
            protocol_version: n[0] as u16,
            transport: pick(Transport::ALL, n[1]),
            client_name: cut(&p.text, MAX_CLIENT_NAME_BYTES),
        }),
        1 => Msg::Welcome(Welcome {
            protocol_version: n[0] as u16,
            client_id: n[1],
            max_frame_bytes: n[2] as u32,
            max_datagram_message_bytes: n[3] as u32,
            default_ring_bytes: n[4],
            max_ring_bytes: n[5],
            max_topic_bytes: n[6] as u16,
            broker_version: cut(&p.text, MAX_BROKER_VERSION_BYTES),
        }),
        2 => Msg::Error(ErrorReply {
            code: pick(ErrorCode::ALL, n[0]),
            message: cut(&p.text, MAX_ERROR_MESSAGE_BYTES),
        }),
        3 => Msg::Ok,
        4 => Msg::Ping { token: n[0] },
        5 => Msg::Pong { token: n[0] },
        6 => Msg::Shutdown(Shutdown {
            reason: pick(ShutdownReason::ALL, n[0]),
            message: cut(&p.text, MAX_ERROR_MESSAGE_BYTES),
        }),
        7 => Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: n[0],
            max_message_bytes: n[1] as u32,
            mode: pick(ModeRequest::ALL, n[2]),
            transport: pick(Transport::ALL, n[3]),
            topic: cut(&p.text, MAX_TOPIC_BYTES),
        }),
        8 | 22 | 23 => {
            let role = pick(RingRole::ALL, n[0] ^ p.kind as u64);
            Msg::RingGranted(RingGranted {
                role,
                mode,
                slot: (n[1] % 64) as u16,
                max_message_bytes: n[2] as u32,
                topic_id: n[3],
                publisher_id: n[4],
                subscriber_id: if role == RingRole::Reader { n[5] } else { 0 },
                data_bytes: n[6],
            })
        }
        9 => Msg::PublisherReady { publisher_id: n[0] },
        10 => Msg::ClosePublisher { publisher_id: n[0] },
        11 => Msg::CursorGranted(CursorGranted {
            topic_id: n[0],
            publisher_id: n[1],
            subscriber_id: n[2],
            slot: (n[3] % 64) as u16,
        }),
        12 => Msg::Subscribe(Subscribe {
            mode: pick(ModeRequest::ALL, n[0]),
            delivery: pick(Transport::ALL, n[1]),
            topic: cut(&p.text, MAX_TOPIC_BYTES),
        }),
        13 => Msg::Subscribed(Subscribed {
            subscriber_id: n[0],
            topic_id: n[1],
            mode,
            delivery: pick(Transport::ALL, n[2]),
        }),
        14 => Msg::SubscriberReady {
            subscriber_id: n[0],
        },
        15 => Msg::Unsubscribe {
            subscriber_id: n[0],
        },
        16 => Msg::PeerGone(PeerGone {
            topic_id: n[0],
            peer: pick(PeerKind::ALL, n[1]),
            peer_id: n[2],
            reason: pick(PeerGoneReason::ALL, n[3]),
        }),
        17 => Msg::Evicted(Evicted {
            topic_id: n[0],
            subscriber_id: n[1],
            reason: pick(EvictReason::ALL, n[2]),
            message: cut(&p.text, MAX_ERROR_MESSAGE_BYTES),
        }),
        18 => Msg::Publish(Publish {
            publisher_id: n[0],
            payload: &p.payload,
        }),
        19 => Msg::Deliver(Deliver {
            subscriber_id: n[0],
            publisher_id: n[1],
            seq: n[2],
            timestamp_ns: n[3],
            lost_before: n[4],
            payload: &p.payload,
        }),
        20 => Msg::StatsRequest,
        _ => Msg::StatsReply(StatsReply {
            more: p.more,
            json: &p.text,
        }),
    };
    Frame::new(p.request_id, msg)
}

/// Decoding must not panic; when it succeeds, encoding gives back the same bytes (the encoding
/// is canonical: there is exactly one byte string per frame).
fn decode_is_total_and_canonical(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(frame) = decode(bytes) {
        let mut again = Vec::new();
        frame
            .encode(&mut again)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(hex(&again), hex(bytes));
        prop_assert_eq!(
            usize::from(Header::parse(bytes).unwrap().fd_count),
            frame.fd_count()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn generated_frames_round_trip(p in parts()) {
        let frame = build(&p);
        let bytes = encode(&frame);
        prop_assert_eq!(frame.encoded_len(), Ok(bytes.len()));
        prop_assert_eq!(decode(&bytes), Ok(frame));
        prop_assert_eq!(usize::from(Header::parse(&bytes).unwrap().fd_count), frame.fd_count());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        decode_is_total_and_canonical(&bytes)?;
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        ty in prop_oneof![
            proptest::sample::select(MsgType::ALL).prop_map(MsgType::to_raw),
            any::<u16>(),
        ],
        flags in 0u8..2,
        fd_count in 0u16..3,
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        decode_is_total_and_canonical(&raw(ty, flags, fd_count, 1, &body))?;
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        p in parts(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut_at in proptest::option::of(any::<prop::sample::Index>()),
        extra in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut bytes = encode(&build(&p));
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Some(at) = cut_at {
            bytes.truncate(at.index(bytes.len() + 1));
        }
        bytes.extend_from_slice(&extra);
        decode_is_total_and_canonical(&bytes)?;
    }
}
