//! `cargo run -p benches --release -- COMMAND`: the membus benchmark harness.
//!
//! ```text
//! benches list
//! benches raw    [--quick] [--case NAME]... [--unpinned] [--rounds N] [--out DIR]
//! benches report [--quick] [--unpinned] [--rounds N] [--out DIR] [--case NAME]...
//! benches syscalls [--quick] [--case NAME]...
//! ```
//!
//! `raw` runs the raw baselines and prints the table (writing files only with `--out`);
//! `report` runs every group and writes `target/bench-report/` (or `--out DIR`).
//! `syscalls` counts system calls per message of streaming cases under strace (see
//! `benches::syscalls`); it runs the hidden command `__once` (one case, one run).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use benches::case::{Case, Group, Options};
use benches::{harness, peer, report};

// Counts heap allocations so that cases can report allocations per message.
#[global_allocator]
static ALLOC: benches::alloc_count::Counting = benches::alloc_count::Counting;

const USAGE: &str = "usage: benches list
       benches raw    [--quick] [--case NAME]... [--unpinned] [--rounds N] [--out DIR]
       benches report [--quick] [--unpinned] [--rounds N] [--out DIR] [--case NAME]...
       benches syscalls [--quick] [--case NAME]...";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match cmd.as_str() {
        peer::PEER_SUBCOMMAND => peer::peer_main(rest),
        "list" => {
            for c in benches::all_cases() {
                println!(
                    "{:<28} {:<7} {:<10} {:>6} B  {}",
                    c.name,
                    c.group.as_str(),
                    c.kind.as_str(),
                    c.size,
                    c.about
                );
            }
            Ok(())
        }
        "raw" => run(rest, Some(Group::Raw), false),
        "report" => run(rest, None, true),
        "syscalls" => syscalls(rest),
        "__once" => once(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn run(args: &[String], group: Option<Group>, write_by_default: bool) -> Result<()> {
    let mut opts = Options::new()?;
    let mut names: Vec<String> = Vec::new();
    let mut out: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => opts.quick(),
            "--unpinned" => opts.unpinned = true,
            "--case" => names.push(value()?.clone()),
            "--rounds" => opts.rounds = value()?.parse().context("--rounds N")?,
            // Undocumented in USAGE: shrinks every count further (the harness's own test runs
            // debug builds, where the payload loops are slow).
            "--scale-div" => {
                let div: u64 = value()?.parse().context("--scale-div N")?;
                opts.scale_div = div.max(1);
                opts.stream_scale_div = div.max(1);
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            _ => bail!("unknown option {a:?}\n{USAGE}"),
        }
    }
    let mut cases: Vec<Case> = benches::all_cases()
        .into_iter()
        .filter(|c| group.is_none_or(|g| c.group == g))
        .collect();
    for n in &names {
        if !cases.iter().any(|c| c.name == n) {
            bail!("no case {n:?}; `benches list` shows them");
        }
    }
    if !names.is_empty() {
        cases.retain(|c| names.iter().any(|n| n == c.name));
    }
    if write_by_default && out.is_none() {
        out = Some(default_out_dir(&opts.peer_exe));
    }
    let command = std::iter::once("benches".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let run = harness::run(cases, benches::all_ratios(), &opts, command, &mut |line| {
        eprintln!("{line}")
    })?;
    println!("{}", report::markdown(&run));
    if let Some(dir) = out {
        let files = report::write_all(&run, &dir)?;
        eprintln!("wrote {} files to {}", files.len(), dir.display());
    }
    Ok(())
}

/// `benches syscalls`: strace-counted system calls per message.
fn syscalls(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut names: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--case" => names.push(it.next().context("--case needs a value")?.clone()),
            _ => bail!("unknown option {a:?}\n{USAGE}"),
        }
    }
    if names.is_empty() {
        names = benches::syscalls::DEFAULT_CASES
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    }
    for n in &names {
        let c = benches::find_case(n).with_context(|| format!("no case {n:?}"))?;
        if c.kind != benches::case::Kind::Throughput {
            bail!("{n} is not a streaming (throughput) case");
        }
    }
    let exe = std::env::current_exe().context("find the current executable")?;
    let counts = benches::syscalls::count(&exe, &names, quick)?;
    println!("{}", benches::syscalls::markdown(&counts));
    Ok(())
}

/// `__once --case NAME [--quick] [--stream-div N]`: one run of one case (pinned as usual);
/// prints the headline and `messages N` (for `syscalls`).
fn once(args: &[String]) -> Result<()> {
    let mut opts = Options::new()?;
    let mut name = None;
    let mut stream_div = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--case" => name = Some(value()?.clone()),
            "--quick" => opts.quick(),
            "--stream-div" => stream_div = Some(value()?.parse::<u64>().context("--stream-div")?),
            _ => bail!("unknown option {a:?}"),
        }
    }
    if let Some(d) = stream_div {
        opts.stream_scale_div = d.max(1);
    }
    let name = name.context("__once needs --case")?;
    let case = benches::find_case(&name).with_context(|| format!("no case {name:?}"))?;
    let params = benches::case::Params::new(&case, &opts);
    let original = rustix::thread::sched_getaffinity(None).context("sched_getaffinity")?;
    let result = harness::run_one(&case, &params, &original)?;
    println!("{} {}", case.name, report::headline(&result));
    let messages = match &result.measurement {
        benches::case::Measurement::Throughput(t) => t.messages,
        benches::case::Measurement::Latency(h) => h.len(),
    };
    println!("messages {messages}");
    Ok(())
}

/// `target/bench-report` next to the executable's profile directory (`target/release/benches`).
fn default_out_dir(exe: &std::path::Path) -> PathBuf {
    exe.parent()
        .and_then(|profile| profile.parent())
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("bench-report")
}
