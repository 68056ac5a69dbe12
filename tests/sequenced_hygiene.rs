//! `#[sequenced]`'s generated code names only `::racefree::…`, `::core` and `::std` items: it
//! compiles in a crate that shadows `core` and `std` and common prelude names, and denies
//! needless qualification.

#![deny(unused_qualifications)]
#![allow(dead_code)]

mod core {}
mod std {}
mod racefree_runtime {}

use racefree::{sequenced, Seq};

struct Option;
struct Result;
struct Ok;
struct Err;
struct Some;
struct None;
struct Instant;
struct Duration;

#[derive(Debug)]
struct Busy;

impl ::core::convert::From<racefree::SequenceError> for Busy {
    fn from(_: racefree::SequenceError) -> Self {
        Busy
    }
}

#[sequenced(key = id, start = 5)]
fn plain(id: u64, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = id, timeout = "1s")]
fn fallible(id: u64, seq: Seq) -> ::core::result::Result<u64, Busy> {
    ::core::result::Result::Ok(seq.get())
}

#[sequenced(key = id, timeout = "1s")]
async fn fallible_async(id: u64, seq: Seq) -> ::core::result::Result<u64, Busy> {
    ::core::result::Result::Ok(seq.get())
}

#[sequenced]
fn serialized_only() {}

#[test]
fn generated_code_ignores_shadowing() {
    assert_eq!(plain(1), 5);
    assert_eq!(fallible(1).unwrap(), 1);
    serialized_only();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(fallible_async(1)).unwrap(), 1);
}
