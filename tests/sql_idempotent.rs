//! `#[idempotent]` on the SQL stores: the claim, the body's effect and the outcome commit in one
//! transaction, so a crash, an `Err`, a dropped future or a killed connection leaves neither.
//!
//! Each scenario runs on PostgreSQL (a fresh schema on 127.0.0.1:5432, dropped at the end) and
//! on SQLite (a fresh WAL file shared by several processes). The calls go through the
//! protocol the attribute expands to (`begin` → body on the lease's connection → `finish`,
//! or drop), with the effect `INSERT` on the store's transaction.
//!
//! Counting: `effects` is written in the store's transaction (what committed), `executions`
//! outside it (every run of a body, committed or not), `outcomes` by each caller.

#![cfg(any(feature = "postgres", feature = "sqlite"))]

#[macro_use]
#[path = "support/sql.rs"]
mod sql;

use std::time::Duration;

use racefree::__private::{begin, Begin, Call, Policy};
use racefree::{Fingerprint, IdempotencyError};
use sql::TestDb;

/// Processes × callers of the cross-process scenarios.
const WORKERS: usize = 4;
const CALLERS: usize = 25;

/// What a test body does after its effect `INSERT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Returns `Ok` after `ms` milliseconds.
    Succeed { ms: u64 },
    /// Returns `Err`: nothing stored, the transaction rolls back.
    Fail,
    /// Aborts the process (a crash after the effect).
    Abort,
    /// Never returns (the future is dropped from outside).
    Hang,
    /// Sends this statement (`COMMIT`, `ROLLBACK`) on the store's transaction itself, then
    /// returns `Ok`: a body that breaks the rule.
    End(&'static str),
}

