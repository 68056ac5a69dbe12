//! Generated code names only `::racefree::__private`, `::racefree`, `::core` and `::std` items:
//! all three attributes compile in a crate that shadows `core`, `std` and the prelude's names
//! with its own items and denies needless qualification (and CI runs clippy with `-D warnings`
//! over this file).

#![deny(unused_qualifications)]
#![allow(dead_code)]

mod core {}
mod std {}
mod racefree_runtime {}

use racefree::{cached, idempotent, sequenced, IdempotencyError, Seq};

struct Option;
struct Result;
struct Ok;
struct Err;
struct Some;
struct None;
struct Clone;
struct Duration;
struct Instant;
struct Hash;
struct From;
struct Display;

#[derive(Debug, PartialEq, ::core::clone::Clone)]
struct Refused;

impl ::core::convert::From<IdempotencyError> for Refused {
    fn from(_: IdempotencyError) -> Self {
        Refused
    }
}

impl ::core::convert::From<racefree::SequenceError> for Refused {
    fn from(_: racefree::SequenceError) -> Self {
        Refused
    }
}

#[cached(ttl = "1m", capacity = 10)]
fn cached_plain(x: u64, name: &str) -> u64 {
    x + name.len() as u64
}

#[cached]
fn cached_option(x: u64) -> ::core::option::Option<u64> {
    x.checked_add(1)
}

#[cached]
async fn cached_result(x: u64) -> ::core::result::Result<u64, ::std::string::String> {
    ::core::result::Result::Ok(x)
}

#[cached(refresh = "30s", ttl = "1m", stale_on_error = "5m", share_errors)]
fn cached_refreshed(x: u64) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(x)
}

#[cached(refresh = "30s", ttl = "1m")]
async fn cached_refreshed_async(x: u64) -> u64 {
    x
}

#[idempotent(key = key, ttl = "1h", in_flight = "reject", scope = tenant, capacity = 10)]
fn idempotent_sync(tenant: u32, key: &str, n: u64) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(n)
}

#[idempotent(key = key, require_key, store_errors, fingerprint = n)]
async fn idempotent_async(
    key: ::core::option::Option<&'static str>,
    n: u64,
) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(n)
}

#[sequenced(key = id, start = 5)]
fn sequenced_plain(id: u64, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = id, timeout = "1s")]
fn sequenced_fallible(id: u64, seq: Seq) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(seq.get())
}

#[sequenced(key = id, timeout = "1s")]
async fn sequenced_async(id: u64, seq: Seq) -> ::core::result::Result<u64, Refused> {
    ::core::result::Result::Ok(seq.get())
}

#[sequenced]
fn serialized_only() {}

/// Methods take the implementor path (a trait default method, a trait impl).
trait Counter {
    fn id(&self) -> u64;

    #[cached(key = self.id())]
    fn doubled(&self) -> u64 {
        self.id() * 2
    }

    fn claim(&self, key: &str) -> ::core::result::Result<u64, Refused>;

    #[sequenced(key = self.id())]
    fn next(&self, seq: Seq) -> u64 {
        seq.get()
    }
}

struct Tally(u64);

impl Counter for Tally {
    fn id(&self) -> u64 {
        self.0
    }

    #[idempotent(key = key, scope = self.id())]
    fn claim(&self, key: &str) -> ::core::result::Result<u64, Refused> {
        ::core::result::Result::Ok(self.0 + key.len() as u64)
    }
}

#[test]
fn generated_code_ignores_shadowing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    assert_eq!(cached_plain(1, "ab"), 3);
    assert_eq!(cached_option(1), ::core::option::Option::Some(2));
    assert_eq!(rt.block_on(cached_result(4)), ::core::result::Result::Ok(4));
    assert_eq!(cached_refreshed(5), ::core::result::Result::Ok(5));
    assert_eq!(rt.block_on(cached_refreshed_async(6)), 6);

    assert_eq!(idempotent_sync(1, "k", 2), ::core::result::Result::Ok(2));
    assert_eq!(
        rt.block_on(idempotent_async(::core::option::Option::Some("k"), 3)),
        ::core::result::Result::Ok(3)
    );
    assert_eq!(
        rt.block_on(idempotent_async(::core::option::Option::None, 3)),
        ::core::result::Result::Err(Refused)
    );

    assert_eq!(
        (Tally(3).doubled(), Tally(3).claim("ab"), Tally(3).next()),
        (6, ::core::result::Result::Ok(5), 1)
    );

    assert_eq!(sequenced_plain(1), 5);
    assert_eq!(sequenced_fallible(1), ::core::result::Result::Ok(1));
    serialized_only();
    assert_eq!(
        rt.block_on(sequenced_async(1)),
        ::core::result::Result::Ok(1)
    );
}
