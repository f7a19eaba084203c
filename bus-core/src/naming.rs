//! Names both sides must agree on: where the broker listens by default, how a socket address
//! is written (`PATH` or `@NAME`), and what a topic name may look like.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::limits::MAX_TOPIC_BYTES;

/// Environment variable naming the broker socket (a path or `@NAME`).
pub const SOCKET_ENV: &str = "MEMBUS_SOCKET";
/// Longest socket path or abstract name, in bytes (`sun_path` is 108 bytes; a path needs a NUL,
/// an abstract name its leading NUL).
pub const MAX_SOCKET_ADDR_BYTES: usize = 107;

/// Where to listen: a socket file, or a name in the abstract namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SocketSpec {
    /// A socket file.
    Path(PathBuf),
    /// An abstract name (written `@NAME`; stored without the `@`).
    Abstract(Vec<u8>),
}

impl SocketSpec {
    /// Parses `PATH` or `@NAME`.
    ///
    /// ```
    /// use bus_core::naming::SocketSpec;
    /// assert_eq!(SocketSpec::parse("@bus").unwrap(), SocketSpec::Abstract(b"bus".to_vec()));
    /// assert!(matches!(SocketSpec::parse("/run/membus/bus.sock").unwrap(), SocketSpec::Path(_)));
    /// ```
    pub fn parse(text: impl AsRef<OsStr>) -> Result<SocketSpec, String> {
        let text = text.as_ref();
        let bytes = text.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            if name.is_empty() {
                return Err("an abstract socket name after '@' may not be empty".into());
            }
            if name.len() > MAX_SOCKET_ADDR_BYTES {
                return Err(format!(
                    "the abstract name is {} bytes long; the limit is {MAX_SOCKET_ADDR_BYTES}",
                    name.len()
                ));
            }
            if name.contains(&0) {
                return Err("an abstract socket name may not contain NUL bytes".into());
            }
            return Ok(SocketSpec::Abstract(name.to_vec()));
        }
        SocketSpec::from_path(PathBuf::from(text))
    }

    /// Checks that `path` can be a socket file path.
    pub fn from_path(path: PathBuf) -> Result<SocketSpec, String> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err("the socket path may not be empty".into());
        }
        if bytes.contains(&0) {
            return Err("the socket path may not contain NUL bytes".into());
        }
        if bytes.len() > MAX_SOCKET_ADDR_BYTES {
            return Err(format!(
                "the socket path {} is {} bytes long; AF_UNIX allows at most \
                 {MAX_SOCKET_ADDR_BYTES}: choose a shorter path",
                path.display(),
                bytes.len()
            ));
        }
        if bytes.ends_with(b"/") || path.file_name().is_none() {
            return Err(format!(
                "the socket path {} does not name a file",
                path.display()
            ));
        }
        Ok(SocketSpec::Path(path))
    }
}

impl fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketSpec::Path(p) => write!(f, "{}", p.display()),
            SocketSpec::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// The default socket path for `uid`: `$XDG_RUNTIME_DIR/membus/bus.sock`, or, without a usable
/// `XDG_RUNTIME_DIR`, `$TMPDIR/membus-$UID/bus.sock` (`/tmp` without a usable `TMPDIR`). Unset,
/// empty and relative values count as unset (the XDG base-directory spec says to ignore relative
/// paths). `env` is injected so that tests need not touch the process environment.
///
/// ```
/// use bus_core::naming::default_socket_path;
/// use std::path::Path;
/// let env = |k: &str| (k == "XDG_RUNTIME_DIR").then(|| "/run/user/1000".into());
/// assert_eq!(default_socket_path(env, 1000), Path::new("/run/user/1000/membus/bus.sock"));
/// assert_eq!(default_socket_path(|_| None, 1000), Path::new("/tmp/membus-1000/bus.sock"));
/// ```
pub fn default_socket_path(env: impl Fn(&str) -> Option<OsString>, uid: u32) -> PathBuf {
    let usable = |key: &str| {
        env(key)
            .filter(|v| !v.is_empty() && Path::new(v).is_absolute())
            .map(PathBuf::from)
    };
    match usable("XDG_RUNTIME_DIR") {
        Some(runtime) => runtime.join("membus").join("bus.sock"),
        None => usable("TMPDIR")
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(format!("membus-{uid}"))
            .join("bus.sock"),
    }
}

/// Why a string is not a topic name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicNameError {
    /// The empty string.
    #[error("a topic name may not be empty")]
    Empty,
    /// Longer than [`MAX_TOPIC_BYTES`].
    #[error("the topic name is {len} bytes long; the limit is {MAX_TOPIC_BYTES} bytes")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// A leading, trailing or doubled dot.
    #[error(
        "the topic name has an empty segment at byte {offset}: segments are separated by single \
         dots, with no dot at either end"
    )]
    EmptySegment {
        /// Byte offset where the empty segment starts.
        offset: usize,
    },
    /// A character outside `[A-Za-z0-9_-]` (and not a separating dot).
    #[error(
        "the topic name has {ch:?} at byte {offset}; segments may contain only A-Z, a-z, 0-9, \
         '_' and '-'"
    )]
    BadChar {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        offset: usize,
    },
}

/// Checks that `name` is a topic name: 1 to 255 bytes, segments of `[A-Za-z0-9_-]` separated by single dots.
///
/// ```
/// use bus_core::naming::validate_topic;
/// assert!(validate_topic("sensors.imu-0").is_ok());
/// assert!(validate_topic("sensors..imu").is_err());
/// ```
pub fn validate_topic(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if name.len() > MAX_TOPIC_BYTES {
        return Err(TopicNameError::TooLong { len: name.len() });
    }
    let mut segment_start = 0;
    for (offset, ch) in name.char_indices() {
        if ch == '.' {
            if offset == segment_start {
                return Err(TopicNameError::EmptySegment { offset });
            }
            segment_start = offset + 1;
        } else if !(ch.is_ascii_alphanumeric() || ch == '_' || ch == '-') {
            return Err(TopicNameError::BadChar { ch, offset });
        }
    }
    if segment_start == name.len() {
        return Err(TopicNameError::EmptySegment { offset: name.len() });
    }
    Ok(())
}
