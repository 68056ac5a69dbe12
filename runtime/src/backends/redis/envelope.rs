//! The versioned JSON envelope every record is stored in.
//!
//! `{"v":2,"state":"running","owner":"…","fp":"…"}` while an idempotent call runs,
//! `{"v":2,"state":"done","owner":"…","fp":"…","outcome":…}` once it completed,
//! `{"v":2,"state":"not_stored","owner":"…","fp":"…","reason":"…"}` once it completed with an
//! outcome that could not be stored, and `{"v":2,"value":…}` for a cached value. The Lua
//! scripts read `state` and `owner` with `cjson`; Rust reads the whole record with serde.
//!
//! # Compatibility
//! - **Older versions are read**: version 1 records (no `not_stored` state) decode as before.
//! - **Newer versions are read when they can be**: a record of a later version is decoded by
//!   the fields this build knows, and unknown fields are ignored, so a rollout that adds a
//!   field does not make live keys unusable. A later version whose record does not decode
//!   (e.g. a new state) is [`RedisStoreError::Undecodable`].
//! - **Undecodable is not unavailable**: a record that is not JSON, lacks a field, or holds an
//!   outcome that no longer deserializes into the function's type is reported as
//!   [`RedisStoreError::Undecodable`] (the attributes: `IdempotencyError::Undecodable`), never
//!   unwrapped and never treated as "no record", so it never leads to a second execution.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::RedisStoreError;

/// The envelope version this build writes. It reads this one, every earlier one, and later
/// ones as far as their fields are known.
pub const VERSION: u32 = 2;

/// Where an idempotency key stands, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IdemState {
    /// An owner holds the claim and runs the body.
    Running,
    /// The body succeeded; `outcome` is replayed to every later caller.
    Done {
        /// The serialized `Ok` value.
        outcome: serde_json::Value,
    },
    /// The body succeeded, but its outcome could not be stored (too large, not encodable):
    /// later callers get `OutcomeNotStored` and the body does not run again.
    NotStored {
        /// Why the outcome was not stored.
        reason: String,
    },
}

/// An idempotency record: who claimed the key, for which request, and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// Envelope version.
    pub v: u32,
    /// The owner token of the claim that wrote the record.
    pub owner: String,
    /// The request fingerprint the key was claimed with.
    pub fp: String,
    /// The claim's fencing token (the server's clock in µs when the claim was taken), as
    /// decimal digits: a string, because the Lua scripts' `cjson` would round a 16-digit number.
    /// Absent in version 1 records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<String>,
    /// Running or done.
    #[serde(flatten)]
    pub state: IdemState,
}

#[derive(Serialize, Deserialize)]
struct CacheRecord<T> {
    v: u32,
    value: T,
}

impl IdemRecord {
    /// A fresh claim's record.
    pub fn running(owner: &str, fp: &str) -> Self {
        IdemRecord {
            v: VERSION,
            owner: owner.to_owned(),
            fp: fp.to_owned(),
            fence: None,
            state: IdemState::Running,
        }
    }

    /// The completed record.
    pub fn done(owner: &str, fp: &str, outcome: serde_json::Value) -> Self {
        IdemRecord {
            v: VERSION,
            owner: owner.to_owned(),
            fp: fp.to_owned(),
            fence: None,
            state: IdemState::Done { outcome },
        }
    }

    /// The record of a body that finished with an outcome that cannot be stored.
    pub fn not_stored(owner: &str, fp: &str, reason: impl Into<String>) -> Self {
        IdemRecord {
            v: VERSION,
            owner: owner.to_owned(),
            fp: fp.to_owned(),
            fence: None,
            state: IdemState::NotStored {
                reason: reason.into(),
            },
        }
    }

    /// The same record carrying the fencing token `fence`.
    pub fn with_fence(mut self, fence: impl Into<String>) -> Self {
        self.fence = Some(fence.into());
        self
    }

    /// The fencing token, if the record carries one.
    pub fn fence(&self) -> Option<u64> {
        self.fence.as_deref().and_then(|f| f.parse().ok())
    }

