//! `bus`: publish, subscribe, inspect and benchmark a membus from the command line.
//!
//! Exit codes: 0 success; 1 a runtime failure (no broker, refused request, lost connection);
//! 2 a usage error (clap's own).
#![deny(unsafe_code)]

#[cfg(feature = "bench")]
mod bench;
mod demo;
mod pace;
mod pubsub;
mod stat;
mod table;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bus",
    version,
    about = "Publish, subscribe, inspect and benchmark a membus",
    after_help = "Examples:\n  \
        bus demo                              start a private broker, stream, print latency\n  \
        bus sub sensors.imu --latency         print messages and their latency\n  \
        bus pub sensors.imu hello             publish one message\n  \
        seq 10 | bus pub numbers              one message per input line\n  \
        bus pub load --count 100000 --size 256 --rate 50000\n  \
        bus stat                              topics, publishers, subscribers, lag\n  \
        bus bench latency --size 64           two-process ping-pong over membus rings\n  \
        bus bench latency --wait park --json  the parked path, as JSON\n  \
        bus broker --socket @test             run a broker (same as bus-broker)\n\n\
        The broker socket is --socket, else $MEMBUS_SOCKET, else $XDG_RUNTIME_DIR/membus/bus.sock."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a private broker (unless one runs), stream between two processes, print latency.
    Demo(demo::DemoArgs),
    /// Publish messages (arguments, standard input lines, or generated).
    Pub(pubsub::PubArgs),
    /// Subscribe and print messages.
    Sub(pubsub::SubArgs),
    /// Show the broker's topics, publishers and subscribers.
    Stat(stat::StatArgs),
    /// Measure latency or throughput between two processes (see also `benches`).
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
    /// Measure latency or throughput (this `bus` was built without the harness: the cargo
    /// feature `bench`).
    #[cfg(not(feature = "bench"))]
    #[command(disable_help_flag = true)]
    Bench {
        /// Ignored: says how to get the harness.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run a broker in this process (the same program as `bus-broker`; `bus broker --help`).
    #[command(disable_help_flag = true)]
    Broker {
        /// Arguments for the broker.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// A hidden sub-command: the processes `bus demo` starts.
type HiddenCommand = fn(&[String]) -> anyhow::Result<()>;

// Counts heap allocations so that `bus bench` cases can report allocations per message: only
// in a `bus` built as a benchmark tool (feature `bench`).
#[cfg(feature = "bench")]
#[global_allocator]
static ALLOC: benches::alloc_count::Counting = benches::alloc_count::Counting;

/// What `bus bench` says in a `bus` built without the harness.
#[cfg(not(feature = "bench"))]
const NO_BENCH: &str = "this `bus` was built without the benchmark harness; build it with \
    `cargo build --release -p bus-cli --features bench` (add `peers` for iceoryx2 and ZeroMQ), \
    or run the harness itself: `cargo run --release -p benches -- report --quick`";

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // Benchmarks re-execute this program as their second process.
    #[cfg(feature = "bench")]
    if argv
        .get(1)
        .is_some_and(|a| a == benches::peer::PEER_SUBCOMMAND)
    {
        let rest: Vec<String> = argv[2..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return match benches::peer::peer_main(&rest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bus: benchmark peer failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // `bus demo` runs its publisher and subscriber as this program, too.
    let hidden: Option<HiddenCommand> = match argv.get(1).and_then(|a| a.to_str()) {
        Some("__demo-sub") => Some(demo::demo_sub),
        Some("__demo-pub") => Some(demo::demo_pub),
        _ => None,
    };
    if let Some(child) = hidden {
        let rest: Vec<String> = argv[2..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return match child(&rest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bus: demo process failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse_from(&argv);
    let result = match cli.command {
        #[cfg(feature = "bench")]
        Command::Bench(a) => bench::run(a),
        #[cfg(not(feature = "bench"))]
        Command::Bench { .. } => {
            eprintln!("bus: error: {NO_BENCH}");
            return ExitCode::from(2);
        }
        Command::Demo(a) => demo::run(a),
        Command::Pub(a) => pubsub::run_pub(a),
        Command::Sub(a) => pubsub::run_sub(a),
        Command::Stat(a) => stat::run(a),
        Command::Broker { args } => {
            let argv = std::iter::once(OsString::from("bus broker")).chain(args);
            return bus_broker::daemon::main_from(argv);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bus: error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: many of our errors already include
/// their source's text in their own message, which `{:#}` would repeat.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    /// An error whose message already contains its source's, as thiserror's `{0}` + `#[from]`
    /// make them.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "control socket error: {}", self.0)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let inner = std::io::Error::other("topic is 256 bytes");
        let e = anyhow::Error::new(Outer(inner)).context("bus pub");
        assert_eq!(
            error_text(&e),
            "bus pub: control socket error: topic is 256 bytes"
        );
    }
}
