//! The `tx` parameter of `#[idempotent]` and `#[sequenced]` with a SQL store: the store's
//! transaction (`racefree::sql::PgTx<'_>`, `SqliteTx<'_>` or `Tx<'_, D>`), supplied by the
//! attribute like `seq: Seq` and absent from the callers' signature, so that the body's writes
//! commit or roll back together with the claim or the number.
//!
//! Recognised by the type's last path segment, as `Seq` is. The expansion binds it from the
//! execution (`__private::idempotent_tx`) or the sequence lease (`__private::sequence_tx`)
//! before the body runs; the store commits after it.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{FnArg, ItemFn, Pat, PatType, Type};

use crate::mode::Mode;
use crate::validate::Errors;

/// The type names that mean "the store's transaction".
const NAMES: [&str; 3] = ["Tx", "PgTx", "SqliteTx"];

/// The `tx` parameter, taken out of the signature.
pub struct TxParam {
    pub pat: Pat,
    pub ty: Type,
    /// As written, for errors about it.
    pub arg: PatType,
}

fn is_tx(ty: &Type) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => path
            .path
            .segments
            .last()
            .is_some_and(|s| NAMES.iter().any(|name| s.ident == name)),
        Type::Paren(inner) => is_tx(&inner.elem),
        Type::Group(inner) => is_tx(&inner.elem),
        _ => false,
    }
}

/// Removes the `tx` parameter from the signature callers see, returning it; a reference to a
/// `Tx` or a second `Tx` is an error (the first is still taken out).
pub fn take(item: &mut ItemFn, errors: &mut Errors) -> Option<TxParam> {
    let mut found: Option<TxParam> = None;
    let inputs = std::mem::take(&mut item.sig.inputs);
    for input in inputs {
        if let FnArg::Typed(typed) = &input {
            match &*typed.ty {
                Type::Reference(reference) if is_tx(&reference.elem) => {
                    errors.push(syn::Error::new_spanned(
                        typed,
                        "the transaction is handed over by value: write `mut tx: PgTx<'_>` (or `SqliteTx<'_>`), not a reference",
                    ));
                    continue;
                }
                ty if is_tx(ty) => {
                    if found.is_some() {
                        errors.push(syn::Error::new_spanned(
                            typed,
                            "a call runs in one transaction: keep one `tx` parameter and remove this one",
                        ));
                    } else {
                        found = Some(TxParam {
                            pat: (*typed.pat).clone(),
                            ty: ty.clone(),
                            arg: typed.clone(),
                        });
                    }
                    continue;
                }
                _ => {}
            }
        }
        item.sig.inputs.push(input);
    }
    found
}

/// A `tx` parameter needs a SQL store (`store = ...`) and an `async fn`.
pub fn check(tx: &TxParam, has_store: bool, mode: Mode, errors: &mut Errors) {
    if !has_store {
        errors.push(syn::Error::new_spanned(
            &tx.arg,
            "a `tx` parameter is a SQL store's transaction: add `store = <a racefree::sql::PgStore or SqliteStore>` \
             (for #[sequenced]: `store = db.sequence(\"name\")`)",
        ));
    }
    if !mode.is_async() {
        errors.push(syn::Error::new_spanned(
            &tx.arg,
            "the SQL stores are async: make the function `async` to take a `tx` parameter",
        ));
    }
}

/// The body's first statement: the parameter, bound to `__racefree_tx`.
pub fn bind(tx: &TxParam) -> TokenStream {
    let (pat, ty) = (&tx.pat, &tx.ty);
    quote! {
        #[allow(unused_variables, unused_mut)]
        let #pat: #ty = __racefree_tx;
    }
}

/// The function as callers would see it, for the error case: without its `tx` parameters
/// (by value or by reference), bound to nothing inside (the body never runs: the attribute's
/// error stops the build), so one mistake is one error, not one more at every call site.
pub fn without_tx_params(mut item: ItemFn) -> ItemFn {
    let mut bindings = Vec::new();
    let inputs = std::mem::take(&mut item.sig.inputs);
    for input in inputs {
        if let FnArg::Typed(typed) = &input {
            let is_tx_param = match &*typed.ty {
                Type::Reference(reference) => is_tx(&reference.elem),
                ty => is_tx(ty),
            };
            if is_tx_param {
                let (pat, ty) = (&typed.pat, &typed.ty);
                bindings.push(quote!(let #pat: #ty = ::core::unreachable!();));
                continue;
            }
        }
        item.sig.inputs.push(input);
    }
    if bindings.is_empty() {
        return item;
    }
    item.block
        .stmts
        .splice(0..0, bindings.into_iter().map(|b| syn::parse_quote!(#b)));
    item.attrs
        .push(syn::parse_quote!(#[allow(unused_variables, unused_mut, unreachable_code)]));
    item
}