macro_rules! suite {
    ($db:ident, $feature:literal, $Database:ty, $pools:path, $one:path, $new_db:path) => {
        #[cfg(feature = $feature)]
        mod $db {
            use super::*;
            use sqlx::Pool;

            sql_env!($feature, $Database, $pools);

            pub fn policy() -> Policy {
                Policy::new(Duration::from_secs(3600))
            }

            /// One call of `tests::pay` with `key`, as `#[idempotent(key = key, store = store)]`
            /// expands: the body records its run (autocommit), inserts its effect in the
            /// store's transaction, then does `then`.
            pub async fn pay(
                env: &Env,
                key: Option<&str>,
                cents: u64,
                who: &str,
                policy: Policy,
                then: Then,
            ) -> Result<String, IdempotencyError> {
                let call = Call::new("tests::pay", None, key, Fingerprint::of(&cents), policy);
                let mut execution = match begin(&env.store, call).await {
                    Begin::Execute(execution) => execution,
                    Begin::Replay(outcome) => return Ok(outcome),
                    Begin::Refuse(error) => return Err(error),
                };
                let key = key.unwrap_or("");
                sqlx::query("INSERT INTO executions (key, who) VALUES ($1, $2)")
                    .bind(key)
                    .bind(who)
                    .execute(&env.side)
                    .await
                    .unwrap();
                let tx = execution.lease_mut().expect("a SQL store always opens a transaction").connection();
                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, $2)")
                    .bind(key)
                    .bind(who)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                match then {
                    Then::Succeed { ms } => {
                        tokio::time::sleep(Duration::from_millis(ms)).await; // work; lets duplicates pile up
                        let outcome = format!("receipt {cents} by {who}");
                        execution.finish(&outcome).await?;
                        Ok(outcome)
                    }
                    Then::Fail => {
                        execution.release();
                        Err(IdempotencyError::StoreUnavailable { reason: "the body failed".into() })
                    }
                    Then::Abort => std::process::abort(),
                    Then::Hang => std::future::pending().await,
                    Then::End(statement) => {
                        sqlx::Executor::execute(&mut *tx, statement).await.unwrap();
                        let outcome = format!("receipt {cents} by {who}");
                        execution.finish(&outcome).await?;
                        Ok(outcome)
                    }
                }
            }

            /// A child process's part of a scenario.
            pub async fn child(db: &TestDb, mode: &str, worker: usize) {
                let env = std::sync::Arc::new(open(db).await);
                let who = format!("worker-{worker}");
                match mode {
                    "crowd" => {
                        arrive(&env.side, "crowd", &who, WORKERS as i64).await;
                        let gate = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
                        let callers: Vec<_> = (0..CALLERS)
                            .map(|caller| {
                                let (env, gate) = (env.clone(), gate.clone());
                                let who = format!("{who}/{caller}");
                                tokio::spawn(async move {
                                    gate.wait().await;
                                    // Through the attribute: the body's INSERT is on its `tx`.
                                    let outcome = charge(&env, "crowd", 1999, &who, false)
                                        .await
                                        .expect("every caller gets the outcome");
                                    sqlx::query("INSERT INTO outcomes (key, outcome) VALUES ($1, $2)")
                                        .bind("crowd")
                                        .bind(outcome)
                                        .execute(&env.side)
                                        .await
                                        .unwrap();
                                })
                            })
                            .collect();
                        for caller in callers {
                            caller.await.unwrap();
                        }
                    }
                    "abort-after-insert" => {
                        let _ = pay(&env, Some("crash"), 500, &who, policy(), Then::Abort).await;
                        unreachable!("the body aborts the process");
                    }
                    other => panic!("unknown child mode {other}"),
                }
            }

            /// 4 processes × 25 callers of the `#[idempotent]` function `charge`, one key: one
            /// execution, one effect row, 100 equal outcomes (the one execution's).
            #[test]
            fn crowd_of_processes_executes_once() {
                let db = $new_db("crowd");
                let rt = sql::runtime();
                let env = rt.block_on(setup(&db));
                let children: Vec<_> = (0..WORKERS)
                    .map(|w| sql::spawn_child("child_entry", &db, "crowd", w, &[]))
                    .collect();
                assert!(sql::wait_children(children).into_iter().all(|ok| ok), "a child failed");
                rt.block_on(async {
                    assert_eq!(count(&env.side, "executions", "crowd").await, 1, "one execution");
                    assert_eq!(count(&env.pool, "effects", "crowd").await, 1, "one effect row");
                    let outcomes: Vec<String> = sqlx::query_scalar("SELECT outcome FROM outcomes WHERE key = 'crowd'")
                        .fetch_all(&env.side)
                        .await
                        .unwrap();
                    assert_eq!(outcomes.len(), WORKERS * CALLERS);
                    let executor: String = sqlx::query_scalar("SELECT who FROM effects WHERE key = 'crowd'")
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                    let expected = format!("receipt 1999 by {executor}");
                    assert!(outcomes.iter().all(|o| *o == expected), "all outcomes equal the execution's");
                    env.close().await;
                });
            }

            /// A process that aborts right after its effect `INSERT`: the server rolls the
            /// transaction back, so the retry executes (once) and there is one effect row.
            #[test]
            fn crash_after_effect_leaves_nothing_and_retry_executes_once() {
                let db = $new_db("crash");
                let rt = sql::runtime();
                let env = rt.block_on(setup(&db));
                let child = sql::spawn_child("child_entry", &db, "abort-after-insert", 0, &[]);
                assert_eq!(sql::wait_children(vec![child]), [false], "the child aborted");
                rt.block_on(async {
                    assert_eq!(count(&env.side, "executions", "crash").await, 1, "the child ran the body");
                    assert_eq!(count(&env.pool, "effects", "crash").await, 0, "its effect rolled back");
                    let first = pay(&env, Some("crash"), 500, "retry", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(first.unwrap(), "receipt 500 by retry");
                    let again = pay(&env, Some("crash"), 500, "again", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(again.unwrap(), "receipt 500 by retry", "replayed");
                    assert_eq!(count(&env.side, "executions", "crash").await, 2, "the retry executed once");
                    assert_eq!(count(&env.pool, "effects", "crash").await, 1, "one effect row");
                    env.close().await;
                });
            }

            /// The client goes away mid-body (the handler future is dropped after the effect
            /// `INSERT`): nothing commits, the retry executes once.
            #[test]
            fn dropped_future_after_effect_commits_nothing() {
                let db = $new_db("dropped");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = std::sync::Arc::new(setup(&db).await);
                    let e = env.clone();
                    let handler = tokio::spawn(async move {
                        pay(&e, Some("gone"), 700, "gone", policy(), Then::Hang).await
                    });
                    // Wait until the body has inserted (observable: its run is recorded first).
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while count(&env.side, "executions", "gone").await == 0 {
                        assert!(std::time::Instant::now() < deadline, "the body never ran");
                        tokio::task::yield_now().await;
                    }
                    handler.abort();
                    assert!(handler.await.unwrap_err().is_cancelled());
                    let retry = pay(&env, Some("gone"), 700, "retry", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(retry.unwrap(), "receipt 700 by retry");
                    assert_eq!(count(&env.side, "executions", "gone").await, 2);
                    assert_eq!(count(&env.pool, "effects", "gone").await, 1, "only the retry's effect");
                    let whose: String = sqlx::query_scalar("SELECT who FROM effects WHERE key = 'gone'")
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(whose, "retry");
                    env.close().await;
                });
            }

            /// A body that returns `Err` after its `INSERT`: zero rows, and the key is free.
            #[test]
            fn err_after_effect_rolls_back_and_frees_the_key() {
                let db = $new_db("err");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    let failed = pay(&env, Some("err"), 5, "first", policy(), Then::Fail).await;
                    assert!(failed.is_err());
                    assert_eq!(count(&env.pool, "effects", "err").await, 0, "the effect rolled back");
                    let record: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racefree_idempotency")
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(record, 0, "no record left");
                    let retry = pay(&env, Some("err"), 5, "retry", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(retry.unwrap(), "receipt 5 by retry", "the key was free: executed");
                    assert_eq!(count(&env.pool, "effects", "err").await, 1);
                    env.close().await;
                });
            }

            /// A body that ends the store's transaction itself and returns `Ok` never gets an
            /// `Ok` for what did not commit. After its own `ROLLBACK` the call is
            /// `OutcomeUnknown`: no effect, no record, and the retry executes once. After its
            /// own `COMMIT` (the effect committed, atomicity lost): PostgreSQL's outcome finds
            /// the claim committed by another transaction than its own and stores nothing, so the
            /// call is `OutcomeUnknown` and the committed claim holds the key (`Undecodable`,
            /// never a second execution); SQLite finds its savepoint gone and answers `OutcomeUnknown`,
            /// storing nothing (its write lock went with that `COMMIT`, so a record written
            /// then would not be the claim's). A claim over another request's expired record
            /// whose body rolls back leaves that record as it was.
            #[test]
            fn a_body_that_ends_the_transaction_never_gets_an_ok_for_what_did_not_commit() {
                let db = $new_db("ended");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    let records = |key: &'static str| {
                        let pool = env.pool.clone();
                        async move {
                            // (A rolled-back claim on PostgreSQL may leave an expired placeholder,
                            // fingerprint '', which counts as no record.)
                            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM racefree_idempotency WHERE key LIKE '%' || $1 AND fingerprint <> ''")
                                .bind(format!("#{key}"))
                                .fetch_one(&pool)
                                .await
                                .unwrap()
                        }
                    };
                    let rolled = pay(&env, Some("rolled"), 5, "first", policy(), Then::End("ROLLBACK")).await;
                    assert!(matches!(rolled, Err(IdempotencyError::OutcomeUnknown { .. })), "{rolled:?}");
                    assert_eq!(count(&env.pool, "effects", "rolled").await, 0, "the body rolled its effect back");
                    assert_eq!(records("rolled").await, 0, "no record of the request");
                    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racefree_idempotency WHERE key LIKE '%' || $1")
                        .bind("#rolled")
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(rows, 0, "no placeholder either: without a BEGIN of the body's own, the outcome's statements ran in an implicit transaction that rolled back");
                    let retry = pay(&env, Some("rolled"), 5, "retry", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(retry.unwrap(), "receipt 5 by retry", "the retry executed");
                    assert_eq!(count(&env.pool, "effects", "rolled").await, 1);

                    let committed = pay(&env, Some("committed"), 6, "first", policy(), Then::End("COMMIT")).await;
                    assert_eq!(count(&env.pool, "effects", "committed").await, 1, "the body committed its effect");
                    if $feature == "postgres" {
                        assert!(matches!(committed, Err(IdempotencyError::OutcomeUnknown { .. })), "{committed:?}");
                        let again = pay(&env, Some("committed"), 6, "again", policy(), Then::Succeed { ms: 0 }).await;
                        assert!(matches!(again, Err(IdempotencyError::Undecodable { .. })), "held, never run again: {again:?}");
                        assert_eq!(count(&env.side, "executions", "committed").await, 1);
                    } else {
                        assert!(matches!(committed, Err(IdempotencyError::OutcomeUnknown { .. })), "{committed:?}");
                        assert_eq!(records("committed").await, 0, "no record written outside the claim");
                    }

                    // A claim over another request's expired record whose body sends its own
                    // `ROLLBACK`: the old record is back, and the outcome's write (outside the
                    // transaction now) must not land on it.
                    pay(&env, Some("taken"), 7, "old", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                    age(&env.pool, "tests::pay##taken").await;
                    let over = pay(&env, Some("taken"), 8, "new", policy(), Then::End("ROLLBACK")).await;
                    assert!(matches!(over, Err(IdempotencyError::OutcomeUnknown { .. })), "{over:?}");
                    let read = match $feature {
                        "postgres" => "SELECT outcome::text FROM racefree_idempotency WHERE key = 'tests::pay##taken'",
                        _ => "SELECT outcome FROM racefree_idempotency WHERE key = 'tests::pay##taken'",
                    };
                    let outcome: String = sqlx::query_scalar(read).fetch_one(&env.pool).await.unwrap();
                    assert!(outcome.contains("receipt 7 by old"), "the old record is untouched: {outcome}");
                    env.close().await;
                });
            }

            /// Same key, another request: `Conflict`, the stored outcome untouched; a record
            /// that does not decode is `Undecodable`, never a re-execution.
            #[test]
            fn conflict_and_undecodable_record_never_execute() {
                let db = $new_db("conflict");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    pay(&env, Some("k"), 10, "first", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                    let other = pay(&env, Some("k"), 11, "other", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(other, Err(IdempotencyError::Conflict { key: "k".into() }));
                    let same = pay(&env, Some("k"), 10, "same", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(same.unwrap(), "receipt 10 by first");

                    sqlx::query("UPDATE racefree_idempotency SET outcome = '{\"v\": 99, \"value\": 1}'")
                        .execute(&env.pool)
                        .await
                        .unwrap();
                    let undecodable = pay(&env, Some("k"), 10, "later", policy(), Then::Succeed { ms: 0 }).await;
                    assert!(matches!(undecodable, Err(IdempotencyError::Undecodable { .. })), "{undecodable:?}");
                    assert_eq!(count(&env.side, "executions", "k").await, 1, "nothing re-executed");
                    env.close().await;
                });
            }

            /// On PostgreSQL a store reads a key's record first only if it answered or
            /// completed that key lately; for any other key it claims first and learns of the
            /// record from the refused claim (SQLite always reads first). Each call below but
            /// the executing store's own goes through a store that never saw the key (a fresh
            /// one on the same pool, as another process would be), and its answers are the
            /// ones the store that saw it gives: replay, `Conflict`, and after expiry one
            /// execution that replaces the record. (A key in flight refuses a claim too:
            /// `pg_reject_answers_in_progress_while_the_owner_is_open` asks a store that
            /// never answered it.)
            #[test]
            fn a_store_that_never_saw_the_key_answers_as_one_that_did() {
                let db = $new_db("unseen");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    let fresh = || env.with_store_on(env.pool.clone());
                    pay(&env, Some("k"), 10, "first", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                    let same = pay(&env, Some("k"), 10, "same", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(same.unwrap(), "receipt 10 by first", "the store that executed replays");
                    let same = pay(&fresh(), Some("k"), 10, "same", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(same.unwrap(), "receipt 10 by first", "a fresh store replays");
                    let other = pay(&env, Some("k"), 11, "other", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(other, Err(IdempotencyError::Conflict { key: "k".into() }), "the store that executed");
                    let other = pay(&fresh(), Some("k"), 11, "other", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(other, Err(IdempotencyError::Conflict { key: "k".into() }), "a fresh store");
                    age(&env.pool, "tests::pay##k").await;
                    let third = pay(&fresh(), Some("k"), 12, "third", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(third.unwrap(), "receipt 12 by third", "expired: executed again");
                    let replayed = pay(&fresh(), Some("k"), 12, "fourth", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(replayed.unwrap(), "receipt 12 by third");
                    assert_eq!(count(&env.side, "executions", "k").await, 2, "the first and the third ran");
                    assert_eq!(count(&env.pool, "effects", "k").await, 2);
                    env.close().await;
                });
            }

            /// Keys and outcomes are written into the statements that open and commit the
            /// transaction (no parameters there; on PostgreSQL dollar-quoted as `$rf$…$rf$`,
            /// or in hex where the value holds `$rf`): quotes, backslashes, SQL, dollar quotes
            /// (ours among them, and a value ending in half of our closing one) and non-ASCII
            /// text in either are stored and replayed byte for byte, and execute nothing else.
            #[test]
            fn keys_and_outcomes_that_look_like_sql_round_trip() {
                let db = $new_db("quoting");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    let keys = [
                        "it's",
                        r"back\slash\",
                        r"E'\'",
                        "'); DROP TABLE effects; --",
                        "$$; COMMIT; $$",
                        "$rf$); COMMIT; --",
                        "ends in $rf",
                        "$r$f$$",
                        "ключ-🔑",
                    ];
                    for key in keys {
                        let first = pay(&env, Some(key), 1, key, policy(), Then::Succeed { ms: 0 }).await;
                        assert_eq!(first.unwrap(), format!("receipt 1 by {key}"), "{key}");
                        let again = pay(&env, Some(key), 1, "again", policy(), Then::Succeed { ms: 0 }).await;
                        assert_eq!(again.unwrap(), format!("receipt 1 by {key}"), "{key}: replayed");
                        assert_eq!(count(&env.side, "executions", key).await, 1, "{key}: executed once");
                        assert_eq!(count(&env.pool, "effects", key).await, 1, "{key}: one effect row");
                    }
                    let mut stored: Vec<String> = sqlx::query_scalar("SELECT key FROM racefree_idempotency")
                        .fetch_all(&env.pool)
                        .await
                        .unwrap();
                    stored.sort();
                    let mut expected: Vec<String> = keys.iter().map(|key| format!("tests::pay##{key}")).collect();
                    expected.sort();
                    assert_eq!(stored, expected, "the record keys, byte for byte");
                    env.close().await;
                });
            }

            /// The caller's future is dropped at every point of a completion (its outcome
            /// write and `COMMIT` are one query): 60 rounds on a pool of one connection, the
            /// round's drop after `round × 40 µs`, with an effect big enough to make the
            /// commit take a while. In every round the connection the call leaves behind is
            /// outside any transaction (a transaction of the application's own on it commits
            /// for everyone to see), and the next call replays the dropped call's outcome if
            /// its commit landed and executes if not: one effect row either way.
            #[test]
            fn completions_dropped_anywhere_leave_the_connection_clean() {
                let db = $new_db("dropped_completion");
                let rt = sql::runtime();
                rt.block_on(async {
                    setup(&db).await.close().await;
                    let (pool, side) = $one(&db).await;
                    let env = Env { store: Store::new(pool.clone()), pool, side };
                    let filler = "x".repeat(256 * 1024);
                    for round in 0..60u64 {
                        let key = format!("drop-{round}");
                        let call = Call::new("tests::pay", None, Some(key.as_str()), Fingerprint::of(&round), policy());
                        let Begin::<_, String>::Execute(mut execution) = begin(&env.store, call).await else {
                            panic!("round {round}: a fresh key executes")
                        };
                        let tx = execution.lease_mut().unwrap().connection();
                        sqlx::query("INSERT INTO effects (key, who) VALUES ($1, $2)")
                            .bind(&key)
                            .bind(&filler)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        let outcome = format!("receipt {round}");
                        let finish = execution.finish(&outcome);
                        let _ = tokio::time::timeout(Duration::from_micros(40 * round), finish).await;

                        // The application's own transaction on the connection left behind.
                        let mut own = env.pool.begin().await.unwrap();
                        sqlx::query("INSERT INTO outcomes (key, outcome) VALUES ($1, 'own')")
                            .bind(&key)
                            .execute(&mut *own)
                            .await
                            .unwrap();
                        own.commit().await.unwrap();
                        let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outcomes WHERE key = $1")
                            .bind(&key)
                            .fetch_one(&env.pool)
                            .await
                            .unwrap();
                        assert_eq!(seen, 1, "round {round}: the application's commit took effect");

                        // Whatever the dropped commit came to (the server may still be
                        // finishing it), the next call sees it: it replays the outcome if it
                        // committed, and executes if not, never both.
                        let again = pay(&env, Some(&key), round, "again", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                        assert_eq!(count(&env.pool, "effects", &key).await, 1, "round {round}: one effect row");
                        let whose: String = sqlx::query_scalar("SELECT who FROM effects WHERE key = $1")
                            .bind(&key)
                            .fetch_one(&env.pool)
                            .await
                            .unwrap();
                        if again == outcome {
                            assert_eq!(whose, filler, "round {round}: replayed the dropped call's commit");
                        } else {
                            assert_eq!(again, format!("receipt {round} by again"), "round {round}");
                            assert_eq!(whose, "again", "round {round}: executed once more");
                        }
                    }
                    env.close().await;
                });
            }

            /// A call without a key runs in a transaction too (no record): its effect commits
            /// on success and rolls back on `Err`.
            #[test]
            fn call_without_key_still_runs_in_a_transaction() {
                let db = $new_db("nokey");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    pay(&env, None, 1, "a", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                    pay(&env, None, 1, "b", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                    assert!(pay(&env, None, 1, "c", policy(), Then::Fail).await.is_err());
                    assert_eq!(count(&env.side, "executions", "").await, 3, "no key: every call executes");
                    assert_eq!(count(&env.pool, "effects", "").await, 2, "the failed one rolled back");
                    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racefree_idempotency")
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(records, 0);
                    env.close().await;
                });
            }

            /// Expired records are replaced by the next claim (which executes again);
            /// `purge_expired` deletes only expired records, never a fresh or in-flight one.
            #[test]
            fn expired_records_execute_again_and_only_they_are_purged() {
                let db = $new_db("expiry");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = std::sync::Arc::new(setup(&db).await);
                    for key in ["old-1", "old-2", "fresh"] {
                        pay(&env, Some(key), 1, "first", policy(), Then::Succeed { ms: 0 }).await.unwrap();
                    }
                    age(&env.pool, "tests::pay##old-1").await;
                    age(&env.pool, "tests::pay##old-2").await;
                    // An expired record is not replayed: the call executes and replaces it.
                    let again = pay(&env, Some("old-1"), 2, "second", policy(), Then::Succeed { ms: 0 }).await;
                    assert_eq!(again.unwrap(), "receipt 2 by second", "another fingerprint is fine once expired");
                    assert_eq!(count(&env.side, "executions", "old-1").await, 2);

                    // A claim in flight on an expired record is not purged from under it.
                    age(&env.pool, "tests::pay##old-1").await;
                    let call = Call::new("tests::pay", None, Some("old-1"), Fingerprint::of(&3_u64), policy());
                    let Begin::Execute(in_flight) = begin(&env.store, call).await else { panic!("expired: executes") };
                    // PostgreSQL skips the row-locked record at once; SQLite's purge waits for
                    // the write lock, i.e. until the claim commits its fresh record.
                    let purge = tokio::spawn({
                        let env = env.clone();
                        async move { env.store.purge_expired().await.unwrap() }
                    });
                    if $feature == "postgres" {
                        assert_eq!(purge.await.unwrap(), 1, "only old-2 goes");
                        in_flight.finish(&"receipt 3".to_owned()).await.unwrap();
                    } else {
                        in_flight.finish(&"receipt 3".to_owned()).await.unwrap();
                        assert_eq!(purge.await.unwrap(), 1, "only old-2 goes");
                    }
                    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM racefree_idempotency ORDER BY key")
                        .fetch_all(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(keys, ["tests::pay##fresh", "tests::pay##old-1"]);
                    assert_eq!(env.store.purge_expired().await.unwrap(), 0);
                    env.close().await;
                });
            }

            /// `pay` as the attribute writes it: the `tx` parameter is the store's transaction
            /// and is not passed by callers.
            #[racefree::idempotent(key = key, store = env.store, skip(env, who, fail))]
            pub async fn charge(
                env: &Env,
                key: &str,
                cents: u64,
                who: &str,
                fail: bool,
                mut tx: racefree::sql::Tx<'_, $Database>,
            ) -> Result<String, IdempotencyError> {
                sqlx::query("INSERT INTO executions (key, who) VALUES ($1, $2)")
                    .bind(key)
                    .bind(who)
                    .execute(&env.side)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, $2)")
                    .bind(key)
                    .bind(who)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await; // work; duplicates pile up
                if fail {
                    return Err(IdempotencyError::StoreUnavailable { reason: "the body failed".into() });
                }
                Ok(format!("receipt {cents} by {who}"))
            }

            /// Through the attribute: 25 concurrent callers of one key → one execution, one
            /// effect row, 25 equal outcomes; an `Err` after the `INSERT` leaves no row and a
            /// free key; another payload is a `Conflict`.
            #[test]
            fn attribute_runs_the_body_in_the_store_transaction() {
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
                                charge(&env, "attr", 42, &format!("caller-{caller}"), false).await
                            })
                        })
                        .collect();
                    let mut outcomes = Vec::new();
                    for caller in callers {
                        outcomes.push(caller.await.unwrap().expect("every caller gets the outcome"));
                    }
                    assert_eq!(count(&env.side, "executions", "attr").await, 1, "one execution");
                    assert_eq!(count(&env.pool, "effects", "attr").await, 1, "one effect row");
                    assert!(outcomes.iter().all(|o| *o == outcomes[0]), "{outcomes:?}");

                    assert!(charge(&env, "attr-err", 1, "first", true).await.is_err());
                    assert_eq!(count(&env.pool, "effects", "attr-err").await, 0, "rolled back");
                    assert_eq!(charge(&env, "attr-err", 1, "retry", false).await.unwrap(), "receipt 1 by retry");
                    assert_eq!(count(&env.pool, "effects", "attr-err").await, 1);

                    let other = charge(&env, "attr", 43, "other", false).await;
                    assert_eq!(other, Err(IdempotencyError::Conflict { key: "attr".into() }));
                    env.close().await;
                });
            }

            /// A measurement that records its run, inserts its effect and returns `value`.
            #[racefree::idempotent(key = key, store = env.store, skip(env, value))]
            async fn measure(
                env: &Env,
                key: &str,
                value: f64,
                mut tx: racefree::sql::Tx<'_, $Database>,
            ) -> Result<f64, IdempotencyError> {
                sqlx::query("INSERT INTO executions (key, who) VALUES ($1, 'measure')")
                    .bind(key)
                    .execute(&env.side)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'measure')")
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Ok(value)
            }

            /// `measure` with a text outcome.
            #[racefree::idempotent(key = key, store = env.store, skip(env, text))]
            async fn label(
                env: &Env,
                key: &str,
                text: &str,
                mut tx: racefree::sql::Tx<'_, $Database>,
            ) -> Result<String, IdempotencyError> {
                sqlx::query("INSERT INTO executions (key, who) VALUES ($1, 'label')")
                    .bind(key)
                    .execute(&env.side)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'label')")
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Ok(text.to_owned())
            }

            /// An outcome no replay could return is never stored: a NaN (serde_json writes it
            /// as `null`, which no `f64` decodes from) on both databases, and on PostgreSQL a
            /// string with a NUL character (JSONB refuses `\u0000`). Each of 3 calls executes
            /// and gets `OutcomeNotStored`, its effect rolled back with it (3 executions, 0
            /// effect rows), never an `Ok` whose replays are `Undecodable`; then the key is
            /// free, and a finite number commits and replays. A backslash before `u0000` (text,
            /// not a NUL) and, on SQLite, a NUL itself are stored and replayed byte for byte.
            #[test]
            fn outcomes_no_replay_could_return_roll_back_and_are_not_stored() {
                let db = $new_db("unreplayable");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    fn not_stored<T>(result: &Result<T, IdempotencyError>, because: &str) -> bool {
                        matches!(result, Err(IdempotencyError::OutcomeNotStored { reason, .. }) if reason.contains(because))
                    }
                    for _ in 0..3 {
                        let nan = measure(&env, "nan", f64::NAN).await;
                        assert!(not_stored(&nan, "does not decode back"), "{nan:?}");
                    }
                    assert_eq!(count(&env.side, "executions", "nan").await, 3, "each call executed");
                    assert_eq!(count(&env.pool, "effects", "nan").await, 0, "each rolled back");
                    assert_eq!(measure(&env, "nan", 1.5).await.unwrap(), 1.5, "the key is free");
                    assert_eq!(measure(&env, "nan", 2.5).await.unwrap(), 1.5, "and now replays");
                    assert_eq!(count(&env.pool, "effects", "nan").await, 1);

                    let escaped = r"a\u0000b";
                    assert_eq!(label(&env, "escaped", escaped).await.unwrap(), escaped);
                    assert_eq!(label(&env, "escaped", "other").await.unwrap(), escaped, "replayed");
                    for _ in 0..3 {
                        let nul = label(&env, "nul", "a\0b").await;
                        match $feature {
                            "postgres" => assert!(not_stored(&nul, "NUL character"), "{nul:?}"),
                            _ => assert_eq!(nul.unwrap(), "a\0b", "stored, then replayed"),
                        }
                    }
                    let (executions, effects) = match $feature {
                        "postgres" => (3, 0),
                        _ => (1, 1),
                    };
                    assert_eq!(count(&env.side, "executions", "nul").await, executions);
                    assert_eq!(count(&env.pool, "effects", "nul").await, effects);
                    env.close().await;
                });
            }

            /// `charge` inside the caller's transaction: the store is `db.within(&mut caller_tx)`,
            /// handed in by the caller.
            #[racefree::idempotent(key = key, store = in_tx, skip(in_tx))]
            async fn charge_in(
                in_tx: &racefree::sql::InCallerTx<'_, $Database>,
                key: &str,
                cents: u64,
                mut tx: racefree::sql::Tx<'_, $Database>,
            ) -> Result<String, IdempotencyError> {
                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'in-tx')")
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Ok(format!("receipt {cents}"))
            }

            /// Inside a transaction the caller opened: a rolled-back caller leaves neither the
            /// record nor the effect (the retry executes); a committed one leaves both (the retry
            /// replays); a body's `Err` rolls back only its savepoint, not the caller's writes.
            #[test]
            fn caller_transaction_decides_record_and_effect_together() {
                let db = $new_db("caller");
                let rt = sql::runtime();
                rt.block_on(async {
                    let env = setup(&db).await;
                    let begin_caller = || async {
                        match $feature {
                            "sqlite" => env.pool.begin_with("BEGIN IMMEDIATE").await.unwrap(),
                            _ => env.pool.begin().await.unwrap(),
                        }
                    };

                    let mut caller = begin_caller().await;
                    let in_tx = env.store.within(&mut caller);
                    assert_eq!(charge_in(&in_tx, "c", 5).await.unwrap(), "receipt 5");
                    caller.rollback().await.unwrap();
                    assert_eq!(count(&env.pool, "effects", "c").await, 0, "rolled back with the caller");
                    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racefree_idempotency")
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(records, 0, "so was the record: a retry executes");

                    let mut caller = begin_caller().await;
                    sqlx::query("INSERT INTO effects (key, who) VALUES ('c', 'caller')")
                        .execute(&mut *caller)
                        .await
                        .unwrap();
                    {
                        let in_tx = env.store.within(&mut caller);
                        let call = Call::new("tests::pay", None, Some("c-err"), Fingerprint::of(&1_u64), policy());
                        let Begin::<_, String>::Execute(mut failing) = begin(&in_tx, call).await else {
                            panic!("executes")
                        };
                        sqlx::query("INSERT INTO effects (key, who) VALUES ('c', 'failed body')")
                            .execute(failing.lease_mut().unwrap().connection())
                            .await
                            .unwrap();
                        failing.release(); // the body's Err: its savepoint rolls back
                    }
                    let in_tx = env.store.within(&mut caller);
                    assert_eq!(charge_in(&in_tx, "c", 5).await.unwrap(), "receipt 5");
                    caller.commit().await.unwrap();
                    let whose: Vec<String> = sqlx::query_scalar("SELECT who FROM effects WHERE key = 'c' ORDER BY who")
                        .fetch_all(&env.pool)
                        .await
                        .unwrap();
                    assert_eq!(whose, ["caller", "in-tx"], "the failed body's write rolled back alone");

                    // A later call outside any caller transaction replays the committed outcome.
                    let mut later = begin_caller().await;
                    let in_tx = env.store.within(&mut later);
                    assert_eq!(charge_in(&in_tx, "c", 5).await.unwrap(), "receipt 5");
                    later.commit().await.unwrap();
                    assert_eq!(count(&env.pool, "effects", "c").await, 2, "replayed: no new effect");
                    env.close().await;
                });
            }

            /// Makes a record's `expires_at` lie in the past.
            async fn age(pool: &Pool<$Database>, key: &str) {
                let sql = if $feature == "postgres" {
                    "UPDATE racefree_idempotency SET expires_at = clock_timestamp() - interval '1 second' WHERE key = $1"
                } else {
                    "UPDATE racefree_idempotency SET expires_at = 0 WHERE key = $1"
                };
                let done = sqlx::query(sql).bind(key).execute(pool).await.unwrap();
                assert_eq!(done.rows_affected(), 1, "record {key}");
            }
        }
    };
}

