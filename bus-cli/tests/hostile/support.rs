//! Broker processes (`bus broker`), `bus pub`/`bus sub` children, polling waits, CPU and fd
//! probes, a seeded RNG.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `bus` binary.
pub const BUS: &str = env!("CARGO_BIN_EXE_bus");

/// A small deterministic RNG (splitmix64); the seed is printed so a failure can be replayed
/// with `HOSTILE_SEED=...`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// From `HOSTILE_SEED` if set, else from the clock; prints the seed with `what`.
    pub fn seeded(what: &str) -> Rng {
        let seed = std::env::var("HOSTILE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    ^ u64::from(std::process::id()) << 32
            });
        eprintln!("{what}: HOSTILE_SEED={seed}");
        Rng(seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// splitmix64's finaliser: a good 64-bit hash.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload message `i` of publisher `who` carries in the counting scenarios: its length
/// is a hash of (`seed`, `who`, `i`) below `max_len`, its bytes a pattern of `i` and the
/// offset, so the receiver can check every byte knowing only who sent it and the sequence.
pub fn payload(seed: u64, who: u64, i: u64, max_len: usize) -> Vec<u8> {
    let len = (mix(seed ^ (who << 40) ^ i) % max_len as u64) as usize;
    (0..len)
        .map(|j| {
            (i as usize)
                .wrapping_mul(31)
                .wrapping_add(j)
                .wrapping_add(who as usize) as u8
        })
        .collect()
}

impl From<Config> for String {
    fn from(c: Config) -> String {
        c.text
    }
}

/// Config-file text for a broker.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub text: String,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }
    /// A line under `[limits]` (collected, written in one table).
    pub fn limits(mut self, line: &str) -> Config {
        if !self.text.contains("[limits]\n") {
            // [limits] must come before any [[topic]] table.
            self.text = format!("[limits]\n{}", self.text);
        }
        let at = self.text.find("[limits]\n").unwrap() + "[limits]\n".len();
        self.text.insert_str(at, &format!("{line}\n"));
        self
    }
    /// A `[[topic]]` table.
    pub fn topic(mut self, body: &str) -> Config {
        self.text.push_str(&format!("[[topic]]\n{body}\n"));
        self
    }
}

pub use bus_testkit::{Broker, DEADLINE, wait_until};

/// How these tests start a broker: `bus broker` on `driver`, logging at info (tests read the
/// log), after letting this process open many fds (hogs keep the fds the broker sends them).
pub fn start_broker(driver: &str) -> bus_testkit::Start {
    bus_testkit::raise_fd_limit(65536);
    bus_testkit::Start::new(bus_testkit::Program::Bus)
        .driver(driver)
        .log("info")
}

/// What the tests do with a [`Broker`] besides what bus-testkit offers.
pub trait BrokerExt {
    /// A `bus` command against this broker.
    fn bus(&self) -> Command;
    /// A bus-client connection (shared memory).
    fn connect(&self) -> bus_client::Bus;
    /// A bus-client connection over the datagram fallback.
    fn connect_datagram(&self) -> bus_client::Bus;
    /// CPU used by the broker over a window (fraction of one core).
    fn cpu_over(&self, window: Duration) -> f64;
}

impl BrokerExt for Broker {
    fn bus(&self) -> Command {
        let mut c = Command::new(BUS);
        c.env("MEMBUS_SOCKET", self.socket())
            .env_remove("MEMBUS_LOG")
            .stdin(Stdio::null());
        c
    }

    fn connect(&self) -> bus_client::Bus {
        bus_client::Bus::connect(self.socket()).expect("bus-client connects")
    }

    fn connect_datagram(&self) -> bus_client::Bus {
        bus_client::Bus::connect_with(
            self.socket(),
            bus_client::BusOptions::new().transport(bus_client::Transport::Datagram),
        )
        .expect("bus-client connects (datagram)")
    }

    fn cpu_over(&self, window: Duration) -> f64 {
        cpu_over(self.pid(), window)
    }
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The command may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts with field 3 (state); utime is field 14, stime 15.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Fraction of one core `pid` used over `window` (a spin detector, not a speed measure).
pub fn cpu_over(pid: u32, window: Duration) -> f64 {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    std::thread::sleep(window);
    let c1 = cpu_ticks(pid);
    let wall = t0.elapsed().as_secs_f64();
    (c1 - c0) as f64 / hz / wall
}

/// A child process (`bus sub`, ...) whose stdout lines are collected by a thread.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub what: String,
    /// The stdout and stderr reader threads: joined by `wait_exit`, so that every line the
    /// process wrote is in `lines` once it has exited.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        let stdout = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let sink = lines.clone();
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        Proc {
            child,
            lines,
            what: what.to_owned(),
            readers: vec![stdout, stderr],
        }
    }

    /// Stdout lines so far (stderr lines start with "stderr: ").
    pub fn stdout(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.starts_with("stderr: "))
            .cloned()
            .collect()
    }

    pub fn all_output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        let what = format!("{} exits", self.what);
        wait_until(&what, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        // The pipes reach EOF now (unless the process left children holding them: then the
        // readers are left to finish on their own).
        let end = Instant::now() + DEADLINE;
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        for r in self.readers.drain(..).filter(|r| r.is_finished()) {
            let _ = r.join();
        }
        status.unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `bus sub TOPIC --format json ...` against `broker`.
pub fn bus_sub(broker: &Broker, topic: &str, extra: &[&str]) -> Proc {
    let mut cmd = broker.bus();
    cmd.args(["sub", "--format", "json"])
        .args(extra)
        .args(["--", topic]);
    Proc::spawn(cmd, &format!("bus sub {topic}"))
}

/// Parses `bus sub --format json` lines.
pub fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object() && v.get("seq").is_some())
        .collect()
}

/// The broker's stats document, via `bus stat --json`.
pub fn stat_json(broker: &Broker) -> serde_json::Value {
    let out = broker.bus().args(["stat", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "bus stat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bus stat --json prints JSON")
}

/// The topic named `name` in a stats document.
pub fn topic_of<'a>(doc: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    doc["topics"].as_array()?.iter().find(|t| t["name"] == name)
}

/// The number of live (ready) subscribers of `name`.
pub fn ready_subscribers(broker: &Broker, name: &str) -> usize {
    let doc = stat_json(broker);
    topic_of(&doc, name).map_or(0, |t| {
        t["subscribers"]
            .as_array()
            .map_or(0, |s| s.iter().filter(|s| s["ready"] == true).count())
    })
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
