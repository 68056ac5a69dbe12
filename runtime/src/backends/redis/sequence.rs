//! Per-key serialized execution and gap-free sequence numbers across processes.
//!
//! # Protocol (Redis keys `rf:{tag}:lock` and `rf:{tag}:seq`, one slot)
//! - **acquire** (Lua, 1 round trip): if the lock is free, take a fencing token with
//!   `HINCRBY seq fence 1`, set the lock to `<fence>:<caller token>` with a lease (`PX`), and
//!   return the fence with the last committed number; if it is held, return its remaining lease
//!   (or, for a re-sent acquire whose reply was lost, the caller's own fence).
//! - **heartbeat**: the holder extends the lease every third of it while the body runs.
//! - **commit** (Lua, 1 round trip): only if the lock still holds the caller's fencing token,
//!   store the new number, leave a short-lived marker of this holding (so a re-sent commit
//!   whose reply was lost knows it landed), and free the lock. A holder whose
//!   lease ended (crash, pause) commits nothing: [`RedisStoreError::LeaseLost`].
//! - **abort** (Lua): the body failed; free the lock, consume nothing.
//!
//! A sequenced call therefore costs 2 round trips uncontended.
//!
//! # Kept locks ([`StoreOptions::keep`](super::StoreOptions::keep))
//! A commit made for [`RedisSequences::run`] or an attribute whose call started within `keep`
//! of this process's previous commit on the key (a second call in a row) may keep the lock
//! instead of freeing it: in the same script it moves the lock to a new fence of the same owner
//! token, living 250 ms on the server (or `50 × keep`, at most a lease), and this process files
//! it.
//! A call on the key that starts within `keep` (2 ms by default) of that commit takes it: no
//! acquire, 1 round trip per call for a key called back to back. It keeps the lock only if the
//! key's **want flag** (`rf:{tag}:want`) is absent: an acquire that finds the lock held sets it
//! for a lease (a reset, for the holder's remaining lease), so once two processes meet on a key
//! neither keeps it for a lease and they hand it over at once. A run of kept calls also ends
//! once it has lasted a kept lock's life (the commit frees the lock; the next call acquires), so
//! a process that cannot raise the flag (an older build) still finds the key free that often.
//! A re-sent commit that finds its marker is answered with the lock the lost first send kept
//! (and files it); a commit asked to keep that failed, or was settled by reading its marker
//! without an answer, frees every lock of its token (none is filed).
//! The first asker waits for the holder's next commit or for the store's task, which frees
//! locks idle for `keep`, checking every `keep / 2`. A kept lock skips
//! the acquire's epoch check: a server that lost its data meanwhile shows up as the commit's
//! refusal, reported as [`RedisStoreError::DataLost`] (the body ran; nothing was consumed).
//! Its heartbeat is due a third of the kept lock's life in and extends it to a whole lease;
//! until a beat lands, the heartbeat's patience and retries scale with the kept lock's life,
//! so the slack described in [`StoreOptions::lease`](super::StoreOptions::lease)'s arithmetic
//! holds for a 250 ms lease there.
//!
//! # What a failure means
//! - [`SequencedError::Store`] / `SequenceError::Store`: nothing was consumed — the acquire
//!   failed, or the commit was refused before it ran (lease lost: `LeaseLost`).
//! - [`SequencedError::CommitUnknown`] / `SequenceError::CommitUnknown`: the commit was sent
//!   and re-sent but no answer came back, and its marker (read once more afterwards) was not
//!   there yet: the number may have been consumed, or may still be (a paused server executes
//!   queued commands later). Check the body's effect before retrying.
//! - The commit is written by a task of its own and the heartbeat beats until it returns:
//!   dropping the caller's future after the body returned `Ok` does not stop the commit.
//!
//! # Data loss
//! A Redis that loses its data (restart without persistence, `FLUSHALL`, eviction) would
//! hand out numbers again from the start. Each process remembers the store-wide epoch key
//! (`rf:{racefree}:epoch`, written once with `SET NX`) it saw first, and every acquire checks it
//! (inside the acquire script on one node; one extra `GET` on a Cluster, where the epoch lives
//! in another slot). Gone or changed → [`RedisStoreError::DataLost`], refused until the
//! application calls [`RedisStore::accept_data_loss`]. A process that *starts* after the loss
//! cannot tell an emptied server from a new one: only persistence (`appendonly yes`,
//! `appendfsync always`) closes that window.
//!
//! # Idle state
//! A sequence's counter hash (`rf:{tag}:seq`) never expires — expiring it would restart the
//! numbering silently; [`RedisSequences::reset`] removes a sequence's number explicitly. Commit
//! markers (`rf:{tag}:done:<fence>`) live only as long as a commit can still be re-sent: twice
//! the larger of one lease and `(retries + 1) × (command timeout + 100 ms)`. Fencing tokens only grow, so a
//! body that writes elsewhere can hand [`SeqTicket::fence`] to that system and have it refuse
//! writes with an older token (the classic fix for a paused lock holder).
//!
//! Waiting: inside one process, callers queue on a FIFO async mutex per key, so only the head
//! of the queue talks to Redis. Across processes the head subscribes to the lock's wake-up
//! channel (`rf:{tag}:lock:wake`, one server only) and tries again as soon as a commit or a
//! release publishes on it; jittered polling capped by the holder's remaining lease is the
//! fallback (every 100 ms while subscribed, for a holder that crashed; 1 ms growing to 50 ms on
//! a Cluster, whose waiters only poll). There is no FIFO across processes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connection::Lua;
use dashmap::DashMap;
use serde::Serialize;

