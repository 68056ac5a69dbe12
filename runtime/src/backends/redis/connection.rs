//! The connection every Redis command goes through: one server (a `ConnectionManager` that
//! reconnects) or a cluster, counting its round trips, and the Lua scripts the stores run on it.
//!
//! # Scripts are loaded before they are needed
//! Every script of every store ([`SCRIPTS`]) is loaded (`SCRIPT LOAD`) when the store connects,
//! so the first claim, heartbeat or final write is one `EVALSHA`, one round trip. The driver's
//! `ConnectionManager` reconnects by itself and offers no hook, so this connection watches its
//! own commands instead: a broken, dropped or timed-out command means the connection may have
//! been re-made to a server that restarted without the scripts. The next script on one server
//! then goes out as one pipeline — every `SCRIPT LOAD`, then its `EVALSHA` — still one round
//! trip. A `NOSCRIPT` answer (a `SCRIPT FLUSH`, a restart nobody noticed) is answered the same
//! way: one more round trip, after which every script is there again. On a Cluster the scripts
//! are loaded on every primary at connect; later a `NOSCRIPT` is handled by the driver (load
//! on the key's shard, re-send).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value};

use super::RedisStoreError;

pub(super) async fn cluster<'a>(
    nodes: impl Iterator<Item = &'a str>,
    timeout: Duration,
) -> Result<ClusterConnection, RedisStoreError> {
    let client = ClusterClient::builder(nodes.collect::<Vec<_>>())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(2)
        .build()?;
    Ok(client.get_async_connection().await?)
}

/// A Lua script with its source, so the store can load it ahead of its first use.
pub(crate) struct Lua {
    source: &'static str,
    script: OnceLock<Script>,
}

impl Lua {
    pub(crate) const fn new(source: &'static str) -> Lua {
        Lua {
            source,
            script: OnceLock::new(),
        }
    }

    fn script(&self) -> &Script {
        self.script.get_or_init(|| Script::new(self.source))
    }
}

/// Every script the stores run: what a connection loads before any of them is needed.
pub(crate) fn scripts() -> [&'static Lua; 13] {
    use super::{cache, idempotency, lease, sequence};
    [
        &cache::GET_OR_LOCK,
        &cache::FILL,
        &cache::INVALIDATE,
        &idempotency::CLAIM,
        &idempotency::EXTEND,
        &idempotency::COMPLETE,
        &idempotency::RELEASE,
        &lease::EXTEND_LOCK,
        &lease::RELEASE_LOCK,
        &sequence::ACQUIRE,
        &sequence::COMMIT,
        &sequence::RELEASE_BY_TOKEN,
        &sequence::RESET,
    ]
}

/// Whether the server may have lost the scripts since they were last loaded: `lost` counts the
/// commands that broke (each may have made the manager reconnect), `loaded` is `lost + 1` as it
/// was when the last load was sent (0: never loaded).
#[derive(Default)]
struct ScriptState {
    lost: AtomicU64,
    loaded: AtomicU64,
}

impl ScriptState {
    fn missing(&self) -> Option<u64> {
        let lost = self.lost.load(Relaxed);
        (self.loaded.load(Relaxed) != lost + 1).then_some(lost)
    }

    fn loaded_as_of(&self, lost: u64) {
        self.loaded.fetch_max(lost + 1, Relaxed);
    }
}

/// `true` for an error after which the connection may have been re-made.
fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
}

/// Marks the scripts as possibly lost unless disarmed: dropped with its command unanswered (a
/// deadline ran out) or told of a broken connection.
struct WatchCommand<'a> {
    state: &'a ScriptState,
    armed: bool,
}

impl WatchCommand<'_> {
    fn answered<T>(mut self, result: &RedisResult<T>) {
        self.armed = matches!(result, Err(err) if breaks_connection(err));
    }
}

impl Drop for WatchCommand<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.lost.fetch_add(1, Relaxed);
        }
    }
}

#[derive(Clone)]
pub(super) enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection to the store's server or cluster that counts its round trips.
///
/// It implements the driver's [`ConnectionLike`], so any `redis` command runs on it:
///
/// ```no_run
/// # async fn demo(store: &racefree_runtime::redis::RedisStore) -> Result<(), Box<dyn std::error::Error>> {
/// use racefree_runtime::redis::driver;
/// let mut conn = store.connection().await?;
/// let n: i64 = driver::cmd("INCR").arg("visits").query_async(&mut conn).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    inner: Inner,
    round_trips: Arc<AtomicU64>,
    scripts: Arc<ScriptState>,
}

impl Connection {
    pub(super) fn new(inner: Inner) -> Self {
        Connection {
            inner,
            round_trips: Arc::new(AtomicU64::new(0)),
            scripts: Arc::default(),
        }
    }

