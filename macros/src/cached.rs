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
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ItemFn, Type};

use crate::args::Args;
use crate::expand::{self, Body};
use crate::validate::{owned_arguments, Attr, Errors, FnShape, Named, Output};

struct Plan {
    key: TokenStream,
    /// The one argument of a default key, when it is a shared reference: hits look it up
    /// borrowed (`&str` against `String` keys) and never build the owned key.
    borrowed_key: Option<Ident>,
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
    let mut borrowed_key = None;
    let key = match named.expr("key") {
        Some(expr) => quote_spanned!(expr.span()=> #expr),
        None => {
            let mut key_params = shape.params.iter().filter(|p| !skip.contains(&p.ident));
            if let (Some(only), None) = (key_params.next(), key_params.next()) {
                let shared_ref = matches!(&only.ty, Type::Reference(r) if r.mutability.is_none());
                if shared_ref && !crate::validate::contains_impl_trait(&only.ty) {
                    borrowed_key = Some(only.ident.clone());
                }
            }
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
        borrowed_key,
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
        borrowed_key,
        store,
        config,
        output,
    } = plan;
    let name = &item.sig.ident;
    let id = expand::function_id(name);
    let block = match &store {
        None => own_cache(&item, &id, &config, &key, borrowed_key.as_ref(), &output),
        Some(store) => given_store(&item, store, &key, &output),
    };
    *item.block = syn::parse2(block).expect("generated block parses");

    let handle = store.is_none().then(|| {
        expand::handle_accessor(
            &item,
            "cache",
            "cache: invalidate entries, clear it, read its stats",
            quote!(::racefree::CacheHandle),
            quote!(::racefree::__private::HandleCell),
            quote!(#id, #config),
        )
    });
    quote!(#item #handle)
}

/// The function's own in-process cache, with the double check spelled out.
fn own_cache(
    item: &ItemFn,
    id: &TokenStream,
    config: &TokenStream,
    key: &TokenStream,
    borrowed_key: Option<&Ident>,
    output: &Output,
) -> TokenStream {
    let ret = output.ty();
    let ret_span = ret.span();
    // Where the value type must be `Clone`, the calls carry the return type's span, so a
    // non-`Clone` value is reported at the return type rather than at the attribute.
    let cache_method = Ident::new("cache", ret_span);
    let complete = Ident::new("complete", ret_span);
    let await_ = item.sig.asyncness.map(|_| quote!(.await));
    let suffix = if item.sig.asyncness.is_some() {
        "_async"
    } else {
        ""
    };
    let (bind_key, lookup) = match borrowed_key {
        Some(arg) => {
            let lookup = Ident::new(&format!("lookup_or_lead_borrowed{suffix}"), ret_span);
            (
                quote!(),
                quote!(__racefree_cache.#lookup(#arg, ::std::borrow::ToOwned::to_owned) #await_),
            )
        }
        None => {
            let lookup = Ident::new(&format!("lookup_or_lead{suffix}"), ret_span);
            (
                quote!(let __racefree_key = #key;),
                quote!(__racefree_cache.#lookup(__racefree_key) #await_),
            )
        }
    };
    let clone = quote_spanned!(ret_span=> ::core::clone::Clone::clone);
    let (hit, finish) = match output {
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
    let body = Body::of(item).run();
    quote! {{
        #bind_key
        static __RACEFREE_CACHE: ::racefree::__private::HandleCell =
            ::racefree::__private::HandleCell::new(#id, #config);
        let __racefree_cache = __RACEFREE_CACHE.handle().#cache_method();
        let __racefree_lead = match #lookup {
            ::racefree::__private::Lookup::Hit(__racefree_value) => return #hit,
            ::racefree::__private::Lookup::Lead(__racefree_lead) => __racefree_lead,
        };
        let __racefree_output: #ret = #body;
        #finish
        __racefree_output
    }}
}

/// `store = <expr>`: the body goes to the store (`racefree::Cache`, or a Redis cache store),
/// which runs it at most once per cold key. Method syntax, so auto-deref finds a store behind
/// `LazyLock`, `Arc` or `&`.
fn given_store(item: &ItemFn, store: &Expr, key: &TokenStream, output: &Output) -> TokenStream {
    // No parentheses around a simple expression: an error then underlines exactly the user's
    // expression.
    let store_tokens = match store {
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
    let is_async = item.sig.asyncness.is_some();
    let (trait_name, method) = match is_async {
        true => ("AsyncCacheStore", "run_cached_async"),
        false => ("CacheStore", "run_cached"),
    };
    let trait_name = Ident::new(trait_name, proc_macro2::Span::call_site());
    // A store of the wrong type is reported at the method call: point it at the expression's end.
    let store_end = store
        .to_token_stream()
        .into_iter()
        .last()
        .map_or(store.span(), |t| t.span());
    let method = Ident::new(method, store_end);
    let body = Body::of(item).deferred();
    let await_ = is_async.then(|| quote!(.await));
    // A plain return value is always cached: wrap it so the store sees an `Outcome`.
    let call = match (output, is_async) {
        (Output::Plain(_), false) => quote! {
            #store_tokens.#method(__racefree_key, move || ::racefree::__private::Always(__racefree_body())).0
        },
        (Output::Plain(_), true) => quote! {
            #store_tokens.#method(__racefree_key, async move { ::racefree::__private::Always(__racefree_body.await) }).await.0
        },
        _ => quote!(#store_tokens.#method(__racefree_key, __racefree_body) #await_),
    };
    quote! {{
        use ::racefree::__private::#trait_name as _;
        let __racefree_key = #key;
        let __racefree_body = #body;
        #call
    }}
}
