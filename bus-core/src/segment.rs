#![allow(unsafe_code)]
//! Memfd segments: creation, seals, verification, and mappings.
//!
//! Every piece of shared memory in membus is a memfd that the broker creates. Each has exactly
//! one writer; everyone else maps it read-only, and the kernel enforces that:
//!
//! ```text
//!  broker                              writer (publisher / subscriber)      readers
//!  ------                              -------------------------------      -------
//!  create_ring / create_cursor_page
//!    memfd, ftruncate once,
//!    seal SHRINK|GROW  --- fd ----->   verify(Role::Writer), map ReadWrite
//!                      <-- ack ------
//!  seal_read_only
//!    seal FUTURE_WRITE|SEAL --------------------------------------- fd --> verify(Role::Reader),
//!                                                                          map ReadOnly
//! ```
//!
//! - `SHRINK|GROW` (from creation on): nobody can truncate the segment under a mapping, so no
//!   peer can make another one take SIGBUS.
//! - `FUTURE_WRITE` (after the writer has mapped): no new writable shared mapping, no `write()`,
//!   no hole punching, for anyone, even through a read-write reopen of `/proc/<pid>/fd/N`. The
//!   writer's existing mapping keeps working.
//! - `SEAL`: the seal set is final.
//! - `EXEC` may also be present (added by `MFD_NOEXEC_SEAL` or the `vm.memfd_noexec` sysctl); it
//!   is ignored by every check here.
//!
//! A ring is mapped with its data area twice, back to back, so a record that runs past the end
//! of the data area is still one contiguous slice ([`RingMapping`]).
//!
//! Nothing here runs on the data path: creation, verification and mapping happen once per
//! segment on the control plane.
//!
//! # Example
//!
//! ```
//! use bus_core::segment::{self, Access};
//!
//! # fn main() -> Result<(), segment::SegmentError> {
//! // Broker: create the ring.
//! let fd = segment::create_ring("membus-ring-example", 64 * 1024)?;
//! // Publisher: verify and map read-write (before the broker seals it read-only).
//! let writer = segment::map_ring(&fd, 64 * 1024, Access::ReadWrite)?;
//! // Broker: the writer has mapped it; seal it for readers.
//! segment::seal_read_only(&fd)?;
//! // Subscriber: verify and map read-only.
//! let reader = segment::map_ring(&fd, 64 * 1024, Access::ReadOnly)?;
//! assert_eq!(reader.access(), Access::ReadOnly);
//! # drop((writer, reader));
//! # Ok(())
//! # }
//! ```

use core::ffi::c_void;
use core::fmt;
use core::ptr::{self, NonNull};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{FileType, MemfdFlags, SealFlags};
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

use crate::layout::{CURSOR_PAGE_BYTES, MAX_DATA_BYTES, MIN_DATA_BYTES, RING_HEADER_BYTES};

/// Longest memfd name the kernel accepts (`MFD_NAME_MAX_LEN`, without the "memfd:" prefix).
pub const MEMFD_NAME_MAX_BYTES: usize = 249;

/// Seals of a segment whose writer has not mapped it yet (ignoring `EXEC`).
pub const WRITER_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

/// Seals of a segment handed to readers (ignoring `EXEC`).
pub const READER_SEALS: SealFlags = WRITER_SEALS
    .union(SealFlags::FUTURE_WRITE)
    .union(SealFlags::SEAL);

/// How a mapping may be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `PROT_READ`: everyone but the single writer.
    ReadOnly,
    /// `PROT_READ | PROT_WRITE`: the single writer only.
    ReadWrite,
}

impl Access {
    /// The role a process mapping with this access plays, and so the seals it expects.
    pub const fn role(self) -> Role {
        match self {
            Access::ReadOnly => Role::Reader,
            Access::ReadWrite => Role::Writer,
        }
    }

    fn prot(self) -> ProtFlags {
        match self {
            Access::ReadOnly => ProtFlags::READ,
            Access::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
        }
    }
}

