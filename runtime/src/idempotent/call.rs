//! The protocol every `#[idempotent]` call runs against a backend, sync or async:
//!
//! 1. [`begin`]: no key → execute without idempotency (or refuse with `MissingKey`); else claim
//!    the key, and on "in flight" wait for the owner (or refuse with `InProgress`) and claim
//!    again, until the call executes, replays or is refused;
//! 2. the body runs (in the generated code, so that `return` and `?` keep their meaning);
//! 3. [`Execution::complete`] stores the outcome, or [`Execution::release`] (also on drop: a
//!    panic, a cancelled future) frees the key for the next caller.
//!
//! Sync and async differ only in how they wait and talk to the backend. Every step reports
//! to `tracing` (target `racefree`) and the outcome to the [`replay`] scope. A call is one
//! `idempotent` span (level `debug`) with the fields `function`, `outcome` (`executed`,
//! `replayed`, `conflict`, `error`) and `waited` (it waited for a duplicate in flight): the
//! protocol's steps run inside it, and it closes when the call ends; the body's own events
//! are not in it.
//!
//! A call that re-enters the record key its own caller is executing (a body calling its
//! function with its own key) is refused with [`IdempotencyError::Reentrant`] instead of
//! waiting for itself, with any backend: a sync execution marks its thread for the body's
//! duration, an async body runs marked through [`Execution::within`] (the same
//! [`Holder`] machinery as `#[sequenced]`, with its limits).

use std::fmt::Display;
use std::future::Future;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use tracing::Instrument as _;

use crate::sync::keyed_locks::{EnteredMark, Holder, Within};
use crate::telemetry::{self, outcome, Meter, MeterCell, MeterRef, Started};

use super::backend::{BlockingIdempotencyBackend, Claim, IdempotencyBackend};
use super::error::IdempotencyError;
use super::fingerprint::Fingerprint;
use super::key::{IntoIdempotencyKey, RecordKey};
use super::replay::{self, Replay};

/// Finds the backend behind `store = <expr>` by auto-deref: the expression may be a store, or
/// anything that dereferences to one (`LazyLock`, `Arc`, `Box`). Generated code calls
/// `(<expr>).idempotency_store()` with this trait in scope.
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store for outcomes of type `{T}`",
    label = "`store = ...` must be an idempotency store (or dereference to one)",
    note = "the in-process `racefree::IdempotencyStore<T>` needs the outcome `{T}` to be `Clone`; a Redis or SQL store needs it to be `Serialize + Deserialize` (derive them with serde)"
)]
pub trait StoreRef<T> {
    fn idempotency_store(&self) -> &Self {
        self
    }
}

impl<B: IdempotencyBackend<T>, T> StoreRef<T> for B {}

/// What a call does when its key is being executed by another call with the same fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInFlight {
    /// Wait for it and return its outcome (or, if it fails, claim the key again).
    Wait,
    /// Refuse at once with [`IdempotencyError::InProgress`].
    Reject,
}

/// How an `#[idempotent]` function treats its calls. `const` so it can live in generated code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long an outcome is kept.
    pub ttl: Duration,
    /// Wait for or reject duplicates in flight.
    pub in_flight: OnInFlight,
    /// Refuse calls without a key instead of executing them.
    pub require_key: bool,
    /// Give up waiting for a duplicate in flight after this long (`InProgress`); `None` waits
    /// as long as the owner runs.
    pub wait_timeout: Option<Duration>,
}

impl Policy {
    /// Keep outcomes for `ttl`, wait for duplicates, run calls without a key.
    pub const fn new(ttl: Duration) -> Policy {
        Policy {
            ttl,
            in_flight: OnInFlight::Wait,
            require_key: false,
            wait_timeout: None,
        }
    }

    /// Reject duplicates in flight instead of waiting for them.
    pub const fn reject_in_flight(mut self) -> Policy {
        self.in_flight = OnInFlight::Reject;
        self
    }

    /// Refuse calls without a key with [`IdempotencyError::MissingKey`].
    pub const fn require_key(mut self) -> Policy {
        self.require_key = true;
        self
    }

    /// Wait at most `timeout` for a duplicate in flight.
    pub const fn wait_timeout(mut self, timeout: Duration) -> Policy {
        self.wait_timeout = Some(timeout);
        self
    }
}

/// The longest client key accepted, in bytes (Stripe's limit, and the HTTP extractor's); a
/// longer one is refused with [`IdempotencyError::KeyTooLong`] before any store is asked.
pub const MAX_KEY_BYTES: usize = 255;

