//! The raw baselines of PERFORMANCE.md section 2, rebuilt in Rust: the floors membus is compared
//! with. Every case writes every payload byte on the sending side and sums every byte on the
//! receiving side.

pub mod memcpy;
pub mod ring;
pub mod shm;
pub mod socket;
pub mod uring;

use anyhow::Result;
use rustix::net::SocketType;

use crate::case::{Case, CaseResult, Group, Kind, Metric, Params, Pinning, Ratio};
use crate::peer::PeerCtx;
use shm::Wait;

/// Every raw case, in the order a round runs them.
pub fn cases() -> Vec<Case> {
    use Kind::{Latency, Throughput};
    let case = |name, size, kind, about, run, peer| Case {
        name,
        group: Group::Raw,
        size,
        kind,
        pinning: Pinning::Split,
        about,
        run,
        peer,
    };
    vec![
        case(
            "cacheline-pingpong",
            64,
            Latency,
            "shm busy-spin, one 64 B line each way (4 B seq + 56 B payload)",
            spin_run,
            Some(spin_peer),
        ),
        Case {
            pinning: Pinning::Unpinned,
            ..case(
                "cacheline-pingpong-unpinned",
                64,
                Latency,
                "same, neither process pinned",
                spin_run,
                Some(spin_peer),
            )
        },
        case(
            "shm-pingpong-4k",
            4096,
            Latency,
            "shm busy-spin, 4 KiB buffer each way + seq word",
            spin_run,
            Some(spin_peer),
        ),
        case(
            "shm-pingpong-64k",
            65536,
            Latency,
            "shm busy-spin, 64 KiB buffer each way + seq word",
            spin_run,
            Some(spin_peer),
        ),
        case(
            "shm-pingpong-1m",
            1 << 20,
            Latency,
            "shm busy-spin, 1 MiB buffer each way + seq word (a tenth of the samples)",
            spin_run,
            Some(spin_peer),
        ),
        case(
            "futex-pingpong",
            64,
            Latency,
            "shm line as cacheline-pingpong, FUTEX_WAIT / FUTEX_WAKE on the seq word",
            futex_run,
            Some(futex_peer),
        ),
        case(
            "eventfd-pingpong",
            64,
            Latency,
            "shm line as cacheline-pingpong, blocking eventfd read per direction",
            eventfd_run,
            Some(eventfd_peer),
        ),
        case(
            "seqpacket-pingpong-64",
            64,
            Latency,
            "AF_UNIX SOCK_SEQPACKET blocking ping-pong, 64 B",
            seqpacket_run,
            Some(seqpacket_peer),
        ),
        case(
            "seqpacket-pingpong-4k",
            4096,
            Latency,
            "AF_UNIX SOCK_SEQPACKET blocking ping-pong, 4 KiB",
            seqpacket_run,
            Some(seqpacket_peer),
        ),
        case(
            "seqpacket-pingpong-64k",
            65536,
            Latency,
            "AF_UNIX SOCK_SEQPACKET blocking ping-pong, 64 KiB",
            seqpacket_run,
            Some(seqpacket_peer),
        ),
        case(
            "stream-pingpong-64",
            64,
            Latency,
            "AF_UNIX SOCK_STREAM blocking ping-pong, 64 B",
            stream_run,
            Some(stream_peer),
        ),
        case(
            "tcp-pingpong-64",
            64,
            Latency,
            "TCP loopback (127.0.0.1, TCP_NODELAY) blocking ping-pong, 64 B",
            socket::tcp_pingpong_run,
            Some(stream_peer),
        ),
        case(
            "seqpacket-uring-pingpong-64",
            64,
            Latency,
            "seqpacket-pingpong-64, but each side waits in io_uring (RECVMSG + io_uring_enter)",
            uring::pingpong_run,
            Some(uring::pingpong_peer),
        ),
        case(
            "seqpacket-stream-64",
            64,
            Throughput,
            "AF_UNIX SOCK_SEQPACKET one-way stream, 64 B",
            socket::stream_run,
            Some(socket::stream_peer),
        ),
        case(
            "seqpacket-stream-64k",
            65536,
            Throughput,
            "AF_UNIX SOCK_SEQPACKET one-way stream, 64 KiB",
            socket::stream_run,
            Some(socket::stream_peer),
        ),
        case(
            "ring-slots-64",
            64,
            Throughput,
            "SPSC shm ring, fixed slots with per-slot seq (8 B seq + 56 B payload)",
            ring::slots_run,
            Some(ring::slots_peer),
        ),
        case(
            "ring-slots-4k",
            4096,
            Throughput,
            "SPSC shm ring, fixed slots with per-slot seq (8 B seq + 4088 B payload)",
            ring::slots_run,
            Some(ring::slots_peer),
        ),
        case(
            "ring-headtail-64",
            64,
            Throughput,
            "SPSC shm ring, head/tail counters, publish per record, 64 B records",
            headtail1_run,
            Some(ring::headtail_peer),
        ),
        case(
            "ring-headtail-batch16-64",
            64,
            Throughput,
            "same, head published every 16 records",
            headtail16_run,
            Some(ring::headtail_peer),
        ),
        case(
            "ring-headtail-4k",
            4096,
            Throughput,
            "SPSC shm ring, head/tail counters, publish per record, 4 KiB records",
            headtail1_run,
            Some(ring::headtail_peer),
        ),
        case(
            "memcpy-64k",
            65536,
            Throughput,
            "memcpy 64 KiB, hot cache, one process (parent CPU), dst - src page-aligned",
            memcpy::run_aligned,
            None,
        ),
        case(
            "memcpy-64k-skew16",
            65536,
            Throughput,
            "same, dst - src = 16 mod 4096 (glibc rep movsb slow path on this CPU)",
            memcpy::run_skew16,
            None,
        ),
    ]
}

