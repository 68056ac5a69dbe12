use racefree::{sequenced, Seq};

#[sequenced(key = id, timeout = "5s")]
fn post(id: u64, seq: Seq) -> u64 {
    seq.get()
}

fn main() {
    post(1);
}
