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
