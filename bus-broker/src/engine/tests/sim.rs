//! A seeded randomized simulation of the engine, in the manner of quinn-proto's `Pair` and
//! TigerBeetle's simulator: many simulated clients send random valid and invalid requests,
//! shared-memory ones map their own segments and publish and read, datagram ones publish and
//! take DELIVER / SKIPPED frames, some stop reading their socket, some disconnect at any
//! point, and simulated time moves. After every step [`Engine::check_invariants`] must hold,
//! and what the clients see must keep the delivery promises: on a reliable topic a datagram
//! subscriber gets every message of every publisher, in order, none lost, from the first it
//! saw on (a lossy one only with exact `lost_before` counts). At the end of a run the clients
//! read again and time moves until the broker is quiet: then every message a reliable datagram
//! publisher was told was accepted (no ERROR to its PUBLISH) has reached each datagram
//! subscriber that was there when it was accepted and is still there, even if the publisher
//! closed or disconnected meanwhile.
//!
//! A failing run prints its seed; `MEMBUS_SIM_SEED=N` replays it (`MEMBUS_SIM_STEPS=K` for a
//! run of K steps instead of the default), `MEMBUS_SIM_SECONDS=S` runs random seeds for S
//! seconds (CI runs a fixed set plus a short random spell), `MEMBUS_SIM_DEBUG=1` prints what
//! each run covered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::*;

use bus_core::frame::{MAX_DATAGRAM_MESSAGE_BYTES, MAX_PUBLISH_PAYLOAD_BYTES, SkipReason, Skipped};
use bus_core::segment::SegmentError;
use bus_core::wake::{WakeError, WakeReceiver, WakeSender};

use crate::engine::{Memfd, SegmentFactory};

mod actions;

/// xorshift64*: small, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len() as u64) as usize])
    }
}

const TOPICS: [&str; 4] = ["sim.a", "sim.b", "sim.c", "sim.d"];

struct ShmPub {
    id: u64,
    writer: Option<Writer>,
    /// PUBLISHER_READY was answered: later cursor grants are for subscribers that joined
    /// after it (they start at the writer's position), as the library treats them.
    ready: bool,
    /// The RING_GRANTED before PUBLISHER_READY.
    pending: Option<(Vec<Arc<OwnedFd>>, bus_core::frame::RingGranted)>,
}

struct ShmSub {
    id: u64,
    /// Never reads: a staller the broker must evict from reliable topics.
    lazy: bool,
    page: Option<Arc<CursorPage>>,
    readers: Vec<Reader>,
    gone: Vec<u64>,
}

/// What a datagram subscriber expects next from each publisher.
struct Stream {
    topic_id: u64,
    next: BTreeMap<u64, u64>,
}

/// What the broker accepted from one datagram publisher.
struct Accepted {
    topic_id: u64,
    mode: Mode,
    /// PUBLISHes answered with no ERROR: the broker owes them to its subscribers.
    count: u64,
    /// How many of those had to wait in the publisher's backlog for ring space.
    backlogged: u64,
}

struct Client {
    conn: ConnId,
    datagram: bool,
    hello: bool,
    /// Publisher id -> topic.
    dg_pubs: Vec<(u64, String)>,
    shm_pubs: Vec<ShmPub>,
    shm_subs: Vec<ShmSub>,
    /// Datagram subscriber id -> (topic mode, what it saw).
    dg_subs: BTreeMap<u64, (Mode, Stream)>,
}

struct Sim {
    rng: Rng,
    h: Harness,
    clients: Vec<Client>,
    next_conn: ConnId,
    steps: u64,
    seen: Seen,
    /// Datagram publisher id -> what the broker accepted from it.
    accepted: BTreeMap<u64, Accepted>,
    /// (datagram subscriber, datagram publisher) -> messages of that publisher accepted before
    /// the subscriber joined (it is owed the rest).
    joined: BTreeMap<(u64, u64), u64>,
    /// Pairs whose stream ended with a corrupt-ring SKIPPED (owed nothing more).
    excused: BTreeSet<(u64, u64)>,
    /// Segment and wake-socket creations the factory failed on purpose.
    failed: Arc<AtomicU64>,
}

/// A segment factory that fails now and then, as `memfd_create` and `socketpair` do when the
/// broker runs out of descriptors (EMFILE: `limit-reached`) or memory (ENOMEM: `internal`):
/// a refused creation must leave no slot, topic, descriptor or id half-taken.
struct Flaky {
    rng: Rng,
    failed: Arc<AtomicU64>,
}

