use racefree::{idempotent, IdempotencyError};

#[idempotent(key = key, expiry = "24h")]
fn charge(key: &str, cents: u64) -> Result<u64, IdempotencyError> {
    let _ = key;
    Ok(cents)
}

fn main() {
    let _ = charge("k-1", 100);
}