/// Which side of a segment the caller is on; decides the seals [`verify`] demands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The single writer, mapping before [`seal_read_only`]: seals are exactly [`WRITER_SEALS`].
    Writer,
    /// A reader, mapping after [`seal_read_only`]: seals are exactly [`READER_SEALS`].
    Reader,
}

impl Role {
    /// The seals a segment must carry (besides an optional `EXEC`) for this role.
    pub const fn seals(self) -> SealFlags {
        match self {
            Role::Writer => WRITER_SEALS,
            Role::Reader => READER_SEALS,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
        })
    }
}

/// What a received segment must look like before it is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Exact size of the memfd in bytes.
    pub size_bytes: usize,
    /// The caller's role, which fixes the expected seals.
    pub role: Role,
}

impl Expect {
    /// A ring segment with a data area of `data_bytes`.
    pub const fn ring(data_bytes: usize, role: Role) -> Expect {
        Expect {
            size_bytes: RING_HEADER_BYTES.saturating_add(data_bytes),
            role,
        }
    }

    /// A cursor page segment.
    pub const fn cursor_page(role: Role) -> Expect {
        Expect {
            size_bytes: CURSOR_PAGE_BYTES,
            role,
        }
    }
}

/// Size and seals of a memfd, for diagnostics and `bus stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Size in bytes (`st_size`).
    pub size_bytes: u64,
    /// Current seals (`F_GET_SEALS`).
    pub seals: SealFlags,
}

impl fmt::Display for SegmentInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes, seals {}",
            self.size_bytes,
            SealsDisplay(self.seals)
        )
    }
}

/// Formats seals as `SHRINK|GROW|...` (or `none`) without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealsDisplay(pub SealFlags);