/// The longest scope accepted (as `scope = ...` displays it), in bytes.
pub const MAX_SCOPE_BYTES: usize = 255;

/// One call, before it begins: which record it claims, with which fingerprint, under which policy.
#[derive(Debug)]
pub struct Call {
    function: &'static str,
    key: Result<Option<RecordKey>, IdempotencyError>,
    fingerprint: Fingerprint,
    policy: Policy,
    // The function's handles (feature `metrics`), registered on its first call.
    meter: Option<&'static MeterCell>,
}

impl Call {
    /// The call of `function` (a build-stable path) with the client's `key`, in `scope`.
    #[inline]
    pub fn new<'k>(
        function: &'static str,
        scope: Option<&dyn Display>,
        key: impl IntoIdempotencyKey<'k>,
        fingerprint: Fingerprint,
        policy: Policy,
    ) -> Call {
        let key = key
            .into_idempotency_key()
            .map(|key| bounded_record_key(function, scope, &key));
        let key = key.transpose();
        Call {
            function,
            key,
            fingerprint,
            policy,
            meter: None,
        }
    }

    /// Reports the call through the function's own handles (what `#[idempotent]` declares);
    /// without them, a call finds its function's handles in a process-wide map.
    #[inline]
    pub fn metered(mut self, cell: &'static MeterCell) -> Call {
        self.meter = Some(cell);
        self
    }

    #[inline]
    fn meter_of<B: IdempotencyBackend<T>, T>(
        meter: Option<&'static MeterCell>,
        function: &'static str,
    ) -> MeterRef {
        match meter {
            Some(cell) => cell.meter(|| function, B::STORE),
            None => Meter::shared(function, B::STORE),
        }
    }
}

impl Call {
    /// Refuses the call with `claim`'s error: the function's record path is another
    /// function's (see [`claim_records`]).
    pub fn claimed(mut self, claim: &Result<(), IdempotencyError>) -> Call {
        if let Err(error) = claim {
            self.key = Err(error.clone());
        }
        self
    }
}

/// Claims `path`, the record path of the `#[idempotent]` function defined at `site`, for the
/// process: the first function to run with a given store and no `scope` owns it, and another
/// function with the same path is refused with [`IdempotencyError::SharedRecords`] instead of
/// mixing its records with the first one's. Called once per function.
pub fn claim_records(path: &'static str, site: &'static str) -> Result<(), IdempotencyError> {
    static CLAIMS: std::sync::Mutex<Vec<(&str, &str)>> = std::sync::Mutex::new(Vec::new());
    let mut claims = CLAIMS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match claims.iter().find(|(taken, _)| *taken == path) {
        Some((_, first)) if *first != site => Err(IdempotencyError::SharedRecords {
            path: path.to_owned(),
            first: (*first).to_owned(),
            second: site.to_owned(),
        }),
        Some(_) => Ok(()),
        None => {
            claims.push((path, site));
            Ok(())
        }
    }
}

/// Keys and scopes are bounded on every store: an outsider's key must not grow the store's
/// records (or a Redis key, or a SQL index entry) without limit.
#[inline]
fn bounded_record_key(
    function: &'static str,
    scope: Option<&dyn Display>,
    key: &str,
) -> Result<RecordKey, IdempotencyError> {
    let too_long = |len: usize, max: usize| IdempotencyError::KeyTooLong { len, max };
    if key.len() > MAX_KEY_BYTES {
        return Err(too_long(key.len(), MAX_KEY_BYTES));
    }
    let Some(scope) = scope else {
        return Ok(RecordKey::new(function, None, key));
    };
    let scope = scope.to_string();
    if scope.len() > MAX_SCOPE_BYTES {
        return Err(too_long(scope.len(), MAX_SCOPE_BYTES));
    }
    Ok(RecordKey::new(function, Some(&scope), key))
}

/// How a call begins.
pub enum Begin<'a, B: IdempotencyBackend<T>, T> {
    /// Run the body, then finish the execution.
    Execute(Execution<'a, B, T>),
    /// Return this stored outcome; the body does not run.
    Replay(T),
    /// Return this error; the body does not run.
    Refuse(IdempotencyError),
}

