//! Where the broker listens, and getting a listening socket there safely.
//!
//! - [`SocketSpec`]: a path, or `@NAME` in the abstract namespace.
//! - [`default_socket_path`] and [`resolve_socket`]: flag, then `MEMBUS_SOCKET`, then the config
//!   file, then `$XDG_RUNTIME_DIR/membus/bus.sock` (or `${TMPDIR:-/tmp}/membus-$UID/bus.sock`).
//! - [`Listener::bind`]: checks (or creates) the socket directory, takes the lock file
//!   `bus.sock.lock` beside the socket, tells a live broker from a stale socket, binds and listens.
//! - [`Listener::from_systemd`]: socket activation (`LISTEN_PID`, `LISTEN_FDS`).
//! - [`peer_credentials`]: SO_PEERCRED of an accepted connection.
//!
//! Start-up order for a path (every step refuses with a message naming the fix):
//!
//! ```text
//! mkdir DIR 0700 (0750 + chgrp with --group) or check the existing DIR: ours, not g+w/o+w
//! open DIR/bus.sock.lock, flock(LOCK_EX|LOCK_NB)   held: live broker, pid read from the file
//! lstat DIR/bus.sock   absent: bind | socket: connect probe | anything else: refuse, leave it
//!     probe: connected -> live broker (without the lock: older version) -> refuse
//!            ECONNREFUSED -> stale: unlink
//! socket(AF_UNIX, SOCK_SEQPACKET | NONBLOCK | CLOEXEC), bind, chmod (+chgrp), listen(1024)
//! ```
//!
//! The socket is chmod-ed before `listen`, so no one connects through a wider mode in between.
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bus_core::frame::{Frame, Hello, Msg, PROTOCOL_VERSION, Transport};
use rustix::fs::{FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

/// Suffix of the lock file beside the socket (`bus.sock` -> `bus.sock.lock`).
pub const LOCK_SUFFIX: &str = ".lock";
/// `listen` backlog.
pub const LISTEN_BACKLOG: i32 = 1024;
/// First fd passed by systemd socket activation.
pub const LISTEN_FDS_START: RawFd = 3;
/// Socket file mode without `--group`.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Socket file mode with `--group`.
pub const DEFAULT_GROUP_SOCKET_MODE: u32 = 0o660;
pub use bus_core::naming::{MAX_SOCKET_ADDR_BYTES, SOCKET_ENV, SocketSpec, default_socket_path};

/// Where the socket address came from (for the start-up log line and for error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrSource {
    /// `--socket`.
    Flag,
    /// `MEMBUS_SOCKET`.
    Env,
    /// `socket =` in this config file.
    Config(PathBuf),
    /// [`default_socket_path`].
    Default,
}

impl fmt::Display for AddrSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSource::Flag => f.write_str("--socket"),
            AddrSource::Env => write!(f, "${SOCKET_ENV}"),
            AddrSource::Config(p) => write!(f, "config {}", p.display()),
            AddrSource::Default => f.write_str("default"),
        }
    }
}

/// Picks the socket: `flag`, then `MEMBUS_SOCKET` (if set and non-empty), then `config` (the
/// value and the file it came from), then [`default_socket_path`].
pub fn resolve_socket(
    flag: Option<&SocketSpec>,
    env: impl Fn(&str) -> Option<OsString>,
    config: Option<(&SocketSpec, &Path)>,
    uid: u32,
) -> Result<(SocketSpec, AddrSource), AddrError> {
    if let Some(spec) = flag {
        return Ok((spec.clone(), AddrSource::Flag));
    }
    if let Some(value) = env(SOCKET_ENV).filter(|v| !v.is_empty()) {
        return SocketSpec::parse(&value)
            .map(|s| (s, AddrSource::Env))
            .map_err(|reason| AddrError::BadEnv {
                var: SOCKET_ENV,
                value: value.to_string_lossy().into(),
                reason,
            });
    }
    if let Some((spec, file)) = config {
        return Ok((spec.clone(), AddrSource::Config(file.to_owned())));
    }
    let path = default_socket_path(&env, uid);
    SocketSpec::from_path(path)
        .map(|s| (s, AddrSource::Default))
        .map_err(|reason| AddrError::BadEnv {
            var: "XDG_RUNTIME_DIR or TMPDIR",
            value: String::new(),
            reason,
        })
}

