//! Items 7, 8, 9 and 10: peers that write impossible values into memory they own.

use std::time::{Duration, Instant};

use bus_client::ModeRequest;
use bus_core::frame::Transport;
use bus_core::layout::{RecordHeader, record_bytes};
use rustix::process::Signal;

use crate::honest::{Sent, Until, publisher_thread, round_trip, subscriber_thread, verify};
use crate::peer::{
    CLAIM, CLOSED, Conn, DgramSub, END_SEQ, HostilePub, HostileSub, LAST_POS, NEXT_POS, NEXT_SEQ,
};
use crate::support::{
    Broker, Config, DEADLINE, Rng, bus_sub, cpu_ticks, json_lines, ready_subscribers, start_broker,
    stat_json, topic_of, wait_until,
};

/// What a hostile publisher does to its ring header after one good message.
#[derive(Clone, Copy, Debug)]
pub enum Lie {
    /// claim = u64::MAX, next_pos = last_pos = the current position (the recipe).
    ClaimMax,
    /// claim random (and next_pos = last_pos = current position).
    ClaimRandom,
    /// next_pos and last_pos behind the reader.
    NextPosBehind,
    /// next_pos and last_pos far beyond anything written, claim too.
    NextPosBeyond,
    /// A record that claims to be committed with garbage header words, and garbage commit
    /// words throughout the data area.
    GarbageCommit,
    /// Every header word random, every data byte random.
    AllRandom,
}

fn corrupt(p: &HostilePub, lie: Lie, rng: &mut Rng) {
    let pos = p.header(NEXT_POS);
    let d = p.data_bytes() as u64;
    match lie {
        Lie::ClaimMax => {
            p.set_header(LAST_POS, pos);
            p.set_header(NEXT_POS, pos);
            p.set_header(CLAIM, u64::MAX);
        }
        Lie::ClaimRandom => {
            p.set_header(LAST_POS, pos);
            p.set_header(NEXT_POS, pos);
            p.set_header(CLAIM, rng.next_u64() | (1 << 63));
        }
        Lie::NextPosBehind => {
            p.set_header(LAST_POS, 0);
            p.set_header(NEXT_POS, 0);
            p.set_header(CLAIM, pos + 2 * d + 64);
        }
        Lie::NextPosBeyond => {
            let far = pos + (1 << 40) + 64 * rng.range(0, 1000);
            p.set_header(LAST_POS, far);
            p.set_header(NEXT_POS, far);
            p.set_header(NEXT_SEQ, 1 << 40);
            p.set_header(CLAIM, far + d);
        }
        Lie::GarbageCommit => {
            // The next record "committed", with an impossible length and sequence.
            p.set_record_word(pos, 8, rng.next_u64());
            p.set_record_word(pos, 16, rng.next_u64());
            p.set_record_word(pos, 24, RecordHeader::pack_meta(u32::MAX, 1, 0));
            p.set_record_word(pos, 0, pos + 1);
            // Every other 64-byte line gets a random commit word, some of them plausible.
            let mut at = pos + 64;
            while at < pos + d {
                let v = if rng.range(0, 2) == 0 {
                    at + 1
                } else {
                    rng.next_u64()
                };
                p.set_record_word(at, 8, rng.next_u64());
                p.set_record_word(at, 24, rng.next_u64());
                p.set_record_word(at, 0, v);
                at += 64;
            }
            p.set_header(LAST_POS, pos + 64 * rng.range(0, d / 64));
            p.set_header(NEXT_POS, pos + d);
        }
        Lie::AllRandom => {
            let mut junk = vec![0u8; p.data_bytes()];
            rng.fill(&mut junk);
            p.write_data(0, &junk);
            for off in [NEXT_SEQ, LAST_POS, END_SEQ, CLOSED, CLAIM, NEXT_POS] {
                p.set_header(off, rng.next_u64());
            }
        }
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// CPU of `pid` over about one second while `p` sends wake datagrams every 100 ms (fraction
/// of one core).
fn cpu_while_waking(pid: u32, p: &mut HostilePub) -> f64 {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        p.wake_all();
    }
    let c1 = cpu_ticks(pid);
    (c1 - c0) as f64 / hz / t0.elapsed().as_secs_f64()
}

/// Max CPU share a process may use while nothing legitimate happens: a spin detector.
const SPIN: f64 = 0.25;

fn frozen_ring_broker(driver: &str, topic: &str, lossy: bool) -> Broker {
    let mode = if lossy { "lossy" } else { "reliable" };
    let cfg = Config::new()
        .limits("stall_timeout_ms = 300")
        .topic(&format!(
            "name = \"{topic}\"\nmode = \"{mode}\"\nring_bytes = 65536"
        ));
    start_broker(driver).config(cfg).run()
}

/// Item 7: a ring with impossible header values does not freeze the broker (which reads it
/// for a datagram subscriber): it answers new clients, stays off the CPU, exits on SIGTERM.
pub fn broker_freeze(driver: &str, lie: Lie, lossy: bool) {
    let topic = "item07.frozen";
    let mut broker = frozen_ring_broker(driver, topic, lossy);
    let mut rng = Rng::seeded(&format!("item07 {lie:?}"));
    let mut dsub = DgramSub::subscribe(broker.socket(), topic, ModeRequest::Any);
    let mut p = HostilePub::create(broker.socket(), topic, 65536, ModeRequest::Any);
    p.publish(b"good message");
    let d = dsub.deliver();
    assert_eq!(
        (d.publisher_id, d.seq, d.lost_before, &d.payload[..]),
        (p.grant.publisher_id, 0, 0, &b"good message"[..])
    );
    corrupt(&p, lie, &mut rng);
    p.wake_all();

    // New clients are served.
    let mut c = Conn::connect(broker.socket(), Transport::Datagram);
    let doc = c.stats();
    assert!(topic_of(&doc, topic).is_some(), "{doc}");
    c.ping();
    let cpu = cpu_while_waking(broker.pid(), &mut p);
    eprintln!("item07 {lie:?}: broker CPU {:.0}% of a core", cpu * 100.0);
    assert!(
        cpu < SPIN,
        "{lie:?}: the broker used {:.0}% of a core for 1 s after a ring went bad (spinning?)",
        cpu * 100.0
    );
    let mut c2 = Conn::connect(broker.socket(), Transport::Shm);
    c2.ping();
    round_trip(broker.socket(), "item07.other").expect("an honest round trip on another topic");
    // Nothing else is delivered from a ring whose header is garbage... except what it may
    // legitimately look like: the datagram subscriber is not evicted or dropped meanwhile.
    while let Some(ev) = dsub.next(Duration::ZERO) {
        if let crate::peer::DgramEvent::Eof = ev {
            panic!("{lie:?}: the broker dropped the datagram subscriber's connection");
        }
    }
    broker.signal(Signal::TERM);
    let status = broker.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "{lie:?}: SIGTERM exits cleanly: {}",
        broker.stderr()
    );
}

