use racefree::idempotent;

#[idempotent(key = key)]
fn charge(key: &str, cents: u64) -> u64 {
    let _ = key;
    cents
}

fn main() {
    let _ = charge("k-1", 100);
}
