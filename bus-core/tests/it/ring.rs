//! Ring behaviour over real memfd segments: ordering, wrap-around, back-pressure, lossy gaps,
//! hostile memory, and a model-based property test.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bus_core::layout::{Mode, max_message_bytes_for, record_bytes};
use bus_core::ring::{
    AttachError, Corruption, CursorPage, CursorView, LoanError, Reader, ReaderSet, RecvError,
    RingConfig, StartAt, Writer,
};
use bus_core::segment::{
    Access, RingMapping, create_cursor_page, create_ring, map_cursor_page, map_ring, seal_read_only,
};
use proptest::prelude::*;

/// A ring with one writer and one registered reader, plus an extra read-write mapping made
/// before sealing that tests use to play a hostile writer.
pub struct Fixture {
    pub writer: Writer,
    pub reader: Reader,
    pub cfg: RingConfig,
    pub ring_fd: OwnedFd,
    pub attacker: RingMapping,
}

pub fn config(mode: Mode, data_bytes: u64) -> RingConfig {
    RingConfig {
        mode,
        data_bytes,
        max_message_bytes: max_message_bytes_for(data_bytes as usize) as u32,
        publisher_id: 11,
    }
}

pub fn fixture(mode: Mode, data_bytes: u64, registered: bool) -> Fixture {
    let cfg = config(mode, data_bytes);
    let ring_fd = create_ring("test-ring", data_bytes as usize).unwrap();
    let wmap = map_ring(&ring_fd, data_bytes as usize, Access::ReadWrite).unwrap();
    let attacker = map_ring(&ring_fd, data_bytes as usize, Access::ReadWrite).unwrap();
    let mut writer = Writer::create(wmap, cfg).unwrap();
    seal_read_only(&ring_fd).unwrap();
    let rmap = map_ring(&ring_fd, data_bytes as usize, Access::ReadOnly).unwrap();

    let cursor = if registered {
        let cfd = create_cursor_page("test-cursor").unwrap();
        let page = Arc::new(
            CursorPage::init(map_cursor_page(&cfd, Access::ReadWrite).unwrap(), 7).unwrap(),
        );
        seal_read_only(&cfd).unwrap();
        let view = CursorView::attach(map_cursor_page(&cfd, Access::ReadOnly).unwrap(), 7).unwrap();
        writer.add_reader(view, 3, None).unwrap();
        Some((page, 3))
    } else {
        None
    };
    let reader = Reader::attach(rmap, cfg, cursor, StartAt::Beginning).unwrap();
    Fixture {
        writer,
        reader,
        cfg,
        ring_fd,
        attacker,
    }
}

/// Deterministic payload for sequence `seq` and length `len`.
pub fn fill(buf: &mut [u8], seq: u64) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = (seq as u8)
            .wrapping_mul(31)
            .wrapping_add(j as u8)
            .wrapping_add((seq >> 8) as u8);
    }
}

pub fn expect_payload(bytes: &[u8], seq: u64, len: usize) {
    assert_eq!(bytes.len(), len, "length of seq {seq}");
    let mut want = vec![0u8; len];
    fill(&mut want, seq);
    assert!(bytes == &want[..], "payload of seq {seq} differs");
}

fn publish(w: &mut Writer, len: usize) -> Result<u64, LoanError> {
    let seq = w.next_seq();
    let mut loan = w.try_loan(len)?;
    fill(&mut loan, seq);
    Ok(loan.commit())
}

#[test]
fn in_order_across_many_wraps_with_contiguous_records() {
    let mut f = fixture(Mode::Reliable, 4096, true);
    let max = f.cfg.max_message_bytes as usize;
    let mut lens = Vec::new();
    for i in 0..5_000u64 {
        let len = ((i * 37) % (max as u64 + 1)) as usize;
        publish(&mut f.writer, len).expect("reader keeps up");
        lens.push(len);
        let s = f
            .reader
            .try_recv()
            .unwrap()
            .expect("committed record visible");
        assert_eq!(s.seq(), i);
        assert_eq!(s.lost_before(), 0);
        assert_eq!(s.publisher_id(), 11);
        expect_payload(&s, i, len);
        assert!(s.is_intact());
    }
    assert!(f.reader.try_recv().unwrap().is_none(), "nothing left");
    assert_eq!(f.writer.stats().committed, 5_000);
}

#[test]
fn record_crossing_the_end_of_the_data_area_is_one_slice() {
    let mut f = fixture(Mode::Reliable, 4096, true);
    // Move to 64 bytes before the end (2048 + 1984 bytes of records), then publish a record
    // that runs 1 KiB past it.
    publish(&mut f.writer, 2016).unwrap();
    publish(&mut f.writer, 1952).unwrap();
    drop(f.reader.try_recv().unwrap().unwrap());
    drop(f.reader.try_recv().unwrap().unwrap());
    assert_eq!(f.reader.position(), 4096 - 64);
    publish(&mut f.writer, 1000).unwrap();
    let s = f.reader.try_recv().unwrap().unwrap();
    expect_payload(&s, 2, 1000);
}

