//! [`Bus`]: one connection to the broker.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bus_core::frame::{Hello, Msg, PROTOCOL_VERSION};
use bus_core::naming::{SOCKET_ENV, SocketSpec, default_socket_path};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::conn::{self, RequestError, Shared, Welcome, lock};
use crate::error::{BrokerError, ConnectError, OpenError, PublisherError, SubscribeError};
use crate::options::{BusOptions, SubscriberOptions, TopicOptions, Transport, clip};
use crate::{Publisher, Subscriber};

/// The connection and its control thread; shared by the [`Bus`] and every publisher and
/// subscriber made from it. The last one dropped shuts the socket down and joins the thread.
pub(crate) struct Client {
    pub shared: Arc<Shared>,
    pub transport: Transport,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.shutdown();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Client {
    pub fn welcome(&self) -> Welcome {
        lock(&self.shared.welcome)
            .clone()
            .expect("set by connect before any handle exists")
    }
}

/// Maps a request failure to the error of publisher/subscriber creation.
pub(crate) fn request_error<E: OpenError>(e: RequestError) -> E {
    match e {
        RequestError::Gone(reason) => E::gone(reason),
        RequestError::Timeout(t) => E::timeout(t),
        RequestError::Io(e) => E::io(e),
    }
}

/// A connection to the membus broker. Cheap to clone (the clones share the connection);
/// publishers and subscribers keep it alive.
///
/// ```no_run
/// use bus_client::Bus;
/// let bus = Bus::connect_default()?;
/// let mut publisher = bus.publisher("prices")?;
/// publisher.send(b"EURUSD 1.0842")?;
///
/// let mut subscriber = bus.subscriber("prices")?;
/// let sample = subscriber.recv()?;
/// println!("{} bytes, seq {}", sample.len(), sample.seq());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Bus {
    pub(crate) client: Arc<Client>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("socket", &self.client.shared.path)
            .field("client_id", &self.client_id())
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// The address [`Bus::connect_default`] uses: `$MEMBUS_SOCKET`, or else
/// `$XDG_RUNTIME_DIR/membus/bus.sock` (see `bus_core::naming::default_socket_path`).
pub fn default_address() -> std::ffi::OsString {
    match std::env::var_os(SOCKET_ENV) {
        Some(v) if !v.is_empty() => v,
        _ => default_socket_path(|k| std::env::var_os(k), rustix::process::getuid().as_raw())
            .into_os_string(),
    }
}

impl Bus {
    /// Connects to the broker at `address`: a socket path, or `@NAME` for an abstract socket.
    pub fn connect(address: impl AsRef<OsStr>) -> Result<Bus, ConnectError> {
        Bus::connect_with(address, BusOptions::default())
    }

    /// Connects to the broker named by `MEMBUS_SOCKET`, or at the default path.
    pub fn connect_default() -> Result<Bus, ConnectError> {
        Bus::connect_with(default_address(), BusOptions::default())
    }

