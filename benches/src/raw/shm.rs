//! Ping-pong through shared memory: one message each way per round trip, with three ways of
//! waiting for it (busy-spin, futex, eventfd).
//!
//! Layout of the memfd (offsets in bytes; direction 0 = ping, parent to peer; 1 = pong):
//!
//! ```text
//! size <= 64 ("one 64-byte line each way"):
//!   0    [seq u32 | pad u32 | payload: size - 8 bytes]   ping line
//!   128  [seq u32 | pad u32 | payload: size - 8 bytes]   pong line (128 apart: no shared pair)
//! size > 64:
//!   0              [seq u32]            ping word, own 128-byte block
//!   128            [payload: size]      ping buffer
//!   B = 128 + padded(size)
//!   B              [seq u32]            pong word
//!   B + 128        [payload: size]      pong buffer
//! ```
//!
//! The sender fills the payload, then stores the round trip's number into `seq` (release); the
//! receiver waits until it reads that number (acquire), sums the payload, and answers the same
//! way. Futex: the waiter sleeps in FUTEX_WAIT on `seq` and the sender always calls FUTEX_WAKE.
//! Eventfd: one eventfd per direction; the waiter blocks in read(2), the sender writes 1.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, ensure};
use rustix::event::{EventfdFlags, eventfd};
use rustix::thread::futex;

use crate::case::{CaseResult, Params};
use crate::checksum::pattern_byte;
use crate::measure::{Tally, pingpong, spin_until};
use crate::peer::{Peer, PeerCtx};
use crate::shm::{PAD, Region, padded};

const PING_SALT: u8 = 0x5a;
const PONG_SALT: u8 = 0xa5;

/// How the receiver of a message waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Busy-spin on the sequence word.
    Spin,
    /// FUTEX_WAIT on the sequence word (shared, not private: two processes).
    Futex,
    /// Blocking read(2) of an eventfd.
    Eventfd,
}

/// Byte offsets of one direction.
#[derive(Clone, Copy, Debug)]
struct Dir {
    seq: usize,
    payload: usize,
    len: usize,
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    dirs: [Dir; 2],
    bytes: usize,
}

impl Layout {
    fn new(size: usize) -> Result<Layout> {
        ensure!(size > 8, "shared-memory ping-pong needs more than 8 bytes");
        let (block, payload, len) = if size <= 64 {
            (PAD, 8, size - 8)
        } else {
            (PAD + padded(size), PAD, size)
        };
        let dir = |d: usize| Dir {
            seq: d * block,
            payload: d * block + payload,
            len,
        };
        Ok(Layout {
            dirs: [dir(0), dir(1)],
            bytes: 2 * block,
        })
    }
}

/// One direction's signalling, as seen by either side.
struct Channel<'a> {
    seq: &'a AtomicU32,
    wait: Wait,
    efd: Option<OwnedFd>,
}

impl Channel<'_> {
    /// Publishes round trip `n` (payload already written).
    #[inline]
    fn signal(&self, n: u32) -> Result<()> {
        // SYNC POINT: release pairs with the acquire in `wait_for` on the other side; it
        // publishes the payload written before it.
        self.seq.store(n, Ordering::Release);
        match self.wait {
            Wait::Spin => {}
            Wait::Futex => {
                futex::wake(self.seq, futex::Flags::empty(), 1).context("FUTEX_WAKE")?;
            }
            Wait::Eventfd => {
                let efd = self.efd.as_ref().context("eventfd missing")?;
                let n = rustix::io::write(efd, &1u64.to_ne_bytes()).context("eventfd write")?;
                ensure!(n == 8, "short eventfd write");
            }
        }
        Ok(())
    }

    /// Waits until round trip `n` is published.
    #[inline]
    fn wait_for(&self, n: u32) -> Result<()> {
        match self.wait {
            // SYNC POINT: acquire pairs with the release in `signal`.
            Wait::Spin => spin_until(|| self.seq.load(Ordering::Acquire) == n),
            Wait::Futex => loop {
                // SYNC POINT: acquire pairs with the release in `signal`.
                let v = self.seq.load(Ordering::Acquire);
                if v == n {
                    break;
                }
                match futex::wait(self.seq, futex::Flags::empty(), v, None) {
                    Ok(()) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e).context("FUTEX_WAIT"),
                }
            },
            Wait::Eventfd => {
                let efd = self.efd.as_ref().context("eventfd missing")?;
                let mut buf = [0u8; 8];
                loop {
                    match rustix::io::read(efd, &mut buf[..]) {
                        Err(rustix::io::Errno::INTR) => continue,
                        r => {
                            ensure!(r.context("eventfd read")? == 8, "short eventfd read");
                            break;
                        }
                    }
                }
                // SYNC POINT: acquire pairs with the release in `signal` (the eventfd write
                // happens after it, so the value is visible once read(2) returns).
                let v = self.seq.load(Ordering::Acquire);
                ensure!(v == n, "eventfd woke for round trip {n} but seq is {v}");
            }
        }
        Ok(())
    }
}

