//! SCM_RIGHTS helpers over real SEQPACKET socketpairs: fds arrive usable and close-on-exec,
//! too many fds or a too-long datagram are errors that leak nothing, EOF is reported.
//!
//! "Leaks nothing" is checked two ways. Each test passes pipe *write* ends and then checks that
//! the read end sees EOF once the sender closed its copies: any copy left open in this process
//! would keep the pipe alive. That is exact even while other tests open fds in parallel. One
//! test also counts `/proc/self/fd`, which is only exact when nothing else runs, so it runs
//! itself again in a child process with a single test and a single thread.

use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bus_core::frame::{self, Frame, Msg, RingGranted, RingRole};
use bus_core::layout::Mode;
use bus_core::limits::{MAX_FDS_PER_FRAME, MAX_FRAME_BYTES};
use bus_core::sys::scm::{
    FdBatch, Received, RecvError, frame_fd_check, recv_frame, send_frame, try_recv_frame,
    try_send_frame,
};
use rustix::io::{Errno, FdFlags, fcntl_getfd, read, write};
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
    sendmsg, socketpair,
};
use rustix::pipe::{PipeFlags, pipe_with};

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair(AF_UNIX, SOCK_SEQPACKET)")
}

/// A non-blocking pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).expect("pipe2")
}

/// Asserts that no write end of the pipe is open anywhere in this process: reading the
/// (empty) pipe gives EOF rather than EAGAIN.
fn assert_write_ends_closed(read_end: &OwnedFd, what: &str) {
    let mut byte = [0u8; 1];
    match read(read_end, &mut byte) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: pipe unexpectedly held {n} bytes"),
        Err(Errno::AGAIN) => panic!("{what}: a write end is still open (fd leaked)"),
        Err(e) => panic!("{what}: read failed: {e}"),
    }
}

/// Sends with any number of fds, bypassing `send_frame`'s limit (a hostile peer).
fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(32))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let iov = [std::io::IoSlice::new(bytes)];
    let sent = sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL).expect("sendmsg");
    assert_eq!(sent, bytes.len());
}

