//! The `bus-broker` command line. [`Args`] is plain data: `Args::parse_from` (clap's
//! [`clap::Parser`]) builds it in tests as in `main`, and [`crate::config::Settings::resolve`]
//! merges it with the environment and the config file. Environment variables are read there, not
//! by clap, so that the precedence (flag, environment, file, default) lives in one place.
use std::path::PathBuf;

use clap::Parser;

use crate::addr::{SocketSpec, parse_mode};
use crate::policy::GroupSpec;

/// membus broker: the control plane of the local zero-copy pub/sub bus.
#[derive(Clone, Debug, Default, PartialEq, Eq, Parser)]
#[command(
    name = "bus-broker",
    version,
    after_help = "Environment:\n  \
        MEMBUS_SOCKET  socket when --socket is not given (a path or @NAME)\n  \
        MEMBUS_LOG     log filter when --log is not given\n  \
        LISTEN_PID, LISTEN_FDS  systemd socket activation: fd 3 is used as the listening socket\n\n\
        Default socket: $XDG_RUNTIME_DIR/membus/bus.sock, or ${TMPDIR:-/tmp}/membus-$UID/bus.sock"
)]
pub struct Args {
    /// Socket to listen on: a path, or @NAME for the abstract namespace (no file; only
    /// credentials and the policy protect it).
    #[arg(long, value_name = "PATH|@NAME", value_parser = socket_arg)]
    pub socket: Option<SocketSpec>,
    /// Config file (TOML); see docs/broker.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Group (name or gid) that owns the socket file and its directory; default mode becomes
    /// 0660 and the directory 0750.
    #[arg(long, value_name = "GROUP", value_parser = GroupSpec::parse)]
    pub group: Option<GroupSpec>,
    /// Socket file mode, octal [default: 0600, or 0660 with --group].
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Log level (error, warn, info, debug, trace) or filter directives such as
    /// "info,bus_broker=debug" [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log: Option<String>,
}

fn socket_arg(text: &str) -> Result<SocketSpec, String> {
    SocketSpec::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[test]
    fn no_arguments() {
        assert_eq!(Args::parse_from(["bus-broker"]), Args::default());
    }

    #[test]
    fn all_arguments() {
        let args = Args::parse_from([
            "bus-broker",
            "--socket",
            "/run/membus/bus.sock",
            "--config",
            "b.toml",
            "--group",
            "robots",
            "--mode",
            "0660",
            "--log",
            "debug",
        ]);
        assert_eq!(
            args,
            Args {
                socket: Some(SocketSpec::Path("/run/membus/bus.sock".into())),
                config: Some("b.toml".into()),
                group: Some(GroupSpec::Name("robots".into())),
                mode: Some(0o660),
                log: Some("debug".into()),
            }
        );
        let args = Args::parse_from(["bus-broker", "--socket=@bus", "--group=1000"]);
        assert_eq!(args.socket, Some(SocketSpec::Abstract(b"bus".to_vec())));
        assert_eq!(args.group, Some(GroupSpec::Id(1000)));
    }

    #[test]
    fn bad_arguments() {
        let kind = |argv: &[&str]| Args::try_parse_from(argv).unwrap_err().kind();
        assert_eq!(
            kind(&["bus-broker", "--mode", "0999"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["bus-broker", "--mode", "0400"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["bus-broker", "--socket", "@"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["bus-broker", "--group", ""]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["bus-broker", "--sockt", "x"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(kind(&["bus-broker", "extra"]), ErrorKind::UnknownArgument);
        assert_eq!(kind(&["bus-broker", "--help"]), ErrorKind::DisplayHelp);
        let msg = Args::try_parse_from(["bus-broker", "--mode", "0400"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("owner read and write"), "{msg}");
    }

    #[test]
    fn help_mentions_environment() {
        let help = Args::try_parse_from(["bus-broker", "--help"])
            .unwrap_err()
            .to_string();
        assert!(help.contains("MEMBUS_SOCKET"), "{help}");
        assert!(help.contains("LISTEN_FDS"), "{help}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
