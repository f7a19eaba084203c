//! `bus_core::segment` against the real kernel: the seals are enforced by Linux, not by us.
//!
//! Raw `rustix::mm` calls here deliberately bypass `segment` to show that even a peer that skips
//! our checks cannot get write access to a sealed segment.

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr;

use bus_core::layout::{CURSOR_PAGE_BYTES, MAX_DATA_BYTES, MIN_DATA_BYTES, RING_HEADER_BYTES};
use bus_core::segment::{
    self, Access, Expect, MapOptions, READER_SEALS, Role, SegmentError, WRITER_SEALS,
};
use rustix::fs::{FallocateFlags, Mode, OFlags, SealFlags};
use rustix::io::Errno;
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};

const DATA: usize = 64 * 1024;

fn read_at(base: *const u8, off: usize) -> u8 {
    // SAFETY: every caller passes a base of a live mapping valid for reads past `off` (the
    // ring's data_ptr is valid for 2 * data_bytes, header_ptr for RING_HEADER_BYTES). Volatile,
    // because the same bytes are reachable through other addresses the compiler can't see.
    unsafe { ptr::read_volatile(base.add(off)) }
}

fn write_at(base: *mut u8, off: usize, v: u8) {
    // SAFETY: as for `read_at`, and the mapping is read-write (callers got `base` from a
    // `*_mut_ptr()`, which panics on a read-only mapping).
    unsafe { ptr::write_volatile(base.add(off), v) }
}

/// A ring created by the "broker", mapped by its writer, then sealed read-only.
fn sealed_ring(name: &str) -> (OwnedFd, segment::RingMapping) {
    let fd = segment::create_ring(name, DATA).expect("create ring");
    let writer = segment::map_ring(&fd, DATA, Access::ReadWrite).expect("writer maps RW");
    segment::seal_read_only(&fd).expect("seal read-only");
    (fd, writer)
}

fn without_exec(seals: SealFlags) -> SealFlags {
    seals.difference(SealFlags::EXEC)
}

/// Raw shared mapping of the whole fd, bypassing `segment`: what a hostile peer would try.
fn raw_map_shared(fd: impl AsFd, len: usize, prot: ProtFlags) -> Result<*mut c_void, Errno> {
    // SAFETY: a null hint without MAP_FIXED: the kernel picks a fresh range, nothing is replaced.
    unsafe { rustix::mm::mmap(ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }
}

fn raw_unmap(p: *mut c_void, len: usize) {
    // SAFETY: `p..p+len` was returned by `raw_map_shared`/mmap in the same test and no
    // reference into it exists.
    unsafe { rustix::mm::munmap(p, len) }.expect("munmap");
}

fn reopen(fd: &OwnedFd, flags: OFlags) -> Result<OwnedFd, Errno> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(path.as_str(), flags | OFlags::CLOEXEC, Mode::empty())
}

