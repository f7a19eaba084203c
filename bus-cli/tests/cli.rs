//! The `bus` command end to end, as a user runs it: a real broker (`bus broker`), real
//! `bus pub` / `bus sub` / `bus stat` processes, and `bus demo`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUS: &str = env!("CARGO_BIN_EXE_bus");

struct Broker {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bus.sock");
        let mut child = Command::new(BUS)
            .args(["broker", "--socket"])
            .arg(&socket)
            .env("MEMBUS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "broker start line: {line:?}");
        Broker {
            child,
            _dir: dir,
            socket,
        }
    }

    fn bus(&self) -> Command {
        let mut c = Command::new(BUS);
        c.env("MEMBUS_SOCKET", &self.socket).stdin(Stdio::null());
        c
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_subscriber(b: &Broker, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = b.bus().args(["stat", "--json"]).output().unwrap();
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
    let b = Broker::start();
    let sub = b
        .bus()
        .args(["sub", "cli.lines", "--count", "3", "--idle-timeout", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_subscriber(&b, "cli.lines");
    let mut publisher = b
        .bus()
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
    let b = Broker::start();
    let sub = b
        .bus()
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
    let status = b
        .bus()
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
    let b = Broker::start();
    let mut sub = b
        .bus()
        .args(["sub", "cli.stat", "--idle-timeout", "10"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_subscriber(&b, "cli.stat");
    let out = b.bus().args(["stat", "--json"]).output().unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &doc["topics"][0];
    assert_eq!(t["name"], "cli.stat");
    assert_eq!(t["subscribers"][0]["pid"], sub.id());
    assert_eq!(t["subscribers"][0]["command"], "bus");
    let table = b.bus().arg("stat").output().unwrap();
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
