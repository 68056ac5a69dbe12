use racefree::cached;

#[cached(ttl = "5m", expiry = "5m")]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1); // still callable: one error, no cascade
}