suite!(
    pg,
    "postgres",
    sqlx::Postgres,
    sql::pg_pools,
    sql::pg_pool_of_one,
    TestDb::pg
);
suite!(
    sqlite,
    "sqlite",
    sqlx::Sqlite,
    sql::sqlite_pools,
    sql::sqlite_pool_of_one,
    TestDb::sqlite
);

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

/// `in_flight = "reject"` on PostgreSQL: while the owner's transaction is open a duplicate
/// gets `InProgress` at once (the advisory lock is taken by someone), a waiting duplicate with
/// a deadline gets `InProgress` at its deadline (`lock_timeout`); after the owner commits
/// both replay its outcome. Nothing runs twice.
#[cfg(feature = "postgres")]
#[test]
fn pg_reject_answers_in_progress_while_the_owner_is_open() {
    use std::time::Instant;
    let db = TestDb::pg("reject");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let reject = pg::policy().reject_in_flight();
        let call = Call::new(
            "tests::pay",
            None,
            Some("r"),
            Fingerprint::of(&1_u64),
            reject,
        );
        let Begin::Execute(mut owner) = begin(&env.store, call).await else {
            panic!("the first call executes")
        };
        sqlx::query("INSERT INTO effects (key, who) VALUES ('r', 'owner')")
            .execute(owner.lease_mut().unwrap().connection())
            .await
            .unwrap();

        let started = Instant::now();
        let rejected = pg::pay(&env, Some("r"), 1, "dup", reject, Then::Succeed { ms: 0 }).await;
        assert_eq!(
            rejected,
            Err(IdempotencyError::InProgress { key: "r".into() })
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered at once"
        );

        let patient = pg::policy().wait_timeout(Duration::from_millis(200));
        let waited = pg::pay(
            &env,
            Some("r"),
            1,
            "waiter",
            patient,
            Then::Succeed { ms: 0 },
        )
        .await;
        assert_eq!(
            waited,
            Err(IdempotencyError::InProgress { key: "r".into() })
        );
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "waited for its deadline"
        );

        owner.finish(&"receipt by owner".to_owned()).await.unwrap();
        let replayed = pg::pay(&env, Some("r"), 1, "late", reject, Then::Succeed { ms: 0 }).await;
        assert_eq!(replayed.unwrap(), "receipt by owner");
        assert_eq!(
            pg::count(&env.side, "executions", "r").await,
            0,
            "no duplicate ran its body"
        );
        assert_eq!(pg::count(&env.pool, "effects", "r").await, 1);
        env.close().await;
    });
}