/// Parses a file mode written in octal (`600`, `0600`, `0o600`). The mode must give the owner
/// read and write (connecting needs write permission) and have no bits above `0o777`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!(
            "{text:?} is not an octal file mode such as 0600 or 0660"
        ));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|e| format!("{text:?}: {e}"))?;
    check_mode(mode).map_err(|e| format!("{text}: {e}"))?;
    Ok(mode)
}

/// Checks a numeric socket file mode (see [`parse_mode`]).
pub fn check_mode(mode: u32) -> Result<(), String> {
    if mode > 0o777 {
        return Err(format!(
            "mode {mode:#o} has bits beyond 0777 (setuid, setgid, sticky); use permission bits only"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "mode {mode:04o} does not let the owner read and write the socket, so the broker's \
             own user could not connect; start from 0600"
        ));
    }
    Ok(())
}

/// How to create the socket file (ignored for abstract names and socket activation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindOptions {
    /// Mode of the socket file (see [`parse_mode`]).
    pub mode: u32,
    /// Group of the socket file and of a directory we create (chgrp); `None` keeps ours.
    pub gid: Option<u32>,
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions {
            mode: DEFAULT_SOCKET_MODE,
            gid: None,
        }
    }
}

/// Why the broker cannot listen where asked. Every message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    /// An environment variable holds an unusable address.
    #[error("{var}={value:?} is not a usable socket address: {reason}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The directory of the socket does not exist and its parent does not either.
    #[error(
        "cannot create socket directory {}: its parent does not exist; create it, or choose \
         another --socket", dir.display()
    )]
    DirParentMissing {
        /// The directory.
        dir: PathBuf,
    },
    /// The socket directory is a symlink or not a directory.
    #[error(
        "{} is not a directory (it may be a symlink, which the broker does not follow for its \
         socket directory); remove it by hand or choose another --socket", dir.display()
    )]
    DirNotDirectory {
        /// The path.
        dir: PathBuf,
    },
    /// The socket directory belongs to another user.
    #[error(
        "socket directory {} is owned by uid {owner} (mode {mode:04o}), not by this broker's \
         uid {uid}: another user could replace the socket; use a directory you own that is not \
         writable by group or others (e.g. remove {} so the broker recreates it), or choose \
         another --socket", dir.display(), dir.display()
    )]
    DirOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its mode.
        mode: u32,
        /// Our uid.
        uid: u32,
    },
    /// The socket directory is a shared one such as `/tmp`: sticky and writable by others.
    #[error(
        "socket directory {} is a shared directory (mode {mode:04o}: others may create files in \
         it; the sticky bit only stops them removing ours), so another user could create the \
         socket or its lock file first; use a private directory inside it instead, e.g. \
         --socket {}/bus.sock (the broker creates that directory with mode 0700)",
        dir.display(), private.display()
    )]
    DirShared {
        /// The directory.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
        /// A private directory inside it to suggest (`DIR/membus-UID`).
        private: PathBuf,
    },
    /// The socket directory is writable by group or others.
    #[error(
        "socket directory {} has mode {mode:04o}: group or others may write to it and could \
         replace the socket; run `chmod go-w {}` or choose another --socket",
        dir.display(), dir.display()
    )]
    DirWritable {
        /// The directory.
        dir: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// Another broker holds the lock file.
    #[error(
        "another broker ({}) is already serving {} (it holds the lock {}); stop it first, or \
         start this one with another --socket",
        pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}")),
        path.display(), lock.display()
    )]
    LockHeld {
        /// The socket path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The pid written in the lock file, if it could be read.
        pid: Option<u32>,
    },
    /// Something answered a connection on the socket though no one held the lock.
    #[error(
        "a broker is already listening on {} (it answered a connection but does not hold {}, so \
         it may be an older version); stop it first, or start this one with another --socket",
        path.display(), lock.display()
    )]
    LiveUnlocked {
        /// The socket path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Something that is not a socket is at the socket path.
    #[error(
        "{} exists and is {kind}, not a socket; the broker leaves it alone: remove it by hand if \
         it is not needed, or choose another --socket", path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What it is ("a regular file", "a directory", ...).
        kind: &'static str,
    },
    /// A socket of another kind (not SOCK_SEQPACKET) is live at the path.
    #[error(
        "{} is a live socket of another program (it refused a SOCK_SEQPACKET connection as the \
         wrong type); the broker leaves it alone: stop that program or choose another --socket",
        path.display()
    )]
    ForeignSocket {
        /// The path.
        path: PathBuf,
    },
    /// The abstract name is taken.
    #[error(
        "the abstract socket @{} is already in use (by another broker or another program); stop \
         it, or choose another --socket @NAME",
        String::from_utf8_lossy(name)
    )]
    AbstractInUse {
        /// The name.
        name: Vec<u8>,
    },
    /// The fd systemd passed is not what we need.
    #[error("socket activation: {0}; make the .socket unit use ListenSequentialPacket=")]
    Activation(String),
    /// A system call failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What we were doing ("bind", "create directory", ...).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> AddrError + 'a {
    move |e| AddrError::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// The address a [`Listener`] listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A socket file.
    Path(PathBuf),
    /// An abstract name.
    Abstract(Vec<u8>),
    /// An unnamed socket (possible only with socket activation).
    Unnamed,
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Path(p) => write!(f, "{}", p.display()),
            ListenAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            ListenAddr::Unnamed => f.write_str("(unnamed socket)"),
        }
    }
}

