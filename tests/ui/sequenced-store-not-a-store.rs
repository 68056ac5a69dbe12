use std::collections::HashMap;

use racefree::{sequenced, Seq, SequenceError};

struct Desk {
    counters: HashMap<u8, u64>,
}

impl Desk {
    #[sequenced(key = desk, store = self.counters)]
    fn ticket(&self, desk: u8, seq: Seq) -> Result<u64, SequenceError> {
        Ok(seq.get())
    }
}

fn main() {
    let desk = Desk { counters: HashMap::new() };
    let _ = desk.ticket(1);
}
