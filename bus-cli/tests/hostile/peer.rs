//! A hostile peer: speaks the control protocol itself (bus_core::frame + bus_core::sys::scm),
//! maps the segments it is the writer of, and can then write any bytes into them. Also plain
//! datagram publishers and subscribers written from docs/protocol.md.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus_core::frame::{
    CreatePublisher, ErrorCode, Frame, Hello, ModeRequest, Msg, Publish, RingGranted, RingRole,
    Subscribe, Subscribed, Transport, decode,
};
use bus_core::layout::{self, RingHeader, cursor_slot_offset};
use bus_core::limits::MAX_FRAME_BYTES;
use bus_core::ring::{CursorPage, RingConfig, Writer};
use bus_core::segment::{self, Access, Mapping, RingMapping};
use bus_core::sys::scm::{self, FdBatch, Received};
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketType};

use crate::support::DEADLINE;

/// Offsets of the ring-header words a writer may scribble on.
pub const NEXT_POS: usize = std::mem::offset_of!(RingHeader, next_pos);
pub const NEXT_SEQ: usize = std::mem::offset_of!(RingHeader, next_seq);
pub const LAST_POS: usize = std::mem::offset_of!(RingHeader, last_pos);
pub const CLAIM: usize = std::mem::offset_of!(RingHeader, claim);
pub const CLOSED: usize = std::mem::offset_of!(RingHeader, closed);
pub const END_SEQ: usize = std::mem::offset_of!(RingHeader, end_seq);

/// One received frame and the fds that came with it.
pub struct Incoming {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Incoming {
    pub fn frame(&self) -> Frame<'_> {
        decode(&self.bytes).expect("the broker sent a valid frame")
    }
    pub fn request_id(&self) -> u64 {
        self.frame().request_id
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} (+{} fds)", decode(&self.bytes), self.fds.len())
    }
}

pub enum Polled {
    Frame(Incoming),
    Eof,
    Timeout,
}

/// A raw connection to the broker.
pub struct Conn {
    pub fd: OwnedFd,
    next_rid: u64,
    /// Frames that arrived while waiting for a reply (events, mostly).
    pub events: VecDeque<Incoming>,
    pub client_id: u64,
}