use crate::sequenced::{SequenceBackend, SequenceError, SequenceLease};
use crate::sync::keyed_locks::Holder;

use super::lease::{
    finish_final_write, outlive_caller, owner_token, wait_for_key, wake_flag, Backoff,
    FinalWriteKeys, Heartbeat, LocalTurn, Look, ReleaseOnDrop, EXTEND_LOCK, RELEASE_LOCK,
};
use super::store::Detached;
use super::{RedisKey, RedisStore, RedisStoreError};

// KEYS: lock, seq, want flag, and on one node the store's epoch key. ARGV: lease ms, token,
// epoch. A caller that finds the lock held raises the want flag for a lease: until it expires
// no commit keeps the lock for its process's next call (`StoreOptions::keep`), so processes
// that take turns on a key hand it over at once, as without keeping.
pub(super) static ACQUIRE: Lua = Lua::new(
    r#"
if KEYS[4] then
  local epoch = redis.call('GET', KEYS[4])
  if epoch ~= ARGV[3] then return {-1, epoch or ''} end
end
local holder = redis.call('GET', KEYS[1])
if holder then
  local fence, token = string.match(holder, '^(%d+):(.*)$')
  if token == ARGV[2] then
    return {tonumber(fence), redis.call('HGET', KEYS[2], 'n')}
  end
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
  return {0, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('HINCRBY', KEYS[2], 'fence', 1)
redis.call('SET', KEYS[1], fence .. ':' .. ARGV[2], 'PX', ARGV[1])
return {fence, redis.call('HGET', KEYS[2], 'n')}
"#,
);

// KEYS: lock, seq, done marker of this holding, want flag. The marker (not the counter's last
// writer) tells a re-sent commit whose first reply was lost that it did commit: by the time it
// is re-sent, the next holder may have committed too. ARGV: holder, number, marker ms, the wake
// flag (`wake_flag`), keep ms ('0': free the lock), token. Kept (nobody else asked for the key):
// the lock passes to a new fence of the same token for `keep` ms, returned negated; freed: 1.
// A re-send that finds the marker answers with the lock the first send kept under this token,
// as if it had kept it (the first answer was lost, so nobody in this process knows of it yet).
// It frees nothing: a first send that runs late, after the re-send was answered, must not take
// the lock from the call holding it now.
pub(super) static COMMIT: Lua = Lua::new(
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'n', ARGV[2])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  if ARGV[5] ~= '0' and redis.call('EXISTS', KEYS[4]) == 0 then
    local fence = redis.call('HINCRBY', KEYS[2], 'fence', 1)
    redis.call('SET', KEYS[1], fence .. ':' .. ARGV[6], 'PX', ARGV[5])
    return -fence
  end
  redis.call('DEL', KEYS[1])
  if ARGV[4] == '1' then redis.call('PUBLISH', KEYS[1] .. ':wake', '') end
  return 1
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  local holder = redis.call('GET', KEYS[1])
  if holder and ARGV[5] ~= '0' then
    local fence, token = string.match(holder, '^(%d+):(.*)$')
    if token == ARGV[6] then return -tonumber(fence) end
  end
  return 1
end
return 0
"#,
);

// KEYS: lock. Frees the lock if it is held with the token ARGV[1], whatever its fence;
// ARGV[2]: the wake flag (`wake_flag`).
pub(super) static RELEASE_BY_TOKEN: Lua = Lua::new(
    r#"
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, -string.len(ARGV[1]) - 1) == ':' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '1' then redis.call('PUBLISH', KEYS[1] .. ':wake', '') end
  return 1
end
return 0
"#,
);

// KEYS: lock, seq, want flag. A reset waits for the key like a call does (raising the want
// flag, so a kept lock is freed for it): it never lands between a holder's read of the counter
// and its commit.
pub(super) static RESET: Lua = Lua::new(
    r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('SET', KEYS[3], '1', 'PX', math.max(ttl, 1))
  return ttl
end
redis.call('HDEL', KEYS[2], 'n', 'committed')
return -1
"#,
);

/// The store-wide epoch key (its own hash tag: on a Cluster it lives in one slot).
const EPOCH_KEY: &str = "rf:{racefree}:epoch";

/// The right to run one sequenced body: the number it may commit and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqTicket {
    granted: Instant,
    lock: String,
    seq: String,
    done: String,
    want: String,
    holder: String,
    last: Option<u64>,
    number: u64,
    fence: u64,
}

impl SeqTicket {
    /// The number this call commits if it succeeds.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The last committed number, `None` for a key never committed.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// The fencing token: strictly greater than every earlier holder's of this key.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The owner token in `holder` (`<fence>:<token>`).
    fn token(&self) -> &str {
        self.holder
            .split_once(':')
            .map_or(self.holder.as_str(), |(_, token)| token)
    }
}

/// The locks this process kept after a commit for its next call on the same key (see
/// [`StoreOptions::keep`](super::StoreOptions::keep)), and the task that frees those left idle.
pub(crate) struct Keeper {
    // How long after a commit the next call may take the lock, and how long Redis keeps it.
    keep: Duration,
    lease: Duration,
    // By lock key.
    kept: DashMap<String, Kept>,
    // The tending task: whether one runs, whether it waits for work, and its wake-up.
    tending: AtomicBool,
    parked: AtomicBool,
    work: Arc<tokio::sync::Notify>,
}