impl fmt::Display for SealsDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(SealFlags, &str); 6] = [
            (SealFlags::SHRINK, "SHRINK"),
            (SealFlags::GROW, "GROW"),
            (SealFlags::WRITE, "WRITE"),
            (SealFlags::FUTURE_WRITE, "FUTURE_WRITE"),
            (SealFlags::SEAL, "SEAL"),
            (SealFlags::EXEC, "EXEC"),
        ];
        let mut first = true;
        let mut rest = self.0;
        for (flag, name) in NAMES {
            if rest.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest.remove(flag);
            }
        }
        if !rest.is_empty() {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{:#x}", rest.bits())?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Options for [`map_ring_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapOptions {
    /// Prefault every page at map time (`MAP_POPULATE`), so the writer takes no page faults on
    /// the data path. Allocates the whole segment at once.
    pub populate: bool,
}

impl MapOptions {
    /// Default options: no prefaulting.
    pub const fn new() -> MapOptions {
        MapOptions { populate: false }
    }

    /// Sets [`MapOptions::populate`].
    pub const fn populate(mut self, populate: bool) -> MapOptions {
        self.populate = populate;
        self
    }
}

/// Why a segment could not be created, sealed, verified or mapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The memfd name is too long or contains a NUL byte.
    #[error(
        "memfd name of {len} bytes is invalid; use at most {MEMFD_NAME_MAX_BYTES} bytes and no NUL"
    )]
    InvalidName {
        /// Length of the name given, in bytes.
        len: usize,
    },
    /// The data area size is not a power of two.
    #[error("ring data area of {data_bytes} bytes is not a power of two; round it to one")]
    DataBytesNotPowerOfTwo {
        /// The size asked for.
        data_bytes: usize,
    },
    /// The data area size is outside `MIN_DATA_BYTES..=MAX_DATA_BYTES`.
    #[error(
        "ring data area of {data_bytes} bytes is out of range; choose a power of two from {min} to {max}"
    )]
    DataBytesOutOfRange {
        /// The size asked for.
        data_bytes: usize,
        /// [`MIN_DATA_BYTES`].
        min: usize,
        /// [`MAX_DATA_BYTES`].
        max: usize,
    },
    /// The data area size is not a multiple of the page size, so it cannot be mapped twice.
    #[error(
        "ring data area of {data_bytes} bytes is not a multiple of the {page_bytes}-byte page size; use a larger power of two"
    )]
    DataBytesNotPageMultiple {
        /// The size asked for.
        data_bytes: usize,
        /// The system page size.
        page_bytes: usize,
    },
    /// The system page size does not divide the ring header, so the data area cannot be mapped
    /// on its own.
    #[error(
        "page size of {page_bytes} bytes does not divide the {RING_HEADER_BYTES}-byte ring header; membus needs 4 KiB pages"
    )]
    UnsupportedPageSize {
        /// The system page size.
        page_bytes: usize,
    },
    /// `memfd_create` failed.
    #[error("memfd_create failed: {source}; check RLIMIT_NOFILE and the vm.memfd_noexec sysctl")]
    Create {
        /// The kernel's answer.
        source: Errno,
    },
    /// `ftruncate` to the segment size failed.
    #[error("cannot size the memfd to {size_bytes} bytes: {source}; check memory limits")]
    Resize {
        /// The size asked for.
        size_bytes: u64,
        /// The kernel's answer.
        source: Errno,
    },
    /// `F_ADD_SEALS` failed.
    #[error(
        "cannot add seals {} to the memfd: {source}; was it created by create_ring/create_cursor_page?",
        SealsDisplay(*.seals)
    )]
    AddSeals {
        /// The seals asked for.
        seals: SealFlags,
        /// The kernel's answer.
        source: Errno,
    },
    /// `fstat` failed.
    #[error("fstat of the segment fd failed: {source}")]
    Stat {
        /// The kernel's answer.
        source: Errno,
    },
    /// The fd does not support seals: not a memfd (a pipe, a socket, a file on disk, ...).
    #[error(
        "fd does not support seals (F_GET_SEALS: {source}); expected a memfd from create_ring/create_cursor_page"
    )]
    NotSealable {
        /// The kernel's answer to `F_GET_SEALS`.
        source: Errno,
    },
    /// The fd supports seals but is not an anonymous memfd (e.g. a named file on tmpfs).
    #[error(
        "expected an anonymous memfd (regular file, 0 links), found a {file_type:?} with {links} link(s); only map fds from create_ring/create_cursor_page"
    )]
    NotMemfd {
        /// The file type found.
        file_type: FileType,
        /// The link count found.
        links: u64,
    },
    /// The seals are not the exact set the role requires.
    #[error(
        "{role} expected seals {} (EXEC optional), found {}; {}",
        SealsDisplay(*.expected),
        SealsDisplay(*.found),
        seals_hint(*.role, *.found)
    )]
    SealsMismatch {
        /// The role the caller verified for.
        role: Role,
        /// The seals the role requires (besides an optional `EXEC`).
        expected: SealFlags,
        /// The seals found.
        found: SealFlags,
    },
    /// The memfd is not the expected size.
    #[error(
        "expected a segment of {expected} bytes, found {found} bytes; the broker and this process disagree on the segment geometry"
    )]
    SizeMismatch {
        /// The size expected, in bytes.
        expected: u64,
        /// The size found, in bytes.
        found: u64,
    },
    /// Reserving address space for a ring failed.
    #[error("cannot reserve {len} bytes of address space: {source}; check RLIMIT_AS")]
    Reserve {
        /// Bytes asked for.
        len: usize,
        /// The kernel's answer.
        source: Errno,
    },
    /// `mmap` of the segment failed.
    #[error("cannot map {len} bytes {access:?}: {source}; check the seals with `bus stat`")]
    Map {
        /// Bytes asked for.
        len: usize,
        /// The access asked for.
        access: Access,
        /// The kernel's answer.
        source: Errno,
    },
}

