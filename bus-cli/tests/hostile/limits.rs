//! Items 4, 5, 6 and 12: sizes and counts at and past their limits.

use std::os::fd::OwnedFd;
use std::time::Duration;

use bus_client::ModeRequest;
use bus_core::frame::{CreatePublisher, ErrorCode, Msg, Subscribe, Transport};

use crate::honest::{Sent, Until, publisher_thread, round_trip, subscriber_thread, verify};
use crate::peer::{Conn, Incoming};
use crate::support::{BrokerExt, Config, Rng, start_broker, topic_of, wait_until};

fn create(
    ring: u64,
    max_msg: u32,
    mode: ModeRequest,
    transport: Transport,
    topic: &str,
) -> Msg<'_> {
    Msg::CreatePublisher(CreatePublisher {
        ring_data_bytes: ring,
        max_message_bytes: max_msg,
        mode,
        transport,
        topic,
    })
}

fn topic_names(doc: &serde_json::Value) -> Vec<String> {
    doc["topics"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t["name"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn expect_error(reply: &Incoming, what: &str) -> (ErrorCode, String) {
    match reply.frame().msg {
        Msg::Error(e) => (e.code, e.message.to_owned()),
        other => panic!("{what}: expected ERROR, got {other:?}"),
    }
}

/// One way to ask for a topic that must fail: (the shared-memory connection, the datagram
/// connection, the topic name) to the broker's answer.
type Attempt = Box<dyn Fn(&mut Conn, &mut Conn, &str) -> Incoming>;

/// Item 4: ring sizes that overflow (or exceed the limit) get `too-large` and leave no topic;
/// every error path of topic creation leaves no topic; 5,000 of them leave `max_topics` usable.
pub fn ring_size_overflow(driver: &str) {
    const MAX_RING: u64 = 1 << 20;
    const MAX_TOPICS: usize = 8;
    let cfg = Config::new()
        .limits(&format!("max_ring_bytes = {MAX_RING}"))
        .limits("default_ring_bytes = 65536")
        .limits(&format!("max_topics = {MAX_TOPICS}"));
    let broker = start_broker(driver).config(cfg).run();
    let mut shm = Conn::connect(broker.socket(), Transport::Shm);
    let mut dg = Conn::connect(broker.socket(), Transport::Datagram);
    let too_large = [
        (1u64 << 63) + 1,
        u64::MAX,
        1 << 62,
        MAX_RING + 1,
        MAX_RING * 2,
        (1 << 32) + 4096,
        (1 << 40) + 4096,
        u64::MAX - 4095,
    ];
    for (i, &ring) in too_large.iter().enumerate() {
        for (conn, transport) in [(&mut shm, Transport::Shm), (&mut dg, Transport::Datagram)] {
            let topic = format!("item04.big{i}.{transport:?}");
            let reply = conn.request(create(ring, 0, ModeRequest::Any, transport, &topic));
            let (code, msg) = expect_error(&reply, &format!("ring_data_bytes {ring:#x}"));
            assert_eq!(
                code,
                ErrorCode::TooLarge,
                "ring_data_bytes {ring:#x} ({transport:?}): {msg}"
            );
            let doc = conn.stats();
            assert!(
                topic_of(&doc, &topic).is_none(),
                "a refused CREATE_PUBLISHER (ring {ring:#x}) left topic {topic}"
            );
        }
    }

    // Every other way topic creation can fail leaves no topic behind.
    let reply = shm.request(create(
        0,
        0,
        ModeRequest::Reliable,
        Transport::Datagram,
        "item04.exists",
    ));
    assert!(
        matches!(reply.frame().msg, Msg::RingGranted(_)),
        "{reply:?}"
    );
    let failing: Vec<(&str, Attempt)> = vec![
        (
            "max_message_bytes u32::MAX",
            Box::new(|s, _, t| {
                s.request(create(65536, u32::MAX, ModeRequest::Any, Transport::Shm, t))
            }),
        ),
        (
            "max_message_bytes over half the ring",
            Box::new(|s, _, t| {
                s.request(create(65536, 40_000, ModeRequest::Any, Transport::Shm, t))
            }),
        ),
        (
            "shm publisher on a datagram connection",
            Box::new(|_, d, t| d.request(create(0, 0, ModeRequest::Any, Transport::Shm, t))),
        ),
        (
            "shm subscriber on a datagram connection",
            Box::new(|_, d, t| {
                d.request(Msg::Subscribe(Subscribe {
                    mode: ModeRequest::Any,
                    delivery: Transport::Shm,
                    topic: t,
                }))
            }),
        ),
        (
            "max_message_bytes over the ring, subscriber side mode lossy then publisher",
            Box::new(|s, _, t| {
                s.request(create(4096, 4096, ModeRequest::Lossy, Transport::Shm, t))
            }),
        ),
    ];
    for (i, (what, f)) in failing.iter().enumerate() {
        let topic = format!("item04.fail{i}");
        let reply = f(&mut shm, &mut dg, &topic);
        let (code, msg) = expect_error(&reply, what);
        assert_ne!(code, ErrorCode::Internal, "{what}: {msg}");
        let doc = shm.stats();
        assert!(
            topic_of(&doc, &topic).is_none(),
            "{what} ({code:?}: {msg}) left topic {topic}"
        );
    }
    // A mode conflict on an existing topic adds no publisher or subscriber to it.
    let (code, msg) = shm.request_error(create(
        0,
        0,
        ModeRequest::Lossy,
        Transport::Datagram,
        "item04.exists",
    ));
    assert_eq!(code, ErrorCode::TopicConflict, "{msg}");
    let (code, msg) = dg.request_error(Msg::Subscribe(Subscribe {
        mode: ModeRequest::Lossy,
        delivery: Transport::Datagram,
        topic: "item04.exists",
    }));
    assert_eq!(code, ErrorCode::TopicConflict, "{msg}");
    // Bad names are refused.
    for bad in ["", "a..b", ".a", "a.", "a b", "caf\u{e9}"] {
        let (code, msg) =
            dg.request_error(create(0, 0, ModeRequest::Any, Transport::Datagram, bad));
        assert_eq!(code, ErrorCode::BadTopic, "{bad:?}: {msg}");
    }
    let doc = shm.stats();
    let names = topic_names(&doc);
    assert_eq!(
        names,
        vec!["item04.exists".to_owned()],
        "only the one real topic exists"
    );
    let t = topic_of(&doc, "item04.exists").unwrap();
    assert_eq!(t["publishers"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(t["subscribers"].as_array().unwrap().len(), 0, "{t}");

    // 5,000 refused requests on distinct names.
    let mut rng = Rng::seeded("item04");
    for i in 0..5000u32 {
        let ring = too_large[rng.range(0, too_large.len() as u64) as usize];
        let topic = format!("item04.flood.n{i}");
        let (conn, transport) = if i % 2 == 0 {
            (&mut shm, Transport::Shm)
        } else {
            (&mut dg, Transport::Datagram)
        };
        let (code, msg) = conn.request_error(create(ring, 0, ModeRequest::Any, transport, &topic));
        assert_eq!(
            code,
            ErrorCode::TooLarge,
            "request {i}, ring {ring:#x}: {msg}"
        );
    }
    let doc = shm.stats();
    assert_eq!(
        topic_names(&doc),
        vec!["item04.exists".to_owned()],
        "no topic leaked"
    );
    // max_topics is still all there: MAX_TOPICS - 1 more topics can be created, then no more.
    let mut keep = Vec::new();
    for i in 0..MAX_TOPICS - 1 {
        let mut c = Conn::connect(broker.socket(), Transport::Datagram);
        let topic = format!("item04.after{i}");
        let reply = c.request(create(0, 0, ModeRequest::Any, Transport::Datagram, &topic));
        assert!(
            matches!(reply.frame().msg, Msg::RingGranted(_)),
            "topic {} of max_topics {MAX_TOPICS}: {reply:?}",
            i + 2
        );
        keep.push(c);
    }
    let (code, msg) = dg.request_error(create(
        0,
        0,
        ModeRequest::Any,
        Transport::Datagram,
        "item04.one.too.many",
    ));
    assert_eq!(code, ErrorCode::LimitReached, "{msg}");
}

#[derive(Clone, Copy, Debug)]
enum Hog {
    DatagramSubscribe,
    ShmSubscribe,
    ShmPublisher,
}

/// Item 5: a broker with RLIMIT_NOFILE 1024; one connection subscribes and creates publishers
/// on distinct topics until refused. The refusal is `limit-reached` naming the limit, other
/// clients keep working meanwhile and afterwards, and the broker's fds return to baseline.
pub fn fd_exhaustion(driver: &str) {
    let cfg = Config::new().topic("name = \"item05.honest\"\nmode = \"reliable\"");
    let broker = start_broker(driver).config(cfg).nofile(1024).run();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", broker.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "the broker runs with RLIMIT_NOFILE 1024: {limits}"
    );
    let baseline = {
        drop(Conn::connect(broker.socket(), Transport::Datagram));
        broker.settled_fds()
    };
    round_trip(broker.socket(), "item05.honest").expect("an honest round trip before any hog");
    let baseline_after_honest = broker.settled_fds();
    for hog in [Hog::DatagramSubscribe, Hog::ShmSubscribe, Hog::ShmPublisher] {
        let transport = match hog {
            Hog::DatagramSubscribe => Transport::Datagram,
            _ => Transport::Shm,
        };
        let mut c = Conn::connect(broker.socket(), transport);
        let mut kept: Vec<OwnedFd> = Vec::new();
        let mut refused = None;
        for i in 0..20_000u32 {
            let topic = format!("item05.hog.{hog:?}.t{i}");
            let msg = match hog {
                Hog::DatagramSubscribe | Hog::ShmSubscribe => Msg::Subscribe(Subscribe {
                    mode: ModeRequest::Any,
                    delivery: transport,
                    topic: &topic,
                }),
                Hog::ShmPublisher => create(4096, 0, ModeRequest::Any, Transport::Shm, &topic),
            };
            let mut reply = c.request(msg);
            match reply.frame().msg {
                Msg::Error(e) => {
                    refused = Some((i, e.code, e.message.to_owned()));
                    break;
                }
                Msg::Subscribed(_) | Msg::RingGranted(_) => kept.append(&mut reply.fds),
                other => panic!("{hog:?} request {i}: unexpected {other:?}"),
            }
            if i == 200 {
                round_trip(broker.socket(), "item05.honest")
                    .unwrap_or_else(|e| panic!("{hog:?}: honest client while the hog grows: {e}"));
            }
        }
        let (n, code, msg) =
            refused.unwrap_or_else(|| panic!("{hog:?}: 20,000 requests, never refused"));
        eprintln!("{hog:?}: refused after {n} with {code:?}: {msg}");
        assert_eq!(
            code,
            ErrorCode::LimitReached,
            "{hog:?}: request {n} refused with {code:?}: {msg}"
        );
        let lower = msg.to_lowercase();
        assert!(
            !lower.contains("too many open files") && !lower.contains("os error"),
            "{hog:?}: the refusal names the limit, not the errno: {msg}"
        );
        assert!(
            lower.contains("limit") || lower.contains("max_"),
            "{hog:?}: the refusal names the limit: {msg}"
        );
        // Meanwhile (the hog still connected and holding everything) an honest client works.
        for _ in 0..2 {
            round_trip(broker.socket(), "item05.honest").unwrap_or_else(|e| {
                panic!("{hog:?}: honest client while the hog holds its share: {e}")
            });
        }
        let mut other = Conn::connect(broker.socket(), Transport::Datagram);
        other.ping();
        drop(other);
        drop(kept);
        drop(c);
        broker.expect_fds(
            baseline_after_honest,
            &format!("the {hog:?} hog disconnected"),
        );
        round_trip(broker.socket(), "item05.honest")
            .unwrap_or_else(|e| panic!("{hog:?}: honest client after the hog left: {e}"));
    }
    let _ = baseline;
}

/// Item 6: more subscribers per topic than a ring can track is refused at start.
pub fn too_many_subscribers_per_ring(driver: &str) {
    for n in [4097u64, 5000, 1 << 20, u64::from(u32::MAX)] {
        let cfg = Config::new().limits(&format!("max_subscribers_per_topic = {n}"));
        match start_broker(driver).config(cfg).try_run() {
            Ok(b) => panic!(
                "the broker started with max_subscribers_per_topic = {n} (pid {})",
                b.pid()
            ),
            Err(r) => {
                assert!(
                    r.status.code().is_some_and(|c| c != 0),
                    "{n}: a clean error exit, got {}",
                    r.status
                );
                assert!(
                    r.stderr.contains("max_subscribers_per_topic"),
                    "{n}: the message names the key: {}",
                    r.stderr
                );
                assert!(
                    r.stderr.contains("4096"),
                    "{n}: the message names the bound: {}",
                    r.stderr
                );
            }
        }
    }
    // The bound itself is fine.
    let cfg = Config::new().limits("max_subscribers_per_topic = 4096");
    let b = start_broker(driver).config(cfg).run();
    round_trip(b.socket(), "item06.ok").expect("a broker at the bound works");
}

/// A valid topic name of exactly `len` bytes.
fn long_name(len: usize, rng: &mut Rng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let left = len - s.len();
        if !s.is_empty() && left >= 2 && rng.range(0, 12) == 0 && !s.ends_with('.') {
            s.push('.');
        } else {
            s.push(CHARS[rng.range(0, CHARS.len() as u64) as usize] as char);
        }
    }
    assert!(!s.ends_with('.'));
    s
}

/// Item 12: topic names of 239..=255 bytes work for shared-memory and datagram clients.
pub fn long_topic_names(driver: &str) {
    let broker = start_broker(driver).run();
    let mut rng = Rng::seeded("item12");
    for len in 239..=255usize {
        let topic = long_name(len, &mut rng);
        assert_eq!(topic.len(), len);
        let shm = subscriber_thread(broker.socket(), &topic, false, Until::Count(6), None);
        let dgram = subscriber_thread(broker.socket(), &topic, true, Until::Count(6), None);
        let mut sent = Sent::new();
        let mut hs = Vec::new();
        for datagram in [false, true] {
            let msgs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10 + len]).collect();
            let (id, h) = publisher_thread(broker.socket(), &topic, datagram, msgs.clone());
            sent.insert(id, msgs);
            hs.push(h);
        }
        for h in hs {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{len}-byte topic: publisher: {e}"));
        }
        for (what, t) in [("shm", shm), ("datagram", dgram)] {
            let r = t.join();
            assert!(
                r.error.is_none(),
                "{len}-byte topic, {what} subscriber: {:?}",
                r.error
            );
            verify(
                &format!("{len}-byte topic, {what} subscriber"),
                &r.got,
                &sent,
                false,
            );
        }
        // `bus pub` / `bus sub` with the same name.
        let mut sub = crate::support::bus_sub(&broker, &topic, &["--count", "1"]);
        wait_until("bus sub is subscribed", || {
            assert!(
                sub.is_running(),
                "{len}-byte topic {topic:?}: bus sub exited: {}",
                sub.all_output()
            );
            crate::support::ready_subscribers(&broker, &topic) >= 1
        });
        let out = broker
            .bus()
            .args(["pub", "--", &topic, "hello-long-name"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{len}-byte topic: bus pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = sub.wait_exit();
        assert!(
            status.success(),
            "{len}-byte topic: bus sub: {}",
            sub.all_output()
        );
        let lines = crate::support::json_lines(&sub.stdout());
        assert_eq!(lines.len(), 1, "{}", sub.all_output());
        assert_eq!(lines[0]["text"], "hello-long-name");
    }
    let _ = Duration::ZERO;
}

/// Item 5, connections: with RLIMIT_NOFILE 1024, a hog opens more connections than the broker
/// has fds for. The broker must not spin on a listening socket it cannot accept from, and once
/// the hog leaves, new clients are served and the fd count is back to its baseline.
pub fn connection_flood(driver: &str) {
    let broker = start_broker(driver).nofile(1024).run();
    drop(Conn::connect(broker.socket(), Transport::Datagram));
    let baseline = broker.settled_fds();
    let mut hog = Vec::new();
    for _ in 0..1200 {
        let fd = rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            None,
        )
        .unwrap();
        match rustix::net::connect(
            &fd,
            &rustix::net::SocketAddrUnix::new(broker.socket()).unwrap(),
        ) {
            Ok(()) => hog.push(fd),
            Err(_) => break,
        }
    }
    eprintln!("item05 flood: {} connections", hog.len());
    let held = broker.settled_fds();
    eprintln!("item05 flood: the broker holds {held} fds");
    let cpu = crate::support::cpu_over(broker.pid(), Duration::from_secs(1));
    eprintln!("item05 flood: broker CPU {:.0}%", cpu * 100.0);
    assert!(
        cpu < 0.25,
        "the broker used {:.0}% of a core for 1 s with its fds exhausted (accept loop spinning?)",
        cpu * 100.0
    );
    drop(hog);
    broker.expect_fds(baseline, "the connection flood left");
    round_trip(broker.socket(), "item05.after.flood").expect("served after the flood");
}