/// A key this process committed lately: when that commit was sent and, if it kept the lock,
/// the lock's holder string, fence and the number committed under it.
struct Kept {
    since: Instant,
    lock: Option<KeptLock>,
}

struct KeptLock {
    holder: String,
    fence: u64,
    last: u64,
    // When this process first kept the lock in the current run of calls.
    kept_from: Instant,
}

/// What this process's last commit on a key left for the next call.
enum Left {
    /// The lock, kept: the ticket, how long the lock was kept for, and since when this
    /// process has kept it from call to call.
    Lock(SeqTicket, Duration, Instant),
    /// A commit within `keep`, which freed the lock: this call's commit may keep it.
    Recent,
    Nothing,
}

impl Keeper {
    pub(crate) fn new(keep: Duration, lease: Duration) -> Self {
        let kept_lease = keep
            .saturating_mul(50)
            .max(Duration::from_millis(250))
            .min(lease);
        Keeper {
            // A kept lock must be taken well inside its life on the server.
            keep: keep.min(kept_lease / 4),
            lease: kept_lease,
            kept: DashMap::new(),
            tending: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            work: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// A kept lock is handed to a call that starts within this long of its commit.
    fn reuse_within(&self) -> Duration {
        self.keep
    }

    /// Whether a commit may keep the lock again: not once this process has kept it from call
    /// to call for a whole kept lease (`since`), so that a process that cannot ask for the
    /// key (an older build, without the want flag) gets a free lock that often.
    fn may_keep(&self, since: Option<Instant>) -> bool {
        since.is_none_or(|since| since.elapsed() < self.lease)
    }

    /// Files `kept` for the next call on `lock`; hands back the lock it keeps if it is too
    /// late for a call to take it, or if a newer commit filed one meanwhile.
    fn file(&self, lock: String, kept: Kept) -> Option<KeptLock> {
        use dashmap::mapref::entry::Entry;
        if kept.since.elapsed() >= self.reuse_within() {
            return kept.lock;
        }
        match self.kept.entry(lock) {
            Entry::Occupied(newer) if newer.get().since > kept.since => kept.lock,
            Entry::Occupied(mut older) => {
                older.insert(kept);
                None
            }
            Entry::Vacant(vacant) => {
                vacant.insert(kept);
                None
            }
        }
    }

    /// Makes sure a task will free (or forget) what is filed if no call takes it in time.
    fn tend(self: &Arc<Self>, detached: &Detached) {
        if !self.tending.swap(true, SeqCst) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(tend(
                        Arc::downgrade(self),
                        self.work.clone(),
                        detached.clone(),
                    ));
                }
                // Nobody can free it: its kept lease ends it.
                Err(_) => self.tending.store(false, SeqCst),
            }
        } else if self.parked.swap(false, SeqCst) {
            self.work.notify_one();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // The tending task holds only a weak reference: wake it so that it ends.
        self.work.notify_one();
    }
}

/// Frees the locks kept longer than a call may still take them (and forgets commits as old),
/// every half `keep` while any is filed; waits for work otherwise. Ends with the store (or its
/// runtime): the next commit filed starts another.
async fn tend(keeper: std::sync::Weak<Keeper>, work: Arc<tokio::sync::Notify>, detached: Detached) {
    struct Stopped(std::sync::Weak<Keeper>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            if let Some(keeper) = self.0.upgrade() {
                keeper.tending.store(false, SeqCst);
            }
        }
    }
    let _stopped = Stopped(keeper.clone());
    let wake = wake_flag(&detached.conn);
    loop {
        let Some(tended) = keeper.upgrade() else {
            return;
        };
        if tended.kept.is_empty() {
            tended.parked.store(true, SeqCst);
            let idle = tended.kept.is_empty();
            drop(tended);
            if idle {
                work.notified().await;
            }
            continue;
        }
        let (tick, stale_after) = (tended.keep / 2, tended.reuse_within());
        drop(tended);
        tokio::time::sleep(tick).await;
        let Some(tended) = keeper.upgrade() else {
            return;
        };
        let stale: Vec<String> = tended
            .kept
            .iter()
            .filter(|kept| kept.since.elapsed() >= stale_after)
            .map(|kept| kept.key().clone())
            .collect();
        let freed: Vec<(String, Kept)> = stale
            .into_iter()
            .filter_map(|lock| {
                tended
                    .kept
                    .remove_if(&lock, |_, kept| kept.since.elapsed() >= stale_after)
            })
            .collect();
        drop(tended);
        for (lock, kept) in freed {
            if let Some(kept) = kept.lock {
                // Token-checked; if it fails, Redis ends the kept lock after its kept lease.
                let _ = detached
                    .eval::<i64>(&RELEASE_LOCK, &[&lock], &[&kept.holder, wake], false)
                    .await;
            }
        }
    }
}

/// How [`RedisSequences::run`] waits for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceOptions {
    /// Give up waiting for the key after this long ([`SequencedError::Timeout`]).
    pub timeout: Option<Duration>,
}

