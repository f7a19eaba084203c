//! The io_uring driver: one ring, `submit_and_wait` its only blocking call.
//!
//! | source            | op                                   | `user_data` (see `driver::key`) |
//! |-------------------|--------------------------------------|------------------------------|
//! | listening socket  | multishot `AcceptMulti`, NONBLOCK+CLOEXEC | `ACCEPT` + generation   |
//! | each connection   | multishot `PollAdd(POLLIN)`          | `CONN_IN` + connection id    |
//! | each connection with a queued send | one-shot `PollAdd(POLLOUT)` | `CONN_OUT` + connection id |
//! | each watched fd   | one-shot `PollAdd(POLLIN)`, re-armed after each report | `WATCH` + serial |
//! | signalfd          | multishot `PollAdd(POLLIN)`          | `SIGNAL`                     |
//! | next deadline     | `Timeout` (relative)                 | `TIMER` + generation         |
//!
//! A multishot op whose completion lacks `IORING_CQE_F_MORE` has ended and is re-armed if its
//! source still exists. Watched fds use one-shot polls, re-armed after each report, because the
//! engine asked for level-triggered reports: a poll armed on an fd that is already readable
//! completes at once, which multishot polls (woken per wake-up, edge-like) would not guarantee.
//!
//! Connection ids and watch serials are never reused, so a completion that arrives after its
//! connection or watch is gone is recognised and ignored.
//!
//! **Closing an fd with ops in flight.** A poll or accept op takes its own reference to the file
//! when it is submitted, so closing our fd never frees what an op uses: it would only keep the
//! socket alive (the peer would see no EOF) until the op ends. So `conn_removed` pushes an
//! `AsyncCancel` for each op of the connection and parks the fd in `graveyard`; the graveyard is
//! emptied only after a submission that leaves the submission queue empty, i.e. after every
//! cancel (and every op that could name the fd number) has reached the kernel. Until then the fd
//! number cannot be reused by a new accept, so no queued op can land on another connection.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use rustix::io::Errno;

use super::{Core, DriverError, Readiness, key};
use crate::addr::Listener;
use crate::engine::ConnId;

/// Submission queue entries. Completions get four times as many slots; a connection storm that
/// overflows them is buffered by the kernel (`IORING_FEAT_NODROP`).
const SQ_ENTRIES: u32 = 4096;
const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;
/// Multishot accept (the newest op we need) arrived in Linux 5.19.
const MIN_KERNEL: (u32, u32) = (5, 19);

const POLLIN: u32 = 0x001;
const POLLOUT: u32 = 0x004;

/// A working ring, created before the listener is bound.
pub(crate) struct UringSetup {
    ring: IoUring,
}

impl UringSetup {
    /// Creates the ring and checks that it can do what the loop needs. The error says why not,
    /// for the log line of the epoll fallback.
    pub(crate) fn new() -> Result<UringSetup, String> {
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        if let Some(version) = kernel_version(&release)
            && version < MIN_KERNEL
        {
            return Err(format!(
                "kernel {release} is older than {}.{} (multishot accept)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ));
        }
        let mut ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .or_else(|_| IoUring::new(SQ_ENTRIES))
            .map_err(|e| {
                let why = match Errno::from_io_error(&e) {
                    Some(Errno::PERM) => {
                        " (disabled by sysctl kernel.io_uring_disabled, or blocked by a seccomp \
                         profile)"
                    }
                    Some(Errno::NOSYS) => " (the kernel lacks io_uring, or seccomp blocks it)",
                    Some(Errno::NOMEM) => " (locked-memory limit; raise `ulimit -l`)",
                    _ => "",
                };
                format!("io_uring_setup failed: {e}{why}")
            })?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("io_uring probe failed: {e}"))?;
        for (code, name) in [
            (opcode::AcceptMulti::CODE, "accept"),
            (opcode::PollAdd::CODE, "poll_add"),
            (opcode::Timeout::CODE, "timeout"),
            (opcode::TimeoutRemove::CODE, "timeout_remove"),
            (opcode::AsyncCancel::CODE, "async_cancel"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("io_uring lacks the {name} op"));
            }
        }
        // One round trip proves io_uring_enter works too (a seccomp profile may allow setup and
        // deny enter).
        let nop = opcode::Nop::new()
            .build()
            .user_data(key::make(key::CANCEL, 0));
        // SAFETY: a NOP carries no buffer and no fd.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| "io_uring submission queue full at start".to_string())?;
        ring.submit_and_wait(1)
            .map_err(|e| format!("io_uring_enter failed: {e}"))?;
        ring.completion().for_each(drop);
        Ok(UringSetup { ring })
    }