    /// Loads every script (one pipeline on one server; on a Cluster, each on every primary).
    pub(super) async fn load_scripts(&mut self) -> RedisResult<()> {
        let lost = self.scripts.lost.load(Relaxed);
        if self.is_cluster() {
            let loads = scripts().map(|lua| {
                let mut conn = self.clone();
                async move { lua.script().load_async(&mut conn).await }
            });
            for loaded in futures_util::future::join_all(loads).await {
                loaded?;
            }
        } else {
            let mut pipe = redis::pipe();
            for lua in scripts() {
                pipe.cmd("SCRIPT").arg("LOAD").arg(lua.source).ignore();
            }
            pipe.query_async::<()>(self).await?;
        }
        self.scripts.loaded_as_of(lost);
        Ok(())
    }

    /// Runs `lua` with `EVALSHA`: one round trip, also right after a reconnect (see the module
    /// doc); after a `NOSCRIPT`, one more that loads every script again.
    pub(crate) async fn eval<T: FromRedisValue>(
        &mut self,
        lua: &Lua,
        keys: &[&str],
        args: &[&str],
    ) -> RedisResult<T> {
        let script = lua.script();
        if self.is_cluster() {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            for arg in args {
                invocation.arg(*arg);
            }
            return invocation.invoke_async(self).await;
        }
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg(script.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        if let Some(lost) = self.scripts.missing() {
            return self.load_and_eval(lost, &evalsha).await;
        }
        match evalsha.query_async(self).await {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let lost = self.scripts.lost.load(Relaxed);
                self.load_and_eval(lost, &evalsha).await
            }
            other => other,
        }
    }

