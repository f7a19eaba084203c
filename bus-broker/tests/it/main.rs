//! bus-broker integration tests: real sockets, lock files and config files in temporary
//! directories, and real `bus-broker` processes (`broker`).

mod broker;
mod listener;
mod settings;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};

/// A connected SEQPACKET client socket.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None)?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

/// A connected SEQPACKET client socket to an abstract name.
pub fn connect_abstract(name: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None)?;
    rustix::net::connect(&fd, &SocketAddrUnix::new_abstract_name(name)?)?;
    Ok(fd)
}

/// Permission bits of a path (not following symlinks).
pub fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// An abstract name no other test (or test run) uses.
pub fn unique_abstract_name() -> Vec<u8> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "membus-it-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// Whether the tests run as root (then ownership tests chown to 65534).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}
