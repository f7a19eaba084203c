//! `bus bench`: one benchmark case at a chosen size, with the same measurement code as the
//! `benches` harness (this is a thin front end over `benches::harness::run_one`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use benches::case::{Case, CaseResult, Measurement, Options, Params};
use clap::{Args, ValueEnum};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use serde_json::json;

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// Ping-pong between two processes; one-way latency = round trip / 2.
    Latency,
    /// One-way stream, messages per second and GB/s.
    Throughput,
    /// One publisher, several subscribers.
    Fanout,
}

/// How the receiver waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WaitArg {
    /// Busy-poll the ring.
    Spin,
    /// Poll, then park (the client's default).
    Hybrid,
    /// Park on the wake socket whenever the ring is empty.
    Park,
}

/// Which library to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PeerArg {
    /// iceoryx2 0.10.0 (needs a `bus` built with `--features peers`).
    Iceoryx2,
    /// ZeroMQ over ipc:// (needs a `bus` built with `--features peers`).
    Zmq,
}

/// `bus bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// latency, throughput or fanout.
    #[arg(value_enum, default_value = "latency")]
    what: What,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Samples (latency) or messages (throughput); default: the harness's full counts.
    #[arg(long)]
    count: Option<u64>,
    /// How the receiver waits.
    #[arg(long, value_enum, default_value = "spin")]
    wait: WaitArg,
    /// Latency through bus-client and a real broker (needs the `bus-broker` binary next to
    /// `bus`) instead of over bus-core rings alone.
    #[arg(long)]
    client: bool,
    /// Go through the broker's datagram transport instead of shared memory.
    #[arg(long, alias = "fallback")]
    datagram: bool,
    /// Measure a peer library instead of membus (latency only).
    #[arg(long, value_enum)]
    peer: Option<PeerArg>,
    /// Do not pin the two processes to CPUs 0 and 1.
    #[arg(long)]
    unpinned: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the latency histogram as an HdrHistogram interval log.
    #[arg(long, value_name = "FILE")]
    hlog: Option<PathBuf>,
}

/// The harness case name prefix for the request, and whether its size is fixed (the request's
/// size is then refused unless it matches).
fn prefix(a: &BenchArgs) -> Result<(&'static str, bool)> {
    use WaitArg::{Hybrid, Park, Spin};
    let flags = usize::from(a.client) + usize::from(a.datagram) + usize::from(a.peer.is_some());
    if flags > 1 {
        bail!("choose one of --client, --datagram and --peer");
    }
    Ok(match (a.what, a.wait, a.datagram, a.peer, a.client) {
        (What::Latency, _, true, ..) => ("fallback-pingpong-", true),
        (What::Throughput, _, true, ..) => ("fallback-stream-", true),
        (What::Fanout, _, true, ..) => bail!("the datagram transport has no fan-out benchmark"),
        (What::Latency, Spin, _, Some(PeerArg::Iceoryx2), _) => ("iceoryx2-pingpong-", false),
        (What::Latency, Park, _, Some(PeerArg::Iceoryx2), _) => ("iceoryx2-event-", true),
        (What::Latency, Spin, _, Some(PeerArg::Zmq), _) => ("zmq-ipc-spin-", true),
        (What::Latency, Park, _, Some(PeerArg::Zmq), _) => ("zmq-ipc-pingpong-", true),
        (What::Latency, Hybrid, _, Some(_), _) => {
            bail!("the peers have no spin-then-park mode; choose --wait spin or park")
        }
        (_, _, _, Some(_), _) => bail!("--peer measures latency only"),
        (What::Latency, Spin, _, _, false) => ("membus-ring-pingpong-", false),
        (What::Latency, Hybrid, _, _, false) => ("membus-ring-spinpark-", true),
        (What::Latency, Park, _, _, false) => ("membus-ring-park-", true),
        (What::Latency, Spin, _, _, true) => ("membus-client-pingpong-", false),
        (What::Latency, Hybrid, _, _, true) => ("membus-client-spinpark-", true),
        (What::Latency, Park, _, _, true) => ("membus-client-park-", true),
        (_, _, _, _, true) => bail!("--client measures latency only"),
        (What::Throughput, Spin, ..) => ("membus-stream-", false),
        (What::Throughput, ..) => bail!("the throughput benchmark busy-polls; use --wait spin"),
        (What::Fanout, Spin, ..) => ("membus-fanout-", true),
        (What::Fanout, Park | Hybrid, ..) => ("membus-fanout-park-", true),
    })
}

