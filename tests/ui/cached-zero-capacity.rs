use racefree::cached;

#[cached(capacity = 0)]
fn load(id: u64) -> u64 {
    id
}

fn main() {
    load(1);
}
