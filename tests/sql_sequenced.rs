//! `#[sequenced]` on the SQL stores: the number commits in the same transaction as the effect,
//! so numbers are unique and gap-free across processes, under `Err`, panics and crashes.
//!
//! Each scenario runs on PostgreSQL (a fresh schema, dropped at the end) and on SQLite (a
//! fresh WAL file shared by several processes). Calls go through the protocol the attribute
//! expands to (`acquire_async` → `next_async` (or `start`) → body on the lease's connection →
//! `commit_async` on success, drop otherwise). The effect is an `INSERT` into `numbered`, which
//! has `UNIQUE (key, number)`: a duplicate number would fail the call that tried it.

#![cfg(any(feature = "postgres", feature = "sqlite"))]

#[macro_use]
#[path = "support/sql.rs"]
mod sql;

use std::time::{Duration, Instant};

use racefree::{SequenceBackend, SequenceError, SequenceLease};
use sql::TestDb;

/// Processes × callers of the cross-process scenarios.
const WORKERS: usize = 4;
const CALLERS: usize = 25;

/// What a numbered call's body does after its `INSERT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Succeed,
    Fail,
    Panic,
    Abort,
    /// Sends `ROLLBACK` on the holding's transaction itself, then commits: a body that breaks
    /// the rule.
    RollBack,
    /// Runs a statement that fails (`SELECT 1/0`), ignores the error and commits.
    IgnoreError,
    /// Sends `ROLLBACK` and then `BEGIN` on the holding's transaction, then commits.
    RollBackBegin,
    /// Sends `COMMIT` (committing the number with its row), then `BEGIN`, then a statement
    /// that fails on PostgreSQL (`SELECT 1/0`, whose error it ignores), then commits.
    CommitBeginIgnoreError,
}

/// The fault injected into the `worker`'s `caller`-th call of the faulty scenario: of 100
/// calls, 1 aborts its process (worker 3), and of the rest every 5th fails and every 7th panics.
fn fault(worker: usize, caller: usize) -> Then {
    let index = worker * CALLERS + caller;
    if worker == 3 && caller == 12 {
        Then::Abort
    } else if index.is_multiple_of(5) {
        Then::Fail
    } else if index.is_multiple_of(7) {
        Then::Panic
    } else {
        Then::Succeed
    }
}