#[test]
fn reliable_writer_never_overwrites_unreleased_records() {
    let mut f = fixture(Mode::Reliable, 4096, true);
    let mut n = 0;
    while publish(&mut f.writer, 100).is_ok() {
        n += 1;
        assert!(n < 1000, "reliable ring never filled");
    }
    assert_eq!(n, 4096 / record_bytes(100), "fills exactly the data area");
    assert_eq!(publish(&mut f.writer, 100), Err(LoanError::WouldBlock));
    assert_eq!(
        f.writer.loan(100, Some(Duration::from_millis(5))).err(),
        Some(LoanError::TimedOut(Duration::from_millis(5)))
    );
    // Holding a sample keeps its bytes; releasing it frees exactly one record's space.
    {
        let s = f.reader.try_recv().unwrap().unwrap();
        assert_eq!(publish(&mut f.writer, 100), Err(LoanError::WouldBlock));
        expect_payload(&s, 0, 100);
    }
    publish(&mut f.writer, 100).expect("space released by the dropped sample");
    assert_eq!(publish(&mut f.writer, 100), Err(LoanError::WouldBlock));
    for seq in 1..=n as u64 {
        let s = f.reader.try_recv().unwrap().unwrap();
        assert_eq!(s.seq(), seq);
        assert_eq!(s.lost_before(), 0);
        expect_payload(&s, seq, 100);
    }
    assert!(f.writer.stats().full >= 3);
}

#[test]
fn waiting_loan_takes_one_freed_record_and_times_out_only_when_none_is() {
    // The writer waits for a margin of free space while it spins, but a loan must still succeed
    // when its reader frees room for just this record, however short its timeout.
    let mut f = fixture(Mode::Reliable, 4096, true);
    while publish(&mut f.writer, 100).is_ok() {}
    drop(f.reader.try_recv().unwrap().unwrap());
    for timeout in [
        Duration::ZERO,
        Duration::from_micros(10),
        Duration::from_millis(20),
    ] {
        // A loan dropped without commit publishes nothing: the room stays free for the next.
        let loan = f
            .writer
            .loan(100, Some(timeout))
            .unwrap_or_else(|e| panic!("one record of room, timeout {timeout:?}: {e}"));
        assert_eq!(loan.len(), 100);
    }
    // Waiting forever: the record's room is enough once the spin phase is over.
    let seq = f.writer.next_seq();
    let mut loan = f.writer.loan(100, None).expect("room for one record");
    fill(&mut loan, seq);
    loan.commit();
    assert_eq!(
        f.writer.loan(100, Some(Duration::from_millis(1))).err(),
        Some(LoanError::TimedOut(Duration::from_millis(1)))
    );
}

#[test]
fn dropped_loan_publishes_nothing_and_too_large_is_refused() {
    let mut f = fixture(Mode::Reliable, 4096, true);
    {
        let mut loan = f.writer.try_loan(10).unwrap();
        loan.fill(0xAB);
    }
    assert!(f.reader.try_recv().unwrap().is_none());
    let max = f.cfg.max_message_bytes as usize;
    assert_eq!(
        f.writer.try_loan(max + 1).err(),
        Some(LoanError::TooLarge { len: max + 1, max })
    );
    publish(&mut f.writer, 3).unwrap();
    let s = f.reader.try_recv().unwrap().unwrap();
    assert_eq!(s.seq(), 0, "the aborted loan took no sequence number");
    expect_payload(&s, 0, 3);
}

#[test]
fn lossy_writer_never_waits_and_lapped_reader_counts_exact_loss() {
    let mut f = fixture(Mode::Lossy, 4096, true);
    let mut delivered = 0u64;
    let mut lost = 0u64;
    let mut last = None;
    let mut published = 0u64;
    // Bursts of varying size between reads: some fit, some lap the reader.
    for burst in 0..200u64 {
        for _ in 0..(burst * 7) % 60 {
            publish(&mut f.writer, 100).expect("lossy never blocks");
            published += 1;
        }
        while let Some(s) = f.reader.try_recv().unwrap() {
            lost += s.lost_before();
            if let Some(l) = last {
                assert_eq!(s.seq(), l + 1 + s.lost_before(), "gap equals reported loss");
            }
            last = Some(s.seq());
            expect_payload(&s, s.seq(), 100);
            assert!(s.is_intact());
            delivered += 1;
        }
    }
    f.writer.close();
    while let Some(s) = f.reader.try_recv().unwrap() {
        lost += s.lost_before();
        delivered += 1;
    }
    lost += f.reader.lost_at_end().expect("closed");
    assert!(lost > 0, "the reader was lapped");
    assert!(delivered > 0);
    assert_eq!(delivered + lost, published, "delivered + lost = published");
}

#[test]
fn has_record_sees_committed_records_only_and_never_a_lapped_one_as_empty() {
    let mut f = fixture(Mode::Lossy, 4096, true);
    assert!(!f.reader.has_record(), "empty ring");
    assert!(!f.reader.has_pending());
    let _ = f.writer.try_loan(8).unwrap();
    assert!(!f.reader.has_record(), "a dropped loan publishes nothing");
    publish(&mut f.writer, 8).unwrap();
    assert!(f.reader.has_record());
    drop(f.reader.try_recv().unwrap().expect("the record"));
    assert!(!f.reader.has_record(), "taken");
    // Lap the reader: its position now holds a newer record, which is not "its" record;
    // has_pending still says there is something to do (a resync).
    for _ in 0..200 {
        publish(&mut f.writer, 100).unwrap();
    }
    assert!(
        !f.reader.has_record(),
        "a lapped position is not a committed record"
    );
    assert!(f.reader.has_pending());
    let s = f.reader.try_recv().unwrap().expect("resynchronised");
    assert!(s.lost_before() > 0);
}

#[test]
fn lossy_sample_reports_overwrite_while_held() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    publish(&mut f.writer, 100).unwrap();
    let s = f.reader.try_recv().unwrap().unwrap();
    assert!(s.is_intact());
    let mut copy = Vec::new();
    assert!(s.copy_to(&mut copy));
    for _ in 0..100 {
        publish(&mut f.writer, 100).unwrap();
    }
    assert!(!s.is_intact(), "the writer lapped the held sample");
    assert!(!s.copy_to(&mut copy), "a copy taken now may be torn");
}

