//! The connection to the broker: the socket, the control thread that owns receiving on it,
//! request/reply matching, and the inboxes through which events reach publishers and
//! subscribers.
//!
//! # Threads
//!
//! Each connection starts one thread, `membus-control`. It blocks in `recvmsg` on the
//! SEQPACKET socket and dispatches every frame:
//!
//! - a reply (request id of a waiting request) goes to that requester through a one-shot
//!   channel;
//! - an event (CURSOR_GRANTED, RING_GRANTED for a new publisher, PEER_GONE, EVICTED, DELIVER,
//!   and the replies to datagram PUBLISH/PING) goes to the [`Inbox`] of the publisher or
//!   subscriber it concerns, whose generation counter it bumps; subscribers also get their
//!   notify eventfd written so that one parked in `recv` wakes at once.
//!
//! Any thread sends: each SEQPACKET send is one atomic datagram. The thread ends at EOF (the
//! broker went away: every inbox is told) or when the last handle on the connection drops
//! (which shuts the socket down).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bus_core::frame::{
    ErrorCode, EvictReason, Frame, Header, Msg, PeerKind, RingGranted, SkipReason,
};
use bus_core::limits::MAX_FRAME_BYTES;
use bus_core::sys::scm::{FdBatch, Received, frame_fd_check, recv_frame, send_frame};

use crate::error::BrokerError;

/// Request-id tag of PUBLISH frames: the low bits are the publisher id, so a refusal (ERROR
/// echoing the id) reaches the right publisher.
pub(crate) const TAG_PUBLISH: u64 = 1 << 63;
/// Request-id tag of a datagram publisher's flow-control PINGs (low bits: publisher id).
pub(crate) const TAG_PING: u64 = 1 << 62;
const TAG_MASK: u64 = TAG_PUBLISH | TAG_PING;

/// DELIVER frames one datagram subscriber may have queued before the control thread stops
/// reading the socket (which, through the broker's send credit, slows the publishers).
pub(crate) const DELIVER_QUEUE: usize = 1024;

/// Locks, ignoring poisoning (the data under our locks stays consistent across a panic: every
/// critical section is a push, a pop or a swap).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A reply: the datagram and the fds that came with it.
pub(crate) struct Reply {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// The decoded frame (checked by the control thread before it was routed here).
    pub fn msg(&self) -> Msg<'_> {
        match Frame::decode(&self.bytes) {
            Ok(f) => f.msg,
            // Decoded once already by the control thread; decoding is deterministic.
            Err(_) => unreachable!("reply frames are decoded before they are routed"),
        }
    }
}

/// Something that happened to one publisher or subscriber.
pub(crate) enum Event {
    /// For a publisher: a subscriber to honour and wake.
    CursorGranted {
        subscriber_id: u64,
        slot: u16,
        page: OwnedFd,
        wake: OwnedFd,
    },
    /// For a subscriber: a publisher's ring to read.
    RingGranted { grant: RingGranted, ring: OwnedFd },
    /// For a subscriber: a publisher left.
    PublisherGone { publisher_id: u64 },
    /// For a publisher: a subscriber left.
    SubscriberGone { subscriber_id: u64 },
    /// For a subscriber: evicted.
    Evicted {
        reason: EvictReason,
        message: String,
    },
    /// For a datagram publisher: a PUBLISH was refused.
    Refused(BrokerError),
    /// For a datagram publisher: a flow-control PING came back.
    Pong { token: u64 },
}

/// A message delivered as a DELIVER frame (datagram subscribers).
#[derive(Debug)]
pub(crate) struct Delivered {
    pub publisher_id: u64,
    pub seq: u64,
    pub timestamp_ns: u64,
    pub lost_before: u64,
    pub payload: Vec<u8>,
    /// A SKIPPED frame in the stream's place: the message's length and why it was not
    /// delivered (`payload` is empty).
    pub skipped: Option<(u32, SkipReason)>,
}

/// The mailbox of one publisher or subscriber. The owner checks `generation` with one Relaxed
/// load on its data path and takes the lock only when it changed.
pub(crate) struct Inbox {
    generation: AtomicU64,
    events: Mutex<Vec<Event>>,
    /// Signalled on every event (publishers waiting for a PONG wait on it).
    changed: Condvar,
    deliveries: Mutex<VecDeque<Delivered>>,
    /// Signalled when the owner takes deliveries (the control thread waits on it when full).
    space: Condvar,
    /// Subscribers: an eventfd the control thread writes so that a parked `recv` wakes.
    notify: Option<OwnedFd>,
    /// Set by a subscriber about to block (Dekker with the generation bump, both SeqCst).
    pub sleeping: AtomicBool,
    /// The owner is gone: drop whatever arrives for it.
    closed: AtomicBool,
}

