//! The broker daemon's entry point: arguments, settings, logging, policy, driver, bind, run.
//!
//! Exit codes: 0 after a clean shutdown (SIGINT, SIGTERM); 2 when nothing was started because the
//! command line, the environment, the config file or the policy file is wrong; 1 when the broker
//! could not run (socket in use, bind failed, event loop failed).

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::limits::Limits;

use crate::addr::{AddrError, Listener};
use crate::cli::Args;
use crate::config::Settings;
use crate::driver::{DRIVER_ENV, Driver, DriverChoice, Options};
use crate::engine::Engine;
use crate::policy::PolicyHolder;
use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches};

/// Usage or configuration error: fix the arguments or files.
const EXIT_USAGE: u8 = 2;
/// Runtime error.
const EXIT_RUNTIME: u8 = 1;

/// Runs the broker daemon with these command-line arguments (the first is the program name,
/// as in `std::env::args_os`) until SIGINT or SIGTERM. `bus-broker` is this function; the `bus`
/// command embeds it as `bus broker` (and `bus demo` starts that in a child process).
pub fn main_from<I, T>(argv: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let (args, driver) = parse_args(argv);
    match run(args, driver) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            // Logging may not be up yet (or may be filtered): errors always reach stderr.
            eprintln!("bus-broker: error: {message}");
            ExitCode::from(code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

/// The error and its sources, `: `-separated (the sources the message does not already show).
fn describe(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn usage(error: impl Error) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message: describe(&error),
    }
}

fn runtime(error: impl Error) -> Failure {
    Failure {
        code: EXIT_RUNTIME,
        message: describe(&error),
    }
}

fn usage_msg(message: String) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message,
    }
}

/// `cli::Args` plus `--driver`, added here so that cli.rs stays about the broker's settings.
fn parse_args<I, T>(argv: I) -> (Args, Option<String>)
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let command = Args::command().arg(
        Arg::new("driver")
            .long("driver")
            .value_name("auto|uring|epoll")
            .help(
                "Event loop: io_uring, epoll (readiness, for where io_uring is disabled or \
                 blocked), or auto (io_uring if it works, else epoll) [env: MEMBUS_DRIVER] \
                 [default: auto]",
            ),
    );
    let matches: ArgMatches = command.get_matches_from(argv);
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (args, matches.get_one::<String>("driver").cloned())
}

/// Descriptors kept apart from clients: standard streams, the listener and its lock file, the
/// event loop's own (io_uring or epoll, signalfd, eventfd), log files, the fds a frame may
/// carry before they are closed, and reads of /proc for STATS.
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit (a broker holds a descriptor per ring,
/// cursor page and wake socket; the usual soft limit of 1,024 is far too low). Returns the
/// soft limit in force afterwards.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    match limit.maximum {
        Some(hard) if hard > soft => {
            limit.current = Some(hard);
            match setrlimit(Resource::Nofile, limit) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!("cannot raise the file-descriptor limit to {hard}: {e}");
                    soft
                }
            }
        }
        None => {
            limit.current = None;
            let _ = setrlimit(Resource::Nofile, limit);
            getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
        }
        Some(_) => soft,
    }
}

/// How the broker's file descriptors are shared out (see docs/broker.md, "File descriptors").
#[derive(Debug, PartialEq, Eq)]
pub struct FdPlan {
    /// What the engine may hold for rings, cursor pages and wake sockets, all clients together.
    pub segments: u64,
}