fn seals_hint(role: Role, found: SealFlags) -> &'static str {
    let found = found.difference(SealFlags::EXEC);
    match role {
        Role::Writer if found.contains(SealFlags::FUTURE_WRITE) => {
            "the segment is already sealed read-only: the writer must map it before seal_read_only"
        }
        Role::Reader if found == WRITER_SEALS => {
            "the broker must call seal_read_only before handing the fd to readers"
        }
        _ => "only map fds the broker created with create_ring/create_cursor_page",
    }
}

/// Checks a ring data area size: a power of two in `MIN_DATA_BYTES..=MAX_DATA_BYTES`, a multiple
/// of the page size.
pub fn check_data_bytes(data_bytes: usize) -> Result<(), SegmentError> {
    if !data_bytes.is_power_of_two() {
        return Err(SegmentError::DataBytesNotPowerOfTwo { data_bytes });
    }
    if !(MIN_DATA_BYTES..=MAX_DATA_BYTES).contains(&data_bytes) {
        return Err(SegmentError::DataBytesOutOfRange {
            data_bytes,
            min: MIN_DATA_BYTES,
            max: MAX_DATA_BYTES,
        });
    }
    let page_bytes = check_page_size()?;
    if !data_bytes.is_multiple_of(page_bytes) {
        return Err(SegmentError::DataBytesNotPageMultiple {
            data_bytes,
            page_bytes,
        });
    }
    Ok(())
}

fn check_page_size() -> Result<usize, SegmentError> {
    let page_bytes = rustix::param::page_size();
    if !RING_HEADER_BYTES.is_multiple_of(page_bytes) {
        return Err(SegmentError::UnsupportedPageSize { page_bytes });
    }
    Ok(page_bytes)
}

/// Creates a ring segment: a memfd of `RING_HEADER_BYTES + data_bytes`, sealed against shrinking
/// and growing. Hand it to the writer, then call [`seal_read_only`].
pub fn create_ring(name: &str, data_bytes: usize) -> Result<OwnedFd, SegmentError> {
    check_data_bytes(data_bytes)?;
    create_sealed(name, RING_HEADER_BYTES + data_bytes)
}

/// Creates a cursor page segment: a memfd of `CURSOR_PAGE_BYTES`, sealed against shrinking and
/// growing. Hand it to the subscriber, then call [`seal_read_only`].
pub fn create_cursor_page(name: &str) -> Result<OwnedFd, SegmentError> {
    create_sealed(name, CURSOR_PAGE_BYTES)
}

fn create_sealed(name: &str, size_bytes: usize) -> Result<OwnedFd, SegmentError> {
    if name.len() > MEMFD_NAME_MAX_BYTES || name.as_bytes().contains(&0) {
        return Err(SegmentError::InvalidName { len: name.len() });
    }
    let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_NOEXEC_SEAL (Linux 6.3+) makes the memfd non-executable for good. Older kernels reject
    // the unknown flag with EINVAL; the name was checked above, so EINVAL here means that.
    let fd = match rustix::fs::memfd_create(name, base | MemfdFlags::NOEXEC_SEAL) {
        Ok(fd) => fd,
        Err(Errno::INVAL) => rustix::fs::memfd_create(name, base)
            .map_err(|source| SegmentError::Create { source })?,
        Err(source) => return Err(SegmentError::Create { source }),
    };
    let size_bytes = size_bytes as u64;
    rustix::fs::ftruncate(&fd, size_bytes)
        .map_err(|source| SegmentError::Resize { size_bytes, source })?;
    rustix::fs::fcntl_add_seals(&fd, WRITER_SEALS).map_err(|source| SegmentError::AddSeals {
        seals: WRITER_SEALS,
        source,
    })?;
    Ok(fd)
}