#[test]
fn start_at_next_skips_history_and_closed_ring_finishes() {
    let mut f = fixture(Mode::Lossy, 8192, false);
    for _ in 0..5 {
        publish(&mut f.writer, 10).unwrap();
    }
    let rmap = map_ring(&f.ring_fd, 8192, Access::ReadOnly).unwrap();
    let mut late = Reader::attach(rmap, f.cfg, None, StartAt::Next).unwrap();
    assert!(late.try_recv().unwrap().is_none());
    publish(&mut f.writer, 10).unwrap();
    {
        let s = late.try_recv().unwrap().unwrap();
        assert_eq!(s.seq(), 5);
        assert_eq!(s.lost_before(), 0, "history is not loss");
    }
    assert!(!late.is_finished());
    assert_eq!(late.lost_at_end(), None);
    f.writer.close();
    assert!(late.is_finished());
    assert_eq!(late.lost_at_end(), Some(0));
    // The first reader still drains all six.
    let mut n = 0;
    while f.reader.try_recv().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 6);
    assert!(f.reader.is_finished());
}

#[test]
fn lost_at_end_counts_the_tail_a_lapped_reader_never_saw() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    publish(&mut f.writer, 10).unwrap();
    drop(f.reader.try_recv().unwrap().unwrap());
    for _ in 0..200 {
        publish(&mut f.writer, 100).unwrap();
    }
    f.writer.close();
    let mut delivered = 1;
    let mut lost = 0;
    while let Some(s) = f.reader.try_recv().unwrap() {
        delivered += 1;
        lost += s.lost_before();
    }
    assert!(f.reader.is_finished());
    lost += f.reader.lost_at_end().unwrap();
    assert_eq!(delivered + lost, 201);
}

#[test]
fn reader_refuses_a_header_that_disagrees_with_the_grant() {
    let f = fixture(Mode::Reliable, 4096, false);
    let rmap = || map_ring(&f.ring_fd, 4096, Access::ReadOnly).unwrap();
    let mut wrong = f.cfg;
    wrong.mode = Mode::Lossy;
    let err = Reader::attach(rmap(), wrong, None, StartAt::Beginning).unwrap_err();
    assert!(
        matches!(err, AttachError::HeaderMismatch { field: "mode", .. }),
        "{err}"
    );
    let mut wrong = f.cfg;
    wrong.publisher_id = 99;
    let err = Reader::attach(rmap(), wrong, None, StartAt::Beginning).unwrap_err();
    assert!(
        matches!(
            err,
            AttachError::HeaderMismatch {
                field: "publisher_id",
                ..
            }
        ),
        "{err}"
    );
    let mut wrong = f.cfg;
    wrong.max_message_bytes = 100;
    let err = Reader::attach(rmap(), wrong, None, StartAt::Beginning).unwrap_err();
    assert!(matches!(err, AttachError::HeaderMismatch { .. }), "{err}");
    let mut wrong = f.cfg;
    wrong.data_bytes = 3000;
    let err = Reader::attach(rmap(), wrong, None, StartAt::Beginning).unwrap_err();
    assert!(matches!(err, AttachError::BadGeometry { .. }), "{err}");
}

#[test]
fn reader_set_is_fair_and_keeps_each_publishers_order() {
    let mut a = fixture(Mode::Reliable, 8192, false);
    let mut b = fixture(Mode::Reliable, 8192, false);
    for _ in 0..3 {
        publish(&mut a.writer, 8).unwrap();
        publish(&mut b.writer, 8).unwrap();
    }
    // Give b a different publisher id by attaching with its own config.
    let mut set = ReaderSet::new();
    set.insert(a.reader);
    let bmap = map_ring(&b.ring_fd, 8192, Access::ReadOnly).unwrap();
    set.insert(Reader::attach(bmap, b.cfg, None, StartAt::Beginning).unwrap());
    let mut order = Vec::new();
    while let Some(s) = set.try_recv().unwrap() {
        order.push(s.seq());
    }
    assert_eq!(
        order,
        vec![0, 0, 1, 1, 2, 2],
        "alternates between rings, each in order"
    );
    assert!(!set.has_pending());
}

// ---------------------------------------------------------------------------------------------
// Hostile memory
// ---------------------------------------------------------------------------------------------

/// Writes `bytes` at byte offset `off` of the attacker's view of the data area.
fn scribble_data(f: &Fixture, off: usize, bytes: &[u8]) {
    let len = f.attacker.data_bytes();
    assert!(off + bytes.len() <= 2 * len);
    // SAFETY: the attacker mapping is read-write and covers 2 * data_bytes from data_ptr; we
    // write raw bytes only, as a hostile peer would. The reader under test must cope.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            f.attacker.data_mut_ptr().add(off),
            bytes.len(),
        )
    };
}

fn scribble_header(f: &Fixture, off: usize, value: u64) {
    assert!(off + 8 <= 4096 && off.is_multiple_of(8));
    // SAFETY: the attacker mapping is read-write; the header page is 4096 bytes.
    unsafe { (f.attacker.header_mut_ptr().add(off) as *mut u64).write_volatile(value) };
}

fn forge_record(f: &Fixture, pos: u64, seq: u64, len: u32, kind: u16) {
    let off = (pos % f.cfg.data_bytes) as usize;
    let mut h = [0u8; 32];
    h[0..8].copy_from_slice(&(pos + 1).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&kind.to_le_bytes());
    scribble_data(f, off, &h);
}

#[test]
fn forged_length_past_the_maximum_is_an_error_not_a_read() {
    let mut f = fixture(Mode::Reliable, 4096, false);
    forge_record(&f, 0, 0, u32::MAX, 1);
    let err = f.reader.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::LengthTooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        f.reader.try_recv().unwrap().is_none(),
        "a corrupt ring stays quiet"
    );
    assert!(!f.reader.has_pending());
}

