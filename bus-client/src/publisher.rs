//! [`Publisher`]: writes messages into its own ring (or, as a datagram publisher, sends them to
//! the broker), and [`Loan`]: space for one message, filled in place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::frame::{
    CreatePublisher, HEADER_BYTES, MAGIC, Msg, MsgType, PROTOCOL_VERSION, PUBLISH_FIXED_BYTES,
    RingRole,
};
use bus_core::layout::Mode;
use bus_core::ring::{CursorView, LoanError, RingConfig, Writer};
use bus_core::segment::{Access, map_cursor_page, map_ring};
use bus_core::wake::WakeSender;

use crate::bus::{Client, request_error};
use crate::conn::{Event, Inbox, Kind, Shared, TAG_PING, TAG_PUBLISH};
use crate::error::{BrokerError, OpenError, PublishError, PublisherError};
use crate::options::{TopicOptions, Transport};

/// A datagram publisher sends a flow-control PING after this many PUBLISH frames...
const PING_EVERY: u32 = 32;
/// ...and waits for PONGs while this many PINGs are unanswered, so that at most
/// `PING_EVERY * MAX_PINGS_IN_FLIGHT` messages are on their way to the broker.
const MAX_PINGS_IN_FLIGHT: u64 = 2;

/// How long a publish may wait for space.
#[derive(Clone, Copy)]
enum Wait {
    No,
    Until(Instant, Duration),
    Forever,
}

/// State of a datagram publisher.
struct Dgram {
    /// PUBLISH frame under construction: header, publisher id, then the payload (the loan).
    frame: Vec<u8>,
    seq: u64,
    since_ping: u32,
    pings_sent: u64,
    pongs_seen: u64,
    refused: Option<BrokerError>,
}

enum PubKind {
    Shm(Box<Writer>),
    Datagram(Dgram),
}

/// A publisher on one topic. Not `Sync`: one thread publishes at a time (move it between
/// threads freely).
///
/// ```no_run
/// # let bus = bus_client::Bus::connect_default()?;
/// let mut publisher = bus.publisher("frames")?;
/// // Copying send:
/// publisher.send(b"hello")?;
/// // Zero-copy: fill the ring in place, then commit.
/// let mut loan = publisher.loan(1024)?;
/// loan.fill(0xab);
/// loan.commit();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Publisher {
    client: Arc<Client>,
    inbox: Arc<Inbox>,
    seen_gen: u64,
    id: u64,
    topic: String,
    topic_id: u64,
    mode: Mode,
    max_message_bytes: usize,
    broker_gone: bool,
    /// A subscriber whose cursor the writer could not start honouring, and why: reported by
    /// the next publish ([`PublishError::Untracked`]), never ignored.
    untracked: Option<(u64, String)>,
    scratch: Vec<Event>,
    kind: PubKind,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("mode", &self.mode)
            .field("shared_memory", &self.is_shared_memory())
            .finish()
    }
}

enum CreateFailure {
    /// Shared memory could not be used: an Auto client falls back to datagrams.
    Segment(PublisherError),
    Other(PublisherError),
}

impl Publisher {
    pub(crate) fn create(
        client: Arc<Client>,
        topic: &str,
        options: TopicOptions,
    ) -> Result<Publisher, PublisherError> {
        if client.transport != Transport::Datagram {
            match Publisher::create_shm(&client, topic, options) {
                Ok(p) => return Ok(p),
                Err(CreateFailure::Segment(_)) if client.transport == Transport::Auto => {}
                Err(CreateFailure::Segment(e) | CreateFailure::Other(e)) => return Err(e),
            }
        }
        Publisher::create_datagram(client, topic, options)
    }

    fn new(
        client: Arc<Client>,
        inbox: Arc<Inbox>,
        topic: &str,
        grant: &bus_core::frame::RingGranted,
        kind: PubKind,
    ) -> Publisher {
        let mut max = grant.max_message_bytes as usize;
        if let PubKind::Datagram(_) = kind {
            max = max.min(client.welcome().max_datagram_message_bytes as usize);
        }
        Publisher {
            // Never equal to a real generation: the first look applies whatever the control
            // thread queued before this value existed (grants can arrive right after the OK).
            seen_gen: u64::MAX,
            client,
            inbox,
            id: grant.publisher_id,
            topic: topic.to_owned(),
            topic_id: grant.topic_id,
            mode: grant.mode,
            max_message_bytes: max,
            broker_gone: false,
            untracked: None,
            scratch: Vec::new(),
            kind,
        }
    }

