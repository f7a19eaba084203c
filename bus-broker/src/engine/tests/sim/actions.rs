//! The simulated clients' actions: connect, create and ready publishers, publish, subscribe,
//! read, unsubscribe, disconnect, stop reading the socket, send garbage or bogus releases. Each
//! picks a random client and a random (valid or invalid) request; [`Sim::step`] picks the action.

use super::*;

impl Sim {
    pub(super) fn connect(&mut self) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let accepted = self.h.e.on_connect(conn, creds(), self.h.now);
        let got = self.h.drain();
        self.deliver(got);
        if !accepted {
            return;
        }
        let datagram = self.rng.chance(40);
        let mut c = Client {
            conn,
            datagram,
            hello: false,
            dg_pubs: Vec::new(),
            shm_pubs: Vec::new(),
            shm_subs: Vec::new(),
            dg_subs: BTreeMap::new(),
        };
        // Most say HELLO; some never do (the handshake timeout must drop them).
        if self.rng.chance(90) {
            c.hello = true;
            let transport = if datagram {
                Transport::Datagram
            } else {
                Transport::Shm
            };
            let got = self.h.frame(
                conn,
                1,
                Msg::Hello(Hello {
                    protocol_version: 1,
                    transport,
                    client_name: "sim",
                }),
            );
            assert!(matches!(got[0].msg(), Msg::Welcome(_)), "{got:?}");
        }
        self.clients.push(c);
    }

    pub(super) fn topic(&mut self) -> &'static str {
        TOPICS[self.rng.below(TOPICS.len() as u64) as usize]
    }

    pub(super) fn create_publisher(&mut self) {
        let Some(i) = self.client() else { return };
        let topic = self.topic();
        let ring = *self
            .rng
            .pick(&[
                0,
                4096,
                4096,
                8192,
                8192,
                1 << 16,
                (1 << 63) + 1,
                u64::MAX,
                3000,
            ])
            .unwrap();
        let mode = *self
            .rng
            .pick(&[ModeRequest::Any, ModeRequest::Reliable, ModeRequest::Lossy])
            .unwrap();
        let c = &self.clients[i];
        let transport = if c.datagram || self.rng.chance(30) {
            Transport::Datagram
        } else {
            Transport::Shm
        };
        let conn = c.conn;
        let got = self.h.frame(
            conn,
            7,
            Msg::CreatePublisher(CreatePublisher {
                ring_data_bytes: ring,
                max_message_bytes: 0,
                mode,
                transport,
                topic,
            }),
        );
        let grant = got
            .iter()
            .find(|g| g.conn == conn && g.request_id() == 7)
            .and_then(|g| match g.msg() {
                Msg::RingGranted(rg) => Some((g.fds.clone(), rg)),
                _ => None,
            });
        self.deliver(got);
        let Some((fds, rg)) = grant else { return };
        let c = &mut self.clients[i];
        if transport == Transport::Datagram {
            c.dg_pubs.push((rg.publisher_id, topic.to_owned()));
            // Subscribers already there are owed everything it publishes.
            for (&sid, (_, stream)) in self.clients.iter().flat_map(|c| &c.dg_subs) {
                if stream.topic_id == rg.topic_id {
                    self.joined.insert((sid, rg.publisher_id), 0);
                }
            }
            self.accepted.insert(
                rg.publisher_id,
                Accepted {
                    topic_id: rg.topic_id,
                    mode: rg.mode,
                    count: 0,
                    backlogged: 0,
                },
            );
        } else {
            c.shm_pubs.push(ShmPub {
                id: rg.publisher_id,
                writer: None,
                ready: false,
                pending: Some((fds, rg)),
            });
        }
    }

    pub(super) fn publisher_ready(&mut self) {
        let Some(i) = self.client() else { return };
        let c = &mut self.clients[i];
        let conn = c.conn;
        let Some(p) = c.shm_pubs.iter_mut().find(|p| p.pending.is_some()) else {
            return;
        };
        let (fds, rg) = p.pending.take().unwrap();
        p.writer = Some(writer_from(&fds[0], &rg));
        let id = p.id;
        self.frame(conn, Msg::PublisherReady { publisher_id: id });
        if let Some(p) = self
            .clients
            .iter_mut()
            .find(|c| c.conn == conn)
            .and_then(|c| c.shm_pubs.iter_mut().find(|p| p.id == id))
        {
            p.ready = true;
        }
    }

    /// A client that has something for the action (publishers, subscribers), if any.
    pub(super) fn client_with(&mut self, has: impl Fn(&Client) -> bool) -> Option<usize> {
        let with: Vec<usize> = (0..self.clients.len())
            .filter(|&i| has(&self.clients[i]))
            .collect();
        self.rng.pick(&with).copied()
    }

    pub(super) fn publish(&mut self) {
        let Some(i) = self.client_with(|c| {
            !c.dg_pubs.is_empty() || c.shm_pubs.iter().any(|p| p.writer.is_some())
        }) else {
            return;
        };
        let len = if self.rng.chance(8) {
            // Over what a DELIVER carries, within what a PUBLISH frame can hold.
            let room = (MAX_PUBLISH_PAYLOAD_BYTES - MAX_DATAGRAM_MESSAGE_BYTES) as u64;
            MAX_DATAGRAM_MESSAGE_BYTES + 1 + self.rng.below(room) as usize
        } else {
            self.rng.below(3000) as usize
        };
        let payload = vec![self.rng.below(256) as u8; len];
        let c = &mut self.clients[i];
        let conn = c.conn;
        if !c.dg_pubs.is_empty() && (c.shm_pubs.is_empty() || self.rng.chance(50)) {
            let &(pid, _) = self.rng.pick(&c.dg_pubs).unwrap();
            let rid = self.rng.below(1000) + 1;
            let backlog = |sim: &Self| sim.h.e.publishers.get(&pid).map_or(0, |p| p.backlog.len());
            let before = backlog(self);
            let got = self.h.frame(
                conn,
                rid,
                Msg::Publish(Publish {
                    publisher_id: pid,
                    payload: &payload,
                }),
            );
            let refused = got.iter().any(|g| {
                g.conn == conn && g.request_id() == rid && matches!(g.msg(), Msg::Error(_))
            });
            let waits = backlog(self) > before;
            if !refused && let Some(a) = self.accepted.get_mut(&pid) {
                a.count += 1;
                a.backlogged += u64::from(waits);
            }
            if waits {
                self.seen.backlogged += 1;
            }
            self.deliver(got);
        } else {
            let live: Vec<usize> = (0..c.shm_pubs.len())
                .filter(|&k| c.shm_pubs[k].writer.is_some())
                .collect();
            if let Some(&k) = self.rng.pick(&live) {
                let w = c.shm_pubs[k].writer.as_mut().unwrap();
                let len = len.min(w.config().max_message_bytes as usize);
                // A burst: enough to fill small rings and make writers wait; now and then a
                // message too large for a datagram subscriber.
                let big = vec![3u8; 70_000];
                let payload =
                    if self.rng.chance(10) && big.len() <= w.config().max_message_bytes as usize {
                        &big[..]
                    } else {
                        &payload[..len]
                    };
                for _ in 0..=self.rng.below(8) {
                    let _ = w.try_publish(payload);
                }
            }
        }
    }

    pub(super) fn close_publisher(&mut self) {
        let Some(i) = self.client() else { return };
        let c = &mut self.clients[i];
        let conn = c.conn;
        let pid = if !c.dg_pubs.is_empty() && self.rng.chance(50) {
            c.dg_pubs.remove(0).0
        } else if !c.shm_pubs.is_empty() {
            c.shm_pubs.remove(0).id
        } else {
            return;
        };
        self.frame(conn, Msg::ClosePublisher { publisher_id: pid });
    }

    pub(super) fn subscribe(&mut self) {
        let Some(i) = self.client() else { return };
        let topic = self.topic();
        let mode = *self
            .rng
            .pick(&[ModeRequest::Any, ModeRequest::Reliable, ModeRequest::Lossy])
            .unwrap();
        let c = &self.clients[i];
        let delivery = if c.datagram || self.rng.chance(40) {
            Transport::Datagram
        } else {
            Transport::Shm
        };
        let conn = c.conn;
        let got = self.h.frame(
            conn,
            8,
            Msg::Subscribe(Subscribe {
                mode,
                delivery,
                topic,
            }),
        );
        let sub = got
            .iter()
            .find(|g| g.conn == conn && g.request_id() == 8)
            .and_then(|g| match g.msg() {
                Msg::Subscribed(s) => Some((g.fds.clone(), s)),
                _ => None,
            });
        let Some((fds, s)) = sub else {
            self.deliver(got);
            return;
        };
        let lazy = self.rng.chance(25);
        let c = &mut self.clients[i];
        if delivery == Transport::Datagram {
            c.dg_subs.insert(
                s.subscriber_id,
                (
                    s.mode,
                    Stream {
                        topic_id: s.topic_id,
                        next: BTreeMap::new(),
                    },
                ),
            );
            for (&pid, a) in &self.accepted {
                if a.topic_id == s.topic_id {
                    self.joined.insert((s.subscriber_id, pid), a.count);
                }
            }
            self.deliver(got);
            return;
        }
        let page = CursorPage::init(
            map_cursor_page(fds[0].as_fd(), Access::ReadWrite).unwrap(),
            s.subscriber_id,
        )
        .unwrap();
        c.shm_subs.push(ShmSub {
            id: s.subscriber_id,
            lazy,
            page: Some(Arc::new(page)),
            readers: Vec::new(),
            gone: Vec::new(),
        });
        self.deliver(got);
        // Usually ready at once; sometimes later (or never: it must not hold anyone forever).
        if self.rng.chance(85) {
            self.frame(
                conn,
                Msg::SubscriberReady {
                    subscriber_id: s.subscriber_id,
                },
            );
        }
    }

    /// Shared-memory subscribers read some of what is there; drained rings of departed
    /// publishers are let go (RING_RELEASED), as the library does.
    pub(super) fn read(&mut self) {
        let Some(i) = self.client_with(|c| !c.shm_subs.is_empty()) else {
            return;
        };
        let n = self.rng.below(200);
        self.read_client(i, n);
    }

    /// Client `i`'s shared-memory subscribers (but the lazy ones) take up to `n` messages
    /// from each of their rings.
    pub(super) fn read_client(&mut self, i: usize, n: u64) {
        let c = &mut self.clients[i];
        let conn = c.conn;
        let mut released = Vec::new();
        for s in c.shm_subs.iter_mut().filter(|s| !s.lazy) {
            for r in &mut s.readers {
                for _ in 0..n {
                    match r.try_recv() {
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let gone = &s.gone;
            s.readers.retain(|r| {
                let done =
                    r.is_finished() || (gone.contains(&r.publisher_id()) && !r.has_pending());
                if done {
                    released.push((s.id, r.publisher_id()));
                }
                !done
            });
        }
        self.seen.released += released.len() as u64;
        for (sid, pid) in released {
            self.frame(
                conn,
                Msg::RingReleased {
                    subscriber_id: sid,
                    publisher_id: pid,
                },
            );
        }
    }

    pub(super) fn unsubscribe(&mut self) {
        let Some(i) = self.client() else { return };
        let c = &mut self.clients[i];
        let conn = c.conn;
        let sid = if let Some((&sid, _)) = c.dg_subs.iter().next() {
            c.dg_subs.remove(&sid);
            sid
        } else if !c.shm_subs.is_empty() {
            c.shm_subs.remove(0).id
        } else {
            return;
        };
        self.frame(conn, Msg::Unsubscribe { subscriber_id: sid });
    }

    pub(super) fn disconnect(&mut self) {
        let Some(i) = self.client() else { return };
        let c = self.clients.remove(i);
        self.h.held.retain(|&x| x != c.conn);
        self.h.e.on_disconnect(c.conn);
        let got = self.h.drain();
        self.deliver(got);
    }

    /// A client stops reading its socket (its sends are not reported complete), or starts
    /// again (everything it had not taken is reported sent).
    pub(super) fn hold_or_release_sends(&mut self) {
        let Some(i) = self.client() else { return };
        let conn = self.clients[i].conn;
        if let Some(k) = self.h.held.iter().position(|&x| x == conn) {
            self.h.held.remove(k);
            let n = self.h.unacked.iter().filter(|&&x| x == conn).count() as u32;
            self.h.unacked.retain(|&x| x != conn);
            self.h.e.on_sent(conn, n);
            let got = self.h.drain();
            self.deliver(got);
        } else {
            self.h.held.push(conn);
        }
    }

    pub(super) fn garbage(&mut self) {
        let Some(i) = self.client() else { return };
        let conn = self.clients[i].conn;
        let len = self.rng.below(64) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| self.rng.below(256) as u8).collect();
        let got = self.h.raw(conn, &bytes);
        self.deliver(got);
        // A framing violation disconnects: forget the client like its peer would.
        if self.h.closed.contains(&conn) {
            self.clients.retain(|c| c.conn != conn);
        }
    }

    /// RING_RELEASED with ids that may be anyone's, and UNSUBSCRIBE / CLOSE_PUBLISHER of ids
    /// the client does not own.
    pub(super) fn bogus_release(&mut self) {
        let Some(i) = self.client() else { return };
        let conn = self.clients[i].conn;
        let a = self.rng.below(self.h.e.next_id + 2);
        let b = self.rng.below(self.h.e.next_id + 2);
        match self.rng.below(3) {
            0 => self.frame(
                conn,
                Msg::RingReleased {
                    subscriber_id: a,
                    publisher_id: b,
                },
            ),
            1 => self.frame(conn, Msg::Unsubscribe { subscriber_id: a }),
            _ => self.frame(conn, Msg::ClosePublisher { publisher_id: a }),
        }
    }
}