impl Conn {
    /// Connects and says HELLO with `transport`.
    pub fn connect(path: &Path, transport: Transport) -> Conn {
        let fd =
            rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).expect("socket");
        rustix::net::connect(&fd, &SocketAddrUnix::new(path).unwrap()).expect("connect");
        let mut c = Conn {
            fd,
            next_rid: 1,
            events: VecDeque::new(),
            client_id: 0,
        };
        let reply = c.request(Msg::Hello(Hello {
            protocol_version: 1,
            transport,
            client_name: "hostile",
        }));
        match reply.frame().msg {
            Msg::Welcome(w) => c.client_id = w.client_id,
            other => panic!("expected WELCOME, got {other:?}"),
        }
        c
    }

    pub fn rid(&mut self) -> u64 {
        self.next_rid += 1;
        self.next_rid
    }

    pub fn send(&self, request_id: u64, msg: Msg<'_>) -> std::io::Result<()> {
        let mut out = Vec::new();
        Frame::new(request_id, msg).encode(&mut out).unwrap();
        scm::send_frame(self.fd.as_fd(), &out, &[]).map(|_| ())
    }

    pub fn try_send(&self, request_id: u64, msg: Msg<'_>) -> std::io::Result<()> {
        let mut out = Vec::new();
        Frame::new(request_id, msg).encode(&mut out).unwrap();
        scm::send_frame_with(self.fd.as_fd(), &out, &[], SendFlags::DONTWAIT).map(|_| ())
    }

    /// The next frame within `timeout` (from the socket, not the event queue).
    pub fn poll(&self, timeout: Duration) -> Polled {
        match bus_core::wake::wait_readable(self.fd.as_fd(), Some(timeout)) {
            Ok(false) => return Polled::Timeout,
            Ok(true) => {}
            Err(e) => panic!("poll: {e}"),
        }
        let mut buf = vec![0u8; MAX_FRAME_BYTES];
        let mut fds = FdBatch::new();
        match scm::try_recv_frame(self.fd.as_fd(), &mut buf, &mut fds) {
            Ok(Received::Frame { len }) => {
                buf.truncate(len);
                let mut owned = Vec::new();
                for i in 0..fds.len() {
                    if let Some(fd) = fds.take(i) {
                        owned.push(fd);
                    }
                }
                Polled::Frame(Incoming {
                    bytes: buf,
                    fds: owned,
                })
            }
            Ok(Received::Eof) => Polled::Eof,
            Err(e) if e.is_would_block() => Polled::Timeout,
            Err(e) => {
                let s = e.to_string();
                if s.contains("reset") || s.contains("ECONNRESET") {
                    Polled::Eof
                } else {
                    panic!("receive failed: {e}")
                }
            }
        }
    }

    /// The next frame from the socket, within [`DEADLINE`]; panics at end of stream.
    pub fn recv(&self) -> Incoming {
        match self.poll(DEADLINE) {
            Polled::Frame(f) => f,
            Polled::Eof => panic!("the broker closed the connection"),
            Polled::Timeout => panic!("no frame from the broker within {DEADLINE:?}"),
        }
    }

    /// The next event: queued first, then from the socket within `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Incoming> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        match self.poll(timeout) {
            Polled::Frame(f) => Some(f),
            Polled::Eof | Polled::Timeout => None,
        }
    }

    /// Sends a request and returns the frame carrying its request id; other frames are queued.
    pub fn request(&mut self, msg: Msg<'_>) -> Incoming {
        let rid = self.rid();
        self.send(rid, msg).expect("send a request");
        self.reply_to(rid)
    }

    pub fn reply_to(&mut self, rid: u64) -> Incoming {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no reply to request {rid} within {DEADLINE:?}"
            );
            match self.poll(left) {
                Polled::Frame(f) if f.request_id() == rid => return f,
                Polled::Frame(f) => self.events.push_back(f),
                Polled::Eof => panic!("the broker closed the connection before replying"),
                Polled::Timeout => {}
            }
        }
    }

    /// A request expected to fail: the ERROR's code and message.
    pub fn request_error(&mut self, msg: Msg<'_>) -> (ErrorCode, String) {
        let what = format!("{msg:?}");
        let reply = self.request(msg);
        match reply.frame().msg {
            Msg::Error(e) => (e.code, e.message.to_owned()),
            other => panic!("expected ERROR for {what}, got {other:?}"),
        }
    }

    /// The broker's stats document (STATS_REQUEST on this connection).
    pub fn stats(&mut self) -> serde_json::Value {
        let rid = self.rid();
        self.send(rid, Msg::StatsRequest).unwrap();
        let mut doc = String::new();
        loop {
            let f = self.reply_to(rid);
            match f.frame().msg {
                Msg::StatsReply(r) => {
                    doc.push_str(r.json);
                    if !r.more {
                        break;
                    }
                }
                other => panic!("expected STATS_REPLY, got {other:?}"),
            }
        }
        serde_json::from_str(&doc).expect("stats JSON")
    }

    pub fn ping(&mut self) {
        let reply = self.request(Msg::Ping { token: 42 });
        assert!(
            matches!(reply.frame().msg, Msg::Pong { token: 42 }),
            "{reply:?}"
        );
    }
}

/// Atomic view of a u64 inside a mapping we are the writer of.
///
/// # Safety
///
/// `base + off` must be 8-aligned and inside a live mapping.
unsafe fn word<'a>(base: *const u8, off: usize) -> &'a AtomicU64 {
    // SAFETY: the caller guarantees alignment and that the mapping outlives the reference;
    // shared memory is only ever accessed atomically or volatilely.
    unsafe { AtomicU64::from_ptr(base.add(off) as *mut u64) }
}

/// A shared-memory publisher that follows the protocol just far enough to be live, then
/// writes whatever it likes into its own ring.
pub struct HostilePub {
    pub conn: Conn,
    pub grant: RingGranted,
    /// The honest writer (for valid records).
    pub writer: Writer,
    /// A second read-write mapping of the same ring, for arbitrary writes.
    pub raw: RingMapping,
    /// Wake sockets of the subscribers the broker introduced (CURSOR_GRANTED), and their pages.
    pub wakes: Vec<OwnedFd>,
    pub cursor_fds: Vec<OwnedFd>,
}