impl Inbox {
    pub fn new(with_notify: bool) -> io::Result<Inbox> {
        let notify = if with_notify {
            use rustix::event::{EventfdFlags, eventfd};
            Some(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
        } else {
            None
        };
        Ok(Inbox {
            generation: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            deliveries: Mutex::new(VecDeque::new()),
            space: Condvar::new(),
            notify,
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// The current generation. Relaxed is enough on the data path: an owner that sees a new
    /// value takes the lock, which orders it after the push that preceded the bump.
    #[inline]
    pub fn generation(&self) -> u64 {
        bus_core::wake::protocol::inbox_generation(&self.generation)
    }

    /// The generation, for the second look before blocking.
    ///
    /// SYNC POINT: SeqCst fence, then the load (`protocol::inbox_second_look`); pairs with the
    /// SeqCst fence in `bump` (`protocol::inbox_bump`): either the owner, which stored
    /// `sleeping` before this, sees the bump, or the control thread sees `sleeping` and writes
    /// the eventfd. Checked by the loom model `inbox_owner_never_sleeps_through_an_event`.
    pub fn generation_seqcst(&self) -> u64 {
        bus_core::wake::protocol::inbox_second_look(&self.generation)
    }

    /// The eventfd a parked owner also polls.
    pub fn notify_fd(&self) -> Option<&OwnedFd> {
        self.notify.as_ref()
    }

    fn bump(&self, always_signal: bool) {
        if bus_core::wake::protocol::inbox_bump(&self.generation, &self.sleeping) || always_signal {
            self.signal();
        }
    }

    fn signal(&self) {
        if let Some(fd) = &self.notify {
            // A full counter (impossible in practice) or EAGAIN still leaves it readable.
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        }
    }

    /// Empties the notify eventfd (before parking).
    pub fn drain_notify(&self) {
        if let Some(fd) = &self.notify {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(fd, &mut buf);
        }
    }

    pub fn push(&self, ev: Event) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        lock(&self.events).push(ev);
        self.changed.notify_all();
        self.bump(true);
    }

    /// Wakes the owner without an event (the broker went away).
    fn poke(&self) {
        self.changed.notify_all();
        self.space.notify_all();
        self.bump(true);
    }

    /// Moves every pending event into `out` (which should be empty).
    pub fn take_events(&self, out: &mut Vec<Event>) {
        std::mem::swap(&mut *lock(&self.events), out);
    }

    /// Waits up to `timeout` for an event (publishers waiting for a PONG).
    pub fn wait_event(&self, timeout: Duration) {
        let guard = lock(&self.events);
        if guard.is_empty() {
            let _ = self.changed.wait_timeout(guard, timeout);
        }
    }

    /// Queues a delivery, waiting while the queue is full (the back-pressure the broker's
    /// send credit turns into a slower ring reader). Gives up if the owner or the connection
    /// goes away.
    fn push_delivery(&self, d: Delivered, stopping: &AtomicBool) {
        let mut q = lock(&self.deliveries);
        while q.len() >= DELIVER_QUEUE {
            if self.closed.load(Ordering::Relaxed) || stopping.load(Ordering::Relaxed) {
                return;
            }
            q = self
                .space
                .wait_timeout(q, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        q.push_back(d);
        drop(q);
        self.bump(false);
    }

    /// Moves every queued delivery into `out`.
    pub fn take_deliveries(&self, out: &mut VecDeque<Delivered>) {
        let mut q = lock(&self.deliveries);
        out.extend(q.drain(..));
        drop(q);
        self.space.notify_all();
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        lock(&self.deliveries).clear();
        self.space.notify_all();
    }
}

/// Which kind of owner a route leads to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Publisher,
    Subscriber,
}

struct Route {
    kind: Kind,
    topic_id: u64,
    inbox: Arc<Inbox>,
}

/// What WELCOME told us.
#[derive(Clone, Debug)]
pub(crate) struct Welcome {
    pub client_id: u64,
    pub max_datagram_message_bytes: u32,
    pub broker_version: String,
}

/// State shared by the handles and the control thread.
pub(crate) struct Shared {
    sock: OwnedFd,
    pub path: String,
    pub timeout: Duration,
    next_rid: AtomicU64,
    pending: Mutex<HashMap<u64, SyncSender<Reply>>>,
    routes: Mutex<HashMap<u64, Route>>,
    gone: AtomicBool,
    gone_reason: Mutex<String>,
    stopping: AtomicBool,
    pub welcome: Mutex<Option<Welcome>>,
    /// The first unsolicited ERROR (request id 0) the broker sent: at connect, why it refused
    /// us (e.g. `limit-reached`) before closing.
    pub refusal: Mutex<Option<BrokerError>>,
}

/// Why a request got no reply.
pub(crate) enum RequestError {
    Gone(String),
    Timeout(Duration),
    Io(io::Error),
}

impl Shared {
    pub fn new(sock: OwnedFd, path: String, timeout: Duration) -> Shared {
        Shared {
            sock,
            path,
            timeout,
            next_rid: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            gone: AtomicBool::new(false),
            gone_reason: Mutex::new(String::new()),
            stopping: AtomicBool::new(false),
            welcome: Mutex::new(None),
            refusal: Mutex::new(None),
        }
    }

    /// True once the broker closed the connection.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// What we know about why the broker is gone.
    pub fn gone_reason(&self) -> String {
        let r = lock(&self.gone_reason).clone();
        if r.is_empty() {
            "the broker closed the connection".to_owned()
        } else {
            r
        }
    }

    /// Sends one encoded frame.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        loop {
            match send_frame(self.sock.as_fd(), bytes, &[]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Encodes and sends a frame.
    pub fn send_msg(&self, request_id: u64, msg: Msg<'_>) -> io::Result<()> {
        let mut buf = Vec::new();
        Frame::new(request_id, msg)
            .encode(&mut buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.send(&buf)
    }

    /// Sends a request and waits for its reply (or ERROR).
    pub fn request(&self, msg: Msg<'_>) -> Result<Reply, RequestError> {
        let rid = self.next_rid.fetch_add(1, Ordering::Relaxed) & !TAG_MASK;
        let (tx, rx) = mpsc::sync_channel(1);
        lock(&self.pending).insert(rid, tx);
        if self.is_gone() {
            lock(&self.pending).remove(&rid);
            return Err(RequestError::Gone(self.gone_reason()));
        }
        if let Err(e) = self.send_msg(rid, msg) {
            lock(&self.pending).remove(&rid);
            return Err(if self.is_gone() || e.kind() == io::ErrorKind::BrokenPipe {
                RequestError::Gone(self.gone_reason())
            } else {
                RequestError::Io(e)
            });
        }
        match rx.recv_timeout(self.timeout) {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.pending).remove(&rid);
                Err(RequestError::Timeout(self.timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err(RequestError::Gone(self.gone_reason())),
        }
    }

    /// Routes events about `id` (a publisher or subscriber id) to `inbox`.
    pub fn register(&self, id: u64, kind: Kind, topic_id: u64, inbox: Arc<Inbox>) {
        lock(&self.routes).insert(
            id,
            Route {
                kind,
                topic_id,
                inbox: inbox.clone(),
            },
        );
        // Registered after the broker went away: tell the owner at once.
        if self.is_gone() {
            inbox.poke();
        }
    }

    pub fn unregister(&self, id: u64) {
        if let Some(r) = lock(&self.routes).remove(&id) {
            r.inbox.close();
        }
    }

    fn route(&self, id: u64) -> Option<Arc<Inbox>> {
        lock(&self.routes).get(&id).map(|r| r.inbox.clone())
    }

    fn routes_of(&self, kind: Kind, topic_id: u64) -> Vec<Arc<Inbox>> {
        lock(&self.routes)
            .values()
            .filter(|r| r.kind == kind && r.topic_id == topic_id)
            .map(|r| r.inbox.clone())
            .collect()
    }

    fn set_reason(&self, reason: String) {
        let mut r = lock(&self.gone_reason);
        if r.is_empty() {
            *r = reason;
        }
    }

    fn mark_gone(&self, reason: String) {
        self.set_reason(reason);
        self.gone.store(true, Ordering::Release);
        // Dropping the senders fails every waiting request with "gone".
        lock(&self.pending).clear();
        let inboxes: Vec<Arc<Inbox>> = lock(&self.routes)
            .values()
            .map(|r| r.inbox.clone())
            .collect();
        for i in inboxes {
            i.poke();
        }
    }

    /// Stops the control thread (the last handle dropped).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
    }
}

/// Starts the control thread.
pub(crate) fn spawn(shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("membus-control".into())
        .spawn(move || control_loop(&shared))
}

fn control_loop(shared: &Shared) {
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let mut fds = FdBatch::new();
    let reason = loop {
        match recv_frame(shared.sock.as_fd(), &mut buf, &mut fds) {
            Ok(Received::Eof) => break "the broker closed the connection".to_owned(),
            Ok(Received::Frame { len }) => dispatch(shared, &buf[..len], &mut fds),
            Err(e) => {
                if let bus_core::sys::scm::RecvError::Io(io) = &e {
                    match io.kind() {
                        io::ErrorKind::Interrupted => continue,
                        // The broker closed its end with our frames unread (it refused us at
                        // connect). Linux reports that once, as ECONNRESET, ahead of the frames
                        // it sent before closing (its ERROR): read on, EOF follows them.
                        io::ErrorKind::ConnectionReset => continue,
                        _ => break format!("control socket error: {io}"),
                    }
                }
                // A frame we could not take whole (too long, too many fds): its fds are
                // closed; the broker never sends one, so carry on.
                continue;
            }
        }
    };
    let reason = if shared.stopping.load(Ordering::Relaxed) {
        "this client closed its connection".to_owned()
    } else {
        reason
    };
    shared.mark_gone(reason);
}

fn dispatch(shared: &Shared, datagram: &[u8], fds: &mut FdBatch) {
    let Ok(header) = Header::parse(datagram) else {
        return;
    };
    if frame_fd_check(header.fd_count, fds).is_err() {
        return;
    }
    let Ok(frame) = Frame::decode(datagram) else {
        fds.clear();
        return;
    };
    let rid = frame.request_id;
    if rid != 0 && rid & TAG_MASK == 0 {
        // A reply to a request.
        if let Some(tx) = lock(&shared.pending).remove(&rid) {
            let mut owned = Vec::new();
            for i in 0..fds.len() {
                if let Some(fd) = fds.take(i) {
                    owned.push(fd);
                }
            }
            let _ = tx.send(Reply {
                bytes: datagram.to_vec(),
                fds: owned,
            });
        }
        return;
    }
    if rid & TAG_PUBLISH != 0 {
        if let Msg::Error(e) = frame.msg
            && let Some(inbox) = shared.route(rid & !TAG_MASK)
        {
            inbox.push(Event::Refused(BrokerError {
                code: e.code,
                message: e.message.to_owned(),
            }));
        }
        return;
    }
    if rid & TAG_PING != 0 {
        if let Msg::Pong { token } = frame.msg
            && let Some(inbox) = shared.route(rid & !TAG_MASK)
        {
            inbox.push(Event::Pong { token });
        }
        return;
    }
    match frame.msg {
        Msg::CursorGranted(g) => {
            if let (Some([page, wake]), Some(inbox)) =
                (fds.take_all::<2>(), shared.route(g.publisher_id))
            {
                inbox.push(Event::CursorGranted {
                    subscriber_id: g.subscriber_id,
                    slot: g.slot,
                    page,
                    wake,
                });
            }
        }
        Msg::RingGranted(g) if g.role.is_reader() => {
            if let (Some([ring]), Some(inbox)) =
                (fds.take_all::<1>(), shared.route(g.subscriber_id))
            {
                inbox.push(Event::RingGranted { grant: g, ring });
            }
        }
        Msg::PeerGone(g) => match g.peer {
            PeerKind::Publisher => {
                for inbox in shared.routes_of(Kind::Subscriber, g.topic_id) {
                    inbox.push(Event::PublisherGone {
                        publisher_id: g.peer_id,
                    });
                }
            }
            PeerKind::Subscriber => {
                for inbox in shared.routes_of(Kind::Publisher, g.topic_id) {
                    inbox.push(Event::SubscriberGone {
                        subscriber_id: g.peer_id,
                    });
                }
            }
        },
        Msg::Evicted(e) => {
            if let Some(inbox) = shared.route(e.subscriber_id) {
                inbox.push(Event::Evicted {
                    reason: e.reason,
                    message: e.message.to_owned(),
                });
            }
        }
        Msg::Deliver(d) => {
            if let Some(inbox) = shared.route(d.subscriber_id) {
                inbox.push_delivery(
                    Delivered {
                        publisher_id: d.publisher_id,
                        seq: d.seq,
                        timestamp_ns: d.timestamp_ns,
                        lost_before: d.lost_before,
                        payload: d.payload.to_vec(),
                        skipped: None,
                    },
                    &shared.stopping,
                );
            }
        }
        Msg::Skipped(k) => {
            if let Some(inbox) = shared.route(k.subscriber_id) {
                inbox.push_delivery(
                    Delivered {
                        publisher_id: k.publisher_id,
                        seq: k.seq,
                        timestamp_ns: 0,
                        lost_before: k.lost_before,
                        payload: Vec::new(),
                        skipped: Some((k.len, k.reason)),
                    },
                    &shared.stopping,
                );
            }
        }
        Msg::Shutdown(s) => shared.set_reason(format!(
            "the broker shut down ({}): {}",
            s.reason, s.message
        )),
        Msg::Error(e) => {
            // An unsolicited error precedes a disconnect (handshake timeout, protocol error,
            // a refusal at connect).
            lock(&shared.refusal).get_or_insert_with(|| BrokerError {
                code: e.code,
                message: e.message.to_owned(),
            });
            let reason = match e.code {
                ErrorCode::Timeout => format!("the broker timed us out: {}", e.message),
                code => format!("the broker reported {code}: {}", e.message),
            };
            shared.set_reason(reason);
        }
        Msg::Ping { token } => {
            let _ = shared.send_msg(rid, Msg::Pong { token });
        }
        _ => fds.clear(),
    }
}
