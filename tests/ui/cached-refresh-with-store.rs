use std::sync::LazyLock;

use racefree::{cached, Cache};

static ROWS: LazyLock<Cache<u64, u64>> = LazyLock::new(Cache::new);

#[cached(store = ROWS, refresh = "30s")]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1);
}
