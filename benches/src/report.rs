//! Turns a [`Run`] into the report under `target/bench-report/`: `report.md` (tables),
//! `report.json` (one object per case per round, plus the summary), one HdrHistogram interval log
//! `<case>.hlog` per latency case (one interval per round, tagged `round-N`), one percentile
//! plot `<case>.svg` per latency case (one curve per round), one `compare-*.svg` per group of
//! cases compared with each other ([`COMPARE_PLOTS`]) and `throughput.svg` (GB/s by message
//! size per streaming family).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use serde_json::{Value, json};

use crate::case::{CaseResult, Kind, Limit, Measurement, Target};
use crate::harness::Run;
use crate::machine::{iso8601_utc, ticks_to_ms};

/// Schema tag of `report.json`.
pub const JSON_SCHEMA: &str = "membus-bench-report/1";

/// The per-result figures, always all of them (`None` where a kind has no such figure), in
/// table order.
pub const FIELDS: [&str; 7] = [
    "p50_ns",
    "p90_ns",
    "p99_ns",
    "p999_ns",
    "max_ns",
    "msgs_per_sec",
    "gb_per_sec",
];

/// The figures of `r`, keyed as [`FIELDS`].
pub fn figures(r: &CaseResult) -> [Option<f64>; 7] {
    match &r.measurement {
        Measurement::Latency(h) => {
            let q = |q: f64| Some(h.value_at_quantile(q) as f64);
            [
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                Some(h.max() as f64),
                None,
                None,
            ]
        }
        Measurement::Throughput(t) => [
            None,
            None,
            None,
            None,
            None,
            Some(t.msgs_per_sec()),
            Some(t.gb_per_sec()),
        ],
    }
}

/// A short human summary of one result, for progress lines.
pub fn headline(r: &CaseResult) -> String {
    match &r.measurement {
        Measurement::Latency(h) => format!(
            "p50 {}  p99 {}  p99.9 {}  max {}",
            fmt_ns(h.value_at_quantile(0.5) as f64),
            fmt_ns(h.value_at_quantile(0.99) as f64),
            fmt_ns(h.value_at_quantile(0.999) as f64),
            fmt_ns(h.max() as f64)
        ),
        Measurement::Throughput(t) => format!(
            "{} msg/s  {:.2} GB/s",
            fmt_rate(t.msgs_per_sec()),
            t.gb_per_sec()
        ),
    }
}

/// Nanoseconds with a unit: "70 ns", "7.0 us", "1.25 ms".
pub fn fmt_ns(ns: f64) -> String {
    bus_client::latency::format_ns(ns)
}

/// Messages per second with a unit: "0.72 M", "120 M".
pub fn fmt_rate(per_sec: f64) -> String {
    if per_sec >= 10e6 {
        format!("{:.0} M", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.2} M", per_sec / 1e6)
    } else {
        format!("{per_sec:.0}")
    }
}

/// Median of `v` (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Median, min and max of a figure across rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Median across rounds.
    pub median: f64,
    /// Smallest round.
    pub min: f64,
    /// Largest round.
    pub max: f64,
}

impl Spread {
    /// The spread of `v`, or `None` when empty.
    pub fn of(v: &[f64]) -> Option<Spread> {
        let median = median(v)?;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread { median, min, max })
    }
}

/// Per-case summary across rounds.
#[derive(Clone, Debug)]
pub struct CaseSummary {
    /// Index into [`Run::cases`].
    pub case: usize,
    /// The spread of each of [`FIELDS`].
    pub fields: [Option<Spread>; 7],
}

/// A ratio's value in each round and its spread.
#[derive(Clone, Debug)]
pub struct RatioSummary {
    /// Index into [`Run::ratios`].
    pub ratio: usize,
    /// Value per round (rounds where either case is missing are skipped).
    pub per_round: Vec<f64>,
    /// Median and range.
    pub spread: Option<Spread>,
}

