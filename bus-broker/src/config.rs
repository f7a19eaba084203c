//! The broker's config file, and merging it with the command line and the environment into the
//! [`Settings`] the broker runs with.
//!
//! Every key is optional; without a file the broker runs on defaults.
//!
//! ```toml
//! socket = "/run/membus/bus.sock"   # or "@name"; a relative path is relative to this file
//! mode = "0660"                     # socket file mode, octal, as a string
//! group = "robots"                  # or a numeric gid
//! policy = "policy.toml"            # relative to this file
//! log = "info"                      # or directives such as "info,bus_broker::policy=debug"
//!
//! [limits]                          # any field of bus_broker::limits::Limits
//! max_clients = 1024
//!
//! [[topic]]                         # declared topics: their settings win over a client's
//! name = "sensors.imu"
//! mode = "lossy"                    # "reliable" (default) or "lossy"
//! ring_bytes = 1048576              # power of two, >= 4096, <= limits.max_ring_bytes
//! max_message_bytes = 4096          # <= ring_bytes / 2 - 32 (the default)
//! stall_timeout_ms = 500            # reliable topics only; default limits.stall_timeout_ms
//! ```
//!
//! Precedence, for each setting: command-line flag, then environment (`MEMBUS_SOCKET`,
//! `MEMBUS_LOG`), then this file, then the default.
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use crate::limits::Limits;
use bus_core::layout::{MAX_DATA_BYTES, MIN_DATA_BYTES, Mode, max_message_bytes_for};
use serde::Deserialize;
use toml::Spanned;

use crate::addr::{
    AddrError, AddrSource, BindOptions, DEFAULT_GROUP_SOCKET_MODE, DEFAULT_SOCKET_MODE, SocketSpec,
    parse_mode, resolve_socket,
};
use crate::cli::Args;
use crate::log::{DEFAULT_LOG, LOG_ENV, LogError};
use crate::policy::{GroupSpec, UserDb, UserDbError, UserDbPaths, validate_topic};
use crate::toml_util::{IdOrName, position, toml_error_in};

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid config.
    #[error("{}:{line}:{column}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// A topic declared in the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDecl {
    /// Its name (a valid topic name).
    pub name: String,
    /// Delivery mode (default reliable).
    pub mode: Mode,
    /// Ring data size in bytes: a power of two, `MIN_DATA_BYTES..=limits.max_ring_bytes`
    /// (default `limits.default_ring_bytes`).
    pub ring_bytes: u64,
    /// Largest message, `1..=max_message_bytes_for(ring_bytes)` (the default).
    pub max_message_bytes: u32,
    /// Stall limit of reliable subscribers, in ms (default `limits.stall_timeout_ms`).
    pub stall_timeout_ms: u32,
}

