//! [`Subscriber`]: reads every ring of its topic (or DELIVER frames, as a datagram subscriber)
//! and hands out [`Sample`]s.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::frame::{Msg, RingRole, Subscribe, Transport as WireTransport};
use bus_core::layout::Mode;
use bus_core::ring::{CursorPage, Reader, RingConfig, StartAt};
use bus_core::segment::{Access, map_cursor_page, map_ring};
use bus_core::sys::clock::monotonic_ns;
use bus_core::wake::{WaitStrategy, WakeReceiver, protocol};
use hdrhistogram::Histogram;
use rustix::event::epoll;

use crate::bus::{Client, request_error};
use crate::conn::{Delivered, Event, Inbox, Kind};
use crate::error::{EvictReason, RecvError, SubscribeError};
use crate::latency;
use crate::options::{SubscriberOptions, Transport};
use crate::publisher::{fire, unexpected};

struct ShmSub {
    page: Arc<CursorPage>,
    wake: WakeReceiver,
    readers: Vec<Reader>,
    /// Round-robin start for the next look.
    next: usize,
    /// Publishers that left: their rings are read to the end, then dropped.
    gone: Vec<u64>,
    /// Rings let go of (drained, or dropped as corrupt) that the broker has not been told
    /// about yet (RING_RELEASED): it frees their publisher slot, and stops judging this
    /// subscriber on a ring it no longer reads.
    released: Vec<u64>,
    /// Rings found corrupt: their readers are inert and are dropped before anything else
    /// happens to this subscriber (in particular before a new ring is attached to the same
    /// publisher slot, whose cursor the dropped reader resets).
    corrupt: Vec<u64>,
}

struct DgSub {
    queue: VecDeque<Delivered>,
    /// Inbox generation when the queue was last refilled.
    seen: u64,
}

enum SubKind {
    Shm(ShmSub),
    Datagram(DgSub),
}

/// A subscriber on one topic: reads every publisher's ring, each publisher's messages in
/// order, publishers interleaved fairly.
///
/// ```no_run
/// use bus_client::{Bus, SubscriberOptions, WaitStrategy};
/// let bus = Bus::connect_default()?;
/// let mut sub = bus.subscriber_with(
///     "prices",
///     SubscriberOptions::new().wait(WaitStrategy::Park).record_latency(true),
/// )?;
/// loop {
///     let sample = sub.recv()?;            // zero-copy: derefs to the bytes in the ring
///     if sample.lost_before() > 0 {
///         eprintln!("lost {} messages", sample.lost_before());
///     }
///     println!("{:?}", &sample[..]);
/// #   break;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Subscriber {
    client: Arc<Client>,
    inbox: Arc<Inbox>,
    seen_gen: u64,
    id: u64,
    topic: String,
    mode: Mode,
    wait: WaitStrategy,
    latency: Option<Histogram<u64>>,
    evicted: Option<(EvictReason, String)>,
    broker_gone: bool,
    /// An error to report once (a ring that could not be attached).
    pending_error: Option<RecvError>,
    /// `prepare_to_wait` announced a park that `try_recv` must end.
    armed: bool,
    epoll: OwnedFd,
    scratch: Vec<Event>,
    kind: SubKind,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("mode", &self.mode)
            .field("shared_memory", &self.is_shared_memory())
            .finish()
    }
}

impl Subscriber {
    pub(crate) fn create(
        client: Arc<Client>,
        topic: &str,
        options: SubscriberOptions,
    ) -> Result<Subscriber, SubscribeError> {
        if client.transport != Transport::Datagram {
            match Subscriber::create_with(&client, topic, options, WireTransport::Shm) {
                Ok(s) => return Ok(s),
                Err(SubscribeError::Segment(_)) if client.transport == Transport::Auto => {}
                Err(e) => return Err(e),
            }
        }
        Subscriber::create_with(&client, topic, options, WireTransport::Datagram)
    }

