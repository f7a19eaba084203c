//! The engine without sockets: frames in, actions out, real memfds in between.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits::Limits;
use bus_core::frame::{
    CreatePublisher, ErrorCode, Frame, Hello, ModeRequest, Msg, PeerGoneReason, PeerKind, Publish,
    RingRole, Subscribe, Transport,
};
use bus_core::layout::Mode;
use bus_core::ring::{CursorPage, Reader, RingConfig, StartAt, Writer};
use bus_core::segment::{Access, map_cursor_page, map_ring};
use bus_core::sys::scm::FdBatch;

use super::{ConnId, Creds, Engine, Out};
use crate::policy::Policy;

fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn creds() -> Creds {
    Creds {
        pid: std::process::id() as i32,
        uid: own_uid(),
        gid: 0,
    }
}

/// An owned copy of a decoded frame's essentials, with the fds that came with it.
#[derive(Clone, Debug)]
struct Got {
    conn: ConnId,
    frame: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

impl Got {
    fn msg(&self) -> Msg<'_> {
        Frame::decode(&self.frame)
            .expect("engine frames decode")
            .msg
    }
    fn request_id(&self) -> u64 {
        Frame::decode(&self.frame).unwrap().request_id
    }
}

struct Harness {
    e: Engine,
    now: Instant,
    watches: Vec<(u64, Arc<OwnedFd>)>,
    closed: Vec<ConnId>,
    /// Connections the engine dropped for not reading ([`Out::Drop`]; also in `closed`).
    dropped: Vec<ConnId>,
    /// Connections whose reads are paused.
    paused: Vec<ConnId>,
    /// Connections whose sends are not reported complete (a client that does not read).
    held: Vec<ConnId>,
    /// Sends to `held` connections, not yet reported.
    unacked: Vec<ConnId>,
    /// Wake datagrams the engine asked for ([`Out::Wake`]).
    wakes: Vec<Arc<OwnedFd>>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(Limits::default(), Policy::default_for(own_uid()))
    }

    fn with(limits: Limits, policy: Policy) -> Harness {
        let now = Instant::now();
        Harness {
            e: Engine::new(limits, Vec::new(), policy, now),
            now,
            watches: Vec::new(),
            closed: Vec::new(),
            dropped: Vec::new(),
            paused: Vec::new(),
            held: Vec::new(),
            unacked: Vec::new(),
            wakes: Vec::new(),
        }
    }

    fn frame(&mut self, conn: ConnId, rid: u64, msg: Msg<'_>) -> Vec<Got> {
        let mut buf = Vec::new();
        Frame {
            request_id: rid,
            msg,
        }
        .encode(&mut buf)
        .unwrap();
        self.raw(conn, &buf)
    }

    fn raw(&mut self, conn: ConnId, bytes: &[u8]) -> Vec<Got> {
        let mut fds = FdBatch::new();
        self.e.on_frame(conn, bytes, &mut fds, self.now);
        // As the driver does after each batch of frames.
        self.e.flush_relays();
        self.drain()
    }

    fn drain(&mut self) -> Vec<Got> {
        let mut got = Vec::new();
        while let Some(o) = self.e.poll_out() {
            match o {
                Out::Send { conn, frame, fds } => {
                    if self.held.contains(&conn) {
                        self.unacked.push(conn);
                    } else {
                        self.e.on_sent(conn, 1);
                    }
                    got.push(Got { conn, frame, fds })
                }
                Out::Close { conn } => self.closed.push(conn),
                Out::Drop { conn } => {
                    // As the driver does: gone at once, its unsent frames with it.
                    self.dropped.push(conn);
                    self.closed.push(conn);
                    self.held.retain(|&c| c != conn);
                    self.unacked.retain(|&c| c != conn);
                }
                Out::Watch { token, fd } => self.watches.push((token, fd)),
                Out::Unwatch { token } => self.watches.retain(|(t, _)| *t != token),
                Out::PauseReads { conn } => self.paused.push(conn),
                Out::ResumeReads { conn } => self.paused.retain(|&c| c != conn),
                Out::Wake { fd } => self.wakes.push(fd),
            }
        }
        if let Err(e) = self.e.check_invariants() {
            panic!("engine invariant broken: {e}");
        }
        got
    }

    fn connect(&mut self, conn: ConnId) {
        assert!(self.e.on_connect(conn, creds(), self.now));
        let got = self.frame(
            conn,
            1,
            Msg::Hello(Hello {
                protocol_version: 1,
                transport: Transport::Shm,
                client_name: "test",
            }),
        );
        assert!(
            matches!(got[0].msg(), Msg::Welcome(w) if w.client_id == conn),
            "{got:?}"
        );
    }

    /// A shared-memory publisher: returns the writer (header initialised, ready acknowledged)
    /// and everything the broker sent while it became ready.
    fn publisher(
        &mut self,
        conn: ConnId,
        topic: &str,
        mode: ModeRequest,
    ) -> (Writer, u64, Vec<Got>) {
        self.publisher_sized(conn, topic, mode, 8192)
    }

    /// [`Harness::publisher`] asking for a ring of `ring_bytes`.
    fn publisher_sized(
        &mut self,
        conn: ConnId,
        topic: &str,
        mode: ModeRequest,
        ring_bytes: u64,
    ) -> (Writer, u64, Vec<Got>) {
        let got = self.frame(
            conn,
            10,
            Msg::CreatePublisher(CreatePublisher {
                ring_data_bytes: ring_bytes,
                max_message_bytes: 0,
                mode,
                transport: Transport::Shm,
                topic,
            }),
        );
        let Msg::RingGranted(g) = got[0].msg() else {
            panic!("{got:?}")
        };
        assert_eq!(g.role, RingRole::Writer);
        assert_eq!(got[0].fds.len(), 1);
        let writer = writer_from(&got[0].fds[0], &g);
        let got = self.frame(
            conn,
            11,
            Msg::PublisherReady {
                publisher_id: g.publisher_id,
            },
        );
        // Cursor grants for existing subscribers come first, so the publisher knows them
        // before it may publish; then OK; then the rings go to the subscribers.
        let ok = got.iter().position(|x| x.request_id() == 11).expect("OK");
        assert!(matches!(got[ok].msg(), Msg::Ok), "{got:?}");
        assert!(
            got[..ok]
                .iter()
                .all(|x| matches!(x.msg(), Msg::CursorGranted(_)) && x.conn == conn),
            "{got:?}"
        );
        (writer, g.publisher_id, got)
    }

    /// A shared-memory subscriber: returns its cursor page, id, and what the broker sent.
    fn subscriber(&mut self, conn: ConnId, topic: &str) -> (Arc<CursorPage>, u64, Vec<Got>) {
        let got = self.frame(
            conn,
            20,
            Msg::Subscribe(Subscribe {
                mode: ModeRequest::Any,
                delivery: Transport::Shm,
                topic,
            }),
        );
        let Msg::Subscribed(s) = got[0].msg() else {
            panic!("{got:?}")
        };
        assert_eq!(got[0].fds.len(), 2);
        let page = CursorPage::init(
            map_cursor_page(got[0].fds[0].as_fd(), Access::ReadWrite).unwrap(),
            s.subscriber_id,
        )
        .unwrap();
        let got = self.frame(
            conn,
            21,
            Msg::SubscriberReady {
                subscriber_id: s.subscriber_id,
            },
        );
        assert!(matches!(got[0].msg(), Msg::Ok), "{got:?}");
        (Arc::new(page), s.subscriber_id, got)
    }
}

