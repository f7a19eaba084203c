//! membus benchmark harness (library half, shared with the `bus bench` command).
//!
//! Two real processes per case: the parent re-executes its own binary as the peer
//! ([`peer::PEER_SUBCOMMAND`]), shares a memfd or a socketpair with it by fd number, pins itself
//! and the peer to separate CPUs, and measures. Cases run round by round in group order (raw
//! baselines, membus, peers) so every ratio is taken within one round; see
//! `docs/benchmarks.md` for the method and PERFORMANCE.md for the floors and targets.
//!
//! - [`case`]: [`case::Case`], [`case::Params`], [`case::CaseResult`], ratios.
//! - [`raw`]: the raw baselines; [`membus`] and [`peers`]: the other groups; [`client`]: membus
//!   through `bus-client` and a real broker, as applications use it. Also in the
//!   membus group: [`stream`] (throughput 1 -> 1), [`fanout`] (publish cost 1 -> N, idle
//!   subscribers), [`fallback`] (datagram fallback through a real broker) and [`scale`] (broker
//!   RSS, fds, connection storm, idle CPU); [`broker`] starts the broker and speaks the protocol.
//! - [`syscalls`]: `benches syscalls`, system calls per message under `strace`.
//! - [`peer`]: spawning and running the second process.
//! - [`shm`]: the shared memfd mapping. Unsafe code is allowed there, in [`peer`] (adopting
//!   inherited fds), [`raw::uring`] (io_uring SQEs) and [`alloc_count`] (the counting
//!   allocator) only.
//! - [`measure`]: ping-pong into a histogram, spin-waiting, stream results.
//! - [`harness`]: rounds, pinning, the watchdog. [`report`] and [`plot`]: the output files.
//! - [`machine`]: CPU model, SMT, kernel, steal time.
//! - [`alloc_count`]: the counting allocator behind the allocations-per-message figures.
#![deny(unsafe_code)]

pub mod alloc_count;
pub mod broker;
pub mod case;
pub mod checksum;
pub mod client;
pub mod fallback;
pub mod fanout;
pub mod harness;
pub mod machine;
pub mod measure;
pub mod membus;
pub mod peer;
pub mod peers;
pub mod plot;
pub mod raw;
pub mod report;
pub mod scale;
pub mod shm;
pub mod stream;
pub mod syscalls;

use case::{Case, Limit, Ratio};

/// Every case of every group, in group order.
pub fn all_cases() -> Vec<Case> {
    let mut v = raw::cases();
    v.extend(membus::cases());
    v.extend(client::cases());
    v.extend(stream::cases());
    v.extend(fanout::cases());
    v.extend(fallback::cases());
    v.extend(scale::cases());
    v.extend(peers::cases());
    v
}

/// Every ratio of every group.
pub fn all_ratios() -> Vec<Ratio> {
    let mut v = raw::ratios();
    v.extend(membus::ratios());
    v.extend(client::ratios());
    v.extend(stream::ratios());
    v.extend(fanout::ratios());
    v.extend(fallback::ratios());
    v.extend(peers::ratios());
    v
}

/// Every absolute target (a figure of one case against a fixed bound).
pub fn all_limits() -> Vec<Limit> {
    let mut v = client::limits();
    v.extend(scale::limits());
    v
}

/// The case called `name`, if any.
pub fn find_case(name: &str) -> Option<Case> {
    all_cases().into_iter().find(|c| c.name == name)
}
