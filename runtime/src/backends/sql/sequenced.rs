//! `#[sequenced]` on a SQL store: the number commits in the same transaction as the effect.
//!
//! # Protocol
//! 1. **in-process turn**: callers of one key in this process queue FIFO on a
//!    [`KeyedLocks`](crate::KeyedLocks) entry (so only the head holds a pooled connection, and
//!    a body re-entering its own key fails with `Reentrant` instead of deadlocking);
//! 2. **acquire**: open the transaction (`BEGIN`, on a connection sqlx counts outside any
//!    transaction, and on PostgreSQL in the same round trip a savepoint the commit releases
//!    first; in the caller's transaction, a savepoint of it),
//!    bound lock waits by the call's deadline (`lock_timeout`; on SQLite `busy_timeout`
//!    bounds the wait for the write lock, which the upsert takes), and
//!    `INSERT … ON CONFLICT (name, key) DO UPDATE SET next = next + 1, holdings = holdings + 1
//!    RETURNING` the counter row. The row lock this takes *is* the key's lock across processes
//!    and machines: the next holder's upsert waits until this transaction ends. The returned
//!    number (`NULL` for a key never committed: the attribute then uses its `start`) is the
//!    call's `Seq`. Under `REPEATABLE READ` or `SERIALIZABLE` an upsert that waited for
//!    another holding fails with a serialization failure before anything ran: the store's own
//!    transaction then starts again, up to 64 times (`SERIALIZATION_RETRIES`).
//! 3. **body**: writes its effect on the lease's connection ([`Tx`]).
//! 4. **commit**: the counter already says `number + 1` (or is set to it, for a key's first
//!    number), so `COMMIT` makes the effect and the consumed number visible at once
//!    ([`Dialect::commit_holding`]: it first releases the savepoint the holding opened, which
//!    fails if the body ended the transaction or went on after a failed statement, since a
//!    `COMMIT` would otherwise only warn, or roll back without an error. A body that broke
//!    the rule gets an error, not `Ok`; a first number's `UPDATE` checks the bump's mark, so
//!    it cannot touch a counter outside the holding).
//! 5. **failure** (`Err`, panic, dropped future, crash, killed connection): the transaction
//!    rolls back, undoing the bump with the effect. The next holder gets the same number.
//!
//! So numbers are unique (one row lock), gap-free (a number is consumed only by a commit that
//! also commits the effect), and in commit order; a `UNIQUE(key, number)` constraint in the
//! user's table never fires. Round trips: `BEGIN`, upsert, … , `COMMIT` (3 + the body's; on
//! PostgreSQL the savepoint travels with `BEGIN`, and its `RELEASE` with `COMMIT AND CHAIN`,
//! whose empty transaction sqlx's `ROLLBACK` ends with its next ping);
//! a key's first number adds one `UPDATE`. A deadline bounds the lock waits with
//! `SET LOCAL lock_timeout`, sent with `BEGIN` (in the caller's transaction: one
//! `set_config('lock_timeout', …, true)` more).
//!
//! **In the caller's transaction** ([`InCallerTx::sequence`]): the same steps in a savepoint;
//! "commit" releases the savepoint, and the number is consumed only when the caller's own
//! `COMMIT` commits it together with the caller's effect. The counter row stays locked until
//! then, so the next caller of the key (in any process) waits for that `COMMIT` or rollback:
//! numbers stay unique, gap-free and in commit order. Such a call takes no turn in the store's
//! in-process queue: the row lock outlives the call, and a turn held by a caller waiting on
//! that lock could block the lock's owner from its own next call, a deadlock the database
//! could not see.
//!
//! The fence ([`Seq::fence`](crate::Seq::fence)) is the count of committed holdings of the key;
//! a holding that rolled back shares its fence with the next one, which is harmless here: a
//! rolled-back holding's writes were in the same transaction and never happened.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::dialect::{acquire_clean, Bumped, Dialect};
use super::error::{serialization_failure, Failure};
use super::transaction::{Owned, StoreTx};
use super::{InCallerTx, InTransaction, SqlStore, Tx};
use crate::sequenced::{SequenceBackend, SequenceError, SequenceLease};
use crate::sync::keyed_locks::{Holder, KeyGuard, KeyedLocks};

