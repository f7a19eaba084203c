//! The numbered values that appear in control frames: message types, error codes, reasons and the
//! small enums inside bodies. Each has a stable wire value and a short stable name (the one
//! `docs/protocol.md` and the logs use). Values are never reused; a new value is a protocol
//! change.

/// Declares a wire enum: the Rust enum, `to_raw`, `from_raw`, `name`, `ALL` and `Display`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $repr:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )*
        }

        impl $name {
            /// Every value, in wire-value order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The value on the wire.
            pub const fn to_raw(self) -> $repr {
                self as $repr
            }

            /// Parses a wire value; `None` if this protocol version does not define it.
            pub const fn from_raw(raw: $repr) -> Option<Self> {
                match raw {
                    $( $value => Some($name::$variant), )*
                    _ => None,
                }
            }

            /// The short, stable name (used in `docs/protocol.md`, logs and `bus stat`).
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire, )*
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

wire_enum! {
    /// The `type` field of the frame header.
    ///
    /// Numbers are grouped: 0x00xx session, 0x01xx publishing, 0x02xx subscribing, 0x03xx peer
    /// events, 0x04xx datagram fallback, 0x05xx statistics.
    pub enum MsgType: u16 {
        /// Client → broker, first frame of every connection.
        Hello = 0x0001 => "HELLO",
        /// Broker → client, reply to HELLO.
        Welcome = 0x0002 => "WELCOME",
        /// Either direction: a request failed (or the broker reports a protocol fault).
        Error = 0x0003 => "ERROR",
        /// Broker → client: generic success reply.
        Ok = 0x0004 => "OK",
        /// Either direction: liveness probe.
        Ping = 0x0005 => "PING",
        /// Either direction: reply to PING.
        Pong = 0x0006 => "PONG",
        /// Broker → client: the broker is going away.
        Shutdown = 0x0007 => "SHUTDOWN",
        /// Client → broker: become a publisher of a topic.
        CreatePublisher = 0x0101 => "CREATE_PUBLISHER",
        /// Broker → client: a ring to write (publisher) or read (subscriber).
        RingGranted = 0x0102 => "RING_GRANTED",
        /// Client → broker: the publisher mapped and initialised its ring.
        PublisherReady = 0x0103 => "PUBLISHER_READY",
        /// Client → broker: stop publishing.
        ClosePublisher = 0x0104 => "CLOSE_PUBLISHER",
        /// Broker → publisher: a subscriber's cursor page and wake socket.
        CursorGranted = 0x0105 => "CURSOR_GRANTED",
        /// Client → broker: subscribe to a topic.
        Subscribe = 0x0201 => "SUBSCRIBE",
        /// Broker → client: reply to SUBSCRIBE.
        Subscribed = 0x0202 => "SUBSCRIBED",
        /// Client → broker: the subscriber mapped its cursor page.
        SubscriberReady = 0x0203 => "SUBSCRIBER_READY",
        /// Client → broker: stop subscribing.
        Unsubscribe = 0x0204 => "UNSUBSCRIBE",
        /// Subscriber -> broker notice: this subscriber let go of one publisher's ring (read to
        /// its end after PEER_GONE, or dropped as corrupt). No reply.
        RingReleased = 0x0205 => "RING_RELEASED",
        /// Broker → client: a publisher or subscriber of one of your topics left.
        PeerGone = 0x0301 => "PEER_GONE",
        /// Broker → subscriber: you were removed from a topic.
        Evicted = 0x0302 => "EVICTED",
        /// Fallback client → broker: publish one message.
        Publish = 0x0401 => "PUBLISH",
        /// Broker → fallback subscriber: one message.
        Deliver = 0x0402 => "DELIVER",
        /// Broker -> datagram subscriber: a message it will not get as a DELIVER, and why.
        Skipped = 0x0403 => "SKIPPED",
        /// Client → broker: ask for the broker's statistics.
        StatsRequest = 0x0501 => "STATS_REQUEST",
        /// Broker → client: one chunk of the statistics JSON document.
        StatsReply = 0x0502 => "STATS_REPLY",
    }
}

wire_enum! {
    /// The code in an ERROR frame: what went wrong, in a form a program can act on.
    #[non_exhaustive]
    pub enum ErrorCode: u16 {
        /// The frame could not be decoded (bad header or body); see the message.
        BadFrame = 1 => "bad-frame",
        /// The header or HELLO named a protocol version this broker does not speak.
        UnsupportedVersion = 2 => "unsupported-version",
        /// A request arrived before HELLO, or HELLO arrived twice.
        HandshakeRequired = 3 => "handshake-required",
        /// The frame is well formed but not valid here: wrong direction, an id of the wrong
        /// kind, READY twice, shared memory asked for by a datagram-only client.
        InvalidRequest = 4 => "invalid-request",
        /// The fds attached to the frame do not match what its type carries, or the ancillary
        /// data was truncated.
        BadFds = 5 => "bad-fds",
        /// The broker's policy does not allow this client to do this on this topic.
        NotAllowed = 6 => "not-allowed",
        /// The topic name is empty or contains characters the broker does not accept.
        BadTopic = 7 => "bad-topic",
        /// The topic does not exist.
        NoSuchTopic = 8 => "no-such-topic",
        /// The topic exists with a different mode than the one required.
        TopicConflict = 9 => "topic-conflict",
        /// A count limit (clients, topics, publishers or subscribers per topic) is reached.
        LimitReached = 10 => "limit-reached",
        /// A size is above the broker's limit (ring bytes, message bytes, payload).
        TooLarge = 11 => "too-large",
        /// The publisher or subscriber id is not one this client holds.
        NoSuchId = 12 => "no-such-id",
        /// The ring header the publisher wrote failed the broker's checks at PUBLISHER_READY.
        BadSegment = 13 => "bad-segment",
        /// The client did not read its replies fast enough; it is being disconnected.
        TooSlow = 14 => "too-slow",
        /// The client did not complete the handshake in time; it is being disconnected.
        Timeout = 15 => "timeout",
        /// The broker failed (e.g. memfd_create or mmap failed); retrying later may work.
        Internal = 16 => "internal",
        /// The broker is shutting down and accepts no new requests.
        ShuttingDown = 17 => "shutting-down",
    }
}

