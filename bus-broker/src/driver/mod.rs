//! The drivers: everything of the broker that does I/O. The [`Engine`] decides; a driver moves
//! bytes and fds between it and the sockets.
//!
//! Two drivers share one `Core` (the connection table with its send queues, the shared receive
//! buffer, the dispatch of [`Out`] actions, signals, shutdown); they differ only in how they learn
//! that something is ready, the `Readiness` trait:
//!
//! - [`uring`]: one io_uring; multishot accept, multishot POLLIN per connection, one-shot POLLOUT
//!   while a send queue is not empty, a signalfd poll, `Timeout` ops for deadlines.
//!   `submit_and_wait` is its only blocking call.
//! - [`poll`]: the same over level-triggered epoll, for where io_uring is unavailable (sysctl
//!   `kernel.io_uring_disabled`, a seccomp profile such as Docker's default).
//!
//! Both use readiness, not completion-based reads: an idle connection owns no receive buffer.
//! When one is readable, `Core` drains it with non-blocking `recvmsg` into the one shared
//! [`MAX_FRAME_BYTES`] buffer and hands each datagram to the engine. Sends go out at once with a
//! non-blocking `sendmsg`; only what the socket refuses (`EAGAIN`) is queued, per connection,
//! until the socket is writable again. The engine bounds that queue: it counts what it handed
//! over against what [`Engine::on_sent`] gives back, and drops a client that stops reading
//! ([`Out::Drop`], [`Engine::unsent_limit`]).
//!
//! **Invariant:** after every event handed to the engine, the driver drains
//! [`Engine::poll_out`] until it is empty (`Core::dispatch`).

pub mod poll;
pub mod uring;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::frame::ErrorCode;
use bus_core::limits::{MAX_FDS_PER_FRAME, MAX_FRAME_BYTES};
use bus_core::sys::scm::{FdBatch, Received, RecvError, recv_frame_with, send_frame_with};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use rustix::io::Errno;
use rustix::net::{MMsgHdr, RecvFlags, SendAncillaryBuffer, SendFlags, sendmmsg};

use crate::addr::{Listener, peer_credentials};
use crate::engine::{ConnId, Creds, Engine, Out};
use crate::policy::PolicyHolder;

/// Environment variable that picks the driver when `--driver` is not given.
pub const DRIVER_ENV: &str = "MEMBUS_DRIVER";

/// Frames read from one connection before the others get a turn.
const READ_BUDGET: usize = 64;
/// Frames to one connection sent by one `sendmmsg` at most.
const SEND_BATCH: usize = 64;
/// Connections accepted per listener readiness (epoll) before other events get a turn.
pub(crate) const ACCEPT_BUDGET: usize = 256;
/// How long accepting pauses after `EMFILE`/`ENFILE`/`ENOMEM` (the pending connections wait in
/// the backlog instead of spinning the loop).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// A send queue keeps at most this capacity once it is empty again (idle memory stays small).
const IDLE_QUEUE_CAPACITY: usize = 8;

/// Which driver to run, as asked (`--driver`, `MEMBUS_DRIVER`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriverChoice {
    /// io_uring if it works here, else epoll.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// epoll.
    Epoll,
}

impl DriverChoice {
    /// Parses `auto`, `uring` (or `io_uring`), `epoll`.
    pub fn parse(text: &str) -> Result<DriverChoice, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DriverChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(DriverChoice::Uring),
            "epoll" => Ok(DriverChoice::Epoll),
            _ => Err(format!(
                "unknown driver {text:?}: use auto (io_uring if available, else epoll), uring \
                 or epoll"
            )),
        }
    }
}

