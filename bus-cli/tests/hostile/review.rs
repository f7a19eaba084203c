//! Attacks found by an adversarial review of the hardening round, kept as regression tests:
//! releasing rings before a pair is introduced, draining slots under a slow reader, descriptor
//! quotas charged to the wrong client, churn, close/disconnect orders, lossy accounting, and a
//! commit word that flaps to dodge the broker's wake-before-judge.

use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bus_client::ModeRequest;
use bus_core::frame::{ErrorCode, Msg, RingGranted, Subscribe, Transport};
use bus_core::ring::CursorPage;
use bus_core::segment::{self, Access, RingMapping};

use crate::honest::{Until, round_trip, subscriber_thread};
use crate::peer::{Conn, DgramPub, NEXT_POS, Polled};
use crate::support::{BrokerExt, Config, DEADLINE, start_broker, topic_of, wait_until};

/// A shm subscriber that sends RING_RELEASED for `release` BEFORE its SUBSCRIBER_READY, then
/// goes live, attaches to every ring at the position its grant says, and never moves.
pub struct PreReleaser {
    pub conn: Conn,
    pub sid: u64,
    pub page: CursorPage,
    pub raw: bus_core::segment::Mapping,
    pub wake: OwnedFd,
    pub rings: Vec<(RingGranted, RingMapping)>,
}

impl PreReleaser {
    pub fn new(path: &std::path::Path, topic: &str, release: &[u64]) -> PreReleaser {
        let mut conn = Conn::connect(path, Transport::Shm);
        let mut reply = conn.request(Msg::Subscribe(Subscribe {
            mode: ModeRequest::Reliable,
            delivery: Transport::Shm,
            topic,
        }));
        let s = match reply.frame().msg {
            Msg::Subscribed(s) => s,
            other => panic!("expected SUBSCRIBED, got {other:?}"),
        };
        let wake = reply.fds.pop().unwrap();
        let page_fd = reply.fds.pop().unwrap();
        let map = segment::map_cursor_page(&page_fd, Access::ReadWrite).unwrap();
        let raw = segment::map_cursor_page(&page_fd, Access::ReadWrite).unwrap();
        let page = CursorPage::init(map, s.subscriber_id).unwrap();
        for &pid in release {
            let rid = conn.rid();
            conn.send(
                rid,
                Msg::RingReleased {
                    subscriber_id: s.subscriber_id,
                    publisher_id: pid,
                },
            )
            .unwrap();
        }
        let reply = conn.request(Msg::SubscriberReady {
            subscriber_id: s.subscriber_id,
        });
        assert!(matches!(reply.frame().msg, Msg::Ok), "{reply:?}");
        PreReleaser {
            conn,
            sid: s.subscriber_id,
            page,
            raw,
            wake,
            rings: Vec::new(),
        }
    }

    /// Maps granted rings; sets the cursor of each new one to its start position (as an
    /// honest reader would on attach) and then never moves it. Returns whether EVICTED came.
    pub fn pump(&mut self) -> bool {
        let mut evicted = false;
        while let Some(mut ev) = self.conn.next_event(Duration::ZERO) {
            match ev.frame().msg {
                Msg::RingGranted(g) if g.role.is_reader() => {
                    let fd = ev.fds.pop().unwrap();
                    let map =
                        segment::map_ring(&fd, g.data_bytes as usize, Access::ReadOnly).unwrap();
                    let start = if g.role == bus_core::frame::RingRole::ReaderFromStart {
                        0
                    } else {
                        // SAFETY-free: read next_pos through a header load.
                        let p = map.header_ptr();
                        // SAFETY: 8-aligned offset inside the header page of a live mapping.
                        unsafe {
                            std::sync::atomic::AtomicU64::from_ptr(p.add(NEXT_POS) as *mut u64)
                                .load(std::sync::atomic::Ordering::Acquire)
                        }
                    };
                    // SAFETY: cursor slot offset, 8-aligned inside our rw page mapping.
                    unsafe {
                        std::sync::atomic::AtomicU64::from_ptr(
                            self.raw
                                .as_mut_ptr()
                                .add(bus_core::layout::cursor_slot_offset(g.slot as usize))
                                as *mut u64,
                        )
                        .store(start, std::sync::atomic::Ordering::Release);
                    }
                    self.rings.push((g, map));
                }
                Msg::Evicted(_) => evicted = true,
                _ => {}
            }
        }
        evicted
    }
}