impl FdPlan {
    /// Checks that the limits fit in `nofile` descriptors: the reserve, one per connection
    /// (`limits.max_clients`), and at least one client's full quota
    /// (`limits.max_fds_per_client`). Limits left at their defaults are scaled down to fit
    /// (with a warning); limits the config set that cannot fit are an error naming them.
    pub fn make(limits: &mut Limits, nofile: u64) -> Result<FdPlan, String> {
        let defaults = Limits::default();
        let available = nofile.saturating_sub(RESERVED_FDS);
        let need = |l: &Limits| u64::from(l.max_clients) + u64::from(l.max_fds_per_client) * 2;
        if need(limits) > available {
            let min_quota = u64::from(crate::config::MIN_FDS_PER_CLIENT);
            let clients_default = limits.max_clients == defaults.max_clients;
            let quota_default = limits.max_fds_per_client == defaults.max_fds_per_client;
            let clients = u64::from(limits.max_clients);
            let quota = u64::from(limits.max_fds_per_client);
            // Limits left at their defaults give way to those the config set: half for
            // connections and an eighth per client when both are defaults.
            let scaled = match (clients_default, quota_default) {
                (true, true) => {
                    let quota = (available / 8)
                        .max(min_quota)
                        .min(u64::from(defaults.max_fds_per_client));
                    let clients = (available / 2).min(available.saturating_sub(2 * quota));
                    Some((clients, quota))
                }
                (true, false) => Some((available.saturating_sub(2 * quota), quota)),
                (false, true) => {
                    let quota = (available.saturating_sub(clients) / 2)
                        .min(u64::from(defaults.max_fds_per_client));
                    Some((clients, quota))
                }
                (false, false) => None,
            }
            .filter(|&(clients, quota)| clients >= 1 && quota >= min_quota);
            let Some((clients, quota)) = scaled else {
                return Err(format!(
                    "limits.max_clients ({}) plus twice limits.max_fds_per_client ({}) plus \
                     {RESERVED_FDS} reserved descriptors need {} file descriptors, but the \
                     broker may open only {nofile} (RLIMIT_NOFILE); lower those limits in the \
                     config, or raise the limit (ulimit -n, or LimitNOFILE= in the systemd unit)",
                    limits.max_clients,
                    limits.max_fds_per_client,
                    need(limits) + RESERVED_FDS
                ));
            };
            limits.max_clients = clients.min(u64::from(u32::MAX)) as u32;
            limits.max_fds_per_client = quota as u32;
            tracing::warn!(
                "the file-descriptor limit is {nofile} (RLIMIT_NOFILE): limits.max_clients is \
                 {} and limits.max_fds_per_client {} (what the config leaves at its default is \
                 lowered to fit); raise the limit (ulimit -n, LimitNOFILE=) for more",
                limits.max_clients,
                limits.max_fds_per_client
            );
        }
        Ok(FdPlan {
            segments: available - u64::from(limits.max_clients),
        })
    }
}

/// How long a socket that answers while no broker holds its lock is re-probed (see [`bind`]).
const UNLOCKED_SOCKET_RETRY: Duration = Duration::from_secs(2);