/// On SQLite a duplicate in flight cannot be told from another writer: with `reject` it
/// still waits for the database's write lock, and a `busy_timeout` shorter than the owner's
/// transaction turns that into `StoreUnavailable` (nothing ran); after the commit it replays.
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_duplicate_in_flight_waits_for_the_write_lock_bounded_by_busy_timeout() {
    let db = TestDb::sqlite("reject");
    sql::runtime().block_on(async {
        let env = sqlite::setup(&db).await;
        let reject = sqlite::policy().reject_in_flight();
        let call = Call::new(
            "tests::pay",
            None,
            Some("r"),
            Fingerprint::of(&1_u64),
            reject,
        );
        let Begin::Execute(mut owner) = begin(&env.store, call).await else {
            panic!("the first call executes")
        };
        sqlx::query("INSERT INTO effects (key, who) VALUES ('r', 'owner')")
            .execute(owner.lease_mut().unwrap().connection())
            .await
            .unwrap();

        let impatient = env.with_store_on(db.sqlite_pool(2, Duration::from_millis(100)).await);
        let busy = sqlite::pay(
            &impatient,
            Some("r"),
            1,
            "dup",
            reject,
            Then::Succeed { ms: 0 },
        )
        .await;
        assert!(
            matches!(busy, Err(IdempotencyError::StoreUnavailable { .. })),
            "{busy:?}"
        );

        owner.finish(&"receipt by owner".to_owned()).await.unwrap();
        let replayed = sqlite::pay(
            &impatient,
            Some("r"),
            1,
            "late",
            reject,
            Then::Succeed { ms: 0 },
        )
        .await;
        assert_eq!(replayed.unwrap(), "receipt by owner");
        assert_eq!(sqlite::count(&env.side, "executions", "r").await, 0);
        assert_eq!(sqlite::count(&env.pool, "effects", "r").await, 1);
        env.close().await;
    });
}

/// On SQLite the claim takes the database's one write lock, so a live record must answer
/// before that lock is asked for (every SQLite claim reads first). Another writer holds the
/// write lock throughout. Stores new to the key (each made for one call, on a pool with a
/// 100 ms `busy_timeout`) replay it and answer `Conflict` for another payload (waiting for
/// the lock would have been `StoreUnavailable`); the same for a key with a NUL byte. Nothing
/// executes but the two first calls. (A claim-first SQLite store, tried in stop 23, had to
/// check for the record before its `BEGIN IMMEDIATE` to pass this.)
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_replay_by_a_store_new_to_the_key_never_waits_for_the_write_lock() {
    use sqlx::Connection;
    let db = TestDb::sqlite("unlocked");
    sql::runtime().block_on(async {
        let env = sqlite::setup(&db).await;
        let keys = ["w", "nul\0key"];
        for key in keys {
            let first = sqlite::pay(
                &env,
                Some(key),
                1,
                "first",
                sqlite::policy(),
                Then::Succeed { ms: 0 },
            )
            .await;
            assert_eq!(first.unwrap(), "receipt 1 by first", "{key:?}");
        }

        let writer_pool = db.sqlite_pool(1, Duration::from_secs(5)).await;
        let mut writer = writer_pool.acquire().await.unwrap();
        let mut holding = writer.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO effects (key, who) VALUES ('other', 'writer')")
            .execute(&mut *holding)
            .await
            .unwrap();

        let impatient_pool = db.sqlite_pool(2, Duration::from_millis(100)).await;
        let fresh = || env.with_store_on(impatient_pool.clone());
        for key in keys {
            let replayed = sqlite::pay(
                &fresh(),
                Some(key),
                1,
                "retry",
                sqlite::policy(),
                Then::Succeed { ms: 0 },
            )
            .await;
            assert_eq!(
                replayed.unwrap(),
                "receipt 1 by first",
                "{key:?}: replayed while the lock is held"
            );
            let other = sqlite::pay(
                &fresh(),
                Some(key),
                2,
                "other",
                sqlite::policy(),
                Then::Succeed { ms: 0 },
            )
            .await;
            assert_eq!(
                other,
                Err(IdempotencyError::Conflict { key: key.into() }),
                "{key:?}"
            );
        }

        holding.rollback().await.unwrap();
        drop(writer);
        for key in keys {
            assert_eq!(
                sqlite::count(&env.side, "executions", key).await,
                1,
                "{key:?}: only the first ran"
            );
            assert_eq!(sqlite::count(&env.pool, "effects", key).await, 1, "{key:?}");
        }
        env.close().await;
    });
}

