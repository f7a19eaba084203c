//! Runs every example against a real broker, as a user would (`cargo test` builds the examples
//! and the broker binary next to this test).

use std::process::Command;

use bus_testkit::Broker;

/// An example program, built beside this test.
fn example(name: &str) -> std::path::PathBuf {
    bus_testkit::built_binary(
        &format!("examples/{name}"),
        "cargo build -p membus-examples --examples (or run the workspace tests)",
    )
}

fn run_example(name: &str, args: &[&str]) -> String {
    let broker = Broker::start();
    let out = Command::new(example(name))
        .args(args)
        .env("MEMBUS_SOCKET", broker.socket())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn pubsub() {
    let out = run_example("pubsub", &[]);
    assert!(
        out.contains("hello, Ada (seq 0") && out.contains("hello, Edsger (seq 2"),
        "{out}"
    );
}

#[test]
fn zero_copy_loan() {
    let out = run_example("zero_copy_loan", &[]);
    assert!(
        out.contains("sensor 3: 293.45 K") && out.contains("sum 1173200 mK"),
        "{out}"
    );
}

#[test]
fn lossy_feed() {
    let out = run_example("lossy_feed", &[]);
    assert!(
        out.contains("published 1000") && out.contains("lost"),
        "{out}"
    );
}

#[test]
fn latency_hlog() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.hlog");
    let out = run_example("latency_hlog", &[path.to_str().unwrap()]);
    assert!(out.contains("round 2: p50"), "{out}");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(
        log.contains("#[StartTime") || log.contains("StartTime"),
        "{log}"
    );
    assert!(
        log.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('"'))
            .count()
            >= 3,
        "{log}"
    );
}

#[test]
fn async_tokio() {
    let out = run_example("async_tokio", &[]);
    assert!(
        out.contains("async: received 100 messages, sum 4950"),
        "{out}"
    );
}
