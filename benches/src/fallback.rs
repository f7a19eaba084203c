//! Datagram fallback through a real broker: the client sends PUBLISH frames on its control
//! socket, the broker writes them into a broker-owned ring, reads that ring as the datagram
//! subscriber's relay and sends one DELIVER frame per message (`docs/protocol.md` §9).
//!
//! Three processes: the `bus-broker` binary (unpinned, see [`crate::broker`]), the parent and the
//! peer (pinned as usual). Both clients say HELLO with transport datagram; every PUBLISH payload
//! byte is written by the sender (into the frame buffer it sends) and every DELIVER payload byte
//! is summed by the receiver.
//!
//! - `fallback-pingpong-64`: the parent publishes on `bench.ping` and reads `bench.pong`; the
//!   peer answers each ping with a pong. One-way = RTT / 2 and each one-way crosses the broker:
//!   client -> broker -> client, **two hops**, where the raw SEQPACKET ping-pong it is compared
//!   with is one.
//! - `fallback-stream-64`: the parent publishes a reliable stream, the peer subscribes. A tenth of
//!   the usual stream length (2 M messages at full scale): the path runs at SEQPACKET speed.
//!   The broker refuses PUBLISH with `too-slow` when the ring and its 256-message backlog are
//!   full; the publisher then re-sends those messages (`refused` in the extras) so the
//!   subscriber still gets every message exactly once.

use std::os::fd::AsFd;

use anyhow::{Context, Result, bail, ensure};
use bus_core::frame::{ErrorCode, Frame, HEADER_BYTES, ModeRequest, Msg, Publish, Transport};
use bus_core::sys::clock::monotonic_ns;

use crate::broker::{Broker, Client, connect};
use crate::case::{Case, CaseResult, Group, Kind, Metric, Params, Pinning, Ratio};
use crate::checksum::{pattern_byte, pattern_sum, sum};
use crate::measure::{Tally, pingpong, stream_result};
use crate::peer::{Peer, PeerCtx};

const PING_SALT: u8 = 0x3c;
const PONG_SALT: u8 = 0xc3;
const STREAM_SALT: u8 = 0x5a;
const PING: &str = "bench.ping";
const PONG: &str = "bench.pong";
const STREAM: &str = "bench.stream";
/// Offset of the payload in an encoded PUBLISH frame (header + publisher id).
const PUBLISH_PAYLOAD: usize = HEADER_BYTES + 8;
/// The stream is this much shorter than the shm streams of the same size.
const STREAM_DIV: u64 = 10;
/// How often (in messages) the stream publisher looks for ERROR frames without blocking.
const ERROR_POLL_EVERY: u64 = 16;

/// A PUBLISH frame encoded once; each message rewrites the request id and the payload in place.
struct PublishFrame {
    buf: Vec<u8>,
}

impl PublishFrame {
    fn new(publisher_id: u64, size: usize) -> Result<PublishFrame> {
        let zeros = vec![0u8; size];
        let mut buf = Vec::new();
        Frame::new(
            0,
            Msg::Publish(Publish {
                publisher_id,
                payload: &zeros,
            }),
        )
        .encode(&mut buf)
        .context("encode PUBLISH")?;
        Ok(PublishFrame { buf })
    }

    /// Writes every payload byte, sets the request id, sends.
    #[inline]
    fn send(&mut self, c: &Client, request_id: u64, byte: u8) -> Result<()> {
        self.buf[16..24].copy_from_slice(&request_id.to_le_bytes());
        self.buf[PUBLISH_PAYLOAD..].fill(byte);
        c.send_raw(&self.buf)
    }

    /// [`PublishFrame::send`] that never blocks in `send` while the broker may be waiting for
    /// us to read: if the socket is full, reads the ERROR frames queued for us, waits for
    /// either direction and tries again. (A publisher blocked in `send` while the broker queues
    /// refusals for it is disconnected once 512 frames wait.)
    #[inline]
    fn send_stream(
        &mut self,
        c: &mut Client,
        request_id: u64,
        byte: u8,
        refused: &mut Vec<u64>,
    ) -> Result<()> {
        self.buf[16..24].copy_from_slice(&request_id.to_le_bytes());
        self.buf[PUBLISH_PAYLOAD..].fill(byte);
        while !c.try_send_raw(&self.buf)? {
            collect_refused(c, refused, None)?;
            c.wait_io()?;
        }
        Ok(())
    }
}

