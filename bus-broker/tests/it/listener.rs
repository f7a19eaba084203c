//! `Listener::bind`: directories, lock file, live versus stale, abstract names, modes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bus_broker::addr::{
    AddrError, BindOptions, ListenAddr, Listener, SocketSpec, peer_credentials,
};
use bus_testkit::{Broker, Program, Start};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};

use crate::{connect, connect_abstract, mode_of, running_as_root, unique_abstract_name};

fn bind(path: &Path) -> Result<Listener, AddrError> {
    Listener::bind(&SocketSpec::Path(path.to_owned()), &BindOptions::default())
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// A fresh directory `membus` inside a temp dir, not yet created (the broker creates it).
fn socket_in_new_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("membus").join("bus.sock");
    (tmp, path)
}

#[test]
fn bind_creates_private_dir_socket_and_lock_then_cleans_up() {
    let (_tmp, path) = socket_in_new_dir();
    let listener = bind(&path).unwrap();
    let dir = path.parent().unwrap();
    assert_eq!(mode_of(dir), 0o700);
    assert_eq!(mode_of(&path), 0o600);
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket_like()
    );
    assert_eq!(listener.addr(), &ListenAddr::Path(path.clone()));
    assert!(!listener.is_activated());
    let lock = lock_path(&path);
    assert_eq!(listener.lock().unwrap().path(), lock);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{}\n", std::process::id())
    );

    // The socket is non-blocking and close-on-exec, and it answers.
    let flags = rustix::fs::fcntl_getfl(&listener).unwrap();
    assert!(flags.contains(rustix::fs::OFlags::NONBLOCK));
    let fd_flags = rustix::io::fcntl_getfd(&listener).unwrap();
    assert!(fd_flags.contains(rustix::io::FdFlags::CLOEXEC));
    assert!(listener.accept().unwrap().is_none(), "nothing pending yet");
    let _client = connect(&path).unwrap();
    let accepted = listener.accept().unwrap().expect("a pending connection");
    let creds = peer_credentials(&accepted).unwrap();
    assert_eq!(creds.pid, std::process::id());
    assert_eq!(creds.uid, rustix::process::geteuid().as_raw());
    assert_eq!(creds.gid, rustix::process::getegid().as_raw());

    drop(listener);
    assert!(!path.exists(), "socket file removed at exit");
    assert!(!lock.exists(), "lock file removed at exit");
    assert!(dir.exists(), "the directory stays");
}

trait SocketLike {
    fn is_socket_like(&self) -> bool;
}

impl SocketLike for std::fs::FileType {
    fn is_socket_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_socket()
    }
}

