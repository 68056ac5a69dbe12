//! What a failed statement means for the caller: nothing happened, or nobody knows.
//!
//! Every statement before `COMMIT` fails *safe*: the transaction is rolled back (by the driver
//! when the lease is dropped, by the server when the connection is gone), so the effect and the
//! claim or number vanish together and the error says nothing was consumed
//! ([`IdempotencyError::StoreUnavailable`], [`SequenceError::Store`]). Only a `COMMIT` whose answer
//! never arrived is *unknown* ([`IdempotencyError::OutcomeUnknown`],
//! [`SequenceError::CommitUnknown`]): the server may have committed just before the connection
//! broke. So is a commit that finds its transaction already ended
//! ([`Failure::TransactionEnded`]): what the body wrote after that was not the store's to
//! guard.

use crate::idempotent::IdempotencyError;
use crate::sequenced::SequenceError;

/// Why a statement failed, in the terms the stores answer with.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The pool gave no connection within its `acquire_timeout`.
    PoolExhausted(sqlx::Error),
    /// A lock wait ran out (`lock_timeout` on PostgreSQL, `busy_timeout` on SQLite).
    LockTimeout(sqlx::Error),
    /// The connection broke (server down, killed backend, network): the statement's answer was
    /// lost.
    ConnectionLost(sqlx::Error),
    /// The server answered with an error: the transaction is rolled back.
    Rejected(sqlx::Error),
    /// The commit found the transaction already ended, or its claim gone: the body sent its
    /// own `COMMIT` or `ROLLBACK` (or moved the transaction to other tables with `SET
    /// search_path`). Whatever it wrote is not guarded, and whether it committed is unknown.
    TransactionEnded(String),
}

/// Whether `error` is a commit's finding that the body ended the store's transaction
/// ([`Failure::TransactionEnded`]).
pub(crate) fn transaction_ended(error: &sqlx::Error) -> bool {
    let db = match error {
        sqlx::Error::Database(db) => db,
        // The outcome's write found no claim of this transaction (PostgreSQL, found after the
        // statements ran).
        sqlx::Error::Protocol(message) => return message.contains(super::dialect::NO_CLAIM),
        _ => return false,
    };
    let message = db.message();
    // PostgreSQL: `COMMIT AND CHAIN` or `RELEASE SAVEPOINT` outside a transaction (25P01),
    // `RELEASE` or `ROLLBACK TO` of a savepoint the transaction does not have (3B001: the body
    // ended the holding's and began another). SQLite: the claim's savepoint is gone;
    // `COMMIT` outside a transaction.
    matches!(db.code().as_deref(), Some("25P01" | "3B001")) && !from_sqlite(db.as_ref())
        || from_sqlite(db.as_ref())
            && (message.contains("no such savepoint")
                || message.contains("no transaction is active"))
}

/// What the caller is told when the body ended the store's transaction.
const ENDED: &str = "the store's transaction had ended before its commit: the body sent its \
                     own COMMIT or ROLLBACK on the connection (or moved the transaction to \
                     other tables with SET search_path), or the database rolled it back under \
                     the body (SQLite: an ON CONFLICT ROLLBACK constraint, RAISE(ROLLBACK), an \
                     I/O error); the body's writes were not guarded and may or may not have \
                     committed; a body must leave the transaction to the store";

