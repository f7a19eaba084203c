//! # bus-client: the embeddable membus library
//!
//! Applications connect to the broker, publish by loaning buffers inside a shared-memory ring and
//! committing them, and receive zero-copy samples that point into the publisher's ring.
//!
//! ```no_run
//! use bus_client::Bus;
//!
//! let bus = Bus::connect_default()?; // $MEMBUS_SOCKET, or $XDG_RUNTIME_DIR/membus/bus.sock
//! let mut publisher = bus.publisher("greetings")?;
//! let mut subscriber = bus.subscriber("greetings")?;
//! publisher.send(b"hello")?;
//! let sample = subscriber.recv()?;
//! assert_eq!(&sample[..], b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - [`Bus`]: one connection to the broker and its control thread (see `docs/client.md`).
//! - [`Publisher`]: [`Publisher::loan`] + [`Loan::commit`] (zero copy), or [`Publisher::send`].
//! - [`Subscriber`]: [`Subscriber::recv`] / [`Subscriber::try_recv`] return a [`Sample`] that
//!   derefs to the bytes in shared memory; [`std::os::fd::AsFd`] for event loops.
//! - [`latency`]: per-subscriber latency histograms and interval logs.
//!
//! The data path (`loan`, `commit`, `send`, `try_recv`, dropping a sample) takes no lock and
//! makes no syscall while messages flow; control events reach it through an inbox it checks
//! with one atomic load.
#![forbid(unsafe_code)]

mod bus;
mod conn;
pub mod error;
pub mod latency;
mod options;
mod publisher;
mod subscriber;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use bus::{Bus, default_address};
pub use bus_core::layout::Mode;
pub use error::{
    BrokerError, ConnectError, ErrorCode, PublishError, PublisherError, RecvError, SkipReason,
    SubscribeError,
};
pub use options::{
    BusOptions, ModeRequest, SubscriberOptions, TopicOptions, Transport, WaitStrategy,
};
pub use publisher::{Loan, Publisher};
pub use subscriber::{Iter, OwnedSample, Sample, Subscriber};