    /// Connects with options (client name, request timeout, transport).
    pub fn connect_with(
        address: impl AsRef<OsStr>,
        options: BusOptions,
    ) -> Result<Bus, ConnectError> {
        let address = address.as_ref();
        let path = address.to_string_lossy().into_owned();
        let sock = open_socket(address, &path)?;
        let shared = Arc::new(Shared::new(sock, path.clone(), options.request_timeout));
        let thread = conn::spawn(shared.clone()).map_err(|source| ConnectError::Io {
            path: path.clone(),
            source,
        })?;
        let transport = match options.transport {
            Transport::Datagram => bus_core::frame::Transport::Datagram,
            Transport::Auto | Transport::SharedMemory => bus_core::frame::Transport::Shm,
        };
        let hello = Msg::Hello(Hello {
            protocol_version: u16::from(PROTOCOL_VERSION),
            transport,
            client_name: clip(
                &options.client_name,
                bus_core::limits::MAX_CLIENT_NAME_BYTES,
            ),
        });
        let refused = |error: BrokerError| ConnectError::Refused {
            path: path.clone(),
            error,
        };
        let reply = match shared.request(hello) {
            Ok(reply) => reply,
            Err(RequestError::Timeout(after)) => {
                shared.shutdown();
                let _ = thread.join();
                return Err(ConnectError::Timeout {
                    path: path.clone(),
                    after,
                });
            }
            Err(e) => {
                // The broker closed the connection: sending HELLO failed (EPIPE, or ECONNRESET
                // if it closed with our HELLO unread) or the control thread saw the end. A
                // broker that refuses a client (limit-reached) sends ERROR first, and that
                // frame is still queued on our socket after the failed send: the control
                // thread reads it before it sees end of stream, so wait for the thread to end
                // (the broker's end is closed, so it does) and report the broker's reason.
                let closed = matches!(&e, RequestError::Gone(_))
                    || matches!(&e, RequestError::Io(io) if matches!(
                        io.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ));
                if !closed {
                    shared.shutdown();
                }
                let _ = thread.join();
                if let Some(error) = lock(&shared.refusal).take() {
                    return Err(refused(error));
                }
                return Err(match e {
                    RequestError::Io(source) if !closed => ConnectError::Io {
                        path: path.clone(),
                        source,
                    },
                    _ => ConnectError::Closed {
                        path: path.clone(),
                        reason: shared.gone_reason(),
                    },
                });
            }
        };
        let client = Client {
            shared: shared.clone(),
            transport: options.transport,
            thread: Mutex::new(Some(thread)),
        };
        match reply.msg() {
            Msg::Welcome(w) => {
                *lock(&shared.welcome) = Some(Welcome {
                    client_id: w.client_id,
                    max_datagram_message_bytes: w.max_datagram_message_bytes,
                    broker_version: w.broker_version.to_owned(),
                });
            }
            Msg::Error(e) => {
                return Err(refused(BrokerError {
                    code: e.code,
                    message: e.message.to_owned(),
                }));
            }
            other => {
                return Err(ConnectError::Closed {
                    path,
                    reason: format!("expected WELCOME, got {}", other.msg_type()),
                });
            }
        }
        Ok(Bus {
            client: Arc::new(client),
        })
    }

    /// The id the broker gave this connection.
    pub fn client_id(&self) -> u64 {
        self.client.welcome().client_id
    }

    /// The broker's version string (from WELCOME).
    pub fn broker_version(&self) -> String {
        self.client.welcome().broker_version
    }

    /// The socket address this bus connected to.
    pub fn address(&self) -> &str {
        &self.client.shared.path
    }

    /// False once the broker closed the connection (it exited, crashed or shut down).
    pub fn is_connected(&self) -> bool {
        !self.client.shared.is_gone()
    }

    /// A publisher on `topic` with the topic's settings (or the broker's defaults for a new
    /// topic).
    pub fn publisher(&self, topic: &str) -> Result<Publisher, PublisherError> {
        self.publisher_with(topic, TopicOptions::default())
    }

    /// A publisher on `topic`, asking for a mode, ring size and message limit.
    pub fn publisher_with(
        &self,
        topic: &str,
        options: TopicOptions,
    ) -> Result<Publisher, PublisherError> {
        Publisher::create(self.client.clone(), topic, options)
    }

    /// A subscriber on `topic` (default options: any mode, spin-then-park, no latency
    /// recording).
    pub fn subscriber(&self, topic: &str) -> Result<Subscriber, SubscribeError> {
        self.subscriber_with(topic, SubscriberOptions::default())
    }

    /// A subscriber on `topic` with options.
    pub fn subscriber_with(
        &self,
        topic: &str,
        options: SubscriberOptions,
    ) -> Result<Subscriber, SubscribeError> {
        Subscriber::create(self.client.clone(), topic, options)
    }
}

fn open_socket(address: &OsStr, path: &str) -> Result<OwnedFd, ConnectError> {
    let spec = SocketSpec::parse(address).map_err(|reason| ConnectError::BadAddress {
        path: path.to_owned(),
        reason,
    })?;
    let io = |e: Errno| ConnectError::Io {
        path: path.to_owned(),
        source: e.into(),
    };
    let addr = match &spec {
        SocketSpec::Path(p) => SocketAddrUnix::new(p.as_path()),
        SocketSpec::Abstract(name) => SocketAddrUnix::new_abstract_name(name),
    }
    .map_err(io)?;
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io)?;
    loop {
        match rustix::net::connect(&sock, &addr) {
            Ok(()) => return Ok(sock),
            Err(Errno::INTR) => continue,
            Err(Errno::NOENT) => {
                return Err(ConnectError::NoBroker {
                    path: path.to_owned(),
                    cause: "no such file",
                });
            }
            Err(Errno::CONNREFUSED) => {
                return Err(ConnectError::NoBroker {
                    path: path.to_owned(),
                    cause: "connection refused",
                });
            }
            Err(Errno::ACCESS | Errno::PERM) => {
                return Err(ConnectError::PermissionDenied {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io(e)),
        }
    }
}
