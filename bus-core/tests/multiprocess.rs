//! Two real processes share a ring: this binary creates the segments, passes the fds with
//! SCM_RIGHTS over a socketpair to a copy of itself started as a child process, and streams
//! millions of messages of varying sizes with checksums.
//!
//! - reliable: none lost, duplicated or reordered; the checksums of both sides agree.
//! - lossy with a slow reader: delivered + reported lost = published, exactly, and no delivered
//!   message that passed `is_intact` has wrong bytes.
//!
//! The child parks on its wake socket when the ring is empty, so the park / wake protocol is
//! exercised across processes too. The parent's open-fd count is the same before and after.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bus_core::layout::{Mode, max_message_bytes_for};
use bus_core::ring::{CursorPage, CursorView, Reader, RingConfig, StartAt, Writer};
use bus_core::segment::{
    Access, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame};
use bus_core::wake::{WakeReceiver, pair, protocol};
use libtest_mimic::{Arguments, Failed, Trial};

const PEER_ENV: &str = "MEMBUS_TEST_PEER_FD";

fn main() {
    if let Ok(fd) = std::env::var(PEER_ENV) {
        let fd: i32 = fd.parse().expect("peer fd");
        // SAFETY: the parent cleared CLOEXEC on exactly this fd and named it in the env; this
        // process owns it from here on and nothing else refers to it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = peer(sock) {
            eprintln!("peer failed: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    let mut args = Arguments::from_args();
    // The fd-count check needs the trials to run one at a time.
    args.test_threads = Some(1);
    let reliable_count = std::env::var("MEMBUS_MP_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000u64);
    let trials = vec![
        Trial::test(
            "reliable_10m_messages_none_lost_duplicated_or_reordered",
            move || run_parent(Mode::Reliable, 1 << 20, reliable_count, 0),
        ),
        Trial::test(
            "lossy_slow_reader_delivered_plus_lost_equals_published",
            || run_parent(Mode::Lossy, 64 << 10, 2_000_000, 2_000),
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// Payload length of message `i`: mostly small, some medium, a few large.
fn len_of(i: u64, max: usize) -> usize {
    let h = mix(i);
    match h % 1000 {
        0 => max,
        1..=20 => (h >> 16) as usize % 8192,
        _ => (h >> 16) as usize % 257,
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `buf` with the bytes of message `i`.
fn fill(buf: &mut [u8], i: u64) {
    let mut x = mix(i ^ 0xA5A5);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x = mix(x);
        c.copy_from_slice(&x.to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let tail = mix(x).to_le_bytes();
    rest.copy_from_slice(&tail[..rest.len()]);
}

/// Checksum of a payload (FNV-1a over 8-byte words, then the tail bytes).
fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = (h ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h ^ bytes.len() as u64
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn encode(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn recv_words(sock: &OwnedFd, fds: &mut FdBatch) -> Result<Vec<u64>, String> {
    let mut buf = [0u8; 256];
    match recv_frame(sock.as_fd(), &mut buf, fds).map_err(|e| e.to_string())? {
        Received::Frame { len } => Ok(decode(&buf[..len])),
        Received::Eof => Err("peer closed the socket".into()),
    }
}

fn run_parent(mode: Mode, data_bytes: u64, count: u64, slow_every: u64) -> Result<(), Failed> {
    let fds_before = open_fds();
    let result = stream(mode, data_bytes, count, slow_every);
    let fds_after = open_fds();
    result?;
    if fds_before != fds_after {
        return Err(format!("fd leak: {fds_before} open before, {fds_after} after").into());
    }
    Ok(())
}

fn stream(mode: Mode, data_bytes: u64, count: u64, slow_every: u64) -> Result<(), Failed> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    let mut child = Command::new(std::env::current_exe()?)
        .env(PEER_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()?;
    drop(theirs);
    let outcome = drive(&ours, mode, data_bytes, count, slow_every);
    drop(ours);
    let status = child.wait()?;
    outcome?;
    if !status.success() {
        return Err(format!("peer process exited with {status}").into());
    }
    Ok(())
}

fn drive(
    sock: &OwnedFd,
    mode: Mode,
    data_bytes: u64,
    count: u64,
    slow_every: u64,
) -> Result<(), Failed> {
    let cfg = RingConfig {
        mode,
        data_bytes,
        max_message_bytes: max_message_bytes_for(data_bytes as usize).min(16 << 10) as u32,
        publisher_id: 1,
    };
    let ring_fd = create_ring("mp-ring", data_bytes as usize)?;
    let mut writer = Writer::create(
        map_ring(&ring_fd, data_bytes as usize, Access::ReadWrite)?,
        cfg,
    )?;
    seal_read_only(&ring_fd)?;
    let cursor_fd = create_cursor_page("mp-cursor")?;
    let (wake_tx, wake_rx) = pair()?;
    let wake_rx: OwnedFd = wake_rx.into();
    let setup = encode(&[
        mode.to_raw() as u64,
        data_bytes,
        cfg.max_message_bytes as u64,
        slow_every,
    ]);
    send_frame(
        sock.as_fd(),
        &setup,
        &[ring_fd.as_fd(), cursor_fd.as_fd(), wake_rx.as_fd()],
    )?;
    drop(wake_rx);
    drop(ring_fd);
    let mut fds = FdBatch::new();
    let ready = recv_words(sock, &mut fds)?;
    if ready != [1] {
        return Err(format!("peer did not get ready: {ready:?}").into());
    }
    // The subscriber has mapped its cursor page read-write: now nobody else may.
    seal_read_only(&cursor_fd)?;
    let view = CursorView::attach(map_cursor_page(&cursor_fd, Access::ReadOnly)?, 42)?;
    drop(cursor_fd);
    writer.add_reader(view, 0, Some(wake_tx))?;

    let max = cfg.max_message_bytes as usize;
    let mut sum = 0u64;
    for i in 0..count {
        let len = len_of(i, max);
        let mut loan = writer.loan(len, Some(Duration::from_secs(30)))?;
        fill(&mut loan, i);
        sum = sum.wrapping_add(checksum(&loan));
        let seq = loan.commit();
        assert_eq!(seq, i);
    }
    writer.close();
    let report = recv_words(sock, &mut fds)?;
    let [delivered, lost, torn, child_sum, bad] = report[..] else {
        return Err(format!("bad report from peer: {report:?}").into());
    };
    eprintln!(
        "{mode:?}: published {count}, delivered {delivered}, lost {lost}, torn {torn}, \
         wakes sent {}",
        writer.stats().wakes_sent
    );
    if bad != 0 {
        return Err(format!("{bad} delivered messages had wrong bytes or sequence").into());
    }
    if delivered + lost + torn != count {
        return Err(format!(
            "delivered {delivered} + lost {lost} + torn {torn} != published {count}"
        )
        .into());
    }
    if mode == Mode::Reliable {
        if delivered != count || lost != 0 || torn != 0 {
            return Err(format!("reliable stream lost messages: {report:?}").into());
        }
        if child_sum != sum {
            return Err(
                format!("checksums differ: published {sum:#x}, read {child_sum:#x}").into(),
            );
        }
    } else if lost == 0 {
        return Err("the slow lossy reader was never lapped: the test did not test".into());
    }
    Ok(())
}

fn peer(sock: OwnedFd) -> Result<(), String> {
    let mut fds = FdBatch::new();
    let setup = recv_words(&sock, &mut fds)?;
    let [mode, data_bytes, max, slow_every] = setup[..] else {
        return Err(format!("bad setup {setup:?}"));
    };
    let [ring_fd, cursor_fd, wake_fd] = fds.take_all::<3>().ok_or("expected 3 fds")?;
    let mode = Mode::from_raw(mode as u32).ok_or("bad mode")?;
    let cfg = RingConfig {
        mode,
        data_bytes,
        max_message_bytes: max as u32,
        publisher_id: 1,
    };
    let page = Arc::new(
        CursorPage::init(
            map_cursor_page(&cursor_fd, Access::ReadWrite).map_err(|e| e.to_string())?,
            42,
        )
        .map_err(|e| e.to_string())?,
    );
    let ring =
        map_ring(&ring_fd, data_bytes as usize, Access::ReadOnly).map_err(|e| e.to_string())?;
    let mut reader = Reader::attach(ring, cfg, Some((page.clone(), 0)), StartAt::Beginning)
        .map_err(|e| e.to_string())?;
    let wake = WakeReceiver::from_fd(wake_fd).map_err(|e| e.to_string())?;
    send_frame(sock.as_fd(), &encode(&[1]), &[]).map_err(|e| e.to_string())?;

    let (mut delivered, mut lost, mut torn, mut sum, mut bad) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut expected = 0u64;
    let mut want = vec![0u8; 16 << 10];
    let mut spins = 0u32;
    loop {
        let got = match reader.try_recv() {
            Ok(Some(s)) => {
                spins = 0;
                lost += s.lost_before();
                let seq = s.seq();
                let ok_seq = seq == expected + s.lost_before();
                expected = seq + 1;
                let len = s.len();
                let w = &mut want[..len];
                fill(w, seq);
                let ok_bytes = s[..] == w[..] && len == len_of(seq, max as usize);
                let c = checksum(&s);
                if !s.is_intact() {
                    torn += 1;
                } else if !(ok_seq && ok_bytes) {
                    bad += 1;
                } else {
                    delivered += 1;
                    sum = sum.wrapping_add(c);
                }
                if slow_every > 0 && seq % slow_every == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                true
            }
            Ok(None) => false,
            Err(e) => return Err(e.to_string()),
        };
        if got {
            continue;
        }
        if reader.is_finished() {
            break;
        }
        {
            {
                spins += 1;
                if spins < 1_000 {
                    std::hint::spin_loop();
                    continue;
                }
                // Park: announce, look again, then block on the wake socket.
                protocol::announce_park(page.park_word());
                if !reader.has_pending() && !reader.is_finished() {
                    wake.wait(Some(Duration::from_millis(500)))
                        .map_err(|e| e.to_string())?;
                }
                protocol::unpark(page.park_word());
                spins = 0;
            }
        }
    }
    lost += reader.lost_at_end().unwrap_or(0);
    send_frame(
        sock.as_fd(),
        &encode(&[delivered, lost, torn, sum, bad]),
        &[],
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}
