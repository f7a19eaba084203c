//! What a benchmark case is: [`Case`] (a name, a group, a size, a kind and the functions that run
//! it), the [`Params`] it runs with, and the [`CaseResult`] it returns.
//!
//! Adding a case is one entry in a group's list (`raw::cases()`, later `membus` and `peers`):
//!
//! ```
//! use benches::case::{Case, CaseResult, Group, Kind, Params, Pinning, Throughput};
//!
//! fn run(p: &Params) -> anyhow::Result<CaseResult> {
//!     // Spawn the peer with `benches::peer::Peer::spawn(p, &[fds])` if the case needs two
//!     // processes, measure, and return a histogram or a throughput.
//!     Ok(CaseResult::throughput(Throughput { messages: 1, bytes_per_message: p.size as u64, elapsed_ns: 1 }))
//! }
//!
//! let case = Case {
//!     name: "example",
//!     group: Group::Raw,
//!     size: 64,
//!     kind: Kind::Throughput,
//!     pinning: Pinning::Split,
//!     about: "an example",
//!     run,
//!     peer: None,
//! };
//! # let _ = case;
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

use crate::peer::PeerCtx;

/// Which side of the comparison a case belongs to. Within a round, groups run in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Physical floors: what the machine allows without any messaging library.
    Raw,
    /// membus itself.
    Membus,
    /// Other libraries (iceoryx2, ...), measured the same way.
    Peer,
}

impl Group {
    /// Lower-case name used in tables, JSON and `--group`.
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Raw => "raw",
            Group::Membus => "membus",
            Group::Peer => "peer",
        }
    }
}

/// What a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Ping-pong; one-way = RTT / 2, recorded per round trip.
    Latency,
    /// A one-way stream of [`Params::messages`] messages.
    Throughput,
}

impl Kind {
    /// Lower-case name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Latency => "latency",
            Kind::Throughput => "throughput",
        }
    }
}

/// Where the two processes of a case run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Parent on one CPU, peer on another (0 and 1 by default). `--unpinned` overrides this.
    Split,
    /// Neither process pinned: the scheduler decides.
    Unpinned,
}

/// The parent-side function of a case: measures and returns the result.
pub type RunFn = fn(&Params) -> Result<CaseResult>;
/// The peer-side function of a case, run in the re-executed child process.
pub type PeerFn = fn(PeerCtx) -> Result<()>;

/// One benchmark case.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Unique name, used by `--case` and to find the peer function in the child process.
    pub name: &'static str,
    /// Raw baseline, membus or peer library.
    pub group: Group,
    /// Message size in bytes (what "64 B" means for the case is in `about`).
    pub size: usize,
    /// Latency or throughput.
    pub kind: Kind,
    /// Pinned split or unpinned.
    pub pinning: Pinning,
    /// One line for `list` and the report: what is measured, exactly.
    pub about: &'static str,
    /// Parent side: spawns the peer if any, measures, returns.
    pub run: RunFn,
    /// Peer side, if the case has a second process.
    pub peer: Option<PeerFn>,
}

/// Knobs for a whole run, set from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Divide warm-up and sample counts by this (1 normally, 20 for `--quick`).
    pub scale_div: u64,
    /// Divide stream message counts by this (1 normally, 100 for `--quick`: the streams are
    /// the slow part of a quick run, and a smoke test needs no more).
    pub stream_scale_div: u64,
    /// Rounds to run (at least 3 for a report).
    pub rounds: usize,
    /// Run every case unpinned.
    pub unpinned: bool,
    /// CPUs of the parent and the peer for [`Pinning::Split`].
    pub cpus: (usize, usize),
    /// The executable re-executed as the peer (it must dispatch [`crate::peer::PEER_SUBCOMMAND`]
    /// to [`crate::peer::peer_main`]).
    pub peer_exe: PathBuf,
}

impl Options {
    /// Defaults: full counts, 3 rounds, pinned on CPUs 0 and 1, the current executable as peer.
    pub fn new() -> Result<Options> {
        Ok(Options {
            scale_div: 1,
            stream_scale_div: 1,
            rounds: 3,
            unpinned: false,
            cpus: (0, 1),
            peer_exe: std::env::current_exe().context("find the current executable")?,
        })
    }

    /// Scales every count down for `--quick` (CI smoke runs).
    pub fn quick(&mut self) {
        self.scale_div = 20;
        self.stream_scale_div = 100;
    }

    /// True when counts are scaled down.
    pub fn is_quick(&self) -> bool {
        self.scale_div > 1 || self.stream_scale_div > 1
    }
}

