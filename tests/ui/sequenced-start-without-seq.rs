use racefree::sequenced;

#[sequenced(key = sku.to_owned(), start = 100)]
fn restock(sku: &str, qty: i64) -> i64 {
    qty
}

fn main() {
    restock("a", 1);
}