wire_enum! {
    /// How a client moves messages: through shared memory, or as datagrams through the broker.
    pub enum Transport: u8 {
        /// Map rings and cursor pages (memfds passed with SCM_RIGHTS).
        Shm = 1 => "shm",
        /// Datagram fallback: PUBLISH / DELIVER frames on the control socket, no fds.
        Datagram = 2 => "datagram",
    }
}

wire_enum! {
    /// The topic mode a request asks for. The topic's actual mode is a [`crate::layout::Mode`];
    /// the wire values 1 and 2 are the same as in the ring header.
    pub enum ModeRequest: u8 {
        /// Accept whatever mode the topic has (a new topic gets the broker's default).
        Any = 0 => "any",
        /// Require a reliable topic.
        Reliable = 1 => "reliable",
        /// Require a lossy topic.
        Lossy = 2 => "lossy",
    }
}

wire_enum! {
    /// What the receiver of a RING_GRANTED frame does with the ring.
    pub enum RingRole: u8 {
        /// A shared-memory publisher: map the attached ring read-write and initialise it.
        Writer = 1 => "writer",
        /// A shared-memory subscriber: verify seals and size, map the attached ring read-only.
        Reader = 2 => "reader",
        /// A datagram publisher: the broker writes its PUBLISH frames into a ring it owns. No fd.
        Datagram = 3 => "datagram",
        /// As [`RingRole::Reader`], for a ring whose publisher arrived after the subscriber:
        /// everything in it was published after the subscription, so read it from its first
        /// record (a plain reader starts at the writer's current position).
        ReaderFromStart = 4 => "reader-from-start",
    }
}

wire_enum! {
    /// Which kind of peer a PEER_GONE frame is about.
    pub enum PeerKind: u8 {
        /// The id is a publisher id.
        Publisher = 1 => "publisher",
        /// The id is a subscriber id.
        Subscriber = 2 => "subscriber",
    }
}

wire_enum! {
    /// Why a peer left a topic (PEER_GONE).
    #[non_exhaustive]
    pub enum PeerGoneReason: u16 {
        /// It closed or unsubscribed in order.
        Closed = 1 => "closed",
        /// Its connection ended (the process exited or crashed).
        Disconnected = 2 => "disconnected",
        /// The broker evicted it (a subscriber that stalled a reliable publisher).
        Evicted = 3 => "evicted",
        /// The broker disconnected it for a protocol violation.
        ProtocolError = 4 => "protocol-error",
    }
}

wire_enum! {
    /// Why a subscriber was evicted (EVICTED).
    #[non_exhaustive]
    pub enum EvictReason: u16 {
        /// It held a reliable publisher back longer than the topic's stall limit.
        Stalled = 1 => "stalled",
        /// As a datagram subscriber, it did not read DELIVER frames fast enough.
        TooSlow = 2 => "too-slow",
        /// Its cursor page held values that break the protocol.
        BadCursor = 3 => "bad-cursor",
        /// The policy no longer allows it (after a policy reload).
        NotAllowed = 4 => "not-allowed",
    }
}

wire_enum! {
    /// Why a datagram subscriber did not get a message as a DELIVER (SKIPPED).
    #[non_exhaustive]
    pub enum SkipReason: u16 {
        /// The message is larger than a DELIVER frame can carry
        /// ([`crate::frame::MAX_DATAGRAM_MESSAGE_BYTES`]); a shared-memory subscriber gets it.
        TooLarge = 1 => "too-large",
        /// Lossy topic: the publisher overwrote the message while the broker copied it.
        Overwritten = 2 => "overwritten",
        /// The publisher's ring is corrupt: this and everything after it from that publisher
        /// is lost (the ring is dropped).
        CorruptRing = 3 => "corrupt-ring",
    }
}

wire_enum! {
    /// Why the broker is going away (SHUTDOWN).
    #[non_exhaustive]
    pub enum ShutdownReason: u16 {
        /// An operator asked (SIGTERM, SIGINT).
        Requested = 1 => "requested",
        /// The broker is restarting; reconnect after it comes back.
        Restart = 2 => "restart",
        /// The broker hit an unrecoverable error.
        Fatal = 3 => "fatal",
    }
}

impl ModeRequest {
    /// Whether a topic of mode `mode` satisfies this request.
    pub const fn accepts(self, mode: crate::layout::Mode) -> bool {
        matches!(
            (self, mode),
            (ModeRequest::Any, _)
                | (ModeRequest::Reliable, crate::layout::Mode::Reliable)
                | (ModeRequest::Lossy, crate::layout::Mode::Lossy)
        )
    }
}

impl From<crate::layout::Mode> for ModeRequest {
    fn from(mode: crate::layout::Mode) -> Self {
        match mode {
            crate::layout::Mode::Reliable => ModeRequest::Reliable,
            crate::layout::Mode::Lossy => ModeRequest::Lossy,
        }
    }
}

impl RingRole {
    /// True for the subscriber roles ([`RingRole::Reader`], [`RingRole::ReaderFromStart`]).
    pub const fn is_reader(self) -> bool {
        matches!(self, RingRole::Reader | RingRole::ReaderFromStart)
    }
}
