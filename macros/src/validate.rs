//! Turns raw arguments and the annotated function into checked pieces: every mistake becomes
//! a `syn::Error` spanned on the offending tokens, saying what to write instead.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{Expr, FnArg, Ident, ItemFn, Lit, Pat, ReturnType, Type};

use crate::args::{Arg, Args, Value};

/// Which attribute is being expanded, and what it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    Cached,
    Idempotent,
    Sequenced,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    List,
    Flag,
}

impl Attr {
    pub fn name(self) -> &'static str {
        match self {
            Attr::Cached => "cached",
            Attr::Idempotent => "idempotent",
            Attr::Sequenced => "sequenced",
        }
    }

    fn accepts(self) -> &'static [(&'static str, Kind, &'static str)] {
        match self {
            Attr::Cached => &[
                ("key", Kind::Value, "key = <expression over the arguments>"),
                ("ttl", Kind::Value, "ttl = \"5m\""),
                ("capacity", Kind::Value, "capacity = 10_000"),
                ("skip", Kind::List, "skip(arg, ...)"),
                (
                    "store",
                    Kind::Value,
                    "store = <expression of type &racefree::Cache<K, V>>",
                ),
            ],
            Attr::Idempotent => &[
                (
                    "key",
                    Kind::Value,
                    "key = <expression: &str, String or an Option of them>",
                ),
                ("ttl", Kind::Value, "ttl = \"24h\""),
                ("fingerprint", Kind::Value, "fingerprint = <expression>"),
                ("skip", Kind::List, "skip(arg, ...)"),
                (
                    "in_flight",
                    Kind::Value,
                    "in_flight = \"wait\" or in_flight = \"reject\"",
                ),
                ("require_key", Kind::Flag, "require_key"),
                ("store_errors", Kind::Flag, "store_errors"),
                ("scope", Kind::Value, "scope = <expression>"),
                ("capacity", Kind::Value, "capacity = 100_000"),
                ("store", Kind::Value, "store = <expression>"),
            ],
            Attr::Sequenced => &[
                ("key", Kind::Value, "key = <expression over the arguments>"),
                ("start", Kind::Value, "start = <expression>"),
                ("timeout", Kind::Value, "timeout = \"5s\""),
                ("store", Kind::Value, "store = <expression>"),
            ],
        }
    }
}

/// The arguments of one attribute, known and unique, to be taken one by one.
pub struct Named {
    args: Vec<Arg>,
}