/// Receives frames until a DELIVER; returns (sum of its payload, payload length, lost_before).
#[inline]
fn recv_deliver(c: &mut Client) -> Result<(u64, usize, u64)> {
    loop {
        let f = c.recv()?;
        match f.msg {
            Msg::Deliver(d) => return Ok((sum(d.payload), d.payload.len(), d.lost_before)),
            Msg::Error(e) => bail!("broker error: {}: {}", e.code, e.message),
            _ => continue,
        }
    }
}

fn start_broker(p: &Params) -> Result<Broker> {
    Broker::start(&p.peer_exe, "warn")
}

fn pingpong_run(p: &Params) -> Result<CaseResult> {
    let broker = start_broker(p)?;
    let mut me = Client::new(connect(broker.socket())?);
    me.hello(Transport::Datagram, "bench-ping")?;
    me.subscribe(PONG, ModeRequest::Reliable, Transport::Datagram)?;
    let pid = me.create_datagram_publisher(PING, ModeRequest::Reliable)?;
    let theirs = connect(broker.socket())?;
    let mut peer = Peer::spawn(p, &[theirs.as_fd()])?;
    drop(theirs);
    peer.wait_ready()?;
    let mut frame = PublishFrame::new(pid, p.size)?;
    let mut tally = Tally::default();
    let h = pingpong(p, |i| {
        let byte = pattern_byte(i, PING_SALT);
        frame.send(&me, 0, byte)?;
        tally.sent(byte, p.size);
        let (s, len, lost) = recv_deliver(&mut me)?;
        ensure!(
            len == p.size && lost == 0,
            "pong of {len} bytes, {lost} lost"
        );
        tally.got(s);
        tally.expect(pattern_byte(i, PONG_SALT), p.size);
        Ok(())
    })?;
    let done = peer.finish()?;
    tally.check(p, done.checksum)?;
    drop(broker);
    Ok(CaseResult::latency(h))
}

fn pingpong_peer(mut ctx: PeerCtx) -> Result<()> {
    let size = ctx.params.size;
    let mut c = Client::new(ctx.take_fd(0)?);
    c.hello(Transport::Datagram, "bench-pong")?;
    c.subscribe(PING, ModeRequest::Reliable, Transport::Datagram)?;
    let pid = c.create_datagram_publisher(PONG, ModeRequest::Reliable)?;
    let mut frame = PublishFrame::new(pid, size)?;
    ctx.ready()?;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        let (s, len, lost) = recv_deliver(&mut c).context("ping")?;
        ensure!(len == size && lost == 0, "ping of {len} bytes, {lost} lost");
        got = got.wrapping_add(s);
        frame.send(&c, 0, pattern_byte(i, PONG_SALT))?;
    }
    ctx.done(got)
}

fn stream_messages(p: &Params) -> u64 {
    (p.messages / STREAM_DIV).max(1)
}

