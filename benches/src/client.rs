//! membus as an application uses it: a real `bus-broker`, and `bus-client` in two processes.
//! The parent publishes on `bench.ping` and subscribes to `bench.pong`; the peer the other way
//! round. Every payload byte is written into the publisher's loan (zero copy) and read in place
//! from the subscriber's sample. Topics use the broker's defaults (1 MiB reliable rings).
//!
//! - `membus-client-pingpong-{8,64,4k,64k}`: `WaitStrategy::BusySpin`.
//! - `membus-client-spinpark-64`: the default strategy (spin, then park on the wake socket).
//! - `membus-client-park-64`: `WaitStrategy::Park`.
//!
//! Extras: the product's own one-way figure (publish timestamp in the record -> receive) and
//! `allocations_per_message`: heap allocations in the parent process (all its threads) during
//! the recorded round trips, per message published or received (the target is 0).
//!
//! These are the figures to hold against iceoryx2, which is also measured through its public
//! API; the `membus-ring-*` cases measure the data plane alone.
//!
//! The peer finds the broker through a directory fd: it connects to
//! `/proc/self/fd/N/bus.sock`, where N is the broker's private socket directory the parent
//! passed to it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use bus_client::{Bus, BusOptions, Publisher, Subscriber, SubscriberOptions};
use bus_core::wake::WaitStrategy;

use crate::broker::Broker;
use crate::case::{Case, CaseResult, Figure, Group, Kind, Limit, Metric, Params, Pinning, Ratio};
use crate::checksum::{pattern_byte, sum};
use crate::measure::{Tally, new_histogram, own_one_way, pingpong};
use crate::peer::{Peer, PeerCtx};

const PING: &str = "bench.ping";
const PONG: &str = "bench.pong";
const PING_SALT: u8 = 0x3c;
const PONG_SALT: u8 = 0xc3;

fn wait_of(case: &str) -> WaitStrategy {
    if case.contains("-spinpark-") {
        WaitStrategy::default()
    } else if case.contains("-park-") {
        WaitStrategy::Park
    } else {
        WaitStrategy::BusySpin
    }
}

/// One process's end: a publisher on one topic, a subscriber on the other.
struct End {
    // Field order is drop order: ports before the connection.
    publisher: Publisher,
    subscriber: Subscriber,
    _bus: Bus,
}

impl End {
    fn open(socket: &str, name: &str, (tx, rx): (&str, &str), wait: WaitStrategy) -> Result<End> {
        let bus = Bus::connect_with(socket, BusOptions::new().client_name(name))
            .with_context(|| format!("connect to {socket}"))?;
        let subscriber = bus
            .subscriber_with(rx, SubscriberOptions::new().wait(wait))
            .with_context(|| format!("subscribe to {rx}"))?;
        let publisher = bus
            .publisher(tx)
            .with_context(|| format!("publish on {tx}"))?;
        Ok(End {
            publisher,
            subscriber,
            _bus: bus,
        })
    }

    /// Waits until this end's publisher has the other side's subscriber and this end's
    /// subscriber reads the other side's ring (the broker hands both over asynchronously).
    fn wait_linked(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let subs = self.publisher.subscriber_count().unwrap_or(0);
            let pubs = self.subscriber.publisher_count();
            if subs >= 1 && pubs >= 1 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "not linked after 10 s: {subs} subscribers, {pubs} publishers"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Publishes `size` bytes of `byte`, written into the loan.
    #[inline]
    fn send(&mut self, size: usize, byte: u8) -> Result<()> {
        let mut loan = self
            .publisher
            .loan(size)
            .map_err(|e| anyhow!("loan: {e}"))?;
        loan.fill(byte);
        loan.commit();
        Ok(())
    }

    /// Receives one message: (checksum of every byte, publish timestamp).
    #[inline]
    fn recv(&mut self) -> Result<(u64, u64)> {
        let s = self.subscriber.recv().context("recv")?;
        Ok((sum(&s), s.timestamp_ns()))
    }
}

fn run(p: &Params) -> Result<CaseResult> {
    let broker = Broker::start(&p.peer_exe, "warn")?;
    let socket = broker.socket().to_str().context("socket path")?.to_owned();
    let mut me = End::open(&socket, "bench-ping", (PING, PONG), wait_of(&p.case))?;
    let dir: OwnedFd = std::fs::File::open(broker.socket().parent().context("socket dir")?)
        .context("open the broker's socket directory")?
        .into();
    let mut peer = Peer::spawn(p, &[dir.as_fd()])?;
    drop(dir);
    peer.wait_ready()?;
    me.wait_linked()?;

    let size = p.size;
    let mut own = new_histogram();
    let mut tally = Tally::default();
    let last = p.warmup + p.samples - 1;
    let (mut allocs_start, mut allocs_end) = (None, None);
    let h = pingpong(p, |i| {
        if i == p.warmup {
            allocs_start = crate::alloc_count::allocations();
        }
        let byte = pattern_byte(i, PING_SALT);
        me.send(size, byte)?;
        tally.sent(byte, size);
        let (s, ts) = me.recv()?;
        own.saturating_record(
            bus_core::sys::clock::monotonic_ns()
                .saturating_sub(ts)
                .max(1),
        );
        tally.got(s);
        tally.expect(pattern_byte(i, PONG_SALT), size);
        if i == last {
            allocs_end = crate::alloc_count::allocations();
        }
        Ok(())
    })?;
    let done = peer.finish()?;
    tally.check(p, done.checksum)?;
    drop(me);
    drop(broker);
    let mut result = CaseResult::latency(h);
    result.extra.extend(own_one_way(&own));
    if let (Some(a), Some(b)) = (allocs_start, allocs_end) {
        // The parent's whole process (its control thread too) over the recorded round trips:
        // one publish and one receive each.
        result.extra.push((
            "allocations_per_message",
            (b - a) as f64 / (2 * p.samples) as f64,
        ));
    }
    Ok(result)
}

fn peer(mut ctx: PeerCtx) -> Result<()> {
    let dir = ctx.take_fd(0)?;
    let socket = format!("/proc/self/fd/{}/bus.sock", dir.as_raw_fd());
    let mut me = End::open(
        &socket,
        "bench-pong",
        (PONG, PING),
        wait_of(&ctx.params.case),
    )?;
    me.wait_linked()?;
    ctx.ready()?;
    let size = ctx.params.size;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        let (s, _) = me.recv().context("ping")?;
        got = got.wrapping_add(s);
        me.send(size, pattern_byte(i, PONG_SALT))?;
    }
    ctx.done(got)
}

