// A `tx` parameter is a SQL store's transaction: without `store = ...` there is none.
use racefree::{idempotent, IdempotencyError};

struct PgTx<'a>(&'a mut ());

#[idempotent(key = key)]
async fn pay(key: &str, cents: u64, tx: PgTx<'_>) -> Result<u64, IdempotencyError> {
    let _ = tx;
    Ok(cents)
}

fn main() {
    let _ = pay("k", 1);
}
