//! `#[idempotent]`'s generated code names only `::racefree::…`, `::core` and `::std` items: it
//! compiles in a crate that shadows `core`, `std` and common prelude names, and denies needless
//! qualification.

#![deny(unused_qualifications)]
#![allow(dead_code)]

mod core {}
mod std {}
mod racefree_runtime {}

use racefree::{idempotent, IdempotencyError};

struct Option;
struct Result;
struct Ok;
struct Err;
struct Some;
struct None;
struct Duration;
struct Hash;
struct From;
struct Clone;
struct Display;

#[derive(Debug, PartialEq, ::core::clone::Clone)]
struct Refused;

impl ::core::convert::From<IdempotencyError> for Refused {
    fn from(_: IdempotencyError) -> Self {
        Refused
    }
}

#[idempotent(key = key, ttl = "1h", in_flight = "reject", scope = tenant, capacity = 10)]
fn sync_call(tenant: u32, key: &str, n: u64) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(n)
}

#[idempotent(key = key, require_key, store_errors, fingerprint = n)]
async fn async_call(
    key: ::core::option::Option<&'static str>,
    n: u64,
) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(n)
}

#[test]
fn generated_code_ignores_shadowing() {
    assert_eq!(sync_call(1, "k", 2), ::core::result::Result::Ok(2));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(
        rt.block_on(async_call(::core::option::Option::Some("k"), 3)),
        ::core::result::Result::Ok(3)
    );
    assert_eq!(
        rt.block_on(async_call(::core::option::Option::None, 3)),
        ::core::result::Result::Err(Refused)
    );
}
