//! `#[cached]`: the body runs once per key; concurrent callers of a cold key wait for it.
//!
//! ```text
//! fn f(args) -> R {
//!     let key = <key>;                                     // a method's: (implementor, key)
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

use std::time::Duration;

use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ItemFn};

use crate::args::Args;
use crate::expand::{self, Body};
use crate::key;
use crate::mode::Mode;
use crate::shape::{contains_impl_trait, is_shared_ref, owned_key_type, FnShape, Output, Param};
use crate::validate::{check_signature, check_skip, owned_arguments, Attr, Errors, Named};

/// What `#[cached(...)]` on this function asks for, checked.
struct Plan {
    /// Emit `fn <name>_<store>()` (no `self`, no `store`, no `no_accessor`).
    accessor: bool,
    key: Key,
    /// `store = <expr>`; `None`: the function's own cache, bounded by `ttl` and `capacity`.
    store: Option<Expr>,
    ttl: Option<Duration>,
    capacity: Option<usize>,
    output: Output,
}

enum Key {
    /// `key = <expr>`.
    Given(Expr),
    /// The arguments not skipped, owned.
    Arguments(Vec<Param>),
    /// The one argument of a default key, a shared reference: hits look it up borrowed (`&str`
    /// against `String` keys) and never build the owned key.
    Borrowed(Param),
}

fn validate(args: Args, item: &ItemFn) -> syn::Result<Plan> {
    let mut named = Named::check(Attr::Cached, args)?;
    let mut errors = Errors::default();
    check_signature(Attr::Cached, item, &mut errors);
    let shape = FnShape::of(item);
    let skip = named.idents("skip");
    check_skip(&shape, &skip, &mut errors);
    let ttl = errors.keep(named.duration("ttl")).flatten();
    let capacity = errors.keep(named.positive_int("capacity")).flatten();
    let store = named.expr("store");
    let accessor = expand::wants_accessor(
        Attr::Cached,
        item,
        store.is_some(),
        named.flag("no_accessor"),
        &mut errors,
    );
    let shared = named.flag("shared");
    let given_key = named.expr("key");
    check_instance(
        item,
        given_key.as_ref(),
        store.as_ref(),
        shared,
        &mut errors,
    );
    let key = match given_key {
        Some(expr) => Key::Given(expr),
        None => {
            if let Some(first) = shape.unnamed.first() {
                errors.push(syn::Error::new_spanned(
                    first,
                    "the default key needs named arguments: write `key = ...`",
                ));
            }
            match owned_arguments(&shape, &skip, "key", &mut errors).as_slice() {
                [only] if is_shared_ref(&only.ty) => Key::Borrowed(only.clone()),
                params => Key::Arguments(params.to_vec()),
            }
        }
    };
    if contains_impl_trait(shape.output.ty()) {
        errors.push(syn::Error::new_spanned(
            shape.output.ty(),
            "a cached function must return a nameable `Clone` type, not `impl Trait`",
        ));
    }
    errors.finish()?;
    if let (Some(store), true) = (&store, ttl.is_some() || capacity.is_some()) {
        return Err(syn::Error::new(
            store.span(),
            "with `store = ...` the store's own TTL and capacity apply: set them where the Cache is built, not here",
        ));
    }
    Ok(Plan {
        accessor,
        key,
        store,
        ttl,
        capacity,
        output: shape.output,
    })
}

/// A method's default key is its other arguments: without `key`, `store` or `shared`, every
/// instance would get the value first computed for any of them.
fn check_instance(
    item: &ItemFn,
    key: Option<&Expr>,
    store: Option<&Expr>,
    shared: Option<Span>,
    errors: &mut Errors,
) {
    let receiver = item.sig.receiver();
    match (receiver, shared) {
        (Some(receiver), None) if key.is_none() && store.is_none() => {
            errors.push(syn::Error::new_spanned(
                receiver,
                "#[cached] on a method keys on the other arguments only, so every instance would get \
                 the value first computed for any of them: write `key = (self.<id>, ...)` naming what \
                 identifies the instance, `store = self.<field>` for a cache per instance, or `shared` \
                 for one cache for all instances",
            ));
        }
        (Some(_), Some(shared)) if key.is_some() || store.is_some() => {
            errors.push(syn::Error::new(
                shared,
                "`shared` is for a method without `key` or `store`: with them, they say whose value \
                 it is; remove `shared`",
            ));
        }
        (None, Some(shared)) => errors.push(syn::Error::new(
            shared,
            "`shared` is for methods (`&self`): a function without `self` has one cache already; remove `shared`",
        )),
        _ => {}
    }
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::with_fallback(
        Attr::Cached,
        item,
        |item| item,
        |item| {
            let args: Args = syn::parse2(args)?;
            let plan = validate(args, &item)?;
            Ok(generate(plan, item))
        },
    )
}

