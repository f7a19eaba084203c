//! Items 1 and 2: datagram publishers' backlogs, concurrency and churn lose nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use bus_client::ModeRequest;

use crate::honest::{Sent, Until, publisher_thread, subscriber_thread, verify};
use crate::peer::{DgramPub, DgramSub};
use crate::support::{Config, Rng, payload, start_broker, topic_of};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// CLOSE_PUBLISHER, expecting OK.
    Close,
    /// Close the socket.
    Disconnect,
}

/// Item 1: 100 PUBLISH of 30 KB into a small reliable ring with slow subscribers, then the
/// publisher leaves: every message arrives, in order, none lost.
pub fn backlog_at_close(driver: &str, end: End, with_datagram_sub: bool) {
    let topic = "item01.backlog";
    let cfg = Config::new().topic(&format!(
        "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 131072"
    ));
    let broker = start_broker(driver).config(cfg).run();
    let mut rng = Rng::seeded("item01");
    let count = 100u64;
    let size = 30_000 + rng.range(0, 2_000) as usize;
    let msgs: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let mut m = payload(7, 1, i, 1);
            m.resize(size, 0);
            m[..8].copy_from_slice(&i.to_le_bytes());
            for (j, b) in m.iter_mut().enumerate().skip(8) {
                *b = (i as usize * 7 + j) as u8;
            }
            m
        })
        .collect();

    // A slow shared-memory subscriber (bus-client), and maybe a slow datagram one (raw).
    let shm = subscriber_thread(broker.socket(), topic, false, Until::Count(100), Some(1));
    let dgram = with_datagram_sub.then(|| {
        let mut s = DgramSub::subscribe(broker.socket(), topic, ModeRequest::Any);
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 100 {
                got.push(s.deliver());
                std::thread::sleep(Duration::from_millis(2));
            }
            got
        })
    });

    let p = DgramPub::create(broker.socket(), topic, ModeRequest::Reliable);
    let id = p.id();
    for m in &msgs {
        p.publish(m);
    }
    match end {
        End::Close => p.close(),
        End::Disconnect => drop(p),
    }
    let mut sent = Sent::new();
    sent.insert(id, msgs);
    let r = shm.join();
    assert!(r.error.is_none(), "shared-memory subscriber: {:?}", r.error);
    verify("item01 shared-memory subscriber", &r.got, &sent, false);
    if let Some(h) = dgram {
        let got = h.join().expect("datagram subscriber thread");
        verify("item01 datagram subscriber", &got, &sent, false);
    }
}

/// Item 2: 4 datagram and 2 shared-memory publishers, 800 messages each of 0..3000 bytes, one
/// reliable topic, a datagram and a shared-memory subscriber: all 4,800 to each, none lost,
/// nobody evicted.
pub fn concurrent_publishers(driver: &str) {
    let topic = "item02.concurrent";
    let cfg = Config::new().topic(&format!(
        "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 16384"
    ));
    let broker = start_broker(driver).config(cfg).run();
    let seed = Rng::seeded("item02").next_u64();
    let per = 800u64;
    let total = (6 * per) as usize;
    let shm = subscriber_thread(broker.socket(), topic, false, Until::Count(total), None);
    let mut dsub = DgramSub::subscribe(broker.socket(), topic, ModeRequest::Any);
    let dgram = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < total {
            got.push(dsub.deliver());
        }
        got
    });

    let mut sent = Sent::new();
    let mut raw = Vec::new();
    for who in 0..4u64 {
        let msgs: Vec<Vec<u8>> = (0..per).map(|i| payload(seed, who, i, 3000)).collect();
        let socket = broker.socket().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let m2 = msgs.clone();
        raw.push(std::thread::spawn(move || {
            let mut p = DgramPub::create(&socket, topic, ModeRequest::Reliable);
            tx.send(p.id()).unwrap();
            for m in &m2 {
                p.publish(m);
            }
            p.assert_no_error();
            p.close();
        }));
        sent.insert(rx.recv().unwrap(), msgs);
    }
    let mut client = Vec::new();
    for who in 4..6u64 {
        let msgs: Vec<Vec<u8>> = (0..per).map(|i| payload(seed, who, i, 3000)).collect();
        let (id, h) = publisher_thread(broker.socket(), topic, false, msgs.clone());
        sent.insert(id, msgs);
        client.push(h);
    }
    for h in raw {
        h.join().expect("datagram publisher thread");
    }
    for h in client {
        h.join().unwrap().expect("bus-client publisher");
    }
    let got = dgram.join().expect("datagram subscriber thread");
    verify("item02 datagram subscriber", &got, &sent, false);
    let r = shm.join();
    assert!(r.error.is_none(), "shared-memory subscriber: {:?}", r.error);
    verify("item02 shared-memory subscriber", &r.got, &sent, false);
    let mut c = crate::peer::Conn::connect(broker.socket(), bus_core::frame::Transport::Datagram);
    let doc = c.stats();
    assert_eq!(
        topic_of(&doc, topic).expect("the topic")["evictions"],
        0,
        "nobody evicted"
    );
}

/// Item 2, churn: publishers come and go in two lanes (datagram and shared memory
/// alternating), so slots are reused while subscribers still drain the old rings.
pub fn churning_publishers(driver: &str) {
    let topic = "item02.churn";
    let cfg = Config::new().topic(&format!(
        "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 8192"
    ));
    let broker = start_broker(driver).config(cfg).run();
    let mut rng = Rng::seeded("item02 churn");
    let seed = rng.next_u64();
    for round in 0..3u64 {
        let lanes = 2u64;
        let per_lane = 5u64;
        let n = 150 + rng.range(0, 100);
        let total = (lanes * per_lane * n) as usize;
        let shm = subscriber_thread(broker.socket(), topic, false, Until::Count(total), Some(64));
        let mut dsub = DgramSub::subscribe(broker.socket(), topic, ModeRequest::Any);
        let dgram = std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < total {
                got.push(dsub.deliver());
            }
            got
        });
        let mut handles = Vec::new();
        for lane in 0..lanes {
            let socket = broker.socket().to_owned();
            handles.push(std::thread::spawn(move || {
                let mut sent = BTreeMap::new();
                for k in 0..per_lane {
                    let who = round * 100 + lane * 10 + k;
                    let msgs: Vec<Vec<u8>> = (0..n).map(|i| payload(seed, who, i, 1500)).collect();
                    if (k + lane) % 2 == 0 {
                        let mut p = DgramPub::create(&socket, topic, ModeRequest::Reliable);
                        for m in &msgs {
                            p.publish(m);
                        }
                        p.assert_no_error();
                        let id = p.id();
                        p.close();
                        sent.insert(id, msgs);
                    } else {
                        let (id, h) = publisher_thread(&socket, topic, false, msgs.clone());
                        h.join().unwrap().expect("bus-client publisher");
                        sent.insert(id, msgs);
                    }
                }
                sent
            }));
        }
        let mut sent = Sent::new();
        for h in handles {
            sent.extend(h.join().expect("publisher lane"));
        }
        let what = format!("item02 churn round {round}");
        let got = dgram.join().expect("datagram subscriber thread");
        verify(&format!("{what}: datagram subscriber"), &got, &sent, false);
        let r = shm.join();
        assert!(
            r.error.is_none(),
            "{what}: shared-memory subscriber: {:?}",
            r.error
        );
        verify(
            &format!("{what}: shared-memory subscriber"),
            &r.got,
            &sent,
            false,
        );
    }
}