/// The duty to run the body of one call and to finish its claim. Dropping it releases the key.
pub struct Execution<'a, B: IdempotencyBackend<T>, T> {
    backend: &'a B,
    // `None` for a call without a key.
    claim: Option<(RecordKey, B::Lease)>,
    // For a call without a key, what the store opened for it, if anything (a SQL store's
    // transaction: see `IdempotencyBackend::lease_without_key`).
    unkeyed_lease: Option<B::Lease>,
    function: &'static str,
    // Its metrics, and its span: held, so that it closes when the execution ends.
    report: Report,
    ttl: Duration,
    // The record key's holder, for re-entry detection; `None` for a call without a key.
    holder: Option<Holder>,
    // A sync execution marks its thread while it lives.
    _entered: Option<EnteredMark>,
}

// The holder that stands for a record key while some code executes it: the same for every
// call with that key, so a call finding it running around itself is re-entering.
fn record_holder(key: &RecordKey) -> Holder {
    Holder::tagged(foldhash::fast::FixedState::default().hash_one(key.as_str()))
}

// A `bool`, not the refusal: a `Begin` returned through memory and tested at once stalls the
// store-forwarding of every call (measured on the replay path).
#[inline(always)]
fn reentered(function: &'static str, key: &RecordKey) -> bool {
    // Most calls run under no holder at all: no need to hash the key.
    !Holder::none_running_here() && reentered_slow(function, key)
}

#[cold]
#[inline(never)]
fn reentered_slow(function: &'static str, key: &RecordKey) -> bool {
    if !record_holder(key).is_running_here() {
        return false;
    }
    tracing::debug!(target: "racefree", function, key = key.client_key(), "idempotent call re-entered its own key: refused");
    true
}

/// What a call reports to: its function's metrics and its own span.
struct Report {
    meter: MeterRef,
    span: tracing::Span,
}

impl Report {
    /// Records the call's outcome on its span.
    fn decided(&self, outcome: &'static str) {
        self.span.record("outcome", outcome);
    }
}

/// A keyed call between its claims: what it claims, with which fingerprint, until when it waits.
struct Claiming {
    function: &'static str,
    report: Report,
    key: RecordKey,
    fingerprint: Fingerprint,
    policy: Policy,
    deadline: Option<Instant>,
}

/// The steps before the first claim, shared by [`begin`] and [`begin_blocking`]: a call
/// without a key (`unkeyed`, given the `Execution` it may run), an over-long key and re-entry
/// return from the calling function here; otherwise this is the call's `Claiming`. A macro,
/// not a function: returned in a `Result` beside a `Begin` (256 bytes), the `Claiming` was
/// copied out of it twice per call, a fifth of a replay.
macro_rules! prepare {
    ($backend:expr, $call:expr, $span:expr, |$execution:pat_param| $unkeyed:expr) => {{
        // Taken apart where it lies: a move of the whole `Call` is a copy of 160 bytes.
        let Call {
            function,
            key,
            fingerprint,
            policy,
            meter,
        } = $call;
        let report = Report {
            meter: Call::meter_of::<B, T>(meter, function),
            span: $span,
        };
        let key = match key {
            Ok(Some(key)) => key,
            Ok(None) => {
                return match unkeyed($backend, function, report, policy) {
                    Begin::Execute($execution) => $unkeyed,
                    begun => begun,
                };
            }
            Err(refusal) => {
                report.decided(outcome::ERROR);
                return Begin::Refuse(refusal);
            }
        };
        if reentered(function, &key) {
            report.decided(outcome::ERROR);
            return Begin::Refuse(IdempotencyError::Reentrant {
                key: key.client_key().to_owned(),
            });
        }
        let deadline = policy.wait_timeout.map(|timeout| Instant::now() + timeout);
        Claiming {
            function,
            report,
            key,
            fingerprint,
            policy,
            deadline,
        }
    }};
}

/// What one claim's answer means: the call begins (execute, replay, refuse) and this returns
/// it from the calling function, or this is the duplicate in flight to wait for (unless the
/// policy rejects it). A macro for the reason `prepare!` is one: `claiming`, moved into a
/// function and back beside a `Begin`, was copied each way, a fifth of a replay.
macro_rules! claimed {
    ($backend:expr, $claiming:ident, $answer:expr, $blocking:expr) => {
        match $answer {
            Ok(Claim::Execute(lease)) => {
                return execute(
                    $backend,
                    ($claiming.function, $claiming.report),
                    $claiming.key,
                    lease,
                    $claiming.policy,
                    $blocking,
                )
            }
            Ok(Claim::Replay(outcome)) => {
                return replayed(
                    $claiming.function,
                    &$claiming.report,
                    &$claiming.key,
                    outcome,
                )
            }
            Err(error) => {
                return refuse($claiming.function, &$claiming.report, &$claiming.key, error)
            }
            Ok(Claim::InFlight(in_flight)) => match reject_in_flight(
                $claiming.function,
                &$claiming.report,
                &$claiming.key,
                $claiming.policy,
            ) {
                Some(refusal) => return refusal,
                None => in_flight,
            },
        }
    };
}