    fn create_with(
        client: &Arc<Client>,
        topic: &str,
        options: SubscriberOptions,
        delivery: WireTransport,
    ) -> Result<Subscriber, SubscribeError> {
        let shared = &client.shared;
        let inbox = Arc::new(Inbox::new(true)?);
        let mut reply = shared
            .request(Msg::Subscribe(Subscribe {
                mode: options.mode,
                delivery,
                topic,
            }))
            .map_err(request_error::<SubscribeError>)?;
        let granted = match reply.msg() {
            Msg::Subscribed(s)
                if s.delivery == delivery
                    && reply.fds.len() == if delivery == WireTransport::Shm { 2 } else { 0 } =>
            {
                s
            }
            msg => return Err(unexpected(msg, "SUBSCRIBED")),
        };
        let sid = granted.subscriber_id;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let notify = inbox
            .notify_fd()
            .expect("subscriber inboxes have a notify fd");
        epoll::add(
            &epoll,
            notify,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN,
        )?;
        let kind = if delivery == WireTransport::Shm {
            let wake_fd = reply.fds.pop().expect("checked: two fds");
            let page_fd = reply.fds.pop().expect("checked: two fds");
            let never_parks = options.wait == WaitStrategy::BusySpin;
            let page = map_cursor_page(&page_fd, Access::ReadWrite)
                .map_err(|e| e.to_string())
                .and_then(|m| CursorPage::init_with(m, sid, never_parks).map_err(|e| e.to_string()))
                .and_then(|p| {
                    WakeReceiver::from_fd(wake_fd)
                        .map(|w| (p, w))
                        .map_err(|e| e.to_string())
                });
            let (page, wake) = match page {
                Ok(x) => x,
                Err(e) => {
                    fire(shared, Msg::Unsubscribe { subscriber_id: sid });
                    return Err(SubscribeError::Segment(e));
                }
            };
            epoll::add(
                &epoll,
                &wake,
                epoll::EventData::new_u64(1),
                epoll::EventFlags::IN,
            )?;
            SubKind::Shm(ShmSub {
                page: Arc::new(page),
                wake,
                readers: Vec::new(),
                next: 0,
                gone: Vec::new(),
                released: Vec::new(),
                corrupt: Vec::new(),
            })
        } else {
            SubKind::Datagram(DgSub {
                queue: VecDeque::new(),
                seen: inbox.generation(),
            })
        };
        // Route events before READY: RING_GRANTED may follow the OK at once.
        shared.register(sid, Kind::Subscriber, granted.topic_id, inbox.clone());
        if delivery == WireTransport::Shm {
            let ready = shared.request(Msg::SubscriberReady { subscriber_id: sid });
            let result = match ready {
                Ok(r) => match r.msg() {
                    Msg::Ok => Ok(()),
                    msg => Err(unexpected(msg, "OK")),
                },
                Err(e) => Err(request_error(e)),
            };
            if let Err(e) = result {
                shared.unregister(sid);
                return Err(e);
            }
        }
        Ok(Subscriber {
            client: client.clone(),
            // Never equal to a real generation: the first look applies whatever the control
            // thread queued before this value existed (grants can arrive right after the OK).
            seen_gen: u64::MAX,
            inbox,
            id: sid,
            topic: topic.to_owned(),
            mode: granted.mode,
            wait: options.wait,
            latency: options.record_latency.then(latency::new_histogram),
            evicted: None,
            broker_gone: false,
            pending_error: None,
            armed: false,
            epoll,
            scratch: Vec::new(),
            kind,
        })
    }

    /// The subscriber id the broker assigned.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic's delivery mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True when reading rings in shared memory, false for a datagram (fallback) subscriber.
    pub fn is_shared_memory(&self) -> bool {
        matches!(self.kind, SubKind::Shm(_))
    }

    /// Publishers whose rings this subscriber reads right now (shared memory only; a datagram
    /// subscriber's rings are read by the broker).
    pub fn publisher_count(&mut self) -> usize {
        self.check_events();
        match &self.kind {
            SubKind::Shm(s) => s.readers.len(),
            SubKind::Datagram(_) => 0,
        }
    }

    /// The latency histogram (publish time to receive time, nanoseconds), if recording was
    /// asked for with [`SubscriberOptions::record_latency`].
    pub fn latency(&self) -> Option<&Histogram<u64>> {
        self.latency.as_ref()
    }

