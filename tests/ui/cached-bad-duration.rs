use racefree::cached;

#[cached(ttl = "5 minuts")]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1);
}