/// What waiting for the duplicate gave: its outcome, an error, or (`None`) that it gave up
/// and the call claims again, where one waiter wins.
#[inline]
fn waited<'a, B: IdempotencyBackend<T>, T>(
    claiming: &Claiming,
    answer: Result<Option<T>, IdempotencyError>,
) -> Option<Begin<'a, B, T>> {
    match answer {
        Ok(Some(outcome)) => Some(replayed(
            claiming.function,
            &claiming.report,
            &claiming.key,
            outcome,
        )),
        Ok(None) => None,
        Err(error) => Some(refuse(
            claiming.function,
            &claiming.report,
            &claiming.key,
            error,
        )),
    }
}

/// The span of one call; its `outcome` and `waited` are recorded as they are decided.
/// Made only when some subscriber listens at `debug`: a disabled span still costs several
/// nanoseconds to make.
#[inline]
fn call_span(function: &'static str) -> tracing::Span {
    match tracing::level_enabled!(tracing::Level::DEBUG) {
        true => {
            tracing::debug_span!(target: "racefree", "idempotent", function, outcome = tracing::field::Empty, waited = tracing::field::Empty)
        }
        false => tracing::Span::none(),
    }
}

/// Begins `call` against `backend`, waiting asynchronously for a duplicate in flight.
#[inline]
pub async fn begin<B: IdempotencyBackend<T>, T>(backend: &B, call: Call) -> Begin<'_, B, T> {
    let span = call_span(call.function);
    begin_in_span(backend, call, span.clone())
        .instrument(span)
        .await
}

async fn begin_in_span<B: IdempotencyBackend<T>, T>(
    backend: &B,
    call: Call,
    span: tracing::Span,
) -> Begin<'_, B, T> {
    // A call without a key: the store may open what its body runs in.
    let claiming = prepare!(backend, call, span, |mut execution| {
        match backend.lease_without_key().await {
            Ok(lease) => {
                execution.unkeyed_lease = lease;
                run_unkeyed(execution)
            }
            Err(error) => {
                let report = &execution.report;
                report
                    .meter
                    .store_error(telemetry::idempotency_error_kind(&error));
                report.decided(outcome::ERROR);
                Begin::Refuse(error)
            }
        }
    });
    loop {
        let answer = backend.claim(&claiming.key, claiming.fingerprint).await;
        let in_flight = claimed!(backend, claiming, answer, false);
        let started = Started::now();
        let answer = backend
            .wait(&claiming.key, in_flight, claiming.deadline)
            .await;
        claiming.report.meter.flight_waited(started);
        if let Some(begun) = waited(&claiming, answer) {
            return begun;
        }
    }
}

/// [`begin`] for sync functions: waiting blocks the thread.
#[inline(always)]
pub fn begin_blocking<B: BlockingIdempotencyBackend<T>, T>(
    backend: &B,
    call: Call,
) -> Begin<'_, B, T> {
    let span = call_span(call.function);
    let _in_span = span.enter();
    let claiming = prepare!(backend, call, span.clone(), |execution| run_unkeyed(
        execution
    ));
    loop {
        let answer = backend.claim_blocking(&claiming.key, claiming.fingerprint);
        let in_flight = claimed!(backend, claiming, answer, true);
        let started = Started::now();
        let answer = backend.wait_blocking(&claiming.key, in_flight, claiming.deadline);
        claiming.report.meter.flight_waited(started);
        if let Some(begun) = waited(&claiming, answer) {
            return begun;
        }
    }
}

fn unkeyed<'a, B: IdempotencyBackend<T>, T>(
    backend: &'a B,
    function: &'static str,
    report: Report,
    policy: Policy,
) -> Begin<'a, B, T> {
    if policy.require_key {
        tracing::debug!(target: "racefree", function, outcome = outcome::ERROR, "idempotent call without a key: refused");
        report.decided(outcome::ERROR);
        return Begin::Refuse(IdempotencyError::MissingKey);
    }
    tracing::debug!(target: "racefree", function, outcome = outcome::EXECUTED, "idempotent call without a key: executing without idempotency");
    // Counted as executed by `run_unkeyed`, once the store opened what the body runs in.
    Begin::Execute(Execution {
        backend,
        claim: None,
        unkeyed_lease: None,
        function,
        report,
        ttl: policy.ttl,
        holder: None,
        _entered: None,
    })
}