/// Ratios among the raw cases worth watching (the membus targets go in their own list).
pub fn ratios() -> Vec<Ratio> {
    let r = |numerator, denominator, metric| Ratio::new(numerator, denominator, metric, None);
    vec![
        r(
            "cacheline-pingpong-unpinned",
            "cacheline-pingpong",
            Metric::P50,
        ),
        r("eventfd-pingpong", "seqpacket-pingpong-64", Metric::P50),
        r("tcp-pingpong-64", "seqpacket-pingpong-64", Metric::P50),
        r(
            "seqpacket-uring-pingpong-64",
            "seqpacket-pingpong-64",
            Metric::P50,
        ),
        r("futex-pingpong", "eventfd-pingpong", Metric::P50),
        r("shm-pingpong-64k", "seqpacket-pingpong-64k", Metric::P50),
        r("ring-headtail-64", "ring-slots-64", Metric::MsgsPerSec),
        r(
            "ring-headtail-batch16-64",
            "ring-headtail-64",
            Metric::MsgsPerSec,
        ),
        r("ring-slots-4k", "memcpy-64k", Metric::GbPerSec),
        r("memcpy-64k-skew16", "memcpy-64k", Metric::GbPerSec),
        r("seqpacket-stream-64k", "ring-headtail-4k", Metric::GbPerSec),
    ]
}

fn spin_run(p: &Params) -> Result<CaseResult> {
    shm::run(p, Wait::Spin)
}
fn spin_peer(ctx: PeerCtx) -> Result<()> {
    shm::peer(ctx, Wait::Spin)
}
fn futex_run(p: &Params) -> Result<CaseResult> {
    shm::run(p, Wait::Futex)
}
fn futex_peer(ctx: PeerCtx) -> Result<()> {
    shm::peer(ctx, Wait::Futex)
}
fn eventfd_run(p: &Params) -> Result<CaseResult> {
    shm::run(p, Wait::Eventfd)
}
fn eventfd_peer(ctx: PeerCtx) -> Result<()> {
    shm::peer(ctx, Wait::Eventfd)
}
fn seqpacket_run(p: &Params) -> Result<CaseResult> {
    socket::pingpong_run(p, SocketType::SEQPACKET)
}
fn seqpacket_peer(ctx: PeerCtx) -> Result<()> {
    socket::pingpong_peer(ctx, SocketType::SEQPACKET)
}
fn stream_run(p: &Params) -> Result<CaseResult> {
    socket::pingpong_run(p, SocketType::STREAM)
}
fn stream_peer(ctx: PeerCtx) -> Result<()> {
    socket::pingpong_peer(ctx, SocketType::STREAM)
}
fn headtail1_run(p: &Params) -> Result<CaseResult> {
    ring::headtail_run(p, 1)
}
fn headtail16_run(p: &Params) -> Result<CaseResult> {
    ring::headtail_run(p, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_ratios_name_cases() {
        let cases = cases();
        let mut names: Vec<_> = cases.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), cases.len(), "duplicate case name");
        for r in ratios() {
            assert!(names.contains(&r.numerator), "{}", r.numerator);
            assert!(names.contains(&r.denominator), "{}", r.denominator);
        }
    }
}
