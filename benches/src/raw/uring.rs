//! The io_uring wait floor: the SEQPACKET 64 B blocking ping-pong of [`super::socket`], but
//! each side receives by submitting an `IORING_OP_RECVMSG` and waiting for its completion
//! (`io_uring_enter` with `min_complete = 1`) instead of a blocking `recv`. Sends stay plain
//! `send`s. The difference to `seqpacket-pingpong-64` is what an io_uring-driven receiver (the
//! broker's design) pays per wake-up compared with a blocking socket.
//!
//! Unsafe code is allowed here only to push the SQE, whose buffers must outlive the operation.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{Context, Result, ensure};
use io_uring::{IoUring, opcode, types};
use rustix::net::SocketType;

use super::socket::{pingpong_peer_with, pingpong_with, socket_pair};
use crate::case::{CaseResult, Params};
use crate::peer::PeerCtx;

/// A small ring that receives one datagram at a time into its own heap buffer (copied out to
/// the caller's buffer: 64 B, a few ns against microseconds of wake-up).
struct UringRecv {
    ring: IoUring,
    /// The receive buffer, header and iovec the kernel writes through. Heap-allocated so their
    /// addresses are stable; leaked (never freed) if an operation may still be in flight.
    io: Option<Box<Io>>,
}

struct Io {
    buf: Box<[u8]>,
    iov: libc::iovec,
    msg: libc::msghdr,
}

impl UringRecv {
    fn new(size: usize) -> Result<UringRecv> {
        let mut io = Box::new(Io {
            buf: vec![0u8; size].into_boxed_slice(),
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            // SAFETY: an all-zero msghdr is a valid empty header; the iovec fields are set below.
            msg: unsafe { std::mem::zeroed() },
        });
        io.iov.iov_base = io.buf.as_mut_ptr().cast();
        io.iov.iov_len = io.buf.len();
        io.msg.msg_iov = &mut io.iov;
        io.msg.msg_iovlen = 1;
        Ok(UringRecv {
            ring: IoUring::new(4).context("io_uring_setup (is io_uring disabled?)")?,
            io: Some(io),
        })
    }

    /// Receives one datagram of exactly `out.len()` bytes, waiting in `io_uring_enter`.
    fn recv(&mut self, fd: BorrowedFd<'_>, out: &mut [u8]) -> Result<()> {
        let io = self
            .io
            .as_mut()
            .context("an earlier RECVMSG may still be in flight")?;
        ensure!(out.len() == io.buf.len(), "buffer size mismatch");
        let sqe = opcode::RecvMsg::new(types::Fd(fd.as_raw_fd()), &mut io.msg).build();
        // SAFETY: the msghdr, iovec and buffer the SQE points into are heap memory owned by
        // `self.io`, which is only freed once this operation's completion has been reaped; on
        // any path where it might still be in flight (a failed `io_uring_enter` below),
        // `self.io` is leaked instead, and later calls fail.
        unsafe { self.ring.submission().push(&sqe) }.context("io_uring submission queue full")?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    std::mem::forget(self.io.take());
                    return Err(e).context("io_uring_enter");
                }
            }
            if let Some(cqe) = self.ring.completion().next() {
                let n = cqe.result();
                ensure!(n >= 0, "RECVMSG failed: errno {}", -n);
                ensure!(n as usize == out.len(), "datagram of {n} bytes");
                out.copy_from_slice(&io.buf);
                return Ok(());
            }
        }
    }
}

/// Parent side.
pub fn pingpong_run(p: &Params) -> Result<CaseResult> {
    let (ours, theirs) = socket_pair(SocketType::SEQPACKET)?;
    let mut uring = UringRecv::new(p.size)?;
    pingpong_with(p, ours, theirs, SocketType::SEQPACKET, |fd, buf| {
        uring.recv(fd, buf)
    })
}

/// Peer side.
pub fn pingpong_peer(ctx: PeerCtx) -> Result<()> {
    let mut uring = UringRecv::new(ctx.params.size)?;
    pingpong_peer_with(ctx, SocketType::SEQPACKET, |fd, buf| uring.recv(fd, buf))
}