#[test]
fn forged_kind_and_backwards_sequence_are_errors() {
    let mut f = fixture(Mode::Reliable, 4096, false);
    forge_record(&f, 0, 0, 4, 77);
    let err = f.reader.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::UnknownKind(77),
                ..
            }
        ),
        "{err}"
    );

    let mut f = fixture(Mode::Reliable, 4096, false);
    publish(&mut f.writer, 8).unwrap();
    publish(&mut f.writer, 8).unwrap();
    drop(f.reader.try_recv().unwrap().unwrap());
    forge_record(&f, 64, 0, 8, 1);
    let err = f.reader.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::SequenceBackwards { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn claim_and_next_pos_that_lie_are_errors() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    // claim says everything was overwritten; next_pos points backwards-misaligned.
    scribble_header(&f, 0x100, u64::MAX);
    scribble_header(&f, 0x80, 13);
    let err = f.reader.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::BadNextPosition(13),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn positions_near_u64_max_do_not_overflow() {
    let f = fixture(Mode::Lossy, 4096, false);
    scribble_header(&f, 0x80, u64::MAX - 63);
    scribble_header(&f, 0x100, u64::MAX);
    let rmap = map_ring(&f.ring_fd, 4096, Access::ReadOnly).unwrap();
    let mut r = Reader::attach(rmap, f.cfg, None, StartAt::Next).unwrap();
    forge_record(&f, u64::MAX - 127, 5, 8, 1);
    // Nothing is committed at the reader's position (a record behind it does not count).
    for _ in 0..4 {
        assert!(matches!(r.try_recv(), Ok(None)));
    }
    assert!(!r.has_pending());
    // A committed record there whose end lies past u64::MAX is a state no honest writer
    // reaches: reported once, then the ring is neither read nor polled again.
    forge_record(&f, r.position(), 0, 8, 1);
    assert!(r.has_pending());
    let mut errors = 0;
    for _ in 0..4 {
        match r.try_recv() {
            Ok(Some(_)) => panic!("a record ending past u64::MAX was delivered"),
            Ok(None) => {}
            Err(_) => errors += 1,
        }
    }
    assert_eq!(errors, 1, "the corrupt ring is reported exactly once");
    assert!(
        !r.has_pending(),
        "a corrupt ring never looks pending (no spin)"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary bytes anywhere in the data area and hot header words: every call returns
    /// Ok or Err, never panics, and every delivered slice has a length within the maximum.
    #[test]
    fn random_ring_bytes_never_panic(
        writes in proptest::collection::vec((0usize..8192, proptest::collection::vec(any::<u8>(), 1..64)), 1..64),
        next_pos in any::<u64>(),
        claim in any::<u64>(),
        start_next in any::<bool>(),
    ) {
        let f = fixture(Mode::Lossy, 4096, false);
        for (off, bytes) in &writes {
            let off = (*off).min(8192 - bytes.len());
            scribble_data(&f, off, bytes);
        }
        scribble_header(&f, 0x80, next_pos);
        scribble_header(&f, 0x100, claim);
        let rmap = map_ring(&f.ring_fd, 4096, Access::ReadOnly).unwrap();
        let start = if start_next { StartAt::Next } else { StartAt::Beginning };
        let mut r = Reader::attach(rmap, f.cfg, None, start).unwrap();
        for _ in 0..256 {
            if let Ok(Some(s)) = r.try_recv() {
                prop_assert!(s.len() <= f.cfg.max_message_bytes as usize);
                let _sum: u64 = s.iter().map(|&b| b as u64).sum();
            }
        }
    }
}

#[test]
fn ring_bytes_changing_while_read_never_panic() {
    let f = fixture(Mode::Lossy, 4096, false);
    let Fixture {
        mut writer,
        ring_fd,
        attacker,
        cfg,
        reader,
    } = f;
    drop(reader);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scribbler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let base = attacker.data_mut_ptr() as usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x as usize % (8192 - 8)) & !7;
                // SAFETY: off + 8 <= 2 * data_bytes inside the attacker's read-write mapping;
                // an atomic store, as a hostile peer racing the reader would do.
                let word = unsafe { &*((base + off) as *const std::sync::atomic::AtomicU64) };
                word.store(x, std::sync::atomic::Ordering::Relaxed);
            }
            drop(attacker);
        })
    };
    let rmap = map_ring(&ring_fd, 4096, Access::ReadOnly).unwrap();
    let mut r = Reader::attach(rmap, cfg, None, StartAt::Beginning).unwrap();
    let mut outcomes = [0u32; 3];
    for i in 0..200_000u64 {
        if i % 16 == 0 {
            let _ = publish(&mut writer, (i % 200) as usize);
        }
        let corrupt = match r.try_recv() {
            Ok(Some(s)) => {
                assert!(s.len() <= cfg.max_message_bytes as usize);
                outcomes[0] += 1;
                false
            }
            Ok(None) => {
                outcomes[1] += 1;
                false
            }
            Err(_) => {
                outcomes[2] += 1;
                true
            }
        };
        if corrupt {
            // A corrupt ring is dropped; attach a fresh reader and keep going.
            let rmap = map_ring(&ring_fd, 4096, Access::ReadOnly).unwrap();
            r = Reader::attach(rmap, cfg, None, StartAt::Next).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    scribbler.join().unwrap();
    assert!(outcomes.iter().sum::<u32>() == 200_000);
}

// ---------------------------------------------------------------------------------------------
// Model-based property test
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Publish(usize),
    Abort(usize),
    Recv,
    /// Receive, and hold the sample across the next publish attempt.
    RecvHold(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..=480).prop_map(Op::Publish),
        1 => (0usize..=480).prop_map(Op::Abort),
        4 => Just(Op::Recv),
        1 => (0usize..=480).prop_map(Op::RecvHold),
    ]
}