    async fn load_and_eval<T: FromRedisValue>(
        &mut self,
        lost: u64,
        evalsha: &Cmd,
    ) -> RedisResult<T> {
        let mut pipe = redis::pipe();
        for lua in scripts() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(lua.source).ignore();
        }
        pipe.add_command(evalsha.clone());
        let result = pipe.query_async::<(T,)>(self).await;
        match &result {
            Err(err) if breaks_connection(err) => {}
            // The loads went through, whatever the script itself answered.
            _ => self.scripts.loaded_as_of(lost),
        }
        result.map(|(value,)| value)
    }

    /// Round trips made through this connection and its clones.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Relaxed)
    }

    /// `true` when connected to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, Inner::Cluster(_))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.round_trips.fetch_add(1, Relaxed);
        let watch = WatchCommand {
            state: &self.scripts,
            armed: true,
        };
        let sent = match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Cluster(conn) => conn.req_packed_command(cmd),
        };
        Box::pin(async move {
            let result = sent.await;
            watch.answered(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.round_trips.fetch_add(1, Relaxed);
        let watch = WatchCommand {
            state: &self.scripts,
            armed: true,
        };
        let sent = match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        };
        Box::pin(async move {
            let result = sent.await;
            watch.answered(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Wake-up hints: a pub/sub connection of the store's own (one server only; a Cluster's
/// waiters poll). Completions and releases `PUBLISH` on `<record key>:wake`; a waiter
/// subscribes to its key's channel while it waits, and looks again as soon as a message comes,
/// instead of at its next backoff step. A completion of a small record publishes the record
/// itself, which a waiter then reads from the message instead of with a `GET` (it was the key's
/// record at the moment it was published). A hint only: a missed message costs one backoff step.
pub(crate) struct Wakeups {
    sink: tokio::sync::Mutex<redis::aio::PubSubSink>,
    channels: Arc<dashmap::DashMap<String, Channel>>,
    timeout: Duration,
    alive: Arc<std::sync::atomic::AtomicBool>,
    // Dropped with the store's `Wakeups`: stops the dispatcher, closing the connection.
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Channel {
    listeners: usize,
    signal: Arc<Signal>,
}

/// What a channel's listeners wait on: a wake-up, and the latest message with its number.
#[derive(Default)]
struct Signal {
    notify: tokio::sync::Notify,
    latest: std::sync::Mutex<(u64, Option<Vec<u8>>)>,
}

impl Wakeups {
    pub(super) async fn connect(url: &str, timeout: Duration) -> Option<Arc<Wakeups>> {
        use futures_util::StreamExt;
        let client = redis::Client::open(url).ok()?;
        let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
            .await
            .ok()?
            .ok()?;
        let (sink, mut stream) = pubsub.split();
        let channels: Arc<dashmap::DashMap<String, Channel>> = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (to_wake, still_alive) = (Arc::clone(&channels), Arc::clone(&alive));
        tokio::runtime::Handle::try_current()
            .ok()?
            .spawn(async move {
                // However the dispatcher ends — the stream closed, the store dropped, or the
                // runtime it runs on shut down (which drops this task mid-`await`) — the
                // store learns it and makes a new one; its listeners poll meanwhile.
                let _dead_on_exit = DeadOnExit {
                    alive: still_alive,
                    channels: Arc::clone(&to_wake),
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        message = stream.next() => match message {
                            Some(message) => {
                                if let Some(channel) = to_wake.get(message.get_channel_name()) {
                                    let signal = &channel.signal;
                                    {
                                        let mut latest = signal.latest.lock().unwrap_or_else(|e| e.into_inner());
                                        *latest = (latest.0 + 1, Some(message.get_payload_bytes().to_vec()));
                                    }
                                    signal.notify.notify_waiters();
                                }
                            }
                            None => break,
                        },
                    }
                }
            });
        Some(Arc::new(Wakeups {
            sink: tokio::sync::Mutex::new(sink),
            channels,
            timeout,
            alive,
            _stop: stop,
        }))
    }

    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Relaxed)
    }

    /// Listens on `channel` until the listener is dropped; `None` if the subscription failed.
    pub(crate) async fn listen(self: &Arc<Self>, channel: &str) -> Option<Listener> {
        let (signal, first) = {
            let mut entry = self
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    listeners: 0,
                    signal: Arc::default(),
                });
            entry.listeners += 1;
            (Arc::clone(&entry.signal), entry.listeners == 1)
        };
        let seen = signal.latest.lock().unwrap_or_else(|e| e.into_inner()).0;
        let listener = Listener {
            wakeups: Arc::clone(self),
            channel: channel.to_owned(),
            signal,
            seen,
        };
        if first {
            let mut sink = self.sink.lock().await;
            match tokio::time::timeout(self.timeout, sink.subscribe(channel)).await {
                Ok(Ok(())) => {}
                _ => {
                    // A connection that cannot subscribe is no use to the next waiter either.
                    self.alive.store(false, Relaxed);
                    return None;
                }
            }
        }
        Some(listener)
    }
}

/// Marks the wake-up connection dead when its dispatcher task ends, and wakes every listener
/// so that it notices at once and polls.
struct DeadOnExit {
    alive: Arc<std::sync::atomic::AtomicBool>,
    channels: Arc<dashmap::DashMap<String, Channel>>,
}

impl Drop for DeadOnExit {
    fn drop(&mut self) {
        self.alive.store(false, Relaxed);
        for channel in self.channels.iter() {
            channel.signal.notify.notify_waiters();
        }
    }
}

/// One waiter's subscription to one channel (see [`Wakeups`]).
pub(crate) struct Listener {
    wakeups: Arc<Wakeups>,
    channel: String,
    signal: Arc<Signal>,
    // The number of the latest message when this listener began: older ones say nothing about
    // the wait it serves.
    seen: u64,
}

impl Listener {
    /// A wake-up registered now: completes at the next message on the channel.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.signal.notify.notified()
    }

    /// The latest message that came on the channel since this listener began, if any.
    pub(crate) fn latest(&self) -> Option<Vec<u8>> {
        let latest = self.signal.latest.lock().unwrap_or_else(|e| e.into_inner());
        match &*latest {
            (number, Some(payload)) if *number > self.seen => Some(payload.clone()),
            _ => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let last = self
            .wakeups
            .channels
            .remove_if_mut(&self.channel, |_, channel| {
                channel.listeners -= 1;
                channel.listeners == 0
            })
            .is_some();
        if last {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (wakeups, channel) = (Arc::clone(&self.wakeups), self.channel.clone());
                runtime.spawn(async move {
                    let mut sink = wakeups.sink.lock().await;
                    let _ = tokio::time::timeout(wakeups.timeout, sink.unsubscribe(&channel)).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A script defined but missing from `scripts()` would not be loaded ahead of its first
    /// use, and pay the `NOSCRIPT` round trip again.
    #[test]
    fn every_script_is_in_the_preload_list() {
        let sources = [
            include_str!("cache.rs"),
            include_str!("idempotency.rs"),
            include_str!("lease.rs"),
            include_str!("sequence.rs"),
            include_str!("store.rs"),
            include_str!("connection.rs"),
        ];
        let defined: usize = sources
            .iter()
            .map(|source| source.matches(concat!(": Lua = ", "Lua::new(")).count())
            .sum();
        assert_eq!(defined, super::scripts().len());
        let mut hashes: Vec<&str> = super::scripts()
            .iter()
            .map(|lua| lua.script().get_hash())
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(
            hashes.len(),
            super::scripts().len(),
            "a script listed twice"
        );
    }
}
