use racefree::{sequenced, Seq};

#[sequenced(key = desk)]
fn ticket(desk: u8, seq: Seq) -> u64 {
    seq.get()
}

fn main() {
    ticket(1);
    // The sequences are keyed by `u8`: a `u32` is another key type.
    let _ = ticket_sequence().next(&1_u8);
    let _ = ticket_sequence().next(&1_u32);
}
