//! [`RedisStore`]: a lazily connected handle to one Redis server or cluster, and the deadline
//! and retry discipline every command goes through.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::FromRedisValue;
use tokio::sync::OnceCell;

use super::connection::{cluster, Connection, Inner, Lua, Wakeups};
use super::lease::LocalKey;
use super::sequence::Keeper;
use super::RedisStoreError;
use crate::sync::single_flight::SingleFlight;

/// Where the store connects to.
#[derive(Debug)]
enum Target {
    Url(Cow<'static, str>),
    StaticCluster(&'static [&'static str]),
    Cluster(Vec<String>),
}

/// Deadlines and leases of a [`RedisStore`]. `const`, so a `static` store can set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The most one command may take, including a reconnect; past it, [`RedisStoreError::Timeout`].
    pub command_timeout: Duration,
    /// How long a claim, sequence lock or fill lock lives without a heartbeat. The holder
    /// extends it every third of this (sooner after a failed beat) while its body runs and its
    /// final write is in flight; a crashed holder's lease ends after it.
    pub lease: Duration,
    /// How many times a token-checked command is re-sent after a lost connection or a timeout.
    pub retries: u32,
    /// Run even though the server may evict keys (`maxmemory-policy` other than `noeviction`,
    /// or a server whose `CONFIG` command is disabled so the policy cannot be read). Off by
    /// default: an evicted claim, lock or counter voids every guarantee of this store.
    pub accept_eviction: bool,
    /// How far claims, completions, acquires and commits must have travelled before they
    /// count as done (default: the primary's reply).
    pub durability: Durability,
    /// How long after a `#[sequenced]` commit the key's lock stays with this process for its
    /// next call on the same key (default 2 ms; [`Duration::ZERO`]: never). Only a call that
    /// itself started within `keep` of the previous commit on its key keeps the lock (a key
    /// called once costs no more than without keeping); a call that starts within `keep` of a
    /// commit that kept it takes the kept lock without a round trip, so a key called back to
    /// back costs one round trip per call instead of two.
    ///
    /// A commit keeps the lock only while no other process asked for the key in the last
    /// `lease` (an acquire that finds the key held says so on the server), so processes that
    /// take turns on a key hand it over as they would without keeping; the first time another
    /// process asks, it waits for the holder's next commit or for the kept lock to be freed
    /// after `keep` without a call, by a task of the store's. Redis frees a kept lock itself
    /// after its kept lease, 250 ms (or `50 × keep`, if longer; at most a `lease`): a process
    /// that dies between calls holds the key that long, not a lease. Until its call's first
    /// heartbeat (a third of that in) extends it to a whole `lease`, a kept lock lives only that
    /// long. A run of kept calls ends after a kept lease (that commit frees the lock). `keep` is
    /// cut to a quarter of the kept lease.
    pub keep: Duration,
}

/// How far a write must have travelled before the store treats it as done: the primary's
/// reply (the default), `WAIT` for replicas, or `WAITAOF` for fsyncs. Each level above
/// [`Primary`](Durability::Primary) costs one more round trip per write, which it waits for.
///
/// A claim or an acquire that does not reach the level is given up (nothing ran, nothing was
/// consumed, [`RedisStoreError::NotDurable`]); a completion or a commit that does not reach it
/// is reported as unknown (`OutcomeUnknown` / `CommitUnknown`): it is on the primary, but a
/// failover or a crash may still lose it. `WAIT` counts the writes of the connection it is sent
/// on: if the connection was re-established between a write and its `WAIT`, the `WAIT` vouches
/// for nothing (the window is one reconnect wide). One server only: on a Cluster this store cannot route
/// `WAIT` to the key's shard, and refuses on first use ([`RedisStoreError::Unsupported`]).
///
/// ```
/// use std::time::Duration;
/// use racefree_runtime::redis::{Durability, RedisStore};
///
/// let store = RedisStore::new("redis://127.0.0.1/").durability(Durability::Replicas {
///     replicas: 1,
///     timeout: Duration::from_millis(200),
/// });
/// # drop(store);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// In the primary's memory: done when it replies.
    #[default]
    Primary,
    /// `WAIT replicas timeout`: acknowledged by at least `replicas` replicas.
    Replicas {
        /// How many replicas must acknowledge.
        replicas: u32,
        /// How long to wait for them.
        timeout: Duration,
    },
    /// `WAITAOF local replicas timeout`: written to the append-only file and fsynced locally
    /// (if `local`; needs `appendonly yes`) and on at least `replicas` replicas.
    Fsynced {
        /// Fsynced on the primary itself.
        local: bool,
        /// How many replicas must have fsynced.
        replicas: u32,
        /// How long to wait for them.
        timeout: Duration,
    },
}

