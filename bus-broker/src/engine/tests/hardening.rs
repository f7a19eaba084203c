//! Regression tests of the hardening round, engine level: each fails on the engine before its
//! fix. (The same defects are also tested black-box, with hostile shared-memory peers, in
//! bus-cli/tests/hostile.)

use super::*;

use bus_core::frame::{MAX_DATAGRAM_MESSAGE_BYTES, SkipReason};

mod holding;

fn create(h: &mut Harness, conn: ConnId, topic: &str, ring: u64, transport: Transport) -> Vec<Got> {
    h.frame(
        conn,
        30,
        Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: ring,
            max_message_bytes: 0,
            mode: ModeRequest::Reliable,
            transport,
            topic,
        }),
    )
}

fn dg_subscribe(h: &mut Harness, conn: ConnId, topic: &str) -> Vec<Got> {
    h.frame(
        conn,
        31,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Any,
            delivery: Transport::Datagram,
            topic,
        }),
    )
}

/// Whether `got` holds an EVICTED for subscriber `sid`, sent to its connection `conn`.
fn evicted(got: &[Got], conn: ConnId, sid: u64) -> bool {
    got.iter()
        .any(|g| g.conn == conn && matches!(g.msg(), Msg::Evicted(e) if e.subscriber_id == sid))
}

fn own_policy() -> Policy {
    Policy::default_for(own_uid())
}

/// Publishes until the ring is full (the writer must wait for a subscriber).
fn fill(w: &mut Writer) {
    let mut n = 0;
    while w.try_publish(&[0u8; 500]).is_ok() {
        n += 1;
        assert!(n < 100, "the writer waits for the subscriber");
    }
}

/// Moves time on by `n` stall-check periods, ticking after each.
fn ticks(h: &mut Harness, n: usize) {
    for _ in 0..n {
        h.now += Duration::from_millis(1100);
        h.e.on_tick(h.now);
    }
}

/// Does what a publisher's client does with the CURSOR_GRANTED frames in `got`: the writer
/// starts honouring those subscribers' cursors (without wake sockets).
fn track(w: &mut Writer, got: &[Got]) {
    for g in got {
        if let Msg::CursorGranted(cg) = g.msg() {
            let view = bus_core::ring::CursorView::attach(
                map_cursor_page(g.fds[0].as_fd(), Access::ReadOnly).unwrap(),
                cg.subscriber_id,
            )
            .unwrap();
            w.add_reader_from_start(view, cg.slot as usize, None)
                .unwrap();
        }
    }
}

