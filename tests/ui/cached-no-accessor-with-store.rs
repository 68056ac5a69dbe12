use std::sync::LazyLock;

use racefree::{cached, Cache};

static SQUARES: LazyLock<Cache<u64, u64>> = LazyLock::new(Cache::new);

// With `store = ...` no accessor is generated: `no_accessor` says nothing.
#[cached(store = SQUARES, no_accessor)]
fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    square(2);
}
