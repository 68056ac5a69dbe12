use racefree::{idempotent, IdempotencyError};

#[idempotent(key = key, in_flight = "maybe")]
fn charge(key: &str, cents: u64) -> Result<u64, IdempotencyError> {
    let _ = key;
    Ok(cents)
}

fn main() {
    let _ = charge("k-1", 100);
}