    pub(crate) fn start(self, listener: &Listener) -> UringIo<'_> {
        UringIo {
            ring: self.ring,
            listener: listener.as_fd(),
            accept_gen: 0,
            accept_armed: false,
            accepting: true,
            overflow: VecDeque::new(),
            graveyard: Vec::new(),
            watch_graveyard: Vec::new(),
            timer_ts: Box::new(types::Timespec::new()),
            timer: None,
            timer_gen: 0,
        }
    }
}

/// `"6.8.0-45-generic"` -> `(6, 8)`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The io_uring side of [`Core`].
pub(crate) struct UringIo<'l> {
    ring: IoUring,
    listener: BorrowedFd<'l>,
    /// Generation of the current accept op (a cancelled one may still complete).
    accept_gen: u64,
    accept_armed: bool,
    accepting: bool,
    /// Entries that did not fit the submission queue; pushed first thing next turn.
    overflow: VecDeque<squeue::Entry>,
    /// Fds of removed connections, closed once their cancels are submitted (module docs).
    graveyard: Vec<OwnedFd>,
    watch_graveyard: Vec<Arc<OwnedFd>>,
    /// The armed timeout's duration. The kernel copies it when it prepares the op, during the
    /// submission that carries it; it lives in the heap for the ring's life, and only one
    /// `Timeout` is pushed per turn.
    timer_ts: Box<types::Timespec>,
    /// The armed timeout: its deadline and generation.
    timer: Option<(Instant, u64)>,
    timer_gen: u64,
}

/// What is in flight for a connection.
#[derive(Default)]
pub(crate) struct UringConn {
    /// The multishot POLLIN.
    reading: bool,
    /// The one-shot POLLOUT.
    writing: bool,
}

