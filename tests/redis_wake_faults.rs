//! Fault probes of the Redis wake-up hints (`<lock>:wake`, published by a sequence's commit
//! and by a release): a `#[sequenced]` waiter in another process whose pub/sub connection is
//! killed while it waits, and a holder whose future is dropped mid-body. Each probe runs on a
//! private `redis-server` of its own (the first one kills every pub/sub client of its server),
//! with two `RedisStore`s on it standing for two processes: their own connections, their own
//! pub/sub connection and their own local queues.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod support;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use racefree::redis::driver;
use racefree::redis::RedisStore;
use racefree::{sequenced, Seq, SequenceError, Turn};
use tokio::sync::oneshot;

/// How long a probe waits for what must happen before it fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// A holder's body: tells the test it holds the key, then waits until the test lets it go.
type Park = Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>;

async fn park(park: Park) {
    if let Some((entered, until)) = park {
        let _ = entered.send(());
        let _ = until.await;
    }
}

// --- probe a: the waiter's pub/sub connection is killed while it waits -------------------

static KILL_SERVER: LazyLock<support::Private> = LazyLock::new(|| support::Private::start(&[]));
static KILL_HERE: LazyLock<RedisStore> = LazyLock::new(|| RedisStore::new(KILL_SERVER.url.clone()));
static KILL_THERE: LazyLock<RedisStore> =
    LazyLock::new(|| RedisStore::new(KILL_SERVER.url.clone()));

#[sequenced(key = shop, store = KILL_HERE.sequence("tests::redis_wake_faults::kill"))]
async fn kill_hold(shop: &str, hold: Park, seq: Seq) -> Result<u64, SequenceError> {
    park(hold).await;
    Ok(seq.get())
}

#[sequenced(key = shop, store = KILL_THERE.sequence("tests::redis_wake_faults::kill"))]
async fn kill_take(shop: &str, seq: Seq) -> Result<u64, SequenceError> {
    Ok(seq.get())
}

/// 5 rounds, a fresh key each: a holder on one store parks in its body; a caller on the other
/// store waits, subscribed to the key's wake-up channel; then every pub/sub client of the
/// server is killed (`CLIENT KILL TYPE pubsub`), so the commit's `PUBSUB` reaches nobody. What
/// must hold every round: the waiter keeps waiting while the key is held (it neither fails nor
/// takes the key), gets it within a second of the holder's commit (the 100 ms fallback poll,
/// not a hang), with number 2 after the holder's 1, and reports `Turn::Waited`; and in the next
/// round the waiting store subscribes again (a new pub/sub connection, not the dead one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_pubsub_connection_is_killed_still_gets_the_key() {
    LazyLock::force(&KILL_SERVER);
    let mut conn = KILL_HERE.connection().await.unwrap();
    let run = support::unique("kill");
    for round in 0..5 {
        let shop = format!("{run}-{round}");
        let (entered_tx, entered) = oneshot::channel();
        let (release, until) = oneshot::channel();
        let holder = tokio::spawn({
            let shop = shop.clone();
            async move { kill_hold(&shop, Some((entered_tx, until))).await }
        });
        entered.await.unwrap();
        let waiter = tokio::spawn({
            let shop = shop.clone();
            racefree::turn::track(async move { kill_take(&shop).await })
        });
        support::until_subscribed(&mut conn, &shop, &format!("round {round}")).await;

        let killed: i64 = driver::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(killed >= 1, "round {round}: no pub/sub client killed");
        assert!(
            support::subscribed(&mut conn, &shop).await.is_empty(),
            "round {round}: the waiter's subscription outlived the kill"
        );
        // Past a few fallback polls, with the key still held: the waiter must still wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiter.is_finished(),
            "round {round}: the waiter ended while the key was held: {:?}",
            waiter.await
        );

        release.send(()).unwrap();
        let first = tokio::time::timeout(PATIENCE, holder)
            .await
            .expect("the holder hung")
            .unwrap();
        let committed = Instant::now();
        let (second, turn) = tokio::time::timeout(PATIENCE, waiter)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the waiter hung after the commit"))
            .unwrap();
        let delay = committed.elapsed();
        assert_eq!((first.unwrap(), second.unwrap()), (1, 2), "round {round}");
        assert_eq!(turn, Turn::Waited, "round {round}");
        assert!(
            delay < Duration::from_secs(1),
            "round {round}: the waiter took {delay:?} after the commit (fallback poll: 100 ms)"
        );
    }
}

// --- probe b: the holder's future is dropped mid-body ------------------------------------

static DROP_SERVER: LazyLock<support::Private> = LazyLock::new(|| support::Private::start(&[]));
static DROP_HERE: LazyLock<RedisStore> = LazyLock::new(|| RedisStore::new(DROP_SERVER.url.clone()));
static DROP_THERE: LazyLock<RedisStore> =
    LazyLock::new(|| RedisStore::new(DROP_SERVER.url.clone()));

#[sequenced(key = shop, store = DROP_HERE.sequence("tests::redis_wake_faults::drop"))]
async fn drop_hold(shop: &str, hold: Park, seq: Seq) -> Result<u64, SequenceError> {
    park(hold).await;
    Ok(seq.get())
}

#[sequenced(key = shop, store = DROP_THERE.sequence("tests::redis_wake_faults::drop"))]
async fn drop_take(shop: &str, seq: Seq) -> Result<u64, SequenceError> {
    Ok(seq.get())
}