/// The connection is killed (`pg_terminate_backend`) in the middle of a body, and again
/// after a body, before its outcome is written: both times the caller gets an error
/// (the body's own, then `StoreUnavailable`), nothing committed, and the retry executes once
/// on a fresh connection.
#[cfg(feature = "postgres")]
#[test]
fn pg_killed_connection_is_a_typed_error_then_recovery() {
    let db = TestDb::pg("killed");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        async fn kill(connection: &mut sqlx::PgConnection) {
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            sql::pg_admin(&format!("SELECT pg_terminate_backend({pid})"));
        }

        // Mid-body: the body's next statement fails; it returns Err, the lease is released.
        let call = Call::new(
            "tests::pay",
            None,
            Some("kill"),
            Fingerprint::of(&9_u64),
            pg::policy(),
        );
        let Begin::<_, String>::Execute(mut execution) = begin(&env.store, call).await else {
            panic!("the first call executes")
        };
        let connection = execution.lease_mut().unwrap().connection();
        sqlx::query("INSERT INTO effects (key, who) VALUES ('kill', 'first')")
            .execute(&mut *connection)
            .await
            .unwrap();
        kill(connection).await;
        let next = sqlx::query("INSERT INTO effects (key, who) VALUES ('kill', 'first-2')")
            .execute(&mut *connection)
            .await;
        assert!(
            next.is_err(),
            "the killed connection fails the body's next statement"
        );
        execution.release();

        // After the body: completing reports the failure instead of a false success.
        let call = Call::new(
            "tests::pay",
            None,
            Some("kill"),
            Fingerprint::of(&9_u64),
            pg::policy(),
        );
        let Begin::Execute(mut execution) = begin(&env.store, call).await else {
            panic!("the key is free after the rollback")
        };
        let connection = execution.lease_mut().unwrap().connection();
        sqlx::query("INSERT INTO effects (key, who) VALUES ('kill', 'second')")
            .execute(&mut *connection)
            .await
            .unwrap();
        kill(connection).await;
        let finished = execution.finish(&"receipt".to_owned()).await;
        assert!(
            matches!(finished, Err(IdempotencyError::StoreUnavailable { .. })),
            "{finished:?}"
        );

        assert_eq!(
            pg::count(&env.pool, "effects", "kill").await,
            0,
            "nothing committed"
        );
        let retry = pg::pay(
            &env,
            Some("kill"),
            9,
            "retry",
            pg::policy(),
            Then::Succeed { ms: 0 },
        )
        .await;
        assert_eq!(retry.unwrap(), "receipt 9 by retry");
        let again = pg::pay(
            &env,
            Some("kill"),
            9,
            "again",
            pg::policy(),
            Then::Succeed { ms: 0 },
        )
        .await;
        assert_eq!(again.unwrap(), "receipt 9 by retry", "replayed");
        assert_eq!(
            pg::count(&env.pool, "effects", "kill").await,
            1,
            "one effect row"
        );
        env.close().await;
    });
}

/// The server restarts while a body is in its transaction (on a private cluster: the shared
/// server is never restarted). Twice: once the body's next statement fails (the caller gets
/// the body's error), once the body had finished and completing fails (`StoreUnavailable`,
/// never `Ok` for an effect that rolled back). Both times nothing committed (0 rows, no
/// record); the retry executes once (1 row) and the next call replays it.
#[cfg(feature = "postgres")]
#[test]
fn pg_server_restart_mid_body_is_a_typed_error_then_recovery() {
    let Some(server) = sql::PrivatePg::start() else {
        return;
    };
    let server = std::sync::Arc::new(server);
    sql::runtime().block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(20))
            .connect(&server.url())
            .await
            .unwrap();
        let env = pg::Env {
            store: racefree::sql::PgStore::new(pool.clone()),
            pool: pool.clone(),
            side: pool,
        };
        env.store.migrate().await.unwrap();
        for table in sql::TEST_TABLES {
            sqlx::query(table).execute(&env.pool).await.unwrap();
        }
        let restart = || {
            let server = server.clone();
            tokio::task::spawn_blocking(move || server.restart())
        };
        let call = || {
            Call::new(
                "tests::pay",
                None,
                Some("restart"),
                Fingerprint::of(&3_u64),
                pg::policy(),
            )
        };

        // Mid-body: the body's next statement fails; it returns its error, the lease goes.
        let Begin::<_, String>::Execute(mut execution) = begin(&env.store, call()).await else {
            panic!("the first call executes")
        };
        let connection = execution.lease_mut().unwrap().connection();
        sqlx::query("INSERT INTO effects (key, who) VALUES ('restart', 'first')")
            .execute(&mut *connection)
            .await
            .unwrap();
        restart().await.unwrap();
        let next = sqlx::query("INSERT INTO effects (key, who) VALUES ('restart', 'first-2')")
            .execute(&mut *connection)
            .await;
        assert!(next.is_err(), "the restart fails the body's next statement");
        execution.release();
        assert_eq!(
            pg::count(&env.pool, "effects", "restart").await,
            0,
            "rolled back"
        );

        // After the body: completing reports the failure instead of a false success.
        let Begin::<_, String>::Execute(mut execution) = begin(&env.store, call()).await else {
            panic!("the key is free after the rollback")
        };
        sqlx::query("INSERT INTO effects (key, who) VALUES ('restart', 'second')")
            .execute(execution.lease_mut().unwrap().connection())
            .await
            .unwrap();
        restart().await.unwrap();
        let finished = execution.finish(&"receipt by second".to_owned()).await;
        assert!(
            matches!(finished, Err(IdempotencyError::StoreUnavailable { .. })),
            "{finished:?}"
        );
        assert_eq!(
            pg::count(&env.pool, "effects", "restart").await,
            0,
            "rolled back"
        );
        let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racefree_idempotency")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(records, 0, "no record survived the restart");

        let retry = pg::pay(
            &env,
            Some("restart"),
            3,
            "retry",
            pg::policy(),
            Then::Succeed { ms: 0 },
        );
        assert_eq!(retry.await.unwrap(), "receipt 3 by retry");
        assert_eq!(
            pg::count(&env.pool, "effects", "restart").await,
            1,
            "executed once"
        );
        let again = pg::pay(
            &env,
            Some("restart"),
            3,
            "again",
            pg::policy(),
            Then::Succeed { ms: 0 },
        );
        assert_eq!(again.await.unwrap(), "receipt 3 by retry", "replayed");
        assert_eq!(
            pg::count(&env.side, "executions", "restart").await,
            1,
            "the replay ran nothing"
        );
        assert_eq!(
            pg::count(&env.pool, "effects", "restart").await,
            1,
            "one effect row"
        );
        env.close().await;
    });
}

/// A statement timeout (SQLSTATE 57014) and a serialization failure (40001) in the store's
/// own statements are `StoreUnavailable` naming the cause, as documented: the outcome's
/// `UPDATE` outlasting the pool's `statement_timeout`, the same `UPDATE` losing a conflict,
/// and a conflict at `COMMIT` itself (a deferred trigger), which the server answered, so it is
/// a rollback (`StoreUnavailable`), not `OutcomeUnknown`. Each time nothing committed (0
/// rows, no record); once the faults are gone, the retry executes once and then replays.
#[cfg(feature = "postgres")]
#[test]
fn pg_statement_timeout_and_serialization_failure_are_store_unavailable() {
    let db = TestDb::pg("faults");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        sqlx::raw_sql(sql::PG_FAULTS)
            .execute(&env.pool)
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TRIGGER slow BEFORE UPDATE ON racefree_idempotency FOR EACH ROW \
               WHEN (NEW.key LIKE '%#slow') EXECUTE FUNCTION rf_slow(); \
             CREATE TRIGGER conflict BEFORE UPDATE ON racefree_idempotency FOR EACH ROW \
               WHEN (NEW.key LIKE '%#conflict') EXECUTE FUNCTION rf_serialization_failure(); \
             CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON racefree_idempotency \
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
               WHEN (NEW.key LIKE '%#at-commit') EXECUTE FUNCTION rf_serialization_failure();",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        let impatient =
            env.with_store_on(db.pg_pool_with(4, "SET statement_timeout = '300ms'").await);
        let ok = Then::Succeed { ms: 0 };
        let unavailable = |result: Result<String, IdempotencyError>| match result {
            Err(IdempotencyError::StoreUnavailable { reason }) => reason,
            other => panic!("expected StoreUnavailable, got {other:?}"),
        };

        let slow = pg::pay(&impatient, Some("slow"), 1, "first", pg::policy(), ok).await;
        let reason = unavailable(slow);
        assert!(reason.contains("statement timeout"), "{reason}");
        let conflict = pg::pay(&env, Some("conflict"), 1, "first", pg::policy(), ok).await;
        let reason = unavailable(conflict);
        assert!(reason.contains("serialization failure"), "{reason}");
        let at_commit = pg::pay(&env, Some("at-commit"), 1, "first", pg::policy(), ok).await;
        let reason = unavailable(at_commit);
        assert!(
            reason.contains("rolled back") && reason.contains("serialization failure"),
            "{reason}"
        );
        let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racefree_idempotency")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(records, 0, "no record committed");

        sqlx::raw_sql(
            "DROP TRIGGER slow ON racefree_idempotency; \
             DROP TRIGGER conflict ON racefree_idempotency; \
             DROP TRIGGER at_commit ON racefree_idempotency;",
        )
        .execute(&env.pool)
        .await
        .unwrap();
        for key in ["slow", "conflict", "at-commit"] {
            assert_eq!(
                pg::count(&env.pool, "effects", key).await,
                0,
                "{key}: rolled back"
            );
            let retry = pg::pay(&impatient, Some(key), 1, "retry", pg::policy(), ok).await;
            assert_eq!(retry.unwrap(), "receipt 1 by retry", "{key}");
            let again = pg::pay(&impatient, Some(key), 1, "again", pg::policy(), ok).await;
            assert_eq!(again.unwrap(), "receipt 1 by retry", "{key}: replayed");
            assert_eq!(
                pg::count(&env.side, "executions", key).await,
                2,
                "{key}: failed + retry"
            );
            assert_eq!(
                pg::count(&env.pool, "effects", key).await,
                1,
                "{key}: one effect row"
            );
        }
        impatient.store.pool().unwrap().close().await;
        env.close().await;
    });
}

