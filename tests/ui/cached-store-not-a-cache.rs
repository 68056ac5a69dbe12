use std::collections::HashMap;

use racefree::cached;

struct Repo {
    rows: HashMap<u64, String>,
}

impl Repo {
    #[cached(key = id, store = self.rows)]
    fn row(&self, id: u64) -> Option<String> {
        self.rows.get(&id).cloned()
    }
}

fn main() {
    let repo = Repo { rows: HashMap::new() };
    let _ = repo.row(1);
}
