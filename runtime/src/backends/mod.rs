//! Stores shared across processes, one folder per backend, one file per attribute inside.
//! Each implements the attribute rooms' traits (`IdempotencyBackend`, `SequenceBackend`,
//! `AsyncCacheStore`) and states in its module docs what survives a crash, a disconnect, a
//! restart and a failover.

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod sql;
