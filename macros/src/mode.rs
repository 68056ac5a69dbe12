//! Sync or async: the one place an expansion branches on `sig.asyncness`.
//!
//! The runtime gives every waiting call a blocking and an awaiting form (`lookup_or_lead` /
//! `lookup_or_lead_async`, `begin_blocking` / `begin`, ...). An expansion names both once,
//! through [`Mode::call`], and writes the rest of its code the same for both.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::{Ident, Signature};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A `fn`: waiting blocks the thread.
    Sync,
    /// An `async fn`: waiting awaits.
    Async,
}

impl Mode {
    pub fn of(sig: &Signature) -> Mode {
        match sig.asyncness {
            Some(_) => Mode::Async,
            None => Mode::Sync,
        }
    }

    pub fn is_async(self) -> bool {
        self == Mode::Async
    }

    /// `sync` in a `fn`, `async_` in an `async fn`.
    pub fn pick<T>(self, sync: T, async_: T) -> T {
        match self {
            Mode::Sync => sync,
            Mode::Async => async_,
        }
    }

    /// The name of the form this mode calls, spanned at `span` (where an unmet bound of the
    /// call should be reported).
    pub fn call(self, sync: &str, async_: &str, span: Span) -> Ident {
        Ident::new(self.pick(sync, async_), span)
    }

    /// `.await` after a call in an `async fn`; nothing in a `fn`.
    pub fn await_(self) -> Option<TokenStream> {
        self.is_async().then(|| quote!(.await))
    }
}
