use racefree::cached;

#[derive(Debug)]
struct DbError;

#[cached(share_errors)]
fn load(id: u64) -> Result<u64, DbError> {
    Ok(id)
}

fn main() {
    let _ = load(1);
}
