//! The engine's everyday paths: handshake, publish and subscribe in either order, policy,
//! modes, both transports, eviction, timers, limits and stats.

use super::*;

#[test]
fn frames_before_hello_are_refused_and_hello_is_welcomed() {
    let mut h = Harness::new();
    assert!(h.e.on_connect(1, creds(), h.now));
    let got = h.frame(1, 7, Msg::Ping { token: 3 });
    assert_eq!(error_code(&got[0]), ErrorCode::HandshakeRequired);
    assert_eq!(got[0].request_id(), 7);
    assert_eq!(h.closed, vec![1], "anything before HELLO disconnects");

    h.e.on_connect(2, creds(), h.now);
    let hello = Hello {
        protocol_version: 1,
        transport: Transport::Shm,
        client_name: "x",
    };
    let got = h.frame(2, 8, Msg::Hello(hello));
    assert!(matches!(got[0].msg(), Msg::Welcome(_)));
    let got = h.frame(2, 9, Msg::Ping { token: 3 });
    assert!(matches!(got[0].msg(), Msg::Pong { token: 3 }));
    let got = h.frame(2, 10, Msg::Hello(hello));
    assert_eq!(error_code(&got[0]), ErrorCode::HandshakeRequired);
    assert_eq!(h.closed, vec![1, 2], "a second HELLO disconnects");
}

#[test]
fn wrong_protocol_version_in_hello_is_refused_and_closed() {
    let mut h = Harness::new();
    h.e.on_connect(1, creds(), h.now);
    let got = h.frame(
        1,
        1,
        Msg::Hello(Hello {
            protocol_version: 9,
            transport: Transport::Shm,
            client_name: "",
        }),
    );
    assert_eq!(error_code(&got[0]), ErrorCode::UnsupportedVersion);
    let Msg::Error(e) = got[0].msg() else {
        unreachable!()
    };
    assert!(
        e.message.contains('9') && e.message.contains('1'),
        "{}",
        e.message
    );
    assert_eq!(h.closed, vec![1]);
    assert_eq!(h.e.client_count(), 0);
}

#[test]
fn garbage_gets_bad_frame_and_a_disconnect_of_that_client_only() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    let got = h.raw(1, b"definitely not a frame at all....");
    assert_eq!(error_code(&got[0]), ErrorCode::BadFrame);
    assert_eq!(h.closed, vec![1]);
    let got = h.frame(2, 5, Msg::Ping { token: 1 });
    assert!(
        matches!(got[0].msg(), Msg::Pong { token: 1 }),
        "the other client is served"
    );
}

#[test]
fn fds_attached_to_a_request_are_closed_and_refused() {
    let mut h = Harness::new();
    h.connect(1);
    let (a, b) = rustix::pipe::pipe().unwrap();
    let open_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    // Build an FdBatch holding the pipe ends by sending them over a socketpair.
    let (s1, s2) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let mut buf = Vec::new();
    Frame {
        request_id: 4,
        msg: Msg::Ping { token: 0 },
    }
    .encode(&mut buf)
    .unwrap();
    bus_core::sys::scm::send_frame(s1.as_fd(), &buf, &[a.as_fd(), b.as_fd()]).unwrap();
    drop((a, b));
    let mut fds = FdBatch::new();
    let mut rbuf = vec![0u8; 256];
    let bus_core::sys::scm::Received::Frame { len } =
        bus_core::sys::scm::recv_frame(s2.as_fd(), &mut rbuf, &mut fds).unwrap()
    else {
        panic!("eof")
    };
    assert_eq!(fds.len(), 2);
    h.e.on_frame(1, &rbuf[..len], &mut fds, h.now);
    assert!(fds.is_empty(), "the engine closed every fd that came");
    drop((s1, s2));
    // Other tests run in parallel threads; under nextest each test is its own process.
    if std::env::var_os("NEXTEST").is_some() {
        let open_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert_eq!(
            open_after + 2,
            open_before,
            "pipe ends not leaked, socketpair closed"
        );
    }
    let got = h.drain();
    assert_eq!(error_code(&got[0]), ErrorCode::BadFds);
    assert!(
        h.closed.is_empty(),
        "a bad request does not cost the connection"
    );
}