/// Everything a case's run and peer functions need; sent to the peer as arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// The case's name (the peer looks its peer function up by it).
    pub case: String,
    /// Message size in bytes.
    pub size: usize,
    /// Latency: round trips before recording.
    pub warmup: u64,
    /// Latency: recorded round trips.
    pub samples: u64,
    /// Throughput: messages in the stream.
    pub messages: u64,
    /// `(parent CPU, peer CPU)`, or `None` when unpinned.
    pub pin: Option<(usize, usize)>,
    /// The peer executable.
    pub peer_exe: PathBuf,
    /// How long the case may take before the run is aborted.
    pub timeout: Duration,
}

/// Full-scale counts from PERFORMANCE.md section 1.
const WARMUP: u64 = 10_000;
const SAMPLES: u64 = 200_000;

impl Params {
    /// Parameters for `case` under `opts`.
    pub fn new(case: &Case, opts: &Options) -> Params {
        let div = opts.scale_div.max(1);
        let messages = match case.size {
            0..=64 => 20_000_000,
            65..=4096 => 2_000_000,
            _ => 200_000,
        };
        // Above 64 KiB a round trip moves megabytes: a tenth of the samples (20,000 after
        // 1,000 warm-up at full scale) keeps a 1 MiB case near a minute per round.
        let large = if case.size > 65536 { 10 } else { 1 };
        let pin = match (case.pinning, opts.unpinned) {
            (Pinning::Split, false) => Some(opts.cpus),
            _ => None,
        };
        Params {
            case: case.name.to_owned(),
            size: case.size,
            warmup: (WARMUP / div / large).max(1),
            samples: (SAMPLES / div / large).max(1),
            messages: (messages / opts.stream_scale_div.max(1)).max(1),
            pin,
            peer_exe: opts.peer_exe.clone(),
            timeout: Duration::from_secs(if opts.is_quick() { 120 } else { 900 }),
        }
    }

    /// Latency: total round trips (warm-up and samples).
    pub fn round_trips(&self) -> u64 {
        self.warmup + self.samples
    }

    /// Encodes these parameters as the peer's command-line arguments.
    pub fn to_args(&self) -> Vec<OsString> {
        let pin = match self.pin {
            Some((a, b)) => format!("{a},{b}"),
            None => "none".to_owned(),
        };
        [
            ("--case", self.case.clone()),
            ("--size", self.size.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--samples", self.samples.to_string()),
            ("--messages", self.messages.to_string()),
            ("--pin", pin),
            ("--timeout-ms", self.timeout.as_millis().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [OsString::from(k), OsString::from(v)])
        .collect()
    }

    /// Decodes [`Params::to_args`]; `peer_exe` becomes the current executable.
    pub fn from_args(args: &[String]) -> Result<Params> {
        let mut p = Params {
            case: String::new(),
            size: 0,
            warmup: 0,
            samples: 0,
            messages: 0,
            pin: None,
            peer_exe: std::env::current_exe().unwrap_or_default(),
            timeout: Duration::from_secs(600),
        };
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let value = it.next().with_context(|| format!("{key} needs a value"))?;
            let num = || {
                value
                    .parse::<u64>()
                    .with_context(|| format!("{key} {value}"))
            };
            match key.as_str() {
                "--case" => p.case = value.clone(),
                "--size" => p.size = num()? as usize,
                "--warmup" => p.warmup = num()?,
                "--samples" => p.samples = num()?,
                "--messages" => p.messages = num()?,
                "--timeout-ms" => p.timeout = Duration::from_millis(num()?),
                "--pin" if value == "none" => p.pin = None,
                "--pin" => {
                    let (a, b) = value.split_once(',').context("--pin PARENT,PEER")?;
                    p.pin = Some((a.parse()?, b.parse()?));
                }
                _ => bail!("unknown peer argument {key}"),
            }
        }
        if p.case.is_empty() {
            bail!("peer started without --case");
        }
        Ok(p)
    }
}

/// A throughput measurement: `messages` messages of `bytes_per_message` in `elapsed_ns`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    /// Messages moved.
    pub messages: u64,
    /// Payload bytes per message.
    pub bytes_per_message: u64,
    /// From the sender's first write to the receiver's last read (both CLOCK_MONOTONIC).
    pub elapsed_ns: u64,
}

impl Throughput {
    /// Messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.messages as f64 * 1e9 / self.elapsed_ns.max(1) as f64
    }

    /// Payload gigabytes (10^9 bytes) per second.
    pub fn gb_per_sec(&self) -> f64 {
        (self.messages * self.bytes_per_message) as f64 / self.elapsed_ns.max(1) as f64
    }
}

/// What one case measured.
#[derive(Clone, Debug)]
pub enum Measurement {
    /// One-way latencies in nanoseconds (RTT / 2 per round trip).
    Latency(Histogram<u64>),
    /// A stream.
    Throughput(Throughput),
}