/// Why a sequenced call produced no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum SequencedError<E> {
    /// The key stayed busy longer than [`SequenceOptions::timeout`].
    Timeout {
        /// The logical key.
        key: String,
    },
    /// The call tried to take a key that the code calling it already holds (a sequenced body
    /// calling itself with the same key, in this process); waiting would never end.
    Reentrant {
        /// The logical key.
        key: String,
    },
    /// Redis failed (including a lease lost before the commit, and a server that lost its
    /// data, [`RedisStoreError::DataLost`]); no number was consumed.
    Store(RedisStoreError),
    /// The body returned `Err`; its number stays free for the next caller.
    Body(E),
    /// The body returned `Ok` and its commit was sent, but whether it landed is unknown (no
    /// answer after the re-sends, no marker yet): the number may be consumed.
    CommitUnknown {
        /// The logical key.
        key: String,
        /// The number that may have been consumed.
        number: u64,
        /// The last failure seen.
        source: RedisStoreError,
    },
    /// The key's numbers are used up (the last committed one is `u64::MAX`). The body did not run.
    Exhausted {
        /// The logical key.
        key: String,
    },
}

impl<E> From<RedisStoreError> for SequencedError<E> {
    fn from(err: RedisStoreError) -> Self {
        SequencedError::Store(err)
    }
}

/// The sequence operations of a [`RedisStore`] (see [`RedisStore::sequences`]).
#[derive(Debug, Clone, Copy)]
pub struct RedisSequences<'s> {
    store: &'s RedisStore,
}

impl RedisStore {
    /// Per-key locks with fencing tokens and gap-free counters on this store.
    pub fn sequences(&self) -> RedisSequences<'_> {
        RedisSequences { store: self }
    }
}

impl<'s> RedisSequences<'s> {
    /// One attempt to take `key`'s lock for `lease`: the ticket, or the holder's remaining lease.
    /// A key never committed starts at `start`. Refuses with [`RedisStoreError::DataLost`] if
    /// the server lost its data since this process first used it.
    pub async fn acquire(
        &self,
        key: &RedisKey,
        start: u64,
        lease: Duration,
    ) -> Result<Result<SeqTicket, Duration>, RedisStoreError> {
        let (lock, seq, want) = (
            key.redis_key("lock"),
            key.redis_key("seq"),
            key.redis_key("want"),
        );
        let lease_ms = lease.as_millis().max(1).to_string();
        let token = owner_token();
        let epoch = self.store.epoch().await?;
        let cluster = self.store.connection().await?.is_cluster();
        if cluster {
            // The epoch lives in another slot: check it with a command of its own.
            let found: Option<String> = self
                .store
                .run_retrying(|mut conn| {
                    let cmd = redis::cmd("GET").arg(EPOCH_KEY).to_owned();
                    async move { cmd.query_async(&mut conn).await }
                })
                .await?;
            self.store.check_epoch(&epoch, found)?;
        }
        let keys: &[&str] = if cluster {
            &[&lock, &seq, &want]
        } else {
            &[&lock, &seq, &want, EPOCH_KEY]
        };
        let granted = Instant::now();
        // Re-sending is safe: a lost reply's lock carries our token and is handed back to us.
        let acquired: Result<(i64, Option<String>), _> = self
            .store
            .eval(&ACQUIRE, keys, &[&lease_ms, &token, &epoch], true)
            .await;
        let (fence, last) = match acquired {
            Ok(acquired) => acquired,
            Err(err) => {
                if err.is_retryable() {
                    self.release_unanswered(&lock, token).await;
                }
                return Err(err);
            }
        };
        if fence == -1 {
            self.store
                .check_epoch(&epoch, last.clone().filter(|e| !e.is_empty()))?;
        }
        if fence <= 0 {
            let remaining = last.and_then(|ms| ms.parse::<i64>().ok()).unwrap_or(0);
            return Ok(Err(Duration::from_millis(remaining.max(0) as u64)));
        }
        let last = last
            .map(|n| {
                n.parse::<u64>().map_err(|_| RedisStoreError::Undecodable {
                    key: seq.clone(),
                    reason: format!("the last number `{n}` is not a u64"),
                })
            })
            .transpose()?;
        let number = match last {
            Some(last) => last.saturating_add(1),
            None => start,
        };
        let ticket = SeqTicket {
            granted,
            holder: format!("{fence}:{token}"),
            done: key.redis_key(&format!("done:{fence}")),
            lock,
            seq,
            want,
            last,
            number,
            fence: fence as u64,
        };
        // The lock (and its fence) counts once it reached the store's durability.
        if let Err(err) = self.store.detached().await?.confirm().await {
            let _ = self.abort(&ticket).await;
            return Err(err);
        }
        Ok(Ok(ticket))
    }

