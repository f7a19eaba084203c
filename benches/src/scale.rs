//! Broker scale (`broker-scale`): a real `bus-broker` process and up to 11,000 client
//! connections from the benchmark process.
//!
//! 1. Raise RLIMIT_NOFILE (the broker inherits it), start the broker.
//! 2. Open 1,000 connections that each do HELLO -> WELCOME (transport shm) and stay idle;
//!    record the broker's RSS (`VmRSS`) and open fds (`/proc/PID/fd`). Then up to 10,000; again.
//! 3. Connection storm: 1,000 more clients, one after the other, each timed from `socket()` to
//!    the last reply: connect, HELLO -> WELCOME, SUBSCRIBE (shm delivery, topic `bench.storm`)
//!    -> SUBSCRIBED with the cursor page and wake socket, map the page read-write and
//!    `CursorPage::init` it, SUBSCRIBER_READY -> OK. The histogram of the case is these
//!    per-client times (p50/p99 in the table; one sample per client, so "samples" = clients).
//!    Interleaved with it, the floor: after each storm client, one more client that does
//!    connect, HELLO -> WELCOME and two PING -> PONG (the same number of round trips through
//!    the same broker, without the memfd, socketpair, fd passing, sealing and mapping).
//! 4. Idle: with all 11,000 clients connected and idle, sample the broker's CPU time (utime +
//!    stime from /proc/PID/stat) and its threads' context switches over 2 s.
//!
//! Figures in the extras: `rss_kib_base`, `rss_kib_1k`, `fds_1k`, `rss_kib_10k`, `fds_10k`,
//! `rss_kib_after_storm`, `fds_after_storm`, `idle_cpu_pct`, `idle_wakeups_per_s`,
//! `clients_idle`, `clients_storm`, `hello_mean_ns_first_1k` / `hello_mean_ns_last_1k` (mean
//! connect + HELLO time of the first and of the last 1,000 idle connections), the storm's mean,
//! p50 and p99 time per step (`storm_{mean,p50,p99}_{connect,hello,subscribe,map,ready}_ns`;
//! subscribe is the SUBSCRIBE round trip, map is the client mapping the cursor page and
//! `CursorPage::init` on it), and the floor's `floor_p50_ns` / `floor_p99_ns`. Targets (PERFORMANCE.md): RSS <= 64 MiB at 10,000 clients,
//! connect + subscribe p99 <= 100 us, 0% CPU and no more than 1 wakeup/s when idle.
//!
//! `--quick` keeps these counts but samples the idle broker for 0.5 s; the harness test's
//! `--scale-div 1000` divides the counts by 50.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bus_core::frame::{Frame, Hello, ModeRequest, Msg, PROTOCOL_VERSION, Subscribe, Transport};
use bus_core::limits::MAX_FRAME_BYTES;
use bus_core::ring::CursorPage;
use bus_core::segment::{Access, map_cursor_page};
use bus_core::sys::clock::monotonic_ns;
use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::broker::{Broker, connect};
use crate::case::{Case, CaseResult, Figure, Group, Kind, Limit, Metric, Params, Pinning};
use crate::measure::new_histogram;
use hdrhistogram::Histogram;

const IDLE_LEVELS: [usize; 2] = [1_000, 10_000];
const STORM: usize = 1_000;
const IDLE_WINDOW: Duration = Duration::from_secs(2);
const TOPIC: &str = "bench.storm";

/// Raises RLIMIT_NOFILE to at least `want` (soft and hard; raising the hard limit needs
/// CAP_SYS_RESOURCE). Children (the broker) inherit it.
pub fn raise_nofile(want: u64) -> Result<()> {
    let cur = getrlimit(Resource::Nofile);
    if cur.current.is_none_or(|c| c >= want) {
        return Ok(());
    }
    let hard = cur.maximum.map_or(want, |h| h.max(want));
    if setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: Some(hard),
        },
    )
    .is_ok()
    {
        return Ok(());
    }
    // Not allowed above the hard limit: take what we may and say if it is not enough.
    let max = cur.maximum.unwrap_or(want);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(max),
            maximum: cur.maximum,
        },
    )
    .context("setrlimit(RLIMIT_NOFILE)")?;
    ensure!(
        max >= want,
        "broker-scale needs {want} open files per process but the hard limit is {max}; run as \
         root or raise it (`ulimit -Hn {want}`)"
    );
    Ok(())
}