/// A parsed and validated config file. [`Config::default`] is "no file".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The file it came from.
    pub path: Option<PathBuf>,
    /// `socket` (a relative path is resolved against the file's directory).
    pub socket: Option<SocketSpec>,
    /// `mode`.
    pub mode: Option<u32>,
    /// `group`.
    pub group: Option<GroupSpec>,
    /// `policy` (a relative path is resolved against the file's directory).
    pub policy: Option<PathBuf>,
    /// `log`.
    pub log: Option<String>,
    /// `[limits]` over [`Limits::default`].
    pub limits: Limits,
    /// `[[topic]]`, in file order.
    pub topics: Vec<TopicDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    socket: Option<Spanned<String>>,
    mode: Option<Spanned<IdOrName>>,
    group: Option<Spanned<IdOrName>>,
    policy: Option<Spanned<String>>,
    log: Option<Spanned<String>>,
    limits: Option<LimitsFile>,
    #[serde(default)]
    topic: Vec<Spanned<TopicFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_clients: Option<Spanned<u32>>,
    max_topics: Option<Spanned<u32>>,
    max_publishers_per_topic: Option<Spanned<u32>>,
    max_subscribers_per_topic: Option<Spanned<u32>>,
    default_ring_bytes: Option<Spanned<u64>>,
    max_ring_bytes: Option<Spanned<u64>>,
    max_queued_replies: Option<Spanned<u32>>,
    handshake_timeout_ms: Option<Spanned<u32>>,
    stall_timeout_ms: Option<Spanned<u32>>,
    max_fds_per_client: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeFile {
    Reliable,
    Lossy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicFile {
    name: Spanned<String>,
    mode: Option<ModeFile>,
    ring_bytes: Option<Spanned<u64>>,
    max_message_bytes: Option<Spanned<u32>>,
    stall_timeout_ms: Option<Spanned<u32>>,
}

type Located = (usize, String);

/// Sets `slot` from `value`, remembering where `name` was written.
fn set<T: Copy>(
    slot: &mut T,
    value: Option<Spanned<T>>,
    name: &'static str,
    at: &mut HashMap<&'static str, usize>,
) {
    if let Some(v) = value {
        at.insert(name, v.span().start);
        *slot = *v.get_ref();
    }
}

fn ring_size_error(value: u64, max: u64, max_name: &str) -> Option<String> {
    if !value.is_power_of_two() || value < MIN_DATA_BYTES as u64 || value > max {
        Some(format!(
            "{value} is not a power of two between {MIN_DATA_BYTES} and {max} ({max_name}); \
             e.g. 65536 or 1048576"
        ))
    } else {
        None
    }
}

/// Smallest per-client descriptor quota: room for a datagram subscription (4) and a ring.
pub const MIN_FDS_PER_CLIENT: u32 = 8;

fn apply_limits(file: Option<LimitsFile>) -> Result<Limits, Located> {
    let mut limits = Limits::default();
    let Some(file) = file else { return Ok(limits) };
    let mut at = HashMap::new();
    // Exhaustive on purpose: a new field in bus-core's `Limits` fails to compile here until the
    // config file learns it.
    let Limits {
        max_clients,
        max_topics,
        max_publishers_per_topic,
        max_subscribers_per_topic,
        default_ring_bytes,
        max_ring_bytes,
        max_queued_replies,
        handshake_timeout_ms,
        stall_timeout_ms,
        max_fds_per_client,
    } = &mut limits;
    set(max_clients, file.max_clients, "max_clients", &mut at);
    set(max_topics, file.max_topics, "max_topics", &mut at);
    set(
        max_publishers_per_topic,
        file.max_publishers_per_topic,
        "max_publishers_per_topic",
        &mut at,
    );
    set(
        max_subscribers_per_topic,
        file.max_subscribers_per_topic,
        "max_subscribers_per_topic",
        &mut at,
    );
    set(
        default_ring_bytes,
        file.default_ring_bytes,
        "default_ring_bytes",
        &mut at,
    );
    set(
        max_ring_bytes,
        file.max_ring_bytes,
        "max_ring_bytes",
        &mut at,
    );
    set(
        max_queued_replies,
        file.max_queued_replies,
        "max_queued_replies",
        &mut at,
    );
    set(
        handshake_timeout_ms,
        file.handshake_timeout_ms,
        "handshake_timeout_ms",
        &mut at,
    );
    set(
        stall_timeout_ms,
        file.stall_timeout_ms,
        "stall_timeout_ms",
        &mut at,
    );
    set(
        max_fds_per_client,
        file.max_fds_per_client,
        "max_fds_per_client",
        &mut at,
    );

    let slots = bus_core::layout::CURSOR_SLOTS as u32;
    let readers = bus_core::ring::MAX_READERS_PER_RING as u32;
    let checks: [(&'static str, Option<String>); 10] = [
        (
            "max_clients",
            (*max_clients == 0).then(|| "must be at least 1".into()),
        ),
        (
            "max_topics",
            (*max_topics == 0).then(|| "must be at least 1".into()),
        ),
        (
            "max_publishers_per_topic",
            (*max_publishers_per_topic == 0 || *max_publishers_per_topic > slots)
                .then(|| format!("must be 1..={slots} (the cursor slots of a cursor page)")),
        ),
        (
            "max_subscribers_per_topic",
            (*max_subscribers_per_topic == 0 || *max_subscribers_per_topic > readers).then(|| {
                format!(
                    "must be 1..={readers} (a ring's writer tracks at most {readers} readers; \
                     more would silently lose reliable delivery)"
                )
            }),
        ),
        (
            "max_ring_bytes",
            ring_size_error(
                *max_ring_bytes,
                MAX_DATA_BYTES as u64,
                "the layout's maximum",
            ),
        ),
        (
            "default_ring_bytes",
            ring_size_error(*default_ring_bytes, *max_ring_bytes, "max_ring_bytes"),
        ),
        (
            "max_queued_replies",
            (*max_queued_replies == 0).then(|| "must be at least 1".into()),
        ),
        (
            "handshake_timeout_ms",
            (*handshake_timeout_ms == 0).then(|| "must be at least 1".into()),
        ),
        (
            "stall_timeout_ms",
            (*stall_timeout_ms == 0).then(|| "must be at least 1".into()),
        ),
        (
            "max_fds_per_client",
            (*max_fds_per_client < MIN_FDS_PER_CLIENT).then(|| {
                format!(
                    "must be at least {MIN_FDS_PER_CLIENT} (one datagram subscription holds 4 \
                     descriptors)"
                )
            }),
        ),
    ];
    for (name, problem) in checks {
        if let Some(problem) = problem {
            // A default can only be wrong against a value the file set (default_ring_bytes
            // against a smaller max_ring_bytes): point at whichever the file wrote.
            let offset = at
                .get(name)
                .or_else(|| at.get("max_ring_bytes"))
                .copied()
                .unwrap_or(0);
            return Err((offset, format!("limits.{name}: {problem}")));
        }
    }
    Ok(limits)
}

fn topic_decl(spanned: Spanned<TopicFile>, limits: &Limits) -> Result<TopicDecl, Located> {
    let t = spanned.into_inner();
    let name_at = t.name.span().start;
    let name = t.name.into_inner();
    validate_topic(&name).map_err(|e| (name_at, format!("topic {name:?}: {e}")))?;
    let mode = match t.mode {
        None | Some(ModeFile::Reliable) => Mode::Reliable,
        Some(ModeFile::Lossy) => Mode::Lossy,
    };
    let ring_bytes = match t.ring_bytes {
        None => limits.default_ring_bytes,
        Some(v) => {
            if let Some(problem) =
                ring_size_error(*v.get_ref(), limits.max_ring_bytes, "limits.max_ring_bytes")
            {
                return Err((
                    v.span().start,
                    format!("topic {name}: ring_bytes {problem}"),
                ));
            }
            *v.get_ref()
        }
    };
    let largest = u32::try_from(max_message_bytes_for(ring_bytes as usize)).unwrap_or(u32::MAX);
    let max_message_bytes = match t.max_message_bytes {
        None => largest,
        Some(v) if *v.get_ref() == 0 || *v.get_ref() > largest => {
            return Err((
                v.span().start,
                format!(
                    "topic {name}: max_message_bytes must be 1..={largest} for ring_bytes \
                     {ring_bytes} (a record may take at most half the ring); raise ring_bytes or \
                     lower max_message_bytes"
                ),
            ));
        }
        Some(v) => *v.get_ref(),
    };
    let stall_timeout_ms = match t.stall_timeout_ms {
        None => limits.stall_timeout_ms,
        Some(v) if mode == Mode::Lossy => {
            return Err((
                v.span().start,
                format!(
                    "topic {name}: stall_timeout_ms applies only to reliable topics (a lossy \
                     writer never waits); remove it"
                ),
            ));
        }
        Some(v) if *v.get_ref() == 0 => {
            return Err((
                v.span().start,
                format!("topic {name}: stall_timeout_ms must be at least 1"),
            ));
        }
        Some(v) => *v.get_ref(),
    };
    Ok(TopicDecl {
        name,
        mode,
        ring_bytes,
        max_message_bytes,
        stall_timeout_ms,
    })
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text; `path` is used in messages and to resolve relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |(offset, reason): Located| {
            let (line, column) = position(text, offset);
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                reason,
            }
        };
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| invalid(toml_error_in(text, &e)))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let relative = |p: &str| {
            if Path::new(p).is_absolute() {
                PathBuf::from(p)
            } else {
                base.join(p)
            }
        };

        let socket = match file.socket {
            None => None,
            Some(s) => {
                let text = s.get_ref();
                let spec = if text.starts_with('@') {
                    SocketSpec::parse(text)
                } else {
                    SocketSpec::from_path(relative(text))
                };
                Some(spec.map_err(|e| invalid((s.span().start, format!("socket: {e}"))))?)
            }
        };
        let mode = match file.mode {
            None => None,
            Some(m) => {
                let at = m.span().start;
                Some(match m.into_inner() {
                    IdOrName::Name(text) => {
                        parse_mode(&text).map_err(|e| invalid((at, format!("mode: {e}"))))?
                    }
                    IdOrName::Id(_) => {
                        return Err(invalid((
                            at,
                            "mode: write the mode as a string, e.g. mode = \"0660\" (a bare TOML \
                             number is decimal)"
                                .into(),
                        )));
                    }
                })
            }
        };
        let group = match file.group {
            None => None,
            Some(g) => {
                let at = g.span().start;
                Some(match g.into_inner() {
                    IdOrName::Id(id) => match u32::try_from(id) {
                        Ok(id) if id != u32::MAX => GroupSpec::Id(id),
                        _ => return Err(invalid((at, format!("group: id {id} is out of range")))),
                    },
                    IdOrName::Name(name) => {
                        GroupSpec::parse(&name).map_err(|e| invalid((at, format!("group: {e}"))))?
                    }
                })
            }
        };
        let policy = file.policy.map(|p| relative(p.get_ref()));
        let log = match file.log {
            None => None,
            Some(l) => {
                crate::log::filter(l.get_ref())
                    .map_err(|e| invalid((l.span().start, format!("log: {e}"))))?;
                Some(l.into_inner())
            }
        };
        let limits = apply_limits(file.limits).map_err(invalid)?;
        let mut topics: Vec<TopicDecl> = Vec::with_capacity(file.topic.len());
        for t in file.topic {
            let at = t.span().start;
            let name_at = t.get_ref().name.span().start;
            let decl = topic_decl(t, &limits).map_err(invalid)?;
            if topics.iter().any(|d| d.name == decl.name) {
                return Err(invalid((
                    name_at,
                    format!(
                        "topic {} is declared twice; keep one [[topic]] table",
                        decl.name
                    ),
                )));
            }
            if topics.len() >= limits.max_topics as usize {
                return Err(invalid((
                    at,
                    format!(
                        "more [[topic]] declarations than limits.max_topics ({}); raise it",
                        limits.max_topics
                    ),
                )));
            }
            topics.push(decl);
        }
        Ok(Config {
            path: Some(path.to_owned()),
            socket,
            mode,
            group,
            policy,
            log,
            limits,
            topics,
        })
    }
}

