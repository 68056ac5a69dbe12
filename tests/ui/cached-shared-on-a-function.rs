use racefree::cached;

// A function without `self` has one cache already: `shared` says nothing here.
#[cached(shared)]
fn rate(currency: &str) -> u64 {
    currency.len() as u64
}

fn main() {
    let _ = rate("EUR");
}
