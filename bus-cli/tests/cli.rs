//! The `bus` command end to end, as a user runs it: a real broker (`bus broker`), real
//! `bus pub` / `bus sub` / `bus stat` processes, and `bus demo`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bus_testkit::{Broker, Program, Start};

const BUS: &str = env!("CARGO_BIN_EXE_bus");

/// A `bus broker` on the `auto` driver.
fn broker() -> Broker {
    broker_with("auto", "")
}

/// A `bus broker` on `driver` (`auto`, `epoll`, `uring`) with `config` as its config file.
fn broker_with(driver: &str, config: &str) -> Broker {
    Start::new(Program::Bus).driver(driver).config(config).run()
}

/// A `bus` command against `b`.
fn bus(b: &Broker) -> Command {
    let mut c = Command::new(BUS);
    c.env("MEMBUS_SOCKET", b.socket()).stdin(Stdio::null());
    c
}

fn wait_for_subscriber(b: &Broker, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = bus(b).args(["stat", "--json"]).output().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ready = doc["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["name"] == topic && t["subscribers"][0]["ready"] == true);
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "subscriber never showed up in bus stat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pub_lines_reach_sub_in_order() {
    let b = broker();
    let sub = bus(&b)
        .args(["sub", "cli.lines", "--count", "3", "--idle-timeout", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_subscriber(&b, "cli.lines");
    let mut publisher = bus(&b)
        .args(["pub", "cli.lines"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthree\n")
        .unwrap();
    assert!(publisher.wait().unwrap().success());
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\nthree\n");
}

#[test]
fn generated_stream_with_json_output_and_latency() {
    let b = broker();
    let sub = bus(&b)
        .args([
            "sub",
            "cli.gen",
            "--count",
            "1000",
            "--format",
            "json",
            "--latency",
        ])
        .args(["--idle-timeout", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_subscriber(&b, "cli.gen");
    let status = bus(&b)
        .args(["pub", "cli.gen", "--count", "1000", "--size", "100"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1000);
    for (i, l) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["seq"], i as u64);
        assert_eq!(v["len"], 100);
        assert!(v["latency_ns"].as_u64().is_some());
    }
    assert!(text.contains("p99.9"), "latency table at the end: {text}");
}

#[test]
fn stat_json_parses_and_names_the_subscriber() {
    let b = broker();
    let mut sub = bus(&b)
        .args(["sub", "cli.stat", "--idle-timeout", "10"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_subscriber(&b, "cli.stat");
    let out = bus(&b).args(["stat", "--json"]).output().unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &doc["topics"][0];
    assert_eq!(t["name"], "cli.stat");
    assert_eq!(t["subscribers"][0]["pid"], sub.id());
    assert_eq!(t["subscribers"][0]["command"], "bus");
    let table = bus(&b).arg("stat").output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("topic cli.stat"));
    sub.kill().unwrap();
    sub.wait().unwrap();
}

#[test]
fn no_broker_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = Command::new(BUS)
        .args(["pub", "x", "hello", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nobody.sock") && err.contains("bus-broker"),
        "{err}"
    );
}

fn demo_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for base in [std::env::temp_dir(), PathBuf::from("/tmp")] {
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("membus-demo-") {
                    dirs.push(e.path());
                }
            }
        }
    }
    dirs
}

#[test]
fn demo_prints_percentiles_and_leaves_nothing_behind() {
    let before = demo_dirs();
    let dir = tempfile::tempdir().unwrap();
    // A socket that does not exist: the demo must start its own broker.
    let out = Command::new(BUS)
        .args(["demo", "--seconds", "0.2"])
        .env("MEMBUS_SOCKET", dir.path().join("none.sock"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "p50",
        "p99.9",
        "busy-poll",
        "parked",
        "throughput",
        "nothing left behind",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert_eq!(demo_dirs(), before);
}

// ---------------------------------------------------------------------------------------------
// A hostile publisher among honest ones: `bus sub` warns and keeps reading.

/// How long a step may take before a test fails (generous: CI machines are shared).
const DEADLINE: Duration = Duration::from_secs(20);

/// A shared-memory publisher speaking the protocol by hand (bus_core's codec and ring), so that
/// it can spoil its own ring in ways the client library never would.
struct RawPublisher {
    sock: std::os::fd::OwnedFd,
    ring: std::os::fd::OwnedFd,
    grant: bus_core::frame::RingGranted,
    writer: bus_core::ring::Writer,
    /// A second read-write mapping of the ring, made before PUBLISHER_READY (afterwards the
    /// broker's seal refuses new writable mappings).
    spare: Option<bus_core::segment::RingMapping>,
    next_rid: u64,
}

impl RawPublisher {
    /// HELLO, CREATE_PUBLISHER (shared memory) on `topic`, maps the ring and initialises it;
    /// does not send PUBLISHER_READY yet.
    fn create(socket: &Path, topic: &str) -> RawPublisher {
        use bus_core::frame::{CreatePublisher, Hello, ModeRequest, Msg, Transport};
        use bus_core::ring::{RingConfig, Writer};
        use bus_core::segment::{Access, map_ring};
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, sockopt};

        let sock = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
        rustix::net::connect(&sock, &SocketAddrUnix::new(socket).unwrap()).unwrap();
        sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(DEADLINE)).unwrap();
        let hello = Hello {
            protocol_version: 1,
            transport: Transport::Shm,
            client_name: "hostile",
        };
        let (reply, _) = call(&sock, 1, Msg::Hello(hello));
        assert!(
            matches!(decode(&reply), Msg::Welcome(_)),
            "{:?}",
            decode(&reply)
        );
        let create = CreatePublisher {
            ring_data_bytes: 0,
            max_message_bytes: 0,
            mode: ModeRequest::Any,
            transport: Transport::Shm,
            topic,
        };
        let (reply, mut fds) = call(&sock, 2, Msg::CreatePublisher(create));
        let Msg::RingGranted(grant) = decode(&reply) else {
            panic!("expected RING_GRANTED, got {:?}", decode(&reply));
        };
        let ring = fds.pop().expect("the ring fd");
        let data_bytes = grant.data_bytes as usize;
        let cfg = RingConfig {
            mode: grant.mode,
            data_bytes: grant.data_bytes,
            max_message_bytes: grant.max_message_bytes,
            publisher_id: grant.publisher_id,
        };
        let map = map_ring(&ring, data_bytes, Access::ReadWrite).unwrap();
        let writer = Writer::create(map, cfg).unwrap();
        let spare = Some(map_ring(&ring, data_bytes, Access::ReadWrite).unwrap());
        RawPublisher {
            sock,
            ring,
            grant,
            writer,
            spare,
            next_rid: 3,
        }
    }

    fn publisher_id(&self) -> u64 {
        self.grant.publisher_id
    }

    /// PUBLISHER_READY -> OK: the broker checks the header and seals the ring.
    fn ready(&mut self) {
        let id = self.publisher_id();
        let rid = self.next_rid;
        self.next_rid += 1;
        let (reply, _) = call(
            &self.sock,
            rid,
            bus_core::frame::Msg::PublisherReady { publisher_id: id },
        );
        assert!(
            matches!(decode(&reply), bus_core::frame::Msg::Ok),
            "{:?}",
            decode(&reply)
        );
    }

    /// Publishes one well-formed message.
    fn publish(&mut self, payload: &[u8]) {
        let mut loan = self.writer.try_loan(payload.len()).unwrap();
        loan.copy_from_slice(payload);
        loan.commit();
    }

    /// Writes a committed record header at ring position `pos` whose length is far beyond the
    /// ring's maximum. Through the memfd, so only before PUBLISHER_READY (the broker's
    /// F_SEAL_FUTURE_WRITE refuses writes afterwards).
    fn plant_bad_record(&self, pos: u64) {
        use bus_core::layout::{RECORD_KIND_MESSAGE, RING_HEADER_BYTES, RecordHeader};
        let mut header = Vec::new();
        header.extend_from_slice(&(pos + 1).to_le_bytes()); // commit word: committed
        header.extend_from_slice(&1u64.to_le_bytes()); // seq: the second record
        header.extend_from_slice(&0u64.to_le_bytes()); // timestamp
        let meta = RecordHeader::pack_meta(0xffff_fff0, RECORD_KIND_MESSAGE, 0);
        header.extend_from_slice(&meta.to_le_bytes());
        let at = RING_HEADER_BYTES as u64 + pos;
        assert_eq!(
            rustix::io::pwrite(&self.ring, &header, at).unwrap(),
            header.len()
        );
    }

    /// After PUBLISHER_READY: rewrites the ring header through the spare writable mapping,
    /// with a max_message_bytes that no longer matches the grant (a subscriber attaching from
    /// now on must refuse the ring).
    fn rewrite_header(&mut self) {
        use bus_core::ring::{RingConfig, Writer};
        let cfg = RingConfig {
            mode: self.grant.mode,
            data_bytes: self.grant.data_bytes,
            max_message_bytes: self.grant.max_message_bytes / 2,
            publisher_id: self.grant.publisher_id,
        };
        let spare = self.spare.take().expect("the spare mapping");
        // The writer is dropped at once: its job was to write the header.
        drop(Writer::create(spare, cfg).unwrap());
    }
}

/// Sends a request on `sock` and returns its reply (events in between are dropped, their fds
/// closed).
fn call(
    sock: &std::os::fd::OwnedFd,
    rid: u64,
    msg: bus_core::frame::Msg<'_>,
) -> (Vec<u8>, Vec<std::os::fd::OwnedFd>) {
    use bus_core::frame::Frame;
    use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame};
    use std::os::fd::AsFd;
    let mut bytes = Vec::new();
    Frame::new(rid, msg).encode(&mut bytes).unwrap();
    send_frame(sock.as_fd(), &bytes, &[]).unwrap();
    let mut buf = vec![0u8; bus_core::limits::MAX_FRAME_BYTES];
    loop {
        let mut fds = FdBatch::new();
        let len = match recv_frame(sock.as_fd(), &mut buf, &mut fds) {
            Ok(Received::Frame { len }) => len,
            Ok(Received::Eof) => panic!("the broker closed the connection"),
            Err(e) => panic!("no reply from the broker: {e}"),
        };
        if Frame::decode(&buf[..len]).unwrap().request_id == rid {
            let owned = (0..fds.len()).filter_map(|i| fds.take(i)).collect();
            return (buf[..len].to_vec(), owned);
        }
    }
}

fn decode(bytes: &[u8]) -> bus_core::frame::Msg<'_> {
    bus_core::frame::Frame::decode(bytes).unwrap().msg
}

/// Lines of a child's stderr, as they come.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next stderr line, or a panic naming `what` (and what came instead).
fn next_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    seen: &mut Vec<String>,
) -> String {
    match lines.recv_timeout(DEADLINE) {
        Ok(line) => {
            seen.push(line.clone());
            line
        }
        Err(_) => panic!("no stderr line ({what}) from bus sub; it wrote: {seen:?}"),
    }
}

/// One publisher with a ring header rewritten after PUBLISHER_READY (refused when `bus sub`
/// attaches) and one that commits garbage after a good record (found while reading): `bus sub`
/// names each on stderr, once, and goes on printing the honest publisher's messages.
#[test]
fn sub_warns_about_a_hostile_ring_and_keeps_reading() {
    let b = broker();
    let topic = "cli.hostile";

    // Rewrites its header once the broker has checked it.
    let mut rewriter = RawPublisher::create(b.socket(), topic);
    rewriter.ready();
    rewriter.rewrite_header();

    let mut sub = bus(&b)
        // Spinning: the hand-made publisher sends no wake-ups to a parked subscriber.
        .args([
            "sub",
            topic,
            "--count",
            "4",
            "--idle-timeout",
            "20",
            "--wait",
            "spin",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut sub);
    let mut seen = Vec::new();
    let warning = next_line(&lines, "the rewritten header", &mut seen);
    assert!(
        warning.starts_with("bus sub: warning: ")
            && warning.contains(&format!("publisher {}", rewriter.publisher_id()))
            && warning.contains("header mismatch")
            && warning.contains("still reading"),
        "{warning}"
    );
    wait_for_subscriber(&b, topic);

    // One good record, then a committed record whose length is absurd.
    let mut garbler = RawPublisher::create(b.socket(), topic);
    let record = bus_core::layout::record_bytes(b"raw-ok".len()) as u64;
    garbler.plant_bad_record(record);
    garbler.ready();
    garbler.publish(b"raw-ok");
    let warning = next_line(&lines, "the garbage record", &mut seen);
    assert!(
        warning.starts_with("bus sub: warning: ")
            && warning.contains(&format!("publisher {}", garbler.publisher_id()))
            && warning.contains("LengthTooLarge")
            && warning.contains("still reading"),
        "{warning}"
    );

    // The honest publisher is still heard.
    let status = bus(&b)
        .args(["pub", topic, "honest-1", "honest-2", "honest-3"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}, stderr so far: {seen:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "raw-ok\nhonest-1\nhonest-2\nhonest-3\n"
    );
    // Each bad ring was reported once.
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(rest.iter().all(|l| !l.contains("warning")), "{rest:?}");
    drop((rewriter, garbler));
}

// ---------------------------------------------------------------------------------------------
// A broker at max_clients: the client reports the broker's reason, every time.

fn limit_reached_at_connect_names_the_limit(driver: &str) {
    use bus_client::{Bus, ConnectError, ErrorCode};
    let b = broker_with(driver, "[limits]\nmax_clients = 2\n");
    let _one = Bus::connect(b.socket()).expect("first client");
    let _two = Bus::connect(b.socket()).expect("second client");
    for round in 0..50 {
        match Bus::connect(b.socket()) {
            Err(ConnectError::Refused { error, .. }) => {
                assert_eq!(
                    error.code,
                    ErrorCode::LimitReached,
                    "round {round}: {error}"
                );
                assert!(
                    error.message.contains("limits.max_clients"),
                    "round {round}: {error}"
                );
            }
            Err(other) => panic!("round {round}: not the broker's refusal: {other}"),
            Ok(_) => panic!("round {round}: a third client was let in"),
        }
    }
    // And the command line says so too.
    let out = bus(&b).args(["pub", "cli.full", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limit-reached") && err.contains("limits.max_clients"),
        "{err}"
    );
}

#[test]
fn limit_reached_at_connect_names_the_limit_epoll() {
    limit_reached_at_connect_names_the_limit("epoll");
}

#[test]
fn limit_reached_at_connect_names_the_limit_uring() {
    limit_reached_at_connect_names_the_limit("uring");
}

// ---------------------------------------------------------------------------------------------
// Messages that name the fix.

#[test]
fn overlong_topic_is_reported_once_with_the_naming_rule() {
    let b = broker();
    let topic = "a".repeat(256);
    for args in [vec!["pub", &topic, "x"], vec!["sub", &topic]] {
        let out = bus(&b).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(err.matches("256 bytes").count(), 1, "said once: {err}");
        assert!(err.contains("the limit is 255 bytes"), "{err}");
    }
}

#[test]
fn bad_topic_name_states_the_rule_not_a_denial() {
    let b = broker();
    let out = bus(&b).args(["pub", "a b", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a topic name"), "{err}");
    assert!(err.contains("A-Z a-z 0-9 _ -"), "names the rule: {err}");
    assert!(!err.contains("may not"), "reads like a denial: {err}");
}

#[test]
fn fallback_message_over_the_datagram_limit_advises_shared_memory() {
    let b = broker();
    let out = bus(&b)
        .args([
            "pub",
            "cli.big",
            "--fallback",
            "--count",
            "1",
            "--size",
            "70000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("65472"), "names the datagram limit: {err}");
    assert!(
        err.contains("shared memory"),
        "advises shared memory: {err}"
    );
    assert!(
        !err.contains("larger max_message_bytes"),
        "advice that cannot help: {err}"
    );
}

#[test]
fn broker_in_a_shared_sticky_directory_advises_a_private_one() {
    // /tmp's shape: world-writable and sticky, owned by someone (here: us).
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let refused = Start::new(Program::Bus)
        .socket(shared.join("bus.sock"))
        .log("off")
        .try_run()
        .expect_err("a broker started in a shared directory");
    assert_eq!(refused.status.code(), Some(1));
    let err = &refused.stderr;
    assert!(
        !err.contains("chmod go-w"),
        "a shared directory is meant to be writable: {err}"
    );
    let private = shared.join(format!("membus-{}", rustix::process::geteuid().as_raw()));
    assert!(
        err.contains("private directory")
            && err.contains(&format!("{}/bus.sock", private.display())),
        "{err}"
    );
    // The advice works: the broker creates that directory and starts there.
    let b = Start::new(Program::Bus)
        .socket(private.join("bus.sock"))
        .log("off")
        .run();
    assert!(
        b.start_line().contains("listening on"),
        "{}",
        b.start_line()
    );
}

#[test]
fn config_value_of_the_wrong_type_names_key_type_and_example() {
    let refused = Start::new(Program::Bus)
        .config("[limits]\nmax_clients = \"many\"\n")
        .try_run()
        .expect_err("a broker started with a bad config value");
    assert_eq!(refused.status.code(), Some(2));
    let err = &refused.stderr;
    assert!(err.contains("limits.max_clients"), "names the key: {err}");
    assert!(err.contains("whole number"), "names the type: {err}");
    assert!(
        err.contains("max_clients = 16384"),
        "gives an example: {err}"
    );
}

/// The shipped `bus` carries no benchmark harness: `bus bench` says how to get it.
#[cfg(not(feature = "bench"))]
#[test]
fn bench_without_the_harness_says_how_to_get_it() {
    let out = Command::new(BUS)
        .args(["bench", "latency", "--size", "64"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--features bench") && err.contains("cargo run --release -p benches"),
        "{err}"
    );
}

/// A `bus` built with the harness runs `bus bench`.
#[cfg(feature = "bench")]
#[test]
fn bench_with_the_harness_is_there() {
    let out = Command::new(BUS)
        .args(["bench", "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