/// Collects the messages the broker refused (ERROR too-slow, request id = message + 1) from the
/// frames queued on the publisher's socket. `until_pong`: block until the PONG for `token`.
fn collect_refused(c: &mut Client, refused: &mut Vec<u64>, until_pong: Option<u64>) -> Result<()> {
    loop {
        let f = match until_pong {
            Some(_) => c.recv()?,
            None => match c.try_recv()? {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        match f.msg {
            Msg::Error(e) if e.code == ErrorCode::TooSlow && f.request_id > 0 => {
                refused.push(f.request_id - 1);
            }
            Msg::Error(e) => bail!("broker error on PUBLISH: {}: {}", e.code, e.message),
            Msg::Pong { token } if Some(token) == until_pong => return Ok(()),
            _ => {}
        }
    }
}

/// The stream publisher's side of the broker's flow control: PUBLISHes the broker refused
/// (`too-slow`: ring and backlog full) and PING tokens.
#[derive(Default)]
struct Flow {
    refused: Vec<u64>,
    token: u64,
}

impl Flow {
    /// Sends message `i` for each `i` (request id `i + 1`). Every [`ERROR_POLL_EVERY`] messages
    /// it reads the refusals queued for it; after any, it waits for the broker to answer
    /// everything so far ([`Flow::barrier`]) and pauses 1 ms: the broker's refusals can
    /// otherwise outrun what a publisher reads, and the broker disconnects a client with 512
    /// unread frames.
    fn publish(
        &mut self,
        me: &mut Client,
        frame: &mut PublishFrame,
        msgs: impl Iterator<Item = u64>,
    ) -> Result<()> {
        for (k, i) in msgs.enumerate() {
            frame.send_stream(me, i + 1, pattern_byte(i, STREAM_SALT), &mut self.refused)?;
            if (k as u64 + 1).is_multiple_of(ERROR_POLL_EVERY) {
                let before = self.refused.len();
                collect_refused(me, &mut self.refused, None)?;
                if self.refused.len() > before {
                    self.barrier(me)?;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
        Ok(())
    }

    /// PING -> PONG: afterwards every refusal of an earlier PUBLISH is in `refused`.
    fn barrier(&mut self, me: &mut Client) -> Result<()> {
        self.token += 1;
        me.send(&Frame::new(0, Msg::Ping { token: self.token }))?;
        collect_refused(me, &mut self.refused, Some(self.token))
    }
}

fn stream_run(p: &Params) -> Result<CaseResult> {
    let n = stream_messages(p);
    let broker = start_broker(p)?;
    let mut me = Client::new(connect(broker.socket())?);
    me.hello(Transport::Datagram, "bench-stream-pub")?;
    let pid = me.create_datagram_publisher(STREAM, ModeRequest::Reliable)?;
    let theirs = connect(broker.socket())?;
    let mut peer = Peer::spawn(p, &[theirs.as_fd()])?;
    drop(theirs);
    peer.wait_ready()?;
    let mut frame = PublishFrame::new(pid, p.size)?;
    let mut flow = Flow::default();
    let start = monotonic_ns();
    flow.publish(&mut me, &mut frame, 0..n)?;
    // PING is answered after every PUBLISH before it was handled: when the PONG arrives, every
    // refusal has been seen. Re-send the refused messages until none is refused.
    let mut total_refused = 0u64;
    loop {
        flow.barrier(&mut me)?;
        if flow.refused.is_empty() {
            break;
        }
        total_refused += flow.refused.len() as u64;
        std::thread::sleep(std::time::Duration::from_millis(1));
        let again = std::mem::take(&mut flow.refused);
        flow.publish(&mut me, &mut frame, again.into_iter())?;
    }
    let sent = (0..n).fold(0u64, |acc, i| {
        acc.wrapping_add(pattern_sum(pattern_byte(i, STREAM_SALT), p.size))
    });
    let done = peer.finish()?;
    let mut t = stream_result(p, start, done, sent, p.size)?;
    t.messages = n;
    let mut r = CaseResult::throughput(t);
    r.extra.push(("refused", total_refused as f64));
    drop(broker);
    Ok(r)
}

fn stream_peer(mut ctx: PeerCtx) -> Result<()> {
    let size = ctx.params.size;
    let n = stream_messages(&ctx.params);
    let mut c = Client::new(ctx.take_fd(0)?);
    c.hello(Transport::Datagram, "bench-stream-sub")?;
    c.subscribe(STREAM, ModeRequest::Reliable, Transport::Datagram)?;
    ctx.ready()?;
    let mut got = 0u64;
    for _ in 0..n {
        let (s, len, lost) = recv_deliver(&mut c)?;
        ensure!(len == size, "message of {len} bytes");
        ensure!(lost == 0, "{lost} messages lost on a reliable topic");
        got = got.wrapping_add(s);
    }
    ctx.done(got)
}

/// The datagram fallback cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "fallback-pingpong-64",
            group: Group::Membus,
            size: 64,
            kind: Kind::Latency,
            pinning: Pinning::Split,
            about: "datagram fallback via a real bus-broker (unpinned), reliable topics, 64 B \
                    ping-pong; one-way = client -> broker -> client (two hops)",
            run: pingpong_run,
            peer: Some(pingpong_peer),
        },
        Case {
            name: "fallback-stream-64",
            group: Group::Membus,
            size: 64,
            kind: Kind::Throughput,
            pinning: Pinning::Split,
            about: "datagram fallback via a real bus-broker, reliable topic, one-way 64 B stream \
                    (1/10 of the usual count); refused PUBLISHes re-sent",
            run: stream_run,
            peer: Some(stream_peer),
        },
    ]
}

/// Fallback-vs-SEQPACKET ratios (PERFORMANCE.md section 3).
pub fn ratios() -> Vec<Ratio> {
    vec![
        Ratio {
            numerator: "fallback-pingpong-64",
            denominator: "seqpacket-pingpong-64",
            metric: Metric::P50,
            target: Some("<= 2.2 (stretch 2.0); two hops vs one"),
        },
        Ratio {
            numerator: "fallback-stream-64",
            denominator: "seqpacket-stream-64",
            metric: Metric::MsgsPerSec,
            target: Some(">= 0.5"),
        },
    ]
}