impl Named {
    /// Rejects unknown and duplicate arguments and values of the wrong form.
    pub fn check(attr: Attr, args: Args) -> syn::Result<Named> {
        let mut errors = Errors::default();
        let mut kept: Vec<Arg> = Vec::new();
        let accepts = attr.accepts();
        for arg in args.0 {
            let name = arg.name.to_string();
            let Some(&(_, kind, example)) = accepts.iter().find(|(n, _, _)| *n == name) else {
                let list = accepts
                    .iter()
                    .map(|(n, _, _)| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.push(syn::Error::new(
                    arg.name.span(),
                    format!(
                        "unknown argument `{name}` for #[{}]; expected one of: {list}",
                        attr.name()
                    ),
                ));
                continue;
            };
            if kept.iter().any(|k| k.name == arg.name) {
                errors.push(syn::Error::new(
                    arg.span(),
                    format!("duplicate argument `{name}`: give it once"),
                ));
                continue;
            }
            let form_ok = matches!(
                (&arg.value, kind),
                (Value::Expr(_), Kind::Value)
                    | (Value::Idents(_), Kind::List)
                    | (Value::Flag, Kind::Flag)
            );
            if !form_ok {
                errors.push(syn::Error::new(arg.span(), format!("write `{example}`")));
                continue;
            }
            kept.push(arg);
        }
        errors.finish()?;
        Ok(Named { args: kept })
    }

    fn take(&mut self, name: &str) -> Option<Arg> {
        let at = self.args.iter().position(|a| a.name == name)?;
        Some(self.args.remove(at))
    }

    /// `name = <expr>`.
    pub fn expr(&mut self, name: &str) -> Option<Expr> {
        match self.take(name)?.value {
            Value::Expr(expr) => Some(expr),
            _ => None,
        }
    }

    /// `name` as a bare flag.
    pub fn flag(&mut self, name: &str) -> Option<Span> {
        self.take(name).map(|a| a.name.span())
    }

    /// `skip(a, b)`.
    pub fn idents(&mut self, name: &str) -> Vec<Ident> {
        match self.take(name).map(|a| a.value) {
            Some(Value::Idents(idents)) => idents,
            _ => Vec::new(),
        }
    }

    /// `name = "<humantime duration>"`, parsed now, so a typo is a compile error.
    pub fn duration(&mut self, name: &str) -> syn::Result<Option<Duration>> {
        let Some(expr) = self.expr(name) else {
            return Ok(None);
        };
        let text = string_literal(&expr).ok_or_else(|| {
            syn::Error::new_spanned(
                &expr,
                format!(
                    "`{name}` takes a duration in a string, e.g. `{name} = \"5m\"` or `\"1h 30m\"`"
                ),
            )
        })?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            syn::Error::new_spanned(
                &expr,
                format!("`{name} = \"{text}\"` is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\", \"24h\""),
            )
        })?;
        if duration.is_zero() {
            return Err(syn::Error::new_spanned(
                &expr,
                format!("`{name}` must be longer than zero"),
            ));
        }
        Ok(Some(duration))
    }

    /// `name = <positive integer literal>`.
    pub fn positive_int(&mut self, name: &str) -> syn::Result<Option<usize>> {
        let Some(expr) = self.expr(name) else {
            return Ok(None);
        };
        let Expr::Lit(syn::ExprLit {
            lit: Lit::Int(int), ..
        }) = &expr
        else {
            return Err(syn::Error::new_spanned(
                &expr,
                format!("`{name}` takes an integer literal, e.g. `{name} = 10_000`"),
            ));
        };
        match int.base10_parse::<usize>() {
            Ok(0) => Err(syn::Error::new_spanned(&expr, format!("`{name} = 0` would keep nothing; give at least 1, or leave `{name}` out for no bound"))),
            Ok(n) => Ok(Some(n)),
            Err(e) => Err(syn::Error::new_spanned(&expr, format!("`{name}`: {e}"))),
        }
    }

    /// `name = "one of choices"`.
    pub fn choice(&mut self, name: &str, choices: &[&str]) -> syn::Result<Option<(String, Span)>> {
        let Some(expr) = self.expr(name) else {
            return Ok(None);
        };
        let listed = choices
            .iter()
            .map(|c| format!("`{name} = \"{c}\"`"))
            .collect::<Vec<_>>()
            .join(" or ");
        match string_literal(&expr) {
            Some(text) if choices.contains(&text.as_str()) => Ok(Some((text, expr.span()))),
            _ => Err(syn::Error::new_spanned(&expr, format!("write {listed}"))),
        }
    }
}

fn string_literal(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => Some(s.value()),
        _ => None,
    }
}

/// Collects several errors into one `compile_error!` group.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn keep<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// A named argument of the annotated function.
pub struct Param {
    pub ident: Ident,
    pub ty: Type,
    pub whole: TokenStream,
}

/// What the expansion needs to know about the annotated function.
pub struct FnShape {
    pub params: Vec<Param>,
    /// Arguments whose pattern is not a plain name: fine unless a default key needs them.
    pub unnamed: Vec<TokenStream>,
    pub output: Output,
}

/// How the return value is read: which outcomes count as success.
pub enum Output {
    /// `Result<T, E>` (also `io::Result<T>` and other aliases named `Result`): `Ok` succeeds.
    Result(Type),
    /// `Option<T>`: `Some` succeeds.
    Option(Type),
    /// Anything else: every return succeeds.
    Plain(Type),
}

