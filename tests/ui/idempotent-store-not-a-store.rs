use std::collections::HashMap;
use std::sync::LazyLock;

use racefree::{idempotent, IdempotencyError};

static RECORDS: LazyLock<HashMap<String, u64>> = LazyLock::new(HashMap::new);

#[idempotent(key = key, store = RECORDS)]
fn charge(key: &str) -> Result<u64, IdempotencyError> {
    Ok(1)
}

fn main() {
    let _ = charge("k");
}
