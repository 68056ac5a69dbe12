use racefree::cached;

#[cached(refresh = "30s", ttl = "5m")]
fn load(name: &str) -> usize {
    name.len()
}

fn main() {
    load("a");
}