/// Seals a segment read-only for good (`F_SEAL_FUTURE_WRITE | F_SEAL_SEAL`): from now on nobody
/// can create a writable shared mapping or `write()` to it. The broker calls this once the single
/// writer has mapped the segment read-write; that mapping keeps working.
///
/// Fails with [`SegmentError::SealsMismatch`] unless the segment is in the writer state (seals
/// exactly [`WRITER_SEALS`]).
pub fn seal_read_only<Fd: AsFd>(fd: Fd) -> Result<(), SegmentError> {
    let fd = fd.as_fd();
    let found = get_seals(fd)?;
    check_seals(Role::Writer, found)?;
    let seals = SealFlags::FUTURE_WRITE | SealFlags::SEAL;
    rustix::fs::fcntl_add_seals(fd, seals)
        .map_err(|source| SegmentError::AddSeals { seals, source })
}

/// Size and seals of a segment fd, for diagnostics. Does not allocate.
pub fn describe<Fd: AsFd>(fd: Fd) -> Result<SegmentInfo, SegmentError> {
    let fd = fd.as_fd();
    let seals = get_seals(fd)?;
    let stat = rustix::fs::fstat(fd).map_err(|source| SegmentError::Stat { source })?;
    Ok(SegmentInfo {
        // st_size is never negative for a regular file; saturate rather than trust it.
        size_bytes: u64::try_from(stat.st_size).unwrap_or(u64::MAX),
        seals,
    })
}

fn get_seals(fd: std::os::fd::BorrowedFd<'_>) -> Result<SealFlags, SegmentError> {
    rustix::fs::fcntl_get_seals(fd).map_err(|source| SegmentError::NotSealable { source })
}

fn check_seals(role: Role, found: SealFlags) -> Result<(), SegmentError> {
    let expected = role.seals();
    if found.difference(SealFlags::EXEC) != expected {
        return Err(SegmentError::SealsMismatch {
            role,
            expected,
            found,
        });
    }
    Ok(())
}

/// Verifies a segment fd received from a peer before anything maps it: it must be an anonymous
/// memfd, carry exactly the seals of `expect.role` (`EXEC` optional), and be exactly
/// `expect.size_bytes` long. Returns what it found.
///
/// The checks run in this order, each with its own error: seals supported
/// ([`SegmentError::NotSealable`]), anonymous regular file ([`SegmentError::NotMemfd`]), seals
/// ([`SegmentError::SealsMismatch`]), size ([`SegmentError::SizeMismatch`]). Seals come before
/// size because only once `SHRINK|GROW` are in place can the size no longer change.
pub fn verify<Fd: AsFd>(fd: Fd, expect: Expect) -> Result<SegmentInfo, SegmentError> {
    let fd = fd.as_fd();
    let seals = get_seals(fd)?;
    let stat = rustix::fs::fstat(fd).map_err(|source| SegmentError::Stat { source })?;
    let file_type = FileType::from_raw_mode(stat.st_mode);
    // `st_nlink` is u64 on x86-64 and u32 elsewhere.
    #[allow(clippy::useless_conversion)]
    let links = u64::from(stat.st_nlink);
    // A memfd has no name in any filesystem, so no link. A file on tmpfs or hugetlbfs also
    // answers F_GET_SEALS, but anyone who can open its path can resize or rewrite it.
    if file_type != FileType::RegularFile || links != 0 {
        return Err(SegmentError::NotMemfd { file_type, links });
    }
    check_seals(expect.role, seals)?;
    let size_bytes = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
    let expected = expect.size_bytes as u64;
    if size_bytes != expected {
        return Err(SegmentError::SizeMismatch {
            expected,
            found: size_bytes,
        });
    }
    Ok(SegmentInfo { size_bytes, seals })
}

/// An owned mapping of a whole segment (a cursor page): unmapped on drop.
///
/// Hands out raw pointers only, never references: other processes may write the memory at any
/// time, so every access is a raw (usually atomic) one by the caller. The fd it was mapped from
/// may be closed; the mapping keeps the memfd alive.
///
/// The `*_mut_ptr` accessors panic on an [`Access::ReadOnly`] mapping: asking for a write
/// pointer into read-only memory is a bug in the caller (a write through it would fault).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    size_bytes: usize,
    access: Access,
}

