use racefree::{sequenced, Seq, SequenceError};

#[derive(Debug)]
struct Busy;

impl From<SequenceError> for Busy {
    fn from(_: SequenceError) -> Self {
        Busy
    }
}

#[sequenced(key = id, timeout = "5 secnds")]
fn post(id: u64, seq: Seq) -> Result<u64, Busy> {
    Ok(seq.get())
}

fn main() {
    let _ = post(1);
}