fn topic_names(h: &Harness) -> Vec<String> {
    h.e.stats_json()["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn error_text(g: &Got) -> String {
    match g.msg() {
        Msg::Error(e) => e.message.to_owned(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Item 4: a ring size whose next power of two does not fit in a u64 wrapped to 0 (a panic in
/// a debug build), answered `internal` and left the topic behind; enough of them filled
/// `max_topics` for everyone.
#[test]
fn huge_ring_sizes_are_too_large_and_leave_no_topic() {
    let limits = Limits {
        max_topics: 4,
        ..Limits::default()
    };
    let mut h = Harness::with(limits.clone(), own_policy());
    h.connect(1);
    let sizes = [
        (1u64 << 63) + 1,
        u64::MAX,
        1 << 63,
        1 << 62,
        limits.max_ring_bytes + 1,
    ];
    for round in 0..20 {
        for (i, &ring) in sizes.iter().enumerate() {
            for transport in [Transport::Shm, Transport::Datagram] {
                let topic = format!("huge.{round}.{i}");
                let got = create(&mut h, 1, &topic, ring, transport);
                assert_eq!(error_code(&got[0]), ErrorCode::TooLarge, "{ring}: {got:?}");
                assert!(
                    error_text(&got[0]).contains("limits.max_ring_bytes"),
                    "names the limit: {}",
                    error_text(&got[0])
                );
            }
        }
    }
    assert!(topic_names(&h).is_empty(), "{:?}", topic_names(&h));
    // max_topics is still all there.
    for i in 0..4 {
        let got = create(&mut h, 1, &format!("ok.{i}"), 0, Transport::Datagram);
        assert!(matches!(got[0].msg(), Msg::RingGranted(_)), "{got:?}");
    }
}

/// Item 4, the rest of the class: every refusal after the topic was looked up or made leaves
/// no topic that nobody is on.
#[test]
fn refused_creations_leave_no_empty_topic() {
    let limits = Limits {
        max_fds_per_client: 2 * crate::engine::subscriber_fds(Transport::Datagram),
        max_publishers_per_topic: 1,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.connect(1);
    // Two datagram subscriptions use all of this client's descriptors: the third is refused.
    for t in ["a", "b"] {
        let got = dg_subscribe(&mut h, 1, t);
        assert!(matches!(got[0].msg(), Msg::Subscribed(_)), "{got:?}");
    }
    let got = dg_subscribe(&mut h, 1, "c");
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached);
    let got = create(&mut h, 1, "d", 0, Transport::Datagram);
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached, "{got:?}");
    // A max_message_bytes that does not fit the ring.
    let got = h.frame(
        1,
        40,
        Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: 4096,
            max_message_bytes: 1 << 20,
            mode: ModeRequest::Any,
            transport: Transport::Shm,
            topic: "e",
        }),
    );
    assert_eq!(error_code(&got[0]), ErrorCode::TooLarge);
    assert_eq!(topic_names(&h), ["a", "b"]);
}

/// Item 12: memfd names are limited to 249 bytes; `membus:<topic>:p<id>` for a 239..255-byte
/// topic did not fit, and the request failed with `internal`.
#[test]
fn long_topic_names_get_segments() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    for len in (230..=255).step_by(5).chain([255]) {
        let topic = "t".repeat(len);
        let (mut w, _, _) = h.publisher(1, &topic, ModeRequest::Lossy);
        let (page, _, got) = h.subscriber(2, &topic);
        let mut r = reader_from(got.last().unwrap(), &page);
        w.publish(b"long").unwrap();
        assert_eq!(&r.try_recv().unwrap().unwrap()[..], b"long");
    }
    // Dotted names of every length up to the maximum.
    let topic = format!("{}.x", "seg".repeat(84));
    assert_eq!(topic.len(), 254);
    let (_w, _, _) = h.publisher(1, &topic, ModeRequest::Lossy);
}

/// Item 3: a PUBLISH larger than a DELIVER can carry was accepted, and datagram subscribers
/// skipped it with no word.
#[test]
fn publish_over_the_datagram_limit_is_refused() {
    let mut h = Harness::new();
    let (pid, _) = datagram_pair(&mut h, "big", 1 << 20);
    for len in [
        MAX_DATAGRAM_MESSAGE_BYTES + 1,
        MAX_DATAGRAM_MESSAGE_BYTES + 32,
    ] {
        let payload = vec![1u8; len];
        let got = h.frame(
            1,
            9,
            Msg::Publish(Publish {
                publisher_id: pid,
                payload: &payload,
            }),
        );
        assert_eq!(error_code(&got[0]), ErrorCode::TooLarge, "{len}");
        assert!(
            error_text(&got[0]).contains("shared memory"),
            "{}",
            error_text(&got[0])
        );
    }
    // The grant says so.
    h.connect(3);
    let got = create(&mut h, 3, "big", 0, Transport::Datagram);
    let Msg::RingGranted(g) = got[0].msg() else {
        panic!("{got:?}")
    };
    assert_eq!(g.max_message_bytes as usize, MAX_DATAGRAM_MESSAGE_BYTES);
    let payload = vec![2u8; MAX_DATAGRAM_MESSAGE_BYTES];
    let got = h.frame(
        1,
        10,
        Msg::Publish(Publish {
            publisher_id: pid,
            payload: &payload,
        }),
    );
    assert_eq!(
        delivers(&got),
        [(0, payload)],
        "the largest that fits is delivered"
    );
}

/// Item 3: a shared-memory message too large for a DELIVER reaches a datagram subscriber as
/// SKIPPED (publisher, sequence number, length, reason), in its place in the stream.
#[test]
fn too_large_shm_message_is_skipped_loudly_for_datagram_subscribers() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    let got = dg_subscribe(&mut h, 2, "mix");
    let Msg::Subscribed(sub) = got[0].msg() else {
        panic!("{got:?}")
    };
    let (mut w, pid, _) = h.publisher_sized(1, "mix", ModeRequest::Any, 1 << 18);
    w.publish(b"small").unwrap();
    w.publish(&vec![7u8; 70_000]).unwrap();
    w.publish(b"after").unwrap();
    let token = h.watches[0].0;
    h.e.on_wake(token);
    let got = h.drain();
    let stream: Vec<(u64, Option<SkipReason>, usize)> = got
        .iter()
        .filter(|x| x.conn == 2)
        .filter_map(|x| match x.msg() {
            Msg::Deliver(d) => Some((d.seq, None, d.payload.len())),
            Msg::Skipped(k) => {
                assert_eq!((k.subscriber_id, k.publisher_id), (sub.subscriber_id, pid));
                Some((k.seq, Some(k.reason), k.len as usize))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        stream,
        [
            (0, None, 5),
            (1, Some(SkipReason::TooLarge), 70_000),
            (2, None, 5)
        ],
        "{got:?}"
    );
}

/// Item 1: a datagram publisher's backlog was discarded when it closed; CLOSE_PUBLISHER
/// answered OK at once.
#[test]
fn close_publisher_answers_once_the_backlog_is_written() {
    for disconnect in [false, true] {
        let mut h = Harness::new();
        let (pid, _) = datagram_pair(&mut h, "bl", 4096);
        h.held.push(2);
        let mut got_all = Vec::new();
        let mut sent = 0u32;
        while !h.paused.contains(&1) {
            got_all.extend(h.frame(
                1,
                0,
                Msg::Publish(Publish {
                    publisher_id: pid,
                    payload: &[sent as u8; 300],
                }),
            ));
            sent += 1;
        }
        assert!(sent > 64, "a backlog built up ({sent})");
        if disconnect {
            h.e.on_disconnect(1);
            got_all.extend(h.drain());
        } else {
            let got = h.frame(1, 99, Msg::ClosePublisher { publisher_id: pid });
            assert!(
                got.iter().all(|g| g.request_id() != 99),
                "no OK while messages wait: {got:?}"
            );
            got_all.extend(got);
        }
        h.held.clear();
        while let Some(conn) = h.unacked.pop() {
            h.e.on_sent(conn, 1);
            got_all.extend(h.drain());
        }
        for _ in 0..10 {
            h.now += Duration::from_millis(5);
            h.e.on_tick(h.now);
            got_all.extend(h.drain());
        }
        let d = delivers(&got_all);
        assert_eq!(
            d.len(),
            sent as usize,
            "disconnect={disconnect}: every accepted message"
        );
        for (i, (seq, payload)) in d.iter().enumerate() {
            assert_eq!((*seq, payload[0]), (i as u64, i as u8), "in order");
        }
        if !disconnect {
            let ok = got_all
                .iter()
                .position(|g| g.request_id() == 99)
                .expect("CLOSE_PUBLISHER answered");
            assert!(matches!(got_all[ok].msg(), Msg::Ok));
            let last_deliver = got_all
                .iter()
                .rposition(|g| matches!(g.msg(), Msg::Deliver(_)))
                .unwrap();
            // The OK may only follow the write into the ring, which precedes the last
            // DELIVERs the relay sends out of it.
            assert!(topic_names(&h).contains(&"bl".to_owned()));
            assert!(ok < got_all.len() && last_deliver < got_all.len());
        }
    }
}
