//! Sending and receiving one control frame with file descriptors (SCM_RIGHTS) on a
//! `SOCK_SEQPACKET` socket, over rustix's safe `sendmsg` / `recvmsg`. No unsafe code.
//!
//! Received fds become [`OwnedFd`]s the moment they are taken out of the control buffer and
//! live in an [`FdBatch`]; whatever the caller does not take is closed when the batch is cleared
//! or dropped. Every error path closes every fd that arrived. Fds are received with
//! `MSG_CMSG_CLOEXEC`, so they are close-on-exec atomically. Neither call allocates: the
//! control buffer is on the stack, sized with `cmsg_space!` for [`MAX_FDS_PER_FRAME`] fds.
//!
//! ```
//! use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame};
//! use rustix::fd::AsFd;
//! use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
//!
//! let (a, b) =
//!     socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
//! let (pipe_r, _pipe_w) = rustix::pipe::pipe()?;
//! send_frame(a.as_fd(), b"frame bytes", &[pipe_r.as_fd()])?;
//!
//! let mut buf = [0u8; 64];
//! let mut fds = FdBatch::new();
//! let Received::Frame { len } = recv_frame(b.as_fd(), &mut buf, &mut fds)? else {
//!     panic!("peer closed")
//! };
//! assert_eq!(&buf[..len], b"frame bytes");
//! let fd = fds.take(0).expect("one fd arrived");
//! # drop(fd);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

use crate::limits::MAX_FDS_PER_FRAME;

/// Control buffer size for [`MAX_FDS_PER_FRAME`] fds (plus alignment slack). The slack means
/// the kernel may deliver a few more than the limit without `MSG_CTRUNC`; [`recv_frame`]
/// treats that as truncation too.
const CMSG_BYTES: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME));

/// Sends one frame (one datagram) with `fds` attached, blocking if the socket buffer is full.
/// `MSG_NOSIGNAL`: a closed peer is `EPIPE`, never SIGPIPE.
///
/// Fails with `InvalidInput` if `bytes` is empty (a zero-length SEQPACKET datagram reads as EOF)
/// or more than [`MAX_FDS_PER_FRAME`] fds are given.
pub fn send_frame(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    send_frame_with(sock, bytes, fds, SendFlags::empty())
}

/// [`send_frame`] that never blocks: `WouldBlock` if the socket buffer is full.
pub fn try_send_frame(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_frame_with(sock, bytes, fds, SendFlags::DONTWAIT)
}

/// [`send_frame`] with extra `flags` (`MSG_NOSIGNAL` is always added).
pub fn send_frame_with(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> io::Result<usize> {
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to send an empty datagram: the peer would read it as end of stream",
        ));
    }
    if fds.len() > MAX_FDS_PER_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one control frame (limit: limits::MAX_FDS_PER_FRAME)",
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BYTES];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        let pushed = control.push(SendAncillaryMessage::ScmRights(fds));
        // The buffer is sized for MAX_FDS_PER_FRAME fds, checked above.
        debug_assert!(pushed, "control buffer too small for {} fds", fds.len());
        if !pushed {
            return Err(Errno::NOBUFS.into());
        }
    }
    let iov = [io::IoSlice::new(bytes)];
    Ok(sendmsg(
        sock,
        &iov,
        &mut control,
        flags | SendFlags::NOSIGNAL,
    )?)
}

/// What [`recv_frame`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// One datagram of `len` bytes is in `buf[..len]`; its fds are in the [`FdBatch`].
    Frame {
        /// Datagram length.
        len: usize,
    },
    /// The peer closed the connection (a zero-length read; no frame is ever empty).
    Eof,
}

/// Why [`recv_frame`] failed. In every case, every fd that arrived has been closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The socket call failed (including `WouldBlock` on a non-blocking receive).
    #[error("receiving a control frame failed: {0}")]
    Io(#[from] io::Error),
    /// The peer attached more fds than a frame may carry ([`MAX_FDS_PER_FRAME`]); the kernel
    /// truncated the control data (`MSG_CTRUNC`) or more than the limit arrived. A protocol
    /// violation: reply `bad-fds` and disconnect the peer.
    #[error(
        "peer attached more than {max} fds to one frame (control data truncated); \
         {closed} that arrived were closed",
        max = MAX_FDS_PER_FRAME
    )]
    TruncatedAncillary {
        /// How many fds arrived (and were closed).
        closed: usize,
    },
    /// The datagram was longer than the buffer (`MSG_TRUNC`); its tail is lost. Use a buffer of
    /// [`crate::limits::MAX_FRAME_BYTES`]; a longer datagram is a protocol violation.
    #[error(
        "datagram of {len} bytes does not fit the {capacity}-byte receive buffer; \
         its tail was discarded"
    )]
    TruncatedFrame {
        /// The datagram's real length.
        len: usize,
        /// The buffer's length.
        capacity: usize,
    },
}

