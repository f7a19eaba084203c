//! Who may publish or subscribe what: topic names, topic patterns, the policy file, and the
//! user database (`/etc/passwd`, `/etc/group`) that turns names in it into ids.
//!
//! # Topic names
//!
//! 1 to [`MAX_TOPIC_BYTES`] bytes; segments separated by single dots; each segment is non-empty
//! and made of `A-Z a-z 0-9 _ -`. So `sensors.imu-0` is a topic; `.a`, `a.`, `a..b`, `a b` and
//! `café` are not. [`validate_topic`] is the one check.
//!
//! # Patterns
//!
//! | pattern | matches                                                                      |
//! |---------|------------------------------------------------------------------------------|
//! | `a.b`   | exactly the topic `a.b`                                                      |
//! | `a.*`   | `a` then one or more further segments: `a.b`, `a.b.c`; not `a`, not `ab.c`   |
//! | `**`    | every topic                                                                  |
//!
//! `*` is only ever the whole last segment of a pattern, after at least one named segment, and
//! `**` only ever the whole pattern. Anything else (`*`, `a.*.c`, `a.**`, `a.**.b`, `*x`, `a*`)
//! is rejected when the file is loaded, with a hint.
//!
//! # The policy file
//!
//! ```toml
//! [[allow]]
//! users = ["alice", 1001]     # user names (from /etc/passwd) or numeric uids
//! groups = ["robots"]         # group names (from /etc/group) or numeric gids
//! publish = ["sensors.*"]
//! subscribe = ["**"]
//!
//! [[allow]]
//! anyone = true               # every connecting uid
//! subscribe = ["public.*"]
//! ```
//!
//! A request is allowed when at least one `[[allow]]` rule names the client (its uid is in
//! `users`, one of its gids is in `groups`, or the rule says `anyone = true`) and lists a pattern
//! matching the topic under the operation asked for. Nothing else is allowed: there are no deny
//! rules, and with a policy file the broker's own uid has no implicit rights (so a policy can deny
//! it). Without a policy file, only the broker's own uid may do anything (root is not special).
//!
//! Group membership: a client's gids are its primary gid from SO_PEERCRED plus every group of
//! `/etc/group` that lists one of the names its uid has in `/etc/passwd`. That table is read when
//! the policy is loaded and again on every reload, never while checking.
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::toml_util::{IdOrName, position, toml_error_in};

/// Longest topic name, in bytes.
pub use bus_core::limits::MAX_TOPIC_BYTES;

pub use bus_core::naming::{TopicNameError, validate_topic};

/// A topic pattern of a policy rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `**`: every topic.
    All,
    /// `a.b`: exactly this topic.
    Exact(String),
    /// `a.*`: the named prefix (stored without `.*`) followed by one or more further segments.
    Prefix(String),
}

/// Why a string is not a [`Pattern`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(String);

impl Pattern {
    /// Parses `a.b`, `a.*` or `**`.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let err = |s: String| Err(PatternError(s));
        if text == "**" {
            return Ok(Pattern::All);
        }
        if text == "*" {
            return err("'*' alone is not a pattern; write '**' to match every topic".into());
        }
        if text.contains("**") {
            return err(format!(
                "'**' may only stand alone, as the pattern matching every topic; to match \
                 everything under a prefix write 'prefix.*' (in {text:?})"
            ));
        }
        let segments: Vec<&str> = text.split('.').collect();
        for (i, segment) in segments.iter().enumerate() {
            if segment.contains('*') && *segment != "*" {
                return err(format!(
                    "'*' must be a whole segment (in {text:?}): write 'prefix.*' for every topic \
                     under prefix, or '**' for every topic"
                ));
            }
            if *segment == "*" && i + 1 != segments.len() {
                return err(format!(
                    "'*' may only be the last segment of a pattern (in {text:?}); 'a.*' matches \
                     a.b, a.b.c, ..."
                ));
            }
        }
        if let Some(prefix) = text.strip_suffix(".*") {
            return match validate_topic(prefix) {
                Ok(()) => Ok(Pattern::Prefix(prefix.to_owned())),
                Err(e) => err(format!(
                    "the prefix {prefix:?} of {text:?} is not a topic: {e}"
                )),
            };
        }
        match validate_topic(text) {
            Ok(()) => Ok(Pattern::Exact(text.to_owned())),
            Err(e) => err(format!("{text:?} is not a topic name: {e}")),
        }
    }

    /// Whether this pattern matches `topic` (which the caller has validated).
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Exact(exact) => topic == exact,
            Pattern::Prefix(prefix) => {
                topic.len() > prefix.len() + 1
                    && topic.starts_with(prefix.as_str())
                    && topic.as_bytes()[prefix.len()] == b'.'
            }
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::All => f.write_str("**"),
            Pattern::Exact(t) => f.write_str(t),
            Pattern::Prefix(p) => write!(f, "{p}.*"),
        }
    }
}

/// A group named on the command line or in the config: a name or a numeric gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupSpec {
    /// A numeric gid.
    Id(u32),
    /// A name to look up in `/etc/group`.
    Name(String),
}

