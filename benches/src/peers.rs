//! Peer-library cases: iceoryx2 (the published crate, version pinned exactly in
//! `benches/Cargo.toml`), built only with the `peers` cargo feature:
//!
//! ```text
//! cargo run -p benches --release --features peers -- report
//! ```
//!
//! Same method as the membus ping-pong (`membus.rs`): two processes, pinned to separate CPUs,
//! `publish_subscribe::<[u8]>` services `ping` and `pong`, every payload byte written by the
//! sender (into the loaned sample, no copy from a private buffer) and read by the receiver (the
//! same checksum), warm-up, one-way = RTT / 2.
//!
//! - `iceoryx2-pingpong-{8,64,4k,64k,1m}`: busy-poll: the receiver calls `Subscriber::receive` in a
//!   loop.
//! - `iceoryx2-event-64`: iceoryx2's blocking mode: after each send the sender calls
//!   `Notifier::notify` on an event service; the receiver tries `receive` and, when empty, blocks
//!   in `Listener::blocking_wait`.
//! - `iceoryx2-pingpong-64-idle16`: busy-poll at 64 B with 16 extra subscribers of `ping` that
//!   never read (created in a third process that sleeps until the case ends).
//!
//! Services are named after the parent's pid and the case, so concurrent runs do not meet; each
//! process's iceoryx2 node removes its resources when it drops, and the parent removes stale
//! ones of dead nodes it finds (iceoryx2's own cleanup) when it creates its node.
//!
//! ZeroMQ (the `zmq` crate over the system's libzmq, `apt-get install -y libzmq3-dev`), the
//! second peer, over `ipc://` with a `PAIR` socket per side:
//!
//! - `zmq-ipc-pingpong-64`: blocking `recv`; the sender fills a `zmq::Message` of 64 B in place
//!   and sends it, the receiver receives into a reused `Message` and sums it.
//! - `zmq-ipc-spin-64`: the same, the receiver polling `recv` with `DONTWAIT`.
//!
//! Without the `peers` feature [`cases`] is empty and the peer ratios show as not built.

use crate::case::{Case, Metric, Ratio};

/// The peer-library cases (empty without the `peers` feature).
pub fn cases() -> Vec<Case> {
    #[cfg(feature = "peers")]
    {
        let mut v = iceoryx2_cases::cases();
        v.extend(zmq_cases::cases());
        v
    }
    #[cfg(not(feature = "peers"))]
    {
        Vec::new()
    }
}

/// True when this build has the peer cases.
pub const BUILT: bool = cfg!(feature = "peers");

/// The names of the peer cases, built or not (so a report can say a ratio was not built).
pub fn cases_named() -> &'static [&'static str] {
    &[
        "iceoryx2-pingpong-8",
        "iceoryx2-pingpong-64",
        "iceoryx2-pingpong-4k",
        "iceoryx2-pingpong-64k",
        "iceoryx2-pingpong-1m",
        "iceoryx2-event-64",
        "iceoryx2-pingpong-64-idle16",
        "zmq-ipc-pingpong-64",
        "zmq-ipc-spin-64",
    ]
}

/// membus-vs-peer ratios, with the targets of PERFORMANCE.md section 3. The targets are held by
/// the `membus-client-*` cases (membus through its public API and a real broker, as iceoryx2 is
/// measured through its public API); the data-plane-only `membus-ring-*` figure is listed beside
/// them without a target. They are always listed; without the `peers` feature the report marks
/// them as not built.
pub fn ratios() -> Vec<Ratio> {
    let r = Ratio::new;
    vec![
        r(
            "membus-client-pingpong-8",
            "iceoryx2-pingpong-8",
            Metric::P50,
            Some("<= 0.4 (stretch 0.3)"),
        ),
        r(
            "membus-client-pingpong-64",
            "iceoryx2-pingpong-64",
            Metric::P50,
            Some("<= 0.4 (stretch 0.3)"),
        ),
        r(
            "membus-ring-pingpong-64",
            "iceoryx2-pingpong-64",
            Metric::P50,
            None,
        ),
        r(
            "membus-client-pingpong-8",
            "iceoryx2-pingpong-8",
            Metric::P999,
            Some("<= 0.5"),
        ),
        r(
            "membus-client-pingpong-64",
            "iceoryx2-pingpong-64",
            Metric::P999,
            Some("<= 0.5"),
        ),
        r(
            "membus-client-pingpong-4k",
            "iceoryx2-pingpong-4k",
            Metric::P50,
            Some("< 1.0"),
        ),
        r(
            "membus-client-pingpong-64k",
            "iceoryx2-pingpong-64k",
            Metric::P50,
            Some("< 1.0"),
        ),
        r(
            "membus-ring-pingpong-1m",
            "iceoryx2-pingpong-1m",
            Metric::P50,
            None,
        ),
        r(
            "membus-client-park-64",
            "iceoryx2-event-64",
            Metric::P50,
            Some("<= 0.8"),
        ),
        r(
            "iceoryx2-pingpong-64-idle16",
            "iceoryx2-pingpong-64",
            Metric::P50,
            None,
        ),
        r(
            "membus-client-park-64",
            "zmq-ipc-pingpong-64",
            Metric::P50,
            None,
        ),
        r(
            "membus-client-pingpong-64",
            "zmq-ipc-spin-64",
            Metric::P50,
            None,
        ),
    ]
}