/// Encodes `msg` with request id `rid`, sends it, and reads frames into `rx` until the one with
/// request id `rid`; returns its length. An ERROR reply is an error.
fn roundtrip(
    sock: BorrowedFd<'_>,
    tx: &mut Vec<u8>,
    rx: &mut [u8],
    fds: &mut FdBatch,
    rid: u64,
    msg: Msg<'_>,
) -> Result<usize> {
    let what = msg.msg_type();
    Frame::new(rid, msg).encode(tx).context("encode")?;
    send_frame(sock, tx, &[]).with_context(|| format!("send {what}"))?;
    loop {
        let len = match recv_frame(sock, rx, fds).with_context(|| format!("reply to {what}"))? {
            Received::Frame { len } => len,
            Received::Eof => bail!("the broker closed the connection after {what}"),
        };
        let f = Frame::decode(&rx[..len]).map_err(|e| anyhow::anyhow!("bad reply: {e}"))?;
        if f.request_id != rid {
            continue;
        }
        if let Msg::Error(e) = f.msg {
            bail!("broker refused {what}: {}: {}", e.code, e.message);
        }
        return Ok(len);
    }
}

fn hello_msg() -> Msg<'static> {
    Msg::Hello(Hello {
        protocol_version: u16::from(PROTOCOL_VERSION),
        transport: Transport::Shm,
        client_name: "bench-scale",
    })
}

/// A storm client kept connected: socket, its mapped cursor page, its wake socket.
struct Subscriber {
    _sock: OwnedFd,
    _page: CursorPage,
    _wake: OwnedFd,
}

fn storm_client(
    path: &std::path::Path,
    tx: &mut Vec<u8>,
    rx: &mut [u8],
    fds: &mut FdBatch,
    phases: &mut [Histogram<u64>; 5],
) -> Result<Subscriber> {
    let t0 = monotonic_ns();
    let sock = connect(path)?;
    let t1 = monotonic_ns();
    roundtrip(sock.as_fd(), tx, rx, fds, 1, hello_msg())?;
    let t2 = monotonic_ns();
    let len = roundtrip(
        sock.as_fd(),
        tx,
        rx,
        fds,
        2,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Any,
            delivery: Transport::Shm,
            topic: TOPIC,
        }),
    )?;
    let tm = monotonic_ns();
    let Msg::Subscribed(s) = Frame::decode(&rx[..len])
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .msg
    else {
        bail!("SUBSCRIBE answered with something else than SUBSCRIBED");
    };
    let [page_fd, wake] = fds
        .take_all::<2>()
        .context("SUBSCRIBED (shm) without its 2 fds")?;
    let page = CursorPage::init(
        map_cursor_page(&page_fd, Access::ReadWrite)?,
        s.subscriber_id,
    )?;
    drop(page_fd);
    let t3 = monotonic_ns();
    roundtrip(
        sock.as_fd(),
        tx,
        rx,
        fds,
        3,
        Msg::SubscriberReady {
            subscriber_id: s.subscriber_id,
        },
    )?;
    let t4 = monotonic_ns();
    for (h, d) in phases
        .iter_mut()
        .zip([t1 - t0, t2 - t1, tm - t2, t3 - tm, t4 - t3])
    {
        h.saturating_record(d.max(1));
    }
    Ok(Subscriber {
        _sock: sock,
        _page: page,
        _wake: wake,
    })
}

