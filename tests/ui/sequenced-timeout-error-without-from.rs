use racefree::{sequenced, Seq};

#[derive(Debug)]
struct Busy;

#[sequenced(key = id, timeout = "5s")]
fn post(id: u64, seq: Seq) -> Result<u64, Busy> {
    Ok(seq.get())
}

fn main() {
    let _ = post(1);
}