#[cfg(feature = "peers")]
mod iceoryx2_cases {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use anyhow::{Context, Result, anyhow};
    use iceoryx2::port::listener::Listener;
    use iceoryx2::port::notifier::Notifier;
    use iceoryx2::port::publisher::Publisher;
    use iceoryx2::port::subscriber::Subscriber;
    use iceoryx2::prelude::*;

    use crate::case::{Case, CaseResult, Group, Kind, Params, Pinning};
    use crate::checksum::{pattern_byte, sum};
    use crate::measure::{Tally, pingpong};
    use crate::peer::{Peer, PeerCtx};

    const PING_SALT: u8 = 0x3c;
    const PONG_SALT: u8 = 0xc3;
    /// Extra idle subscribers in the idle case (as `membus-lossy-pingpong-64-idle16`).
    const IDLE: usize = 16;

    type Pub = Publisher<ipc::Service, [u8], ()>;
    type Sub = Subscriber<ipc::Service, [u8], ()>;

    /// How a receiver waits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Wait {
        /// Poll `receive`.
        Spin,
        /// `Listener::blocking_wait` when empty; the sender notifies after each send.
        Event,
    }

    fn wait_of(case: &str) -> Wait {
        if case.contains("-event-") {
            Wait::Event
        } else {
            Wait::Spin
        }
    }

    fn idle_of(case: &str) -> usize {
        if case.contains("-idle16") { IDLE } else { 0 }
    }

    /// Errors of iceoryx2 are `Debug + Display`; carry the call that failed.
    fn ice<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> Result<T> {
        r.map_err(|e| anyhow!("iceoryx2: {what}: {e:?}"))
    }

    /// One process's end of the two services (and, for the event case, the two event services).
    struct Ends {
        // Field order is drop order: ports before their services, services before the node.
        publisher: Pub,
        subscriber: Sub,
        notifier: Option<Notifier<ipc::Service>>,
        listener: Option<Listener<ipc::Service>>,
        _services: Vec<Box<dyn std::any::Any>>,
        _node: Node<ipc::Service>,
    }

    fn service_name(parent_pid: u32, case: &str, which: &str) -> Result<ServiceName> {
        ice(
            ServiceName::new(&format!("membus-bench/{parent_pid}/{case}/{which}")),
            "service name",
        )
    }

    fn node() -> Result<Node<ipc::Service>> {
        // iceoryx2 logs at Info by default; warnings and errors still reach stderr.
        set_log_level(LogLevel::Warn);
        ice(NodeBuilder::new().create::<ipc::Service>(), "create node")
    }

    fn pubsub(
        node: &Node<ipc::Service>,
        name: &ServiceName,
        size: usize,
    ) -> Result<
        iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>,
    > {
        ice(
            node.service_builder(name)
                .publish_subscribe::<[u8]>()
                .max_publishers(1)
                .max_subscribers(1 + IDLE)
                .history_size(0)
                .subscriber_max_buffer_size(1)
                .enable_safe_overflow(true)
                .open_or_create(),
            "open or create publish-subscribe service",
        )
        .with_context(|| format!("{size} B service {}", name.as_str()))
    }

    fn event(
        node: &Node<ipc::Service>,
        name: &ServiceName,
    ) -> Result<iceoryx2::service::port_factory::event::PortFactory<ipc::Service>> {
        ice(
            node.service_builder(name)
                .event()
                .max_notifiers(1)
                .max_listeners(1)
                .open_or_create(),
            "open or create event service",
        )
    }

    /// Opens this process's end: it publishes on `tx` and subscribes to `rx`.
    fn open(
        parent_pid: u32,
        case: &str,
        size: usize,
        (tx, rx): (&str, &str),
        wait: Wait,
    ) -> Result<Ends> {
        let node = node()?;
        let tx_service = pubsub(&node, &service_name(parent_pid, case, tx)?, size)?;
        let rx_service = pubsub(&node, &service_name(parent_pid, case, rx)?, size)?;
        let publisher = ice(
            tx_service
                .publisher_builder()
                .initial_max_slice_len(size)
                .create(),
            "create publisher",
        )?;
        let subscriber = ice(
            rx_service.subscriber_builder().create(),
            "create subscriber",
        )?;
        let mut services: Vec<Box<dyn std::any::Any>> =
            vec![Box::new(tx_service), Box::new(rx_service)];
        let (notifier, listener) = if wait == Wait::Event {
            let tx_event = event(
                &node,
                &service_name(parent_pid, case, &format!("{tx}-event"))?,
            )?;
            let rx_event = event(
                &node,
                &service_name(parent_pid, case, &format!("{rx}-event"))?,
            )?;
            let n = ice(tx_event.notifier_builder().create(), "create notifier")?;
            let l = ice(rx_event.listener_builder().create(), "create listener")?;
            services.push(Box::new(tx_event));
            services.push(Box::new(rx_event));
            (Some(n), Some(l))
        } else {
            (None, None)
        };
        Ok(Ends {
            publisher,
            subscriber,
            notifier,
            listener,
            _services: services,
            _node: node,
        })
    }

    /// Sends one message of `size` bytes, every byte written into the loaned sample.
    #[inline]
    fn send(e: &Ends, size: usize, byte: u8) -> Result<()> {
        let sample = ice(e.publisher.loan_slice_uninit(size), "loan")?;
        let sample = sample.write_from_fn(|_| byte);
        ice(sample.send(), "send")?;
        if let Some(n) = &e.notifier {
            ice(n.notify(), "notify")?;
        }
        Ok(())
    }

    /// Receives one message and returns the checksum of every byte.
    #[inline]
    fn recv(e: &Ends) -> Result<u64> {
        loop {
            if let Some(s) = ice(e.subscriber.receive(), "receive")? {
                return Ok(sum(s.payload()));
            }
            match &e.listener {
                None => std::hint::spin_loop(),
                Some(l) => {
                    ice(l.blocking_wait(|_| {}), "blocking_wait")?;
                }
            }
        }
    }

    fn run(p: &Params) -> Result<CaseResult> {
        let size = p.size;
        let wait = wait_of(&p.case);
        let pid = std::process::id();
        let ends = open(pid, &p.case, size, ("ping", "pong"), wait)?;
        let mut idlers = None;
        if idle_of(&p.case) > 0 {
            // The one fd it is handed marks the process as the idle one (see `peer_or_idle`).
            let marker = std::fs::File::open("/dev/null").context("open /dev/null")?;
            let mut idle = Peer::spawn(p, &[marker.as_fd()])?;
            idle.wait_ready()?;
            idlers = Some(idle);
        }
        let mut peer = Peer::spawn(p, &[])?;
        peer.wait_ready()?;

        let mut tally = Tally::default();
        let h = pingpong(p, |i| {
            let byte = pattern_byte(i, PING_SALT);
            send(&ends, size, byte)?;
            tally.sent(byte, size);
            tally.got(recv(&ends)?);
            tally.expect(pattern_byte(i, PONG_SALT), size);
            Ok(())
        })?;
        let done = peer.finish()?;
        tally.check(p, done.checksum)?;
        if let Some(idle) = idlers {
            // Its subscribers saw the end of the publisher; it reports how many it held.
            drop(ends);
            idle.finish()?;
        }
        Ok(CaseResult::latency(h))
    }

    fn parent_pid() -> Result<u32> {
        let ppid = rustix::process::getppid().context("the peer has no parent")?;
        Ok(ppid.as_raw_nonzero().get().unsigned_abs())
    }

    fn peer(ctx: PeerCtx) -> Result<()> {
        let size = ctx.params.size;
        let ends = open(
            parent_pid()?,
            &ctx.params.case,
            size,
            ("pong", "ping"),
            wait_of(&ctx.params.case),
        )?;
        ctx.ready()?;
        let mut got = 0u64;
        for i in 0..ctx.params.round_trips() {
            got = got.wrapping_add(recv(&ends).context("ping")?);
            send(&ends, size, pattern_byte(i, PONG_SALT))?;
        }
        ctx.done(got)
    }

    /// The idle-subscriber process: 16 subscribers of `ping` that never read, until the parent
    /// has finished (it closes the control socket by exiting the ping-pong; we poll it slowly).
    fn idle(ctx: PeerCtx) -> Result<()> {
        let node = node()?;
        let service = pubsub(
            &node,
            &service_name(parent_pid()?, &ctx.params.case, "ping")?,
            ctx.params.size,
        )?;
        let subs = (0..IDLE)
            .map(|_| {
                ice(
                    service.subscriber_builder().create(),
                    "create idle subscriber",
                )
            })
            .collect::<Result<Vec<Sub>>>()?;
        ctx.ready()?;
        // Sleep until the parent's publisher is gone (the parent drops it before finishing us):
        // one look every 10 ms, far from the measured CPUs' hot path.
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let publishers = service.dynamic_config().number_of_publishers();
            if publishers == 0 {
                break;
            }
        }
        let held = subs.len() as u64;
        drop(subs);
        ctx.done(held)
    }

    /// Peer side of every case: the idle-subscriber process is spawned with one marker fd, the
    /// answering peer with none.
    fn peer_or_idle(mut ctx: PeerCtx) -> Result<()> {
        if ctx.take_fd(0).is_ok() {
            idle(ctx)
        } else {
            peer(ctx)
        }
    }

    /// The iceoryx2 cases.
    pub(super) fn cases() -> Vec<Case> {
        let case = |name, size, about| Case {
            name,
            group: Group::Peer,
            size,
            kind: Kind::Latency,
            pinning: Pinning::Split,
            about,
            run: run as fn(&Params) -> Result<CaseResult>,
            peer: Some(peer_or_idle as fn(PeerCtx) -> Result<()>),
        };
        vec![
            case(
                "iceoryx2-pingpong-8",
                8,
                "iceoryx2 0.10.0 publish-subscribe [u8], busy-poll receive, 8 B each way",
            ),
            case(
                "iceoryx2-pingpong-64",
                64,
                "iceoryx2 0.10.0 publish-subscribe [u8], busy-poll receive, 64 B each way",
            ),
            case(
                "iceoryx2-pingpong-4k",
                4096,
                "iceoryx2 0.10.0 publish-subscribe [u8], busy-poll receive, 4 KiB each way",
            ),
            case(
                "iceoryx2-pingpong-64k",
                65536,
                "iceoryx2 0.10.0 publish-subscribe [u8], busy-poll receive, 64 KiB each way",
            ),
            case(
                "iceoryx2-pingpong-1m",
                1 << 20,
                "iceoryx2 0.10.0 publish-subscribe [u8], busy-poll receive, 1 MiB each way \
                 (a tenth of the samples)",
            ),
            case(
                "iceoryx2-event-64",
                64,
                "iceoryx2 0.10.0 publish-subscribe + event service: notify after send, \
                 Listener::blocking_wait when empty, 64 B each way",
            ),
            case(
                "iceoryx2-pingpong-64-idle16",
                64,
                "iceoryx2-pingpong-64 with 16 extra subscribers of ping that never read \
                 (in a third process)",
            ),
        ]
    }
}