#[test]
fn shm_publisher_and_subscriber_meet_in_either_order_and_messages_flow() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    h.connect(3);
    // Subscriber first, then publisher.
    let (page2, sid2, got) = h.subscriber(2, "demo.a");
    assert_eq!(got.len(), 1, "no publisher yet: just OK");
    let (mut writer, pid, got) = h.publisher(1, "demo.a", ModeRequest::Reliable);
    // OK to the publisher, CURSOR_GRANTED to the publisher, RING_GRANTED to the subscriber.
    assert_eq!(got.len(), 3, "{got:?}");
    let got = vec![
        got.iter().find(|x| x.request_id() == 11).cloned().unwrap(),
        got.iter()
            .find(|x| matches!(x.msg(), Msg::CursorGranted(_)))
            .cloned()
            .unwrap(),
        got.iter()
            .find(|x| matches!(x.msg(), Msg::RingGranted(_)))
            .cloned()
            .unwrap(),
    ];
    let Msg::CursorGranted(cg) = got[1].msg() else {
        panic!("{got:?}")
    };
    assert_eq!(
        (
            got[1].conn,
            cg.subscriber_id,
            cg.publisher_id,
            got[1].fds.len()
        ),
        (1, sid2, pid, 2)
    );
    assert_eq!(got[2].conn, 2);
    let Msg::RingGranted(g2) = got[2].msg() else {
        panic!("{got:?}")
    };
    assert_eq!(
        g2.role,
        RingRole::ReaderFromStart,
        "the publisher arrived after the subscriber"
    );
    // Published before the subscriber attached: still delivered, since it came after the
    // subscription.
    writer.publish(b"early").unwrap();
    let mut r2 = reader_from(&got[2], &page2);
    assert_eq!(&r2.try_recv().unwrap().unwrap()[..], b"early");
    let view = bus_core::ring::CursorView::attach(
        map_cursor_page(got[1].fds[0].as_fd(), Access::ReadOnly).unwrap(),
        sid2,
    )
    .unwrap();
    writer
        .add_reader(
            view,
            cg.slot as usize,
            Some(bus_core::wake::WakeSender::from_fd(
                rustix::io::fcntl_dupfd_cloexec(&*got[1].fds[1], 0).unwrap(),
            )),
        )
        .unwrap();

    // Publisher first, then a second subscriber.
    let (page3, _sid3, got) = h.subscriber(3, "demo.a");
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(matches!(got[1].msg(), Msg::CursorGranted(_)) && got[1].conn == 1);
    let Msg::RingGranted(g3) = got[2].msg() else {
        panic!("{got:?}")
    };
    assert_eq!(
        g3.role,
        RingRole::Reader,
        "a late subscriber starts at the writer's position"
    );
    let mut r3 = reader_from(&got[2], &page3);

    writer.publish(b"hello both").unwrap();
    for r in [&mut r2, &mut r3] {
        let s = r
            .try_recv()
            .unwrap()
            .expect("message through the broker-made ring");
        assert_eq!(&s[..], b"hello both");
    }

    // The publisher disconnects: both subscribers are told.
    h.e.on_disconnect(1);
    let got = h.drain();
    let gone: Vec<_> = got
        .iter()
        .filter_map(|g| match g.msg() {
            Msg::PeerGone(p) => Some((g.conn, p.peer, p.peer_id, p.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(gone.len(), 2, "{got:?}");
    assert!(gone.iter().all(|&(_, k, id, r)| k == PeerKind::Publisher
        && id == pid
        && r == PeerGoneReason::Disconnected));
}

#[test]
fn policy_denial_names_uid_topic_and_operation() {
    let mut h = Harness::with(
        Limits::default(),
        Policy::default_for(own_uid().wrapping_add(1)),
    );
    h.connect(1);
    let got = h.frame(
        1,
        3,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Any,
            delivery: Transport::Shm,
            topic: "secret.x",
        }),
    );
    assert_eq!(error_code(&got[0]), ErrorCode::NotAllowed);
    let Msg::Error(e) = got[0].msg() else {
        unreachable!()
    };
    assert!(
        e.message.contains("secret.x")
            && e.message.contains("subscribe")
            && e.message.contains(&own_uid().to_string()),
        "{}",
        e.message
    );
}

#[test]
fn conflicting_mode_is_a_clear_error() {
    let mut h = Harness::new();
    h.connect(1);
    let _p = h.publisher(1, "feed", ModeRequest::Lossy);
    let got = h.frame(
        1,
        3,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Reliable,
            delivery: Transport::Shm,
            topic: "feed",
        }),
    );
    assert_eq!(error_code(&got[0]), ErrorCode::TopicConflict);
    let Msg::Error(e) = got[0].msg() else {
        unreachable!()
    };
    assert!(
        e.message.contains("lossy") && e.message.contains("reliable"),
        "{}",
        e.message
    );
}