/// Why the broker's settings could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The config file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The socket address is bad.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// `/etc/group` could not be read to resolve the group name.
    #[error(transparent)]
    UserDb(#[from] UserDbError),
    /// The group name is not in `/etc/group`.
    #[error(
        "unknown group {name:?} (from {from}; not in /etc/group): create it, or give a numeric gid"
    )]
    UnknownGroup {
        /// The name.
        name: String,
        /// `--group` or the config file.
        from: String,
    },
    /// `--mode`/`--group` given for an abstract socket.
    #[error(
        "--mode and --group set the socket file's permissions, and {socket} is an abstract \
         socket with no file: drop them, or use a socket path"
    )]
    AbstractWithFileOptions {
        /// The abstract socket.
        socket: String,
    },
    /// The log level is bad.
    #[error("{from}: {source}")]
    Log {
        /// `--log`, `MEMBUS_LOG` or the config file.
        from: String,
        /// The error.
        #[source]
        source: LogError,
    },
}

/// What the broker runs with: command line over environment over config file over defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where to listen (unless socket-activated).
    pub socket: SocketSpec,
    /// Where `socket` came from.
    pub socket_source: AddrSource,
    /// Socket file mode and group (gid resolved).
    pub bind: BindOptions,
    /// The group as given, for messages.
    pub group: Option<GroupSpec>,
    /// Policy file; `None`: only the broker's uid is allowed.
    pub policy: Option<PathBuf>,
    /// Log filter directives (validated).
    pub log: String,
    /// Limits.
    pub limits: Limits,
    /// Declared topics.
    pub topics: Vec<TopicDecl>,
    /// The config file, if any.
    pub config: Option<PathBuf>,
    /// Things worth a log line once logging is up (settings that were ignored, and why).
    pub notes: Vec<String>,
}

