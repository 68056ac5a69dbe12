// The transaction commits with the call's number: a `tx` parameter needs a `Seq` one.
use racefree::{sequenced, SequenceError};

struct SqliteTx<'a>(&'a mut ());

#[sequenced(key = customer.to_owned(), store = DB.sequence("invoice_no"))]
async fn invoice(customer: &str, tx: SqliteTx<'_>) -> Result<(), SequenceError> {
    let _ = tx;
    Ok(())
}

fn main() {
    let _ = invoice("acme");
}