/// Item 8: a `bus sub` (bus-client, default wait strategy) on a ring with impossible header
/// values does not spin once it has drained the good message.
pub fn reader_spin(driver: &str, lie: Lie, lossy: bool) {
    let topic = "item08.frozen";
    let broker = frozen_ring_broker(driver, topic, lossy);
    let mut rng = Rng::seeded(&format!("item08 {lie:?}"));
    let mut sub = bus_sub(&broker, topic, &[]);
    wait_until("bus sub is subscribed", || {
        ready_subscribers(&broker, topic) >= 1
    });
    let mut p = HostilePub::create(broker.socket(), topic, 65536, ModeRequest::Any);
    p.wait_subscribers(1);
    p.publish(b"good message");
    wait_until("bus sub prints the good message", || {
        json_lines(&sub.stdout())
            .iter()
            .any(|l| l["text"] == "good message")
    });
    corrupt(&p, lie, &mut rng);
    p.wake_all();
    // Let it notice (a reader that handles the garbage reports it and parks again).
    std::thread::sleep(Duration::from_millis(200));
    if sub.is_running() {
        let cpu = cpu_while_waking(sub.pid(), &mut p);
        eprintln!("item08 {lie:?}: bus sub CPU {:.0}% of a core", cpu * 100.0);
        assert!(
            cpu < SPIN,
            "{lie:?}: bus sub used {:.0}% of a core for 1 s with nothing to read (spinning?)\n{}",
            cpu * 100.0,
            sub.all_output()
        );
    }
    // It may drop the bad ring, but must still be a working subscriber: an honest publisher's
    // messages arrive.
    assert!(sub.is_running(), "bus sub exited: {}", sub.all_output());
    let honest: Vec<Vec<u8>> = (0..5).map(|i| format!("honest {i}").into_bytes()).collect();
    let (id, h) = publisher_thread(broker.socket(), topic, false, honest);
    h.join().unwrap().expect("honest publisher");
    wait_until("bus sub prints the honest messages", || {
        json_lines(&sub.stdout())
            .iter()
            .filter(|l| l["publisher"] == id)
            .count()
            >= 5
    });
}

/// The three hostile publishers of item 9.
#[derive(Clone, Copy, Debug)]
enum Rogue {
    /// Sets only next_pos to 2^40.
    NextPosOnly,
    /// Random bytes all over its data area.
    RandomBytes,
    /// One valid record, then next_pos inflated.
    OneThenInflate,
}

