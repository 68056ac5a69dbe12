use racefree::{idempotent, IdempotencyError};

struct Pool;

// `db` is not `Hash`: it has to be left out of the request fingerprint.
#[idempotent(key = key)]
fn charge(db: &Pool, key: &str, cents: u64) -> Result<u64, IdempotencyError> {
    let _ = db;
    Ok(cents)
}

fn main() {
    let _ = charge(&Pool, "k", 1);
}
