//! Compile-fail tests: each `tests/ui/<attribute>-<case>.rs` must fail to compile with the
//! error pinned in its `.stderr` (made with rustc 1.95.0; compiler wording changes between
//! releases, so regenerate with `TRYBUILD=overwrite cargo test --test ui` and read the diff).
//!
//! They are pinned for the default features: rustc prints `String` as `std::string::String`
//! once a dependency enabled by `redis`/`axum`/`postgres`/`sqlite` exports another `String`, so with those features
//! the messages differ in wording only. `.ci/test` runs this file without them.

#![cfg(not(any(
    feature = "redis",
    feature = "axum",
    feature = "postgres",
    feature = "sqlite"
)))]

#[test]
fn cached_ui() {
    trybuild::TestCases::new().compile_fail("tests/ui/cached-*.rs");
}

#[test]
fn idempotent_ui() {
    trybuild::TestCases::new().compile_fail("tests/ui/idempotent-*.rs");
}

#[test]
fn sequenced_ui() {
    trybuild::TestCases::new().compile_fail("tests/ui/sequenced-*.rs");
}
