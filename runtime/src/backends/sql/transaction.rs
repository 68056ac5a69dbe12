//! The transaction an idempotent call or a sequenced holding runs in: one the store opened on a
//! pooled connection ([`StoreTx::Own`]), or a savepoint of the caller's ([`StoreTx::Savepoint`]).
//!
//! The store's own transactions save two round trips on a first execution on PostgreSQL by
//! sending, in one simple query, what sqlx would send as two statements:
//! - `BEGIN` and the claim's insert; the claim is answered by whether that insert failed
//!   ([`Dialect::claim_on_begin`]), since `BEGIN` returns no rows through sqlx;
//! - the outcome's write and `COMMIT` ([`Dialect::commit_with_outcome`]), chained to an
//!   empty transaction (`COMMIT AND CHAIN`; SQLite's `COMMIT; BEGIN`), so the `ROLLBACK`
//!   sqlx queues when the transaction is dropped has something to end (it travels with the ping sqlx sends when the connection goes back
//!   to the pool, and warns about nothing).
//!
//! A simple query takes no parameters: the statements are prepared once per connection
//! (SQL `PREPARE`) and executed by name with their values written in (dollar-quoted, or in
//! hex). A session that has the claim's statement has the outcome's (both prepared in one
//! transaction, so in one server session even behind a pooler, under names from one hash),
//! unless someone deallocated it by hand: then the commit fails before `COMMIT` (rolled back),
//! and the connection is closed, so the next claim prepares both again. Statements after
//! `COMMIT` are counted: an error after `COMMIT` completed is still a commit (and the
//! connection is closed).
//!
//! sqlx's [`TransactionManager`] keeps its transaction depth right throughout, so a body
//! that opens a transaction on the connection gets a savepoint, as with [`sqlx::Transaction`].
//! A future dropped while `BEGIN` is on the wire cannot know whether the server began: the
//! connection is then closed instead of going back to the pool (the server rolls back).

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Transaction, TransactionManager};

use super::dialect::{Committed, Dialect};
use super::schema::Tables;

/// What opening a transaction with the claim's insert came to.
pub(crate) enum Began<D: Dialect> {
    /// The insert went in: the key is this transaction's.
    Claimed(Owned<D>),
    /// The insert was refused (a record, or another claim, holds the key): the connection,
    /// for the claim that reads why ([`Owned::begin_again`], which rolls the refused insert
    /// back in the same round trip).
    Refused(Owned<D>),
}

/// A transaction opened on a pooled connection by the store.
pub(crate) struct Owned<D: Dialect> {
    connection: PoolConnection<D>,
    state: State,
    /// [`commit_with_outcome`](Self::commit_with_outcome) can run in this transaction: the
    /// claim that ran in it found its statement in this session, and the outcome's is
    /// prepared with it ([`Dialect::prepare`]); or the database prepares nothing by name.
    one_trip_commit: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// A `BEGIN` (or the `ROLLBACK` of a refused one) is on the wire: whether a transaction is
    /// open is unknown until it answers.
    Unknown,
    /// Open, and known to sqlx's transaction manager (depth 1).
    Open,
    /// Ended, nothing to roll back.
    Ended,
    /// The server is in a transaction sqlx does not count (a `BEGIN` whose claim was
    /// refused): [`Owned::begin_again`] ends it; dropped before that, the connection closes.
    Refused,
}

impl<D: Dialect> Owned<D> {
    /// `BEGIN` on a connection from `pool` that sqlx counts outside any transaction
    /// ([`acquire_clean`](super::dialect::acquire_clean)).
    pub(crate) async fn begin_from(pool: &sqlx::Pool<D>) -> Result<Self, sqlx::Error> {
        Self::begin(super::dialect::acquire_clean(pool).await?).await
    }

    /// A `#[sequenced]` holding's `BEGIN` on `connection` (checked out as
    /// [`begin_from`](Self::begin_from) does), its lock waits bounded by `lock_wait`
    /// ([`Dialect::holding_begin`]).
    pub(crate) async fn begin_holding(
        connection: PoolConnection<D>,
        lock_wait: Option<Duration>,
    ) -> Result<Self, sqlx::Error> {
        let mut tx = Self::idle(connection);
        match D::holding_begin(lock_wait) {
            Some(statement) => tx.begin_with(Some(Cow::Owned(statement))).await?,
            None => {
                tx.begin_with(None).await?;
                if let Some(wait) = lock_wait {
                    D::limit_lock_wait(&mut tx, wait).await?;
                }
            }
        }
        Ok(tx)
    }