fn run(p: &Params) -> Result<CaseResult> {
    // The harness divides the 200,000 latency samples by its scale; quick (1/20) keeps the full
    // client counts, anything smaller divides them.
    let div = (200_000 / p.samples.max(1)).max(1);
    let shrink = (div / 20).max(1) as usize;
    let levels = IDLE_LEVELS.map(|n| (n / shrink).max(1));
    let storm = (STORM / shrink).max(1);
    let window = match (div, shrink) {
        (1, _) => IDLE_WINDOW,
        (_, 1) => Duration::from_millis(500),
        _ => Duration::from_millis(200),
    };
    let max_clients = levels[1] + storm;
    // This process: one socket per client (storm and floor clients too) and a wake fd per storm
    // subscriber; the broker: one socket per client and a cursor page and wake socket per
    // subscriber.
    raise_nofile((max_clients + 3 * storm) as u64 + 1024)?;

    let mut broker = Broker::start(&p.peer_exe, "warn")?;
    let path = broker.socket().to_path_buf();
    let mut tx = Vec::with_capacity(256);
    let mut rx = vec![0u8; MAX_FRAME_BYTES];
    let mut fds = FdBatch::new();
    let mut extra: Vec<(&'static str, f64)> = vec![
        ("rss_kib_base", broker.rss_kib()? as f64),
        ("fds_base", broker.open_fds()? as f64),
    ];

    let mut idle: Vec<OwnedFd> = Vec::with_capacity(levels[1]);
    for (i, &level) in levels.iter().enumerate() {
        // Mean connect + HELLO time of the last `tail` connections of this level.
        let tail = (level - idle.len()).min(1_000);
        let mut tail_ns = 0u64;
        while idle.len() < level {
            let t0 = monotonic_ns();
            let sock = connect(&path)
                .with_context(|| format!("idle connection {} of {level}", idle.len() + 1))?;
            roundtrip(sock.as_fd(), &mut tx, &mut rx, &mut fds, 1, hello_msg())?;
            if level - idle.len() <= tail {
                tail_ns += monotonic_ns() - t0;
            }
            idle.push(sock);
        }
        extra.push((
            if i == 0 {
                "hello_mean_ns_first_1k"
            } else {
                "hello_mean_ns_last_1k"
            },
            tail_ns as f64 / tail.max(1) as f64,
        ));
        let (rss, fds_open) = (broker.rss_kib()?, broker.open_fds()?);
        let (k_rss, k_fds) = if i == 0 {
            ("rss_kib_1k", "fds_1k")
        } else {
            ("rss_kib_10k", "fds_10k")
        };
        extra.push((k_rss, rss as f64));
        extra.push((k_fds, fds_open as f64));
    }

    let mut h = new_histogram();
    let mut subs = Vec::with_capacity(storm);
    let mut phases: [Histogram<u64>; 5] = std::array::from_fn(|_| new_histogram());
    // The floor beside it, interleaved, same broker and connections: after each storm client
    // one that does connect + HELLO + two PINGs (four round trips of socket work like the
    // storm's, none of its memfd, socketpair, fd passing, sealing and mapping).
    let mut floor = new_histogram();
    let mut floor_socks = Vec::with_capacity(storm);
    for i in 0..storm {
        let t0 = monotonic_ns();
        let s = storm_client(&path, &mut tx, &mut rx, &mut fds, &mut phases)
            .with_context(|| format!("storm client {}", i + 1))?;
        h.saturating_record((monotonic_ns() - t0).max(1));
        subs.push(s);

        let t0 = monotonic_ns();
        let sock = connect(&path).with_context(|| format!("floor client {}", i + 1))?;
        roundtrip(sock.as_fd(), &mut tx, &mut rx, &mut fds, 1, hello_msg())?;
        for rid in [2, 3] {
            roundtrip(
                sock.as_fd(),
                &mut tx,
                &mut rx,
                &mut fds,
                rid,
                Msg::Ping { token: rid },
            )?;
        }
        floor.saturating_record((monotonic_ns() - t0).max(1));
        floor_socks.push(sock);
    }
    for (k, v) in [
        (
            "storm_mean_connect_ns",
            "storm_p50_connect_ns",
            "storm_p99_connect_ns",
        ),
        (
            "storm_mean_hello_ns",
            "storm_p50_hello_ns",
            "storm_p99_hello_ns",
        ),
        (
            "storm_mean_subscribe_ns",
            "storm_p50_subscribe_ns",
            "storm_p99_subscribe_ns",
        ),
        ("storm_mean_map_ns", "storm_p50_map_ns", "storm_p99_map_ns"),
        (
            "storm_mean_ready_ns",
            "storm_p50_ready_ns",
            "storm_p99_ready_ns",
        ),
    ]
    .into_iter()
    .zip(&phases)
    {
        extra.push((k.0, v.mean()));
        extra.push((k.1, v.value_at_quantile(0.5) as f64));
        extra.push((k.2, v.value_at_quantile(0.99) as f64));
    }
    extra.push(("floor_p50_ns", floor.value_at_quantile(0.5) as f64));
    extra.push(("floor_p99_ns", floor.value_at_quantile(0.99) as f64));
    drop(floor_socks);
    extra.push(("rss_kib_after_storm", broker.rss_kib()? as f64));
    extra.push(("fds_after_storm", broker.open_fds()? as f64));

    // Idle: everything connected, nothing happening.
    std::thread::sleep(Duration::from_millis(100));
    let tick_ms = 1000.0 / rustix::param::clock_ticks_per_second() as f64;
    let (t0, c0) = (broker.cpu_ticks()?, broker.context_switches()?);
    std::thread::sleep(window);
    let (t1, c1) = (broker.cpu_ticks()?, broker.context_switches()?);
    let secs = window.as_secs_f64();
    extra.push((
        "idle_cpu_pct",
        (t1 - t0) as f64 * tick_ms / (secs * 1000.0) * 100.0,
    ));
    extra.push(("idle_wakeups_per_s", (c1 - c0) as f64 / secs));
    extra.push(("clients_idle", idle.len() as f64));
    extra.push(("clients_storm", subs.len() as f64));

    drop(subs);
    drop(idle);
    broker.stop();
    let mut r = CaseResult::latency(h);
    r.extra = extra;
    Ok(r)
}