/// The client-library cases.
pub fn cases() -> Vec<Case> {
    let case = |name, size, about| Case {
        name,
        group: Group::Membus,
        size,
        kind: Kind::Latency,
        pinning: Pinning::Split,
        about,
        run: run as fn(&Params) -> Result<CaseResult>,
        peer: Some(peer as fn(PeerCtx) -> Result<()>),
    };
    vec![
        case(
            "membus-client-pingpong-8",
            8,
            "bus-client through a real broker, busy-spin, 8 B each way",
        ),
        case(
            "membus-client-pingpong-64",
            64,
            "bus-client through a real broker, busy-spin, 64 B each way",
        ),
        case(
            "membus-client-pingpong-4k",
            4096,
            "bus-client through a real broker, busy-spin, 4 KiB each way",
        ),
        case(
            "membus-client-pingpong-64k",
            65536,
            "bus-client through a real broker, busy-spin, 64 KiB each way",
        ),
        case(
            "membus-client-spinpark-64",
            64,
            "bus-client through a real broker, default wait (spin, then park), 64 B each way",
        ),
        case(
            "membus-client-park-64",
            64,
            "bus-client through a real broker, park as soon as empty, 64 B each way",
        ),
    ]
}

/// Client-level ratios: the library's own cost over the data plane, and the targets of
/// PERFORMANCE.md section 3 held by the user-facing figures.
pub fn ratios() -> Vec<Ratio> {
    let r = Ratio::new;
    vec![
        r(
            "membus-client-pingpong-64",
            "membus-ring-pingpong-64",
            Metric::P50,
            None,
        ),
        r(
            "membus-client-pingpong-8",
            "cacheline-pingpong",
            Metric::P50,
            Some("<= 2.0 (stretch 1.5)"),
        ),
        r(
            "membus-client-pingpong-64",
            "cacheline-pingpong",
            Metric::P50,
            Some("<= 2.0 (stretch 1.5)"),
        ),
        r(
            "membus-client-pingpong-4k",
            "shm-pingpong-4k",
            Metric::P50,
            Some("<= 1.2 (stretch 1.05)"),
        ),
        r(
            "membus-client-pingpong-64k",
            "shm-pingpong-64k",
            Metric::P50,
            Some("<= 1.2 (stretch 1.05)"),
        ),
        r(
            "membus-client-park-64",
            "seqpacket-pingpong-64",
            Metric::P50,
            Some("<= 1.1 (stretch: eventfd floor)"),
        ),
        r(
            "membus-client-spinpark-64",
            "membus-client-pingpong-64",
            Metric::P50,
            None,
        ),
    ]
}

/// The data-path allocation target (PERFORMANCE.md section 3), on the busy and the parking
/// path.
pub fn limits() -> Vec<Limit> {
    ["membus-client-pingpong-64", "membus-client-park-64"]
        .into_iter()
        .map(|case| Limit {
            case,
            figure: Figure::Extra("allocations_per_message"),
            what: "heap allocations per message published or received (parent process)",
            target: "<= 0",
        })
        .collect()
}