    /// The dialect's writing `BEGIN` ([`Dialect::BEGIN`]: SQLite's `BEGIN IMMEDIATE`, which
    /// takes the write lock at once) on a connection from `pool`, checked out as
    /// [`begin_from`](Self::begin_from) does. sqlx's own `begin_with` leaves the transaction
    /// open on the pooled connection when it is dropped between its two steps (the `BEGIN`
    /// answered, its check not yet): here the connection is closed instead. A `BEGIN` that
    /// waited out `busy_timeout` began nothing (sqlx counted nothing either): that connection
    /// goes back to the pool.
    #[cfg(feature = "sqlite")]
    pub(crate) async fn begin_writing_from(pool: &sqlx::Pool<D>) -> Result<Self, sqlx::Error> {
        let mut tx = Self::idle(super::dialect::acquire_clean(pool).await?);
        if let Err(error) = tx.begin_with(D::BEGIN.map(Cow::Borrowed)).await {
            if super::error::sqlite_busy(&error) {
                tx.state = State::Ended;
            }
            return Err(error);
        }
        Ok(tx)
    }

    /// `connection`, outside any transaction, before one of the `begin`s.
    fn idle(connection: PoolConnection<D>) -> Self {
        Owned {
            connection,
            state: State::Ended,
            one_trip_commit: false,
        }
    }

    /// `BEGIN` on `connection`, as `Pool::begin` sends it.
    pub(crate) async fn begin(connection: PoolConnection<D>) -> Result<Self, sqlx::Error> {
        let mut tx = Self::idle(connection);
        tx.begin_with(None).await?;
        Ok(tx)
    }

    /// A writing transaction again, on a connection whose claim was refused
    /// ([`Began::Refused`]): the refused transaction's `ROLLBACK` and the new `BEGIN` go in
    /// one round trip.
    ///
    /// It keeps [`one_trip_commit`](Self::one_trip_commit) false: a new transaction may run in
    /// another server session (a pooler in transaction mode), and only a claim sent with
    /// `BEGIN` shows that the session has the statements the one-trip commit executes.
    pub(crate) async fn begin_again(&mut self) -> Result<(), sqlx::Error> {
        let begin = D::BEGIN.unwrap_or("BEGIN");
        let statement = match self.state {
            State::Refused => Cow::Owned(format!("ROLLBACK; {begin}")),
            _ => Cow::Borrowed(begin),
        };
        self.state = State::Ended;
        self.begin_with(Some(statement)).await
    }

    async fn begin_with(
        &mut self,
        statement: Option<Cow<'static, str>>,
    ) -> Result<(), sqlx::Error> {
        debug_assert!(self.state == State::Ended);
        self.state = State::Unknown;
        D::TransactionManager::begin(&mut self.connection, statement).await?;
        self.state = State::Open;
        Ok(())
    }

    /// A writing transaction and `insert` (the claim's insert, which fails if the key is
    /// taken, [`Dialect::claim_on_begin`]) in one round trip. A refused insert is left for
    /// [`begin_again`](Self::begin_again) to roll back. On a connection that has not prepared
    /// the statements `insert` executes, they are prepared and it is sent again.
    pub(crate) async fn begin_claiming(
        connection: PoolConnection<D>,
        tables: &Tables,
        insert: &str,
    ) -> Result<Began<D>, sqlx::Error> {
        let mut tx = Self::idle(connection);
        let statement = format!("{}; {insert}", D::BEGIN.unwrap_or("BEGIN"));
        let mut prepared = false;
        loop {
            let error = match tx.begin_with(Some(statement.clone().into())).await {
                Ok(()) => {
                    tx.one_trip_commit = true;
                    return Ok(Began::Claimed(tx));
                }
                Err(error) => error,
            };
            let refused = D::refused_claim(&error);
            let unprepared = D::unprepared(&error);
            if !refused && !unprepared {
                return Err(error);
            }
            // The server began, then failed the insert (its transaction is aborted), and sqlx
            // counted no transaction: `begin_again` ends a refused one, this `ROLLBACK` one
            // that lacked its statements.
            tx.state = State::Refused;
            if refused {
                return Ok(Began::Refused(tx));
            }
            D::execute_raw(&mut tx.connection, "ROLLBACK").await?;
            tx.state = State::Ended;
            if prepared {
                // Prepared, and still not there: a pooler that runs each transaction in
                // another session. The claim that reads why works anywhere.
                return Ok(Began::Refused(tx));
            }
            D::prepare(&mut tx.connection, tables).await?;
            prepared = true;
        }
    }

    /// Whether [`commit_with_outcome`](Self::commit_with_outcome) can run in this
    /// transaction; otherwise the outcome is written as its own statement before `COMMIT`.
    pub(crate) fn one_trip_commit(&self) -> bool {
        self.one_trip_commit
    }

