//! `#[sequenced]`: calls with the same key run one at a time, in arrival order; a `Seq`
//! parameter receives the key's next number, consumed only if the call succeeds.
//!
//! ```text
//! fn f(args /* without the Seq parameter */) -> R {
//!     let key = <key, or ()>;                            // own sequencer, a method: (implementor, key)
//!     let backend = <the function's own Sequencer<K>, or &store>;
//!     let lease = backend.acquire(key, deadline)?;        // FIFO per key; Reentrant/Timeout errors
//!     let number = lease.next()?.unwrap_or(<start, or 1>); // `start` runs here, under the lock
//!     let output: R = { running under lease.holder(): <body with `let seq: Seq = Seq(number)`> };
//!     if output is Ok (or R is not a Result) { lease.commit(number)? }
//!     output                                               // lease dropped: next waiter runs
//! }
//! ```
//! Errors from the backend go through the function's error type (`E: From<SequenceError>`)
//! when it has `timeout` or `store`; otherwise the only possible one is re-entry, which panics.

use std::time::Duration;

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, FnArg, ItemFn, Pat, ReturnType, Type};

use crate::args::Args;
use crate::expand::{self, Body};
use crate::mode::Mode;
use crate::shape::{erase_impl_trait, nameable, owned_key_type, FnShape, Output, Param};
use crate::tx::{self, TxParam};
use crate::validate::{check_signature, Attr, Errors, Named};

/// What `#[sequenced(...)]` on this function asks for, checked.
struct Plan {
    /// Emit `fn <name>_<store>()` (no `self`, no `store`, no `no_accessor`).
    accessor: bool,
    /// `key = <expr>`; `None`: one sequence for all callers (the key `()`).
    key: Option<Expr>,
    start: Option<Expr>,
    timeout: Option<Duration>,
    /// `store = <expr>`; `None`: the function's own sequencer.
    store: Option<Expr>,
    seq: Option<SeqParam>,
    /// A `tx` parameter: the SQL store's transaction, taken out of the signature.
    tx: Option<TxParam>,
    output: Output,
}

impl Plan {
    /// Backend errors are returned as `Err(E::from(error))` (else they panic): only a timeout or
    /// a store can fail other than by re-entry.
    fn typed_errors(&self) -> bool {
        self.timeout.is_some() || self.store.is_some()
    }
}

/// The `seq: Seq` parameter: where it was, and how the body binds it.
struct SeqParam {
    index: usize,
    pat: Pat,
    ty: Type,
}

fn is_seq(ty: &Type) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => {
            path.path.segments.last().is_some_and(|s| s.ident == "Seq")
        }
        Type::Paren(inner) => is_seq(&inner.elem),
        Type::Group(inner) => is_seq(&inner.elem),
        _ => false,
    }
}

fn seq_param(item: &ItemFn, errors: &mut Errors) -> Option<SeqParam> {
    let mut found: Option<SeqParam> = None;
    for (index, input) in item.sig.inputs.iter().enumerate() {
        let FnArg::Typed(typed) = input else { continue };
        match &*typed.ty {
            Type::Reference(reference) if is_seq(&reference.elem) => errors.push(syn::Error::new_spanned(
                typed,
                "`Seq` is handed over by value (it is `Copy`): write `seq: Seq`, not a reference",
            )),
            ty if is_seq(ty) => {
                if found.is_some() {
                    errors.push(syn::Error::new_spanned(
                        typed,
                        "a call has one sequence number: keep one `Seq` parameter and remove this one",
                    ));
                } else {
                    found = Some(SeqParam { index, pat: (*typed.pat).clone(), ty: ty.clone() });
                }
            }
            _ => {}
        }
    }
    found
}

