use racefree::cached;

#[cached]
fn load(name: impl AsRef<str>) -> usize {
    name.as_ref().len()
}

fn main() {
    load("x");
}
