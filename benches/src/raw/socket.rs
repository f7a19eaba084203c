//! AF_UNIX socketpair baselines: blocking ping-pong (SEQPACKET and STREAM) and a one-way
//! SEQPACKET stream. Sockets are blocking, buffers are the kernel defaults; the sender fills a
//! user buffer and sends it, the receiver receives into a user buffer and sums it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, ensure};
use bus_core::sys::clock::monotonic_ns;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, recv, send, socketpair,
};

use crate::case::{CaseResult, Params};
use crate::checksum::{pattern_byte, pattern_sum, sum};
use crate::measure::{PageBuf, check_sum, pingpong, stream_result};
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
    let mut peer = Peer::spawn(p, &[theirs.as_fd()])?;
    drop(theirs);
    peer.wait_ready()?;
    let mut out = PageBuf::new(p.size);
    let mut inb = PageBuf::new(p.size);
    let (mut sent, mut got, mut expected) = (0u64, 0u64, 0u64);
    let h = pingpong(p, |i| {
        let byte = pattern_byte(i, PING_SALT);
        out.fill(byte);
        sent = sent.wrapping_add(pattern_sum(byte, out.len()));
        send_msg(ours.as_fd(), ty, &out)?;
        recv_msg(ours.as_fd(), ty, &mut inb)?;
        got = got.wrapping_add(sum(&inb));
        expected = expected.wrapping_add(pattern_sum(pattern_byte(i, PONG_SALT), inb.len()));
        Ok(())
    })?;
    let done = peer.finish()?;
    check_sum(p, "pong", got, expected)?;
    check_sum(p, "ping (read by peer)", done.checksum, sent)?;
    Ok(CaseResult::latency(h))
}

/// Peer side of [`pingpong_run`].
pub fn pingpong_peer(mut ctx: PeerCtx, ty: SocketType) -> Result<()> {
    let sock = ctx.take_fd(0)?;
    let mut buf = PageBuf::new(ctx.params.size);
    ctx.ready()?;
    let mut got = 0u64;
    for i in 0..ctx.params.round_trips() {
        recv_msg(sock.as_fd(), ty, &mut buf)?;
        got = got.wrapping_add(sum(&buf));
        buf.fill(pattern_byte(i, PONG_SALT));
        send_msg(sock.as_fd(), ty, &buf)?;
    }
    ctx.done(got)
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
