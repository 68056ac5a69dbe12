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
//! A sequenced call therefore costs 2 round trips uncontended. Fencing tokens only grow, so a
//! body that writes elsewhere can hand [`SeqTicket::fence`] to that system and have it refuse
//! writes with an older token (the classic fix for a paused lock holder).
//!
//! Waiting: inside one process, callers queue on a FIFO async mutex per key, so only the head
//! of the queue talks to Redis; across processes the head retries with jittered backoff capped
//! by the holder's remaining lease. There is no FIFO across processes.

use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::Script;
use serde::Serialize;

use crate::sequenced::{SequenceBackend, SequenceError, SequenceLease};
use crate::sync::keyed_locks::Holder;

use super::lease::{
    owner_token, Backoff, Heartbeat, LocalTurn, ReleaseOnDrop, EXTEND_LOCK, RELEASE_LOCK,
};
use super::{RedisKey, RedisStore, RedisStoreError};

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
if holder then
  local fence, token = string.match(holder, '^(%d+):(.*)$')
  if token == ARGV[2] then
    return {tonumber(fence), redis.call('HGET', KEYS[2], 'n')}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('HINCRBY', KEYS[2], 'fence', 1)
redis.call('SET', KEYS[1], fence .. ':' .. ARGV[2], 'PX', ARGV[1])
return {fence, redis.call('HGET', KEYS[2], 'n')}
"#,
    )
});

// KEYS: lock, seq, done marker of this holding. The marker (not the counter's last writer)
// tells a re-sent commit whose first reply was lost that it did commit: by the time it is
// re-sent, the next holder may have committed too.
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('HSET', KEYS[2], 'n', ARGV[2])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
return 0
"#,
    )
});

// KEYS: lock, seq. A reset waits for the key like a call does: it never lands between a
// holder's read of the counter and its commit.
static RESET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('PTTL', KEYS[1]) end
redis.call('HDEL', KEYS[2], 'n', 'committed')
return -1
"#,
    )
});

/// How long a commit's marker outlives it: far longer than any re-send of the commit.
const COMMIT_MARKER_MS: &str = "300000";