impl StoreOptions {
    /// 2 s per command, 10 s leases, 3 retries.
    pub const fn new() -> Self {
        StoreOptions {
            command_timeout: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            retries: 3,
            accept_eviction: false,
            durability: Durability::Primary,
            keep: Duration::from_millis(2),
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// A Redis (or Redis Cluster) store for `#[idempotent]`, `#[sequenced]` and `#[cached]`.
///
/// Nothing connects until the first command; a failed connection attempt is reported as
/// [`RedisStoreError::Unavailable`] and retried by the next command. Build it as a `static`:
///
/// ```
/// use racefree_runtime::redis::RedisStore;
///
/// static REDIS: RedisStore = RedisStore::lazy("redis://127.0.0.1:6379/");
/// ```
///
/// or hold it in an `Arc` built at start-up from configuration:
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use racefree_runtime::redis::RedisStore;
///
/// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1/".into());
/// let store = Arc::new(RedisStore::new(url).lease(Duration::from_secs(30)));
/// let cluster = RedisStore::cluster(vec!["redis://127.0.0.1:7000".into(), "redis://127.0.0.1:7001".into()]);
/// # drop((store, cluster));
/// ```
pub struct RedisStore {
    target: Target,
    options: StoreOptions,
    connection: OnceCell<(Connection, Deployment)>,
    // The wake-up hints' pub/sub connection, once one was made (one server only).
    wakeups: tokio::sync::Mutex<Option<Arc<Wakeups>>>,
    // The store-wide epoch this process first saw (see `RedisStore::accept_data_loss`).
    pub(crate) epoch: std::sync::RwLock<Option<Arc<str>>>,
    // In-process coordination in front of Redis, so one process sends one request per key.
    pub(crate) fills: OnceLock<SingleFlight<String, Arc<str>>>,
    pub(crate) local_locks: OnceLock<DashMap<String, Arc<LocalKey>>>,
    // `#[sequenced]` locks kept between calls (see `StoreOptions::keep`).
    pub(crate) keeper: OnceLock<Arc<Keeper>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.target)
            .field("options", &self.options)
            .field("connected", &self.connection.initialized())
            .finish()
    }
}

impl RedisStore {
    const fn with_target(target: Target) -> Self {
        RedisStore {
            target,
            options: StoreOptions::new(),
            connection: OnceCell::const_new(),
            epoch: std::sync::RwLock::new(None),
            wakeups: tokio::sync::Mutex::const_new(None),
            fills: OnceLock::new(),
            local_locks: OnceLock::new(),
            keeper: OnceLock::new(),
        }
    }

    /// A store for the server at `url` (`redis://host:port/db`), connected on first use.
    pub const fn lazy(url: &'static str) -> Self {
        Self::with_target(Target::Url(Cow::Borrowed(url)))
    }

    /// A store for the server at `url`, connected on first use.
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_target(Target::Url(Cow::Owned(url.into())))
    }

