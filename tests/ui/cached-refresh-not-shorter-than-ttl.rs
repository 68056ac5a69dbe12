use racefree::cached;

#[cached(refresh = "10m", ttl = "5m")]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1);
}
