//! Pieces every expansion shares: error fallback, the function's id, the accessor of its own
//! store, the default key, running the user's body.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{ItemFn, ReturnType, Stmt};

use crate::mode::Mode;
use crate::shape::erase_impl_trait;
use crate::validate::{Attr, Errors};

/// Parses the item and runs `expand`; on error emits the function as callers see it
/// (`as_called`: the signature without what the attribute supplies) next to the
/// `compile_error!`, so one mistake gives one error and not a cascade at every call site.
pub fn with_fallback(
    attr: Attr,
    item: TokenStream,
    as_called: fn(ItemFn) -> ItemFn,
    expand: impl FnOnce(ItemFn) -> syn::Result<TokenStream>,
) -> TokenStream {
    let parsed: ItemFn = match syn::parse2(item.clone()) {
        Ok(parsed) => parsed,
        // A `fn` whose body does not parse: rustc reports the syntax error itself, at the
        // user's tokens; a second error from here would only mislead.
        Err(_) => match fn_with_unparsed_body(item.clone()) {
            Ok((shell, body)) => {
                let ItemFn {
                    attrs,
                    vis,
                    sig,
                    block,
                    ..
                } = as_called(shell);
                let stmts = &block.stmts;
                return quote!(#(#attrs)* #vis #sig { #(#stmts)* #body });
            }
            Err(_) => {
                let message = match syn::parse2::<syn::TraitItemFn>(item.clone()) {
                    Ok(_) => format!(
                        "#[{}] goes on a `fn` with a body: on a trait's required method, put it on \
                         the method in each impl",
                        attr.name()
                    ),
                    Err(_) => "racefree's attributes go on a `fn` or `async fn`".to_owned(),
                };
                let error = syn::Error::new_spanned(&item, message).to_compile_error();
                return quote!(#item #error);
            }
        },
    };
    match expand(parsed.clone()) {
        Ok(tokens) => tokens,
        Err(error) => {
            let error = error.to_compile_error();
            let item = as_called(parsed);
            quote!(#item #error)
        }
    }
}

/// Attributes, visibility and a `fn` signature followed by a `{ ... }` body, whatever the body
/// holds: the function with an empty block, and the body's tokens.
fn fn_with_unparsed_body(item: TokenStream) -> syn::Result<(ItemFn, TokenStream)> {
    let shell = |input: syn::parse::ParseStream| {
        let attrs = input.call(syn::Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig = input.parse()?;
        let body;
        let brace_token = syn::braced!(body in input);
        let block = syn::Block {
            brace_token,
            stmts: Vec::new(),
        };
        let item = ItemFn {
            attrs,
            vis,
            sig,
            block: Box::new(block),
        };
        Ok((item, body.parse::<TokenStream>()?))
    };
    syn::parse::Parser::parse2(shell, item)
}

/// For a method (a `self` receiver): binds `__racefree_implementor`, the `Self` type when the
/// function's scope does not name it (`__private::implementor`): a trait's default method is
/// one function for every implementor, a generic impl's method one for every instantiation,
/// and each gets its own store entries by it. `None` for a function without `self`.
pub fn implementor(item: &ItemFn) -> Option<TokenStream> {
    item.sig.receiver()?;
    Some(quote! {
        fn __racefree_scope() -> &'static str {
            struct __RacefreeMark;
            static __RACEFREE_SCOPE: ::std::sync::OnceLock<&'static str> = ::std::sync::OnceLock::new();
            __RACEFREE_SCOPE.get_or_init(|| {
                ::racefree::__private::function_scope(::core::any::type_name::<__RacefreeMark>())
            })
        }
        let __racefree_implementor: ::core::option::Option<&'static str> =
            ::racefree::__private::implementor(__racefree_scope(), ::core::any::type_name::<Self>());
    })
}

/// Whether the attribute emits a sibling accessor (`fn <name>_cache()` and the like) for the
/// function's own store: only for a function without a `self` receiver. The attribute cannot
/// see whether a method is in an inherent impl, a trait impl or a trait; in the last two an
/// added `fn` is E0407 (not a member of the trait) or makes the trait not dyn-compatible, and
/// every dyn-compatible trait method has a receiver. A method reaches its store through
/// `store = ...` instead.
pub fn has_accessor(item: &ItemFn) -> bool {
    item.sig.receiver().is_none()
}

/// Whether the attribute emits the accessor: for a function without `self` and without
/// `store`, unless it says `no_accessor` (an associated function in a trait impl, where any
/// added `fn` is E0407). `no_accessor` where there is no accessor anyway is an error.
pub fn wants_accessor(
    attr: Attr,
    item: &ItemFn,
    store: bool,
    no_accessor: Option<Span>,
    errors: &mut Errors,
) -> bool {
    let would = !store && has_accessor(item);
    if let (Some(span), false) = (no_accessor, would) {
        let why = match store {
            true => "with `store = ...` there is no accessor",
            false => "a method with `self` gets no accessor",
        };
        errors.push(syn::Error::new(
            span,
            format!(
                "`no_accessor` is for a #[{}] function that would get one: {why}; remove `no_accessor`",
                attr.name()
            ),
        ));
    }
    would && no_accessor.is_none()
}

/// Declares `fn __racefree_id() -> &'static str`: the function's process-unique id,
/// `<scope>::<name>@<line>:<column>`, for its own store. The scope is read off a marker type
/// (`__private::function_name`), so it includes the `Self` type of a method and tells apart
/// functions one `macro_rules!` invocation generates (whose `line!()` is the same); the line
/// and column tell apart same-named functions in sibling blocks. The accessor declares the
/// same `fn` and gets the same id.
pub fn id_fn(name: &Ident) -> TokenStream {
    let line = quote_spanned!(name.span()=> ::core::line!());
    let column = quote_spanned!(name.span()=> ::core::column!());
    name_fn(
        quote!(__racefree_id),
        name,
        quote!(::core::concat!("@", #line, ":", #column)),
    )
}

/// Declares `fn __racefree_path() -> &'static str`: the function's build-stable path,
/// `<scope>::<name>` with the `Self` type of a method and no line number, for record keys
/// of stores that outlive the process. Computed once.
pub fn path_fn(name: &Ident) -> TokenStream {
    let text = name.to_string();
    quote! {
        fn __racefree_path() -> &'static str {
            struct __RacefreeMark;
            static __RACEFREE_PATH: ::std::sync::OnceLock<&'static str> = ::std::sync::OnceLock::new();
            __RACEFREE_PATH.get_or_init(|| {
                ::racefree::__private::function_name(::core::any::type_name::<__RacefreeMark>(), #text, "")
            })
        }
    }
}

fn name_fn(fn_name: TokenStream, name: &Ident, suffix: TokenStream) -> TokenStream {
    let text = name.to_string();
    quote! {
        fn #fn_name() -> &'static str {
            struct __RacefreeMark;
            ::racefree::__private::function_name(::core::any::type_name::<__RacefreeMark>(), #text, #suffix)
        }
    }
}

/// What the accessor's handle knows of the function's keys.
pub enum AccessorKey {
    /// The handle takes no keys (`#[idempotent]`'s): the accessor returns `&'static H`.
    None,
    /// The key type, read off the signature: the accessor returns `Keyed<H, K>`, whose lookups
    /// take a `K` (or `&str` for a text key) and reject any other type at compile time.
    Typed(TokenStream),
    /// A key type the macro cannot name: `Keyed<H, dyn Any>`, checked when a lookup runs.
    Unnamed,
}

impl AccessorKey {
    pub fn from(key: Option<TokenStream>) -> AccessorKey {
        key.map_or(AccessorKey::Unnamed, AccessorKey::Typed)
    }
}

/// The accessor each attribute emits for the function's own store, e.g. `fn load_cache()`:
/// the function's visibility (an associated fn inside an impl block), a `static` cell that
/// finds the store by the function's id, and a doc line saying what `what` one can do with it.
pub fn handle_accessor(
    item: &ItemFn,
    suffix: &str,
    what: &str,
    handle: TokenStream,
    cell: TokenStream,
    config: TokenStream,
    key: AccessorKey,
) -> TokenStream {
    let vis = &item.vis;
    let name = &item.sig.ident;
    let accessor = format_ident!("{}_{}", name, suffix);
    let doc = format!(" The {what} of [`{name}`].");
    let id_fn = id_fn(name);
    let key = match key {
        AccessorKey::None => None,
        AccessorKey::Typed(key) => Some(key),
        AccessorKey::Unnamed => Some(quote!(dyn ::core::any::Any)),
    };
    let (ret, wrap) = match key {
        None => (quote!(&'static #handle), quote!(__RACEFREE_CELL.handle())),
        Some(key) => (
            quote!(::racefree::Keyed<#handle, #key>),
            quote!(::racefree::Keyed::new(__RACEFREE_CELL.handle())),
        ),
    };
    quote! {
        #[doc = #doc]
        #[allow(dead_code)]
        #vis fn #accessor() -> #ret {
            #id_fn
            static __RACEFREE_CELL: #cell = #cell::with_id_fn(__racefree_id, #config);
            #wrap
        }
    }
}

/// Replaces the function's body with the generated `block`, keeping everything else as written.
pub fn replace_block(item: &mut ItemFn, block: TokenStream) {
    *item.block = syn::parse2(block).expect("generated block parses");
}

/// The user's body, to be run inside the generated code. `return` and `?` in it keep meaning
/// what they meant: they leave the body, not the generated wrapper.
pub struct Body {
    stmts: Vec<Stmt>,
    prelude: TokenStream,
    output: TokenStream,
    mode: Mode,
}

impl Body {
    pub fn of(item: &ItemFn) -> Body {
        let output = match &item.sig.output {
            ReturnType::Default => quote!(()),
            ReturnType::Type(_, ty) => erase_impl_trait(ty).to_token_stream(),
        };
        Body {
            stmts: item.block.stmts.clone(),
            prelude: TokenStream::new(),
            output,
            mode: Mode::of(&item.sig),
        }
    }

    /// Statements to run first inside the body's scope (e.g. binding a `Seq` parameter).
    pub fn with_prelude(mut self, prelude: TokenStream) -> Body {
        self.prelude = prelude;
        self
    }

    /// An expression that runs the body and evaluates to its return value.
    pub fn run(self) -> TokenStream {
        self.run_wrapped(|future| future)
    }

    /// Like [`run`](Body::run), but an async body's future is passed through `wrap` before it
    /// is awaited (e.g. to run it under a lock holder's identity).
    pub fn run_wrapped(self, wrap: impl FnOnce(TokenStream) -> TokenStream) -> TokenStream {
        let span = self.output.span();
        let mode = self.mode;
        let deferred = self.deferred();
        if mode.is_async() {
            let future = wrap(deferred);
            quote_spanned!(span=> #future.await)
        } else {
            // The closure is called where it is written on purpose (it gives `return` and `?` a
            // scope); the statement-level `allow` keeps clippy quiet in users' crates.
            quote_spanned! {span=>
                {
                    #[allow(clippy::redundant_closure_call)]
                    let __racefree_body_output = (#deferred)();
                    __racefree_body_output
                }
            }
        }
    }

    /// The body not yet run: a `move` closure returning the function's return type, or, for an
    /// async function, the `async move` block whose output it is.
    pub fn deferred(self) -> TokenStream {
        let Body {
            stmts,
            prelude,
            output,
            mode,
        } = self;
        let span = output.span();
        if mode.is_async() {
            // An async block has no return type annotation: this unreachable `return` pins it,
            // so `?` and `return` in the body infer as they did in the function.
            quote_spanned! {span=>
                async move {
                    #[allow(unreachable_code, clippy::diverging_sub_expression, clippy::needless_return, clippy::empty_loop)]
                    if false {
                        let __racefree_unreachable: #output = loop {};
                        return __racefree_unreachable;
                    }
                    #prelude
                    #(#stmts)*
                }
            }
        } else {
            quote_spanned! {span=>
                move || -> #output {
                    #prelude
                    #(#stmts)*
                }
            }
        }
    }
}