impl Failure {
    pub(crate) fn of(error: sqlx::Error) -> Failure {
        if transaction_ended(&error) {
            return Failure::TransactionEnded(format!("{ENDED} ({error})"));
        }
        match &error {
            sqlx::Error::PoolTimedOut => Failure::PoolExhausted(error),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Failure::ConnectionLost(error),
            _ if sqlite_busy(&error) => Failure::LockTimeout(error),
            sqlx::Error::Database(db) if from_sqlite(db.as_ref()) => Failure::Rejected(error),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // lock_not_available: lock_timeout ran out.
                Some("55P03") => Failure::LockTimeout(error),
                // admin_shutdown (pg_terminate_backend), crash_shutdown, cannot_connect_now,
                // connection exceptions: the connection is gone with the answer.
                Some("57P01" | "57P02" | "57P03") => Failure::ConnectionLost(error),
                Some(code) if code.starts_with("08") => Failure::ConnectionLost(error),
                _ => Failure::Rejected(error),
            },
            _ => Failure::Rejected(error),
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::PoolExhausted(e) => {
                format!("no database connection within the pool's acquire_timeout ({e})")
            }
            Failure::LockTimeout(e) => format!("waiting for a database lock timed out ({e})"),
            Failure::ConnectionLost(e) => format!("database connection lost ({e})"),
            Failure::Rejected(e) => describe_rejected(e),
            Failure::TransactionEnded(reason) => reason.clone(),
        }
    }

    /// The body ended the store's transaction: found when a statement of the store's that
    /// must find its own row (the outcome's `UPDATE`, a first number's `set_next`) found none.
    pub(crate) fn ended() -> Failure {
        Failure::TransactionEnded(ENDED.to_owned())
    }

    /// For the end of an execution whose body ended the store's transaction, or else what
    /// `otherwise` makes of the failure.
    pub(crate) fn or_unknown(
        self,
        client_key: &str,
        otherwise: impl FnOnce(Failure) -> IdempotencyError,
    ) -> IdempotencyError {
        match self {
            Failure::TransactionEnded(reason) => IdempotencyError::OutcomeUnknown {
                key: client_key.to_owned(),
                reason,
            },
            other => otherwise(other),
        }
    }

    /// For a statement before `COMMIT`: nothing was consumed.
    pub(crate) fn unavailable(self) -> IdempotencyError {
        IdempotencyError::StoreUnavailable {
            reason: self.describe(),
        }
    }

    /// For the `COMMIT` of an execution.
    pub(crate) fn at_commit(self, client_key: &str) -> IdempotencyError {
        match self {
            Failure::ConnectionLost(_) | Failure::TransactionEnded(_) => {
                IdempotencyError::OutcomeUnknown {
                    key: client_key.to_owned(),
                    reason: self.describe(),
                }
            }
            // The server refused to commit (e.g. a serialization failure): rolled back.
            other => other.rolled_back(),
        }
    }

    /// For a `COMMIT` known not to have committed.
    pub(crate) fn rolled_back(self) -> IdempotencyError {
        IdempotencyError::StoreUnavailable {
            reason: format!("the transaction was rolled back: {}", self.describe()),
        }
    }

    /// For a statement of a sequence holding before `COMMIT`.
    pub(crate) fn sequence(self) -> SequenceError {
        match self {
            Failure::LockTimeout(_) => SequenceError::Timeout,
            Failure::TransactionEnded(_) => SequenceError::CommitUnknown(self.describe().into()),
            other => SequenceError::Store(other.describe().into()),
        }
    }

    /// For the `COMMIT` of a sequence holding.
    pub(crate) fn sequence_commit(self) -> SequenceError {
        match self {
            Failure::ConnectionLost(_) | Failure::TransactionEnded(_) => {
                SequenceError::CommitUnknown(self.describe().into())
            }
            other => SequenceError::Store(
                format!("the transaction was rolled back: {}", other.describe()).into(),
            ),
        }
    }
}

/// SQLite's `SQLITE_BUSY` / `SQLITE_LOCKED` or one of their extended codes (primary code in
/// the low byte): `busy_timeout` ran out before the lock was free.
pub(crate) fn sqlite_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) if from_sqlite(db.as_ref()) => db
            .code()
            .as_deref()
            .and_then(|code| code.parse::<u32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
        _ => false,
    }
}

#[cfg(feature = "sqlite")]
fn from_sqlite(error: &dyn sqlx::error::DatabaseError) -> bool {
    error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
}

#[cfg(not(feature = "sqlite"))]
fn from_sqlite(_: &dyn sqlx::error::DatabaseError) -> bool {
    false
}

/// `serialization_failure` (40001) or `deadlock_detected` (40P01): the transaction lost a
/// conflict, and running it again may succeed.
pub(crate) fn serialization_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001" | "40P01")),
        _ => false,
    }
}

fn describe_rejected(error: &sqlx::Error) -> String {
    match error {
        _ if serialization_failure(error) => {
            format!("serialization failure: retry the call ({error})")
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            format!("statement timeout ({error})")
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_commit_is_unknown_a_refused_one_is_not() {
        let lost = Failure::of(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(matches!(
            lost.at_commit("k"),
            IdempotencyError::OutcomeUnknown { .. }
        ));
        let exhausted = Failure::of(sqlx::Error::PoolTimedOut);
        assert!(matches!(
            exhausted.at_commit("k"),
            IdempotencyError::StoreUnavailable { .. }
        ));
        assert!(matches!(
            Failure::of(sqlx::Error::PoolTimedOut).sequence_commit(),
            SequenceError::Store(_)
        ));
    }
}
