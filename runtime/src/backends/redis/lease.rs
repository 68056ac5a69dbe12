//! Owner tokens, lease heartbeats and waiting without hammering Redis.
//!
//! A holder of a claim or lock proves it is still the holder with its token (128 bits from the
//! OS RNG); the Lua scripts refuse every write that does not carry the current token. While the
//! holder's body runs, and until its final write (completion, commit) has returned, a
//! [`Heartbeat`] task extends the lease; a crashed (or SIGKILLed, or paused) holder stops
//! extending and its lease ends.
//!
//! # The heartbeat's slack
//! Let `L` be the lease and `T = min(command timeout, L/3)` how long a beat may go unanswered
//! before another is sent. A beat is due `L/3` after the *sending* of the last beat that was
//! answered "held" (the lease then runs at least until that send + `L`). A beat is never given
//! up while it can still help: one that is merely slow counts when its answer comes, however
//! late, and after `T` without an answer a second beat joins it (in case the first was lost
//! with its connection); a beat that fails at once is re-sent after `L/50`, growing to `L/12`.
//! So, measured from a beat's due time, the lease survives answers delayed by anything up to
//! `2L/3` (the server ran the beat on time), and an outage in which beats are lost outright
//! shorter than `2L/3 − max(T, L/12)`: with the defaults (`L` = 10 s, `T` = 2 s), 6.6 s of
//! slow answers or 4.6 s of outage. Once `L` has passed since the send of the last beat
//! answered "held", the heartbeat stops and reports the lease lost ([`LeaseWatch`]); so does a
//! beat that finds the lease held by somebody else. The final write (completion, commit) is
//! covered the same way: the heartbeat beats until it has returned.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use super::connection::Lua;
use xxhash_rust::xxh3::xxh3_128;

use dashmap::DashMap;
use tokio::sync::{watch, Mutex, OwnedMutexGuard};

use super::connection::{Connection, Listener};
use super::store::Detached;
use super::RedisStoreError;
use crate::sync::keyed_locks::Holder;

/// Extends a plain lock (`KEYS[1]` holds the holder's token) if `ARGV[1]` still holds it.
pub(crate) static EXTEND_LOCK: Lua = Lua::new(
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
);

/// Deletes a plain lock if `ARGV[1]` still holds it.
pub(crate) static RELEASE_LOCK: Lua = Lua::new(
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '1' then redis.call('PUBLISH', KEYS[1] .. ':wake', '') end
  return 1
end
return 0
"#,
);

/// The `ARGV` flag that makes a release (or a sequence commit) publish its lock's wake-up hint
/// on `<lock>:wake`: `"1"` on one node, `"0"` on a Cluster (whose waiters poll, and where a
/// `PUBLISH` would be broadcast to every node).
pub(crate) fn wake_flag(conn: &Connection) -> &'static str {
    match conn.is_cluster() {
        true => "0",
        false => "1",
    }
}

/// A token that names one holder of one lease: 128 bits from the OS RNG (`getrandom`), so
/// tokens neither repeat across processes and machines nor can be predicted.
pub(crate) fn owner_token() -> String {
    let mut bytes = [0u8; 16];
    let random = match getrandom::fill(&mut bytes) {
        Ok(()) => u128::from_le_bytes(bytes),
        // No OS RNG (never on the platforms Redis clients run on): still unique, not secret.
        Err(_) => entropy(),
    };
    format!("{random:032x}")
}

/// Cheap, non-cryptographic spread for jitter (and the fallback above).
fn entropy() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut seed = [0u8; 28];
    seed[..16].copy_from_slice(&nanos.to_le_bytes());
    seed[16..24].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    seed[24..28].copy_from_slice(&std::process::id().to_le_bytes());
    xxh3_128(&seed)
}

