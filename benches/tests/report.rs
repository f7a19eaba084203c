//! Runs `benches report --quick` into a temporary directory and checks that the report is
//! complete and well-formed. Checks shape only, never timings.

use std::path::{Path, PathBuf};
use std::process::Command;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use serde_json::Value;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("membus-bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Standard base64 (with padding), as the interval log encodes histograms.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(val(c)) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn quick_report_is_complete_and_well_formed() {
    let dir = TempDir::new();
    let exe = env!("CARGO_BIN_EXE_benches");

    let list = Command::new(exe)
        .arg("list")
        .output()
        .expect("run benches list");
    assert!(list.status.success());
    let cases: Vec<(String, String)> = String::from_utf8(list.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next().expect("name").to_owned();
            let _group = f.next();
            (name, f.next().expect("kind").to_owned())
        })
        .collect();
    assert!(
        cases.len() >= 15,
        "expected every raw baseline, got {cases:?}"
    );

    let out = Command::new(exe)
        // `--quick` as CI runs it, scaled down further because this is a debug build: the test
        // checks the report's shape, never its numbers.
        .args(["report", "--quick", "--scale-div", "1000", "--out"])
        .arg(&dir.0)
        .output()
        .expect("run benches report");
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // JSON: every case in every round, with every field.
    let json: Value = serde_json::from_str(&read(&dir.0, "report.json")).expect("valid JSON");
    assert_eq!(json["schema"], "membus-bench-report/1");
    for key in ["cpu_model", "logical_cpus", "cpu0_smt_siblings", "kernel"] {
        assert!(!json["machine"][key].is_null(), "machine.{key} missing");
    }
    let rounds = json["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 3, "a report has at least 3 rounds");
    for r in rounds {
        assert!(r.get("steal_before_ticks").is_some() && r.get("steal_after_ticks").is_some());
    }
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), cases.len() * rounds.len());
    let fields = [
        "case",
        "group",
        "kind",
        "size",
        "round",
        "pinned",
        "p50_ns",
        "p90_ns",
        "p99_ns",
        "p999_ns",
        "max_ns",
        "msgs_per_sec",
        "gb_per_sec",
        "samples",
        "messages",
        "extra",
    ];
    for (name, kind) in &cases {
        let mine: Vec<&Value> = results
            .iter()
            .filter(|r| r["case"] == name.as_str())
            .collect();
        assert_eq!(mine.len(), rounds.len(), "{name}: one result per round");
        for r in mine {
            for f in fields {
                assert!(r.get(f).is_some(), "{name}: field {f} missing");
            }
            assert_eq!(r["kind"], kind.as_str());
            let headline = if kind == "latency" {
                "p50_ns"
            } else {
                "msgs_per_sec"
            };
            let v = r[headline]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: {headline}"));
            assert!(v > 0.0, "{name}: {headline} = {v}");
        }
    }
    let summary = json["summary"]["cases"].as_array().expect("summary.cases");
    assert_eq!(summary.len(), cases.len());
    let ratios = json["summary"]["ratios"]
        .as_array()
        .expect("summary.ratios");
    let verdicts = ["met, stretch too", "met", "MISSED", "stretch not met"];
    let mut not_built = 0;
    for r in ratios {
        let verdict = r["verdict"].as_str().expect("ratio verdict");
        if verdict == "not built (--features peers)" {
            // Only the peer ratios, and only in a build without the peer cases.
            let built = cfg!(feature = "peers");
            assert!(!built, "{r}");
            assert!(
                r["denominator"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("iceoryx2") || d.starts_with("zmq")),
                "{r}"
            );
            assert_eq!(r["per_round"].as_array().map(Vec::len), Some(0), "{r}");
            not_built += 1;
            continue;
        }
        assert_eq!(
            r["per_round"].as_array().map(Vec::len),
            Some(rounds.len()),
            "{r}"
        );
        assert!(
            r["spread"]["median"].as_f64().is_some_and(|m| m > 0.0),
            "{r}"
        );
        if r["target"].is_null() {
            assert_eq!(verdict, "-", "{r}");
        } else {
            assert!(verdicts.contains(&verdict), "{r}");
        }
    }
    if !cfg!(feature = "peers") {
        assert!(
            not_built > 0,
            "the peer ratios are listed even when not built"
        );
    }
    let limits = json["summary"]["limits"]
        .as_array()
        .expect("summary.limits");
    assert!(limits.len() >= 4, "the broker's fixed targets: {limits:?}");
    for l in limits {
        assert!(
            l["verdict"].as_str().is_some_and(|v| verdicts.contains(&v)),
            "{l}"
        );
        assert!(l["spread"]["median"].as_f64().is_some(), "{l}");
    }

    // Markdown: a table row per case.
    let md = read(&dir.0, "report.md");
    for (name, _) in &cases {
        let rows = md
            .lines()
            .filter(|l| l.starts_with(&format!("| {name} |")))
            .count();
        assert_eq!(rows, 1, "{name}: expected one table row in report.md");
    }
    let section = |title: &str| -> Vec<&str> {
        md.split(title)
            .nth(1)
            .unwrap_or_else(|| panic!("report.md has no {title:?} section"))
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .collect()
    };
    assert_eq!(section("## Ratios").len(), ratios.len());
    assert_eq!(section("## Fixed targets").len(), limits.len());
    for row in section("## Ratios")
        .into_iter()
        .chain(section("## Fixed targets"))
    {
        let verdict = row.trim_end_matches('|').rsplit('|').next().unwrap().trim();
        assert!(
            verdicts.contains(&verdict) || verdict == "-" || verdict.starts_with("not built"),
            "{row}"
        );
    }

    // hlog and SVG per latency case; hlogs parse back with one histogram per round.
    for (name, _) in cases.iter().filter(|(_, k)| k == "latency") {
        let log = read(&dir.0, &format!("{name}.hlog"));
        let mut intervals = 0;
        for entry in IntervalLogIterator::new(log.as_bytes()) {
            if let LogEntry::Interval(ilh) = entry.unwrap_or_else(|e| panic!("{name}: {e:?}")) {
                let bytes = base64_decode(ilh.encoded_histogram());
                let h: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut &bytes[..])
                    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
                assert!(!h.is_empty(), "{name}: empty interval");
                assert!(ilh.tag().is_some_and(|t| t.starts_with("round-")));
                intervals += 1;
            }
        }
        assert_eq!(intervals, rounds.len(), "{name}: one interval per round");
        let svg = read(&dir.0, &format!("{name}.svg"));
        assert!(svg.starts_with("<svg"), "{name}.svg");
    }

    // Comparison plots: one curve per case of the group that ran (the iceoryx2 cases only with
    // `--features peers`), none with fewer than two.
    let listed = |n: &str| cases.iter().any(|(c, k)| c == n && k == "latency");
    let groups: [(&str, &[&str]); 6] = [
        (
            "compare-busy-8",
            &[
                "cacheline-pingpong",
                "membus-ring-pingpong-8",
                "membus-client-pingpong-8",
                "iceoryx2-pingpong-8",
            ],
        ),
        (
            "compare-busy-64",
            &[
                "cacheline-pingpong",
                "membus-ring-pingpong-64",
                "membus-client-pingpong-64",
                "iceoryx2-pingpong-64",
            ],
        ),
        (
            "compare-busy-4k",
            &[
                "shm-pingpong-4k",
                "membus-ring-pingpong-4k",
                "membus-client-pingpong-4k",
                "iceoryx2-pingpong-4k",
            ],
        ),
        (
            "compare-busy-64k",
            &[
                "shm-pingpong-64k",
                "membus-ring-pingpong-64k",
                "membus-client-pingpong-64k",
                "iceoryx2-pingpong-64k",
            ],
        ),
        (
            "compare-busy-1m",
            &[
                "shm-pingpong-1m",
                "membus-ring-pingpong-1m",
                "iceoryx2-pingpong-1m",
            ],
        ),
        (
            "compare-blocking-64",
            &[
                "eventfd-pingpong",
                "futex-pingpong",
                "seqpacket-pingpong-64",
                "membus-ring-park-64",
                "membus-client-park-64",
                "iceoryx2-event-64",
                "zmq-ipc-pingpong-64",
                "fallback-pingpong-64",
            ],
        ),
    ];
    let well_formed = |file: &str, series: &[&str]| {
        let svg = read(&dir.0, file);
        assert!(svg.starts_with("<svg"), "{file}");
        assert!(svg.trim_end().ends_with("</svg>"), "{file}");
        assert_eq!(
            svg.matches("<polyline").count(),
            series.len(),
            "{file}: one polyline per series {series:?}"
        );
        for s in series {
            assert!(
                svg.contains(&format!(">{s}")),
                "{file}: no legend entry {s}"
            );
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{file}");
    };
    let mut expected_compare = Vec::new();
    for (file, group) in groups {
        let present: Vec<&str> = group.iter().copied().filter(|c| listed(c)).collect();
        let path = format!("{file}.svg");
        if present.len() < 2 {
            assert!(!dir.0.join(&path).exists(), "{path} with {present:?}");
            continue;
        }
        well_formed(&path, &present);
        expected_compare.push(path);
    }
    let mut compare_files: Vec<String> = std::fs::read_dir(&dir.0)
        .expect("read report dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.starts_with("compare-") && n.ends_with(".svg"))
        .collect();
    compare_files.sort();
    expected_compare.sort();
    assert_eq!(compare_files, expected_compare);
    // Every busy-wait comparison has its raw floor and membus even without the peers.
    assert!(expected_compare.len() >= 5, "{expected_compare:?}");
    if cfg!(feature = "peers") {
        assert_eq!(expected_compare.len(), 6);
        let svg = read(&dir.0, "compare-blocking-64.svg");
        assert_eq!(svg.matches("<polyline").count(), 8);
    }

    // Throughput by size: one line per family with a case (prefix + size, so no batch16).
    let families = [
        ("ring-slots-", "raw ring, per-slot seq"),
        ("ring-headtail-", "raw ring, head/tail"),
        ("seqpacket-stream-", "SEQPACKET stream"),
        ("membus-stream-", "membus stream"),
        ("fallback-stream-", "datagram fallback"),
    ];
    let present: Vec<&str> = families
        .iter()
        .filter(|(prefix, _)| {
            cases.iter().any(|(c, k)| {
                k == "throughput" && c.strip_prefix(prefix).is_some_and(|r| !r.contains('-'))
            })
        })
        .map(|&(_, label)| label)
        .collect();
    assert_eq!(
        present.len(),
        families.len(),
        "every family runs in --quick"
    );
    well_formed("throughput.svg", &present);
    let svg = read(&dir.0, "throughput.svg");
    for size in ["64 B", "4 KiB", "64 KiB"] {
        assert!(
            svg.contains(&format!(">{size}<")),
            "throughput.svg: no {size} label"
        );
    }
    let points = cases
        .iter()
        .filter(|(c, k)| {
            k == "throughput"
                && families
                    .iter()
                    .any(|(p, _)| c.strip_prefix(p).is_some_and(|r| !r.contains('-')))
        })
        .count();
    assert_eq!(svg.matches("<circle").count(), points, "a marker per case");
}

#[test]
fn unknown_case_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_benches"))
        .args(["raw", "--case", "no-such-case"])
        .output()
        .expect("run benches");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-case"));
}
