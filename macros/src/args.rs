//! The argument grammar shared by `#[cached]`, `#[idempotent]` and `#[sequenced]`.
//!
//! ```text
//! args  := (arg ("," arg)*)? ","?
//! arg   := name "=" expr          key = id, ttl = "5m", capacity = 10_000, store = self.rows, ...
//!        | "skip" "(" ident,* ")"
//!        | name                   a flag: require_key, store_errors
//! ```
//! Parsing only records what was written, with spans; which argument belongs to which
//! attribute, and what its value must look like, is checked in `validate.rs`.

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Token};

/// One argument as written.
pub struct Arg {
    pub name: Ident,
    pub value: Value,
}

pub enum Value {
    /// `name = expr`
    Expr(Expr),
    /// `skip(a, b)`
    Idents(Vec<Ident>),
    /// `name`
    Flag,
}

impl Arg {
    /// The tokens an error about this argument should point at.
    pub fn span(&self) -> Span {
        match &self.value {
            Value::Expr(expr) => self
                .name
                .span()
                .join(expr.span())
                .unwrap_or(self.name.span()),
            _ => self.name.span(),
        }
    }
}

pub struct Args(pub Vec<Arg>);

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let args = Punctuated::<Arg, Token![,]>::parse_terminated(input)?;
        Ok(Args(args.into_iter().collect()))
    }
}

impl Parse for Arg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let name: Ident = input.call(syn::ext::IdentExt::parse_any).map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected an argument such as `key = ...`, `ttl = \"5m\"` or `skip(db)`",
            )
        })?;
        let lookahead = input.lookahead1();
        let value = if lookahead.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Value::Expr(input.parse()?)
        } else if lookahead.peek(syn::token::Paren) {
            let content;
            syn::parenthesized!(content in input);
            let idents = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
            Value::Idents(idents.into_iter().collect())
        } else if input.is_empty() || input.peek(Token![,]) {
            Value::Flag
        } else {
            return Err(lookahead.error());
        };
        Ok(Arg { name, value })
    }
}