/// A call without a key runs its body.
fn run_unkeyed<B: IdempotencyBackend<T>, T>(execution: Execution<'_, B, T>) -> Begin<'_, B, T> {
    execution.report.meter.executed();
    execution.report.decided(outcome::EXECUTED);
    Begin::Execute(execution)
}

#[inline]
fn execute<'a, B: IdempotencyBackend<T>, T>(
    backend: &'a B,
    (function, report): (&'static str, Report),
    key: RecordKey,
    lease: B::Lease,
    policy: Policy,
    blocking: bool,
) -> Begin<'a, B, T> {
    tracing::debug!(target: "racefree", function, key = key.client_key(), outcome = outcome::EXECUTED, "idempotent call: executing");
    report.meter.executed();
    report.decided(outcome::EXECUTED);
    let holder = record_holder(&key);
    Begin::Execute(Execution {
        backend,
        claim: Some((key, lease)),
        unkeyed_lease: None,
        function,
        report,
        ttl: policy.ttl,
        holder: Some(holder),
        // The sync body runs on this thread until the execution ends.
        _entered: blocking.then(|| holder.enter_sendable()),
    })
}

#[inline(always)]
fn replayed<'a, B: IdempotencyBackend<T>, T>(
    function: &'static str,
    report: &Report,
    key: &RecordKey,
    outcome: T,
) -> Begin<'a, B, T> {
    tracing::debug!(target: "racefree", function, key = key.client_key(), outcome = outcome::REPLAYED, "idempotent call: replaying the stored outcome");
    report.meter.replayed();
    report.decided(outcome::REPLAYED);
    replay::record(Replay::Replayed);
    Begin::Replay(outcome)
}

#[cold]
fn refuse<'a, B: IdempotencyBackend<T>, T>(
    function: &'static str,
    report: &Report,
    key: &RecordKey,
    error: IdempotencyError,
) -> Begin<'a, B, T> {
    match &error {
        IdempotencyError::Conflict { .. } => {
            tracing::debug!(target: "racefree", function, key = key.client_key(), outcome = outcome::CONFLICT, "idempotent call: key reused with a different request (conflict)");
            report.meter.conflict();
            report.decided(outcome::CONFLICT);
        }
        _ => {
            tracing::debug!(target: "racefree", function, key = key.client_key(), outcome = outcome::ERROR, %error, "idempotent call refused");
            report
                .meter
                .store_error(telemetry::idempotency_error_kind(&error));
            report.decided(outcome::ERROR);
        }
    }
    Begin::Refuse(error)
}

#[cold]
fn reject_in_flight<'a, B: IdempotencyBackend<T>, T>(
    function: &'static str,
    report: &Report,
    key: &RecordKey,
    policy: Policy,
) -> Option<Begin<'a, B, T>> {
    if policy.in_flight == OnInFlight::Reject {
        tracing::debug!(target: "racefree", function, key = key.client_key(), outcome = outcome::ERROR, "idempotent call: duplicate in flight, rejected");
        report.decided(outcome::ERROR);
        return Some(Begin::Refuse(IdempotencyError::InProgress {
            key: key.client_key().to_owned(),
        }));
    }
    tracing::debug!(target: "racefree", function, key = key.client_key(), outcome = outcome::WAITED, "idempotent call: duplicate in flight, waiting");
    report.meter.idempotent_waited();
    report.span.record("waited", true);
    None
}

