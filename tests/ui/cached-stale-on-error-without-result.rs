use racefree::cached;

#[cached(ttl = "5m", stale_on_error = "10m")]
fn load(id: u64) -> Option<u64> {
    Some(id)
}

fn main() {
    load(1);
}
