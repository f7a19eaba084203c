//! Real `bus-broker` processes on temporary sockets: start-up and takeover, signals, many
//! clients, dying clients, hostile frames. Every test runs once per driver (`epoll`, `uring`,
//! forced with `MEMBUS_DRIVER`).
//!
//! No fixed sleeps: every wait polls for its condition against a deadline.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bus_core::frame::{
    CreatePublisher, ErrorCode, Frame, HEADER_BYTES, Hello, MAGIC, ModeRequest, Msg, Publish,
    Subscribe, Transport, decode,
};
use bus_core::limits::MAX_FRAME_BYTES;
use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame, send_frame_with};
use bus_testkit::{Broker, DEADLINE, Program, Start, wait_until};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use rustix::process::Signal;

/// A `bus-broker` on `driver`, logging at info (tests read the log). This process's fd limit
/// is raised first, for the 1,000-client test (the broker inherits it).
fn start_on(driver: &str) -> Start {
    bus_testkit::raise_fd_limit(8192);
    Start::new(Program::BusBroker).driver(driver).log("info")
}

/// A running broker on `DIR/bus.sock` of its own temporary directory.
fn start(driver: &str) -> Broker {
    start_on(driver).run()
}

/// What these tests do with a broker beyond bus-testkit: raw protocol clients.
trait BrokerExt {
    fn client(&self) -> Client;
    /// The broker's fd count once it is idle, after one client came and went.
    fn baseline(&self) -> usize;
    /// A new client still gets a WELCOME.
    fn still_serves(&self);
}

impl BrokerExt for Broker {
    fn client(&self) -> Client {
        Client::connect(self.socket())
    }

    fn baseline(&self) -> usize {
        let c = self.client();
        c.hello();
        drop(c);
        self.settled_fds()
    }

    fn still_serves(&self) {
        let c = self.client();
        c.hello();
        c.ping(77);
    }
}

/// A blocking client socket with a receive timeout (a test never hangs on a silent broker).
struct Client {
    fd: OwnedFd,
}

fn encode(frame: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    frame.encode(&mut out).unwrap();
    out
}

fn hello_frame(request_id: u64) -> Vec<u8> {
    encode(Frame::new(
        request_id,
        Msg::Hello(Hello {
            protocol_version: 1,
            transport: Transport::Datagram,
            client_name: "it",
        }),
    ))
}

/// A well-formed header for `ty` with an empty body.
fn header(ty: u16, fd_count: u16, request_id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_BYTES);
    h.extend_from_slice(&MAGIC.to_le_bytes());
    h.push(1); // version
    h.push(0); // flags
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // body_len
    h.extend_from_slice(&fd_count.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // reserved
    h.extend_from_slice(&request_id.to_le_bytes());
    h
}

impl Client {
    fn connect(path: &Path) -> Client {
        let fd = crate::connect(path).expect("connect to the broker");
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(DEADLINE),
        )
        .unwrap();
        Client { fd }
    }

    fn send(&self, bytes: &[u8]) {
        send_frame(self.fd.as_fd(), bytes, &[]).expect("send a frame");
    }

    fn send_fds(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        send_frame(self.fd.as_fd(), bytes, fds).expect("send a frame with fds");
    }

    /// The next datagram, `None` at end of stream.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME_BYTES];
        let mut fds = FdBatch::new();
        match recv_frame(self.fd.as_fd(), &mut buf, &mut fds) {
            Ok(Received::Frame { len }) => {
                buf.truncate(len);
                Some(buf)
            }
            Ok(Received::Eof) => None,
            Err(e) if e.is_would_block() => panic!("no frame from the broker within {DEADLINE:?}"),
            Err(e) if matches!(&e, bus_core::sys::scm::RecvError::Io(io) if io.raw_os_error() == Some(Errno::CONNRESET.raw_os_error())) => {
                None
            }
            Err(e) => panic!("receive failed: {e}"),
        }
    }

    /// HELLO -> WELCOME; returns the client id.
    fn hello(&self) -> u64 {
        self.send(&hello_frame(1));
        let reply = self.recv().expect("WELCOME, not end of stream");
        match decode(&reply).expect("a valid frame").msg {
            Msg::Welcome(w) => {
                assert_eq!(w.protocol_version, 1);
                assert_ne!(w.client_id, 0);
                assert_eq!(w.max_frame_bytes as usize, MAX_FRAME_BYTES);
                w.client_id
            }
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    fn ping(&self, token: u64) {
        self.send(&encode(Frame::new(9, Msg::Ping { token })));
        let reply = self.recv().expect("PONG, not end of stream");
        let frame = decode(&reply).expect("a valid frame");
        assert_eq!(frame.request_id, 9);
        assert!(
            matches!(frame.msg, Msg::Pong { token: t } if t == token),
            "{frame:?}"
        );
    }

    /// Expects an ERROR with `code`; returns its request id.
    fn expect_error(&self, code: ErrorCode) -> u64 {
        let reply = self.recv().expect("ERROR, not end of stream");
        let frame = decode(&reply).expect("a valid frame");
        match frame.msg {
            Msg::Error(e) => {
                assert_eq!(e.code, code, "{}", e.message);
                assert!(!e.message.is_empty());
                frame.request_id
            }
            other => panic!("expected ERROR {code:?}, got {other:?}"),
        }
    }

    fn expect_eof(&self) {
        if let Some(frame) = self.recv() {
            panic!("expected end of stream, got {:?}", decode(&frame));
        }
    }
}

/// A pipe whose read end goes to the broker: once the broker closes its copy (and ours is
/// dropped), writing to the write end fails with EPIPE.
fn probe_pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
        .unwrap()
}