#[test]
fn datagram_publisher_reaches_shm_subscriber_and_shm_publisher_reaches_datagram_subscriber() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    let (page, _sid, _) = h.subscriber(2, "mixed");
    let got = h.frame(
        1,
        5,
        Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: 0,
            max_message_bytes: 0,
            mode: ModeRequest::Any,
            transport: Transport::Datagram,
            topic: "mixed",
        }),
    );
    let Msg::RingGranted(g) = got[0].msg() else {
        panic!("{got:?}")
    };
    assert_eq!((g.role, got[0].fds.len()), (RingRole::Datagram, 0));
    let grant = got
        .iter()
        .find(|x| x.conn == 2)
        .expect("ring to the subscriber");
    let mut r = reader_from(grant, &page);
    for m in [&b""[..], b"one", &[7u8; 1000]] {
        let got = h.frame(
            1,
            0,
            Msg::Publish(Publish {
                publisher_id: g.publisher_id,
                payload: m,
            }),
        );
        assert!(got.is_empty(), "PUBLISH has no reply: {got:?}");
        let s = r.try_recv().unwrap().unwrap();
        assert_eq!(&s[..], m, "exact message boundaries");
    }

    // Now the other way: a shm publisher and a datagram subscriber.
    h.connect(3);
    h.connect(4);
    let got = h.frame(
        4,
        6,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Any,
            delivery: Transport::Datagram,
            topic: "other",
        }),
    );
    assert!(matches!(got[0].msg(), Msg::Subscribed(s) if s.delivery == Transport::Datagram));
    assert!(got[0].fds.is_empty());
    assert_eq!(h.watches.len(), 1, "the broker watches its wake socket");
    let (mut w, pid, _) = h.publisher(3, "other", ModeRequest::Any);
    // The relay is a reader the publisher must wake: give it the cursor grant like a client.
    for (i, m) in [&b"a"[..], b"", b"xyz"].iter().enumerate() {
        w.publish(m).unwrap();
        let token = h.watches[0].0;
        h.e.on_wake(token);
        let got = h.drain();
        let delivers: Vec<_> = got
            .iter()
            .filter(|g| matches!(g.msg(), Msg::Deliver(_)))
            .collect();
        assert_eq!(delivers.len(), 1, "message {i}: {got:?}");
        let Msg::Deliver(d) = delivers[0].msg() else {
            unreachable!()
        };
        assert_eq!((d.payload, d.publisher_id, d.seq), (*m, pid, i as u64));
    }
}

