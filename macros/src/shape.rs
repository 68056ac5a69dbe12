//! What the expansions need to know about the annotated function's signature: its named
//! arguments and how its return value is read. Pure syntax: nothing here reports an error or
//! writes code.

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::visit_mut::VisitMut;
use syn::{FnArg, Ident, ItemFn, Pat, PatType, ReturnType, Type};

/// A named argument of the annotated function.
#[derive(Clone)]
pub struct Param {
    pub ident: Ident,
    pub ty: Type,
    /// `name: Type` as written, for errors about the whole argument.
    pub arg: PatType,
}

/// The annotated function's arguments and return value.
pub struct FnShape {
    pub params: Vec<Param>,
    /// Arguments whose pattern is not a plain name: fine unless a default key needs them.
    pub unnamed: Vec<PatType>,
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
    /// The return type as written (`()` for none).
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
            let FnArg::Typed(typed) = input else { continue };
            match &*typed.pat {
                Pat::Ident(pat) if pat.subpat.is_none() => params.push(Param {
                    ident: pat.ident.clone(),
                    ty: (*typed.ty).clone(),
                    arg: typed.clone(),
                }),
                _ => unnamed.push(typed.clone()),
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
}

/// By the last path segment, so `io::Result<T>` counts as a `Result`.
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

/// `true` for `&T` (not `&mut T`).
pub fn is_shared_ref(ty: &Type) -> bool {
    matches!(ty, Type::Reference(r) if r.mutability.is_none())
}

/// The type with every `impl Trait` in it replaced by `_`, for the places generated code writes
/// the return type of a local (`let output: R`, a closure's `-> R`): `impl Trait` is only
/// allowed in the signature itself (async-trait's `replace_impl_trait_with_infer`,
/// tracing's `erase_impl_trait`).
pub fn erase_impl_trait(ty: &Type) -> Type {
    struct Erase;
    impl VisitMut for Erase {
        fn visit_type_mut(&mut self, ty: &mut Type) {
            if let Type::ImplTrait(impl_trait) = ty {
                *ty = Type::Infer(syn::TypeInfer {
                    underscore_token: syn::Token![_](syn::spanned::Spanned::span(impl_trait)),
                });
            } else {
                syn::visit_mut::visit_type_mut(self, ty);
            }
        }
    }
    let mut ty = ty.clone();
    Erase.visit_type_mut(&mut ty);
    ty
}

/// The key type one argument of type `ty` becomes once owned (`&str` → `String`, `&[T]` →
/// `Vec<T>`, `&Id` → `Id`, `u64` → `u64`), as a type the function's accessor can name in its return type; `None`
/// where it cannot: a lifetime or a reference inside, `impl Trait`, `_`, or a generic function
/// (its key type differs per instantiation).
pub fn owned_key_type(ty: &Type, item: &ItemFn) -> Option<TokenStream> {
    if !item.sig.generics.params.is_empty() {
        return None;
    }
    // Spelled out rather than as `<T as ToOwned>::Owned`, which would add a second error at
    // the attribute when the argument cannot be a key (the key check already names it).
    let (inner, owned) = match ty {
        Type::Reference(r) if r.mutability.is_none() => {
            let owned = match &*r.elem {
                Type::Path(path) if path.qself.is_none() && path.path.is_ident("str") => {
                    quote::quote!(::std::string::String)
                }
                Type::Slice(slice) => {
                    let elem = &slice.elem;
                    quote::quote!(::std::vec::Vec<#elem>)
                }
                // `Path`, `OsStr`, a trait object: owned as something the syntax does not say.
                Type::Path(path) if is_unsized_std(path) => return None,
                Type::TraitObject(_) => return None,
                inner => inner.to_token_stream(),
            };
            (&*r.elem, owned)
        }
        // A `&mut T` stays a reference here, which `nameable` refuses.
        _ => (ty, ty.to_token_stream()),
    };
    nameable(inner).then_some(owned)
}

/// `Path`, `OsStr`, `CStr`: unsized, owned as another type.
fn is_unsized_std(path: &syn::TypePath) -> bool {
    path.path.segments.last().is_some_and(|last| {
        ["Path", "OsStr", "CStr"]
            .iter()
            .any(|name| last.ident == name)
    })
}

/// `true` for a type that means the same in a `fn() -> ...` return type with no generics:
/// nothing borrowed, nothing inferred.
pub fn nameable(ty: &Type) -> bool {
    struct Check(bool);
    impl<'ast> syn::visit::Visit<'ast> for Check {
        fn visit_type(&mut self, ty: &'ast Type) {
            match ty {
                Type::Reference(_)
                | Type::ImplTrait(_)
                | Type::Infer(_)
                | Type::Macro(_)
                | Type::Verbatim(_) => self.0 = false,
                _ => syn::visit::visit_type(self, ty),
            }
        }
        fn visit_lifetime(&mut self, _: &'ast syn::Lifetime) {
            self.0 = false;
        }
    }
    let mut check = Check(true);
    syn::visit::Visit::visit_type(&mut check, ty);
    check.0
}
