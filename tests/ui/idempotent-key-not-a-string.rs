use racefree::{idempotent, IdempotencyError};

#[idempotent(key = order_id)]
fn charge(order_id: u64, cents: u64) -> Result<u64, IdempotencyError> {
    let _ = order_id;
    Ok(cents)
}

fn main() {
    let _ = charge(7, 100);
}
