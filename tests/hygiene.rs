//! Generated code names only `::racefree::__private`, `::core` and `::std` items: it compiles in
//! a crate that shadows `core` and `std` with its own modules and denies needless qualification
//! (and CI runs clippy with `-D warnings` over this file).

#![deny(unused_qualifications)]
#![allow(dead_code)]

mod core {}
mod std {}
mod racefree_runtime {}

use racefree::cached;

struct Clone;
struct Option;
struct Result;
struct Ok;
struct Some;

#[cached(ttl = "1m", capacity = 10)]
fn plain(x: u64, name: &str) -> u64 {
    x + name.len() as u64
}

#[cached]
fn optional(x: u64) -> ::core::option::Option<u64> {
    x.checked_add(1)
}

#[cached]
async fn fallible(x: u64) -> ::core::result::Result<u64, ::std::string::String> {
    ::core::result::Result::Ok(x)
}

#[test]
fn generated_code_ignores_shadowing() {
    assert_eq!(plain(1, "ab"), 3);
    assert_eq!(optional(1), ::core::option::Option::Some(2));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(fallible(4)), ::core::result::Result::Ok(4));
}
