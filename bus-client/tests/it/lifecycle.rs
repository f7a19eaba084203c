//! Peers and the broker going away.

use std::time::Duration;

use bus_client::{
    Bus, ConnectError, ModeRequest, PublishError, RecvError, SubscribeError, TopicOptions,
};

use crate::harness::{Broker, BrokerExt, ChildClient, check_pattern, eventually};

#[test]
fn no_broker_says_where_it_looked_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    let err = Bus::connect(&path).unwrap_err();
    assert!(matches!(err, ConnectError::NoBroker { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
    assert!(
        msg.contains("bus-broker") && msg.contains("MEMBUS_SOCKET"),
        "{msg}"
    );
}

#[test]
fn killed_subscriber_does_not_block_a_reliable_publisher() {
    let broker = Broker::start();
    let bus = broker.bus();
    let mut p = bus
        .publisher_with(
            "stuck",
            TopicOptions::new()
                .mode(ModeRequest::Reliable)
                .ring_bytes(4096),
        )
        .unwrap();
    let mut child = ChildClient::spawn(
        "stuck-subscriber",
        &broker,
        &[("MEMBUS_IT_TOPIC", "stuck".into())],
    );
    child.expect_line("READY");
    eventually("the stuck subscriber", || p.subscriber_count() == Some(1));
    // Fill the ring: the subscriber never reads.
    let mut sent = 0u64;
    loop {
        match p.try_send(&sent.to_le_bytes()) {
            Ok(_) => sent += 1,
            Err(PublishError::Full(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(sent < 1_000_000, "a 4 KiB reliable ring must fill up");
    }
    assert!(sent > 0);
    assert!(matches!(
        p.send_timeout(b"x", Duration::from_millis(10)),
        Err(PublishError::Timeout { .. })
    ));
    child.kill();
    // The broker's PEER_GONE releases the publisher.
    for i in 0..1000u64 {
        p.send_timeout(&i.to_le_bytes(), Duration::from_secs(30))
            .expect("the dead subscriber must not block the publisher");
    }
    assert_eq!(p.subscriber_count(), Some(0));
}

#[test]
fn killed_publisher_leaves_its_messages_to_be_drained() {
    const COUNT: u64 = 1000;
    let broker = Broker::start();
    let bus = broker.bus();
    let mut sub = bus.subscriber("dying").unwrap();
    let mut child = ChildClient::spawn(
        "publisher",
        &broker,
        &[
            ("MEMBUS_IT_TOPIC", "dying".into()),
            ("MEMBUS_IT_COUNT", COUNT.to_string()),
            ("MEMBUS_IT_MAX_BODY", "100".into()),
            ("MEMBUS_IT_LINGER", "1".into()),
        ],
    );
    // The child publishes everything (the default 1 MiB ring holds it), then we kill it
    // before reading a single message.
    child.expect_line("DONE");
    child.kill();
    for i in 0..COUNT {
        let s = sub
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .expect("message");
        assert_eq!(check_pattern(&s), i);
    }
    // PEER_GONE arrived: once drained the ring is dropped.
    eventually("the dead publisher's ring to be dropped", || {
        matches!(sub.try_recv(), Ok(None)) && sub.publisher_count() == 0
    });
}

#[test]
fn broker_death_is_reported_and_rings_still_drain() {
    let mut broker = Broker::start();
    let bus = broker.bus();
    let mut sub = bus.subscriber("bye").unwrap();
    let mut p = bus.publisher("bye").unwrap();
    eventually("attach", || sub.publisher_count() == 1);
    eventually("attach", || p.subscriber_count() == Some(1));
    for i in 0..10u64 {
        p.send(&i.to_le_bytes()).unwrap();
    }
    broker.kill();
    eventually("the client to notice", || !bus.is_connected());
    for i in 0..10u64 {
        let s = sub.try_recv().unwrap().expect("already in the ring");
        assert_eq!(&s[..], &i.to_le_bytes());
    }
    let err = sub.try_recv().unwrap_err();
    assert!(matches!(err, RecvError::BrokerGone { .. }), "{err:?}");
    assert!(matches!(
        sub.recv_timeout(Duration::from_secs(5)),
        Err(RecvError::BrokerGone { .. })
    ));
    let err = p.send(b"x").unwrap_err();
    assert!(matches!(err, PublishError::BrokerGone { .. }), "{err:?}");
    assert_eq!(err.into_payload(), Some(&b"x"[..]));
    let err = bus.subscriber("bye").unwrap_err();
    assert!(matches!(err, SubscribeError::BrokerGone { .. }), "{err:?}");
    assert!(err.to_string().contains("reconnect"), "{err}");
}

#[test]
fn broker_errors_carry_code_and_message() {
    let broker = Broker::start();
    let bus = broker.bus();
    let _p = bus
        .publisher_with("modes", TopicOptions::new().mode(ModeRequest::Reliable))
        .unwrap();
    let err = bus
        .subscriber_with(
            "modes",
            bus_client::SubscriberOptions::new().mode(ModeRequest::Lossy),
        )
        .unwrap_err();
    match err {
        SubscribeError::Refused(e) => {
            assert_eq!(e.code, bus_client::ErrorCode::TopicConflict);
            assert!(e.message.contains("modes"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let mut p = bus.publisher("small").unwrap();
    let too_big = vec![0u8; p.max_message_bytes() + 1];
    assert!(matches!(
        p.send(&too_big),
        Err(PublishError::TooLarge { .. })
    ));
}
