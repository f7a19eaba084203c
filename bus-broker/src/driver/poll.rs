//! The readiness driver: level-triggered epoll, for where io_uring is unavailable. Everything
//! but "what is ready" lives in `Core`; this file only keeps the epoll interest set in step
//! with what the core needs. No unsafe code.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use rustix::event::{Timespec, epoll};

use super::{ACCEPT_BUDGET, Core, DriverError, Readiness, key};
use crate::addr::Listener;
use crate::engine::ConnId;

/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// An epoll instance, created before the listener is bound.
pub(crate) struct EpollSetup {
    ep: OwnedFd,
}

impl EpollSetup {
    pub(crate) fn new() -> Result<EpollSetup, DriverError> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| DriverError::Setup {
            what: "epoll_create1",
            source: e.into(),
        })?;
        Ok(EpollSetup { ep })
    }

    pub(crate) fn start(self, listener: &Listener) -> Result<EpollIo<'_>, DriverError> {
        epoll::add(
            &self.ep,
            listener,
            epoll::EventData::new_u64(key::make(key::ACCEPT, 0)),
            epoll::EventFlags::IN,
        )
        .map_err(|e| DriverError::Setup {
            what: "epoll_ctl(ADD) of the listening socket",
            source: e.into(),
        })?;
        Ok(EpollIo {
            ep: self.ep,
            listener: listener.as_fd(),
            listening: true,
        })
    }
}

/// The epoll side of [`Core`].
pub(crate) struct EpollIo<'l> {
    ep: OwnedFd,
    listener: BorrowedFd<'l>,
    /// Whether the listener is in the interest set.
    listening: bool,
}

impl EpollIo<'_> {
    fn set_listening(&mut self, on: bool) {
        if on == self.listening {
            return;
        }
        let result = if on {
            epoll::add(
                &self.ep,
                self.listener,
                epoll::EventData::new_u64(key::make(key::ACCEPT, 0)),
                epoll::EventFlags::IN,
            )
        } else {
            epoll::delete(&self.ep, self.listener)
        };
        match result {
            Ok(()) => self.listening = on,
            Err(e) => tracing::error!("epoll_ctl on the listening socket failed: {e}"),
        }
    }
}

/// What is in the interest set for a connection.
#[derive(Default)]
pub(crate) struct EpollConn {
    flags: epoll::EventFlags,
}

impl Readiness for EpollIo<'_> {
    type ConnState = EpollConn;

    fn conn_added(
        &mut self,
        id: ConnId,
        fd: BorrowedFd<'_>,
        state: &mut EpollConn,
    ) -> io::Result<()> {
        state.flags = epoll::EventFlags::IN;
        epoll::add(
            &self.ep,
            fd,
            epoll::EventData::new_u64(key::make(key::CONN_IN, id)),
            state.flags,
        )?;
        Ok(())
    }

    fn interest(
        &mut self,
        id: ConnId,
        fd: BorrowedFd<'_>,
        state: &mut EpollConn,
        read: bool,
        write: bool,
    ) {
        let mut want = epoll::EventFlags::empty();
        if read {
            want |= epoll::EventFlags::IN;
        }
        if write {
            want |= epoll::EventFlags::OUT;
        }
        if want == state.flags {
            return;
        }
        // An empty set still reports HUP and ERR, which `Core` handles as a failed send or EOF.
        match epoll::modify(
            &self.ep,
            fd,
            epoll::EventData::new_u64(key::make(key::CONN_IN, id)),
            want,
        ) {
            Ok(()) => state.flags = want,
            Err(e) => tracing::error!(conn = id, "epoll_ctl(MOD) failed: {e}"),
        }
    }

    fn conn_removed(&mut self, _id: ConnId, fd: OwnedFd, _state: EpollConn) {
        // Remove before closing: epoll forgets an fd on close only when no duplicate of it is
        // open anywhere (a client could hold one received through SCM_RIGHTS).
        let _ = epoll::delete(&self.ep, &fd);
        drop(fd);
    }

    fn watch_added(&mut self, serial: u64, fd: &Arc<OwnedFd>) -> io::Result<()> {
        epoll::add(
            &self.ep,
            fd.as_fd(),
            epoll::EventData::new_u64(key::make(key::WATCH, serial)),
            epoll::EventFlags::IN,
        )?;
        Ok(())
    }

    fn watch_fired(&mut self, _serial: u64, _fd: &Arc<OwnedFd>) {
        // Level-triggered: epoll reports it again while it stays readable.
    }

    fn watch_removed(&mut self, _serial: u64, fd: Arc<OwnedFd>) {
        let _ = epoll::delete(&self.ep, fd.as_fd());
    }

    fn stop_accepting(&mut self) {
        self.set_listening(false);
    }
}

/// Runs the loop until shutdown completes.
pub(crate) fn run(mut core: Core<EpollIo<'_>>) -> Result<(), DriverError> {
    epoll::add(
        &core.io.ep,
        core.signals_fd(),
        epoll::EventData::new_u64(key::make(key::SIGNAL, 0)),
        epoll::EventFlags::IN,
    )
    .map_err(|e| DriverError::Setup {
        what: "epoll_ctl(ADD) of the signalfd",
        source: e.into(),
    })?;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENTS);
    loop {
        let now = Instant::now();
        core.tick(now);
        if core.should_exit() {
            return Ok(());
        }
        if core.accept_resume_due(now) {
            core.io.set_listening(true);
        }
        let timeout = if core.has_backlog() {
            Some(Timespec::default())
        } else {
            core.next_wakeup().map(|t| {
                let d = t.saturating_duration_since(now);
                // Round up so that a deadline is never woken for a hair early, then spun on.
                let nanos = d.subsec_nanos().div_ceil(1_000_000) * 1_000_000;
                Timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: i64::from(nanos),
                }
            })
        };
        events.clear();
        match epoll::wait(
            &core.io.ep,
            rustix::buffer::spare_capacity(&mut events),
            timeout.as_ref(),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(DriverError::Loop {
                    what: "epoll_wait",
                    source: e.into(),
                });
            }
        }
        for event in &events {
            let (kind, id) = key::split(event.data.u64());
            match kind {
                key::ACCEPT => accept_some(&mut core),
                key::CONN_IN => {
                    let flags = event.flags;
                    if flags.intersects(epoll::EventFlags::OUT) {
                        core.writable(id);
                    }
                    if flags.intersects(
                        epoll::EventFlags::IN | epoll::EventFlags::HUP | epoll::EventFlags::ERR,
                    ) {
                        core.readable(id);
                    }
                    // HUP/ERR on a closing connection (no IN interest): the flush fails and
                    // closes it.
                    if flags.intersects(epoll::EventFlags::HUP | epoll::EventFlags::ERR)
                        && !flags.intersects(epoll::EventFlags::OUT)
                    {
                        core.writable(id);
                    }
                }
                key::WATCH => core.wake(id),
                key::SIGNAL => core.signals_ready(),
                _ => debug_assert!(false, "unknown epoll key {kind}"),
            }
        }
        core.run_backlog();
    }
}

fn accept_some(core: &mut Core<EpollIo<'_>>) {
    for _ in 0..ACCEPT_BUDGET {
        if !core.accepting() || core.accept_paused() {
            return;
        }
        match rustix::net::accept_with(
            core.io.listener,
            rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        ) {
            Ok(fd) => core.accepted(fd),
            Err(rustix::io::Errno::AGAIN) => return,
            Err(e) => {
                if core.accept_error(e) {
                    core.io.set_listening(false);
                    return;
                }
            }
        }
    }
}