impl<B: IdempotencyBackend<T>, T> Execution<'_, B, T> {
    /// Runs an async body as executing this call's key: a call with the same key polled from
    /// within it is refused with [`IdempotencyError::Reentrant`] instead of waiting for itself.
    pub fn within<F: Future>(&self, body: F) -> Within<F> {
        self.holder().within(body)
    }

    /// The holder an async body runs as ([`within`](Self::within)), for generated code that
    /// must let go of the execution before the body borrows its lease (a `tx` parameter).
    pub fn holder(&self) -> Holder {
        // A call without a key cannot be re-entered: a fresh holder matches nothing.
        self.holder.unwrap_or_else(Holder::next)
    }

    /// The lease the body runs under: for a SQL store, the transaction it writes in. `None`
    /// for a call without a key on a store that opens nothing for such calls.
    pub fn lease_mut(&mut self) -> Option<&mut B::Lease> {
        match &mut self.claim {
            Some((_, lease)) => Some(lease),
            None => self.unkeyed_lease.as_mut(),
        }
    }

    /// A call without a key whose store opened something for it: ends that the same way
    /// (`complete`), nothing is recorded.
    async fn finish_unkeyed(&mut self, outcome: &T) -> Result<(), IdempotencyError> {
        match self.unkeyed_lease.take() {
            Some(lease) => self.backend.complete(lease, outcome, self.ttl).await,
            None => Ok(()),
        }
    }

    /// Stores `outcome` for the call's key. If the store fails, the caller still gets its
    /// outcome (the body has run; its effects happened) and the failure is logged: a retry
    /// will execute again.
    pub async fn complete(mut self, outcome: &T) {
        replay::record(Replay::Fresh);
        let Some((key, lease)) = self.claim.take() else {
            if let Err(error) = self.finish_unkeyed(outcome).await {
                self.report
                    .meter
                    .store_error(telemetry::idempotency_error_kind(&error));
                tracing::warn!(target: "racefree", function = self.function, %error, "idempotent call without a key: its transaction did not commit");
            }
            return;
        };
        if let Err(error) = self.backend.complete(lease, outcome, self.ttl).await {
            self.store_failed(&key, &error);
        }
    }

    /// [`complete`](Self::complete), but telling the caller when its outcome must not be
    /// reported as the key's result: `LeaseLost` (another caller took the key over) or
    /// `OutcomeUnknown` (whether it was recorded is unknown). An outcome the store could not
    /// hold (`OutcomeNotStored`) is logged and the caller keeps its value: the key is done,
    /// and later calls get the error instead of executing again.
    ///
    /// With a store whose `complete` commits the body's effect
    /// ([`IdempotencyBackend::COMPLETE_COMMITS_EFFECT`], a SQL store) every failure is the
    /// caller's, `OutcomeNotStored` too: the effect was rolled back with the outcome.
    #[inline]
    pub async fn finish(mut self, outcome: &T) -> Result<(), IdempotencyError> {
        replay::record(Replay::Fresh);
        let Some((key, lease)) = self.claim.take() else {
            let finished = self.finish_unkeyed(outcome).await;
            if let Err(error) = &finished {
                self.report
                    .meter
                    .store_error(telemetry::idempotency_error_kind(error));
            }
            return finished;
        };
        match self.backend.complete(lease, outcome, self.ttl).await {
            Ok(()) => Ok(()),
            Err(error @ IdempotencyError::OutcomeNotStored { .. })
                if !B::COMPLETE_COMMITS_EFFECT =>
            {
                self.store_failed(&key, &error);
                Ok(())
            }
            Err(error) => {
                self.store_failed(&key, &error);
                Err(error)
            }
        }
    }

    /// Frees the call's key without storing anything: the next call with the key executes.
    #[inline]
    pub fn release(self) {
        replay::record(Replay::Fresh);
        if let Some((key, _)) = &self.claim {
            tracing::debug!(target: "racefree", function = self.function, key = key.client_key(), "idempotent call: outcome not stored; releasing the key");
        }
    }

    fn store_failed(&self, key: &RecordKey, error: &IdempotencyError) {
        self.report
            .meter
            .store_error(telemetry::idempotency_error_kind(error));
        tracing::warn!(target: "racefree", function = self.function, key = key.client_key(), %error, "idempotent call: outcome could not be stored");
    }
}

impl<B: BlockingIdempotencyBackend<T>, T> Execution<'_, B, T> {
    /// [`complete`](Self::complete) for sync functions.
    #[inline]
    pub fn complete_blocking(mut self, outcome: &T) {
        replay::record(Replay::Fresh);
        let Some((key, lease)) = self.claim.take() else {
            return;
        };
        if let Err(error) = self.backend.complete_blocking(lease, outcome, self.ttl) {
            self.store_failed(&key, &error);
        }
    }
}

impl<B: IdempotencyBackend<T>, T> Drop for Execution<'_, B, T> {
    fn drop(&mut self) {
        if let Some((_, lease)) = self.claim.take() {
            self.backend.release(lease);
        }
        if let Some(lease) = self.unkeyed_lease.take() {
            self.backend.release(lease);
        }
    }
}