/// Tells a body whether the lease it runs under is still held: the heartbeat flips it once a
/// beat finds the lease taken over, or once a whole lease has passed since the last beat that
/// landed. Cheap to clone; `select!` on [`lost`](Self::lost) to stop work that would be
/// rejected anyway.
///
/// ```no_run
/// # async fn demo(mut watch: racefree_runtime::redis::LeaseWatch) {
/// tokio::select! {
///     _ = watch.lost() => { /* stop: another process owns the key now */ }
///     _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => { /* the work */ }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    lost: watch::Receiver<bool>,
    fence: u64,
}

impl LeaseWatch {
    /// The fencing token of the lease watched: larger than that of every earlier holder of
    /// the key. Hand it to the systems the body writes to, so they can refuse a stale holder.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// `true` once the lease is known or presumed lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Completes when the lease is lost; never, while it is held.
    pub async fn lost(&mut self) {
        if self.lost.wait_for(|lost| *lost).await.is_err() {
            // The heartbeat ended without a loss (the holder finished): never lost.
            std::future::pending::<()>().await;
        }
    }
}

/// Extends a lease while a body runs and its final write is in flight; stops when dropped.
pub(crate) struct Heartbeat {
    task: Option<tokio::task::JoinHandle<()>>,
    lost: watch::Receiver<bool>,
}

impl Heartbeat {
    /// Starts extending `key`'s lease held by `token`, granted for `held_for` by a command sent
    /// at `granted` (a lock kept from an earlier call is granted for less than a `lease`).
    /// Every beat extends it to a whole `lease`; the first is due a third of `held_for` after
    /// `granted`. `script` takes KEYS[1] = the lease key, ARGV[1] = token, ARGV[2] = lease in
    /// ms, and returns 1 while `token` holds the lease.
    pub(crate) fn start(
        script: &'static Lua,
        conn: Connection,
        key: String,
        token: String,
        lease: Duration,
        (granted, held_for): (Instant, Duration),
        command_timeout: Duration,
    ) -> Heartbeat {
        let (report, lost) = watch::channel(false);
        // Outside a Tokio runtime (the driver itself needs one) there is nobody to beat: the
        // lease then simply runs its course.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Heartbeat { task: None, lost };
        };
        let task = runtime.spawn(async move {
            use futures_util::stream::{FuturesUnordered, StreamExt};
            let lease_ms = lease.as_millis().max(1) as u64;
            let interval = lease / 3;
            // Until a beat lands, the lock lives only `held_for`: the slack scales with it.
            let patience_in = |window: Duration| {
                command_timeout
                    .min(window / 3)
                    .max(Duration::from_millis(1))
            };
            let mut patience = patience_in(held_for);
            let mut window = held_for;
            let beat = |sent: Instant| {
                let (mut conn, key, token) = (conn.clone(), key.clone(), token.clone());
                async move {
                    let lease_ms = lease_ms.to_string();
                    let (keys, args) = ([key.as_str()], [token.as_str(), lease_ms.as_str()]);
                    let extend = conn.eval::<i64>(script, &keys, &args);
                    // A beat answered after a whole lease can no longer help.
                    (sent, tokio::time::timeout(lease, extend).await)
                }
            };
            let mut in_flight = FuturesUnordered::new();
            let mut landed = granted;
            let mut expiry = granted + held_for;
            let mut next = granted + held_for / 3;
            let mut pause = held_for / 50;
            loop {
                tokio::select! {
                    Some((sent, answer)) = in_flight.next() => match answer {
                        Ok(Ok(1)) => {
                            landed = landed.max(sent);
                            expiry = expiry.max(landed + lease);
                            (window, patience) = (lease, patience_in(lease));
                            pause = lease / 50;
                            next = next.max(landed + interval);
                        }
                        // Somebody else holds it now; the holder's final write will be rejected.
                        Ok(Ok(_)) => {
                            let _ = report.send(true);
                            return;
                        }
                        // Failed at once (a broken connection): beat again soon.
                        Ok(Err(_)) | Err(_) => {
                            next = next.min(Instant::now() + pause);
                            pause = (pause * 2).min(window / 12);
                        }
                    },
                    () = tokio::time::sleep_until(next.min(expiry).into()) => {
                        let now = Instant::now();
                        if now >= expiry {
                            let _ = report.send(true); // expired as far as this process can tell
                            return;
                        }
                        // Beats in flight stay in flight: a late answer still counts. This one
                        // covers the case that they were lost.
                        in_flight.push(beat(now));
                        next = now + patience;
                    }
                }
            }
        });
        Heartbeat {
            task: Some(task),
            lost,
        }
    }

    /// A watch on this lease (fencing token `fence`) for the body.
    pub(crate) fn watch(&self, fence: u64) -> LeaseWatch {
        LeaseWatch {
            lost: self.lost.clone(),
            fence,
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs a final write (a completion, a commit) to its end even if the caller's future is
/// dropped, so a finished body is never left half-recorded. It runs in the caller's task (no
/// hop to another worker thread on the way out and back, which cost a `#[sequenced]` call
/// several microseconds); only if the caller drops it before it ends does it move, as it
/// stands, onto a task of its own. Without a Tokio runtime it runs in place. A write that
/// panics leaves its fate unknown: `OutcomeUnknown` for `key`, saying which `what` failed.
pub(crate) async fn outlive_caller<W>(
    key: String,
    what: &str,
    write: W,
) -> Result<(), RedisStoreError>
where
    W: Future<Output = Result<(), RedisStoreError>> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return write.await;
    };
    Outlive {
        write: Some(Box::pin(write)),
        runtime,
        key: Some(key),
        what,
    }
    .await
}

