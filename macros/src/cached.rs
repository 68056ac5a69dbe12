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
//!
//! With `refresh` or `share_errors` the match is on `Answer` (`cache.answer(key)`), which adds
//! two cases to the lookup:
//! `Refresh(value, refresh)`, a hit past the `refresh` age that hands this caller the one
//! background recompute of the key (with `refresh`, the body is built before the match so
//! that it can be moved to a thread or task: `refresh.spawn(body)`; otherwise it is dropped),
//! and `Failed(error)`, a waiter of a failed lead with `share_errors` (returned as its `Err`).
//! With `stale_on_error` or `share_errors` a failing lead calls `lead.fail()` /
//! `lead.fail_with(&error)`, which may hand back the expired value to return instead.

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
    /// Refresh-ahead: recompute in the background once an entry is this old (< `ttl`).
    refresh: Option<Duration>,
    /// Serve the expired value when the recompute fails, up to this long past `ttl`.
    stale_on_error: Option<Duration>,
    /// Waiters of a failed lead return its error.
    share_errors: bool,
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
    let ttl_expr = named.peek_expr("ttl").cloned();
    let refresh_expr = named.peek_expr("refresh").cloned();
    let stale_expr = named.peek_expr("stale_on_error").cloned();
    let ttl = errors.keep(named.duration("ttl")).flatten();
    let capacity = errors.keep(named.positive_int("capacity")).flatten();
    let refresh = errors.keep(named.duration("refresh")).flatten();
    let stale_on_error = errors.keep(named.duration("stale_on_error")).flatten();
    let share_errors = named.flag("share_errors");
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
    let own_cache_only = ttl.is_some()
        || capacity.is_some()
        || refresh.is_some()
        || stale_on_error.is_some()
        || share_errors.is_some();
    if let (Some(store), true) = (&store, own_cache_only) {
        // One error for the lot: the other checks below are about the function's own cache.
        errors.push(syn::Error::new(
            store.span(),
            "with `store = ...` the store's own TTL and capacity apply: set them where the Cache is built, not here \
             (`refresh`, `stale_on_error` and `share_errors` are for the function's own cache; a store \
             built with `CacheConfig::stale_on_error` applies it itself)",
        ));
        return errors.finish().map(|()| unreachable!());
    }
    if let (Some(refresh), Some(expr)) = (refresh, &refresh_expr) {
        check_refresh(
            item,
            &shape,
            refresh,
            expr,
            ttl,
            ttl_expr.as_ref(),
            &mut errors,
        );
    }
    let is_result = matches!(shape.output, Output::Result(_));
    if let (Some(_), Some(expr)) = (stale_on_error, &stale_expr) {
        if ttl.is_none() {
            errors.push(syn::Error::new_spanned(
                expr,
                "`stale_on_error` serves an entry for a while past its `ttl` when the recompute fails: give a `ttl` too, e.g. `ttl = \"5m\", stale_on_error = \"10m\"`",
            ));
        } else if !is_result {
            errors.push(syn::Error::new_spanned(
                expr,
                "`stale_on_error` is for a function that returns a `Result` (it serves the last `Ok` value instead of an `Err`); remove it, or return a `Result`",
            ));
        }
    }
    if let (Some(span), false) = (share_errors, is_result) {
        errors.push(syn::Error::new(
            span,
            "`share_errors` hands a failed caller's `Err` to its waiters: it needs a `Result` return type; remove it",
        ));
    }
    errors.finish()?;
    Ok(Plan {
        accessor,
        key,
        store,
        ttl,
        capacity,
        refresh,
        stale_on_error,
        share_errors: share_errors.is_some(),
        output: shape.output,
    })
}