    /// The outcome's write and `COMMIT` in one round trip
    /// ([`Dialect::commit_with_outcome`]). Any error means nothing committed, except a lost
    /// connection: then nobody knows.
    pub(crate) async fn commit_with_outcome(
        mut self,
        tables: &Tables,
        key: &str,
        whole: Option<&str>,
        outcome: &str,
        ttl: Duration,
    ) -> Result<(), sqlx::Error> {
        // Dropped meanwhile, the statements may have stopped anywhere (SQLite's thread stops
        // between them): the connection is then closed, never reused in a state sqlx does
        // not count.
        self.state = State::Unknown;
        let committed =
            D::commit_with_outcome(&mut self.connection, tables, key, whole, outcome, ttl).await;
        self.settle(committed)
    }

    /// A `#[sequenced]` holding's `COMMIT` ([`Dialect::commit_holding`]), kept in step with
    /// the connection's state as [`commit_with_outcome`](Self::commit_with_outcome) keeps it:
    /// dropped meanwhile, after a commit whose statements stopped part way, or when the body
    /// had ended the transaction, the connection is closed, never reused.
    pub(crate) async fn commit_holding(mut self) -> Result<(), sqlx::Error> {
        self.state = State::Unknown;
        let committed = D::commit_holding(&mut self.connection).await;
        self.settle(committed)
    }

    /// The state a one-trip commit leaves the connection in, from what it came to.
    fn settle(&mut self, committed: Result<Committed, sqlx::Error>) -> Result<(), sqlx::Error> {
        match committed {
            // Dropping `self` (`Open` for sqlx) queues the `ROLLBACK` of the empty `BEGIN`.
            Ok(Committed::Clean) => {
                self.state = State::Open;
                Ok(())
            }
            Ok(Committed::Unclean) => Ok(()),
            // The session lost the outcome's statement (deallocated by hand): rolled back, and
            // the connection is not reused, so the next claim prepares both again.
            Err(error) if D::unprepared(&error) => Err(error),
            // The body ended the transaction (or moved it to other tables): the session is in
            // a state nobody counted, so the connection is not reused.
            Err(error) if super::error::transaction_ended(&error) => Err(error),
            // The server refused before `COMMIT` completed: the transaction is still open (or
            // aborted), as sqlx counts it, and the queued `ROLLBACK` ends it.
            Err(error @ sqlx::Error::Database(_)) => {
                self.state = State::Open;
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// The body ended this transaction (found by a statement of the store's that matched no
    /// row): the session is in a state nobody counted, so the connection is not reused.
    pub(crate) fn ended(&mut self) {
        self.state = State::Unknown;
    }

    /// `COMMIT`, as `Transaction::commit` sends it.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        D::TransactionManager::commit(&mut self.connection).await?;
        self.state = State::Ended;
        Ok(())
    }
}

impl<D: Dialect> Drop for Owned<D> {
    fn drop(&mut self) {
        match self.state {
            // Maybe (or surely) inside a transaction sqlx does not know about: never reuse
            // the connection.
            State::Unknown | State::Refused => self.connection.close_on_drop(),
            // Queued; sent before the connection's next statement (the pool's release ping).
            // (Where SQLite rolled the transaction back by itself, that `ROLLBACK` fails and
            // sqlx's count stays at one: the store's next checkout closes such a connection,
            // `acquire_clean`. Closing it here instead would lose an in-memory database whose
            // last connection it is.)
            State::Open => D::TransactionManager::start_rollback(&mut self.connection),
            State::Ended => {}
        }
    }
}

impl<D: Dialect> Deref for Owned<D> {
    type Target = D::Connection;
    fn deref(&self) -> &D::Connection {
        &self.connection
    }
}

impl<D: Dialect> DerefMut for Owned<D> {
    fn deref_mut(&mut self) -> &mut D::Connection {
        &mut self.connection
    }
}

/// The transaction of an idempotency lease.
pub(crate) enum StoreTx<'c, D: Dialect> {
    Own(Owned<D>),
    /// In the caller's transaction ([`SqlStore::within`](super::SqlStore::within)).
    Savepoint(Transaction<'c, D>),
}

impl<D: Dialect> StoreTx<'_, D> {
    /// The body ended the store's own transaction: its connection is not reused ([`Owned::ended`]).
    pub(crate) fn ended(&mut self) {
        if let StoreTx::Own(tx) = self {
            tx.ended();
        }
    }

    /// `COMMIT` (or, in the caller's transaction, `RELEASE SAVEPOINT`).
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            StoreTx::Own(tx) => tx.commit().await,
            StoreTx::Savepoint(tx) => tx.commit().await,
        }
    }
}

impl<D: Dialect> Deref for StoreTx<'_, D> {
    type Target = D::Connection;
    fn deref(&self) -> &D::Connection {
        match self {
            StoreTx::Own(tx) => tx,
            StoreTx::Savepoint(tx) => tx,
        }
    }
}

impl<D: Dialect> DerefMut for StoreTx<'_, D> {
    fn deref_mut(&mut self) -> &mut D::Connection {
        match self {
            StoreTx::Own(tx) => tx,
            StoreTx::Savepoint(tx) => tx,
        }
    }
}
