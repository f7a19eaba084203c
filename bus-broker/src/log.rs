//! Logging: `tracing` events to stderr as compact lines with UTC timestamps.
//!
//! The filter is a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or `EnvFilter`
//! directives (`info,bus_broker::policy=debug`). It comes from `--log`, then `MEMBUS_LOG`, then
//! the config file's `log`, then [`DEFAULT_LOG`] (see [`crate::config::Settings`]).
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Environment variable for the log filter.
pub const LOG_ENV: &str = "MEMBUS_LOG";
/// Log filter when none is given.
pub const DEFAULT_LOG: &str = "info";

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The filter does not parse.
    #[error(
        "invalid log filter {spec:?}: {reason}; use a level (error, warn, info, debug, trace, \
         off) or directives such as \"info,bus_broker=debug\""
    )]
    Invalid {
        /// The filter as given.
        spec: String,
        /// Why.
        reason: String,
    },
    /// A global subscriber is already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Parses a log filter. A single word must be a level name, so that a typo (`inf`) is an error
/// instead of a filter for a target named `inf`.
pub fn filter(spec: &str) -> Result<EnvFilter, LogError> {
    let invalid = |reason: String| LogError::Invalid {
        spec: spec.to_owned(),
        reason,
    };
    let spec_trimmed = spec.trim();
    if spec_trimmed.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if !spec_trimmed.contains([',', '=', ':', '['])
        && !LEVELS.contains(&spec_trimmed.to_ascii_lowercase().as_str())
    {
        return Err(invalid(format!("{spec_trimmed:?} is not a level")));
    }
    EnvFilter::builder()
        .parse(spec_trimmed)
        .map_err(|e| invalid(e.to_string()))
}

/// A subscriber writing compact, timestamped lines through `writer`.
pub fn subscriber<W>(
    spec: &str,
    writer: W,
    ansi: bool,
) -> Result<impl tracing::Subscriber + Send + Sync + 'static, LogError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    Ok(tracing_subscriber::fmt()
        .compact()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_env_filter(filter(spec)?)
        .finish())
}

/// Installs the global subscriber: stderr, colours only on a terminal.
pub fn init(spec: &str) -> Result<(), LogError> {
    let ansi = std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(spec, std::io::stderr, ansi)?)
        .map_err(|_| LogError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn capture(spec: &str, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let sub = subscriber(spec, buffer.clone(), false).unwrap();
        tracing::subscriber::with_default(sub, emit);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn filters() {
        for ok in [
            "info",
            "DEBUG",
            " warn ",
            "off",
            "info,bus_broker=debug",
            "bus_broker=trace",
        ] {
            assert!(filter(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "inf", "verbose", "info,x=loud"] {
            let e = filter(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid log filter"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn compact_lines_with_timestamps_filtered_by_level() {
        let out = capture("info", || {
            tracing::info!(socket = "/x", "listening");
            tracing::debug!("hidden");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let line = lines[0];
        // RFC 3339 UTC timestamp first: 2025-01-02T03:04:05.678901Z
        let stamp = line.split_whitespace().next().unwrap();
        assert!(
            stamp.len() >= 20 && stamp.as_bytes()[4] == b'-' && stamp.contains('T'),
            "{line}"
        );
        assert!(stamp.ends_with('Z'), "{line}");
        assert!(line.contains("INFO"), "{line}");
        assert!(line.contains("listening"), "{line}");
        assert!(line.contains("socket") && line.contains("/x"), "{line}");
        assert!(!line.contains('\x1b'), "no colours when not asked: {line}");

        let out = capture("debug", || tracing::debug!("shown"));
        assert!(out.contains("shown"), "{out}");
        let out = capture("warn", || tracing::info!("hidden"));
        assert!(out.is_empty(), "{out}");
    }
}