/// Item 9: hostile publishers on a reliable topic with a short stall limit do not get honest
/// subscribers that keep reading evicted, and the honest publisher's messages still arrive.
pub fn honest_not_evicted(driver: &str) {
    let topic = "item09.evict";
    let stall_ms = 300u64;
    let cfg = Config::new()
        .limits(&format!("stall_timeout_ms = {stall_ms}"))
        .topic(&format!(
            "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = 16384"
        ));
    let broker = start_broker(driver).config(cfg).run();
    let mut rng = Rng::seeded("item09");
    let mut child = bus_sub(&broker, topic, &[]);
    let lib = subscriber_thread(broker.socket(), topic, false, Until::Stop, None);
    wait_until("both honest subscribers are live", || {
        ready_subscribers(&broker, topic) >= 2
    });
    let mut rogues = Vec::new();
    for rogue in [
        Rogue::NextPosOnly,
        Rogue::RandomBytes,
        Rogue::OneThenInflate,
    ] {
        let mut p = HostilePub::create(broker.socket(), topic, 16384, ModeRequest::Reliable);
        p.wait_subscribers(2);
        match rogue {
            Rogue::NextPosOnly => p.set_header(NEXT_POS, 1 << 40),
            Rogue::RandomBytes => {
                let mut junk = vec![0u8; p.data_bytes()];
                rng.fill(&mut junk);
                p.write_data(0, &junk);
            }
            Rogue::OneThenInflate => {
                p.publish(b"one valid record");
                p.set_header(NEXT_POS, (1 << 40) + 64 * rng.range(1, 1 << 20));
            }
        }
        p.wake_all();
        rogues.push((rogue, p));
    }
    // An honest publisher, for 10 stall limits (the broker checks about once a second).
    let n = 120usize;
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| format!("honest {i}").into_bytes()).collect();
    let socket = broker.socket().to_owned();
    let m2 = msgs.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let honest = std::thread::spawn(move || {
        let bus = bus_client::Bus::connect(&socket).map_err(|e| e.to_string())?;
        let mut p = bus.publisher(topic).map_err(|e| e.to_string())?;
        tx.send(p.id()).unwrap();
        for m in &m2 {
            p.send_timeout(m, DEADLINE).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(stall_ms * 10 / n as u64));
        }
        // Keep the publisher until the subscribers have read everything.
        std::thread::sleep(Duration::from_millis(200));
        Ok::<(), String>(())
    });
    let honest_id = rx.recv_timeout(DEADLINE).expect("honest publisher created");
    while !honest.is_finished() {
        for (_, p) in &mut rogues {
            p.wake_all();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    honest
        .join()
        .unwrap()
        .expect("honest publisher sends everything");
    wait_until("bus sub prints every honest message", || {
        json_lines(&child.stdout())
            .iter()
            .filter(|l| l["publisher"] == honest_id)
            .count()
            >= n
            || !child.is_running()
    });
    assert!(
        child.is_running(),
        "bus sub exited (evicted?): {}",
        child.all_output()
    );
    assert!(
        !child.all_output().contains("evicted"),
        "bus sub was evicted: {}",
        child.all_output()
    );
    let lines = json_lines(&child.stdout());
    let seqs: Vec<u64> = lines
        .iter()
        .filter(|l| l["publisher"] == honest_id)
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (0..n as u64).collect::<Vec<_>>(),
        "bus sub: honest seqs"
    );
    let doc = stat_json(&broker);
    let t = topic_of(&doc, topic).expect("the topic");
    wait_until("the bus-client subscriber has every honest message", || {
        lib.count() >= n || lib.handle.is_finished()
    });
    let r = lib.join();
    assert!(
        r.error.is_none(),
        "the bus-client subscriber failed (evicted?): {:?}",
        r.error
    );
    let mut sent = Sent::new();
    sent.insert(honest_id, msgs);
    verify("item09 bus-client subscriber", &r.got, &sent, true);
    assert_eq!(t["evictions"], 0, "no subscriber was evicted: {t}");
    assert_eq!(
        t["subscribers"].as_array().unwrap().len(),
        2,
        "both honest subscribers still there: {t}"
    );
    drop(rogues);
}

/// How the hostile subscriber of item 10 lies about its cursor.
#[derive(Clone, Copy, Debug)]
pub enum Cursor {
    /// Behind the writer's window, a different value every time.
    Behind,
    /// Ahead of next_pos.
    Ahead,
    /// Inside the window but not a multiple of 64.
    Misaligned,
    /// Inside a record.
    MidRecord,
    /// Alternating between two real record positions that both hold the writer back, flipping
    /// every second (so a once-a-second sampler always sees it "move").
    Oscillating,
    /// The same, flipping every 50 ms.
    OscillatingFast,
}

