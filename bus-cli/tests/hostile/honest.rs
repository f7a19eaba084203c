//! Honest peers (bus-client in threads) and the bookkeeping that checks what they received.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bus_client::{
    Bus, BusOptions, ModeRequest, RecvError, SubscriberOptions, TopicOptions, Transport,
};

use crate::peer::Delivered;
use crate::support::DEADLINE;

/// How a bus-client subscriber thread ends.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// After this many messages (then it reads a little longer to catch duplicates).
    Count(usize),
    /// When the flag is set.
    Stop,
}

pub struct SubThread {
    pub handle: JoinHandle<SubResult>,
    pub stop: Arc<AtomicBool>,
    pub subscriber_id: u64,
    pub received: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug, Default)]
pub struct SubResult {
    pub got: Vec<Delivered>,
    /// A fatal receive error (evicted, broker gone, ...).
    pub error: Option<String>,
    /// Non-fatal errors (BadRing: a hostile publisher's ring dropped).
    pub warnings: Vec<String>,
}

impl SubThread {
    /// Messages received so far.
    pub fn count(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    pub fn join(self) -> SubResult {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("subscriber thread panicked")
    }
}

/// A bus-client subscriber in its own thread, subscribed (live) when this returns.
/// `pause_every`: sleep 1 ms after every that many messages (a slow reader).
pub fn subscriber_thread(
    socket: &Path,
    topic: &str,
    datagram: bool,
    until: Until,
    pause_every: Option<usize>,
) -> SubThread {
    let socket: PathBuf = socket.to_owned();
    let topic = topic.to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let received2 = received.clone();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let opts = BusOptions::new().transport(if datagram {
            Transport::Datagram
        } else {
            Transport::SharedMemory
        });
        let bus = match Bus::connect_with(&socket, opts) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(format!("connect: {e}")));
                return SubResult::default();
            }
        };
        let mut sub =
            match bus.subscriber_with(&topic, SubscriberOptions::new().mode(ModeRequest::Any)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(format!("subscribe: {e}")));
                    return SubResult::default();
                }
            };
        let _ = tx.send(Ok(sub.id()));
        let mut r = SubResult::default();
        let end = Instant::now() + DEADLINE * 3;
        let mut linger: Option<Instant> = None;
        loop {
            if stop2.load(Ordering::Relaxed) && matches!(until, Until::Stop) {
                break;
            }
            if let Until::Count(n) = until
                && r.got.len() >= n
                && linger.is_none()
            {
                linger = Some(Instant::now() + Duration::from_millis(300));
            }
            if linger.is_some_and(|l| Instant::now() > l) || Instant::now() > end {
                break;
            }
            match sub.recv_timeout(Duration::from_millis(50)) {
                Ok(Some(s)) => {
                    r.got.push(Delivered {
                        publisher_id: s.publisher_id(),
                        seq: s.seq(),
                        lost_before: s.lost_before(),
                        payload: s.to_vec(),
                    });
                    received2.store(r.got.len(), Ordering::Relaxed);
                    if let Some(k) = pause_every
                        && r.got.len().is_multiple_of(k)
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Ok(None) => {}
                Err(e @ (RecvError::BadRing { .. } | RecvError::Lapped { .. })) => {
                    r.warnings.push(e.to_string())
                }
                Err(e) => {
                    r.error = Some(e.to_string());
                    break;
                }
            }
        }
        r
    });
    let subscriber_id = rx
        .recv_timeout(DEADLINE)
        .expect("the subscriber thread subscribes in time")
        .unwrap_or_else(|e| panic!("bus-client subscriber: {e}"));
    SubThread {
        handle,
        stop,
        subscriber_id,
        received,
    }
}