/// `refresh` needs a longer `ttl`, and a body that can run after the call returned: on its own
/// thread or task, so it owns what it uses.
fn check_refresh(
    item: &ItemFn,
    shape: &FnShape,
    refresh: Duration,
    refresh_expr: &Expr,
    ttl: Option<Duration>,
    ttl_expr: Option<&Expr>,
    errors: &mut Errors,
) {
    match ttl {
        None => errors.push(syn::Error::new_spanned(
            refresh_expr,
            "`refresh` recomputes an entry in the background before its `ttl` ends: give a `ttl` too, e.g. `refresh = \"30s\", ttl = \"5m\"`",
        )),
        Some(ttl) if refresh >= ttl => {
            let text = |expr: Option<&Expr>| expr.map(|e| e.to_token_stream().to_string()).unwrap_or_default();
            let half = humantime::format_duration(Duration::from_secs((ttl / 2).as_secs().max(1)));
            errors.push(syn::Error::new_spanned(
                refresh_expr,
                format!(
                    "`refresh = {}` must be shorter than `ttl = {}`: an entry is recomputed in the background once it is `refresh` old and expires at `ttl`; write e.g. `refresh = \"{half}\"`",
                    text(Some(refresh_expr)),
                    text(ttl_expr),
                ),
            ));
        }
        Some(_) => {}
    }
    if let Some(receiver) = item.sig.receiver() {
        errors.push(syn::Error::new_spanned(
            receiver,
            "`refresh` runs the body again in the background after the call returned, so it cannot borrow `self`: use it on a function without `self` that takes owned arguments",
        ));
    }
    for param in &shape.params {
        if let syn::Type::Reference(reference) = &param.ty {
            if reference
                .lifetime
                .as_ref()
                .is_none_or(|l| l.ident != "static")
            {
                let ident = &param.ident;
                errors.push(syn::Error::new_spanned(
                    &param.arg,
                    format!("`refresh` runs the body again in the background after the call returned, so it cannot borrow `{ident}`: take it owned (e.g. `String` for `&str`) or as `&'static`"),
                ));
            }
        }
    }
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
    // Only `refresh` and `share_errors` need `Answer`'s two extra cases; without them the
    // lookup is `Lookup`'s, whose hit path is the shortest.
    let answers = plan.refresh.is_some() || plan.share_errors;
    let (bind_key, lookup) =
        lookup_or_lead(&plan.key, implementor.is_some(), mode, ret_span, answers);
    let hit = hit(&plan.output);
    let finish = finish(plan, ret_span);
    let failed = match plan.share_errors {
        true => {
            quote! {
                ::racefree::__private::Answer::Failed(__racefree_error) => {
                    return ::core::result::Result::Err(__racefree_error.into_error());
                }
            }
        }
        // `Failed` comes only with `share_errors`.
        false => quote! {
            ::racefree::__private::Answer::Failed(__racefree_error) => {
                ::core::mem::drop(__racefree_error);
                ::core::unreachable!("#[cached]: an error shared without `share_errors`")
            }
        },
    };
    // With `refresh` the body is built before the lookup, so that a hit due for refresh can
    // move it to the background; otherwise it is built and run only by the lead.
    let (deferred, refresh, run) = match plan.refresh {
        Some(_) => (
            Some(body.deferred()),
            {
                let spawn = spawn_refresh(&plan.output, mode);
                quote! {
                    ::racefree::__private::Answer::Refresh(__racefree_value, __racefree_refresh) => {
                        #spawn
                        return #hit;
                    }
                }
            },
            match mode {
                Mode::Sync => quote!(__racefree_body()),
                Mode::Async => quote!(__racefree_body.await),
            },
        ),
        // `Refresh` comes only with `refresh`.
        None => (
            None,
            quote! {
                ::racefree::__private::Answer::Refresh(__racefree_value, __racefree_refresh) => {
                    ::core::mem::drop(__racefree_refresh);
                    return #hit;
                }
            },
            body.run(),
        ),
    };
    let deferred = deferred.map(|body| quote!(let __racefree_body = #body;));
    let lookup = match answers {
        // Bound first: matching the call's temporary would drop what is left of it on every
        // hit, an out-of-line call.
        true => quote! {
            let __racefree_answer = #lookup;
            let __racefree_lead = match __racefree_answer {
                ::racefree::__private::Answer::Hit(__racefree_value) => return #hit,
                #refresh
                #failed
                ::racefree::__private::Answer::Lead(__racefree_lead) => __racefree_lead,
            };
        },
        false => quote! {
            let __racefree_lead = match #lookup {
                ::racefree::__private::Lookup::Hit(__racefree_value) => return #hit,
                ::racefree::__private::Lookup::Lead(__racefree_lead) => __racefree_lead,
            };
        },
    };
    quote! {{
        #implementor
        #bind_key
        #id_fn
        static __RACEFREE_CACHE: ::racefree::__private::CacheCell =
            ::racefree::__private::CacheCell::with_id_fn(__racefree_id, #config);
        let __racefree_cache = __RACEFREE_CACHE.handle().#cache_method();
        #deferred
        #lookup
        let __racefree_output: #ret = #run;
        #finish
        __racefree_output
    }}
}

/// A hit due for refresh hands the body to a thread (sync) or a task of the caller's Tokio
/// runtime (async), wrapped so that the runtime sees an `Outcome`.
fn spawn_refresh(output: &Output, mode: Mode) -> TokenStream {
    match (output, mode) {
        (Output::Plain(_), Mode::Sync) => quote! {
            __racefree_refresh.spawn(move || ::racefree::__private::Always(__racefree_body()));
        },
        (Output::Plain(_), Mode::Async) => quote! {
            __racefree_refresh.spawn_async(async move { ::racefree::__private::Always(__racefree_body.await) });
        },
        (_, Mode::Sync) => quote!(__racefree_refresh.spawn(__racefree_body);),
        (_, Mode::Async) => quote!(__racefree_refresh.spawn_async(__racefree_body);),
    }
}

/// The bounds of the function's own cache.
fn config(plan: &Plan) -> TokenStream {
    let ttl = plan.ttl.map(|ttl| {
        let nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        quote!(.ttl(::core::time::Duration::from_nanos(#nanos)))
    });
    let capacity = plan.capacity.map(|capacity| quote!(.capacity(#capacity)));
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let refresh = plan.refresh.map(|d| {
        let nanos = nanos(d);
        quote!(.refresh(::core::time::Duration::from_nanos(#nanos)))
    });
    let stale = plan.stale_on_error.map(|d| {
        let nanos = nanos(d);
        quote!(.stale_on_error(::core::time::Duration::from_nanos(#nanos)))
    });
    let share = plan.share_errors.then(|| quote!(.share_errors()));
    quote!(::racefree::__private::CacheConfig::new() #ttl #capacity #refresh #stale #share)
}

/// Binds the key, and the call that looks it up or makes this caller the key's lead. A method's
/// key is paired with its `__racefree_implementor` (so it is never looked up borrowed).
fn lookup_or_lead(
    key: &Key,
    per_implementor: bool,
    mode: Mode,
    ret_span: Span,
    answers: bool,
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
            let lookup = match answers {
                true => mode.call("answer_borrowed", "answer_borrowed_async", ret_span),
                false => mode.call(
                    "lookup_or_lead_borrowed",
                    "lookup_or_lead_borrowed_async",
                    ret_span,
                ),
            };
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
            let lookup = match answers {
                true => mode.call("answer", "answer_async", ret_span),
                false => mode.call("lookup_or_lead", "lookup_or_lead_async", ret_span),
            };
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
/// With `stale_on_error` / `share_errors` a failed lead may get the expired value back to
/// return, and with `share_errors` it hands its error to the waiters.
fn finish(plan: &Plan, ret_span: Span) -> TokenStream {
    let complete = Ident::new("complete", ret_span);
    let clone = quote_spanned!(ret_span=> ::core::clone::Clone::clone);
    let failed = match (plan.share_errors, plan.stale_on_error.is_some()) {
        (true, _) => {
            // The `ShareableError` bound is checked here, once: spanned so that an error type
            // that is not `Clone` is reported at the return type.
            let fail_with = Ident::new("fail_with", ret_span);
            let error = Ident::new("__racefree_error", ret_span);
            quote! {
                ::core::result::Result::Err(__racefree_error) => {
                    if let ::core::option::Option::Some(__racefree_stale) = __racefree_lead.#fail_with(#error) {
                        return ::core::result::Result::Ok(__racefree_stale);
                    }
                }
            }
        }
        (false, true) => quote! {
            ::core::result::Result::Err(_) => {
                if let ::core::option::Option::Some(__racefree_stale) = __racefree_lead.fail() {
                    return ::core::result::Result::Ok(__racefree_stale);
                }
            }
        },
        (false, false) => quote!(::core::result::Result::Err(_) => __racefree_lead.abandon(),),
    };
    match &plan.output {
        Output::Result(_) => quote! {
            match &__racefree_output {
                ::core::result::Result::Ok(__racefree_value) => __racefree_lead.#complete(#clone(__racefree_value)),
                #failed
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
