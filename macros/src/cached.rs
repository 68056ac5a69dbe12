//! `#[cached]`: the body runs once per key; concurrent callers of a cold key wait for it.
//!
//! ```text
//! fn f(args) -> R {
//!     let key = <key>;
//!     let cache = <the function's own cache, or `store`>;
//!     let lead = match cache.lookup_or_lead(key) {        // look up; else join the key's flight
//!         Lookup::Hit(value) => return Ok(value),          // cached, or computed by the lead we waited for
//!         Lookup::Lead(lead) => lead,                      // ours to compute (double-checked)
//!     };
//!     let output: R = (move || -> R { <body> })();
//!     if let Ok(value) = &output { lead.complete(value.clone()) } else { lead.abandon() }
//!     output
//! }
//! ```

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ItemFn};

use crate::args::Args;
use crate::expand::{self, Body};
use crate::validate::{owned_arguments, Attr, Errors, FnShape, Named, Output};

struct Plan {
    key: TokenStream,
    store: Option<syn::Expr>,
    config: TokenStream,
    output: Output,
}

fn validate(args: Args, item: &ItemFn) -> syn::Result<Plan> {
    let mut named = Named::check(Attr::Cached, args)?;
    let mut errors = Errors::default();
    let shape = FnShape::of(item);
    let skip = named.idents("skip");
    shape.check_skip(&skip, &mut errors);
    let ttl = errors.keep(named.duration("ttl")).flatten();
    let capacity = errors.keep(named.positive_int("capacity")).flatten();
    let store = named.expr("store");
    let key = match named.expr("key") {
        Some(expr) => quote_spanned!(expr.span()=> #expr),
        None => {
            if let Some(first) = shape.unnamed.first() {
                errors.push(syn::Error::new_spanned(
                    first,
                    "the default key needs named arguments: write `key = ...`",
                ));
            }
            owned_arguments(
                shape.params.iter().filter(|p| !skip.contains(&p.ident)),
                "key",
                &mut errors,
            )
        }
    };
    if crate::validate::contains_impl_trait(shape.output.ty()) {
        errors.push(syn::Error::new_spanned(
            shape.output.ty(),
            "a cached function must return a nameable `Clone` type, not `impl Trait`",
        ));
    }
    errors.finish()?;
    if store.is_some() && (ttl.is_some() || capacity.is_some()) {
        let span = store.as_ref().map(|s| s.span()).unwrap();
        return Err(syn::Error::new(
            span,
            "with `store = ...` the store's own TTL and capacity apply: set them where the Cache is built, not here",
        ));
    }
    let ttl = ttl.map(|d| {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        quote!(.ttl(::core::time::Duration::from_nanos(#nanos)))
    });
    let capacity = capacity.map(|c| quote!(.capacity(#c)));
    let config = quote!(::racefree::__private::CacheConfig::new() #ttl #capacity);
    Ok(Plan {
        key,
        store,
        config,
        output: shape.output,
    })
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::with_fallback(item, |item| {
        let args: Args = syn::parse2(args)?;
        let plan = validate(args, &item)?;
        Ok(generate(plan, item))
    })
}

fn generate(plan: Plan, mut item: ItemFn) -> TokenStream {
    let Plan {
        key,
        store,
        config,
        output,
    } = plan;
    let name = &item.sig.ident;
    let id = expand::function_id(name);
    let ret = output.ty().clone();
    let ret_span = ret.span();

    // Where the value type must be `Clone`, the calls carry the return type's span, so a
    // non-`Clone` value is reported at the return type rather than at the attribute.
    let cache_method = Ident::new("cache", ret_span);
    let complete = Ident::new("complete", ret_span);
    let lookup = Ident::new(
        if item.sig.asyncness.is_some() {
            "lookup_or_lead_async"
        } else {
            "lookup_or_lead"
        },
        ret_span,
    );
    let cache = match &store {
        Some(store) => {
            // No parentheses around a simple expression: a type error then underlines exactly
            // the user's expression.
            let store = match store {
                Expr::Path(_)
                | Expr::Field(_)
                | Expr::Call(_)
                | Expr::MethodCall(_)
                | Expr::Index(_)
                | Expr::Paren(_) => {
                    quote!(#store)
                }
                _ => quote!((#store)),
            };
            quote_spanned! {store.span()=>
                let __racefree_cache: &::racefree::Cache<_, _> = &#store;
            }
        }
        None => quote! {
            static __RACEFREE_CACHE: ::racefree::__private::HandleCell =
                ::racefree::__private::HandleCell::new(#id, #config);
            let __racefree_cache = __RACEFREE_CACHE.handle().#cache_method();
        },
    };
    let await_ = item.sig.asyncness.map(|_| quote!(.await));
    let lookup = quote!(__racefree_cache.#lookup(__racefree_key) #await_);
    let clone = quote_spanned!(ret_span=> ::core::clone::Clone::clone);
    let (hit, finish) = match &output {
        Output::Result(_) => (
            quote!(::core::result::Result::Ok(__racefree_value)),
            quote! {
                match &__racefree_output {
                    ::core::result::Result::Ok(__racefree_value) => __racefree_lead.#complete(#clone(__racefree_value)),
                    ::core::result::Result::Err(_) => __racefree_lead.abandon(),
                }
            },
        ),
        Output::Option(_) => (
            quote!(::core::option::Option::Some(__racefree_value)),
            quote! {
                match &__racefree_output {
                    ::core::option::Option::Some(__racefree_value) => __racefree_lead.#complete(#clone(__racefree_value)),
                    ::core::option::Option::None => __racefree_lead.abandon(),
                }
            },
        ),
        Output::Plain(_) => (
            quote!(__racefree_value),
            quote!(__racefree_lead.#complete(#clone(&__racefree_output));),
        ),
    };
    let body = Body::of(&item).run();

    let block = quote! {{
        let __racefree_key = #key;
        #cache
        let __racefree_lead = match #lookup {
            ::racefree::__private::Lookup::Hit(__racefree_value) => return #hit,
            ::racefree::__private::Lookup::Lead(__racefree_lead) => __racefree_lead,
        };
        let __racefree_output: #ret = #body;
        #finish
        __racefree_output
    }};
    *item.block = syn::parse2(block).expect("generated block parses");

    let handle = store.is_none().then(|| {
        let vis = &item.vis;
        let handle_name = format_ident!("{}_cache", name);
        let doc =
            format!(" The cache of [`{name}`]: invalidate entries, clear it, read its stats.");
        quote! {
            #[doc = #doc]
            #[allow(dead_code)]
            #vis fn #handle_name() -> &'static ::racefree::CacheHandle {
                static __RACEFREE_CACHE: ::racefree::__private::HandleCell =
                    ::racefree::__private::HandleCell::new(#id, #config);
                __RACEFREE_CACHE.handle()
            }
        }
    });
    quote!(#item #handle)
}
