//! STATS_REPLY: the broker's state as one JSON document, split into frames.

use bus_core::frame::{Msg, StatsReply};
use bus_core::layout::CURSOR_DETACHED;
use serde_json::{Value, json};

use super::{Client, ConnId, Engine, Life, mode_name};
use crate::policy::StatsScope;

/// Who asks for STATS, and so what the document shows ([`crate::policy::Policy::stats_scope`]).
struct Viewer<'a> {
    scope: StatsScope,
    uid: u32,
    gids: &'a [u32],
}

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
    /// The whole stats document, as the broker's own uid sees it (also used by tests).
    pub fn stats_json(&self) -> Value {
        self.stats_json_for(None)
    }

    /// The stats document for `viewer` (`None`: everything).
    fn stats_json_for(&self, viewer: Option<&Viewer<'_>>) -> Value {
        let scope = viewer.map_or(StatsScope::All, |v| v.scope);
        // Identity of a client: hidden from a restricted viewer unless it is its own uid's.
        let shows =
            |c: &Client| viewer.is_none_or(|v| v.scope == StatsScope::All || v.uid == c.creds.uid);
        let ident = |c: Option<&Client>| {
            let c = c.filter(|c| shows(c));
            (
                c.map(|c| c.creds.pid),
                c.map(|c| c.creds.uid),
                c.map(|c| comm(c.creds.pid)),
                c.map(|c| c.name.clone()),
            )
        };
        let mut topics: Vec<&super::Topic> = self
            .topics
            .values()
            .filter(|t| match viewer {
                Some(v) if v.scope == StatsScope::Permitted => {
                    self.policy.may_see_topic(&t.name, v.uid, v.gids)
                }
                _ => true,
            })
            .collect();
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
                    let (pid, uid, command, name) = ident(c);
                    pubs.push(json!({
                        "id": p.id,
                        "slot": p.slot,
                        "pid": pid,
                        "uid": uid,
                        "command": command,
                        "name": name,
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
                        .datagram
                        .as_ref()
                        .map_or((None, None), |f| (Some(f.delivered), Some(f.lost)));
                    let (pid, uid, command, name) = ident(c);
                    subs.push(json!({
                        "id": s.id,
                        "pid": pid,
                        "uid": uid,
                        "command": command,
                        "name": name,
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
            "scope": scope.name(),
            "topics": topics,
        })
    }

    pub(super) fn stats(&mut self, conn: ConnId, rid: u64) {
        let broker_uid = rustix::process::geteuid().as_raw();
        let doc = match self.clients.get(&conn) {
            Some(c) => {
                let viewer = Viewer {
                    scope: self.policy.stats_scope(c.creds.uid, &c.gids, broker_uid),
                    uid: c.creds.uid,
                    gids: &c.gids,
                };
                self.stats_json_for(Some(&viewer))
            }
            // Not a client (cannot happen: frames come from clients): show nothing.
            None => json!({ "scope": "permitted", "topics": [] }),
        }
        .to_string();
        let chunks: Vec<StatsReply<'_>> = StatsReply::chunks(&doc).collect();
        for chunk in chunks {
            self.send(conn, rid, Msg::StatsReply(chunk), Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use crate::limits::Limits;
    use bus_core::frame::{CreatePublisher, Frame, Hello, ModeRequest, Msg, Transport};
    use bus_core::sys::scm::FdBatch;
    use serde_json::Value;

    use super::super::{ConnId, Creds, Engine, Out};
    use crate::policy::{Policy, UserDb};

    const POLICY: &str = "\
        [[allow]]\nusers = [1001]\npublish = [\"a.*\"]\n\n\
        [[allow]]\nusers = [1005]\npublish = [\"b.x\"]\n\n\
        [[allow]]\nusers = [1002]\nsubscribe = [\"b.x\"]\n\n\
        [[allow]]\ngroups = [3000]\nstats = true\n";

    /// Sends one frame from `conn`; returns the frames the engine sent back to it.
    fn frame(e: &mut Engine, conn: ConnId, rid: u64, msg: Msg<'_>) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        Frame::new(rid, msg).encode(&mut buf).unwrap();
        e.on_frame(conn, &buf, &mut FdBatch::new(), Instant::now());
        e.flush_relays();
        let mut got = Vec::new();
        while let Some(o) = e.poll_out() {
            if let Out::Send {
                conn: to, frame, ..
            } = o
            {
                e.on_sent(to, 1);
                if to == conn {
                    got.push(frame);
                }
            }
        }
        got
    }

    /// A client of `uid` (primary gid `gid`) that said HELLO.
    fn client(e: &mut Engine, conn: ConnId, uid: u32, gid: u32) {
        let creds = Creds {
            pid: std::process::id() as i32,
            uid,
            gid,
        };
        assert!(e.on_connect(conn, creds, Instant::now()));
        let hello = Hello {
            protocol_version: 1,
            transport: Transport::Datagram,
            client_name: "stats-test",
        };
        frame(e, conn, 1, Msg::Hello(hello));
    }

    fn publish_on(e: &mut Engine, conn: ConnId, topic: &str) {
        let req = CreatePublisher {
            ring_data_bytes: 4096,
            max_message_bytes: 0,
            mode: ModeRequest::Any,
            transport: Transport::Datagram,
            topic,
        };
        let got = frame(e, conn, 2, Msg::CreatePublisher(req));
        let msg = Frame::decode(&got[0]).unwrap().msg;
        assert!(matches!(msg, Msg::RingGranted(_)), "{msg:?}");
    }

    fn stats_of(e: &mut Engine, conn: ConnId) -> Value {
        let mut doc = String::new();
        for f in frame(e, conn, 9, Msg::StatsRequest) {
            match Frame::decode(&f).unwrap().msg {
                Msg::StatsReply(r) => doc.push_str(r.json),
                other => panic!("expected STATS_REPLY, got {other:?}"),
            }
        }
        serde_json::from_str(&doc).unwrap()
    }

    fn topic_names(doc: &Value) -> Vec<&str> {
        doc["topics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn stats_shows_each_client_what_the_policy_lets_it_use() {
        let policy = Policy::parse(POLICY, Path::new("policy.toml"), &UserDb::parse("", ""))
            .expect("policy parses");
        let mut e = Engine::new(Limits::default(), Vec::new(), policy, Instant::now());
        client(&mut e, 1, 1001, 1001);
        publish_on(&mut e, 1, "a.one");
        client(&mut e, 2, 1005, 1005);
        publish_on(&mut e, 2, "b.x");

        // Allowed nothing: no topic at all.
        client(&mut e, 3, 1006, 1006);
        let doc = stats_of(&mut e, 3);
        assert_eq!(doc["scope"], "permitted");
        assert!(topic_names(&doc).is_empty(), "{doc}");

        // Subscribe to b.x only: sees b.x, but not who (another uid) publishes it.
        client(&mut e, 4, 1002, 1002);
        let doc = stats_of(&mut e, 4);
        assert_eq!(topic_names(&doc), ["b.x"], "{doc}");
        let p = &doc["topics"][0]["publishers"][0];
        assert!(p["id"].as_u64().is_some(), "{p}");
        for hidden in ["uid", "pid", "command", "name"] {
            assert!(p[hidden].is_null(), "{hidden} of another uid's client: {p}");
        }

        // Its own publisher's identity is shown to its uid.
        let doc = stats_of(&mut e, 1);
        assert_eq!(topic_names(&doc), ["a.one"], "{doc}");
        assert_eq!(doc["topics"][0]["publishers"][0]["uid"], 1001);

        // A `stats = true` rule (here through group 3000) shows everything.
        client(&mut e, 5, 1007, 3000);
        let doc = stats_of(&mut e, 5);
        assert_eq!(doc["scope"], "all");
        assert_eq!(topic_names(&doc), ["a.one", "b.x"], "{doc}");
        assert_eq!(doc["topics"][1]["publishers"][0]["uid"], 1005);

        // Root (and the broker's own uid) see everything without a rule.
        client(&mut e, 6, 0, 0);
        let doc = stats_of(&mut e, 6);
        assert_eq!(doc["scope"], "all");
        assert_eq!(topic_names(&doc), ["a.one", "b.x"], "{doc}");
    }
}