/// What a publisher's client does with its RING_GRANTED (role writer): map the ring
/// read-write and write its header.
fn writer_from(ring: &OwnedFd, g: &bus_core::frame::RingGranted) -> Writer {
    let map = map_ring(ring.as_fd(), g.data_bytes as usize, Access::ReadWrite).unwrap();
    let cfg = RingConfig {
        mode: g.mode,
        data_bytes: g.data_bytes,
        max_message_bytes: g.max_message_bytes,
        publisher_id: g.publisher_id,
    };
    Writer::create(map, cfg).unwrap()
}

fn reader_from(grant: &Got, page: &Arc<CursorPage>) -> Reader {
    let Msg::RingGranted(g) = grant.msg() else {
        panic!("{grant:?}")
    };
    assert!(g.role.is_reader(), "{:?}", g.role);
    let start = if g.role == RingRole::ReaderFromStart {
        StartAt::Beginning
    } else {
        StartAt::Next
    };
    let map = map_ring(
        grant.fds[0].as_fd(),
        g.data_bytes as usize,
        Access::ReadOnly,
    )
    .unwrap();
    let cfg = RingConfig {
        mode: g.mode,
        data_bytes: g.data_bytes,
        max_message_bytes: g.max_message_bytes,
        publisher_id: g.publisher_id,
    };
    Reader::attach(map, cfg, Some((page.clone(), g.slot as usize)), start).unwrap()
}

fn error_code(g: &Got) -> ErrorCode {
    match g.msg() {
        Msg::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A datagram publisher and a datagram subscriber on `topic` (ring of `ring` bytes): returns
/// (publisher id, subscriber id).
fn datagram_pair(h: &mut Harness, topic: &str, ring: u64) -> (u64, u64) {
    h.connect(1);
    h.connect(2);
    let got = h.frame(
        2,
        6,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Reliable,
            delivery: Transport::Datagram,
            topic,
        }),
    );
    let Msg::Subscribed(sub) = got[0].msg() else {
        panic!("{got:?}")
    };
    let got = h.frame(
        1,
        5,
        Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: ring,
            max_message_bytes: 0,
            mode: ModeRequest::Reliable,
            transport: Transport::Datagram,
            topic,
        }),
    );
    let Msg::RingGranted(g) = got[0].msg() else {
        panic!("{got:?}")
    };
    (g.publisher_id, sub.subscriber_id)
}

fn delivers(got: &[Got]) -> Vec<(u64, Vec<u8>)> {
    got.iter()
        .filter_map(|g| match g.msg() {
            Msg::Deliver(d) => {
                assert_eq!(g.conn, 2, "DELIVER to the subscriber's connection");
                Some((d.seq, d.payload.to_vec()))
            }
            _ => None,
        })
        .collect()
}

mod basics;
mod hardening;
mod sim;