/// Picks the harness case for the request: the case of [`prefix`] whose size is nearest the
/// request (the size is then overridden), or the one fixed-size case.
fn pick(a: &BenchArgs) -> Result<Case> {
    let (prefix, fixed) = prefix(a)?;
    let cases = benches::all_cases();
    let mut found: Vec<&Case> = cases
        .iter()
        .filter(|c| {
            c.name.strip_prefix(prefix).is_some_and(|rest| {
                // Sizes and subscriber counts only: not `-unpinned`, `-idle16`, ...
                rest.chars()
                    .all(|ch| ch.is_ascii_digit() || ch == 'k' || ch == 'm')
            })
        })
        .collect();
    if found.is_empty() {
        let hint = if a.peer.is_some() && !benches::peers::BUILT {
            "this `bus` was built without the peer libraries: build it with \
             `cargo build --release -p bus-cli --features peers`"
        } else {
            "see `cargo run -p benches --release -- list`"
        };
        bail!(
            "no benchmark measures {:?} with --wait {:?} here; {hint}",
            a.what,
            a.wait
        );
    }
    found.sort_by_key(|c| c.size.abs_diff(a.size));
    let case = *found[0];
    if fixed && case.size != a.size && a.what != What::Fanout {
        bail!(
            "{} runs at {} B only (asked for --size {})",
            case.name,
            case.size,
            a.size
        );
    }
    Ok(case)
}

/// Runs `bus bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let case = pick(&a)?;
    let mut opts = Options::new()?;
    opts.unpinned = a.unpinned;
    let mut params = Params::new(&case, &opts);
    params.size = a.size;
    if let Some(n) = a.count {
        params.samples = n.max(1);
        params.warmup = (n / 20).max(1);
        params.messages = n.max(1);
    }
    let unpinned = rustix::thread::sched_getaffinity(None).context("sched_getaffinity")?;
    eprint!("bus bench: running {} at {} B ... ", case.name, params.size);
    std::io::stderr().flush().ok();
    let result = benches::harness::run_one(&case, &params, &unpinned)?;
    eprintln!("done");
    report(&a, &case, &params, &result)
}