macro_rules! suite {
    ($db:ident, $feature:literal, $Database:ty, $pools:path, $new_db:path) => {
        #[cfg(feature = $feature)]
        mod $db {
            use super::*;

            sql_env!($feature, $Database, $pools);

            /// The numbers committed for `key`, in order.
            pub async fn numbers(env: &Env, key: &str) -> Vec<i64> {
                sqlx::query_scalar("SELECT number FROM numbered WHERE key = $1 ORDER BY number")
                    .bind(key)
                    .fetch_all(&env.pool)
                    .await
                    .unwrap()
            }

            /// One call of `#[sequenced(key = key, start = start, store = db.sequence("tests::invoice"))]`.
            pub async fn invoice(
                env: &Env,
                key: &str,
                start: u64,
                who: &str,
                deadline: Option<Instant>,
                then: Then,
            ) -> Result<u64, SequenceError> {
                let invoices = env.store.sequence("tests::invoice");
                let mut lease = invoices.acquire_async(key.to_owned(), deadline).await?;
                let number = lease.next_async().await?.unwrap_or(start);
                sqlx::query("INSERT INTO numbered (key, number, who) VALUES ($1, $2, $3)")
                    .bind(key)
                    .bind(number as i64)
                    .bind(who)
                    .execute(lease.connection())
                    .await
                    .expect("a number is never handed out twice (UNIQUE (key, number))");
                match then {
                    Then::Succeed => {
                        lease.commit_async(number).await?;
                        Ok(number)
                    }
                    Then::Fail => {
                        drop(lease);
                        Err(SequenceError::Store("the body failed".into()))
                    }
                    Then::Panic => panic!("injected panic after the INSERT"),
                    Then::Abort => std::process::abort(),
                    Then::RollBack => {
                        sqlx::Executor::execute(lease.connection(), "ROLLBACK").await.unwrap();
                        lease.commit_async(number).await?;
                        Ok(number)
                    }
                    Then::RollBackBegin => {
                        sqlx::Executor::execute(lease.connection(), "ROLLBACK").await.unwrap();
                        sqlx::Executor::execute(lease.connection(), "BEGIN").await.unwrap();
                        lease.commit_async(number).await?;
                        Ok(number)
                    }
                    Then::CommitBeginIgnoreError => {
                        sqlx::Executor::execute(lease.connection(), "COMMIT").await.unwrap();
                        sqlx::Executor::execute(lease.connection(), "BEGIN").await.unwrap();
                        let failed = sqlx::Executor::execute(lease.connection(), "SELECT 1/0").await;
                        let _ = failed;
                        lease.commit_async(number).await?;
                        Ok(number)
                    }
                    Then::IgnoreError => {
                        let failed = sqlx::Executor::execute(lease.connection(), "SELECT 1/0").await;
                        let _ = failed;
                        lease.commit_async(number).await?;
                        Ok(number)
                    }
                }
            }

            pub async fn child(db: &TestDb, mode: &str, worker: usize) {
                let env = std::sync::Arc::new(open(db).await);
                let who = format!("worker-{worker}");
                arrive(&env.side, mode, &who, WORKERS as i64).await;
                let gate = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
                let callers: Vec<_> = (0..CALLERS)
                    .map(|caller| {
                        let (env, gate) = (env.clone(), gate.clone());
                        let who = format!("{who}/{caller}");
                        let then = if mode == "faulty" {
                            fault(worker, caller)
                        } else {
                            Then::Succeed
                        };
                        tokio::spawn(async move {
                            gate.wait().await;
                            let result = invoice(&env, "acme", 1, &who, None, then).await;
                            if let Ok(number) = result {
                                sqlx::query(
                                    "INSERT INTO outcomes (key, outcome) VALUES ('acme', $1)",
                                )
                                .bind(number.to_string())
                                .execute(&env.side)
                                .await
                                .unwrap();
                            }
                            (then, result.is_ok())
                        })
                    })
                    .collect();
                for caller in callers {
                    match caller.await {
                        Ok((then, ok)) => assert_eq!(ok, then == Then::Succeed, "{then:?}"),
                        Err(panicked) => assert!(panicked.is_panic()),
                    }
                }
            }

            fn run(db: &TestDb, mode: &str) -> Vec<bool> {
                let children: Vec<_> = (0..WORKERS)
                    .map(|w| sql::spawn_child("child_entry", db, mode, w, &[]))
                    .collect();
                sql::wait_children(children)
            }

            /// 4 processes × 25 calls on one key: exactly 1..=100, the counter at 101.
            #[test]
            fn processes_share_one_gap_free_sequence() {
                let db = $new_db("numbers");
                let rt = sql::runtime();
                let env = rt.block_on(setup(&db));
                assert!(run(&db, "clean").into_iter().all(|ok| ok), "a child failed");
                rt.block_on(async {
                    assert_eq!(numbers(&env, "acme").await, (1..=100).collect::<Vec<i64>>());
                    let next = env
                        .store
                        .sequence("tests::invoice")
                        .next(&"acme")
                        .await
                        .unwrap();
                    assert_eq!(next, Some(101));
                    env.pool.close().await;
                });
            }

            /// The same with injected `Err`s, panics and one process abort, all after the
            /// body's `INSERT`: the committed numbers are exactly 1..=N (no duplicate, no gap),
            /// one per success, and the counter is at N + 1.
            #[test]
            fn faults_after_the_insert_leave_no_gap() {
                let db = $new_db("faulty");
                let rt = sql::runtime();
                let env = rt.block_on(setup(&db));
                let exits = run(&db, "faulty");
                assert_eq!(
                    exits,
                    [true, true, true, false],
                    "worker 3 aborted, the others finished"
                );
                rt.block_on(async {
                    let committed = numbers(&env, "acme").await;
                    let n = committed.len() as i64;
                    assert_eq!(
                        committed,
                        (1..=n).collect::<Vec<i64>>(),
                        "contiguous from 1"
                    );
                    let reported: Vec<String> = sqlx::query_scalar("SELECT outcome FROM outcomes")
                        .fetch_all(&env.side)
                        .await
                        .unwrap();
                    // Workers 0-2 report every success; worker 3 only those before its abort.
                    let survivors = (0..3)
                        .flat_map(|w| (0..CALLERS).map(move |c| fault(w, c)))
                        .filter(|then| *then == Then::Succeed)
                        .count();
                    assert!(
                        reported.len() >= survivors && reported.len() as i64 <= n,
                        "{} reported, {n} committed",
                        reported.len()
                    );
                    let next = env
                        .store
                        .sequence("tests::invoice")
                        .next(&"acme")
                        .await
                        .unwrap();
                    assert_eq!(next, Some(n as u64 + 1));
                    env.pool.close().await;
                });
            }

            /// `invoice` as the attribute writes it: `seq` and `tx` are supplied, not passed.
            #[racefree::sequenced(key = key.to_owned(), start = 100, store = env.store.sequence("tests::attr"))]
            async fn numbered(
                env: &Env,
                key: &str,
                fail: bool,
                seq: racefree::Seq,
                mut tx: racefree::sql::Tx<'_, $Database>,
            ) -> Result<u64, SequenceError> {
                sqlx::query("INSERT INTO numbered (key, number, who) VALUES ($1, $2, 'attr')")
                    .bind(key)
                    .bind(seq.get() as i64)
                    .execute(&mut *tx)
                    .await
                    .expect("a number is never handed out twice");
                if fail {
                    return Err(SequenceError::Store("the body failed".into()));
                }
                Ok(seq.get())
            }

            /// Through the attribute: 25 concurrent callers, every 4th failing after its
            /// `INSERT`, on a new key with `start = 100` → the successes are exactly
            /// 100..100 + successes, each row committed with its number.
            #[test]
            fn attribute_commits_the_number_with_the_row() {
                let db = $new_db("attribute");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = std::sync::Arc::new(setup(&db).await);
                    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
                    let callers: Vec<_> = (0..CALLERS)
                        .map(|caller| {
                            let (env, gate) = (env.clone(), gate.clone());
                            tokio::spawn(async move {
                                gate.wait().await;
                                numbered(&env, "attr", caller % 4 == 3).await
                            })
                        })
                        .collect();
                    let mut numbers = Vec::new();
                    for caller in callers {
                        if let Ok(number) = caller.await.unwrap() {
                            numbers.push(number as i64);
                        }
                    }
                    numbers.sort();
                    let expected: Vec<i64> = (100..100 + numbers.len() as i64).collect();
                    assert_eq!(numbers.len(), CALLERS - CALLERS / 4);
                    assert_eq!(numbers, expected);
                    let committed: Vec<i64> = sqlx::query_scalar("SELECT number FROM numbered WHERE key = 'attr' ORDER BY number")
                        .fetch_all(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(committed, expected, "failed calls left no row");
                    env.pool.close().await;
                });
            }

            /// A body that ends the holding's transaction itself (its own `ROLLBACK`, also with a
            /// `BEGIN` after it) and then commits never gets its number as if it committed: the commit is `CommitUnknown`
            /// (its writes were not guarded), 3 rounds, on a new key and then on a used one; no
            /// row committed, and the next call gets the number they did not consume. Nor does a
            /// body that ignored a failed statement, where that aborted the transaction.
            #[test]
            fn a_body_that_ends_the_transaction_never_gets_its_number_as_committed() {
                let db = $new_db("ended");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    for round in 0..3 {
                        let ended = invoice(&env, "ended", 1, "rule-breaker", None, Then::RollBack).await;
                        assert!(matches!(ended, Err(SequenceError::CommitUnknown(_))), "round {round}: {ended:?}");
                    }
                    assert_eq!(invoice(&env, "ended", 1, "a", None, Then::Succeed).await.unwrap(), 1);
                    for round in 0..3 {
                        let ended = invoice(&env, "ended", 1, "rule-breaker", None, Then::RollBack).await;
                        assert!(matches!(ended, Err(SequenceError::CommitUnknown(_))), "round {round}: {ended:?}");
                    }
                    assert_eq!(invoice(&env, "ended", 1, "b", None, Then::Succeed).await.unwrap(), 2);
                    assert_eq!(numbers(&env, "ended").await, [1, 2]);
                    let begun = invoice(&env, "ended", 1, "rule-breaker", None, Then::RollBackBegin).await;
                    assert!(matches!(begun, Err(SequenceError::CommitUnknown(_))), "{begun:?}");
                    assert_eq!(numbers(&env, "ended").await, [1, 2]);

                    // A body that ignored a failed statement: PostgreSQL aborted the
                    // transaction (its `COMMIT` would roll back without an error), SQLite did not.
                    let ignored = invoice(&env, "ended", 1, "ignorer", None, Then::IgnoreError).await;
                    let next = if $feature == "postgres" {
                        assert!(matches!(ignored, Err(SequenceError::Store(_))), "{ignored:?}");
                        assert_eq!(numbers(&env, "ended").await, [1, 2], "nothing committed");
                        3
                    } else {
                        assert_eq!(ignored.unwrap(), 3);
                        assert_eq!(numbers(&env, "ended").await, [1, 2, 3]);
                        4
                    };

                    // The same failure in a transaction the body began after its own `COMMIT`
                    // had committed the number: not "rolled back", since it was not.
                    let after_commit = invoice(&env, "ended", 1, "committer", None, Then::CommitBeginIgnoreError).await;
                    assert!(matches!(after_commit, Err(SequenceError::CommitUnknown(_))), "{after_commit:?}");
                    let mut committed: Vec<i64> = (1..next).collect();
                    committed.push(next);
                    assert_eq!(numbers(&env, "ended").await, committed, "the body's COMMIT committed its number");
                    env.pool.close().await;
                });
            }

            /// `start` applies to a key never seen; a failing first call does not consume it;
            /// keys and families are independent.
            #[test]
            fn start_applies_to_a_new_key_until_its_first_success() {
                let db = $new_db("start");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    assert!(invoice(&env, "new", 1000, "a", None, Then::Fail)
                        .await
                        .is_err());
                    assert_eq!(
                        invoice(&env, "new", 1000, "b", None, Then::Succeed)
                            .await
                            .unwrap(),
                        1000
                    );
                    assert!(invoice(&env, "new", 1000, "c", None, Then::Fail)
                        .await
                        .is_err());
                    assert_eq!(
                        invoice(&env, "new", 1000, "d", None, Then::Succeed)
                            .await
                            .unwrap(),
                        1001
                    );
                    assert_eq!(
                        invoice(&env, "other", 1, "e", None, Then::Succeed)
                            .await
                            .unwrap(),
                        1
                    );
                    assert_eq!(numbers(&env, "new").await, [1000, 1001]);
                    let other_family = env.store.sequence("tests::receipt");
                    assert_eq!(other_family.next(&"new").await.unwrap(), None);
                    env.pool.close().await;
                });
            }

            /// The caller's own transaction, as a handler opens it (on SQLite `BEGIN IMMEDIATE`:
            /// its first statement writes, so it takes the write lock up front).
            async fn begin_caller(env: &Env) -> sqlx::Transaction<'static, $Database> {
                let begin = if $feature == "sqlite" { "BEGIN IMMEDIATE" } else { "BEGIN" };
                env.pool.begin_with(begin).await.unwrap()
            }

            /// `#[sequenced(key = key, store = db.within(&mut tx).sequence("tests::invoice"))]`:
            /// the number and the `INSERT` are in the caller's transaction `tx`, which commits
            /// (or not) after the call.
            async fn invoice_in(
                env: &Env,
                tx: &mut <$Database as sqlx::Database>::Connection,
                key: &str,
                who: &str,
            ) -> Result<u64, SequenceError> {
                let invoices = env.store.within(tx).sequence("tests::invoice");
                let mut lease = invoices.acquire_async(key.to_owned(), None).await?;
                let number = lease.next_async().await?.unwrap_or(1);
                sqlx::query("INSERT INTO numbered (key, number, who) VALUES ($1, $2, $3)")
                    .bind(key)
                    .bind(number as i64)
                    .bind(who)
                    .execute(lease.connection())
                    .await
                    .expect("a number is never handed out twice (UNIQUE (key, number))");
                lease.commit_async(number).await?;
                Ok(number)
            }

            /// Inside the caller's transaction the number is consumed by the caller's
            /// `COMMIT`: after a rollback (explicit, or the transaction dropped) the next call
            /// gets the same number; after a commit it gets the next one, in the store's own
            /// transactions too.
            #[test]
            fn caller_transaction_decides_whether_the_number_is_consumed() {
                let db = $new_db("caller_tx");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    let invoices = env.store.sequence("tests::invoice");
                    let mut tx = begin_caller(&env).await;
                    assert_eq!(invoice_in(&env, &mut tx, "acme", "rolled-back").await.unwrap(), 1);
                    tx.rollback().await.unwrap();
                    assert_eq!(numbers(&env, "acme").await, Vec::<i64>::new());
                    assert_eq!(invoices.next(&"acme").await.unwrap(), None, "not consumed");

                    let mut tx = begin_caller(&env).await;
                    assert_eq!(invoice_in(&env, &mut tx, "acme", "committed").await.unwrap(), 1, "the same number again");
                    tx.commit().await.unwrap();
                    assert_eq!(numbers(&env, "acme").await, [1]);
                    assert_eq!(invoices.next(&"acme").await.unwrap(), Some(2), "consumed");

                    assert_eq!(invoice(&env, "acme", 1, "own", None, Then::Succeed).await.unwrap(), 2);
                    let mut tx = begin_caller(&env).await;
                    assert_eq!(invoice_in(&env, &mut tx, "acme", "dropped").await.unwrap(), 3);
                    drop(tx);
                    assert_eq!(invoice(&env, "acme", 1, "own", None, Then::Succeed).await.unwrap(), 3, "a dropped transaction consumed nothing");
                    assert_eq!(numbers(&env, "acme").await, [1, 2, 3]);
                    env.pool.close().await;
                });
            }

            /// 8 concurrent callers × 10 rounds, released together by a barrier, each taking a
            /// number in its own transaction, which then commits, or rolls back for every
            /// third (caller + round). After every round the committed numbers are exactly
            /// 1..=(commits so far): no duplicate, no gap, and the counter says the next one.
            #[test]
            fn caller_transactions_stay_gap_free_under_concurrency() {
                const IN_TX: usize = 8;
                const ROUNDS: usize = 10;
                let db = $new_db("caller_tx_crowd");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = std::sync::Arc::new(setup(&db).await);
                    let mut commits = 0;
                    for round in 0..ROUNDS {
                        let gate = std::sync::Arc::new(tokio::sync::Barrier::new(IN_TX));
                        let callers: Vec<_> = (0..IN_TX)
                            .map(|caller| {
                                let (env, gate) = (env.clone(), gate.clone());
                                tokio::spawn(async move {
                                    gate.wait().await;
                                    let mut tx = begin_caller(&env).await;
                                    let who = format!("{round}/{caller}");
                                    invoice_in(&env, &mut tx, "acme", &who).await.unwrap();
                                    let commit = (caller + round) % 3 != 0;
                                    match commit {
                                        true => tx.commit().await.unwrap(),
                                        false => tx.rollback().await.unwrap(),
                                    }
                                    commit
                                })
                            })
                            .collect();
                        for caller in callers {
                            commits += caller.await.unwrap() as i64;
                        }
                        assert_eq!(numbers(&env, "acme").await, (1..=commits).collect::<Vec<_>>(), "round {round}");
                        let next = env.store.sequence("tests::invoice").next(&"acme").await.unwrap();
                        assert_eq!(next, Some(commits as u64 + 1), "round {round}");
                    }
                    env.pool.close().await;
                });
            }

            /// A dropped future after the body's `INSERT` (the client went away): nothing
            /// committed, the next call gets the same number.
            #[test]
            fn dropped_future_after_the_insert_consumes_nothing() {
                let db = $new_db("dropped");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = std::sync::Arc::new(setup(&db).await);
                    let (inserted, is_inserted) = tokio::sync::oneshot::channel();
                    let e = env.clone();
                    let handler = tokio::spawn(async move {
                        let invoices = e.store.sequence("tests::invoice");
                        let mut lease = invoices
                            .acquire_async("acme".to_owned(), None)
                            .await
                            .unwrap();
                        let number = lease.next_async().await.unwrap().unwrap_or(1);
                        sqlx::query(
                            "INSERT INTO numbered (key, number, who) VALUES ('acme', $1, 'gone')",
                        )
                        .bind(number as i64)
                        .execute(lease.connection())
                        .await
                        .unwrap();
                        inserted.send(()).unwrap();
                        std::future::pending::<()>().await;
                    });
                    is_inserted.await.unwrap();
                    handler.abort();
                    assert!(handler.await.unwrap_err().is_cancelled());
                    assert_eq!(
                        invoice(&env, "acme", 1, "next", None, Then::Succeed)
                            .await
                            .unwrap(),
                        1
                    );
                    assert_eq!(numbers(&env, "acme").await, [1]);
                    env.pool.close().await;
                });
            }
        }
    };
}