/// The lock file beside a socket file, locked with `flock(LOCK_EX)` for the broker's lifetime
/// and holding its pid. The lock goes with the fd: a killed broker releases it at once.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
    id: (u64, u64),
    /// Unlink the file on drop (false only to simulate a crash).
    remove_on_drop: bool,
}

impl LockFile {
    /// Takes the lock at `path` without waiting and writes our pid into it. `Ok(Err(pid))`
    /// means another process holds it (with the pid found in the file, if any).
    pub fn acquire(path: &Path) -> io::Result<Result<LockFile, Option<u32>>> {
        // Retry if the file we locked was unlinked or replaced between our open and flock (a
        // broker that exits unlinks its lock file while still holding it).
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags((OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
                .open(path)?;
            let stat = rustix::fs::fstat(&file)?;
            if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                return Err(io::Error::other(format!(
                    "lock file {} is not a regular file; remove it by hand",
                    path.display()
                )));
            }
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => {
                    let mut text = String::new();
                    let pid = file
                        .read_to_string(&mut text)
                        .ok()
                        .and_then(|_| text.trim().parse().ok());
                    return Ok(Err(pid));
                }
                Err(e) => return Err(e.into()),
            }
            let id = (stat.st_dev, stat.st_ino);
            match rustix::fs::stat(path) {
                Ok(now) if (now.st_dev, now.st_ino) == id => {}
                Ok(_) | Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            }
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            return Ok(Ok(LockFile {
                file,
                path: path.to_owned(),
                id,
                remove_on_drop: true,
            }));
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the lock file if it is still ours (we still hold the lock while doing so).
    fn remove(&self) {
        if let Ok(now) = rustix::fs::stat(&self.path)
            && (now.st_dev, now.st_ino) == self.id
        {
            let _ = rustix::fs::unlink(&self.path);
        }
    }
}

impl Drop for LockFile {
    /// Unlinks the lock file (if still ours) before the fd, and with it the lock, goes.
    fn drop(&mut self) {
        if self.remove_on_drop {
            self.remove();
        }
    }
}

impl AsFd for LockFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// A listening AF_UNIX SOCK_SEQPACKET socket (non-blocking, close-on-exec), with the lock file
/// that proves it is the only broker on its path. Dropping it (or [`Listener::cleanup`]) removes
/// the socket file (only if we created it and it is still our inode) and the lock file; with
/// socket activation nothing is removed.
///
/// ```no_run
/// use bus_broker::addr::{BindOptions, Listener, SocketSpec};
/// let spec = SocketSpec::parse("/run/user/1000/membus/bus.sock").unwrap();
/// let listener = match Listener::from_systemd(|k| std::env::var_os(k))? {
///     Some(activated) => activated,
///     None => Listener::bind(&spec, &BindOptions::default())?,
/// };
/// println!("listening on {}", listener.addr());
/// # Ok::<(), bus_broker::addr::AddrError>(())
/// ```
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    addr: ListenAddr,
    lock: Option<LockFile>,
    /// `(st_dev, st_ino)` of the socket file we created; `None` if we created none.
    socket_id: Option<(u64, u64)>,
    activated: bool,
}

impl Listener {
    /// Binds and listens at `spec` (see the [module docs](self) for the checks).
    pub fn bind(spec: &SocketSpec, opts: &BindOptions) -> Result<Listener, AddrError> {
        match spec {
            SocketSpec::Path(path) => bind_path(path, opts),
            SocketSpec::Abstract(name) => bind_abstract(name),
        }
    }