/// The result of one case in one round.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The measurement.
    pub measurement: Measurement,
    /// Extra named figures for the report and JSON (e.g. membus's own one-way figure from the
    /// record header, syscalls per message).
    pub extra: Vec<(&'static str, f64)>,
}

impl CaseResult {
    /// A latency result.
    pub fn latency(h: Histogram<u64>) -> CaseResult {
        CaseResult {
            measurement: Measurement::Latency(h),
            extra: Vec::new(),
        }
    }

    /// A throughput result.
    pub fn throughput(t: Throughput) -> CaseResult {
        CaseResult {
            measurement: Measurement::Throughput(t),
            extra: Vec::new(),
        }
    }
}

/// Which figure of a result a ratio compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// One-way p50.
    P50,
    /// One-way p99.
    P99,
    /// One-way p99.9.
    P999,
    /// Messages per second.
    MsgsPerSec,
    /// Payload GB/s.
    GbPerSec,
}

impl Metric {
    /// Name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::P50 => "p50",
            Metric::P99 => "p99",
            Metric::P999 => "p99.9",
            Metric::MsgsPerSec => "msg/s",
            Metric::GbPerSec => "GB/s",
        }
    }

    /// The figure from `r`, if `r` has it.
    pub fn of(self, r: &CaseResult) -> Option<f64> {
        match (&r.measurement, self) {
            (Measurement::Latency(h), Metric::P50) => Some(h.value_at_quantile(0.5) as f64),
            (Measurement::Latency(h), Metric::P99) => Some(h.value_at_quantile(0.99) as f64),
            (Measurement::Latency(h), Metric::P999) => Some(h.value_at_quantile(0.999) as f64),
            (Measurement::Throughput(t), Metric::MsgsPerSec) => Some(t.msgs_per_sec()),
            (Measurement::Throughput(t), Metric::GbPerSec) => Some(t.gb_per_sec()),
            _ => None,
        }
    }
}

/// A ratio of two cases' figures, computed within each round.
#[derive(Clone, Copy, Debug)]
pub struct Ratio {
    /// Case on top.
    pub numerator: &'static str,
    /// Case below (usually the floor).
    pub denominator: &'static str,
    /// Figure compared.
    pub metric: Metric,
    /// The target from PERFORMANCE.md section 3, as text (e.g. "<= 2.0"), if any.
    pub target: Option<&'static str>,
}

impl Ratio {
    /// `numerator / denominator` of `metric`, judged against `target` if given.
    pub const fn new(
        numerator: &'static str,
        denominator: &'static str,
        metric: Metric,
        target: Option<&'static str>,
    ) -> Ratio {
        Ratio {
            numerator,
            denominator,
            metric,
            target,
        }
    }
}

/// How a figure compares with its target, for the report's "verdict" column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The stretch target is met too.
    Stretch,
    /// The target is met.
    Met,
    /// The target is missed.
    Missed,
    /// A stretch-only target ("... (stretch)") that is not met: not a failure.
    StretchMissed,
}

impl Verdict {
    /// Text for tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Stretch => "met, stretch too",
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::StretchMissed => "stretch not met",
        }
    }
}

/// A target as written in the ratio and limit lists: a comparison and a number first
/// (`<= 2.0`, `< 1.0`, `>= 3.0`, `> 0`), then free text; `(stretch X)` names a stretch bound
/// with the same comparison, `(stretch)` alone marks the whole target as a stretch goal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    op: Op,
    value: f64,
    stretch: Option<f64>,
    stretch_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Le,
    Lt,
    Ge,
    Gt,
}

impl Op {
    fn holds(self, v: f64, bound: f64) -> bool {
        match self {
            Op::Le => v <= bound,
            Op::Lt => v < bound,
            Op::Ge => v >= bound,
            Op::Gt => v > bound,
        }
    }
}

impl Target {
    /// Parses `text`; the error says what is wrong (the unit tests parse every listed target).
    pub fn parse(text: &str) -> Result<Target> {
        let mut words = text.split_whitespace();
        let op = match words.next() {
            Some("<=") => Op::Le,
            Some("<") => Op::Lt,
            Some(">=") => Op::Ge,
            Some(">") => Op::Gt,
            other => bail!("target {text:?}: starts with {other:?}, not <=, <, >= or >"),
        };
        let number = |w: Option<&str>| -> Result<f64> {
            let w = w.with_context(|| format!("target {text:?}: no number"))?;
            w.trim_end_matches([';', ',', ')'])
                .parse()
                .with_context(|| format!("target {text:?}: {w:?} is not a number"))
        };
        let value = number(words.next())?;
        let stretch = match text.find("(stretch ") {
            Some(i) => {
                let rest = &text[i + "(stretch ".len()..];
                match rest.split_whitespace().next() {
                    Some(w) if w.starts_with(|c: char| c.is_ascii_digit()) => {
                        Some(number(Some(w))?)
                    }
                    _ => None,
                }
            }
            None => None,
        };
        Ok(Target {
            op,
            value,
            stretch,
            stretch_only: text.contains("(stretch)"),
        })
    }