suite!(pg, "postgres", sqlx::Postgres, sql::pg_pools, TestDb::pg);
suite!(
    sqlite,
    "sqlite",
    sqlx::Sqlite,
    sql::sqlite_pools,
    TestDb::sqlite
);

/// Another process (here: another store on the same pool, with its own in-process queue)
/// holding the key's row lock makes a call with a deadline fail with `Timeout` through
/// PostgreSQL's `lock_timeout`, consuming nothing.
#[cfg(feature = "postgres")]
#[test]
fn pg_deadline_bounds_the_wait_for_another_process() {
    let db = TestDb::pg("deadline");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let elsewhere = racefree::sql::PgStore::new(env.pool.clone());
        let invoices = elsewhere.sequence("tests::invoice");
        let held = invoices
            .acquire_async("acme".to_owned(), None)
            .await
            .unwrap();
        let started = Instant::now();
        let deadline = Some(started + Duration::from_millis(200));
        let timed_out = pg::invoice(&env, "acme", 1, "late", deadline, Then::Succeed).await;
        assert!(
            matches!(timed_out, Err(SequenceError::Timeout)),
            "{timed_out:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(held);
        assert_eq!(
            pg::invoice(&env, "acme", 1, "next", None, Then::Succeed)
                .await
                .unwrap(),
            1
        );
        env.pool.close().await;
    });
}