    /// The latency histogram, to reset or merge into.
    pub fn latency_mut(&mut self) -> Option<&mut Histogram<u64>> {
        self.latency.as_mut()
    }

    /// Returns a copy of the latency histogram and resets it (one interval of an interval log).
    pub fn take_latency(&mut self) -> Option<Histogram<u64>> {
        let h = self.latency.as_mut()?;
        let copy = h.clone();
        h.reset();
        Some(copy)
    }

    /// Applies what the control thread queued for this subscriber. One Relaxed load when
    /// nothing changed.
    #[inline]
    fn check_events(&mut self) {
        let g = self.inbox.generation();
        if g != self.seen_gen {
            self.seen_gen = g;
            self.process_events();
        }
    }

    #[cold]
    fn process_events(&mut self) {
        if self.client.shared.is_gone() {
            self.broker_gone = true;
        }
        if let SubKind::Shm(s) = &mut self.kind {
            s.drop_corrupt();
        }
        let mut events = std::mem::take(&mut self.scratch);
        self.inbox.take_events(&mut events);
        for ev in events.drain(..) {
            match ev {
                Event::RingGranted { grant, ring } => {
                    let SubKind::Shm(s) = &mut self.kind else {
                        continue;
                    };
                    let cfg = RingConfig {
                        mode: grant.mode,
                        data_bytes: grant.data_bytes,
                        max_message_bytes: grant.max_message_bytes,
                        publisher_id: grant.publisher_id,
                    };
                    let reader = map_ring(&ring, grant.data_bytes as usize, Access::ReadOnly)
                        .map_err(|e| e.to_string())
                        .and_then(|m| {
                            Reader::attach(
                                m,
                                cfg,
                                Some((s.page.clone(), usize::from(grant.slot))),
                                // A publisher that arrived after us: all of its ring is ours.
                                if grant.role == RingRole::ReaderFromStart {
                                    StartAt::Beginning
                                } else {
                                    StartAt::Next
                                },
                            )
                            .map_err(|e| e.to_string())
                        });
                    match reader {
                        Ok(r) => s.readers.push(r),
                        Err(detail) => {
                            s.released.push(grant.publisher_id);
                            self.pending_error.get_or_insert(RecvError::BadRing {
                                publisher_id: grant.publisher_id,
                                detail,
                            });
                        }
                    }
                }
                Event::PublisherGone { publisher_id } => {
                    if let SubKind::Shm(s) = &mut self.kind {
                        s.gone.push(publisher_id);
                        s.drop_drained();
                    }
                }
                Event::Evicted { reason, message } => {
                    self.evicted.get_or_insert((reason, message));
                }
                _ => {}
            }
        }
        self.scratch = events;
        self.send_releases();
    }

    /// Tells the broker about every ring let go of since the last call (RING_RELEASED).
    fn send_releases(&mut self) {
        if let SubKind::Shm(s) = &mut self.kind {
            send_releases(&self.client, self.id, &mut s.released);
        }
    }

    fn check_errors(&mut self) -> Result<(), RecvError> {
        if let Some((reason, message)) = &self.evicted {
            return Err(RecvError::Evicted {
                reason: *reason,
                message: message.clone(),
            });
        }
        match self.pending_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes the next message if one is ready. Never blocks, makes no syscall and takes no
    /// lock while messages flow (shared memory). `Ok(None)`: nothing right now.
    ///
    /// Once the broker is gone, the messages already in the rings are still returned; after
    /// the last one this returns [`RecvError::BrokerGone`].
    #[inline]
    pub fn try_recv(&mut self) -> Result<Option<Sample<'_>>, RecvError> {
        self.check_events();
        self.check_errors()?;
        if self.armed {
            self.disarm();
        }
        let Some(i) = self.next_candidate() else {
            self.idle_housekeeping();
            if self.broker_gone {
                return Err(self.gone_error());
            }
            return Ok(None);
        };
        self.take(i)
    }