impl Flaky {
    fn fail(&mut self) -> Option<rustix::io::Errno> {
        if !self.rng.chance(4) {
            return None;
        }
        self.failed.fetch_add(1, Relaxed);
        Some(if self.rng.chance(50) {
            rustix::io::Errno::MFILE
        } else {
            rustix::io::Errno::NOMEM
        })
    }
}

impl SegmentFactory for Flaky {
    fn create_ring(&mut self, name: &str, data_bytes: usize) -> Result<OwnedFd, SegmentError> {
        match self.fail() {
            Some(source) => Err(SegmentError::Create { source }),
            None => Memfd.create_ring(name, data_bytes),
        }
    }

    fn create_cursor_page(&mut self, name: &str) -> Result<OwnedFd, SegmentError> {
        match self.fail() {
            Some(source) => Err(SegmentError::Create { source }),
            None => Memfd.create_cursor_page(name),
        }
    }

    fn wake_pair(&mut self) -> Result<(WakeSender, WakeReceiver), WakeError> {
        match self.fail() {
            Some(e) => Err(WakeError::Create(e.into())),
            None => Memfd.wake_pair(),
        }
    }
}

/// What a run exercised, so that the test can tell it covered the interesting paths.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    delivers: u64,
    skipped: u64,
    evicted: u64,
    limit_reached: u64,
    too_large: u64,
    ring_grants: u64,
    released: u64,
    /// (subscriber, publisher) pairs whose delivery the end of the run verified.
    owed_checked: u64,
    /// Accepted PUBLISHes that had to wait for ring space (the publisher's backlog).
    backlogged: u64,
    /// Checked pairs whose publisher had messages wait in its backlog after the subscriber
    /// joined: the end-of-run check covered the backlog's retry path.
    owed_backlogged: u64,
    /// Creations the factory failed on purpose.
    creation_failed: u64,
}

impl Seen {
    fn add(&mut self, o: Seen) {
        self.delivers += o.delivers;
        self.skipped += o.skipped;
        self.evicted += o.evicted;
        self.limit_reached += o.limit_reached;
        self.too_large += o.too_large;
        self.ring_grants += o.ring_grants;
        self.released += o.released;
        self.owed_checked += o.owed_checked;
        self.backlogged += o.backlogged;
        self.owed_backlogged += o.owed_backlogged;
        self.creation_failed += o.creation_failed;
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let limits = Limits {
            max_clients: 12,
            max_topics: 3,
            max_publishers_per_topic: 4,
            max_subscribers_per_topic: 6,
            max_fds_per_client: 16,
            stall_timeout_ms: 50,
            ..Limits::default()
        };
        let mut h = Harness::with(limits, Policy::default_for(own_uid()));
        h.e.set_fd_budget(120);
        let failed = Arc::new(AtomicU64::new(0));
        h.e.set_segment_factory(Box::new(Flaky {
            rng: Rng(seed.rotate_left(17) | 1),
            failed: failed.clone(),
        }));
        Sim {
            failed,
            rng: Rng(seed | 1),
            h,
            clients: Vec::new(),
            next_conn: 1,
            steps: 0,
            seen: Seen::default(),
            accepted: BTreeMap::new(),
            joined: BTreeMap::new(),
            excused: BTreeSet::new(),
        }
    }

    fn client(&mut self) -> Option<usize> {
        (!self.clients.is_empty()).then(|| self.rng.below(self.clients.len() as u64) as usize)
    }

