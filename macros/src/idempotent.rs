//! `#[idempotent]` (not built yet).

use proc_macro2::TokenStream;

pub fn expand(_args: TokenStream, item: TokenStream) -> TokenStream {
    crate::expand::with_fallback(item, |item| {
        Err(syn::Error::new_spanned(&item.sig.ident, "#[idempotent] is not implemented yet"))
    })
}