#[cfg(feature = "peers")]
mod zmq_cases {
    use anyhow::{Context, Result, anyhow};

    use crate::case::{Case, CaseResult, Group, Kind, Params, Pinning};
    use crate::checksum::{pattern_byte, sum};
    use crate::measure::{Tally, pingpong};
    use crate::peer::{Peer, PeerCtx};

    const PING_SALT: u8 = 0x3c;
    const PONG_SALT: u8 = 0xc3;

    /// The `ipc://` endpoint of a case run by the process `parent_pid`.
    fn endpoint(parent_pid: u32, case: &str) -> String {
        let path = std::env::temp_dir().join(format!("membus-bench-zmq-{parent_pid}-{case}"));
        format!("ipc://{}", path.display())
    }

    fn z<T>(r: zmq::Result<T>, what: &str) -> Result<T> {
        r.map_err(|e| anyhow!("zmq: {what}: {e}"))
    }

    struct End {
        // Drop order: the socket before its context.
        socket: zmq::Socket,
        _ctx: zmq::Context,
        inbox: zmq::Message,
        spin: bool,
    }

    impl End {
        fn new(spin: bool) -> Result<End> {
            let ctx = zmq::Context::new();
            let socket = z(ctx.socket(zmq::PAIR), "PAIR socket")?;
            z(socket.set_linger(0), "ZMQ_LINGER")?;
            Ok(End {
                socket,
                _ctx: ctx,
                inbox: zmq::Message::new(),
                spin,
            })
        }