/// A statement timeout (SQLSTATE 57014) and a serialization failure (40001) while taking a
/// number are `SequenceError::Store` naming the cause, as documented (the serialization failure
/// after the store took the number again in 64 new transactions); a conflict at `COMMIT`
/// (a deferred trigger) is `Store` too, not `CommitUnknown`: the server answered, so it rolled
/// back. Nothing is consumed: once the faults are gone, each key's first number is still 1.
#[cfg(feature = "postgres")]
#[test]
fn pg_statement_timeout_and_serialization_failure_are_typed() {
    let db = TestDb::pg("faults");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        sqlx::raw_sql(sql::PG_FAULTS)
            .execute(&env.pool)
            .await
            .unwrap();
        // Keys are stored as their JSON encoding.
        sqlx::raw_sql(
            "CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON racefree_sequences FOR EACH ROW \
               WHEN (NEW.key = '\"slow\"') EXECUTE FUNCTION rf_slow(); \
             CREATE TRIGGER conflict BEFORE INSERT OR UPDATE ON racefree_sequences FOR EACH ROW \
               WHEN (NEW.key = '\"conflict\"') EXECUTE FUNCTION rf_serialization_failure(); \
             CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT OR UPDATE ON racefree_sequences \
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
               WHEN (NEW.key = '\"at-commit\"') EXECUTE FUNCTION rf_serialization_failure();",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        let impatient =
            env.with_store_on(db.pg_pool_with(4, "SET statement_timeout = '300ms'").await);
        let store_error = |result: Result<u64, SequenceError>| match result {
            Err(SequenceError::Store(reason)) => reason.to_string(),
            other => panic!("expected SequenceError::Store, got {other:?}"),
        };

        let slow = pg::invoice(&impatient, "slow", 1, "first", None, Then::Succeed).await;
        let reason = store_error(slow);
        assert!(reason.contains("statement timeout"), "{reason}");
        // The bump's serialization failure is taken again in 64 new transactions, then is the
        // caller's error: 65 raises in all, counted outside the rolled-back transactions.
        let conflict = pg::invoice(&env, "conflict", 1, "first", None, Then::Succeed).await;
        let reason = store_error(conflict);
        assert!(
            reason.contains("serialization failure")
                && reason.contains("after 64 new transactions"),
            "{reason}"
        );
        let raised: i64 = sqlx::query_scalar("SELECT last_value FROM rf_conflicts")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(raised, 65, "one bump and 64 retries");
        let at_commit = pg::invoice(&env, "at-commit", 1, "first", None, Then::Succeed).await;
        let reason = store_error(at_commit);
        assert!(
            reason.contains("rolled back") && reason.contains("serialization failure"),
            "{reason}"
        );

        sqlx::raw_sql(
            "DROP TRIGGER slow ON racefree_sequences; \
             DROP TRIGGER conflict ON racefree_sequences; \
             DROP TRIGGER at_commit ON racefree_sequences;",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        for key in ["slow", "conflict", "at-commit"] {
            assert_eq!(
                pg::numbers(&env, key).await,
                Vec::<i64>::new(),
                "{key}: rolled back"
            );
            let first = pg::invoice(&impatient, key, 1, "retry", None, Then::Succeed).await;
            assert_eq!(first.unwrap(), 1, "{key}: the number was not consumed");
            assert_eq!(pg::numbers(&env, key).await, [1], "{key}");
        }
        impatient.store.pool().unwrap().close().await;
        env.pool.close().await;
    });
}

