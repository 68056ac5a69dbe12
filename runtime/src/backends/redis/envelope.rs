//! The versioned JSON envelope every record is stored in.
//!
//! `{"v":1,"state":"running","owner":"…","fp":"…"}` while an idempotent call runs,
//! `{"v":1,"state":"done","owner":"…","fp":"…","outcome":…}` once it completed, and
//! `{"v":1,"value":…}` for a cached value. The Lua scripts read `state` and `owner` with
//! `cjson`; Rust reads the whole record with serde. A record of another version, or one that is
//! not JSON at all, is reported as [`RedisStoreError::Undecodable`], never unwrapped.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::RedisStoreError;

/// The envelope version this build writes and reads.
pub const VERSION: u32 = 1;

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
            state: IdemState::Running,
        }
    }

    /// The completed record.
    pub fn done(owner: &str, fp: &str, outcome: serde_json::Value) -> Self {
        IdemRecord {
            v: VERSION,
            owner: owner.to_owned(),
            fp: fp.to_owned(),
            state: IdemState::Done { outcome },
        }
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
    if v == VERSION {
        Ok(())
    } else {
        Err(RedisStoreError::Undecodable {
            key: key.to_owned(),
            reason: format!("envelope version {v}, this build reads version {VERSION}"),
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
        assert!(text.starts_with(r#"{"v":1,"#), "{text}");
        assert_eq!(IdemRecord::decode("k", text.as_bytes()).unwrap(), rec);
        let value = encode_value(&vec![1, 2]).unwrap();
        assert_eq!(
            decode_value::<Vec<i32>>("k", value.as_bytes()).unwrap(),
            [1, 2]
        );
    }

    #[test]
    fn foreign_data_is_a_typed_error() {
        for raw in [&b"garbage"[..], br#"{"v":2,"value":1}"#, br#"{"v":1}"#] {
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