impl UringIo<'_> {
    /// Queues an entry: into the submission queue, submitting to make room if it is full, or
    /// into `overflow` if even that fails.
    ///
    /// # Safety
    ///
    /// Every buffer the entry points to must stay valid until the kernel is done with it (for
    /// the ops used here: until the submission that carries the entry), and every fd it names
    /// must be open when the entry is submitted.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        if self.overflow.is_empty() {
            // SAFETY: forwarded to the caller.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if self.ring.submit().is_ok() {
                // SAFETY: forwarded to the caller.
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    return;
                }
            }
        }
        self.overflow.push_back(entry);
    }

    /// Moves `overflow` into the submission queue as far as it fits.
    fn flush_overflow(&mut self) {
        while let Some(entry) = self.overflow.front() {
            // SAFETY: each entry met `push`'s contract when it was pushed; fds it names are in
            // the graveyard, which is not emptied while `overflow` is not empty.
            if unsafe { self.ring.submission().push(entry) }.is_err() {
                return;
            }
            self.overflow.pop_front();
        }
    }

    fn arm_accept(&mut self) {
        if self.accept_armed || !self.accepting {
            return;
        }
        self.accept_gen += 1;
        let flags = (rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC).bits();
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(flags as i32)
            .build()
            .user_data(key::make(key::ACCEPT, self.accept_gen));
        // SAFETY: no buffer (no peer address asked for); the listener is borrowed for the
        // loop's lifetime ('l), so its fd is open.
        unsafe { self.push(entry) };
        self.accept_armed = true;
    }

    fn cancel_accept(&mut self) {
        if !self.accept_armed {
            return;
        }
        self.accept_armed = false;
        self.cancel(key::make(key::ACCEPT, self.accept_gen));
    }

    fn cancel(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(key::make(key::CANCEL, 0));
        // SAFETY: a cancel names its target by user_data; no buffer, no fd.
        unsafe { self.push(entry) };
    }

    fn poll(&mut self, fd: RawFd, mask: u32, multi: bool, user_data: u64) {
        let entry = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(multi)
            .build()
            .user_data(user_data);
        // SAFETY: a poll has no buffer. Callers pass the fd of a live connection, watch or the
        // signalfd; a removed one's fd waits in the graveyard until this entry is submitted.
        unsafe { self.push(entry) };
    }

    /// Arms a timeout for `deadline` unless one that fires no later is armed.
    fn set_timer(&mut self, deadline: Option<Instant>, now: Instant) {
        let Some(deadline) = deadline else {
            // An armed timer just causes one spare wake-up.
            return;
        };
        if self.timer.is_some_and(|(at, _)| at <= deadline) {
            // It fires first; the loop re-evaluates then.
            return;
        }
        if let Some((_, generation)) = self.timer.take() {
            let entry = opcode::TimeoutRemove::new(key::make(key::TIMER, generation))
                .build()
                .user_data(key::make(key::CANCEL, 0));
            // SAFETY: names its target by user_data; no buffer, no fd.
            unsafe { self.push(entry) };
        }
        self.timer_gen += 1;
        let wait = deadline.saturating_duration_since(now) + Duration::from_micros(50);
        *self.timer_ts = types::Timespec::from(wait);
        let entry = opcode::Timeout::new(&*self.timer_ts as *const types::Timespec)
            .build()
            .user_data(key::make(key::TIMER, self.timer_gen));
        // SAFETY: `timer_ts` is a heap slot owned by `self` for the ring's life; the kernel
        // copies the timespec when it prepares the op, during the submission that carries this
        // entry, and `timer_ts` is rewritten only here, at most once per loop turn (one submit
        // per turn). An older Timeout still in `overflow` would read the newer value: harmless,
        // its generation is stale and it has been removed.
        unsafe { self.push(entry) };
        self.timer = Some((deadline, self.timer_gen));
    }

    /// Closes parked fds once nothing queued can name them.
    fn bury(&mut self) {
        if self.overflow.is_empty() && self.ring.submission().is_empty() {
            self.graveyard.clear();
            self.watch_graveyard.clear();
        }
    }
}

impl Readiness for UringIo<'_> {
    type ConnState = UringConn;

    fn conn_added(
        &mut self,
        id: ConnId,
        fd: BorrowedFd<'_>,
        state: &mut UringConn,
    ) -> io::Result<()> {
        self.poll(fd.as_raw_fd(), POLLIN, true, key::make(key::CONN_IN, id));
        state.reading = true;
        Ok(())
    }

    fn interest(
        &mut self,
        id: ConnId,
        fd: BorrowedFd<'_>,
        state: &mut UringConn,
        read: bool,
        write: bool,
    ) {
        if read && !state.reading {
            self.poll(fd.as_raw_fd(), POLLIN, true, key::make(key::CONN_IN, id));
            state.reading = true;
        } else if !read && state.reading {
            self.cancel(key::make(key::CONN_IN, id));
            state.reading = false;
        }
        if write && !state.writing {
            self.poll(fd.as_raw_fd(), POLLOUT, false, key::make(key::CONN_OUT, id));
            state.writing = true;
        }
        // A POLLOUT no longer needed completes on its own (the socket is writable, or the peer
        // goes); the completion finds an empty queue and does nothing.
    }

    fn conn_removed(&mut self, id: ConnId, fd: OwnedFd, state: UringConn) {
        if state.reading {
            self.cancel(key::make(key::CONN_IN, id));
        }
        if state.writing {
            self.cancel(key::make(key::CONN_OUT, id));
        }
        self.graveyard.push(fd);
    }

    fn watch_added(&mut self, serial: u64, fd: &Arc<OwnedFd>) -> io::Result<()> {
        self.poll(fd.as_raw_fd(), POLLIN, false, key::make(key::WATCH, serial));
        Ok(())
    }

    fn watch_fired(&mut self, serial: u64, fd: &Arc<OwnedFd>) {
        self.poll(fd.as_raw_fd(), POLLIN, false, key::make(key::WATCH, serial));
    }

    fn watch_removed(&mut self, serial: u64, fd: Arc<OwnedFd>) {
        self.cancel(key::make(key::WATCH, serial));
        self.watch_graveyard.push(fd);
    }

    fn stop_accepting(&mut self) {
        self.accepting = false;
        self.cancel_accept();
    }
}