    /// An acquire that got no answer may still land (a paused server runs it later): send a
    /// release for its token after it, in the background, so that it never holds the key for
    /// a whole lease with nobody to use it.
    async fn release_unanswered(&self, lock: &str, token: String) {
        let Ok(detached) = self.store.detached().await else {
            return;
        };
        let lock = lock.to_owned();
        let wake = wake_flag(&detached.conn);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = detached
                    .eval::<i64>(&RELEASE_BY_TOKEN, &[&lock], &[&token, wake], true)
                    .await;
            });
        }
    }

    /// Consumes the ticket's number and frees the key, if the ticket still holds the lock:
    /// [`RedisStoreError::LeaseLost`] (nothing consumed) if it does not, and
    /// [`RedisStoreError::OutcomeUnknown`] if no answer came back and the marker cannot tell.
    /// The commit is finished by a task of its own: dropping this future does not stop it.
    pub async fn commit(&self, ticket: &SeqTicket) -> Result<(), RedisStoreError> {
        let commit = Commit {
            detached: self.store.detached().await?,
            ticket: ticket.clone(),
            heartbeat: None,
            keeper: None,
            keep: false,
            kept_from: None,
        };
        commit.spawn().await
    }

    /// Frees the key without consuming the number; `false` if the ticket no longer held it.
    pub async fn abort(&self, ticket: &SeqTicket) -> Result<bool, RedisStoreError> {
        let wake = wake_flag(&self.store.connection().await?);
        let aborted: i64 = self
            .store
            .eval(
                &RELEASE_LOCK,
                &[&ticket.lock],
                &[&ticket.holder, wake],
                true,
            )
            .await?;
        Ok(aborted == 1)
    }

    /// The last committed number of `key`, if any.
    pub async fn current(&self, key: &RedisKey) -> Result<Option<u64>, RedisStoreError> {
        let seq = key.redis_key("seq");
        self.store
            .run_retrying(|mut conn| {
                let cmd = redis::cmd("HGET").arg(&seq).arg("n").to_owned();
                async move { cmd.query_async(&mut conn).await }
            })
            .await
    }

    /// Forgets `key`'s counter: the next call starts at its `start` again. Fencing tokens keep
    /// growing. Waits (with backoff) while a call holds the key, at most `max_wait`.
    pub async fn reset(&self, key: &RedisKey, max_wait: Duration) -> Result<(), RedisStoreError> {
        let (lock, seq, want) = (
            key.redis_key("lock"),
            key.redis_key("seq"),
            key.redis_key("want"),
        );
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
        loop {
            let held_ms: i64 = self
                .store
                .eval(&RESET, &[&lock, &seq, &want], &[], true)
                .await?;
            if held_ms < 0 {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= max_wait {
                return Err(RedisStoreError::Timeout { after: max_wait });
            }
            let held = Duration::from_millis(held_ms as u64);
            backoff.wait(Some(held.min(max_wait - waited))).await;
        }
    }

    /// Runs `body` while holding `key` (one holder at a time across every process sharing the
    /// store) and commits its number if it returns `Ok`.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use racefree_runtime::redis::{RedisKey, RedisStore, SequenceOptions};
    ///
    /// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
    /// let key = RedisKey::new("orders::next_no", None, "shop-1");
    /// let no = REDIS
    ///     .sequences()
    ///     .run(&key, 1, SequenceOptions::default(), |ticket| async move {
    ///         Ok::<_, std::io::Error>(format!("WO-{:05}", ticket.number()))
    ///     })
    ///     .await;
    /// # drop(no); }
    /// ```
    pub async fn run<T, E, F, Fut>(
        &self,
        key: &RedisKey,
        start: u64,
        options: SequenceOptions,
        body: F,
    ) -> Result<T, SequencedError<E>>
    where
        F: FnOnce(SeqTicket) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = options.timeout.map(|t| Instant::now() + t);
        let held = self
            .hold(key, start, deadline)
            .await
            .map_err(|e| e.into_sequenced(key))?;
        if held.ticket.last == Some(u64::MAX) {
            held.abort().await;
            return Err(SequencedError::Exhausted {
                key: key.tag().to_owned(),
            });
        }
        match held.holder.within(body(held.ticket.clone())).await {
            Ok(value) => {
                let number = held.ticket.number;
                match held.commit(number).await {
                    Ok(()) => Ok(value),
                    Err(RedisStoreError::OutcomeUnknown { source, .. }) => {
                        Err(SequencedError::CommitUnknown {
                            key: key.tag().to_owned(),
                            number,
                            source: *source,
                        })
                    }
                    Err(other) => Err(SequencedError::Store(other)),
                }
            }
            Err(err) => {
                held.abort().await;
                Err(SequencedError::Body(err))
            }
        }
    }

    /// Takes `key`: this process's FIFO turn, then the Redis lease (jittered retries capped
    /// by the holder's remaining lease), then a heartbeat that keeps the lease while held.
    pub(crate) async fn hold(
        &self,
        key: &RedisKey,
        start: u64,
        deadline: Option<Instant>,
    ) -> Result<HeldKey<'s>, HoldError> {
        let lease = self.store.store_options().lease;
        let locks = self.store.local_locks.get_or_init(DashMap::new);
        let mut local = LocalTurn::queue(locks, key.redis_key("lock"));
        if local.held_by_caller() {
            return Err(HoldError::Reentrant);
        }
        let waited_here = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), local.wait())
                .await
                .map_err(|_| HoldError::Timeout)?,
            None => local.wait().await,
        };

        let detached = self.store.detached().await.map_err(HoldError::Store)?;
        let left = self.left(key, &detached).await;
        let hot = !matches!(left, Left::Nothing);
        let (ticket, waited, held_for, kept_from) = match left {
            Left::Lock(ticket, held_for, from) => (ticket, waited_here, held_for, Some(from)),
            Left::Recent | Left::Nothing => match self
                .acquire(key, start, lease)
                .await
                .map_err(HoldError::Store)?
            {
                Ok(ticket) => (ticket, waited_here, lease, None),
                Err(_) => {
                    let ticket = self.wait_for_release(key, start, deadline).await?;
                    (ticket, true, lease, None)
                }
            },
        };

        let guard = ReleaseOnDrop::new(
            &RELEASE_LOCK,
            detached.conn.clone(),
            ticket.lock.clone(),
            ticket.holder.clone(),
        );
        let heartbeat = Heartbeat::start(
            &EXTEND_LOCK,
            detached.conn.clone(),
            ticket.lock.clone(),
            ticket.holder.clone(),
            lease,
            (ticket.granted, held_for),
            detached.options.command_timeout,
        );
        let holder = local.enter();
        Ok(HeldKey {
            detached,
            sequences: *self,
            ticket,
            waited,
            kept_from,
            hot,
            holder,
            heartbeat: Some(heartbeat),
            guard: Some(guard),
            _local: local,
        })
    }
}