    /// Adopts the socket systemd passed if `LISTEN_PID` is our pid and `LISTEN_FDS` >= 1 (the
    /// first fd, 3, is used; more are logged and left alone). `Ok(None)`: not socket-activated.
    pub fn from_systemd(
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Option<Listener>, AddrError> {
        let Some(pid) = env("LISTEN_PID") else {
            return Ok(None);
        };
        let ours = std::process::id();
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(ours) {
            tracing::debug!(
                ?pid,
                ours,
                "LISTEN_PID is not our pid: not socket-activated"
            );
            return Ok(None);
        }
        let fds = env("LISTEN_FDS").unwrap_or_default();
        let count: u32 = fds
            .to_str()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| AddrError::Activation(format!("LISTEN_FDS={fds:?} is not a number")))?;
        if count == 0 {
            return Ok(None);
        }
        if count > 1 {
            tracing::warn!(count, "systemd passed {count} sockets; using only fd 3");
        }
        Listener::from_inherited_fd(LISTEN_FDS_START).map(Some)
    }

    /// Adopts an inherited listening socket by fd number (it must be an AF_UNIX SOCK_SEQPACKET
    /// socket in the listening state). The broker then takes a duplicate of it with
    /// `pidfd_getfd` on itself (safe Rust cannot take ownership of a raw fd number); the
    /// original number stays open, and no file is removed at exit.
    pub fn from_inherited_fd(raw: RawFd) -> Result<Listener, AddrError> {
        let activation = |what: String| AddrError::Activation(what);
        let pidfd = rustix::process::pidfd_open(
            rustix::process::getpid(),
            rustix::process::PidfdFlags::empty(),
        )
        .map_err(|e| activation(format!("pidfd_open on ourselves failed: {e}")))?;
        let fd =
            rustix::process::pidfd_getfd(&pidfd, raw, rustix::process::PidfdGetfdFlags::empty())
                .map_err(|e| match e {
                    Errno::BADF => activation(format!("fd {raw} is not open")),
                    e => activation(format!(
                        "cannot take fd {raw} (pidfd_getfd, Linux >= 5.6): {e}"
                    )),
                })?;
        let domain = rustix::net::sockopt::socket_domain(&fd)
            .map_err(|e| activation(format!("fd {raw} is not a socket ({e})")))?;
        if domain != AddressFamily::UNIX {
            return Err(activation(format!(
                "fd {raw} is not an AF_UNIX socket ({domain:?})"
            )));
        }
        let ty = rustix::net::sockopt::socket_type(&fd)
            .map_err(|e| activation(format!("SO_TYPE of fd {raw}: {e}")))?;
        if ty != SocketType::SEQPACKET {
            return Err(activation(format!(
                "fd {raw} is not a SOCK_SEQPACKET socket ({ty:?})"
            )));
        }
        let listening = rustix::net::sockopt::socket_acceptconn(&fd)
            .map_err(|e| activation(format!("SO_ACCEPTCONN of fd {raw}: {e}")))?;
        if !listening {
            return Err(activation(format!("fd {raw} is not listening")));
        }
        rustix::io::ioctl_fionbio(&fd, true)
            .map_err(|e| activation(format!("cannot make fd {raw} non-blocking: {e}")))?;
        let addr = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| SocketAddrUnix::try_from(a).ok())
            .map_or(ListenAddr::Unnamed, |a| {
                if let Some(path) = a.path_bytes().filter(|p| !p.is_empty()) {
                    ListenAddr::Path(PathBuf::from(OsStr::from_bytes(path)))
                } else if let Some(name) = a.abstract_name() {
                    ListenAddr::Abstract(name.to_vec())
                } else {
                    ListenAddr::Unnamed
                }
            });
        tracing::info!(fd = raw, %addr, "using the socket passed by systemd");
        Ok(Listener {
            fd,
            addr,
            lock: None,
            socket_id: None,
            activated: true,
        })
    }

    /// The address we listen on.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The lock file, for a socket file we bound ourselves.
    pub fn lock(&self) -> Option<&LockFile> {
        self.lock.as_ref()
    }

    /// Whether the socket came from systemd.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Accepts one connection (non-blocking, close-on-exec). `Ok(None)`: none pending. For the
    /// readiness-based driver; the io_uring loop uses multishot accept on [`AsFd::as_fd`].
    pub fn accept(&self) -> io::Result<Option<OwnedFd>> {
        match rustix::net::accept_with(&self.fd, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the socket file (if we created it and it is still our inode) and the lock file.
    /// Idempotent; also done on drop. The socket stays open (close it by dropping).
    pub fn cleanup(&mut self) {
        if let (Some(id), ListenAddr::Path(path)) = (self.socket_id.take(), &self.addr)
            && let Ok(now) = rustix::fs::lstat(path)
            && (now.st_dev, now.st_ino) == id
        {
            let _ = rustix::fs::unlink(path);
        }
        // Dropping the lock unlinks its file, then closes it (releasing the lock).
        drop(self.lock.take());
    }

    /// Closes the socket and releases the lock but leaves both files on disk, as a crashed
    /// broker would (for tests and fault injection).
    pub fn close_without_cleanup(mut self) {
        self.socket_id = None;
        if let Some(lock) = &mut self.lock {
            lock.remove_on_drop = false;
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn seqpacket_socket(flags: SocketFlags) -> Result<OwnedFd, Errno> {
    rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)
}

/// How long binding an abstract name waits for the kernel to release it after its previous
/// owner is gone (see `abstract_owner_gone`).
pub const ABSTRACT_RELEASE_WAIT: Duration = Duration::from_millis(500);

fn bind_abstract(name: &[u8]) -> Result<Listener, AddrError> {
    let shown = PathBuf::from(format!("@{}", String::from_utf8_lossy(name)));
    let addr = SocketAddrUnix::new_abstract_name(name).map_err(io_err("address", &shown))?;
    let give_up = Instant::now() + ABSTRACT_RELEASE_WAIT;
    let fd = loop {
        let fd = seqpacket_socket(SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
            .map_err(io_err("create a socket for", &shown))?;
        match rustix::net::bind(&fd, &addr) {
            Ok(()) => break fd,
            Err(Errno::ADDRINUSE) => {
                if Instant::now() < give_up && abstract_owner_gone(&addr, give_up) {
                    tracing::debug!(
                        socket = %shown.display(),
                        "the previous owner of the name is gone: binding again"
                    );
                    continue;
                }
                return Err(AddrError::AbstractInUse {
                    name: name.to_vec(),
                });
            }
            Err(e) => return Err(io_err("bind", &shown)(e)),
        }
    };
    rustix::net::listen(&fd, LISTEN_BACKLOG).map_err(io_err("listen on", &shown))?;
    tracing::warn!(
        socket = %shown.display(),
        "listening on an abstract socket: file permissions do not protect it; any process in \
         this network namespace can connect, and only credentials and the policy gate it"
    );
    Ok(Listener {
        fd,
        addr: ListenAddr::Abstract(name.to_vec()),
        lock: None,
        socket_id: None,
        activated: false,
    })
}

/// Whether the socket holding the abstract name `addr` has provably lost its owner. A broker
/// that ran on io_uring and exited leaves its listening socket bound for a few milliseconds:
/// the kernel tears the dead process's ring down in a worker, and until then the ring's accept
/// op holds the socket, which still queues connections (so a connection probe alone cannot
/// tell it from a live broker). We connect and say HELLO: a live broker accepts and answers
/// (WELCOME or ERROR), any other live program answers or keeps the connection; the departed
/// socket never accepts, and when the kernel releases it, it resets the queued connection.
/// True on that reset (or a refused connect: bound but not listening); false on any answer,
/// or on nothing before `deadline`.
fn abstract_owner_gone(addr: &SocketAddrUnix, deadline: Instant) -> bool {
    let Ok(fd) = seqpacket_socket(SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) else {
        return false;
    };
    match rustix::net::connect(&fd, addr) {
        Ok(()) => {}
        Err(Errno::CONNREFUSED) => return true,
        Err(_) => return false,
    }
    let mut hello = Vec::new();
    let encoded = Frame::new(
        1,
        Msg::Hello(Hello {
            protocol_version: u16::from(PROTOCOL_VERSION),
            transport: Transport::Datagram,
            client_name: "bus-broker start-up probe",
        }),
    )
    .encode(&mut hello);
    if encoded.is_err() {
        return false;
    }
    match rustix::net::send(&fd, &hello, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
        Ok(_) => {}
        Err(Errno::PIPE | Errno::CONNRESET) => return true,
        Err(_) => return false,
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match bus_core::wake::wait_readable(fd.as_fd(), Some(left)) {
            Ok(true) => {}
            Ok(false) | Err(_) => return false,
        }
        let mut buf = [0u8; 64];
        return match rustix::net::recv(&fd, &mut buf, RecvFlags::DONTWAIT) {
            // An answer: someone lives there.
            Ok((n, _)) if n > 0 => false,
            // Reset (or closed) without a word: the socket went away with our connection queued.
            Ok(_) | Err(Errno::CONNRESET) => true,
            Err(Errno::AGAIN | Errno::INTR) => continue,
            Err(_) => false,
        };
    }
}

fn file_kind(ty: FileType) -> &'static str {
    match ty {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a file of unknown type",
    }
}

/// Creates the socket directory if needed and checks that it is safe to put a socket in.
fn prepare_dir(dir: &Path, opts: &BindOptions) -> Result<(), AddrError> {
    let mode = if opts.gid.is_some() { 0o750 } else { 0o700 };
    let created = match rustix::fs::mkdir(dir, Mode::from_raw_mode(mode)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(Errno::NOENT) => {
            return Err(AddrError::DirParentMissing {
                dir: dir.to_owned(),
            });
        }
        Err(e) => return Err(io_err("create socket directory", dir)(e)),
    };
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR | Errno::LOOP => AddrError::DirNotDirectory {
            dir: dir.to_owned(),
        },
        e => io_err("open socket directory", dir)(e),
    })?;
    if created {
        // mkdir's mode is filtered by the umask: set it exactly.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(io_err("chmod socket directory", dir))?;
        if let Some(gid) = opts.gid {
            rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(io_err(
                "chgrp socket directory (is the broker in that group?)",
                dir,
            ))?;
        }
        tracing::info!(
            dir = %dir.display(),
            mode = format_args!("{mode:04o}"),
            "created socket directory"
        );
    }
    let stat = rustix::fs::fstat(&fd).map_err(io_err("stat socket directory", dir))?;
    let uid = rustix::process::geteuid().as_raw();
    let dir_mode = stat.st_mode & 0o7777;
    if dir_mode & 0o1000 != 0 && dir_mode & 0o022 != 0 {
        // /tmp and the like: `chmod go-w` is not the fix (they are shared on purpose), a
        // private directory inside them is (the default path's fallback does the same).
        return Err(AddrError::DirShared {
            dir: dir.to_owned(),
            mode: dir_mode,
            private: dir.join(format!("membus-{uid}")),
        });
    }
    if stat.st_uid != uid {
        return Err(AddrError::DirOwner {
            dir: dir.to_owned(),
            owner: stat.st_uid,
            mode: dir_mode,
            uid,
        });
    }
    if dir_mode & 0o022 != 0 {
        return Err(AddrError::DirWritable {
            dir: dir.to_owned(),
            mode: dir_mode,
        });
    }
    if let Some(gid) = opts.gid
        && !created
        && (stat.st_gid != gid || dir_mode & 0o010 == 0)
    {
        tracing::warn!(
            dir = %dir.display(),
            "members of group {gid} cannot reach the socket: the directory has group {} and mode \
             {dir_mode:04o}; run `chgrp {gid} {} && chmod 0750 {}`",
            stat.st_gid, dir.display(), dir.display()
        );
    }
    Ok(())
}

enum Probe {
    Live,
    Stale,
    Foreign,
}

/// Connects to an existing socket file to tell a live broker from a stale file.
fn probe(path: &Path, addr: &SocketAddrUnix) -> Result<Probe, AddrError> {
    // Non-blocking: a live broker with a full backlog answers EAGAIN instead of making us wait.
    let fd = seqpacket_socket(SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
        .map_err(io_err("create a socket to probe", path))?;
    match rustix::net::connect(&fd, addr) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INPROGRESS) => Ok(Probe::Live),
        Err(Errno::CONNREFUSED) => Ok(Probe::Stale),
        Err(Errno::PROTOTYPE) => Ok(Probe::Foreign),
        Err(e) => Err(io_err("probe the existing socket", path)(e)),
    }
}