fn recv_ok(sock: &OwnedFd, buf: &mut [u8], fds: &mut FdBatch) -> usize {
    match recv_frame(sock.as_fd(), buf, fds) {
        Ok(Received::Frame { len }) => len,
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[test]
fn fds_arrive_in_order_and_are_usable() {
    let (a, b) = seqpacket_pair();
    let pipes: Vec<_> = (0..MAX_FDS_PER_FRAME).map(|_| pipe()).collect();
    for (i, (_, w)) in pipes.iter().enumerate() {
        write(w, &[b'a' + i as u8]).unwrap();
    }
    let read_ends: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    assert_eq!(send_frame(a.as_fd(), b"four fds", &read_ends).unwrap(), 8);

    let mut buf = [0u8; 64];
    let mut fds = FdBatch::new();
    let len = recv_ok(&b, &mut buf, &mut fds);
    assert_eq!(&buf[..len], b"four fds");
    assert_eq!(fds.len(), MAX_FDS_PER_FRAME);
    for i in 0..MAX_FDS_PER_FRAME {
        assert!(fds.get(i).is_some());
        let fd = fds.take(i).expect("fd arrived");
        assert!(fds.get(i).is_none() && fds.take(i).is_none(), "taken twice");
        let mut byte = [0u8; 1];
        assert_eq!(read(&fd, &mut byte).unwrap(), 1);
        assert_eq!(byte[0], b'a' + i as u8, "fd {i} is not the {i}th fd sent");
    }
    assert!(fds.take(MAX_FDS_PER_FRAME).is_none());
}

#[test]
fn received_fds_are_close_on_exec() {
    let (a, b) = seqpacket_pair();
    // Sent without CLOEXEC, so the flag on the received fd comes from MSG_CMSG_CLOEXEC.
    let (r, _w) = pipe_with(PipeFlags::empty()).unwrap();
    assert!(!fcntl_getfd(&r).unwrap().contains(FdFlags::CLOEXEC));
    send_frame(a.as_fd(), b"x", &[r.as_fd()]).unwrap();

    let mut buf = [0u8; 8];
    let mut fds = FdBatch::new();
    recv_ok(&b, &mut buf, &mut fds);
    let [fd] = fds.take_all::<1>().expect("exactly one fd");
    assert!(fcntl_getfd(&fd).unwrap().contains(FdFlags::CLOEXEC));
}

/// Sends `extra` more fds than allowed (pipe write ends), expects `TruncatedAncillary`, and
/// checks that none of them is open afterwards.
fn too_many_fds(extra: usize) {
    let (a, b) = seqpacket_pair();
    let n = MAX_FDS_PER_FRAME + extra;
    let pipes: Vec<_> = (0..n).map(|_| pipe()).collect();
    let write_ends: Vec<_> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
    send_raw(a.as_fd(), b"too many", &write_ends);

    let mut buf = [0u8; 64];
    let mut fds = FdBatch::new();
    match recv_frame(b.as_fd(), &mut buf, &mut fds) {
        Err(RecvError::TruncatedAncillary { closed }) => {
            assert!(
                (MAX_FDS_PER_FRAME..=n).contains(&closed),
                "{closed} fds reported closed of {n} sent"
            );
        }
        other => panic!("{n} fds: expected TruncatedAncillary, got {other:?}"),
    }
    assert!(fds.is_empty());
    let read_ends: Vec<_> = pipes.into_iter().map(|(r, _w)| r).collect(); // drops our write ends
    for (i, r) in read_ends.iter().enumerate() {
        assert_write_ends_closed(r, &format!("{n} fds sent, fd {i}"));
    }
    // The connection still works afterwards.
    send_frame(a.as_fd(), b"next", &[]).unwrap();
    assert_eq!(recv_ok(&b, &mut buf, &mut fds), 4);
}

#[test]
fn one_fd_over_the_limit_is_truncated_ancillary() {
    // Fits the control buffer's alignment slack, so the kernel does not set MSG_CTRUNC: the
    // limit is enforced by counting.
    too_many_fds(1);
}

#[test]
fn many_fds_over_the_limit_is_truncated_ancillary() {
    // MSG_CTRUNC: the kernel delivers what fits and drops the rest.
    too_many_fds(4);
    too_many_fds(20);
}

const FD_COUNT_CHILD_ENV: &str = "MEMBUS_TEST_SCM_FD_COUNT_CHILD";
const FD_COUNT_TEST: &str = "scm::truncated_ancillary_leaves_the_fd_count_unchanged";

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn truncated_ancillary_leaves_the_fd_count_unchanged() {
    if std::env::var_os(FD_COUNT_CHILD_ENV).is_none() {
        // Parent: run exactly this test again, alone, in a child process.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", FD_COUNT_TEST, "--test-threads=1", "--nocapture"])
            .env(FD_COUNT_CHILD_ENV, "1")
            .output()
            .expect("re-run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "child did not run the test:\n{stdout}"
        );
        return;
    }
    // Child: nothing else runs, so /proc/self/fd is exact.
    let (a, b) = seqpacket_pair();
    let pipes: Vec<_> = (0..MAX_FDS_PER_FRAME + 3).map(|_| pipe()).collect();
    let fds_to_send: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    let mut buf = [0u8; 64];
    let mut fds = FdBatch::new();
    for extra in [1, 3] {
        let before = open_fd_count();
        send_raw(
            a.as_fd(),
            b"hostile",
            &fds_to_send[..MAX_FDS_PER_FRAME + extra],
        );
        let result = recv_frame(b.as_fd(), &mut buf, &mut fds);
        assert!(
            matches!(result, Err(RecvError::TruncatedAncillary { .. })),
            "{result:?}"
        );
        assert_eq!(
            open_fd_count(),
            before,
            "fds leaked after {extra} extra fds"
        );
    }
}

#[test]
fn eof_is_reported() {
    let (a, b) = seqpacket_pair();
    drop(a);
    let mut buf = [0u8; 16];
    let mut fds = FdBatch::new();
    assert!(matches!(
        recv_frame(b.as_fd(), &mut buf, &mut fds),
        Ok(Received::Eof)
    ));
}

#[test]
fn datagram_longer_than_the_buffer_is_truncated_frame_and_closes_its_fds() {
    let (a, b) = seqpacket_pair();
    let (r, w) = pipe();
    send_frame(a.as_fd(), &[7u8; 100], &[w.as_fd()]).unwrap();
    drop(w);
    let mut buf = [0u8; 10];
    let mut fds = FdBatch::new();
    match recv_frame(b.as_fd(), &mut buf, &mut fds) {
        Err(RecvError::TruncatedFrame { len, capacity }) => {
            assert_eq!((len, capacity), (100, 10));
        }
        other => panic!("expected TruncatedFrame, got {other:?}"),
    }
    assert!(fds.is_empty());
    assert_write_ends_closed(&r, "fd attached to a truncated datagram");
}

#[test]
fn unread_fds_are_closed_by_the_next_receive_and_on_drop() {
    let (a, b) = seqpacket_pair();
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    send_frame(a.as_fd(), b"one", &[w1.as_fd()]).unwrap();
    send_frame(a.as_fd(), b"two", &[w2.as_fd()]).unwrap();
    drop((w1, w2));
    let mut buf = [0u8; 16];
    let mut fds = FdBatch::new();
    recv_ok(&b, &mut buf, &mut fds);
    assert_eq!(fds.len(), 1);
    recv_ok(&b, &mut buf, &mut fds); // the first frame's fd was never taken
    assert_write_ends_closed(&r1, "untaken fd of the previous frame");
    drop(fds);
    assert_write_ends_closed(&r2, "untaken fd of a dropped batch");
}

#[test]
fn fd_count_check_closes_everything_on_a_mismatch() {
    let (a, b) = seqpacket_pair();
    let (r, w) = pipe();
    let mut buf = [0u8; 16];
    let mut fds = FdBatch::new();

    send_frame(a.as_fd(), b"ok", &[w.as_fd()]).unwrap();
    recv_ok(&b, &mut buf, &mut fds);
    assert_eq!(frame_fd_check(1, &mut fds), Ok(()));
    assert_eq!(fds.len(), 1, "a matching count keeps the fds");

    send_frame(a.as_fd(), b"bad", &[w.as_fd()]).unwrap();
    drop(w);
    recv_ok(&b, &mut buf, &mut fds);
    let err = frame_fd_check(2, &mut fds).unwrap_err();
    assert_eq!((err.announced, err.received), (2, 1));
    assert!(fds.is_empty());
    assert_write_ends_closed(&r, "fds of a frame with the wrong fd count");

    // No fds, but some announced.
    send_frame(a.as_fd(), b"none", &[]).unwrap();
    recv_ok(&b, &mut buf, &mut fds);
    assert!(frame_fd_check(1, &mut fds).is_err());
    assert_eq!(frame_fd_check(0, &mut fds), Ok(()));
}

#[test]
fn take_all_takes_exactly_n_or_nothing() {
    let (a, b) = seqpacket_pair();
    let (r, w) = pipe();
    send_frame(a.as_fd(), b"2", &[r.as_fd(), w.as_fd()]).unwrap();
    let mut buf = [0u8; 16];
    let mut fds = FdBatch::new();
    recv_ok(&b, &mut buf, &mut fds);
    assert!(fds.take_all::<1>().is_none());
    assert!(fds.take_all::<3>().is_none());
    assert_eq!(fds.len(), 2, "a failed take_all takes nothing");
    let [_r2, _w2] = fds.take_all::<2>().expect("two fds");
    assert!(fds.take_all::<2>().is_none(), "already taken");
}

#[test]
fn send_refuses_empty_datagrams_and_too_many_fds() {
    let (a, _b) = seqpacket_pair();
    let err = send_frame(a.as_fd(), b"", &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let pipes: Vec<_> = (0..=MAX_FDS_PER_FRAME).map(|_| pipe()).collect();
    let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    let err = send_frame(a.as_fd(), b"x", &fds).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn non_blocking_calls_report_would_block() {
    let (a, b) = seqpacket_pair();
    let mut buf = [0u8; 16];
    let mut fds = FdBatch::new();
    let err = try_recv_frame(b.as_fd(), &mut buf, &mut fds).unwrap_err();
    assert!(err.is_would_block(), "{err:?}");
    // Fill the socket buffer without blocking.
    let big = vec![0u8; 4096];
    let err = loop {
        match try_send_frame(a.as_fd(), &big, &[]) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::WouldBlock);
}

#[test]
fn sending_to_a_closed_peer_is_epipe_not_sigpipe() {
    let (a, b) = seqpacket_pair();
    drop(b);
    let err = send_frame(a.as_fd(), b"x", &[]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(Errno::PIPE.raw_os_error()));
}

#[test]
fn a_ring_granted_frame_with_its_memfd_end_to_end() {
    let (broker, client) = seqpacket_pair();
    let memfd = rustix::fs::memfd_create("membus-test-ring", rustix::fs::MemfdFlags::CLOEXEC)
        .expect("memfd_create");
    rustix::fs::ftruncate(&memfd, 8192).unwrap();
    let grant = Frame::new(
        42,
        Msg::RingGranted(RingGranted {
            role: RingRole::Writer,
            mode: Mode::Reliable,
            slot: 0,
            max_message_bytes: 1024,
            topic_id: 1,
            publisher_id: 2,
            subscriber_id: 0,
            data_bytes: 4096,
        }),
    );
    let mut out = Vec::new();
    grant.encode(&mut out).unwrap();
    send_frame(broker.as_fd(), &out, &[memfd.as_fd()]).unwrap();

    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let mut fds = FdBatch::new();
    let len = recv_ok(&client, &mut buf, &mut fds);
    let header = frame::Header::parse(&buf[..len]).unwrap();
    frame_fd_check(header.fd_count, &mut fds).unwrap();
    let got = frame::decode(&buf[..len]).unwrap();
    assert_eq!(got, grant);
    assert_eq!(fds.len(), got.fd_count());
    let [ring] = fds.take_all::<1>().unwrap();
    assert_eq!(rustix::fs::fstat(&ring).unwrap().st_size, 8192);
}