/// Item 10: a reliable subscriber that lies about its cursor does not block an honest
/// publisher forever; the publisher then publishes N more that an honest subscriber receives.
pub fn publisher_not_blocked(driver: &str, how: Cursor) {
    let topic = "item10.liar";
    let data = 4096u64;
    let cfg = Config::new()
        .limits("stall_timeout_ms = 300")
        .topic(&format!(
            "name = \"{topic}\"\nmode = \"reliable\"\nring_bytes = {data}"
        ));
    let broker = start_broker(driver).config(cfg).run();
    let mut rng = Rng::seeded(&format!("item10 {how:?}"));
    let seed = rng.next_u64();
    let honest_sub = subscriber_thread(broker.socket(), topic, false, Until::Stop, None);
    let mut liar = HostileSub::subscribe(broker.socket(), topic, ModeRequest::Reliable);
    // Enough to fill the ring several times over, then N more.
    let n = 300u64;
    let lens: Vec<usize> = (0..n)
        .map(|i| (crate::support::mix(seed ^ i) % 2016) as usize)
        .collect();
    let msgs: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (0..l).map(|j| (i * 13 + j) as u8).collect())
        .collect();
    // Absolute record positions, for the lies that use real ones.
    let mut starts = Vec::with_capacity(msgs.len() + 1);
    let mut at = 0u64;
    for &l in &lens {
        starts.push(at);
        at += record_bytes(l) as u64;
    }
    starts.push(at);
    let (id, publisher) = publisher_thread(broker.socket(), topic, false, msgs.clone());
    liar.wait_rings(1);
    let slot = liar.rings[0].0.slot as usize;
    let mut tick = 0u64;
    let started = Instant::now();
    let end = started + DEADLINE;
    let mut evicted = false;
    while !publisher.is_finished() && Instant::now() < end {
        evicted |= liar.pump();
        let np = liar.ring_header(0, NEXT_POS);
        let k = starts.partition_point(|&s| s < np);
        let rec = lens.get(k).map_or(64, |&l| record_bytes(l) as u64);
        let need = (np + rec).saturating_sub(data);
        // Real record starts still in the window that hold the writer back.
        let holding: Vec<u64> = starts[..k]
            .iter()
            .copied()
            .filter(|&s| s + data >= np && s < need)
            .collect();
        let v = match how {
            Cursor::Behind => np.saturating_sub(data + 64 * (1 + tick % 50)),
            Cursor::Ahead => np + 64 * (1 + tick % 1000),
            Cursor::Misaligned => np.saturating_sub(data) + 1 + 8 * (tick % 7),
            Cursor::MidRecord => holding
                .first()
                .map_or(np.saturating_sub(data), |s| s + 8 + 8 * (tick % 3)),
            Cursor::Oscillating | Cursor::OscillatingFast => {
                // Three values that all hold the writer back, real record starts first. Flipped
                // once a second, two samples 1..2 s apart never see the same one.
                let lo = np.saturating_sub(data);
                let mut vals = holding.clone();
                let mut at = lo.next_multiple_of(64);
                while vals.len() < 3 && at < need {
                    if !vals.contains(&at) {
                        vals.push(at);
                    }
                    at += 64;
                }
                vals.truncate(3);
                let flip = if matches!(how, Cursor::Oscillating) {
                    (started.elapsed().as_millis() / 1000) as u64
                } else {
                    tick
                };
                if vals.is_empty() {
                    lo
                } else {
                    vals[(flip % vals.len() as u64) as usize]
                }
            }
        };
        liar.set_cursor(slot, v);
        tick += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        publisher.is_finished(),
        "{how:?}: the honest publisher is still blocked after {DEADLINE:?} (liar evicted: {evicted}, writer at {})",
        liar.ring_header(0, NEXT_POS)
    );
    publisher
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{how:?}: honest publisher: {e}"));
    // Then N more, which the honest subscriber receives too.
    let more: Vec<Vec<u8>> = (0..100u64)
        .map(|i| format!("more {i}").into_bytes())
        .collect();
    let (id2, h2) = publisher_thread(broker.socket(), topic, false, more.clone());
    let end = Instant::now() + DEADLINE;
    while !h2.is_finished() && Instant::now() < end {
        liar.pump();
        for i in 0..liar.rings.len() {
            liar.set_cursor(liar.rings[i].0.slot as usize, rng.next_u64());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(h2.is_finished(), "{how:?}: the second publisher is blocked");
    h2.join().unwrap().expect("second publisher");
    let want = (n + 100) as usize;
    wait_until("the honest subscriber has every message", || {
        honest_sub.count() >= want || honest_sub.handle.is_finished()
    });
    let r = honest_sub.join();
    assert!(r.error.is_none(), "honest subscriber: {:?}", r.error);
    let mut sent = Sent::new();
    sent.insert(id, msgs);
    sent.insert(id2, more);
    verify(
        &format!("item10 {how:?} honest subscriber"),
        &r.got,
        &sent,
        false,
    );
}
