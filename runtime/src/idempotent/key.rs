//! The store key of one `#[idempotent]` record, and what `key = <expr>` may evaluate to.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt::{self, Display, Write as _};

/// The store key of one record: function, scope and the client's key, encoded so that no two
/// different triples give the same text (`function#<scope length>:<scope>#key`, or
/// `function##key` without a scope). Stable across builds (no line numbers), so a shared store
/// can use it as is.
///
/// ```
/// use racefree_runtime::idempotent::RecordKey;
///
/// let key = RecordKey::new("billing::charge", Some(&"tenant-1"), "order-17");
/// assert_eq!(key.as_str(), "billing::charge#8:tenant-1#order-17");
/// assert_eq!(key.client_key(), "order-17");
/// assert_eq!(RecordKey::new("billing::charge", None, "k").as_str(), "billing::charge##k");
/// ```
#[derive(PartialEq, Eq, Hash)]
pub struct RecordKey {
    text: String,
    client_key_at: usize,
}

thread_local! {
    // The buffer of the last record key dropped on this thread, for the next one built here:
    // in the steady state a call's record key costs no allocation (it lives for one call).
    static SPARE: Cell<String> = const { Cell::new(String::new()) };
}

/// The longest buffer kept for reuse: a record key is at most a path and 2 × 255 bytes.
const SPARE_MAX: usize = 1024;

impl RecordKey {
    /// The key of `client_key` for `function` (a build-stable path), in `scope` if given.
    #[inline]
    pub fn new(function: &str, scope: Option<&dyn Display>, client_key: &str) -> RecordKey {
        let mut text = SPARE.with(Cell::take);
        text.clear();
        text.reserve(function.len() + client_key.len() + 2);
        text.push_str(function);
        text.push('#');
        if let Some(scope) = scope {
            let scope = scope.to_string();
            let _ = write!(text, "{}:{scope}", scope.len());
        }
        text.push('#');
        let client_key_at = text.len();
        text.push_str(client_key);
        RecordKey {
            text,
            client_key_at,
        }
    }

    /// The whole encoded key.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key the client sent, as errors report it.
    pub fn client_key(&self) -> &str {
        &self.text[self.client_key_at..]
    }
}

impl Clone for RecordKey {
    fn clone(&self) -> Self {
        RecordKey {
            text: self.text.clone(),
            client_key_at: self.client_key_at,
        }
    }
}

impl Drop for RecordKey {
    #[inline]
    fn drop(&mut self) {
        let text = std::mem::take(&mut self.text);
        if text.capacity() <= SPARE_MAX {
            // `try_with`: during the thread's teardown the buffer is simply freed.
            let _ = SPARE.try_with(|spare| {
                let previous = spare.replace(text);
                if previous.capacity() > 0 {
                    spare.set(previous);
                }
            });
        }
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// What `key = <expr>` may evaluate to: `&str`, `String`, `&String`, `Cow<str>`, or an `Option`
/// of them (`None`: the call has no key and runs without idempotency).
///
/// ```
/// use racefree_runtime::idempotent::IntoIdempotencyKey;
///
/// let header: Option<String> = Some("k-1".to_owned());
/// assert_eq!(header.as_deref().into_idempotency_key().as_deref(), Some("k-1"));
/// assert_eq!(None::<&str>.into_idempotency_key(), None);
/// ```
#[diagnostic::on_unimplemented(
    message = "`key = ...` must evaluate to `&str`, `String` or an `Option` of them, not `{Self}`",
    label = "not an idempotency key",
    note = "an idempotency key is text the client sends; for a number write e.g. `key = order_id.to_string()`"
)]
pub trait IntoIdempotencyKey<'a> {
    /// The key, if the call has one.
    fn into_idempotency_key(self) -> Option<Cow<'a, str>>;
}

impl<'a> IntoIdempotencyKey<'a> for &'a str {
    fn into_idempotency_key(self) -> Option<Cow<'a, str>> {
        Some(Cow::Borrowed(self))
    }
}

impl<'a> IntoIdempotencyKey<'a> for &'a String {
    fn into_idempotency_key(self) -> Option<Cow<'a, str>> {
        Some(Cow::Borrowed(self))
    }
}

impl<'a> IntoIdempotencyKey<'a> for String {
    fn into_idempotency_key(self) -> Option<Cow<'a, str>> {
        Some(Cow::Owned(self))
    }
}

impl<'a> IntoIdempotencyKey<'a> for Cow<'a, str> {
    fn into_idempotency_key(self) -> Option<Cow<'a, str>> {
        Some(self)
    }
}

impl<'a, K: IntoIdempotencyKey<'a>> IntoIdempotencyKey<'a> for Option<K> {
    fn into_idempotency_key(self) -> Option<Cow<'a, str>> {
        self.and_then(IntoIdempotencyKey::into_idempotency_key)
    }
}

impl<'a> IntoIdempotencyKey<'a> for &'a Option<String> {
    fn into_idempotency_key(self) -> Option<Cow<'a, str>> {
        self.as_deref().map(Cow::Borrowed)
    }
}