fn eventfd_pair(wait: Wait) -> Result<[Option<OwnedFd>; 2]> {
    if wait != Wait::Eventfd {
        return Ok([None, None]);
    }
    let make = || eventfd(0, EventfdFlags::CLOEXEC).context("eventfd");
    Ok([Some(make()?), Some(make()?)])
}

/// Parent side: pings on direction 0, reads pongs on direction 1.
pub fn run(p: &Params, wait: Wait) -> Result<CaseResult> {
    let layout = Layout::new(p.size)?;
    let region = Region::create("membus-bench-pingpong", layout.bytes)?;
    let efds = eventfd_pair(wait)?;
    let mut fds = vec![region.fd()];
    fds.extend(efds.iter().flatten().map(|fd| fd.as_fd()));
    let mut peer = Peer::spawn(p, &fds)?;
    drop(fds);
    let [e0, e1] = efds;
    let (ping_d, pong_d) = (layout.dirs[0], layout.dirs[1]);
    let ping = Channel {
        seq: region.atomic_u32(ping_d.seq),
        wait,
        efd: e0,
    };
    let pong = Channel {
        seq: region.atomic_u32(pong_d.seq),
        wait,
        efd: e1,
    };
    peer.wait_ready()?;

    let mut tally = Tally::default();
    let h = pingpong(p, |i| {
        let byte = pattern_byte(i, PING_SALT);
        region.fill(ping_d.payload, ping_d.len, byte);
        tally.sent(byte, ping_d.len);
        let n = (i as u32).wrapping_add(1);
        ping.signal(n)?;
        pong.wait_for(n)?;
        tally.got(region.sum(pong_d.payload, pong_d.len));
        tally.expect(pattern_byte(i, PONG_SALT), pong_d.len);
        Ok(())
    })?;
    let done = peer.finish()?;
    tally.check(p, done.checksum)?;
    Ok(CaseResult::latency(h))
}

/// Peer side: answers every ping with a pong of the same size.
pub fn peer(mut ctx: PeerCtx, wait: Wait) -> Result<()> {
    let layout = Layout::new(ctx.params.size)?;
    let region = Region::open(ctx.take_fd(0)?, layout.bytes)?;
    let (e0, e1) = if wait == Wait::Eventfd {
        (Some(ctx.take_fd(1)?), Some(ctx.take_fd(2)?))
    } else {
        (None, None)
    };
    let (ping_d, pong_d) = (layout.dirs[0], layout.dirs[1]);
    let ping = Channel {
        seq: region.atomic_u32(ping_d.seq),
        wait,
        efd: e0,
    };
    let pong = Channel {
        seq: region.atomic_u32(pong_d.seq),
        wait,
        efd: e1,
    };
    ctx.ready()?;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        let n = (i as u32).wrapping_add(1);
        ping.wait_for(n)?;
        got = got.wrapping_add(region.sum(ping_d.payload, ping_d.len));
        region.fill(pong_d.payload, pong_d.len, pattern_byte(i, PONG_SALT));
        pong.signal(n)?;
    }
    ctx.done(got)
}
