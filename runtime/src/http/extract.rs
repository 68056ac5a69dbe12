//! Reading the client's idempotency key: which header it comes in ([`KeyHeader`]), the key
//! itself ([`IdempotencyKey`]) and, with feature `axum`, the key bound to its caller
//! (`ScopedKey`).

use http::header::{HeaderMap, HeaderName};
use http::{Extensions, Request, StatusCode};

use super::Problem;

/// The request header carrying the client's idempotency key, unless a [`KeyHeader`] says
/// otherwise.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The longest key accepted, in bytes (Stripe's limit, and the one every store enforces).
pub const MAX_KEY_LEN: usize = crate::idempotent::call::MAX_KEY_BYTES;

/// Which request header carries the idempotency key: `Idempotency-Key` by default (the IETF
/// draft, Stripe), or any other (`X-Idempotency-Key` is common).
///
/// Hand it to [`ReplayLayer::key_header`](super::ReplayLayer::key_header) and the extractors
/// below the layer read that header, and only that one: a request sending the default header
/// instead carries no key. Without a `KeyHeader` they read `Idempotency-Key`.
///
/// The layer puts it in the request's extensions, where [`KeyHeader::of`] finds it. Why
/// extensions rather than axum state (`FromRef`): they need no bound on the state type, so
/// every existing `IdempotencyKey` and `ScopedKey<P>` extractor keeps compiling with any state,
/// `()` included; they reach a plain tower service the same way they reach axum, so one
/// mechanism serves both; and the layer that names the replay header names the key header
/// too, so the two are configured in one place. What that costs: a route the layer does not
/// wrap reads the default header. In axum, `Router::layer` wraps only the routes added
/// *before* it, so call it after the last `route`.
///
/// ```
/// use http::{HeaderMap, HeaderName, HeaderValue};
/// use racefree_runtime::http::KeyHeader;
///
/// const KEY_HEADER: KeyHeader = KeyHeader::new(HeaderName::from_static("x-idempotency-key"));
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-idempotency-key", HeaderValue::from_static("order-17"));
/// assert_eq!(KEY_HEADER.read(&headers).unwrap().as_deref(), Some("order-17"));
/// assert_eq!(KeyHeader::default().read(&headers).unwrap().as_deref(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHeader {
    name: HeaderName,
}

static DEFAULT_KEY_HEADER: KeyHeader = KeyHeader::new(IDEMPOTENCY_KEY);

impl KeyHeader {
    /// Keys come in the header `name`.
    pub const fn new(name: HeaderName) -> KeyHeader {
        KeyHeader { name }
    }

    /// The header keys come in.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The key header configured for a request: the [`KeyHeader`] in its `extensions` (put
    /// there by [`ReplayLayer::key_header`](super::ReplayLayer::key_header)), or the default.
    pub fn of(extensions: &Extensions) -> &KeyHeader {
        extensions.get::<KeyHeader>().unwrap_or(&DEFAULT_KEY_HEADER)
    }

    /// The key in `headers`, if they carry one. A value that is empty, longer than
    /// [`MAX_KEY_LEN`] bytes, not visible ASCII, or sent more than once (two keys: which one
    /// would the client retry with?) is a 400 problem naming the header.
    pub fn read(&self, headers: &HeaderMap) -> Result<IdempotencyKey, Problem> {
        let mut values = headers.get_all(&self.name).iter();
        let Some(value) = values.next() else {
            return Ok(IdempotencyKey(None));
        };
        let header = display_name(&self.name);
        let bad = |detail: String| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                format!("Invalid {header} header"),
                detail,
            )
        };
        if values.next().is_some() {
            return Err(bad(format!("the {header} header must be sent once")));
        }
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_KEY_LEN || !bytes.iter().all(u8::is_ascii_graphic)
        {
            return Err(bad(format!(
                "the {header} header must be 1 to {MAX_KEY_LEN} visible ASCII characters; it has {} bytes",
                bytes.len()
            )));
        }
        // Visible ASCII is UTF-8, so this cannot fail; no `unwrap` on client input all the same.
        let key = value
            .to_str()
            .map_err(|_| bad(format!("the {header} header must be visible ASCII")))?;
        Ok(IdempotencyKey(Some(key.to_owned())))
    }
}

impl Default for KeyHeader {
    /// `Idempotency-Key`.
    fn default() -> Self {
        DEFAULT_KEY_HEADER.clone()
    }
}

/// `x-idempotency-key` as people write it, `X-Idempotency-Key`, for messages (header names are
/// case-insensitive and `HeaderName` keeps them lowercase).
pub(crate) fn display_name(name: &HeaderName) -> String {
    let mut shown = String::with_capacity(name.as_str().len());
    let mut word_start = true;
    for c in name.as_str().chars() {
        shown.push(if word_start {
            c.to_ascii_uppercase()
        } else {
            c
        });
        word_start = c == '-';
    }
    shown
}

