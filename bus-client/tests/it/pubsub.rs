//! Messages flow: across processes, many to many, late joiners, lossy gaps, latency.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;

use bus_client::{ModeRequest, SubscriberOptions, TopicOptions, WaitStrategy};

use crate::harness::{Broker, BrokerExt, ChildClient, check_pattern, eventually, pattern};

#[test]
fn hundred_thousand_random_messages_across_processes() {
    const COUNT: u64 = 100_000;
    let broker = Broker::start();
    let bus = broker.bus();
    let mut sub = bus.subscriber("cross").unwrap();
    let publisher = ChildClient::spawn(
        "publisher",
        &broker,
        &[
            ("MEMBUS_IT_TOPIC", "cross".into()),
            ("MEMBUS_IT_COUNT", COUNT.to_string()),
            ("MEMBUS_IT_MAX_BODY", "2000".into()),
            ("MEMBUS_IT_SEED", "7".into()),
        ],
    );
    let mut expected = Vec::new();
    let mut bytes = 0usize;
    for i in 0..COUNT {
        let s = sub
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .expect("message");
        let index = check_pattern(&s);
        assert_eq!(index, i, "messages out of order");
        assert_eq!(s.seq(), i);
        assert_eq!(s.lost_before(), 0);
        pattern(7, i, 2000, &mut expected);
        assert_eq!(&s[..], &expected[..]);
        bytes += s.len();
    }
    assert!(bytes > 16 * COUNT as usize);
    publisher.wait_success();
    // The publisher exited: its ring is finished and dropped once drained.
    eventually("the publisher's ring to be dropped", || {
        matches!(sub.try_recv(), Ok(None)) && sub.publisher_count() == 0
    });
}

#[test]
fn several_publishers_by_several_subscribers_keep_each_publishers_order() {
    const PUBS: usize = 3;
    const SUBS: usize = 3;
    const COUNT: u64 = 20_000;
    let broker = Broker::start();
    let ready = Arc::new(Barrier::new(SUBS + 1));
    let mut subs = Vec::new();
    for k in 0..SUBS {
        let bus = broker.bus();
        let ready = ready.clone();
        subs.push(std::thread::spawn(move || {
            let wait = [
                WaitStrategy::Park,
                WaitStrategy::default(),
                WaitStrategy::BusySpin,
            ][k];
            let mut sub = bus
                .subscriber_with("many", SubscriberOptions::new().wait(wait))
                .unwrap();
            ready.wait();
            let mut next: HashMap<u64, u64> = HashMap::new();
            for _ in 0..PUBS as u64 * COUNT {
                let s = sub
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap()
                    .expect("message");
                let index = check_pattern(&s);
                let n = next.entry(s.publisher_id()).or_default();
                assert_eq!(index, *n, "publisher {} out of order", s.publisher_id());
                *n += 1;
            }
            assert_eq!(next.len(), PUBS);
            assert!(next.values().all(|&n| n == COUNT));
        }));
    }
    ready.wait();
    let mut pubs = Vec::new();
    for k in 0..PUBS {
        let bus = broker.bus();
        pubs.push(std::thread::spawn(move || {
            let mut p = bus
                .publisher_with("many", TopicOptions::new().ring_bytes(64 * 1024))
                .unwrap();
            eventually("all subscribers", || p.subscriber_count() == Some(SUBS));
            let mut buf = Vec::new();
            for i in 0..COUNT {
                pattern(k as u64, i, 300, &mut buf);
                p.send(&buf).unwrap();
            }
            // Keep the publisher (and its ring) until the subscribers are done.
            p
        }));
    }
    let pubs: Vec<_> = pubs.into_iter().map(|t| t.join().unwrap()).collect();
    for s in subs {
        s.join().unwrap();
    }
    drop(pubs);
}

#[test]
fn late_subscriber_sees_only_new_messages() {
    let broker = Broker::start();
    let bus = broker.bus();
    let mut p = bus.publisher("late").unwrap();
    for i in 0..100u64 {
        p.send(&i.to_le_bytes()).unwrap();
    }
    let mut sub = bus.subscriber("late").unwrap();
    eventually("the subscriber to attach", || sub.publisher_count() == 1);
    eventually("the publisher to see it", || {
        p.subscriber_count() == Some(1)
    });
    assert!(
        matches!(sub.try_recv(), Ok(None)),
        "old messages must not be delivered"
    );
    for i in 100..110u64 {
        p.send(&i.to_le_bytes()).unwrap();
    }
    for i in 100..110u64 {
        let s = sub.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(&s[..], &i.to_le_bytes());
        assert_eq!(
            s.seq(),
            i,
            "sequence numbers count from the publisher's start"
        );
    }
}

