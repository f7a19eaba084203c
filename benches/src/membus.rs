//! membus cases: two processes ping-pong over bus-core rings exactly as the client library uses
//! them (sealed memfds, reliable mode, registered cursors, the park protocol), so the numbers are
//! the data plane's own cost without the broker (which is off the data path anyway).
//!
//! Segments (the parent creates all of them and passes them to the peer):
//!
//! ```text
//! fd 0  ping ring    written by the parent, read by the peer
//! fd 1  pong ring    written by the peer, read by the parent
//! fd 2  cursor page  of the peer (its cursor for the ping ring)
//! fd 3  cursor page  of the parent (its cursor for the pong ring)
//! fd 4  wake socket  the peer parks on (the parent's ping writer wakes it)
//! fd 5  wake socket  the sending end the peer's pong writer wakes the parent with
//! ```

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bus_core::layout::{Mode, max_message_bytes_for};
use bus_core::ring::{CursorPage, CursorView, Reader, RingConfig, StartAt, Writer};
use bus_core::segment::{
    Access, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use bus_core::sys::clock::monotonic_ns;
use bus_core::wake::{WakeReceiver, WakeSender, pair, protocol};

use crate::case::{Case, CaseResult, Group, Kind, Metric, Params, Pinning, Ratio};
use crate::checksum::{pattern_byte, sum};
use crate::measure::{Tally, new_histogram, own_one_way, pingpong};
use crate::peer::{Peer, PeerCtx};

const PING_SALT: u8 = 0x3c;
const PONG_SALT: u8 = 0xc3;
/// Subscriber id of the parent's cursor page in the ping-pong cases.
pub(crate) const PARENT_SUB: u64 = 1;
/// Subscriber id of the peer's cursor page in the ping-pong cases.
pub(crate) const PEER_SUB: u64 = 2;

/// How a receiver waits for the next record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Poll the ring.
    Spin,
    /// Announce park, look again, block on the wake socket.
    Park,
    /// Poll this many times, then park (the library's default strategy).
    SpinThenPark(u32),
}

/// Polls before parking in [`Wait::SpinThenPark`]: the library's default.
const SPIN_ITERATIONS: u32 = 20_000;

fn ring_bytes(size: usize) -> u64 {
    // The smallest power of two that holds two messages of this size (the ring's limit is half
    // the ring), at least 64 KiB. A ping-pong has one message in flight; a larger ring only
    // spreads the records over more memory: at 1 MiB messages a 16 MiB ring measured 2.5x the
    // raw floor against 1.08x for this 4 MiB one (docs/benchmarks.md, "Ring size").
    ((size as u64 + 64) * 2).next_power_of_two().max(64 << 10)
}

fn config(size: usize, publisher_id: u64) -> RingConfig {
    let data_bytes = ring_bytes(size);
    RingConfig {
        mode: Mode::Reliable,
        data_bytes,
        max_message_bytes: max_message_bytes_for(data_bytes as usize) as u32,
        publisher_id,
    }
}

/// Sends one message of `size` bytes, every byte written.
#[inline]
fn send(w: &mut Writer, size: usize, byte: u8) -> Result<()> {
    let mut loan = w
        .loan(size, Some(Duration::from_secs(10)))
        .map_err(|e| anyhow!("{e}"))?;
    loan.fill(byte);
    loan.commit();
    Ok(())
}

/// Receives one message: returns (checksum of every byte, publish timestamp).
#[inline]
fn recv(r: &mut Reader, wait: Wait, page: &CursorPage, wake: &WakeReceiver) -> Result<(u64, u64)> {
    let mut polls = 0u32;
    loop {
        if let Some(s) = r.try_recv().map_err(|e| anyhow!("{e}"))? {
            return Ok((sum(&s), s.timestamp_ns()));
        }
        match wait {
            Wait::Spin => std::hint::spin_loop(),
            Wait::SpinThenPark(n) if polls < n => {
                polls += 1;
                std::hint::spin_loop();
            }
            Wait::Park | Wait::SpinThenPark(_) => {
                protocol::announce_park(page.park_word());
                if !r.has_pending() {
                    // No timeout: one blocking recv. The harness watchdog ends a hung run.
                    wake.wait(None)?;
                }
                protocol::unpark(page.park_word());
            }
        }
    }
}