/// Under `REPEATABLE READ` (the pools' default isolation here), a caller that waited for
/// another transaction's holding of its key finds the counter row changed since its snapshot
/// and fails its bump with a serialization failure before anything ran; the store takes a new
/// transaction and bumps again instead of handing the caller the error. 2 stores (their own
/// in-process queues, so they meet only at the row lock, as two processes do) × 8 callers of
/// one key, released by a barrier, 3 rounds: every call gets its number, and after each round
/// the key's numbers are exactly 1..=16 × rounds so far.
#[cfg(feature = "postgres")]
#[test]
fn pg_repeatable_read_callers_of_one_key_all_get_their_numbers() {
    const STORES: usize = 2;
    const CALLERS: usize = 8;
    const ROUNDS: usize = 3;
    let db = TestDb::pg("repeatable");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let mut envs = Vec::new();
        for _ in 0..STORES {
            let pool = db
                .pg_pool_with(
                    CALLERS as u32,
                    "SET default_transaction_isolation = 'repeatable read'",
                )
                .await;
            envs.push(std::sync::Arc::new(env.with_store_on(pool)));
        }
        let isolation: String = sqlx::query_scalar("SHOW transaction_isolation")
            .fetch_one(envs[0].store.pool().unwrap())
            .await
            .unwrap();
        assert_eq!(
            isolation, "repeatable read",
            "the stores' transactions' isolation"
        );
        for round in 1..=ROUNDS {
            let gate = std::sync::Arc::new(tokio::sync::Barrier::new(STORES * CALLERS));
            let calls: Vec<_> = (0..STORES * CALLERS)
                .map(|caller| {
                    let (env, gate) = (envs[caller % STORES].clone(), gate.clone());
                    tokio::spawn(async move {
                        gate.wait().await;
                        let who = format!("round {round} caller {caller}");
                        pg::invoice(&env, "rr", 1, &who, None, Then::Succeed).await
                    })
                })
                .collect();
            for call in calls {
                let number = call.await.unwrap();
                assert!(number.is_ok(), "round {round}: {number:?}");
            }
            let expected: Vec<i64> = (1..=(round * STORES * CALLERS) as i64).collect();
            assert_eq!(pg::numbers(&env, "rr").await, expected, "round {round}");
        }
        for env in &envs {
            env.store.pool().unwrap().close().await;
        }
        env.pool.close().await;
    });
}

