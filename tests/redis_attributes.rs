//! `#[idempotent]` and `#[sequenced]` with `store = <a RedisStore>`, against a real Redis.
//! (The multi-process guarantees of the same store are in tests/redis.rs.)
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use racefree::redis::{RedisIdempotencyStore, RedisStore};
use racefree::replay::{self, Replay};
use racefree::{idempotent, sequenced, IdempotencyError, Seq, SequenceError};

static REDIS: LazyLock<RedisStore> =
    LazyLock::new(|| RedisStore::new(support::server().url.clone()));
static CHARGES_STORE: LazyLock<RedisIdempotencyStore<String>> =
    LazyLock::new(|| RedisIdempotencyStore::shared(Arc::clone(&SHARED)));
static DECLINE_STORE: LazyLock<RedisIdempotencyStore<u32>> =
    LazyLock::new(|| RedisIdempotencyStore::shared(Arc::clone(&SHARED)));
/// The same server as an `Arc` the application holds.
static SHARED: LazyLock<Arc<RedisStore>> =
    LazyLock::new(|| Arc::new(RedisStore::new(support::server().url.clone())));
/// This run's keys: re-runs and parallel test binaries never see each other's records.
static RUN: LazyLock<String> = LazyLock::new(|| support::unique("attr"));

#[derive(Debug, PartialEq)]
enum ApiError {
    Idempotency(IdempotencyError),
    Sequence(String),
    Declined,
}

impl From<IdempotencyError> for ApiError {
    fn from(error: IdempotencyError) -> Self {
        ApiError::Idempotency(error)
    }
}

impl From<SequenceError> for ApiError {
    fn from(error: SequenceError) -> Self {
        ApiError::Sequence(error.to_string())
    }
}

static CHARGES: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = key, store = CHARGES_STORE)]
async fn charge(key: &str, amount: u64) -> Result<String, ApiError> {
    let n = CHARGES.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30)).await;
    Ok(format!("charge-{n}-of-{amount}"))
}

/// 50 concurrent calls with one key, 3 rounds (a key each). Every round: 1 execution, 50 equal
/// outcomes, exactly one of them fresh; a later call replays; another amount is a Conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_with_redis_store_executes_once() {
    for round in 0..3 {
        let key = format!("{}-charge-{round}", *RUN);
        let before = CHARGES.load(Ordering::SeqCst);
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let (key, barrier) = (key.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    replay::track(charge(&key, 10)).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        assert_eq!(CHARGES.load(Ordering::SeqCst) - before, 1, "round {round}");
        let first = outcomes[0].0.as_ref().unwrap().clone();
        assert!(
            outcomes.iter().all(|(o, _)| o.as_ref() == Ok(&first)),
            "round {round}"
        );
        assert_eq!(
            outcomes.iter().filter(|(_, r)| *r == Replay::Fresh).count(),
            1,
            "round {round}"
        );

        let (again, replayed) = replay::track(charge(&key, 10)).await;
        assert_eq!((again.unwrap(), replayed), (first, Replay::Replayed));
        let conflict = charge(&key, 11).await;
        assert!(
            matches!(
                conflict,
                Err(ApiError::Idempotency(IdempotencyError::Conflict { .. }))
            ),
            "{conflict:?}"
        );
    }
}

static DECLINES: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = key, store = DECLINE_STORE)]
async fn decline_once(key: &str) -> Result<u32, ApiError> {
    if DECLINES.fetch_add(1, Ordering::SeqCst) == 0 {
        Err(ApiError::Declined)
    } else {
        Ok(7)
    }
}

/// An `Err` is not stored in Redis: the retry executes (and its `Ok` is then replayed).
#[tokio::test]
async fn idempotent_err_is_released_in_redis() {
    let key = format!("{}-decline", *RUN);
    assert_eq!(decline_once(&key).await, Err(ApiError::Declined));
    assert_eq!(decline_once(&key).await, Ok(7));
    assert_eq!(decline_once(&key).await, Ok(7));
    assert_eq!(DECLINES.load(Ordering::SeqCst), 2);
}

static UNREACHABLE: RedisStore =
    RedisStore::lazy("redis://127.0.0.1:1/").command_timeout(Duration::from_millis(200));
static UNREACHABLE_STORE: RedisIdempotencyStore<u32> = RedisIdempotencyStore::new(&UNREACHABLE);

#[idempotent(key = key, store = UNREACHABLE_STORE)]
async fn against_nothing(key: &str) -> Result<u32, ApiError> {
    unreachable!("the store is down: the body must not run ({key})")
}

/// Redis down → `IdempotencyError::StoreUnavailable` (HTTP 503), and the body does not run.
#[tokio::test]
async fn idempotent_store_down_is_store_unavailable() {
    let error = against_nothing("k").await.unwrap_err();
    let ApiError::Idempotency(error) = error else {
        panic!("{error:?}")
    };
    assert!(
        matches!(error, IdempotencyError::StoreUnavailable { .. }),
        "{error:?}"
    );
    assert_eq!(error.http_status(), 503);
}

