use racefree::{idempotent, IdempotencyError};

trait Billing {
    // A required method has no body to wrap: the attribute belongs on each impl's method.
    #[idempotent(key = key)]
    fn charge(&self, key: &str) -> Result<u64, IdempotencyError>;
}

fn main() {}