    /// Receives the next message, waiting as the [`WaitStrategy`] says.
    pub fn recv(&mut self) -> Result<Sample<'_>, RecvError> {
        let i = match self.wait_ready(None)? {
            Some(i) => i,
            None => unreachable!("no deadline, so no timeout"),
        };
        self.take_ready(i)
    }

    /// [`Subscriber::recv`] waiting at most `timeout`; `Ok(None)` when it passed.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Sample<'_>>, RecvError> {
        let Some(i) = self.wait_ready(Some(Instant::now() + timeout))? else {
            return Ok(None);
        };
        self.take_ready(i).map(Some)
    }

    /// An iterator of owned copies of the messages (it cannot lend zero-copy samples); ends
    /// when the broker is gone and the rings are drained. For zero-copy, loop on
    /// [`Subscriber::recv`].
    pub fn iter(&mut self) -> Iter<'_> {
        Iter { sub: self }
    }

    fn gone_error(&self) -> RecvError {
        RecvError::BrokerGone {
            reason: self.client.shared.gone_reason(),
        }
    }

    /// The first ring (round-robin) with a record or a resync pending, or for a datagram
    /// subscriber a queued delivery (index 0). Cheap: one load per ring.
    #[inline]
    fn next_candidate(&mut self) -> Option<usize> {
        match &mut self.kind {
            SubKind::Shm(s) => {
                let n = s.readers.len();
                (0..n)
                    .map(|k| (s.next + k) % n)
                    .find(|&i| s.readers[i].has_pending())
            }
            SubKind::Datagram(d) => {
                if d.queue.is_empty() {
                    let g = self.inbox.generation();
                    if g != d.seen {
                        d.seen = g;
                        self.inbox.take_deliveries(&mut d.queue);
                    }
                }
                (!d.queue.is_empty()).then_some(0)
            }
        }
    }

    /// Like `next_candidate`, but returns only a ring whose next record is certainly there:
    /// committed, or, when a lapped lossy reader must resynchronise, probed (the resync
    /// happens here).
    fn next_ready(&mut self) -> Result<Option<usize>, RecvError> {
        let SubKind::Shm(s) = &mut self.kind else {
            return Ok(self.next_candidate());
        };
        let n = s.readers.len();
        for k in 0..n {
            let i = (s.next + k) % n;
            let r = &mut s.readers[i];
            // The common case: a committed record. `take` validates it (once); probing it here
            // with try_recv as well read and checked every record twice.
            if r.has_record() {
                return Ok(Some(i));
            }
            if !r.has_pending() {
                continue;
            }
            // A resynchronisation is pending (a lapped lossy reader): probe, since after it
            // there may be nothing to take.
            let publisher_id = r.publisher_id();
            let corrupt = match r.try_recv() {
                // Not dropping the probe sample keeps it unread (drop is what advances the
                // reader); it holds no resources, so forgetting it leaks nothing.
                Ok(Some(sample)) => {
                    std::mem::forget(sample);
                    return Ok(Some(i));
                }
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            };
            if let Some(detail) = corrupt {
                s.mark_corrupt(publisher_id);
                send_releases(&self.client, self.id, &mut s.released);
                return Err(RecvError::BadRing {
                    publisher_id,
                    detail,
                });
            }
        }
        Ok(None)
    }

    /// Takes the record of candidate `i` (`Ok(None)` if a lapped lossy reader found nothing
    /// after resynchronising) and records its latency.
    #[inline]
    fn take(&mut self, i: usize) -> Result<Option<Sample<'_>>, RecvError> {
        let Subscriber {
            kind,
            latency,
            client,
            id,
            ..
        } = self;
        match kind {
            SubKind::Shm(s) => {
                let n = s.readers.len();
                s.next = (i + 1) % n;
                let r = &mut s.readers[i];
                let publisher_id = r.publisher_id();
                match r.try_recv() {
                    Ok(Some(sample)) => {
                        if let Some(h) = latency {
                            h.saturating_record(
                                monotonic_ns().saturating_sub(sample.timestamp_ns()),
                            );
                        }
                        Ok(Some(Sample {
                            inner: SampleInner::Ring(sample),
                        }))
                    }
                    Ok(None) => Ok(None),
                    // The ring is dropped now (its cursor slot reads "detached") and the broker
                    // is told, so that nobody waits for or judges us on it.
                    Err(e) => {
                        // Field by field: the sample arm above keeps `s.readers` borrowed.
                        s.corrupt.push(publisher_id);
                        s.released.push(publisher_id);
                        send_releases(client, *id, &mut s.released);
                        Err(RecvError::BadRing {
                            publisher_id,
                            detail: e.to_string(),
                        })
                    }
                }
            }
            SubKind::Datagram(d) => match d.queue.pop_front() {
                Some(Delivered {
                    publisher_id,
                    seq,
                    lost_before,
                    skipped: Some((len, reason)),
                    ..
                }) => Err(RecvError::Skipped {
                    publisher_id,
                    seq,
                    lost_before,
                    len,
                    reason,
                }),
                Some(msg) => {
                    if let Some(h) = latency {
                        h.saturating_record(monotonic_ns().saturating_sub(msg.timestamp_ns));
                    }
                    Ok(Some(Sample {
                        inner: SampleInner::Owned(msg, PhantomData),
                    }))
                }
                None => Ok(None),
            },
        }
    }

    /// Takes a record `next_ready` found.
    fn take_ready(&mut self, i: usize) -> Result<Sample<'_>, RecvError> {
        let publisher_id = match &self.kind {
            SubKind::Shm(s) => s.readers[i].publisher_id(),
            SubKind::Datagram(_) => 0,
        };
        match self.take(i) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(RecvError::Lapped { publisher_id }),
            Err(e) => Err(e),
        }
    }

    /// Drops rings that are finished or whose publisher left and that are drained.
    fn idle_housekeeping(&mut self) {
        if let SubKind::Shm(s) = &mut self.kind {
            s.drop_drained();
        }
        self.send_releases();
    }

    /// Waits (spin, then park, as the strategy says) until a record is certainly ready;
    /// `None` when the deadline passed.
    fn wait_ready(&mut self, deadline: Option<Instant>) -> Result<Option<usize>, RecvError> {
        let spin_limit = match self.wait {
            WaitStrategy::BusySpin => u32::MAX,
            WaitStrategy::SpinThenPark { spin_iterations } => spin_iterations,
            WaitStrategy::Park => 0,
        };
        let mut spins: u32 = 0;
        if self.armed {
            self.disarm();
        }
        loop {
            self.check_events();
            self.check_errors()?;
            if let Some(i) = self.next_ready()? {
                return Ok(Some(i));
            }
            self.idle_housekeeping();
            if self.broker_gone {
                return Err(self.gone_error());
            }
            if spins < spin_limit {
                spins += 1;
                // Look at the clock only now and then while spinning.
                if spins.is_multiple_of(1024) && deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                std::hint::spin_loop();
                continue;
            }
            let timeout = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    Some(d - now)
                }
                None => None,
            };
            self.park(timeout)?;
        }
    }

    /// Drains the wake fds and announces the park (park protocol step 1), then looks again
    /// (step 2). Returns true if nothing arrived: the caller may block on the fds.
    fn arm(&mut self) -> bool {
        self.inbox.drain_notify();
        // SYNC POINT: the announce, then `generation_seqcst` (a SeqCst fence before its load),
        // pair with the fence in the control thread's bump (Inbox::bump): either we see the
        // bump below, or it sees `sleeping` and writes the eventfd (loom model
        // `inbox_owner_never_sleeps_through_an_event`).
        protocol::inbox_announce_sleep(&self.inbox.sleeping);
        let quiet = match &mut self.kind {
            SubKind::Shm(s) => {
                s.wake.drain();
                protocol::announce_park(s.page.park_word());
                !s.readers.iter().any(Reader::has_pending)
            }
            SubKind::Datagram(d) => d.queue.is_empty(),
        };
        let quiet = quiet && self.inbox.generation_seqcst() == self.seen_gen && {
            match &self.kind {
                SubKind::Datagram(d) => self.inbox.generation_seqcst() == d.seen,
                SubKind::Shm(_) => true,
            }
        };
        if !quiet {
            self.disarm();
        }
        quiet
    }

    fn disarm(&mut self) {
        self.armed = false;
        protocol::inbox_end_sleep(&self.inbox.sleeping);
        if let SubKind::Shm(s) = &self.kind {
            protocol::unpark(s.page.park_word());
        }
    }

    /// Park protocol: announce, look again, block on the wake socket and the notify eventfd.
    fn park(&mut self, timeout: Option<Duration>) -> Result<(), RecvError> {
        if !self.arm() {
            return Ok(());
        }
        // Readable or timed out: either way the caller looks at the rings again.
        let result = bus_core::wake::wait_readable(self.epoll.as_fd(), timeout);
        self.disarm();
        result.map(|_| ()).map_err(RecvError::Io)
    }

    /// For poll/epoll/io_uring users: call after [`Subscriber::try_recv`] returned
    /// `Ok(None)` and before waiting for [`AsFd::as_fd`] to become readable. It empties the
    /// fd and announces that this subscriber is about to sleep, so that publishers send it a
    /// wakeup. Returns false if a message arrived meanwhile: do not wait, call `try_recv`.
    /// The next `try_recv` ends the announcement.
    pub fn prepare_to_wait(&mut self) -> bool {
        let quiet = self.arm();
        self.armed = quiet;
        quiet
    }
}