fn wait_reader_closed(write_end: &OwnedFd) {
    wait_until("the broker closes the fd it was sent", || {
        matches!(rustix::io::write(write_end, b"x"), Err(Errno::PIPE))
    });
}

// ---------------------------------------------------------------------------------------------
// The tests, each run per driver by `per_driver!` at the bottom.

fn handshake(driver: &str) {
    let broker = start(driver);
    let expected = if driver == "uring" {
        "io_uring"
    } else {
        "epoll"
    };
    assert!(
        broker.start_line().starts_with("bus-broker ")
            && broker
                .start_line()
                .contains(&format!("listening on {}", broker.socket().display()))
            && broker
                .start_line()
                .contains(&format!("(driver: {expected}, pid {})", broker.pid())),
        "{}",
        broker.start_line()
    );
    let a = broker.client();
    let b = broker.client();
    let id_a = a.hello();
    let id_b = b.hello();
    assert_ne!(id_a, id_b);
    a.ping(1);
    b.ping(2);
}

fn sigterm_exits_cleanly(driver: &str) {
    let mut broker = start(driver);
    let client = broker.client();
    client.hello();
    let lock = PathBuf::from(format!("{}.lock", broker.socket().display()));
    assert!(broker.socket().exists() && lock.exists());
    broker.signal(Signal::TERM);
    // The client is told, then disconnected.
    let frame = client.recv().expect("SHUTDOWN, not end of stream");
    assert!(
        matches!(decode(&frame).unwrap().msg, Msg::Shutdown(_)),
        "{:?}",
        decode(&frame)
    );
    client.expect_eof();
    let status = broker.wait_exit();
    assert_eq!(status.code(), Some(0), "stderr: {}", broker.stderr());
    assert!(!broker.socket().exists(), "socket file removed");
    assert!(!lock.exists(), "lock file removed");
}

fn sigint_exits_cleanly(driver: &str) {
    let mut broker = start(driver);
    broker.signal(Signal::INT);
    assert_eq!(broker.wait_exit().code(), Some(0), "{}", broker.stderr());
    assert!(!broker.socket().exists());
}

fn sighup_with_bad_policy_keeps_running(driver: &str) {
    let uid = rustix::process::geteuid().as_raw();
    let mut broker = start_on(driver)
        .policy(format!(
            "[[allow]]\nusers = [{uid}]\npublish = [\"**\"]\nsubscribe = [\"**\"]\n"
        ))
        .run();
    let policy = broker.policy_path().unwrap();

    std::fs::write(&policy, "[[allow]]\nusers = [1]\npublish = [\"a.**\"]\n").unwrap();
    broker.signal(Signal::HUP);
    wait_until("the reload error is logged", || {
        broker.stderr().contains("policy not reloaded")
    });
    let log = broker.stderr();
    assert!(log.contains("policy.toml:3:"), "line number in: {log}");

    std::fs::write(
        &policy,
        format!("[[allow]]\nusers = [{uid}]\npublish = [\"a.*\"]\n"),
    )
    .unwrap();
    broker.signal(Signal::HUP);
    wait_until("the reload is logged", || {
        broker.stderr().contains("policy reloaded")
    });
    let c = broker.client();
    c.hello();
    broker.signal(Signal::TERM);
    assert_eq!(broker.wait_exit().code(), Some(0));
}