fn report(a: &BenchArgs, case: &Case, params: &Params, r: &CaseResult) -> Result<()> {
    match &r.measurement {
        Measurement::Latency(h) => {
            let q = |p: f64| h.value_at_quantile(p);
            if a.json {
                let doc = json!({
                    "case": case.name, "size": params.size, "samples": h.len(),
                    "one_way_ns": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
                                   "p99.9": q(0.999), "max": h.max()},
                    "extra": r.extra.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                });
                println!("{doc}");
            } else {
                println!(
                    "{} ({} B, {} samples, one-way = round trip / 2)",
                    case.about,
                    params.size,
                    h.len()
                );
                println!(
                    "{:>10} {:>10} {:>10} {:>10} {:>10}",
                    "p50", "p90", "p99", "p99.9", "max"
                );
                let f = |v: u64| benches::report::fmt_ns(v as f64);
                println!(
                    "{:>10} {:>10} {:>10} {:>10} {:>10}",
                    f(q(0.5)),
                    f(q(0.9)),
                    f(q(0.99)),
                    f(q(0.999)),
                    f(h.max())
                );
                for (k, v) in &r.extra {
                    println!("{k}: {v}");
                }
            }
            if let Some(path) = &a.hlog {
                let mut out = Vec::new();
                let mut ser = V2Serializer::new();
                let mut w = IntervalLogWriterBuilder::new()
                    .with_base_time(std::time::SystemTime::now())
                    .begin_log_with(&mut out, &mut ser)
                    .map_err(|e| anyhow::anyhow!("hlog: {e}"))?;
                let tag = Tag::new(case.name).context("hlog tag")?;
                w.write_histogram(
                    h,
                    std::time::Duration::ZERO,
                    std::time::Duration::ZERO,
                    Some(tag),
                )
                .map_err(|e| anyhow::anyhow!("hlog: {e}"))?;
                drop(w);
                std::fs::write(path, out).with_context(|| format!("write {}", path.display()))?;
            }
        }
        Measurement::Throughput(t) => {
            if a.hlog.is_some() {
                bail!("--hlog needs a latency benchmark");
            }
            if a.json {
                println!(
                    "{}",
                    json!({"case": case.name, "size": params.size, "messages": t.messages,
                           "msgs_per_sec": t.msgs_per_sec(), "gb_per_sec": t.gb_per_sec()})
                );
            } else {
                println!(
                    "{}: {} messages of {} B: {}/s, {:.2} GB/s",
                    case.about,
                    t.messages,
                    params.size,
                    benches::report::fmt_rate(t.msgs_per_sec()),
                    t.gb_per_sec()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(what: What, size: usize, wait: WaitArg) -> BenchArgs {
        BenchArgs {
            what,
            size,
            count: None,
            wait,
            client: false,
            datagram: false,
            peer: None,
            unpinned: false,
            json: false,
            hlog: None,
        }
    }

    #[test]
    fn picks_the_case_for_each_request() {
        let name = |a: BenchArgs| pick(&a).map(|c| c.name);
        assert_eq!(
            name(args(What::Latency, 64, WaitArg::Spin)).unwrap(),
            "membus-ring-pingpong-64"
        );
        assert_eq!(
            name(args(What::Latency, 1, WaitArg::Spin)).unwrap(),
            "membus-ring-pingpong-8"
        );
        assert_eq!(
            name(args(What::Latency, 64, WaitArg::Park)).unwrap(),
            "membus-ring-park-64"
        );
        assert_eq!(
            name(args(What::Latency, 64, WaitArg::Hybrid)).unwrap(),
            "membus-ring-spinpark-64"
        );
        let client = BenchArgs {
            client: true,
            ..args(What::Latency, 5000, WaitArg::Spin)
        };
        assert_eq!(name(client).unwrap(), "membus-client-pingpong-4k");
        let fallback = BenchArgs {
            datagram: true,
            ..args(What::Latency, 64, WaitArg::Spin)
        };
        assert_eq!(name(fallback).unwrap(), "fallback-pingpong-64");
        assert_eq!(
            name(args(What::Throughput, 60_000, WaitArg::Spin)).unwrap(),
            "membus-stream-64k"
        );
        assert_eq!(
            name(args(What::Fanout, 64, WaitArg::Park)).unwrap(),
            "membus-fanout-park-1"
        );
    }

    #[test]
    fn refuses_what_it_cannot_measure() {
        let err = |a: BenchArgs| pick(&a).unwrap_err().to_string();
        assert!(err(args(What::Latency, 128, WaitArg::Park)).contains("64 B only"));
        assert!(err(args(What::Throughput, 64, WaitArg::Park)).contains("busy-polls"));
        let both = BenchArgs {
            client: true,
            datagram: true,
            ..args(What::Latency, 64, WaitArg::Spin)
        };
        assert!(err(both).contains("choose one of"));
        let peer = BenchArgs {
            peer: Some(PeerArg::Iceoryx2),
            ..args(What::Latency, 64, WaitArg::Spin)
        };
        if benches::peers::BUILT {
            assert_eq!(pick(&peer).unwrap().name, "iceoryx2-pingpong-64");
        } else {
            assert!(err(peer).contains("--features peers"));
        }
    }
}