    fn create_shm(
        client: &Arc<Client>,
        topic: &str,
        options: TopicOptions,
    ) -> Result<Publisher, CreateFailure> {
        let shared = &client.shared;
        let other = CreateFailure::Other;
        let inbox = Arc::new(Inbox::new(false).map_err(|e| other(e.into()))?);
        let mut reply = shared
            .request(Msg::CreatePublisher(CreatePublisher {
                ring_data_bytes: options.ring_bytes,
                max_message_bytes: options.max_message_bytes,
                mode: options.mode,
                transport: bus_core::frame::Transport::Shm,
                topic,
            }))
            .map_err(|e| other(request_error(e)))?;
        let grant = match reply.msg() {
            Msg::RingGranted(g) if g.role == RingRole::Writer && reply.fds.len() == 1 => g,
            msg => return Err(other(unexpected(msg, "RING_GRANTED (writer)"))),
        };
        let ring = reply.fds.pop().expect("checked: one fd");
        let cfg = RingConfig {
            mode: grant.mode,
            data_bytes: grant.data_bytes,
            max_message_bytes: grant.max_message_bytes,
            publisher_id: grant.publisher_id,
        };
        let writer = map_ring(&ring, grant.data_bytes as usize, Access::ReadWrite)
            .map_err(|e| e.to_string())
            .and_then(|map| Writer::create(map, cfg).map_err(|e| e.to_string()));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                fire(
                    shared,
                    Msg::ClosePublisher {
                        publisher_id: grant.publisher_id,
                    },
                );
                return Err(CreateFailure::Segment(PublisherError::Ring(e)));
            }
        };
        drop(ring);
        // Route events before READY: CURSOR_GRANTED may follow the OK at once.
        shared.register(
            grant.publisher_id,
            Kind::Publisher,
            grant.topic_id,
            inbox.clone(),
        );
        let ready = shared.request(Msg::PublisherReady {
            publisher_id: grant.publisher_id,
        });
        let result = match ready {
            Ok(r) => match r.msg() {
                Msg::Ok => Ok(()),
                msg => Err(unexpected(msg, "OK")),
            },
            Err(e) => Err(request_error(e)),
        };
        if let Err(e) = result {
            shared.unregister(grant.publisher_id);
            return Err(other(e));
        }
        let mut publisher = Publisher::new(
            client.clone(),
            inbox,
            topic,
            &grant,
            PubKind::Shm(Box::new(writer)),
        );
        // The broker sends a CURSOR_GRANTED for every subscriber already on the topic before
        // the OK (docs/protocol.md, handoff sequence): they are all in the inbox now. They will
        // read this ring from its first record, so they count as being at position 0 until
        // they attach, and nothing is overwritten before they have read it.
        publisher.apply_events(true);
        Ok(publisher)
    }

    fn create_datagram(
        client: Arc<Client>,
        topic: &str,
        options: TopicOptions,
    ) -> Result<Publisher, PublisherError> {
        let shared = &client.shared;
        let inbox = Arc::new(Inbox::new(false)?);
        let reply = shared
            .request(Msg::CreatePublisher(CreatePublisher {
                ring_data_bytes: options.ring_bytes,
                max_message_bytes: options.max_message_bytes,
                mode: options.mode,
                transport: bus_core::frame::Transport::Datagram,
                topic,
            }))
            .map_err(request_error::<PublisherError>)?;
        let grant = match reply.msg() {
            Msg::RingGranted(g) if g.role == RingRole::Datagram => g,
            msg => return Err(unexpected(msg, "RING_GRANTED (fallback)")),
        };
        shared.register(
            grant.publisher_id,
            Kind::Publisher,
            grant.topic_id,
            inbox.clone(),
        );
        let dgram = Dgram {
            frame: Vec::with_capacity(HEADER_BYTES + PUBLISH_FIXED_BYTES + 4096),
            seq: 0,
            since_ping: 0,
            pings_sent: 0,
            pongs_seen: 0,
            refused: None,
        };
        Ok(Publisher::new(
            client.clone(),
            inbox,
            topic,
            &grant,
            PubKind::Datagram(dgram),
        ))
    }

    /// The publisher id the broker assigned (what subscribers see in
    /// [`crate::Sample::publisher_id`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic's id (broker-assigned).
    pub fn topic_id(&self) -> u64 {
        self.topic_id
    }

    /// The topic's delivery mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The largest message this publisher may send.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// True for a shared-memory publisher, false for a datagram (fallback) one.
    pub fn is_shared_memory(&self) -> bool {
        matches!(self.kind, PubKind::Shm(_))
    }

    /// Subscribers whose cursors this publisher currently honours and wakes (a datagram
    /// subscriber counts too: the broker reads for it through a cursor page of its own);
    /// `None` for a datagram publisher, whose ring the broker writes.
    pub fn subscriber_count(&mut self) -> Option<usize> {
        self.check_events();
        match &self.kind {
            PubKind::Shm(w) => Some(w.reader_count()),
            PubKind::Datagram(_) => None,
        }
    }

    /// Copies `payload` into the ring and publishes it; returns its sequence number. On a
    /// reliable topic, waits while a subscriber has not released space (the broker evicts a
    /// subscriber that stalls past the topic's limit, so this does not wait forever).
    pub fn send<'p>(&mut self, payload: &'p [u8]) -> Result<u64, PublishError<&'p [u8]>> {
        self.send_inner(payload, Wait::Forever)
    }

    /// [`Publisher::send`] without waiting: [`PublishError::Full`] if the ring is full.
    pub fn try_send<'p>(&mut self, payload: &'p [u8]) -> Result<u64, PublishError<&'p [u8]>> {
        self.send_inner(payload, Wait::No)
    }

    /// [`Publisher::send`] waiting at most `timeout` for space.
    pub fn send_timeout<'p>(
        &mut self,
        payload: &'p [u8],
        timeout: Duration,
    ) -> Result<u64, PublishError<&'p [u8]>> {
        self.send_inner(payload, Wait::Until(Instant::now() + timeout, timeout))
    }

    #[inline]
    fn send_inner<'p>(
        &mut self,
        payload: &'p [u8],
        wait: Wait,
    ) -> Result<u64, PublishError<&'p [u8]>> {
        match self.loan_inner(payload.len(), wait) {
            Ok(mut loan) => {
                loan.copy_from_slice(payload);
                Ok(loan.commit())
            }
            Err(e) => Err(e.map(|()| payload)),
        }
    }

    /// Space for a `len`-byte message in the ring, to fill in place; [`Loan::commit`]
    /// publishes it, dropping the loan publishes nothing. Waits for space like
    /// [`Publisher::send`]. A datagram publisher loans a local buffer instead.
    pub fn loan(&mut self, len: usize) -> Result<Loan<'_>, PublishError<()>> {
        self.loan_inner(len, Wait::Forever)
    }

    /// [`Publisher::loan`] without waiting.
    pub fn try_loan(&mut self, len: usize) -> Result<Loan<'_>, PublishError<()>> {
        self.loan_inner(len, Wait::No)
    }

    /// [`Publisher::loan`] waiting at most `timeout`.
    pub fn loan_timeout(
        &mut self,
        len: usize,
        timeout: Duration,
    ) -> Result<Loan<'_>, PublishError<()>> {
        self.loan_inner(len, Wait::Until(Instant::now() + timeout, timeout))
    }

    #[inline]
    fn loan_inner(&mut self, len: usize, wait: Wait) -> Result<Loan<'_>, PublishError<()>> {
        self.reserve(len, wait)?;
        let Publisher {
            client, kind, id, ..
        } = self;
        match kind {
            // reserve() just found the space and nobody else touches the writer, so this
            // cannot fail; the error arms only keep the code total.
            PubKind::Shm(w) => match w.try_loan(len) {
                Ok(l) => Ok(Loan {
                    inner: LoanInner::Ring(l),
                }),
                Err(LoanError::TooLarge { len, max }) => Err(PublishError::TooLarge { len, max }),
                Err(_) => Err(PublishError::Full(())),
            },
            PubKind::Datagram(dg) => {
                let start = HEADER_BYTES + PUBLISH_FIXED_BYTES;
                dg.frame.clear();
                dg.frame.resize(start + len, 0);
                Ok(Loan {
                    inner: LoanInner::Local {
                        dg,
                        shared: &client.shared,
                        publisher_id: *id,
                    },
                })
            }
        }
    }

    /// Applies what the control thread queued for this publisher. One Relaxed load when
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
        self.apply_events(false);
    }

    /// Applies queued events; `from_start`: the cursor grants are for subscribers that were on
    /// the topic before this publisher.
    fn apply_events(&mut self, from_start: bool) {
        self.seen_gen = self.inbox.generation();
        if self.client.shared.is_gone() {
            self.broker_gone = true;
        }
        let mut events = std::mem::take(&mut self.scratch);
        self.inbox.take_events(&mut events);
        for ev in events.drain(..) {
            match (ev, &mut self.kind) {
                (
                    Event::CursorGranted {
                        subscriber_id,
                        slot,
                        page,
                        wake,
                    },
                    PubKind::Shm(w),
                ) => {
                    // A page we cannot use belongs to a broken subscriber: not waiting for it
                    // only hurts that subscriber, but it is said (the next publish reports it).
                    let added = map_cursor_page(&page, Access::ReadOnly)
                        .map_err(|e| e.to_string())
                        .and_then(|m| {
                            CursorView::attach(m, subscriber_id).map_err(|e| e.to_string())
                        })
                        .and_then(|view| {
                            let wake = Some(WakeSender::from_fd(wake));
                            if from_start {
                                w.add_reader_from_start(view, usize::from(slot), wake)
                            } else {
                                w.add_reader(view, usize::from(slot), wake)
                            }
                            .map_err(|e| e.to_string())
                        });
                    if let Err(detail) = added {
                        self.untracked.get_or_insert((subscriber_id, detail));
                    }
                }
                (Event::SubscriberGone { subscriber_id }, PubKind::Shm(w)) => {
                    w.remove_reader(subscriber_id);
                }
                (Event::Refused(e), PubKind::Datagram(dg)) => {
                    dg.refused.get_or_insert(e);
                }
                (Event::Pong { token }, PubKind::Datagram(dg)) => {
                    dg.pongs_seen = dg.pongs_seen.max(token);
                }
                _ => {}
            }
        }
        self.scratch = events;
    }

    /// Checks `len`, applies events, and waits (as `wait` allows) until a record of `len` bytes
    /// fits.
    #[inline]
    fn reserve(&mut self, len: usize, wait: Wait) -> Result<(), PublishError<()>> {
        if len > self.max_message_bytes {
            return Err(PublishError::TooLarge {
                len,
                max: self.max_message_bytes,
            });
        }
        let mut round: u32 = 0;
        loop {
            self.check_events();
            if self.broker_gone {
                return Err(PublishError::BrokerGone {
                    payload: (),
                    reason: self.client.shared.gone_reason(),
                });
            }
            if let Some((subscriber_id, detail)) = self.untracked.take() {
                return Err(PublishError::Untracked {
                    payload: (),
                    subscriber_id,
                    detail,
                });
            }
            match &mut self.kind {
                PubKind::Shm(w) => match w.try_loan(len) {
                    // The probe loan is dropped unpublished; loan_inner takes it for real.
                    Ok(_) => return Ok(()),
                    Err(LoanError::TooLarge { len, max }) => {
                        return Err(PublishError::TooLarge { len, max });
                    }
                    Err(_) => {}
                },
                PubKind::Datagram(dg) => {
                    if let Some(error) = dg.refused.take() {
                        return Err(PublishError::Refused { payload: (), error });
                    }
                    if dg.pings_sent - dg.pongs_seen < MAX_PINGS_IN_FLIGHT {
                        return Ok(());
                    }
                }
            }
            let now = Instant::now();
            let left = match wait {
                Wait::No => return Err(PublishError::Full(())),
                Wait::Until(deadline, after) if now >= deadline => {
                    return Err(PublishError::Timeout { payload: (), after });
                }
                Wait::Until(deadline, _) => deadline - now,
                Wait::Forever => Duration::from_secs(1),
            };
            match &self.kind {
                // Readers do not signal writers: spin, then yield, then nap briefly.
                PubKind::Shm(_) => {
                    round = round.saturating_add(1);
                    if round < 1_000 {
                        std::hint::spin_loop();
                    } else if round < 1_100 {
                        std::thread::yield_now();
                    } else {
                        let nap =
                            Duration::from_micros(50 * u64::from((round - 1_100).min(20) + 1));
                        std::thread::sleep(nap.min(left));
                    }
                }
                // The PONG arrives through the inbox.
                PubKind::Datagram(_) => self.inbox.wait_event(left.min(Duration::from_millis(100))),
            }
        }
    }
}

