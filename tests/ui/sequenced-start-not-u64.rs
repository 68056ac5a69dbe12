use racefree::{sequenced, Seq};

#[sequenced(key = id, start = "one")]
fn post(id: u64, seq: Seq) -> u64 {
    seq.get()
}

fn main() {
    post(1);
}