        #[inline]
        fn send(&self, size: usize, byte: u8) -> Result<()> {
            let mut msg = zmq::Message::with_size(size);
            msg.fill(byte);
            z(self.socket.send(msg, 0), "send")
        }

        #[inline]
        fn recv(&mut self) -> Result<u64> {
            if self.spin {
                loop {
                    match self.socket.recv(&mut self.inbox, zmq::DONTWAIT) {
                        Ok(()) => break,
                        Err(zmq::Error::EAGAIN) => std::hint::spin_loop(),
                        Err(e) => return Err(anyhow!("zmq: recv: {e}")),
                    }
                }
            } else {
                z(self.socket.recv(&mut self.inbox, 0), "recv")?;
            }
            Ok(sum(&self.inbox))
        }
    }

    fn run(p: &Params) -> Result<CaseResult> {
        let spin = p.case.contains("-spin-");
        let mut me = End::new(spin)?;
        let ep = endpoint(std::process::id(), &p.case);
        z(me.socket.bind(&ep), "bind")?;
        let mut peer = Peer::spawn(p, &[])?;
        peer.wait_ready()?;
        let size = p.size;
        let mut tally = Tally::default();
        let h = pingpong(p, |i| {
            let byte = pattern_byte(i, PING_SALT);
            me.send(size, byte)?;
            tally.sent(byte, size);
            tally.got(me.recv()?);
            tally.expect(pattern_byte(i, PONG_SALT), size);
            Ok(())
        });
        let _ = std::fs::remove_file(ep.trim_start_matches("ipc://"));
        let h = h?;
        let done = peer.finish()?;
        tally.check(p, done.checksum)?;
        Ok(CaseResult::latency(h))
    }

