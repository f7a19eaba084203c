//! Error types, one small enum per operation. Each message says what to do next.

use std::io;
use std::time::Duration;

pub use bus_core::frame::{ErrorCode, EvictReason, SkipReason};

/// An ERROR frame from the broker: its code and its human message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the broker refused the request ({code}): {message}")]
pub struct BrokerError {
    /// The protocol error code (`docs/protocol.md` §7.5).
    pub code: ErrorCode,
    /// The broker's explanation.
    pub message: String,
}

/// Why [`crate::Bus::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Nothing listens at the address.
    #[error(
        "no broker at {path} ({cause}): start one with `bus-broker`, or set MEMBUS_SOCKET to \
         the socket of a running broker"
    )]
    NoBroker {
        /// Where we looked.
        path: String,
        /// "connection refused" or "no such file".
        cause: &'static str,
    },
    /// The socket exists but we may not connect to it.
    #[error(
        "permission denied connecting to the broker at {path}: the socket's mode or group does \
         not admit this user; see `bus-broker --group`"
    )]
    PermissionDenied {
        /// The socket.
        path: String,
    },
    /// The address is not a valid socket address.
    #[error("invalid broker address {path:?}: {reason}")]
    BadAddress {
        /// The address given.
        path: String,
        /// Why.
        reason: String,
    },
    /// The broker answered HELLO with an error.
    #[error("the broker at {path} refused the connection ({}): {}", error.code, error.message)]
    Refused {
        /// The socket.
        path: String,
        /// The broker's error.
        error: BrokerError,
    },
    /// The broker did not answer HELLO in time.
    #[error(
        "the broker at {path} did not answer within {after:?}; it may be overloaded or hung \
         (check its log), or raise BusOptions::request_timeout"
    )]
    Timeout {
        /// The socket.
        path: String,
        /// The timeout.
        after: Duration,
    },
    /// The broker closed the connection during the handshake.
    #[error("the broker at {path} closed the connection during the handshake: {reason}")]
    Closed {
        /// The socket.
        path: String,
        /// What we know.
        reason: String,
    },
    /// Another I/O failure.
    #[error("cannot connect to the broker at {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Why creating a publisher or subscriber failed ([`crate::Bus::publisher`],
/// [`crate::Bus::subscriber`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The broker said no (policy, topic conflict, limits, bad name...).
    #[error(transparent)]
    Refused(#[from] BrokerError),
    /// The connection to the broker is gone.
    #[error("the broker is gone ({reason}); reconnect with Bus::connect once it runs again")]
    BrokerGone {
        /// What we know (EOF, SHUTDOWN message...).
        reason: String,
    },
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}; check its log, or raise the request timeout")]
    Timeout(Duration),
    /// The segment the broker sent could not be mapped or initialised.
    #[error(
        "cannot use the shared memory the broker granted: {0}; use Transport::Auto or \
         Transport::Datagram where shared memory is unavailable"
    )]
    Segment(String),
    /// The broker's reply did not follow the protocol.
    #[error("unexpected reply from the broker: {0}; are client and broker the same release?")]
    Protocol(String),
    /// Sending on the control socket failed.
    #[error("control socket error: {0}")]
    Io(#[from] io::Error),
}

impl From<rustix::io::Errno> for SubscribeError {
    fn from(e: rustix::io::Errno) -> Self {
        SubscribeError::Io(e.into())
    }
}

/// Why creating a publisher failed ([`crate::Bus::publisher`], [`crate::Bus::publisher_with`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublisherError {
    /// The broker said no (policy, topic conflict, ring size or message limit, limits...).
    #[error(transparent)]
    Refused(#[from] BrokerError),
    /// The connection to the broker is gone.
    #[error("the broker is gone ({reason}); reconnect with Bus::connect once it runs again")]
    BrokerGone {
        /// What we know (EOF, SHUTDOWN message...).
        reason: String,
    },
    /// The broker did not answer in time.
    #[error("the broker did not answer within {0:?}; check its log, or raise the request timeout")]
    Timeout(Duration),
    /// The ring the broker created for this publisher could not be mapped read-write or its
    /// header could not be written.
    #[error(
        "cannot map the ring the broker created for this publisher: {0}; use Transport::Auto or \
         Transport::Datagram where shared memory is unavailable"
    )]
    Ring(String),
    /// The broker's reply did not follow the protocol.
    #[error("unexpected reply from the broker: {0}; are client and broker the same release?")]
    Protocol(String),
    /// Sending on the control socket failed.
    #[error("control socket error: {0}")]
    Io(#[from] io::Error),
}