fn bind_path(path: &Path, opts: &BindOptions) -> Result<Listener, AddrError> {
    check_mode(opts.mode).map_err(|reason| AddrError::Io {
        op: "use the socket mode for",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, reason),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    prepare_dir(dir, opts)?;

    let mut lock_name = path.file_name().unwrap_or_default().to_owned();
    lock_name.push(LOCK_SUFFIX);
    let lock_path = dir.join(lock_name);
    let lock = match LockFile::acquire(&lock_path) {
        Ok(Ok(lock)) => lock,
        Ok(Err(pid)) => {
            return Err(AddrError::LockHeld {
                path: path.to_owned(),
                lock: lock_path,
                pid,
            });
        }
        Err(source) => {
            return Err(AddrError::Io {
                op: "lock",
                path: lock_path,
                source,
            });
        }
    };
    let addr = SocketAddrUnix::new(path).map_err(io_err("address", path))?;

    match rustix::fs::lstat(path) {
        Err(Errno::NOENT) => {}
        Err(e) => return Err(io_err("stat", path)(e)),
        Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
            FileType::Socket => match probe(path, &addr)? {
                Probe::Live => {
                    return Err(AddrError::LiveUnlocked {
                        path: path.to_owned(),
                        lock: lock_path,
                    });
                }
                Probe::Foreign => {
                    return Err(AddrError::ForeignSocket {
                        path: path.to_owned(),
                    });
                }
                Probe::Stale => {
                    rustix::fs::unlink(path).map_err(io_err("remove stale socket", path))?;
                    tracing::info!(
                        socket = %path.display(),
                        "removed stale socket (no broker answered)"
                    );
                }
            },
            other => {
                return Err(AddrError::NotASocket {
                    path: path.to_owned(),
                    kind: file_kind(other),
                });
            }
        },
    }

    let fd = seqpacket_socket(SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
        .map_err(io_err("create a socket for", path))?;
    rustix::net::bind(&fd, &addr).map_err(io_err("bind", path))?;
    // From here on, dropping `listener` on an error removes the socket file and the lock.
    let mut listener = Listener {
        fd,
        addr: ListenAddr::Path(path.to_owned()),
        lock: Some(lock),
        socket_id: None,
        activated: false,
    };
    let stat = rustix::fs::lstat(path).map_err(io_err("stat", path))?;
    listener.socket_id = Some((stat.st_dev, stat.st_ino));
    rustix::fs::chmod(path, Mode::from_raw_mode(opts.mode)).map_err(io_err("chmod", path))?;
    if let Some(gid) = opts.gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(io_err("chgrp (is the broker in that group?)", path))?;
    }
    rustix::net::listen(&listener.fd, LISTEN_BACKLOG).map_err(io_err("listen on", path))?;
    tracing::info!(
        socket = %path.display(),
        mode = format_args!("{:04o}", opts.mode),
        gid = opts.gid,
        "listening"
    );
    Ok(listener)
}

