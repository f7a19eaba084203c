//! The protocol's fixed bounds, which both sides of the socket need. Units are the last word of
//! each name. The broker's run-time limits (`[limits]` in its config) are broker policy and live in
//! `bus_broker::limits`.

/// Largest control frame (header + body) on the broker socket. Also the largest datagram a
/// datagram-transport client may send; payloads above `MAX_FRAME_BYTES - frame header - publish body`
/// must go through shared memory.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Most file descriptors one control frame may carry (SCM_RIGHTS).
pub const MAX_FDS_PER_FRAME: usize = 4;
/// Longest topic name, in bytes (UTF-8).
pub const MAX_TOPIC_BYTES: usize = 255;
/// Longest client name in a hello frame, in bytes (UTF-8).
pub const MAX_CLIENT_NAME_BYTES: usize = 64;
/// Longest human-readable message in an error frame, in bytes (UTF-8).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Longest broker version string in a welcome frame, in bytes (UTF-8).
pub const MAX_BROKER_VERSION_BYTES: usize = 64;