/// Under `SERIALIZABLE`, a key's first number (the counter set to `start + 1` after the bump)
/// takes no predicate lock that first numbers of other keys could conflict with: it finds the
/// counter row by the `ctid` the bump returned, not through the key's index (before, 12 of 40
/// such calls failed at `COMMIT`). 40 callers, each with a key of its own, released by a
/// barrier, 5 rounds of new keys, each key called twice (its first number, then its second):
/// every call is `Ok`, with `start` and `start + 1`.
#[cfg(feature = "postgres")]
#[test]
fn pg_serializable_first_numbers_of_other_keys_never_fail_each_other() {
    const CALLERS: usize = 40;
    const ROUNDS: usize = 5;
    const START: u64 = 100;
    let db = TestDb::pg("serializable");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let pool = db
            .pg_pool_with(8, "SET default_transaction_isolation = 'serializable'")
            .await;
        let serializable = std::sync::Arc::new(env.with_store_on(pool));
        for round in 0..ROUNDS {
            for (call, expected) in [(1, START), (2, START + 1)] {
                let gate = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
                let calls: Vec<_> = (0..CALLERS)
                    .map(|caller| {
                        let (env, gate) = (serializable.clone(), gate.clone());
                        tokio::spawn(async move {
                            gate.wait().await;
                            let key = format!("round {round} caller {caller}");
                            pg::invoice(&env, &key, START, "ssi", None, Then::Succeed).await
                        })
                    })
                    .collect();
                for (caller, number) in calls.into_iter().enumerate() {
                    let number = number.await.unwrap();
                    assert_eq!(
                        number.as_ref().ok(),
                        Some(&expected),
                        "round {round}, call {call}, caller {caller}: {number:?}"
                    );
                }
            }
        }
        serializable.store.pool().unwrap().close().await;
        env.pool.close().await;
    });
}

