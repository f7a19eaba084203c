//! The engine's records: a client, a topic and its publisher slots, a publisher, a subscriber
//! (and, for the datagram transport, what the broker reads on its behalf), and the stall
//! tracking of one (subscriber, publisher) pair. The rooms own the behaviour; this file only
//! says what each record holds and why.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    AwaitingHello { deadline: Instant },
    Ready,
}

pub(super) struct Client {
    pub(super) creds: Creds,
    pub(super) gids: Vec<u32>,
    pub(super) name: String,
    pub(super) phase: Phase,
    pub(super) transport: Transport,
    pub(super) publishers: Vec<u64>,
    pub(super) subscribers: Vec<u64>,
    /// Frames handed to the driver and not yet reported sent ([`Engine::on_sent`]): the one
    /// count of a client's send queue. Past [`Engine::unsent_limit`] it is dropped.
    pub(super) inflight: u32,
    /// It passed [`Engine::unsent_limit`]: it is dropped at the next [`Engine::poll_out`], and
    /// nothing more is sent to it.
    pub(super) unread: bool,
    /// Reads are paused ([`Out::PauseReads`]) until its publishers' backlogs drain.
    pub(super) paused: bool,
    /// File descriptors the broker holds for its publishers and subscribers
    /// (`limits.max_fds_per_client`).
    pub(super) fds: u32,
}

pub(super) struct Topic {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) mode: Mode,
    pub(super) ring_bytes: u64,
    pub(super) max_message_bytes: u32,
    pub(super) stall_timeout: Duration,
    pub(super) declared: bool,
    /// Ring size and message limit are fixed once declared or once a publisher created a ring;
    /// a topic made by a subscriber takes them from its first publisher.
    pub(super) geometry_fixed: bool,
    pub(super) slots: [Slot; bus_core::layout::CURSOR_SLOTS],
    pub(super) publishers: Vec<u64>,
    pub(super) subscribers: Vec<u64>,
    pub(super) evictions: u64,
}

/// A publisher slot of a topic: the index of the cursor each subscriber keeps for that
/// publisher's ring, in its cursor page.
#[derive(Debug, Default)]
pub(super) enum Slot {
    #[default]
    Free,
    /// Held by this publisher.
    Used(u64),
    /// Its publisher left, but subscribers may still read its ring (they drain it, then send
    /// RING_RELEASED): their cursor for this slot still describes the old ring, so a new
    /// reliable publisher must not read it as theirs. Free once no holder is left.
    Draining(Box<Draining>),
}

/// A slot whose publisher left while subscribers still read its ring.
#[derive(Debug)]
pub(super) struct Draining {
    pub(super) publisher: u64,
    /// The broker's read-only view of the old ring (it keeps the ring mapped), to tell a
    /// holder's real progress from a number it writes.
    pub(super) monitor: Option<Reader>,
    /// Where the old ring's writer stopped.
    pub(super) end: u64,
    pub(super) holders: Vec<Holder>,
}

/// A subscriber still reading a departed publisher's ring.
#[derive(Clone, Copy, Debug)]
pub(super) struct Holder {
    pub(super) sid: u64,
    /// The furthest record boundary of the old ring it has been seen at.
    pub(super) high_water: u64,
    /// Its cursor has been seen on the old ring (so "detached" now means it let go).
    pub(super) attached: bool,
    /// Since when it has made no progress.
    pub(super) since: Instant,
}

pub(super) const FREE_SLOTS: [Slot; bus_core::layout::CURSOR_SLOTS] =
    [const { Slot::Free }; bus_core::layout::CURSOR_SLOTS];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Life {
    Pending,
    Live,
}