#[test]
fn writer_and_reader_share_bytes_through_both_copies_of_the_data_area() {
    let fd = segment::create_ring("membus-test-both-copies", DATA).unwrap();
    let writer = segment::map_ring_with(
        &fd,
        DATA,
        Access::ReadWrite,
        MapOptions::new().populate(true),
    )
    .unwrap();
    assert_eq!(writer.access(), Access::ReadWrite);
    assert_eq!(writer.data_bytes(), DATA);
    let hdr = writer.header_mut_ptr();
    let data = writer.data_mut_ptr();
    assert_eq!(data.cast_const(), writer.data_ptr());
    assert_eq!(
        writer.data_ptr() as usize - writer.header_ptr() as usize,
        RING_HEADER_BYTES
    );

    write_at(hdr, 0, 0x11);
    write_at(data, 0, 0xA1); // first copy, start
    write_at(data, 2 * DATA - 1, 0xB2); // second copy, end

    segment::seal_read_only(&fd).unwrap();
    let reader = segment::map_ring(&fd, DATA, Access::ReadOnly).unwrap();
    assert_eq!(reader.access(), Access::ReadOnly);
    let rd = reader.data_ptr();

    assert_eq!(read_at(reader.header_ptr(), 0), 0x11);
    assert_eq!(
        read_at(rd, DATA),
        0xA1,
        "writer's first copy -> reader's second copy"
    );
    assert_eq!(read_at(rd, 0), 0xA1);
    assert_eq!(
        read_at(rd, DATA - 1),
        0xB2,
        "writer's second copy -> reader's first copy"
    );

    // A "record" that runs past the end of the first copy: one contiguous write and read.
    for i in 0..64 {
        write_at(data, DATA - 32 + i, 0x40 + i as u8);
    }
    for i in 0..64 {
        assert_eq!(
            read_at(rd, DATA - 32 + i),
            0x40 + i as u8,
            "contiguous across the seam"
        );
    }
    // The part past the seam is the start of the data area.
    for i in 0..32 {
        assert_eq!(read_at(rd, i), 0x60 + i as u8);
    }

    // The writer's mapping, made before the seal, still writes after it.
    write_at(data, 100, 0x5A);
    assert_eq!(read_at(rd, 100), 0x5A);
    assert_eq!(read_at(rd, DATA + 100), 0x5A);
    write_at(hdr, 8, 0x77);
    assert_eq!(read_at(reader.header_ptr(), 8), 0x77);
}

#[test]
fn cursor_page_writer_and_reader() {
    let fd = segment::create_cursor_page("membus-test-cursor").unwrap();
    let writer = segment::map_cursor_page(&fd, Access::ReadWrite).unwrap();
    assert_eq!(writer.len(), CURSOR_PAGE_BYTES);
    let w = writer.as_mut_ptr();
    write_at(w, CURSOR_PAGE_BYTES - 1, 0xC7);

    // Before the seal a reader is refused: the page could still be written by anyone.
    assert!(matches!(
        segment::map_cursor_page(&fd, Access::ReadOnly),
        Err(SegmentError::SealsMismatch {
            role: Role::Reader,
            ..
        })
    ));
    segment::seal_read_only(&fd).unwrap();
    let reader = segment::map_cursor_page(&fd, Access::ReadOnly).unwrap();
    assert_eq!(reader.access(), Access::ReadOnly);
    assert_eq!(read_at(reader.as_ptr(), CURSOR_PAGE_BYTES - 1), 0xC7);
    write_at(w, 0, 0x3C);
    assert_eq!(read_at(reader.as_ptr(), 0), 0x3C);
}

#[test]
#[should_panic(expected = "read-only")]
fn write_pointer_into_a_read_only_ring_panics() {
    let (fd, _writer) = sealed_ring("membus-test-ro-mut-ptr");
    let reader = segment::map_ring(&fd, DATA, Access::ReadOnly).unwrap();
    let _ = reader.data_mut_ptr();
}

#[test]
#[should_panic(expected = "read-only")]
fn write_pointer_into_a_read_only_cursor_page_panics() {
    let fd = segment::create_cursor_page("membus-test-ro-cursor-mut-ptr").unwrap();
    segment::seal_read_only(&fd).unwrap();
    let reader = segment::map_cursor_page(&fd, Access::ReadOnly).unwrap();
    let _ = reader.as_mut_ptr();
}

#[test]
fn describe_reports_size_and_seals() {
    let fd = segment::create_ring("membus-test-describe", DATA).unwrap();
    let info = segment::describe(&fd).unwrap();
    assert_eq!(info.size_bytes, (RING_HEADER_BYTES + DATA) as u64);
    assert_eq!(without_exec(info.seals), WRITER_SEALS);
    segment::seal_read_only(&fd).unwrap();
    let info = segment::describe(&fd).unwrap();
    assert_eq!(without_exec(info.seals), READER_SEALS);
    let shown = info.to_string();
    assert!(
        shown.starts_with(&format!(
            "{} bytes, seals SHRINK|GROW|FUTURE_WRITE|SEAL",
            RING_HEADER_BYTES + DATA
        )),
        "{shown}"
    );
}