fn second_broker_refuses(driver: &str) {
    let broker = start(driver);
    let refused = match start_on(driver).socket(broker.socket()).try_run() {
        Ok(_) => panic!("a second broker started on the same path"),
        Err(r) => r,
    };
    assert_ne!(refused.status.code(), Some(0));
    assert!(
        refused.stderr.contains(&format!("pid {}", broker.pid())),
        "names the running broker's pid: {}",
        refused.stderr
    );
    // The first one is unharmed.
    assert!(broker.socket().exists());
    broker.still_serves();
}

fn takes_over_after_kill_9(driver: &str) {
    let mut broker = start(driver);
    broker.client().hello();
    broker.signal(Signal::KILL);
    broker.wait_exit();
    assert!(
        broker.socket().exists(),
        "a killed broker leaves its socket file"
    );
    broker
        .try_restart()
        .unwrap_or_else(|r| panic!("no takeover: {r}"));
    broker.still_serves();
}

fn regular_file_left_alone(driver: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let refused = match start_on(driver).socket(&path).try_run() {
        Ok(_) => panic!("the broker started over a regular file"),
        Err(r) => r,
    };
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("regular file"),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

fn thousand_clients(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let clients: Vec<Client> = (0..1000).map(|_| broker.client()).collect();
    for c in &clients {
        c.send(&hello_frame(1));
    }
    let mut ids = std::collections::HashSet::new();
    for c in &clients {
        let reply = c.recv().expect("WELCOME");
        match decode(&reply).unwrap().msg {
            Msg::Welcome(w) => assert!(ids.insert(w.client_id), "client ids are unique"),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }
    assert!(broker.open_fds() >= baseline + 1000);
    drop(clients);
    broker.expect_fds(baseline, "1,000 clients left");
    broker.still_serves();
}

fn killed_clients_release_fds(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    // Each client socket is handed to a `sleep` process (as its stdin) and dropped here, so
    // that SIGKILL of that process is what closes it.
    let mut holders = Vec::new();
    for i in 0..20 {
        let c = broker.client();
        if i % 2 == 1 {
            // Mid-handshake: HELLO sent, WELCOME never read.
            c.send(&hello_frame(1));
        }
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::from(c.fd))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        holders.push(child);
    }
    wait_until("the broker holds the 20 connections", || {
        broker.open_fds() >= baseline + 20
    });
    for mut child in holders {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    broker.expect_fds(baseline, "20 clients were killed");
    broker.still_serves();
}

fn empty_datagram_disconnects_only_that_client(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let bystander = broker.client();
    bystander.hello();
    let c = broker.client();
    c.hello();
    // A zero-length SEQPACKET datagram reads as end of stream: the broker drops this client.
    rustix::net::send(&c.fd, &[], SendFlags::empty()).unwrap();
    c.expect_eof();
    bystander.ping(5);
    drop(bystander);
    broker.expect_fds(baseline, "an empty datagram");
    broker.still_serves();
}

/// Frames whose header cannot be trusted: ERROR, then disconnect.
fn bad_headers_disconnect(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let ping = encode(Frame::new(3, Msg::Ping { token: 1 }));

    let mut wrong_magic = ping.clone();
    wrong_magic[0] ^= 0xff;
    let mut wrong_version = ping.clone();
    wrong_version[4] = 2;
    let mut long_len = ping.clone();
    long_len[8..12].copy_from_slice(&100u32.to_le_bytes());
    let mut short_len = ping.clone();
    short_len[8..12].copy_from_slice(&1u32.to_le_bytes());
    let mut reserved = ping.clone();
    reserved[14] = 1;
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("1-byte datagram", vec![0x4d], ErrorCode::BadFrame),
        ("short datagram", ping[..10].to_vec(), ErrorCode::BadFrame),
        (
            "header only, 23 bytes",
            ping[..23].to_vec(),
            ErrorCode::BadFrame,
        ),
        ("wrong magic", wrong_magic, ErrorCode::BadFrame),
        (
            "wrong version",
            wrong_version,
            ErrorCode::UnsupportedVersion,
        ),
        ("body_len too long", long_len, ErrorCode::BadFrame),
        ("body_len too short", short_len, ErrorCode::BadFrame),
        ("reserved not zero", reserved, ErrorCode::BadFrame),
    ];
    for (what, bytes, code) in cases {
        let c = broker.client();
        c.hello();
        c.send(&bytes);
        c.expect_error(code);
        c.expect_eof();
        drop(c);
        broker.expect_fds(baseline, what);
        broker.still_serves();
    }
}

/// Well-framed but invalid bodies: ERROR, connection kept.
fn bad_bodies_keep_the_connection(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let c = broker.client();
    c.hello();

    c.send(&header(0x0999, 0, 41));
    assert_eq!(c.expect_error(ErrorCode::BadFrame), 41, "unknown type");
    c.ping(1);

    let mut trailing = encode(Frame::new(42, Msg::Ping { token: 1 }));
    trailing.push(0);
    trailing[8..12].copy_from_slice(&9u32.to_le_bytes());
    c.send(&trailing);
    assert_eq!(c.expect_error(ErrorCode::BadFrame), 42, "trailing byte");
    c.ping(2);
    drop(c);
    broker.expect_fds(baseline, "bad bodies");
    broker.still_serves();
}

fn unexpected_fds_are_closed(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let c = broker.client();
    c.hello();
    let (r1, w1) = probe_pipe();
    let (r2, w2) = probe_pipe();
    // PING announces no fds and carries two.
    c.send_fds(
        &encode(Frame::new(5, Msg::Ping { token: 1 })),
        &[r1.as_fd(), r2.as_fd()],
    );
    drop((r1, r2));
    c.expect_error(ErrorCode::BadFds);
    wait_reader_closed(&w1);
    wait_reader_closed(&w2);
    c.ping(3);
    drop(c);
    broker.expect_fds(baseline, "a frame with unexpected fds");
    broker.still_serves();
}

fn too_many_fds_truncated(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let c = broker.client();
    c.hello();
    const N: usize = 12;
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..N).map(|_| probe_pipe()).collect();
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(N))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    let frame = encode(Frame::new(6, Msg::Ping { token: 1 }));
    rustix::net::sendmsg(
        &c.fd,
        &[std::io::IoSlice::new(&frame)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    drop(fds);
    let write_ends: Vec<OwnedFd> = pipes.into_iter().map(|(_, w)| w).collect();
    // docs/protocol.md §8 asks for `bad-fds`; the driver reports truncation through
    // `Engine::on_protocol_violation`, which carries no code, and the engine answers
    // `bad-frame`. Either is an error followed by a disconnect.
    let reply = c.recv().expect("ERROR, not end of stream");
    assert!(
        matches!(
            decode(&reply).unwrap().msg,
            Msg::Error(e) if matches!(e.code, ErrorCode::BadFds | ErrorCode::BadFrame)
        ),
        "{:?}",
        decode(&reply)
    );
    c.expect_eof();
    for w in &write_ends {
        wait_reader_closed(w);
    }
    drop(c);
    broker.expect_fds(baseline, "a frame with too many fds");
    broker.still_serves();
}

fn subscribe_before_hello(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let c = broker.client();
    c.send(&encode(Frame::new(
        8,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Any,
            delivery: Transport::Datagram,
            topic: "a.b",
        }),
    )));
    c.expect_error(ErrorCode::HandshakeRequired);
    c.expect_eof();
    drop(c);
    broker.expect_fds(baseline, "SUBSCRIBE before HELLO");
    broker.still_serves();
}

