use racefree::cached;

#[cached(ttl = "5m", ttl = "10m")]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1);
}