#[test]
fn second_broker_on_same_path_is_refused_with_pid() {
    let (_tmp, path) = socket_in_new_dir();
    let first = bind(&path).unwrap();
    let err = bind(&path).unwrap_err();
    match &err {
        AddrError::LockHeld { pid, path: p, lock } => {
            assert_eq!(*pid, Some(std::process::id()));
            assert_eq!(p, &path);
            assert_eq!(lock, &lock_path(&path));
        }
        other => panic!("expected LockHeld, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("already serving"), "{msg}");
    // The refused attempt changed nothing: the first broker still answers and owns its files.
    assert!(connect(&path).is_ok());
    assert_eq!(
        std::fs::read_to_string(lock_path(&path)).unwrap(),
        format!("{}\n", std::process::id())
    );
    drop(first);
    let again = bind(&path).unwrap();
    drop(again);
}

#[test]
fn stale_socket_is_taken_over() {
    let (_tmp, path) = socket_in_new_dir();
    bind(&path).unwrap().close_without_cleanup();
    assert!(path.exists(), "a crashed broker leaves its socket file");
    assert!(lock_path(&path).exists(), "and its lock file");
    std::fs::write(lock_path(&path), "999999999\n").unwrap();
    assert!(connect(&path).is_err(), "nobody answers");

    let listener = bind(&path).unwrap();
    assert!(
        connect(&path).is_ok(),
        "the new broker answers on the same path"
    );
    assert_eq!(
        std::fs::read_to_string(lock_path(&path)).unwrap(),
        format!("{}\n", std::process::id())
    );
    drop(listener);
}

#[test]
fn live_broker_without_lock_is_refused() {
    // An older broker (or one whose lock file was deleted) listening on the path.
    let (tmp, path) = socket_in_new_dir();
    std::fs::create_dir(path.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let old = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
    rustix::net::bind(&old, &SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&old, 4).unwrap();
    let err = bind(&path).unwrap_err();
    assert!(matches!(err, AddrError::LiveUnlocked { .. }), "{err:?}");
    assert!(err.to_string().contains("already listening"), "{err}");
    assert!(path.exists(), "the live socket is not touched");
    assert!(connect(&path).is_ok());
    assert!(!lock_path(&path).exists(), "our lock file is removed again");
    drop(tmp);
}

#[test]
fn foreign_stream_socket_is_left_alone() {
    let (_tmp, path) = socket_in_new_dir();
    std::fs::create_dir(path.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let err = bind(&path).unwrap_err();
    assert!(matches!(err, AddrError::ForeignSocket { .. }), "{err:?}");
    assert!(err.to_string().contains("another program"), "{err}");
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_ok(),
        "still served"
    );
    drop(other);
}

#[test]
fn regular_file_at_path_is_left_untouched() {
    let (_tmp, path) = socket_in_new_dir();
    std::fs::create_dir(path.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(&path, "precious").unwrap();
    let err = bind(&path).unwrap_err();
    assert!(
        matches!(
            err,
            AddrError::NotASocket {
                kind: "a regular file",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("is a regular file, not a socket"), "{msg}");
    assert!(msg.contains("remove it by hand"), "{msg}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    assert!(!lock_path(&path).exists(), "no lock file left behind");
}

#[test]
fn directory_and_symlink_at_path_are_left_untouched() {
    let (_tmp, path) = socket_in_new_dir();
    std::fs::create_dir(path.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::create_dir(&path).unwrap();
    let err = bind(&path).unwrap_err();
    assert!(
        err.to_string().contains("is a directory, not a socket"),
        "{err}"
    );
    assert!(path.is_dir());
    std::fs::remove_dir(&path).unwrap();
    std::os::unix::fs::symlink("/nonexistent", &path).unwrap();
    let err = bind(&path).unwrap_err();
    assert!(
        err.to_string().contains("is a symbolic link, not a socket"),
        "{err}"
    );
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn writable_directory_is_refused() {
    for mode in [0o777, 0o770, 0o702] {
        let (_tmp, path) = socket_in_new_dir();
        let dir = path.parent().unwrap();
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(
            matches!(err, AddrError::DirWritable { .. }),
            "{mode:o}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
        assert!(msg.contains("chmod go-w"), "{msg}");
        assert!(
            !path.exists() && !lock_path(&path).exists(),
            "nothing created"
        );
        assert_eq!(mode_of(dir), mode, "the directory is not changed");
    }
}

#[test]
fn directory_of_another_user_is_refused() {
    let (_tmp, path) = socket_in_new_dir();
    let dir = path.parent().unwrap();
    let (path, owner) = if running_as_root() {
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        (path.clone(), 65534)
    } else {
        // Not root: "/" belongs to root.
        (PathBuf::from("/membus-it-never-created.sock"), 0)
    };
    let err = bind(&path).unwrap_err();
    match &err {
        AddrError::DirOwner { owner: o, uid, .. } => {
            assert_eq!(*o, owner);
            assert_eq!(*uid, rustix::process::geteuid().as_raw());
        }
        other => panic!("expected DirOwner, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&format!("owned by uid {owner}")), "{msg}");
    assert!(msg.contains("not writable by group or others"), "{msg}");
    assert!(!path.exists());
}

#[test]
fn symlinked_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
    let err = bind(&tmp.path().join("link").join("bus.sock")).unwrap_err();
    assert!(matches!(err, AddrError::DirNotDirectory { .. }), "{err:?}");
    assert!(
        std::fs::read_dir(&real).unwrap().next().is_none(),
        "nothing created through it"
    );
}

#[test]
fn missing_parent_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = bind(&tmp.path().join("a").join("b").join("bus.sock")).unwrap_err();
    assert!(matches!(err, AddrError::DirParentMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("parent does not exist"), "{err}");
}

#[test]
fn socket_mode_is_applied() {
    let (_tmp, path) = socket_in_new_dir();
    let opts = BindOptions {
        mode: 0o640,
        gid: None,
    };
    let listener = Listener::bind(&SocketSpec::Path(path.clone()), &opts).unwrap();
    assert_eq!(mode_of(&path), 0o640);
    assert_eq!(mode_of(path.parent().unwrap()), 0o700);
    drop(listener);
    // An invalid mode is refused before anything is created.
    let opts = BindOptions {
        mode: 0o4600,
        gid: None,
    };
    assert!(Listener::bind(&SocketSpec::Path(path.clone()), &opts).is_err());
    assert!(!path.exists());
}

#[test]
fn group_is_applied_to_socket_and_new_directory() {
    let (_tmp, path) = socket_in_new_dir();
    // Root may chgrp to any gid; others only to their own groups.
    let gid = if running_as_root() {
        12345
    } else {
        rustix::process::getegid().as_raw()
    };
    let opts = BindOptions {
        mode: 0o660,
        gid: Some(gid),
    };
    let listener = Listener::bind(&SocketSpec::Path(path.clone()), &opts).unwrap();
    let dir = path.parent().unwrap();
    assert_eq!(mode_of(dir), 0o750);
    assert_eq!(std::fs::metadata(dir).unwrap().gid(), gid);
    assert_eq!(mode_of(&path), 0o660);
    assert_eq!(std::fs::symlink_metadata(&path).unwrap().gid(), gid);
    drop(listener);
}

#[test]
fn cleanup_spares_a_file_that_replaced_our_socket() {
    let (_tmp, path) = socket_in_new_dir();
    let mut listener = bind(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "someone else's").unwrap();
    listener.cleanup();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
    assert!(!lock_path(&path).exists());
    listener.cleanup(); // idempotent
}

#[test]
fn abstract_name_second_bind_refused() {
    let name = unique_abstract_name();
    let spec = SocketSpec::Abstract(name.clone());
    let first = Listener::bind(&spec, &BindOptions::default()).unwrap();
    assert_eq!(first.addr(), &ListenAddr::Abstract(name.clone()));
    assert!(first.lock().is_none(), "no lock file for abstract names");
    let err = Listener::bind(&spec, &BindOptions::default()).unwrap_err();
    assert!(
        matches!(&err, AddrError::AbstractInUse { name: n } if *n == name),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("@{}", String::from_utf8_lossy(&name))),
        "{msg}"
    );
    assert!(msg.contains("already in use"), "{msg}");
    let _client = connect_abstract(&name).unwrap();
    assert!(first.accept().unwrap().is_some());
    drop(first);
    assert!(connect_abstract(&name).is_err(), "gone with the socket");
    let again = Listener::bind(&spec, &BindOptions::default()).unwrap();
    drop(again);
}

#[test]
fn sticky_shared_directory_is_refused_with_a_private_directory_advice() {
    // The shape of /tmp: writable by everyone, sticky.
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let err = bind(&shared.join("bus.sock")).unwrap_err();
    assert!(matches!(err, AddrError::DirShared { .. }), "{err:?}");
    let msg = err.to_string();
    let private = shared.join(format!("membus-{}", rustix::process::geteuid().as_raw()));
    assert!(
        msg.contains(&format!("--socket {}/bus.sock", private.display())),
        "{msg}"
    );
    assert!(!msg.contains("chmod go-w"), "{msg}");
    // Following the advice works.
    let listener = bind(&private.join("bus.sock")).unwrap();
    assert_eq!(mode_of(&private), 0o700);
    drop(listener);
}

/// SIGTERM, and a clean exit.
fn stop_broker(broker: &mut Broker) {
    broker.signal(rustix::process::Signal::TERM);
    let status = broker.wait_exit();
    assert!(status.success(), "{status}: {}", broker.stderr());
}

/// A broker restarted on an abstract name right after the previous one exited starts every
/// time, although on io_uring the kernel keeps the old listener bound for a few milliseconds
/// after the process is gone; a live broker on the name is still refused at once.
fn abstract_name_restart(driver: &str) {
    let name = unique_abstract_name();
    let socket = format!("@{}", String::from_utf8_lossy(&name));
    let start = || {
        Start::new(Program::BusBroker)
            .driver(driver)
            .socket(&socket)
    };
    let mut broker = start()
        .try_run()
        .unwrap_or_else(|r| panic!("first start: {r}"));
    for round in 0..20 {
        stop_broker(&mut broker);
        broker
            .try_restart()
            .unwrap_or_else(|r| panic!("restart {round} on {socket} failed: {r}"));
        connect_abstract(&name).expect("the restarted broker answers");
    }
    let refused = start().try_run().expect_err("a second live broker started");
    assert!(refused.stderr.contains("already in use"), "{refused}");
    connect_abstract(&name).expect("the live broker still answers");
    stop_broker(&mut broker);
}

#[test]
fn abstract_name_restart_epoll() {
    abstract_name_restart("epoll");
}

#[test]
fn abstract_name_restart_uring() {
    abstract_name_restart("uring");
}