fn oversized_datagram(driver: &str) {
    let broker = start(driver);
    let baseline = broker.baseline();
    let c = broker.client();
    c.hello();
    // Bigger than MAX_FRAME_BYTES: the broker's receive reports MSG_TRUNC.
    let mut big = header(0x0005, 0, 1);
    big.resize(MAX_FRAME_BYTES + 100, 0);
    let body_len = (big.len() - HEADER_BYTES) as u32;
    big[8..12].copy_from_slice(&body_len.to_le_bytes());
    rustix::net::sockopt::set_socket_send_buffer_size(&c.fd, 4 * MAX_FRAME_BYTES).unwrap();
    c.send(&big);
    c.expect_error(ErrorCode::BadFrame);
    c.expect_eof();
    drop(c);
    broker.expect_fds(baseline, "an oversized datagram");
    broker.still_serves();
}

/// A reliable datagram subscriber that does not read fills the relay: the broker stops reading
/// the datagram publisher's socket (its non-blocking send gets EAGAIN) instead of refusing
/// PUBLISHes with `too-slow`, and once the subscriber reads, every message arrives once, in
/// order, and the publisher is read again.
fn fallback_backpressure_pauses_the_publisher(driver: &str) {
    let broker = start(driver);
    let sub = broker.client();
    sub.hello();
    sub.send(&encode(Frame::new(
        2,
        Msg::Subscribe(Subscribe {
            mode: ModeRequest::Reliable,
            delivery: Transport::Datagram,
            topic: "bp",
        }),
    )));
    let reply = sub.recv().expect("SUBSCRIBED");
    assert!(
        matches!(decode(&reply).unwrap().msg, Msg::Subscribed(_)),
        "{:?}",
        decode(&reply)
    );
    let publ = broker.client();
    publ.hello();
    publ.send(&encode(Frame::new(
        3,
        Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: 4096,
            max_message_bytes: 0,
            mode: ModeRequest::Reliable,
            transport: Transport::Datagram,
            topic: "bp",
        }),
    )));
    let reply = publ.recv().expect("RING_GRANTED");
    let Msg::RingGranted(g) = decode(&reply).unwrap().msg else {
        panic!("{:?}", decode(&reply))
    };
    let publish = |i: u32, flags: SendFlags| {
        let frame = encode(Frame::new(
            u64::from(i) + 1,
            Msg::Publish(Publish {
                publisher_id: g.publisher_id,
                payload: &i.to_le_bytes(),
            }),
        ));
        send_frame_with(publ.fd.as_fd(), &frame, &[], flags)
    };
    // Publish without blocking until the broker stops reading the publisher: its socket stays
    // full with nothing to read. (Ring ~40 messages, 64 in flight, 256 waiting, two socket
    // buffers: a few thousand at most.) A broker that refused PUBLISHes instead would make the
    // socket readable (an ERROR) before that.
    let mut sent = 0u32;
    loop {
        match publish(sent, SendFlags::DONTWAIT) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                use rustix::event::{PollFd, PollFlags, Timespec, poll};
                let mut pfd = [PollFd::new(&publ.fd, PollFlags::IN | PollFlags::OUT)];
                let idle = Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000_000,
                };
                if poll(&mut pfd, Some(&idle)).expect("poll") == 0 {
                    break;
                }
                assert!(
                    !pfd[0].revents().contains(PollFlags::IN),
                    "the broker replied to a PUBLISH: {:?}",
                    publ.recv().map(|f| format!("{:?}", decode(&f)))
                );
            }
            Err(e) => panic!("PUBLISH failed: {e}"),
        }
        assert!(
            sent < 200_000,
            "the broker kept reading a publisher whose relay is full"
        );
    }
    assert!(
        sent > 256,
        "the relay holds more than its backlog ({sent} sent)"
    );
    // The subscriber reads; the rest is published with blocking sends (the broker resumes).
    let total = sent + 100;
    let mut next = 0u32;
    while next < total {
        if sent < total && next + 50 > sent {
            publish(sent, SendFlags::empty()).expect("PUBLISH");
            sent += 1;
            continue;
        }
        let frame = sub.recv().expect("DELIVER");
        match decode(&frame).unwrap().msg {
            Msg::Deliver(d) => {
                assert_eq!(d.seq, u64::from(next), "in order, none lost");
                assert_eq!(d.payload, next.to_le_bytes(), "exact payload");
                next += 1;
            }
            other => panic!("expected DELIVER, got {other:?}"),
        }
    }
    publ.ping(7);
    broker.still_serves();
}