/// Construction: a lazily created pool from a URL works on first use; a bad URL or a bad
/// table prefix is a typed error on every call, never a panic; a prefix names the tables.
#[cfg(feature = "sqlite")]
#[test]
fn lazy_store_and_prefix_fail_typed_and_name_the_tables() {
    use racefree::sql::SqliteStore;
    let dir = tempfile::tempdir().unwrap();
    let url: &'static str = Box::leak(
        format!("sqlite://{}?mode=rwc", dir.path().join("lazy.db").display()).into_boxed_str(),
    );
    sql::runtime().block_on(async {
        let store = SqliteStore::lazy_with_prefix(url, "billing_");
        store.migrate().await.unwrap();
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(store.pool().unwrap())
                .await
                .unwrap();
        assert_eq!(tables, ["billing_idempotency", "billing_sequences"]);
        let call = Call::new(
            "tests::lazy",
            None,
            Some("k"),
            Fingerprint::of(&1_u64),
            sqlite::policy(),
        );
        let Begin::<_, String>::Execute(execution) = begin(&store, call).await else {
            panic!("executes")
        };
        execution.finish(&"done".to_owned()).await.unwrap();

        let broken = SqliteStore::lazy("not a url");
        let call = Call::new(
            "tests::lazy",
            None,
            Some("k"),
            Fingerprint::of(&1_u64),
            sqlite::policy(),
        );
        let refused = begin::<_, String>(&broken, call).await;
        assert!(matches!(
            refused,
            Begin::Refuse(IdempotencyError::StoreUnavailable { .. })
        ));
        assert!(broken.migrate().await.is_err());

        assert!(SqliteStore::new(store.pool().unwrap().clone())
            .with_prefix("x; DROP TABLE y")
            .is_err());
        let bad_static = SqliteStore::lazy_with_prefix(url, "1bad");
        assert!(
            bad_static.migrate().await.is_err(),
            "a bad const prefix fails, typed"
        );
    });
}

/// A pool with every connection held by a body: the next call waits the pool's
/// `acquire_timeout`, then gets `StoreUnavailable` (nothing ran), and calls succeed again once
/// the holder is done.
#[cfg(feature = "postgres")]
#[test]
fn pg_exhausted_pool_is_store_unavailable() {
    let db = TestDb::pg("exhausted");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let tiny = db
            .pg_pool_via(sql::PG_URL, 1, Duration::from_millis(300))
            .await;
        let store = racefree::sql::PgStore::new(tiny.clone());
        let call = Call::new(
            "tests::tiny",
            None,
            Some("a"),
            Fingerprint::of(&1_u64),
            pg::policy(),
        );
        let Begin::<_, String>::Execute(holder) = begin(&store, call).await else {
            panic!("executes")
        };
        let call = Call::new(
            "tests::tiny",
            None,
            Some("b"),
            Fingerprint::of(&1_u64),
            pg::policy(),
        );
        let started = std::time::Instant::now();
        let refused = begin::<_, String>(&store, call).await;
        match refused {
            Begin::Refuse(IdempotencyError::StoreUnavailable { reason }) => {
                assert!(reason.contains("acquire_timeout"), "{reason}")
            }
            _ => panic!("an exhausted pool is StoreUnavailable"),
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
        holder.finish(&"a".to_owned()).await.unwrap();
        let call = Call::new(
            "tests::tiny",
            None,
            Some("b"),
            Fingerprint::of(&1_u64),
            pg::policy(),
        );
        assert!(matches!(
            begin::<_, String>(&store, call).await,
            Begin::Execute(_)
        ));
        tiny.close().await;
        env.close().await;
    });
}

/// PostgreSQL sends a first execution's claim with its `BEGIN`, and its outcome with its
/// `COMMIT`, by executing statements each connection prepares once. A connection that lost
/// them (a `DEALLOCATE`, a `DISCARD ALL`) prepares them again on its next claim: on a pool of
/// one connection, a claim after they are dropped still executes once, and replays still
/// replay. One that lost only the outcome's (deallocated by hand: the two are prepared in one
/// transaction) fails that call's commit, before `COMMIT`: `StoreUnavailable`, nothing
/// committed, and the connection is replaced, so the retry executes once and commits. One
/// that lost only the claim's prepares that one again and executes.
#[cfg(feature = "postgres")]
#[test]
fn pg_statements_dropped_from_a_connection_are_prepared_again() {
    let db = TestDb::pg("prepared");
    sql::runtime().block_on(async {
        let tables = pg::setup(&db).await;
        let one = db.pg_pool(1).await;
        let env = pg::Env {
            store: racefree::sql::PgStore::new(one.clone()),
            pool: one.clone(),
            side: tables.side.clone(),
        };
        let ours = || async {
            sqlx::query_scalar::<_, String>(
                "SELECT name FROM pg_prepared_statements WHERE name LIKE 'racefree\\_%' ORDER BY name",
            )
            .fetch_all(&one)
            .await
            .unwrap()
        };
        let pay = |key: &'static str, who: &'static str| {
            pg::pay(&env, Some(key), 1, who, pg::policy(), Then::Succeed { ms: 0 })
        };
        assert_eq!(pay("a", "first").await.unwrap(), "receipt 1 by first");
        let prepared = ours().await;
        assert_eq!(prepared.len(), 2, "the claim and the outcome: {prepared:?}");
        for name in &prepared {
            sqlx::query(&format!("DEALLOCATE {name}"))
                .execute(&one)
                .await
                .unwrap();
        }
        assert!(ours().await.is_empty());

        assert_eq!(pay("b", "second").await.unwrap(), "receipt 1 by second");
        assert_eq!(ours().await, prepared, "prepared again, under the same names");

        // Only the outcome's statement gone: the commit finds out, before `COMMIT`.
        let outcome = prepared.iter().find(|name| name.contains("outcome")).unwrap();
        sqlx::query(&format!("DEALLOCATE {outcome}"))
            .execute(&one)
            .await
            .unwrap();
        match pay("c", "lost").await {
            Err(IdempotencyError::StoreUnavailable { reason }) => {
                assert!(reason.contains("rolled back"), "{reason}")
            }
            other => panic!("a commit without its statement is StoreUnavailable: {other:?}"),
        }
        assert_eq!(pg::count(&one, "effects", "c").await, 0, "c: nothing committed");
        assert_eq!(pay("c", "third").await.unwrap(), "receipt 1 by third");
        assert_eq!(ours().await, prepared, "both prepared again, on a new connection");

        // Only the claim's gone: the claim fails, and only the claim's is prepared again (a
        // second `PREPARE` of the outcome's would fail the preparing transaction).
        let claim = prepared.iter().find(|name| name.contains("claim")).unwrap();
        sqlx::query(&format!("DEALLOCATE {claim}"))
            .execute(&one)
            .await
            .unwrap();
        assert_eq!(pay("d", "fourth").await.unwrap(), "receipt 1 by fourth");
        assert_eq!(ours().await, prepared, "the claim's prepared again");
        assert_eq!(pay("a", "later").await.unwrap(), "receipt 1 by first", "replayed");
        assert_eq!(pay("b", "later").await.unwrap(), "receipt 1 by second", "replayed");
        assert_eq!(
            pg::count(&env.side, "executions", "c").await,
            2,
            "c: the rolled-back execution and the retry"
        );
        for key in ["a", "b", "d"] {
            assert_eq!(pg::count(&env.side, "executions", key).await, 1, "{key}: once");
        }
        for key in ["a", "b", "c", "d"] {
            assert_eq!(pg::count(&one, "effects", key).await, 1, "{key}: one row");
        }
        one.close().await;
        tables.close().await;
    });
}

/// What the cutting proxy does to the client's next `COMMIT` (the outcome is sent with it).
#[cfg(feature = "postgres")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Pass everything.
    Never,
    /// Pass the `COMMIT` to the server, then cut the connection before its answer.
    AfterSending,
    /// Cut the connection instead of passing the `COMMIT`.
    BeforeSending,
}

/// A loopback proxy to the machine's PostgreSQL that cuts a connection at its next commit
/// with an outcome (`…; COMMIT AND CHAIN`), as `cut` says (then passes everything again).
#[cfg(feature = "postgres")]
async fn cutting_proxy(cut: std::sync::Arc<std::sync::Mutex<Cut>>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect("127.0.0.1:5432")
                .await
                .unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            let cut = cut.clone();
            let answers = tokio::spawn(async move {
                tokio::io::copy(&mut from_server, &mut to_client).await.ok();
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    // The store's commit with the outcome, not another `COMMIT` (a new
                    // connection prepares its statements in a transaction of its own).
                    const COMMIT: &[u8] = b"COMMIT AND CHAIN";
                    let commit = buf[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
                    let action = match commit {
                        true => std::mem::replace(&mut *cut.lock().unwrap(), Cut::Never),
                        false => Cut::Never,
                    };
                    if action != Cut::BeforeSending && to_server.write_all(&buf[..n]).await.is_err()
                    {
                        break;
                    }
                    if action != Cut::Never {
                        // The client hears nothing more: its answer is lost.
                        answers.abort();
                        break;
                    }
                }
            });
        }
    });
    port
}