/// One family of sequences of a [`SqlStore`]: `(name, key)` rows of its sequences table. The
/// attribute passes only the key, so the store needs the family's name:
/// `#[sequenced(key = customer, store = state.db.sequence("invoice_no"))]`. Keys are stored as
/// their JSON encoding (`"acme"`, `42`, `["eu",7]`).
pub struct SqlSequence<'s, D: Dialect> {
    store: &'s SqlStore<D>,
    name: Cow<'s, str>,
    /// In the caller's transaction ([`InCallerTx::sequence`]): its connection, taken by the
    /// one call this serves, and that call's own turn (see the module doc).
    caller: Option<CallerTx<'s, D>>,
}

/// The caller's transaction a [`SqlSequence`] serves one call in.
struct CallerTx<'s, D: Dialect> {
    connection: Mutex<Option<&'s mut D::Connection>>,
    /// The call's own turn: the store's queue would be wrong here (see the module doc).
    turns: KeyedLocks<String>,
}

impl<D: Dialect> SqlStore<D> {
    /// The sequences named `name` (a stable name: it is stored in every counter row).
    pub fn sequence<'s>(&'s self, name: impl Into<Cow<'s, str>>) -> SqlSequence<'s, D> {
        SqlSequence {
            store: self,
            name: name.into(),
            caller: None,
        }
    }
}

impl<'c, D: Dialect> InCallerTx<'c, D> {
    /// The sequences named `name`, inside the caller's transaction (the caller commits): the
    /// call takes its number in a savepoint, and the number is consumed by the caller's
    /// `COMMIT`, together with the caller's own writes; a rollback (or a dropped transaction)
    /// leaves it to the next call. Concurrent callers of the key wait for that `COMMIT` or
    /// rollback. Serves one call, like [`SqlStore::within`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "postgres")]
    /// # async fn demo(db: &racefree_runtime::sql::PgStore, pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;                 // the handler's own transaction
    /// // #[sequenced(key = customer, store = db.within(&mut tx).sequence("invoice_no"))]
    /// let invoices = db.within(&mut tx).sequence("invoice_no");
    /// # drop(invoices);
    /// tx.commit().await?;                                // the number commits with the rest
    /// # Ok(()) }
    /// ```
    pub fn sequence(self, name: impl Into<Cow<'c, str>>) -> SqlSequence<'c, D> {
        SqlSequence {
            store: self.store,
            name: name.into(),
            caller: Some(CallerTx {
                connection: self.connection,
                turns: KeyedLocks::new(),
            }),
        }
    }
}

impl<'s, D: Dialect> SqlSequence<'s, D> {
    fn key_text<K: Serialize>(key: &K) -> Result<String, SequenceError> {
        serde_json::to_string(key)
            .map_err(|e| SequenceError::Store(format!("sequence key does not encode: {e}").into()))
    }

    /// The number the key's next successful call gets, `None` for a key never committed.
    pub async fn next<K: Serialize>(&self, key: &K) -> Result<Option<u64>, SequenceError> {
        let key = Self::key_text(key)?;
        let (pool, tables) = self.pool_tables()?;
        let next = D::read_next(pool, tables, &self.name, &key)
            .await
            .map_err(|e| Failure::of(e).sequence())?;
        Ok(next.map(|n| n as u64))
    }

    fn pool_tables(&self) -> Result<(&'s sqlx::Pool<D>, &'s super::Tables), SequenceError> {
        self.store
            .store_pool()
            .map_err(|e| SequenceError::Store(e.to_string().into()))
    }

