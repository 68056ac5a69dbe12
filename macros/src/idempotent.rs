//! `#[idempotent]`: the body runs once per idempotency key; duplicates get the stored outcome.
//!
//! ```text
//! fn f(args) -> Result<T, E> {
//!     let store = <the function's own in-process store, or `store`>;
//!     let fingerprint = <hash of the arguments not skipped, or of `fingerprint`>;
//!                          // stable BLAKE3 for a given store, keyed SipHash for the own one
//!     let call = Call::new(<function path>, <scope>, <key>, fingerprint, <policy>);
//!                                                          // a method's scope: implementor first
//!     let execution = match begin(store, call) {          // claim; wait for or reject duplicates
//!         Begin::Execute(execution) => execution,          // ours to run (or no key: plain call)
//!         Begin::Replay(value) => return Ok(value),        // stored by an earlier call
//!         Begin::Refuse(error) => return Err(From::from(error)),  // conflict, in progress, ...
//!     };
//!     let output: Result<T, E> = (move || -> Result<T, E> { <body> })();
//!     match &output { Ok(value) => execution.complete(value), Err(_) => execution.release() }
//!     output                                               // (dropping `execution` releases too)
//! }
//! ```
//! With `store_errors` the whole `Result` is stored and replayed. Async functions await
//! `begin` and `complete`; sync functions block.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ItemFn, ReturnType, Type};

use crate::args::Args;
use crate::expand::{self, Body};
use crate::key;
use crate::mode::Mode;
use crate::shape::{contains_impl_trait, FnShape, Output, Param};
use crate::tx::{self, TxParam};
use crate::validate::{check_signature, check_skip, Attr, Errors, Named};

/// What `#[idempotent(...)]` on this function asks for, checked.
struct Plan {
    /// Emit `fn <name>_<store>()` (no `self`, no `store`, no `no_accessor`).
    accessor: bool,
    key: Expr,
    fingerprint: Fingerprint,
    scope: Option<Expr>,
    /// `store = <expr>`; `None`: the function's own in-process store, bounded by `capacity`.
    store: Option<Expr>,
    ttl: Duration,
    capacity: Option<usize>,
    in_flight: InFlight,
    require_key: bool,
    /// Keep `Err` outcomes too: the whole `Result` is stored and replayed.
    store_errors: bool,
    /// The `Result<T, E>` the function returns.
    ret: Type,
    /// A `tx` parameter: the SQL store's transaction, taken out of the signature.
    tx: Option<TxParam>,
}

/// What a call does when its key's first call is still running.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InFlight {
    /// Wait for its outcome (the default).
    Wait,
    /// Return `IdempotencyError::InProgress` at once.
    Reject,
}

/// What the request fingerprint hashes.
enum Fingerprint {
    /// `fingerprint = <expr>`.
    Given(Expr),
    /// The arguments not skipped and not the key itself.
    Arguments(Vec<Param>),
}