impl GroupSpec {
    /// All digits: a gid; otherwise a name.
    pub fn parse(text: &str) -> Result<GroupSpec, String> {
        if text.is_empty() {
            return Err("the group may not be empty".into());
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            return match text.parse::<u32>() {
                Ok(id) if id != u32::MAX => Ok(GroupSpec::Id(id)),
                _ => Err(format!("group id {text} is out of range")),
            };
        }
        if text.contains([':', '\n', ',']) || text.contains(char::is_whitespace) {
            return Err(format!("{text:?} is not a group name"));
        }
        Ok(GroupSpec::Name(text.to_owned()))
    }
}

impl fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupSpec::Id(id) => write!(f, "{id}"),
            GroupSpec::Name(name) => f.write_str(name),
        }
    }
}

/// Where the user database is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserDbPaths {
    /// `/etc/passwd` format: `name:pw:uid:gid:gecos:home:shell`.
    pub passwd: PathBuf,
    /// `/etc/group` format: `name:pw:gid:member,member`.
    pub group: PathBuf,
}

impl Default for UserDbPaths {
    fn default() -> Self {
        UserDbPaths {
            passwd: "/etc/passwd".into(),
            group: "/etc/group".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct UserEntry {
    name: String,
    uid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A snapshot of `/etc/passwd` and `/etc/group`, parsed in safe Rust (no NSS: users that exist
/// only in LDAP or systemd-homed must be named by numeric id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserDb {
    users: Vec<UserEntry>,
    groups: Vec<GroupEntry>,
}

/// Why the user database could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the user database {path}: {source}")]
pub struct UserDbError {
    /// The file.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: io::Error,
}

impl UserDb {
    /// Parses the two files' contents. Comments, blank lines and malformed lines (NIS `+`
    /// entries, short lines, non-numeric ids) are skipped.
    pub fn parse(passwd: &str, group: &str) -> UserDb {
        let fields = |line: &str| -> Option<Vec<String>> {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') || line.starts_with(['+', '-']) {
                return None;
            }
            Some(line.split(':').map(str::to_owned).collect())
        };
        let users = passwd
            .lines()
            .filter_map(fields)
            .filter(|f| f.len() >= 4 && !f[0].is_empty())
            .filter_map(|f| {
                Some(UserEntry {
                    uid: f[2].parse().ok()?,
                    name: f[0].clone(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(fields)
            .filter(|f| f.len() >= 3 && !f[0].is_empty())
            .filter_map(|f| {
                let members = f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|m| !m.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                Some(GroupEntry {
                    gid: f[2].parse().ok()?,
                    name: f[0].clone(),
                    members,
                })
            })
            .collect();
        UserDb { users, groups }
    }

    /// Reads the two files. A missing file counts as empty (minimal containers); any other
    /// error is returned.
    pub fn load(paths: &UserDbPaths) -> Result<UserDb, UserDbError> {
        let read = |path: &Path| match std::fs::read_to_string(path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(UserDbError {
                path: path.to_owned(),
                source,
            }),
        };
        Ok(UserDb::parse(&read(&paths.passwd)?, &read(&paths.group)?))
    }

    /// The uid of user `name`.
    pub fn uid_of(&self, name: &str) -> Option<u32> {
        self.users.iter().find(|u| u.name == name).map(|u| u.uid)
    }

    /// The gid of group `name`.
    pub fn gid_of(&self, name: &str) -> Option<u32> {
        self.groups.iter().find(|g| g.name == name).map(|g| g.gid)
    }

    /// The gid a [`GroupSpec`] stands for (numeric gids need not exist in the file).
    pub fn resolve_group(&self, spec: &GroupSpec) -> Option<u32> {
        match spec {
            GroupSpec::Id(id) => Some(*id),
            GroupSpec::Name(name) => self.gid_of(name),
        }
    }

    /// The gids of the groups whose member lists name `uid` (under any of its names), sorted.
    pub fn supplementary_gids(&self, uid: u32) -> Vec<u32> {
        let names: Vec<&str> = self
            .users
            .iter()
            .filter(|u| u.uid == uid)
            .map(|u| u.name.as_str())
            .collect();
        let mut gids: Vec<u32> = self
            .groups
            .iter()
            .filter(|g| g.members.iter().any(|m| names.contains(&m.as_str())))
            .map(|g| g.gid)
            .collect();
        gids.sort_unstable();
        gids.dedup();
        gids
    }

    fn memberships(&self) -> HashMap<u32, Vec<u32>> {
        let mut map = HashMap::new();
        for user in &self.users {
            map.entry(user.uid)
                .or_insert_with(|| self.supplementary_gids(user.uid));
        }
        map.retain(|_, gids: &mut Vec<u32>| !gids.is_empty());
        map
    }
}

/// An operation a client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Publish to a topic.
    Publish,
    /// Subscribe to a topic.
    Subscribe,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
        })
    }
}

/// The naming rule, as the error for a bad topic name states it.
pub const TOPIC_NAME_RULE: &str = "a topic name is 1 to 255 bytes of segments separated by \
     single dots, each segment made of A-Z a-z 0-9 _ - (e.g. sensors.imu-0)";

/// Why a request was denied; its `Display` is the message for the client's error frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// What was asked.
    pub op: Op,
    /// The topic (as asked; at most a frame's topic length).
    pub topic: String,
    /// The client's uid (from SO_PEERCRED).
    pub uid: u32,
    /// Why.
    pub reason: DenyReason,
}

/// The reason part of a [`Denied`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// A policy file is loaded and none of its rules allows the request.
    NoRule {
        /// The policy file.
        path: PathBuf,
    },
    /// No policy file: only the broker's own uid is allowed.
    NotBrokerUid {
        /// The broker's uid.
        broker_uid: u32,
    },
    /// The topic is not a topic name.
    BadTopic(TopicNameError),
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Denied {
            op,
            topic,
            uid,
            reason,
        } = self;
        match reason {
            DenyReason::NoRule { path } => write!(
                f,
                "uid {uid} may not {op} to '{topic}' (policy {}: no rule allows it)",
                path.display()
            ),
            DenyReason::NotBrokerUid { broker_uid } => write!(
                f,
                "uid {uid} may not {op} to '{topic}' (default policy: only the broker's own uid \
                 {broker_uid} may publish or subscribe; start the broker with a policy file to \
                 allow others)"
            ),
            // Not a permission question: say what a topic name is.
            DenyReason::BadTopic(e) => write!(
                f,
                "cannot {op} to '{topic}': it is not a topic name ({e}); {TOPIC_NAME_RULE}"
            ),
        }
    }
}

impl std::error::Error for Denied {}

/// Why a policy file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `/etc/passwd` or `/etc/group` could not be read.
    #[error(transparent)]
    UserDb(#[from] UserDbError),
    /// The file is not a valid policy.
    #[error("{}:{line}:{column}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<Spanned<RuleFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    users: Vec<Spanned<IdOrName>>,
    #[serde(default)]
    groups: Vec<Spanned<IdOrName>>,
    #[serde(default)]
    anyone: bool,
    #[serde(default)]
    publish: Vec<Spanned<String>>,
    #[serde(default)]
    subscribe: Vec<Spanned<String>>,
    #[serde(default)]
    stats: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    line: usize,
    anyone: bool,
    uids: Vec<u32>,
    gids: Vec<u32>,
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
    /// STATS shows these clients every topic and every client.
    stats: bool,
}

impl Rule {
    fn applies_to(&self, uid: u32, gids: &[u32]) -> bool {
        self.anyone || self.uids.contains(&uid) || gids.iter().any(|g| self.gids.contains(g))
    }