    async fn acquire_key<K: Serialize>(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> Result<SqlSequenceLease<'_, D>, SequenceError> {
        let key = Self::key_text(&key)?;
        let (pool, tables) = self.pool_tables()?;
        let locks = match &self.caller {
            Some(caller) => &caller.turns,
            None => self.store.sequence_locks(),
        };
        let turn = locks
            .lock_async(format!("{}\u{0}{key}", self.name), deadline)
            .await?;
        let mut retries = 0;
        let (tx, bumped) = loop {
            let (tx, bumped) = self.bump_in_new_tx(pool, tables, &key, deadline).await?;
            match bumped {
                Ok(bumped) => break (tx, bumped),
                // A serialization failure at the bump (`REPEATABLE READ`, `SERIALIZABLE`: the
                // holder this caller waited for committed after its snapshot): nothing ran,
                // and a new transaction sees that commit. Only the store's own transaction
                // can start again; in the caller's, the caller's snapshot stays.
                Err(error)
                    if matches!(tx, StoreTx::Own(_))
                        && serialization_failure(&error)
                        && retries < SERIALIZATION_RETRIES =>
                {
                    retries += 1;
                    tracing::debug!(
                        target: "racefree",
                        sequence = %self.name,
                        retries,
                        "serialization failure at the bump; taking the number in a new transaction"
                    );
                    drop(tx);
                }
                Err(error) => {
                    return Err(match Failure::of(error).sequence() {
                        SequenceError::Store(reason) if retries > 0 => SequenceError::Store(
                            format!("{reason}; after {retries} new transactions").into(),
                        ),
                        other => other,
                    })
                }
            }
        };
        let Bumped {
            next,
            holdings,
            row,
        } = bumped;
        Ok(SqlSequenceLease {
            tx,
            store: self.store,
            name: self.name.clone().into_owned(),
            key,
            next: next.map(|n| n as u64),
            fence: holdings as u64,
            row,
            turn,
        })
    }

    /// A transaction (the store's own, or a savepoint of the caller's), its lock waits bounded
    /// by `deadline`, and the key's bump in it: the bump's error is left to the caller, which
    /// may start again.
    async fn bump_in_new_tx(
        &self,
        pool: &'s sqlx::Pool<D>,
        tables: &super::Tables,
        key: &str,
        deadline: Option<Instant>,
    ) -> Result<(StoreTx<'s, D>, Result<Bumped, sqlx::Error>), SequenceError> {
        // What is left of the call's deadline, once a connection is in hand.
        let lock_wait = || match deadline {
            None => Ok(None),
            Some(deadline) => deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .map(Some)
                .ok_or(SequenceError::Timeout),
        };
        let mut tx = match &self.caller {
            None => {
                let connection = acquire_clean(pool)
                    .await
                    .map_err(|e| Failure::of(e).sequence())?;
                Owned::begin_holding(connection, lock_wait()?)
                    .await
                    .map(StoreTx::Own)
                    .map_err(|e| Failure::of(e).sequence())?
            }
            Some(caller) => {
                let connection = caller
                    .connection
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take()
                    .ok_or_else(|| SequenceError::Store("this in-transaction sequence served its call already: make one per call (SqlStore::within)".into()))?;
                // A savepoint: the bump and the body's writes roll back alone, the caller commits.
                let mut tx = sqlx::Connection::begin(connection)
                    .await
                    .map(StoreTx::Savepoint)
                    .map_err(|e| Failure::of(e).sequence())?;
                if let Some(wait) = lock_wait()? {
                    D::limit_lock_wait(&mut tx, wait)
                        .await
                        .map_err(|e| Failure::of(e).sequence())?;
                }
                tx
            }
        };
        let bumped = D::bump(&mut tx, tables, &self.name, key).await;
        Ok((tx, bumped))
    }
}

/// New transactions a caller's bump is retried in after serialization failures, each after
/// waiting for a holder that committed: one waiter wins each commit, so this bounds a caller
/// that keeps losing (its last failure is then its error).
const SERIALIZATION_RETRIES: usize = 64;

impl<D: Dialect> std::fmt::Debug for SqlSequence<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSequence")
            .field("database", &<D as sqlx::Database>::NAME)
            .field("name", &self.name)
            .finish()
    }
}