impl RedisSequences<'_> {
    /// What this process's last commit on `key` left: the lock it kept, if still fresh (a
    /// stale one is freed), or the news that it was recent (see [`StoreOptions::keep`]).
    ///
    /// [`StoreOptions::keep`]: super::StoreOptions::keep
    async fn left(&self, key: &RedisKey, detached: &Detached) -> Left {
        let Some(keeper) = self.store.keeper.get() else {
            return Left::Nothing;
        };
        let lock = key.redis_key("lock");
        let Some((_, kept)) = keeper.kept.remove(&lock) else {
            return Left::Nothing;
        };
        let fresh = kept.since.elapsed() < keeper.reuse_within();
        let held = match kept.lock {
            None if fresh => return Left::Recent,
            None => return Left::Nothing,
            Some(held) if fresh => held,
            Some(stale) => {
                // Past its reuse window: free it and start over.
                let wake = wake_flag(&detached.conn);
                let _ = detached
                    .eval::<i64>(&RELEASE_LOCK, &[&lock], &[&stale.holder, wake], true)
                    .await;
                return Left::Nothing;
            }
        };
        let ticket = SeqTicket {
            granted: kept.since,
            done: key.redis_key(&format!("done:{}", held.fence)),
            seq: key.redis_key("seq"),
            want: key.redis_key("want"),
            lock,
            holder: held.holder,
            last: Some(held.last),
            number: held.last.saturating_add(1),
            fence: held.fence,
        };
        Left::Lock(ticket, keeper.lease, held.kept_from)
    }

    /// Takes `key` once another process frees it: tries again on the lock's wake-up hint (one
    /// server), or after a jittered pause capped by the holder's remaining lease.
    async fn wait_for_release(
        &self,
        key: &RedisKey,
        start: u64,
        deadline: Option<Instant>,
    ) -> Result<SeqTicket, HoldError> {
        let lease = self.store.store_options().lease;
        let channel = format!("{}:wake", key.redis_key("lock"));
        let polls = (Duration::from_millis(1), Duration::from_millis(50));
        let taken = wait_for_key(self.store, &channel, polls, deadline, |_| async move {
            Ok(match self.acquire(key, start, lease).await? {
                Ok(ticket) => Look::Done(ticket),
                Err(remaining) => Look::Again(Some(remaining)),
            })
        })
        .await
        .map_err(HoldError::Store)?;
        taken.ok_or(HoldError::Timeout)
    }
}

/// Why [`RedisSequences::hold`] could not take a key.
#[derive(Debug)]
pub(crate) enum HoldError {
    Timeout,
    Reentrant,
    Store(RedisStoreError),
}

impl HoldError {
    fn into_sequenced<E>(self, key: &RedisKey) -> SequencedError<E> {
        match self {
            HoldError::Timeout => SequencedError::Timeout {
                key: key.tag().to_owned(),
            },
            HoldError::Reentrant => SequencedError::Reentrant {
                key: key.tag().to_owned(),
            },
            HoldError::Store(err) => SequencedError::Store(err),
        }
    }
}

/// A key held in Redis (lease kept alive by the heartbeat) and in this process (FIFO turn).
/// Dropped without [`commit`](HeldKey::commit): the lock is freed in the background and the
/// number stays unused.
pub(crate) struct HeldKey<'s> {
    detached: Detached,
    sequences: RedisSequences<'s>,
    pub(crate) ticket: SeqTicket,
    // Another caller, here or in another process, had the key first.
    waited: bool,
    // Since when this process has kept the lock from call to call, if the lock was taken
    // from this process's last commit, without an acquire (and its epoch check).
    kept_from: Option<Instant>,
    // This process committed the key within `keep` before: the commit may keep the lock.
    hot: bool,
    pub(crate) holder: Holder,
    heartbeat: Option<Heartbeat>,
    guard: Option<ReleaseOnDrop>,
    _local: LocalTurn<'s>,
}