/// A final write polled by its caller, handed to a task of its own if dropped unfinished.
struct Outlive<'w, W: Future<Output = Result<(), RedisStoreError>> + Send + 'static> {
    write: Option<std::pin::Pin<Box<W>>>,
    runtime: tokio::runtime::Handle,
    key: Option<String>,
    what: &'w str,
}

impl<W> Future for Outlive<'_, W>
where
    W: Future<Output = Result<(), RedisStoreError>> + Send + 'static,
{
    type Output = Result<(), RedisStoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        use std::task::Poll;
        let write = self.write.as_mut().expect("polled after it finished");
        let polled = catch_unwind(AssertUnwindSafe(|| write.as_mut().poll(cx)));
        let done = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(done)) => done,
            Err(_) => Err(RedisStoreError::OutcomeUnknown {
                key: self.key.take().unwrap_or_default(),
                source: Box::new(RedisStoreError::Serialize {
                    reason: format!("the {} panicked", self.what),
                }),
            }),
        };
        // Finished (or panicked: never polled again).
        self.write = None;
        Poll::Ready(done)
    }
}

impl<W> Drop for Outlive<'_, W>
where
    W: Future<Output = Result<(), RedisStoreError>> + Send + 'static,
{
    fn drop(&mut self) {
        // Dropped unfinished: the caller gave up. The write goes on by itself, and says how it
        // ended, since nobody waits for it any more.
        if let Some(write) = self.write.take() {
            let (key, what) = (self.key.take().unwrap_or_default(), self.what.to_owned());
            self.runtime.spawn(async move {
                match write.await {
                    Ok(()) => tracing::debug!(target: "racefree", %key, what, "finished after its caller left"),
                    Err(error) => tracing::warn!(target: "racefree", %key, what, %error, "failed after its caller left"),
                }
            });
        }
    }
}

/// The Redis keys a final write reports on: the record it writes (named by `OutcomeUnknown`)
/// and the lease it is checked against (named by `LeaseLost`).
pub(crate) struct FinalWriteKeys<'a> {
    pub(crate) record: &'a str,
    pub(crate) lease: &'a str,
}

