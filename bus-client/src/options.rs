//! Options for connections, publishers and subscribers.

use std::time::Duration;

pub use bus_core::frame::ModeRequest;
pub use bus_core::wake::WaitStrategy;

/// How a client moves messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory, falling back to datagrams for a publisher or subscriber whose segments
    /// cannot be mapped (a sandbox without memfd or mmap, for example).
    #[default]
    Auto,
    /// Shared memory only: fail instead of falling back.
    SharedMemory,
    /// Datagram fallback only: every message is one frame on the broker socket, relayed by the
    /// broker. Slower, but needs nothing but the socket.
    Datagram,
}

/// Options for [`crate::Bus::connect_with`].
#[derive(Clone, Debug)]
pub struct BusOptions {
    /// Name shown in `bus stat` and the broker's log (at most 64 bytes; longer is cut).
    pub client_name: String,
    /// How long a request to the broker (HELLO, creating a publisher or subscriber) may take.
    pub request_timeout: Duration,
    /// Shared memory, datagrams, or shared memory with fallback.
    pub transport: Transport,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            client_name: default_client_name(),
            request_timeout: Duration::from_secs(5),
            transport: Transport::Auto,
        }
    }
}

impl BusOptions {
    /// The defaults: the program's name, a 5 s request timeout, [`Transport::Auto`].
    pub fn new() -> Self {
        BusOptions::default()
    }
    /// Sets the client name.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }
    /// Sets the request timeout.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets the transport.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }
}

fn default_client_name() -> String {
    let name = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    clip(&name, bus_core::limits::MAX_CLIENT_NAME_BYTES).to_owned()
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// Topic settings a publisher asks for ([`crate::Bus::publisher_with`]). The first publisher
/// (or the broker's config) fixes a topic's geometry; later requests must agree or ask for 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicOptions {
    /// Delivery mode: any (the topic's, reliable for a new topic), reliable or lossy.
    pub mode: ModeRequest,
    /// Ring data size in bytes (rounded up to a power of two by the broker); 0: the broker's
    /// default.
    pub ring_bytes: u64,
    /// Largest message; 0: what the ring allows (half the ring, less a record header).
    pub max_message_bytes: u32,
}

impl Default for TopicOptions {
    fn default() -> Self {
        TopicOptions {
            mode: ModeRequest::Any,
            ring_bytes: 0,
            max_message_bytes: 0,
        }
    }
}

impl TopicOptions {
    /// Mode any, default ring, default message limit.
    pub fn new() -> Self {
        TopicOptions::default()
    }
    /// Sets the mode.
    pub fn mode(mut self, mode: ModeRequest) -> Self {
        self.mode = mode;
        self
    }
    /// Sets the ring size.
    pub fn ring_bytes(mut self, bytes: u64) -> Self {
        self.ring_bytes = bytes;
        self
    }
    /// Sets the largest message size.
    pub fn max_message_bytes(mut self, bytes: u32) -> Self {
        self.max_message_bytes = bytes;
        self
    }
}

/// Options for [`crate::Bus::subscriber_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// Mode the topic must have (any by default).
    pub mode: ModeRequest,
    /// How [`crate::Subscriber::recv`] waits when the rings are empty.
    pub wait: WaitStrategy,
    /// Record publish-to-receive latency into a histogram ([`crate::Subscriber::latency`]).
    pub record_latency: bool,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            mode: ModeRequest::Any,
            wait: WaitStrategy::default(),
            record_latency: false,
        }
    }
}

impl SubscriberOptions {
    /// Mode any, spin-then-park, no latency recording.
    pub fn new() -> Self {
        SubscriberOptions::default()
    }
    /// Sets the mode the topic must have.
    pub fn mode(mut self, mode: ModeRequest) -> Self {
        self.mode = mode;
        self
    }
    /// Sets the wait strategy.
    pub fn wait(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }
    /// Turns latency recording on or off.
    pub fn record_latency(mut self, on: bool) -> Self {
        self.record_latency = on;
        self
    }
}
