//! Test support shared by the membus crates' integration tests. Not published; only ever a
//! dev-dependency.
//!
//! [`Broker`] is a real broker process (`bus-broker`, or `bus broker`) for one test: it listens
//! on a socket in its own private temporary directory, is ready when [`Start::run`] returns
//! (it printed its start line and accepted and released a connection), writes its log to a file
//! the test can read, and is killed and reaped on drop, its directory removed. [`Start`] says
//! how to start it: driver, log level, config and policy files, extra arguments, environment,
//! an RLIMIT_NOFILE, another socket address.
//!
//! The binaries are the ones cargo built beside the test executable (`target/<profile>/`);
//! [`built_binary`] finds them and names the build command when one is missing.
//!
//! This crate depends on no membus crate, so that every one of them (bus-core and bus-client
//! included) can use it without a dependency cycle; callers add their own client helpers.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// How long anything may take before a test fails (generous: CI machines are shared).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds, failing after [`DEADLINE`].
#[track_caller]
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_for(what, DEADLINE, cond)
}

/// Polls `cond` (1 ms apart at first, backing off to 20 ms) until it holds, failing after
/// `limit`.
#[track_caller]
pub fn wait_until_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out ({limit:?}) waiting until {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to `want` (at most the hard limit). Brokers
/// started afterwards inherit it; tests with many clients need it for their own sockets.
pub fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(want, |max| max.min(want));
    if limit.current.is_none_or(|c| c < want) {
        limit.current = Some(want);
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// The target directory of the running test executable: `target/<profile>` (tests run from
/// `target/<profile>/deps/`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the test executable's directory");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent().unwrap_or(dir).to_owned()
    } else {
        dir.to_owned()
    }
}

/// `rel` under [`target_dir`] (`bus-broker`, `examples/pubsub`); panics, naming `build` (the
/// command that builds it), if it does not exist.
#[track_caller]
pub fn built_binary(rel: &str, build: &str) -> PathBuf {
    let path = target_dir().join(rel);
    assert!(
        path.is_file(),
        "{} does not exist: build it first: {build}",
        path.display()
    );
    path
}

/// Which program runs the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The `bus-broker` daemon.
    BusBroker,
    /// The daemon embedded in the `bus` command: `bus broker`.
    Bus,
}

impl Program {
    /// The binary, from [`built_binary`].
    #[track_caller]
    pub fn binary(self) -> PathBuf {
        match self {
            Program::BusBroker => built_binary("bus-broker", "cargo build -p bus-broker"),
            Program::Bus => built_binary("bus", "cargo build -p bus-cli"),
        }
    }
}

/// How to start a [`Broker`]. Every setting has a default: `bus-broker`, the driver from the
/// environment (`MEMBUS_DRIVER`, else the broker's own choice), log level `warn`, no config
/// file, `DIR/bus.sock` in the broker's private temporary directory.
#[derive(Clone, Debug)]
pub struct Start {
    program: Program,
    driver: Option<String>,
    log: String,
    config: Option<String>,
    policy: Option<String>,
    socket: Option<OsString>,
    nofile: Option<u64>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
}

impl Default for Start {
    fn default() -> Start {
        Start::new(Program::BusBroker)
    }
}