impl<'s, D: Dialect, K: Serialize + Send> SequenceBackend<K> for SqlSequence<'s, D> {
    type Lease<'a>
        = SqlSequenceLease<'a, D>
    where
        Self: 'a;

    fn acquire_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Self::Lease<'_>, SequenceError>> + Send {
        self.acquire_key(key, deadline)
    }
}

/// A held key of a [`SqlSequence`]: the open transaction that locked the key's counter row.
/// Committing writes the number and commits the body's effect with it; dropping rolls both
/// back and lets the next caller have the key.
pub struct SqlSequenceLease<'s, D: Dialect> {
    // Declared before `turn`: the transaction is rolled back before this process's next
    // caller of the key goes ahead.
    tx: StoreTx<'s, D>,
    store: &'s SqlStore<D>,
    name: String,
    key: String,
    next: Option<u64>,
    fence: u64,
    /// The counter row, as the bump named it ([`Bumped::row`]).
    row: Option<String>,
    turn: KeyGuard<'s, String>,
}

impl<D: Dialect> SqlSequenceLease<'_, D> {
    /// The transaction's connection, for the body's statements.
    pub fn connection(&mut self) -> &mut D::Connection {
        &mut self.tx
    }

    /// The transaction as a [`Tx`].
    pub fn tx(&mut self) -> Tx<'_, D> {
        Tx::of(self)
    }
}

impl<D: Dialect> InTransaction<D> for SqlSequenceLease<'_, D> {
    fn connection(&mut self) -> &mut D::Connection {
        &mut self.tx
    }
}

impl<D: Dialect> std::fmt::Debug for SqlSequenceLease<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSequenceLease")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("next", &self.next)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> SequenceLease for SqlSequenceLease<'_, D> {
    const STORE: &'static str = D::STORE_NAME;

    fn holder(&self) -> Holder {
        self.turn.holder()
    }

    fn fence(&self) -> u64 {
        self.fence
    }

    fn next_async(&mut self) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send {
        std::future::ready(Ok(self.next))
    }

    async fn commit_async(self, used: u64) -> Result<(), SequenceError> {
        let SqlSequenceLease {
            mut tx,
            store,
            name,
            key,
            next,
            row,
            turn,
            ..
        } = self;
        // The upsert already moved the counter to `next + 1`.
        if next != Some(used) {
            let after = used
                .checked_add(1)
                .and_then(|n| i64::try_from(n).ok())
                .ok_or(SequenceError::Exhausted)?;
            let (_, tables) = store
                .store_pool()
                .map_err(|e| SequenceError::Store(e.to_string().into()))?;
            // Where the counter still says what the bump left (`next + 1`, or nothing).
            let bumped = next.and_then(|n| i64::try_from(n).ok()?.checked_add(1));
            let set = D::set_next(
                &mut tx,
                tables,
                &name,
                &key,
                bumped,
                Some(after),
                row.as_deref(),
            )
            .await
            .map_err(|e| Failure::of(e).sequence())?;
            if set == 0 {
                tx.ended();
                return Err(Failure::ended().sequence_commit());
            }
        }
        let committed = match tx {
            // `COMMIT`, checked: the body may have ended the transaction
            // ([`Dialect::commit_holding`]).
            StoreTx::Own(tx) => tx
                .commit_holding()
                .await
                .map_err(|e| Failure::of(e).sequence_commit()),
            // Releasing a savepoint: a lost answer is no worse, the caller's COMMIT decides
            // (unless the body ended the caller's transaction).
            tx @ StoreTx::Savepoint(_) => tx.commit().await.map_err(|e| Failure::of(e).sequence()),
        };
        drop(turn);
        committed
    }
}
