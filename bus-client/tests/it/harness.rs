//! Broker processes, child client processes, and message patterns with checksums.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use bus_client::{Bus, BusOptions, Transport};

/// The test broker: a `bus-broker` process on a private socket (bus-testkit).
pub use bus_testkit::Broker;

/// bus-client connections to a test [`Broker`].
pub trait BrokerExt {
    /// A connection with the default options.
    fn bus(&self) -> Bus;
    /// A connection over `transport`.
    fn bus_with(&self, transport: Transport) -> Bus;
}

impl BrokerExt for Broker {
    fn bus(&self) -> Bus {
        Bus::connect(self.socket()).expect("connect to the test broker")
    }

    fn bus_with(&self, transport: Transport) -> Bus {
        Bus::connect_with(self.socket(), BusOptions::new().transport(transport))
            .expect("connect to the test broker")
    }
}

/// A client process: this test binary re-executed in `role`.
pub struct ChildClient {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl ChildClient {
    pub fn spawn(role: &str, broker: &Broker, args: &[(&str, String)]) -> ChildClient {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MEMBUS_IT_CHILD", role)
        .env("MEMBUS_SOCKET", broker.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
        for (k, v) in args {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child client");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ChildClient { child, stdout }
    }

    /// Waits for the child to print `word` on a line of its own.
    pub fn expect_line(&mut self, word: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "child exited before printing {word}");
            // libtest prints "test child_entry ... " before the child's first line.
            if line.trim_end().ends_with(word) {
                return;
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_success(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
    }
}

impl Drop for ChildClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Message `index` of the checksummed pattern: `[index u64][fnv-1a of body u64][body]`, body
/// length and bytes derived from `seed` and `index`.
pub fn pattern(seed: u64, index: u64, max_body: usize, out: &mut Vec<u8>) {
    let mut rng = fastrand::Rng::with_seed(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let body_len = rng.usize(0..=max_body);
    out.clear();
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend((0..body_len).map(|_| rng.u8(..)));
    let sum = fnv(&out[16..]);
    out[8..16].copy_from_slice(&sum.to_le_bytes());
}

pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Checks a pattern message; returns its index.
pub fn check_pattern(msg: &[u8]) -> u64 {
    assert!(
        msg.len() >= 16,
        "message of {} bytes is too short",
        msg.len()
    );
    let index = u64::from_le_bytes(msg[..8].try_into().unwrap());
    let sum = u64::from_le_bytes(msg[8..16].try_into().unwrap());
    assert_eq!(sum, fnv(&msg[16..]), "checksum mismatch in message {index}");
    index
}

/// Waits until `f` is true (polling), failing after a generous timeout.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs the role named by `MEMBUS_IT_CHILD`; without one it panics (the entry point was run as
/// if it were a test).
pub fn run_child_role() {
    let role = std::env::var("MEMBUS_IT_CHILD").expect(
        "child_entry is the child processes' entry point, not a test: run the other tests, \
         which start it with MEMBUS_IT_CHILD=<role>",
    );
    let topic = std::env::var("MEMBUS_IT_TOPIC").unwrap_or_else(|_| "it".into());
    let bus = Bus::connect_default().expect("child: connect");
    match role.as_str() {
        // Publishes COUNT pattern messages once SUBS subscribers are attached.
        "publisher" => {
            let count = env_u64("MEMBUS_IT_COUNT", 1000);
            let subs = env_u64("MEMBUS_IT_SUBS", 1) as usize;
            let max_body = env_u64("MEMBUS_IT_MAX_BODY", 1000) as usize;
            let seed = env_u64("MEMBUS_IT_SEED", 1);
            let mut p = bus.publisher(&topic).expect("child: publisher");
            eventually("subscribers", || p.subscriber_count() == Some(subs));
            let mut buf = Vec::new();
            for i in 0..count {
                pattern(seed, i, max_body, &mut buf);
                p.send(&buf).expect("child: send");
            }
            println!("DONE");
            if std::env::var("MEMBUS_IT_LINGER").is_ok() {
                std::thread::sleep(Duration::from_secs(600));
            }
        }
        // Subscribes, attaches the publisher's ring, says READY, and never reads.
        "stuck-subscriber" => {
            let mut s = bus.subscriber(&topic).expect("child: subscriber");
            eventually("the publisher's ring", || s.publisher_count() == 1);
            println!("READY");
            std::thread::sleep(Duration::from_secs(600));
        }
        other => panic!("unknown child role {other}"),
    }
}
