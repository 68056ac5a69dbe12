// The transaction is handed over by value, and only to an async function.
use racefree::{idempotent, IdempotencyError};

struct PgTx<'a>(&'a mut ());

#[idempotent(key = key, store = DB)]
fn pay(key: &str, cents: u64, tx: &mut PgTx<'_>) -> Result<u64, IdempotencyError> {
    let _ = tx;
    Ok(cents)
}

fn main() {
    let _ = pay("k", 1);
}
