use racefree::cached;

struct Pool;

// `db` is not `Eq + Hash`: it has to be left out of the key.
#[cached]
fn user_name(db: &Pool, id: u64) -> String {
    let _ = db;
    format!("user {id}")
}

fn main() {
    let _ = user_name(&Pool, 1);
}