fn run(p: &Params, wait: Wait) -> Result<CaseResult> {
    let size = p.size;
    let ping_cfg = config(size, 1);
    let pong_cfg = config(size, 2);
    let ping_fd = create_ring("bench-ping", ping_cfg.data_bytes as usize)?;
    let pong_fd = create_ring("bench-pong", pong_cfg.data_bytes as usize)?;
    let peer_page_fd = create_cursor_page("bench-peer-cursor")?;
    let own_page_fd = create_cursor_page("bench-parent-cursor")?;
    let (ping_wake_tx, ping_wake_rx) = pair()?;
    let (pong_wake_tx, pong_wake_rx) = pair()?;

    let mut ping = Writer::create(
        map_ring(&ping_fd, ping_cfg.data_bytes as usize, Access::ReadWrite)?,
        ping_cfg,
    )?;
    seal_read_only(&ping_fd)?;
    let own_page = Arc::new(CursorPage::init_with(
        map_cursor_page(&own_page_fd, Access::ReadWrite)?,
        PARENT_SUB,
        wait == Wait::Spin,
    )?);
    seal_read_only(&own_page_fd)?;

    let ping_rx_fd: OwnedFd = ping_wake_rx.into();
    let pong_tx_fd = pong_wake_tx.into_shared();
    let fds = [
        ping_fd.as_fd(),
        pong_fd.as_fd(),
        peer_page_fd.as_fd(),
        own_page_fd.as_fd(),
        ping_rx_fd.as_fd(),
        pong_tx_fd.as_fd(),
    ];
    let mut peer = Peer::spawn(p, &fds)?;
    drop((ping_rx_fd, pong_tx_fd));
    peer.wait_ready()?;

    // The peer has mapped its writable segments: seal them, then look at them read-only.
    seal_read_only(&peer_page_fd)?;
    seal_read_only(&pong_fd)?;
    let view = CursorView::attach(map_cursor_page(&peer_page_fd, Access::ReadOnly)?, PEER_SUB)?;
    ping.add_reader(view, 0, Some(ping_wake_tx))?;
    let mut pong = Reader::attach(
        map_ring(&pong_fd, pong_cfg.data_bytes as usize, Access::ReadOnly)?,
        pong_cfg,
        Some((own_page.clone(), 0)),
        StartAt::Beginning,
    )?;
    let pong_wake = pong_wake_rx;

    let mut own = new_histogram();
    let mut tally = Tally::default();
    let h = pingpong(p, |i| {
        let byte = pattern_byte(i, PING_SALT);
        send(&mut ping, size, byte)?;
        tally.sent(byte, size);
        let (s, ts) = recv(&mut pong, wait, &own_page, &pong_wake)?;
        let now = monotonic_ns();
        own.saturating_record(now.saturating_sub(ts).max(1));
        tally.got(s);
        tally.expect(pattern_byte(i, PONG_SALT), size);
        Ok(())
    })?;
    let done = peer.finish()?;
    tally.check(p, done.checksum)?;
    let mut result = CaseResult::latency(h);
    result.extra.extend(own_one_way(&own));
    result
        .extra
        .push(("wakes_sent", ping.stats().wakes_sent as f64));
    Ok(result)
}

/// The peer side of a two-ring ping-pong: the peer's own cursor page, the pong ring it writes
/// (honouring, and waking if given a wake socket, the parent through the parent's cursor page),
/// and the ping ring it reads from its first record. Shared with the fan-out cases.
pub(crate) struct PeerRings {
    /// The peer's cursor page.
    pub page: Arc<CursorPage>,
    /// The pong ring, written by the peer.
    pub pong: Writer,
    /// The ping ring, read by the peer.
    pub ping: Reader,
}

impl PeerRings {
    /// `fds`: ping ring, pong ring, the peer's cursor page, the parent's cursor page.
    pub(crate) fn open(
        [ping_fd, pong_fd, own_page_fd, parent_page_fd]: [OwnedFd; 4],
        (ping_cfg, pong_cfg): (RingConfig, RingConfig),
        id: u64,
        never_parks: bool,
        parent_wake: Option<WakeSender>,
    ) -> Result<PeerRings> {
        let page = Arc::new(CursorPage::init_with(
            map_cursor_page(&own_page_fd, Access::ReadWrite)?,
            id,
            never_parks,
        )?);
        let mut pong = Writer::create(
            map_ring(&pong_fd, pong_cfg.data_bytes as usize, Access::ReadWrite)?,
            pong_cfg,
        )?;
        let view = CursorView::attach(
            map_cursor_page(&parent_page_fd, Access::ReadOnly)?,
            PARENT_SUB,
        )?;
        pong.add_reader(view, 0, parent_wake)?;
        let ping = Reader::attach(
            map_ring(&ping_fd, ping_cfg.data_bytes as usize, Access::ReadOnly)?,
            ping_cfg,
            Some((page.clone(), 0)),
            StartAt::Beginning,
        )?;
        Ok(PeerRings { page, pong, ping })
    }
}