macro_rules! per_driver {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::$name("epoll") } )*
        }
        mod uring {
            $( #[test] fn $name() { super::$name("uring") } )*
        }
    };
}

per_driver!(
    handshake,
    sigterm_exits_cleanly,
    sigint_exits_cleanly,
    sighup_with_bad_policy_keeps_running,
    second_broker_refuses,
    takes_over_after_kill_9,
    regular_file_left_alone,
    thousand_clients,
    killed_clients_release_fds,
    empty_datagram_disconnects_only_that_client,
    bad_headers_disconnect,
    bad_bodies_keep_the_connection,
    unexpected_fds_are_closed,
    too_many_fds_truncated,
    subscribe_before_hello,
    oversized_datagram,
    fallback_backpressure_pauses_the_publisher,
);

#[test]
fn bad_driver_name_is_a_usage_error() {
    let refused = match start_on("carrier-pigeon").try_run() {
        Ok(_) => panic!("started with a bad driver name"),
        Err(r) => r,
    };
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        refused.stderr.contains("MEMBUS_DRIVER"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("epoll"),
        "names the choices: {}",
        refused.stderr
    );
}

/// The Python datagram client in `examples/python/`, written from docs/protocol.md alone,
/// publishes and subscribes through a real broker with exact message boundaries (0 bytes to the
/// fallback maximum).
#[test]
fn python_fallback_client_round_trips() {
    let broker = start("auto");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/fallback_client.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg("--socket")
        .arg(broker.socket())
        .args(["--topic", "it.python", "both", "--count", "300"])
        .output()
        .expect("python3 is needed for this test (apt-get install python3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("ok: 306 messages from 0 to 65472 bytes"),
        "{stdout}"
    );
}
