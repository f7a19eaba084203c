//! `benches syscalls`: system calls per message in the streaming cases, counted with `strace`.
//!
//! For each case (default: `membus-stream-64`) the benches binary runs
//! itself twice under `strace -f -ff -qq -o DIR/t` with the hidden command `__once` (one run of
//! one case): once with the usual stream length (`--quick`: 1/100) and once with a stream of a
//! single message. strace writes one file per thread; each file is attributed to its process by
//! the program it executed (the benches parent = publisher, `__peer` = subscriber, `bus-broker`)
//! or, for threads that never call execve, by the thread that cloned them. Then
//!
//! ```text
//! syscalls per message = (calls in the long run - calls in the 1-message run) / (N - 1)
//! ```
//!
//! per process, which removes start-up and tear-down (spawn, mmap, sealing, the handshake) and
//! leaves what the stream itself costs. strace stops a process only at system calls, so a loop
//! that makes none runs at full speed under it; a loop that makes some is slowed, which does not
//! change the count.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// Cases counted when none is named.
pub const DEFAULT_CASES: &[&str] = &["membus-stream-64"];

/// Counts of one run: per process role, per system call name.
type Counts = BTreeMap<String, BTreeMap<String, u64>>;

/// One process role's counts: (role, calls in the long run, calls in the 1-message run, the
/// calls that grew most with N).
pub type RoleCount = (String, u64, u64, Vec<(String, i64)>);

/// What one case measured.
#[derive(Debug)]
pub struct CaseCount {
    /// Case name.
    pub case: String,
    /// Messages in the long run.
    pub messages: u64,
    /// Per role: (calls in the long run, calls in the 1-message run, top calls by delta).
    pub roles: Vec<RoleCount>,
}

impl CaseCount {
    /// Calls per message of `role` (the difference of the two runs over N - 1 messages).
    pub fn per_message(&self, long: u64, short: u64) -> f64 {
        (long as f64 - short as f64) / (self.messages.saturating_sub(1).max(1)) as f64
    }
}

/// Runs the count for `cases` with `exe` (the benches binary); `quick` shortens the long run.
pub fn count(exe: &Path, cases: &[String], quick: bool) -> Result<Vec<CaseCount>> {
    let strace = which("strace").context(
        "`benches syscalls` needs strace (e.g. `apt-get install -y strace`); it was not found \
         in PATH",
    )?;
    let mut out = Vec::new();
    for case in cases {
        let (long, messages) = traced_run(&strace, exe, case, quick, false)?;
        let (short, _) = traced_run(&strace, exe, case, quick, true)?;
        let mut roles = Vec::new();
        for (role, calls) in &long {
            let empty = BTreeMap::new();
            let base = short.get(role).unwrap_or(&empty);
            let l: u64 = calls.values().sum();
            let s: u64 = base.values().sum();
            let mut delta: Vec<(String, i64)> = calls
                .iter()
                .map(|(name, &n)| {
                    (
                        name.clone(),
                        n as i64 - *base.get(name).unwrap_or(&0) as i64,
                    )
                })
                .filter(|(_, d)| *d > 0)
                .collect();
            delta.sort_by_key(|d| std::cmp::Reverse(d.1));
            delta.truncate(5);
            roles.push((role.clone(), l, s, delta));
        }
        out.push(CaseCount {
            case: case.clone(),
            messages,
            roles,
        });
    }
    Ok(out)
}

/// The markdown table of `counts`.
pub fn markdown(counts: &[CaseCount]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| case | process | messages | calls (N messages) | calls (1 message) | syscalls / message | calls that grew with N |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for c in counts {
        for (role, long, short, delta) in &c.roles {
            let grew = if delta.is_empty() {
                "-".to_owned()
            } else {
                delta
                    .iter()
                    .map(|(n, d)| format!("{n} +{d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "| {} | {role} | {} | {long} | {short} | {:.6} | {grew} |",
                c.case,
                c.messages,
                c.per_message(*long, *short)
            );
        }
    }
    s
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// One run of `case` under strace; returns the counts and the message count it reported.
fn traced_run(
    strace: &Path,
    exe: &Path,
    case: &str,
    quick: bool,
    one_message: bool,
) -> Result<(Counts, u64)> {
    let dir = std::env::temp_dir().join(format!(
        "membus-bench-strace-{}-{case}-{}",
        std::process::id(),
        if one_message { "1" } else { "n" }
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(strace);
    cmd.args(["-f", "-ff", "-qq", "-o"])
        .arg(dir.join("t"))
        .arg(exe)
        .args(["__once", "--case", case]);
    if quick {
        cmd.arg("--quick");
    }
    if one_message {
        cmd.args(["--stream-div", &u64::MAX.to_string()]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {} under strace", exe.display()))?;
    ensure!(
        out.status.success(),
        "{case} under strace failed ({})",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let messages = stdout
        .lines()
        .find_map(|l| l.strip_prefix("messages "))
        .and_then(|v| v.trim().parse().ok())
        .context("__once did not report its message count")?;
    let counts = parse_dir(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((counts, messages))
}

/// One strace -ff file: its tid, the program it executed (if any), the tids it cloned, and its
/// calls by name.
struct Trace {
    exec: Option<String>,
    children: Vec<u32>,
    calls: BTreeMap<String, u64>,
}

fn parse_dir(dir: &Path) -> Result<Counts> {
    let mut traces: HashMap<u32, Trace> = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(tid) = path
            .extension()
            .and_then(|e| e.to_str())
            .and_then(|e| e.parse::<u32>().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let mut t = Trace {
            exec: None,
            children: Vec::new(),
            calls: BTreeMap::new(),
        };
        for line in text.lines() {
            let Some(paren) = line.find('(') else {
                continue;
            };
            let name = &line[..paren];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                continue;
            }
            *t.calls.entry(name.to_owned()).or_default() += 1;
            if name == "execve" && line.ends_with("= 0") {
                t.exec = Some(line.to_owned());
            }
            if (name == "clone" || name == "clone3" || name == "fork" || name == "vfork")
                && let Some(ret) = line.rsplit("= ").next()
                && let Ok(child) = ret.trim().parse::<u32>()
            {
                t.children.push(child);
            }
        }
        traces.insert(tid, t);
    }
    if traces.is_empty() {
        bail!("strace wrote no trace files in {}", dir.display());
    }
    let role_of_exec = |exec: &str| {
        if exec.contains("\"__peer\"") {
            "subscriber (peer process)"
        } else if exec.contains("bus-broker") {
            "bus-broker"
        } else {
            "publisher (parent process)"
        }
    };
    // Parent links: tid -> the tid that cloned it.
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for (&tid, t) in &traces {
        for &c in &t.children {
            parent.insert(c, tid);
        }
    }
    let mut counts = Counts::new();
    for (&tid, t) in &traces {
        let mut role = None;
        let mut cur = tid;
        let mut thread = false;
        for _ in 0..64 {
            if let Some(e) = traces.get(&cur).and_then(|x| x.exec.as_deref()) {
                role = Some(role_of_exec(e));
                break;
            }
            match parent.get(&cur) {
                Some(&p) => {
                    cur = p;
                    thread = true;
                }
                None => break,
            }
        }
        let mut role = role.unwrap_or("unattributed").to_owned();
        if thread {
            role.push_str(", other threads");
        }
        let entry = counts.entry(role).or_default();
        for (name, n) in &t.calls {
            *entry.entry(name.clone()).or_default() += n;
        }
    }
    Ok(counts)
}
