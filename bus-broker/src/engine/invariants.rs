//! What must hold of the engine's state after every event: its tables point at each other
//! both ways, every limit is respected, every descriptor is accounted for. Checked by the
//! simulation test after every step (`tests/sim.rs`) and by the unit tests; cheap enough for
//! tests, too slow (a walk over everything) for the event loop. The event loop asserts the
//! per-client part at each boundary instead ([`Engine::assert_client`]).

use super::{ConnId, DATAGRAM_BACKLOG_LIMIT, Engine, Life, Slot, Transport, subscriber_fds};

impl Engine {
    /// Checks every invariant of the engine's state; the first one broken is the error.
    pub fn check_invariants(&self) -> Result<(), String> {
        macro_rules! ensure {
            ($cond:expr, $($fmt:tt)*) => {
                if !$cond {
                    return Err(format!($($fmt)*));
                }
            };
        }
        let l = &self.limits;
        ensure!(
            self.clients.len() <= l.max_clients as usize,
            "{} clients, limit {}",
            self.clients.len(),
            l.max_clients
        );
        ensure!(
            self.topics.len() <= l.max_topics as usize,
            "{} topics, limit {}",
            self.topics.len(),
            l.max_topics
        );
        ensure!(
            self.topic_by_name.len() == self.topics.len(),
            "{} topic names for {} topics",
            self.topic_by_name.len(),
            self.topics.len()
        );

        // Clients <-> their publishers and subscribers, and their descriptors.
        let mut fds_total: u64 = 0;
        for (&conn, c) in &self.clients {
            // The send queue's one bound: past it a client is on its way out, and nothing
            // more is queued for it.
            ensure!(
                c.inflight <= self.unsent_limit() || c.unread,
                "client {conn} has {} frames unsent, over the limit {}, and is not being dropped",
                c.inflight,
                self.unsent_limit()
            );
            ensure!(
                c.unread == self.unread.contains(&conn),
                "client {conn}: unread mark and drop queue disagree"
            );
            let mut held = 0u32;
            for pid in &c.publishers {
                let p = self
                    .publishers
                    .get(pid)
                    .ok_or_else(|| format!("client {conn} lists missing publisher {pid}"))?;
                ensure!(
                    p.conn == conn,
                    "publisher {pid} of client {conn} names {}",
                    p.conn
                );
                held += p.fds;
            }
            for sid in &c.subscribers {
                let s = self
                    .subscribers
                    .get(sid)
                    .ok_or_else(|| format!("client {conn} lists missing subscriber {sid}"))?;
                ensure!(
                    s.conn == conn,
                    "subscriber {sid} of client {conn} names {}",
                    s.conn
                );
                held += s.fds;
            }
            ensure!(
                c.fds == held,
                "client {conn} is charged {} descriptors but holds {held}",
                c.fds
            );
            ensure!(
                c.fds <= l.max_fds_per_client,
                "client {conn} holds {} descriptors, quota {}",
                c.fds,
                l.max_fds_per_client
            );
            if c.paused {
                ensure!(
                    c.publishers
                        .iter()
                        .any(|pid| !self.publishers[pid].backlog.is_empty()),
                    "client {conn} is paused with no backlog to wait for"
                );
            }
        }

        // Publishers <-> topics, slots, backlogs.
        for (&pid, p) in &self.publishers {
            fds_total += u64::from(p.fds);
            ensure!(p.fds == 1, "publisher {pid} holds {} descriptors", p.fds);
            let t = self
                .topics
                .get(&p.topic)
                .ok_or_else(|| format!("publisher {pid} on missing topic {}", p.topic))?;
            ensure!(
                t.publishers.contains(&pid),
                "publisher {pid} missing from its topic's list"
            );
            ensure!(
                matches!(t.slots[p.slot as usize], Slot::Used(x) if x == pid),
                "publisher {pid} does not hold its slot {}",
                p.slot
            );
            match self.clients.get(&p.conn) {
                Some(c) => ensure!(
                    c.publishers.contains(&pid),
                    "publisher {pid} missing from client {}",
                    p.conn
                ),
                None => ensure!(
                    p.closing.is_some(),
                    "publisher {pid} outlived its client {} without closing",
                    p.conn
                ),
            }
            if p.closing.is_some() {
                ensure!(
                    !p.backlog.is_empty(),
                    "publisher {pid} is closing with nothing left to write"
                );
            }
            ensure!(
                p.backlog.len() <= DATAGRAM_BACKLOG_LIMIT,
                "publisher {pid} has {} messages waiting",
                p.backlog.len()
            );
            ensure!(
                p.backlog.is_empty() || p.writer.is_some(),
                "shared-memory publisher {pid} has a backlog"
            );
            ensure!(
                (p.life == Life::Live) == p.monitor.is_some(),
                "publisher {pid}: live {} but monitor {}",
                p.life == Life::Live,
                p.monitor.is_some()
            );
        }

        // Subscribers <-> topics, tokens, descriptors.
        for (&sid, s) in &self.subscribers {
            fds_total += u64::from(s.fds);
            ensure!(
                s.fds == subscriber_fds(s.delivery),
                "subscriber {sid} holds {} descriptors",
                s.fds
            );
            let t = self
                .topics
                .get(&s.topic)
                .ok_or_else(|| format!("subscriber {sid} on missing topic {}", s.topic))?;
            ensure!(
                t.subscribers.contains(&sid),
                "subscriber {sid} missing from its topic's list"
            );
            ensure!(
                self.clients
                    .get(&s.conn)
                    .is_some_and(|c| c.subscribers.contains(&sid)),
                "subscriber {sid} missing from client {}",
                s.conn
            );
            ensure!(
                (s.delivery == Transport::Datagram) == s.datagram.is_some(),
                "subscriber {sid}: relay state does not match its delivery"
            );
            if let Some(fb) = &s.datagram {
                ensure!(
                    self.tokens.get(&fb.token) == Some(&sid),
                    "datagram subscriber {sid}'s wake token is not mapped to it"
                );
            }
            ensure!(
                (s.life == Life::Live) == s.view.is_some(),
                "subscriber {sid}: live {} but view {}",
                s.life == Life::Live,
                s.view.is_some()
            );
        }
        for (&token, sid) in &self.tokens {
            ensure!(
                self.subscribers
                    .get(sid)
                    .and_then(|s| s.datagram.as_ref())
                    .is_some_and(|fb| fb.token == token),
                "wake token {token} maps to {sid}, which does not own it"
            );
        }
        ensure!(
            self.fds_used == fds_total,
            "the engine counts {} descriptors, its publishers and subscribers hold {fds_total}",
            self.fds_used
        );
        ensure!(
            self.fds_used <= self.fd_budget,
            "{} descriptors held, budget {}",
            self.fds_used,
            self.fd_budget
        );

        // Topics: members, names, slots, limits.
        for (&tid, t) in &self.topics {
            ensure!(t.id == tid, "topic {tid} says it is {}", t.id);
            ensure!(
                self.topic_by_name.get(&t.name) == Some(&tid),
                "topic {tid} ('{}') is not found by its name",
                t.name
            );
            ensure!(
                t.declared || !t.publishers.is_empty() || !t.subscribers.is_empty(),
                "topic '{}' has no publisher, no subscriber and was not declared",
                t.name
            );
            ensure!(
                t.subscribers.len() <= l.max_subscribers_per_topic as usize,
                "topic '{}' has {} subscribers",
                t.name,
                t.subscribers.len()
            );
            ensure!(
                t.publishers.len() <= l.max_publishers_per_topic as usize,
                "topic '{}' has {} publishers",
                t.name,
                t.publishers.len()
            );
            ensure!(
                t.ring_bytes.is_power_of_two() && t.ring_bytes <= l.max_ring_bytes,
                "topic '{}' has a ring of {} bytes",
                t.name,
                t.ring_bytes
            );
            ensure!(
                t.publishers.is_empty() || t.geometry_fixed,
                "topic '{}' has publishers but its geometry may still change",
                t.name
            );
            for pid in &t.publishers {
                ensure!(
                    self.publishers.get(pid).is_some_and(|p| p.topic == tid),
                    "topic '{}' lists publisher {pid}, which is not on it",
                    t.name
                );
            }
            for sid in &t.subscribers {
                ensure!(
                    self.subscribers.get(sid).is_some_and(|s| s.topic == tid),
                    "topic '{}' lists subscriber {sid}, which is not on it",
                    t.name
                );
            }
            for (i, slot) in t.slots.iter().enumerate() {
                match slot {
                    Slot::Free => {}
                    Slot::Used(pid) => ensure!(
                        self.publishers
                            .get(pid)
                            .is_some_and(|p| p.topic == tid && p.slot as usize == i),
                        "slot {i} of '{}' is held by publisher {pid}, which is not there",
                        t.name
                    ),
                    Slot::Draining(d) => {
                        ensure!(
                            !d.holders.is_empty(),
                            "slot {i} of '{}' drains with no holder",
                            t.name
                        );
                        ensure!(
                            !self.publishers.contains_key(&d.publisher),
                            "slot {i} of '{}' drains for publisher {}, which is still there",
                            t.name,
                            d.publisher
                        );
                        for h in &d.holders {
                            ensure!(
                                t.subscribers.contains(&h.sid),
                                "slot {i} of '{}' is held by subscriber {}, not on the topic",
                                t.name,
                                h.sid
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Engine {
    /// The cheap half of [`Engine::check_invariants`], asserted at the engine's boundary after
    /// every event that concerns one client (connect, frame, sends completed): what that client
    /// holds is bounded and points back at it. It costs O(what the client holds), which its
    /// quotas bound, so it runs in release builds too: a broken engine stops loudly instead of
    /// serving from corrupt state.
    pub(super) fn assert_client(&self, conn: ConnId) {
        assert!(
            self.clients.len() <= self.limits.max_clients as usize,
            "{} clients, over limits.max_clients {}",
            self.clients.len(),
            self.limits.max_clients
        );
        let Some(c) = self.clients.get(&conn) else {
            return; // Gone (closed, dropped, refused): nothing of it may remain.
        };
        assert!(
            c.unread || c.inflight <= self.unsent_limit(),
            "client {conn} has {} frames unsent, over the limit {}, yet is not being dropped",
            c.inflight,
            self.unsent_limit()
        );
        assert!(
            c.fds <= self.limits.max_fds_per_client,
            "client {conn} holds {} descriptors, over limits.max_fds_per_client {}",
            c.fds,
            self.limits.max_fds_per_client
        );
        assert!(
            c.publishers.len() + c.subscribers.len() <= self.limits.max_fds_per_client as usize,
            "client {conn} has more ports than descriptors could back"
        );
        for pid in &c.publishers {
            let p = self.publishers.get(pid);
            assert!(
                p.is_some_and(|p| p.conn == conn && self.topics.contains_key(&p.topic)),
                "client {conn} lists publisher {pid}, which is not its own or has no topic"
            );
        }
        for sid in &c.subscribers {
            let s = self.subscribers.get(sid);
            assert!(
                s.is_some_and(|s| s.conn == conn && self.topics.contains_key(&s.topic)),
                "client {conn} lists subscriber {sid}, which is not its own or has no topic"
            );
        }
        assert!(
            !c.paused
                || c.publishers
                    .iter()
                    .any(|pid| !self.publishers[pid].backlog.is_empty()),
            "client {conn} is paused with no backlog to wait for"
        );
    }
}