/// Sends a request without waiting for its reply (the reply is dropped).
pub(crate) fn fire(shared: &Shared, msg: Msg<'_>) {
    let _ = shared.send_msg(u64::MAX >> 2, msg);
}

pub(crate) fn unexpected<E: OpenError>(msg: Msg<'_>, expected: &str) -> E {
    match msg {
        Msg::Error(e) => E::refused(BrokerError {
            code: e.code,
            message: e.message.to_owned(),
        }),
        other => E::protocol(format!(
            "expected {expected}, got {} (or the wrong fds)",
            other.msg_type()
        )),
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let PubKind::Shm(w) = &mut self.kind {
            // Subscribers drain what is left, then see the ring finished.
            w.close();
        }
        let shared = &self.client.shared;
        shared.unregister(self.id);
        if !shared.is_gone() {
            fire(
                shared,
                Msg::ClosePublisher {
                    publisher_id: self.id,
                },
            );
        }
    }
}

enum LoanInner<'a> {
    Ring(bus_core::ring::Loan<'a>),
    Local {
        dg: &'a mut Dgram,
        shared: &'a Shared,
        publisher_id: u64,
    },
}

/// Space for one message: in the ring (shared memory), or a local buffer (datagram
/// publisher). Derefs to the message bytes; fill them, then [`Loan::commit`]. Dropping a loan
/// publishes nothing.
pub struct Loan<'a> {
    inner: LoanInner<'a>,
}