/// The request's idempotency key, if it has one, from the header its [`KeyHeader`] names
/// (`Idempotency-Key` by default).
///
/// A header that is empty, longer than [`MAX_KEY_LEN`] bytes or not visible ASCII is rejected
/// with a 400 problem response, so a key that reaches the function is always usable.
///
/// The key alone is global: every client that sends it shares its record. Bind it to the
/// caller with `ScopedKey` (feature `axum`) or `scope = <the caller>` on the attribute.
///
/// With feature `axum` it is an extractor; without, [`IdempotencyKey::of`] reads it:
///
/// ```
/// use racefree_runtime::http::IdempotencyKey;
///
/// let request = http::Request::post("/orders").header("idempotency-key", "order-17").body(()).unwrap();
/// assert_eq!(IdempotencyKey::of(&request).unwrap().as_deref(), Some("order-17"));
///
/// let request = http::Request::post("/orders").header("idempotency-key", "").body(()).unwrap();
/// assert_eq!(IdempotencyKey::of(&request).unwrap_err().status(), 400);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdempotencyKey(pub Option<String>);

impl IdempotencyKey {
    /// The key of `request`, read from the header the [`KeyHeader`] in its extensions names
    /// (the default, `Idempotency-Key`, when there is none); a malformed one is a 400 problem.
    pub fn of<B>(request: &Request<B>) -> Result<IdempotencyKey, Problem> {
        KeyHeader::of(request.extensions()).read(request.headers())
    }

    /// The key as `Option<&str>`, the form `#[idempotent(key = ...)]` takes.
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

#[cfg(feature = "axum")]
pub use self::axum_extractors::{ScopedKey, MAX_PRINCIPAL_LEN};

#[cfg(feature = "axum")]
mod axum_extractors {
    use axum::extract::FromRequestParts;
    use axum::http::request::Parts;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};

    use super::{IdempotencyKey, KeyHeader};
    use crate::http::Problem;

    impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
        type Rejection = Problem;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            KeyHeader::of(&parts.extensions).read(&parts.headers)
        }
    }

    /// The longest principal accepted by [`ScopedKey`], in bytes (as `P` displays it).
    pub const MAX_PRINCIPAL_LEN: usize = crate::idempotent::call::MAX_SCOPE_BYTES;

    /// The request's idempotency key (see [`IdempotencyKey`] for which header) bound to the
    /// caller who sent it: `P` is the application's own extractor for the authenticated user,
    /// account or tenant, and must `Display` as a stable name of it.
    ///
    /// Pass both to the attribute, `#[idempotent(key = key.as_deref(), scope = key.principal())]`:
    /// records are then per caller, so a key another caller picked (by accident, or because it
    /// showed up in a log) neither replays that caller's outcome nor answers 422. `P` runs first;
    /// its rejection (say, 401) is the response when it fails. A principal longer than
    /// [`MAX_PRINCIPAL_LEN`] bytes is a 400.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ScopedKey<P> {
        principal: P,
        key: Option<String>,
    }

    impl<P> ScopedKey<P> {
        /// The caller the key belongs to: the attribute's `scope`.
        pub fn principal(&self) -> &P {
            &self.principal
        }

        /// The key as `Option<&str>`, the form `#[idempotent(key = ...)]` takes.
        pub fn as_deref(&self) -> Option<&str> {
            self.key.as_deref()
        }

        /// The principal and the key.
        pub fn into_parts(self) -> (P, Option<String>) {
            (self.principal, self.key)
        }
    }

    impl<S, P> FromRequestParts<S> for ScopedKey<P>
    where
        S: Send + Sync,
        P: FromRequestParts<S> + std::fmt::Display + Send,
    {
        type Rejection = Response;

        async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
            let principal = P::from_request_parts(parts, state)
                .await
                .map_err(IntoResponse::into_response)?;
            let len = principal.to_string().len();
            if len > MAX_PRINCIPAL_LEN {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "Caller name too long",
                    format!(
                        "the caller is named in {len} bytes; at most {MAX_PRINCIPAL_LEN} are accepted"
                    ),
                )
                .into_response());
            }
            let IdempotencyKey(key) = KeyHeader::of(&parts.extensions)
                .read(&parts.headers)
                .map_err(IntoResponse::into_response)?;
            Ok(ScopedKey { principal, key })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_shown_as_people_write_them() {
        let shown = |name: &'static str| display_name(&HeaderName::from_static(name));
        assert_eq!(shown("x-idempotency-key"), "X-Idempotency-Key");
        assert_eq!(shown("idempotency-key"), "Idempotency-Key");
        assert_eq!(shown("x--key"), "X--Key");
    }

    #[test]
    fn a_key_sent_twice_is_refused_not_picked() {
        let mut headers = HeaderMap::new();
        headers.append(IDEMPOTENCY_KEY, "a".parse().unwrap());
        headers.append(IDEMPOTENCY_KEY, "b".parse().unwrap());
        let problem = KeyHeader::default().read(&headers).unwrap_err();
        assert_eq!(
            (problem.status(), problem.detail()),
            (
                StatusCode::BAD_REQUEST,
                "the Idempotency-Key header must be sent once"
            )
        );
    }
}
