//! `#[sequenced]` (not built yet).

use proc_macro2::TokenStream;

pub fn expand(_args: TokenStream, item: TokenStream) -> TokenStream {
    crate::expand::with_fallback(item, |item| {
        Err(syn::Error::new_spanned(&item.sig.ident, "#[sequenced] is not implemented yet"))
    })
}
