use racefree::{idempotent, IdempotencyError};

#[idempotent(key = key, skip(db))]
fn charge(key: &str, conn: &str, cents: u64) -> Result<u64, IdempotencyError> {
    let _ = (key, conn);
    Ok(cents)
}

fn main() {
    let _ = charge("k-1", "db", 100);
}