    /// Feeds what the engine sent to the simulated clients.
    fn deliver(&mut self, got: Vec<Got>) {
        for g in got {
            let Some(c) = self.clients.iter_mut().find(|c| c.conn == g.conn) else {
                continue;
            };
            let seen = &mut self.seen;
            match g.msg() {
                Msg::Error(e) if e.code == ErrorCode::LimitReached => seen.limit_reached += 1,
                Msg::Error(e) if e.code == ErrorCode::TooLarge => seen.too_large += 1,
                Msg::CursorGranted(cg) => {
                    if let Some(p) = c.shm_pubs.iter_mut().find(|p| p.id == cg.publisher_id)
                        && let Some(w) = p.writer.as_mut()
                    {
                        let view = bus_core::ring::CursorView::attach(
                            map_cursor_page(g.fds[0].as_fd(), Access::ReadOnly).unwrap(),
                            cg.subscriber_id,
                        )
                        .unwrap();
                        if p.ready {
                            w.add_reader(view, cg.slot as usize, None).unwrap();
                        } else {
                            w.add_reader_from_start(view, cg.slot as usize, None)
                                .unwrap();
                        }
                    }
                }
                Msg::RingGranted(rg) if rg.role.is_reader() => {
                    seen.ring_grants += 1;
                    if let Some(s) = c.shm_subs.iter_mut().find(|s| s.id == rg.subscriber_id)
                        && let Some(page) = &s.page
                    {
                        s.readers.push(reader_from(&g, page));
                    }
                }
                Msg::PeerGone(pg) => match pg.peer {
                    PeerKind::Publisher => {
                        for s in &mut c.shm_subs {
                            s.gone.push(pg.peer_id);
                        }
                    }
                    PeerKind::Subscriber => {
                        for p in &mut c.shm_pubs {
                            if let Some(w) = p.writer.as_mut() {
                                w.remove_reader(pg.peer_id);
                            }
                        }
                    }
                },
                Msg::Evicted(e) => {
                    seen.evicted += 1;
                    c.shm_subs.retain(|s| s.id != e.subscriber_id);
                    c.dg_subs.remove(&e.subscriber_id);
                }
                Msg::Deliver(d) => {
                    seen.delivers += 1;
                    let (mode, stream) = c
                        .dg_subs
                        .get_mut(&d.subscriber_id)
                        .unwrap_or_else(|| panic!("DELIVER for unknown subscriber {d:?}"));
                    expect_next(
                        *mode,
                        stream,
                        d.publisher_id,
                        d.seq,
                        d.lost_before,
                        "DELIVER",
                    );
                }
                Msg::Skipped(k) => {
                    seen.skipped += 1;
                    let Skipped {
                        subscriber_id,
                        publisher_id,
                        seq,
                        lost_before,
                        reason,
                        ..
                    } = k;
                    let (mode, stream) = c
                        .dg_subs
                        .get_mut(&subscriber_id)
                        .unwrap_or_else(|| panic!("SKIPPED for unknown subscriber {k:?}"));
                    if reason == SkipReason::CorruptRing {
                        stream.next.remove(&publisher_id);
                        self.excused.insert((subscriber_id, publisher_id));
                    } else {
                        expect_next(*mode, stream, publisher_id, seq, lost_before, "SKIPPED");
                    }
                }
                _ => {}
            }
        }
    }

    fn frame(&mut self, conn: ConnId, msg: Msg<'_>) {
        let rid = self.rng.below(1000) + 1;
        let got = self.h.frame(conn, rid, msg);
        self.deliver(got);
    }

    fn step(&mut self) {
        self.steps += 1;
        let action = self.rng.below(100);
        match action {
            0..=7 => self.connect(),
            8..=13 => self.create_publisher(),
            14..=18 => self.publisher_ready(),
            19..=38 => self.publish(),
            39..=42 => self.close_publisher(),
            43..=50 => self.subscribe(),
            51..=62 => self.read(),
            63..=65 => self.unsubscribe(),
            66..=68 => self.disconnect(),
            69..=74 => self.hold_or_release_sends(),
            75..=86 => {
                let ms = self.rng.below(80);
                self.h.now += Duration::from_millis(ms);
                self.h.e.on_tick(self.h.now);
                let got = self.h.drain();
                self.deliver(got);
            }
            87..=90 => {
                if let Some(&(token, _)) = self.rng.pick(&self.h.watches) {
                    self.h.e.on_wake(token);
                    let got = self.h.drain();
                    self.deliver(got);
                }
            }
            91..=94 => self.garbage(),
            _ => self.bogus_release(),
        }
    }

    /// The end of a run: every client reads again and time moves until the broker has nothing
    /// more to send (stalled subscribers are evicted on the way); then each reliable datagram
    /// subscriber must have had every message the broker accepted from each datagram publisher
    /// of its topic since it joined.
    fn settle_and_check(&mut self) {
        self.h.held.clear();
        let mut quiet = false;
        for _ in 0..200 {
            for i in 0..self.clients.len() {
                self.read_client(i, u64::MAX);
            }
            let unacked = std::mem::take(&mut self.h.unacked);
            for conn in unacked {
                self.h.e.on_sent(conn, 1);
            }
            self.h.now += Duration::from_millis(100);
            self.h.e.on_tick(self.h.now);
            let tokens: Vec<u64> = self.h.watches.iter().map(|&(t, _)| t).collect();
            for t in tokens {
                self.h.e.on_wake(t);
            }
            self.h.e.flush_relays();
            let got = self.h.drain();
            // Quiet: nothing sent, nothing unsent, and no accepted message waiting for ring
            // space (a backlog is retried on a timer, so an empty turn does not mean done).
            quiet = got.is_empty()
                && self.h.unacked.is_empty()
                && self.h.e.publishers.values().all(|p| p.backlog.is_empty());
            self.deliver(got);
            self.forget_closed();
            if quiet {
                break;
            }
        }
        // Everyone reads and stallers are evicted: a broker that still has work after 20 s
        // of simulated time is stuck.
        assert!(quiet, "the broker did not go quiet while every client read");
        for (&(sid, pid), &before) in &self.joined {
            let Some((mode, stream)) = self.clients.iter().find_map(|c| c.dg_subs.get(&sid)) else {
                continue; // Unsubscribed, evicted or disconnected: owed nothing.
            };
            let a = &self.accepted[&pid];
            if *mode != Mode::Reliable
                || a.mode != Mode::Reliable
                || self.excused.contains(&(sid, pid))
            {
                continue;
            }
            match stream.next.get(&pid) {
                Some(&next) => assert_eq!(
                    next, a.count,
                    "datagram subscriber {sid} got publisher {pid}'s messages up to {next}, but \
                     the broker accepted {} (the rest is neither delivered nor queued)",
                    a.count
                ),
                None => assert!(
                    a.count <= before,
                    "datagram subscriber {sid} got none of publisher {pid}'s messages, though \
                     the broker accepted {} after it joined",
                    a.count - before
                ),
            }
            self.seen.owed_checked += 1;
            if a.backlogged > 0 && a.count > before {
                self.seen.owed_backlogged += 1;
            }
        }
    }