/// Sends RING_RELEASED for every publisher in `released` and empties it.
fn send_releases(client: &Client, subscriber_id: u64, released: &mut Vec<u64>) {
    if client.shared.is_gone() {
        released.clear();
    }
    for publisher_id in released.drain(..) {
        fire(
            &client.shared,
            Msg::RingReleased {
                subscriber_id,
                publisher_id,
            },
        );
    }
}

impl ShmSub {
    /// Notes that the ring of `pid` is corrupt: its reader is dropped at the next
    /// [`ShmSub::drop_corrupt`], and the broker is to be told.
    fn mark_corrupt(&mut self, pid: u64) {
        self.corrupt.push(pid);
        self.released.push(pid);
    }

    /// Drops the readers of rings found corrupt (their cursor slots then read "detached").
    fn drop_corrupt(&mut self) {
        if self.corrupt.is_empty() {
            return;
        }
        let corrupt = &self.corrupt;
        self.readers
            .retain(|r| !corrupt.contains(&r.publisher_id()));
        self.gone.retain(|g| !corrupt.contains(g));
        self.corrupt.clear();
        if self.next >= self.readers.len() {
            self.next = 0;
        }
    }

    fn drop_drained(&mut self) {
        self.drop_corrupt();
        let mut i = 0;
        while i < self.readers.len() {
            let r = &self.readers[i];
            let pid = r.publisher_id();
            let left = self.gone.contains(&pid);
            if r.is_finished() || (left && !r.has_pending()) {
                self.readers.remove(i);
                self.gone.retain(|&g| g != pid);
                self.released.push(pid);
                if self.next > i {
                    self.next -= 1;
                }
            } else {
                i += 1;
            }
        }
        if self.next >= self.readers.len() {
            self.next = 0;
        }
        // Publishers whose ring we never got (or already dropped): let go of their slot too.
        let readers = &self.readers;
        let released = &mut self.released;
        self.gone.retain(|pid| {
            let reading = readers.iter().any(|r| r.publisher_id() == *pid);
            if !reading {
                released.push(*pid);
            }
            reading
        });
    }
}