/// The model of one ring: what was published where, the claim, and the reader's position.
struct Model {
    data: u64,
    chunk: u64,
    reliable: bool,
    wpos: u64,
    claim: u64,
    published: Vec<(u64, usize)>,
    rpos: u64,
    expected: u64,
    queue: VecDeque<u64>,
}

impl Model {
    fn new(data: u64, reliable: bool) -> Model {
        Model {
            data,
            chunk: data / 8,
            reliable,
            wpos: 0,
            claim: data,
            published: Vec::new(),
            rpos: 0,
            expected: 0,
            queue: VecDeque::new(),
        }
    }

    /// Returns whether the writer accepts a record of `len`, updating the claim like reserve().
    fn reserve(&mut self, len: usize) -> bool {
        let end = self.wpos + record_bytes(len) as u64;
        let mut limit = u64::MAX;
        if self.reliable {
            if end - self.rpos > self.data {
                return false;
            }
            limit = self.rpos + self.data;
        }
        if end > self.claim {
            self.claim = end.next_multiple_of(self.chunk).min(limit);
        }
        true
    }

    fn publish(&mut self, len: usize) {
        self.published.push((self.wpos, len));
        self.queue.push_back(self.published.len() as u64 - 1);
        self.wpos += record_bytes(len) as u64;
    }

    /// What the reader must see next: `Some((seq, lost))` or `None`.
    fn recv(&mut self) -> Option<(u64, u64)> {
        for _ in 0..2 {
            let intact = self.claim <= self.rpos + self.data;
            if !intact {
                // Latest wins: the newest record, or the write position if there is none.
                self.rpos = self.published.last().map_or(self.wpos, |&(p, _)| p);
                continue;
            }
            let seq = self.published.iter().position(|&(p, _)| p == self.rpos)? as u64;
            let lost = seq - self.expected;
            self.expected = seq + 1;
            self.rpos += record_bytes(self.published[seq as usize].1) as u64;
            return Some((seq, lost));
        }
        None
    }
}

