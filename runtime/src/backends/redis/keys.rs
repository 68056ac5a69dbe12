//! Redis key layout: one logical key → one hash tag → one cluster slot.
//!
//! A logical key is (function, scope, key). Every Redis key the store uses for it (the
//! idempotency record, the sequence lock and counter, the cache value and its fill lock) is
//! `rf:{<tag>}:<kind>`, with the same `<tag>`, so multi-key scripts touch one slot and work on
//! Redis Cluster. The tag is readable when the parts are short printable ASCII; otherwise (long,
//! binary, or containing the separator or braces) the part is replaced by a 128-bit hash, so a
//! key can never escape its tag or collide with another layout.

use std::fmt;

use xxhash_rust::xxh3::xxh3_128;

/// Parts longer than this are hashed, keeping Redis keys short whatever the caller passes.
const MAX_PLAIN_PART: usize = 100;

/// The hash-tagged name of one logical key.
///
/// ```
/// use racefree_runtime::redis::RedisKey;
///
/// let key = RedisKey::new("billing::charge", Some("tenant-7"), "order-42");
/// assert_eq!(key.redis_key("idem"), "rf:{billing::charge|=tenant-7|order-42}:idem");
/// // binary or long keys are hashed, inside the same tag
/// let long = RedisKey::new("f", None, vec![0u8; 1000]);
/// assert!(long.redis_key("idem").len() < 80);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RedisKey {
    tag: String,
}

impl RedisKey {
    /// The key of `key` used by `function`, within `scope` (e.g. a tenant id).
    pub fn new(function: &str, scope: Option<&str>, key: impl AsRef<[u8]>) -> Self {
        let mut tag = String::with_capacity(64);
        push_part(&mut tag, function.as_bytes());
        tag.push('|');
        match scope {
            // '=' marks a present scope, so no scope and `Some("-")` stay distinct.
            None => tag.push('-'),
            Some(scope) => {
                tag.push('=');
                push_part(&mut tag, scope.as_bytes());
            }
        }
        tag.push('|');
        push_part(&mut tag, key.as_ref());
        RedisKey { tag }
    }

    /// The key of an `#[idempotent]` record: its [`RecordKey`](crate::idempotent::RecordKey)
    /// already names function, scope and client key unambiguously.
    pub fn from_record(key: &crate::idempotent::RecordKey) -> Self {
        let mut tag = String::with_capacity(key.as_str().len() + 1);
        tag.push('@');
        push_part(&mut tag, key.as_str().as_bytes());
        RedisKey { tag }
    }

    /// The Redis key for one `kind` of record of this logical key.
    pub fn redis_key(&self, kind: &str) -> String {
        format!("rf:{{{}}}:{kind}", self.tag)
    }

    /// The hash tag shared by all Redis keys of this logical key.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl fmt::Debug for RedisKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisKey({{{}}})", self.tag)
    }
}

fn is_plain(part: &[u8]) -> bool {
    part.len() <= MAX_PLAIN_PART
        && part.first() != Some(&b'#')
        && part
            .iter()
            .all(|&b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}' | b'|' | b'='))
}

fn push_part(tag: &mut String, part: &[u8]) {
    if is_plain(part) {
        // Checked above: printable ASCII, so this is valid UTF-8.
        tag.push_str(std::str::from_utf8(part).unwrap_or_default());
    } else {
        tag.push('#');
        tag.push_str(&format!("{:032x}", xxh3_128(part)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cannot_be_confused() {
        let a = RedisKey::new("f", Some("a|b"), "c");
        let b = RedisKey::new("f", Some("a"), "b|c");
        assert_ne!(a, b);
        assert_ne!(
            RedisKey::new("f", None, "k"),
            RedisKey::new("f", Some("-"), "k")
        );
        assert_ne!(RedisKey::new("f", None, "k"), RedisKey::new("g", None, "k"));
    }

    #[test]
    fn braces_never_escape_the_tag() {
        let key = RedisKey::new("f", None, "}x{");
        let redis = key.redis_key("idem");
        assert_eq!(redis.matches('{').count(), 1);
        assert_eq!(redis.matches('}').count(), 1);
    }
}