/// The fd to wait on: readable when a wakeup or a control event arrived. An epoll fd holding
/// the wake socket and the notify eventfd, so it works with poll, epoll, io_uring and async
/// runtimes. Use it with [`Subscriber::prepare_to_wait`]:
///
/// ```no_run
/// # use std::os::fd::AsFd;
/// # let bus = bus_client::Bus::connect_default()?;
/// # let mut sub = bus.subscriber("t")?;
/// loop {
///     while let Some(sample) = sub.try_recv()? {
///         println!("{} bytes", sample.len());
///     }
///     if sub.prepare_to_wait() {
///         // poll(sub.as_fd(), POLLIN) here, or register it with your event loop.
/// #       break;
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl AsFd for Subscriber {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let SubKind::Shm(s) = &self.kind {
            // Publishers stop waiting for our cursors at once, before the broker's PEER_GONE.
            s.page.close();
        }
        let shared = &self.client.shared;
        shared.unregister(self.id);
        if !shared.is_gone() {
            fire(
                shared,
                Msg::Unsubscribe {
                    subscriber_id: self.id,
                },
            );
        }
    }
}

enum SampleInner<'a> {
    Ring(bus_core::ring::Sample<'a>),
    Owned(Delivered, PhantomData<&'a mut ()>),
}

/// One message. Derefs to its bytes: in place in the publisher's ring for a shared-memory
/// subscriber (zero copy; dropping the sample releases the space), or owned for a datagram
/// subscriber.
pub struct Sample<'a> {
    inner: SampleInner<'a>,
}