#[test]
fn stalled_reliable_subscriber_is_evicted_and_publisher_told() {
    let limits = Limits {
        stall_timeout_ms: 100,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, Policy::default_for(own_uid()));
    h.connect(1);
    h.connect(2);
    let (mut w, _pid, _) = h.publisher(1, "slow", ModeRequest::Reliable);
    let (page, sid, got) = h.subscriber(2, "slow");
    let Msg::CursorGranted(cg) = got[1].msg() else {
        panic!("{got:?}")
    };
    let view = bus_core::ring::CursorView::attach(
        map_cursor_page(got[1].fds[0].as_fd(), Access::ReadOnly).unwrap(),
        sid,
    )
    .unwrap();
    w.add_reader(view, cg.slot as usize, None).unwrap();
    let _reader = reader_from(&got[2], &page);
    // Fill the ring: the subscriber never reads.
    while w.try_publish(&[0u8; 500]).is_ok() {}
    assert!(
        h.e.next_deadline().is_some(),
        "reliable topic with both sides: stall checks run"
    );
    for _ in 0..3 {
        h.now += Duration::from_millis(1100);
        h.e.on_tick(h.now);
    }
    let got = h.drain();
    assert!(
        got.iter()
            .any(|g| g.conn == 2 && matches!(g.msg(), Msg::Evicted(e) if e.subscriber_id == sid)),
        "{got:?}"
    );
    assert!(got.iter().any(|g| g.conn == 1 && matches!(g.msg(), Msg::PeerGone(p) if p.peer == PeerKind::Subscriber && p.reason == PeerGoneReason::Evicted)), "{got:?}");
    assert_eq!(h.e.stats_json()["broker"]["evictions"], 1);
}

#[test]
fn idle_broker_sets_no_timer() {
    let mut h = Harness::new();
    assert_eq!(h.e.next_deadline(), None);
    h.e.on_connect(1, creds(), h.now);
    assert!(h.e.next_deadline().is_some(), "handshake deadline");
    h.connect(2);
    h.e.on_disconnect(1);
    assert_eq!(
        h.e.next_deadline(),
        None,
        "connected, handshaken, idle: no wakeups"
    );
}

#[test]
fn handshake_timeout_closes_the_silent_client() {
    let mut h = Harness::new();
    h.e.on_connect(1, creds(), h.now);
    h.now += Duration::from_secs(6);
    h.e.on_tick(h.now);
    let got = h.drain();
    assert_eq!(error_code(&got[0]), ErrorCode::Timeout);
    assert_eq!(h.closed, vec![1]);
}

#[test]
fn client_limit_is_enforced_with_a_message() {
    let limits = Limits {
        max_clients: 1,
        ..Limits::default()
    };
    let mut h = Harness::with(limits, Policy::default_for(own_uid()));
    assert!(h.e.on_connect(1, creds(), h.now));
    assert!(!h.e.on_connect(2, creds(), h.now));
    let got = h.drain();
    assert_eq!(error_code(&got[0]), ErrorCode::LimitReached);
    assert_eq!(h.closed, vec![2]);
}

#[test]
fn stats_describe_topics_publishers_and_subscribers() {
    let mut h = Harness::new();
    h.connect(1);
    h.connect(2);
    let (mut w, _, _) = h.publisher(1, "s.t", ModeRequest::Lossy);
    let _s = h.subscriber(2, "s.t");
    w.publish(b"x").unwrap();
    let doc = h.e.stats_json();
    let t = &doc["topics"][0];
    assert_eq!(t["name"], "s.t");
    assert_eq!(t["mode"], "lossy");
    assert_eq!(t["publishers"][0]["messages"], 1);
    assert_eq!(t["subscribers"][0]["pid"], std::process::id());
    assert_eq!(doc["broker"]["clients"], 2);
    let got = h.frame(2, 77, Msg::StatsRequest);
    let Msg::StatsReply(r) = got.last().unwrap().msg() else {
        panic!()
    };
    assert!(!r.more);
    let _: serde_json::Value = serde_json::from_str(r.json).unwrap();
    assert_eq!(got[0].request_id(), 77);
    let _ = Mode::Reliable;
}

