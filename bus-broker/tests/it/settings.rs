//! From command line and config file on disk to a listening socket and a loaded policy.

use std::ffi::OsString;
use std::path::Path;

use bus_broker::addr::{AddrSource, Listener, SocketSpec};
use bus_broker::cli::Args;
use bus_broker::config::{Settings, SettingsError};
use bus_broker::policy::{Op, PolicyError, PolicyHolder};
use clap::Parser;

use crate::{connect, mode_of};

fn no_env(_: &str) -> Option<OsString> {
    None
}

#[test]
fn config_file_drives_bind_and_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = rustix::process::geteuid().as_raw();
    std::fs::write(
        tmp.path().join("broker.toml"),
        "socket = \"run/bus.sock\"\nmode = \"0640\"\npolicy = \"policy.toml\"\n\n\
         [[topic]]\nname = \"sensors.imu\"\nmode = \"lossy\"\nring_bytes = 65536\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("policy.toml"),
        format!("[[allow]]\nusers = [{uid}]\npublish = [\"sensors.*\"]\nsubscribe = [\"**\"]\n"),
    )
    .unwrap();
    let config = tmp.path().join("broker.toml");
    let args = Args::parse_from([Path::new("bus-broker"), Path::new("--config"), &config]);
    let settings = Settings::resolve(&args, no_env, uid).unwrap();
    assert_eq!(
        settings.socket,
        SocketSpec::Path(tmp.path().join("run/bus.sock"))
    );
    assert_eq!(settings.socket_source, AddrSource::Config(config.clone()));
    assert_eq!(settings.topics.len(), 1);

    let listener = Listener::bind(&settings.socket, &settings.bind).unwrap();
    let path = tmp.path().join("run/bus.sock");
    assert_eq!(mode_of(&path), 0o640);
    assert!(connect(&path).is_ok());
    drop(listener);

    let mut holder = PolicyHolder::load(settings.policy.clone(), uid).unwrap();
    assert!(
        holder
            .policy()
            .check(Op::Publish, "sensors.imu", uid, &[])
            .is_ok()
    );
    assert!(holder.policy().check(Op::Publish, "cmd", uid, &[]).is_err());
    // A broken edit is rejected on reload, with file and line; the old policy stays.
    std::fs::write(
        tmp.path().join("policy.toml"),
        "[[allow]]\nusers = [\"no-such-user-x\"]\npublish = [\"a\"]\n",
    )
    .unwrap();
    match holder.reload() {
        Err(PolicyError::Invalid { path, line, .. }) => {
            assert_eq!(path, tmp.path().join("policy.toml"));
            assert_eq!(line, 2);
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(
        holder
            .policy()
            .check(Op::Publish, "sensors.imu", uid, &[])
            .is_ok()
    );
}

#[test]
fn bad_config_file_names_file_line_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("broker.toml");
    std::fs::write(&config, "[limits]\nmax_clients = 10\nmax_topic = 3\n").unwrap();
    let args = Args::parse_from([Path::new("bus-broker"), Path::new("--config"), &config]);
    let err = Settings::resolve(&args, no_env, 0).unwrap_err();
    assert!(matches!(err, SettingsError::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{}:3:1: ", config.display())),
        "{msg}"
    );
    assert!(msg.contains("max_topic"), "{msg}");
}

/// HELLO then STATS_REQUEST on the abstract socket `argv[1]`; prints the document.
const STATS_CLIENT_PY: &str = r#"
import socket, struct, sys
H = struct.Struct("<IBBHIHHQ")
def frame(t, body=b"", rid=0):
    return H.pack(0x5355424D, 1, 0, t, len(body), 0, 0, rid) + body
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(20)
s.connect("\0" + sys.argv[1])
s.send(frame(0x0001, struct.pack("<HBH", 1, 2, 2) + b"py", 1))
d = s.recv(65536)
assert struct.unpack_from("<H", d, 6)[0] == 0x0002, ("expected WELCOME", d)
s.send(frame(0x0501, b"", 2))
doc = b""
while True:
    d = s.recv(65536)
    assert struct.unpack_from("<H", d, 6)[0] == 0x0502, ("expected STATS_REPLY", d)
    doc += d[24:]
    if not d[5] & 1:
        break
print(doc.decode())
"#;

/// STATS as `uid` (through python3, which the broker's integration tests already need).
fn stats_as(name: &str, uid: u32) -> serde_json::Value {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("python3")
        .args(["-c", STATS_CLIENT_PY, name])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("python3 is needed for this test (apt-get install python3)");
    assert!(
        out.status.success(),
        "stats client as uid {uid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn topic_names(doc: &serde_json::Value) -> Vec<String> {
    doc["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// STATS through a real broker as another uid: only what the policy lets it use, unless a
/// `stats = true` rule names it (policy reloaded with SIGHUP). Needs root (to run the client
/// as uid 65534).
fn stats_as_another_uid(driver: &str) {
    use bus_testkit::{Program, Start, wait_until};
    use rustix::process::Signal;
    if !crate::running_as_root() {
        eprintln!(
            "skipped: STATS as another uid needs root to start a client as uid 65534 \
             (the unit test engine::stats::tests covers the filtering)"
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let name = String::from_utf8(crate::unique_abstract_name()).unwrap();
    let subscribe_public = format!("[[allow]]\nusers = [{NOBODY}]\nsubscribe = [\"public.*\"]\n");
    let mut broker = Start::new(Program::BusBroker)
        .socket(format!("@{name}"))
        .policy(subscribe_public.as_str())
        .config("[[topic]]\nname = \"public.a\"\n\n[[topic]]\nname = \"secret.b\"\n")
        .driver(driver)
        .log("info")
        .run();
    let policy = broker.policy_path().unwrap();

    // Allowed to subscribe public.*: public.a only.
    let doc = stats_as(&name, NOBODY);
    assert_eq!(topic_names(&doc), ["public.a"], "{doc}");
    assert_eq!(doc["scope"], "permitted");
    // The broker's own uid (root) sees everything.
    let doc = stats_as(&name, 0);
    assert_eq!(topic_names(&doc), ["public.a", "secret.b"]);
    assert_eq!(doc["scope"], "all");

    // Granted stats: everything.
    std::fs::write(
        &policy,
        format!("{subscribe_public}\n[[allow]]\nusers = [{NOBODY}]\nstats = true\n"),
    )
    .unwrap();
    broker.signal(Signal::HUP);
    wait_until("the reload is logged", || {
        broker.stderr().contains("policy reloaded")
    });
    let doc = stats_as(&name, NOBODY);
    assert_eq!(topic_names(&doc), ["public.a", "secret.b"], "{doc}");
    assert_eq!(doc["scope"], "all");

    broker.signal(Signal::TERM);
    assert!(broker.wait_exit().success());
}

#[test]
fn stats_as_another_uid_epoll() {
    stats_as_another_uid("epoll");
}

#[test]
fn stats_as_another_uid_uring() {
    stats_as_another_uid("uring");
}