/// Not a test of its own: the body of the child processes. Without `RF_SQL_MODE` it returns.
#[test]
fn child_entry() {
    let Some((mode, worker)) = sql::child_role() else {
        return;
    };
    let db = TestDb::from_env();
    sql::runtime().block_on(async move {
        match db.kind {
            #[cfg(feature = "postgres")]
            "pg" => pg::child(&db, &mode, worker).await,
            #[cfg(feature = "sqlite")]
            "sqlite" => sqlite::child(&db, &mode, worker).await,
            other => panic!("no {other} support built in"),
        }
    });
}

/// The per-call answer (`turn::track`) on a SQL store: a caller waits, if at all, on the
/// counter row's lock inside the database, which the store cannot see, so every call reports
/// `Unknown` — never a guess. 3 calls on one key, numbers 1..=3.
#[cfg(feature = "sqlite")]
mod turn_on_sql {
    use racefree::sql::SqliteStore;
    use racefree::{sequenced, Seq, SequenceError, Turn};

    #[sequenced(key = key.to_owned(), store = store.sequence("tests::turn"))]
    async fn numbered(store: &SqliteStore, key: &str, seq: Seq) -> Result<u64, SequenceError> {
        Ok(seq.get())
    }

    #[tokio::test]
    async fn turn_is_unknown_on_a_sql_store() {
        let db = super::sql::TestDb::sqlite("turn");
        let store = SqliteStore::new(db.sqlite_pool(2, std::time::Duration::from_secs(5)).await);
        store.migrate().await.unwrap();
        for expected in 1..=3 {
            let (number, turn) = racefree::turn::track(numbered(&store, "acme")).await;
            assert_eq!((number.unwrap(), turn), (expected, Turn::Unknown));
        }
    }
}

/// SQLite, a `#[sequenced]` future dropped at every point of its start and its body (on its
/// 1st, 2nd, …, 40th pending poll, each when it was woken), on a pool of one connection: the connection is never left inside a
/// transaction. After each drop another connection takes the write lock (a transaction left
/// open would hold it), and at the end the next call gets the number after the last one
/// committed: 40 rounds, numbers gap-free.
#[cfg(feature = "sqlite")]
mod dropped_on_sqlite {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;
    use std::time::Duration;

    use racefree::sql::{SqliteStore, SqliteTx};
    use racefree::{sequenced, Seq, SequenceError};
    use sqlx::Executor;

