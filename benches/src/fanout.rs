//! Fan-out over bus-core rings: what one more subscriber costs the publisher.
//!
//! **Publish cost 1 -> N** (`membus-fanout-{1,4,16}`, `membus-fanout-park-{1,16}`): the parent
//! writes `p.messages` 64 B messages into one ring; N subscriber processes, all pinned to the
//! peer CPU, read it. The figure is the publisher's own loop time / messages (msg/s in the
//! table; `publish_ns_per_msg` in the extras).
//!
//! The rings are **lossy**. On this 2-CPU machine the N subscribers time-share one core, so each
//! one reads at 1/N of the publisher's rate; in reliable mode the slowest would set the pace and
//! the figure would be the subscribers' CPU share, not the publisher's cost. Lossy, the
//! publisher never waits and every cost it pays is its own: the record write, the commit, and the
//! per-subscriber work the ring does on each commit (the park check). Subscribers are lapped
//! and resynchronise; each one checks every record it reads intact against the pattern the
//! publisher wrote for that sequence number (a torn or wrong payload fails the case) and that
//! read + torn + lost adds up to exactly what was published.
//!
//! - `membus-fanout-N`: busy-poll subscribers (cursor pages flagged never-parks): the publisher
//!   skips the park check.
//! - `membus-fanout-park-N`: spin-then-park subscribers (20,000 polls, then park on the wake
//!   socket), the library's default strategy: the publisher runs the park check (a SeqCst fence
//!   and one park-word load per subscriber) on every commit and sends a wake datagram to a
//!   parked one.
//!
//! **Idle subscribers** (`membus-lossy-pingpong-64`, `membus-lossy-pingpong-64-idle16`): the
//! busy-poll ping-pong of `membus.rs` at 64 B, on lossy rings, without and with 16 extra idle
//! subscribers of the ping ring. "Idle" here: a separate process that subscribed (cursor page
//! registered with the writer, reader attached), declared the default wait strategy (may park,
//! so the writer must check its park word), and then does not read: it sleeps in a blocking
//! receive on its wake socket without announcing a park, so the writer never has a reason to
//! wake it, until the ring is closed at the end. Lossy, because an idle subscriber of a reliable
//! ring would hold the publisher back once the ring filled (and be evicted by the broker).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bus_core::layout::{Mode, max_message_bytes_for};
use bus_core::ring::{CursorPage, CursorView, Reader, RingConfig, StartAt, Writer};
use bus_core::segment::{
    Access, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use bus_core::sys::clock::monotonic_ns;
use bus_core::wake::{WakeReceiver, WakeSender, pair, protocol};

use crate::case::{Case, CaseResult, Group, Kind, Metric, Params, Pinning, Ratio, Throughput};
use crate::checksum::{pattern_byte, pattern_sum, sum};
use crate::measure::{Tally, pingpong};
use crate::membus::{PARENT_SUB, PEER_SUB, PeerRings};
use crate::peer::{Peer, PeerCtx};
use crate::shm::Region;

const SALT: u8 = 0x2d;
const PING_SALT: u8 = 0x3c;
const PONG_SALT: u8 = 0xc3;
/// Fan-out and ping ring data area: as the raw rings.
const RING_BYTES: u64 = 256 << 10;
/// Spin-then-park: polls before parking (the library's default).
const SPIN_ITERATIONS: u32 = 20_000;
/// Extra idle subscribers in the idle case.
const IDLE: usize = 16;

/// What a subscriber process is told through its first fd: a 16-byte memfd holding its
/// subscriber id and its role.
const ROLE_SPIN: u64 = 1;
const ROLE_PARK: u64 = 2;
const ROLE_IDLE: u64 = 3;
const ROLE_PONG: u64 = 4;

fn ctl_region(id: u64, role: u64) -> Result<Region> {
    let r = Region::create("bench-sub-ctl", 16)?;
    r.atomic_u64(0).store(id, Ordering::Relaxed);
    r.atomic_u64(8).store(role, Ordering::Relaxed);
    Ok(r)
}

fn read_ctl(fd: OwnedFd) -> Result<(u64, u64)> {
    let r = Region::open(fd, 16)?;
    Ok((
        r.atomic_u64(0).load(Ordering::Relaxed),
        r.atomic_u64(8).load(Ordering::Relaxed),
    ))
}

fn config(size: usize, publisher_id: u64) -> RingConfig {
    let data_bytes = RING_BYTES.max(((size as u64 + 64) * 8).next_power_of_two());
    RingConfig {
        mode: Mode::Lossy,
        data_bytes,
        max_message_bytes: max_message_bytes_for(data_bytes as usize) as u32,
        publisher_id,
    }
}

/// A subscriber process the parent set up: its cursor page fd, and the wake sender to give the
/// writer.
struct Sub {
    peer: Peer,
    id: u64,
    page_fd: OwnedFd,
    wake: Option<WakeSender>,
}

/// Spawns a subscriber of the ring `ring_fd` with role `role`, handing it four fds: its ctl
/// memfd, the ring, its cursor page and its wake socket's receiving end.
fn spawn_sub(p: &Params, ring_fd: &OwnedFd, id: u64, role: u64) -> Result<Sub> {
    let ctl = ctl_region(id, role)?;
    let page_fd = create_cursor_page("bench-sub-cursor")?;
    let (tx, rx) = pair()?;
    let rx: OwnedFd = rx.into();
    let peer = Peer::spawn(p, &[ctl.fd(), ring_fd.as_fd(), page_fd.as_fd(), rx.as_fd()])?;
    Ok(Sub {
        peer,
        id,
        page_fd,
        wake: Some(tx),
    })
}

/// Waits for the subscriber's READY, seals its page and links it to the writer (which gets
/// the wake sender).
fn link_sub(w: &mut Writer, s: &mut Sub) -> Result<()> {
    s.peer.wait_ready()?;
    seal_read_only(&s.page_fd)?;
    let view = CursorView::attach(map_cursor_page(&s.page_fd, Access::ReadOnly)?, s.id)?;
    w.add_reader(view, 0, s.wake.take())?;
    Ok(())
}

fn fanout_run(p: &Params, subs: usize, role: u64) -> Result<CaseResult> {
    let cfg = config(p.size, 1);
    let ring_fd = create_ring("bench-fanout", cfg.data_bytes as usize)?;
    let mut w = Writer::create(
        map_ring(&ring_fd, cfg.data_bytes as usize, Access::ReadWrite)?,
        cfg,
    )?;
    seal_read_only(&ring_fd)?;
    let mut all = Vec::with_capacity(subs);
    for k in 0..subs {
        all.push(spawn_sub(p, &ring_fd, 100 + k as u64, role)?);
    }
    for s in &mut all {
        link_sub(&mut w, s)?;
    }
    let size = p.size;
    let start = monotonic_ns();
    for i in 0..p.messages {
        let mut loan = w.try_loan(size).map_err(|e| anyhow!("lossy loan: {e}"))?;
        loan.fill(pattern_byte(i, SALT));
        loan.commit();
    }
    let elapsed = monotonic_ns() - start;
    w.close();
    let mut intact = 0u64;
    for s in all {
        intact += s.peer.finish()?.checksum;
    }
    let mut r = CaseResult::throughput(Throughput {
        messages: p.messages,
        bytes_per_message: size as u64,
        elapsed_ns: elapsed,
    });
    r.extra.push((
        "publish_ns_per_msg",
        elapsed as f64 / p.messages.max(1) as f64,
    ));
    r.extra.push((
        "read_fraction_per_subscriber",
        intact as f64 / (p.messages as f64 * subs as f64),
    ));
    r.extra.push(("wakes_sent", w.stats().wakes_sent as f64));
    Ok(r)
}

/// Peer side of every case in this module: dispatches on the role in its ctl memfd.
fn sub_peer(mut ctx: PeerCtx) -> Result<()> {
    let (id, role) = read_ctl(ctx.take_fd(0)?)?;
    match role {
        ROLE_SPIN | ROLE_PARK => fanout_sub(ctx, id, role == ROLE_PARK),
        ROLE_IDLE => idle_sub(ctx, id),
        ROLE_PONG => pong_peer(ctx, id),
        other => bail!("unknown subscriber role {other}"),
    }
}

fn fanout_sub(mut ctx: PeerCtx, id: u64, parks: bool) -> Result<()> {
    let size = ctx.params.size;
    let cfg = config(size, 1);
    let ring_fd = ctx.take_fd(1)?;
    let page_fd = ctx.take_fd(2)?;
    let wake = WakeReceiver::from_fd(ctx.take_fd(3)?)?;
    let page = Arc::new(CursorPage::init_with(
        map_cursor_page(&page_fd, Access::ReadWrite)?,
        id,
        !parks,
    )?);
    let mut r = Reader::attach(
        map_ring(&ring_fd, cfg.data_bytes as usize, Access::ReadOnly)?,
        cfg,
        Some((page.clone(), 0)),
        StartAt::Beginning,
    )?;
    ctx.ready()?;
    let (mut intact, mut torn, mut lost) = (0u64, 0u64, 0u64);
    let mut idle_polls = 0u32;
    loop {
        if let Some(s) = r.try_recv().map_err(|e| anyhow!("{e}"))? {
            idle_polls = 0;
            lost += s.lost_before();
            let seq = s.seq();
            let got = sum(&s);
            if s.is_intact() {
                let want = pattern_sum(pattern_byte(seq, SALT), size);
                ensure!(
                    got == want,
                    "subscriber {id}: record {seq} checksum {got:#x}, expected {want:#x}"
                );
                intact += 1;
            } else {
                torn += 1;
            }
            continue;
        }
        if r.is_finished() {
            break;
        }
        if parks && idle_polls >= SPIN_ITERATIONS {
            protocol::announce_park(page.park_word());
            if !r.has_pending() && !r.is_finished() {
                wake.wait(None)?;
            }
            protocol::unpark(page.park_word());
            idle_polls = 0;
        } else {
            idle_polls += 1;
            std::hint::spin_loop();
        }
    }
    let at_end = r.lost_at_end().context("ring finished but not closed")?;
    let total = intact + torn + lost + at_end;
    ensure!(
        total == ctx.params.messages,
        "subscriber {id}: read {intact} + torn {torn} + lost {lost} + lost at end {at_end} = \
         {total}, but {} were published",
        ctx.params.messages
    );
    ctx.done(intact)
}

// ---------------------------------------------------------------------------------------------
// Ping-pong with idle subscribers
// ---------------------------------------------------------------------------------------------

#[inline]
fn send(w: &mut Writer, size: usize, byte: u8) -> Result<()> {
    let mut loan = w.try_loan(size).map_err(|e| anyhow!("{e}"))?;
    loan.fill(byte);
    loan.commit();
    Ok(())
}

#[inline]
fn recv(r: &mut Reader) -> Result<u64> {
    loop {
        if let Some(s) = r.try_recv().map_err(|e| anyhow!("{e}"))? {
            ensure!(s.lost_before() == 0, "ping-pong lost {}", s.lost_before());
            let got = sum(&s);
            ensure!(s.is_intact(), "ping-pong record overwritten while read");
            return Ok(got);
        }
        std::hint::spin_loop();
    }
}

fn idle_run(p: &Params, idle: usize) -> Result<CaseResult> {
    let size = p.size;
    let ping_cfg = config(size, 1);
    let pong_cfg = config(size, 2);
    let ping_fd = create_ring("bench-ping", ping_cfg.data_bytes as usize)?;
    let pong_fd = create_ring("bench-pong", pong_cfg.data_bytes as usize)?;
    let peer_page_fd = create_cursor_page("bench-peer-cursor")?;
    let own_page_fd = create_cursor_page("bench-parent-cursor")?;
    let mut ping = Writer::create(
        map_ring(&ping_fd, ping_cfg.data_bytes as usize, Access::ReadWrite)?,
        ping_cfg,
    )?;
    seal_read_only(&ping_fd)?;
    let own_page = Arc::new(CursorPage::init_with(
        map_cursor_page(&own_page_fd, Access::ReadWrite)?,
        PARENT_SUB,
        true,
    )?);
    seal_read_only(&own_page_fd)?;

    let mut idlers = Vec::with_capacity(idle);
    for k in 0..idle {
        idlers.push(spawn_sub(p, &ping_fd, 100 + k as u64, ROLE_IDLE)?);
    }
    for s in &mut idlers {
        link_sub(&mut ping, s)?;
    }

    let ctl = ctl_region(PEER_SUB, ROLE_PONG)?;
    let mut peer = Peer::spawn(
        p,
        &[
            ctl.fd(),
            ping_fd.as_fd(),
            pong_fd.as_fd(),
            peer_page_fd.as_fd(),
            own_page_fd.as_fd(),
        ],
    )?;
    peer.wait_ready()?;
    seal_read_only(&peer_page_fd)?;
    seal_read_only(&pong_fd)?;
    let view = CursorView::attach(map_cursor_page(&peer_page_fd, Access::ReadOnly)?, PEER_SUB)?;
    ping.add_reader(view, 0, None)?;
    let mut pong = Reader::attach(
        map_ring(&pong_fd, pong_cfg.data_bytes as usize, Access::ReadOnly)?,
        pong_cfg,
        Some((own_page.clone(), 0)),
        StartAt::Beginning,
    )?;
    let mut tally = Tally::default();
    let h = pingpong(p, |i| {
        let byte = pattern_byte(i, PING_SALT);
        send(&mut ping, size, byte)?;
        tally.sent(byte, size);
        tally.got(recv(&mut pong)?);
        tally.expect(pattern_byte(i, PONG_SALT), size);
        Ok(())
    })?;
    let done = peer.finish()?;
    tally.check(p, done.checksum)?;
    let readers = ping.reader_count();
    // Closing wakes every linked subscriber: the idle ones exit.
    ping.close();
    for s in idlers {
        s.peer.finish()?;
    }
    let mut r = CaseResult::latency(h);
    r.extra.push(("ping_ring_readers", readers as f64));
    r.extra
        .push(("wakes_sent_to_idle", ping.stats().wakes_sent as f64));
    Ok(r)
}

fn idle_sub(mut ctx: PeerCtx, id: u64) -> Result<()> {
    let cfg = config(ctx.params.size, 1);
    let ring_fd = ctx.take_fd(1)?;
    let page_fd = ctx.take_fd(2)?;
    let wake = WakeReceiver::from_fd(ctx.take_fd(3)?)?;
    let page = Arc::new(CursorPage::init_with(
        map_cursor_page(&page_fd, Access::ReadWrite)?,
        id,
        false,
    )?);
    let r = Reader::attach(
        map_ring(&ring_fd, cfg.data_bytes as usize, Access::ReadOnly)?,
        cfg,
        Some((page, 0)),
        StartAt::Next,
    )?;
    ctx.ready()?;
    // Idle: no park announced, so the writer never wakes us; only Writer::close does.
    wake.wait(None)?;
    drop(r);
    ctx.done(0)
}

fn pong_peer(mut ctx: PeerCtx, id: u64) -> Result<()> {
    let size = ctx.params.size;
    let fds = [
        ctx.take_fd(1)?,
        ctx.take_fd(2)?,
        ctx.take_fd(3)?,
        ctx.take_fd(4)?,
    ];
    let PeerRings {
        mut pong, mut ping, ..
    } = PeerRings::open(fds, (config(size, 1), config(size, 2)), id, true, None)?;
    ctx.ready()?;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        got = got.wrapping_add(recv(&mut ping).context("ping")?);
        send(&mut pong, size, pattern_byte(i, PONG_SALT))?;
    }
    ctx.done(got)
}

