//! Heap allocations counted process-wide, for the "0 allocations per message on the data path"
//! target: [`Counting`] wraps the system allocator and counts every `alloc`/`realloc`.
//!
//! A binary opts in with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: benches::alloc_count::Counting = benches::alloc_count::Counting;
//! ```
//!
//! (`benches` and `bus` both do). Without it [`allocations`] returns `None`: nothing has been
//! counted, not even the allocations every program makes before `main`.
//!
//! Unsafe code is allowed here only to implement [`GlobalAlloc`] by forwarding to
//! [`System`].
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting allocations.
#[derive(Debug)]
pub struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is a relaxed atomic that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations (and reallocations) so far in this process, all threads; `None` when the
/// binary did not install [`Counting`].
pub fn allocations() -> Option<u64> {
    match ALLOCATIONS.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The library's unit-test binary counts too, so the counter itself can be tested.
    #[global_allocator]
    static ALLOC: Counting = Counting;

    #[test]
    fn counts_allocations() {
        let before = allocations().expect("installed in this test binary");
        let v: Vec<u64> = Vec::with_capacity(std::hint::black_box(16));
        let after = allocations().expect("installed");
        drop(v);
        assert!(after > before, "{before} -> {after}");
    }
}