    /// A store for a Redis Cluster reachable through any of `nodes`, connected on first use.
    pub const fn lazy_cluster(nodes: &'static [&'static str]) -> Self {
        Self::with_target(Target::StaticCluster(nodes))
    }

    /// A store for a Redis Cluster reachable through any of `nodes`, connected on first use.
    pub fn cluster(nodes: Vec<String>) -> Self {
        Self::with_target(Target::Cluster(nodes))
    }

    /// Sets all options at once.
    pub const fn options(mut self, options: StoreOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets how long a `#[sequenced]` commit keeps the lock for the next call (see
    /// [`StoreOptions::keep`]; [`Duration::ZERO`] turns it off).
    pub const fn keep(mut self, keep: Duration) -> Self {
        self.options.keep = keep;
        self
    }

    /// The keeper of `#[sequenced]` locks between calls, unless keeping is off.
    pub(crate) fn keeper(&self) -> Option<Arc<Keeper>> {
        if self.options.keep.is_zero() {
            return None;
        }
        Some(Arc::clone(self.keeper.get_or_init(|| {
            Arc::new(Keeper::new(self.options.keep, self.options.lease))
        })))
    }

    /// Sets the lease of claims and locks (see [`StoreOptions::lease`]).
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.options.lease = lease;
        self
    }

    /// Sets the per-command deadline (see [`StoreOptions::command_timeout`]).
    pub const fn command_timeout(mut self, timeout: Duration) -> Self {
        self.options.command_timeout = timeout;
        self
    }

    /// Runs even if the server may evict keys (see [`StoreOptions::accept_eviction`]).
    pub const fn accept_eviction(mut self) -> Self {
        self.options.accept_eviction = true;
        self
    }

    /// Sets how far writes must travel before they count (see [`Durability`]).
    pub const fn durability(mut self, durability: Durability) -> Self {
        self.options.durability = durability;
        self
    }

    /// The options in force.
    pub fn store_options(&self) -> StoreOptions {
        self.options
    }

    /// The connection, established on first call. Cheap to clone; reconnects by itself after
    /// a lost connection (the command that saw the loss fails with a typed error).
    ///
    /// The first call also checks the deployment: it reads `maxmemory-policy` and
    /// `proto-max-bulk-len` (`CONFIG GET`) and fails with [`RedisStoreError::EvictionPolicy`]
    /// unless the policy is `noeviction` or the store [accepts eviction](Self::accept_eviction).
    /// A server that refuses `CONFIG` (managed services often rename it) counts as "policy
    /// unknown", which is refused the same way.
    pub async fn connection(&self) -> Result<Connection, RedisStoreError> {
        Ok(self.connected().await?.0.clone())
    }

    async fn connected(&self) -> Result<&(Connection, Deployment), RedisStoreError> {
        let connect = self.connection.get_or_try_init(|| async {
            let deadline = self.options.command_timeout * 3;
            let connecting = async {
                let mut conn = self.connect().await?;
                let deployment = Deployment::check(&conn, &self.options).await?;
                // So that no claim, heartbeat or final write pays a `NOSCRIPT` round trip on
                // its first use. Best effort: a script that is missing is loaded when it runs.
                let _ = with_deadline(self.options.command_timeout, conn.load_scripts()).await;
                Ok((conn, deployment))
            };
            match tokio::time::timeout(deadline, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(RedisStoreError::Timeout { after: deadline }),
            }
        });
        connect.await
    }

    /// The most bytes one record may take: the server's `proto-max-bulk-len` (read on first
    /// use; Redis's default of 512 MiB if it cannot be read).
    pub async fn max_record_bytes(&self) -> Result<u64, RedisStoreError> {
        Ok(self.connected().await?.1.max_bulk)
    }

    /// The wake-up hints (see [`Wakeups`]): `None` on a Cluster, or while the pub/sub
    /// connection cannot be made (waiters then poll).
    pub(crate) async fn wakeups(&self) -> Option<Arc<Wakeups>> {
        let Target::Url(url) = &self.target else {
            return None;
        };
        let mut slot = self.wakeups.lock().await;
        if let Some(wakeups) = slot.as_ref().filter(|w| w.is_alive()) {
            return Some(Arc::clone(wakeups));
        }
        let wakeups = Wakeups::connect(url, self.options.command_timeout).await;
        slot.clone_from(&wakeups);
        wakeups
    }

    /// A handle that runs commands without borrowing the store, for work that must outlive
    /// the caller's future (a completion or commit finished by a spawned task).
    pub(crate) async fn detached(&self) -> Result<Detached, RedisStoreError> {
        Ok(Detached {
            conn: self.connection().await?,
            options: self.options,
        })
    }

    async fn connect(&self) -> Result<Connection, RedisStoreError> {
        let timeout = self.options.command_timeout;
        let inner = match &self.target {
            Target::Url(url) => {
                let client = redis::Client::open(url.as_ref()).map_err(RedisStoreError::from)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(200));
                Inner::Single(ConnectionManager::new_with_config(client, config).await?)
            }
            Target::StaticCluster(nodes) => {
                Inner::Cluster(cluster(nodes.iter().copied(), timeout).await?)
            }
            Target::Cluster(nodes) => {
                Inner::Cluster(cluster(nodes.iter().map(String::as_str), timeout).await?)
            }
        };
        Ok(Connection::new(inner))
    }

    /// Round trips this store has made so far (a script counts as one, as does a pipeline).
    /// Zero before the first connection.
    pub fn round_trips(&self) -> u64 {
        self.connection
            .get()
            .map_or(0, |(conn, _)| conn.round_trips())
    }

    /// Runs a token-checked (hence repeatable) command, re-sending it after a lost connection
    /// or a timeout, at most [`StoreOptions::retries`] times.
    pub(crate) async fn run_retrying<T, F>(
        &self,
        command: impl FnMut(Connection) -> F,
    ) -> Result<T, RedisStoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.detached().await?.run_retrying(command).await
    }

    /// Runs a Lua script (EVALSHA; the scripts are loaded at connect, see `connection.rs`) under the store's deadline;
    /// `repeatable` scripts are re-sent after a lost connection or a timeout.
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &'static Lua,
        keys: &[&str],
        args: &[&str],
        repeatable: bool,
    ) -> Result<T, RedisStoreError> {
        self.detached()
            .await?
            .eval(script, keys, args, repeatable)
            .await
    }
}