impl Loan<'_> {
    /// Publishes the message; returns its sequence number. Never fails: a datagram publisher
    /// that finds the broker gone reports it on the next call.
    pub fn commit(self) -> u64 {
        match self.inner {
            LoanInner::Ring(l) => l.commit(),
            LoanInner::Local {
                dg,
                shared,
                publisher_id,
            } => {
                let len = dg.frame.len();
                write_publish_header(&mut dg.frame[..], publisher_id);
                debug_assert_eq!(dg.frame.len(), len);
                // A failure means the broker is gone; the control thread sees the EOF and the
                // next call reports it.
                let _ = shared.send(&dg.frame);
                let seq = dg.seq;
                dg.seq += 1;
                dg.since_ping += 1;
                if dg.since_ping >= PING_EVERY {
                    dg.since_ping = 0;
                    dg.pings_sent += 1;
                    let _ = shared.send_msg(
                        TAG_PING | publisher_id,
                        Msg::Ping {
                            token: dg.pings_sent,
                        },
                    );
                }
                seq
            }
        }
    }
}

/// Writes a PUBLISH header and publisher id in front of the payload already in `frame`
/// (`docs/protocol.md` §3 and §6; checked against the codec by a unit test).
fn write_publish_header(frame: &mut [u8], publisher_id: u64) {
    let body_len = (frame.len() - HEADER_BYTES) as u32;
    frame[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    frame[4] = PROTOCOL_VERSION;
    frame[5] = 0;
    frame[6..8].copy_from_slice(&MsgType::Publish.to_raw().to_le_bytes());
    frame[8..12].copy_from_slice(&body_len.to_le_bytes());
    frame[12..14].copy_from_slice(&0u16.to_le_bytes());
    frame[14..16].copy_from_slice(&0u16.to_le_bytes());
    frame[16..24].copy_from_slice(&(TAG_PUBLISH | publisher_id).to_le_bytes());
    frame[24..32].copy_from_slice(&publisher_id.to_le_bytes());
}

impl std::ops::Deref for Loan<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            LoanInner::Ring(l) => l,
            LoanInner::Local { dg, .. } => &dg.frame[HEADER_BYTES + PUBLISH_FIXED_BYTES..],
        }
    }
}

impl std::ops::DerefMut for Loan<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.inner {
            LoanInner::Ring(l) => l,
            LoanInner::Local { dg, .. } => &mut dg.frame[HEADER_BYTES + PUBLISH_FIXED_BYTES..],
        }
    }
}

impl std::fmt::Debug for Loan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loan").field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_core::frame::{Frame, Publish};

    #[test]
    fn handmade_publish_header_matches_the_codec() {
        let payload = b"hello";
        let mut frame = vec![0u8; HEADER_BYTES + PUBLISH_FIXED_BYTES];
        frame.extend_from_slice(payload);
        write_publish_header(&mut frame, 42);
        let decoded = Frame::decode(&frame).expect("valid frame");
        assert_eq!(
            decoded,
            Frame::new(
                TAG_PUBLISH | 42,
                Msg::Publish(Publish {
                    publisher_id: 42,
                    payload
                })
            )
        );
    }
}
