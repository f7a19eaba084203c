//! Time: the engine reads no clock. The driver calls [`Engine::on_tick`] at
//! [`Engine::next_deadline`] (or later) with the time; from it come the HELLO timeout, the
//! retry of datagram publishers' backlogs, the stall checks and relay work left over from a
//! bounded turn.

use super::*;

impl Engine {
    /// Time passed; call at [`Engine::next_deadline`] (or later).
    pub fn on_tick(&mut self, now: Instant) {
        self.advance(now);
        let now = self.now;
        self.drop_stale_hello_deadlines();
        let mut expired = Vec::new();
        while let Some(&(deadline, conn)) = self.hello_deadlines.front() {
            if deadline > now {
                break;
            }
            self.hello_deadlines.pop_front();
            if self.awaiting_hello(conn) {
                expired.push(conn);
            }
        }
        for conn in expired {
            let msg = format!(
                "no HELLO within {} ms of connecting; send HELLO first",
                self.limits.handshake_timeout_ms
            );
            self.send_error(conn, 0, ErrorCode::Timeout, &msg);
            self.close(conn);
        }
        let backlogged: Vec<u64> = self
            .publishers
            .values()
            .filter(|p| !p.backlog.is_empty())
            .map(|p| p.id)
            .collect();
        for pid in backlogged {
            self.flush_backlog(pid);
        }
        if !self.needs_stall_checks() {
            self.next_stall_check = None;
        } else {
            match self.next_stall_check {
                Some(t) if t <= now => {
                    self.check_stalls(now);
                    self.next_stall_check = Some(now + STALL_CHECK_EVERY);
                }
                Some(_) => {}
                None => self.next_stall_check = Some(now + STALL_CHECK_EVERY),
            }
        }
        let datagram_subs: Vec<u64> = self
            .subscribers
            .values()
            .filter(|s| s.datagram.is_some())
            .map(|s| s.id)
            .collect();
        self.pump_again.clear();
        for sid in datagram_subs {
            self.pump_datagram(sid);
        }
        self.flush_relays();
    }

    /// When the engine next needs [`Engine::on_tick`]; `None`: not until another event.
    pub fn next_deadline(&self) -> Option<Instant> {
        let handshake = self
            .hello_deadlines
            .iter()
            .find(|&&(_, conn)| self.awaiting_hello(conn))
            .map(|&(deadline, _)| deadline);
        let backlog = self
            .publishers
            .values()
            .any(|p| !p.backlog.is_empty())
            .then(|| self.now + BACKLOG_RETRY);
        let stall = if self.needs_stall_checks() {
            Some(
                self.next_stall_check
                    .unwrap_or(self.now + STALL_CHECK_EVERY),
            )
        } else {
            None
        };
        let relay = (!self.pump_again.is_empty()).then_some(self.now);
        [handshake, backlog, stall, relay]
            .into_iter()
            .flatten()
            .min()
    }
}