/// The connection and the deadlines of a store, owned: what a spawned task needs to finish a
/// write after the caller's future is gone.
#[derive(Clone)]
pub(crate) struct Detached {
    pub(crate) conn: Connection,
    pub(crate) options: StoreOptions,
}

impl Detached {
    pub(crate) async fn run<T, F>(
        &self,
        command: impl FnOnce(Connection) -> F,
    ) -> Result<T, RedisStoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        with_deadline(self.options.command_timeout, command(self.conn.clone())).await
    }

    pub(crate) async fn run_retrying<T, F>(
        &self,
        mut command: impl FnMut(Connection) -> F,
    ) -> Result<T, RedisStoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            match self.run(&mut command).await {
                Err(err) if err.is_retryable() && attempt < self.options.retries => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(25) * attempt).await;
                }
                other => return other,
            }
        }
    }

    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &'static Lua,
        keys: &[&str],
        args: &[&str],
        repeatable: bool,
    ) -> Result<T, RedisStoreError> {
        let attempt = |mut conn: Connection| async move { conn.eval(script, keys, args).await };
        if repeatable {
            self.run_retrying(attempt).await
        } else {
            self.run(attempt).await
        }
    }

    /// Waits until this connection's writes so far reached the store's [`Durability`].
    pub(crate) async fn confirm(&self) -> Result<(), RedisStoreError> {
        let (cmd, wanted) = match self.options.durability {
            Durability::Primary => return Ok(()),
            Durability::Replicas { replicas, timeout } => (
                redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(timeout.as_millis().max(1) as u64)
                    .to_owned(),
                (0, replicas),
            ),
            Durability::Fsynced {
                local,
                replicas,
                timeout,
            } => (
                redis::cmd("WAITAOF")
                    .arg(u32::from(local))
                    .arg(replicas)
                    .arg(timeout.as_millis().max(1) as u64)
                    .to_owned(),
                (u32::from(local), replicas),
            ),
        };
        let wait = match self.options.durability {
            Durability::Replicas { timeout, .. } | Durability::Fsynced { timeout, .. } => timeout,
            Durability::Primary => Duration::ZERO,
        };
        let deadline = self.options.command_timeout + wait;
        let reached = with_deadline(deadline, async {
            let mut conn = self.conn.clone();
            match self.options.durability {
                Durability::Fsynced { .. } => {
                    let (local, replicas): (u32, u32) = cmd.query_async(&mut conn).await?;
                    Ok((local, replicas))
                }
                _ => Ok((0, cmd.query_async::<u32>(&mut conn).await?)),
            }
        })
        .await?;
        if reached.0 >= wanted.0 && reached.1 >= wanted.1 {
            Ok(())
        } else {
            Err(RedisStoreError::NotDurable {
                wanted: self.options.durability,
                local: reached.0 > 0,
                replicas: reached.1,
            })
        }
    }

    /// How long a commit marker must outlive its commit: every re-send of the commit, with
    /// room to spare, and never less than a lease.
    pub(crate) fn marker_ttl(&self) -> Duration {
        let resends = (self.options.command_timeout + Duration::from_millis(100))
            * (self.options.retries + 1);
        resends.max(self.options.lease) * 2
    }
}