impl Settings {
    /// Resolves the settings for a broker running as `uid`, reading the config file named by
    /// `--config` and `/etc/group` if a group is given by name.
    pub fn resolve(
        args: &Args,
        env: impl Fn(&str) -> Option<OsString>,
        uid: u32,
    ) -> Result<Settings, SettingsError> {
        Settings::resolve_with(args, env, uid, &UserDbPaths::default())
    }

    /// As [`Settings::resolve`], with another user database.
    pub fn resolve_with(
        args: &Args,
        env: impl Fn(&str) -> Option<OsString>,
        uid: u32,
        db: &UserDbPaths,
    ) -> Result<Settings, SettingsError> {
        let config = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let config_socket = config.socket.as_ref().zip(config.path.as_deref());
        let (socket, socket_source) =
            resolve_socket(args.socket.as_ref(), &env, config_socket, uid)?;

        let (group, group_from) = match (&args.group, &config.group) {
            (Some(g), _) => (Some(g.clone()), "--group".to_string()),
            (None, Some(g)) => (
                Some(g.clone()),
                format!(
                    "config {}",
                    config.path.as_deref().unwrap_or(Path::new("")).display()
                ),
            ),
            (None, None) => (None, String::new()),
        };
        let mut notes = Vec::new();
        let abstract_socket = matches!(socket, SocketSpec::Abstract(_));
        if abstract_socket && (args.mode.is_some() || args.group.is_some()) {
            return Err(SettingsError::AbstractWithFileOptions {
                socket: socket.to_string(),
            });
        }
        let gid = match &group {
            Some(_) if abstract_socket => None,
            None => None,
            Some(GroupSpec::Id(id)) => Some(*id),
            Some(GroupSpec::Name(name)) => Some(UserDb::load(db)?.gid_of(name).ok_or_else(
                || SettingsError::UnknownGroup {
                    name: name.clone(),
                    from: group_from.clone(),
                },
            )?),
        };
        if abstract_socket && (config.mode.is_some() || config.group.is_some()) {
            notes.push(format!(
                "mode and group from the config file are ignored: {socket} is an abstract socket"
            ));
        }
        let default_mode = if gid.is_some() {
            DEFAULT_GROUP_SOCKET_MODE
        } else {
            DEFAULT_SOCKET_MODE
        };
        let mode = args.mode.or(config.mode).unwrap_or(default_mode);

        let env_log = env(LOG_ENV).filter(|v| !v.is_empty());
        let (log, log_from) = if let Some(l) = &args.log {
            (l.clone(), "--log".to_string())
        } else if let Some(l) = env_log {
            (l.to_string_lossy().into_owned(), format!("${LOG_ENV}"))
        } else if let Some(l) = &config.log {
            (l.clone(), "config".to_string())
        } else {
            (DEFAULT_LOG.to_string(), "default".to_string())
        };
        crate::log::filter(&log).map_err(|source| SettingsError::Log {
            from: log_from,
            source,
        })?;

        Ok(Settings {
            socket,
            socket_source,
            bind: BindOptions { mode, gid },
            group: if abstract_socket { None } else { group },
            policy: config.policy,
            log,
            limits: config.limits,
            topics: config.topics,
            config: config.path,
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/membus/broker.toml"))
    }

    fn invalid(text: &str) -> (usize, usize, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line,
                column,
                reason,
                ..
            }) => (line, column, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_is_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(
            c.path.as_deref(),
            Some(Path::new("/etc/membus/broker.toml"))
        );
        assert_eq!(Config { path: None, ..c }, Config::default());
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
socket = "run/bus.sock"
mode = "0640"
group = "robots"
policy = "policy.toml"
log = "debug"

[limits]
max_clients = 10
max_ring_bytes = 4194304

[[topic]]
name = "sensors.imu"
mode = "lossy"
ring_bytes = 65536
max_message_bytes = 4096

[[topic]]
name = "cmd"
stall_timeout_ms = 100
"#,
        )
        .unwrap();
        assert_eq!(
            c.socket,
            Some(SocketSpec::Path("/etc/membus/run/bus.sock".into()))
        );
        assert_eq!(c.mode, Some(0o640));
        assert_eq!(c.group, Some(GroupSpec::Name("robots".into())));
        assert_eq!(
            c.policy.as_deref(),
            Some(Path::new("/etc/membus/policy.toml"))
        );
        assert_eq!(c.log.as_deref(), Some("debug"));
        assert_eq!(c.limits.max_clients, 10);
        assert_eq!(c.limits.max_ring_bytes, 4 << 20);
        assert_eq!(c.limits.max_topics, Limits::default().max_topics);
        assert_eq!(
            c.topics,
            vec![
                TopicDecl {
                    name: "sensors.imu".into(),
                    mode: Mode::Lossy,
                    ring_bytes: 65536,
                    max_message_bytes: 4096,
                    stall_timeout_ms: Limits::default().stall_timeout_ms,
                },
                TopicDecl {
                    name: "cmd".into(),
                    mode: Mode::Reliable,
                    ring_bytes: Limits::default().default_ring_bytes,
                    max_message_bytes: max_message_bytes_for(1 << 20) as u32,
                    stall_timeout_ms: 100,
                },
            ]
        );
        let abs = parse("socket = \"/run/x.sock\"\npolicy = \"/p.toml\"\ngroup = 5\n").unwrap();
        assert_eq!(abs.socket, Some(SocketSpec::Path("/run/x.sock".into())));
        assert_eq!(abs.policy.as_deref(), Some(Path::new("/p.toml")));
        assert_eq!(abs.group, Some(GroupSpec::Id(5)));
        assert_eq!(
            parse("socket = \"@bus\"").unwrap().socket,
            Some(SocketSpec::Abstract(b"bus".to_vec()))
        );
    }

