//! The tower layer: [`ReplayLayer`] wraps any `http` service, runs each call in a
//! [`replay::track`] scope and marks the responses of replayed `#[idempotent]` calls with the
//! [`ReplayedHeader`]; it also tells the extractors below it which [`KeyHeader`] to read.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use pin_project_lite::pin_project;

use super::KeyHeader;
use crate::idempotent::replay::{self, Replay};

/// The response header set on replayed outcomes, unless a [`ReplayedHeader`] says otherwise.
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

/// Which response header marks a replayed outcome, and with what value: `Idempotency-Replayed:
/// true` by default; Stripe answers `Idempotent-Replayed: true`, some APIs
/// `X-Idempotency-Replayed: true`. A fresh outcome carries no such header.
///
/// ```
/// use http::{HeaderName, HeaderValue, Response};
/// use racefree_runtime::http::ReplayedHeader;
/// use racefree_runtime::Replay;
///
/// const STRIPE: ReplayedHeader = ReplayedHeader::new(
///     HeaderName::from_static("idempotent-replayed"),
///     HeaderValue::from_static("true"),
/// );
/// let mut response = Response::new(());
/// STRIPE.mark(&mut response, Replay::Fresh);
/// assert!(response.headers().is_empty());
/// STRIPE.mark(&mut response, Replay::Replayed);
/// assert_eq!(response.headers()["idempotent-replayed"], "true");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedHeader {
    name: HeaderName,
    value: HeaderValue,
}

impl ReplayedHeader {
    /// Replays are marked `name: value`.
    pub const fn new(name: HeaderName, value: HeaderValue) -> ReplayedHeader {
        ReplayedHeader { name, value }
    }

    /// The header's name.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The header's value on a replay.
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    /// Sets the header on `response` if `replay` says its outcome was replayed; leaves it
    /// untouched otherwise.
    pub fn mark<B>(&self, response: &mut Response<B>, replay: Replay) {
        if replay.is_replayed() {
            response
                .headers_mut()
                .insert(self.name.clone(), self.value.clone());
        }
    }
}

impl Default for ReplayedHeader {
    /// `Idempotency-Replayed: true`.
    fn default() -> Self {
        ReplayedHeader::new(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"))
    }
}

/// A tower [`Layer`](tower_layer::Layer) for any service of `http::Request<B>` to
/// `http::Response<B>` (hyper, tonic, tower-http stacks, axum): marks the response of a call
/// whose `#[idempotent]` function returned a stored outcome with the [`ReplayedHeader`], and
/// tells the key extractors below it which [`KeyHeader`] to read.
///
/// What it tracks is the inner service's `call` and the future it returns, on whatever thread
/// polls it (see [`replay::track`]); work the service hands to a spawned task is not tracked,
/// and its response is not marked.
///
/// ```
/// use http::{HeaderName, HeaderValue};
/// use racefree_runtime::http::{KeyHeader, ReplayLayer, ReplayedHeader};
///
/// let layer = ReplayLayer::new()
///     .key_header(KeyHeader::new(HeaderName::from_static("x-idempotency-key")))
///     .replayed_header(ReplayedHeader::new(
///         HeaderName::from_static("x-idempotency-replayed"),
///         HeaderValue::from_static("true"),
///     ));
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Default)]
pub struct ReplayLayer {
    key_header: Option<KeyHeader>,
    replayed_header: ReplayedHeader,
}

impl ReplayLayer {
    /// Keys read from `Idempotency-Key`, replays marked `Idempotency-Replayed: true`.
    pub fn new() -> ReplayLayer {
        ReplayLayer::default()
    }

    /// Extractors below the layer read the key from this header (and not from the default).
    pub fn key_header(mut self, header: KeyHeader) -> ReplayLayer {
        self.key_header = Some(header);
        self
    }

    /// Replayed responses are marked with this header.
    pub fn replayed_header(mut self, header: ReplayedHeader) -> ReplayLayer {
        self.replayed_header = header;
        self
    }
}

impl<S> tower_layer::Layer<S> for ReplayLayer {
    type Service = ReplayService<S>;

    fn layer(&self, inner: S) -> ReplayService<S> {
        ReplayService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ReplayLayer`] wraps around `S`.
#[derive(Debug, Clone)]
pub struct ReplayService<S> {
    inner: S,
    layer: ReplayLayer,
}

impl<S> ReplayService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for ReplayService<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ReplayFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if let Some(header) = &self.layer.key_header {
            request.extensions_mut().insert(header.clone());
        }
        // A service may do its work in `call` and hand back a ready future: track that too.
        let (future, replay) = replay::track_sync(|| self.inner.call(request));
        ReplayFuture {
            inner: Tracked::new(future, replay),
            replayed_header: self.layer.replayed_header.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`ReplayService`]: the inner service's, marked when it resolves.
    pub struct ReplayFuture<F> {
        #[pin]
        inner: Tracked<F>,
        replayed_header: ReplayedHeader,
    }
}

impl<F, B, E> Future for ReplayFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (output, replay) = ready!(this.inner.poll(cx));
        let mut response = output?;
        this.replayed_header.mark(&mut response, replay);
        Poll::Ready(Ok(response))
    }
}

pin_project! {
    /// [`replay::track`] as a future with a name, which `Service::Future` needs.
    pub(crate) struct Tracked<F> {
        #[pin]
        future: F,
        replay: Replay,
    }
}

impl<F> Tracked<F> {
    /// Tracks `future`, starting from what `replay` says happened before its first poll.
    pub(crate) fn new(future: F, replay: Replay) -> Tracked<F> {
        Tracked { future, replay }
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = (F::Output, Replay);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let future = this.future;
        // Each poll is a scope of its own; what a poll records overrides what earlier ones
        // did, and a poll that records nothing keeps it: the last call to finish wins, as in
        // `replay::track`.
        let (poll, replay) = replay::track_sync(|| future.poll(cx));
        if replay != Replay::NotRecorded {
            *this.replay = replay;
        }
        let output = ready!(poll);
        Poll::Ready((output, *this.replay))
    }
}