/// What the first connection found out about the server.
#[derive(Debug, Clone)]
pub(crate) struct Deployment {
    /// `proto-max-bulk-len`: the largest string the server accepts.
    pub(crate) max_bulk: u64,
}

/// Redis's default `proto-max-bulk-len` (512 MiB), assumed when the server's cannot be read.
const DEFAULT_MAX_BULK: u64 = 512 * 1024 * 1024;

impl Deployment {
    async fn check(
        conn: &Connection,
        options: &StoreOptions,
    ) -> Result<Deployment, RedisStoreError> {
        let config = with_deadline(options.command_timeout, async {
            let mut conn = conn.clone();
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .arg("proto-max-bulk-len")
                .query_async::<std::collections::HashMap<String, String>>(&mut conn)
                .await
        })
        .await;
        let config = match config {
            Ok(config) => Ok(config),
            // `CONFIG` renamed or disabled: the policy is unknown.
            Err(RedisStoreError::Command { source }) => Err(source.to_string()),
            Err(other) => return Err(other),
        };
        let policy = match &config {
            Ok(config) => config.get("maxmemory-policy").cloned(),
            Err(_) => None,
        };
        if policy.as_deref() != Some("noeviction") && !options.accept_eviction {
            return Err(RedisStoreError::EvictionPolicy {
                policy: match (&policy, &config) {
                    (Some(policy), _) => policy.clone(),
                    (None, Err(why)) => format!("unknown (CONFIG GET failed: {why})"),
                    (None, Ok(_)) => "unknown (not reported by CONFIG GET)".to_owned(),
                },
            });
        }
        if options.durability != Durability::Primary && conn.is_cluster() {
            return Err(RedisStoreError::Unsupported {
                what: "a durability other than `Durability::Primary` on a Cluster (WAIT cannot be routed to the key's shard)".into(),
            });
        }
        let max_bulk = config
            .ok()
            .and_then(|c| c.get("proto-max-bulk-len").and_then(|v| v.parse().ok()))
            .unwrap_or(DEFAULT_MAX_BULK);
        Ok(Deployment { max_bulk })
    }
}

async fn with_deadline<T>(
    deadline: Duration,
    command: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisStoreError> {
    match tokio::time::timeout(deadline, command).await {
        Ok(result) => result.map_err(|err| match RedisStoreError::from(err) {
            RedisStoreError::Timeout { .. } => RedisStoreError::Timeout { after: deadline },
            other => other,
        }),
        Err(_) => Err(RedisStoreError::Timeout { after: deadline }),
    }
}