    #[test]
    fn syntax_and_unknown_keys() {
        let (line, _, reason) = invalid("mode = \"0600\"\nsocket = \n");
        assert_eq!(line, 2, "{reason}");
        let (line, col, reason) = invalid("\nsokcet = \"/x\"\n");
        assert_eq!((line, col), (2, 1));
        assert!(reason.contains("sokcet"), "{reason}");
        let (line, _, reason) = invalid("[limits]\nmax_clients = 1\nmax_cleints = 2\n");
        assert_eq!(line, 3);
        assert!(reason.contains("max_cleints"), "{reason}");
        let (line, _, reason) = invalid("[[topic]]\nname = \"a\"\nring = 4096\n");
        assert_eq!(line, 3);
        assert!(reason.contains("ring"), "{reason}");
        let (line, _, reason) = invalid("[[topic]]\nname = \"a\"\nmode = \"fast\"\n");
        assert_eq!(line, 3);
        assert!(reason.contains("reliable"), "{reason}");
        let (_, _, reason) = invalid("[[topic]]\nmode = \"lossy\"\n");
        assert!(reason.contains("name"), "{reason}");
    }

    #[test]
    fn bad_values() {
        let (line, col, reason) = invalid("mode = 0o660\n");
        assert_eq!((line, col), (1, 8));
        assert!(reason.contains("as a string"), "{reason}");
        assert!(
            invalid("mode = \"0400\"")
                .2
                .contains("owner read and write")
        );
        assert!(invalid("mode = \"999\"").2.contains("octal"));
        assert!(invalid("group = -1").2.contains("out of range"));
        assert!(invalid("group = \"a b\"").2.contains("group"));
        assert!(invalid("socket = \"@\"").2.contains("socket"));
        assert!(invalid("log = \"verbose\"").2.contains("log"));
        let (line, _, reason) = invalid("[limits]\nmax_clients = 0\n");
        assert_eq!(line, 2);
        assert!(reason.contains("limits.max_clients"), "{reason}");
        assert!(invalid("[limits]\nmax_clients = -5\n").0 == 2);
        assert!(
            invalid("[limits]\nmax_publishers_per_topic = 65\n")
                .2
                .contains("1..=64")
        );
        assert!(
            invalid("[limits]\ndefault_ring_bytes = 5000\n")
                .2
                .contains("power of two")
        );
        let (line, _, reason) = invalid("[limits]\nmax_ring_bytes = 65536\n");
        assert_eq!(
            line, 2,
            "default_ring_bytes (1 MiB) exceeds it: points at max_ring_bytes"
        );
        assert!(reason.contains("default_ring_bytes"), "{reason}");
        assert!(
            invalid("[limits]\nmax_ring_bytes = 2147483648\n")
                .2
                .contains("max_ring_bytes")
        );
        assert!(
            invalid("[limits]\nstall_timeout_ms = 0\n")
                .2
                .contains("stall_timeout_ms")
        );
    }