pub(super) struct Publisher {
    pub(super) id: u64,
    pub(super) topic: u64,
    pub(super) conn: ConnId,
    pub(super) slot: u16,
    pub(super) transport: Transport,
    pub(super) life: Life,
    pub(super) ring_fd: Arc<OwnedFd>,
    /// The broker's read-only view, once live: for stats and stall detection.
    pub(super) monitor: Option<Reader>,
    /// Datagram publishers: the broker is the ring's writer.
    pub(super) writer: Option<Writer>,
    pub(super) backlog: VecDeque<Vec<u8>>,
    pub(super) refused: u64,
    /// When it became live, in the engine's event order (see `Engine::live_clock`).
    pub(super) live_seq: u64,
    /// A datagram publisher that was closed (CLOSE_PUBLISHER, or its client left) while
    /// messages it had been told were accepted still waited in `backlog`: it stays until they
    /// are written, then goes. Holds the CLOSE_PUBLISHER to answer once they are.
    pub(super) closing: Option<Closing>,
    /// Subscribers that said RING_RELEASED for this ring: they read no more of it, so they are
    /// neither waited for nor judged on it.
    pub(super) released: BTreeSet<u64>,
    /// File descriptors the broker holds for it: the ring.
    pub(super) fds: u32,
}

/// A datagram publisher's deferred removal (see [`Publisher::closing`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Closing {
    /// The CLOSE_PUBLISHER request to answer with OK, if its connection is still there.
    pub(super) reply: Option<(ConnId, u64)>,
    pub(super) reason: PeerGoneReason,
}

/// What the stall check knows about one (subscriber, publisher) pair.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stall {
    /// The furthest position this subscriber has provably reached in the ring (a record
    /// boundary the writer wrote). Honest cursors only grow; moving back and forth below this
    /// frees nothing, so it is no progress.
    pub(super) high_water: u64,
    /// Since when it has made no progress while the writer waits for it.
    pub(super) since: Instant,
    /// The subscriber was nudged through its wake socket in this episode.
    pub(super) woken: bool,
    /// Its cursor has been seen attached to this ring (not "detached").
    pub(super) attached: bool,
}

pub(super) struct DatagramSub {
    pub(super) page: Arc<CursorPage>,
    pub(super) readers: ReaderSet,
    pub(super) token: u64,
    pub(super) delivered: u64,
    pub(super) lost: u64,
    pub(super) removed: Vec<u64>,
    /// Publishers that left: their rings are read to the end, then dropped.
    pub(super) gone: Vec<u64>,
    /// The next sequence number of each ring (for SKIPPED after a corrupt record).
    pub(super) next_seq: NextSeq,
}

/// Sequence number expected next, per publisher id (at most one entry per publisher slot).
#[derive(Debug, Default)]
pub(super) struct NextSeq(Vec<(u64, u64)>);

impl NextSeq {
    pub(super) fn note(&mut self, pid: u64, next: u64) {
        match self.0.iter_mut().find(|(p, _)| *p == pid) {
            Some(e) => e.1 = next,
            None => self.0.push((pid, next)),
        }
    }

    pub(super) fn get(&self, pid: u64) -> u64 {
        self.0.iter().find(|(p, _)| *p == pid).map_or(0, |e| e.1)
    }

    pub(super) fn forget(&mut self, pid: u64) {
        self.0.retain(|(p, _)| *p != pid);
    }
}

pub(super) struct Subscriber {
    pub(super) id: u64,
    pub(super) topic: u64,
    pub(super) conn: ConnId,
    pub(super) delivery: Transport,
    pub(super) life: Life,
    pub(super) cursor_fd: Arc<OwnedFd>,
    pub(super) wake_tx: Arc<OwnedFd>,
    /// The broker's read-only view of the cursor page, once live.
    pub(super) view: Option<CursorView>,
    /// Datagram subscribers: the broker reads the rings for it.
    pub(super) datagram: Option<DatagramSub>,
    /// Stall tracking per publisher id.
    pub(super) stall: BTreeMap<u64, Stall>,
    /// When it became live, in the engine's event order.
    pub(super) live_seq: u64,
    /// File descriptors the broker holds for it: the cursor page and the wake socket's send
    /// end; for datagram delivery also the wake socket's receive end (which the driver watches).
    pub(super) fds: u32,
}
