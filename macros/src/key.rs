//! The default key of `#[cached]` (every argument not skipped, owned: `&str` → `String`) and
//! the default fingerprint of `#[idempotent]` (every argument not skipped, hashed), each
//! argument checked on its own so that one that cannot take part is one error naming
//! `skip(...)` at that argument, not a cascade of unmet `Eq`/`Hash`/`Clone` bounds inside the
//! runtime.
//!
//! The check is method resolution (autoref specialization): `(&Arg(x)).__racefree_part()`
//! finds `KeyPart` first, whose impl needs the owned form to be a key; when it is not,
//! resolution falls through to a per-argument `NotAKey` impl, whose method then requires a
//! trait that has no impl and an `on_unimplemented` message naming the argument. Its part is
//! `()` (or hashes nothing), so nothing after it fails again.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::Ident;

use crate::shape::{is_shared_ref, Param};

/// The default key as the cache stores it: one argument is itself, several are a tuple, none
/// is `()`.
pub fn owned(params: &[Param]) -> TokenStream {
    if params.is_empty() {
        return quote!(());
    }
    let parts = params.iter().map(|param| part(param, "__racefree_part"));
    let key = match params.len() {
        1 => quote!(#(#parts)*),
        _ => quote!((#(#parts,)*)),
    };
    let support = support();
    quote!({ #support #key })
}

/// The one shared-reference argument of a default key, as the reference a hit is looked up
/// with (`&str` against `String` keys).
pub fn borrowed(param: &Param) -> TokenStream {
    let support = support();
    let part = part(param, "__racefree_borrowed");
    quote!({ #support #part })
}

/// Declared once per key: the wrapper and the impl that succeeds for a key-worthy argument.
fn support() -> TokenStream {
    quote! {
        struct __RacefreeArg<'a, T: ?::core::marker::Sized>(&'a T);
        #[allow(dead_code)]
        trait __RacefreeKeyPart<'a> {
            type Owned;
            type Borrowed: ?::core::marker::Sized + 'a;
            fn __racefree_part(&self) -> Self::Owned;
            fn __racefree_borrowed(&self) -> &'a Self::Borrowed;
        }
        impl<'a, T> __RacefreeKeyPart<'a> for __RacefreeArg<'a, T>
        where
            T: ?::core::marker::Sized + ::std::borrow::ToOwned + ::core::cmp::Eq + ::core::hash::Hash + 'a,
            T::Owned: ::core::cmp::Eq
                + ::core::hash::Hash
                + ::core::clone::Clone
                + ::core::marker::Send
                + ::core::marker::Sync
                + 'static,
        {
            type Owned = T::Owned;
            type Borrowed = T;
            #[inline]
            fn __racefree_part(&self) -> T::Owned {
                ::std::borrow::ToOwned::to_owned(self.0)
            }
            #[inline]
            fn __racefree_borrowed(&self) -> &'a T {
                self.0
            }
        }
    }
}

/// One argument through the check: `method` is `__racefree_part` (owned) or
/// `__racefree_borrowed`.
fn part(param: &Param, method: &str) -> TokenStream {
    let ident = &param.ident;
    let arg = match is_shared_ref(&param.ty) {
        true => quote!(#ident),
        false => quote!(&#ident),
    };
    let message = format!(
        "`{ident}` cannot be part of the cache key: `{{Self}}` is not `Eq + Hash + Clone + Send + Sync + 'static`"
    );
    let label = format!("add `{ident}` to `skip(...)`, or write `key = ...`");
    // The error is reported at the method name: put it at the argument, resolved as the
    // expansion's own code.
    let method = Ident::new(method, Span::call_site().located_at(ident.span()));
    quote! {{
        #[diagnostic::on_unimplemented(message = #message, label = #label)]
        trait __RacefreeSkip {}
        #[allow(dead_code)]
        trait __RacefreeNotAKey {
            type Arg: ?::core::marker::Sized;
            fn __racefree_part(&self) where Self::Arg: __RacefreeSkip {}
            fn __racefree_borrowed(&self) -> &'static () where Self::Arg: __RacefreeSkip {
                &()
            }
        }
        impl<T: ?::core::marker::Sized> __RacefreeNotAKey for &__RacefreeArg<'_, T> {
            type Arg = T;
        }
        (&__RacefreeArg(#arg)).#method()
    }}
}

/// Statements feeding each of `params` into `__racefree_hasher`.
pub fn fingerprint(params: &[Param]) -> TokenStream {
    if params.is_empty() {
        return quote!();
    }
    let hashed = params.iter().map(|param| {
        let ident = &param.ident;
        let message = format!(
            "`{ident}` cannot be part of the request fingerprint: `{{Self}}` is not `Hash`"
        );
        let label = format!("add `{ident}` to `skip(...)`, or write `fingerprint = ...`");
        let method = Ident::new("__racefree_hash", Span::call_site().located_at(ident.span()));
        quote! {{
            #[diagnostic::on_unimplemented(message = #message, label = #label)]
            trait __RacefreeSkip {}
            #[allow(dead_code)]
            trait __RacefreeNotHashed {
                type Arg: ?::core::marker::Sized;
                fn __racefree_hash<H: ::core::hash::Hasher>(&self, _: &mut H) where Self::Arg: __RacefreeSkip {}
            }
            impl<T: ?::core::marker::Sized> __RacefreeNotHashed for &__RacefreeArg<'_, T> {
                type Arg = T;
            }
            (&__RacefreeArg(&#ident)).#method(&mut __racefree_hasher);
        }}
    });
    quote! {
        struct __RacefreeArg<'a, T: ?::core::marker::Sized>(&'a T);
        trait __RacefreeHashed {
            fn __racefree_hash<H: ::core::hash::Hasher>(&self, hasher: &mut H);
        }
        impl<T: ?::core::marker::Sized + ::core::hash::Hash> __RacefreeHashed for __RacefreeArg<'_, T> {
            #[inline]
            fn __racefree_hash<H: ::core::hash::Hasher>(&self, hasher: &mut H) {
                ::core::hash::Hash::hash(self.0, hasher)
            }
        }
        #(#hashed)*
    }
}