fn reliable_small(topic: &str) -> Config {
    Config::new()
        .limits("stall_timeout_ms = 300")
        .topic(&format!(
            "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 4096"
        ))
}

/// A: a subscriber that says RING_RELEASED for a live publisher while it is still pending,
/// then goes live and holds its cursor: the publisher honours the cursor, the broker never
/// judges it. An honest bus-client publisher is blocked for good.
pub fn release_before_ready_does_not_excuse_a_staller_shm(driver: &str) {
    let topic = "review.prerelease";
    let broker = start_broker(driver).config(reliable_small(topic)).run();
    let (tx_id, rx_id) = mpsc::channel();
    let (tx_go, rx_go) = mpsc::channel::<()>();
    let socket = broker.socket().to_owned();
    let h = std::thread::spawn(move || {
        let bus = bus_client::Bus::connect(&socket).map_err(|e| e.to_string())?;
        let mut p = bus.publisher(topic).map_err(|e| e.to_string())?;
        tx_id.send(p.id()).unwrap();
        rx_go.recv().unwrap();
        let msg = vec![7u8; 1000];
        for i in 0..40 {
            p.send_timeout(&msg, Duration::from_secs(15))
                .map_err(|e| format!("send {i}: {e}"))?;
        }
        Ok::<(), String>(())
    });
    let pid = rx_id.recv_timeout(DEADLINE).unwrap();
    let mut s = PreReleaser::new(broker.socket(), topic, &[pid]);
    wait_until("ring granted", || {
        s.pump();
        !s.rings.is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    tx_go.send(()).unwrap();
    let end = Instant::now() + Duration::from_secs(8);
    let mut evicted = false;
    while !h.is_finished() && Instant::now() < end {
        evicted |= s.pump();
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = Conn::connect(broker.socket(), Transport::Datagram);
    let doc = c.stats();
    let t = topic_of(&doc, topic).cloned();
    assert!(
        h.is_finished(),
        "the honest publisher is still blocked 8 s after a stall limit of 300 ms (evicted: \
         {evicted}); topic: {t:?}"
    );
    h.join().unwrap().expect("publisher");
}

/// A, datagram publisher: same attack against the relay.
pub fn release_before_ready_does_not_excuse_a_staller_datagram(driver: &str) {
    let topic = "review.prerelease.dg";
    let broker = start_broker(driver).config(reliable_small(topic)).run();
    let p = DgramPub::create(broker.socket(), topic, ModeRequest::Reliable);
    let pid = p.id();
    let mut s = PreReleaser::new(broker.socket(), topic, &[pid]);
    std::thread::sleep(Duration::from_millis(100));
    s.pump();
    let h = std::thread::spawn(move || {
        let msg = vec![9u8; 1000];
        for _ in 0..40 {
            p.publish(&msg);
        }
        p.close();
    });
    let end = Instant::now() + Duration::from_secs(8);
    while !h.is_finished() && Instant::now() < end {
        s.pump();
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = Conn::connect(broker.socket(), Transport::Datagram);
    let doc = c.stats();
    let t = topic_of(&doc, topic).cloned();
    assert!(
        h.is_finished(),
        "the datagram publisher's CLOSE_PUBLISHER got no OK 8 s after a 300 ms stall limit; \
         topic: {t:?}"
    );
    h.join().unwrap();
}

/// D: an honest subscriber that is steadily draining a departed publisher's big ring is
/// evicted when a new publisher needs the slot after the stall limit, although it never
/// stopped making progress (slots full: max_publishers_per_topic = 1 here; with the default 64
/// another client filling 63 slots has the same effect).
pub fn draining_reader_keeps_its_slot_while_it_reads(driver: &str) {
    let topic = "review.drain";
    let cfg = Config::new()
        .limits("stall_timeout_ms = 300")
        .limits("max_publishers_per_topic = 1")
        .topic(&format!(
            "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 1048576"
        ));
    let broker = start_broker(driver).config(cfg).run();
    // Slow honest reader: 1 ms after every message.
    let sub = subscriber_thread(broker.socket(), topic, false, Until::Stop, Some(1));
    let n = 800usize;
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 1000]).collect();
    let (id, h) = crate::honest::publisher_thread(broker.socket(), topic, false, msgs.clone());
    h.join().unwrap().expect("publisher");
    // The publisher left; the reader is draining (about 1 ms per message).
    std::thread::sleep(Duration::from_millis(450));
    let progress_then = sub.count();
    // A new publisher needs the slot.
    let bus = broker.connect();
    let p2 = bus.publisher(topic);
    std::thread::sleep(Duration::from_millis(300));
    let progress_now = sub.count();
    let r = sub.join();
    eprintln!(
        "reader had {progress_then} of {n} at the new publisher, {progress_now} 300 ms later; \
         new publisher: {:?}; reader error: {:?}",
        p2.as_ref().map(|p| p.id()),
        r.error
    );
    assert!(
        r.error.is_none(),
        "an honest reader draining publisher {id} ({progress_then}/{n} read, still reading) \
         was evicted: {:?}",
        r.error
    );
}

/// RLIMIT_NOFILE soft = hard = 256, default limits: the broker starts and serves.
pub fn broker_serves_under_rlimit_256(driver: &str) {
    let broker = start_broker(driver).nofile(256).run();
    round_trip(broker.socket(), "review.rlimit").expect("round trip at 256 fds");
    // A few datagram subscribers and publishers.
    let mut conns = Vec::new();
    for i in 0..10 {
        let mut c = Conn::connect(broker.socket(), Transport::Datagram);
        let r = c.request(Msg::Subscribe(Subscribe {
            mode: ModeRequest::Any,
            delivery: Transport::Datagram,
            topic: &format!("review.rl.t{i}"),
        }));
        assert!(matches!(r.frame().msg, Msg::Subscribed(_)), "{r:?}");
        conns.push(c);
    }
    round_trip(broker.socket(), "review.rlimit").expect("round trip at 256 fds with 10 subs");
}

/// Hostile shm subscribers charge an honest datagram publisher's client for the relay's wake
/// copies: its quota fills with descriptors it never asked for, and it is refused.
pub fn subscribers_joining_use_no_datagram_publishers_quota(driver: &str) {
    let topic = "review.quota";
    let cfg = Config::new().limits("max_fds_per_client = 16");
    let broker = start_broker(driver).config(cfg).run();
    let mut honest = Conn::connect(broker.socket(), Transport::Datagram);
    let r = honest.request(Msg::CreatePublisher(bus_core::frame::CreatePublisher {
        ring_data_bytes: 0,
        max_message_bytes: 0,
        mode: ModeRequest::Any,
        transport: Transport::Datagram,
        topic,
    }));
    assert!(matches!(r.frame().msg, Msg::RingGranted(_)), "{r:?}");
    // The hostile: 20 shm subscribers on 20 connections (each well within its own quota).
    let mut hogs = Vec::new();
    for _ in 0..20 {
        hogs.push(crate::peer::HostileSub::subscribe(
            broker.socket(),
            topic,
            ModeRequest::Any,
        ));
    }
    // A fresh datagram client that holds nothing asks for a publisher on the topic.
    let mut fresh = Conn::connect(broker.socket(), Transport::Datagram);
    let r = fresh.request(Msg::CreatePublisher(bus_core::frame::CreatePublisher {
        ring_data_bytes: 0,
        max_message_bytes: 0,
        mode: ModeRequest::Any,
        transport: Transport::Datagram,
        topic,
    }));
    if let Msg::Error(e) = r.frame().msg {
        eprintln!(
            "fresh client holding nothing refused a datagram publisher: {:?} {}",
            e.code, e.message
        );
    }
    // The honest client now asks for one datagram subscription on another topic.
    let r = honest.request(Msg::Subscribe(Subscribe {
        mode: ModeRequest::Any,
        delivery: Transport::Datagram,
        topic: "review.quota.other",
    }));
    let refused = match r.frame().msg {
        Msg::Error(e) => Some((e.code, e.message.to_owned())),
        _ => None,
    };
    assert!(
        refused.is_none(),
        "the honest datagram publisher's client holds 1 publisher yet is refused a \
         subscription because others subscribed: {refused:?}"
    );
    let _ = ErrorCode::LimitReached;
}

/// fd accounting: datagram publisher, shm and datagram subscribers joining and leaving,
/// subscribe/unsubscribe loops; afterwards the broker's fd count is back, and a client that
/// holds nothing gets its whole quota.
pub fn fd_counts_return_to_baseline_after_churn(driver: &str) {
    let topic = "review.churn";
    let cfg = Config::new()
        .limits("max_fds_per_client = 8")
        .topic(&format!("name = \"{topic}\"\nmode = \"reliable\""));
    let broker = start_broker(driver).config(cfg).run();
    drop(Conn::connect(broker.socket(), Transport::Datagram));
    let baseline = broker.settled_fds();
    let mut pubc = Conn::connect(broker.socket(), Transport::Datagram);
    let g = pubc.request(Msg::CreatePublisher(bus_core::frame::CreatePublisher {
        ring_data_bytes: 0,
        max_message_bytes: 0,
        mode: ModeRequest::Any,
        transport: Transport::Datagram,
        topic,
    }));
    let pid = match g.frame().msg {
        Msg::RingGranted(g) => g.publisher_id,
        o => panic!("{o:?}"),
    };
    for round in 0..30 {
        // shm subscribers join, read one message, leave (some unsubscribe, some disconnect,
        // some release the ring first).
        let mut subs = Vec::new();
        for k in 0..3 {
            let s = crate::peer::HostileSub::subscribe(broker.socket(), topic, ModeRequest::Any);
            if (round + k) % 3 == 0 {
                s.conn
                    .send(
                        0,
                        Msg::RingReleased {
                            subscriber_id: s.subscribed.subscriber_id,
                            publisher_id: pid,
                        },
                    )
                    .unwrap();
            }
            subs.push(s);
        }
        let mut d = crate::peer::DgramSub::subscribe(broker.socket(), topic, ModeRequest::Any);
        pubc.send(
            0,
            Msg::Publish(bus_core::frame::Publish {
                publisher_id: pid,
                payload: b"x",
            }),
        )
        .unwrap();
        let _ = d.deliver();
        for (k, mut s) in subs.into_iter().enumerate() {
            if k % 2 == 0 {
                let sid = s.subscribed.subscriber_id;
                let r = s.conn.request(Msg::Unsubscribe { subscriber_id: sid });
                assert!(matches!(r.frame().msg, Msg::Ok), "{r:?}");
            }
            drop(s);
        }
        let r = d.conn.request(Msg::Unsubscribe {
            subscriber_id: d.subscriber_id,
        });
        assert!(matches!(r.frame().msg, Msg::Ok), "{r:?}");
        // The same connection subscribes again (datagram: 4 fds) and again.
        for _ in 0..3 {
            let r = d.conn.request(Msg::Subscribe(Subscribe {
                mode: ModeRequest::Any,
                delivery: Transport::Datagram,
                topic,
            }));
            let sid = match r.frame().msg {
                Msg::Subscribed(s) => s.subscriber_id,
                o => panic!("round {round}: resubscribe refused: {o:?}"),
            };
            let r = d.conn.request(Msg::Unsubscribe { subscriber_id: sid });
            assert!(matches!(r.frame().msg, Msg::Ok), "{r:?}");
        }
    }
    // The publisher's client holds 1 publisher (1 fd); after all the churn it must be able to
    // add a datagram subscription (4) -> 5 <= 8.
    let r = pubc.request(Msg::Subscribe(Subscribe {
        mode: ModeRequest::Any,
        delivery: Transport::Datagram,
        topic: "review.churn.other",
    }));
    assert!(
        matches!(r.frame().msg, Msg::Subscribed(_)),
        "after churn the publisher's client is refused: {r:?}"
    );
    drop(pubc);
    broker.expect_fds(baseline, "churn");
}

/// CLOSE_PUBLISHER twice, PUBLISH after close, then disconnect while closing, with a stalled
/// reliable shm subscriber: the closing publisher is freed (the staller evicted) and fds
/// come back.
pub fn close_twice_with_a_stalled_subscriber_frees_everything(driver: &str) {
    let topic = "review.close";
    let broker = start_broker(driver).config(reliable_small(topic)).run();
    drop(Conn::connect(broker.socket(), Transport::Datagram));
    let baseline = broker.settled_fds();
    let mut staller =
        crate::peer::HostileSub::subscribe(broker.socket(), topic, ModeRequest::Reliable);
    let mut p = DgramPub::create(broker.socket(), topic, ModeRequest::Reliable);
    staller.wait_rings(1);
    // reader role: cursor at next_pos = 0, never moves.
    staller.set_cursor(staller.rings[0].0.slot as usize, 0);
    let pid = p.id();
    for _ in 0..30 {
        p.publish(&[1u8; 1000]);
    }
    let rid1 = p.conn.rid();
    p.conn
        .send(rid1, Msg::ClosePublisher { publisher_id: pid })
        .unwrap();
    let (code, msg) = p
        .conn
        .request_error(Msg::ClosePublisher { publisher_id: pid });
    assert_eq!(code, ErrorCode::InvalidRequest, "{msg}");
    let rid = p.conn.rid();
    p.conn
        .send(
            rid,
            Msg::Publish(bus_core::frame::Publish {
                publisher_id: pid,
                payload: b"after close",
            }),
        )
        .unwrap();
    let r = p.conn.reply_to(rid);
    assert!(matches!(r.frame().msg, Msg::Error(_)), "{r:?}");
    drop(p);
    // Stall limit 300 ms + check every second: the staller is evicted, the backlog written,
    // the publisher removed.
    wait_until("staller evicted", || staller.pump());
    let mut c = Conn::connect(broker.socket(), Transport::Datagram);
    wait_until("the closing publisher is gone", || {
        let doc = c.stats();
        topic_of(&doc, topic).is_none_or(|t| t["publishers"].as_array().unwrap().is_empty())
    });
    drop(c);
    drop(staller);
    broker.expect_fds(baseline, "closing publisher and staller gone");
}

/// Lossy topic, shm publisher flooding, slow datagram subscriber: every sequence number is
/// accounted for (delivered, lost_before, or SKIPPED), none twice, in order.
pub fn lossy_datagram_accounting_is_exact(driver: &str) {
    let topic = "review.lossy";
    let cfg = Config::new().topic(&format!(
        "name = \"{topic}\"\nmode = \"lossy\"\nring_bytes = 8192"
    ));
    let broker = start_broker(driver).config(cfg).run();
    let d = crate::peer::DgramSub::subscribe(broker.socket(), topic, ModeRequest::Lossy);
    let n = 20_000u64;
    let msgs: Vec<Vec<u8>> = (0..n)
        .map(|i| vec![i as u8; 100 + (i as usize * 37) % 1500])
        .collect();
    let (pid, h) = crate::honest::publisher_thread(broker.socket(), topic, false, msgs);
    let mut next = 0u64;
    let mut problems = Vec::new();
    let (mut delivered, mut lost, mut skipped) = (0u64, 0u64, 0u64);
    let end = Instant::now() + DEADLINE;
    while next < n && Instant::now() < end {
        let f = match d.conn.poll(Duration::from_millis(500)) {
            Polled::Frame(f) => f,
            Polled::Eof => panic!("eof"),
            Polled::Timeout => {
                if h.is_finished() {
                    break;
                }
                continue;
            }
        };
        match f.frame().msg {
            Msg::Deliver(m) => {
                assert_eq!(m.publisher_id, pid);
                if m.seq != next + m.lost_before {
                    problems.push(format!(
                        "DELIVER seq {} lost_before {} where next was {next}",
                        m.seq, m.lost_before
                    ));
                }
                lost += m.lost_before;
                delivered += 1;
                next = m.seq + 1;
                if delivered % 64 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Msg::Skipped(s) => {
                if s.seq < next {
                    problems.push(format!("SKIPPED seq {} where next was {next}", s.seq));
                }
                skipped += 1;
                lost += s.lost_before;
                // A gap before a SKIPPED must be counted in its lost_before.
                if s.seq != next + s.lost_before {
                    problems.push(format!(
                        "SKIPPED seq {} ({:?}) lost_before {} after next {next}: {} messages \
                         in between silently gone",
                        s.seq,
                        s.reason,
                        s.lost_before,
                        s.seq - next - s.lost_before
                    ));
                }
                next = s.seq + 1;
            }
            _ => {}
        }
    }
    h.join().unwrap().expect("publisher");
    // Drain what is left.
    while let Polled::Frame(f) = d.conn.poll(Duration::from_millis(1000)) {
        match f.frame().msg {
            Msg::Deliver(m) => {
                lost += m.lost_before;
                delivered += 1;
                next = m.seq + 1;
            }
            Msg::Skipped(s) => {
                lost += s.lost_before;
                skipped += 1;
                next = s.seq + 1;
            }
            _ => {}
        }
    }
    if next != n {
        problems.push(format!(
            "stream ended at {next} of {n} with no word of the rest"
        ));
    }
    eprintln!("lossy: delivered {delivered}, lost {lost}, skipped {skipped}, next {next} of {n}");
    problems.truncate(10);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

per_driver!(
    review_release_before_ready_does_not_excuse_a_staller_shm => release_before_ready_does_not_excuse_a_staller_shm,
    review_release_before_ready_does_not_excuse_a_staller_datagram => release_before_ready_does_not_excuse_a_staller_datagram,
    review_draining_reader_keeps_its_slot_while_it_reads => draining_reader_keeps_its_slot_while_it_reads,
    review_broker_serves_under_rlimit_256 => broker_serves_under_rlimit_256,
    review_subscribers_joining_use_no_datagram_publishers_quota => subscribers_joining_use_no_datagram_publishers_quota,
    review_fd_counts_return_to_baseline_after_churn => fd_counts_return_to_baseline_after_churn,
    review_close_twice_with_a_stalled_subscriber_frees_everything => close_twice_with_a_stalled_subscriber_frees_everything,
    review_lossy_datagram_accounting_is_exact => lossy_datagram_accounting_is_exact,
    review_flapping_commit_word_does_not_get_honest_readers_evicted => flapping_commit_word_does_not_get_honest_readers_evicted,
    review_release_spam_for_pending_publishers_does_not_excuse_a_staller => release_spam_for_pending_publishers_does_not_excuse_a_staller,
);

/// W: a hostile reliable publisher writes a valid record at the honest parked subscribers'
/// cursor, inflates next_pos so the ring looks full, never wakes them, and flaps that record's
/// commit word (10 ms committed, 10 ms not). The broker's single wake-before-judge can land in
/// an uncommitted phase: the honest reader finds nothing, parks again, and is judged at a
/// later check that sees the record committed.
pub fn flapping_commit_word_does_not_get_honest_readers_evicted(driver: &str) {
    use crate::support::{bus_sub, json_lines, ready_subscribers};
    use bus_core::layout::record_bytes;
    let topic = "review.flap";
    let cfg = Config::new()
        .limits("stall_timeout_ms = 300")
        .topic(&format!(
            "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 16384"
        ));
    let broker = start_broker(driver).config(cfg).run();
    let mut child = bus_sub(&broker, topic, &[]);
    let lib = subscriber_thread(broker.socket(), topic, false, Until::Stop, None);
    wait_until("both honest subscribers live", || {
        ready_subscribers(&broker, topic) >= 2
    });
    let mut p =
        crate::peer::HostilePub::create(broker.socket(), topic, 16384, ModeRequest::Reliable);
    p.wait_subscribers(2);
    let slot = p.grant.slot as usize;
    let pages: Vec<bus_core::segment::Mapping> = p
        .cursor_fds
        .iter()
        .map(|fd| segment::map_cursor_page(fd, Access::ReadOnly).unwrap())
        .collect();
    let cursor = |m: &bus_core::segment::Mapping| -> u64 {
        // SAFETY: 8-aligned slot offset inside a live read-only page mapping; loads only.
        unsafe {
            std::sync::atomic::AtomicU64::from_ptr(
                m.as_ptr().add(bus_core::layout::cursor_slot_offset(slot)) as *mut u64,
            )
            .load(std::sync::atomic::Ordering::Acquire)
        }
    };
    let d = p.data_bytes() as u64;
    let mut real_next = 0u64;
    let mut rec_pos;
    let mut published = 0u64;
    let payload = b"flap";
    let end = Instant::now() + Duration::from_secs(25);
    let mut evicted_any = false;
    // First record.
    rec_pos = real_next;
    p.writer.try_publish(payload).unwrap();
    published += 1;
    real_next += record_bytes(payload.len()) as u64;
    p.set_header(NEXT_POS, rec_pos + d);
    let t0 = Instant::now();
    while Instant::now() < end {
        p.pump();
        // Once every honest reader has passed rec_pos, write the next one at its new cursor.
        let all_past = pages.iter().all(|m| {
            let c = cursor(m);
            c == bus_core::layout::CURSOR_DETACHED || c > rec_pos
        });
        if all_past {
            rec_pos = real_next;
            p.set_record_word(rec_pos, 0, 0);
            // The honest writer writes at its own next position (the header's next_pos is
            // overwritten by it, then inflated again).
            p.writer.try_publish(payload).unwrap();
            published += 1;
            real_next += record_bytes(payload.len()) as u64;
            p.set_header(NEXT_POS, rec_pos + d);
        }
        let phase = (t0.elapsed().as_millis() / 10).is_multiple_of(2);
        p.set_record_word(rec_pos, 0, if phase { rec_pos + 1 } else { 0 });
        std::thread::sleep(Duration::from_millis(1));
        if !child.is_running() || lib.handle.is_finished() {
            evicted_any = true;
            break;
        }
    }
    p.set_record_word(rec_pos, 0, rec_pos + 1);
    let got = json_lines(&child.stdout()).len();
    let bus_sub_out = child.all_output();
    let r = lib.join();
    eprintln!(
        "published {published}; bus sub printed {got}; lib got {}",
        r.got.len()
    );
    assert!(
        !evicted_any && r.error.is_none() && !bus_sub_out.contains("evicted"),
        "honest subscriber evicted by a flapping commit word: bus sub running {}: {}\n\
         bus-client: {:?}",
        child.is_running(),
        bus_sub_out,
        r.error
    );
}

/// A3: a live subscriber spams RING_RELEASED for the next publisher id; an honest bus-client
/// publisher created meanwhile is released while pending (before PUBLISHER_READY), so the
/// broker never judges the subscriber on it, yet the publisher is introduced and honours the
/// subscriber's cursor (detached = position 0 for a reader-from-start). The hostile does
/// nothing else; the publisher blocks for good.
pub fn release_spam_for_pending_publishers_does_not_excuse_a_staller(driver: &str) {
    let topic = "review.spam";
    let broker = start_broker(driver).config(reliable_small(topic)).run();
    let s = crate::peer::HostileSub::subscribe(broker.socket(), topic, ModeRequest::Reliable);
    let sid = s.subscribed.subscriber_id;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let spam = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for pid in sid + 1..sid + 4 {
                let _ = s.conn.send(
                    0,
                    Msg::RingReleased {
                        subscriber_id: sid,
                        publisher_id: pid,
                    },
                );
            }
        }
        s
    });
    std::thread::sleep(Duration::from_millis(50));
    let socket = broker.socket().to_owned();
    let h = std::thread::spawn(move || {
        let bus = bus_client::Bus::connect(&socket).map_err(|e| e.to_string())?;
        let mut p = bus.publisher(topic).map_err(|e| e.to_string())?;
        let msg = vec![7u8; 1000];
        for i in 0..20_000 {
            p.send_timeout(&msg, Duration::from_secs(15))
                .map_err(|e| format!("send {i} (publisher {}): {e}", p.id()))?;
        }
        Ok::<u64, String>(p.id())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut s = spam.join().unwrap();
    let end = Instant::now() + Duration::from_secs(8);
    let mut attached = false;
    while !h.is_finished() && Instant::now() < end {
        s.pump();
        if !attached && !s.rings.is_empty() {
            let np = s.ring_header(0, NEXT_POS);
            s.set_cursor(s.rings[0].0.slot as usize, np);
            eprintln!(
                "attached at {np} to publisher {}",
                s.rings[0].0.publisher_id
            );
            attached = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c = Conn::connect(broker.socket(), Transport::Datagram);
    let doc = c.stats();
    assert!(
        h.is_finished(),
        "the honest publisher is blocked 8 s after a 300 ms stall limit: {:?}",
        topic_of(&doc, topic)
    );
    h.join().unwrap().expect("publisher");
}