/// The connection is lost with the answer to the `COMMIT` that carries the outcome. The store
/// settles what happened (waits for the key's in-flight lock, which the lost transaction
/// holds until it ends, and reads the record) instead of guessing: a commit that reached the
/// server is `Ok` (and replays, one effect row); one that did not is `StoreUnavailable`
/// (no row, and the retry executes once). Never `Ok` for an effect that is not there.
#[cfg(feature = "postgres")]
#[test]
fn pg_commit_answer_lost_is_settled_by_reading_the_record() {
    let db = TestDb::pg("lost_commit");
    sql::runtime().block_on(async {
        let tables = pg::setup(&db).await;
        let cut = std::sync::Arc::new(std::sync::Mutex::new(Cut::Never));
        let port = cutting_proxy(cut.clone()).await;
        let url = format!("postgres://postgres@127.0.0.1:{port}/test");
        let pool = db.pg_pool_via(&url, 2, Duration::from_secs(20)).await;
        let env = pg::Env {
            store: racefree::sql::PgStore::new(pool.clone()),
            pool: pool.clone(),
            side: tables.side.clone(),
        };
        let pay = |key: &'static str, who: &'static str| {
            pg::pay(
                &env,
                Some(key),
                1,
                who,
                pg::policy(),
                Then::Succeed { ms: 0 },
            )
        };

        *cut.lock().unwrap() = Cut::AfterSending;
        assert_eq!(
            pay("landed", "first").await,
            Ok("receipt 1 by first".into()),
            "committed, and settled as such"
        );
        assert_eq!(
            pay("landed", "again").await.unwrap(),
            "receipt 1 by first",
            "replayed"
        );
        assert_eq!(pg::count(&tables.pool, "effects", "landed").await, 1);
        assert_eq!(pg::count(&env.side, "executions", "landed").await, 1);

        *cut.lock().unwrap() = Cut::BeforeSending;
        let lost = pay("lost", "first").await;
        assert!(
            matches!(lost, Err(IdempotencyError::StoreUnavailable { .. })),
            "not committed, and settled as such: {lost:?}"
        );
        assert_eq!(pg::count(&tables.pool, "effects", "lost").await, 0);
        assert_eq!(
            pay("lost", "retry").await.unwrap(),
            "receipt 1 by retry",
            "executed once more"
        );
        assert_eq!(pg::count(&tables.pool, "effects", "lost").await, 1);
        assert_eq!(pg::count(&env.side, "executions", "lost").await, 2);

        // An outcome `jsonb` gives back in another spelling (1e16 comes back as
        // 10000000000000000): the database compares, so the landed commit is still `Ok`.
        *cut.lock().unwrap() = Cut::AfterSending;
        let call = || {
            Call::new(
                "tests::float",
                None,
                Some("float"),
                Fingerprint::of(&1_u64),
                pg::policy(),
            )
        };
        let Begin::<_, f64>::Execute(execution) = begin(&env.store, call()).await else {
            panic!("a fresh key executes")
        };
        assert_eq!(
            execution.finish(&1e16).await,
            Ok(()),
            "committed, and settled as such"
        );
        assert!(matches!(begin::<_, f64>(&env.store, call()).await, Begin::Replay(v) if v == 1e16));
        pool.close().await;
        tables.close().await;
    });
}

/// SQLite can roll a transaction back by itself under the body (here a `UNIQUE ON CONFLICT
/// ROLLBACK` constraint; also `RAISE(ROLLBACK)` or an I/O error), after which sqlx's own
/// `ROLLBACK` fails and its count of the connection's transactions stays at one. On a pool of
/// one connection, 3 rounds: the body that hit the constraint returns `Err` (nothing
/// committed, the key free), and the next call on the same pool executes and commits — seen
/// from another connection — instead of running inside a savepoint of a transaction nobody
/// ends (which once left every later write on that connection uncommitted, holding the
/// write lock).
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_transaction_rolled_back_by_the_database_leaves_the_pool_usable() {
    use racefree::sql::SqliteStore;
    use sqlx::Executor;
    let db = TestDb::sqlite("autorollback");
    sql::runtime().block_on(async {
        let pool = db.sqlite_pool(1, Duration::from_secs(2)).await;
        pool.execute(
            "CREATE TABLE effects (key TEXT NOT NULL, who TEXT NOT NULL); \
             CREATE TABLE audit (tag TEXT UNIQUE ON CONFLICT ROLLBACK); \
             INSERT INTO audit VALUES ('dup')",
        )
        .await
        .unwrap();
        let store = SqliteStore::new(pool.clone());
        store.migrate().await.unwrap();
        let other = db.sqlite_pool(1, Duration::from_secs(2)).await;
        for round in 0..3 {
            let key = format!("k{round}");
            // Every call of the round: the same key and request.
            let call = || {
                Call::new(
                    "tests::audited",
                    None,
                    Some(key.as_str()),
                    Fingerprint::of(&1_u64),
                    sqlite::policy(),
                )
            };
            let Begin::<_, String>::Execute(mut execution) = begin(&store, call()).await else {
                panic!("round {round}: a fresh key executes")
            };
            let tx = execution.lease_mut().unwrap().connection();
            sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'first')")
                .bind(&key)
                .execute(&mut *tx)
                .await
                .unwrap();
            let duplicate = sqlx::query("INSERT INTO audit VALUES ('dup')")
                .execute(&mut *tx)
                .await;
            assert!(duplicate.is_err(), "round {round}: the constraint fires");
            execution.release();

            let Begin::<_, String>::Execute(mut retry) = begin(&store, call()).await else {
                panic!("round {round}: the key is free")
            };
            sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'retry')")
                .bind(&key)
                .execute(retry.lease_mut().unwrap().connection())
                .await
                .unwrap();
            retry.finish(&format!("receipt {round}")).await.unwrap();
            let seen: Vec<String> = sqlx::query_scalar("SELECT who FROM effects WHERE key = $1")
                .bind(&key)
                .fetch_all(&other)
                .await
                .unwrap();
            assert_eq!(seen, ["retry"], "round {round}: the retry committed, alone");
        }
        let mut conn = other.acquire().await.unwrap();
        conn.execute("BEGIN IMMEDIATE")
            .await
            .expect("no transaction is left holding the write lock");
        conn.execute("ROLLBACK").await.unwrap();
    });
}

/// Under `SERIALIZABLE`, the store's own statements take no predicate lock a first execution
/// of another key could conflict with (before, most of 40 such calls failed each other at
/// `COMMIT`, from the outcome's `UPDATE` reading the key's index page). 40 callers, each with
/// its own key, released by a barrier, 5 rounds, in the store's own transaction and then in
/// the caller's own `SERIALIZABLE` transaction (`within`): in every round every call is `Ok`
/// and its effect row committed.
#[cfg(feature = "postgres")]
#[test]
fn pg_serializable_first_executions_of_other_keys_never_fail_each_other() {
    const CALLERS: usize = 40;
    const ROUNDS: usize = 5;
    let db = TestDb::pg("serializable");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let pool = db
            .pg_pool_with(8, "SET default_transaction_isolation = 'serializable'")
            .await;
        let store = std::sync::Arc::new(racefree::sql::PgStore::new(pool.clone()));
        for within in [false, true] {
            for round in 0..ROUNDS {
                let gate = std::sync::Arc::new(tokio::sync::Barrier::new(CALLERS));
                let calls: Vec<_> = (0..CALLERS)
                    .map(|caller| {
                        let (store, pool, gate) = (store.clone(), pool.clone(), gate.clone());
                        let key = format!("within {within} round {round} caller {caller}");
                        tokio::spawn(async move {
                            gate.wait().await;
                            let call = |key: &str| {
                                Call::new(
                                    "tests::ssi",
                                    None,
                                    Some(key),
                                    Fingerprint::of(&caller),
                                    pg::policy(),
                                )
                            };
                            let effect = |key: String| {
                                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'ssi')")
                                    .bind(key)
                            };
                            if !within {
                                let Begin::<_, String>::Execute(mut execution) =
                                    begin(&*store, call(&key)).await
                                else {
                                    panic!("{key}: a new key executes")
                                };
                                effect(key.clone())
                                    .execute(execution.lease_mut().unwrap().connection())
                                    .await
                                    .unwrap();
                                return execution.finish(&key).await;
                            }
                            let mut caller_tx = pool.begin().await.unwrap();
                            let finished = {
                                let in_tx = store.within(&mut caller_tx);
                                let Begin::<_, String>::Execute(mut execution) =
                                    begin(&in_tx, call(&key)).await
                                else {
                                    panic!("{key}: a new key executes")
                                };
                                effect(key.clone())
                                    .execute(execution.lease_mut().unwrap().connection())
                                    .await
                                    .unwrap();
                                execution.finish(&key).await
                            };
                            finished?;
                            caller_tx.commit().await.map_err(|e| {
                                IdempotencyError::StoreUnavailable {
                                    reason: format!("the caller's COMMIT: {e}"),
                                }
                            })
                        })
                    })
                    .collect();
                for (caller, call) in calls.into_iter().enumerate() {
                    let done = call.await.unwrap();
                    assert!(
                        done.is_ok(),
                        "within {within}, round {round}, caller {caller}: {done:?}"
                    );
                }
                let effects: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM effects WHERE key LIKE $1")
                        .bind(format!("within {within} round {round} %"))
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                assert_eq!(effects, CALLERS as i64, "within {within}, round {round}");
            }
        }
        pool.close().await;
        env.close().await;
    });
}

