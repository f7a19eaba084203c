//! The broker's logic, sans-IO: events in (connections, frames, disconnects, wakeups, ticks),
//! actions out ([`Out`]). The drivers in `crate::driver` do the socket I/O; everything here is
//! deterministic and testable without sockets. (It does create memfds and map segments: that
//! is the broker's job as the memfd factory, not socket I/O.)
//!
//! # Handoff order
//!
//! A ring reaches subscribers only after its publisher has mapped it read-write, written its
//! header and said PUBLISHER_READY, and the broker has sealed it (`F_SEAL_FUTURE_WRITE |
//! F_SEAL_SEAL`): from then on nobody else can map it writable. Likewise a cursor page reaches
//! publishers only after its subscriber said SUBSCRIBER_READY and the broker sealed it. When a
//! publisher and a subscriber are both live, the broker sends CURSOR_GRANTED to the publisher
//! first and RING_GRANTED(reader) to the subscriber second, so the publisher is already looking
//! at the subscriber's cursor page (whose slot reads "detached" until the subscriber attaches)
//! when the subscriber starts reading. See `docs/protocol.md`, "Handoff sequence".

mod invariants;
mod stats;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::frame::{
    CreatePublisher, CursorGranted, DecodeError, Deliver, ErrorCode, ErrorReply, EvictReason,
    Evicted, Frame, Header, MAX_FALLBACK_MESSAGE_BYTES, ModeRequest, Msg, PROTOCOL_VERSION,
    PeerGone, PeerGoneReason, PeerKind, RingGranted, RingRole, Shutdown, ShutdownReason,
    SkipReason, Skipped, Subscribe, Subscribed, Transport, Welcome,
};
use bus_core::layout::{
    CURSOR_DETACHED, MIN_DATA_BYTES, Mode, max_message_bytes_for, record_bytes,
};
use bus_core::limits::{Limits, MAX_ERROR_MESSAGE_BYTES, MAX_FRAME_BYTES, MAX_TOPIC_BYTES};
use bus_core::ring::{CursorPage, CursorView, Reader, ReaderSet, RingConfig, StartAt, Writer};
use bus_core::segment::{
    Access, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use bus_core::sys::scm::FdBatch;
use bus_core::wake::{WakeReceiver, WakeSender, protocol};

use crate::config::TopicDecl;
use crate::policy::{Op, Policy};

/// A connection, numbered by the driver: unique for the broker's lifetime, never reused.
pub type ConnId = u64;

/// Credentials of a connection, from SO_PEERCRED at accept (never from a frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Creds {
    /// Peer pid.
    pub pid: i32,
    /// Peer uid.
    pub uid: u32,
    /// Peer primary gid.
    pub gid: u32,
}

/// What the engine asks the driver to do.
#[derive(Debug)]
pub enum Out {
    /// Send one datagram with these fds attached (the driver must keep the fds alive until the
    /// send completes; they are shared because one ring fd goes to many subscribers).
    Send {
        /// To whom.
        conn: ConnId,
        /// The encoded frame.
        frame: Vec<u8>,
        /// Fds to attach (SCM_RIGHTS).
        fds: Vec<Arc<OwnedFd>>,
    },
    /// Close the connection after the sends already queued for it. The engine has already
    /// forgotten it: do not call [`Engine::on_disconnect`] for it afterwards.
    Close {
        /// Which.
        conn: ConnId,
    },
    /// Report readability of `fd` with [`Engine::on_wake`]`(token)` (level-triggered).
    Watch {
        /// Token to report.
        token: u64,
        /// The fd (a wake socket the broker reads, for its datagram subscribers).
        fd: Arc<OwnedFd>,
    },
    /// Stop watching `token`.
    Unwatch {
        /// Which.
        token: u64,
    },
    /// Stop reading frames from `conn` until [`Out::ResumeReads`]: a datagram publisher on it
    /// has [`FALLBACK_BACKLOG`] messages waiting for ring space. Its further PUBLISHes wait in
    /// its socket (and then in its own `send`): ordinary socket back-pressure instead of one
    /// `too-slow` ERROR per message.
    PauseReads {
        /// Which.
        conn: ConnId,
    },
    /// Read frames from `conn` again (its publishers' backlogs are empty).
    ResumeReads {
        /// Which.
        conn: ConnId,
    },
    /// Send one wake datagram on `fd` (a subscriber's wake socket), without blocking; a full
    /// socket already holds a wakeup. The broker nudges a subscriber it suspects of stalling
    /// before it judges it: a parked honest subscriber whose publisher did not wake it then
    /// reads, and is not evicted for its publisher's silence.
    Wake {
        /// The send end of the subscriber's wake socket.
        fd: Arc<OwnedFd>,
    },
}

/// Which half of an introduction to perform (see [`Engine::connect_pair`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Half {
    /// CURSOR_GRANTED to the publisher only.
    Cursor,
    /// RING_GRANTED to the subscriber only.
    Ring,
    /// Both, in that order.
    Both,
}

/// Frames a datagram subscriber may have in flight before the broker stops reading its rings
/// (its cursor then stays put, which is the back-pressure a reliable publisher feels).
const DELIVER_CREDIT: u32 = 64;
/// Messages a datagram publisher may have waiting for ring space before the broker stops reading
/// its connection ([`Out::PauseReads`]).
pub const FALLBACK_BACKLOG: usize = 256;
/// Messages that may wait before a PUBLISH is refused with `too-slow`: only reached by a driver
/// that keeps handing over frames after [`Out::PauseReads`] (both drivers stop at once).
const FALLBACK_BACKLOG_LIMIT: usize = 2 * FALLBACK_BACKLOG;
/// How often stalled reliable subscribers are looked for (at most once a second: an idle
/// broker must not wake more often).
const STALL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Frame buffers kept for reuse ([`Engine::recycle`]): a relay burst is at most
/// [`DELIVER_CREDIT`] frames per subscriber before it waits.
const SPARE_FRAMES: usize = 256;
/// Only buffers up to this capacity are kept (the pool stays within 1 MiB); DELIVERs of larger
/// messages allocate, which their copy dwarfs anyway.
const SPARE_FRAME_BYTES: usize = 4096;
/// Most ring records (delivered or skipped) one call of `pump_fallback` handles: the loop's
/// turn is bounded whatever a ring holds.
const RELAY_STEPS: usize = 1024;
/// How soon a datagram publisher's backlog is retried.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitingHello { deadline: Instant },
    Ready,
}

struct Client {
    creds: Creds,
    gids: Vec<u32>,
    name: String,
    phase: Phase,
    transport: Transport,
    publishers: Vec<u64>,
    subscribers: Vec<u64>,
    /// Frames handed to the driver and not yet reported sent.
    inflight: u32,
    /// Reads are paused ([`Out::PauseReads`]) until its publishers' backlogs drain.
    paused: bool,
    /// File descriptors the broker holds for its publishers and subscribers
    /// (`limits.max_fds_per_client`).
    fds: u32,
}

struct Topic {
    id: u64,
    name: String,
    mode: Mode,
    ring_bytes: u64,
    max_message_bytes: u32,
    stall_timeout: Duration,
    declared: bool,
    /// Ring size and message limit are fixed once declared or once a publisher created a ring;
    /// a topic made by a subscriber takes them from its first publisher.
    geometry_fixed: bool,
    slots: [Slot; bus_core::layout::CURSOR_SLOTS],
    publishers: Vec<u64>,
    subscribers: Vec<u64>,
    evictions: u64,
}

/// A publisher slot of a topic: the index of the cursor each subscriber keeps for that
/// publisher's ring, in its cursor page.
#[derive(Debug, Default)]
enum Slot {
    #[default]
    Free,
    /// Held by this publisher.
    Used(u64),
    /// Its publisher left, but subscribers may still read its ring (they drain it, then send
    /// RING_RELEASED): their cursor for this slot still describes the old ring, so a new
    /// reliable publisher must not read it as theirs. Free once no holder is left.
    Draining(Box<Draining>),
}

/// A slot whose publisher left while subscribers still read its ring.
#[derive(Debug)]
struct Draining {
    publisher: u64,
    /// The broker's read-only view of the old ring (it keeps the ring mapped), to tell a
    /// holder's real progress from a number it writes.
    monitor: Option<Reader>,
    /// Where the old ring's writer stopped.
    end: u64,
    holders: Vec<Holder>,
}

/// A subscriber still reading a departed publisher's ring.
#[derive(Clone, Copy, Debug)]
struct Holder {
    sid: u64,
    /// The furthest record boundary of the old ring it has been seen at.
    high_water: u64,
    /// Its cursor has been seen on the old ring (so "detached" now means it let go).
    attached: bool,
    /// Since when it has made no progress.
    since: Instant,
}

const FREE_SLOTS: [Slot; bus_core::layout::CURSOR_SLOTS] =
    [const { Slot::Free }; bus_core::layout::CURSOR_SLOTS];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Pending,
    Live,
}

struct Publisher {
    id: u64,
    topic: u64,
    conn: ConnId,
    slot: u16,
    transport: Transport,
    life: Life,
    ring_fd: Arc<OwnedFd>,
    /// The broker's read-only view, once live: for stats and stall detection.
    monitor: Option<Reader>,
    /// Datagram publishers: the broker is the ring's writer.
    writer: Option<Writer>,
    backlog: VecDeque<Vec<u8>>,
    refused: u64,
    /// When it became live, in the engine's event order (see `Engine::live_clock`).
    live_seq: u64,
    /// A datagram publisher that was closed (CLOSE_PUBLISHER, or its client left) while
    /// messages it had been told were accepted still waited in `backlog`: it stays until they
    /// are written, then goes. Holds the CLOSE_PUBLISHER to answer once they are.
    closing: Option<Closing>,
    /// Subscribers that said RING_RELEASED for this ring: they read no more of it, so they are
    /// neither waited for nor judged on it.
    released: BTreeSet<u64>,
    /// File descriptors the broker holds for it: the ring.
    fds: u32,
}

/// A datagram publisher's deferred removal (see [`Publisher::closing`]).
#[derive(Clone, Copy, Debug)]
struct Closing {
    /// The CLOSE_PUBLISHER request to answer with OK, if its connection is still there.
    reply: Option<(ConnId, u64)>,
    reason: PeerGoneReason,
}

/// What the stall check knows about one (subscriber, publisher) pair.
#[derive(Clone, Copy, Debug)]
struct Stall {
    /// The furthest position this subscriber has provably reached in the ring (a record
    /// boundary the writer wrote). Honest cursors only grow; moving back and forth below this
    /// frees nothing, so it is no progress.
    high_water: u64,
    /// Since when it has made no progress while the writer waits for it.
    since: Instant,
    /// The subscriber was nudged through its wake socket in this episode.
    woken: bool,
    /// Its cursor has been seen attached to this ring (not "detached").
    attached: bool,
}

struct Fallback {
    page: Arc<CursorPage>,
    readers: ReaderSet,
    wake: WakeReceiver,
    token: u64,
    delivered: u64,
    lost: u64,
    removed: Vec<u64>,
    /// Publishers that left: their rings are read to the end, then dropped.
    gone: Vec<u64>,
    /// The next sequence number of each ring (for SKIPPED after a corrupt record).
    next_seq: NextSeq,
}

