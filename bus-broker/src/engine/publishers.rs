//! The publisher side of the handoff: creating a publisher (slot, ring, relay writer), its READY
//! (seal, check, introduce it to every live subscriber: cursor page first, ring second), and
//! its departure (a datagram publisher with a backlog first writes it; a reliable one's slot
//! drains).

use super::*;

impl Engine {
    pub(super) fn create_publisher(
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

    pub(super) fn create_publisher_on(
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
        let ring_fd = (self.segments)
            .create_ring(&name, ring_bytes as usize)
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
                RingRole::Datagram
            },
            mode,
            slot: slot as u16,
            // A datagram publisher is told what a PUBLISH may really carry.
            max_message_bytes: if req.transport == Transport::Shm {
                max_msg
            } else {
                max_msg.min(MAX_DATAGRAM_MESSAGE_BYTES as u32)
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
            // Wakeups become actions for the driver (`relay::wake_due`).
            let mut writer = writer;
            writer.defer_wakes();
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

    pub(super) fn own_publisher(&self, conn: ConnId, pid: u64) -> Result<(), Reject> {
        match self.publishers.get(&pid) {
            Some(p) if p.conn == conn => Ok(()),
            _ => Err(reject(
                ErrorCode::NoSuchId,
                format!("no publisher {pid} on this connection"),
            )),
        }
    }

    pub(super) fn publisher_ready(
        &mut self,
        conn: ConnId,
        rid: u64,
        pid: u64,
    ) -> Result<(), Reject> {
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
    pub(super) fn make_publisher_live(
        &mut self,
        pid: u64,
        ack: Option<(ConnId, u64)>,
    ) -> Result<(), Reject> {
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
    pub(super) fn connect_pair(&mut self, pid: u64, sid: u64, half: Half) {
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
            // The relay writer defers its wakeups (`Writer::defer_wakes`): the engine turns
            // them into `Out::Wake` on the subscriber's wake socket (shared memory) or pumps
            // the subscriber itself (datagram), so it hands the writer no wake sender.
            let wake = None;
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
                        .datagram
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
                        .and_then(|s| s.datagram.as_mut())
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

    pub(super) fn close_publisher(
        &mut self,
        conn: ConnId,
        rid: u64,
        pid: u64,
    ) -> Result<(), Reject> {
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
    pub(super) fn close_after_backlog(
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

    pub(super) fn remove_publisher(&mut self, pid: u64, reason: PeerGoneReason) {
        let Some(mut p) = self.publishers.remove(&pid) else {
            return;
        };
        if let Some(mut w) = p.writer.take() {
            // Datagram publisher: its ring is drained by subscribers like any other.
            w.close();
            relay::wake_due(&mut w, &self.subscribers, &mut self.out);
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
                    .and_then(|s| s.datagram.as_mut())
                {
                    // Datagram subscribers read what the publisher left, then drop the ring.
                    fb.gone.push(pid);
                    self.pump_datagram(sid);
                }
            }
        }
        self.maybe_drop_topic(topic);
    }
}