    /// The verdict for figure `v`.
    pub fn verdict(&self, v: f64) -> Verdict {
        let met = self.op.holds(v, self.value);
        match (met, self.stretch_only) {
            (true, true) => Verdict::Stretch,
            (false, true) => Verdict::StretchMissed,
            (false, false) => Verdict::Missed,
            (true, false) if self.stretch.is_some_and(|s| self.op.holds(v, s)) => Verdict::Stretch,
            (true, false) => Verdict::Met,
        }
    }
}

/// Where a [`Limit`] reads its figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    /// A latency quantile or throughput figure of the case.
    Metric(Metric),
    /// One of the case's extra figures (e.g. `rss_kib_10k`).
    Extra(&'static str),
}

/// An absolute target of one case's figure (PERFORMANCE.md targets with no reference case),
/// checked against the median across rounds.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    /// The case.
    pub case: &'static str,
    /// The figure.
    pub figure: Figure,
    /// What the figure is, in words, with its unit.
    pub what: &'static str,
    /// The target, in the figure's unit (the grammar of [`Target`]).
    pub target: &'static str,
}

impl Limit {
    /// The figure from `r`, if `r` has it.
    pub fn of(&self, r: &CaseResult) -> Option<f64> {
        match self.figure {
            Figure::Metric(m) => m.of(r),
            Figure::Extra(k) => r.extra.iter().find(|(x, _)| *x == k).map(|&(_, v)| v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_judge() {
        let t = Target::parse("<= 2.0 (stretch 1.5)").unwrap();
        assert_eq!(t.verdict(1.4), Verdict::Stretch);
        assert_eq!(t.verdict(1.5), Verdict::Stretch);
        assert_eq!(t.verdict(1.8), Verdict::Met);
        assert_eq!(t.verdict(2.0), Verdict::Met);
        assert_eq!(t.verdict(2.01), Verdict::Missed);
        let t = Target::parse(">= 3.0").unwrap();
        assert_eq!(t.verdict(3.0), Verdict::Met);
        assert_eq!(t.verdict(2.9), Verdict::Missed);
        let t = Target::parse("< 1.0").unwrap();
        assert_eq!(t.verdict(1.0), Verdict::Missed);
        assert_eq!(t.verdict(0.99), Verdict::Met);
        let t = Target::parse(">= 0.5 (stretch)").unwrap();
        assert_eq!(t.verdict(0.6), Verdict::Stretch);
        assert_eq!(t.verdict(0.4), Verdict::StretchMissed);
        let t = Target::parse("<= 2.2 (stretch 2.0); two hops vs one").unwrap();
        assert_eq!(t.verdict(2.1), Verdict::Met);
        assert_eq!(t.verdict(1.9), Verdict::Stretch);
        let t = Target::parse("<= 1.1 (stretch: eventfd floor)").unwrap();
        assert_eq!(t.verdict(1.0), Verdict::Met);
        assert!(Target::parse("about 2").is_err());
        assert!(Target::parse("<= two").is_err());
        assert!(Target::parse("<=").is_err());
    }

    #[test]
    fn case_names_are_unique_and_every_target_parses_and_names_real_cases() {
        let cases = crate::all_cases();
        let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), cases.len(), "duplicate case name");
        let known = |n: &str| names.contains(&n) || crate::peers::cases_named().contains(&n);
        for r in crate::all_ratios() {
            if let Some(t) = r.target {
                Target::parse(t)
                    .unwrap_or_else(|e| panic!("{} / {}: {e}", r.numerator, r.denominator));
            }
            assert!(
                known(r.numerator),
                "ratio names unknown case {}",
                r.numerator
            );
            assert!(
                known(r.denominator),
                "ratio names unknown case {}",
                r.denominator
            );
        }
        for l in crate::all_limits() {
            Target::parse(l.target).unwrap_or_else(|e| panic!("{}: {e}", l.case));
            assert!(known(l.case), "limit names unknown case {}", l.case);
        }
    }

    #[test]
    fn peer_case_names_match_the_built_cases() {
        let built: Vec<&str> = crate::peers::cases().iter().map(|c| c.name).collect();
        if crate::peers::BUILT {
            assert_eq!(built, crate::peers::cases_named());
        } else {
            assert!(built.is_empty());
        }
    }
}