/// Binds the socket. A socket that answers a connection although no broker holds its lock is
/// usually a broker killed with SIGKILL while it used io_uring: the kernel tears a dead
/// process's ring down in a worker, and until then the ring's accept op keeps the listening
/// socket alive (connections queue in its backlog). So that case is re-probed for a short while
/// before the broker refuses to start.
fn bind(settings: &Settings) -> Result<Listener, AddrError> {
    let give_up = Instant::now() + UNLOCKED_SOCKET_RETRY;
    loop {
        match Listener::bind(&settings.socket, &settings.bind) {
            Err(AddrError::LiveUnlocked { .. }) if Instant::now() < give_up => {
                tracing::debug!("socket answers but its lock is free: probing again");
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn run(args: Args, driver_flag: Option<String>) -> Result<(), Failure> {
    let env = |k: &str| std::env::var_os(k);
    let uid = rustix::process::geteuid().as_raw();
    let mut settings = Settings::resolve(&args, env, uid).map_err(usage)?;
    crate::log::init(&settings.log).map_err(usage)?;
    for note in &settings.notes {
        tracing::warn!("{note}");
    }
    let fds = FdPlan::make(&mut settings.limits, raise_fd_limit()).map_err(usage_msg)?;

    let choice = match driver_flag {
        Some(text) => {
            DriverChoice::parse(&text).map_err(|e| usage_msg(format!("--driver: {e}")))?
        }
        None => match env(DRIVER_ENV).filter(|v| !v.is_empty()) {
            Some(text) => DriverChoice::parse(&text.to_string_lossy())
                .map_err(|e| usage_msg(format!("{DRIVER_ENV}: {e}")))?,
            None => DriverChoice::Auto,
        },
    };

    let policy = PolicyHolder::load(settings.policy.clone(), uid).map_err(|e| {
        usage_msg(format!(
            "policy file rejected: {}; fix it, or remove `policy` from the config to allow \
                 only uid {uid}",
            describe(&e)
        ))
    })?;

    // Before any thread exists: blocks SIGINT/SIGTERM/SIGHUP for the signalfd.
    let driver = Driver::new(choice).map_err(runtime)?;
    if let Some(reason) = driver.fallback_reason() {
        tracing::warn!(
            "io_uring is not usable here ({reason}); running on the epoll driver (same \
             behaviour, more system calls per event)"
        );
    }

    let mut listener = match Listener::from_systemd(env).map_err(runtime)? {
        Some(activated) => activated,
        None => bind(&settings).map_err(runtime)?,
    };

    let mut engine = Engine::new(
        settings.limits.clone(),
        settings.topics.clone(),
        policy.policy().clone(),
        Instant::now(),
    );
    engine.set_fd_budget(fds.segments);
    let options = Options::new(policy);

    let version = env!("CARGO_PKG_VERSION");
    let kind = driver.kind();
    tracing::info!(
        socket = %listener.addr(),
        from = %settings.socket_source,
        driver = %kind,
        policy = settings.policy.as_ref().map(|p| p.display().to_string()).as_deref().unwrap_or("default (own uid only)"),
        "bus-broker {version} started"
    );
    println!(
        "bus-broker {version} listening on {} (driver: {kind}, pid {})",
        listener.addr(),
        std::process::id()
    );

    let result = driver.run(&listener, engine, options);
    listener.cleanup();
    match result {
        Ok(()) => {
            tracing::info!("shut down cleanly");
            Ok(())
        }
        Err(e) => {
            tracing::error!("the broker stopped on an error: {e}");
            Err(runtime(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_a_usual_limit() {
        // 20,000 is a hard limit seen on CI machines: the defaults (and the benchmark's 10,000
        // clients) must fit it unscaled.
        let mut limits = Limits::default();
        FdPlan::make(&mut limits, 20_000).unwrap();
        assert_eq!(limits, Limits::default(), "nothing scaled at 20,000");
        let plan = FdPlan::make(&mut limits, 1 << 20).unwrap();
        assert_eq!(limits, Limits::default(), "nothing scaled");
        assert_eq!(
            plan.segments,
            (1 << 20) - RESERVED_FDS - u64::from(limits.max_clients)
        );
    }

    /// Hardening item 5: under RLIMIT_NOFILE 1024 the defaults are scaled so that one client's
    /// quota is a fraction of the budget: nobody can use it all up.
    #[test]
    fn defaults_scale_down_to_a_small_limit() {
        let mut limits = Limits::default();
        let plan = FdPlan::make(&mut limits, 1024).unwrap();
        let quota = u64::from(limits.max_fds_per_client);
        assert!(quota * 2 <= plan.segments, "{limits:?} {plan:?}");
        assert!(
            RESERVED_FDS + u64::from(limits.max_clients) + plan.segments <= 1024,
            "{limits:?} {plan:?}"
        );
    }

    /// Found by review: one limit set in the config stopped the other, left at its default,
    /// from being scaled.
    #[test]
    fn a_default_limit_gives_way_to_a_configured_one() {
        let mut limits = Limits {
            max_fds_per_client: 8,
            ..Limits::default()
        };
        let plan = FdPlan::make(&mut limits, 256).unwrap();
        assert_eq!(limits.max_fds_per_client, 8);
        assert_eq!(u64::from(limits.max_clients), 256 - RESERVED_FDS - 16);
        assert!(plan.segments >= 16);
        let mut limits = Limits {
            max_clients: 100,
            ..Limits::default()
        };
        let plan = FdPlan::make(&mut limits, 1024).unwrap();
        assert_eq!(limits.max_clients, 100);
        assert!(
            u64::from(limits.max_fds_per_client) * 2 <= plan.segments,
            "{limits:?}"
        );
    }

    #[test]
    fn configured_limits_that_cannot_fit_are_refused_naming_them() {
        let mut limits = Limits {
            max_clients: 1000,
            max_fds_per_client: 64,
            ..Limits::default()
        };
        let err = FdPlan::make(&mut limits, 1024).unwrap_err();
        assert!(
            err.contains("limits.max_clients")
                && err.contains("limits.max_fds_per_client")
                && err.contains("RLIMIT_NOFILE"),
            "{err}"
        );
        let mut tiny = Limits::default();
        assert!(
            FdPlan::make(&mut tiny, 40).is_err(),
            "not even the reserve fits"
        );
    }
}