/// Credentials of the process at the other end of a connected AF_UNIX socket, as the kernel
/// recorded them at `connect` (SO_PEERCRED). Never trust an identity claimed in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id (in the broker's pid namespace; 0 if the peer is in an unrelated one).
    pub pid: u32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// SO_PEERCRED of a connected socket.
pub fn peer_credentials(fd: impl AsFd) -> io::Result<PeerCredentials> {
    let cred = rustix::net::sockopt::socket_peercred(fd)?;
    Ok(PeerCredentials {
        pid: u32::try_from(cred.pid.as_raw_nonzero().get()).unwrap_or(0),
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn default_path_with_xdg_runtime_dir() {
        let env = env_of(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("TMPDIR", "/var/tmp"),
        ]);
        assert_eq!(
            default_socket_path(env, 1000),
            Path::new("/run/user/1000/membus/bus.sock")
        );
    }

    #[test]
    fn default_path_without_xdg_runtime_dir() {
        assert_eq!(
            default_socket_path(env_of(&[]), 1000),
            Path::new("/tmp/membus-1000/bus.sock")
        );
        let env = env_of(&[("TMPDIR", "/var/tmp")]);
        assert_eq!(
            default_socket_path(env, 0),
            Path::new("/var/tmp/membus-0/bus.sock")
        );
        // Empty and relative values are ignored.
        let env = env_of(&[("XDG_RUNTIME_DIR", ""), ("TMPDIR", "relative/tmp")]);
        assert_eq!(
            default_socket_path(env, 7),
            Path::new("/tmp/membus-7/bus.sock")
        );
        let env = env_of(&[("XDG_RUNTIME_DIR", "run/user/1"), ("TMPDIR", "/t")]);
        assert_eq!(
            default_socket_path(env, 7),
            Path::new("/t/membus-7/bus.sock")
        );
    }

    #[test]
    fn socket_spec_parsing() {
        assert_eq!(
            SocketSpec::parse("@x").unwrap(),
            SocketSpec::Abstract(b"x".to_vec())
        );
        assert_eq!(
            SocketSpec::parse("a/b.sock").unwrap(),
            SocketSpec::Path("a/b.sock".into())
        );
        assert_eq!(SocketSpec::parse("@x").unwrap().to_string(), "@x");
        assert!(SocketSpec::parse("@").is_err());
        assert!(SocketSpec::parse("").is_err());
        assert!(SocketSpec::parse("/tmp/dir/").is_err());
        assert!(SocketSpec::parse("/tmp/..").is_err());
        assert!(SocketSpec::parse(format!("/{}", "a".repeat(106))).is_ok());
        let long = SocketSpec::parse(format!("/{}", "a".repeat(107))).unwrap_err();
        assert!(long.contains("108 bytes long"), "{long}");
        assert!(SocketSpec::parse(format!("@{}", "a".repeat(107))).is_ok());
        assert!(SocketSpec::parse(format!("@{}", "a".repeat(108))).is_err());
    }

    #[test]
    fn resolution_order() {
        let flag = SocketSpec::parse("/flag.sock").unwrap();
        let conf = SocketSpec::parse("/conf.sock").unwrap();
        let file = Path::new("/etc/membus/broker.toml");
        let env = env_of(&[(SOCKET_ENV, "@env"), ("XDG_RUNTIME_DIR", "/run/user/5")]);
        let r = resolve_socket(Some(&flag), &env, Some((&conf, file)), 5).unwrap();
        assert_eq!(r, (flag.clone(), AddrSource::Flag));
        let r = resolve_socket(None, &env, Some((&conf, file)), 5).unwrap();
        assert_eq!(r, (SocketSpec::Abstract(b"env".to_vec()), AddrSource::Env));
        let env = env_of(&[(SOCKET_ENV, ""), ("XDG_RUNTIME_DIR", "/run/user/5")]);
        let r = resolve_socket(None, &env, Some((&conf, file)), 5).unwrap();
        assert_eq!(r, (conf, AddrSource::Config(file.to_owned())));
        let r = resolve_socket(None, &env, None, 5).unwrap();
        assert_eq!(r.0, SocketSpec::Path("/run/user/5/membus/bus.sock".into()));
        assert_eq!(r.1, AddrSource::Default);
        let bad = env_of(&[(SOCKET_ENV, "@")]);
        let e = resolve_socket(None, bad, None, 5).unwrap_err();
        assert!(e.to_string().starts_with("MEMBUS_SOCKET=\"@\""), "{e}");
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o666"), Ok(0o666));
        for bad in [
            "", "0o", "68", "rw", "-600", "4600", "01777", "400", "0200", "0060",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_mode("0400")
                .unwrap_err()
                .contains("owner read and write")
        );
    }

    #[test]
    fn lock_file_is_exclusive_and_holds_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = LockFile::acquire(&path).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert_eq!(
            LockFile::acquire(&path).unwrap().unwrap_err(),
            Some(std::process::id())
        );
        drop(first);
        assert!(!path.exists(), "removed on drop");
        let again = LockFile::acquire(&path).unwrap().unwrap();
        assert_eq!(again.path(), path);
    }

    #[test]
    fn adopt_inherited_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("act.sock");
        let fd = seqpacket_socket(SocketFlags::CLOEXEC).unwrap();
        rustix::net::bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        let e = Listener::from_inherited_fd(fd.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("is not listening"), "{e}");
        rustix::net::listen(&fd, 8).unwrap();
        let listener = Listener::from_inherited_fd(fd.as_raw_fd()).unwrap();
        assert!(listener.is_activated());
        assert_eq!(listener.addr(), &ListenAddr::Path(path.clone()));
        drop(listener);
        assert!(path.exists(), "an activated socket's file is never removed");
    }

    #[test]
    fn adopt_rejects_wrong_sockets() {
        let stream = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        let e = Listener::from_inherited_fd(stream.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a SOCK_SEQPACKET"), "{e}");
        let udp = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None).unwrap();
        let e = Listener::from_inherited_fd(udp.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not an AF_UNIX"), "{e}");
        let file = File::open("/proc/self/status").unwrap();
        let e = Listener::from_inherited_fd(file.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let e = Listener::from_inherited_fd(1_000_000).unwrap_err();
        assert!(e.to_string().contains("not open"), "{e}");
    }

    #[test]
    fn systemd_env_handling() {
        assert!(Listener::from_systemd(env_of(&[])).unwrap().is_none());
        let other = env_of(&[("LISTEN_PID", "1"), ("LISTEN_FDS", "1")]);
        assert!(Listener::from_systemd(other).unwrap().is_none());
        let pid = std::process::id().to_string();
        let zero = env_of(&[("LISTEN_PID", &pid), ("LISTEN_FDS", "0")]);
        assert!(Listener::from_systemd(zero).unwrap().is_none());
        let junk = env_of(&[("LISTEN_PID", &pid), ("LISTEN_FDS", "x")]);
        assert!(
            Listener::from_systemd(junk)
                .unwrap_err()
                .to_string()
                .contains("LISTEN_FDS")
        );
    }
}
