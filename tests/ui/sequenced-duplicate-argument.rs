use racefree::{sequenced, Seq};

#[sequenced(key = id, key = id + 1)]
fn post(id: u64, seq: Seq) -> u64 {
    seq.get()
}

fn main() {
    post(1);
}