/// Summaries of every case of `run`, in case order.
pub fn case_summaries(run: &Run) -> Vec<CaseSummary> {
    (0..run.cases.len())
        .map(|case| {
            let per_round: Vec<[Option<f64>; 7]> = run
                .rounds
                .iter()
                .flat_map(|r| r.runs.iter().filter(|c| c.case == case))
                .map(|c| figures(&c.result))
                .collect();
            let fields = std::array::from_fn(|f| {
                let v: Vec<f64> = per_round.iter().filter_map(|x| x[f]).collect();
                Spread::of(&v)
            });
            CaseSummary { case, fields }
        })
        .collect()
}

/// Every ratio of `run`, computed within each round.
pub fn ratio_summaries(run: &Run) -> Vec<RatioSummary> {
    run.ratios
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let per_round: Vec<f64> = run
                .rounds
                .iter()
                .filter_map(|round| {
                    let find = |name: &str| {
                        round
                            .runs
                            .iter()
                            .find(|c| run.cases[c.case].name == name)
                            .and_then(|c| r.metric.of(&c.result))
                    };
                    let (n, d) = (find(r.numerator)?, find(r.denominator)?);
                    (d != 0.0).then_some(n / d)
                })
                .collect();
            RatioSummary {
                ratio: i,
                spread: Spread::of(&per_round),
                per_round,
            }
        })
        .collect()
}

fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn cell(v: Option<Spread>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), |s| f(s.median))
}

/// The markdown report.
pub fn markdown(run: &Run) -> String {
    let m = &run.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# membus benchmark report\n");
    let _ = writeln!(s, "- date: {}", iso8601_utc(run.started));
    let _ = writeln!(s, "- command: `{}`", run.command);
    let _ = writeln!(
        s,
        "- machine: {} ({} logical CPUs, {} available, cpu0 SMT siblings: {}), {}",
        m.cpu_model, m.logical_cpus, m.available_cpus, m.cpu0_smt_siblings, m.kernel
    );
    let pin = if run.options.unpinned {
        "all cases unpinned".to_owned()
    } else {
        format!(
            "parent on CPU {}, peer on CPU {} (cases marked unpinned excepted)",
            run.options.cpus.0, run.options.cpus.1
        )
    };
    let _ = writeln!(
        s,
        "- {} rounds, latency counts 1/{}, stream counts 1/{}, {pin}",
        run.rounds.len(),
        run.options.scale_div,
        run.options.stream_scale_div
    );
    let steal: Vec<String> = run
        .rounds
        .iter()
        .map(|r| {
            r.steal_delta()
                .map_or("?".to_owned(), |t| format!("{:.0} ms", ticks_to_ms(t)))
        })
        .collect();
    let _ = writeln!(s, "- steal time per round: {}", steal.join(", "));
    let _ = writeln!(
        s,
        "\nMedian of {} rounds; one-way latency = RTT / 2; range = min..max across rounds of \
         p50 (latency) or msg/s (throughput).\n",
        run.rounds.len()
    );
    let _ = writeln!(
        s,
        "| case | group | size | pinned | p50 | p90 | p99 | p99.9 | max | msg/s | GB/s | range |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for cs in case_summaries(run) {
        let c = &run.cases[cs.case];
        let pinned = run
            .rounds
            .first()
            .and_then(|r| r.runs.iter().find(|x| x.case == cs.case))
            .is_some_and(|x| x.params.pin.is_some());
        let f = &cs.fields;
        let range = match c.kind {
            Kind::Latency => f[0].map(|s| format!("{}..{}", fmt_ns(s.min), fmt_ns(s.max))),
            Kind::Throughput => f[5].map(|s| format!("{}..{}", fmt_rate(s.min), fmt_rate(s.max))),
        }
        .unwrap_or_else(|| "-".to_owned());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            c.group.as_str(),
            size_label(c.size),
            if pinned { "yes" } else { "no" },
            cell(f[0], fmt_ns),
            cell(f[1], fmt_ns),
            cell(f[2], fmt_ns),
            cell(f[3], fmt_ns),
            cell(f[4], fmt_ns),
            cell(f[5], fmt_rate),
            cell(f[6], |v| format!("{v:.2}")),
            range
        );
    }
    let ratios = ratio_summaries(run);
    if !ratios.is_empty() {
        let _ = writeln!(s, "\n## Ratios (within each round)\n");
        let _ = writeln!(s, "| ratio | metric | median | range | target | verdict |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for rs in ratios {
            let r = &run.ratios[rs.ratio];
            let (med, range) = rs.spread.map_or(("-".into(), "-".into()), |s| {
                (
                    format!("{:.2}x", s.median),
                    format!("{:.2}..{:.2}", s.min, s.max),
                )
            });
            let _ = writeln!(
                s,
                "| {} / {} | {} | {med} | {range} | {} | {} |",
                r.numerator,
                r.denominator,
                r.metric.as_str(),
                r.target.unwrap_or("-"),
                verdict_text(r.target, rs.spread, &[r.numerator, r.denominator])
            );
        }
    }
    let limits = limit_summaries(run);
    if !limits.is_empty() {
        let _ = writeln!(s, "\n## Fixed targets\n");
        let _ = writeln!(s, "| figure | case | median | range | target | verdict |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for (l, spread) in limits {
            let (med, range) = spread.map_or(("-".into(), "-".into()), |s| {
                (
                    fmt_figure(s.median),
                    format!("{}..{}", fmt_figure(s.min), fmt_figure(s.max)),
                )
            });
            let _ = writeln!(
                s,
                "| {} | {} | {med} | {range} | {} | {} |",
                l.what,
                l.case,
                l.target,
                verdict_text(Some(l.target), spread, &[l.case])
            );
        }
    }
    let extras = extra_lines(run);
    if !extras.is_empty() {
        let _ = writeln!(
            s,
            "\n## Extra figures (median of the rounds)\n\nCases' own figures beside the table \
             (also in report.json, per round).\n"
        );
        for line in extras {
            let _ = writeln!(s, "{line}");
        }
    }
    let _ = writeln!(s, "\n## Cases\n");
    for c in &run.cases {
        let _ = writeln!(s, "- `{}`: {}", c.name, c.about);
    }
    s
}