impl Start {
    /// Defaults, with `program`.
    pub fn new(program: Program) -> Start {
        Start {
            program,
            driver: None,
            log: "warn".into(),
            config: None,
            policy: None,
            socket: None,
            nofile: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `MEMBUS_DRIVER` for the broker: `epoll`, `uring`, `auto` (or anything, to test refusal).
    pub fn driver(mut self, driver: &str) -> Start {
        self.driver = Some(driver.into());
        self
    }

    /// `MEMBUS_LOG` for the broker (`warn` unless set; `info` for tests that read the log).
    pub fn log(mut self, filter: &str) -> Start {
        self.log = filter.into();
        self
    }

    /// A config file with `text`, written to `DIR/broker.toml` and passed as `--config`.
    pub fn config(mut self, text: impl Into<String>) -> Start {
        self.config = Some(text.into());
        self
    }

    /// A policy file with `text`, written to `DIR/policy.toml` and named by a `policy = ...`
    /// line put first in the config file (so `text` of [`Start::config`] must not set one).
    /// [`Broker::policy_path`] is where to rewrite it before a SIGHUP.
    pub fn policy(mut self, text: impl Into<String>) -> Start {
        self.policy = Some(text.into());
        self
    }

    /// `--socket ADDR` instead of `DIR/bus.sock`: a path (the test owns its directory), or
    /// `@NAME` for an abstract name.
    pub fn socket(mut self, addr: impl AsRef<OsStr>) -> Start {
        self.socket = Some(addr.as_ref().to_owned());
        self
    }

    /// RLIMIT_NOFILE (soft = hard = `n`) for the broker process, set by running it under
    /// `prlimit` (util-linux), which execs it: the pid is still the broker's.
    pub fn nofile(mut self, n: u64) -> Start {
        self.nofile = Some(n);
        self
    }

    /// One more command-line argument for the broker.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Start {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// An environment variable for the broker.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Start {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// An environment variable the broker must not inherit. (`MEMBUS_SOCKET`, `LISTEN_PID`
    /// and `LISTEN_FDS` never reach it anyway.)
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Start {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Starts the broker and waits until it is ready; panics if it does not start.
    #[track_caller]
    pub fn run(self) -> Broker {
        self.try_run()
            .unwrap_or_else(|r| panic!("the broker did not start: {r}"))
    }

    /// Starts the broker and waits until it is ready. `Err` if it exited instead, without a
    /// start line (its exit status and stderr). Panics if it neither starts nor exits in time.
    #[track_caller]
    pub fn try_run(self) -> Result<Broker, Refused> {
        let dir = tempfile::Builder::new()
            .prefix("membus-test-")
            .tempdir()
            .expect("a temporary directory for the broker");
        let socket = match &self.socket {
            Some(s) => s.clone(),
            None => dir.path().join("bus.sock").into_os_string(),
        };
        let config = match (&self.config, &self.policy) {
            (None, None) => None,
            (config, policy) => {
                let mut text = String::new();
                if let Some(policy) = policy {
                    let path = dir.path().join("policy.toml");
                    std::fs::write(&path, policy).expect("write the policy file");
                    text.push_str(&format!("policy = {:?}\n", path.display().to_string()));
                }
                text.push_str(config.as_deref().unwrap_or(""));
                let path = dir.path().join("broker.toml");
                std::fs::write(&path, text).expect("write the config file");
                Some(path)
            }
        };
        let mut broker = Broker {
            start: self,
            process: None,
            socket: PathBuf::from(socket),
            config,
            stderr: PathBuf::new(),
            start_line: String::new(),
            dir,
        };
        broker.spawn()?;
        Ok(broker)
    }
}

/// A broker that exited instead of starting.
#[derive(Debug)]
pub struct Refused {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; its stderr: {}", self.status, self.stderr)
    }
}

/// The running process of a [`Broker`].
#[derive(Debug)]
struct Process {
    child: Child,
    pid: u32,
}

/// A running broker process, ready for clients. Killed (SIGKILL) and reaped on drop if still
/// running; its temporary directory (socket, config, policy, logs) is removed after that. If
/// the test is failing (the thread is panicking), the broker's stderr is printed first.
#[derive(Debug)]
pub struct Broker {
    start: Start,
    /// `None` only while a start is under way.
    process: Option<Process>,
    socket: PathBuf,
    config: Option<PathBuf>,
    stderr: PathBuf,
    start_line: String,
    // Last: removed after the process is gone.
    dir: tempfile::TempDir,
}

static STARTS: AtomicU32 = AtomicU32::new(0);

impl Broker {
    /// A `bus-broker` with every default of [`Start`].
    #[track_caller]
    pub fn start() -> Broker {
        Start::default().run()
    }

    /// Spawns the process and waits for its start line, then for it to take a connection.
    #[track_caller]
    fn spawn(&mut self) -> Result<(), Refused> {
        let s = &self.start;
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        self.stderr = self.dir.path().join(format!("broker-{n}.stderr"));
        let bin = s.program.binary();
        let mut cmd = match s.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => Command::new(bin),
        };
        if s.program == Program::Bus {
            cmd.arg("broker");
        }
        cmd.arg("--socket").arg(&self.socket);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(&s.args)
            .env("MEMBUS_LOG", &s.log)
            .env_remove("MEMBUS_SOCKET")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS");
        if let Some(driver) = &s.driver {
            cmd.env("MEMBUS_DRIVER", driver);
        }
        for (key, value) in &s.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&self.stderr).expect("create the broker's stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let pid = child.id();
        // From here on, a panic kills the process (Drop).
        self.process = Some(Process { child, pid });
        // The first line is the start line; the rest is read (and dropped) so that the broker
        // never writes into a closed pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
            for _ in lines.map_while(Result::ok) {}
        });
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "the broker printed no start line within {DEADLINE:?}; its stderr: {}",
                self.stderr()
            )
        });
        if line.is_empty() {
            let status = self.wait_exit();
            return Err(Refused {
                status,
                stderr: self.stderr(),
            });
        }
        assert!(
            line.contains("listening on"),
            "the broker's first line is not its start line: {line:?}; its stderr: {}",
            self.stderr()
        );
        self.start_line = line;
        if let Err(e) = probe(self.socket.as_os_str()) {
            panic!(
                "the broker says {:?} but did not take a connection on {}: {e}; its stderr: {}",
                self.start_line,
                self.socket.display(),
                self.stderr()
            );
        }
        Ok(())
    }

    fn process(&self) -> &Process {
        self.process.as_ref().expect("a broker process")
    }

    fn child(&mut self) -> &mut Child {
        &mut self.process.as_mut().expect("a broker process").child
    }

    /// The address it listens on, as given to `--socket` (a path, or `@NAME`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its private temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file, if [`Start::config`] or [`Start::policy`] asked for one.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The policy file of [`Start::policy`] (`DIR/policy.toml`; rewrite it, then SIGHUP).
    pub fn policy_path(&self) -> Option<PathBuf> {
        self.start
            .policy
            .as_ref()
            .map(|_| self.dir.path().join("policy.toml"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process().pid
    }

    /// The line the broker printed when it started listening (`bus-broker VERSION listening on
    /// ADDR (driver: KIND, pid PID)`).
    pub fn start_line(&self) -> &str {
        &self.start_line
    }

    /// Everything the current process wrote to stderr so far (its log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The file that collects the current process's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.pid() as i32).expect("a valid pid");
        rustix::process::kill_process(pid, sig).expect("signal the broker");
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child().try_wait().expect("try_wait").is_none()
    }

    /// Waits (up to [`DEADLINE`]) for the process to exit and reaps it.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the broker exits", || {
            status = self.child().try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("an exit status")
    }

    /// SIGKILL, and reaps the process: the broker dies without a word and leaves its socket
    /// and lock files behind. Does nothing if it has exited already.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.as_mut() {
            if p.child.try_wait().ok().flatten().is_none() {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
    }

    /// Starts the broker again, the same way, on the same socket, after killing the current
    /// process (SIGKILL) if it still runs; panics if it does not start.
    #[track_caller]
    pub fn restart(&mut self) {
        self.try_restart()
            .unwrap_or_else(|r| panic!("the broker did not restart: {r}"))
    }

    /// [`Broker::restart`], with `Err` if the new process exited instead of starting.
    #[track_caller]
    pub fn try_restart(&mut self) -> Result<(), Refused> {
        self.kill();
        self.process = None;
        self.start_line.clear();
        self.spawn()
    }

    /// Its open file descriptors (entries of /proc/PID/fd).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the broker's /proc/PID/fd")
            .count()
    }

    /// The fd count once it has not changed for five polls in a row.
    #[track_caller]
    pub fn settled_fds(&self) -> usize {
        let mut last = self.open_fds();
        let mut stable = 0;
        wait_until("the broker's fd count settles", || {
            let now = self.open_fds();
            if now == last {
                stable += 1;
            } else {
                stable = 0;
                last = now;
            }
            stable >= 5
        });
        last
    }

    /// Waits until the fd count is back to `baseline`; the failure names `after`.
    #[track_caller]
    pub fn expect_fds(&self, baseline: usize, after: &str) {
        let end = Instant::now() + DEADLINE;
        let mut now = self.open_fds();
        while now != baseline && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
            now = self.open_fds();
        }
        assert_eq!(
            now, baseline,
            "the broker's fd count returns to its baseline after {after}"
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && self.process.is_some() {
            let log = self.stderr();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(100)..];
            eprintln!(
                "--- the broker's stderr (last {} lines) ---\n{}\n---",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Connects to `addr` (a path or `@NAME`), shuts the connection down for writing, and reads
/// until the broker closes it (end of stream): the broker has then accepted a client and let it
/// go again, so it is serving, and the probe no longer counts against its client limit.
fn probe(addr: &OsStr) -> io::Result<()> {
    use rustix::io::Errno;
    use rustix::net::{
        AddressFamily, RecvFlags, Shutdown, SocketAddrUnix, SocketFlags, SocketType, sockopt,
    };
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let sa = match addr.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddrUnix::new_abstract_name(name)?,
        None => SocketAddrUnix::new(addr)?,
    };
    rustix::net::connect(&fd, &sa)?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(DEADLINE))?;
    rustix::net::shutdown(&fd, Shutdown::Write)?;
    let mut buf = [0u8; 1024];
    loop {
        match rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
            Ok((0, _)) => return Ok(()),
            Ok(_) | Err(Errno::INTR) => {}
            // What a listener whose process died does to the connections it queued (on
            // io_uring the kernel keeps it bound for a moment after the process is gone).
            Err(Errno::CONNRESET) => {
                return Err(io::Error::other(
                    "the connection was reset: nobody accepted it",
                ));
            }
            Err(Errno::AGAIN) => {
                return Err(io::Error::other(format!(
                    "it kept the connection open for {DEADLINE:?}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_serves_then_leaves_nothing_behind() {
        let b = Start::new(Program::BusBroker).driver("epoll").run();
        assert!(
            b.start_line().contains("listening on"),
            "{}",
            b.start_line()
        );
        assert!(
            b.start_line().contains("driver: epoll"),
            "{}",
            b.start_line()
        );
        assert!(b.socket().starts_with(b.dir()));
        probe(b.socket().as_os_str()).expect("a second probe");
        let (pid, dir) = (b.pid(), b.dir().to_owned());
        drop(b);
        assert!(!dir.exists(), "{} left behind", dir.display());
        // Reaped: no /proc entry, not even a zombie's.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} remains"
        );
    }

    #[test]
    fn kill_leaves_the_socket_and_restart_takes_it_over() {
        let mut b = Broker::start();
        let first = b.pid();
        b.kill();
        assert!(!b.is_running());
        assert!(
            b.socket().exists(),
            "a killed broker leaves its socket file"
        );
        assert!(probe(b.socket().as_os_str()).is_err(), "nobody serves it");
        b.restart();
        assert_ne!(b.pid(), first);
        probe(b.socket().as_os_str()).expect("the restarted broker serves");
    }

    #[test]
    fn a_second_broker_on_the_socket_is_refused_with_its_stderr() {
        let b = Start::new(Program::BusBroker).log("info").run();
        let r = Start::new(Program::BusBroker)
            .socket(b.socket())
            .try_run()
            .expect_err("a second broker started on the same socket");
        assert!(!r.status.success());
        assert!(
            r.stderr.contains(&format!("pid {}", b.pid())),
            "{}",
            r.stderr
        );
    }

    #[test]
    fn config_policy_env_and_args_reach_the_broker() {
        let uid = rustix::process::geteuid().as_raw();
        let b = Start::new(Program::BusBroker)
            .log("info")
            .config("[limits]\nmax_clients = 7\n")
            .policy(format!("[[allow]]\nusers = [{uid}]\npublish = [\"**\"]\n"))
            .env("MEMBUS_DRIVER", "epoll")
            .arg("--mode")
            .arg("0600")
            .run();
        let config = std::fs::read_to_string(b.config_path().unwrap()).unwrap();
        assert!(config.starts_with("policy = "), "{config}");
        assert!(config.contains("max_clients = 7"), "{config}");
        assert!(b.policy_path().unwrap().is_file());
        assert!(
            b.start_line().contains("driver: epoll"),
            "{}",
            b.start_line()
        );
        let log = b.stderr();
        assert!(
            log.contains("policy.toml"),
            "the policy is named in the log: {log}"
        );
    }

    #[test]
    fn an_unknown_driver_is_refused() {
        let r = Start::new(Program::BusBroker)
            .driver("carrier-pigeon")
            .try_run()
            .expect_err("started with a bad driver");
        assert_eq!(r.status.code(), Some(2), "{r}");
        assert!(r.stderr.contains("MEMBUS_DRIVER"), "{r}");
    }

    #[test]
    #[should_panic(expected = "build it first: cargo build -p nothing")]
    fn a_missing_binary_names_the_build_command() {
        built_binary("no-such-membus-binary", "cargo build -p nothing");
    }
}
