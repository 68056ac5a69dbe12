use racefree::{sequenced, Seq};

#[sequenced(key = id, ttl = "5m")]
fn post(id: u64, seq: Seq) -> u64 {
    seq.get()
}

fn main() {
    post(1);
}