fn generate(plan: Plan, mut item: ItemFn) -> TokenStream {
    let id_fn = expand::id_fn(&item.sig.ident);
    let mode = Mode::of(&item.sig);
    let body = Body::of(&item);
    let block = match &plan.store {
        None => own_cache(&plan, &item, &id_fn, mode, body),
        Some(store) => given_store(&plan, store, mode, body),
    };
    expand::replace_block(&mut item, block);
    let accessor = plan.accessor.then(|| {
        let config = config(&plan);
        expand::handle_accessor(
            &item,
            "cache",
            "cache: invalidate entries, clear it, read its stats",
            quote!(::racefree::CacheHandle),
            quote!(::racefree::__private::CacheCell),
            config,
            expand::AccessorKey::from(key_type(&plan.key, &item)),
        )
    });
    quote!(#item #accessor)
}

/// The key type as the cache stores it, where the signature names it (the default key: each
/// argument not skipped, owned); `None` for `key = ...`.
fn key_type(key: &Key, item: &ItemFn) -> Option<TokenStream> {
    let params = match key {
        Key::Given(_) => return None,
        Key::Borrowed(param) => std::slice::from_ref(param),
        Key::Arguments(params) => params.as_slice(),
    };
    let parts = params
        .iter()
        .map(|param| owned_key_type(&param.ty, item))
        .collect::<Option<Vec<_>>>()?;
    match parts.as_slice() {
        [only] => Some(only.clone()),
        _ => Some(quote!((#(#parts,)*))),
    }
}

/// The function's own in-process cache, with the double check spelled out.
fn own_cache(
    plan: &Plan,
    item: &ItemFn,
    id_fn: &TokenStream,
    mode: Mode,
    body: Body,
) -> TokenStream {
    let ret = plan.output.ty();
    // Where the value type must be `Clone`, the calls carry the return type's span, so a
    // non-`Clone` value is reported at the return type rather than at the attribute.
    let ret_span = ret.span();
    let cache_method = Ident::new("cache", ret_span);
    let config = config(plan);
    let implementor = expand::implementor(item);
    let (bind_key, lookup) = lookup_or_lead(&plan.key, implementor.is_some(), mode, ret_span);
    let hit = hit(&plan.output);
    let finish = finish(&plan.output, ret_span);
    let body = body.run();
    quote! {{
        #implementor
        #bind_key
        #id_fn
        static __RACEFREE_CACHE: ::racefree::__private::CacheCell =
            ::racefree::__private::CacheCell::with_id_fn(__racefree_id, #config);
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

/// The bounds of the function's own cache.
fn config(plan: &Plan) -> TokenStream {
    let ttl = plan.ttl.map(|ttl| {
        let nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        quote!(.ttl(::core::time::Duration::from_nanos(#nanos)))
    });
    let capacity = plan.capacity.map(|capacity| quote!(.capacity(#capacity)));
    quote!(::racefree::__private::CacheConfig::new() #ttl #capacity)
}

/// Binds the key, and the call that looks it up or makes this caller the key's lead. A method's
/// key is paired with its `__racefree_implementor` (so it is never looked up borrowed).
fn lookup_or_lead(
    key: &Key,
    per_implementor: bool,
    mode: Mode,
    ret_span: Span,
) -> (TokenStream, TokenStream) {
    let await_ = mode.await_();
    // The call needs `V: Clone`, and rustc reports an unmet bound at the receiver: make it a
    // block spanned at the return type (parentheses would not survive lowering), while the
    // name inside still resolves as the expansion's own.
    let mut cache = Group::new(Delimiter::Brace, quote!(__racefree_cache));
    cache.set_span(ret_span);
    match key {
        Key::Borrowed(param) if !per_implementor => {
            let arg = key::borrowed(param);
            let lookup = mode.call(
                "lookup_or_lead_borrowed",
                "lookup_or_lead_borrowed_async",
                ret_span,
            );
            (
                quote!(),
                quote!(#cache.#lookup(#arg, ::std::borrow::ToOwned::to_owned) #await_),
            )
        }
        _ => {
            let key = owned_key(key);
            let key = match per_implementor {
                true => quote!((__racefree_implementor, #key)),
                false => key,
            };
            let lookup = mode.call("lookup_or_lead", "lookup_or_lead_async", ret_span);
            (
                quote!(let __racefree_key = #key;),
                quote!(#cache.#lookup(__racefree_key) #await_),
            )
        }
    }
}

/// The key as the cache stores it.
fn owned_key(key: &Key) -> TokenStream {
    match key {
        Key::Given(expr) => expr.to_token_stream(),
        Key::Arguments(params) => key::owned(params),
        Key::Borrowed(param) => key::owned(std::slice::from_ref(param)),
    }
}

/// What a hit returns: the cached value, rewrapped as the success it was.
fn hit(output: &Output) -> TokenStream {
    match output {
        Output::Result(_) => quote!(::core::result::Result::Ok(__racefree_value)),
        Output::Option(_) => quote!(::core::option::Option::Some(__racefree_value)),
        Output::Plain(_) => quote!(__racefree_value),
    }
}

/// The lead completes the key with a clone of a success, or abandons it to the next waiter.
fn finish(output: &Output, ret_span: Span) -> TokenStream {
    let complete = Ident::new("complete", ret_span);
    let clone = quote_spanned!(ret_span=> ::core::clone::Clone::clone);
    match output {
        Output::Result(_) => quote! {
            match &__racefree_output {
                ::core::result::Result::Ok(__racefree_value) => __racefree_lead.#complete(#clone(__racefree_value)),
                ::core::result::Result::Err(_) => __racefree_lead.abandon(),
            }
        },
        Output::Option(_) => quote! {
            match &__racefree_output {
                ::core::option::Option::Some(__racefree_value) => __racefree_lead.#complete(#clone(__racefree_value)),
                ::core::option::Option::None => __racefree_lead.abandon(),
            }
        },
        Output::Plain(_) => quote!(__racefree_lead.#complete(#clone(&__racefree_output));),
    }
}

/// `store = <expr>`: the body goes to the store (`racefree::Cache`, or a Redis cache store),
/// which runs it at most once per cold key. Method syntax, so auto-deref finds a store behind
/// `LazyLock`, `Arc` or `&`.
fn given_store(plan: &Plan, store: &Expr, mode: Mode, body: Body) -> TokenStream {
    let store_tokens = store_receiver(store);
    let ref_trait = Ident::new(
        mode.pick("CacheStoreRef", "AsyncCacheStoreRef"),
        Span::call_site(),
    );
    // A store of the wrong type is reported at the method call: point it at the expression's end.
    let store_end = store
        .to_token_stream()
        .into_iter()
        .last()
        .map_or(store.span(), |t| t.span());
    let method = mode.call("run_in_store", "run_in_store_async", store_end);
    let key = owned_key(&plan.key);
    let body = body.deferred();
    let await_ = mode.await_();
    // A plain return value is always cached: wrap it so the store sees an `Outcome`.
    let call = match (&plan.output, mode) {
        (Output::Plain(_), Mode::Sync) => quote! {
            #store_tokens.#method(__racefree_key, move || ::racefree::__private::Always(__racefree_body())).0
        },
        (Output::Plain(_), Mode::Async) => quote! {
            #store_tokens.#method(__racefree_key, async move { ::racefree::__private::Always(__racefree_body.await) }).await.0
        },
        _ => quote!(#store_tokens.#method(__racefree_key, __racefree_body) #await_),
    };
    quote! {{
        use ::racefree::__private::#ref_trait as _;
        let __racefree_key = #key;
        let __racefree_body = #body;
        #call
    }}
}

/// The store expression as a method receiver: no parentheses around a simple expression, so an
/// error underlines exactly the user's expression.
fn store_receiver(store: &Expr) -> TokenStream {
    match store {
        Expr::Path(_)
        | Expr::Field(_)
        | Expr::Call(_)
        | Expr::MethodCall(_)
        | Expr::Index(_)
        | Expr::Paren(_) => quote!(#store),
        _ => quote!((#store)),
    }
}
