use racefree::{idempotent, IdempotencyError};

#[idempotent(ttl = "24h")]
fn charge(order: &str, cents: u64) -> Result<u64, IdempotencyError> {
    let _ = order;
    Ok(cents)
}

fn main() {
    let _ = charge("o-1", 100); // still callable: one error, no cascade
}