/// Every [`crate::all_limits`] target with the spread of its figure across the rounds.
pub fn limit_summaries(run: &Run) -> Vec<(Limit, Option<Spread>)> {
    crate::all_limits()
        .into_iter()
        .map(|l| {
            let v: Vec<f64> = run
                .rounds
                .iter()
                .flat_map(|r| r.runs.iter())
                .filter(|c| run.cases[c.case].name == l.case)
                .filter_map(|c| l.of(&c.result))
                .collect();
            (l, Spread::of(&v))
        })
        .collect()
}

/// The verdict of a target on the median of `spread`, or why there is none: no target, a case
/// not run (or not built: the peer cases need `--features peers`).
pub fn verdict_text(target: Option<&str>, spread: Option<Spread>, cases: &[&str]) -> String {
    let Some(spread) = spread else {
        let peer_missing = !crate::peers::BUILT
            && cases
                .iter()
                .any(|c| crate::peers::cases_named().contains(c));
        return if peer_missing {
            "not built (--features peers)".to_owned()
        } else {
            "not run".to_owned()
        };
    };
    let Some(target) = target else {
        return "-".to_owned();
    };
    match Target::parse(target) {
        Ok(t) => t.verdict(spread.median).as_str().to_owned(),
        Err(e) => format!("bad target: {e}"),
    }
}

