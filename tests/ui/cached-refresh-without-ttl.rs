use racefree::cached;

#[cached(refresh = "30s")]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1);
}
