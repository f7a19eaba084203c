//! Stalled reliable subscribers: who holds a writer back, judged only by what the subscriber
//! controls against what the writer provably needs, and eviction.

use super::*;

impl Engine {
    pub(super) fn needs_stall_checks(&self) -> bool {
        self.topics.values().any(|t| {
            t.mode == Mode::Reliable && !t.publishers.is_empty() && !t.subscribers.is_empty()
        })
    }

    /// Finds reliable subscribers that hold a publisher back, judged only by what they
    /// control and against what the writer provably needs (docs/security.md):
    ///
    /// * the position that counts is the subscriber's cursor when it is one the writer would
    ///   respect: its own position (`next_pos`) or a committed record there, which the broker
    ///   checks in the ring itself. Any other value (behind the window, ahead of the writer,
    ///   mid-record, or a publisher's inflated `next_pos` that leaves an honest cursor short
    ///   of any record) is a lie of one side and holds nobody back: the honest writer ignores
    ///   it, so it accuses nobody;
    /// * progress is passing the furthest such position seen before; moving back and forth
    ///   below it frees nothing;
    /// * the writer waits only if less than one largest record fits behind that position;
    /// * before judging, the broker wakes the subscriber once (a parked honest subscriber
    ///   whose publisher never woke it then reads).
    ///
    /// A subscriber that existed before the publisher and has not attached to its ring counts
    /// as being at position 0 (it will read from there), until it releases the ring.
    pub(super) fn check_stalls(&mut self, now: Instant) {
        let mut evict = Vec::new();
        let mut wake = Vec::new();
        let tids: Vec<u64> = self.topics.keys().copied().collect();
        for tid in tids {
            let t = &self.topics[&tid];
            if t.mode != Mode::Reliable {
                continue;
            }
            let max_record = record_bytes(t.max_message_bytes as usize) as u64;
            'subs: for &sid in &t.subscribers {
                let Some(s) = self.subscribers.get_mut(&sid) else {
                    continue;
                };
                let Some(view) = &s.view else { continue };
                for &pid in &t.publishers {
                    let Some(p) = self.publishers.get(&pid) else {
                        continue;
                    };
                    let Some(monitor) = &p.monitor else { continue };
                    if p.released.contains(&sid) {
                        s.stall.remove(&pid);
                        continue;
                    }
                    let (next_pos, _) = monitor.writer_progress();
                    let raw = view.read_pos(p.slot as usize);
                    let entry = s.stall.entry(pid).or_insert(Stall {
                        high_water: 0,
                        since: now,
                        woken: false,
                        attached: false,
                    });
                    let pos = if raw == CURSOR_DETACHED {
                        if p.live_seq > s.live_seq && !entry.attached {
                            0
                        } else {
                            entry.since = now;
                            continue;
                        }
                    } else {
                        entry.attached = true;
                        raw
                    };
                    let respected = pos == next_pos
                        || (pos < next_pos
                            && next_pos - pos <= t.ring_bytes
                            && monitor.committed_record_at(pos));
                    if !respected {
                        continue;
                    }
                    if pos > entry.high_water {
                        entry.high_water = pos;
                        entry.since = now;
                        entry.woken = false;
                        continue;
                    }
                    let full = next_pos - pos + max_record > t.ring_bytes;
                    if !full {
                        entry.since = now;
                        entry.woken = false;
                    } else if now.duration_since(entry.since) >= t.stall_timeout && entry.woken {
                        evict.push((sid, tid, t.stall_timeout));
                        continue 'subs;
                    } else if !entry.woken {
                        entry.woken = true;
                        wake.push(sid);
                    }
                }
            }
        }
        for sid in wake {
            let Some(s) = self.subscribers.get(&sid) else {
                continue;
            };
            if s.datagram.is_some() {
                self.pump_datagram(sid);
            } else {
                let fd = s.wake_tx.clone();
                self.out.push_back(Out::Wake { fd });
            }
        }
        for (sid, tid, limit) in evict {
            let why = format!(
                "your cursor did not move for {} ms while a reliable publisher waited for \
                 space; read faster, use a larger ring, or subscribe in lossy mode",
                limit.as_millis()
            );
            self.evict(sid, tid, &why);
        }
    }

    pub(super) fn evict(&mut self, sid: u64, tid: u64, why: &str) {
        let Some(s) = self.subscribers.get(&sid) else {
            return;
        };
        let conn = s.conn;
        let name = self
            .topics
            .get(&tid)
            .map_or("?", |t| t.name.as_str())
            .to_owned();
        let message = format!("evicted from '{name}': {why}");
        tracing::warn!(subscriber = sid, topic = %name, "evicting stalled subscriber");
        let ev = Evicted {
            topic_id: tid,
            subscriber_id: sid,
            reason: EvictReason::Stalled,
            message: clip(&message),
        };
        self.send(conn, 0, Msg::Evicted(ev), Vec::new());
        if let Some(t) = self.topics.get_mut(&tid) {
            t.evictions += 1;
        }
        self.evictions += 1;
        self.remove_subscriber(sid, PeerGoneReason::Evicted);
    }
}
