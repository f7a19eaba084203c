//! Hardening regressions about what a client holds: publisher slots of departed publishers,
//! released rings, the stall check, descriptor quotas, and clients that stop reading.

use super::*;

/// Item 2: a reliable publisher's slot was reused at once when it left, while a subscriber
/// still read the old ring with the cursor of that slot: the new writer took that cursor for
/// its own (lapping the subscriber), and the old reader's exit reset the new one's.
#[test]
fn slot_of_a_departed_reliable_publisher_waits_for_its_readers() {
    let limits = Limits {
        max_publishers_per_topic: 1,
        stall_timeout_ms: 100,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.connect(1);
    h.connect(2);
    let (page, sid, _) = h.subscriber(2, "slots");
    let (mut w, p1, got) = h.publisher(1, "slots", ModeRequest::Reliable);
    let grant = got.iter().find(|g| g.conn == 2).unwrap();
    let mut r = reader_from(grant, &page);
    w.publish(b"left behind").unwrap();
    h.frame(1, 12, Msg::ClosePublisher { publisher_id: p1 });
    // The subscriber has not read the old ring yet: the slot is not free.
    let got = create(&mut h, 1, "slots", 0, Transport::Shm);
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached);
    assert!(
        error_text(&got[0]).contains("left"),
        "{}",
        error_text(&got[0])
    );
    // It reads and lets go of the ring: the slot is free.
    assert_eq!(&r.try_recv().unwrap().unwrap()[..], b"left behind");
    drop(r);
    h.frame(
        2,
        13,
        Msg::RingReleased {
            subscriber_id: sid,
            publisher_id: p1,
        },
    );
    let (_w2, _p2, got) = h.publisher(1, "slots", ModeRequest::Reliable);
    assert!(
        got.iter()
            .any(|g| g.conn == 2 && matches!(g.msg(), Msg::RingGranted(_)))
    );

    // A subscriber that never lets go holds the slot at most the stall limit, then is
    // evicted when a publisher needs the slot.
    h.connect(3);
    let (page3, sid3, _) = h.subscriber(3, "hold");
    let (_w3, p3, got) = h.publisher(1, "hold", ModeRequest::Reliable);
    let _r3 = reader_from(got.iter().find(|g| g.conn == 3).unwrap(), &page3);
    h.frame(1, 14, Msg::ClosePublisher { publisher_id: p3 });
    let got = create(&mut h, 1, "hold", 0, Transport::Shm);
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached);
    h.now += Duration::from_millis(150);
    h.e.on_tick(h.now);
    let got = create(&mut h, 1, "hold", 0, Transport::Shm);
    assert!(evicted(&got, 3, sid3), "{got:?}");
    assert!(
        got.iter().any(|g| matches!(g.msg(), Msg::RingGranted(_))),
        "{got:?}"
    );
}