    fn allows(&self, op: Op, topic: &str) -> bool {
        let patterns = match op {
            Op::Publish => &self.publish,
            Op::Subscribe => &self.subscribe,
        };
        patterns.iter().any(|p| p.matches(topic))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Default {
        broker_uid: u32,
    },
    File {
        path: PathBuf,
        rules: Vec<Rule>,
        memberships: HashMap<u32, Vec<u32>>,
    },
}

/// A loaded authorization policy. Cheap to check: no I/O after load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    source: Source,
}

impl Policy {
    /// The policy without a file: only `broker_uid` may publish or subscribe, to anything.
    pub fn default_for(broker_uid: u32) -> Policy {
        Policy {
            source: Source::Default { broker_uid },
        }
    }

    /// Loads a policy file, resolving names against `/etc/passwd` and `/etc/group`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Policy::load_with(path, &UserDbPaths::default())
    }

    /// Loads a policy file, resolving names against the user database at `db`.
    pub fn load_with(path: &Path, db: &UserDbPaths) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Policy::parse(&text, path, &UserDb::load(db)?)
    }

    /// Parses policy text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path, db: &UserDb) -> Result<Policy, PolicyError> {
        let invalid = |offset: usize, reason: String| {
            let (line, column) = position(text, offset);
            PolicyError::Invalid {
                path: path.to_owned(),
                line,
                column,
                reason,
            }
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let (offset, reason) = toml_error_in(text, &e);
            invalid(offset, reason)
        })?;
        let mut rules = Vec::with_capacity(file.allow.len());
        for spanned in file.allow {
            let start = spanned.span().start;
            let rule = spanned.into_inner();
            if rule.users.is_empty() && rule.groups.is_empty() && !rule.anyone {
                return Err(invalid(
                    start,
                    "this [[allow]] rule names nobody: add `users = [...]`, `groups = [...]` or \
                     `anyone = true`"
                        .into(),
                ));
            }
            if rule.publish.is_empty() && rule.subscribe.is_empty() && !rule.stats {
                return Err(invalid(
                    start,
                    "this [[allow]] rule allows nothing: add `publish = [...]` and/or \
                     `subscribe = [...]` patterns, or `stats = true`"
                        .into(),
                ));
            }
            let mut uids = Vec::new();
            for user in rule.users {
                let at = user.span().start;
                uids.push(match user.into_inner() {
                    IdOrName::Id(id) => id_in_range(id).ok_or_else(|| {
                        invalid(at, format!("user id {id} is out of range (0..=4294967294)"))
                    })?,
                    IdOrName::Name(name) => db.uid_of(&name).ok_or_else(|| {
                        invalid(
                            at,
                            format!(
                                "unknown user {name:?} (not in /etc/passwd); write its numeric \
                                 uid instead if the account lives elsewhere"
                            ),
                        )
                    })?,
                });
            }
            let mut gids = Vec::new();
            for group in rule.groups {
                let at = group.span().start;
                gids.push(match group.into_inner() {
                    IdOrName::Id(id) => id_in_range(id).ok_or_else(|| {
                        invalid(
                            at,
                            format!("group id {id} is out of range (0..=4294967294)"),
                        )
                    })?,
                    IdOrName::Name(name) => db.gid_of(&name).ok_or_else(|| {
                        invalid(
                            at,
                            format!(
                                "unknown group {name:?} (not in /etc/group); write its numeric \
                                 gid instead if the group lives elsewhere"
                            ),
                        )
                    })?,
                });
            }
            let patterns = |list: Vec<Spanned<String>>| -> Result<Vec<Pattern>, PolicyError> {
                list.into_iter()
                    .map(|p| Pattern::parse(p.get_ref()).map_err(|e| invalid(p.span().start, e.0)))
                    .collect()
            };
            rules.push(Rule {
                line: position(text, start).0,
                anyone: rule.anyone,
                uids,
                gids,
                publish: patterns(rule.publish)?,
                subscribe: patterns(rule.subscribe)?,
                stats: rule.stats,
            });
        }
        Ok(Policy {
            source: Source::File {
                path: path.to_owned(),
                rules,
                memberships: db.memberships(),
            },
        })
    }

    /// The policy file this came from, if any.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            Source::Default { .. } => None,
            Source::File { path, .. } => Some(path),
        }
    }

    /// Number of `[[allow]]` rules (0 for the default policy).
    pub fn rule_count(&self) -> usize {
        match &self.source {
            Source::Default { .. } => 0,
            Source::File { rules, .. } => rules.len(),
        }
    }

    /// The gids a client counts as a member of: its primary gid (from SO_PEERCRED) and the
    /// supplementary groups `/etc/group` gave its uid when this policy was loaded. Compute once
    /// per connection and pass to [`Policy::check`].
    pub fn client_gids(&self, uid: u32, primary_gid: u32) -> Vec<u32> {
        let mut gids = vec![primary_gid];
        if let Source::File { memberships, .. } = &self.source
            && let Some(more) = memberships.get(&uid)
        {
            gids.extend(more.iter().copied().filter(|&g| g != primary_gid));
        }
        gids
    }

    /// Whether a client with `uid` and `gids` may do `op` on `topic`.
    ///
    /// ```
    /// use bus_broker::policy::{Op, Policy};
    /// let policy = Policy::default_for(1000);
    /// assert!(policy.check(Op::Publish, "a.b", 1000, &[1000]).is_ok());
    /// let denied = policy.check(Op::Publish, "a.b", 0, &[0]).unwrap_err();
    /// assert!(denied.to_string().starts_with("uid 0 may not publish to 'a.b'"));
    /// ```
    pub fn check(&self, op: Op, topic: &str, uid: u32, gids: &[u32]) -> Result<(), Denied> {
        let deny = |reason| {
            Err(Denied {
                op,
                topic: topic.to_owned(),
                uid,
                reason,
            })
        };
        if let Err(e) = validate_topic(topic) {
            return deny(DenyReason::BadTopic(e));
        }
        match &self.source {
            Source::Default { broker_uid } if uid == *broker_uid => Ok(()),
            Source::Default { broker_uid } => deny(DenyReason::NotBrokerUid {
                broker_uid: *broker_uid,
            }),
            Source::File { path, rules, .. } => {
                if rules
                    .iter()
                    .any(|r| r.applies_to(uid, gids) && r.allows(op, topic))
                {
                    Ok(())
                } else {
                    deny(DenyReason::NoRule { path: path.clone() })
                }
            }
        }
    }

    /// What STATS shows a client with `uid` and `gids`, for a broker running as `broker_uid`:
    /// everything for root, the broker's own uid and clients a `stats = true` rule names;
    /// otherwise only the topics it may publish or subscribe, and on those the identity (uid,
    /// pid, command, name) only of its own uid's clients.
    pub fn stats_scope(&self, uid: u32, gids: &[u32], broker_uid: u32) -> StatsScope {
        let granted = match &self.source {
            Source::Default { .. } => false,
            Source::File { rules, .. } => rules.iter().any(|r| r.stats && r.applies_to(uid, gids)),
        };
        if uid == 0 || uid == broker_uid || granted {
            StatsScope::All
        } else {
            StatsScope::Permitted
        }
    }

    /// Whether STATS shows topic `topic` to a client whose scope is
    /// [`StatsScope::Permitted`]: it may publish or subscribe to it.
    pub fn may_see_topic(&self, topic: &str, uid: u32, gids: &[u32]) -> bool {
        self.check(Op::Publish, topic, uid, gids).is_ok()
            || self.check(Op::Subscribe, topic, uid, gids).is_ok()
    }

    /// The line of the first rule that allows the request, for debug logs.
    pub fn allowing_rule_line(&self, op: Op, topic: &str, uid: u32, gids: &[u32]) -> Option<usize> {
        match &self.source {
            Source::Default { .. } => None,
            Source::File { rules, .. } => rules
                .iter()
                .find(|r| r.applies_to(uid, gids) && r.allows(op, topic))
                .map(|r| r.line),
        }
    }
}