impl Sample<'_> {
    /// The message's sequence number in its publisher's stream (0, 1, 2...).
    pub fn seq(&self) -> u64 {
        match &self.inner {
            SampleInner::Ring(s) => s.seq(),
            SampleInner::Owned(d, _) => d.seq,
        }
    }

    /// When it was published: CLOCK_MONOTONIC nanoseconds (`bus_core::sys::clock`).
    pub fn timestamp_ns(&self) -> u64 {
        match &self.inner {
            SampleInner::Ring(s) => s.timestamp_ns(),
            SampleInner::Owned(d, _) => d.timestamp_ns,
        }
    }

    /// The publisher's id.
    pub fn publisher_id(&self) -> u64 {
        match &self.inner {
            SampleInner::Ring(s) => s.publisher_id(),
            SampleInner::Owned(d, _) => d.publisher_id,
        }
    }

    /// Messages of this publisher lost just before this one (lossy topics: overwritten before
    /// they were read). Always 0 on a reliable topic.
    pub fn lost_before(&self) -> u64 {
        match &self.inner {
            SampleInner::Ring(s) => s.lost_before(),
            SampleInner::Owned(d, _) => d.lost_before,
        }
    }

    /// Lossy topics: true if the bytes were not overwritten while you read them. Check it
    /// *after* reading (the seqlock pattern); on false, discard what you read. Always true on
    /// a reliable topic and for datagram subscribers.
    pub fn is_intact(&self) -> bool {
        match &self.inner {
            SampleInner::Ring(s) => s.is_intact(),
            SampleInner::Owned(..) => true,
        }
    }

    /// Copies the message out (with its metadata). `None` if, on a lossy topic, it was
    /// overwritten while being copied.
    pub fn to_owned_sample(&self) -> Option<OwnedSample> {
        let payload = self.to_vec();
        self.is_intact().then(|| OwnedSample {
            publisher_id: self.publisher_id(),
            seq: self.seq(),
            timestamp_ns: self.timestamp_ns(),
            lost_before: self.lost_before(),
            payload,
        })
    }
}

impl std::ops::Deref for Sample<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            SampleInner::Ring(s) => s,
            SampleInner::Owned(d, _) => &d.payload,
        }
    }
}

impl std::fmt::Debug for Sample<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sample")
            .field("publisher_id", &self.publisher_id())
            .field("seq", &self.seq())
            .field("len", &self.len())
            .field("timestamp_ns", &self.timestamp_ns())
            .field("lost_before", &self.lost_before())
            .finish()
    }
}

/// A copy of a message and its metadata ([`Sample::to_owned_sample`], [`Subscriber::iter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedSample {
    /// The publisher's id.
    pub publisher_id: u64,
    /// Sequence number in the publisher's stream.
    pub seq: u64,
    /// Publish time (CLOCK_MONOTONIC ns).
    pub timestamp_ns: u64,
    /// Messages lost just before this one.
    pub lost_before: u64,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// Iterator over copies of received messages ([`Subscriber::iter`]). Yields errors other than
/// "broker gone", which ends it.
#[derive(Debug)]
pub struct Iter<'a> {
    sub: &'a mut Subscriber,
}

impl Iterator for Iter<'_> {
    type Item = Result<OwnedSample, RecvError>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.sub.recv() {
                Ok(s) => match s.to_owned_sample() {
                    Some(o) => return Some(Ok(o)),
                    // Overwritten while copied (lossy topics only): skip it.
                    None => continue,
                },
                Err(RecvError::BrokerGone { .. }) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