    /// Drops clients the engine closed (handshake timeout, protocol errors).
    fn forget_closed(&mut self) {
        let closed = std::mem::take(&mut self.h.closed);
        self.clients.retain(|c| !closed.contains(&c.conn));
    }
}

/// A datagram subscriber's next frame from `pid` must continue the stream: on a reliable
/// topic with nothing lost, on a lossy one with what was lost counted.
fn expect_next(mode: Mode, stream: &mut Stream, pid: u64, seq: u64, lost: u64, what: &str) {
    if let Some(&next) = stream.next.get(&pid) {
        match mode {
            Mode::Reliable => assert!(
                seq == next && lost == 0,
                "{what} from publisher {pid} on a reliable topic: seq {seq} lost_before {lost}, \
                 expected seq {next} with nothing lost"
            ),
            Mode::Lossy => assert_eq!(
                seq,
                next + lost,
                "{what} from publisher {pid}: seq {seq} with lost_before {lost} after {next}"
            ),
        }
    }
    stream.next.insert(pid, seq + 1);
}

fn run(seed: u64, steps: u64) -> Seen {
    let mut sim = Sim::new(seed);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..steps {
            sim.step();
            sim.forget_closed();
        }
        sim.settle_and_check();
    }));
    if let Err(e) = result {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        panic!(
            "simulation seed {seed} failed at step {}: {msg}\nreplay: MEMBUS_SIM_SEED={seed} \
             cargo nextest run -p bus-broker --lib sim",
            sim.steps
        );
    }
    if std::env::var_os("MEMBUS_SIM_DEBUG").is_some() {
        eprintln!("seed {seed}: {:?} now+{:?}", sim.seen, sim.h.now);
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&sim.h.e.stats_json()).unwrap()
        );
    }
    sim.seen.creation_failed = sim.failed.load(Relaxed);
    sim.seen
}

const STEPS: u64 = 3_000;

#[test]
fn simulation_fixed_seeds() {
    if let Some(seed) = std::env::var("MEMBUS_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let steps = std::env::var("MEMBUS_SIM_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(STEPS);
        run(seed, steps);
        return;
    }
    let mut seen = Seen::default();
    for seed in 1..=128 {
        seen.add(run(seed, STEPS));
    }
    // The fixed seeds must reach the paths the hardening round is about; a change that made
    // the simulation miss them would make it prove nothing.
    let Seen {
        delivers,
        skipped,
        evicted,
        limit_reached,
        too_large,
        ring_grants,
        released,
        owed_checked,
        backlogged,
        owed_backlogged,
        creation_failed,
    } = seen;
    assert!(
        delivers > 100
            && skipped > 0
            && evicted > 0
            && limit_reached > 0
            && too_large > 0
            && ring_grants > 10
            && released > 0
            && owed_checked > 10
            && backlogged > 0
            && owed_backlogged > 0
            && creation_failed > 0,
        "the fixed seeds cover too little: {seen:?}"
    );
}

/// Random seeds for a short while (default 3 s; `MEMBUS_SIM_SECONDS` for longer runs). The
/// seeds come from the clock; each is printed when it fails.
#[test]
fn simulation_random_seeds() {
    let seconds: u64 = std::env::var("MEMBUS_SIM_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut runs = 0;
    while Instant::now() < end {
        run(seed, STEPS);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        runs += 1;
    }
    assert!(runs > 0, "no simulation ran");
}