fn id_in_range(id: i64) -> Option<u32> {
    u32::try_from(id).ok().filter(|&id| id != u32::MAX)
}

/// How much of the broker's state STATS shows a client ([`Policy::stats_scope`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsScope {
    /// Every topic and every client's identity.
    All,
    /// The topics the client may publish or subscribe; other uids' identities are hidden.
    Permitted,
}

impl StatsScope {
    /// The name in the STATS document (`"scope"`).
    pub fn name(self) -> &'static str {
        match self {
            StatsScope::All => "all",
            StatsScope::Permitted => "permitted",
        }
    }
}

/// The live policy plus what is needed to reload it (on SIGHUP).
#[derive(Debug)]
pub struct PolicyHolder {
    path: Option<PathBuf>,
    broker_uid: u32,
    db: UserDbPaths,
    current: Policy,
}

impl PolicyHolder {
    /// Loads `path` (or, without one, the default policy for `broker_uid`).
    pub fn load(path: Option<PathBuf>, broker_uid: u32) -> Result<PolicyHolder, PolicyError> {
        PolicyHolder::load_with(path, broker_uid, UserDbPaths::default())
    }

    /// As [`PolicyHolder::load`], with another user database (tests, chroots).
    pub fn load_with(
        path: Option<PathBuf>,
        broker_uid: u32,
        db: UserDbPaths,
    ) -> Result<PolicyHolder, PolicyError> {
        let current = match &path {
            Some(path) => Policy::load_with(path, &db)?,
            None => Policy::default_for(broker_uid),
        };
        Ok(PolicyHolder {
            path,
            broker_uid,
            db,
            current,
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.current
    }

    /// Re-reads the policy file and the user database. On error the policy in force stays and
    /// the error (with file, line and reason) is returned for the log. Without a file this is a
    /// no-op. Grants made under the old policy are not revisited here: that is the caller's call.
    pub fn reload(&mut self) -> Result<(), PolicyError> {
        self.current = match &self.path {
            Some(path) => Policy::load_with(path, &self.db)?,
            None => Policy::default_for(self.broker_uid),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment\n\
                          \n\
                          alice:x:1001:1001::/home/alice:/bin/sh\n\
                          bob:x:1002:1002::/home/bob:/bin/sh\n\
                          alias:x:1002:1002::/home/bob:/bin/sh\n\
                          +nis::::::\n\
                          broken:x:notanumber:1::/:/bin/sh\n\
                          short:x\n";
    const GROUP: &str = "root:x:0:\n\
                         robots:x:2000:alice,alias\n\
                         audio:x:2001:bob\n\
                         empty:x:2002:\n";

    fn db() -> UserDb {
        UserDb::parse(PASSWD, GROUP)
    }

    fn policy(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("/etc/membus/policy.toml"), &db())
    }

    fn invalid(text: &str) -> (usize, usize, String) {
        match policy(text) {
            Err(PolicyError::Invalid {
                line,
                column,
                reason,
                ..
            }) => (line, column, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn topic_names() {
        for ok in ["a", "a.b", "A-b_c.0", "x.y.z.w", &"a".repeat(255), "a-.-b"] {
            assert_eq!(validate_topic(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_topic(""), Err(TopicNameError::Empty));
        assert_eq!(
            validate_topic(&"a".repeat(256)),
            Err(TopicNameError::TooLong { len: 256 })
        );
        assert_eq!(
            validate_topic(".a"),
            Err(TopicNameError::EmptySegment { offset: 0 })
        );
        assert_eq!(
            validate_topic("a."),
            Err(TopicNameError::EmptySegment { offset: 2 })
        );
        assert_eq!(
            validate_topic("a..b"),
            Err(TopicNameError::EmptySegment { offset: 2 })
        );
        assert_eq!(
            validate_topic("."),
            Err(TopicNameError::EmptySegment { offset: 0 })
        );
        assert_eq!(
            validate_topic("a b"),
            Err(TopicNameError::BadChar { ch: ' ', offset: 1 })
        );
        assert_eq!(
            validate_topic("café"),
            Err(TopicNameError::BadChar {
                ch: 'é', offset: 3
            })
        );
        assert_eq!(
            validate_topic("a.*"),
            Err(TopicNameError::BadChar { ch: '*', offset: 2 })
        );
        assert_eq!(
            validate_topic("a/b"),
            Err(TopicNameError::BadChar { ch: '/', offset: 1 })
        );
        // 255 bytes of multi-byte chars is still too long when it exceeds the byte limit.
        assert!(matches!(
            validate_topic(&"é".repeat(128)),
            Err(TopicNameError::TooLong { .. })
        ));
    }

    #[test]
    fn pattern_parsing() {
        assert_eq!(Pattern::parse("**"), Ok(Pattern::All));
        assert_eq!(Pattern::parse("a.b"), Ok(Pattern::Exact("a.b".into())));
        assert_eq!(Pattern::parse("a.*"), Ok(Pattern::Prefix("a".into())));
        assert_eq!(Pattern::parse("a.b.*"), Ok(Pattern::Prefix("a.b".into())));
        for bad in [
            "", "*", "a.**", "a.**.b", "**.a", "***", "*x", "x*", "a*", "a.*.c", "*.a", ".*",
            "a..*", "a.b.", ".a", "a b", "café", "a.*x", "a.x*",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Pattern::parse("*").unwrap_err().0.contains("'**'"));
        assert!(
            Pattern::parse("a.**.b")
                .unwrap_err()
                .0
                .contains("may only stand alone")
        );
        assert!(
            Pattern::parse("a.*.c")
                .unwrap_err()
                .0
                .contains("last segment")
        );
        assert!(
            Pattern::parse("*x")
                .unwrap_err()
                .0
                .contains("whole segment")
        );
        for p in ["**", "a.b", "a.*", "a.b-c.*"] {
            assert_eq!(Pattern::parse(p).unwrap().to_string(), p);
        }
    }

    #[test]
    fn pattern_matching() {
        let m = |p: &str, t: &str| Pattern::parse(p).unwrap().matches(t);
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(!m("a.b", "a"));
        assert!(!m("a.b", "A.b"), "case-sensitive");
        assert!(m("a.*", "a.b"));
        assert!(m("a.*", "a.b.c"));
        assert!(!m("a.*", "a"), "a.* needs at least one more segment");
        assert!(
            !m("a.*", "ab.c"),
            "a.* is segment-wise, not a string prefix"
        );
        assert!(!m("a.*", "ab"));
        assert!(!m("a.*", "b.a"));
        assert!(!m("a.*", "a."), "an empty segment is not a segment");
        assert!(m("a.b.*", "a.b.c"));
        assert!(!m("a.b.*", "a.bc.d"));
        assert!(!m("a.b.*", "a.b"));
        assert!(m("**", "a"));
        assert!(m("**", "x.y.z"));
    }

    #[test]
    fn user_db_parsing() {
        let db = db();
        assert_eq!(db.uid_of("alice"), Some(1001));
        assert_eq!(db.uid_of("alias"), Some(1002));
        assert_eq!(db.uid_of("broken"), None);
        assert_eq!(db.uid_of("short"), None);
        assert_eq!(db.uid_of("+nis"), None);
        assert_eq!(db.gid_of("robots"), Some(2000));
        assert_eq!(db.gid_of("nobody-here"), None);
        assert_eq!(db.supplementary_gids(1001), vec![2000]);
        // uid 1002 has two names, bob (audio) and alias (robots).
        assert_eq!(db.supplementary_gids(1002), vec![2000, 2001]);
        assert_eq!(db.supplementary_gids(0), Vec::<u32>::new());
        assert_eq!(db.resolve_group(&GroupSpec::Id(7)), Some(7));
        assert_eq!(
            db.resolve_group(&GroupSpec::Name("audio".into())),
            Some(2001)
        );
        assert_eq!(db.resolve_group(&GroupSpec::Name("nope".into())), None);
    }

    #[test]
    fn group_spec_parsing() {
        assert_eq!(
            GroupSpec::parse("robots"),
            Ok(GroupSpec::Name("robots".into()))
        );
        assert_eq!(GroupSpec::parse("1234"), Ok(GroupSpec::Id(1234)));
        assert!(GroupSpec::parse("").is_err());
        assert!(GroupSpec::parse("4294967295").is_err());
        assert!(GroupSpec::parse("99999999999").is_err());
        assert!(GroupSpec::parse("a:b").is_err());
        assert!(GroupSpec::parse("a b").is_err());
    }

    #[test]
    fn default_policy_allows_only_the_broker_uid() {
        let p = Policy::default_for(1000);
        assert_eq!(p.check(Op::Publish, "a.b", 1000, &[1000]), Ok(()));
        assert_eq!(p.check(Op::Subscribe, "x", 1000, &[]), Ok(()));
        let d = p.check(Op::Subscribe, "a.b", 0, &[0]).unwrap_err();
        assert_eq!(d.reason, DenyReason::NotBrokerUid { broker_uid: 1000 });
        assert_eq!(
            d.to_string(),
            "uid 0 may not subscribe to 'a.b' (default policy: only the broker's own uid 1000 \
             may publish or subscribe; start the broker with a policy file to allow others)"
        );
        // Being in the broker's group is not enough.
        assert!(p.check(Op::Publish, "a", 1001, &[1000]).is_err());
        assert_eq!(p.path(), None);
        assert_eq!(p.rule_count(), 0);
    }

    const EXAMPLE: &str = r#"
[[allow]]
users = ["alice", 1003]
groups = ["audio"]
publish = ["sensors.*"]
subscribe = ["**"]

[[allow]]
anyone = true
subscribe = ["public.*", "time"]
"#;

    #[test]
    fn file_policy_checks() {
        let p = policy(EXAMPLE).unwrap();
        assert_eq!(p.rule_count(), 2);
        assert_eq!(p.path(), Some(Path::new("/etc/membus/policy.toml")));
        // By user name and by uid.
        assert!(p.check(Op::Publish, "sensors.imu", 1001, &[1001]).is_ok());
        assert!(p.check(Op::Publish, "sensors.imu", 1003, &[1003]).is_ok());
        assert!(p.check(Op::Subscribe, "anything.at.all", 1003, &[]).is_ok());
        assert_eq!(
            p.allowing_rule_line(Op::Publish, "sensors.imu", 1001, &[]),
            Some(2)
        );
        // Not covered by any pattern.
        assert!(p.check(Op::Publish, "sensors", 1001, &[1001]).is_err());
        assert!(
            p.check(Op::Publish, "actuators.arm", 1001, &[1001])
                .is_err()
        );
        // By group: uid 1002's supplementary groups (from /etc/group) include audio (2001).
        let gids = p.client_gids(1002, 1002);
        assert_eq!(gids, vec![1002, 2000, 2001]);
        assert!(p.check(Op::Publish, "sensors.mic", 1002, &gids).is_ok());
        assert!(p.check(Op::Publish, "sensors.mic", 1002, &[1002]).is_err());
        // Anyone, but only what the anyone-rule lists.
        assert!(p.check(Op::Subscribe, "public.news", 4242, &[4242]).is_ok());
        assert!(p.check(Op::Subscribe, "time", 4242, &[]).is_ok());
        assert_eq!(
            p.allowing_rule_line(Op::Subscribe, "time", 4242, &[]),
            Some(8)
        );
        assert!(p.check(Op::Subscribe, "times", 4242, &[]).is_err());
        assert!(p.check(Op::Publish, "public.news", 4242, &[4242]).is_err());
        // With a file, the broker's own uid (here root) gets nothing implicitly.
        let d = p.check(Op::Publish, "x.y", 0, &[0]).unwrap_err();
        assert_eq!(
            d.to_string(),
            "uid 0 may not publish to 'x.y' (policy /etc/membus/policy.toml: no rule allows it)"
        );
        // A malformed topic is denied for that reason, even under `**`.
        let d = p.check(Op::Subscribe, "a..b", 1001, &[]).unwrap_err();
        assert!(matches!(
            d.reason,
            DenyReason::BadTopic(TopicNameError::EmptySegment { .. })
        ));
        assert!(d.to_string().contains("empty segment"), "{d}");
    }

    #[test]
    fn stats_permission_uses_the_rule_syntax() {
        let p = policy(
            "[[allow]]\nusers = [\"alice\"]\nsubscribe = [\"public.*\"]\n\n\
             [[allow]]\ngroups = [\"audio\"]\nstats = true\n",
        )
        .unwrap();
        // A rule may grant stats alone; members of its group see everything.
        assert_eq!(
            p.stats_scope(1002, &p.client_gids(1002, 1002), 4000),
            StatsScope::All
        );
        assert_eq!(p.stats_scope(1001, &[1001], 4000), StatsScope::Permitted);
        assert!(p.may_see_topic("public.news", 1001, &[1001]));
        assert!(!p.may_see_topic("private.x", 1001, &[1001]));
        // Root and the broker's own uid see everything by default.
        assert_eq!(p.stats_scope(0, &[0], 4000), StatsScope::All);
        assert_eq!(p.stats_scope(4000, &[4000], 4000), StatsScope::All);
        let d = Policy::default_for(4000);
        assert_eq!(d.stats_scope(1001, &[1001], 4000), StatsScope::Permitted);
        assert!(!d.may_see_topic("a", 1001, &[1001]));
        // The "allows nothing" error names the new permission.
        let (_, _, reason) = invalid("[[allow]]\nanyone = true\n");
        assert!(reason.contains("stats = true"), "{reason}");
    }

    #[test]
    fn bad_topic_names_the_naming_rule_not_a_permission() {
        let d = Policy::default_for(0)
            .check(Op::Publish, "a b", 0, &[0])
            .unwrap_err();
        let msg = d.to_string();
        assert!(msg.contains("'a b': it is not a topic name"), "{msg}");
        assert!(!msg.contains("may not"), "reads like a denial: {msg}");
        assert!(
            msg.contains("A-Z a-z 0-9 _ -") && msg.contains("single dots"),
            "{msg}"
        );
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = policy("").unwrap();
        assert_eq!(p.rule_count(), 0);
        assert!(p.check(Op::Subscribe, "a", 0, &[0]).is_err());
    }

    #[test]
    fn client_gids_without_file_is_the_primary_gid() {
        assert_eq!(Policy::default_for(0).client_gids(1002, 55), vec![55]);
        let p = policy(EXAMPLE).unwrap();
        // Primary gid already in the list is not repeated.
        assert_eq!(p.client_gids(1001, 2000), vec![2000]);
        assert_eq!(p.client_gids(9999, 9), vec![9]);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let (line, column, reason) = invalid("[[allow]]\nusers = [\"alice\" 1]\nsubscribe = 3\n");
        assert_eq!((line, column), (2, 18), "{reason}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let (line, _, reason) = invalid("[[allow]]\nusers = [1]\nsubcribe = [\"a\"]\n");
        assert_eq!(line, 3);
        assert!(reason.contains("subcribe"), "{reason}");
        let (line, _, reason) = invalid("[[deny]]\nusers = [1]\n");
        assert_eq!(line, 1);
        assert!(reason.contains("deny"), "{reason}");
    }

    #[test]
    fn unknown_names_are_errors_with_position() {
        let (line, column, reason) =
            invalid("[[allow]]\nusers = [1, \"mallory\"]\nsubscribe = [\"a\"]\n");
        assert_eq!((line, column), (2, 13));
        assert!(reason.contains("unknown user \"mallory\""), "{reason}");
        let (line, column, reason) =
            invalid("[[allow]]\ngroups = [\"wheel\"]\nsubscribe = [\"a\"]\n");
        assert_eq!((line, column), (2, 11));
        assert!(reason.contains("unknown group \"wheel\""), "{reason}");
    }

    #[test]
    fn bad_ids_and_types_are_errors() {
        let (_, _, reason) = invalid("[[allow]]\nusers = [-1]\nsubscribe = [\"a\"]\n");
        assert!(reason.contains("out of range"), "{reason}");
        let (_, _, reason) = invalid("[[allow]]\nusers = [4294967295]\nsubscribe = [\"a\"]\n");
        assert!(reason.contains("out of range"), "{reason}");
        let (line, _, _) = invalid("[[allow]]\nusers = [1.5]\nsubscribe = [\"a\"]\n");
        assert_eq!(line, 2);
        let (line, _, _) = invalid("[[allow]]\nusers = \"alice\"\nsubscribe = [\"a\"]\n");
        assert_eq!(line, 2);
    }

    #[test]
    fn bad_patterns_are_errors_with_position() {
        let (line, column, reason) =
            invalid("[[allow]]\nusers = [1]\npublish = [\"ok.*\", \"a.**.b\"]\n");
        assert_eq!((line, column), (3, 20));
        assert!(reason.contains("may only stand alone"), "{reason}");
        let (line, _, reason) = invalid("[[allow]]\nusers = [1]\nsubscribe = [\"*x\"]\n");
        assert_eq!(line, 3);
        assert!(reason.contains("whole segment"), "{reason}");
    }

    #[test]
    fn rules_must_name_someone_and_something() {
        let (line, _, reason) =
            invalid("[[allow]]\nusers = [1]\nsubscribe = [\"a\"]\n[[allow]]\npublish = [\"a\"]\n");
        assert_eq!(line, 4, "{reason}");
        assert!(reason.contains("names nobody"), "{reason}");
        let (line, _, reason) = invalid("\n[[allow]]\nusers = [1]\n");
        assert_eq!(line, 2, "the rule's [[allow]] header: {reason}");
        assert!(reason.contains("allows nothing"), "{reason}");
    }

    #[test]
    fn errors_render_path_line_column() {
        let e = policy("[[allow]]\nusers = [\"mallory\"]\nsubscribe = [\"a\"]\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("/etc/membus/policy.toml:2:10: unknown user"),
            "{s}"
        );
    }

    #[test]
    fn holder_keeps_old_policy_on_bad_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (passwd, group) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(&passwd, PASSWD).unwrap();
        std::fs::write(&group, GROUP).unwrap();
        let db = UserDbPaths {
            passwd,
            group: group.clone(),
        };
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, "[[allow]]\nusers = [\"alice\"]\npublish = [\"a\"]\n").unwrap();
        let mut holder = PolicyHolder::load_with(Some(file.clone()), 0, db).unwrap();
        assert!(holder.policy().check(Op::Publish, "a", 1001, &[]).is_ok());

        std::fs::write(
            &file,
            "[[allow]]\nusers = [\"alice\"]\npublish = [\"a.**\"]\n",
        )
        .unwrap();
        let err = holder.reload().unwrap_err();
        assert!(matches!(err, PolicyError::Invalid { line: 3, .. }), "{err}");
        assert!(
            holder.policy().check(Op::Publish, "a", 1001, &[]).is_ok(),
            "old policy stays"
        );

        std::fs::remove_file(&file).unwrap();
        assert!(matches!(holder.reload(), Err(PolicyError::Read { .. })));
        assert!(
            holder.policy().check(Op::Publish, "a", 1001, &[]).is_ok(),
            "old policy stays"
        );

        std::fs::write(
            &file,
            "[[allow]]\ngroups = [\"robots\"]\npublish = [\"b\"]\n",
        )
        .unwrap();
        holder.reload().unwrap();
        assert!(holder.policy().check(Op::Publish, "a", 1001, &[]).is_err());
        let gids = holder.policy().client_gids(1001, 1001);
        assert!(holder.policy().check(Op::Publish, "b", 1001, &gids).is_ok());

        // Group membership is re-read on reload too.
        std::fs::write(&group, "robots:x:2000:\n").unwrap();
        holder.reload().unwrap();
        assert_eq!(holder.policy().client_gids(1001, 1001), vec![1001]);
    }

    #[test]
    fn holder_without_file() {
        let mut holder = PolicyHolder::load(None, 1234).unwrap();
        assert!(holder.policy().check(Op::Publish, "a", 1234, &[]).is_ok());
        holder.reload().unwrap();
        assert!(holder.policy().check(Op::Publish, "a", 1, &[]).is_err());
        assert!(matches!(
            PolicyHolder::load(Some("/nonexistent/policy.toml".into()), 0),
            Err(PolicyError::Read { .. })
        ));
    }
}