/// What creating a publisher and a subscriber can both run into, so that the request helpers
/// serve both error types.
pub(crate) trait OpenError {
    fn refused(e: BrokerError) -> Self;
    fn gone(reason: String) -> Self;
    fn timeout(after: Duration) -> Self;
    fn io(e: io::Error) -> Self;
    fn protocol(what: String) -> Self;
}

macro_rules! open_error {
    ($t:ident) => {
        impl OpenError for $t {
            fn refused(e: BrokerError) -> Self {
                $t::Refused(e)
            }
            fn gone(reason: String) -> Self {
                $t::BrokerGone { reason }
            }
            fn timeout(after: Duration) -> Self {
                $t::Timeout(after)
            }
            fn io(e: io::Error) -> Self {
                $t::Io(e)
            }
            fn protocol(what: String) -> Self {
                $t::Protocol(what)
            }
        }
    };
}
open_error!(SubscribeError);
open_error!(PublisherError);

/// Why a publish did not happen. Where a retry makes sense the message (or the slice you
/// passed) is handed back, as in `crossbeam`'s `TrySendError<T>`.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PublishError<T> {
    /// Reliable topic: a subscriber has not released enough space (`try_send`, `try_loan`).
    #[error("the ring is full: a subscriber has not released space yet; retry, or use send()")]
    Full(T),
    /// Reliable topic: space did not become free in time (`send_timeout`).
    #[error("the ring stayed full for {after:?}: a subscriber is not keeping up")]
    Timeout {
        /// The message.
        payload: T,
        /// How long we waited.
        after: Duration,
    },
    /// The message is larger than the topic allows.
    #[error(
        "message of {len} bytes exceeds this publisher's maximum of {max} bytes; create the \
         topic with a larger max_message_bytes (and ring), or split the message (a datagram \
         publisher is also capped at 65472 bytes, what one frame carries: use shared memory \
         for larger messages)"
    )]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Datagram transport: the broker refused an earlier PUBLISH (for example `too-slow`:
    /// its backlog for this publisher was full). That earlier message was not published; this
    /// one was not sent and is handed back.
    #[error("the broker refused an earlier message, which was not published: {error}")]
    Refused {
        /// The message of this call (not sent).
        payload: T,
        /// The broker's error.
        error: BrokerError,
    },
    /// The broker is gone: no subscriber can join, and waiting for space is unbounded.
    #[error("the broker is gone ({reason}); reconnect with Bus::connect once it runs again")]
    BrokerGone {
        /// The message.
        payload: T,
        /// What we know.
        reason: String,
    },
    /// Reliable topic: this publisher could not start honouring a subscriber's cursor (its
    /// ring tracks too many readers, or the subscriber's cursor page is unusable), so it will
    /// not wait for that subscriber, which may miss messages. Reported once, before the next
    /// message; that message was not published and is handed back, publishing again is fine.
    #[error(
        "this publisher cannot honour subscriber {subscriber_id}'s cursor ({detail}); it will \
         not wait for that subscriber, which may miss messages. The broker's \
         limits.max_subscribers_per_topic keeps a topic within what a ring tracks; this message \
         was not published, send it again"
    )]
    Untracked {
        /// The message of this call (not published).
        payload: T,
        /// The subscriber not waited for.
        subscriber_id: u64,
        /// Why.
        detail: String,
    },
}

impl<T> PublishError<T> {
    /// The message handed back, if this error carries one.
    pub fn into_payload(self) -> Option<T> {
        match self {
            PublishError::Full(p)
            | PublishError::Timeout { payload: p, .. }
            | PublishError::Refused { payload: p, .. }
            | PublishError::BrokerGone { payload: p, .. }
            | PublishError::Untracked { payload: p, .. } => Some(p),
            PublishError::TooLarge { .. } => None,
        }
    }

    /// The same error with the payload replaced.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> PublishError<U> {
        match self {
            PublishError::Full(p) => PublishError::Full(f(p)),
            PublishError::Timeout { payload, after } => PublishError::Timeout {
                payload: f(payload),
                after,
            },
            PublishError::TooLarge { len, max } => PublishError::TooLarge { len, max },
            PublishError::Refused { payload, error } => PublishError::Refused {
                payload: f(payload),
                error,
            },
            PublishError::BrokerGone { payload, reason } => PublishError::BrokerGone {
                payload: f(payload),
                reason,
            },
            PublishError::Untracked {
                payload,
                subscriber_id,
                detail,
            } => PublishError::Untracked {
                payload: f(payload),
                subscriber_id,
                detail,
            },
        }
    }
}