impl Output {
    pub fn ty(&self) -> &Type {
        match self {
            Output::Result(t) | Output::Option(t) | Output::Plain(t) => t,
        }
    }
}

impl FnShape {
    pub fn of(item: &ItemFn) -> FnShape {
        let mut params = Vec::new();
        let mut unnamed = Vec::new();
        for input in &item.sig.inputs {
            match input {
                FnArg::Receiver(_) => {}
                FnArg::Typed(typed) => match &*typed.pat {
                    Pat::Ident(pat) if pat.subpat.is_none() => params.push(Param {
                        ident: pat.ident.clone(),
                        ty: (*typed.ty).clone(),
                        whole: typed.to_token_stream(),
                    }),
                    _ => unnamed.push(typed.to_token_stream()),
                },
            }
        }
        let output = match &item.sig.output {
            ReturnType::Default => Output::Plain(syn::parse_quote!(())),
            ReturnType::Type(_, ty) => classify(ty),
        };
        FnShape {
            params,
            unnamed,
            output,
        }
    }

    pub fn param(&self, ident: &Ident) -> Option<&Param> {
        self.params.iter().find(|p| p.ident == *ident)
    }

    /// Checks that every name in `skip(...)` is an argument.
    pub fn check_skip(&self, skip: &[Ident], errors: &mut Errors) {
        for name in skip {
            if name == "self" {
                errors.push(syn::Error::new(
                    name.span(),
                    "`self` is never part of the key; remove it from skip(...)",
                ));
            } else if self.param(name).is_none() {
                let names = self
                    .params
                    .iter()
                    .map(|p| format!("`{}`", p.ident))
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.push(syn::Error::new(
                    name.span(),
                    format!("`{name}` is not an argument of this function; skip(...) takes argument names: {names}"),
                ));
            }
        }
    }
}

fn classify(ty: &Type) -> Output {
    let last = match ty {
        Type::Path(path) if path.qself.is_none() => path.path.segments.last(),
        _ => None,
    };
    match last {
        Some(seg) if seg.ident == "Result" => Output::Result(ty.clone()),
        Some(seg) if seg.ident == "Option" => Output::Option(ty.clone()),
        _ => Output::Plain(ty.clone()),
    }
}

/// `true` if the type mentions `impl Trait` anywhere.
pub fn contains_impl_trait(ty: &Type) -> bool {
    fn mentions_impl(tokens: TokenStream) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Ident(i) => i == "impl",
            proc_macro2::TokenTree::Group(g) => mentions_impl(g.stream()),
            _ => false,
        })
    }
    mentions_impl(ty.to_token_stream())
}

/// An owned copy of the arguments not skipped, as the default key or fingerprint: one argument
/// is itself, several are a tuple, none is `()`. `&T` becomes `T::Owned` (`&str` → `String`).
pub fn owned_arguments<'a>(
    params: impl IntoIterator<Item = &'a Param>,
    what: &str,
    errors: &mut Errors,
) -> TokenStream {
    let mut parts = Vec::new();
    for param in params {
        let ident = &param.ident;
        if contains_impl_trait(&param.ty) {
            errors.push(syn::Error::new_spanned(
                &param.whole,
                format!("an `impl Trait` argument cannot be part of the default {what}: add `{ident}` to skip(...) or write `key = ...`"),
            ));
            continue;
        }
        match &param.ty {
            Type::Reference(r) if r.mutability.is_some() => errors.push(syn::Error::new_spanned(
                &param.whole,
                format!("a `&mut` argument cannot be part of the {what}: add `{ident}` to skip(...) or write `key = ...`"),
            )),
            Type::Reference(_) => parts.push(quote::quote_spanned!(param.ty.span()=> ::std::borrow::ToOwned::to_owned(#ident))),
            _ => parts.push(quote::quote_spanned!(param.ty.span()=> ::core::clone::Clone::clone(&#ident))),
        }
    }
    match parts.as_slice() {
        [one] => one.clone(),
        _ => quote::quote!((#(#parts,)*)),
    }
}
