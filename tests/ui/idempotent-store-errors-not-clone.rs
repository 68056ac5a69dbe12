use racefree::{idempotent, IdempotencyError};

// `std::io::Error` is not `Clone`, so neither is an error that holds it by value.
#[derive(Debug)]
enum PayError {
    Io(std::io::Error),
    Idempotency(IdempotencyError),
}

impl From<IdempotencyError> for PayError {
    fn from(e: IdempotencyError) -> Self {
        PayError::Idempotency(e)
    }
}

#[idempotent(key = key, store_errors)]
fn pay(key: &str, cents: u64) -> Result<u64, PayError> {
    Err(PayError::Io(std::io::Error::other(format!("{key}: {cents}"))))
}

fn main() {
    let _ = pay("k", 1);
}