fn fmt_figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One markdown list line per case that reports extra figures: `- `case`: key value, ...`
/// with the median of each key across rounds.
fn extra_lines(run: &Run) -> Vec<String> {
    let mut out = Vec::new();
    for (i, c) in run.cases.iter().enumerate() {
        let mut keys: Vec<&'static str> = Vec::new();
        let mut values: Vec<Vec<f64>> = Vec::new();
        for r in run
            .rounds
            .iter()
            .flat_map(|r| r.runs.iter().filter(|x| x.case == i))
        {
            for &(k, v) in &r.result.extra {
                match keys.iter().position(|&x| x == k) {
                    Some(j) => values[j].push(v),
                    None => {
                        keys.push(k);
                        values.push(vec![v]);
                    }
                }
            }
        }
        if keys.is_empty() {
            continue;
        }
        let parts: Vec<String> = keys
            .iter()
            .zip(&values)
            .filter_map(|(k, v)| {
                let m = median(v)?;
                Some(if m.fract() == 0.0 && m.abs() < 1e15 {
                    format!("{k} {m:.0}")
                } else {
                    format!("{k} {m:.3}")
                })
            })
            .collect();
        out.push(format!("- `{}`: {}", c.name, parts.join(", ")));
    }
    out
}

fn num(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

fn spread_json(v: Option<Spread>) -> Value {
    v.map_or(
        Value::Null,
        |s| json!({"median": s.median, "min": s.min, "max": s.max}),
    )
}

/// The JSON report: `results` holds one object per case per round; `summary` the medians.
pub fn json(run: &Run) -> Value {
    let m = &run.machine;
    let rounds: Vec<Value> = run
        .rounds
        .iter()
        .map(|r| {
            json!({
                "round": r.index,
                "steal_before_ticks": r.steal_before,
                "steal_after_ticks": r.steal_after,
                "steal_ms": r.steal_delta().map(ticks_to_ms),
            })
        })
        .collect();
    let mut results = Vec::new();
    for r in &run.rounds {
        for c in &r.runs {
            let case = &run.cases[c.case];
            let mut o = json!({
                "case": case.name,
                "group": case.group.as_str(),
                "kind": case.kind.as_str(),
                "size": case.size,
                "round": r.index,
                "pinned": c.params.pin.is_some(),
                "start_ms": c.start.as_secs_f64() * 1e3,
                "wall_ms": c.wall.as_secs_f64() * 1e3,
            });
            let obj = o.as_object_mut().expect("object literal");
            for (k, v) in FIELDS.iter().zip(figures(&c.result)) {
                obj.insert((*k).to_owned(), num(v));
            }
            let (samples, messages, elapsed) = match &c.result.measurement {
                Measurement::Latency(h) => (Some(h.len()), None, None),
                Measurement::Throughput(t) => (None, Some(t.messages), Some(t.elapsed_ns)),
            };
            obj.insert("samples".into(), json!(samples));
            obj.insert("messages".into(), json!(messages));
            obj.insert("elapsed_ns".into(), json!(elapsed));
            let extra: serde_json::Map<String, Value> = c
                .result
                .extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect();
            obj.insert("extra".into(), Value::Object(extra));
            results.push(o);
        }
    }
    let cases: Vec<Value> = case_summaries(run)
        .into_iter()
        .map(|cs| {
            let c = &run.cases[cs.case];
            let mut fields = serde_json::Map::new();
            for (k, v) in FIELDS.iter().zip(cs.fields) {
                fields.insert((*k).to_owned(), spread_json(v));
            }
            json!({
                "case": c.name,
                "group": c.group.as_str(),
                "kind": c.kind.as_str(),
                "size": c.size,
                "about": c.about,
                "rounds": run
                    .rounds
                    .iter()
                    .filter(|r| r.runs.iter().any(|x| x.case == cs.case))
                    .count(),
                "fields": fields,
            })
        })
        .collect();
    let ratios: Vec<Value> = ratio_summaries(run)
        .into_iter()
        .map(|rs| {
            let r = &run.ratios[rs.ratio];
            json!({
                "numerator": r.numerator,
                "denominator": r.denominator,
                "metric": r.metric.as_str(),
                "target": r.target,
                "verdict": verdict_text(r.target, rs.spread, &[r.numerator, r.denominator]),
                "per_round": rs.per_round,
                "spread": spread_json(rs.spread),
            })
        })
        .collect();
    let limits: Vec<Value> = limit_summaries(run)
        .into_iter()
        .map(|(l, spread)| {
            json!({
                "case": l.case,
                "figure": l.what,
                "target": l.target,
                "verdict": verdict_text(Some(l.target), spread, &[l.case]),
                "spread": spread_json(spread),
            })
        })
        .collect();
    json!({
        "schema": JSON_SCHEMA,
        "date_utc": iso8601_utc(run.started),
        "command": run.command,
        "machine": {
            "cpu_model": m.cpu_model,
            "logical_cpus": m.logical_cpus,
            "available_cpus": m.available_cpus,
            "cpu0_smt_siblings": m.cpu0_smt_siblings,
            "kernel": m.kernel,
            "hostname": m.hostname,
        },
        "options": {
            "rounds": run.options.rounds,
            "scale_div": run.options.scale_div,
            "stream_scale_div": run.options.stream_scale_div,
            "unpinned": run.options.unpinned,
            "cpus": [run.options.cpus.0, run.options.cpus.1],
        },
        "rounds": rounds,
        "results": results,
        "summary": {"cases": cases, "ratios": ratios, "limits": limits},
    })
}

fn latency_rounds(run: &Run, case: usize) -> Vec<(usize, Duration, Duration, &Histogram<u64>)> {
    run.rounds
        .iter()
        .flat_map(|r| r.runs.iter().map(move |c| (r.index, c)))
        .filter(|(_, c)| c.case == case)
        .filter_map(|(round, c)| match &c.result.measurement {
            Measurement::Latency(h) => Some((round, c.start, c.wall, h)),
            Measurement::Throughput(_) => None,
        })
        .collect()
}

/// The interval log of one latency case: one interval per round, tagged `round-N`, timestamps
/// relative to the start of the run (`BaseTime`).
pub fn hlog(run: &Run, case: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut serializer = V2Serializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "membus benches: case {}, one-way latency in ns (RTT / 2)",
                run.cases[case].name
            ))
            .with_start_time(run.started)
            .with_base_time(run.started)
            .begin_log_with(&mut buf, &mut serializer)?;
        for (round, start, wall, h) in latency_rounds(run, case) {
            let tag = format!("round-{}", round + 1);
            w.write_histogram(h, start, wall, Tag::new(&tag))
                .map_err(|e| anyhow::anyhow!("write interval: {e}"))?;
        }
    }
    Ok(buf)
}