    #[test]
    fn wrong_value_type_names_key_type_and_example() {
        let (line, col, reason) = invalid("[limits]\nmax_clients = \"many\"\n");
        assert_eq!((line, col), (2, 15), "{reason}");
        assert!(
            reason.contains("`limits.max_clients`"),
            "names the key: {reason}"
        );
        assert!(
            reason.contains("a whole number"),
            "names the type: {reason}"
        );
        assert!(
            reason.contains("max_clients = 16384"),
            "gives an example: {reason}"
        );
        let (_, _, reason) = invalid("[limits]\nstall_timeout_ms = -5\n");
        assert!(reason.contains("`limits.stall_timeout_ms`"), "{reason}");
        assert!(reason.contains("stall_timeout_ms = 2000"), "{reason}");
        let (_, _, reason) = invalid("[[topic]]\nname = \"a\"\nring_bytes = \"64k\"\n");
        assert!(reason.contains("`topic.ring_bytes`"), "{reason}");
        assert!(reason.contains("ring_bytes = 65536"), "{reason}");
        let (_, _, reason) = invalid("log = 3\n");
        assert!(
            reason.contains("`log`") && reason.contains("log = \"info\""),
            "{reason}"
        );
    }

    #[test]
    fn bad_topics() {
        let (line, col, reason) = invalid("[[topic]]\nname = \"a..b\"\n");
        assert_eq!((line, col), (2, 8));
        assert!(reason.contains("empty segment"), "{reason}");
        let (line, _, reason) = invalid("[[topic]]\nname = \"a\"\n[[topic]]\nname = \"a\"\n");
        assert_eq!(line, 4);
        assert!(reason.contains("declared twice"), "{reason}");
        let (line, _, reason) = invalid("[[topic]]\nname = \"a\"\nring_bytes = 3000\n");
        assert_eq!(line, 3);
        assert!(reason.contains("power of two"), "{reason}");
        assert!(
            invalid("[[topic]]\nname = \"a\"\nring_bytes = 2147483648\n")
                .2
                .contains("max_ring_bytes")
        );
        let (_, _, reason) =
            invalid("[[topic]]\nname = \"a\"\nring_bytes = 4096\nmax_message_bytes = 2048\n");
        assert!(reason.contains("1..=2016"), "{reason}");
        assert!(
            invalid("[[topic]]\nname = \"a\"\nmax_message_bytes = 0\n")
                .2
                .contains("max_message_bytes")
        );
        let (line, _, reason) =
            invalid("[[topic]]\nname = \"a\"\nmode = \"lossy\"\nstall_timeout_ms = 5\n");
        assert_eq!(line, 4);
        assert!(reason.contains("only to reliable"), "{reason}");
        let (_, _, reason) =
            invalid("[limits]\nmax_topics = 1\n[[topic]]\nname = \"a\"\n[[topic]]\nname = \"b\"\n");
        assert!(reason.contains("max_topics"), "{reason}");
    }

