//! `bus bench`: one benchmark case at a chosen size, with the same measurement code as the
//! `benches` harness (this is a thin front end over `benches::harness::run_one`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use benches::case::{Case, CaseResult, Kind, Measurement, Options, Params};
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
    /// Go through the broker's datagram fallback instead of shared memory.
    #[arg(long)]
    fallback: bool,
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

/// Picks the harness case for the request.
fn pick(a: &BenchArgs) -> Result<Case> {
    let cases = benches::all_cases();
    let want_kind = match a.what {
        What::Latency => Kind::Latency,
        What::Throughput | What::Fanout => Kind::Throughput,
    };
    let matches = |c: &&Case| {
        c.kind == want_kind
            && c.group == benches::case::Group::Membus
            && c.name.contains("fallback") == a.fallback
            && c.name.contains("fanout") == (a.what == What::Fanout)
            && !c.name.contains("unpinned")
            && match (a.what, a.wait) {
                (What::Latency, WaitArg::Spin) => !c.name.contains("park"),
                (What::Latency, _) => c.name.contains("park") || a.fallback,
                _ => true,
            }
    };
    let mut found: Vec<&Case> = cases.iter().filter(matches).collect();
    // Prefer the case whose size is nearest the request (the size is then overridden).
    found.sort_by_key(|c| c.size.abs_diff(a.size));
    match found.first() {
        Some(c) => Ok(**c),
        None => bail!(
            "no benchmark measures {:?} with --wait {:?}{}; see `cargo run -p benches --release -- list`",
            a.what,
            a.wait,
            if a.fallback { " over the fallback" } else { "" }
        ),
    }
}

/// Runs `bus bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.wait == WaitArg::Hybrid {
        bail!(
            "--wait hybrid is measured as the client's default strategy by `bus demo`; for a \
             two-process ping-pong choose spin (busy-poll) or park"
        );
    }
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