/// A guarded call in a savepoint of another's transaction (the outer body hands its own
/// connection to `within`) claims, completes and commits with it, and the outer call's
/// outcome still lands on the outer claim: each depth of a transaction keeps its own claim
/// mark. 3 rounds of one outer and one inner call: both `Ok`, both effects committed once,
/// and both keys replay their outcomes.
#[cfg(feature = "postgres")]
#[test]
fn pg_a_guarded_call_nested_in_a_savepoint_leaves_the_outer_claim_its_outcome() {
    let db = TestDb::pg("nested");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        for round in 0..3 {
            let (outer_key, inner_key) = (format!("outer {round}"), format!("inner {round}"));
            let call = |key: &str| {
                Call::new(
                    "tests::nested",
                    None,
                    Some(key),
                    Fingerprint::of(&round),
                    pg::policy(),
                )
            };
            let effect = |key: &str| {
                sqlx::query("INSERT INTO effects (key, who) VALUES ($1, 'nested')")
                    .bind(key.to_owned())
            };
            let Begin::<_, String>::Execute(mut outer) = begin(&env.store, call(&outer_key)).await
            else {
                panic!("round {round}: the outer call executes")
            };
            let connection = outer.lease_mut().unwrap().connection();
            effect(&outer_key).execute(&mut *connection).await.unwrap();
            {
                let in_tx = env.store.within(&mut *connection);
                let Begin::<_, String>::Execute(mut inner) = begin(&in_tx, call(&inner_key)).await
                else {
                    panic!("round {round}: the inner call executes")
                };
                effect(&inner_key)
                    .execute(inner.lease_mut().unwrap().connection())
                    .await
                    .unwrap();
                inner
                    .finish(&inner_key)
                    .await
                    .expect("the inner call completes");
            }
            outer
                .finish(&outer_key)
                .await
                .expect("the outer call completes");
            for key in [&outer_key, &inner_key] {
                assert_eq!(
                    pg::count(&env.pool, "effects", key).await,
                    1,
                    "round {round}: {key}"
                );
                match begin::<_, String>(&env.store, call(key)).await {
                    Begin::Replay(outcome) => assert_eq!(&outcome, key, "round {round}"),
                    _ => panic!("round {round}: {key} replays"),
                }
            }
        }
        env.close().await;
    });
}

/// A body that resets its session's settings (`RESET racefree.claim1`, or sets it to another
/// row) on the store's transaction still gets its outcome stored: on the one-trip path (a new
/// key) the outcome needs no mark; on the claim that reads first (a key whose expired record
/// the claim replaces) the mark is gone and the outcome's `UPDATE` finds the claim through the
/// key instead. Either way the call is `Ok`, its effect committed once, and a retry replays
/// it. (Without that fallback, the `UPDATE` found nothing while the transaction was still
/// open, and its `COMMIT` left the key held with no outcome.) Each statement once on each
/// path.
#[cfg(feature = "postgres")]
#[test]
fn pg_a_body_that_resets_its_session_settings_still_gets_its_outcome_stored() {
    let db = TestDb::pg("reset");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        // (Not `RESET ALL`: it also resets the test pool's `search_path` to the schema.)
        let resets = [
            "RESET racefree.claim1",
            "SELECT set_config('racefree.claim1', '(0,1)', false)",
        ];
        for (n, statement) in resets.into_iter().enumerate() {
            for expired_first in [false, true] {
                let key = format!("reset {n} {expired_first}");
                let cents = 10 + n as u64;
                if expired_first {
                    pg::pay(
                        &env,
                        Some(&key),
                        1,
                        "old",
                        pg::policy(),
                        Then::Succeed { ms: 0 },
                    )
                    .await
                    .unwrap();
                    sqlx::query("DELETE FROM effects WHERE key = $1")
                        .bind(&key)
                        .execute(&env.pool)
                        .await
                        .unwrap();
                    pg_expire(&env.pool, &key).await;
                }
                let first = pg::pay(
                    &env,
                    Some(&key),
                    cents,
                    "first",
                    pg::policy(),
                    Then::End(statement),
                )
                .await;
                assert_eq!(
                    first.unwrap(),
                    format!("receipt {cents} by first"),
                    "{statement}, {key}"
                );
                assert_eq!(
                    pg::count(&env.pool, "effects", &key).await,
                    1,
                    "{statement}, {key}"
                );
                let retry = pg::pay(
                    &env,
                    Some(&key),
                    cents,
                    "retry",
                    pg::policy(),
                    Then::Succeed { ms: 0 },
                )
                .await;
                assert_eq!(
                    retry.unwrap(),
                    format!("receipt {cents} by first"),
                    "{statement}, {key}: replayed"
                );
                assert_eq!(
                    pg::count(&env.pool, "effects", &key).await,
                    1,
                    "{statement}, {key}"
                );
            }
        }
        env.close().await;
    });
}

/// Makes the record of the call key `key` (the end of the stored key) expired, a second ago.
#[cfg(feature = "postgres")]
async fn pg_expire(pool: &sqlx::PgPool, key: &str) {
    sqlx::query(
        "UPDATE racefree_idempotency SET expires_at = clock_timestamp() - interval '1 s' \
         WHERE key LIKE '%#' || $1",
    )
    .bind(key)
    .execute(pool)
    .await
    .unwrap();
}

/// Two bodies that break the rule on one key must not cross: A's body sends its own
/// `ROLLBACK` (its claim and effect are gone), B then claims the key and its body sends its
/// own `COMMIT` (B's claim is now a committed record in flight); A's outcome, written after
/// that outside any transaction, must not land on B's record. Three ways, 3 rounds of each:
/// - a new key (the one-trip claim and commit): A is `OutcomeUnknown`, and so is B, whose
///   own `COMMIT` ended the claiming transaction; B's record keeps no outcome;
/// - `ROLLBACK; BEGIN; INSERT` in A's body (A writes again, in a transaction of its own): the
///   same;
/// - an expired record replaced by each claim (the claim that reads first, which leaves the
///   claim's `ctid` and `xmin` in the session's mark), with A's mark then pointed at B's row
///   as if a `VACUUM` had put B's claim in the slot A's had: A is `OutcomeUnknown`, B `Ok`,
///   and the key replays B's outcome;
/// - a new key whose B is still in flight (not committed) when A finishes: A's outcome must
///   not wait for B's transaction (it writes nothing without the key's in-flight lock), so A
///   is `OutcomeUnknown` at once (a 10 s bound detects a wait, which would never end here:
///   B finishes after A), then B is `Ok` and the key replays B's outcome.
#[cfg(feature = "postgres")]
#[test]
fn pg_a_rolled_back_body_never_writes_its_outcome_on_the_next_claim_of_its_key() {
    let db = TestDb::pg("crossing");
    sql::runtime().block_on(async {
        let env = pg::setup(&db).await;
        let outcome_of = |key: String| {
            let pool = env.pool.clone();
            async move {
                sqlx::query_scalar::<_, Option<String>>(
                    "SELECT outcome::text FROM racefree_idempotency WHERE key LIKE '%#' || $1",
                )
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        for round in 0..3 {
            let cases = [
                ("ROLLBACK", false, true),
                (
                    "ROLLBACK; BEGIN; INSERT INTO effects (key, who) VALUES ('-', 'A again')",
                    false,
                    true,
                ),
                ("ROLLBACK", true, true),
                ("ROLLBACK", false, false),
            ];
            for (case, (a_ends, expired_first, b_commits)) in cases.into_iter().enumerate() {
                let key = format!("crossing {round} {case}");
                let call = |who: &str| {
                    Call::new(
                        "tests::cross",
                        None,
                        Some(&key),
                        Fingerprint::of(&who),
                        pg::policy(),
                    )
                };
                if expired_first {
                    let Begin::<_, String>::Execute(old) = begin(&env.store, call("old")).await
                    else {
                        panic!("round {round}: the old request executes")
                    };
                    old.finish(&"outcome of the old request".to_owned())
                        .await
                        .unwrap();
                    pg_expire(&env.pool, &key).await;
                }
                let Begin::<_, String>::Execute(mut a) = begin(&env.store, call("a")).await else {
                    panic!("round {round}: A executes")
                };
                let a_conn = a.lease_mut().unwrap().connection();
                let a_mark: Option<String> =
                    sqlx::query_scalar("SELECT current_setting('racefree.claim1', true)")
                        .fetch_one(&mut *a_conn)
                        .await
                        .unwrap();
                sqlx::Executor::execute(&mut *a_conn, a_ends).await.unwrap();
                let Begin::<_, String>::Execute(mut b) = begin(&env.store, call("b")).await else {
                    panic!("round {round}: B executes (A's claim rolled back)")
                };
                if b_commits {
                    sqlx::Executor::execute(b.lease_mut().unwrap().connection(), "COMMIT")
                        .await
                        .unwrap();
                }
                if expired_first {
                    let b_row: String = sqlx::query_scalar(
                        "SELECT ctid::text FROM racefree_idempotency WHERE key LIKE '%#' || $1",
                    )
                    .bind(&key)
                    .fetch_one(&env.pool)
                    .await
                    .unwrap();
                    let a_mark = a_mark.expect("a claim that replaced a record left its mark");
                    let a_xmin = a_mark
                        .split(' ')
                        .nth(1)
                        .expect("the mark holds ctid and xmin");
                    sqlx::query("SELECT set_config('racefree.claim1', $1, false)")
                        .bind(format!("{b_row} {a_xmin}"))
                        .execute(a.lease_mut().unwrap().connection())
                        .await
                        .unwrap();
                }
                let a_done = tokio::time::timeout(
                    Duration::from_secs(10),
                    a.finish(&"outcome of A".to_owned()),
                )
                .await
                .unwrap_or_else(|_| panic!("round {round}, case {case}: A waited for B"));
                assert!(
                    matches!(a_done, Err(IdempotencyError::OutcomeUnknown { .. })),
                    "round {round}, case {case}: {a_done:?}"
                );
                let b_done = b.finish(&"outcome of B".to_owned()).await;
                if expired_first || !b_commits {
                    b_done.unwrap_or_else(|e| {
                        panic!("round {round}, case {case}: B's outcome lands: {e:?}")
                    });
                    match begin::<_, String>(&env.store, call("b")).await {
                        Begin::Replay(outcome) => {
                            assert_eq!(outcome, "outcome of B", "round {round}")
                        }
                        _ => panic!("round {round}, case {case}: B's request replays"),
                    }
                } else {
                    assert!(
                        matches!(b_done, Err(IdempotencyError::OutcomeUnknown { .. })),
                        "round {round}, case {case}: {b_done:?}"
                    );
                    assert_eq!(
                        outcome_of(key.clone()).await,
                        None,
                        "round {round}, case {case}: B's record got no outcome, A's least of all"
                    );
                }
            }
        }
        env.close().await;
    });
}
