use racefree::cached;

#[cached(skip(db))]
fn load(conn: &str, id: u64) -> u64 {
    id + conn.len() as u64
}

fn main() {
    load("db", 1);
}