impl<T> std::fmt::Debug for PublishError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            PublishError::Full(_) => "Full",
            PublishError::Timeout { .. } => "Timeout",
            PublishError::TooLarge { .. } => "TooLarge",
            PublishError::Refused { .. } => "Refused",
            PublishError::BrokerGone { .. } => "BrokerGone",
            PublishError::Untracked { .. } => "Untracked",
        };
        write!(f, "PublishError::{kind}({self})")
    }
}

/// Why a receive failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The broker removed this subscriber from its topic.
    #[error("evicted from the topic ({reason}): {message}")]
    Evicted {
        /// Why.
        reason: EvictReason,
        /// The broker's explanation and advice.
        message: String,
    },
    /// The broker is gone and every ring has been read to its end.
    #[error(
        "the broker is gone ({reason}) and every message already published has been received; \
         reconnect with Bus::connect once it runs again"
    )]
    BrokerGone {
        /// What we know.
        reason: String,
    },
    /// A publisher's ring holds invalid data (a faulty or hostile publisher). That ring is
    /// dropped; the others keep working, so receiving again is fine.
    #[error("dropped the ring of publisher {publisher_id}: {detail}")]
    BadRing {
        /// The publisher.
        publisher_id: u64,
        /// What was wrong.
        detail: String,
    },
    /// Datagram delivery: the broker could not deliver one message of this publisher as a
    /// datagram and said so (SKIPPED). Nothing else is lost and the stream goes on, so
    /// receiving again is fine. `reason` says why: the message was larger than a datagram
    /// carries (subscribe through shared memory to get such messages), a lossy message was
    /// overwritten while the broker copied it, or the publisher's ring is corrupt (nothing
    /// more comes from that publisher; `seq` is the first sequence number not delivered).
    #[error(
        "message {seq} of publisher {publisher_id} ({len} bytes) was not delivered: {}",
        skip_reason_text(*reason)
    )]
    Skipped {
        /// The publisher.
        publisher_id: u64,
        /// Its sequence number.
        seq: u64,
        /// Messages of this publisher lost just before it (lossy topics), as
        /// `Sample::lost_before` counts them.
        lost_before: u64,
        /// Its length in bytes (0 when unknown).
        len: u32,
        /// Why.
        reason: SkipReason,
    },
    /// Lossy topic only: the publisher overwrote the message between the moment `recv` saw it
    /// and the moment it took it (the thread was descheduled for longer than a ring's worth of
    /// messages). Nothing is broken: receive again; the next sample's `lost_before` counts what
    /// was skipped.
    #[error(
        "lossy topic: publisher {publisher_id} overwrote the message being taken; receive again"
    )]
    Lapped {
        /// The publisher.
        publisher_id: u64,
    },
    /// Waiting on the wake socket failed.
    #[error("waiting for messages failed: {0}")]
    Io(#[from] io::Error),
}

/// What a [`SkipReason`] means for the reader of an error message.
fn skip_reason_text(reason: SkipReason) -> String {
    match reason {
        SkipReason::TooLarge => format!(
            "it is larger than a datagram delivery carries ({} bytes); subscribe through \
             shared memory to receive such messages",
            bus_core::frame::MAX_DATAGRAM_MESSAGE_BYTES
        ),
        SkipReason::Overwritten => {
            "lossy topic: the publisher overwrote it while the broker copied it".to_owned()
        }
        SkipReason::CorruptRing => {
            "the publisher's ring is corrupt; nothing more comes from that publisher".to_owned()
        }
        other => format!("{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creation_failure() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let gone: PublisherError = request_gone();
        Err(gone)?;
        Ok(())
    }

    fn request_gone<E: OpenError>() -> E {
        E::gone("EOF".into())
    }

    #[test]
    fn publisher_errors_are_their_own_and_convert_with_a_question_mark() {
        let e = creation_failure().unwrap_err();
        let p = e
            .downcast_ref::<PublisherError>()
            .expect("a PublisherError");
        assert!(matches!(p, PublisherError::BrokerGone { reason } if reason == "EOF"));
        assert!(e.to_string().contains("reconnect with Bus::connect"), "{e}");
        let ring = PublisherError::Ring("mmap: ENOMEM".into()).to_string();
        assert!(
            ring.contains("this publisher") && ring.contains("Transport::Datagram"),
            "{ring}"
        );
        let sub: SubscribeError = request_gone();
        assert!(matches!(sub, SubscribeError::BrokerGone { .. }));
    }
}