/// The percentile plot of one latency case: one curve per round.
pub fn svg(run: &Run, case: usize) -> String {
    let series: Vec<(String, &Histogram<u64>)> = latency_rounds(run, case)
        .into_iter()
        .map(|(round, _, _, h)| (format!("round {}", round + 1), h))
        .collect();
    let c = &run.cases[case];
    let title = format!("{} ({}), one-way latency", c.name, size_label(c.size));
    crate::plot::percentile_svg(&title, &series)
}

/// A plot of latency cases compared with each other: written as `<file>.svg`, one percentile
/// curve per case (all its rounds merged), in this order.
#[derive(Clone, Copy, Debug)]
pub struct ComparePlot {
    /// File stem.
    pub file: &'static str,
    /// Plot title.
    pub title: &'static str,
    /// The cases; those not in the run (the peer cases without `--features peers`, or left out
    /// by `--case`) are skipped, and so is the plot with fewer than two left.
    pub cases: &'static [&'static str],
}

/// Every comparison plot.
pub const COMPARE_PLOTS: &[ComparePlot] = &[
    ComparePlot {
        file: "compare-busy-8",
        title: "busy-wait ping-pong, 8 B",
        cases: &[
            "cacheline-pingpong",
            "membus-ring-pingpong-8",
            "membus-client-pingpong-8",
            "iceoryx2-pingpong-8",
        ],
    },
    ComparePlot {
        file: "compare-busy-64",
        title: "busy-wait ping-pong, 64 B",
        cases: &[
            "cacheline-pingpong",
            "membus-ring-pingpong-64",
            "membus-client-pingpong-64",
            "iceoryx2-pingpong-64",
        ],
    },
    ComparePlot {
        file: "compare-busy-4k",
        title: "busy-wait ping-pong, 4 KiB",
        cases: &[
            "shm-pingpong-4k",
            "membus-ring-pingpong-4k",
            "membus-client-pingpong-4k",
            "iceoryx2-pingpong-4k",
        ],
    },
    ComparePlot {
        file: "compare-busy-64k",
        title: "busy-wait ping-pong, 64 KiB",
        cases: &[
            "shm-pingpong-64k",
            "membus-ring-pingpong-64k",
            "membus-client-pingpong-64k",
            "iceoryx2-pingpong-64k",
        ],
    },
    ComparePlot {
        file: "compare-busy-1m",
        title: "busy-wait ping-pong, 1 MiB",
        cases: &[
            "shm-pingpong-1m",
            "membus-ring-pingpong-1m",
            "iceoryx2-pingpong-1m",
        ],
    },
    ComparePlot {
        file: "compare-blocking-64",
        title: "blocking ping-pong (waiting in the kernel), 64 B",
        cases: &[
            "eventfd-pingpong",
            "futex-pingpong",
            "seqpacket-pingpong-64",
            "membus-ring-park-64",
            "membus-client-park-64",
            "iceoryx2-event-64",
            "zmq-ipc-pingpong-64",
            "fallback-pingpong-64",
        ],
    },
];