#[test]
fn sealed_segment_refuses_new_writable_shared_mappings() {
    let (fd, _writer) = sealed_ring("membus-test-no-rw-map");
    let len = RING_HEADER_BYTES + DATA;
    assert_eq!(
        raw_map_shared(&fd, len, ProtFlags::READ | ProtFlags::WRITE).err(),
        Some(Errno::PERM)
    );
    // Control: the same call with PROT_READ only succeeds, so EPERM above is the seal speaking.
    let p = raw_map_shared(&fd, len, ProtFlags::READ).expect("read-only map of a sealed fd");
    raw_unmap(p, len);
}

#[test]
fn sealed_readonly_mapping_cannot_be_made_writable() {
    let (fd, _writer) = sealed_ring("membus-test-mprotect");
    let reader = segment::map_ring(&fd, DATA, Access::ReadOnly).unwrap();
    // SAFETY: the range is the reader's header page, mapped and owned by `reader` for the whole
    // call; no reference into it exists.
    let r = unsafe {
        rustix::mm::mprotect(
            reader.header_ptr().cast_mut().cast(),
            RING_HEADER_BYTES,
            MprotectFlags::READ | MprotectFlags::WRITE,
        )
    };
    assert_eq!(r, Err(Errno::ACCESS));
    // SAFETY: as above, the second copy of the data area is mapped and owned by `reader`.
    let r = unsafe {
        rustix::mm::mprotect(
            reader.data_ptr().add(DATA).cast_mut().cast(),
            DATA,
            MprotectFlags::READ | MprotectFlags::WRITE,
        )
    };
    assert_eq!(r, Err(Errno::ACCESS));
}

/// Why the broker must hand the fd to readers only after `seal_read_only`: a read-only shared
/// mapping made while the segment is still writable keeps the right to become writable.
/// FUTURE_WRITE only governs mappings made after it.
#[test]
fn readonly_mapping_made_before_the_seal_can_still_be_made_writable() {
    let fd = segment::create_ring("membus-test-early-reader", DATA).unwrap();
    let len = RING_HEADER_BYTES + DATA;
    let early = raw_map_shared(&fd, len, ProtFlags::READ).unwrap();
    segment::seal_read_only(&fd).unwrap();
    // SAFETY: `early..early+len` is the mapping made just above; no reference into it exists.
    let r = unsafe { rustix::mm::mprotect(early, len, MprotectFlags::READ | MprotectFlags::WRITE) };
    assert_eq!(
        r,
        Ok(()),
        "kernel now forbids upgrading pre-seal mappings; relax the design note"
    );
    raw_unmap(early, len);
}

#[test]
fn read_write_reopen_through_proc_cannot_write() {
    let (fd, writer) = sealed_ring("membus-test-reopen");
    // Opening succeeds: the seal is on the inode, not on open modes.
    let rw = reopen(&fd, OFlags::RDWR).expect("reopen O_RDWR");
    let len = RING_HEADER_BYTES + DATA;
    assert_eq!(
        raw_map_shared(&rw, len, ProtFlags::READ | ProtFlags::WRITE).err(),
        Some(Errno::PERM)
    );
    assert_eq!(rustix::io::write(&rw, b"x"), Err(Errno::PERM));
    assert_eq!(
        rustix::io::pwrite(&rw, b"x", RING_HEADER_BYTES as u64),
        Err(Errno::PERM)
    );
    // Punching a hole would zero pages under the writer: refused too.
    assert_eq!(
        rustix::fs::fallocate(
            &rw,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            0,
            len as u64
        ),
        Err(Errno::PERM)
    );
    // Our own verified path refuses a read-write mapping with a typed error, not a crash.
    assert!(matches!(
        segment::map_ring(&rw, DATA, Access::ReadWrite),
        Err(SegmentError::SealsMismatch {
            role: Role::Writer,
            ..
        })
    ));
    // And the writer's bytes are untouched.
    let reader = segment::map_ring(&rw, DATA, Access::ReadOnly).unwrap();
    write_at(writer.data_mut_ptr(), 7, 0x99);
    assert_eq!(read_at(reader.data_ptr(), 7), 0x99);
}

