//! STATS_REPLY: the broker's state as one JSON document, split into frames.

use bus_core::frame::{Msg, StatsReply};
use bus_core::layout::CURSOR_DETACHED;
use serde_json::{Value, json};

use super::{ConnId, Engine, Life, mode_name};

/// `/proc/PID/comm` of a client, for people (best effort; empty if unreadable).
fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Resident set size of the broker in bytes, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

impl Engine {
    /// The stats document (also used by tests).
    pub fn stats_json(&self) -> Value {
        let mut topics: Vec<&super::Topic> = self.topics.values().collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        let topics: Vec<Value> = topics
            .into_iter()
            .map(|t| {
                let mut pubs: Vec<Value> = Vec::new();
                for pid in &t.publishers {
                    let p = &self.publishers[pid];
                    let c = self.clients.get(&p.conn);
                    let (next_pos, messages) =
                        p.monitor.as_ref().map_or((0, 0), |m| m.writer_progress());
                    pubs.push(json!({
                        "id": p.id,
                        "slot": p.slot,
                        "pid": c.map(|c| c.creds.pid),
                        "uid": c.map(|c| c.creds.uid),
                        "command": c.map(|c| comm(c.creds.pid)),
                        "name": c.map(|c| c.name.clone()),
                        "transport": p.transport.name(),
                        "ready": p.life == Life::Live,
                        "messages": messages,
                        "bytes_written": next_pos,
                        "backlog": p.backlog.len(),
                        "refused": p.refused,
                    }));
                }
                let mut subs: Vec<Value> = Vec::new();
                for sid in &t.subscribers {
                    let s = &self.subscribers[sid];
                    let c = self.clients.get(&s.conn);
                    // Lag: the largest distance, in bytes, between a publisher and this cursor.
                    let lag = s.view.as_ref().map_or(0, |v| {
                        t.publishers
                            .iter()
                            .filter_map(|pid| {
                                let p = &self.publishers[pid];
                                let (next, _) = p.monitor.as_ref()?.writer_progress();
                                let cur = v.read_pos(p.slot as usize);
                                (cur != CURSOR_DETACHED).then(|| next.saturating_sub(cur))
                            })
                            .max()
                            .unwrap_or(0)
                    });
                    let (delivered, lost) = s
                        .fallback
                        .as_ref()
                        .map_or((None, None), |f| (Some(f.delivered), Some(f.lost)));
                    subs.push(json!({
                        "id": s.id,
                        "pid": c.map(|c| c.creds.pid),
                        "uid": c.map(|c| c.creds.uid),
                        "command": c.map(|c| comm(c.creds.pid)),
                        "name": c.map(|c| c.name.clone()),
                        "delivery": s.delivery.name(),
                        "ready": s.life == Life::Live,
                        "lag_bytes": lag,
                        "parked": s.view.as_ref().is_some_and(|v| v.park() & 1 == 1),
                        "delivered": delivered,
                        "lost": lost,
                    }));
                }
                json!({
                    "name": t.name,
                    "id": t.id,
                    "mode": mode_name(t.mode),
                    "ring_bytes": t.ring_bytes,
                    "max_message_bytes": t.max_message_bytes,
                    "declared": t.declared,
                    "evictions": t.evictions,
                    "publishers": pubs,
                    "subscribers": subs,
                })
            })
            .collect();
        json!({
            "broker": {
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_ms": self.now.saturating_duration_since(self.started).as_millis() as u64,
                "clients": self.clients.len(),
                "open_fds": open_fds(),
                "rss_bytes": rss_bytes(),
                "evictions": self.evictions,
            },
            "topics": topics,
        })
    }

    pub(super) fn stats(&mut self, conn: ConnId, rid: u64) {
        let doc = self.stats_json().to_string();
        let chunks: Vec<StatsReply<'_>> = StatsReply::chunks(&doc).collect();
        for chunk in chunks {
            self.send(conn, rid, Msg::StatsReply(chunk), Vec::new());
        }
    }
}