    #[sequenced(key = key.to_owned(), store = store.sequence("tests::dropped"))]
    async fn numbered(
        store: &SqliteStore,
        key: &str,
        seq: Seq,
        mut tx: SqliteTx<'_>,
    ) -> Result<u64, SequenceError> {
        sqlx::query("INSERT INTO numbered (key, number, who) VALUES ($1, $2, 'dropped')")
            .bind(key)
            .bind(seq.get() as i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        tokio::task::yield_now().await;
        Ok(seq.get())
    }

    #[tokio::test]
    async fn a_future_dropped_anywhere_leaves_no_transaction_open() {
        let db = super::sql::TestDb::sqlite("seqdrop");
        let pool = db.sqlite_pool(1, Duration::from_millis(500)).await;
        pool.execute("CREATE TABLE numbered (key TEXT NOT NULL, number BIGINT NOT NULL, who TEXT NOT NULL, UNIQUE (key, number))")
            .await
            .unwrap();
        let store = SqliteStore::new(pool.clone());
        store.migrate().await.unwrap();
        let other = db.sqlite_pool(1, Duration::from_secs(3)).await;
        for polls in 1..=40 {
            {
                // Polled each time it wakes (not in a spin), dropped on its `polls`-th pending.
                let mut call = pin!(numbered(&store, "acme"));
                let mut pending = 0;
                std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
                    Poll::Ready(_) => Poll::Ready(()),
                    Poll::Pending => {
                        pending += 1;
                        match pending >= polls {
                            true => Poll::Ready(()),
                            false => Poll::Pending,
                        }
                    }
                })
                .await;
            }
            let mut conn = other.acquire().await.unwrap();
            conn.execute("BEGIN IMMEDIATE")
                .await
                .unwrap_or_else(|e| panic!("after {polls} polls the write lock stayed taken: {e}"));
            conn.execute("ROLLBACK").await.unwrap();
        }
        let numbers: Vec<i64> =
            sqlx::query_scalar("SELECT number FROM numbered WHERE key = 'acme' ORDER BY number")
                .fetch_all(&other)
                .await
                .unwrap();
        let next = numbered(&store, "acme").await.unwrap();
        assert_eq!(
            next as usize,
            numbers.len() + 1,
            "gap-free after {numbers:?}"
        );
        assert_eq!(numbers, (1..=numbers.len() as i64).collect::<Vec<_>>());
    }

    /// `migrate()` takes the write lock (`BEGIN IMMEDIATE`) for its `CREATE TABLE`s: dropped on
    /// its 1st to 20th pending poll, 5 rounds each, on a pool of one connection, it never
    /// leaves that transaction open on the pooled connection. (Through sqlx's `begin_with` it
    /// did when dropped after the `BEGIN` was answered and before sqlx checked it: this test
    /// failed in each of 3 runs, at a drop after 2 or 3 polls.) After each drop another
    /// connection must take the write lock; at the end a whole migration runs and the tables
    /// are there.
    #[tokio::test]
    async fn a_migration_dropped_anywhere_leaves_no_transaction_open() {
        let db = super::sql::TestDb::sqlite("migratedrop");
        let pool = db.sqlite_pool(1, Duration::from_millis(500)).await;
        let store = SqliteStore::new(pool.clone())
            .with_prefix("dropped_")
            .unwrap();
        let other = db.sqlite_pool(1, Duration::from_secs(3)).await;
        for polls in (1..=20).flat_map(|polls| [polls; 5]) {
            {
                let mut migration = pin!(store.migrate());
                let mut pending = 0;
                std::future::poll_fn(|cx| match migration.as_mut().poll(cx) {
                    Poll::Ready(_) => Poll::Ready(()),
                    Poll::Pending => {
                        pending += 1;
                        match pending >= polls {
                            true => Poll::Ready(()),
                            false => Poll::Pending,
                        }
                    }
                })
                .await;
            }
            let mut conn = other.acquire().await.unwrap();
            conn.execute("BEGIN IMMEDIATE")
                .await
                .unwrap_or_else(|e| panic!("after {polls} polls the write lock stayed taken: {e}"));
            conn.execute("ROLLBACK").await.unwrap();
        }
        store.migrate().await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'dropped%' ORDER BY name",
        )
        .fetch_all(&other)
        .await
        .unwrap();
        assert_eq!(tables, ["dropped_idempotency", "dropped_sequences"]);
    }

    /// A migration whose `BEGIN IMMEDIATE` waits out `busy_timeout` (another connection holds
    /// the write lock) fails with that error and gives its connection back to the pool, which
    /// began nothing: on a pool of one, the connection marked with a `TEMP` table (which lives
    /// and dies with its connection) is still the pool's after each failure. 5 rounds, each
    /// failing while the lock is held and then migrating once it is free.
    #[tokio::test]
    async fn a_migration_that_waits_out_busy_timeout_keeps_its_connection() {
        let db = super::sql::TestDb::sqlite("migratebusy");
        let pool = db.sqlite_pool(1, Duration::from_millis(50)).await;
        let store = SqliteStore::new(pool.clone());
        let other = db.sqlite_pool(1, Duration::from_secs(3)).await;
        pool.acquire()
            .await
            .unwrap()
            .execute("CREATE TEMP TABLE this_connection (x)")
            .await
            .unwrap();
        for round in 0..5 {
            let mut holder = other.acquire().await.unwrap();
            holder.execute("BEGIN IMMEDIATE").await.unwrap();
            let busy = store.migrate().await;
            assert!(
                matches!(&busy, Err(sqlx::Error::Database(db)) if db.message().contains("locked")),
                "round {round}: {busy:?}"
            );
            holder.execute("ROLLBACK").await.unwrap();
            drop(holder);
            let kept = pool
                .acquire()
                .await
                .unwrap()
                .execute("SELECT * FROM temp.this_connection")
                .await;
            assert!(
                kept.is_ok(),
                "round {round}: the connection was replaced: {kept:?}"
            );
            store.migrate().await.unwrap();
        }
    }
}
