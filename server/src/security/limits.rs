//! Load shedding in front of the keybroker services, as a tower layer: a
//! bound on calls in flight, a per-identity rate (governor's GCRA, keyed by
//! the caller's identity), and a deadline on every call (the caller's
//! `grpc-timeout` when shorter). Over a limit a call is answered
//! RESOURCE_EXHAUSTED at once, naming the limit, never queued; a call past
//! its deadline is answered DEADLINE_EXCEEDED and its work dropped. Health
//! and reflection are not limited.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

use super::identity::PeerInfo;
use crate::config::LimitsConfig;
use crate::error::{ErrorCode, ServiceError, ServiceResult};

/// The limits every keybroker service shares.
pub struct Limits {
    in_flight: Option<Arc<Semaphore>>,
    max_in_flight: usize,
    rate: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    rate_setting: u32,
    deadline: Duration,
    rejections: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_in_flight", &self.max_in_flight)
            .field("per_identity_rate", &self.rate_setting)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// The limits of `config`.
    pub fn new(config: &LimitsConfig) -> Arc<Self> {
        let rate = NonZeroU32::new(config.per_identity_rate).map(|per_second| {
            let burst = NonZeroU32::new(config.per_identity_burst).unwrap_or(per_second);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        let limits = Arc::new(Self {
            in_flight: (config.max_in_flight > 0).then(|| Arc::new(Semaphore::new(config.max_in_flight))),
            max_in_flight: config.max_in_flight,
            rate,
            rate_setting: config.per_identity_rate,
            deadline: Duration::from_millis(config.call_deadline_ms.max(1)),
            rejections: std::sync::atomic::AtomicU64::new(0),
        });
        if limits.rate.is_some() {
            // Forget identities idle for a while, so the table stays bounded.
            let weak = Arc::downgrade(&limits);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    let Some(limits) = weak.upgrade() else { return };
                    if let Some(rate) = &limits.rate {
                        rate.retain_recent();
                        rate.shrink_to_fit();
                    }
                }
            });
        }
        limits
    }

    /// Calls refused by a limit since start.
    pub fn rejections(&self) -> u64 {
        self.rejections.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reject(&self, message: String) -> ServiceError {
        self.rejections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%message, "call refused by a limit");
        ServiceError::new(ErrorCode::ResourceExhausted, message)
    }

    fn rate_exceeded(&self, identity: &str) -> ServiceError {
        if let Some(m) = crate::telemetry::metrics::get() {
            m.refused_rate.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.reject(format!(
            "identity {identity:?} is over its rate limit (limits.per_identity_rate = {} calls per second)",
            self.rate_setting
        ))
    }

    /// Charges `n` more calls to `identity`'s rate (the items of a batch
    /// beyond the call itself).
    pub fn charge(&self, identity: &Arc<str>, n: usize) -> ServiceResult<()> {
        let (Some(rate), Some(n)) = (&self.rate, u32::try_from(n).ok().and_then(NonZeroU32::new)) else {
            return Ok(());
        };
        match rate.check_key_n(identity, n) {
            Ok(Ok(())) => Ok(()),
            _ => Err(self.rate_exceeded(identity)),
        }
    }

    fn admit(&self, identity: &Arc<str>) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ServiceError> {
        if let Some(rate) = &self.rate
            && rate.check_key(identity).is_err()
        {
            return Err(self.rate_exceeded(identity));
        }
        match &self.in_flight {
            None => Ok(None),
            Some(semaphore) => semaphore.clone().try_acquire_owned().map(Some).map_err(|_| {
                if let Some(m) = crate::telemetry::metrics::get() {
                    m.refused_in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.reject(format!(
                    "too many calls in flight (limits.max_in_flight = {}); retry with backoff",
                    self.max_in_flight
                ))
            }),
        }
    }
}

/// A tower layer applying [`Limits`].
#[derive(Clone)]
pub struct LimitLayer(Arc<Limits>);

impl LimitLayer {
    /// A layer over `limits`.
    pub fn new(limits: Arc<Limits>) -> Self {
        Self(limits)
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited { inner, limits: self.0.clone() }
    }
}

/// A service behind [`Limits`].
#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S: NamedService> NamedService for Limited<S> {
    const NAME: &'static str = S::NAME;
}

/// The caller's `grpc-timeout`, if it sent one.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, B> tower::Service<http::Request<B>> for Limited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let path = request.uri().path();
        let method = path.rsplit('/').next().unwrap_or_default();
        let rpc = crate::telemetry::metrics::rpc_index(method);
        // The caller's name (made once per connection: a shared string).
        let identity: Arc<str> =
            request.extensions().get::<PeerInfo>().map_or_else(|| Arc::from(""), |p| p.peer.name().clone());
        // The call's span, a child of the caller's trace when it sent one.
        let span = crate::traced_span!(
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = path.trim_start_matches('/').split('/').next().unwrap_or_default(),
            rpc.method = method,
            keybroker.identity = &*identity,
            keybroker.key = tracing::field::Empty,
            keybroker.version = tracing::field::Empty,
            keybroker.backend = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, request.headers());
        let permit = match self.limits.admit(&identity) {
            Ok(permit) => permit,
            Err(err) => {
                // Refused at once: no clock read on the way in for it.
                if let Some(m) = crate::telemetry::metrics::get() {
                    m.request(rpc, tonic::Code::ResourceExhausted as usize, std::time::Duration::ZERO);
                }
                let response = Status::from(err).into_http();
                return Box::pin(async move { Ok(response) });
            }
        };
        let deadline = grpc_timeout(request.headers()).map_or(self.limits.deadline, |t| t.min(self.limits.deadline));
        let configured = self.limits.deadline;
        // The clone is the ready one (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _permit = permit;
            match tokio::time::timeout(deadline, inner.call(request).instrument(span)).await {
                Ok(response) => response,
                Err(_) => {
                    if let Some(m) = crate::telemetry::metrics::get() {
                        m.deadline_exceeded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // It ran for its whole deadline.
                        m.request(rpc, tonic::Code::DeadlineExceeded as usize, deadline);
                    }
                    let message = if deadline < configured {
                        format!("the call's deadline of {} ms passed", deadline.as_millis())
                    } else {
                        format!("the call took longer than limits.call_deadline_ms = {}", configured.as_millis())
                    };
                    Ok(Status::deadline_exceeded(message).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_grpc_timeout_is_read_in_every_unit() {
        let header = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(header("200m"), Some(Duration::from_millis(200)));
        assert_eq!(header("3S"), Some(Duration::from_secs(3)));
        assert_eq!(header("2M"), Some(Duration::from_secs(120)));
        assert_eq!(header("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(header("500u"), Some(Duration::from_micros(500)));
        assert_eq!(header("90n"), Some(Duration::from_nanos(90)));
        assert_eq!(header("5x"), None);
        assert_eq!(header("m"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