// SAFETY: `Mapping` owns its address range exclusively (only `Drop` unmaps it) and exposes it
// only as raw pointers; it holds no thread-local state. Moving it to another thread and
// unmapping there is sound. Accesses through the pointers are the caller's `unsafe` and must
// already cope with concurrent writers in other processes, so threads of this one add nothing.
unsafe impl Send for Mapping {}
// SAFETY: see `Send` above: `&Mapping` only yields the base pointer, size and access, all
// immutable after construction.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Base address; valid for reads of [`Mapping::len`] bytes while `self` lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Base address for writes, valid for [`Mapping::len`] bytes while `self` lives.
    ///
    /// # Panics
    ///
    /// If the mapping is [`Access::ReadOnly`].
    #[track_caller]
    pub fn as_mut_ptr(&self) -> *mut u8 {
        assert_eq!(
            self.access,
            Access::ReadWrite,
            "write pointer into a read-only mapping"
        );
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.size_bytes
    }

    /// `true` only for a zero-length mapping, which this module never creates.
    pub fn is_empty(&self) -> bool {
        self.size_bytes == 0
    }

    /// How the mapping may be accessed.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+size_bytes` is the page-aligned range `map_cursor_page` mapped and
        // this value owns; it hands out only raw pointers whose validity ends with `self`, so no
        // reference into the range outlives this call.
        let r = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.size_bytes) };
        debug_assert!(r.is_ok(), "munmap of an owned mapping failed: {r:?}");
    }
}

/// Verifies a cursor page (for the role `access` implies) and maps it.
pub fn map_cursor_page<Fd: AsFd>(fd: Fd, access: Access) -> Result<Mapping, SegmentError> {
    let fd = fd.as_fd();
    verify(fd, Expect::cursor_page(access.role()))?;
    let len = CURSOR_PAGE_BYTES;
    // SAFETY: a null hint without MAP_FIXED lets the kernel choose a fresh range, so no
    // existing memory (and no Rust reference) is replaced. The fd is a verified memfd sealed
    // against SHRINK, exactly `len` bytes long (checked just above), so every mapped page
    // stays backed and access never raises SIGBUS.
    let ptr =
        unsafe { rustix::mm::mmap(ptr::null_mut(), len, access.prot(), MapFlags::SHARED, fd, 0) }
            .map_err(|source| SegmentError::Map {
            len,
            access,
            source,
        })?;
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(SegmentError::Map {
        len,
        access,
        source: Errno::NOMEM,
    })?;
    Ok(Mapping {
        ptr,
        size_bytes: len,
        access,
    })
}

/// A mapped ring segment: the header page, then the data area twice, back to back.
///
/// ```text
///  base                     base + RING_HEADER_BYTES
///  |  header (1 page)       |  data area (data_bytes)   |  data area again (data_bytes) |
///  |  fd offset 0 ...................................... |  fd offset RING_HEADER_BYTES.. |
/// ```
///
/// Byte `data_ptr() + i` and byte `data_ptr() + data_bytes + i` are the same memory, so any
/// `len <= data_bytes` bytes starting at data offset `off < data_bytes` are one contiguous
/// slice. Unmapped (the whole range, at once) on drop.
///
/// Like [`Mapping`], it hands out raw pointers only, and its `*_mut_ptr` accessors panic on an
/// [`Access::ReadOnly`] mapping.
#[derive(Debug)]
pub struct RingMapping {
    base: NonNull<u8>,
    data_bytes: usize,
    access: Access,
}

// SAFETY: as for `Mapping`: the value owns its reserved range exclusively (only `Drop` unmaps
// it), exposes it only as raw pointers, and has no thread affinity.
unsafe impl Send for RingMapping {}
// SAFETY: as for `Mapping`: `&RingMapping` yields only immutable geometry and raw pointers.
unsafe impl Sync for RingMapping {}