#[sequenced(key = shop, store = REDIS.sequence("tests::redis_attributes::next_no"))]
async fn next_no(shop: &str, fail: bool, seq: Seq) -> Result<u64, ApiError> {
    tokio::task::yield_now().await;
    if fail {
        Err(ApiError::Declined)
    } else {
        Ok(seq.get())
    }
}

/// 100 concurrent calls on one key of which a known 20 fail, 3 rounds (a key each). Every
/// round: the 80 successes got exactly 1..=80.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_with_redis_store_is_gap_free() {
    for round in 0..3 {
        let shop = format!("{}-shop-{round}", *RUN);
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let calls: Vec<_> = (0..100)
            .map(|i: u32| {
                let (shop, barrier) = (shop.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    next_no(&shop, i.is_multiple_of(5)).await
                })
            })
            .collect();
        let mut numbers = Vec::new();
        for call in calls {
            match call.await.unwrap() {
                Ok(n) => numbers.push(n),
                Err(ApiError::Declined) => {}
                Err(other) => panic!("{other:?}"),
            }
        }
        numbers.sort_unstable();
        assert_eq!(numbers, (1..=80).collect::<Vec<_>>(), "round {round}");
    }
}

#[sequenced(key = shop, store = SHARED.sequence("tests::redis_attributes::reenter"))]
async fn reenter(shop: &str, depth: u32, seq: Seq) -> Result<u64, ApiError> {
    if depth == 0 {
        Box::pin(reenter(shop, 1)).await
    } else {
        Ok(seq.get())
    }
}

/// A sequenced body calling itself with the same key fails at once instead of deadlocking.
#[tokio::test]
async fn sequenced_reentry_on_redis_is_detected() {
    let result = reenter(&format!("{}-reenter", *RUN), 0).await;
    assert!(
        matches!(&result, Err(ApiError::Sequence(e)) if e.contains("re-entered")),
        "{result:?}"
    );
}

/// `REDIS` and `SHARED` are two stores on one server, as two processes would be.
#[sequenced(key = shop, store = REDIS.sequence("tests::redis_attributes::turns"))]
async fn take_turn_here(
    shop: &str,
    park: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
    seq: Seq,
) -> Result<u64, ApiError> {
    if let Some((entered, until)) = park {
        let _ = entered.send(());
        let _ = until.await;
    }
    Ok(seq.get())
}

#[sequenced(key = shop, store = SHARED.sequence("tests::redis_attributes::turns"))]
async fn take_turn_elsewhere(shop: &str, seq: Seq) -> Result<u64, ApiError> {
    Ok(seq.get())
}

/// The per-call answer on Redis (`turn::track`), 5 rounds on a fresh key each: a holder parked
/// in its body (`AtOnce`); a caller on the other store, as another process, released only once
/// it is seen waiting (subscribed to the key's wake-up channel), so it `Waited`; then a call on
/// the idle key (`AtOnce`). Numbers 1, 2, 3 in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_tells_waiting_calls_from_free_ones_on_redis() {
    use racefree::Turn;
    // A connection of this test's runtime: `REDIS`'s may belong to another test's runtime,
    // already gone (its first command then fails with a broken pipe, and only the store's own
    // commands re-send).
    let watcher = RedisStore::new(support::server().url.clone());
    let mut conn = watcher.connection().await.unwrap();
    for round in 0..5 {
        let shop = format!("{}-turn-{round}", *RUN);
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (release, until) = tokio::sync::oneshot::channel();
        let holder = tokio::spawn({
            let shop = shop.clone();
            racefree::turn::track(
                async move { take_turn_here(&shop, Some((entered_tx, until))).await },
            )
        });
        entered.await.unwrap();
        let elsewhere = tokio::spawn({
            let shop = shop.clone();
            racefree::turn::track(async move { take_turn_elsewhere(&shop).await })
        });
        // Seen waiting: subscribed to the key's wake-up channel.
        support::until_subscribed(&mut conn, &shop, &format!("round {round}")).await;
        release.send(()).unwrap();
        let (first, holder_turn) = holder.await.unwrap();
        let (second, elsewhere_turn) = elsewhere.await.unwrap();
        let (third, after_turn) = racefree::turn::track(take_turn_here(&shop, None)).await;
        assert_eq!(
            [first.unwrap(), second.unwrap(), third.unwrap()],
            [1, 2, 3],
            "round {round}"
        );
        assert_eq!(
            (holder_turn, elsewhere_turn, after_turn),
            (Turn::AtOnce, Turn::Waited, Turn::AtOnce),
            "round {round}"
        );
    }
}
