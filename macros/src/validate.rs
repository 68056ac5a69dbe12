//! What the three attributes' validation shares: turning raw arguments into known, unique,
//! typed values (`Duration`, `usize`, a choice) and checking the arguments `skip(...)` and a
//! default key refer to. Every mistake becomes a `syn::Error` spanned on the offending tokens,
//! saying what to write instead. Nothing here writes code: each attribute's `validate` returns
//! a plan of plain data, and its `generate` step alone calls `quote!`.

use std::time::Duration;

use proc_macro2::Span;
use syn::{Expr, Ident, ItemFn, Lit, Type};

use crate::args::{Arg, Args, Value};
use crate::shape::{contains_impl_trait, FnShape, Param};

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
                ("shared", Kind::Flag, "shared"),
                ("no_accessor", Kind::Flag, "no_accessor"),
                ("refresh", Kind::Value, "refresh = \"30s\""),
                ("stale_on_error", Kind::Value, "stale_on_error = \"10m\""),
                ("share_errors", Kind::Flag, "share_errors"),
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
                ("no_accessor", Kind::Flag, "no_accessor"),
            ],
            Attr::Sequenced => &[
                ("key", Kind::Value, "key = <expression over the arguments>"),
                ("start", Kind::Value, "start = <expression>"),
                ("timeout", Kind::Value, "timeout = \"5s\""),
                ("store", Kind::Value, "store = <expression>"),
                ("no_accessor", Kind::Flag, "no_accessor"),
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

    /// `name = <expr>` as written, left in place (to point an error at it later).
    pub fn peek_expr(&self, name: &str) -> Option<&Expr> {
        match &self.args.iter().find(|a| a.name == name)?.value {
            Value::Expr(expr) => Some(expr),
            _ => None,
        }
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

    /// `name = "<one of choices>"`, as the value paired with the chosen text.
    pub fn choice<T: Copy>(&mut self, name: &str, choices: &[(&str, T)]) -> syn::Result<Option<T>> {
        let Some(expr) = self.expr(name) else {
            return Ok(None);
        };
        let text = string_literal(&expr);
        match choices.iter().find(|(c, _)| Some(*c) == text.as_deref()) {
            Some(&(_, value)) => Ok(Some(value)),
            None => {
                let listed = choices
                    .iter()
                    .map(|(c, _)| format!("`{name} = \"{c}\"`"))
                    .collect::<Vec<_>>()
                    .join(" or ");
                Err(syn::Error::new_spanned(&expr, format!("write {listed}")))
            }
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

/// Signature forms no attribute can wrap.
pub fn check_signature(attr: Attr, item: &ItemFn, errors: &mut Errors) {
    if let Some(constness) = &item.sig.constness {
        errors.push(syn::Error::new_spanned(
            constness,
            format!(
                "#[{}] cannot go on a `const fn`: its calls go through a store at run time; remove `const`",
                attr.name()
            ),
        ));
    }
}

/// Checks that every name in `skip(...)` is an argument.
pub fn check_skip(shape: &FnShape, skip: &[Ident], errors: &mut Errors) {
    for name in skip {
        if name == "self" {
            errors.push(syn::Error::new(
                name.span(),
                "`self` is never part of the key; remove it from skip(...)",
            ));
        } else if shape.param(name).is_none() {
            let names = shape
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

/// The arguments a default key or fingerprint is built from: every named one not in `skip`.
/// `impl Trait` and `&mut` arguments cannot be owned into a key, so each is an error naming
/// `skip(...)`.
pub fn owned_arguments(
    shape: &FnShape,
    skip: &[Ident],
    what: &str,
    errors: &mut Errors,
) -> Vec<Param> {
    let mut kept = Vec::new();
    for param in shape.params.iter().filter(|p| !skip.contains(&p.ident)) {
        let ident = &param.ident;
        if contains_impl_trait(&param.ty) {
            errors.push(syn::Error::new_spanned(
                &param.arg,
                format!("an `impl Trait` argument cannot be part of the default {what}: add `{ident}` to skip(...) or write `key = ...`"),
            ));
        } else if matches!(&param.ty, Type::Reference(r) if r.mutability.is_some()) {
            errors.push(syn::Error::new_spanned(
                &param.arg,
                format!("a `&mut` argument cannot be part of the {what}: add `{ident}` to skip(...) or write `key = ...`"),
            ));
        } else {
            kept.push(param.clone());
        }
    }
    kept
}