    fn peer(ctx: PeerCtx) -> Result<()> {
        let ppid = rustix::process::getppid().context("the peer has no parent")?;
        let ep = endpoint(ppid.as_raw_nonzero().get().unsigned_abs(), &ctx.params.case);
        let mut me = End::new(ctx.params.case.contains("-spin-"))?;
        z(me.socket.connect(&ep), "connect")?;
        ctx.ready()?;
        let size = ctx.params.size;
        let mut got = 0u64;
        for i in 0..ctx.params.round_trips() {
            got = got.wrapping_add(me.recv().context("ping")?);
            me.send(size, pattern_byte(i, PONG_SALT))?;
        }
        ctx.done(got)
    }

    /// The ZeroMQ cases.
    pub(super) fn cases() -> Vec<Case> {
        let case = |name, about| Case {
            name,
            group: Group::Peer,
            size: 64,
            kind: Kind::Latency,
            pinning: Pinning::Split,
            about,
            run: run as fn(&Params) -> Result<CaseResult>,
            peer: Some(peer as fn(PeerCtx) -> Result<()>),
        };
        vec![
            case(
                "zmq-ipc-pingpong-64",
                "ZeroMQ PAIR over ipc://, blocking recv, 64 B each way",
            ),
            case(
                "zmq-ipc-spin-64",
                "ZeroMQ PAIR over ipc://, recv polled with DONTWAIT, 64 B each way",
            ),
        ]
    }
}