impl HeldKey<'_> {
    /// Commits `number` as the key's last number and frees the key. The commit runs on a
    /// task of its own with the heartbeat, so a caller dropped meanwhile does not stop it.
    pub(crate) async fn commit(mut self, number: u64) -> Result<(), RedisStoreError> {
        let mut ticket = self.ticket.clone();
        ticket.number = number;
        let commit = Commit {
            detached: self.detached.clone(),
            ticket,
            heartbeat: self.heartbeat.take(),
            keeper: self.sequences.store.keeper(),
            keep: self.hot,
            kept_from: self.kept_from,
        };
        // From here on the lock is only ever freed by the commit itself (or its lease).
        if let Some(guard) = self.guard.take() {
            guard.disarm();
        }
        let result = commit.spawn().await;
        if self.kept_from.is_some() && matches!(result, Err(RedisStoreError::LeaseLost { .. })) {
            // A kept lock skipped the acquire's epoch check: a server that lost its data
            // since then (the lock went with it) is told apart from a lease taken over here.
            let store = self.sequences.store;
            let found: Result<Option<String>, _> = self
                .detached
                .run(|mut conn| {
                    let cmd = redis::cmd("GET").arg(EPOCH_KEY).to_owned();
                    async move { cmd.query_async(&mut conn).await }
                })
                .await;
            if let (Ok(epoch), Ok(found)) = (store.epoch().await, found) {
                store.check_epoch(&epoch, found)?;
            }
        }
        result
    }

    /// Frees the key now, consuming nothing.
    pub(crate) async fn abort(mut self) {
        self.heartbeat = None;
        if let Err(err) = self.sequences.abort(&self.ticket).await {
            tracing::warn!(key = %self.ticket.lock, error = %err, "freeing a sequenced key; its lease will end it");
        }
        if let Some(guard) = self.guard.take() {
            guard.disarm();
        }
    }
}

/// A sequence commit, owned so that a task of its own can finish it.
struct Commit {
    detached: Detached,
    ticket: SeqTicket,
    // Kept beating until the commit has returned.
    heartbeat: Option<Heartbeat>,
    // Where the commit is filed for this process's next call on the key, and whether it may
    // keep the lock (the key was committed within `keep` before: a second call in a row).
    keeper: Option<Arc<Keeper>>,
    keep: bool,
    // Since when this process has kept the lock from call to call, if the call took it kept.
    kept_from: Option<Instant>,
}

impl Commit {
    async fn spawn(self) -> Result<(), RedisStoreError> {
        outlive_caller(self.ticket.lock.clone(), "commit", self.write()).await
    }

    async fn write(mut self) -> Result<(), RedisStoreError> {
        let ticket = &self.ticket;
        let number = ticket.number.to_string();
        let marker_ms = self.detached.marker_ttl().as_millis().to_string();
        let wake = wake_flag(&self.detached.conn);
        let keep_ms = match &self.keeper {
            Some(keeper) if self.keep && keeper.may_keep(self.kept_from) => {
                keeper.lease.as_millis().max(1).to_string()
            }
            _ => "0".to_owned(),
        };
        let token = ticket.token();
        let sent = Instant::now();
        let asked_to_keep = keep_ms != "0";
        let committed: Result<i64, _> = self
            .detached
            .eval(
                &COMMIT,
                &[&ticket.lock, &ticket.seq, &ticket.done, &ticket.want],
                &[&ticket.holder, &number, &marker_ms, wake, &keep_ms, token],
                true,
            )
            .await;
        // Negative: committed, and the lock kept under the fence it names.
        let answered = committed.is_ok();
        let (committed, kept) = match committed {
            Ok(fence) if fence < 0 => (Ok(1), Some(fence.unsigned_abs())),
            other => (other, None),
        };
        let keys = FinalWriteKeys {
            record: &ticket.seq,
            lease: &ticket.lock,
        };
        let result =
            finish_final_write(&self.detached, committed, keys, |last| self.settle(last)).await;
        drop(self.heartbeat.take());
        if asked_to_keep && (result.is_err() || !answered) {
            // Failed, or settled by its marker without an answer: a lock it kept (or keeps
            // when it lands later, behind this on the connection) is filed nowhere, so no call
            // holds it: free every lock of this token.
            let _ = self
                .detached
                .eval::<i64>(&RELEASE_BY_TOKEN, &[&ticket.lock], &[token, wake], false)
                .await;
        }
        if let (Some(keeper), Ok(()), true) = (&self.keeper, &result, answered || !asked_to_keep) {
            let lock = kept.map(|fence| KeptLock {
                holder: format!("{fence}:{token}"),
                fence,
                last: ticket.number,
                kept_from: self.kept_from.unwrap_or(sent),
            });
            if let Some(unfiled) = keeper.file(ticket.lock.clone(), Kept { since: sent, lock }) {
                // Too late for a call to take it (a slow confirm, a caller gone): free it.
                self.free(&unfiled.holder).await;
            }
            keeper.tend(&self.detached);
        } else if let (false, Err(RedisStoreError::LeaseLost { .. })) = (asked_to_keep, &result) {
            self.free(&ticket.holder).await;
        }
        result
    }

    /// Frees the key's lock if `holder` holds it (token-checked: nothing that is not ours).
    async fn free(&self, holder: &str) {
        let wake = wake_flag(&self.detached.conn);
        let _ = self
            .detached
            .eval::<i64>(&RELEASE_LOCK, &[&self.ticket.lock], &[holder, wake], false)
            .await;
    }

    /// No answer after the re-sends: the marker, read once more, decides if it is there (a
    /// read is served even while writes are paused); otherwise the commit may still land.
    async fn settle(&self, last: RedisStoreError) -> Result<(), RedisStoreError> {
        let marker = &self.ticket.done;
        let found: Result<bool, _> = self
            .detached
            .run(|mut conn| {
                let cmd = redis::cmd("EXISTS").arg(marker).to_owned();
                async move { cmd.query_async(&mut conn).await }
            })
            .await;
        match found {
            Ok(true) => Ok(()),
            _ => Err(RedisStoreError::OutcomeUnknown {
                key: self.ticket.seq.clone(),
                source: Box::new(last),
            }),
        }
    }
}

