//! The datagram relay: the broker as the ring writer of datagram publishers (PUBLISH, their
//! backlogs and read pauses) and as the ring reader of datagram subscribers (DELIVER and SKIPPED
//! frames, bounded work per turn, the park protocol on their wake socket).

use super::*;

/// Turns the wakeups a relay writer collected ([`Writer::defer_wakes`]) into [`Out::Wake`]
/// actions for its shared-memory subscribers. Datagram subscribers need none: the engine pumps
/// them itself after every write into their topic.
pub(super) fn wake_due(
    w: &mut Writer,
    subscribers: &BTreeMap<u64, Subscriber>,
    out: &mut VecDeque<Out>,
) {
    let mut due = Vec::new();
    w.take_due_wakes(&mut due);
    for sid in due {
        if let Some(s) = subscribers.get(&sid)
            && s.delivery == Transport::Shm
        {
            out.push_back(Out::Wake {
                fd: s.wake_tx.clone(),
            });
        }
    }
}

impl Engine {
    pub(super) fn publish(&mut self, conn: ConnId, pid: u64, payload: &[u8]) -> Result<(), Reject> {
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
        let max = topic_max.min(MAX_DATAGRAM_MESSAGE_BYTES);
        if payload.len() > max {
            let why = if max < topic_max {
                format!(
                    "the datagram fallback carries at most {MAX_DATAGRAM_MESSAGE_BYTES} bytes per \
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
            wake_due(w, &self.subscribers, &mut self.out);
            self.mark_written(topic);
            return Ok(());
        }
        if p.backlog.len() >= DATAGRAM_BACKLOG_LIMIT {
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
        if p.backlog.len() >= DATAGRAM_BACKLOG {
            self.pause_reads(conn);
        }
        Ok(())
    }

    pub(super) fn pause_reads(&mut self, conn: ConnId) {
        if let Some(c) = self.clients.get_mut(&conn)
            && !c.paused
        {
            c.paused = true;
            tracing::debug!(conn, "datagram publisher backlog full: reads paused");
            self.out.push_back(Out::PauseReads { conn });
        }
    }

    /// Resumes reading `conn` once none of its publishers has a backlog.
    pub(super) fn maybe_resume_reads(&mut self, conn: ConnId) {
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

    pub(super) fn flush_backlog(&mut self, pid: u64) {
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
        wake_due(w, &self.subscribers, &mut self.out);
        let empty = p.backlog.is_empty();
        let closing = p.closing.filter(|_| empty);
        if moved {
            self.mark_written(topic);
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
    pub(super) fn flush_topic_backlogs(&mut self, tid: u64) {
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
    pub(super) fn mark_written(&mut self, tid: u64) {
        if !self.written_topics.contains(&tid) {
            self.written_topics.push(tid);
        }
    }

    /// Pumps the datagram subscribers of every topic the broker wrote into since the last
    /// call. The driver calls it after each batch of [`Engine::on_frame`] calls (one readable
    /// connection drained); the other events call it themselves.
    pub fn flush_relays(&mut self) {
        while let Some(tid) = self.written_topics.pop() {
            self.pump_datagram_subscribers(tid);
        }
    }

    pub(super) fn pump_datagram_subscribers(&mut self, tid: u64) {
        // By index, without cloning the list: pumping never adds or removes subscribers.
        let mut i = 0;
        while let Some(&sid) = self.topics.get(&tid).and_then(|t| t.subscribers.get(i)) {
            i += 1;
            if self
                .subscribers
                .get(&sid)
                .is_some_and(|s| s.datagram.is_some())
            {
                self.pump_datagram(sid);
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
    pub(super) fn pump_datagram(&mut self, sid: u64) {
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
            let Some(fb) = s.datagram.as_mut() else {
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
                    .and_then(|s| s.datagram.as_mut())
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
                    if sample.len() > MAX_DATAGRAM_MESSAGE_BYTES {
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

    /// A datagram publisher's relay stops tracking subscriber `sid`.
    pub(super) fn relay_drop_reader(&mut self, pid: u64, sid: u64) {
        if let Some(w) = self
            .publishers
            .get_mut(&pid)
            .and_then(|p| p.writer.as_mut())
        {
            w.remove_reader(sid);
        }
    }
}