    /// The JSON text stored in Redis.
    pub fn encode(&self) -> Result<String, RedisStoreError> {
        serde_json::to_string(self).map_err(|e| RedisStoreError::Serialize {
            reason: e.to_string(),
        })
    }

    /// Reads a stored record; anything else is [`RedisStoreError::Undecodable`].
    pub fn decode(key: &str, raw: &[u8]) -> Result<Self, RedisStoreError> {
        check_version(key, raw)?;
        serde_json::from_slice(raw).map_err(|e| undecodable(key, e))
    }
}

/// The outcome of a completed record, as the function's type.
pub fn decode_outcome<T: DeserializeOwned>(
    key: &str,
    outcome: serde_json::Value,
) -> Result<T, RedisStoreError> {
    serde_json::from_value(outcome).map_err(|e| undecodable(key, e))
}

/// The JSON text of a cached value.
pub fn encode_value<T: Serialize>(value: &T) -> Result<String, RedisStoreError> {
    serde_json::to_string(&CacheRecord { v: VERSION, value }).map_err(|e| {
        RedisStoreError::Serialize {
            reason: e.to_string(),
        }
    })
}

/// Reads a cached value; anything else is [`RedisStoreError::Undecodable`].
pub fn decode_value<T: DeserializeOwned>(key: &str, raw: &[u8]) -> Result<T, RedisStoreError> {
    check_version(key, raw)?;
    serde_json::from_slice::<CacheRecord<T>>(raw)
        .map(|r| r.value)
        .map_err(|e| undecodable(key, e))
}

fn check_version(key: &str, raw: &[u8]) -> Result<(), RedisStoreError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let Version { v } = serde_json::from_slice(raw).map_err(|e| undecodable(key, e))?;
    if v >= 1 {
        Ok(())
    } else {
        Err(RedisStoreError::Undecodable {
            key: key.to_owned(),
            reason: format!("envelope version {v}: versions start at 1"),
        })
    }
}

fn undecodable(key: &str, err: impl std::fmt::Display) -> RedisStoreError {
    RedisStoreError::Undecodable {
        key: key.to_owned(),
        reason: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let rec = IdemRecord::done("t", "fp", serde_json::json!({"id": 7}));
        let text = rec.encode().unwrap();
        assert!(text.starts_with(r#"{"v":2,"#), "{text}");
        assert_eq!(IdemRecord::decode("k", text.as_bytes()).unwrap(), rec);
        let value = encode_value(&vec![1, 2]).unwrap();
        assert_eq!(
            decode_value::<Vec<i32>>("k", value.as_bytes()).unwrap(),
            [1, 2]
        );
    }

    #[test]
    fn older_and_newer_envelopes_are_read() {
        let v1 = br#"{"v":1,"state":"done","owner":"t","fp":"fp","outcome":7}"#;
        let rec = IdemRecord::decode("k", v1).unwrap();
        assert_eq!(rec.state, IdemState::Done { outcome: 7.into() });
        let v3 = br#"{"v":3,"state":"running","owner":"t","fp":"fp","lease_ms":10,"extra":{}}"#;
        assert_eq!(
            IdemRecord::decode("k", v3).unwrap().state,
            IdemState::Running
        );
        assert_eq!(decode_value::<u8>("k", br#"{"v":1,"value":5}"#).unwrap(), 5);
        assert_eq!(
            decode_value::<u8>("k", br#"{"v":9,"value":5,"generation":3}"#).unwrap(),
            5
        );
        let future_state = br#"{"v":3,"state":"archived","owner":"t","fp":"fp"}"#;
        assert!(matches!(
            IdemRecord::decode("k", future_state),
            Err(RedisStoreError::Undecodable { .. })
        ));
    }

    #[test]
    fn foreign_data_is_a_typed_error() {
        for raw in [&b"garbage"[..], br#"{"v":0,"value":1}"#, br#"{"v":1}"#] {
            assert!(matches!(
                decode_value::<i32>("k", raw),
                Err(RedisStoreError::Undecodable { .. })
            ));
            assert!(matches!(
                IdemRecord::decode("k", raw),
                Err(RedisStoreError::Undecodable { .. })
            ));
        }
    }
}