/// Reads the answer of a token-checked final write (a completion, a commit) the one way every
/// attribute does: `1` → it landed, and counts once [`Detached::confirm`] vouches for it
/// (otherwise `OutcomeUnknown`: it is on the primary, maybe nowhere else); `0` → the token no
/// longer held the lease, nothing was written (`LeaseLost`); no answer after the re-sends →
/// `settle` decides (by reading what the write leaves behind) or reports it unknown; any other
/// failure is passed on.
pub(crate) async fn finish_final_write<Settled>(
    detached: &Detached,
    written: Result<i64, RedisStoreError>,
    keys: FinalWriteKeys<'_>,
    settle: impl FnOnce(RedisStoreError) -> Settled,
) -> Result<(), RedisStoreError>
where
    Settled: Future<Output = Result<(), RedisStoreError>>,
{
    match written {
        Ok(1) => detached
            .confirm()
            .await
            .map_err(|source| RedisStoreError::OutcomeUnknown {
                key: keys.record.to_owned(),
                source: Box::new(source),
            }),
        Ok(_) => Err(RedisStoreError::LeaseLost {
            key: keys.lease.to_owned(),
        }),
        Err(err) if err.is_retryable() => settle(err).await,
        Err(err) => Err(err),
    }
}

/// Runs `release` in the background if dropped while armed: a body that panicked or a future
/// that was cancelled gives up its claim at once instead of leaving waiters to the lease.
pub(crate) struct ReleaseOnDrop {
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl ReleaseOnDrop {
    pub(crate) fn new(
        script: &'static Lua,
        conn: Connection,
        key: String,
        token: String,
    ) -> ReleaseOnDrop {
        let release = move || {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let mut conn = conn;
                    let wake = wake_flag(&conn);
                    let (keys, args) = ([key.as_str()], [token.as_str(), wake]);
                    let release = conn.eval::<i64>(script, &keys, &args);
                    // Best effort: if this fails too, the lease ends by itself.
                    let _ = tokio::time::timeout(Duration::from_secs(5), release).await;
                });
            }
        };
        ReleaseOnDrop {
            release: Some(Box::new(release)),
        }
    }

    /// The claim was completed or released normally: nothing to do on drop.
    pub(crate) fn disarm(mut self) {
        self.release = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

/// Jittered exponential backoff for waiting on somebody else's lease: the first look comes
/// quickly, later ones spread out (up to `max`), and jitter keeps waiters from arriving in step.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    /// The pause before the next look: the current step ±50%, then the step grows by half.
    pub(crate) fn pause(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 3 / 2).min(self.max);
        let jitter = (entropy() % 1000) as u32; // 0..1000 → 50%..150%
        step * (500 + jitter) / 1000
    }

    /// Sleeps for [`pause`](Self::pause), but no longer than `cap` (e.g. a lease's remaining time).
    pub(crate) async fn wait(&mut self, cap: Option<Duration>) {
        let pause = self.pause();
        let pause = cap.map_or(pause, |cap| pause.min(cap.max(Duration::from_millis(1))));
        tokio::time::sleep(pause).await;
    }
}

/// What one look at a key somebody else holds found: the answer, or a reason to look again
/// after a pause of at most the given cap (e.g. the holder's remaining lease).
pub(crate) enum Look<T> {
    Done(T),
    Again(Option<Duration>),
}

/// Waits for somebody else's key: runs `look` until it answers, or returns `None` once
/// `deadline` passes. Between looks it wakes on the first message on `channel` (the key's
/// pub/sub hint, one server only) or after a jittered pause: every 100 ms while subscribed
/// (the fallback, for an owner that crashed and publishes nothing), otherwise growing from
/// `first` to `max` (a Cluster, or no pub/sub connection). Subscribed, it looks at once: the
/// message may have come before the subscription; otherwise the caller has just seen the key
/// busy, and it pauses first. `look` gets the latest message's payload since the wait began.
pub(crate) async fn wait_for_key<T, E, F, Fut>(
    store: &super::RedisStore,
    channel: &str,
    (first, max): (Duration, Duration),
    deadline: Option<Instant>,
    mut look: F,
) -> Result<Option<T>, E>
where
    F: FnMut(Option<Vec<u8>>) -> Fut,
    Fut: Future<Output = Result<Look<T>, E>>,
{
    const FALLBACK: Duration = Duration::from_millis(100);
    let listener = match store.wakeups().await {
        Some(wakeups) => wakeups.listen(channel).await,
        None => None,
    };
    let mut backoff = match listener {
        Some(_) => Backoff::new(FALLBACK, FALLBACK),
        None => Backoff::new(first, max),
    };
    let mut look_now = listener.is_some();
    let mut cap = None;
    loop {
        // Registered before the look, so that a message that comes during it still wakes.
        let mut woken = std::pin::pin!(listener.as_ref().map(Listener::notified));
        if let Some(woken) = woken.as_mut().as_pin_mut() {
            woken.enable();
        }
        if look_now {
            match look(listener.as_ref().and_then(Listener::latest)).await? {
                Look::Done(done) => return Ok(Some(done)),
                Look::Again(until) => cap = until,
            }
        }
        look_now = true;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Ok(None);
        }
        let pause = match (left, cap) {
            (Some(left), Some(cap)) => Some(left.min(cap)),
            (left, cap) => left.or(cap),
        };
        let hint = async {
            match woken.as_mut().as_pin_mut() {
                Some(woken) => woken.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = hint => {}
            () = backoff.wait(pause) => {}
        }
    }
}