const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `item` is the function without its `tx` parameter (taken out by [`tx::take`], which may
/// have reported errors already).
fn validate(
    args: Args,
    item: &ItemFn,
    tx: Option<TxParam>,
    mut errors: Errors,
) -> syn::Result<Plan> {
    let mut named = Named::check(Attr::Idempotent, args)?;
    check_signature(Attr::Idempotent, item, &mut errors);
    let shape = FnShape::of(item);
    let skip = named.idents("skip");
    check_skip(&shape, &skip, &mut errors);
    let ttl = errors.keep(named.duration("ttl")).flatten();
    let capacity = errors.keep(named.positive_int("capacity")).flatten();
    let in_flight = errors
        .keep(named.choice(
            "in_flight",
            &[("wait", InFlight::Wait), ("reject", InFlight::Reject)],
        ))
        .flatten();
    let require_key = named.flag("require_key").is_some();
    let store_errors = named.flag("store_errors").is_some();
    let scope = named.expr("scope");
    let store = named.expr("store");
    let accessor = expand::wants_accessor(
        Attr::Idempotent,
        item,
        store.is_some(),
        named.flag("no_accessor"),
        &mut errors,
    );
    let fingerprint = named.expr("fingerprint");
    let key = named.expr("key");
    if key.is_none() {
        errors.push(syn::Error::new(
            Span::call_site(),
            "#[idempotent] needs the client's idempotency key: write `key = <expression>` evaluating to \
             `&str`, `String` or an `Option` of them, e.g. `key = req.idempotency_key.as_deref()`",
        ));
    }
    check_output(item, &shape, &mut errors);
    if let (Some(store), Some(_)) = (&store, capacity) {
        errors.push(syn::Error::new_spanned(
            store,
            "with `store = ...` the store's own capacity applies: set it where the store is built, not here",
        ));
    }
    if let Some(tx) = &tx {
        tx::check(tx, store.is_some(), Mode::of(&item.sig), &mut errors);
    }
    let fingerprint = match fingerprint {
        Some(expr) => Fingerprint::Given(expr),
        None => default_fingerprint(&shape, &skip, key.as_ref(), &mut errors),
    };
    errors.finish()?;
    Ok(Plan {
        accessor,
        key: key.expect("checked above"),
        fingerprint,
        scope,
        store,
        ttl: ttl.unwrap_or(DEFAULT_TTL),
        capacity,
        in_flight: in_flight.unwrap_or(InFlight::Wait),
        require_key,
        store_errors,
        ret: shape.output.ty().clone(),
        tx,
    })
}

/// The arguments not skipped, except one that is the key itself: it does not describe the
/// request.
fn default_fingerprint(
    shape: &FnShape,
    skip: &[Ident],
    key: Option<&Expr>,
    errors: &mut Errors,
) -> Fingerprint {
    if let Some(first) = shape.unnamed.first() {
        errors.push(syn::Error::new_spanned(
            first,
            "the default fingerprint needs named arguments: write `fingerprint = <expression>`",
        ));
    }
    let key_argument = key.and_then(bare_argument);
    let hashed = shape
        .params
        .iter()
        .filter(|p| !skip.contains(&p.ident) && Some(&p.ident) != key_argument.as_ref())
        .cloned()
        .collect();
    Fingerprint::Arguments(hashed)
}

/// `Result<T, E>` is required: conflicts and duplicates in flight are reported through `E`.
fn check_output(item: &ItemFn, shape: &FnShape, errors: &mut Errors) {
    const NEEDED: &str = "an #[idempotent] function must return `Result<T, E>` with \
                          `E: From<racefree::IdempotencyError>`, so that conflicts and duplicates in flight can be reported";
    match (&item.sig.output, &shape.output) {
        (ReturnType::Default, _) => errors.push(syn::Error::new_spanned(
            &item.sig,
            format!("{NEEDED}; add `-> Result<(), YourError>`"),
        )),
        (_, Output::Result(ty)) if contains_impl_trait(ty) => errors.push(syn::Error::new_spanned(
            ty,
            "an #[idempotent] function must return a nameable `Result<T, E>`, not one with `impl Trait` in it",
        )),
        (_, Output::Result(_)) => {}
        (ReturnType::Type(_, ty), _) => {
            errors.push(syn::Error::new_spanned(ty, format!("{NEEDED}; found `{}`", ty.to_token_stream())))
        }
    }
}

/// The argument a key expression names, if it is nothing but that argument (`key = order_key`).
fn bare_argument(key: &Expr) -> Option<Ident> {
    match key {
        Expr::Path(path) if path.qself.is_none() && path.attrs.is_empty() => {
            path.path.get_ident().cloned()
        }
        _ => None,
    }
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::with_fallback(Attr::Idempotent, item, tx::without_tx_params, |mut item| {
        let args: Args = syn::parse2(args)?;
        let mut errors = Errors::default();
        let tx = tx::take(&mut item, &mut errors);
        let plan = validate(args, &item, tx, errors)?;
        Ok(generate(plan, item))
    })
}

fn generate(plan: Plan, mut item: ItemFn) -> TokenStream {
    let name = &item.sig.ident;
    let id_fn = expand::id_fn(name);
    let path_fn = expand::path_fn(name);
    let mode = Mode::of(&item.sig);
    let ret = &plan.ret;
    // Calls whose bounds concern the outcome type (`Clone`, `From<IdempotencyError>`) carry the
    // return type's span, so such errors are reported at the return type.
    let ret_span = ret.span();
    let store = pick_store(&plan, &id_fn, ret_span);
    let fingerprint = fingerprint(&plan.fingerprint);
    let implementor = expand::implementor(&item);
    let call = call(&plan, name, implementor.is_some());
    let begin = begin(&plan, mode, ret_span);
    let finish = finish(&plan, mode, ret_span);
    // An async body runs as the executor of its key, so a call it polls with the same key is
    // `Reentrant` instead of waiting for itself (sync bodies are recognised by their thread).
    // With a `tx` parameter the body borrows the execution's lease, so the holder is taken
    // first.
    let (bind_tx, body) = match &plan.tx {
        Some(tx) => (
            quote! {
                let __racefree_holder = __racefree_execution.holder();
                let __racefree_tx = ::racefree::__private::idempotent_tx(&mut __racefree_execution);
            },
            Body::of(&item)
                .with_prelude(tx::bind(tx))
                .run_wrapped(|future| quote!(__racefree_holder.within(#future))),
        ),
        None => (
            quote!(),
            Body::of(&item).run_wrapped(|future| quote!(__racefree_execution.within(#future))),
        ),
    };
    // The function's own store never lets its fingerprints out of the process; a given store
    // may (Redis, SQL), so it gets the fingerprint that is the same in every process.
    let hasher = match plan.store {
        None => quote!(ProcessHasher),
        Some(_) => quote!(StableHasher),
    };
    let block = quote! {{
        #path_fn
        #implementor
        #store
        let __racefree_fingerprint = {
            let mut __racefree_hasher = ::racefree::__private::#hasher::new();
            #fingerprint
            __racefree_hasher.fingerprint()
        };
        #call
        #begin
        #bind_tx
        let __racefree_output: #ret = #body;
        #finish
        __racefree_output
    }};
    expand::replace_block(&mut item, block);
    let accessor = plan.accessor.then(|| {
        let config = config(&plan);
        expand::handle_accessor(
            &item,
            "idempotency_store",
            "idempotency store: its records, stats, purging",
            quote!(::racefree::IdempotencyHandle),
            quote!(::racefree::__private::IdempotencyCell),
            config,
            expand::AccessorKey::None,
        )
    });
    quote!(#item #accessor)
}

/// Binds `__racefree_store`: the given store, or the function's own.
fn pick_store(plan: &Plan, id_fn: &TokenStream, ret_span: Span) -> TokenStream {
    match &plan.store {
        // Method-call syntax, so that auto-deref finds the store behind a `LazyLock` or `Arc`.
        Some(store) => quote_spanned! {store.span()=>
            let __racefree_store = {
                // Unused when the store has an inherent `idempotency_store` (the SQL stores).
                #[allow(unused_imports)]
                use ::racefree::__private::StoreRef as _;
                (#store).idempotency_store()
            };
        },
        None => {
            let config = config(plan);
            // With `store_errors` the error type's bound gets its own message.
            let method = match plan.store_errors {
                true => "store_with_errors",
                false => "store",
            };
            let store_method = Ident::new(method, ret_span);
            quote! {
                #id_fn
                static __RACEFREE_IDEMPOTENCY: ::racefree::__private::IdempotencyCell =
                    ::racefree::__private::IdempotencyCell::with_id_fn(__racefree_id, #config);
                let __racefree_store = __RACEFREE_IDEMPOTENCY.handle().#store_method();
            }
        }
    }
}

/// The bounds of the function's own store.
fn config(plan: &Plan) -> TokenStream {
    let capacity = plan.capacity.map(|c| quote!(.capacity(#c)));
    quote!(::racefree::__private::IdempotencyConfig::new() #capacity)
}

/// Statements feeding the request into `__racefree_hasher`.
fn fingerprint(fingerprint: &Fingerprint) -> TokenStream {
    match fingerprint {
        Fingerprint::Given(expr) => {
            quote_spanned!(expr.span()=> ::core::hash::Hash::hash(&(#expr), &mut __racefree_hasher);)
        }
        Fingerprint::Arguments(params) => key::fingerprint(params),
    }
}

/// Binds `__racefree_call`, the call's record: who (function path, scope, key), what
/// (fingerprint), and the policy.
fn call(plan: &Plan, name: &Ident, per_implementor: bool) -> TokenStream {
    let scope = match &plan.scope {
        Some(scope) => quote_spanned! {scope.span()=>
            ::core::option::Option::Some(&(#scope) as &dyn ::core::fmt::Display)
        },
        None => quote!(::core::option::Option::None),
    };
    let (bind_scope, scope) = match per_implementor {
        true => (implementor_scope(scope), quote!(__racefree_scope)),
        false => (quote!(), scope),
    };
    let key = &plan.key;
    let key = quote_spanned!(key.span()=> #key);
    let nanos = u64::try_from(plan.ttl.as_nanos()).unwrap_or(u64::MAX);
    let reject = (plan.in_flight == InFlight::Reject).then(|| quote!(.reject_in_flight()));
    let require_key = plan.require_key.then(|| quote!(.require_key()));
    let policy = quote! {
        ::racefree::__private::Policy::new(::core::time::Duration::from_nanos(#nanos)) #reject #require_key
    };
    // A given store may be shared: without a scope, the record path must be this function's
    // alone (the function's own store is keyed by its id already).
    let claim = (plan.store.is_some() && plan.scope.is_none() && !per_implementor).then(|| {
        let line = quote_spanned!(name.span()=> ::core::line!());
        let column = quote_spanned!(name.span()=> ::core::column!());
        quote! {
            .claimed({
                static __RACEFREE_CLAIM: ::std::sync::OnceLock<::core::result::Result<(), ::racefree::IdempotencyError>> =
                    ::std::sync::OnceLock::new();
                __RACEFREE_CLAIM.get_or_init(|| {
                    ::racefree::__private::claim_records(
                        __racefree_path(),
                        ::core::concat!(::core::file!(), ":", #line, ":", #column),
                    )
                })
            })
        }
    });
    quote! {
        #bind_scope
        static __RACEFREE_METER: ::racefree::__private::MeterCell = ::racefree::__private::MeterCell::new();
        let __racefree_call = ::racefree::__private::Call::new(__racefree_path(), #scope, #key, __racefree_fingerprint, #policy)
            .metered(&__RACEFREE_METER) #claim;
    }
}

/// A method's scope, prefixed with its implementor when it has one (`app::Tri`, or
/// `app::Tri/<scope>`), so that a default method's records are per implementor: statements
/// binding `__racefree_scope` (let-bound, so the borrowed temporaries live long enough).
fn implementor_scope(scope: TokenStream) -> TokenStream {
    quote! {
        struct __RacefreeScope<'a>(&'static str, ::core::option::Option<&'a dyn ::core::fmt::Display>);
        impl ::core::fmt::Display for __RacefreeScope<'_> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                match self.1 {
                    ::core::option::Option::Some(scope) => ::core::write!(f, "{}/{}", self.0, scope),
                    ::core::option::Option::None => f.write_str(self.0),
                }
            }
        }
        let __racefree_user_scope: ::core::option::Option<&dyn ::core::fmt::Display> = #scope;
        let __racefree_scope: ::core::option::Option<&dyn ::core::fmt::Display> = match __racefree_implementor {
            ::core::option::Option::Some(__racefree_implementor) => ::core::option::Option::Some(
                &__RacefreeScope(__racefree_implementor, __racefree_user_scope) as &dyn ::core::fmt::Display,
            ),
            ::core::option::Option::None => __racefree_user_scope,
        };
    }
}

/// Claims the key: binds `__racefree_execution`, or returns a replayed or refused outcome.
fn begin(plan: &Plan, mode: Mode, ret_span: Span) -> TokenStream {
    let begin = mode.call("begin_blocking", "begin", Span::call_site());
    let await_ = mode.await_();
    let replayed = match plan.store_errors {
        true => quote!(__racefree_outcome),
        false => quote!(::core::result::Result::Ok(__racefree_outcome)),
    };
    let refused = quote_spanned! {ret_span=>
        ::core::result::Result::Err(::core::convert::From::from(__racefree_error))
    };
    // The `tx` parameter borrows the lease mutably.
    let mutability = plan.tx.as_ref().map(|_| quote!(mut));
    quote! {
        // `From::from` is the identity when `E` is `IdempotencyError` itself.
        #[allow(clippy::useless_conversion)]
        let #mutability __racefree_execution = match ::racefree::__private::#begin(__racefree_store, __racefree_call) #await_ {
            ::racefree::__private::Begin::Execute(__racefree_execution) => __racefree_execution,
            ::racefree::__private::Begin::Replay(__racefree_outcome) => return #replayed,
            ::racefree::__private::Begin::Refuse(__racefree_error) => return #refused,
        };
    }
}

/// Stores a success (or, with `store_errors`, any outcome); releases the key after an `Err`.
/// An async call finishes with `finish`, whose error (only a store whose `complete` commits
/// the body's effect, a SQL store, reports one: the transaction did not commit, or may not
/// have) replaces the outcome.
fn finish(plan: &Plan, mode: Mode, ret_span: Span) -> TokenStream {
    let complete = match mode {
        Mode::Sync => {
            let complete = Ident::new("complete_blocking", ret_span);
            quote!(__racefree_execution.#complete)
        }
        Mode::Async => quote!(__racefree_execution.finish),
    };
    let checked = |outcome: TokenStream| match mode {
        Mode::Sync => quote!(#complete(#outcome);),
        Mode::Async => quote_spanned! {ret_span=>
            // `From::from` is the identity when `E` is `IdempotencyError` itself.
            #[allow(clippy::useless_conversion)]
            if let ::core::result::Result::Err(__racefree_error) = #complete(#outcome).await {
                return ::core::result::Result::Err(::core::convert::From::from(__racefree_error));
            }
        },
    };
    match plan.store_errors {
        true => checked(quote!(&__racefree_output)),
        false => {
            let store = checked(quote!(__racefree_value));
            quote! {
                match &__racefree_output {
                    ::core::result::Result::Ok(__racefree_value) => { #store }
                    ::core::result::Result::Err(_) => __racefree_execution.release(),
                }
            }
        }
    }
}
