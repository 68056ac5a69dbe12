use std::collections::HashMap;

use racefree::cached;

struct Repo {
    rows: HashMap<u64, u64>,
}

impl Repo {
    #[cached(key = id, store = self.rows)]
    fn row(&self, id: u64) -> Option<u64> {
        self.rows.get(&id).cloned()
    }
}

fn main() {
    let repo = Repo { rows: HashMap::new() };
    let _ = repo.row(1);
}