/// The broker scale case.
pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "broker-scale",
        group: Group::Membus,
        size: 0,
        kind: Kind::Latency,
        pinning: Pinning::Split,
        about: "bus-broker with 1,000 then 10,000 idle clients (RSS, fds in extras), then a storm \
                of 1,000 connect + HELLO + SUBSCRIBE(shm) + SUBSCRIBER_READY, one after the \
                other: the latency columns are per-client storm times, not one-way",
        run,
        peer: None,
    }]
}

/// The broker's absolute targets (PERFORMANCE.md section 3), checked on the median of the rounds.
pub fn limits() -> Vec<Limit> {
    vec![
        Limit {
            case: "broker-scale",
            figure: Figure::Extra("rss_kib_10k"),
            what: "broker RSS with 10,000 connected clients, KiB",
            target: "<= 65536 (64 MiB)",
        },
        Limit {
            case: "broker-scale",
            figure: Figure::Metric(Metric::P99),
            what: "connect + subscribe p99 with 10,000 clients connected, ns",
            target: "<= 100000 (100 us)",
        },
        Limit {
            case: "broker-scale",
            figure: Figure::Extra("idle_cpu_pct"),
            what: "idle broker CPU, % of one CPU (clock-tick resolution)",
            target: "<= 0",
        },
        Limit {
            case: "broker-scale",
            figure: Figure::Extra("idle_wakeups_per_s"),
            what: "idle broker context switches per second",
            target: "<= 1",
        },
    ]
}
