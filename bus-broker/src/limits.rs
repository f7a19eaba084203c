//! The broker's run-time limits: broker policy, set in the config file's `[limits]` table.
//! The protocol's fixed bounds (frame size, fds per frame, name lengths) stay in
//! `bus_core::limits`, which both sides of the socket need.

/// Run-time limits of a broker, each with a default. Sent to clients in the welcome frame where
/// they need to know them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most clients connected at once.
    pub max_clients: u32,
    /// Most topics at once.
    pub max_topics: u32,
    /// Most publishers on one topic (at most [`bus_core::layout::CURSOR_SLOTS`]).
    pub max_publishers_per_topic: u32,
    /// Most subscribers on one topic.
    pub max_subscribers_per_topic: u32,
    /// Default ring data size for a new topic, in bytes.
    pub default_ring_bytes: u64,
    /// Largest ring data size a client may ask for, in bytes.
    pub max_ring_bytes: u64,
    /// Replies queued for one client before it is disconnected as too slow.
    pub max_queued_replies: u32,
    /// Time a new client has to say hello, in milliseconds.
    pub handshake_timeout_ms: u32,
    /// Time a reliable subscriber may hold a publisher back before it is evicted, in ms.
    pub stall_timeout_ms: u32,
    /// File descriptors the broker may hold for one connection's publishers and subscribers
    /// (rings, cursor pages, wake sockets): a quota, so that one client cannot use up the
    /// broker's descriptors and lock the others out. The default, 1,024, is 512 shared-memory
    /// or 256 datagram subscriptions, and keeps the defaults within a hard RLIMIT_NOFILE of
    /// 20,000 (64 reserved + 16,384 connections + twice the quota).
    pub max_fds_per_client: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 16_384,
            max_topics: 4_096,
            max_publishers_per_topic: bus_core::layout::CURSOR_SLOTS as u32,
            max_subscribers_per_topic: 1_024,
            default_ring_bytes: 1 << 20,
            max_ring_bytes: bus_core::layout::MAX_DATA_BYTES as u64,
            max_queued_replies: 256,
            handshake_timeout_ms: 5_000,
            stall_timeout_ms: 2_000,
            max_fds_per_client: 1_024,
        }
    }
}
