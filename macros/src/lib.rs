//! Procedural macros of [racefree](https://docs.rs/racefree). Depend on `racefree`, not on this
//! crate: the generated code names `::racefree::__private`.
//!
//! Each attribute is a thin shim: parse the arguments (`args.rs`), check them against the
//! function (`validate.rs`), then expand (`cached.rs`, `idempotent.rs`, `sequenced.rs`).

mod args;
mod cached;
mod expand;
mod idempotent;
mod sequenced;
mod validate;

use proc_macro::TokenStream;

/// Memoizes a function; on a miss exactly one caller per key runs the body, the others wait
/// for its value. See `racefree::cached`.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    cached::expand(args.into(), item.into()).into()
}

/// Executes the body once per idempotency key; duplicates get the stored outcome. See
/// `racefree::idempotent`.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    idempotent::expand(args.into(), item.into()).into()
}

/// Runs calls with the same key one at a time, in arrival order, and hands out gap-free
/// sequence numbers. See `racefree::sequenced`.
#[proc_macro_attribute]
pub fn sequenced(args: TokenStream, item: TokenStream) -> TokenStream {
    sequenced::expand(args.into(), item.into()).into()
}
