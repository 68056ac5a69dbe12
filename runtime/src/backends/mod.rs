//! Stores shared across processes, one folder per backend, one file per attribute inside.
//! Each implements the attribute rooms' traits (`IdempotencyBackend`, `SequenceBackend`,
//! `AsyncCacheStore`) and states in its module docs what survives a crash, a disconnect, a
//! restart and a failover.

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod sql;

/// Why an outcome (or a cached value) whose JSON does not decode back into its own type is
/// not stored: every replay (or hit) of it would fail (`Undecodable`), so the call that
/// produced it says so instead.
/// serde_json writes a NaN or an infinite float as `null`, for one; a type whose `Serialize`
/// and `Deserialize` disagree (a skipped field without a default) is another.
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
pub(crate) fn not_replayable(error: &dyn std::fmt::Display) -> String {
    format!(
        "its JSON does not decode back into its type ({error}), so no replay or cache hit \
         could return it (serde_json writes a NaN or infinite float as null, for one)"
    )
}
