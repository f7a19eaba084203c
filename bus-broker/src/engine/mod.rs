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
//!
//! # Rooms
//!
//! - `session`: connections, the handshake, frame dispatch, shutdown.
//! - `registry`: topics, their geometry, publisher slots.
//! - `publishers`, `subscribers`: the two sides of the handoff, and leaving.
//! - `relay`: the datagram relay (the broker as writer and as reader of rings).
//! - `stall`: who holds a reliable writer back, and eviction.
//! - `timers`: ticks and deadlines (the only way time enters).
//! - `fds`: the descriptor budget and quotas. `segments`: ring sizes, memfd names, and
//!   segment-creation failures.
//! - `stats`: the STATS document. `invariants`: what must hold after every event.
//! - `state`: the records the rooms share (client, topic, slot, publisher, subscriber).
//!
//! This file holds the engine's public face ([`Out`], [`Engine`] and its event entry points)
//! and the send path every room uses.

mod fds;
mod invariants;
mod publishers;
mod registry;
mod relay;
mod segments;
mod session;
mod stall;
mod state;
mod stats;
mod subscribers;
mod timers;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits::Limits;
use bus_core::frame::{
    CreatePublisher, CursorGranted, DecodeError, Deliver, ErrorCode, ErrorReply, EvictReason,
    Evicted, Frame, Header, MAX_DATAGRAM_MESSAGE_BYTES, ModeRequest, Msg, PROTOCOL_VERSION,
    PeerGone, PeerGoneReason, PeerKind, RingGranted, RingRole, Shutdown, ShutdownReason,
    SkipReason, Skipped, Subscribe, Subscribed, Transport, Welcome,
};
use bus_core::layout::{
    CURSOR_DETACHED, MIN_DATA_BYTES, Mode, max_message_bytes_for, record_bytes,
};
use bus_core::limits::{MAX_ERROR_MESSAGE_BYTES, MAX_FRAME_BYTES, MAX_TOPIC_BYTES};
use bus_core::ring::{CursorPage, CursorView, Reader, ReaderSet, RingConfig, StartAt, Writer};
use bus_core::segment::{
    Access, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use bus_core::sys::scm::FdBatch;
use bus_core::wake::protocol;

use crate::config::TopicDecl;
use crate::policy::{Op, Policy};
use segments::*;
pub use segments::{Memfd, SegmentFactory};
use state::*;

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
    /// Drop the connection now, discarding what is queued for it: it stopped reading its socket
    /// (more than [`Engine::unsent_limit`] frames unsent). The engine has already forgotten it:
    /// do not call [`Engine::on_disconnect`] for it afterwards.
    Drop {
        /// Which.
        conn: ConnId,
    },
    /// Watch `fd` (the receive end of a datagram subscriber's wake socket, which the engine
    /// hands over): when it is readable, drain it (read every queued datagram, without
    /// blocking) and then report it with [`Engine::on_wake`]`(token)`. Close it at
    /// [`Out::Unwatch`].
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
    /// has [`DATAGRAM_BACKLOG`] messages waiting for ring space. Its further PUBLISHes wait in
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
pub const DELIVER_CREDIT: u32 = 64;
/// Messages a datagram publisher may have waiting for ring space before the broker stops reading
/// its connection ([`Out::PauseReads`]).
pub const DATAGRAM_BACKLOG: usize = 256;
/// Messages that may wait before a PUBLISH is refused with `too-slow`: only reached by a driver
/// that keeps handing over frames after [`Out::PauseReads`] (both drivers stop at once).
const DATAGRAM_BACKLOG_LIMIT: usize = 2 * DATAGRAM_BACKLOG;
/// How often stalled reliable subscribers are looked for (at most once a second: an idle
/// broker must not wake more often).
const STALL_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Frame buffers kept for reuse ([`Engine::recycle`]): a relay burst is at most
/// [`DELIVER_CREDIT`] frames per subscriber before it waits.
const SPARE_FRAMES: usize = 256;
/// Only buffers up to this capacity are kept (the pool stays within 1 MiB); DELIVERs of larger
/// messages allocate, which their copy dwarfs anyway.
const SPARE_FRAME_BYTES: usize = 4096;
/// Most ring records (delivered or skipped) one call of `pump_datagram` handles: the loop's
/// turn is bounded whatever a ring holds.
const RELAY_STEPS: usize = 1024;
/// How soon a datagram publisher's backlog is retried.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

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
    written_topics: Vec<u64>,
    /// Clients that stopped reading their socket ([`Client::unread`]), dropped at the next
    /// [`Engine::poll_out`] (not inside `send`, which runs in the middle of other work).
    unread: Vec<ConnId>,
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
    /// Where new segments and wake sockets come from ([`Engine::set_segment_factory`]).
    segments: Box<dyn SegmentFactory>,
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
            written_topics: Vec::new(),
            unread: Vec::new(),
            hello_deadlines: VecDeque::new(),
            keep_topic: None,
            pump_again: Vec::new(),
            fd_budget: u64::MAX,
            fds_used: 0,
            segments: Box::new(Memfd),
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

    /// Replaces where new segments and wake sockets come from (default: [`Memfd`]). For tests
    /// that make creation fail; the broker keeps the default.
    pub fn set_segment_factory(&mut self, factory: Box<dyn SegmentFactory>) {
        self.segments = factory;
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
        if self.out.is_empty() {
            self.drop_unread();
        }
        self.out.pop_front()
    }

    /// Most frames one client may have handed to the driver and not yet sent: its replies
    /// (`limits.max_queued_replies`) plus a full window of relayed DELIVERs
    /// ([`DELIVER_CREDIT`]). The engine counts them ([`Engine::on_sent`] gives them back) and
    /// drops a client that passes it ([`Out::Drop`]); the driver keeps no bound of its own.
    pub fn unsent_limit(&self) -> u32 {
        self.limits
            .max_queued_replies
            .max(1)
            .saturating_add(DELIVER_CREDIT)
    }

    /// Drops the clients [`Engine::send`] found not reading: their peers are told they are gone,
    /// what they held is released, and the driver closes them without flushing.
    fn drop_unread(&mut self) {
        while let Some(conn) = self.unread.pop() {
            let Some(c) = self.clients.get(&conn) else {
                continue;
            };
            debug_assert!(
                c.unread,
                "only clients marked unread are queued for dropping"
            );
            tracing::warn!(
                conn,
                pid = c.creds.pid,
                name = %c.name,
                "client does not read its socket ({} frames unsent, limit {}: \
                 limits.max_queued_replies plus the delivery window); disconnecting it",
                c.inflight,
                self.unsent_limit()
            );
            self.forget_client(conn, PeerGoneReason::Disconnected);
            self.out.push_back(Out::Drop { conn });
        }
    }

    /// Moves the engine's clock to `now`, never back: a caller's instant older than one it
    /// already gave (a tick time taken before the frames of the same loop turn) leaves the
    /// clock where it is, so deadlines computed from it never move earlier.
    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn alloc_id(&mut self) -> u64 {
        assert!(self.next_id < u64::MAX, "engine ids exhausted");
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

    fn send(&mut self, conn: ConnId, request_id: u64, msg: Msg<'_>, fds: Vec<Arc<OwnedFd>>) {
        let frame = Frame { request_id, msg };
        let mut buf = Vec::new();
        match frame.encode(&mut buf) {
            Ok(_) => {
                let limit = self.unsent_limit();
                if let Some(c) = self.clients.get_mut(&conn) {
                    if c.unread {
                        return; // It is being dropped: nothing more for it.
                    }
                    c.inflight += 1;
                    if c.inflight > limit {
                        c.unread = true;
                        self.unread.push(conn);
                        return;
                    }
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

    /// `frames` sends to `conn` completed (frees send credit).
    pub fn on_sent(&mut self, conn: ConnId, frames: u32) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        assert!(
            frames <= c.inflight,
            "the driver reports {frames} frames sent to {conn}, but only {} were handed to it",
            c.inflight
        );
        let had_no_credit = c.inflight >= DELIVER_CREDIT;
        c.inflight -= frames;
        // A subscriber's relay only stops for lack of credit: with credit to spare nothing
        // waits on this (and the common case, a send that completed at once, costs nothing).
        if !had_no_credit {
            return self.assert_client(conn);
        }
        // By index: pumping never adds or removes this client's subscribers, and cloning the
        // list would allocate per send.
        let mut i = 0;
        while let Some(&sid) = self.clients.get(&conn).and_then(|c| c.subscribers.get(i)) {
            i += 1;
            self.pump_datagram(sid);
            // The relay moved its cursor: space for the broker's own writers on that topic.
            if let Some(tid) = self.subscribers.get(&sid).map(|s| s.topic) {
                self.flush_topic_backlogs(tid);
            }
        }
        self.flush_relays();
        self.assert_client(conn);
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
                .and_then(|s| s.datagram.as_mut())
            {
                protocol::unpark(fb.page.park_word());
            }
            self.pump_datagram(sid);
        }
    }
}

#[cfg(test)]
mod tests;
