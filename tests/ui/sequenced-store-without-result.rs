use racefree::{sequenced, Seq, Sequencer};

struct Tills {
    sequence: Sequencer<u8>,
}

impl Tills {
    #[sequenced(key = till, store = self.sequence)]
    fn receipt(&self, till: u8, seq: Seq) -> String {
        format!("T{till}-{seq}")
    }
}

fn main() {
    let tills = Tills {
        sequence: Sequencer::new(),
    };
    tills.receipt(1);
}