/// MAP_PRIVATE + PROT_WRITE is allowed by the kernel, but writes are copy-on-write and private:
/// nobody else sees them.
#[test]
fn private_writable_mapping_does_not_reach_the_segment() {
    let (fd, _writer) = sealed_ring("membus-test-private");
    let len = RING_HEADER_BYTES + DATA;
    // SAFETY: null hint without MAP_FIXED; nothing is replaced.
    let p = unsafe {
        rustix::mm::mmap(
            ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
            &fd,
            0,
        )
    }
    .expect("private writable mapping");
    write_at(p.cast(), RING_HEADER_BYTES + 3, 0xEE);
    let reader = segment::map_ring(&fd, DATA, Access::ReadOnly).unwrap();
    assert_eq!(read_at(reader.data_ptr(), 3), 0);
    raw_unmap(p, len);
}

#[test]
fn sealed_segment_cannot_be_resized() {
    let fd = segment::create_ring("membus-test-resize", DATA).unwrap();
    let size = (RING_HEADER_BYTES + DATA) as u64;
    // SHRINK|GROW are there from creation, before any peer has the fd.
    assert_eq!(rustix::fs::ftruncate(&fd, size + 4096), Err(Errno::PERM));
    assert_eq!(rustix::fs::ftruncate(&fd, size - 4096), Err(Errno::PERM));
    assert_eq!(rustix::fs::ftruncate(&fd, 0), Err(Errno::PERM));
    segment::seal_read_only(&fd).unwrap();
    let rw = reopen(&fd, OFlags::RDWR).unwrap();
    assert_eq!(rustix::fs::ftruncate(&rw, size * 2), Err(Errno::PERM));
    assert_eq!(rustix::fs::ftruncate(&rw, 0), Err(Errno::PERM));
    assert_eq!(segment::describe(&fd).unwrap().size_bytes, size);
}

#[test]
fn seals_are_final_after_seal_read_only() {
    let (fd, _writer) = sealed_ring("membus-test-final");
    let before = rustix::fs::fcntl_get_seals(&fd).unwrap();
    for extra in [
        SealFlags::WRITE,
        SealFlags::SHRINK,
        SealFlags::SEAL,
        SealFlags::empty(),
    ] {
        assert_eq!(
            rustix::fs::fcntl_add_seals(&fd, extra),
            Err(Errno::PERM),
            "{extra:?}"
        );
    }
    // There is no call that removes seals; the set is unchanged.
    assert_eq!(rustix::fs::fcntl_get_seals(&fd).unwrap(), before);
    // Sealing twice is our error, typed.
    assert!(matches!(
        segment::seal_read_only(&fd),
        Err(SegmentError::SealsMismatch {
            role: Role::Writer,
            ..
        })
    ));
}

#[test]
fn writer_role_on_a_sealed_segment_is_a_typed_error() {
    let (fd, _writer) = sealed_ring("membus-test-late-writer");
    match segment::map_ring(&fd, DATA, Access::ReadWrite) {
        Err(SegmentError::SealsMismatch {
            role: Role::Writer,
            expected,
            found,
        }) => {
            assert_eq!(expected, WRITER_SEALS);
            assert_eq!(without_exec(found), READER_SEALS);
        }
        other => panic!("expected SealsMismatch, got {other:?}"),
    }
    let cursor = segment::create_cursor_page("membus-test-late-writer-cursor").unwrap();
    segment::seal_read_only(&cursor).unwrap();
    let err = segment::map_cursor_page(&cursor, Access::ReadWrite).unwrap_err();
    assert!(matches!(
        err,
        SegmentError::SealsMismatch {
            role: Role::Writer,
            ..
        }
    ));
    assert!(err.to_string().contains("before seal_read_only"), "{err}");
}