#[test]
fn datagram_to_datagram_relay_delivers_at_once_without_waking_itself() {
    let mut h = Harness::new();
    let (pid, _) = datagram_pair(&mut h, "dg", 0);
    assert_eq!(h.watches.len(), 1, "the relay's wake socket is watched");
    for (i, m) in [&b"one"[..], b"", &[9u8; 500]].iter().enumerate() {
        let got = h.frame(
            1,
            0,
            Msg::Publish(Publish {
                publisher_id: pid,
                payload: m,
            }),
        );
        // Delivered while handling the PUBLISH, no wake-up needed.
        assert_eq!(delivers(&got), vec![(i as u64, m.to_vec())], "{got:?}");
    }
    // And the broker sent nothing to its own wake socket.
    let mut byte = [0u8; 8];
    let r = rustix::net::recv(
        h.watches[0].1.as_fd(),
        &mut byte[..],
        rustix::net::RecvFlags::DONTWAIT,
    );
    assert_eq!(
        r.err(),
        Some(rustix::io::Errno::AGAIN),
        "no self-wake datagram"
    );
}

#[test]
fn full_relay_pauses_the_publisher_instead_of_refusing() {
    let mut h = Harness::new();
    let (pid, _) = datagram_pair(&mut h, "bp", 4096);
    // The subscriber does not read its socket: its sends are never reported complete.
    h.held.push(2);
    let total = 600u32;
    let mut got_all = Vec::new();
    let mut sent = 0u32;
    while sent < total && !h.paused.contains(&1) {
        let got = h.frame(
            1,
            u64::from(sent) + 1,
            Msg::Publish(Publish {
                publisher_id: pid,
                payload: &sent.to_le_bytes(),
            }),
        );
        assert!(
            got.iter().all(|g| !matches!(g.msg(), Msg::Error(_))),
            "no refusal while the backlog fills: {got:?}"
        );
        got_all.extend(got);
        sent += 1;
    }
    assert!(h.paused.contains(&1), "reads of the publisher paused");
    assert!(sent < total, "paused before {total} messages");
    // The subscriber reads: every completed send frees credit, the relay moves on, the backlog
    // drains, and the publisher is read again.
    h.held.clear();
    while let Some(conn) = h.unacked.pop() {
        h.e.on_sent(conn, 1);
        got_all.extend(h.drain());
    }
    assert!(
        !h.paused.contains(&1),
        "reads resumed once the backlog drained"
    );
    while sent < total {
        got_all.extend(h.frame(
            1,
            u64::from(sent) + 1,
            Msg::Publish(Publish {
                publisher_id: pid,
                payload: &sent.to_le_bytes(),
            }),
        ));
        sent += 1;
    }
    let d = delivers(&got_all);
    assert_eq!(d.len(), total as usize, "every message delivered once");
    for (i, (seq, payload)) in d.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(payload[..], (i as u32).to_le_bytes(), "in order");
    }
}

#[test]
#[should_panic(expected = "were handed to it")]
fn more_sends_reported_than_handed_out_is_a_driver_bug_caught_at_the_boundary() {
    let mut h = Harness::new();
    h.connect(1); // HELLO and WELCOME, whose send the harness reported: nothing is unsent.
    h.e.on_sent(1, 1);
}

#[test]
#[should_panic(expected = "must never reuse a ConnId")]
fn a_reused_connection_id_is_caught_at_the_boundary() {
    let mut h = Harness::new();
    h.connect(1);
    h.e.on_connect(1, creds(), h.now);
}

#[test]
fn the_engine_clock_never_runs_back() {
    let mut h = Harness::new();
    let start = h.now;
    h.e.on_tick(start + Duration::from_secs(5));
    // A frame stamped before that tick (the driver took its time earlier in the same turn).
    h.e.on_connect(1, creds(), start);
    let uptime = h.e.stats_json()["broker"]["uptime_ms"].as_u64().unwrap();
    assert!(uptime >= 5_000, "uptime went back to {uptime} ms");
}