/// The right to run one sequenced body: the number it may commit and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqTicket {
    lock: String,
    seq: String,
    done: String,
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
    /// Redis failed (including a lease lost before the commit); no number was consumed.
    Store(RedisStoreError),
    /// The body returned `Err`; its number stays free for the next caller.
    Body(E),
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
    /// A key never committed starts at `start`.
    pub async fn acquire(
        &self,
        key: &RedisKey,
        start: u64,
        lease: Duration,
    ) -> Result<Result<SeqTicket, Duration>, RedisStoreError> {
        let (lock, seq) = (key.redis_key("lock"), key.redis_key("seq"));
        let lease_ms = lease.as_millis().max(1).to_string();
        let token = owner_token();
        // Re-sending is safe: a lost reply's lock carries our token and is handed back to us.
        let (fence, last): (i64, Option<i64>) = self
            .store
            .eval(&ACQUIRE, &[&lock, &seq], &[&lease_ms, &token], true)
            .await?;
        if fence == 0 {
            return Ok(Err(Duration::from_millis(last.unwrap_or(0).max(0) as u64)));
        }
        let number = match last {
            Some(last) => last as u64 + 1,
            None => start,
        };
        let holder = format!("{fence}:{token}");
        let done = key.redis_key(&format!("done:{fence}"));
        Ok(Ok(SeqTicket {
            lock,
            seq,
            done,
            holder,
            last: last.map(|n| n as u64),
            number,
            fence: fence as u64,
        }))
    }

    /// Consumes the ticket's number and frees the key, if the ticket still holds the lock.
    pub async fn commit(&self, ticket: &SeqTicket) -> Result<(), RedisStoreError> {
        let number = ticket.number.to_string();
        let committed: i64 = self
            .store
            .eval(
                &COMMIT,
                &[&ticket.lock, &ticket.seq, &ticket.done],
                &[&ticket.holder, &number, COMMIT_MARKER_MS],
                true,
            )
            .await?;
        if committed == 1 {
            Ok(())
        } else {
            Err(RedisStoreError::LeaseLost {
                key: ticket.lock.clone(),
            })
        }
    }

    /// Frees the key without consuming the number; `false` if the ticket no longer held it.
    pub async fn abort(&self, ticket: &SeqTicket) -> Result<bool, RedisStoreError> {
        let aborted: i64 = self
            .store
            .eval(&RELEASE_LOCK, &[&ticket.lock], &[&ticket.holder], true)
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
        let (lock, seq) = (key.redis_key("lock"), key.redis_key("seq"));
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
        loop {
            let held_ms: i64 = self.store.eval(&RESET, &[&lock, &seq], &[], true).await?;
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
        match held.holder.within(body(held.ticket.clone())).await {
            Ok(value) => {
                let number = held.ticket.number;
                held.commit(number)
                    .await
                    .map(|()| value)
                    .map_err(SequencedError::Store)
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
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), local.wait())
                .await
                .map_err(|_| HoldError::Timeout)?,
            None => local.wait().await,
        }

        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        let ticket = loop {
            match self
                .acquire(key, start, lease)
                .await
                .map_err(HoldError::Store)?
            {
                Ok(ticket) => break ticket,
                Err(remaining) => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return Err(HoldError::Timeout);
                    }
                    let cap = left.map_or(remaining, |left| left.min(remaining));
                    backoff.wait(Some(cap)).await;
                }
            }
        };

        let conn = self.store.connection().await.map_err(HoldError::Store)?;
        let guard = ReleaseOnDrop::new(
            &RELEASE_LOCK,
            conn.clone(),
            ticket.lock.clone(),
            ticket.holder.clone(),
        );
        let heartbeat = Heartbeat::start(
            &EXTEND_LOCK,
            conn,
            ticket.lock.clone(),
            ticket.holder.clone(),
            lease,
        );
        let holder = local.enter();
        Ok(HeldKey {
            sequences: *self,
            ticket,
            holder,
            heartbeat: Some(heartbeat),
            guard: Some(guard),
            _local: local,
        })
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
    sequences: RedisSequences<'s>,
    pub(crate) ticket: SeqTicket,
    pub(crate) holder: Holder,
    heartbeat: Option<Heartbeat>,
    guard: Option<ReleaseOnDrop>,
    _local: LocalTurn<'s>,
}

impl HeldKey<'_> {
    /// Commits `number` as the key's last number and frees the key.
    pub(crate) async fn commit(mut self, number: u64) -> Result<(), RedisStoreError> {
        self.heartbeat = None;
        let mut ticket = self.ticket.clone();
        ticket.number = number;
        let committed = self.sequences.commit(&ticket).await;
        if let Some(guard) = self.guard.take() {
            match committed {
                // Committed (the lock is gone) or unknown after re-sends (the lease ends it).
                Ok(())
                | Err(RedisStoreError::Unavailable { .. } | RedisStoreError::Timeout { .. }) => {
                    guard.disarm()
                }
                Err(_) => drop(guard),
            }
        }
        committed
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
    fn holder(&self) -> Holder {
        self.held.holder
    }

    fn fence(&self) -> u64 {
        self.held.ticket.fence()
    }

    fn next_async(&mut self) -> impl Future<Output = Result<Option<u64>, SequenceError>> + Send {
        std::future::ready(Ok(self.held.ticket.last().map(|n| n + 1)))
    }

    async fn commit_async(self, used: u64) -> Result<(), SequenceError> {
        self.held.commit(used).await.map_err(|err| match err {
            RedisStoreError::LeaseLost { .. } => SequenceError::LeaseLost,
            other => SequenceError::Store(Box::new(other)),
        })
    }
}