/// 10 rounds, a fresh key each: a holder on one store parks in its body; a caller on the other
/// store waits, subscribed to the key's wake-up channel; then the holder's task is aborted (its
/// future dropped mid-body: the `ReleaseOnDrop` path). What must hold every round: the release
/// publishes on the key's lock wake-up channel (an observer `PSUBSCRIBE`d to it gets the
/// message), the waiter gets the key with number 1 (the dropped holder consumed none) and
/// `Turn::Waited`, and the next call on the holder's store gets 2. And over the rounds, the
/// median delay from the abort to the waiter's return stays under 25 ms: woken by the publish,
/// not found by its 100 ms fallback poll (which would put the median near 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_holder_wakes_the_waiter_elsewhere_and_consumes_no_number() {
    use futures::StreamExt;
    LazyLock::force(&DROP_SERVER);
    let mut conn = DROP_HERE.connection().await.unwrap();
    let run = support::unique("drop");
    let mut observer = driver::Client::open(DROP_SERVER.url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    observer
        .psubscribe(format!("*{run}*:lock:wake"))
        .await
        .unwrap();
    let mut published = observer.into_on_message();
    let mut delays = Vec::new();
    for round in 0..10 {
        let shop = format!("{run}-{round}");
        let (entered_tx, entered) = oneshot::channel();
        let (_release, until) = oneshot::channel::<()>();
        let holder = tokio::spawn({
            let shop = shop.clone();
            async move { drop_hold(&shop, Some((entered_tx, until))).await }
        });
        entered.await.unwrap();
        let waiter = tokio::spawn({
            let shop = shop.clone();
            racefree::turn::track(async move { drop_take(&shop).await })
        });
        support::until_subscribed(&mut conn, &shop, &format!("round {round}")).await;

        holder.abort();
        let aborted = Instant::now();
        assert!(
            holder.await.unwrap_err().is_cancelled(),
            "round {round}: the holder finished instead of being dropped"
        );
        let (number, turn) = tokio::time::timeout(PATIENCE, waiter)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the waiter hung after the holder dropped"))
            .unwrap();
        delays.push(aborted.elapsed());
        assert_eq!(
            number.unwrap(),
            1,
            "round {round}: the dropped holder consumed a number"
        );
        assert_eq!(turn, Turn::Waited, "round {round}");
        assert_eq!(drop_hold(&shop, None).await.unwrap(), 2, "round {round}");
        // Three wake-ups on the key, in order: the dropped holder's release, then the commits
        // of the waiter and of the last call. Without the release's, the third never comes.
        for what in [
            "the release",
            "the waiter's commit",
            "the last call's commit",
        ] {
            let message = tokio::time::timeout(PATIENCE, published.next())
                .await
                .unwrap_or_else(|_| panic!("round {round}: no wake-up for {what}"))
                .expect("the observer's connection ended");
            assert!(
                message.get_channel_name().contains(&shop),
                "round {round}: {what} woke {:?}",
                message.get_channel_name()
            );
        }
    }
    delays.sort();
    let median = delays[delays.len() / 2];
    println!(
        "waiter after a dropped holder: median {median:?}, max {:?}",
        delays[delays.len() - 1]
    );
    assert!(median < Duration::from_millis(25), "{delays:?}");
}

// --- probe c: the store outlives the runtime that first waited on it ---------------------

static RT_SERVER: LazyLock<support::Private> = LazyLock::new(|| support::Private::start(&[]));
static RT_HERE: LazyLock<RedisStore> = LazyLock::new(|| RedisStore::new(RT_SERVER.url.clone()));
static RT_THERE: LazyLock<RedisStore> = LazyLock::new(|| RedisStore::new(RT_SERVER.url.clone()));

#[sequenced(key = shop, store = RT_HERE.sequence("tests::redis_wake_faults::runtimes"))]
async fn rt_hold(shop: &str, hold: Park, seq: Seq) -> Result<u64, SequenceError> {
    park(hold).await;
    Ok(seq.get())
}

#[sequenced(key = shop, store = RT_THERE.sequence("tests::redis_wake_faults::runtimes"))]
async fn rt_take(shop: &str, seq: Seq) -> Result<u64, SequenceError> {
    Ok(seq.get())
}

/// One round on a fresh key: a holder parks, a caller on the other store waits; it must be
/// seen subscribed to the key's wake-up channel before the holder is let go. Numbers 1, 2.
async fn rt_round(shop: &str, what: &str) {
    let mut conn = RT_HERE.connection().await.unwrap();
    let (entered_tx, entered) = oneshot::channel();
    let (release, until) = oneshot::channel();
    let holder = tokio::spawn({
        let shop = shop.to_owned();
        async move { rt_hold(&shop, Some((entered_tx, until))).await }
    });
    entered.await.unwrap();
    let waiter = tokio::spawn({
        let shop = shop.to_owned();
        async move { rt_take(&shop).await }
    });
    support::until_subscribed(&mut conn, shop, what).await;
    release.send(()).unwrap();
    let first = tokio::time::timeout(PATIENCE, holder)
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.unwrap(), second.unwrap()), (1, 2), "{what}");
}

/// A store is a `static` that outlives runtimes (a test binary's `#[tokio::test]`s, a worker
/// per runtime): 3 runtimes one after the other, one round each on a fresh key. What must hold
/// in every runtime, not only the first: the waiting store subscribes to the key's wake-up
/// channel (its pub/sub connection and dispatcher were spawned on the first runtime, which is
/// gone; it must not keep handing out that dead one).
#[test]
fn wake_ups_survive_the_runtime_that_first_waited() {
    LazyLock::force(&RT_SERVER);
    let run = support::unique("rt");
    for generation in 0..3 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shop = format!("{run}-{generation}");
        runtime.block_on(rt_round(&shop, &format!("runtime {generation}")));
        drop(runtime);
    }
}