/// Runs the loop until shutdown completes.
pub(crate) fn run(mut core: Core<UringIo<'_>>) -> Result<(), DriverError> {
    let signal_fd = core.signals_fd().as_raw_fd();
    core.io
        .poll(signal_fd, POLLIN, true, key::make(key::SIGNAL, 0));
    core.io.arm_accept();
    // Completions are copied out so that handling them may push new entries.
    let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(CQ_ENTRIES as usize);
    loop {
        let now = Instant::now();
        core.tick(now);
        if core.should_exit() {
            return Ok(());
        }
        if core.accept_resume_due(now) {
            core.io.arm_accept();
        }
        core.io.flush_overflow();
        let next = core.next_wakeup();
        let due = core.has_backlog() || next.is_some_and(|t| t <= now);
        if !due {
            core.io.set_timer(next, now);
        }
        match core.io.ring.submit_and_wait(usize::from(!due)) {
            Ok(_) => {}
            // EINTR: a signal not in the signalfd's set; EBUSY: completions must be reaped
            // first; EAGAIN: the kernel is short of memory for requests, retry after reaping.
            Err(e)
                if matches!(
                    Errno::from_io_error(&e),
                    Some(Errno::INTR | Errno::BUSY | Errno::AGAIN)
                ) => {}
            Err(source) => {
                return Err(DriverError::Loop {
                    what: "io_uring_enter",
                    source,
                });
            }
        }
        core.io.bury();

        completions.clear();
        completions.extend(
            core.io
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(user_data, result, flags) in &completions {
            handle(&mut core, user_data, result, flags);
        }
        core.run_backlog();
    }
}

fn handle(core: &mut Core<UringIo<'_>>, user_data: u64, result: i32, flags: u32) {
    let (kind, id) = key::split(user_data);
    let more = cqueue::more(flags);
    let cancelled = result == -Errno::CANCELED.raw_os_error();
    match kind {
        key::ACCEPT => {
            if result >= 0 {
                // SAFETY: a successful accept completion's result is a new fd the kernel just
                // installed in our table; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(result) };
                core.accepted(fd);
            } else if !cancelled && core.accept_error(Errno::from_raw_os_error(-result)) {
                core.io.cancel_accept();
            }
            if !more && id == core.io.accept_gen {
                core.io.accept_armed = false;
                if core.accepting() && !core.accept_paused() {
                    core.io.arm_accept();
                }
            }
        }
        key::CONN_IN => {
            if result >= 0 {
                core.readable(id);
            }
            // A cancelled poll (paused or closing) was already marked as not reading when the
            // cancel was pushed; a new poll may be armed by now, which this must not disarm.
            if !more
                && !cancelled
                && let Some(state) = core.conn_state(id)
            {
                state.reading = false;
                // `refresh` re-arms it unless the connection is closing.
                core.refresh(id);
            }
        }
        key::CONN_OUT => {
            if let Some(state) = core.conn_state(id) {
                state.writing = false;
                core.writable(id);
            }
        }
        key::WATCH => {
            if result >= 0 {
                core.wake(id);
            } else if !cancelled {
                // Not re-armed: a poll that fails once would fail again, in a loop.
                tracing::error!(
                    "poll on a watched fd failed: {}; it is no longer watched",
                    Errno::from_raw_os_error(-result)
                );
            }
        }
        key::SIGNAL => {
            if result >= 0 {
                core.signals_ready();
            }
            if !more {
                let fd = core.signals_fd().as_raw_fd();
                core.io.poll(fd, POLLIN, true, key::make(key::SIGNAL, 0));
            }
        }
        key::TIMER => {
            if core
                .io
                .timer
                .is_some_and(|(_, generation)| generation == id)
            {
                core.io.timer = None;
            }
        }
        key::CANCEL => {}
        _ => debug_assert!(false, "unknown completion kind {kind}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