/// Sequence number expected next, per publisher id (at most one entry per publisher slot).
#[derive(Debug, Default)]
struct NextSeq(Vec<(u64, u64)>);

impl NextSeq {
    fn note(&mut self, pid: u64, next: u64) {
        match self.0.iter_mut().find(|(p, _)| *p == pid) {
            Some(e) => e.1 = next,
            None => self.0.push((pid, next)),
        }
    }

    fn get(&self, pid: u64) -> u64 {
        self.0.iter().find(|(p, _)| *p == pid).map_or(0, |e| e.1)
    }

    fn forget(&mut self, pid: u64) {
        self.0.retain(|(p, _)| *p != pid);
    }
}

struct Subscriber {
    id: u64,
    topic: u64,
    conn: ConnId,
    delivery: Transport,
    life: Life,
    cursor_fd: Arc<OwnedFd>,
    wake_tx: Arc<OwnedFd>,
    /// The broker's read-only view of the cursor page, once live.
    view: Option<CursorView>,
    /// Datagram subscribers: the broker reads the rings for it.
    fallback: Option<Fallback>,
    /// Stall tracking per publisher id.
    stall: BTreeMap<u64, Stall>,
    /// When it became live, in the engine's event order.
    live_seq: u64,
    /// File descriptors the broker holds for it: the cursor page and the wake socket's send
    /// end; for datagram delivery also the wake socket's receive end and the driver's copy.
    fds: u32,
}

/// The broker's state: clients, topics, rings.
pub struct Engine {
    limits: Limits,
    policy: Policy,
    decls: Vec<TopicDecl>,
    started: Instant,
    next_id: u64,
    clients: BTreeMap<ConnId, Client>,
    topics: BTreeMap<u64, Topic>,
    topic_by_name: BTreeMap<String, u64>,
    publishers: BTreeMap<u64, Publisher>,
    subscribers: BTreeMap<u64, Subscriber>,
    /// Wake token -> datagram subscriber id.
    tokens: BTreeMap<u64, u64>,
    out: VecDeque<Out>,
    next_stall_check: Option<Instant>,
    evictions: u64,
    now: Instant,
    scratch: Vec<u8>,
    /// Orders publishers and subscribers becoming live: a subscriber reads the ring of a
    /// publisher that became live after it from the ring's first record.
    live_clock: u64,
    /// Frame buffers handed back by the driver ([`Engine::recycle`]), reused for DELIVERs.
    spare_frames: Vec<Vec<u8>>,
    /// Topics with datagram-published messages not yet pumped to their datagram subscribers
    /// ([`Engine::flush_relays`]).
    dirty_relays: Vec<u64>,
    /// Connections in the order they arrived, with their HELLO deadline. Deadlines grow in
    /// this order (one fixed timeout), so the front is the next to expire; entries of clients
    /// that said HELLO or left are skipped and dropped lazily. Keeps `next_deadline` O(1)
    /// amortised instead of a walk over every client on each loop turn.
    hello_deadlines: VecDeque<(Instant, ConnId)>,
    /// A topic that must survive its last member leaving for a moment (a publisher is being
    /// added to it).
    keep_topic: Option<u64>,
    /// Datagram subscribers whose relay stopped at its work bound ([`RELAY_STEPS`]) with
    /// more to do: pumped again on the next tick (at once).
    pump_again: Vec<u64>,
    /// File descriptors the engine may hold for segments and wake sockets, all clients
    /// together (the driver and the connections themselves have theirs apart:
    /// [`Engine::set_fd_budget`]), and how many it holds.
    fd_budget: u64,
    fds_used: u64,
}

fn mode_of(req: ModeRequest) -> Option<Mode> {
    match req {
        ModeRequest::Any => None,
        ModeRequest::Reliable => Some(Mode::Reliable),
        ModeRequest::Lossy => Some(Mode::Lossy),
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Reliable => "reliable",
        Mode::Lossy => "lossy",
    }
}

/// The ring size a request for `ring_bytes` (non-zero) gets: the next power of two, at least
/// [`MIN_DATA_BYTES`]; `None` if that does not fit in a u64 (a request near 2^64 must be
/// refused, never wrapped).
fn ring_size_for(ring_bytes: u64) -> Option<u64> {
    ring_bytes
        .max(MIN_DATA_BYTES as u64)
        .checked_next_power_of_two()
}

/// Longest memfd name Linux accepts (`memfd_create`: 249 bytes plus the NUL).
const MEMFD_NAME_BYTES: usize = 249;

/// A memfd name for a topic's segment, `membus:<topic>:<suffix>`, with the topic cut on a
/// character boundary so that the name always fits (the name is for people reading
/// /proc/PID/fd; nothing looks a segment up by it).
fn memfd_name(topic: &str, suffix: std::fmt::Arguments<'_>) -> String {
    let suffix = suffix.to_string();
    let room = MEMFD_NAME_BYTES - "membus:".len() - 1 - suffix.len();
    let topic = &topic[..topic.floor_char_boundary(room)];
    format!("membus:{topic}:{suffix}")
}

/// Descriptors the broker holds for a subscriber: cursor page and wake send end; for datagram
/// delivery also the wake receive end and the copy the driver watches.
fn subscriber_fds(delivery: Transport) -> u32 {
    match delivery {
        Transport::Shm => 2,
        _ => 4,
    }
}

