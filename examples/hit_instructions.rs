//! Instructions and L1 data misses per `#[cached]` hit, beside a `DashMap` get, counted by
//! valgrind instead of timed: on a machine whose timings swing 2× within minutes (a shared
//! VM), the counts repeat run after run.
//!
//! Both maps hold the same 10k warm `u64` keys (the `scaling` bench's); `<map> <hits>` runs
//! that many hits on one of them. The cost of one hit is the difference between a run with
//! hits and one without, divided by the hits:
//!
//! ```text
//! cargo build --release --example hit_instructions
//! for map in racefree dashmap; do for hits in 0 200000; do
//!   valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file=/dev/null \
//!     target/release/examples/hit_instructions $map $hits 2>&1 | grep Collected
//! done; done
//! ```
//!
//! `Collected` lists `Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw`: instructions, data reads and
//! writes, then misses. Instructions are not time (a miss to L2 costs more than a dozen of
//! them), but neither map's cost hides from the count.

use std::hint::black_box;

use dashmap::DashMap;

#[racefree::cached]
fn racefree_plain(k: u64) -> u64 {
    k
}

const KEYS: u64 = 10_000;

fn key(i: u64) -> u64 {
    (i.wrapping_mul(7919)) % KEYS
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: hit_instructions racefree|dashmap <hits>";
    let map_name = args.next().expect(usage);
    let hits: u64 = args.next().and_then(|n| n.parse().ok()).expect(usage);
    // Both filled in every run, so that the runs differ only in the hits.
    let map: DashMap<u64, u64> = DashMap::new();
    for i in 0..KEYS {
        black_box(racefree_plain(i));
        map.insert(i, i);
    }
    let mut sum = 0_u64;
    match map_name.as_str() {
        "racefree" => {
            for i in 0..hits {
                sum = sum.wrapping_add(racefree_plain(black_box(key(i))));
            }
        }
        "dashmap" => {
            for i in 0..hits {
                sum = sum.wrapping_add(*map.get(&black_box(key(i))).expect("filled"));
            }
        }
        _ => panic!("{usage}"),
    }
    black_box(sum);
}