#[test]
fn verify_rejects_wrong_size() {
    let fd = segment::create_ring("membus-test-size", DATA).unwrap();
    match segment::verify(&fd, Expect::ring(2 * DATA, Role::Writer)) {
        Err(SegmentError::SizeMismatch { expected, found }) => {
            assert_eq!(expected, (RING_HEADER_BYTES + 2 * DATA) as u64);
            assert_eq!(found, (RING_HEADER_BYTES + DATA) as u64);
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert!(matches!(
        segment::map_ring(&fd, DATA / 2, Access::ReadWrite),
        Err(SegmentError::SizeMismatch { .. })
    ));
    assert!(matches!(
        segment::verify(&fd, Expect::cursor_page(Role::Writer)),
        Err(SegmentError::SizeMismatch { .. })
    ));
    // Control: the right expectation passes.
    segment::verify(&fd, Expect::ring(DATA, Role::Writer)).unwrap();
}

#[test]
fn verify_rejects_an_unsealed_memfd() {
    let size = RING_HEADER_BYTES + DATA;
    for flags in [
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        // Without ALLOW_SEALING the kernel reports F_SEAL_SEAL alone.
        rustix::fs::MemfdFlags::CLOEXEC,
    ] {
        let fd = rustix::fs::memfd_create("membus-test-unsealed", flags).unwrap();
        rustix::fs::ftruncate(&fd, size as u64).unwrap();
        for role in [Role::Writer, Role::Reader] {
            match segment::verify(&fd, Expect::ring(DATA, role)) {
                Err(SegmentError::SealsMismatch {
                    expected, found, ..
                }) => {
                    assert_eq!(expected, role.seals());
                    assert!(!without_exec(found).contains(WRITER_SEALS), "{found:?}");
                }
                other => panic!("{flags:?} {role}: expected SealsMismatch, got {other:?}"),
            }
        }
    }
}

#[test]
fn verify_rejects_the_other_role() {
    let fd = segment::create_ring("membus-test-roles", DATA).unwrap();
    // Writer-state fd given to a reader check.
    match segment::verify(&fd, Expect::ring(DATA, Role::Reader)) {
        Err(
            err @ SegmentError::SealsMismatch {
                role: Role::Reader, ..
            },
        ) => {
            assert!(err.to_string().contains("seal_read_only"), "{err}");
        }
        other => panic!("expected SealsMismatch, got {other:?}"),
    }
    segment::verify(&fd, Expect::ring(DATA, Role::Writer)).unwrap();
    segment::seal_read_only(&fd).unwrap();
    // Reader-state fd given to a writer check.
    assert!(matches!(
        segment::verify(&fd, Expect::ring(DATA, Role::Writer)),
        Err(SegmentError::SealsMismatch {
            role: Role::Writer,
            ..
        })
    ));
    segment::verify(&fd, Expect::ring(DATA, Role::Reader)).unwrap();
}

#[test]
fn verify_rejects_a_regular_file() {
    let path = std::env::temp_dir().join(format!("membus-test-segment-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len((RING_HEADER_BYTES + DATA) as u64).unwrap();
    std::fs::remove_file(&path).unwrap();
    let on_tmpfs = rustix::fs::fstatfs(&file).unwrap().f_type == 0x0102_1994; // TMPFS_MAGIC
    match segment::verify(&file, Expect::ring(DATA, Role::Reader)) {
        // A file on a disk filesystem has no seals at all.
        Err(SegmentError::NotSealable { source }) if !on_tmpfs => {
            assert_eq!(source, Errno::INVAL)
        }
        // On tmpfs it answers F_GET_SEALS with SEAL only.
        Err(SegmentError::SealsMismatch { found, .. }) if on_tmpfs => {
            assert_eq!(found, SealFlags::SEAL)
        }
        other => panic!("expected a rejection (tmpfs: {on_tmpfs}), got {other:?}"),
    }
}

/// A named file on tmpfs supports seals, but anyone who can open its path can rewrite it; only
/// an anonymous memfd is accepted.
#[test]
fn verify_rejects_a_named_tmpfs_file() {
    let path = format!("/dev/shm/membus-test-segment-{}", std::process::id());
    let file = std::fs::File::create(&path).unwrap();
    file.set_len((RING_HEADER_BYTES + DATA) as u64).unwrap();
    let result = segment::verify(&file, Expect::ring(DATA, Role::Reader));
    std::fs::remove_file(&path).unwrap();
    match result {
        Err(SegmentError::NotMemfd { file_type, links }) => {
            assert_eq!(file_type, rustix::fs::FileType::RegularFile);
            assert_eq!(links, 1);
        }
        other => panic!("expected NotMemfd, got {other:?}"),
    }
}

#[test]
fn verify_rejects_a_pipe() {
    let (r, w) = rustix::pipe::pipe().unwrap();
    for fd in [&r, &w] {
        match segment::verify(fd, Expect::cursor_page(Role::Reader)) {
            Err(SegmentError::NotSealable { source }) => assert_eq!(source, Errno::INVAL),
            other => panic!("expected NotSealable, got {other:?}"),
        }
        assert!(matches!(
            segment::map_cursor_page(fd, Access::ReadOnly),
            Err(SegmentError::NotSealable { .. })
        ));
        assert!(segment::describe(fd).is_err());
    }
}

#[test]
fn bad_data_sizes_are_rejected() {
    for bad in [
        MIN_DATA_BYTES + 1,
        3 * MIN_DATA_BYTES,
        MAX_DATA_BYTES - 1,
        0,
    ] {
        let r = segment::create_ring("membus-test-bad", bad);
        if bad == 0 {
            // 0 is not a power of two either.
            assert!(matches!(
                r,
                Err(SegmentError::DataBytesNotPowerOfTwo { data_bytes: 0 })
            ));
        } else {
            assert!(
                matches!(r, Err(SegmentError::DataBytesNotPowerOfTwo { data_bytes }) if data_bytes == bad),
                "{bad}: {r:?}"
            );
        }
    }
    for bad in [MIN_DATA_BYTES / 2, 64, 1, MAX_DATA_BYTES * 2] {
        let r = segment::create_ring("membus-test-bad", bad);
        assert!(
            matches!(r, Err(SegmentError::DataBytesOutOfRange { data_bytes, .. }) if data_bytes == bad),
            "{bad}: {r:?}"
        );
    }
    // The mapping side checks too, before touching the fd.
    let fd = segment::create_ring("membus-test-bad-map", DATA).unwrap();
    assert!(matches!(
        segment::map_ring(&fd, DATA + 4096, Access::ReadWrite),
        Err(SegmentError::DataBytesNotPowerOfTwo { .. })
    ));
    // Both bounds are accepted.
    segment::check_data_bytes(MIN_DATA_BYTES).unwrap();
    segment::check_data_bytes(MAX_DATA_BYTES).unwrap();
}

/// A mapping attempt that fails half-way (after the address space is reserved) leaves nothing
/// behind: `RingMapping` owns the reservation from the start. An O_RDONLY reopen passes the
/// writer's seal check but the kernel refuses a writable shared mapping of it (EACCES).
#[test]
fn failed_map_half_way_is_a_typed_error() {
    let fd = segment::create_ring("membus-test-half-way", DATA).unwrap();
    let ro = reopen(&fd, OFlags::RDONLY).unwrap();
    match segment::map_ring(&ro, DATA, Access::ReadWrite) {
        Err(SegmentError::Map { access, source, .. }) => {
            assert_eq!(access, Access::ReadWrite);
            assert_eq!(source, Errno::ACCESS);
        }
        other => panic!("expected Map error, got {other:?}"),
    }
}

const HYGIENE_CHILD: &str = "MEMBUS_SEGMENT_FD_HYGIENE_CHILD";
const HYGIENE_MARKER: &str = "segment-fd-hygiene-child: ok";

fn count_fds() -> (usize, usize) {
    let mut all = 0;
    let mut memfds = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        all += 1;
        if let Ok(target) = std::fs::read_link(entry.path())
            && target
                .to_string_lossy()
                .starts_with("/memfd:membus-test-hygiene")
        {
            memfds += 1;
        }
    }
    (all, memfds)
}

/// (mappings of our memfds, `reservation`-sized PROT_NONE anonymous regions)
fn count_maps(reservation: usize) -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut memfd = 0;
    let mut reserved = 0;
    for line in maps.lines() {
        if line.contains("/memfd:membus-test-hygiene") {
            memfd += 1;
        }
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let inode = fields.nth(2).unwrap();
        let (lo, hi) = range.split_once('-').unwrap();
        let len = usize::from_str_radix(hi, 16).unwrap() - usize::from_str_radix(lo, 16).unwrap();
        // Adjacent leaked reservations merge into one VMA, so count whole multiples.
        if perms == "---p" && inode == "0" && len.is_multiple_of(reservation) {
            reserved += len / reservation;
        }
    }
    (memfd, reserved)
}

fn hygiene_round(rounds: usize, data_bytes: usize) {
    let mut keep = Vec::new();
    for i in 0..rounds {
        let ring =
            segment::create_ring(&format!("membus-test-hygiene-ring-{i}"), data_bytes).unwrap();
        let writer = segment::map_ring(&ring, data_bytes, Access::ReadWrite).unwrap();
        // Error paths: refused before mapping, and refused by the kernel after reserving.
        assert!(segment::map_ring(&ring, data_bytes, Access::ReadOnly).is_err());
        let ro = reopen(&ring, OFlags::RDONLY).unwrap();
        assert!(segment::map_ring(&ro, data_bytes, Access::ReadWrite).is_err());
        drop(ro);
        segment::seal_read_only(&ring).unwrap();
        let reader = segment::map_ring(&ring, data_bytes, Access::ReadOnly).unwrap();
        let cursor =
            segment::create_cursor_page(&format!("membus-test-hygiene-cursor-{i}")).unwrap();
        let cw = segment::map_cursor_page(&cursor, Access::ReadWrite).unwrap();
        segment::seal_read_only(&cursor).unwrap();
        let cr = segment::map_cursor_page(&cursor, Access::ReadOnly).unwrap();
        // Drop half the fds while their mappings live on, to show mappings hold no fd.
        if i % 2 == 0 {
            drop(ring);
            keep.push((None, writer, reader, Some(cursor), cw, cr));
        } else {
            drop(cursor);
            keep.push((Some(ring), writer, reader, None, cw, cr));
        }
    }
    let reservation = RING_HEADER_BYTES + 2 * data_bytes;
    let (_, memfds) = count_fds();
    let (mapped, _) = count_maps(reservation);
    // The counters see what we made (so the equality checks below can fail): one fd per kept
    // segment, and per ring 2 writer + 2 reader VMAs, per cursor page 2.
    assert_eq!(memfds, rounds);
    assert!(
        mapped >= rounds * 6,
        "{mapped} mappings for {rounds} rounds"
    );
    drop(keep);
}

/// Creating, mapping, failing to map and dropping many segments leaks no fd and no mapping.
/// Runs in a child process (this test binary again, one thread) so other tests' fds don't count.
#[test]
fn fd_hygiene() {
    if std::env::var_os(HYGIENE_CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "segment::fd_hygiene",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(HYGIENE_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains(HYGIENE_MARKER),
            "child did not run the check:\n{stdout}\n{stderr}"
        );
        return;
    }
    let data_bytes = 1 << 20; // reservation of 2 MiB + 4 KiB: a size nothing else maps
    let reservation = RING_HEADER_BYTES + 2 * data_bytes;
    hygiene_round(1, data_bytes); // warm up lazily allocated state
    let fds_before = count_fds();
    let maps_before = count_maps(reservation);
    assert_eq!(fds_before.1, 0);
    assert_eq!(maps_before, (0, 0));
    hygiene_round(32, data_bytes);
    assert_eq!(count_fds(), fds_before, "(all fds, membus memfds)");
    assert_eq!(
        count_maps(reservation),
        maps_before,
        "(memfd mappings, leftover reservations)"
    );
    println!("{HYGIENE_MARKER}");
}