/// `item` is the function without its `tx` parameter (taken out by [`tx::take`], which may
/// have reported errors already).
fn validate(
    args: Args,
    item: &ItemFn,
    tx: Option<TxParam>,
    mut errors: Errors,
) -> syn::Result<Plan> {
    let mut named = Named::check(Attr::Sequenced, args)?;
    check_signature(Attr::Sequenced, item, &mut errors);
    let shape = FnShape::of(item);
    let timeout = errors.keep(named.duration("timeout")).flatten();
    let start = named.expr("start");
    let store = named.expr("store");
    let accessor = expand::wants_accessor(
        Attr::Sequenced,
        item,
        store.is_some(),
        named.flag("no_accessor"),
        &mut errors,
    );
    let key = named.expr("key");
    let seq = seq_param(item, &mut errors);
    if let (Some(start), None) = (&start, &seq) {
        errors.push(syn::Error::new_spanned(
            start,
            "`start` sets the first `Seq` number: add a `seq: Seq` parameter, or remove `start`",
        ));
    }
    if let Some(tx) = &tx {
        tx::check(tx, store.is_some(), Mode::of(&item.sig), &mut errors);
        if seq.is_none() {
            errors.push(syn::Error::new_spanned(
                &tx.arg,
                "the transaction commits together with the call's number: add a `seq: Seq` parameter",
            ));
        }
    }
    if (timeout.is_some() || store.is_some()) && !matches!(shape.output, Output::Result(_)) {
        let why = if timeout.is_some() {
            "with `timeout = ...` a call can give up waiting for its key"
        } else {
            "with `store = ...` the store can fail"
        };
        let message = format!(
            "{why}: return `Result<T, E>` where `E: From<racefree::SequenceError>` so the caller gets the error"
        );
        match &item.sig.output {
            ReturnType::Type(_, ty) => errors.push(syn::Error::new_spanned(ty, message)),
            ReturnType::Default => errors.push(syn::Error::new_spanned(&item.sig, message)),
        }
    }
    errors.finish()?;
    Ok(Plan {
        accessor,
        key,
        start,
        timeout,
        store,
        seq,
        tx,
        output: shape.output,
    })
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::with_fallback(
        Attr::Sequenced,
        item,
        |item| tx::without_tx_params(without_seq_params(item)),
        |mut item| {
            let args: Args = syn::parse2(args)?;
            let mut errors = Errors::default();
            let tx = tx::take(&mut item, &mut errors);
            let plan = validate(args, &item, tx, errors)?;
            Ok(generate(plan, item))
        },
    )
}

