//! `#[idempotent]`: the body runs once per idempotency key; duplicates get the stored outcome.
//!
//! ```text
//! fn f(args) -> Result<T, E> {
//!     let store = <the function's own in-process store, or `store`>;
//!     let fingerprint = <hash of the arguments not skipped, or of `fingerprint`>;
//!     let call = Call::new(<function path>, <scope>, <key>, fingerprint, <policy>);
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

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ItemFn, ReturnType};

use crate::args::Args;
use crate::expand::{self, Body};
use crate::validate::{contains_impl_trait, Attr, Errors, FnShape, Named, Output};

struct Plan {
    key: Expr,
    fingerprint: TokenStream,
    scope: Option<Expr>,
    store: Option<Expr>,
    policy: TokenStream,
    config: TokenStream,
    store_errors: bool,
}

fn validate(args: Args, item: &ItemFn) -> syn::Result<Plan> {
    let mut named = Named::check(Attr::Idempotent, args)?;
    let mut errors = Errors::default();
    let shape = FnShape::of(item);
    let skip = named.idents("skip");
    shape.check_skip(&skip, &mut errors);
    let ttl = errors.keep(named.duration("ttl")).flatten();
    let capacity = errors.keep(named.positive_int("capacity")).flatten();
    let in_flight = errors
        .keep(named.choice("in_flight", &["wait", "reject"]))
        .flatten();
    let require_key = named.flag("require_key").is_some();
    let store_errors = named.flag("store_errors").is_some();
    let scope = named.expr("scope");
    let store = named.expr("store");
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
    let fingerprint = match fingerprint {
        Some(expr) => {
            quote_spanned!(expr.span()=> ::core::hash::Hash::hash(&(#expr), &mut __racefree_hasher);)
        }
        None => {
            if let Some(first) = shape.unnamed.first() {
                errors.push(syn::Error::new_spanned(
                    first,
                    "the default fingerprint needs named arguments: write `fingerprint = <expression>`",
                ));
            }
            // An argument that is the key itself does not describe the request: leave it out.
            let key_argument = key.as_ref().and_then(bare_argument);
            let hashed = shape
                .params
                .iter()
                .filter(|p| !skip.contains(&p.ident) && Some(&p.ident) != key_argument.as_ref())
                .map(|p| {
                    let ident = &p.ident;
                    quote_spanned!(p.ty.span()=> ::core::hash::Hash::hash(&#ident, &mut __racefree_hasher);)
                });
            quote!(#(#hashed)*)
        }
    };
    errors.finish()?;

    let ttl = ttl.unwrap_or(std::time::Duration::from_secs(24 * 60 * 60));
    let nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
    let reject = matches!(&in_flight, Some((mode, _)) if mode == "reject")
        .then(|| quote!(.reject_in_flight()));
    let require_key = require_key.then(|| quote!(.require_key()));
    let policy = quote! {
        ::racefree::__private::Policy::new(::core::time::Duration::from_nanos(#nanos)) #reject #require_key
    };
    let capacity = capacity.map(|c| quote!(.capacity(#c)));
    let config = quote!(::racefree::__private::IdempotencyConfig::new() #capacity);
    Ok(Plan {
        key: key.expect("checked above"),
        fingerprint,
        scope,
        store,
        policy,
        config,
        store_errors,
    })
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
    expand::with_fallback(item, |item| {
        let args: Args = syn::parse2(args)?;
        let plan = validate(args, &item)?;
        Ok(generate(plan, item))
    })
}

fn generate(plan: Plan, mut item: ItemFn) -> TokenStream {
    let Plan {
        key,
        fingerprint,
        scope,
        store,
        policy,
        config,
        store_errors,
    } = plan;
    let name = &item.sig.ident;
    let id = expand::function_id(name);
    let path = expand::function_path(name);
    let ret = match &item.sig.output {
        ReturnType::Type(_, ty) => (**ty).clone(),
        ReturnType::Default => unreachable!("validated: returns a Result"),
    };
    let ret_span = ret.span();
    let is_async = item.sig.asyncness.is_some();

    // Calls whose bounds concern the outcome type (`Clone`, `From<IdempotencyError>`) carry the
    // return type's span, so such errors are reported at the return type.
    let store_method = Ident::new("store", ret_span);
    let default_store = store.is_none();
    let store = match &store {
        // Method-call syntax, so that auto-deref finds the store behind a `LazyLock` or `Arc`.
        Some(store) => quote_spanned! {store.span()=>
            let __racefree_store = {
                use ::racefree::__private::StoreRef as _;
                (#store).idempotency_store()
            };
        },
        None => quote! {
            static __RACEFREE_IDEMPOTENCY: ::racefree::__private::IdempotencyCell =
                ::racefree::__private::IdempotencyCell::new(#id, #config);
            let __racefree_store = __RACEFREE_IDEMPOTENCY.handle().#store_method();
        },
    };
    let scope = match &scope {
        Some(scope) => quote_spanned! {scope.span()=>
            ::core::option::Option::Some(&(#scope) as &dyn ::core::fmt::Display)
        },
        None => quote!(::core::option::Option::None),
    };
    let key = quote_spanned!(key.span()=> #key);
    let (begin, complete, await_) = match is_async {
        true => (
            quote!(begin),
            Ident::new("complete", ret_span),
            Some(quote!(.await)),
        ),
        false => (
            quote!(begin_blocking),
            Ident::new("complete_blocking", ret_span),
            None,
        ),
    };
    let refused = quote_spanned! {ret_span=>
        ::core::result::Result::Err(::core::convert::From::from(__racefree_error))
    };
    let (replayed, finish) = if store_errors {
        (
            quote!(__racefree_outcome),
            quote!(__racefree_execution.#complete(&__racefree_output) #await_;),
        )
    } else {
        (
            quote!(::core::result::Result::Ok(__racefree_outcome)),
            quote! {
                match &__racefree_output {
                    ::core::result::Result::Ok(__racefree_value) => __racefree_execution.#complete(__racefree_value) #await_,
                    ::core::result::Result::Err(_) => __racefree_execution.release(),
                }
            },
        )
    };
    let body = Body::of(&item).run();

    let block = quote! {{
        #store
        let __racefree_fingerprint = {
            let mut __racefree_hasher = ::racefree::__private::StableHasher::new();
            #fingerprint
            __racefree_hasher.fingerprint()
        };
        let __racefree_call = ::racefree::__private::Call::new(#path, #scope, #key, __racefree_fingerprint, #policy);
        // `From::from` is the identity when `E` is `IdempotencyError` itself.
        #[allow(clippy::useless_conversion)]
        let __racefree_execution = match ::racefree::__private::#begin(__racefree_store, __racefree_call) #await_ {
            ::racefree::__private::Begin::Execute(__racefree_execution) => __racefree_execution,
            ::racefree::__private::Begin::Replay(__racefree_outcome) => return #replayed,
            ::racefree::__private::Begin::Refuse(__racefree_error) => return #refused,
        };
        let __racefree_output: #ret = #body;
        #finish
        __racefree_output
    }};
    *item.block = syn::parse2(block).expect("generated block parses");

    let accessor = default_store.then(|| {
        expand::handle_accessor(
            &item,
            "idempotency_store",
            "idempotency store: its records, stats, purging",
            quote!(::racefree::IdempotencyHandle),
            quote!(::racefree::__private::IdempotencyCell),
            quote!(#id, #config),
        )
    });
    quote!(#item #accessor)
}
