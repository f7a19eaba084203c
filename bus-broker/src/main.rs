//! `bus-broker`: the membus control-plane daemon. See `docs/broker.md`.
//!
//! Exit codes: 0 after a clean shutdown (SIGINT, SIGTERM); 2 when nothing was started because the
//! command line, the environment, the config file or the policy file is wrong; 1 when the broker
//! could not run (socket in use, bind failed, event loop failed).

use std::process::ExitCode;

fn main() -> ExitCode {
    bus_broker::daemon::main_from(std::env::args_os())
}
