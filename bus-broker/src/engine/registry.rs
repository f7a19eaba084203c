//! The topic registry: finding or making topics, their geometry (ring size, message limit),
//! publisher slots (free, used, draining while subscribers still read a departed publisher's
//! ring), and dropping topics nobody is on.

use super::*;

impl Engine {
    pub(super) fn insert_topic(&mut self, t: Topic) {
        self.topic_by_name.insert(t.name.clone(), t.id);
        self.topics.insert(t.id, t);
    }

    /// Finds or creates a topic, checking the request against its settings.
    pub(super) fn topic_for(
        &mut self,
        name: &str,
        mode: ModeRequest,
        ring_bytes: u64,
        max_message_bytes: u32,
    ) -> Result<u64, Reject> {
        if let Some(&id) = self.topic_by_name.get(name) {
            let t = &self.topics[&id];
            if let Some(m) = mode_of(mode)
                && m != t.mode
            {
                return Err(reject(
                    ErrorCode::TopicConflict,
                    format!(
                        "topic '{name}' is {}, the request asks for {}; ask for mode any, or use \
                         another topic",
                        mode_name(t.mode),
                        mode_name(m)
                    ),
                ));
            }
            if !t.geometry_fixed && (ring_bytes != 0 || max_message_bytes != 0) {
                // The first publisher fixes the size of a topic a subscriber made.
                let (ring, max) = self.geometry(ring_bytes, max_message_bytes)?;
                let t = self.topics.get_mut(&id).expect("exists");
                (t.ring_bytes, t.max_message_bytes, t.geometry_fixed) = (ring, max, true);
                return Ok(id);
            }
            if ring_bytes != 0 && ring_size_for(ring_bytes) != Some(t.ring_bytes) {
                return Err(reject(
                    ErrorCode::TopicConflict,
                    format!(
                        "topic '{name}' has {} ring bytes, the request asks for {ring_bytes}; ask \
                         for 0 (the topic's size)",
                        t.ring_bytes
                    ),
                ));
            }
            if max_message_bytes > t.max_message_bytes {
                return Err(reject(
                    ErrorCode::TopicConflict,
                    format!(
                        "topic '{name}' carries messages of at most {} bytes, the request asks \
                         for {max_message_bytes}",
                        t.max_message_bytes
                    ),
                ));
            }
            return Ok(id);
        }
        if self.topics.len() >= self.limits.max_topics as usize {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "the broker has {} topics, its limit (limits.max_topics)",
                    self.limits.max_topics
                ),
            ));
        }
        let (ring, max) = self.geometry(ring_bytes, max_message_bytes)?;
        let id = self.alloc_id();
        let stall = self.limits.stall_timeout_ms;
        self.insert_topic(Topic {
            id,
            name: name.to_owned(),
            mode: mode_of(mode).unwrap_or(Mode::Reliable),
            ring_bytes: ring,
            max_message_bytes: max,
            stall_timeout: Duration::from_millis(stall.into()),
            declared: false,
            geometry_fixed: ring_bytes != 0 || max_message_bytes != 0,
            slots: FREE_SLOTS,
            publishers: Vec::new(),
            subscribers: Vec::new(),
            evictions: 0,
        });
        tracing::info!(topic = name, ring, "topic created");
        Ok(id)
    }

    /// Ring size and message limit for a request (0 = defaults), checked against the limits.
    pub(super) fn geometry(
        &self,
        ring_bytes: u64,
        max_message_bytes: u32,
    ) -> Result<(u64, u32), Reject> {
        let ring = if ring_bytes == 0 {
            Some(self.limits.default_ring_bytes)
        } else {
            ring_size_for(ring_bytes)
        };
        let Some(ring) = ring.filter(|&r| r <= self.limits.max_ring_bytes) else {
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "a ring of {ring_bytes} bytes exceeds the broker's limit of {} bytes \
                     (limits.max_ring_bytes); ask for at most that, or 0 for the default",
                    self.limits.max_ring_bytes
                ),
            ));
        };
        let fit = max_message_bytes_for(ring as usize) as u32;
        if max_message_bytes > fit {
            return Err(reject(
                ErrorCode::TooLarge,
                format!(
                    "messages of {max_message_bytes} bytes need a ring of at least {} bytes; ask \
                     for a larger ring",
                    (u64::from(max_message_bytes) * 2 + 64).next_power_of_two()
                ),
            ));
        }
        Ok((
            ring,
            if max_message_bytes == 0 {
                fit
            } else {
                max_message_bytes
            },
        ))
    }

    pub(super) fn ring_config(&self, p: &Publisher) -> RingConfig {
        let t = &self.topics[&p.topic];
        RingConfig {
            mode: t.mode,
            data_bytes: t.ring_bytes,
            max_message_bytes: t.max_message_bytes,
            publisher_id: p.id,
        }
    }

    /// Picks a publisher slot of `tid`: a free one, else one whose old ring's readers have
    /// held it past the topic's stall limit (they are evicted: a subscriber that neither
    /// drains a departed publisher's ring nor lets go of it must not lock publishers out).
    pub(super) fn claim_slot(&mut self, tid: u64, limit: usize) -> Result<usize, Reject> {
        for i in 0..limit {
            self.refresh_draining(tid, i);
        }
        let t = &self.topics[&tid];
        if let Some(i) = t.slots[..limit]
            .iter()
            .position(|s| matches!(s, Slot::Free))
        {
            return Ok(i);
        }
        let now = self.now;
        // A slot is taken from its holders only if none of them moved on the old ring for the
        // whole stall limit: an honest subscriber still draining it is never evicted.
        let stale = t.slots[..limit].iter().position(|s| match s {
            Slot::Draining(d) => d
                .holders
                .iter()
                .all(|h| now.duration_since(h.since) >= t.stall_timeout),
            _ => false,
        });
        let (name, stall) = (t.name.clone(), t.stall_timeout);
        let Some(i) = stale else {
            let draining = t.slots[..limit]
                .iter()
                .filter(|s| matches!(s, Slot::Draining(_)))
                .count();
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "topic '{name}' has {limit} publishers, the limit \
                     (limits.max_publishers_per_topic){}",
                    if draining > 0 {
                        format!(
                            "; {draining} of the slots belong to publishers that left and are \
                             freed once their subscribers have read what they left (at most \
                             {} ms); try again then",
                            stall.as_millis()
                        )
                    } else {
                        String::new()
                    }
                ),
            ));
        };
        if let Slot::Draining(d) = &self.topics[&tid].slots[i] {
            let why = format!(
                "you made no progress on (and did not release) the ring of a publisher that \
                 left for {} ms, and a new publisher needs its slot; read faster or use a \
                 larger stall limit",
                stall.as_millis()
            );
            let holders: Vec<u64> = d.holders.iter().map(|h| h.sid).collect();
            self.keep_topic = Some(tid);
            for sid in holders {
                self.evict(sid, tid, &why);
            }
            self.keep_topic = None;
        }
        let t = self.topics.get_mut(&tid).expect("kept");
        t.slots[i] = Slot::Free;
        Ok(i)
    }

    /// Looks at the holders of draining slot `i` of `tid`: one whose cursor passed its
    /// furthest record boundary of the old ring made progress; one whose cursor reads
    /// "detached" after it was seen attached let go. A slot with no holder left is free.
    pub(super) fn refresh_draining(&mut self, tid: u64, i: usize) {
        let now = self.now;
        let Some(t) = self.topics.get_mut(&tid) else {
            return;
        };
        let Slot::Draining(d) = &mut t.slots[i] else {
            return;
        };
        let subscribers = &self.subscribers;
        let (monitor, end) = (&d.monitor, d.end);
        d.holders.retain_mut(|h| {
            let Some(view) = subscribers.get(&h.sid).and_then(|s| s.view.as_ref()) else {
                return false;
            };
            let raw = view.read_pos(i);
            if raw == CURSOR_DETACHED {
                return !h.attached;
            }
            h.attached = true;
            let real = raw <= end
                && (raw == end || monitor.as_ref().is_some_and(|m| m.committed_record_at(raw)));
            if real && raw > h.high_water {
                h.high_water = raw;
                h.since = now;
            }
            true
        });
        if d.holders.is_empty() {
            t.slots[i] = Slot::Free;
        }
    }

    pub(super) fn maybe_drop_topic(&mut self, tid: u64) {
        if self.keep_topic == Some(tid) {
            return;
        }
        let Some(t) = self.topics.get(&tid) else {
            return;
        };
        if !t.declared && t.publishers.is_empty() && t.subscribers.is_empty() {
            let t = self.topics.remove(&tid).expect("exists");
            self.topic_by_name.remove(&t.name);
            tracing::info!(topic = %t.name, "topic removed (no publishers or subscribers left)");
        }
    }

    /// Removes `sid` from the holders of draining slots of `tid` (of publisher `pid` only, or
    /// of all); a slot nobody holds any more is free.
    pub(super) fn drop_slot_holder(&mut self, tid: u64, sid: u64, pid: Option<u64>) {
        let Some(t) = self.topics.get_mut(&tid) else {
            return;
        };
        for slot in &mut t.slots {
            if let Slot::Draining(d) = slot
                && pid.is_none_or(|p| p == d.publisher)
            {
                d.holders.retain(|h| h.sid != sid);
                if d.holders.is_empty() {
                    *slot = Slot::Free;
                }
            }
        }
    }
}