    #[test]
    fn error_display_has_path_line_column() {
        let e = parse("\n\nmode = 1\n").unwrap_err().to_string();
        assert!(e.starts_with("/etc/membus/broker.toml:3:8: mode:"), "{e}");
        let e = Config::load(Path::new("/nonexistent/broker.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/broker.toml"),
            "{e}"
        );
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn db_with_group(dir: &Path) -> UserDbPaths {
        let (passwd, group) = (dir.join("passwd"), dir.join("group"));
        std::fs::write(&passwd, "alice:x:1001:1001::/:/bin/sh\n").unwrap();
        std::fs::write(&group, "robots:x:2000:alice\n").unwrap();
        UserDbPaths { passwd, group }
    }

    #[test]
    fn settings_defaults() {
        let args = Args::parse_from(["bus-broker"]);
        let s = Settings::resolve(&args, env_of(&[("XDG_RUNTIME_DIR", "/run/user/9")]), 9).unwrap();
        assert_eq!(
            s.socket,
            SocketSpec::Path("/run/user/9/membus/bus.sock".into())
        );
        assert_eq!(s.socket_source, AddrSource::Default);
        assert_eq!(
            s.bind,
            BindOptions {
                mode: 0o600,
                gid: None
            }
        );
        assert_eq!(s.log, "info");
        assert_eq!(s.limits, Limits::default());
        assert_eq!((s.policy, s.config, s.topics.len()), (None, None, 0));
    }

    #[test]
    fn settings_merge_flags_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_group(dir.path());
        let file = dir.path().join("broker.toml");
        std::fs::write(
            &file,
            "socket = \"file.sock\"\nmode = \"0640\"\ngroup = \"robots\"\nlog = \"warn\"\n\
             policy = \"p.toml\"\n",
        )
        .unwrap();
        let cfg = file.to_str().unwrap();
        let env = env_of(&[("XDG_RUNTIME_DIR", "/run/user/9")]);

        // File only.
        let args = Args::parse_from(["bus-broker", "--config", cfg]);
        let s = Settings::resolve_with(&args, &env, 9, &db).unwrap();
        assert_eq!(s.socket, SocketSpec::Path(dir.path().join("file.sock")));
        assert_eq!(s.socket_source, AddrSource::Config(file.clone()));
        assert_eq!(
            s.bind,
            BindOptions {
                mode: 0o640,
                gid: Some(2000)
            }
        );
        assert_eq!(s.log, "warn");
        assert_eq!(s.policy, Some(dir.path().join("p.toml")));

        // Environment over file.
        let env2 = env_of(&[(crate::addr::SOCKET_ENV, "/env.sock"), (LOG_ENV, "debug")]);
        let s = Settings::resolve_with(&args, &env2, 9, &db).unwrap();
        assert_eq!(s.socket, SocketSpec::Path("/env.sock".into()));
        assert_eq!(s.socket_source, AddrSource::Env);
        assert_eq!(s.log, "debug");

        // Flags over both.
        let args = Args::parse_from([
            "bus-broker",
            "--config",
            cfg,
            "--socket",
            "/flag.sock",
            "--mode",
            "0600",
            "--group",
            "77",
            "--log",
            "error",
        ]);
        let s = Settings::resolve_with(&args, &env2, 9, &db).unwrap();
        assert_eq!(s.socket, SocketSpec::Path("/flag.sock".into()));
        assert_eq!(s.socket_source, AddrSource::Flag);
        assert_eq!(
            s.bind,
            BindOptions {
                mode: 0o600,
                gid: Some(77)
            }
        );
        assert_eq!(s.group, Some(GroupSpec::Id(77)));
        assert_eq!(s.log, "error");
    }