fn peer(mut ctx: PeerCtx, wait: Wait) -> Result<()> {
    let size = ctx.params.size;
    let fds = [
        ctx.take_fd(0)?,
        ctx.take_fd(1)?,
        ctx.take_fd(2)?,
        ctx.take_fd(3)?,
    ];
    let wake = WakeReceiver::from_fd(ctx.take_fd(4)?)?;
    let parent_wake = WakeSender::from_fd(ctx.take_fd(5)?);
    let PeerRings {
        page,
        mut pong,
        mut ping,
    } = PeerRings::open(
        fds,
        (config(size, 1), config(size, 2)),
        PEER_SUB,
        wait == Wait::Spin,
        Some(parent_wake),
    )?;
    ctx.ready()?;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        let (s, _) = recv(&mut ping, wait, &page, &wake).context("ping")?;
        got = got.wrapping_add(s);
        send(&mut pong, size, pattern_byte(i, PONG_SALT))?;
    }
    ctx.done(got)
}

fn spin_run(p: &Params) -> Result<CaseResult> {
    run(p, Wait::Spin)
}
fn spin_peer(ctx: PeerCtx) -> Result<()> {
    peer(ctx, Wait::Spin)
}
fn spinpark_run(p: &Params) -> Result<CaseResult> {
    run(p, Wait::SpinThenPark(SPIN_ITERATIONS))
}
fn spinpark_peer(ctx: PeerCtx) -> Result<()> {
    peer(ctx, Wait::SpinThenPark(SPIN_ITERATIONS))
}
fn park_run(p: &Params) -> Result<CaseResult> {
    run(p, Wait::Park)
}
fn park_peer(ctx: PeerCtx) -> Result<()> {
    peer(ctx, Wait::Park)
}

/// The membus cases.
pub fn cases() -> Vec<Case> {
    let case = |name, size, about, run, peer| Case {
        name,
        group: Group::Membus,
        size,
        kind: Kind::Latency,
        pinning: Pinning::Split,
        about,
        run,
        peer: Some(peer),
    };
    vec![
        case(
            "membus-ring-pingpong-8",
            8,
            "bus-core rings, reliable, busy-poll, 8 B each way",
            spin_run as fn(&Params) -> Result<CaseResult>,
            spin_peer as fn(PeerCtx) -> Result<()>,
        ),
        case(
            "membus-ring-pingpong-64",
            64,
            "bus-core rings, reliable, busy-poll, 64 B each way",
            spin_run,
            spin_peer,
        ),
        Case {
            pinning: Pinning::Unpinned,
            ..case(
                "membus-ring-pingpong-64-unpinned",
                64,
                "same, neither process pinned",
                spin_run,
                spin_peer,
            )
        },
        case(
            "membus-ring-pingpong-4k",
            4096,
            "bus-core rings, reliable, busy-poll, 4 KiB each way",
            spin_run,
            spin_peer,
        ),
        case(
            "membus-ring-pingpong-64k",
            65536,
            "bus-core rings, reliable, busy-poll, 64 KiB each way",
            spin_run,
            spin_peer,
        ),
        case(
            "membus-ring-pingpong-1m",
            1 << 20,
            "bus-core rings, reliable, busy-poll, 1 MiB each way (a tenth of the samples)",
            spin_run,
            spin_peer,
        ),
        case(
            "membus-ring-spinpark-64",
            64,
            "bus-core rings, reliable, spin 20,000 polls then park (the default), 64 B each way",
            spinpark_run,
            spinpark_peer,
        ),
        case(
            "membus-ring-park-64",
            64,
            "bus-core rings, reliable, park on the wake socket, 64 B each way",
            park_run,
            park_peer,
        ),
    ]
}

/// membus-vs-floor ratios, with the targets of PERFORMANCE.md section 3.
pub fn ratios() -> Vec<Ratio> {
    let r = |numerator, denominator, metric, target| {
        Ratio::new(numerator, denominator, metric, Some(target))
    };
    vec![
        r(
            "membus-ring-pingpong-8",
            "cacheline-pingpong",
            Metric::P50,
            "<= 2.0 (stretch 1.5)",
        ),
        r(
            "membus-ring-pingpong-64",
            "cacheline-pingpong",
            Metric::P50,
            "<= 2.0 (stretch 1.5)",
        ),
        r(
            "membus-ring-pingpong-64-unpinned",
            "cacheline-pingpong-unpinned",
            Metric::P50,
            "<= 2.0",
        ),
        r(
            "membus-ring-pingpong-4k",
            "shm-pingpong-4k",
            Metric::P50,
            "<= 1.2 (stretch 1.05)",
        ),
        r(
            "membus-ring-pingpong-64k",
            "shm-pingpong-64k",
            Metric::P50,
            "<= 1.2 (stretch 1.05)",
        ),
        r(
            "membus-ring-pingpong-1m",
            "shm-pingpong-1m",
            Metric::P50,
            "<= 1.2 (stretch 1.05)",
        ),
        r(
            "membus-ring-park-64",
            "seqpacket-pingpong-64",
            Metric::P50,
            "<= 1.1 (stretch: eventfd floor)",
        ),
        r(
            "membus-ring-park-64",
            "eventfd-pingpong",
            Metric::P50,
            "<= 1.0 (stretch)",
        ),
    ]
}