/// Throughput families for `throughput.svg`: case-name prefix and legend label. A family's cases
/// are the throughput cases named prefix + size (`ring-headtail-4k`, not
/// `ring-headtail-batch16-64`).
pub const THROUGHPUT_FAMILIES: &[(&str, &str)] = &[
    ("ring-slots-", "raw ring, per-slot seq (ring-slots-*)"),
    ("ring-headtail-", "raw ring, head/tail (ring-headtail-*)"),
    ("seqpacket-stream-", "SEQPACKET stream (seqpacket-stream-*)"),
    ("membus-stream-", "membus stream (membus-stream-*)"),
    ("fallback-stream-", "datagram fallback (fallback-stream-*)"),
];

/// Whether `name` is `prefix` followed by a size alone ("64", "4k", "1m").
fn in_family(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The comparison plot `p` over `run`: every round of each case merged into one histogram.
/// `None` when fewer than two of its cases have latency results in the run.
pub fn compare_svg(run: &Run, p: &ComparePlot) -> Result<Option<String>> {
    let mut present: Vec<(usize, Histogram<u64>)> = Vec::new();
    for name in p.cases {
        let Some(case) = run.cases.iter().position(|c| c.name == *name) else {
            continue;
        };
        let mut merged: Option<Histogram<u64>> = None;
        for (_, _, _, h) in latency_rounds(run, case) {
            match &mut merged {
                None => merged = Some(h.clone()),
                Some(m) => m
                    .add(h)
                    .map_err(|e| anyhow::anyhow!("{name}: merge rounds: {e:?}"))?,
            }
        }
        if let Some(m) = merged {
            present.push((case, m));
        }
    }
    if present.len() < 2 {
        return Ok(None);
    }
    // Sizes in the legend only where they differ from the plot's (cacheline-pingpong's 64 B
    // line in the 8 B plot).
    let sizes: Vec<usize> = present.iter().map(|(c, _)| run.cases[*c].size).collect();
    let common = *sizes
        .iter()
        .max_by_key(|s| sizes.iter().filter(|x| x == s).count())
        .expect("two or more cases");
    let series: Vec<(String, &Histogram<u64>)> = present
        .iter()
        .map(|(c, h)| {
            let case = &run.cases[*c];
            let label = if case.size == common {
                case.name.to_owned()
            } else {
                format!("{} ({})", case.name, size_label(case.size))
            };
            (label, h)
        })
        .collect();
    let rounds = match run.rounds.len() {
        1 => "1 round".to_owned(),
        n => format!("{n} rounds merged"),
    };
    let title = format!("{}, one-way latency ({rounds})", p.title);
    Ok(Some(crate::plot::percentile_svg(&title, &series)))
}

/// `throughput.svg`: GB/s (median across rounds) by message size, one line per
/// [`THROUGHPUT_FAMILIES`] family with at least one case in the run. `None` when there is none.
pub fn throughput_svg(run: &Run) -> Option<String> {
    let series: Vec<(String, Vec<(usize, f64)>)> = THROUGHPUT_FAMILIES
        .iter()
        .filter_map(|&(prefix, label)| {
            let mut points: Vec<(usize, f64)> = run
                .cases
                .iter()
                .enumerate()
                .filter(|(_, c)| c.kind == Kind::Throughput && in_family(c.name, prefix))
                .filter_map(|(i, c)| {
                    let v: Vec<f64> = run
                        .rounds
                        .iter()
                        .flat_map(|r| r.runs.iter().filter(|x| x.case == i))
                        .filter_map(|x| figures(&x.result)[6])
                        .collect();
                    Some((c.size, median(&v)?))
                })
                .collect();
            points.sort_by_key(|p| p.0);
            (!points.is_empty()).then(|| (label.to_owned(), points))
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    let title = format!(
        "one-way stream throughput by message size (median of {} rounds)",
        run.rounds.len()
    );
    Some(crate::plot::throughput_svg(&title, &series))
}

/// Writes the whole report into `dir` (created if missing) and returns the files written:
/// `report.md`, `report.json`, `<case>.hlog` and `<case>.svg` per latency case, one
/// `<file>.svg` per [`COMPARE_PLOTS`] plot with two or more cases in the run, and
/// `throughput.svg` when a [`THROUGHPUT_FAMILIES`] case ran.
pub fn write_all(run: &Run, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |name: String, bytes: &[u8]| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    put("report.md".into(), markdown(run).as_bytes())?;
    let json = serde_json::to_string_pretty(&json(run))?;
    put("report.json".into(), json.as_bytes())?;
    for (i, c) in run.cases.iter().enumerate() {
        if c.kind == Kind::Latency {
            put(format!("{}.hlog", c.name), &hlog(run, i)?)?;
            put(format!("{}.svg", c.name), svg(run, i).as_bytes())?;
        }
    }
    for p in COMPARE_PLOTS {
        if let Some(svg) = compare_svg(run, p)? {
            put(format!("{}.svg", p.file), svg.as_bytes())?;
        }
    }
    if let Some(svg) = throughput_svg(run) {
        put("throughput.svg".into(), svg.as_bytes())?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let s = Spread::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
    }

    #[test]
    fn units() {
        assert_eq!(fmt_ns(70.0), "70 ns");
        assert_eq!(fmt_ns(7_040.0), "7.0 us");
        assert_eq!(fmt_rate(720_000.0), "0.72 M");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(64), "64 B");
    }

    #[test]
    fn plot_tables_name_real_cases() {
        let all = crate::all_cases();
        let find = |name: &str| all.iter().find(|c| c.name == name);
        for p in COMPARE_PLOTS {
            assert!(p.cases.len() >= 2, "{}", p.file);
            for name in p.cases {
                match find(name) {
                    Some(c) => assert_eq!(c.kind, Kind::Latency, "{}: {name}", p.file),
                    None => assert!(
                        crate::peers::cases_named().contains(name),
                        "{}: no case {name}",
                        p.file
                    ),
                }
            }
        }
        for &(prefix, _) in THROUGHPUT_FAMILIES {
            let members: Vec<&str> = all
                .iter()
                .filter(|c| c.kind == Kind::Throughput && in_family(c.name, prefix))
                .map(|c| c.name)
                .collect();
            assert!(!members.is_empty(), "no case in family {prefix}");
        }
        assert!(in_family("ring-headtail-4k", "ring-headtail-"));
        assert!(!in_family("ring-headtail-batch16-64", "ring-headtail-"));
        assert!(!in_family("ring-headtail-", "ring-headtail-"));
        assert!(!in_family("membus-ring-pingpong-64", "ring-headtail-"));
    }
}