impl RingMapping {
    fn total_bytes(&self) -> usize {
        RING_HEADER_BYTES + 2 * self.data_bytes
    }

    /// The header page; valid for reads of `RING_HEADER_BYTES` bytes while `self` lives.
    pub fn header_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    /// The header page for writes; valid for `RING_HEADER_BYTES` bytes while `self` lives.
    ///
    /// # Panics
    ///
    /// If the mapping is [`Access::ReadOnly`].
    #[track_caller]
    pub fn header_mut_ptr(&self) -> *mut u8 {
        self.assert_writable();
        self.base.as_ptr()
    }

    /// The data area; valid for reads of `2 * data_bytes` bytes while `self` lives (the second
    /// half is the first one again).
    #[inline]
    pub fn data_ptr(&self) -> *const u8 {
        self.data_mut_ptr_unchecked()
    }

    /// The data area for writes; valid for `2 * data_bytes` bytes while `self` lives.
    ///
    /// # Panics
    ///
    /// If the mapping is [`Access::ReadOnly`].
    #[inline]
    #[track_caller]
    pub fn data_mut_ptr(&self) -> *mut u8 {
        self.assert_writable();
        self.data_mut_ptr_unchecked()
    }

    #[inline]
    #[track_caller]
    fn assert_writable(&self) {
        // One well-predicted compare; a write through a read-only mapping would fault anyway,
        // this just says why.
        assert!(
            self.access == Access::ReadWrite,
            "write pointer into a read-only ring mapping"
        );
    }

    fn data_mut_ptr_unchecked(&self) -> *mut u8 {
        // `RING_HEADER_BYTES` is within the mapped range (it is followed by 2 * data_bytes
        // more), so this stays inside the allocation; `wrapping_add` needs no unsafe.
        self.base.as_ptr().wrapping_add(RING_HEADER_BYTES)
    }

    /// Size of the data area in bytes (each of its two copies).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// How the mapping may be accessed.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl Drop for RingMapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+total_bytes()` is the page-aligned range `map_ring_with` reserved
        // and this value owns (the two fd mappings were placed inside it with MAP_FIXED). Only
        // raw pointers were handed out, whose validity ends with `self`.
        let r = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.total_bytes()) };
        debug_assert!(r.is_ok(), "munmap of an owned ring mapping failed: {r:?}");
    }
}

/// Verifies a ring segment (for the role `access` implies) and maps it with its data area twice;
/// see [`RingMapping`]. Same as [`map_ring_with`] with default options.
pub fn map_ring<Fd: AsFd>(
    fd: Fd,
    data_bytes: usize,
    access: Access,
) -> Result<RingMapping, SegmentError> {
    map_ring_with(fd, data_bytes, access, MapOptions::new())
}

