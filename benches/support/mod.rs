//! Shared by the benchmarks: criterion settings that keep `cargo bench` short, a counting
//! allocator for memory figures, and the figures file the report reads.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

use criterion::Criterion;

pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200))
        .sample_size(20)
        .configure_from_args()
}

/// Counts live heap bytes, so memory can be compared as a ratio in the same run.
pub struct Counting;

pub static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    // SAFETY: forwards to the system allocator unchanged; only counts bytes.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc(layout) }
    }
    // SAFETY: as above.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    // SAFETY: as above.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Live heap bytes that `build` leaves behind while its value is alive.
pub fn heap_bytes<T>(build: impl FnOnce() -> T) -> (isize, T) {
    let before = LIVE.load(Relaxed);
    let value = build();
    (LIVE.load(Relaxed) - before, value)
}

/// Appends one figure (not a criterion timing: a count, a wall time, a byte size) to
/// `target/criterion/racefree-figures.jsonl`, which `examples/bench_report.rs` turns into the
/// report's tables.
pub fn figure(group: &str, name: &str, value: f64, unit: &str) {
    use std::io::Write;
    println!("figure {group}/{name}: {value} {unit}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| std::path::PathBuf::from(d).join("criterion"))
        .unwrap_or(dir);
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("racefree-figures.jsonl"))
    {
        let _ = writeln!(
            f,
            "{{\"group\":\"{group}\",\"name\":\"{name}\",\"value\":{value},\"unit\":\"{unit}\"}}"
        );
    }
}