/// A bus-client publisher thread: sends `payloads` in order, then drops the publisher.
/// Returns its publisher id once created; the handle yields Ok(()) or the send error.
pub fn publisher_thread(
    socket: &Path,
    topic: &str,
    datagram: bool,
    payloads: Vec<Vec<u8>>,
) -> (u64, JoinHandle<Result<(), String>>) {
    let socket: PathBuf = socket.to_owned();
    let topic = topic.to_owned();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let opts = BusOptions::new().transport(if datagram {
            Transport::Datagram
        } else {
            Transport::SharedMemory
        });
        let bus = Bus::connect_with(&socket, opts).map_err(|e| format!("connect: {e}"))?;
        let mut p = match bus.publisher_with(&topic, TopicOptions::new()) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(format!("publisher: {e}")));
                return Err(format!("publisher: {e}"));
            }
        };
        let _ = tx.send(Ok(p.id()));
        for (i, m) in payloads.iter().enumerate() {
            p.send_timeout(m, DEADLINE)
                .map_err(|e| format!("send {i}: {e}"))?;
        }
        drop(p);
        drop(bus);
        Ok(())
    });
    let id = rx
        .recv_timeout(DEADLINE)
        .expect("the publisher thread starts in time")
        .unwrap_or_else(|e| panic!("bus-client publisher: {e}"));
    (id, handle)
}

/// What each publisher sent: publisher id -> its payloads in order.
pub type Sent = BTreeMap<u64, Vec<Vec<u8>>>;

/// Checks that `got` holds every message of every publisher in `sent` exactly once, each
/// publisher's in order with contiguous sequence numbers from 0, `lost_before` 0 and exact
/// payloads, and nothing else (unless `others_ok`: messages of publishers not in `sent` are
/// ignored).
pub fn verify(what: &str, got: &[Delivered], sent: &Sent, others_ok: bool) {
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    let mut lost = 0u64;
    let mut problems = Vec::new();
    for d in got {
        let Some(msgs) = sent.get(&d.publisher_id) else {
            if !others_ok {
                problems.push(format!(
                    "message from unknown publisher {} seq {}",
                    d.publisher_id, d.seq
                ));
            }
            continue;
        };
        lost += d.lost_before;
        let n = next.entry(d.publisher_id).or_insert(0);
        if d.seq != *n {
            problems.push(format!(
                "publisher {}: seq {} where {} was expected",
                d.publisher_id, d.seq, n
            ));
        } else if let Some(m) = msgs.get(d.seq as usize) {
            if *m != d.payload {
                problems.push(format!(
                    "publisher {} seq {}: payload of {} bytes differs from the {} sent",
                    d.publisher_id,
                    d.seq,
                    d.payload.len(),
                    m.len()
                ));
            }
        } else {
            problems.push(format!(
                "publisher {}: extra message seq {}",
                d.publisher_id, d.seq
            ));
        }
        *n = d.seq + 1;
    }
    for (id, msgs) in sent {
        let n = next.get(id).copied().unwrap_or(0);
        if n != msgs.len() as u64 {
            problems.push(format!(
                "publisher {id}: received up to seq {n}, {} were sent",
                msgs.len()
            ));
        }
    }
    if lost != 0 {
        problems.push(format!("sum of lost_before is {lost}, not 0"));
    }
    let expected: usize = sent.values().map(Vec::len).sum();
    let counted = got
        .iter()
        .filter(|d| sent.contains_key(&d.publisher_id))
        .count();
    if counted != expected {
        problems.push(format!("{counted} messages received, {expected} sent"));
    }
    problems.truncate(12);
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// An honest round trip on `topic` through a fresh connection (HELLO, subscribe, publish,
/// receive). Err says which step failed.
pub fn round_trip(socket: &Path, topic: &str) -> Result<(), String> {
    let bus = Bus::connect_with(
        socket,
        BusOptions::new()
            .transport(Transport::SharedMemory)
            .request_timeout(DEADLINE),
    )
    .map_err(|e| format!("connect: {e}"))?;
    let mut sub = bus
        .subscriber(topic)
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut p = bus
        .publisher(topic)
        .map_err(|e| format!("publisher: {e}"))?;
    p.send_timeout(b"round trip", DEADLINE)
        .map_err(|e| format!("send: {e}"))?;
    let end = Instant::now() + DEADLINE;
    loop {
        match sub.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(s)) if &s[..] == b"round trip" => return Ok(()),
            Ok(_) if Instant::now() < end => {}
            Ok(_) => return Err("no message within the deadline".into()),
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
}
