use racefree::{sequenced, Seq};

#[sequenced]
fn ticket(seq: Seq) -> u64 {
    let n = seq.get() +;
    n
}

fn main() {
    let _ = ticket();
}
