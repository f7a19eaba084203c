//! Fuzz target: a ring reader over arbitrary shared memory.
//!
//! The input is laid over a real memfd ring (4 KiB data area, mapped twice) through a second
//! read-write mapping, playing a hostile publisher: the first 16 bytes become the header's
//! `next_pos` and `claim` words, the rest the data area. A reader attached with the honest
//! geometry must return records within the maximum length, errors, or nothing, and never panic
//! or read outside its mapping.
#![no_main]

use std::cell::RefCell;
use std::os::fd::OwnedFd;

use bus_core::layout::{Mode, max_message_bytes_for};
use bus_core::ring::{Reader, RingConfig, StartAt, Writer};
use bus_core::segment::{Access, RingMapping, create_ring, map_ring, seal_read_only};
use libfuzzer_sys::fuzz_target;

const DATA: usize = 4096;

struct Ring {
    fd: OwnedFd,
    attacker: RingMapping,
    _writer: Writer,
    cfg: RingConfig,
}

thread_local! {
    static RING: RefCell<Ring> = RefCell::new({
        let cfg = RingConfig {
            mode: Mode::Lossy,
            data_bytes: DATA as u64,
            max_message_bytes: max_message_bytes_for(DATA) as u32,
            publisher_id: 1,
        };
        let fd = create_ring("fuzz", DATA).expect("memfd");
        let attacker = map_ring(&fd, DATA, Access::ReadWrite).expect("map rw");
        let writer = Writer::create(map_ring(&fd, DATA, Access::ReadWrite).expect("map"), cfg)
            .expect("writer");
        seal_read_only(&fd).expect("seal");
        Ring { fd, attacker, _writer: writer, cfg }
    });
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (words, rest) = data.split_at(16);
    let next_pos = u64::from_le_bytes(words[..8].try_into().unwrap());
    let claim = u64::from_le_bytes(words[8..].try_into().unwrap());
    let start = if rest[0] & 1 == 0 { StartAt::Beginning } else { StartAt::Next };
    let bytes = &rest[1..];
    RING.with(|ring| {
        let ring = ring.borrow();
        let data_ptr = ring.attacker.data_mut_ptr();
        let header = ring.attacker.header_mut_ptr();
        let n = bytes.len().min(DATA);
        // SAFETY: the attacker mapping is read-write, the data area is DATA bytes (mapped twice)
        // and the header page holds next_pos at 0x80 and claim at 0x100; raw writes only.
        unsafe {
            std::ptr::write_bytes(data_ptr, 0, DATA);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data_ptr, n);
            (header.add(0x80) as *mut u64).write_volatile(next_pos);
            (header.add(0x100) as *mut u64).write_volatile(claim);
        }
        let map = map_ring(&ring.fd, DATA, Access::ReadOnly).expect("map ro");
        let mut reader = Reader::attach(map, ring.cfg, None, start).expect("attach");
        for _ in 0..64 {
            match reader.try_recv() {
                Ok(Some(sample)) => {
                    assert!(sample.len() <= ring.cfg.max_message_bytes as usize);
                    let sum: u64 = sample.iter().map(|&b| u64::from(b)).sum();
                    std::hint::black_box(sum);
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
    });
});
