//! The subscriber side: subscribing (cursor page, wake socket, the relay for datagram
//! delivery), READY, leaving, RING_RELEASED, and a client's departure.

use super::*;

impl Engine {
    pub(super) fn subscribe(
        &mut self,
        conn: ConnId,
        rid: u64,
        req: Subscribe<'_>,
    ) -> Result<(), Reject> {
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

    pub(super) fn subscribe_on(
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
        let cursor_fd = (self.segments)
            .create_cursor_page(&memfd_name(req.topic, format_args!("s{sid}")))
            .map_err(|e| segment_error("cursor page", &e, out_of_fds(&e)))?;
        let (tx, rx) = self
            .segments
            .wake_pair()
            .map_err(|e| segment_error("wake socket", &e, out_of_fds(&e)))?;
        let mut s = Subscriber {
            id: sid,
            topic: tid,
            conn,
            delivery: req.delivery,
            life: Life::Pending,
            cursor_fd: Arc::new(cursor_fd),
            wake_tx: tx.into_shared(),
            view: None,
            datagram: None,
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
            // The driver watches the receive end and drains it before it reports the wakeup
            // (`Out::Watch`): the engine itself never reads a socket.
            self.tokens.insert(token, sid);
            self.out.push_back(Out::Watch {
                token,
                fd: Arc::new(rx.into()),
            });
            s.datagram = Some(DatagramSub {
                page: Arc::new(page),
                readers: ReaderSet::new(),
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

    pub(super) fn own_subscriber(&self, conn: ConnId, sid: u64) -> Result<(), Reject> {
        match self.subscribers.get(&sid) {
            Some(s) if s.conn == conn => Ok(()),
            _ => Err(reject(
                ErrorCode::NoSuchId,
                format!("no subscriber {sid} on this connection"),
            )),
        }
    }

    pub(super) fn subscriber_ready(
        &mut self,
        conn: ConnId,
        rid: u64,
        sid: u64,
    ) -> Result<(), Reject> {
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
    pub(super) fn make_subscriber_live(
        &mut self,
        sid: u64,
        ack: Option<(ConnId, u64)>,
    ) -> Result<(), Reject> {
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
        self.pump_datagram(sid);
        tracing::info!(subscriber = sid, topic = %self.topics[&topic].name, "subscriber live");
        Ok(())
    }

    pub(super) fn unsubscribe(&mut self, conn: ConnId, rid: u64, sid: u64) -> Result<(), Reject> {
        self.own_subscriber(conn, sid)?;
        self.remove_subscriber(sid, PeerGoneReason::Closed);
        self.send(conn, rid, Msg::Ok, Vec::new());
        Ok(())
    }

    pub(super) fn remove_subscriber(&mut self, sid: u64, reason: PeerGoneReason) {
        let Some(s) = self.subscribers.remove(&sid) else {
            return;
        };
        self.refund_fds(s.conn, s.fds);
        if let Some(fb) = &s.datagram {
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

    pub(super) fn forget_client(&mut self, conn: ConnId, reason: PeerGoneReason) {
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

    /// Subscriber `sid` no longer reads publisher `pid`'s ring (RING_RELEASED, or the relay
    /// dropped it). A live publisher stops waiting for it and it is no longer judged on that
    /// ring; a departed publisher's slot is freed once no subscriber holds it.
    pub(super) fn release_ring(&mut self, sid: u64, pid: u64) {
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

    pub(super) fn ring_released(&mut self, conn: ConnId, sid: u64, pid: u64) -> Result<(), Reject> {
        self.own_subscriber(conn, sid)?;
        self.release_ring(sid, pid);
        Ok(())
    }
}
