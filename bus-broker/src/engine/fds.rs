//! File descriptors: the broker's budget and each client's quota (`limits.max_fds_per_client`).

use super::*;

impl Engine {
    /// Sets how many file descriptors the engine may hold for segments and wake sockets, all
    /// clients together (the daemon derives it from RLIMIT_NOFILE after reserving the
    /// driver's and one per connection). Unlimited by default.
    pub fn set_fd_budget(&mut self, fds: u64) {
        self.fd_budget = fds;
    }

    /// File descriptors the engine holds for segments and wake sockets.
    pub fn fds_in_use(&self) -> u64 {
        self.fds_used
    }

    /// Refuses a request that would make the broker hold `need` more descriptors for `conn`
    /// than its quota or the broker's budget allow (`limit-reached`, naming the limit).
    pub(super) fn check_fds(&self, conn: ConnId, need: u32) -> Result<(), Reject> {
        let held = self.clients.get(&conn).map_or(0, |c| c.fds);
        let quota = self.limits.max_fds_per_client;
        if held + need > quota {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "this connection's publishers and subscribers hold {held} of the {quota} \
                     file descriptors one client may have the broker hold \
                     (limits.max_fds_per_client), and this request needs {need}; close some, \
                     or raise the limit in the broker config"
                ),
            ));
        }
        if self.fds_used + u64::from(need) > self.fd_budget {
            return Err(reject(
                ErrorCode::LimitReached,
                format!(
                    "the broker holds {} of the {} file descriptors it may use for rings and \
                     cursor pages (its RLIMIT_NOFILE less what connections need); try again \
                     later, or raise the broker's file-descriptor limit (ulimit -n, \
                     LimitNOFILE=)",
                    self.fds_used, self.fd_budget
                ),
            ));
        }
        Ok(())
    }

    /// Counts `n` descriptors held for `conn` (which may be gone: only the total counts then).
    pub(super) fn charge_fds(&mut self, conn: ConnId, n: u32) {
        self.fds_used += u64::from(n);
        if let Some(c) = self.clients.get_mut(&conn) {
            c.fds += n;
        }
    }

    pub(super) fn refund_fds(&mut self, conn: ConnId, n: u32) {
        self.fds_used = self.fds_used.saturating_sub(u64::from(n));
        if let Some(c) = self.clients.get_mut(&conn) {
            c.fds = c.fds.saturating_sub(n);
        }
    }
}