impl RedisStore {
    /// The store-wide epoch this process works in: read (or, on a new server, written with
    /// `SET NX`) on first use and remembered.
    pub(crate) async fn epoch(&self) -> Result<Arc<str>, RedisStoreError> {
        if let Some(epoch) = self.epoch.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(epoch);
        }
        let epoch = self.adopt_epoch().await?;
        let mut slot = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        Ok(slot.get_or_insert(epoch).clone())
    }

    async fn adopt_epoch(&self) -> Result<Arc<str>, RedisStoreError> {
        let token = owner_token();
        let found: Option<String> = self
            .run_retrying(|mut conn| {
                let cmd = redis::cmd("SET")
                    .arg(EPOCH_KEY)
                    .arg(&token)
                    .arg("NX")
                    .arg("GET")
                    .to_owned();
                async move { cmd.query_async(&mut conn).await }
            })
            .await?;
        Ok(found.unwrap_or(token).into())
    }

    fn check_epoch(&self, expected: &str, found: Option<String>) -> Result<(), RedisStoreError> {
        if found.as_deref() == Some(expected) {
            return Ok(());
        }
        Err(RedisStoreError::DataLost {
            key: EPOCH_KEY.to_owned(),
            expected: expected.to_owned(),
            found,
        })
    }

    /// Accepts that the server lost its data (see [`RedisStoreError::DataLost`]): this process
    /// adopts the server's current epoch (or starts a new one) and its sequences run again.
    /// Sequences whose counters were lost start from their `start` again, so reset or re-seed
    /// them from the system of record first if their numbers must not repeat.
    ///
    /// ```no_run
    /// # async fn demo(store: &racefree_runtime::redis::RedisStore) -> Result<(), racefree_runtime::redis::RedisStoreError> {
    /// store.accept_data_loss().await?;
    /// # Ok(()) }
    /// ```
    pub async fn accept_data_loss(&self) -> Result<(), RedisStoreError> {
        let epoch = self.adopt_epoch().await?;
        *self.epoch.write().unwrap_or_else(|e| e.into_inner()) = Some(epoch);
        Ok(())
    }
}

// ---- The store behind `#[sequenced(store = ...)]` ----

/// One named family of sequences in a [`RedisStore`]: the `store = …` of `#[sequenced]`.
#[derive(Debug, Clone, Copy)]
pub struct RedisSequence<'s> {
    store: &'s RedisStore,
    name: &'s str,
}

impl RedisStore {
    /// The sequences named `name` (one per key), for `#[sequenced(store = REDIS.sequence("…"))]`.
    ///
    /// ```
    /// use racefree_runtime::redis::RedisStore;
    ///
    /// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1/");
    /// let orders = REDIS.sequence("orders::next_no");
    /// # drop(orders);
    /// ```
    pub fn sequence<'s>(&'s self, name: &'s str) -> RedisSequence<'s> {
        RedisSequence { store: self, name }
    }
}

impl RedisSequence<'_> {
    /// The Redis key of `key` in this family (its JSON encoding names it). A key that does
    /// not encode (e.g. a map with non-string keys) is an error, never a shared fallback key.
    pub fn key<K: Serialize>(&self, key: &K) -> Result<RedisKey, RedisStoreError> {
        let text = serde_json::to_string(key).map_err(|e| RedisStoreError::Serialize {
            reason: format!("sequence key: {e}"),
        })?;
        Ok(RedisKey::new(self.name, None, text))
    }
}

/// A key of a [`RedisSequence`] held for one `#[sequenced]` call.
pub struct RedisSequenceLease<'s> {
    held: HeldKey<'s>,
}

impl<'s, K: Serialize> SequenceBackend<K> for RedisSequence<'s> {
    type Lease<'a>
        = RedisSequenceLease<'a>
    where
        Self: 'a;

    fn acquire_async(
        &self,
        key: K,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Self::Lease<'_>, SequenceError>> + Send {
        let key = self.key(&key);
        async move {
            let key = key.map_err(|err| SequenceError::Store(Box::new(err)))?;
            match self.store.sequences().hold(&key, 0, deadline).await {
                Ok(held) => Ok(RedisSequenceLease { held }),
                Err(HoldError::Timeout) => Err(SequenceError::Timeout),
                Err(HoldError::Reentrant) => Err(SequenceError::Reentrant),
                Err(HoldError::Store(err)) => Err(SequenceError::Store(Box::new(err))),
            }
        }
    }
}

impl SequenceLease for RedisSequenceLease<'_> {
    const STORE: &'static str = "redis";

    fn holder(&self) -> Holder {
        self.held.holder
    }

    fn fence(&self) -> u64 {
        self.held.ticket.fence()
    }

    fn waited(&self) -> Option<bool> {
        Some(self.held.waited)
    }

    fn next_async(&mut self) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send {
        std::future::ready(match self.held.ticket.last() {
            Some(u64::MAX) => Err(SequenceError::Exhausted),
            last => Ok(last.map(|n| n + 1)),
        })
    }

    async fn commit_async(self, used: u64) -> Result<(), SequenceError> {
        self.held.commit(used).await.map_err(|err| match err {
            RedisStoreError::LeaseLost { .. } => SequenceError::LeaseLost,
            err @ RedisStoreError::OutcomeUnknown { .. } => {
                SequenceError::CommitUnknown(Box::new(err))
            }
            other => SequenceError::Store(Box::new(other)),
        })
    }
}