fn run_model(ops: Vec<Op>, mode: Mode) -> Result<(), TestCaseError> {
    let data = 4096u64;
    let mut f = fixture(mode, data, true);
    let mut m = Model::new(data, mode == Mode::Reliable);
    let mut pending_hold: Option<usize> = None;
    for op in ops {
        match op {
            Op::Publish(len) => {
                let accepted = m.reserve(len);
                let got = publish(&mut f.writer, len);
                prop_assert_eq!(got.is_ok(), accepted, "publish {} accepted", len);
                if accepted {
                    prop_assert_eq!(got.unwrap(), m.published.len() as u64);
                    m.publish(len);
                } else {
                    prop_assert_eq!(got, Err(LoanError::WouldBlock));
                }
            }
            Op::Abort(len) => {
                let accepted = m.reserve(len);
                let loan = f.writer.try_loan(len);
                prop_assert_eq!(loan.is_ok(), accepted);
            }
            Op::Recv | Op::RecvHold(_) => {
                let want = m.recv();
                let got = f.reader.try_recv().unwrap();
                match (want, got) {
                    (None, None) => {}
                    (Some((seq, lost)), Some(s)) => {
                        prop_assert_eq!(s.seq(), seq);
                        prop_assert_eq!(s.lost_before(), lost);
                        let (_, len) = m.published[seq as usize];
                        prop_assert_eq!(s.len(), len);
                        let mut want_bytes = vec![0u8; len];
                        fill(&mut want_bytes, seq);
                        prop_assert!(s[..] == want_bytes[..]);
                        if let Op::RecvHold(len) = op {
                            pending_hold = Some(len);
                        }
                        // In reliable mode the held sample blocks space until dropped; the
                        // model's rpos already advanced, so only probe in lossy mode.
                        if let (Some(len), Mode::Lossy) = (pending_hold.take(), mode) {
                            drop(s);
                            let accepted = m.reserve(len);
                            prop_assert!(accepted);
                            publish(&mut f.writer, len).unwrap();
                            m.publish(len);
                        }
                    }
                    (want, got) => {
                        return Err(TestCaseError::fail(format!(
                            "model expected {want:?}, ring gave {:?}",
                            got.map(|s| (s.seq(), s.lost_before()))
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn reliable_ring_matches_queue_model(ops in proptest::collection::vec(op(), 1..400)) {
        run_model(ops, Mode::Reliable)?;
    }

    #[test]
    fn lossy_ring_matches_model(ops in proptest::collection::vec(op(), 1..400)) {
        run_model(ops, Mode::Lossy)?;
    }
}

#[test]
fn parked_reader_is_woken_once_per_park_and_never_parking_reader_never() {
    for never_parks in [false, true] {
        let cfg = config(Mode::Reliable, 4096);
        let ring_fd = create_ring("wake-ring", 4096).unwrap();
        let mut writer =
            Writer::create(map_ring(&ring_fd, 4096, Access::ReadWrite).unwrap(), cfg).unwrap();
        seal_read_only(&ring_fd).unwrap();
        let cfd = create_cursor_page("wake-cursor").unwrap();
        let page = Arc::new(
            CursorPage::init_with(
                map_cursor_page(&cfd, Access::ReadWrite).unwrap(),
                9,
                never_parks,
            )
            .unwrap(),
        );
        seal_read_only(&cfd).unwrap();
        let view = CursorView::attach(map_cursor_page(&cfd, Access::ReadOnly).unwrap(), 9).unwrap();
        let (tx, rx) = bus_core::wake::pair().unwrap();
        writer.add_reader(view, 0, Some(tx)).unwrap();
        let mut reader = Reader::attach(
            map_ring(&ring_fd, 4096, Access::ReadOnly).unwrap(),
            cfg,
            Some((page.clone(), 0)),
            StartAt::Beginning,
        )
        .unwrap();

        publish(&mut writer, 8).unwrap();
        assert_eq!(writer.stats().wakes_sent, 0, "not parked: no syscall");
        bus_core::wake::protocol::announce_park(page.park_word());
        publish(&mut writer, 8).unwrap();
        publish(&mut writer, 8).unwrap();
        let expected = if never_parks { 0 } else { 1 };
        assert_eq!(
            writer.stats().wakes_sent,
            expected,
            "never_parks = {never_parks}"
        );
        assert_eq!(rx.drain(), expected as usize);
        bus_core::wake::protocol::unpark(page.park_word());
        bus_core::wake::protocol::announce_park(page.park_word());
        publish(&mut writer, 8).unwrap();
        assert_eq!(writer.stats().wakes_sent, 2 * expected, "one wake per park");
        let mut n = 0;
        while reader.try_recv().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 4);
    }
}

/// Found by the `ring_reader` fuzz target: a forged record with sequence `u64::MAX` made the
/// reader's next expected sequence overflow when the sample was dropped.
#[test]
fn forged_sequence_at_u64_max_does_not_overflow() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    forge_record(&f, 0, u64::MAX, 8, 1);
    forge_record(&f, 64, u64::MAX, 8, 1);
    for _ in 0..3 {
        if let Ok(Some(s)) = f.reader.try_recv() {
            assert_eq!(s.seq(), u64::MAX);
        }
    }
}

/// A subscriber that was there before the publisher reads its ring from the first record; until
/// its cursor attaches it holds position 0, so a reliable writer fills one ring and then waits
/// rather than overwriting what that subscriber has not read.
#[test]
fn from_start_reader_holds_position_zero_until_it_attaches() {
    let cfg = config(Mode::Reliable, 4096);
    let ring_fd = create_ring("from-start", 4096).unwrap();
    let mut writer =
        Writer::create(map_ring(&ring_fd, 4096, Access::ReadWrite).unwrap(), cfg).unwrap();
    seal_read_only(&ring_fd).unwrap();
    let cfd = create_cursor_page("from-start-cursor").unwrap();
    let page =
        Arc::new(CursorPage::init(map_cursor_page(&cfd, Access::ReadWrite).unwrap(), 5).unwrap());
    seal_read_only(&cfd).unwrap();
    let view = CursorView::attach(map_cursor_page(&cfd, Access::ReadOnly).unwrap(), 5).unwrap();
    writer.add_reader_from_start(view, 2, None).unwrap();
    let mut published = 0;
    while publish(&mut writer, 100).is_ok() {
        published += 1;
        assert!(published < 1000);
    }
    assert_eq!(
        published,
        4096 / record_bytes(100),
        "one ring, then it waits"
    );
    let mut reader = Reader::attach(
        map_ring(&ring_fd, 4096, Access::ReadOnly).unwrap(),
        cfg,
        Some((page, 2)),
        StartAt::Beginning,
    )
    .unwrap();
    for seq in 0..published as u64 {
        let s = reader.try_recv().unwrap().expect("nothing was overwritten");
        assert_eq!((s.seq(), s.lost_before()), (seq, 0));
        expect_payload(&s, seq, 100);
    }
    publish(&mut writer, 100).expect("space released once the reader read");
}

// ---------------------------------------------------------------------------------------------
// Progress: a hostile writer cannot make a has_pending / try_recv loop spin
// ---------------------------------------------------------------------------------------------

const NEXT_POS: usize = 0x80;
const LAST_POS: usize = 0x90;
const CLAIM: usize = 0x100;

/// One round of a caller's loop ("if has_pending, try_recv"): `Some(progress)` when
/// has_pending said true, where progress is whether try_recv returned a sample or an error or
/// moved the reader; `None` when has_pending said false.
fn pending_round(r: &mut Reader) -> Option<bool> {
    if !r.has_pending() {
        return None;
    }
    let before = r.position();
    let got = r.try_recv().map(|s| s.is_some());
    let progress = match got {
        Ok(true) | Err(_) => true,
        Ok(false) => r.position() > before,
    };
    Some(progress)
}

/// The claim trick: publish one message, then claim = u64::MAX and next_pos = last_pos
/// = the writer's position. has_pending used to say true for ever while try_recv resynced to
/// the same position and returned Ok(None): every caller loop spun at 100% CPU.
#[test]
fn claim_at_u64_max_with_next_pos_at_the_reader_is_corrupt_not_a_spin() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    publish(&mut f.writer, 8).unwrap();
    drop(f.reader.try_recv().unwrap().expect("the message"));
    let here = f.reader.position();
    scribble_header(&f, CLAIM, u64::MAX);
    scribble_header(&f, NEXT_POS, here);
    scribble_header(&f, LAST_POS, here);
    assert!(
        f.reader.has_pending(),
        "the claim says the reader was lapped"
    );
    let err = f.reader.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::BadNextPosition(_) | Corruption::ClaimBeyondNextPosition { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        !f.reader.has_pending(),
        "a corrupt ring is skipped from then on"
    );
    assert!(f.reader.try_recv().unwrap().is_none());
    let mut set = ReaderSet::new();
    set.insert(f.reader);
    assert!(!set.has_pending());
}

/// A claim further past next_pos than any writer can raise it is corrupt even when next_pos
/// itself would let the reader move.
#[test]
fn claim_beyond_what_next_pos_allows_is_corrupt() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    publish(&mut f.writer, 8).unwrap();
    drop(f.reader.try_recv().unwrap().unwrap());
    scribble_header(&f, NEXT_POS, 128);
    scribble_header(&f, CLAIM, 128 + 4096 + 64);
    let err = f.reader.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::ClaimBeyondNextPosition {
                    claim: 4288,
                    next_pos: 128
                },
                ..
            }
        ),
        "{err}"
    );
}

/// An honest writer's extreme: claim exactly next_pos + data_bytes (a fresh ring's first
/// state, and as far as a writer can raise it) is not corrupt, and a resync moves the reader.
#[test]
fn claim_at_next_pos_plus_data_bytes_is_honest_and_resync_moves() {
    let mut f = fixture(Mode::Lossy, 4096, false);
    for _ in 0..200 {
        publish(&mut f.writer, 100).unwrap();
    }
    let s = f
        .reader
        .try_recv()
        .unwrap()
        .expect("resynchronised to the newest record");
    assert!(s.lost_before() > 0);
    drop(s);
    // The record of the writer's newest position: last_pos equal to the reader's position is
    // skipped (that position is the one found overwritten), next_pos taken instead.
    let (next, _) = f.reader.writer_progress();
    assert_eq!(f.reader.position(), next);
}

/// A writer whose last record ended past u64::MAX cannot exist: the reader must not wrap
/// around to small positions and read the ring again.
#[test]
fn record_ending_past_u64_max_is_corrupt() {
    let f = fixture(Mode::Lossy, 4096, false);
    let start = u64::MAX - 63;
    scribble_header(&f, NEXT_POS, start);
    scribble_header(&f, CLAIM, u64::MAX);
    let rmap = map_ring(&f.ring_fd, 4096, Access::ReadOnly).unwrap();
    let mut r = Reader::attach(rmap, f.cfg, None, StartAt::Next).unwrap();
    assert_eq!(r.position(), start);
    forge_record(&f, start, 5, 8, 1);
    let err = r.try_recv().unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Corrupt {
                what: Corruption::BadNextPosition(p),
                ..
            } if p == start
        ),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random header words (claim, next_pos, last_pos) and commit words (some forged to look
    /// committed, at positions around the hot ones): no sequence of has_pending / try_recv
    /// loops without progress. Whenever has_pending says true, try_recv returns a sample or an
    /// error, or moves the reader (at most 2 consecutive exceptions allowed by the issue;
    /// none happen), and the loop ends (has_pending false) within a bounded number of rounds.
    #[test]
    fn hostile_header_words_never_make_a_caller_spin(
        published in 0usize..80,
        claim in prop_oneof![any::<u64>(), 0u64..20_000, Just(u64::MAX)],
        next_pos in prop_oneof![any::<u64>(), 0u64..20_000, (0u64..300).prop_map(|k| k * 64)],
        last_pos in prop_oneof![any::<u64>(), 0u64..20_000, (0u64..300).prop_map(|k| k * 64)],
        forged in proptest::collection::vec(
            (prop_oneof![0u64..20_000, (0u64..300).prop_map(|k| k * 64)], any::<u64>(), 0u32..200),
            0..8,
        ),
        read_first in 0usize..80,
        start_next in any::<bool>(),
    ) {
        let mut f = fixture(Mode::Lossy, 4096, false);
        for _ in 0..published {
            publish(&mut f.writer, 40).unwrap();
        }
        for _ in 0..read_first.min(published) {
            let _ = f.reader.try_recv();
        }
        scribble_header(&f, CLAIM, claim);
        scribble_header(&f, NEXT_POS, next_pos);
        scribble_header(&f, LAST_POS, last_pos);
        for &(pos, seq, len) in &forged {
            let pos = pos - pos % 64;
            forge_record(&f, pos, seq, len, 1);
        }
        let mut readers = vec![f.reader];
        if start_next {
            let rmap = map_ring(&f.ring_fd, 4096, Access::ReadOnly).unwrap();
            readers.push(Reader::attach(rmap, f.cfg, None, StartAt::Next).unwrap());
        }
        for r in &mut readers {
            let mut stuck = 0;
            let mut rounds = 0;
            while let Some(progress) = pending_round(r) {
                rounds += 1;
                stuck = if progress { 0 } else { stuck + 1 };
                prop_assert!(stuck <= 2, "has_pending true, try_recv Ok(None), no move: {r:?}");
                // Every sample or resync moves the reader forward through a finite ring of
                // forged and published records; 4096/64 positions per lap, a few laps at most.
                prop_assert!(rounds < 2_000, "caller loop does not end: {r:?}");
            }
            // has_record obeys the same rule.
            if r.has_record() {
                let before = r.position();
                let got = r.try_recv().map(|s| s.is_some());
                let progress = match got {
                    Ok(true) | Err(_) => true,
                    Ok(false) => r.position() > before,
                };
                prop_assert!(progress, "has_record true, try_recv made no progress: {r:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cursors the writer can prove
// ---------------------------------------------------------------------------------------------

/// A reliable writer with one subscriber whose cursor page the test writes directly (as a
/// hostile subscriber would): the writer, the page (read-write) and a reader of the ring.
struct CursorFixture {
    writer: Writer,
    _page: CursorPage,
    /// A second read-write mapping of the page, made before sealing: the hostile subscriber.
    attacker: bus_core::segment::Mapping,
}

const SLOT: usize = 4;

fn cursor_fixture() -> CursorFixture {
    let cfg = config(Mode::Reliable, 4096);
    let ring_fd = create_ring("cursor-judge", 4096).unwrap();
    let mut writer =
        Writer::create(map_ring(&ring_fd, 4096, Access::ReadWrite).unwrap(), cfg).unwrap();
    seal_read_only(&ring_fd).unwrap();
    let cfd = create_cursor_page("cursor-judge-page").unwrap();
    let page = CursorPage::init(map_cursor_page(&cfd, Access::ReadWrite).unwrap(), 21).unwrap();
    let attacker = map_cursor_page(&cfd, Access::ReadWrite).unwrap();
    seal_read_only(&cfd).unwrap();
    let view = CursorView::attach(map_cursor_page(&cfd, Access::ReadOnly).unwrap(), 21).unwrap();
    writer.add_reader(view, SLOT, None).unwrap();
    CursorFixture {
        writer,
        _page: page,
        attacker,
    }
}

/// Stores `value` into the subscriber's cursor for slot SLOT, as a hostile subscriber may.
fn set_cursor(f: &CursorFixture, value: u64) {
    let off = bus_core::layout::cursor_slot_offset(SLOT);
    assert!(off + 8 <= f.attacker.len() && off.is_multiple_of(8));
    // SAFETY: the attacker mapping is read-write and covers the page; the slot offset is
    // 8-aligned inside it; an atomic store, as the subscriber itself would do.
    let word = unsafe {
        std::sync::atomic::AtomicU64::from_ptr(f.attacker.as_mut_ptr().add(off).cast::<u64>())
    };
    word.store(value, std::sync::atomic::Ordering::Release);
}

/// Publishes 96-byte records (128 bytes each) until the ring is full; returns how many.
fn fill_ring(w: &mut Writer) -> usize {
    let mut n = 0;
    while publish(w, 96).is_ok() {
        n += 1;
        assert!(n < 1000, "reliable ring never filled");
    }
    n
}

#[test]
fn honest_cursor_at_a_committed_record_blocks_a_reliable_writer() {
    let mut f = cursor_fixture();
    set_cursor(&f, 0);
    assert_eq!(
        fill_ring(&mut f.writer),
        32,
        "a cursor at record 0 holds one ring"
    );
    // Move the cursor to the third record: exactly two records of room.
    set_cursor(&f, 256);
    publish(&mut f.writer, 96).unwrap();
    publish(&mut f.writer, 96).unwrap();
    assert_eq!(publish(&mut f.writer, 96), Err(LoanError::WouldBlock));
    // A cursor at next_pos (caught up) frees the whole ring.
    let next = 34 * 128;
    set_cursor(&f, next);
    assert_eq!(fill_ring(&mut f.writer), 32);
}

#[test]
fn lying_cursors_do_not_hold_a_reliable_writer_back() {
    // Each lie is set after the ring has filled once behind an honest cursor at 0 and that
    // cursor moved to record 2 (so the window is [256, 4352] after two more records).
    type Lie = (&'static str, fn(u64) -> u64);
    let lies: [Lie; 5] = [
        ("behind the window", |_| 0),
        ("ahead of next_pos", |next| next + 128),
        ("misaligned", |_| 256 + 8),
        ("mid-record (aligned, no record starts there)", |_| 256 + 64),
        ("far ahead", |_| u64::MAX - 1),
    ];
    for (what, lie) in lies {
        let mut f = cursor_fixture();
        set_cursor(&f, 0);
        assert_eq!(fill_ring(&mut f.writer), 32);
        set_cursor(&f, 256);
        publish(&mut f.writer, 96).unwrap();
        publish(&mut f.writer, 96).unwrap();
        assert_eq!(publish(&mut f.writer, 96), Err(LoanError::WouldBlock));
        let next = 34 * 128;
        // Two more laps: nothing holds the writer now (a lying reader only hurts itself). The
        // lie is renewed relative to the writer's position before each record (a value ahead
        // of next_pos becomes a real record once the writer gets there).
        for k in 0..64 {
            let value = lie(next + k * 128);
            set_cursor(&f, value);
            publish(&mut f.writer, 96).unwrap_or_else(|e| {
                panic!("cursor {what} ({value}) held the writer at record {k}: {e}")
            });
        }
    }
}

/// A subscriber that changes its lie all the time (a new value on every publish, some of
/// them honest-looking but never a record boundary) never blocks the writer: it runs laps.
#[test]
fn cursor_that_keeps_changing_its_lie_does_not_block_the_writer() {
    let mut f = cursor_fixture();
    for i in 0..3 * 32u64 {
        let next = i * 128;
        let lie = match i % 4 {
            // Behind the window once there is one; ahead of next_pos before.
            0 => next.checked_sub(4096 + 128).unwrap_or(next + 128),
            1 => next + 64,
            // Mid-record (records are 128 bytes at multiples of 128).
            2 => next.saturating_sub(64).max(64),
            _ => next + 4096,
        };
        set_cursor(&f, lie);
        publish(&mut f.writer, 96)
            .unwrap_or_else(|e| panic!("record {i}: cursor {lie} held the writer: {e}"));
    }
}

#[test]
fn reader_committed_record_at_tells_record_boundaries() {
    let mut f = fixture(Mode::Reliable, 4096, false);
    assert!(!f.reader.committed_record_at(0), "nothing committed yet");
    publish(&mut f.writer, 96).unwrap();
    publish(&mut f.writer, 96).unwrap();
    assert!(f.reader.committed_record_at(0));
    assert!(f.reader.committed_record_at(128));
    assert!(!f.reader.committed_record_at(64), "mid-record");
    assert!(!f.reader.committed_record_at(8), "misaligned");
    assert!(
        !f.reader.committed_record_at(256),
        "next_pos: not committed yet"
    );
    assert!(
        !f.reader.committed_record_at(4096),
        "the same offset one lap later"
    );
    assert!(!f.reader.committed_record_at(u64::MAX), "no overflow");
    assert!(!f.reader.committed_record_at(u64::MAX - 63));
}
