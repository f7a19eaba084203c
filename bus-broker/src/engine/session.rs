//! Sessions: connections, the handshake, frame dispatch, protocol violations, shutdown.

use super::*;

impl Engine {
    /// A connection was accepted. Returns false if it was refused (an error frame and a Close
    /// are queued).
    pub fn on_connect(&mut self, conn: ConnId, creds: Creds, now: Instant) -> bool {
        assert!(
            !self.clients.contains_key(&conn),
            "connection {conn} is already known: the driver must never reuse a ConnId"
        );
        self.advance(now);
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
            unread: false,
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
            self.assert_client(conn);
            return false;
        }
        self.assert_client(conn);
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
        self.advance(now);
        let got_fds = fds.len();
        fds.clear();
        if !self.clients.contains_key(&conn) {
            return;
        }
        self.dispatch_frame(conn, datagram, got_fds);
        self.assert_client(conn);
    }

    /// [`Engine::on_frame`] for a known client, its fds already closed (`got_fds` of them).
    fn dispatch_frame(&mut self, conn: ConnId, datagram: &[u8], got_fds: usize) {
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

    pub(super) fn bad_frame(&mut self, conn: ConnId, datagram: &[u8], e: DecodeError) {
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

    pub(super) fn hello(
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
            max_datagram_message_bytes: MAX_DATAGRAM_MESSAGE_BYTES as u32,
            default_ring_bytes: self.limits.default_ring_bytes,
            max_ring_bytes: self.limits.max_ring_bytes,
            max_topic_bytes: MAX_TOPIC_BYTES as u16,
            broker_version: version,
        };
        self.send(conn, rid, Msg::Welcome(welcome), Vec::new());
        Ok(())
    }

    pub(super) fn authorize(&self, conn: ConnId, op: Op, topic: &str) -> Result<(), Reject> {
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

    pub(super) fn awaiting_hello(&self, conn: ConnId) -> bool {
        self.clients
            .get(&conn)
            .is_some_and(|c| matches!(c.phase, Phase::AwaitingHello { .. }))
    }

    /// Pops entries of clients that said HELLO or left from the front of `hello_deadlines`.
    pub(super) fn drop_stale_hello_deadlines(&mut self) {
        while let Some(&(_, conn)) = self.hello_deadlines.front() {
            if self.awaiting_hello(conn) {
                break;
            }
            self.hello_deadlines.pop_front();
        }
    }
}