    #[test]
    fn settings_group_default_mode_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_group(dir.path());
        let env = env_of(&[]);
        let args = Args::parse_from(["bus-broker", "--group", "robots"]);
        let s = Settings::resolve_with(&args, &env, 9, &db).unwrap();
        assert_eq!(
            s.bind,
            BindOptions {
                mode: 0o660,
                gid: Some(2000)
            }
        );

        let args = Args::parse_from(["bus-broker", "--group", "nosuch"]);
        let e = Settings::resolve_with(&args, &env, 9, &db).unwrap_err();
        assert!(matches!(e, SettingsError::UnknownGroup { .. }), "{e}");
        assert!(e.to_string().contains("--group"), "{e}");

        let args = Args::parse_from(["bus-broker", "--socket", "@x", "--mode", "0660"]);
        let e = Settings::resolve_with(&args, &env, 9, &db).unwrap_err();
        assert!(
            matches!(e, SettingsError::AbstractWithFileOptions { .. }),
            "{e}"
        );

        let args = Args::parse_from(["bus-broker", "--log", "loud"]);
        let e = Settings::resolve_with(&args, &env, 9, &db).unwrap_err();
        assert!(e.to_string().starts_with("--log:"), "{e}");
        let e = Settings::resolve_with(&Args::default(), env_of(&[(LOG_ENV, "x=y=z")]), 9, &db)
            .unwrap_err();
        assert!(e.to_string().starts_with("$MEMBUS_LOG:"), "{e}");

        let args = Args::parse_from(["bus-broker", "--config", "/nonexistent.toml"]);
        assert!(matches!(
            Settings::resolve_with(&args, &env, 9, &db),
            Err(SettingsError::Config(ConfigError::Read { .. }))
        ));
    }

    #[test]
    fn settings_abstract_ignores_file_permissions_from_config() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_group(dir.path());
        let file = dir.path().join("b.toml");
        std::fs::write(&file, "mode = \"0660\"\ngroup = \"robots\"\n").unwrap();
        let args = Args::parse_from([
            "bus-broker",
            "--config",
            file.to_str().unwrap(),
            "--socket",
            "@t",
        ]);
        let s = Settings::resolve_with(&args, env_of(&[]), 9, &db).unwrap();
        assert_eq!(s.socket, SocketSpec::Abstract(b"t".to_vec()));
        assert_eq!(s.bind.gid, None);
        assert_eq!(s.group, None);
        assert_eq!(s.notes.len(), 1);
    }

    /// Hardening item 6: a writer tracks at most MAX_READERS_PER_RING readers; more
    /// subscribers per topic silently lost reliable delivery.
    #[test]
    fn subscribers_per_topic_bounded_by_what_a_ring_tracks() {
        let max = bus_core::ring::MAX_READERS_PER_RING;
        let ok = parse(&format!("[limits]\nmax_subscribers_per_topic = {max}\n")).unwrap();
        assert_eq!(ok.limits.max_subscribers_per_topic as usize, max);
        let (line, _, reason) = invalid(&format!(
            "[limits]\nmax_subscribers_per_topic = {}\n",
            max + 1
        ));
        assert_eq!(line, 2);
        assert!(
            reason.contains("limits.max_subscribers_per_topic")
                && reason.contains(&max.to_string()),
            "{reason}"
        );
    }

    /// Hardening item 5: the per-client descriptor quota is a limit like the others.
    #[test]
    fn fds_per_client_is_configurable_and_bounded() {
        let ok = parse("[limits]\nmax_fds_per_client = 64\n").unwrap();
        assert_eq!(ok.limits.max_fds_per_client, 64);
        let (_, _, reason) = invalid("[limits]\nmax_fds_per_client = 3\n");
        assert!(reason.contains("limits.max_fds_per_client"), "{reason}");
    }
}