/// Lossy writers never read cursors: their slots are free at once.
#[test]
fn lossy_slots_are_free_at_once() {
    let limits = Limits {
        max_publishers_per_topic: 1,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.connect(1);
    h.connect(2);
    let (_w, p1, _) = h.publisher(1, "feed", ModeRequest::Lossy);
    let (page, _sid, got) = h.subscriber(2, "feed");
    let _r = reader_from(
        got.iter()
            .find(|g| g.conn == 2 && matches!(g.msg(), Msg::RingGranted(_)))
            .unwrap(),
        &page,
    );
    h.frame(1, 12, Msg::ClosePublisher { publisher_id: p1 });
    let (_w2, _, _) = h.publisher(1, "feed", ModeRequest::Lossy);
}

/// A subscriber that released a live publisher's ring (it found it corrupt) is no longer
/// waited for or judged on it: the publisher is told it left, and no eviction follows.
#[test]
fn released_ring_is_not_judged() {
    let limits = Limits {
        stall_timeout_ms: 100,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.connect(1);
    h.connect(2);
    let (page, sid, _) = h.subscriber(2, "rel");
    let (mut w, pid, got) = h.publisher(1, "rel", ModeRequest::Reliable);
    track(&mut w, &got);
    let _r = reader_from(got.iter().find(|g| g.conn == 2).unwrap(), &page);
    fill(&mut w);
    let got = h.frame(
        2,
        15,
        Msg::RingReleased {
            subscriber_id: sid,
            publisher_id: pid,
        },
    );
    assert!(
        got.iter()
            .any(|g| g.conn == 1 && matches!(g.msg(), Msg::PeerGone(p) if p.peer_id == sid)),
        "{got:?}"
    );
    ticks(&mut h, 5);
    let got = h.drain();
    assert!(
        !got.iter().any(|g| matches!(g.msg(), Msg::Evicted(_))),
        "{got:?}"
    );
    assert!(h.wakes.is_empty());
}

/// Items 9 and 10: before judging a subscriber that holds a writer back, the broker wakes it
/// once (a parked honest subscriber whose publisher never woke it then reads); one that reads
/// then is not evicted, one that does not is.
#[test]
fn stall_check_wakes_before_it_judges() {
    let limits = Limits {
        stall_timeout_ms: 100,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.connect(1);
    h.connect(2);
    let (page, sid, _) = h.subscriber(2, "nudge");
    let (mut w, _pid, got) = h.publisher(1, "nudge", ModeRequest::Reliable);
    track(&mut w, &got);
    let mut r = reader_from(got.iter().find(|g| g.conn == 2).unwrap(), &page);
    fill(&mut w);
    ticks(&mut h, 1);
    h.drain();
    assert_eq!(h.wakes.len(), 1, "woken once before being judged");
    // Woken, it reads everything: progress, no eviction.
    while r.try_recv().unwrap().is_some() {}
    fill(&mut w);
    ticks(&mut h, 2);
    let got = h.drain();
    assert!(
        !got.iter().any(|g| matches!(g.msg(), Msg::Evicted(_))),
        "{got:?}"
    );
    // Now it stops reading for good: woken again, then evicted.
    ticks(&mut h, 3);
    let got = h.drain();
    assert_eq!(h.wakes.len(), 2);
    assert!(evicted(&got, 2, sid), "{got:?}");
}

/// Item 5: every datagram subscription cost the broker 4 descriptors with no bound; one
/// client exhausted RLIMIT_NOFILE and nobody else could connect. Now each client has a quota,
/// the broker a budget, both answered with `limit-reached` naming the limit, and the
/// descriptors come back when the client goes.
#[test]
fn descriptor_quota_and_budget() {
    // A datagram subscriber costs the broker its cursor page and both wake socket ends.
    let per32 = crate::engine::subscriber_fds(Transport::Datagram);
    assert_eq!(per32, 3);
    let per = u64::from(per32);
    let limits = Limits {
        max_fds_per_client: 4 * per32,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.e.set_fd_budget(7 * per);
    h.connect(1);
    h.connect(2);
    for i in 0..4 {
        let got = dg_subscribe(&mut h, 1, &format!("q{i}"));
        assert!(matches!(got[0].msg(), Msg::Subscribed(_)), "{got:?}");
    }
    assert_eq!(h.e.fds_in_use(), 4 * per);
    let got = dg_subscribe(&mut h, 1, "q4");
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached);
    assert!(
        error_text(&got[0]).contains("limits.max_fds_per_client"),
        "{}",
        error_text(&got[0])
    );
    // The other client is served until the broker's budget is used up.
    for i in 0..3 {
        let got = dg_subscribe(&mut h, 2, &format!("r{i}"));
        assert!(matches!(got[0].msg(), Msg::Subscribed(_)), "{got:?}");
    }
    let got = dg_subscribe(&mut h, 2, "r3");
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached);
    assert!(
        error_text(&got[0]).contains("RLIMIT_NOFILE"),
        "{}",
        error_text(&got[0])
    );
    h.e.on_disconnect(1);
    h.drain();
    assert_eq!(h.e.fds_in_use(), 3 * per, "the hog's descriptors are back");
    let got = dg_subscribe(&mut h, 2, "r3");
    assert!(matches!(got[0].msg(), Msg::Subscribed(_)), "{got:?}");
    // A datagram publisher's relay wakes shared-memory subscribers through `Out::Wake` on the
    // broker's own copy of their wake socket: subscribers joining cost the publisher's client nothing (it
    // used to be charged a descriptor per subscriber, so a few subscribers locked datagram
    // publishers out of a topic).
    h.e.on_disconnect(2);
    h.drain();
    assert_eq!(h.e.fds_in_use(), 0);
    h.e.set_fd_budget(1000);
    h.connect(3);
    let got = create(&mut h, 3, "relay", 0, Transport::Datagram);
    assert!(matches!(got[0].msg(), Msg::RingGranted(_)), "{got:?}");
    for conn in 10..30 {
        h.connect(conn);
        let _ = h.subscriber(conn, "relay");
    }
    assert_eq!(h.e.fds_in_use(), 1 + 20 * 2);
    for i in 0..3 {
        let got = dg_subscribe(&mut h, 3, &format!("own{i}"));
        assert!(matches!(got[0].msg(), Msg::Subscribed(_)), "{got:?}");
    }
    h.connect(4);
    let got = create(&mut h, 4, "relay", 0, Transport::Datagram);
    assert!(
        matches!(got[0].msg(), Msg::RingGranted(_)),
        "a second relay: {got:?}"
    );
    for conn in (3..5).chain(10..30) {
        h.e.on_disconnect(conn);
    }
    h.drain();
    assert_eq!(h.e.fds_in_use(), 0);
}

/// Found by review: a RING_RELEASED sent before the pair was introduced (subscriber or
/// publisher still pending) excused the subscriber from judgement on a ring whose writer was
/// then told to honour its cursor: the publisher was blocked for good.
#[test]
fn release_before_the_pair_is_introduced_is_ignored() {
    for pending in ["subscriber", "publisher"] {
        let limits = Limits {
            stall_timeout_ms: 100,
            ..Limits::default()
        };
        let mut h = Harness::with(limits, own_policy());
        h.connect(1);
        h.connect(2);
        let (mut w, page, sid, got) = if pending == "subscriber" {
            let (w, pid, _) = h.publisher(1, "early", ModeRequest::Reliable);
            let got = h.frame(
                2,
                40,
                Msg::Subscribe(Subscribe {
                    mode: ModeRequest::Any,
                    delivery: Transport::Shm,
                    topic: "early",
                }),
            );
            let Msg::Subscribed(sub) = got[0].msg() else {
                panic!("{got:?}")
            };
            let page = CursorPage::init(
                map_cursor_page(got[0].fds[0].as_fd(), Access::ReadWrite).unwrap(),
                sub.subscriber_id,
            )
            .unwrap();
            h.frame(
                2,
                41,
                Msg::RingReleased {
                    subscriber_id: sub.subscriber_id,
                    publisher_id: pid,
                },
            );
            let got = h.frame(
                2,
                42,
                Msg::SubscriberReady {
                    subscriber_id: sub.subscriber_id,
                },
            );
            (w, Arc::new(page), sub.subscriber_id, got)
        } else {
            let (page, sid, _) = h.subscriber(2, "early");
            let got = create(&mut h, 1, "early", 8192, Transport::Shm);
            let Msg::RingGranted(g) = got[0].msg() else {
                panic!("{got:?}")
            };
            let w = writer_from(&got[0].fds[0], &g);
            h.frame(
                2,
                41,
                Msg::RingReleased {
                    subscriber_id: sid,
                    publisher_id: g.publisher_id,
                },
            );
            let got = h.frame(
                1,
                42,
                Msg::PublisherReady {
                    publisher_id: g.publisher_id,
                },
            );
            (w, page, sid, got)
        };
        track(&mut w, &got);
        let grant = got
            .iter()
            .find(|g| g.conn == 2 && matches!(g.msg(), Msg::RingGranted(_)))
            .expect("the subscriber gets the ring");
        let _r = reader_from(grant, &page);
        fill(&mut w);
        ticks(&mut h, 3);
        let got = h.drain();
        assert!(
            evicted(&got, 2, sid),
            "{pending} pending: the staller is judged: {got:?}"
        );
    }
}

/// Found by review: a subscriber still draining a departed publisher's ring was evicted from
/// its slot after the stall limit although it kept reading. Only a holder that made no
/// progress for the whole limit loses the slot; one that read to the end and let go of the
/// ring frees it (even without RING_RELEASED).
#[test]
fn draining_holder_that_progresses_keeps_its_slot() {
    let limits = Limits {
        max_publishers_per_topic: 1,
        stall_timeout_ms: 100,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    h.connect(1);
    h.connect(2);
    let (page, sid, _) = h.subscriber(2, "drain");
    let (mut w, pid, got) = h.publisher(1, "drain", ModeRequest::Reliable);
    track(&mut w, &got);
    let mut r = reader_from(got.iter().find(|g| g.conn == 2).unwrap(), &page);
    for i in 0..10u8 {
        w.publish(&[i; 100]).unwrap();
    }
    h.frame(1, 12, Msg::ClosePublisher { publisher_id: pid });
    for i in 0..10u8 {
        h.now += Duration::from_millis(60);
        let got = create(&mut h, 1, "drain", 0, Transport::Shm);
        assert_eq!(error_code(&got[0]), ErrorCode::LimitReached, "at {i}");
        assert!(
            !got.iter().any(|g| matches!(g.msg(), Msg::Evicted(_))),
            "a reading holder is not evicted (at {i}): {got:?}"
        );
        assert_eq!(r.try_recv().unwrap().unwrap()[0], i);
    }
    drop(r);
    let got = create(&mut h, 1, "drain", 0, Transport::Shm);
    assert!(matches!(got[0].msg(), Msg::RingGranted(_)), "{got:?}");
    assert!(
        h.e.stats_json()["broker"]["evictions"] == 0,
        "sid {sid} stayed"
    );
}

/// Found by review: a SKIPPED frame that replaced a lapped lossy sample dropped the sample's
/// `lost_before`, so the messages lost before it went unaccounted. SKIPPED carries it.
#[test]
fn skipped_carries_what_was_lost_before_it() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    let (mut w, pid, _) = h.publisher_sized(1, "lap", ModeRequest::Lossy, 1 << 18);
    let got = dg_subscribe(&mut h, 2, "lap");
    assert!(matches!(got[0].msg(), Msg::Subscribed(_)), "{got:?}");
    w.publish(b"first").unwrap();
    let token = h.watches[0].0;
    h.e.on_wake(token);
    let got = h.drain();
    assert_eq!(delivers(&got).len(), 1);
    // Lap the relay (it is not woken), then end with a message too large for a DELIVER: the
    // relay resynchronises to it (latest wins).
    let lapped = 3 * (1 << 18) / 1024;
    for _ in 0..lapped {
        w.publish(&[1u8; 1000]).unwrap();
    }
    w.publish(&vec![2u8; 70_000]).unwrap();
    h.e.on_wake(token);
    let got = h.drain();
    let skipped: Vec<_> = got
        .iter()
        .filter_map(|g| match g.msg() {
            Msg::Skipped(k) => Some(k),
            _ => None,
        })
        .collect();
    assert_eq!(skipped.len(), 1, "{got:?}");
    let k = skipped[0];
    assert_eq!(
        (k.publisher_id, k.reason, k.len),
        (pid, SkipReason::TooLarge, 70_000)
    );
    assert_eq!(k.seq, lapped as u64 + 1);
    assert_eq!(
        k.lost_before, lapped as u64,
        "every message between the first and the skipped one is counted as lost"
    );
}

/// Found by the simulation: a topic whose first publisher asked for the default ring size
/// kept its geometry open; a second publisher's size request changed it, and the first ring's
/// readers were then granted the wrong size (their mapping failed). A ring fixes it.
#[test]
fn the_first_ring_fixes_the_topic_geometry() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    let got = create(&mut h, 1, "geo", 0, Transport::Datagram);
    let Msg::RingGranted(first) = got[0].msg() else {
        panic!("{got:?}")
    };
    let got = create(&mut h, 1, "geo", 8192, Transport::Datagram);
    assert_eq!(error_code(&got[0]), ErrorCode::TopicConflict, "{got:?}");
    let (page, _, got) = h.subscriber(2, "geo");
    let grant = got
        .iter()
        .find(|g| matches!(g.msg(), Msg::RingGranted(_)))
        .expect("the first publisher's ring");
    let Msg::RingGranted(g) = grant.msg() else {
        unreachable!()
    };
    assert_eq!(g.data_bytes, first.data_bytes);
    let _reader = reader_from(grant, &page);
}

/// The send queue has one bound, the engine's: a client that keeps sending requests but reads
/// none of its replies is dropped once more than `unsent_limit` frames wait for it (not sooner),
/// its subscribers are told its publisher is gone, and the other clients are served on.
#[test]
fn a_client_that_does_not_read_is_dropped_at_the_unsent_limit() {
    let limits = Limits {
        max_queued_replies: 8,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, own_policy());
    let limit = h.e.unsent_limit();
    assert_eq!(
        limit,
        8 + crate::engine::DELIVER_CREDIT,
        "replies plus one delivery window"
    );
    h.connect(2);
    let (_page, _sid, _) = h.subscriber(2, "deaf");
    h.connect(1);
    let (_w, pid, _) = h.publisher(1, "deaf", ModeRequest::Reliable);
    // Client 1 stops reading its socket and pings on.
    h.held.push(1);
    for token in 0..u64::from(limit) {
        let got = h.frame(1, token + 1, Msg::Ping { token });
        assert!(matches!(got[0].msg(), Msg::Pong { .. }), "{got:?}");
        assert!(h.dropped.is_empty(), "dropped after {token} unread replies");
    }
    let got = h.frame(1, 999, Msg::Ping { token: 999 });
    assert_eq!(h.dropped, vec![1], "dropped past the limit");
    assert!(
        got.iter().all(|g| g.conn != 1),
        "nothing more is queued for a client being dropped: {got:?}"
    );
    assert!(
        got.iter()
            .any(|g| g.conn == 2 && matches!(g.msg(), Msg::PeerGone(p) if p.peer_id == pid)),
        "its subscriber is told: {got:?}"
    );
    assert_eq!(h.e.fds_in_use(), 2, "the dropped client's ring came back");
    let got = h.frame(2, 5, Msg::Ping { token: 5 });
    assert!(matches!(got[0].msg(), Msg::Pong { token: 5 }), "{got:?}");
}