fn fanout1(p: &Params) -> Result<CaseResult> {
    fanout_run(p, 1, ROLE_SPIN)
}
fn fanout4(p: &Params) -> Result<CaseResult> {
    fanout_run(p, 4, ROLE_SPIN)
}
fn fanout16(p: &Params) -> Result<CaseResult> {
    fanout_run(p, 16, ROLE_SPIN)
}
fn fanout_park1(p: &Params) -> Result<CaseResult> {
    fanout_run(p, 1, ROLE_PARK)
}
fn fanout_park16(p: &Params) -> Result<CaseResult> {
    fanout_run(p, 16, ROLE_PARK)
}
fn idle0(p: &Params) -> Result<CaseResult> {
    idle_run(p, 0)
}
fn idle16(p: &Params) -> Result<CaseResult> {
    idle_run(p, IDLE)
}

/// The fan-out and idle-subscriber cases.
pub fn cases() -> Vec<Case> {
    let tp = |name, about, run| Case {
        name,
        group: Group::Membus,
        size: 64,
        kind: Kind::Throughput,
        pinning: Pinning::Split,
        about,
        run,
        peer: Some(sub_peer),
    };
    let lat = |name, about, run| Case {
        kind: Kind::Latency,
        ..tp(name, about, run)
    };
    vec![
        tp(
            "membus-fanout-1",
            "publisher cost, lossy ring, 64 B, 1 busy-poll subscriber process",
            fanout1 as fn(&Params) -> Result<CaseResult>,
        ),
        tp(
            "membus-fanout-4",
            "publisher cost, lossy ring, 64 B, 4 busy-poll subscriber processes (sharing CPU 1)",
            fanout4,
        ),
        tp(
            "membus-fanout-16",
            "publisher cost, lossy ring, 64 B, 16 busy-poll subscriber processes (sharing CPU 1)",
            fanout16,
        ),
        tp(
            "membus-fanout-park-1",
            "publisher cost, lossy ring, 64 B, 1 spin-then-park subscriber (park check on)",
            fanout_park1,
        ),
        tp(
            "membus-fanout-park-16",
            "publisher cost, lossy ring, 64 B, 16 spin-then-park subscribers (park check on)",
            fanout_park16,
        ),
        lat(
            "membus-lossy-pingpong-64",
            "bus-core rings, lossy, busy-poll ping-pong, 64 B each way, no extra subscriber",
            idle0,
        ),
        lat(
            "membus-lossy-pingpong-64-idle16",
            "same, plus 16 idle subscriber processes attached to the ping ring (not reading)",
            idle16,
        ),
    ]
}

/// Fan-out ratios (PERFORMANCE.md section 3). Publish cost is the inverse of the publisher's
/// msg/s, so "cost 16 / cost 1 <= 1.2" is "msg/s 1 / msg/s 16 <= 1.2".
pub fn ratios() -> Vec<Ratio> {
    let r = Ratio::new;
    vec![
        r(
            "membus-fanout-1",
            "membus-fanout-16",
            Metric::MsgsPerSec,
            Some("<= 1.2 (= publish cost 16 subs / 1 sub)"),
        ),
        r(
            "membus-fanout-1",
            "membus-fanout-4",
            Metric::MsgsPerSec,
            None,
        ),
        r(
            "membus-fanout-park-1",
            "membus-fanout-park-16",
            Metric::MsgsPerSec,
            Some("<= 1.2 (= publish cost 16 subs / 1 sub, park check on)"),
        ),
        r(
            "membus-lossy-pingpong-64-idle16",
            "membus-lossy-pingpong-64",
            Metric::P50,
            Some("<= 1.1"),
        ),
        r(
            "membus-lossy-pingpong-64",
            "membus-ring-pingpong-64",
            Metric::P50,
            None,
        ),
    ]
}