/// The function as callers would see it, for the error case: without its `Seq` parameters
/// (bound to a dummy inside), so one mistake in the attribute is one error, not one more at
/// every call site.
fn without_seq_params(mut item: ItemFn) -> ItemFn {
    let mut bindings = Vec::new();
    let inputs = std::mem::take(&mut item.sig.inputs);
    for input in inputs {
        if let FnArg::Typed(typed) = &input {
            let (pat, ty) = (&typed.pat, &typed.ty);
            match &**ty {
                Type::Reference(reference) if is_seq(&reference.elem) => {
                    bindings.push(quote!(let #pat: #ty = &::racefree::__private::seq(0, 0);));
                    continue;
                }
                ty if is_seq(ty) => {
                    bindings.push(quote!(let #pat: #ty = ::racefree::__private::seq(0, 0);));
                    continue;
                }
                _ => {}
            }
        }
        item.sig.inputs.push(input);
    }
    item.block
        .stmts
        .splice(0..0, bindings.into_iter().map(|b| syn::parse_quote!(#b)));
    item.attrs
        .push(syn::parse_quote!(#[allow(unused_variables)]));
    item
}

fn generate(plan: Plan, mut item: ItemFn) -> TokenStream {
    let block = block(&plan, &item);
    expand::replace_block(&mut item, block);
    if let Some(seq) = &plan.seq {
        remove_param(&mut item, seq.index);
    }
    let accessor = plan.accessor.then(|| {
        expand::handle_accessor(
            &item,
            "sequence",
            "sequences: read, set or reset a key's next number",
            quote!(::racefree::SequenceHandle),
            quote!(::racefree::__private::SequenceCell),
            quote!(()),
            expand::AccessorKey::from(key_type(plan.key.as_ref(), &item)),
        )
    });
    quote!(#item #accessor)
}

/// The key type as the sequencer stores it, where the signature names it: no `key` is `()`;
/// `key = arg` is the argument's owned type (`&str` → `String`); `key = (a, b)` is the tuple
/// of the arguments' types. Any other expression: `None`.
fn key_type(key: Option<&Expr>, item: &ItemFn) -> Option<TokenStream> {
    let shape = FnShape::of(item);
    let param_of = |expr: &Expr| -> Option<Param> {
        let Expr::Path(path) = expr else { return None };
        let ident = path.path.get_ident()?;
        shape.params.iter().find(|p| &p.ident == ident).cloned()
    };
    match key {
        None => Some(quote!(())),
        Some(Expr::Tuple(tuple)) => {
            if !item.sig.generics.params.is_empty() {
                return None;
            }
            let types = tuple
                .elems
                .iter()
                .map(|elem| param_of(elem).map(|p| p.ty).filter(nameable))
                .collect::<Option<Vec<_>>>()?;
            Some(quote!((#(#types,)*)))
        }
        Some(expr) => owned_key_type(&param_of(expr)?.ty, item),
    }
}

/// The new body: the steps of the sketch in the module doc, in order.
fn block(plan: &Plan, item: &ItemFn) -> TokenStream {
    let name = &item.sig.ident;
    let id_fn = expand::id_fn(name);
    // A panic names the function, and so do its metrics.
    let path_fn = expand::path_fn(name);
    let mode = Mode::of(&item.sig);
    let ret = erase_impl_trait(plan.output.ty());
    let fail = fail(plan);

    // The function's own sequencer keys a method's calls by implementor too.
    let implementor = plan
        .store
        .is_none()
        .then(|| expand::implementor(item))
        .flatten();
    let bind_key = bind_key(plan, implementor.is_some());
    let backend = pick_backend(plan, &id_fn);
    let acquire = acquire(plan, mode, &fail);
    let bind_seq = plan.seq.as_ref().map(|SeqParam { pat, ty, .. }| {
        quote! {
            #[allow(unused_variables)]
            let #pat: #ty = __racefree_seq;
        }
    });
    let bind_tx = plan.tx.as_ref().map(tx::bind);
    let body = Body::of(item).with_prelude(quote!(#bind_seq #bind_tx));
    let number = number(plan, mode, &fail);
    let (enter, run) = run_as_holder(body, mode);
    // After `enter` (the holder is taken first): the body borrows the lease until it ends.
    let tx = plan.tx.as_ref().map(|_| {
        quote! {
            let __racefree_tx = ::racefree::__private::sequence_tx(&mut __racefree_lease);
        }
    });
    let finish = finish(plan, mode, &fail);
    quote! {{
        #path_fn
        #implementor
        #bind_key
        #backend
        #acquire
        #enter
        #number
        #tx
        // The body runs as a closure call (sync) or an async block with an unreachable
        // `loop {}` pinning its type (async): both intended, neither the user's to see.
        #[allow(clippy::redundant_closure_call, clippy::empty_loop)]
        let __racefree_output: #ret = #run;
        #finish
        __racefree_output
    }}
}

/// What a backend error does: returned through `E: From<SequenceError>`, or a panic.
fn fail(plan: &Plan) -> TokenStream {
    match plan.typed_errors() {
        // `From::from` is the identity when `E` is `SequenceError` itself.
        true => quote_spanned! {plan.output.ty().span()=>
            return {
                #[allow(clippy::useless_conversion)]
                let __racefree_error = ::core::convert::From::from(__racefree_error);
                ::core::result::Result::Err(__racefree_error)
            }
        },
        false => quote!(::racefree::__private::sequence_failed(
            __racefree_path(),
            __racefree_error
        )),
    }
}

/// Binds `__racefree_key`, kept in its owned form (`&str` as `String`), before the call waits;
/// a method's paired with its implementor.
fn bind_key(plan: &Plan, per_implementor: bool) -> TokenStream {
    let key = match &plan.key {
        Some(expr) => quote_spanned!(expr.span()=> #expr),
        None => quote!(()),
    };
    let pair = per_implementor.then(|| {
        quote! {
            let __racefree_key = (__racefree_implementor, __racefree_key);
        }
    });
    quote! {
        let __racefree_key = {
            #[allow(unused_imports)]
            use ::racefree::__private::{KeyByRef as _, KeyByValue as _};
            (&&::racefree::__private::KeyWrap::new(#key)).__racefree_key()
        };
        #pair
    }
}

/// Binds `__racefree_backend`: the given store, or the function's own sequencer.
fn pick_backend(plan: &Plan, id_fn: &TokenStream) -> TokenStream {
    match &plan.store {
        Some(store) => quote_spanned! {store.span()=>
            let __racefree_backend = &(#store);
        },
        None => quote! {
            #id_fn
            static __RACEFREE_SEQUENCE: ::racefree::__private::SequenceCell =
                ::racefree::__private::SequenceCell::with_id_fn(__racefree_id, ());
            let __racefree_backend = __RACEFREE_SEQUENCE.handle().sequencer();
        },
    }
}

/// Waits for the key (FIFO, until the deadline): binds `__racefree_lease`.
fn acquire(plan: &Plan, mode: Mode, fail: &TokenStream) -> TokenStream {
    let deadline = match plan.timeout {
        Some(timeout) => {
            let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            quote! {
                ::core::option::Option::Some(::std::time::Instant::now() + ::core::time::Duration::from_nanos(#nanos))
            }
        }
        None => quote!(::core::option::Option::None),
    };
    // A store of the wrong type is reported where the trait is required: at the store.
    let span = plan
        .store
        .as_ref()
        .map_or_else(proc_macro2::Span::call_site, |store| store.span());
    let acquire = mode.call("acquire", "acquire_async", span);
    let call = quote_spanned! {span=>
        ::racefree::__private::SequenceBackend::#acquire(__racefree_backend, __racefree_key, #deadline)
    };
    let await_ = mode.await_();
    // `next` and `commit` take the lease mutably / by value; without a `Seq` neither runs.
    // (and a `tx` parameter borrows it mutably).
    let mutability = (plan.seq.is_some() || plan.tx.is_some()).then(|| quote!(mut));
    // The call's span opens before the wait, which is timed; the function's metrics learn the
    // store from the lease (feature `metrics`; without it they are empty).
    quote! {
        static __RACEFREE_METER: ::racefree::__private::MeterCell = ::racefree::__private::MeterCell::new();
        let mut __racefree_call = ::racefree::__private::SequencedCall::start(&__RACEFREE_METER, __racefree_path);
        let __racefree_acquired = #call #await_;
        __racefree_call.acquired(&__racefree_acquired);
        let #mutability __racefree_lease = match __racefree_acquired {
            ::core::result::Result::Ok(__racefree_lease) => __racefree_lease,
            ::core::result::Result::Err(__racefree_error) => #fail,
        };
    }
}

/// A store's error after the key was acquired: counted against the function, then `fail`.
fn store_failed(fail: &TokenStream) -> TokenStream {
    quote! {{
        __racefree_call.failed(&__racefree_error);
        #fail
    }}
}

/// Binds `__racefree_number` (the key's next number, or `start` for a new key, evaluated here
/// under the lock) and the `Seq` handed to the body. Nothing without a `Seq` parameter.
fn number(plan: &Plan, mode: Mode, fail: &TokenStream) -> TokenStream {
    if plan.seq.is_none() {
        return quote!();
    }
    let start = match &plan.start {
        Some(start) => quote_spanned! {start.span()=>
            {
                let __racefree_start: u64 = #start;
                __racefree_start
            }
        },
        None => quote!(1_u64),
    };
    let next = mode.call("next", "next_async", proc_macro2::Span::call_site());
    let await_ = mode.await_();
    let fail = store_failed(fail);
    quote! {
        let __racefree_number: u64 = match ::racefree::__private::SequenceLease::#next(&mut __racefree_lease) #await_ {
            ::core::result::Result::Ok(::core::option::Option::Some(__racefree_next)) => __racefree_next,
            ::core::result::Result::Ok(::core::option::Option::None) => #start,
            ::core::result::Result::Err(__racefree_error) => #fail,
        };
        let __racefree_seq = match ::racefree::__private::issue_seq(
            __racefree_number,
            ::racefree::__private::SequenceLease::fence(&__racefree_lease),
        ) {
            ::core::result::Result::Ok(__racefree_seq) => __racefree_seq,
            ::core::result::Result::Err(__racefree_error) => #fail,
        };
    }
}

/// The code under the key runs as its holder, so that taking the key again from inside is
/// detected as re-entry. A sync function enters before `start` too; an async one enters on
/// every poll of its body, while `start` (which may `.await` and `?` in the function's own
/// scope) runs outside: re-entering from an async `start` waits, like a spawned task would.
fn run_as_holder(body: Body, mode: Mode) -> (TokenStream, TokenStream) {
    let holder = quote!(::racefree::__private::SequenceLease::holder(
        &__racefree_lease
    ));
    match mode {
        // Bound before the body may borrow the lease (a `tx` parameter).
        Mode::Async => (
            quote!(let __racefree_holder = #holder;),
            body.run_wrapped(|future| quote!(__racefree_holder.within(#future))),
        ),
        Mode::Sync => (
            quote!(let __racefree_entered = #holder.enter();),
            body.run(),
        ),
    }
}

/// Commits the number after a success (`Ok`, or any value of a function not returning
/// `Result`); otherwise, or without a `Seq`, drops the lease so the next waiter runs.
fn finish(plan: &Plan, mode: Mode, fail: &TokenStream) -> TokenStream {
    if plan.seq.is_none() {
        return quote!(::core::mem::drop(__racefree_lease););
    }
    let succeeded = match &plan.output {
        Output::Result(_) => quote!(::core::result::Result::is_ok(&__racefree_output)),
        Output::Option(_) | Output::Plain(_) => quote!(true),
    };
    let commit = mode.call("commit", "commit_async", proc_macro2::Span::call_site());
    let await_ = mode.await_();
    let fail = store_failed(fail);
    quote! {
        if #succeeded {
            if let ::core::result::Result::Err(__racefree_error) = ::racefree::__private::SequenceLease::#commit(__racefree_lease, __racefree_number) #await_ {
                #fail;
            }
        } else {
            ::core::mem::drop(__racefree_lease);
        }
    }
}

/// Removes the `Seq` parameter from the signature callers see.
fn remove_param(item: &mut ItemFn, index: usize) {
    let inputs = std::mem::take(&mut item.sig.inputs);
    item.sig.inputs = inputs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, input)| input)
        .collect();
}
