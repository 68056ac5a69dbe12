use racefree::cached;

struct Account {
    id: u64,
}

impl Account {
    // Keyed on `month` only, every account would get the first account's balance.
    #[cached]
    fn balance(&self, month: u32) -> u64 {
        self.id + month as u64
    }
}

fn main() {
    let _ = Account { id: 1 }.balance(3);
}