#[test]
fn lossy_subscriber_learns_how_many_it_lost() {
    let broker = Broker::start();
    let bus = broker.bus();
    let mut p = bus
        .publisher_with(
            "feed",
            TopicOptions::new()
                .mode(ModeRequest::Lossy)
                .ring_bytes(4096),
        )
        .unwrap();
    let mut sub = bus.subscriber("feed").unwrap();
    eventually("attach", || sub.publisher_count() == 1);
    eventually("attach", || p.subscriber_count() == Some(1));
    // One message read: from here on every gap counts.
    p.send(&0u64.to_le_bytes()).unwrap();
    assert_eq!(sub.recv().unwrap().seq(), 0);
    const LAPPING: u64 = 10_000;
    const AFTER: u64 = 10;
    let (mut received, mut lost, mut last) = (0u64, 0u64, 0u64);
    let mut check = |s: bus_client::Sample<'_>| {
        let v = u64::from_le_bytes(s[..8].try_into().unwrap());
        assert!(s.is_intact());
        assert_eq!(v, s.seq());
        assert!(v > last);
        last = v;
        lost += s.lost_before();
        received += 1;
    };
    for i in 1..=LAPPING + AFTER {
        // Lossy publishers never wait.
        p.try_send(&i.to_le_bytes()).unwrap();
        if i == LAPPING {
            // The reader, lapped many times, resynchronises.
            if let Some(s) = sub.try_recv().unwrap() {
                check(s);
            }
        }
    }
    while let Some(s) = sub.try_recv().unwrap() {
        check(s);
    }
    assert!(lost > 0, "a 4 KiB ring cannot hold 10,000 messages");
    assert!(received >= AFTER);
    assert_eq!(last, LAPPING + AFTER);
    assert_eq!(
        received + lost,
        LAPPING + AFTER,
        "delivered + lost = published"
    );
}

#[test]
fn latency_is_recorded_and_written_as_an_interval_log() {
    let broker = Broker::start();
    let bus = broker.bus();
    let mut sub = bus
        .subscriber_with("lat", SubscriberOptions::new().record_latency(true))
        .unwrap();
    let mut p = bus.publisher("lat").unwrap();
    eventually("attach", || sub.publisher_count() == 1);
    for i in 0..500u32 {
        p.send(&i.to_le_bytes()).unwrap();
        sub.recv().unwrap();
    }
    let h = sub.latency().unwrap();
    assert_eq!(h.len(), 500);
    assert!(h.max() > 0);
    let interval = sub.take_latency().unwrap();
    assert_eq!(sub.latency().unwrap().len(), 0, "take_latency resets");
    let mut merged = bus_client::latency::new_histogram();
    merged.add(&interval).unwrap();
    let mut log = Vec::new();
    bus_client::latency::write_interval_log(
        &mut log,
        &[bus_client::latency::Interval {
            start: Duration::ZERO,
            duration: Duration::from_secs(1),
            histogram: &merged,
        }],
    )
    .unwrap();
    let text = String::from_utf8(log).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("0.000,1.000,")),
        "{text}"
    );
}

#[test]
fn subscriber_blocked_in_recv_gets_a_new_publishers_messages() {
    let broker = Broker::start();
    let bus = broker.bus();
    for wait in [WaitStrategy::Park, WaitStrategy::default()] {
        let mut sub = bus
            .subscriber_with("join", SubscriberOptions::new().wait(wait))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            // Blocks: no publisher exists yet.
            let s = sub
                .recv_timeout(Duration::from_secs(30))
                .unwrap()
                .expect("a message");
            tx.send(s.to_vec()).unwrap();
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut p = bus.publisher("join").unwrap();
        // The subscriber attaches the new ring while blocked; send until it has one.
        let got = loop {
            p.send(b"hi").unwrap();
            if let Ok(got) = rx.recv_timeout(Duration::from_millis(20)) {
                break got;
            }
        };
        assert_eq!(got, b"hi");
        t.join().unwrap();
    }
}

#[test]
fn zero_copy_loan_and_poll_fd() {
    use std::os::fd::AsFd;
    let broker = Broker::start();
    let bus = broker.bus();
    let mut sub = bus.subscriber("loan").unwrap();
    let mut p = bus.publisher("loan").unwrap();
    eventually("attach", || sub.publisher_count() == 1);
    eventually("attach", || p.subscriber_count() == Some(1));
    assert!(matches!(sub.try_recv(), Ok(None)));
    assert!(sub.prepare_to_wait(), "nothing pending: may wait");
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let mut loan = p.loan(4).unwrap();
        loan.copy_from_slice(b"abcd");
        assert_eq!(loan.commit(), 0);
        p
    });
    // The epoll fd becomes readable when the publisher wakes us.
    assert!(
        bus_core::wake::wait_readable(sub.as_fd(), Some(Duration::from_secs(30))).unwrap(),
        "no wakeup within 30 s"
    );
    let s = sub.try_recv().unwrap().expect("woken for a message");
    assert_eq!(&s[..], b"abcd");
    drop(s);
    let _p = t.join().unwrap();
}