/// Whether a segment error (or one of its sources) is EMFILE / ENFILE.
fn out_of_fds(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(23 | 24))
        {
            return true;
        }
        if let Some(errno) = err.downcast_ref::<rustix::io::Errno>()
            && matches!(*errno, rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A segment could not be created: out of descriptors is the broker's limit, not an internal
/// fault.
fn segment_error(what: &str, e: impl std::fmt::Display, fds_out: bool) -> Reject {
    if fds_out {
        reject(
            ErrorCode::LimitReached,
            format!(
                "cannot create the {what}: the broker is out of file descriptors ({e}); raise \
                 its limit (ulimit -n, LimitNOFILE=) or lower limits.max_clients / \
                 limits.max_fds_per_client"
            ),
        )
    } else {
        reject(
            ErrorCode::Internal,
            format!("cannot create the {what}: {e}"),
        )
    }
}

/// Cuts a message to what an ERROR frame may carry, on a character boundary.
fn clip(msg: &str) -> &str {
    &msg[..msg.floor_char_boundary(MAX_ERROR_MESSAGE_BYTES)]
}

/// An error to send back for one request.
struct Reject {
    code: ErrorCode,
    message: String,
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Reject {
    Reject {
        code,
        message: message.into(),
    }
}

impl Engine {
    /// A new engine at time `now`: limits and declared topics from the config, and the policy
    /// in force. The engine reads no clock: time comes with the events.
    pub fn new(limits: Limits, topics: Vec<TopicDecl>, policy: Policy, now: Instant) -> Engine {
        let mut e = Engine {
            limits,
            policy,
            decls: topics,
            started: now,
            next_id: 1,
            clients: BTreeMap::new(),
            topics: BTreeMap::new(),
            topic_by_name: BTreeMap::new(),
            publishers: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            tokens: BTreeMap::new(),
            out: VecDeque::new(),
            next_stall_check: None,
            evictions: 0,
            now,
            scratch: Vec::with_capacity(MAX_FRAME_BYTES),
            live_clock: 0,
            spare_frames: Vec::new(),
            dirty_relays: Vec::new(),
            hello_deadlines: VecDeque::new(),
            keep_topic: None,
            pump_again: Vec::new(),
            fd_budget: u64::MAX,
            fds_used: 0,
        };
        for d in e.decls.clone() {
            let id = e.alloc_id();
            e.insert_topic(Topic {
                id,
                name: d.name.clone(),
                mode: d.mode,
                ring_bytes: d.ring_bytes,
                max_message_bytes: d.max_message_bytes,
                stall_timeout: Duration::from_millis(d.stall_timeout_ms.into()),
                declared: true,
                geometry_fixed: true,
                slots: FREE_SLOTS,
                publishers: Vec::new(),
                subscribers: Vec::new(),
                evictions: 0,
            });
        }
        e
    }

    /// Sets how many file descriptors the engine may hold for segments and wake sockets, all
    /// clients together (the daemon derives it from RLIMIT_NOFILE after reserving the
    /// driver's and one per connection). Unlimited by default.
    pub fn set_fd_budget(&mut self, fds: u64) {
        self.fd_budget = fds;
    }

    /// File descriptors the engine holds for segments and wake sockets.
    pub fn fds_in_use(&self) -> u64 {
        self.fds_used
    }

    /// Refuses a request that would make the broker hold `need` more descriptors for `conn`
    /// than its quota or the broker's budget allow (`limit-reached`, naming the limit).
    fn check_fds(&self, conn: ConnId, need: u32) -> Result<(), Reject> {
        let held = self.clients.get(&conn).map_or(0, |c| c.fds);
        let quota = self.limits.max_fds_per_client;
        if held + need > quota {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "this connection's publishers and subscribers hold {held} of the {quota} \
                     file descriptors one client may have the broker hold \
                     (limits.max_fds_per_client), and this request needs {need}; close some, \
                     or raise the limit in the broker config"
                ),
            ));
        }
        if self.fds_used + u64::from(need) > self.fd_budget {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "the broker holds {} of the {} file descriptors it may use for rings and \
                     cursor pages (its RLIMIT_NOFILE less what connections need); try again \
                     later, or raise the broker's file-descriptor limit (ulimit -n, \
                     LimitNOFILE=)",
                    self.fds_used, self.fd_budget
                ),
            ));
        }
        Ok(())
    }

    /// Counts `n` descriptors held for `conn` (which may be gone: only the total counts then).
    fn charge_fds(&mut self, conn: ConnId, n: u32) {
        self.fds_used += u64::from(n);
        if let Some(c) = self.clients.get_mut(&conn) {
            c.fds += n;
        }
    }

    fn refund_fds(&mut self, conn: ConnId, n: u32) {
        self.fds_used = self.fds_used.saturating_sub(u64::from(n));
        if let Some(c) = self.clients.get_mut(&conn) {
            c.fds = c.fds.saturating_sub(n);
        }
    }

    /// Replaces the policy (SIGHUP reload succeeded). Existing publishers and subscribers stay.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// The next action for the driver.
    pub fn poll_out(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn insert_topic(&mut self, t: Topic) {
        self.topic_by_name.insert(t.name.clone(), t.id);
        self.topics.insert(t.id, t);
    }

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

    fn send(&mut self, conn: ConnId, request_id: u64, msg: Msg<'_>, fds: Vec<Arc<OwnedFd>>) {
        let frame = Frame { request_id, msg };
        let mut buf = Vec::new();
        match frame.encode(&mut buf) {
            Ok(_) => {
                if let Some(c) = self.clients.get_mut(&conn) {
                    c.inflight += 1;
                }
                self.out.push_back(Out::Send {
                    conn,
                    frame: buf,
                    fds,
                });
            }
            // Our own frames always encode; a failure is a bug worth a loud log, not a crash.
            Err(e) => tracing::error!(conn, ?e, "cannot encode {:?}", frame.msg_type()),
        }
    }

    fn send_error(&mut self, conn: ConnId, request_id: u64, code: ErrorCode, message: &str) {
        tracing::debug!(conn, request_id, %code, message, "error reply");
        self.send(
            conn,
            request_id,
            Msg::Error(ErrorReply {
                code,
                message: clip(message),
            }),
            Vec::new(),
        );
    }

    fn close(&mut self, conn: ConnId) {
        self.forget_client(conn, PeerGoneReason::ProtocolError);
        self.out.push_back(Out::Close { conn });
    }

    // -----------------------------------------------------------------------------------------
    // Events
    // -----------------------------------------------------------------------------------------

    /// A connection was accepted. Returns false if it was refused (an error frame and a Close
    /// are queued).
    pub fn on_connect(&mut self, conn: ConnId, creds: Creds, now: Instant) -> bool {
        self.now = now;
        let client = Client {
            creds,
            gids: self.policy.client_gids(creds.uid, creds.gid),
            name: String::new(),
            phase: Phase::AwaitingHello {
                deadline: now + Duration::from_millis(self.limits.handshake_timeout_ms.into()),
            },
            transport: Transport::Shm,
            publishers: Vec::new(),
            subscribers: Vec::new(),
            inflight: 0,
            paused: false,
            fds: 0,
        };
        let full = self.clients.len() >= self.limits.max_clients as usize;
        if let Phase::AwaitingHello { deadline } = client.phase {
            self.hello_deadlines.push_back((deadline, conn));
        }
        self.clients.insert(conn, client);
        if full {
            let msg = format!(
                "the broker has {} clients, its limit (limits.max_clients); raise it in the \
                 broker config or close idle clients",
                self.limits.max_clients
            );
            self.send_error(conn, 0, ErrorCode::LimitReached, &msg);
            self.close(conn);
            return false;
        }
        true
    }

    /// The driver saw a framing violation it handles itself: truncated ancillary data
    /// (`ErrorCode::BadFds`), a truncated or oversized datagram (`ErrorCode::BadFrame`). The
    /// engine queues an error frame with `code` and a Close.
    pub fn on_protocol_violation(&mut self, conn: ConnId, code: ErrorCode, what: &str) {
        if !self.clients.contains_key(&conn) {
            return;
        }
        tracing::info!(conn, what, "protocol violation: disconnecting");
        self.send_error(conn, 0, code, what);
        self.close(conn);
    }

    /// The peer closed or reset the connection.
    pub fn on_disconnect(&mut self, conn: ConnId) {
        self.forget_client(conn, PeerGoneReason::Disconnected);
    }

    /// `frames` sends to `conn` completed (frees send credit).
    pub fn on_sent(&mut self, conn: ConnId, frames: u32) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        let had_no_credit = c.inflight >= DELIVER_CREDIT;
        c.inflight = c.inflight.saturating_sub(frames);
        // A subscriber's relay only stops for lack of credit: with credit to spare nothing
        // waits on this (and the common case, a send that completed at once, costs nothing).
        if !had_no_credit {
            return;
        }
        // By index: pumping never adds or removes this client's subscribers, and cloning the
        // list would allocate per send.
        let mut i = 0;
        while let Some(&sid) = self.clients.get(&conn).and_then(|c| c.subscribers.get(i)) {
            i += 1;
            self.pump_fallback(sid);
            // The relay moved its cursor: space for the broker's own writers on that topic.
            if let Some(tid) = self.subscribers.get(&sid).map(|s| s.topic) {
                self.flush_topic_backlogs(tid);
            }
        }
        self.flush_relays();
    }

    /// Hands back a frame buffer the driver is done with (sent at once), so the relay can
    /// reuse it instead of allocating one per DELIVER.
    pub fn recycle(&mut self, mut frame: Vec<u8>) {
        if self.spare_frames.len() < SPARE_FRAMES && frame.capacity() <= SPARE_FRAME_BYTES {
            frame.clear();
            self.spare_frames.push(frame);
        }
    }

    /// A watched fd is readable.
    pub fn on_wake(&mut self, token: u64) {
        if let Some(&sid) = self.tokens.get(&token) {
            if let Some(fb) = self
                .subscribers
                .get_mut(&sid)
                .and_then(|s| s.fallback.as_mut())
            {
                fb.wake.drain();
                protocol::unpark(fb.page.park_word());
            }
            self.pump_fallback(sid);
        }
    }

    /// Time passed; call at [`Engine::next_deadline`] (or later).
    pub fn on_tick(&mut self, now: Instant) {
        self.now = now;
        self.drop_stale_hello_deadlines();
        let mut expired = Vec::new();
        while let Some(&(deadline, conn)) = self.hello_deadlines.front() {
            if deadline > now {
                break;
            }
            self.hello_deadlines.pop_front();
            if self.awaiting_hello(conn) {
                expired.push(conn);
            }
        }
        for conn in expired {
            let msg = format!(
                "no HELLO within {} ms of connecting; send HELLO first",
                self.limits.handshake_timeout_ms
            );
            self.send_error(conn, 0, ErrorCode::Timeout, &msg);
            self.close(conn);
        }
        let backlogged: Vec<u64> = self
            .publishers
            .values()
            .filter(|p| !p.backlog.is_empty())
            .map(|p| p.id)
            .collect();
        for pid in backlogged {
            self.flush_backlog(pid);
        }
        if !self.needs_stall_checks() {
            self.next_stall_check = None;
        } else {
            match self.next_stall_check {
                Some(t) if t <= now => {
                    self.check_stalls(now);
                    self.next_stall_check = Some(now + STALL_CHECK_EVERY);
                }
                Some(_) => {}
                None => self.next_stall_check = Some(now + STALL_CHECK_EVERY),
            }
        }
        let fallback_subs: Vec<u64> = self
            .subscribers
            .values()
            .filter(|s| s.fallback.is_some())
            .map(|s| s.id)
            .collect();
        self.pump_again.clear();
        for sid in fallback_subs {
            self.pump_fallback(sid);
        }
        self.flush_relays();
    }

    /// When the engine next needs [`Engine::on_tick`]; `None`: not until another event.
    pub fn next_deadline(&self) -> Option<Instant> {
        let handshake = self
            .hello_deadlines
            .iter()
            .find(|&&(_, conn)| self.awaiting_hello(conn))
            .map(|&(deadline, _)| deadline);
        let backlog = self
            .publishers
            .values()
            .any(|p| !p.backlog.is_empty())
            .then(|| self.now + BACKLOG_RETRY);
        let stall = if self.needs_stall_checks() {
            Some(
                self.next_stall_check
                    .unwrap_or(self.now + STALL_CHECK_EVERY),
            )
        } else {
            None
        };
        let relay = (!self.pump_again.is_empty()).then_some(self.now);
        [handshake, backlog, stall, relay]
            .into_iter()
            .flatten()
            .min()
    }

    fn awaiting_hello(&self, conn: ConnId) -> bool {
        self.clients
            .get(&conn)
            .is_some_and(|c| matches!(c.phase, Phase::AwaitingHello { .. }))
    }

    /// Pops entries of clients that said HELLO or left from the front of `hello_deadlines`.
    fn drop_stale_hello_deadlines(&mut self) {
        while let Some(&(_, conn)) = self.hello_deadlines.front() {
            if self.awaiting_hello(conn) {
                break;
            }
            self.hello_deadlines.pop_front();
        }
    }

    fn needs_stall_checks(&self) -> bool {
        self.topics.values().any(|t| {
            t.mode == Mode::Reliable && !t.publishers.is_empty() && !t.subscribers.is_empty()
        })
    }

    /// Starts a graceful shutdown: SHUTDOWN to every client, then Close each.
    pub fn begin_shutdown(&mut self, message: &str) {
        let conns: Vec<ConnId> = self.clients.keys().copied().collect();
        for conn in conns {
            self.send(
                conn,
                0,
                Msg::Shutdown(Shutdown {
                    reason: ShutdownReason::Requested,
                    message: clip(message),
                }),
                Vec::new(),
            );
            self.forget_client(conn, PeerGoneReason::Disconnected);
            self.out.push_back(Out::Close { conn });
        }
    }

    /// One datagram arrived on `conn`, with the fds that came with it (already `OwnedFd`s).
    /// Client requests never carry fds in protocol version 1: any that came are closed.
    pub fn on_frame(&mut self, conn: ConnId, datagram: &[u8], fds: &mut FdBatch, now: Instant) {
        self.now = now;
        let got_fds = fds.len();
        fds.clear();
        if !self.clients.contains_key(&conn) {
            return;
        }
        let frame = match Frame::decode(datagram) {
            Ok(f) => f,
            Err(e) => return self.bad_frame(conn, datagram, e),
        };
        if got_fds != 0 || frame.fd_count() != 0 {
            let msg = format!(
                "{} arrived with {got_fds} fds attached (header says {}); clients send no fds \
                 in protocol version {PROTOCOL_VERSION}; they were closed",
                frame.msg_type(),
                frame.fd_count()
            );
            return self.send_error(conn, frame.request_id, ErrorCode::BadFds, &msg);
        }
        let phase = self.clients[&conn].phase;
        if let (Phase::AwaitingHello { .. }, m) = (phase, &frame.msg)
            && !matches!(m, Msg::Hello(_))
        {
            let msg = format!(
                "{} before HELLO; the first frame on a connection must be HELLO",
                frame.msg_type()
            );
            self.send_error(conn, frame.request_id, ErrorCode::HandshakeRequired, &msg);
            self.close(conn);
            return;
        }
        let rid = frame.request_id;
        let result = match frame.msg {
            Msg::Hello(h) => self.hello(conn, rid, h),
            Msg::Ping { token } => {
                self.send(conn, rid, Msg::Pong { token }, Vec::new());
                Ok(())
            }
            Msg::CreatePublisher(req) => self.create_publisher(conn, rid, req),
            Msg::PublisherReady { publisher_id } => self.publisher_ready(conn, rid, publisher_id),
            Msg::ClosePublisher { publisher_id } => self.close_publisher(conn, rid, publisher_id),
            Msg::Subscribe(req) => self.subscribe(conn, rid, req),
            Msg::SubscriberReady { subscriber_id } => {
                self.subscriber_ready(conn, rid, subscriber_id)
            }
            Msg::Unsubscribe { subscriber_id } => self.unsubscribe(conn, rid, subscriber_id),
            Msg::Publish(p) => self.publish(conn, p.publisher_id, p.payload),
            Msg::RingReleased {
                subscriber_id,
                publisher_id,
            } => self.ring_released(conn, subscriber_id, publisher_id),
            Msg::StatsRequest => {
                self.stats(conn, rid);
                Ok(())
            }
            Msg::Pong { .. } => Ok(()),
            other @ (Msg::Welcome(_)
            | Msg::Error(_)
            | Msg::Ok
            | Msg::Shutdown(_)
            | Msg::RingGranted(_)
            | Msg::CursorGranted(_)
            | Msg::Subscribed(_)
            | Msg::PeerGone(_)
            | Msg::Evicted(_)
            | Msg::Deliver(_)
            | Msg::Skipped(_)
            | Msg::StatsReply(_)) => Err(reject(
                ErrorCode::InvalidRequest,
                format!("{} is sent by the broker, not to it", other.msg_type()),
            )),
        };
        if let Err(r) = result
            && self.clients.contains_key(&conn)
        {
            self.send_error(conn, rid, r.code, &r.message);
        }
    }

    fn bad_frame(&mut self, conn: ConnId, datagram: &[u8], e: DecodeError) {
        let rid = Header::parse(datagram).map(|h| h.request_id).unwrap_or(0);
        let code = match e {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::TooManyFds { .. } | DecodeError::FdCountMismatch { .. } => {
                ErrorCode::BadFds
            }
            _ => ErrorCode::BadFrame,
        };
        let msg = format!("{e}; see docs/protocol.md for the frame format");
        self.send_error(conn, rid, code, &msg);
        if e.breaks_framing() {
            self.close(conn);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Requests
    // -----------------------------------------------------------------------------------------

    fn hello(
        &mut self,
        conn: ConnId,
        rid: u64,
        h: bus_core::frame::Hello<'_>,
    ) -> Result<(), Reject> {
        if h.protocol_version != u16::from(PROTOCOL_VERSION) {
            let msg = format!(
                "client speaks protocol version {}, this broker speaks {PROTOCOL_VERSION}; use a \
                 client and broker from the same membus release",
                h.protocol_version
            );
            self.send_error(conn, rid, ErrorCode::UnsupportedVersion, &msg);
            self.close(conn);
            return Ok(());
        }
        let c = self.clients.get_mut(&conn).expect("checked by on_frame");
        if c.phase == Phase::Ready {
            self.send_error(
                conn,
                rid,
                ErrorCode::HandshakeRequired,
                "HELLO was already sent on this connection; send it once, first",
            );
            self.close(conn);
            return Ok(());
        }
        c.phase = Phase::Ready;
        self.drop_stale_hello_deadlines();
        let c = self.clients.get_mut(&conn).expect("checked by on_frame");
        c.name = h.client_name.to_owned();
        c.transport = h.transport;
        tracing::debug!(conn, pid = c.creds.pid, uid = c.creds.uid, name = %c.name, "hello");
        let version = concat!("bus-broker ", env!("CARGO_PKG_VERSION"));
        let welcome = Welcome {
            protocol_version: u16::from(PROTOCOL_VERSION),
            client_id: conn,
            max_frame_bytes: MAX_FRAME_BYTES as u32,
            max_fallback_message_bytes: MAX_FALLBACK_MESSAGE_BYTES as u32,
            default_ring_bytes: self.limits.default_ring_bytes,
            max_ring_bytes: self.limits.max_ring_bytes,
            max_topic_bytes: MAX_TOPIC_BYTES as u16,
            broker_version: version,
        };
        self.send(conn, rid, Msg::Welcome(welcome), Vec::new());
        Ok(())
    }

    fn authorize(&self, conn: ConnId, op: Op, topic: &str) -> Result<(), Reject> {
        let c = &self.clients[&conn];
        self.policy
            .check(op, topic, c.creds.uid, &c.gids)
            .map_err(|d| {
                let code = match d.reason {
                    crate::policy::DenyReason::BadTopic(_) => ErrorCode::BadTopic,
                    _ => ErrorCode::NotAllowed,
                };
                reject(code, d.to_string())
            })
    }

    /// Finds or creates a topic, checking the request against its settings.
    fn topic_for(
        &mut self,
        name: &str,
        mode: ModeRequest,
        ring_bytes: u64,
        max_message_bytes: u32,
    ) -> Result<u64, Reject> {
        if let Some(&id) = self.topic_by_name.get(name) {
            let t = &self.topics[&id];
            if let Some(m) = mode_of(mode)
                && m != t.mode
            {
                return Err(reject(
                    ErrorCode::TopicConflict,
                    format!(
                        "topic '{name}' is {}, the request asks for {}; ask for mode any, or use \
                         another topic",
                        mode_name(t.mode),
                        mode_name(m)
                    ),
                ));
            }
            if !t.geometry_fixed && (ring_bytes != 0 || max_message_bytes != 0) {
                // The first publisher fixes the size of a topic a subscriber made.
                let (ring, max) = self.geometry(ring_bytes, max_message_bytes)?;
                let t = self.topics.get_mut(&id).expect("exists");
                (t.ring_bytes, t.max_message_bytes, t.geometry_fixed) = (ring, max, true);
                return Ok(id);
            }
            if ring_bytes != 0 && ring_size_for(ring_bytes) != Some(t.ring_bytes) {
                return Err(reject(
                    ErrorCode::TopicConflict,
                    format!(
                        "topic '{name}' has {} ring bytes, the request asks for {ring_bytes}; ask \
                         for 0 (the topic's size)",
                        t.ring_bytes
                    ),
                ));
            }
            if max_message_bytes > t.max_message_bytes {
                return Err(reject(
                    ErrorCode::TopicConflict,
                    format!(
                        "topic '{name}' carries messages of at most {} bytes, the request asks \
                         for {max_message_bytes}",
                        t.max_message_bytes
                    ),
                ));
            }
            return Ok(id);
        }
        if self.topics.len() >= self.limits.max_topics as usize {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "the broker has {} topics, its limit (limits.max_topics)",
                    self.limits.max_topics
                ),
            ));
        }
        let (ring, max) = self.geometry(ring_bytes, max_message_bytes)?;
        let id = self.alloc_id();
        let stall = self.limits.stall_timeout_ms;
        self.insert_topic(Topic {
            id,
            name: name.to_owned(),
            mode: mode_of(mode).unwrap_or(Mode::Reliable),
            ring_bytes: ring,
            max_message_bytes: max,
            stall_timeout: Duration::from_millis(stall.into()),
            declared: false,
            geometry_fixed: ring_bytes != 0 || max_message_bytes != 0,
            slots: FREE_SLOTS,
            publishers: Vec::new(),
            subscribers: Vec::new(),
            evictions: 0,
        });
        tracing::info!(topic = name, ring, "topic created");
        Ok(id)
    }

    /// Ring size and message limit for a request (0 = defaults), checked against the limits.
    fn geometry(&self, ring_bytes: u64, max_message_bytes: u32) -> Result<(u64, u32), Reject> {
        let ring = if ring_bytes == 0 {
            Some(self.limits.default_ring_bytes)
        } else {
            ring_size_for(ring_bytes)
        };
        let Some(ring) = ring.filter(|&r| r <= self.limits.max_ring_bytes) else {
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "a ring of {ring_bytes} bytes exceeds the broker's limit of {} bytes \
                     (limits.max_ring_bytes); ask for at most that, or 0 for the default",
                    self.limits.max_ring_bytes
                ),
            ));
        };
        let fit = max_message_bytes_for(ring as usize) as u32;
        if max_message_bytes > fit {
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "messages of {max_message_bytes} bytes need a ring of at least {} bytes; ask \
                     for a larger ring",
                    (u64::from(max_message_bytes) * 2 + 64).next_power_of_two()
                ),
            ));
        }
        Ok((
            ring,
            if max_message_bytes == 0 {
                fit
            } else {
                max_message_bytes
            },
        ))
    }

    fn ring_config(&self, p: &Publisher) -> RingConfig {
        let t = &self.topics[&p.topic];
        RingConfig {
            mode: t.mode,
            data_bytes: t.ring_bytes,
            max_message_bytes: t.max_message_bytes,
            publisher_id: p.id,
        }
    }

    fn create_publisher(
        &mut self,
        conn: ConnId,
        rid: u64,
        req: CreatePublisher<'_>,
    ) -> Result<(), Reject> {
        self.authorize(conn, Op::Publish, req.topic)?;
        if self.clients[&conn].transport == Transport::Datagram && req.transport == Transport::Shm {
            return Err(reject(
                ErrorCode::InvalidRequest,
                "this connection said HELLO with datagram transport: it cannot receive a ring; \
                 ask for a datagram publisher",
            ));
        }
        let tid = self.topic_for(
            req.topic,
            req.mode,
            req.ring_data_bytes,
            req.max_message_bytes,
        )?;
        let result = self.create_publisher_on(conn, rid, &req, tid);
        if result.is_err() {
            // No error path leaves a topic behind that nobody is on.
            self.maybe_drop_topic(tid);
        }
        result
    }

    /// Picks a publisher slot of `tid`: a free one, else one whose old ring's readers have
    /// held it past the topic's stall limit (they are evicted: a subscriber that neither
    /// drains a departed publisher's ring nor lets go of it must not lock publishers out).
    fn claim_slot(&mut self, tid: u64, limit: usize) -> Result<usize, Reject> {
        for i in 0..limit {
            self.refresh_draining(tid, i);
        }
        let t = &self.topics[&tid];
        if let Some(i) = t.slots[..limit]
            .iter()
            .position(|s| matches!(s, Slot::Free))
        {
            return Ok(i);
        }
        let now = self.now;
        // A slot is taken from its holders only if none of them moved on the old ring for the
        // whole stall limit: an honest subscriber still draining it is never evicted.
        let stale = t.slots[..limit].iter().position(|s| match s {
            Slot::Draining(d) => d
                .holders
                .iter()
                .all(|h| now.duration_since(h.since) >= t.stall_timeout),
            _ => false,
        });
        let (name, stall) = (t.name.clone(), t.stall_timeout);
        let Some(i) = stale else {
            let draining = t.slots[..limit]
                .iter()
                .filter(|s| matches!(s, Slot::Draining(_)))
                .count();
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "topic '{name}' has {limit} publishers, the limit \
                     (limits.max_publishers_per_topic){}",
                    if draining > 0 {
                        format!(
                            "; {draining} of the slots belong to publishers that left and are \
                             freed once their subscribers have read what they left (at most \
                             {} ms); try again then",
                            stall.as_millis()
                        )
                    } else {
                        String::new()
                    }
                ),
            ));
        };
        if let Slot::Draining(d) = &self.topics[&tid].slots[i] {
            let why = format!(
                "you made no progress on (and did not release) the ring of a publisher that \
                 left for {} ms, and a new publisher needs its slot; read faster or use a \
                 larger stall limit",
                stall.as_millis()
            );
            let holders: Vec<u64> = d.holders.iter().map(|h| h.sid).collect();
            self.keep_topic = Some(tid);
            for sid in holders {
                self.evict(sid, tid, &why);
            }
            self.keep_topic = None;
        }
        let t = self.topics.get_mut(&tid).expect("kept");
        t.slots[i] = Slot::Free;
        Ok(i)
    }

    /// Looks at the holders of draining slot `i` of `tid`: one whose cursor passed its
    /// furthest record boundary of the old ring made progress; one whose cursor reads
    /// "detached" after it was seen attached let go. A slot with no holder left is free.
    fn refresh_draining(&mut self, tid: u64, i: usize) {
        let now = self.now;
        let Some(t) = self.topics.get_mut(&tid) else {
            return;
        };
        let Slot::Draining(d) = &mut t.slots[i] else {
            return;
        };
        let subscribers = &self.subscribers;
        let (monitor, end) = (&d.monitor, d.end);
        d.holders.retain_mut(|h| {
            let Some(view) = subscribers.get(&h.sid).and_then(|s| s.view.as_ref()) else {
                return false;
            };
            let raw = view.read_pos(i);
            if raw == CURSOR_DETACHED {
                return !h.attached;
            }
            h.attached = true;
            let real = raw <= end
                && (raw == end || monitor.as_ref().is_some_and(|m| m.committed_record_at(raw)));
            if real && raw > h.high_water {
                h.high_water = raw;
                h.since = now;
            }
            true
        });
        if d.holders.is_empty() {
            t.slots[i] = Slot::Free;
        }
    }

    fn create_publisher_on(
        &mut self,
        conn: ConnId,
        rid: u64,
        req: &CreatePublisher<'_>,
        tid: u64,
    ) -> Result<(), Reject> {
        let limit =
            (self.limits.max_publishers_per_topic as usize).min(bus_core::layout::CURSOR_SLOTS);
        self.check_fds(conn, 1)?;
        let slot = self.claim_slot(tid, limit)?;
        let topic = &self.topics[&tid];
        let (ring_bytes, mode, max_msg) = (topic.ring_bytes, topic.mode, topic.max_message_bytes);
        let pid = self.alloc_id();
        let name = memfd_name(req.topic, format_args!("p{pid}"));
        let ring_fd = create_ring(&name, ring_bytes as usize)
            .map_err(|e| segment_error("ring", &e, out_of_fds(&e)))?;
        let mut p = Publisher {
            id: pid,
            topic: tid,
            conn,
            slot: slot as u16,
            transport: req.transport,
            life: Life::Pending,
            ring_fd: Arc::new(ring_fd),
            monitor: None,
            writer: None,
            backlog: VecDeque::new(),
            refused: 0,
            live_seq: 0,
            closing: None,
            released: BTreeSet::new(),
            fds: 1,
        };
        let grant = RingGranted {
            role: if req.transport == Transport::Shm {
                RingRole::Writer
            } else {
                RingRole::Fallback
            },
            mode,
            slot: slot as u16,
            // A datagram publisher is told what a PUBLISH may really carry.
            max_message_bytes: if req.transport == Transport::Shm {
                max_msg
            } else {
                max_msg.min(MAX_FALLBACK_MESSAGE_BYTES as u32)
            },
            topic_id: tid,
            publisher_id: pid,
            subscriber_id: 0,
            data_bytes: ring_bytes,
        };
        if req.transport == Transport::Datagram {
            // The broker is this ring's writer.
            let cfg = RingConfig {
                mode,
                data_bytes: ring_bytes,
                max_message_bytes: max_msg,
                publisher_id: pid,
            };
            let writer = map_ring(&*p.ring_fd, ring_bytes as usize, Access::ReadWrite)
                .map_err(|e| e.to_string())
                .and_then(|m| Writer::create(m, cfg).map_err(|e| e.to_string()))
                .map_err(|e| {
                    reject(
                        ErrorCode::Internal,
                        format!("cannot set up the relay ring: {e}"),
                    )
                })?;
            p.writer = Some(writer);
        }
        let topic = self.topics.get_mut(&tid).expect("exists");
        topic.slots[slot] = Slot::Used(pid);
        topic.publishers.push(pid);
        // A ring of this size exists now: the topic's geometry can no longer change (it did
        // when the first publisher asked for the default and a later one for a size, and the
        // first ring's readers were then granted the wrong size).
        topic.geometry_fixed = true;
        self.clients
            .get_mut(&conn)
            .expect("exists")
            .publishers
            .push(pid);
        let fds = if req.transport == Transport::Shm {
            vec![p.ring_fd.clone()]
        } else {
            Vec::new()
        };
        self.publishers.insert(pid, p);
        self.charge_fds(conn, 1);
        self.send(conn, rid, Msg::RingGranted(grant), fds);
        if req.transport == Transport::Datagram
            && let Err(r) = self.make_publisher_live(pid, None)
        {
            self.remove_publisher(pid, PeerGoneReason::ProtocolError);
            return Err(r);
        }
        Ok(())
    }

    fn own_publisher(&self, conn: ConnId, pid: u64) -> Result<(), Reject> {
        match self.publishers.get(&pid) {
            Some(p) if p.conn == conn => Ok(()),
            _ => Err(reject(
                ErrorCode::NoSuchId,
                format!("no publisher {pid} on this connection"),
            )),
        }
    }

    fn publisher_ready(&mut self, conn: ConnId, rid: u64, pid: u64) -> Result<(), Reject> {
        self.own_publisher(conn, pid)?;
        if self.publishers[&pid].life == Life::Live {
            return Err(reject(
                ErrorCode::InvalidRequest,
                format!("publisher {pid} is already ready"),
            ));
        }
        if let Err(r) = self.make_publisher_live(pid, Some((conn, rid))) {
            // The ring is unusable (bad header): the publisher is dropped.
            self.remove_publisher(pid, PeerGoneReason::ProtocolError);
            return Err(r);
        }
        Ok(())
    }

    /// Seals the ring, checks its header, acknowledges (`ack`: the request to answer OK), and
    /// introduces the publisher to every live subscriber: the reply comes before the events.
    fn make_publisher_live(&mut self, pid: u64, ack: Option<(ConnId, u64)>) -> Result<(), Reject> {
        let p = &self.publishers[&pid];
        let cfg = self.ring_config(p);
        let fd = p.ring_fd.clone();
        seal_read_only(&*fd)
            .map_err(|e| reject(ErrorCode::BadSegment, format!("cannot seal the ring: {e}")))?;
        let monitor = map_ring(&*fd, cfg.data_bytes as usize, Access::ReadOnly)
            .map_err(|e| e.to_string())
            .and_then(|m| Reader::attach(m, cfg, None, StartAt::Next).map_err(|e| e.to_string()))
            .map_err(|e| {
                reject(
                    ErrorCode::BadSegment,
                    format!(
                        "the ring's header is not what was granted ({e}); initialise it with \
                             bus_core::ring::Writer::create before PUBLISHER_READY"
                    ),
                )
            })?;
        self.live_clock += 1;
        let p = self.publishers.get_mut(&pid).expect("exists");
        p.monitor = Some(monitor);
        p.life = Life::Live;
        p.live_seq = self.live_clock;
        let topic = p.topic;
        let subs: Vec<u64> = self.topics[&topic]
            .subscribers
            .iter()
            .copied()
            .filter(|s| self.subscribers[s].life == Life::Live)
            .collect();
        // The publisher learns of every existing subscriber before its READY is acknowledged:
        // its client applies those grants before it can publish, so no subscriber is lapped.
        for &sid in &subs {
            self.connect_pair(pid, sid, Half::Cursor);
        }
        if let Some((conn, rid)) = ack {
            self.send(conn, rid, Msg::Ok, Vec::new());
        }
        for sid in subs {
            self.connect_pair(pid, sid, Half::Ring);
        }
        tracing::info!(publisher = pid, topic = %self.topics[&topic].name, "publisher live");
        Ok(())
    }

    /// Introduces a live publisher and a live subscriber: the publisher gets the cursor page
    /// first, then the subscriber gets the ring.
    fn connect_pair(&mut self, pid: u64, sid: u64, half: Half) {
        let p = &self.publishers[&pid];
        let s = &self.subscribers[&sid];
        let cfg = self.ring_config(p);
        let (pconn, slot, topic) = (p.conn, p.slot, p.topic);
        let (sconn, delivery) = (s.conn, s.delivery);
        // Everything in a ring whose publisher arrived after the subscriber was published after
        // the subscription: read it from the start.
        let from_start = p.live_seq > s.live_seq;
        let (cursor_fd, wake_tx, ring_fd) =
            (s.cursor_fd.clone(), s.wake_tx.clone(), p.ring_fd.clone());

        // An introduction is a fresh start: whatever was released before does not carry over.
        if let Some(p) = self.publishers.get_mut(&pid) {
            p.released.remove(&sid);
        }
        if cfg.mode == Mode::Reliable && self.next_stall_check.is_none() {
            self.next_stall_check = Some(self.now + STALL_CHECK_EVERY);
        }

        // 1. The publisher starts watching the subscriber's cursor page.
        if half == Half::Ring {
            // done earlier
        } else if self.publishers[&pid].writer.is_some() {
            let view = map_cursor_page(&*cursor_fd, Access::ReadOnly)
                .map_err(|e| e.to_string())
                .and_then(|m| CursorView::attach(m, sid).map_err(|e| e.to_string()));
            // The broker's own relay (a datagram subscriber) is pumped directly after each
            // PUBLISH (`pump_relays`): it needs no wake datagram from the broker to itself. A
            // shared-memory subscriber is woken through the broker's own copy of its wake
            // socket: no descriptor per (relay, subscriber) pair.
            let wake = (delivery != Transport::Datagram).then(|| WakeSender::from_shared(wake_tx));
            match view {
                Ok(view) => {
                    let w = self
                        .publishers
                        .get_mut(&pid)
                        .and_then(|p| p.writer.as_mut())
                        .expect("relay");
                    let added = if from_start {
                        w.add_reader_from_start(view, slot as usize, wake)
                    } else {
                        w.add_reader(view, slot as usize, wake)
                    };
                    // Config validation bounds subscribers per topic by the readers a writer
                    // tracks, so this is a broker bug: loud, not silent.
                    if let Err(e) = added {
                        tracing::error!(
                            publisher = pid, subscriber = sid, %e,
                            "relay cannot track subscriber: its reliable delivery is not guaranteed"
                        );
                    }
                }
                Err(e) => tracing::warn!(subscriber = sid, %e, "cursor page unusable"),
            }
        } else {
            let grant = CursorGranted {
                topic_id: topic,
                publisher_id: pid,
                subscriber_id: sid,
                slot,
            };
            self.send(
                pconn,
                0,
                Msg::CursorGranted(grant),
                vec![cursor_fd, wake_tx],
            );
        }

        // 2. The subscriber gets the ring.
        if half == Half::Cursor {
            // later
        } else if delivery == Transport::Datagram {
            let attach = map_ring(&*ring_fd, cfg.data_bytes as usize, Access::ReadOnly)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    let fb = self.subscribers[&sid]
                        .fallback
                        .as_ref()
                        .expect("datagram subscriber");
                    let start = if from_start {
                        StartAt::Beginning
                    } else {
                        StartAt::Next
                    };
                    Reader::attach(m, cfg, Some((fb.page.clone(), slot as usize)), start)
                        .map_err(|e| e.to_string())
                });
            match attach {
                Ok(reader) => {
                    let fb = self
                        .subscribers
                        .get_mut(&sid)
                        .and_then(|s| s.fallback.as_mut())
                        .expect("datagram");
                    fb.readers.insert(reader);
                }
                Err(e) => {
                    tracing::warn!(publisher = pid, subscriber = sid, %e, "relay cannot read ring")
                }
            }
        } else {
            let grant = RingGranted {
                role: if from_start {
                    RingRole::ReaderFromStart
                } else {
                    RingRole::Reader
                },
                mode: cfg.mode,
                slot,
                max_message_bytes: cfg.max_message_bytes,
                topic_id: topic,
                publisher_id: pid,
                subscriber_id: sid,
                data_bytes: cfg.data_bytes,
            };
            self.send(sconn, 0, Msg::RingGranted(grant), vec![ring_fd]);
        }
    }

    fn close_publisher(&mut self, conn: ConnId, rid: u64, pid: u64) -> Result<(), Reject> {
        self.own_publisher(conn, pid)?;
        if self.publishers[&pid].closing.is_some() {
            return Err(reject(
                ErrorCode::InvalidRequest,
                format!(
                    "publisher {pid} is already closing; its OK comes once its backlog is written"
                ),
            ));
        }
        // OK means every message accepted from it is in its ring (docs/protocol.md, "Datagram
        // fallback"): with a backlog, the answer waits for the backlog to drain.
        if !self.close_after_backlog(pid, Some((conn, rid)), PeerGoneReason::Closed) {
            self.remove_publisher(pid, PeerGoneReason::Closed);
            self.send(conn, rid, Msg::Ok, Vec::new());
        }
        Ok(())
    }

    /// A datagram publisher with messages still waiting for ring space is not removed yet: it
    /// is marked closing, and [`Engine::flush_backlog`] removes it (and answers `reply`) once
    /// they are written. Returns false if there is nothing to wait for.
    fn close_after_backlog(
        &mut self,
        pid: u64,
        reply: Option<(ConnId, u64)>,
        reason: PeerGoneReason,
    ) -> bool {
        let Some(p) = self.publishers.get_mut(&pid) else {
            return false;
        };
        if p.backlog.is_empty() || p.writer.is_none() {
            return false;
        }
        tracing::debug!(
            publisher = pid,
            backlog = p.backlog.len(),
            "publisher closed: writing its backlog first"
        );
        p.closing = Some(Closing { reply, reason });
        true
    }

    fn remove_publisher(&mut self, pid: u64, reason: PeerGoneReason) {
        let Some(mut p) = self.publishers.remove(&pid) else {
            return;
        };
        if let Some(w) = p.writer.take() {
            // Datagram publisher: its ring is drained by subscribers like any other.
            w.close();
        }
        self.refund_fds(p.conn, p.fds);
        if let Some(c) = self.clients.get_mut(&p.conn) {
            c.publishers.retain(|&x| x != pid);
        }
        // Its backlog went with it: reading its connection may resume.
        self.maybe_resume_reads(p.conn);
        let Some(t) = self.topics.get_mut(&p.topic) else {
            return;
        };
        t.publishers.retain(|&x| x != pid);
        let topic = t.id;
        let subs = t.subscribers.clone();
        // Subscribers that read its ring keep their cursor for this slot until they are done
        // with it (reliable topics: a new writer in the slot would take that cursor for its
        // own). Lossy writers never read cursors, so the slot is free at once.
        let now = self.now;
        let slot = p.slot as usize;
        debug_assert!(
            matches!(t.slots[slot], Slot::Used(holder) if holder == pid),
            "publisher {pid} did not hold its slot {slot}"
        );
        let holders: Vec<Holder> = if p.life == Life::Live && t.mode == Mode::Reliable {
            subs.iter()
                .filter(|sid| !p.released.contains(sid))
                .filter_map(|&sid| {
                    let s = self.subscribers.get(&sid)?;
                    let raw = s.view.as_ref()?.read_pos(slot);
                    let attached = raw != CURSOR_DETACHED;
                    (s.life == Life::Live).then_some(Holder {
                        sid,
                        high_water: if attached { raw } else { 0 },
                        attached,
                        since: now,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let t = self.topics.get_mut(&p.topic).expect("exists");
        t.slots[slot] = if holders.is_empty() {
            Slot::Free
        } else {
            let end = p.monitor.as_ref().map_or(0, |m| m.writer_progress().0);
            Slot::Draining(Box::new(Draining {
                publisher: pid,
                monitor: p.monitor.take(),
                end,
                holders,
            }))
        };
        for sid in &subs {
            if let Some(s) = self.subscribers.get_mut(sid) {
                s.stall.remove(&pid);
            }
        }
        if p.life == Life::Live {
            for sid in subs {
                let Some(s) = self.subscribers.get(&sid) else {
                    continue;
                };
                if s.life != Life::Live {
                    continue;
                }
                if s.delivery == Transport::Shm {
                    let gone = PeerGone {
                        topic_id: topic,
                        peer: PeerKind::Publisher,
                        peer_id: pid,
                        reason,
                    };
                    let conn = s.conn;
                    self.send(conn, 0, Msg::PeerGone(gone), Vec::new());
                } else if let Some(fb) = self
                    .subscribers
                    .get_mut(&sid)
                    .and_then(|s| s.fallback.as_mut())
                {
                    // Datagram subscribers read what the publisher left, then drop the ring.
                    fb.gone.push(pid);
                    self.pump_fallback(sid);
                }
            }
        }
        self.maybe_drop_topic(topic);
    }

    fn maybe_drop_topic(&mut self, tid: u64) {
        if self.keep_topic == Some(tid) {
            return;
        }
        let Some(t) = self.topics.get(&tid) else {
            return;
        };
        if !t.declared && t.publishers.is_empty() && t.subscribers.is_empty() {
            let t = self.topics.remove(&tid).expect("exists");
            self.topic_by_name.remove(&t.name);
            tracing::info!(topic = %t.name, "topic removed (no publishers or subscribers left)");
        }
    }

    fn subscribe(&mut self, conn: ConnId, rid: u64, req: Subscribe<'_>) -> Result<(), Reject> {
        self.authorize(conn, Op::Subscribe, req.topic)?;
        if self.clients[&conn].transport == Transport::Datagram && req.delivery == Transport::Shm {
            return Err(reject(
                ErrorCode::InvalidRequest,
                "this connection said HELLO with datagram transport: ask for datagram delivery",
            ));
        }
        let tid = self.topic_for(req.topic, req.mode, 0, 0)?;
        let result = self.subscribe_on(conn, rid, &req, tid);
        if result.is_err() {
            self.maybe_drop_topic(tid);
        }
        result
    }

    fn subscribe_on(
        &mut self,
        conn: ConnId,
        rid: u64,
        req: &Subscribe<'_>,
        tid: u64,
    ) -> Result<(), Reject> {
        self.check_fds(conn, subscriber_fds(req.delivery))?;
        let topic = &self.topics[&tid];
        if topic.subscribers.len() >= self.limits.max_subscribers_per_topic as usize {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "topic '{}' has {} subscribers, the limit (limits.max_subscribers_per_topic)",
                    req.topic, self.limits.max_subscribers_per_topic
                ),
            ));
        }
        let mode = topic.mode;
        let sid = self.alloc_id();
        let internal = |e: String| reject(ErrorCode::Internal, e);
        let cursor_fd = create_cursor_page(&memfd_name(req.topic, format_args!("s{sid}")))
            .map_err(|e| segment_error("cursor page", &e, out_of_fds(&e)))?;
        let (tx, rx) =
            bus_core::wake::pair().map_err(|e| segment_error("wake socket", &e, out_of_fds(&e)))?;
        let mut s = Subscriber {
            id: sid,
            topic: tid,
            conn,
            delivery: req.delivery,
            life: Life::Pending,
            cursor_fd: Arc::new(cursor_fd),
            wake_tx: tx.into_shared(),
            view: None,
            fallback: None,
            stall: BTreeMap::new(),
            live_seq: 0,
            fds: subscriber_fds(req.delivery),
        };
        let mut fds = Vec::new();
        if req.delivery == Transport::Datagram {
            // The broker is this cursor page's writer.
            let page = map_cursor_page(&*s.cursor_fd, Access::ReadWrite)
                .map_err(|e| e.to_string())
                .and_then(|m| CursorPage::init(m, sid).map_err(|e| e.to_string()))
                .map_err(|e| internal(format!("cannot set up the relay cursor page: {e}")))?;
            let token = self.alloc_id();
            let rx_fd: OwnedFd = rx.into();
            let rx_dup = rustix::io::fcntl_dupfd_cloexec(&rx_fd, 0).map_err(|e| {
                let out = matches!(e, rustix::io::Errno::MFILE | rustix::io::Errno::NFILE);
                segment_error("wake socket copy", e, out)
            })?;
            let wake = WakeReceiver::from_fd(rx_fd).map_err(|e| internal(e.to_string()))?;
            self.tokens.insert(token, sid);
            self.out.push_back(Out::Watch {
                token,
                fd: Arc::new(rx_dup),
            });
            s.fallback = Some(Fallback {
                page: Arc::new(page),
                readers: ReaderSet::new(),
                wake,
                token,
                delivered: 0,
                lost: 0,
                removed: Vec::new(),
                gone: Vec::new(),
                next_seq: NextSeq::default(),
            });
        } else {
            fds = vec![s.cursor_fd.clone(), Arc::new(rx.into())];
        }
        self.topics
            .get_mut(&tid)
            .expect("exists")
            .subscribers
            .push(sid);
        self.clients
            .get_mut(&conn)
            .expect("exists")
            .subscribers
            .push(sid);
        let own = s.fds;
        self.subscribers.insert(sid, s);
        self.charge_fds(conn, own);
        let reply = Subscribed {
            subscriber_id: sid,
            topic_id: tid,
            mode,
            delivery: req.delivery,
        };
        self.send(conn, rid, Msg::Subscribed(reply), fds);
        if req.delivery == Transport::Datagram
            && let Err(r) = self.make_subscriber_live(sid, None)
        {
            self.remove_subscriber(sid, PeerGoneReason::ProtocolError);
            return Err(r);
        }
        Ok(())
    }

    fn own_subscriber(&self, conn: ConnId, sid: u64) -> Result<(), Reject> {
        match self.subscribers.get(&sid) {
            Some(s) if s.conn == conn => Ok(()),
            _ => Err(reject(
                ErrorCode::NoSuchId,
                format!("no subscriber {sid} on this connection"),
            )),
        }
    }

    fn subscriber_ready(&mut self, conn: ConnId, rid: u64, sid: u64) -> Result<(), Reject> {
        self.own_subscriber(conn, sid)?;
        if self.subscribers[&sid].life == Life::Live {
            return Err(reject(
                ErrorCode::InvalidRequest,
                format!("subscriber {sid} is already ready"),
            ));
        }
        if let Err(r) = self.make_subscriber_live(sid, Some((conn, rid))) {
            self.remove_subscriber(sid, PeerGoneReason::ProtocolError);
            return Err(r);
        }
        Ok(())
    }

    /// Seals the cursor page, checks it, acknowledges, and introduces the subscriber to every
    /// live publisher.
    fn make_subscriber_live(&mut self, sid: u64, ack: Option<(ConnId, u64)>) -> Result<(), Reject> {
        let fd = self.subscribers[&sid].cursor_fd.clone();
        seal_read_only(&*fd).map_err(|e| {
            reject(
                ErrorCode::BadSegment,
                format!("cannot seal the cursor page: {e}"),
            )
        })?;
        let view = map_cursor_page(&*fd, Access::ReadOnly)
            .map_err(|e| e.to_string())
            .and_then(|m| CursorView::attach(m, sid).map_err(|e| e.to_string()))
            .map_err(|e| {
                reject(
                    ErrorCode::BadSegment,
                    format!(
                        "the cursor page is not initialised ({e}); initialise it with \
                             bus_core::ring::CursorPage::init before SUBSCRIBER_READY"
                    ),
                )
            })?;
        if let Some((conn, rid)) = ack {
            self.send(conn, rid, Msg::Ok, Vec::new());
        }
        self.live_clock += 1;
        let s = self.subscribers.get_mut(&sid).expect("exists");
        s.view = Some(view);
        s.life = Life::Live;
        s.live_seq = self.live_clock;
        let topic = s.topic;
        let pubs: Vec<u64> = self.topics[&topic]
            .publishers
            .iter()
            .copied()
            .filter(|p| self.publishers[p].life == Life::Live)
            .collect();
        for pid in pubs {
            self.connect_pair(pid, sid, Half::Both);
        }
        self.pump_fallback(sid);
        tracing::info!(subscriber = sid, topic = %self.topics[&topic].name, "subscriber live");
        Ok(())
    }

    fn unsubscribe(&mut self, conn: ConnId, rid: u64, sid: u64) -> Result<(), Reject> {
        self.own_subscriber(conn, sid)?;
        self.remove_subscriber(sid, PeerGoneReason::Closed);
        self.send(conn, rid, Msg::Ok, Vec::new());
        Ok(())
    }

    fn remove_subscriber(&mut self, sid: u64, reason: PeerGoneReason) {
        let Some(s) = self.subscribers.remove(&sid) else {
            return;
        };
        self.refund_fds(s.conn, s.fds);
        if let Some(fb) = &s.fallback {
            fb.page.close();
            self.tokens.remove(&fb.token);
            self.out.push_back(Out::Unwatch { token: fb.token });
        }
        if let Some(c) = self.clients.get_mut(&s.conn) {
            c.subscribers.retain(|&x| x != sid);
        }
        let Some(t) = self.topics.get_mut(&s.topic) else {
            return;
        };
        t.subscribers.retain(|&x| x != sid);
        let topic = t.id;
        let pubs = t.publishers.clone();
        self.drop_slot_holder(topic, sid, None);
        if s.life == Life::Live {
            for pid in pubs {
                let Some(p) = self.publishers.get_mut(&pid) else {
                    continue;
                };
                if p.writer.is_some() {
                    self.relay_drop_reader(pid, sid);
                } else if p.life == Life::Live {
                    let conn = p.conn;
                    let gone = PeerGone {
                        topic_id: topic,
                        peer: PeerKind::Subscriber,
                        peer_id: sid,
                        reason,
                    };
                    self.send(conn, 0, Msg::PeerGone(gone), Vec::new());
                }
            }
        }
        self.maybe_drop_topic(topic);
    }

    fn forget_client(&mut self, conn: ConnId, reason: PeerGoneReason) {
        let Some(c) = self.clients.remove(&conn) else {
            return;
        };
        for pid in c.publishers {
            // What a datagram publisher had been told was accepted is still written.
            if !self.close_after_backlog(pid, None, reason) {
                self.remove_publisher(pid, reason);
            }
        }
        for sid in c.subscribers {
            self.remove_subscriber(sid, reason);
        }
        tracing::debug!(conn, pid = c.creds.pid, "client gone");
    }

    // -----------------------------------------------------------------------------------------
    // Datagram fallback relay
    // -----------------------------------------------------------------------------------------

    fn publish(&mut self, conn: ConnId, pid: u64, payload: &[u8]) -> Result<(), Reject> {
        self.own_publisher(conn, pid)?;
        let p = self.publishers.get_mut(&pid).expect("checked");
        if p.closing.is_some() {
            return Err(reject(
                ErrorCode::InvalidRequest,
                format!("publisher {pid} is closing (CLOSE_PUBLISHER was sent); create a new one"),
            ));
        }
        let Some(w) = p.writer.as_mut() else {
            return Err(reject(
                ErrorCode::InvalidRequest,
                format!(
                    "publisher {pid} writes its ring in shared memory; PUBLISH is for datagram publishers"
                ),
            ));
        };
        let topic_max = w.config().max_message_bytes as usize;
        // What a datagram publisher sends must reach datagram subscribers too: nothing larger
        // than a DELIVER can carry is accepted (shared-memory publishers can send more).
        let max = topic_max.min(MAX_FALLBACK_MESSAGE_BYTES);
        if payload.len() > max {
            let why = if max < topic_max {
                format!(
                    "the datagram fallback carries at most {MAX_FALLBACK_MESSAGE_BYTES} bytes per \
                     message (one DELIVER datagram); publish it through shared memory, or split it"
                )
            } else {
                "this topic's maximum (set by its ring size)".to_owned()
            };
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "message of {} bytes exceeds {max} bytes: {why}",
                    payload.len()
                ),
            ));
        }
        let (topic, conn) = (p.topic, p.conn);
        if p.backlog.is_empty() && w.try_publish(payload).is_ok() {
            self.pump_relays(topic);
            return Ok(());
        }
        if p.backlog.len() >= FALLBACK_BACKLOG_LIMIT {
            p.refused += 1;
            return Err(reject(
                ErrorCode::TooSlow,
                format!(
                    "the ring is full and {} messages already wait: a reliable subscriber is not \
                     keeping up; this message was not published, send it again later",
                    p.backlog.len()
                ),
            ));
        }
        p.backlog.push_back(payload.to_vec());
        if p.backlog.len() >= FALLBACK_BACKLOG {
            self.pause_reads(conn);
        }
        Ok(())
    }

    fn pause_reads(&mut self, conn: ConnId) {
        if let Some(c) = self.clients.get_mut(&conn)
            && !c.paused
        {
            c.paused = true;
            tracing::debug!(conn, "datagram publisher backlog full: reads paused");
            self.out.push_back(Out::PauseReads { conn });
        }
    }

    /// Resumes reading `conn` once none of its publishers has a backlog.
    fn maybe_resume_reads(&mut self, conn: ConnId) {
        let Some(c) = self.clients.get(&conn) else {
            return;
        };
        if !c.paused
            || c.publishers.iter().any(|pid| {
                self.publishers
                    .get(pid)
                    .is_some_and(|p| !p.backlog.is_empty())
            })
        {
            return;
        }
        self.clients.get_mut(&conn).expect("exists").paused = false;
        tracing::debug!(conn, "datagram publisher backlog drained: reads resumed");
        self.out.push_back(Out::ResumeReads { conn });
    }

    fn flush_backlog(&mut self, pid: u64) {
        let Some(p) = self.publishers.get_mut(&pid) else {
            return;
        };
        let Some(w) = p.writer.as_mut() else { return };
        let (topic, conn) = (p.topic, p.conn);
        let mut moved = false;
        while let Some(msg) = p.backlog.front() {
            if w.try_publish(msg).is_err() {
                break;
            }
            p.backlog.pop_front();
            moved = true;
        }
        let empty = p.backlog.is_empty();
        let closing = p.closing.filter(|_| empty);
        if moved {
            self.pump_relays(topic);
        }
        if let Some(Closing { reply, reason }) = closing {
            // Everything it had accepted is in the ring: now it goes.
            self.remove_publisher(pid, reason);
            if let Some((conn, rid)) = reply
                && self.clients.contains_key(&conn)
            {
                self.send(conn, rid, Msg::Ok, Vec::new());
            }
        } else if empty {
            self.maybe_resume_reads(conn);
        }
    }

    /// Retries the backlogs of the datagram publishers of `tid` (a relay freed ring space).
    fn flush_topic_backlogs(&mut self, tid: u64) {
        let mut i = 0;
        while let Some(&pid) = self.topics.get(&tid).and_then(|t| t.publishers.get(i)) {
            i += 1;
            if self
                .publishers
                .get(&pid)
                .is_some_and(|p| !p.backlog.is_empty())
            {
                self.flush_backlog(pid);
            }
        }
    }

    /// The broker wrote into a ring of `tid` itself (a datagram publisher): its datagram
    /// subscribers read it at the next [`Engine::flush_relays`], so that a burst of PUBLISHes
    /// read in one go becomes one burst of DELIVERs (the subscriber is woken once, the driver
    /// can send them in one `sendmmsg`). The broker does not wake its own relay through a wake
    /// socket (that was a `sendto`, a poll completion and two `recvfrom` per message).
    fn pump_relays(&mut self, tid: u64) {
        if !self.dirty_relays.contains(&tid) {
            self.dirty_relays.push(tid);
        }
    }

    /// Pumps the datagram subscribers of every topic the broker wrote into since the last
    /// call. The driver calls it after each batch of [`Engine::on_frame`] calls (one readable
    /// connection drained); the other events call it themselves.
    pub fn flush_relays(&mut self) {
        while let Some(tid) = self.dirty_relays.pop() {
            self.pump_relays_now(tid);
        }
    }

    fn pump_relays_now(&mut self, tid: u64) {
        // By index, without cloning the list: pumping never adds or removes subscribers.
        let mut i = 0;
        while let Some(&sid) = self.topics.get(&tid).and_then(|t| t.subscribers.get(i)) {
            i += 1;
            if self
                .subscribers
                .get(&sid)
                .is_some_and(|s| s.fallback.is_some())
            {
                self.pump_fallback(sid);
            }
        }
    }

    /// Moves messages from a datagram subscriber's rings to DELIVER frames, while it has send
    /// credit. When the rings are empty, parks on its wake socket (announce, look again).
    ///
    /// No gap is silent: a message a DELIVER cannot carry (too large), a lossy message
    /// overwritten while copied, and a ring that turned out corrupt each become a SKIPPED
    /// frame naming publisher, sequence number and reason. The work of one call is bounded
    /// ([`RELAY_STEPS`]): a subscriber with more to do is pumped again at the next tick, so a
    /// ring no honest writer could produce can never hold the loop.
    fn pump_fallback(&mut self, sid: u64) {
        enum Step {
            Sent(Vec<u8>),
            Skip(Skipped),
            Corrupt(Skipped),
            Empty,
        }
        for _ in 0..RELAY_STEPS {
            let Some(s) = self.subscribers.get_mut(&sid) else {
                return;
            };
            let conn = s.conn;
            let Some(fb) = s.fallback.as_mut() else {
                return;
            };
            let inflight = self.clients.get(&conn).map_or(u32::MAX, |c| c.inflight);
            if inflight >= DELIVER_CREDIT {
                return;
            }
            fb.readers.remove_finished(&mut fb.removed);
            let readers = &mut fb.readers;
            let removed = &mut fb.removed;
            fb.gone.retain(|&pid| {
                let drained = readers
                    .readers()
                    .iter()
                    .find(|r| r.publisher_id() == pid)
                    .is_none_or(|r| !r.has_pending());
                if drained {
                    readers.remove(pid);
                    removed.push(pid);
                }
                !drained
            });
            if !fb.removed.is_empty() {
                for &pid in &fb.removed {
                    fb.next_seq.forget(pid);
                }
                let done = std::mem::take(&mut fb.removed);
                for &pid in &done {
                    self.release_ring(sid, pid);
                }
                if let Some(fb) = self
                    .subscribers
                    .get_mut(&sid)
                    .and_then(|s| s.fallback.as_mut())
                {
                    fb.removed = done;
                    fb.removed.clear();
                }
                continue;
            }
            let frame = &mut self.scratch;
            let step = match fb.readers.try_recv() {
                Ok(Some(sample)) => {
                    let (publisher_id, seq) = (sample.publisher_id(), sample.seq());
                    fb.next_seq.note(publisher_id, seq + 1);
                    let skipped = |reason| Skipped {
                        subscriber_id: sid,
                        publisher_id,
                        seq,
                        lost_before: sample.lost_before(),
                        len: sample.len() as u32,
                        reason,
                    };
                    if sample.len() > MAX_FALLBACK_MESSAGE_BYTES {
                        Step::Skip(skipped(SkipReason::TooLarge))
                    } else {
                        let d = Deliver {
                            subscriber_id: sid,
                            publisher_id,
                            seq,
                            timestamp_ns: sample.timestamp_ns(),
                            lost_before: sample.lost_before(),
                            payload: &sample,
                        };
                        let ok = Frame {
                            request_id: 0,
                            msg: Msg::Deliver(d),
                        }
                        .encode(frame)
                        .is_ok();
                        // Lossy rings: the copy is only good if the bytes were not overwritten.
                        if ok && sample.is_intact() {
                            let mut owned = self.spare_frames.pop().unwrap_or_default();
                            owned.extend_from_slice(frame);
                            Step::Sent(owned)
                        } else if ok {
                            Step::Skip(skipped(SkipReason::Overwritten))
                        } else {
                            Step::Skip(skipped(SkipReason::TooLarge))
                        }
                    }
                }
                Ok(None) => Step::Empty,
                Err(e) => {
                    tracing::warn!(subscriber = sid, %e, "dropping a corrupt ring");
                    let bus_core::ring::RecvError::Corrupt { publisher_id, .. } = e else {
                        // An error that names no ring: nothing to skip; look again next time.
                        tracing::error!(subscriber = sid, %e, "relay read failed");
                        return;
                    };
                    Step::Corrupt(Skipped {
                        subscriber_id: sid,
                        publisher_id,
                        seq: fb.next_seq.get(publisher_id),
                        lost_before: 0,
                        len: 0,
                        reason: SkipReason::CorruptRing,
                    })
                }
            };
            match step {
                Step::Sent(frame) => {
                    fb.delivered += 1;
                    if let Some(c) = self.clients.get_mut(&conn) {
                        c.inflight += 1;
                    }
                    self.out.push_back(Out::Send {
                        conn,
                        frame,
                        fds: Vec::new(),
                    });
                }
                Step::Skip(skipped) => {
                    fb.lost += 1;
                    self.send(conn, 0, Msg::Skipped(skipped), Vec::new());
                }
                Step::Corrupt(skipped) => {
                    fb.lost += 1;
                    // Its reader goes (the cursor slot reads "detached"), the pair is released.
                    fb.readers.remove(skipped.publisher_id);
                    fb.gone.retain(|&g| g != skipped.publisher_id);
                    self.send(conn, 0, Msg::Skipped(skipped), Vec::new());
                    self.release_ring(sid, skipped.publisher_id);
                }
                Step::Empty => {
                    // Park: announce, then look again before relying on the wake socket.
                    protocol::announce_park(fb.page.park_word());
                    if !fb.readers.has_pending() {
                        return;
                    }
                    protocol::unpark(fb.page.park_word());
                }
            }
        }
        // Out of steps with more to do: the next tick comes at once.
        if !self.pump_again.contains(&sid) {
            self.pump_again.push(sid);
        }
    }

    /// Subscriber `sid` no longer reads publisher `pid`'s ring (RING_RELEASED, or the relay
    /// dropped it). A live publisher stops waiting for it and it is no longer judged on that
    /// ring; a departed publisher's slot is freed once no subscriber holds it.
    fn release_ring(&mut self, sid: u64, pid: u64) {
        let Some(s) = self.subscribers.get(&sid) else {
            return;
        };
        let (tid, sub_live) = (s.topic, s.life == Life::Live);
        if let Some(p) = self.publishers.get_mut(&pid)
            && p.topic == tid
        {
            // Only a ring the subscriber was given can be released: before both sides are
            // live the pair has not been introduced, and a release then would excuse the
            // subscriber from judgement on a ring whose writer is later told to honour it.
            if !sub_live || p.life != Life::Live || !p.released.insert(sid) {
                return;
            }
            if let Some(s) = self.subscribers.get_mut(&sid) {
                s.stall.remove(&pid);
            }
            if p.writer.is_some() {
                self.relay_drop_reader(pid, sid);
            } else if p.life == Life::Live {
                let gone = PeerGone {
                    topic_id: tid,
                    peer: PeerKind::Subscriber,
                    peer_id: sid,
                    reason: PeerGoneReason::Closed,
                };
                let conn = p.conn;
                self.send(conn, 0, Msg::PeerGone(gone), Vec::new());
            }
            return;
        }
        self.drop_slot_holder(tid, sid, Some(pid));
    }

    /// A datagram publisher's relay stops tracking subscriber `sid`.
    fn relay_drop_reader(&mut self, pid: u64, sid: u64) {
        if let Some(w) = self
            .publishers
            .get_mut(&pid)
            .and_then(|p| p.writer.as_mut())
        {
            w.remove_reader(sid);
        }
    }

    /// Removes `sid` from the holders of draining slots of `tid` (of publisher `pid` only, or
    /// of all); a slot nobody holds any more is free.
    fn drop_slot_holder(&mut self, tid: u64, sid: u64, pid: Option<u64>) {
        let Some(t) = self.topics.get_mut(&tid) else {
            return;
        };
        for slot in &mut t.slots {
            if let Slot::Draining(d) = slot
                && pid.is_none_or(|p| p == d.publisher)
            {
                d.holders.retain(|h| h.sid != sid);
                if d.holders.is_empty() {
                    *slot = Slot::Free;
                }
            }
        }
    }

    fn ring_released(&mut self, conn: ConnId, sid: u64, pid: u64) -> Result<(), Reject> {
        self.own_subscriber(conn, sid)?;
        self.release_ring(sid, pid);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Stalled reliable subscribers
    // -----------------------------------------------------------------------------------------

    /// Finds reliable subscribers that hold a publisher back, judged only by what they
    /// control and against what the writer provably needs (docs/security.md):
    ///
    /// * the position that counts is the subscriber's cursor when it is one the writer would
    ///   respect: its own position (`next_pos`) or a committed record there, which the broker
    ///   checks in the ring itself. Any other value (behind the window, ahead of the writer,
    ///   mid-record, or a publisher's inflated `next_pos` that leaves an honest cursor short
    ///   of any record) is a lie of one side and holds nobody back: the honest writer ignores
    ///   it, so it accuses nobody;
    /// * progress is passing the furthest such position seen before; moving back and forth
    ///   below it frees nothing;
    /// * the writer waits only if less than one largest record fits behind that position;
    /// * before judging, the broker wakes the subscriber once (a parked honest subscriber
    ///   whose publisher never woke it then reads).
    ///
    /// A subscriber that existed before the publisher and has not attached to its ring counts
    /// as being at position 0 (it will read from there), until it releases the ring.
    fn check_stalls(&mut self, now: Instant) {
        let mut evict = Vec::new();
        let mut wake = Vec::new();
        let tids: Vec<u64> = self.topics.keys().copied().collect();
        for tid in tids {
            let t = &self.topics[&tid];
            if t.mode != Mode::Reliable {
                continue;
            }
            let max_record = record_bytes(t.max_message_bytes as usize) as u64;
            'subs: for &sid in &t.subscribers {
                let Some(s) = self.subscribers.get_mut(&sid) else {
                    continue;
                };
                let Some(view) = &s.view else { continue };
                for &pid in &t.publishers {
                    let Some(p) = self.publishers.get(&pid) else {
                        continue;
                    };
                    let Some(monitor) = &p.monitor else { continue };
                    if p.released.contains(&sid) {
                        s.stall.remove(&pid);
                        continue;
                    }
                    let (next_pos, _) = monitor.writer_progress();
                    let raw = view.read_pos(p.slot as usize);
                    let entry = s.stall.entry(pid).or_insert(Stall {
                        high_water: 0,
                        since: now,
                        woken: false,
                        attached: false,
                    });
                    let pos = if raw == CURSOR_DETACHED {
                        if p.live_seq > s.live_seq && !entry.attached {
                            0
                        } else {
                            entry.since = now;
                            continue;
                        }
                    } else {
                        entry.attached = true;
                        raw
                    };
                    let respected = pos == next_pos
                        || (pos < next_pos
                            && next_pos - pos <= t.ring_bytes
                            && monitor.committed_record_at(pos));
                    if !respected {
                        continue;
                    }
                    if pos > entry.high_water {
                        entry.high_water = pos;
                        entry.since = now;
                        entry.woken = false;
                        continue;
                    }
                    let full = next_pos - pos + max_record > t.ring_bytes;
                    if !full {
                        entry.since = now;
                        entry.woken = false;
                    } else if now.duration_since(entry.since) >= t.stall_timeout && entry.woken {
                        evict.push((sid, tid, t.stall_timeout));
                        continue 'subs;
                    } else if !entry.woken {
                        entry.woken = true;
                        wake.push(sid);
                    }
                }
            }
        }
        for sid in wake {
            let Some(s) = self.subscribers.get(&sid) else {
                continue;
            };
            if s.fallback.is_some() {
                self.pump_fallback(sid);
            } else {
                let fd = s.wake_tx.clone();
                self.out.push_back(Out::Wake { fd });
            }
        }
        for (sid, tid, limit) in evict {
            let why = format!(
                "your cursor did not move for {} ms while a reliable publisher waited for \
                 space; read faster, use a larger ring, or subscribe in lossy mode",
                limit.as_millis()
            );
            self.evict(sid, tid, &why);
        }
    }

    fn evict(&mut self, sid: u64, tid: u64, why: &str) {
        let Some(s) = self.subscribers.get(&sid) else {
            return;
        };
        let conn = s.conn;
        let name = self
            .topics
            .get(&tid)
            .map_or("?", |t| t.name.as_str())
            .to_owned();
        let message = format!("evicted from '{name}': {why}");
        tracing::warn!(subscriber = sid, topic = %name, "evicting stalled subscriber");
        let ev = Evicted {
            topic_id: tid,
            subscriber_id: sid,
            reason: EvictReason::Stalled,
            message: clip(&message),
        };
        self.send(conn, 0, Msg::Evicted(ev), Vec::new());
        if let Some(t) = self.topics.get_mut(&tid) {
            t.evictions += 1;
        }
        self.evictions += 1;
        self.remove_subscriber(sid, PeerGoneReason::Evicted);
    }
}

#[cfg(test)]
mod tests;
