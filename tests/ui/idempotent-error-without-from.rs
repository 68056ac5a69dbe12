use racefree::idempotent;

#[derive(Debug)]
struct ApiError;

#[idempotent(key = key)]
fn charge(key: &str, cents: u64) -> Result<u64, ApiError> {
    let _ = key;
    Ok(cents)
}

fn main() {
    let _ = charge("k-1", 100);
}