/// This process's state of one key: the FIFO turn and who holds it (for re-entry detection).
#[derive(Default)]
pub(crate) struct LocalKey {
    turn: Arc<Mutex<()>>,
    holder: std::sync::Mutex<Option<Holder>>,
}

/// A place in this process's FIFO queue for one key. Dropping it (done, failed or cancelled)
/// removes the key's entry once nobody else holds or waits for it.
pub(crate) struct LocalTurn<'a> {
    locks: &'a DashMap<String, Arc<LocalKey>>,
    key: String,
    local: Option<Arc<LocalKey>>,
    turn: Option<OwnedMutexGuard<()>>,
}

impl<'a> LocalTurn<'a> {
    pub(crate) fn queue(locks: &'a DashMap<String, Arc<LocalKey>>, key: String) -> Self {
        let local = Arc::clone(locks.entry(key.clone()).or_default().value());
        LocalTurn {
            locks,
            key,
            local: Some(local),
            turn: None,
        }
    }

    /// `true` if the code asking runs under the current holder of this key: waiting would
    /// never end.
    pub(crate) fn held_by_caller(&self) -> bool {
        let holder = self
            .local
            .as_ref()
            .and_then(|l| *l.holder.lock().unwrap_or_else(|e| e.into_inner()));
        holder.is_some_and(Holder::is_running_here)
    }

    /// Waits for this process's turn at the key; `true` if another caller had it first.
    pub(crate) async fn wait(&mut self) -> bool {
        let Some(local) = &self.local else {
            return false;
        };
        let (turn, waited) = match Arc::clone(&local.turn).try_lock_owned() {
            Ok(turn) => (turn, false),
            Err(_) => (Arc::clone(&local.turn).lock_owned().await, true),
        };
        self.turn = Some(turn);
        waited
    }

    pub(crate) fn enter(&self) -> Holder {
        let holder = Holder::next();
        if let Some(local) = &self.local {
            *local.holder.lock().unwrap_or_else(|e| e.into_inner()) = Some(holder);
        }
        holder
    }
}

impl Drop for LocalTurn<'_> {
    fn drop(&mut self) {
        if self.turn.take().is_some() {
            if let Some(local) = &self.local {
                *local.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        self.local = None;
        // Clones are made under the map's shard lock (`entry`), and so is this check.
        self.locks
            .remove_if(&self.key, |_, local| Arc::strong_count(local) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct() {
        let tokens: std::collections::HashSet<_> = (0..10_000).map(|_| owner_token()).collect();
        assert_eq!(tokens.len(), 10_000);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(4), Duration::from_millis(100));
        let pauses: Vec<_> = (0..20).map(|_| backoff.pause()).collect();
        assert!(pauses[0] <= Duration::from_millis(6));
        assert!(pauses.iter().all(|p| *p <= Duration::from_millis(150)));
        assert!(pauses[19] >= Duration::from_millis(50));
    }
}
