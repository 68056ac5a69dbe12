use racefree::{sequenced, Seq};

#[sequenced(key = id)]
fn post(id: u64, first: Seq, second: Seq) -> u64 {
    first.get() + second.get()
}

fn main() {
    post(1);
}
