//! Shared-memory and datagram clients on one topic, both ways.

use std::time::Duration;

use bus_client::{Subscriber, TopicOptions, Transport};

use crate::harness::{Broker, BrokerExt, eventually};

/// Sizes that test message boundaries: empty, tiny, odd, and the largest allowed.
fn sizes(max: usize) -> Vec<usize> {
    vec![0, 1, 7, 0, 100, max, 4096, 0, max - 1, 33, max]
}

fn message(k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + k * 7) as u8).collect()
}

fn expect_all(sub: &mut Subscriber, sizes: &[usize]) {
    for (k, &len) in sizes.iter().enumerate() {
        let s = sub
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap_or_else(|| panic!("message {k} missing"));
        assert_eq!(s.len(), len, "message {k}: boundary");
        assert_eq!(&s[..], &message(k, len)[..], "message {k}: bytes");
        assert_eq!(s.seq(), k as u64);
    }
}

#[test]
fn shared_memory_and_datagram_clients_interoperate_both_ways() {
    let broker = Broker::start();
    let shm_bus = broker.bus_with(Transport::SharedMemory);
    let dg_bus = broker.bus_with(Transport::Datagram);
    // A 256 KiB ring carries the largest datagram message (65472 bytes).
    let opts = TopicOptions::new()
        .ring_bytes(256 * 1024)
        .max_message_bytes(65_472);

    let mut shm_sub = shm_bus.subscriber("mixed").unwrap();
    let mut dg_sub = dg_bus.subscriber("mixed").unwrap();
    assert!(shm_sub.is_shared_memory());
    assert!(!dg_sub.is_shared_memory());

    // Datagram publisher -> both subscribers.
    let mut dg_pub = dg_bus.publisher_with("mixed", opts).unwrap();
    assert!(!dg_pub.is_shared_memory());
    let max = dg_pub.max_message_bytes();
    assert_eq!(max, 65_472);
    eventually("the shm subscriber to get the relay ring", || {
        shm_sub.publisher_count() == 1
    });
    let sz = sizes(max);
    for (k, &len) in sz.iter().enumerate() {
        dg_pub.send(&message(k, len)).unwrap();
    }
    expect_all(&mut shm_sub, &sz);
    expect_all(&mut dg_sub, &sz);
    drop(dg_pub);

    // Shared-memory publisher -> both subscribers.
    let mut shm_pub = shm_bus.publisher_with("mixed", opts).unwrap();
    assert!(shm_pub.is_shared_memory());
    eventually("the shm subscriber to attach", || {
        let _ = shm_sub.try_recv();
        shm_sub.publisher_count() == 1
    });
    // Both subscribers: the datagram one through the broker's cursor page for it.
    eventually("the publisher to see both subscribers", || {
        shm_pub.subscriber_count() == Some(2)
    });
    // The broker attaches the datagram subscriber inside itself, at once.
    let max = shm_pub.max_message_bytes();
    let sz = sizes(max.min(65_472));
    for (k, &len) in sz.iter().enumerate() {
        let mut loan = shm_pub.loan(len).unwrap();
        loan.copy_from_slice(&message(k, len));
        loan.commit();
    }
    expect_all(&mut shm_sub, &sz);
    expect_all(&mut dg_sub, &sz);
}

#[test]
fn datagram_stream_keeps_order_under_load() {
    const COUNT: u64 = 20_000;
    let broker = Broker::start();
    let dg_bus = broker.bus_with(Transport::Datagram);
    let shm_bus = broker.bus();
    let mut dg_sub = dg_bus.subscriber("dgload").unwrap();
    let mut shm_sub = shm_bus.subscriber("dgload").unwrap();
    // The shm subscriber reads concurrently: a reliable relay ring that nobody drains fills up,
    // and then the broker refuses the datagram publisher's messages (too-slow).
    let shm_reader = std::thread::spawn(move || {
        // It may attach after the first messages: it sees an ordered suffix.
        let mut last = None;
        while last != Some(COUNT - 1) {
            let s = shm_sub
                .recv_timeout(Duration::from_secs(30))
                .unwrap()
                .expect("message");
            let v = u64::from_le_bytes(s[..8].try_into().unwrap());
            if let Some(l) = last {
                assert_eq!(v, l + 1);
            }
            last = Some(v);
        }
    });
    let t = std::thread::spawn(move || {
        let mut p = dg_bus.publisher("dgload").unwrap();
        for i in 0..COUNT {
            p.send(&i.to_le_bytes()).unwrap();
        }
        (p, dg_bus)
    });
    for i in 0..COUNT {
        let s = dg_sub
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        assert_eq!(&s[..], &i.to_le_bytes());
        assert_eq!(s.lost_before(), 0);
    }
    shm_reader.join().unwrap();
    let _ = t.join().unwrap();
}
