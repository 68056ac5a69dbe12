//! A hit of a function whose key is one borrowed argument (`&str`, `&Path`, `&[u8]`) looks the
//! key up borrowed: it allocates nothing. (Building the owned `String` key on every hit cost as
//! much as the rest of the hit.) Counted by a global allocator that tallies this thread's
//! allocations, in a test binary of its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use racefree::cached;

struct CountingThisThread;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts allocations.
unsafe impl GlobalAlloc for CountingThisThread {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingThisThread = CountingThisThread;

fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[cached]
fn name_length(name: &str) -> usize {
    name.len()
}

#[cached]
async fn name_length_async(name: &str) -> usize {
    name.len()
}

#[test]
fn a_hit_with_a_borrowed_key_allocates_nothing() {
    assert_eq!(name_length("ada"), 3); // the miss builds the owned key and the cache
    assert_eq!(allocations_in(|| assert_eq!(name_length("ada"), 3)), 0);
    assert_eq!(name_length_cache().stats().hits, 1);

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(name_length_async("grace"));
    let hit = allocations_in(|| assert_eq!(rt.block_on(name_length_async("grace")), 5));
    assert_eq!(hit, 0);
}
