//! Runs cases round by round: within each round every case once, in group order (raw baselines,
//! then membus, then peers), so that ratios can be taken within a round, where the VM's noisy
//! phases hit both sides alike.

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

use crate::case::{Case, CaseResult, Options, Params, Ratio};
use crate::machine::{Machine, steal_ticks};

/// One case's run within a round.
#[derive(Clone, Debug)]
pub struct CaseRun {
    /// Index into [`Run::cases`].
    pub case: usize,
    /// The parameters it ran with.
    pub params: Params,
    /// What it measured.
    pub result: CaseResult,
    /// When it started, from the start of the run.
    pub start: Duration,
    /// Wall time it took (including the peer's start-up).
    pub wall: Duration,
}

/// One round: every case once.
#[derive(Clone, Debug)]
pub struct Round {
    /// 0-based round number.
    pub index: usize,
    /// Steal ticks (all CPUs) before the round, if /proc/stat was readable.
    pub steal_before: Option<u64>,
    /// Steal ticks after the round.
    pub steal_after: Option<u64>,
    /// The cases, in the order they ran.
    pub runs: Vec<CaseRun>,
}

impl Round {
    /// Steal ticks during the round.
    pub fn steal_delta(&self) -> Option<u64> {
        Some(self.steal_after?.saturating_sub(self.steal_before?))
    }
}

/// A whole run: the cases, the ratios to compute, the machine and every round.
#[derive(Clone, Debug)]
pub struct Run {
    /// The cases, sorted by group.
    pub cases: Vec<Case>,
    /// Ratios to compute within each round.
    pub ratios: Vec<Ratio>,
    /// The options of the run.
    pub options: Options,
    /// The machine record.
    pub machine: Machine,
    /// When the run started.
    pub started: SystemTime,
    /// The command line that started it, for the report.
    pub command: String,
    /// The rounds.
    pub rounds: Vec<Round>,
}

/// Runs `cases` for `opts.rounds` rounds. `progress` gets one line per case run.
///
/// The calling thread is pinned to the parent CPU for pinned cases and given back its original
/// affinity afterwards.
pub fn run(
    mut cases: Vec<Case>,
    ratios: Vec<Ratio>,
    opts: &Options,
    command: String,
    progress: &mut dyn FnMut(&str),
) -> Result<Run> {
    ensure!(!cases.is_empty(), "no cases to run");
    ensure!(opts.rounds >= 1, "at least one round");
    cases.sort_by_key(|c| c.group);
    let original = sched_getaffinity(None).context("sched_getaffinity")?;
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut rounds = Vec::with_capacity(opts.rounds);
    for index in 0..opts.rounds {
        let steal_before = steal_ticks();
        let mut runs = Vec::with_capacity(cases.len());
        for (i, case) in cases.iter().enumerate() {
            let params = Params::new(case, opts);
            let start = t0.elapsed();
            let result = run_one(case, &params, &original);
            sched_setaffinity(None, &original).context("restore affinity")?;
            let result =
                result.with_context(|| format!("case {} (round {})", case.name, index + 1))?;
            let wall = t0.elapsed() - start;
            progress(&format!(
                "round {}/{} {:<28} {}",
                index + 1,
                opts.rounds,
                case.name,
                crate::report::headline(&result)
            ));
            runs.push(CaseRun {
                case: i,
                params,
                result,
                start,
                wall,
            });
        }
        rounds.push(Round {
            index,
            steal_before,
            steal_after: steal_ticks(),
            runs,
        });
    }
    Ok(Run {
        cases,
        ratios,
        options: opts.clone(),
        machine: Machine::detect(),
        started,
        command,
        rounds,
    })
}

/// Runs one case with the parent's affinity set and a watchdog armed.
pub fn run_one(case: &Case, params: &Params, unpinned: &CpuSet) -> Result<CaseResult> {
    match params.pin {
        Some((cpu, _)) => bus_core::sys::cpu::pin_current_thread(cpu)?,
        None => sched_setaffinity(None, unpinned).context("unpin")?,
    }
    let _watchdog = Watchdog::arm(case.name, params.timeout);
    (case.run)(params)
}

/// Ends the whole process if a case runs past its timeout (a peer that died mid-run can leave
/// the parent blocked in a read forever). The peer dies with it (`PR_SET_PDEATHSIG`).
struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn arm(name: &'static str, timeout: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-watchdog".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                    eprintln!("benches: case {name} still running after {timeout:?}; aborting");
                    std::process::exit(3);
                }
            })
            .ok();
        Watchdog {
            disarm: Some(tx),
            thread,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