impl HostilePub {
    /// CREATE_PUBLISHER (shm), map, initialise, PUBLISHER_READY.
    pub fn create(path: &Path, topic: &str, ring_bytes: u64, mode: ModeRequest) -> HostilePub {
        let mut conn = Conn::connect(path, Transport::Shm);
        let mut reply = conn.request(Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: ring_bytes,
            max_message_bytes: 0,
            mode,
            transport: Transport::Shm,
            topic,
        }));
        let grant = match reply.frame().msg {
            Msg::RingGranted(g) => g,
            other => panic!("expected RING_GRANTED, got {other:?}"),
        };
        assert_eq!(grant.role, RingRole::Writer);
        let fd = reply.fds.pop().expect("RING_GRANTED carries the ring");
        let data = grant.data_bytes as usize;
        let map = segment::map_ring(&fd, data, Access::ReadWrite).expect("map the ring rw");
        let raw = segment::map_ring(&fd, data, Access::ReadWrite).expect("map the ring rw again");
        let writer = Writer::create(
            map,
            RingConfig {
                mode: grant.mode,
                data_bytes: grant.data_bytes,
                max_message_bytes: grant.max_message_bytes,
                publisher_id: grant.publisher_id,
            },
        )
        .expect("Writer::create");
        drop(fd);
        let mut p = HostilePub {
            conn,
            grant,
            writer,
            raw,
            wakes: Vec::new(),
            cursor_fds: Vec::new(),
        };
        let reply = p.conn.request(Msg::PublisherReady {
            publisher_id: grant.publisher_id,
        });
        assert!(
            matches!(reply.frame().msg, Msg::Ok),
            "PUBLISHER_READY: {reply:?}"
        );
        p.pump();
        p
    }

    /// Takes queued and pending events (CURSOR_GRANTED: keep the wake socket).
    pub fn pump(&mut self) {
        loop {
            let Some(mut ev) = self.conn.next_event(Duration::ZERO) else {
                return;
            };
            if matches!(ev.frame().msg, Msg::CursorGranted(_)) && ev.fds.len() == 2 {
                let wake = ev.fds.pop().unwrap();
                let page = ev.fds.pop().unwrap();
                self.wakes.push(wake);
                self.cursor_fds.push(page);
            }
        }
    }

    /// Waits until the broker introduced `n` subscribers.
    pub fn wait_subscribers(&mut self, n: usize) {
        crate::support::wait_until(&format!("{n} CURSOR_GRANTED arrive"), || {
            self.pump();
            self.wakes.len() >= n
        });
    }

    /// An honest record; then wakes everyone.
    pub fn publish(&mut self, payload: &[u8]) -> u64 {
        self.pump();
        let seq = self
            .writer
            .try_publish(payload)
            .expect("the hostile writer has no readers to wait for");
        self.wake_all();
        seq
    }

    /// One wake datagram to every subscriber it knows (parked or not).
    pub fn wake_all(&mut self) {
        self.pump();
        for w in &self.wakes {
            let _ = rustix::net::send(w, &[1u8], SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
        }
    }

    pub fn header(&self, off: usize) -> u64 {
        assert!(off.is_multiple_of(8) && off + 8 <= layout::RING_HEADER_BYTES);
        // SAFETY: 8-aligned offset inside the header page of our live mapping.
        unsafe { word(self.raw.header_ptr(), off) }.load(Ordering::Acquire)
    }

    pub fn set_header(&self, off: usize, value: u64) {
        assert!(off.is_multiple_of(8) && off + 8 <= layout::RING_HEADER_BYTES);
        // SAFETY: 8-aligned offset inside the header page of our own read-write mapping.
        unsafe { word(self.raw.header_mut_ptr(), off) }.store(value, Ordering::Release);
    }

    pub fn data_bytes(&self) -> usize {
        self.grant.data_bytes as usize
    }

    /// Writes `bytes` at data offset `off` (may run into the second copy of the data area).
    pub fn write_data(&self, off: usize, bytes: &[u8]) {
        assert!(off < self.data_bytes() && bytes.len() <= self.data_bytes());
        // SAFETY: the data area is mapped twice back to back, so off + len <= 2 * data_bytes
        // stays inside our read-write mapping; plain bytes, we are the only writer.
        unsafe {
            let p = self.raw.data_mut_ptr().add(off);
            for (i, b) in bytes.iter().enumerate() {
                std::ptr::write_volatile(p.add(i), *b);
            }
        }
    }

    /// Stores one u64 of a record header at absolute position `pos` + `field` (atomically).
    pub fn set_record_word(&self, pos: u64, field: usize, value: u64) {
        let off = (pos as usize % self.data_bytes()) + field;
        assert!(off.is_multiple_of(8));
        // SAFETY: 8-aligned, inside the (doubled) data area of our read-write mapping.
        unsafe { word(self.raw.data_mut_ptr(), off) }.store(value, Ordering::Release);
    }
}