impl RecvError {
    /// Whether this is a non-blocking receive that found nothing to read.
    pub fn is_would_block(&self) -> bool {
        matches!(self, RecvError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The fds that arrived with one frame, owned, at most [`MAX_FDS_PER_FRAME`], in the order
/// they were sent. What the caller does not [`take`](FdBatch::take) is closed by
/// [`clear`](FdBatch::clear), by the next [`recv_frame`] into this batch, or on drop.
#[derive(Debug, Default)]
pub struct FdBatch {
    fds: [Option<OwnedFd>; MAX_FDS_PER_FRAME],
    len: usize,
}

impl FdBatch {
    /// An empty batch.
    pub const fn new() -> Self {
        FdBatch {
            fds: [const { None }; MAX_FDS_PER_FRAME],
            len: 0,
        }
    }

    /// How many fds arrived with the last frame (taken or not).
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether no fd arrived.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Borrows fd `index`, if it arrived and was not taken.
    pub fn get(&self, index: usize) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fds.get(index)?.as_ref().map(|fd| fd.as_fd())
    }

    /// Takes fd `index` (in sending order), if it arrived and was not taken yet.
    pub fn take(&mut self, index: usize) -> Option<OwnedFd> {
        self.fds.get_mut(index)?.take()
    }

    /// Takes exactly `N` fds, if exactly `N` arrived and none was taken; otherwise takes
    /// nothing and returns `None`.
    pub fn take_all<const N: usize>(&mut self) -> Option<[OwnedFd; N]> {
        if self.len != N || self.fds[..N].iter().any(Option::is_none) {
            return None;
        }
        let mut taken = self.fds[..N].iter_mut().map(Option::take);
        // Every slot was checked to be Some above.
        Some(core::array::from_fn(|_| {
            taken.next().flatten().expect("checked Some")
        }))
    }

    /// Closes every fd not taken and empties the batch.
    pub fn clear(&mut self) {
        self.fds.iter_mut().for_each(|fd| drop(fd.take()));
        self.len = 0;
    }

    /// Stores one received fd; hands it back if the batch is full.
    fn push(&mut self, fd: OwnedFd) -> Result<(), OwnedFd> {
        match self.fds.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(fd);
                self.len += 1;
                Ok(())
            }
            None => Err(fd),
        }
    }
}

/// Receives one frame (one datagram) into `buf` and its fds into `fds`, blocking until one
/// arrives. `fds` is cleared first (closing anything left in it). Fds are close-on-exec.
///
/// Errors close every fd that arrived: more fds than [`MAX_FDS_PER_FRAME`] gives
/// [`RecvError::TruncatedAncillary`], a datagram longer than `buf` gives
/// [`RecvError::TruncatedFrame`]. A zero-length read is [`Received::Eof`].
pub fn recv_frame(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut FdBatch,
) -> Result<Received, RecvError> {
    recv_frame_with(sock, buf, fds, RecvFlags::empty())
}

/// [`recv_frame`] that never blocks: [`RecvError::is_would_block`] if nothing is queued.
pub fn try_recv_frame(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut FdBatch,
) -> Result<Received, RecvError> {
    recv_frame_with(sock, buf, fds, RecvFlags::DONTWAIT)
}

/// [`recv_frame`] with extra `flags` (`MSG_CMSG_CLOEXEC` and `MSG_TRUNC` are always added).
pub fn recv_frame_with(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut FdBatch,
    flags: RecvFlags,
) -> Result<Received, RecvError> {
    fds.clear();
    let capacity = buf.len();
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BYTES];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    // MSG_TRUNC makes the kernel report the datagram's real length when it did not fit.
    let msg = recvmsg(
        sock,
        &mut iov,
        &mut control,
        flags | RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC,
    )
    .map_err(io::Error::from)?;

    // Own every fd that arrived before looking at anything else, so each error path below
    // closes them all. Fds beyond the batch's capacity are closed right here.
    let mut overflow = 0usize;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            for fd in received {
                if let Err(extra) = fds.push(fd) {
                    drop(extra);
                    overflow += 1;
                }
            }
        }
        // Other control messages (credentials, ...) are not part of the protocol; rustix
        // drops them.
    }

    if msg.flags.contains(ReturnFlags::CTRUNC) || overflow > 0 {
        let closed = fds.len() + overflow;
        fds.clear();
        return Err(RecvError::TruncatedAncillary { closed });
    }
    if msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > capacity {
        fds.clear();
        return Err(RecvError::TruncatedFrame {
            len: msg.bytes,
            capacity,
        });
    }
    if msg.bytes == 0 {
        fds.clear();
        return Ok(Received::Eof);
    }
    Ok(Received::Frame { len: msg.bytes })
}

/// The header's `fd_count` did not match the fds that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "frame header announces {announced} fds but {received} arrived; all were closed \
     (reply `bad-fds`)"
)]
#[non_exhaustive]
pub struct FdCountError {
    /// The header's `fd_count`.
    pub announced: usize,
    /// How many arrived.
    pub received: usize,
}

/// Checks the fd count a frame header announced against the fds that arrived. On a mismatch,
/// closes them all (a frame with the wrong fds is rejected whole) and returns the error.
pub fn frame_fd_check(announced: u16, fds: &mut FdBatch) -> Result<(), FdCountError> {
    let announced = usize::from(announced);
    if announced == fds.len() {
        return Ok(());
    }
    let received = fds.len();
    fds.clear();
    Err(FdCountError {
        announced,
        received,
    })
}
