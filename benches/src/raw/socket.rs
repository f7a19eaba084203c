//! Socket baselines: blocking ping-pong over AF_UNIX socketpairs (SEQPACKET and STREAM) and TCP
//! loopback, and a one-way SEQPACKET stream. Sockets are blocking, buffers are the kernel defaults; the sender fills a
//! user buffer and sends it, the receiver receives into a user buffer and sums it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, ensure};
use bus_core::sys::clock::monotonic_ns;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, accept_with, bind, connect,
    getsockname, listen, recv, send, socket_with, socketpair,
};

use crate::case::{CaseResult, Params};
use crate::checksum::{pattern_byte, pattern_sum, sum};
use crate::measure::{PageBuf, Tally, pingpong, stream_result};
use crate::peer::{Peer, PeerCtx};

const PING_SALT: u8 = 0x3c;
const PONG_SALT: u8 = 0xc3;

fn pair(ty: SocketType) -> Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::UNIX, ty, SocketFlags::CLOEXEC, None).context("socketpair")
}

/// Sends one whole message: one datagram, or `write`s until done on a stream.
fn send_msg(fd: BorrowedFd<'_>, ty: SocketType, buf: &[u8]) -> Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match send(fd, &buf[off..], SendFlags::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            r => off += r.context("send")?,
        }
        ensure!(
            ty == SocketType::STREAM || off == buf.len(),
            "short datagram send"
        );
    }
    Ok(())
}

/// Receives one whole message of `buf.len()` bytes.
fn recv_msg(fd: BorrowedFd<'_>, ty: SocketType, buf: &mut [u8]) -> Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = match recv(fd, &mut buf[off..], RecvFlags::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            r => r.context("recv")?.1,
        };
        ensure!(n > 0, "peer closed the socket");
        off += n;
        ensure!(
            ty == SocketType::STREAM || off == buf.len(),
            "datagram of {n} bytes"
        );
    }
    Ok(())
}

/// Parent side of a blocking ping-pong over a `ty` socketpair.
pub fn pingpong_run(p: &Params, ty: SocketType) -> Result<CaseResult> {
    let (ours, theirs) = pair(ty)?;
    pingpong_with(p, ours, theirs, ty, |fd, buf| recv_msg(fd, ty, buf))
}

/// Peer side of [`pingpong_run`] (and of [`tcp_pingpong_run`], with `STREAM`).
pub fn pingpong_peer(ctx: PeerCtx, ty: SocketType) -> Result<()> {
    pingpong_peer_with(ctx, ty, |fd, buf| recv_msg(fd, ty, buf))
}

/// Parent side of a blocking ping-pong over TCP on 127.0.0.1, `TCP_NODELAY` on both ends.
pub fn tcp_pingpong_run(p: &Params) -> Result<CaseResult> {
    let (ours, theirs) = tcp_pair()?;
    let ty = SocketType::STREAM;
    pingpong_with(p, ours, theirs, ty, |fd, buf| recv_msg(fd, ty, buf))
}

/// A connected TCP pair on the loopback interface (listener on an ephemeral port, closed after
/// the accept).
fn tcp_pair() -> Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{Ipv4Addr, SocketAddrV4, sockopt};
    let listener = socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .context("TCP socket")?;
    bind(&listener, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    listen(&listener, 1).context("listen")?;
    let addr = getsockname(&listener).context("getsockname")?;
    let client = socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .context("TCP socket")?;
    connect(&client, &addr).context("connect to 127.0.0.1")?;
    let server = accept_with(&listener, SocketFlags::CLOEXEC).context("accept")?;
    for fd in [&client, &server] {
        sockopt::set_tcp_nodelay(fd, true).context("TCP_NODELAY")?;
    }
    Ok((client, server))
}

/// Ping-pong over the connected pair: the parent keeps `ours`, the peer gets `theirs`; the
/// parent sends with `send` and receives with `recv`.
pub(crate) fn pingpong_with(
    p: &Params,
    ours: OwnedFd,
    theirs: OwnedFd,
    ty: SocketType,
    mut recv: impl FnMut(BorrowedFd<'_>, &mut [u8]) -> Result<()>,
) -> Result<CaseResult> {
    let mut peer = Peer::spawn(p, &[theirs.as_fd()])?;
    drop(theirs);
    peer.wait_ready()?;
    let mut out = PageBuf::new(p.size);
    let mut inb = PageBuf::new(p.size);
    let mut tally = Tally::default();
    let h = pingpong(p, |i| {
        let byte = pattern_byte(i, PING_SALT);
        out.fill(byte);
        tally.sent(byte, out.len());
        send_msg(ours.as_fd(), ty, &out)?;
        recv(ours.as_fd(), &mut inb)?;
        tally.got(sum(&inb));
        tally.expect(pattern_byte(i, PONG_SALT), inb.len());
        Ok(())
    })?;
    let done = peer.finish()?;
    tally.check(p, done.checksum)?;
    Ok(CaseResult::latency(h))
}

/// Peer side of [`pingpong_with`]: receives with `recv`, answers with a plain send.
pub(crate) fn pingpong_peer_with(
    mut ctx: PeerCtx,
    ty: SocketType,
    mut recv: impl FnMut(BorrowedFd<'_>, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let sock = ctx.take_fd(0)?;
    let mut buf = PageBuf::new(ctx.params.size);
    ctx.ready()?;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        recv(sock.as_fd(), &mut buf)?;
        got = got.wrapping_add(sum(&buf));
        buf.fill(pattern_byte(i, PONG_SALT));
        send_msg(sock.as_fd(), ty, &buf)?;
    }
    ctx.done(got)
}

/// A new socketpair of type `ty` (for the io_uring case).
pub(crate) fn socket_pair(ty: SocketType) -> Result<(OwnedFd, OwnedFd)> {
    pair(ty)
}

/// Parent side of a one-way SEQPACKET stream: the parent sends, the peer receives.
pub fn stream_run(p: &Params) -> Result<CaseResult> {
    let ty = SocketType::SEQPACKET;
    let (ours, theirs) = pair(ty)?;
    let mut peer = Peer::spawn(p, &[theirs.as_fd()])?;
    drop(theirs);
    peer.wait_ready()?;
    let mut out = PageBuf::new(p.size);
    let mut sent = 0u64;
    let start = monotonic_ns();
    for i in 0..p.messages {
        let byte = pattern_byte(i, PING_SALT);
        out.fill(byte);
        sent = sent.wrapping_add(pattern_sum(byte, out.len()));
        send_msg(ours.as_fd(), ty, &out)?;
    }
    let done = peer.finish()?;
    Ok(CaseResult::throughput(stream_result(
        p, start, done, sent, p.size,
    )?))
}

/// Peer side of [`stream_run`].
pub fn stream_peer(mut ctx: PeerCtx) -> Result<()> {
    let ty = SocketType::SEQPACKET;
    let sock = ctx.take_fd(0)?;
    let mut buf = PageBuf::new(ctx.params.size);
    ctx.ready()?;
    let mut got = 0u64;
    for _ in 0..ctx.params.messages {
        recv_msg(sock.as_fd(), ty, &mut buf)?;
        got = got.wrapping_add(sum(&buf));
    }
    ctx.done(got)
}