/// A shared-memory subscriber that follows the protocol far enough to be live, then writes
/// whatever it likes into its own cursor page.
pub struct HostileSub {
    pub conn: Conn,
    pub subscribed: Subscribed,
    pub page: CursorPage,
    /// A second read-write mapping of the cursor page, for arbitrary writes.
    pub raw: Mapping,
    pub wake: OwnedFd,
    /// Rings granted to it: (grant, read-only mapping).
    pub rings: Vec<(RingGranted, RingMapping)>,
}

impl HostileSub {
    pub fn subscribe(path: &Path, topic: &str, mode: ModeRequest) -> HostileSub {
        let mut conn = Conn::connect(path, Transport::Shm);
        let mut reply = conn.request(Msg::Subscribe(Subscribe {
            mode,
            delivery: Transport::Shm,
            topic,
        }));
        let subscribed = match reply.frame().msg {
            Msg::Subscribed(s) => s,
            other => panic!("expected SUBSCRIBED, got {other:?}"),
        };
        assert_eq!(
            reply.fds.len(),
            2,
            "SUBSCRIBED (shm) carries a page and a wake socket"
        );
        let wake = reply.fds.pop().unwrap();
        let page_fd = reply.fds.pop().unwrap();
        let map = segment::map_cursor_page(&page_fd, Access::ReadWrite).expect("map page rw");
        let raw = segment::map_cursor_page(&page_fd, Access::ReadWrite).expect("map page again");
        let page = CursorPage::init(map, subscribed.subscriber_id).expect("CursorPage::init");
        let mut s = HostileSub {
            conn,
            subscribed,
            page,
            raw,
            wake,
            rings: Vec::new(),
        };
        let reply = s.conn.request(Msg::SubscriberReady {
            subscriber_id: subscribed.subscriber_id,
        });
        assert!(
            matches!(reply.frame().msg, Msg::Ok),
            "SUBSCRIBER_READY: {reply:?}"
        );
        s.pump();
        s
    }

    /// Takes events: RING_GRANTED rings are mapped read-only. Returns whether it was evicted.
    pub fn pump(&mut self) -> bool {
        let mut evicted = false;
        while let Some(mut ev) = self.conn.next_event(Duration::ZERO) {
            match ev.frame().msg {
                Msg::RingGranted(g) if g.role.is_reader() => {
                    let fd = ev.fds.pop().expect("ring fd");
                    let map = segment::map_ring(&fd, g.data_bytes as usize, Access::ReadOnly)
                        .expect("map a granted ring read-only");
                    self.rings.push((g, map));
                }
                Msg::Evicted(_) => evicted = true,
                _ => {}
            }
        }
        evicted
    }

    pub fn wait_rings(&mut self, n: usize) {
        crate::support::wait_until(&format!("{n} RING_GRANTED arrive"), || {
            self.pump();
            self.rings.len() >= n
        });
    }

    /// Writes the read cursor of publisher slot `slot`.
    pub fn set_cursor(&self, slot: usize, value: u64) {
        assert!(slot < layout::CURSOR_SLOTS);
        // SAFETY: cursor_slot_offset is 8-aligned and inside the page; our rw mapping.
        unsafe { word(self.raw.as_mut_ptr(), cursor_slot_offset(slot)) }
            .store(value, Ordering::Release);
    }

    /// A header word of granted ring `i` (read-only mapping).
    pub fn ring_header(&self, i: usize, off: usize) -> u64 {
        assert!(off.is_multiple_of(8) && off + 8 <= layout::RING_HEADER_BYTES);
        // SAFETY: 8-aligned inside the header page of a live (read-only) mapping; only loads.
        unsafe { word(self.rings[i].1.header_ptr(), off) }.load(Ordering::Acquire)
    }
}

/// A datagram publisher (HELLO transport datagram, CREATE_PUBLISHER, PUBLISH).
pub struct DgramPub {
    pub conn: Conn,
    pub grant: RingGranted,
}