/// The driver that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    /// [`uring`].
    Uring,
    /// [`poll`].
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// Why the loop could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// `--driver uring` was asked for and io_uring does not work here.
    #[error(
        "the io_uring driver was asked for (--driver uring or MEMBUS_DRIVER=uring) but io_uring \
         is not usable here: {reason}; use --driver auto (falls back to epoll) or --driver epoll, \
         or enable io_uring (sysctl kernel.io_uring_disabled=0, or a seccomp profile that allows \
         io_uring_setup/io_uring_enter)"
    )]
    UringUnavailable {
        /// Why.
        reason: String,
    },
    /// A system call needed to set up the loop failed.
    #[error(
        "cannot set up the event loop: {what}: {source}; check the fd and memory limits (ulimit -n, ulimit -l)"
    )]
    Setup {
        /// What.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The loop itself failed.
    #[error("the event loop failed: {what}: {source}")]
    Loop {
        /// What.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What the drivers need besides the listener and the engine.
#[derive(Debug)]
pub struct Options {
    /// How long a closing connection may take to read what is queued for it.
    pub close_linger: Duration,
    /// How long a graceful shutdown waits for clients to be sent their SHUTDOWN frames.
    pub shutdown_grace: Duration,
    /// The policy in force, reloaded on SIGHUP.
    pub policy: PolicyHolder,
}

impl Options {
    /// Defaults.
    pub fn new(policy: PolicyHolder) -> Options {
        Options {
            close_linger: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(2),
            policy,
        }
    }
}

/// An event loop, chosen and set up, not yet running.
pub struct Driver {
    backend: Backend,
    signals: Signals,
    fallback_reason: Option<String>,
}

enum Backend {
    Uring(Box<uring::UringSetup>),
    Epoll(poll::EpollSetup),
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("kind", &self.kind())
            .field("fallback_reason", &self.fallback_reason)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Sets up the loop asked for. Blocks SIGINT, SIGTERM and SIGHUP for the (single-threaded)
    /// process and opens a signalfd for them: call this before starting any thread.
    pub fn new(choice: DriverChoice) -> Result<Driver, DriverError> {
        let signals = Signals::new().map_err(|source| DriverError::Setup {
            what: "signalfd for SIGINT, SIGTERM, SIGHUP",
            source,
        })?;
        let (backend, fallback_reason) = match choice {
            DriverChoice::Uring => (
                Backend::Uring(Box::new(
                    uring::UringSetup::new()
                        .map_err(|reason| DriverError::UringUnavailable { reason })?,
                )),
                None,
            ),
            DriverChoice::Epoll => (Backend::Epoll(poll::EpollSetup::new()?), None),
            DriverChoice::Auto => match uring::UringSetup::new() {
                Ok(setup) => (Backend::Uring(Box::new(setup)), None),
                Err(reason) => (Backend::Epoll(poll::EpollSetup::new()?), Some(reason)),
            },
        };
        Ok(Driver {
            backend,
            signals,
            fallback_reason,
        })
    }

    /// Which driver will run.
    pub fn kind(&self) -> DriverKind {
        match self.backend {
            Backend::Uring(_) => DriverKind::Uring,
            Backend::Epoll(_) => DriverKind::Epoll,
        }
    }

    /// With [`DriverChoice::Auto`]: why io_uring was not used, if it was not.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Runs the loop until a graceful shutdown (SIGINT, SIGTERM) completes. The caller then
    /// removes the socket file ([`Listener::cleanup`]).
    pub fn run(
        self,
        listener: &Listener,
        engine: Engine,
        options: Options,
    ) -> Result<(), DriverError> {
        match self.backend {
            Backend::Uring(setup) => {
                let io = (*setup).start(listener);
                uring::run(Core::new(io, engine, options, self.signals))
            }
            Backend::Epoll(setup) => {
                let io = setup.start(listener)?;
                poll::run(Core::new(io, engine, options, self.signals))
            }
        }
    }
}

/// Keys of readiness sources: a kind in the top byte, a connection id, watch serial or
/// generation in the rest. Used as io_uring `user_data` and as epoll data.
pub(crate) mod key {
    /// The listening socket.
    pub const ACCEPT: u8 = 1;
    /// A connection's readability.
    pub const CONN_IN: u8 = 2;
    /// A connection's writability (io_uring only; epoll reports both under `CONN_IN`).
    pub const CONN_OUT: u8 = 3;
    /// A watched fd (by serial).
    pub const WATCH: u8 = 4;
    /// The signalfd.
    pub const SIGNAL: u8 = 5;
    /// A timeout (by generation).
    pub const TIMER: u8 = 6;
    /// A cancel or timeout-remove op (its own completion is ignored).
    pub const CANCEL: u8 = 7;

    const SHIFT: u32 = 56;
    const MASK: u64 = (1 << SHIFT) - 1;

    /// Packs a kind and an id (ids stay below 2^56: a counter from 1 never gets there).
    pub fn make(kind: u8, id: u64) -> u64 {
        debug_assert!(id <= MASK, "id {id} overflows the key");
        (u64::from(kind) << SHIFT) | (id & MASK)
    }

    /// Unpacks a key.
    pub fn split(key: u64) -> (u8, u64) {
        ((key >> SHIFT) as u8, key & MASK)
    }
}

/// How a driver learns about readiness; the only part that differs between drivers.
pub(crate) trait Readiness {
    /// Per-connection state the driver keeps (what is armed).
    type ConnState: Default;

    /// A new connection: start reporting its readability.
    fn conn_added(
        &mut self,
        id: ConnId,
        fd: BorrowedFd<'_>,
        state: &mut Self::ConnState,
    ) -> io::Result<()>;
    /// What the connection needs now: readability reports while `read`, a writability report
    /// while `write` (its send queue is not empty).
    fn interest(
        &mut self,
        id: ConnId,
        fd: BorrowedFd<'_>,
        state: &mut Self::ConnState,
        read: bool,
        write: bool,
    );
    /// The connection is gone: stop everything on it and close `fd` when that is safe.
    fn conn_removed(&mut self, id: ConnId, fd: OwnedFd, state: Self::ConnState);
    /// Start reporting readability of a watched fd.
    fn watch_added(&mut self, serial: u64, fd: &Arc<OwnedFd>) -> io::Result<()>;
    /// A readability report for `serial` was handed to the engine and the watch stays.
    fn watch_fired(&mut self, serial: u64, fd: &Arc<OwnedFd>);
    /// Stop watching; drop `fd` when that is safe.
    fn watch_removed(&mut self, serial: u64, fd: Arc<OwnedFd>);
    /// Stop accepting connections (shutdown).
    fn stop_accepting(&mut self);
}

/// A frame waiting for its socket to take it.
struct Queued {
    frame: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

/// One client connection.
struct Conn<S> {
    fd: OwnedFd,
    /// Frames the socket refused (EAGAIN), oldest first.
    queue: VecDeque<Queued>,
    /// The engine closed it: no more reading; flush `queue`, then close.
    closing: bool,
    /// The engine paused reading it ([`Out::PauseReads`]): frames wait in the socket.
    paused: bool,
    /// What the driver has armed.
    io: S,
}

/// A watched fd, by the engine's token.
struct Watch {
    /// The driver's serial for it: never reused, so a late report for an old watch with the
    /// same token is recognised as stale.
    serial: u64,
    fd: Arc<OwnedFd>,
}

/// The signals the broker handles, through a signalfd.
pub(crate) struct Signals {
    fd: SignalFd,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGHUP);
        // Blocked signals stay pending for the signalfd instead of running their default action.
        // The process is single-threaded, so the thread mask is the process's.
        mask.thread_block().map_err(io::Error::from)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(Signals { fd })
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Shutdown progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// SHUTDOWN sent to everyone; waiting for the queues to drain until the deadline.
    Draining {
        deadline: Instant,
    },
    /// Leave the loop now.
    Exit,
}

/// The shared part of both drivers: the engine, the connection table and its send queues, the
/// receive buffer, watches, signals and shutdown.
pub(crate) struct Core<R: Readiness> {
    /// The readiness mechanism.
    pub(crate) io: R,
    engine: Engine,
    conns: HashMap<ConnId, Conn<R::ConnState>>,
    /// By token.
    watches: HashMap<u64, Watch>,
    /// Serial to token.
    watch_serials: HashMap<u64, u64>,
    next_conn: ConnId,
    next_serial: u64,
    /// The one receive buffer, [`MAX_FRAME_BYTES`].
    buf: Box<[u8]>,
    fds: FdBatch,
    /// Connections that still had data when their read budget ran out.
    backlog: VecDeque<ConnId>,
    /// Frames for `pending_conn` collected by [`Core::dispatch`], not yet sent.
    pending: Vec<Queued>,
    pending_conn: Option<ConnId>,
    /// Closing connections by deadline (pushed in time order: the linger is fixed).
    lingering: VecDeque<(Instant, ConnId)>,
    accept_paused_until: Option<Instant>,
    phase: Phase,
    options: Options,
    signals: Signals,
}

impl<R: Readiness> Core<R> {
    fn new(io: R, engine: Engine, options: Options, signals: Signals) -> Core<R> {
        Core {
            io,
            engine,
            conns: HashMap::new(),
            watches: HashMap::new(),
            watch_serials: HashMap::new(),
            next_conn: 1,
            next_serial: 1,
            buf: vec![0u8; MAX_FRAME_BYTES].into_boxed_slice(),
            fds: FdBatch::new(),
            backlog: VecDeque::new(),
            pending: Vec::with_capacity(SEND_BATCH),
            pending_conn: None,
            lingering: VecDeque::new(),
            accept_paused_until: None,
            phase: Phase::Running,
            options,
            signals,
        }
    }

    pub(crate) fn signals_fd(&self) -> BorrowedFd<'_> {
        self.signals.as_fd()
    }

    /// Whether the connection exists (and so may be re-armed).
    pub(crate) fn conn_state(&mut self, id: ConnId) -> Option<&mut R::ConnState> {
        self.conns.get_mut(&id).map(|c| &mut c.io)
    }

    /// The fd of a watch that still exists.
    pub(crate) fn watch_fd(&self, serial: u64) -> Option<&Arc<OwnedFd>> {
        self.watch_serials
            .get(&serial)
            .and_then(|token| self.watches.get(token))
            .map(|w| &w.fd)
    }

    /// Whether the loop should stop.
    pub(crate) fn should_exit(&self) -> bool {
        match self.phase {
            Phase::Running => false,
            Phase::Draining { .. } => self.conns.is_empty(),
            Phase::Exit => true,
        }
    }

    /// Whether new connections are wanted.
    pub(crate) fn accepting(&self) -> bool {
        self.phase == Phase::Running
    }

    /// Whether accepting was paused and may resume now.
    pub(crate) fn accept_resume_due(&mut self, now: Instant) -> bool {
        match self.accept_paused_until {
            Some(t) if t <= now => {
                self.accept_paused_until = None;
                self.accepting()
            }
            _ => false,
        }
    }

    /// Whether accepting is paused.
    pub(crate) fn accept_paused(&self) -> bool {
        self.accept_paused_until.is_some()
    }

    /// When the loop must wake up next, if nothing happens before.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let mut next = self.engine.next_deadline();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.lingering.front().map(|&(t, _)| t));
        consider(self.accept_paused_until);
        if let Phase::Draining { deadline } = self.phase {
            consider(Some(deadline));
        }
        next
    }

    /// Whether there is work that must not wait for an event.
    pub(crate) fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Drains [`Engine::poll_out`], carrying out each action. Consecutive sends to one
    /// connection go out together ([`Core::flush_sends`]: one `sendmmsg`).
    fn dispatch(&mut self) {
        loop {
            while let Some(out) = self.engine.poll_out() {
                self.act(out);
            }
            if self.pending.is_empty() {
                return;
            }
            // Reporting the sends may make the engine queue more (a relay with new credit).
            self.flush_sends();
        }
    }

    fn act(&mut self, out: Out) {
        if let Out::Send { conn, frame, fds } = out {
            if self.pending_conn != Some(conn) || self.pending.len() >= SEND_BATCH {
                self.flush_sends();
                self.pending_conn = Some(conn);
            }
            self.pending.push(Queued { frame, fds });
            return;
        }
        // Everything else happens after the sends queued before it.
        self.flush_sends();
        {
            match out {
                Out::Send { .. } => unreachable!("handled above"),
                Out::Close { conn } => self.close(conn),
                Out::Drop { conn } => {
                    self.remove(conn);
                }
                Out::Watch { token, fd } => self.watch(token, fd),
                Out::Unwatch { token } => self.unwatch(token),
                Out::PauseReads { conn } => self.set_paused(conn, true),
                Out::ResumeReads { conn } => self.set_paused(conn, false),
                Out::Wake { fd } => {
                    // Best effort and never blocking: a full wake socket already holds a
                    // wakeup, and a gone subscriber's socket just fails.
                    let _ = rustix::net::send(&*fd, &[1], rustix::net::SendFlags::DONTWAIT);
                }
            }
        }
    }

    /// Deadlines: the engine's, closing connections', the shutdown's.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self.engine.next_deadline().is_some_and(|d| d <= now) {
            self.engine.on_tick(now);
            self.dispatch();
        }
        while let Some(&(deadline, id)) = self.lingering.front() {
            if deadline > now {
                break;
            }
            self.lingering.pop_front();
            if self.conns.get(&id).is_some_and(|c| c.closing) {
                tracing::debug!(
                    conn = id,
                    "closing connection did not read what was queued for it in time; closed"
                );
                self.remove(id);
            }
        }
        if let Phase::Draining { deadline } = self.phase
            && deadline <= now
        {
            tracing::warn!(
                clients = self.conns.len(),
                "shutdown: some clients did not read their SHUTDOWN frame in time; closing them"
            );
            self.phase = Phase::Exit;
        }
    }

    /// A connection was accepted (non-blocking, close-on-exec).
    pub(crate) fn accepted(&mut self, fd: OwnedFd) {
        if !self.accepting() {
            return;
        }
        let creds = match peer_credentials(&fd) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("accepted connection has no peer credentials ({e}); closed");
                return;
            }
        };
        let id = self.next_conn;
        self.next_conn += 1;
        let mut state = R::ConnState::default();
        if let Err(e) = self.io.conn_added(id, fd.as_fd(), &mut state) {
            tracing::warn!(
                "cannot watch a new connection ({e}); it is closed. Raise fs.epoll.max_user_watches if this repeats"
            );
            return;
        }
        self.conns.insert(
            id,
            Conn {
                fd,
                queue: VecDeque::new(),
                closing: false,
                paused: false,
                io: state,
            },
        );
        let creds = Creds {
            pid: i32::try_from(creds.pid).unwrap_or(0),
            uid: creds.uid,
            gid: creds.gid,
        };
        tracing::trace!(
            conn = id,
            pid = creds.pid,
            uid = creds.uid,
            "connection accepted"
        );
        self.engine.on_connect(id, creds, Instant::now());
        self.dispatch();
    }

    /// Accept failed. Returns true if accepting should pause (out of fds or memory).
    pub(crate) fn accept_error(&mut self, e: Errno) -> bool {
        match e {
            Errno::AGAIN | Errno::INTR | Errno::CONNABORTED | Errno::PROTO => false,
            Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM => {
                tracing::warn!(
                    "cannot accept connections: {e}; pausing accept for {ACCEPT_PAUSE:?} (raise \
                     the fd limit, `ulimit -n`, or lower limits.max_clients)"
                );
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                true
            }
            e => {
                tracing::error!("accept failed: {e}; pausing accept for {ACCEPT_PAUSE:?}");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                true
            }
        }
    }

    /// `id` is readable (or hung up): read datagrams until `EAGAIN` or the budget runs out,
    /// then let the engine relay what they published, as one burst.
    pub(crate) fn readable(&mut self, id: ConnId) {
        self.read_batch(id);
        self.engine.flush_relays();
        self.dispatch();
    }

    fn read_batch(&mut self, id: ConnId) {
        for i in 0..READ_BUDGET {
            let result = match self.conns.get(&id) {
                Some(c) if !c.closing && !c.paused => recv_frame_with(
                    c.fd.as_fd(),
                    &mut self.buf,
                    &mut self.fds,
                    RecvFlags::DONTWAIT,
                ),
                _ => return,
            };
            match result {
                Ok(Received::Frame { len }) => {
                    self.engine
                        .on_frame(id, &self.buf[..len], &mut self.fds, Instant::now());
                    // Whatever the engine did not take is closed here.
                    self.fds.clear();
                    if i == 0 {
                        // The first message is relayed at once: a lone message (a ping-pong)
                        // does not wait for the receive that finds the socket empty. The rest of
                        // a burst goes out together after it.
                        self.engine.flush_relays();
                    }
                    self.dispatch();
                }
                Ok(Received::Eof) => {
                    self.peer_gone(id, "closed the connection");
                    return;
                }
                Err(e) if e.is_would_block() => return,
                Err(RecvError::Io(e)) => {
                    if e.raw_os_error() == Some(Errno::CONNRESET.raw_os_error()) {
                        self.peer_gone(id, "reset the connection");
                    } else {
                        tracing::warn!(conn = id, "receive failed: {e}; dropping the client");
                        self.peer_gone(id, "receive failed");
                    }
                    return;
                }
                // Truncated ancillary data (fds already closed by recv_frame_with), an oversized
                // datagram, or anything scm adds later: a framing violation.
                Err(e) => {
                    tracing::debug!(conn = id, "protocol violation: {e}");
                    let code = match e {
                        RecvError::TruncatedAncillary { .. } => ErrorCode::BadFds,
                        _ => ErrorCode::BadFrame,
                    };
                    self.engine.on_protocol_violation(id, code, &e.to_string());
                    self.dispatch();
                }
            }
        }
        // More may be waiting: come back after the others had their turn.
        self.backlog.push_back(id);
    }

    /// Connections whose read budget ran out get another turn.
    pub(crate) fn run_backlog(&mut self) {
        for _ in 0..self.backlog.len() {
            let Some(id) = self.backlog.pop_front() else {
                break;
            };
            self.readable(id);
        }
    }

    /// `id` is writable: flush its queue.
    pub(crate) fn writable(&mut self, id: ConnId) {
        let mut sent: u32 = 0;
        let mut failed = None;
        if let Some(c) = self.conns.get_mut(&id) {
            while let Some(q) = c.queue.front() {
                let result = if q.fds.is_empty() {
                    // The run of frames without fds at the front: one `sendmmsg`.
                    let (front, _) = c.queue.as_slices();
                    let end = front
                        .iter()
                        .position(|q| !q.fds.is_empty())
                        .unwrap_or(front.len());
                    try_send_many(c.fd.as_fd(), &front[..end])
                } else {
                    try_send(c.fd.as_fd(), &q.frame, &q.fds).map(|()| 1)
                };
                match result {
                    Ok(n) => {
                        for q in c.queue.drain(..n) {
                            self.engine.recycle(q.frame);
                        }
                        sent += n as u32;
                    }
                    Err(e) if e == Errno::AGAIN => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        } else {
            return;
        }
        let closing = self.conns.get(&id).is_some_and(|c| c.closing);
        if sent > 0 && !closing {
            self.engine.on_sent(id, sent);
            self.dispatch();
        }
        if let Some(e) = failed {
            self.send_failed(id, e);
            return;
        }
        self.refresh(id);
    }

    /// After a change of a connection's queue: close it if it is closing and flushed, shrink an
    /// emptied queue, tell the driver what to watch.
    pub(crate) fn refresh(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.queue.is_empty() {
            if c.closing {
                self.remove(id);
                return;
            }
            if c.queue.capacity() > IDLE_QUEUE_CAPACITY {
                c.queue = VecDeque::new();
            }
        }
        let (read, write) = (!c.closing && !c.paused, !c.queue.is_empty());
        self.io.interest(id, c.fd.as_fd(), &mut c.io, read, write);
    }

    /// Sends the frames collected for one connection ([`Core::dispatch`]): at once if its
    /// queue is empty (runs of frames without fds in one `sendmmsg`), queueing what the socket
    /// refuses.
    fn flush_sends(&mut self) {
        let Some(id) = self.pending_conn.take() else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.pending);
        self.send_batch(id, &mut batch);
        batch.clear();
        self.pending = batch;
    }

    fn send_batch(&mut self, id: ConnId, batch: &mut Vec<Queued>) {
        let Some(c) = self.conns.get_mut(&id) else {
            tracing::trace!(conn = id, "frames for a connection that is gone: dropped");
            return;
        };
        if c.closing {
            // An engine bug, but one client's frame is not worth the broker: log and drop.
            tracing::error!(
                conn = id,
                "bug: the engine sent a frame after closing the connection; dropped"
            );
            return;
        }
        let was_empty = c.queue.is_empty();
        let mut sent = 0usize;
        let mut failed = None;
        if was_empty {
            while sent < batch.len() {
                let result = if batch[sent].fds.is_empty() {
                    // A run of frames without fds: one system call.
                    let end = batch[sent..]
                        .iter()
                        .position(|q| !q.fds.is_empty())
                        .map_or(batch.len(), |p| sent + p);
                    try_send_many(c.fd.as_fd(), &batch[sent..end])
                } else {
                    try_send(c.fd.as_fd(), &batch[sent].frame, &batch[sent].fds).map(|()| 1)
                };
                match result {
                    Ok(n) => sent += n,
                    Err(e) if e == Errno::AGAIN => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        // A short `sendmmsg` leaves the rest for POLLOUT (where an error would show again).
        c.queue.extend(batch.drain(sent..));
        let queued = c.queue.len();
        for q in batch.drain(..) {
            self.engine.recycle(q.frame);
        }
        if sent > 0 {
            self.engine.on_sent(id, sent as u32);
        }
        if let Some(e) = failed {
            self.send_failed(id, e);
            return;
        }
        if was_empty && queued > 0 {
            self.refresh(id);
        }
    }

    fn send_failed(&mut self, id: ConnId, e: Errno) {
        let closing = self.conns.get(&id).is_some_and(|c| c.closing);
        match e {
            Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN => {
                tracing::debug!(conn = id, "send: peer gone ({e})");
            }
            Errno::INVAL => {
                tracing::error!(
                    conn = id,
                    "bug: unsendable frame (empty, or too many fds); dropping the client"
                );
            }
            e => tracing::warn!(conn = id, "send failed: {e}; dropping the client"),
        }
        self.remove(id);
        if !closing {
            self.engine.on_disconnect(id);
        }
    }

    /// The peer closed, reset or broke the connection.
    fn peer_gone(&mut self, id: ConnId, what: &str) {
        tracing::trace!(conn = id, "peer {what}");
        if self.remove(id).is_some_and(|closing| !closing) {
            self.engine.on_disconnect(id);
            self.dispatch();
        }
    }

    /// Out::PauseReads / Out::ResumeReads.
    fn set_paused(&mut self, id: ConnId, paused: bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.paused == paused {
            return;
        }
        c.paused = paused;
        if !paused && !c.closing {
            // Frames may have waited in the socket with no new readiness report to come: read
            // them on this turn.
            self.backlog.push_back(id);
        }
        self.refresh(id);
    }

    /// Out::Close: flush, then close; no on_disconnect.
    fn close(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.closing = true;
        if !c.queue.is_empty() {
            self.lingering
                .push_back((Instant::now() + self.options.close_linger, id));
        }
        self.refresh(id);
    }

    /// Forgets a connection and hands its fd to the driver to close. Returns whether it was
    /// closing (`None`: it did not exist).
    fn remove(&mut self, id: ConnId) -> Option<bool> {
        let c = self.conns.remove(&id)?;
        self.io.conn_removed(id, c.fd, c.io);
        Some(c.closing)
    }

    fn watch(&mut self, token: u64, fd: Arc<OwnedFd>) {
        self.unwatch(token);
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Err(e) = self.io.watch_added(serial, &fd) {
            tracing::error!(token, "cannot watch an fd for the engine: {e}");
            return;
        }
        self.watch_serials.insert(serial, token);
        self.watches.insert(token, Watch { serial, fd });
    }

    fn unwatch(&mut self, token: u64) {
        if let Some(w) = self.watches.remove(&token) {
            self.watch_serials.remove(&w.serial);
            self.io.watch_removed(w.serial, w.fd);
        }
    }

    /// A watched fd is readable.
    pub(crate) fn wake(&mut self, serial: u64) {
        let Some(&token) = self.watch_serials.get(&serial) else {
            return;
        };
        // Out::Watch: drain first, so the level-triggered watch quiets down; the engine reads
        // no socket itself.
        if let Some(w) = self.watches.get(&token) {
            bus_core::wake::drain(w.fd.as_fd());
        }
        self.engine.on_wake(token);
        self.dispatch();
        if let Some(fd) = self.watch_fd(serial) {
            let fd = Arc::clone(fd);
            self.io.watch_fired(serial, &fd);
        }
    }

    /// The signalfd is readable.
    pub(crate) fn signals_ready(&mut self) {
        loop {
            let signo = match self.signals.fd.read_signal() {
                Ok(Some(info)) => info.ssi_signo as i32,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!("reading the signalfd failed: {e}");
                    return;
                }
            };
            match Signal::try_from(signo) {
                Ok(Signal::SIGHUP) => self.reload_policy(),
                Ok(sig @ (Signal::SIGINT | Signal::SIGTERM)) => self.shutdown(sig),
                _ => {}
            }
        }
    }

    fn shutdown(&mut self, sig: Signal) {
        match self.phase {
            Phase::Running => {
                tracing::info!(
                    clients = self.conns.len(),
                    "{sig}: shutting down (send it again to exit without waiting for clients)"
                );
                self.phase = Phase::Draining {
                    deadline: Instant::now() + self.options.shutdown_grace,
                };
                self.accept_paused_until = None;
                self.io.stop_accepting();
                self.engine
                    .begin_shutdown(&format!("the broker is shutting down ({sig})"));
                self.dispatch();
            }
            _ => {
                tracing::warn!("{sig} again: exiting now");
                self.phase = Phase::Exit;
            }
        }
    }

    fn reload_policy(&mut self) {
        let Some(path) = self.options.policy.policy().path().map(|p| p.to_owned()) else {
            tracing::info!(
                "SIGHUP: no policy file configured (the default policy allows only the broker's \
                 own uid); nothing to reload. Set `policy = \"FILE\"` in the config file to use one"
            );
            return;
        };
        match self.options.policy.reload() {
            Ok(()) => {
                tracing::info!(
                    policy = %path.display(),
                    rules = self.options.policy.policy().rule_count(),
                    "SIGHUP: policy reloaded"
                );
                self.engine.set_policy(self.options.policy.policy().clone());
                self.dispatch();
            }
            Err(e) => {
                tracing::error!("SIGHUP: policy not reloaded, the previous one stays in force: {e}")
            }
        }
    }
}

/// Frames without fds sent by one `sendmmsg`, at most [`SEND_BATCH`]; returns how many went.
/// No allocation: the headers live on the stack.
fn try_send_many(sock: BorrowedFd<'_>, frames: &[Queued]) -> Result<usize, Errno> {
    let n = frames.len().min(SEND_BATCH);
    if n == 1 {
        return try_send(sock, &frames[0].frame, &[]).map(|()| 1);
    }
    let iovs: [[io::IoSlice<'_>; 1]; SEND_BATCH] = std::array::from_fn(|i| {
        [io::IoSlice::new(
            frames.get(i).map_or(&[][..], |q| &q.frame),
        )]
    });
    let mut controls: [SendAncillaryBuffer<'_, '_, '_>; SEND_BATCH] =
        std::array::from_fn(|_| SendAncillaryBuffer::default());
    let mut parts = controls.iter_mut().zip(iovs.iter());
    let mut msgs: [MMsgHdr<'_>; SEND_BATCH] = std::array::from_fn(|_| {
        let (control, iov) = parts.next().expect("as many as the array");
        MMsgHdr::new(iov, control)
    });
    sendmmsg(sock, &mut msgs[..n], SendFlags::DONTWAIT)
}

/// One non-blocking send with `fds` attached; no allocation.
fn try_send(sock: BorrowedFd<'_>, frame: &[u8], fds: &[Arc<OwnedFd>]) -> Result<(), Errno> {
    let n = fds.len().min(MAX_FDS_PER_FRAME);
    if n != fds.len() {
        return Err(Errno::INVAL);
    }
    // A fixed array of borrows (padded with the first fd; only `..n` is sent).
    let borrowed: [BorrowedFd<'_>; MAX_FDS_PER_FRAME] = match fds.first() {
        Some(first) => std::array::from_fn(|i| fds.get(i).unwrap_or(first).as_fd()),
        None => [sock; MAX_FDS_PER_FRAME],
    };
    match send_frame_with(sock, frame, &borrowed[..n], SendFlags::DONTWAIT) {
        Ok(_) => Ok(()),
        Err(e) => Err(e
            .raw_os_error()
            .map_or(Errno::INVAL, Errno::from_raw_os_error)),
    }
}