/// Verifies a ring segment (for the role `access` implies) and maps it with its data area twice;
/// see [`RingMapping`].
pub fn map_ring_with<Fd: AsFd>(
    fd: Fd,
    data_bytes: usize,
    access: Access,
    options: MapOptions,
) -> Result<RingMapping, SegmentError> {
    let fd = fd.as_fd();
    check_data_bytes(data_bytes)?;
    verify(fd, Expect::ring(data_bytes, access.role()))?;

    // data_bytes <= MAX_DATA_BYTES (1 GiB), so this cannot overflow on a 64-bit target.
    let total = RING_HEADER_BYTES + 2 * data_bytes;
    // Reserve the whole range first so the two fd mappings land back to back and nothing else
    // can be placed in between.
    // SAFETY: a null hint without MAP_FIXED lets the kernel choose a fresh range; nothing
    // existing is replaced. PROT_NONE + NORESERVE: the reservation commits no memory.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            total,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map_err(|source| SegmentError::Reserve { len: total, source })?;
    let base = NonNull::new(base.cast::<u8>()).ok_or(SegmentError::Reserve {
        len: total,
        source: Errno::NOMEM,
    })?;
    // From here on `ring` owns the reservation: an early return unmaps it whole.
    let ring = RingMapping {
        base,
        data_bytes,
        access,
    };

    let mut flags = MapFlags::SHARED | MapFlags::FIXED;
    if options.populate {
        flags |= MapFlags::POPULATE;
    }
    let map_err = |len| {
        move |source| SegmentError::Map {
            len,
            access,
            source,
        }
    };

    let first = RING_HEADER_BYTES + data_bytes;
    // SAFETY: MAP_FIXED replaces `base..base+first`, which lies inside the PROT_NONE
    // reservation made above and owned by `ring`; no Rust reference points into it. The fd is
    // a verified memfd of exactly `first` bytes (verify above) sealed against SHRINK, so every
    // page stays backed. `base` is page-aligned (returned by mmap).
    let got = unsafe { rustix::mm::mmap(base.as_ptr().cast(), first, access.prot(), flags, fd, 0) }
        .map_err(map_err(first))?;
    debug_assert_eq!(got, base.as_ptr().cast::<c_void>());

    let second_at = base.as_ptr().wrapping_add(first);
    // SAFETY: MAP_FIXED replaces `second_at..second_at+data_bytes` = the last `data_bytes` of
    // the reservation (total = first + data_bytes), still PROT_NONE and owned by `ring`.
    // `second_at` is page-aligned: RING_HEADER_BYTES and data_bytes are page multiples
    // (check_data_bytes). The file offset RING_HEADER_BYTES is page-aligned for the same
    // reason, and offset + data_bytes equals the verified, SHRINK-sealed file size.
    let got = unsafe {
        rustix::mm::mmap(
            second_at.cast(),
            data_bytes,
            access.prot(),
            flags,
            fd,
            RING_HEADER_BYTES as u64,
        )
    }
    .map_err(map_err(data_bytes))?;
    debug_assert_eq!(got, second_at.cast::<c_void>());

    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_display_names_each_flag() {
        assert_eq!(SealsDisplay(SealFlags::empty()).to_string(), "none");
        assert_eq!(SealsDisplay(WRITER_SEALS).to_string(), "SHRINK|GROW");
        assert_eq!(
            SealsDisplay(READER_SEALS | SealFlags::EXEC).to_string(),
            "SHRINK|GROW|FUTURE_WRITE|SEAL|EXEC"
        );
        assert_eq!(
            SealsDisplay(SealFlags::from_bits_retain(0x100)).to_string(),
            "0x100"
        );
    }

    #[test]
    fn expect_sizes_follow_layout() {
        assert_eq!(
            Expect::ring(MIN_DATA_BYTES, Role::Reader).size_bytes,
            RING_HEADER_BYTES + MIN_DATA_BYTES
        );
        assert_eq!(
            Expect::cursor_page(Role::Writer).size_bytes,
            CURSOR_PAGE_BYTES
        );
    }

    #[test]
    fn roles_follow_access() {
        assert_eq!(Access::ReadOnly.role(), Role::Reader);
        assert_eq!(Access::ReadWrite.role(), Role::Writer);
        assert!(READER_SEALS.contains(WRITER_SEALS));
        assert!(!WRITER_SEALS.contains(SealFlags::FUTURE_WRITE));
    }

    #[test]
    fn invalid_names_are_rejected_before_the_syscall() {
        let long = "x".repeat(MEMFD_NAME_MAX_BYTES + 1);
        assert!(matches!(
            create_cursor_page(&long),
            Err(SegmentError::InvalidName { len }) if len == MEMFD_NAME_MAX_BYTES + 1
        ));
        assert!(matches!(
            create_cursor_page("a\0b"),
            Err(SegmentError::InvalidName { len: 3 })
        ));
    }
}