impl DgramPub {
    pub fn create(path: &Path, topic: &str, mode: ModeRequest) -> DgramPub {
        let mut conn = Conn::connect(path, Transport::Datagram);
        let reply = conn.request(Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: 0,
            max_message_bytes: 0,
            mode,
            transport: Transport::Datagram,
            topic,
        }));
        let grant = match reply.frame().msg {
            Msg::RingGranted(g) => g,
            other => panic!("expected RING_GRANTED (fallback), got {other:?}"),
        };
        assert_eq!(grant.role, RingRole::Datagram);
        DgramPub { conn, grant }
    }

    pub fn id(&self) -> u64 {
        self.grant.publisher_id
    }

    /// One PUBLISH (blocking send; request id 0: no reply on success).
    pub fn publish(&self, payload: &[u8]) {
        self.conn
            .send(
                0,
                Msg::Publish(Publish {
                    publisher_id: self.grant.publisher_id,
                    payload,
                }),
            )
            .expect("send PUBLISH");
    }

    /// Fails if the broker refused any PUBLISH so far (an ERROR is waiting on the socket).
    pub fn assert_no_error(&mut self) {
        while let Polled::Frame(f) = self.conn.poll(Duration::ZERO) {
            if let Msg::Error(e) = f.frame().msg {
                panic!("the broker refused a PUBLISH: {:?} {}", e.code, e.message);
            }
            self.conn.events.push_back(f);
        }
    }

    /// CLOSE_PUBLISHER, expecting OK.
    pub fn close(mut self) {
        let id = self.grant.publisher_id;
        let reply = self.conn.request(Msg::ClosePublisher { publisher_id: id });
        match reply.frame().msg {
            Msg::Ok => {}
            other => panic!("CLOSE_PUBLISHER: expected OK, got {other:?}"),
        }
    }
}

/// One DELIVER, owned.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub publisher_id: u64,
    pub seq: u64,
    pub lost_before: u64,
    pub payload: Vec<u8>,
}

pub enum DgramEvent {
    Deliver(Delivered),
    Evicted(String),
    Other(String),
    Eof,
}

/// A datagram subscriber.
pub struct DgramSub {
    pub conn: Conn,
    pub subscriber_id: u64,
}

impl DgramSub {
    pub fn subscribe(path: &Path, topic: &str, mode: ModeRequest) -> DgramSub {
        let mut conn = Conn::connect(path, Transport::Datagram);
        let reply = conn.request(Msg::Subscribe(Subscribe {
            mode,
            delivery: Transport::Datagram,
            topic,
        }));
        let s = match reply.frame().msg {
            Msg::Subscribed(s) => s,
            other => panic!("expected SUBSCRIBED, got {other:?}"),
        };
        assert!(reply.fds.is_empty());
        DgramSub {
            conn,
            subscriber_id: s.subscriber_id,
        }
    }

    /// The next event within `timeout`, `None` on timeout.
    pub fn next(&mut self, timeout: Duration) -> Option<DgramEvent> {
        let f = if let Some(f) = self.conn.events.pop_front() {
            f
        } else {
            match self.conn.poll(timeout) {
                Polled::Frame(f) => f,
                Polled::Eof => return Some(DgramEvent::Eof),
                Polled::Timeout => return None,
            }
        };
        Some(match f.frame().msg {
            Msg::Deliver(d) => DgramEvent::Deliver(Delivered {
                publisher_id: d.publisher_id,
                seq: d.seq,
                lost_before: d.lost_before,
                payload: d.payload.to_vec(),
            }),
            Msg::Evicted(e) => DgramEvent::Evicted(format!("{:?}: {}", e.reason, e.message)),
            other => DgramEvent::Other(format!("{other:?}")),
        })
    }

    /// The next DELIVER within [`DEADLINE`]; panics on eviction, end of stream or timeout.
    pub fn deliver(&mut self) -> Delivered {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no DELIVER within {DEADLINE:?}");
            match self.next(left) {
                Some(DgramEvent::Deliver(d)) => return d,
                Some(DgramEvent::Evicted(why)) => panic!("datagram subscriber evicted: {why}"),
                Some(DgramEvent::Eof) => panic!("the broker closed the datagram subscriber"),
                Some(DgramEvent::Other(_)) | None => {}
            }
        }
    }
}
