//! Prometheus metrics. The hot path only adds to fixed arrays of atomics
//! (requests by RPC and code, latency buckets by RPC, backend calls by
//! backend and operation): no lock, no map lookup, no allocation. Everything
//! keyed by a key name (wraps and unwraps per version, current version and
//! its age, wrap count against the limit) is read from the keyring's cache
//! at scrape time, so only keys that exist make series (a flood of unknown
//! names makes none), capped at `metrics.max_key_series`. The exposition is
//! encoded by `prometheus-client`.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving `/metrics` (Prometheus text
    /// format), `/healthz` and `/readyz`. Off when unset (`keybroker dev`
    /// turns it on).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Most keys given per-key series (in name order); the rest are counted
    /// in `keybroker_key_series_dropped`.
    #[serde(default = "default_max_key_series")]
    pub max_key_series: usize,
}

fn default_max_key_series() -> usize {
    1000
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: None, max_key_series: default_max_key_series() }
    }
}

/// The RPCs counted, in order; anything else counts as `other`.
pub const RPCS: [&str; 21] = [
    "Wrap",
    "Unwrap",
    "GenerateDataKey",
    "Rewrap",
    "BatchWrap",
    "BatchUnwrap",
    "BatchRewrap",
    "CreateKey",
    "GetKey",
    "ListKeys",
    "Rotate",
    "SetMinDecryptionVersion",
    "DisableKeyVersion",
    "EnableKeyVersion",
    "DestroyKeyVersion",
    "UpdateKeyPolicy",
    "Migrate",
    "ListBackends",
    "GetMigration",
    "WatchMigration",
    "other",
];

/// gRPC code names by number.
pub const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 16] =
    [0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The index of an RPC name in [`RPCS`].
pub fn rpc_index(rpc: &str) -> usize {
    RPCS.iter().position(|r| *r == rpc).unwrap_or(RPCS.len() - 1)
}

/// A latency histogram of atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Sum, count and the count of each bucket (not cumulative: the
    /// encoder accumulates), the last one above every bound.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut below = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            let n = n.load(Ordering::Relaxed);
            below += n;
            buckets.push((*bound, n));
        }
        let count = self.count.load(Ordering::Relaxed);
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        (self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, count, buckets)
    }
}

/// Backend operations counted.
pub const BACKEND_OPS: [&str; 8] = ["wrap", "unwrap", "create", "attach", "export", "import", "destroy", "health"];

/// The counters of one backend.
#[derive(Debug, Default)]
pub struct BackendInstruments {
    ok: [AtomicU64; BACKEND_OPS.len()],
    errors: [AtomicU64; BACKEND_OPS.len()],
    latency: [Histogram; BACKEND_OPS.len()],
}

impl BackendInstruments {
    /// Records one call of operation `op` (an index in [`BACKEND_OPS`]).
    pub fn call(&self, op: usize, ok: bool, elapsed: Duration) {
        let counters = if ok { &self.ok } else { &self.errors };
        counters[op].fetch_add(1, Ordering::Relaxed);
        self.latency[op].observe(elapsed);
    }
}

/// Every instrument the hot path touches.
#[derive(Debug, Default)]
pub struct Instruments {
    requests: [[AtomicU64; CODES.len()]; RPCS.len()],
    latency: [Histogram; RPCS.len()],
    backends: std::sync::RwLock<Vec<(String, Arc<BackendInstruments>)>>,
    /// TLS handshakes refused.
    pub handshake_refusals: AtomicU64,
    /// Calls refused by the in-flight bound.
    pub refused_in_flight: AtomicU64,
    /// Calls refused by an identity's rate.
    pub refused_rate: AtomicU64,
    /// Calls cut off at their deadline.
    pub deadline_exceeded: AtomicU64,
}

static GLOBAL: OnceLock<Arc<Instruments>> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The process's instruments, when metrics are on.
pub fn get() -> Option<&'static Arc<Instruments>> {
    if ENABLED.load(Ordering::Relaxed) { GLOBAL.get() } else { None }
}

/// Turns metrics on for the process and returns the instruments.
pub fn enable() -> Arc<Instruments> {
    let instruments = GLOBAL.get_or_init(|| Arc::new(Instruments::default())).clone();
    ENABLED.store(true, Ordering::Relaxed);
    instruments
}

impl Instruments {
    /// Records a finished call of `rpc` with gRPC `code` (its number).
    pub fn request(&self, rpc: usize, code: usize, elapsed: Duration) {
        self.requests[rpc.min(RPCS.len() - 1)][code.min(CODES.len() - 1)].fetch_add(1, Ordering::Relaxed);
        self.latency[rpc.min(RPCS.len() - 1)].observe(elapsed);
    }

    /// The instruments of backend `name` (made once per backend, at start).
    pub fn backend(&self, name: &str) -> Arc<BackendInstruments> {
        let mut all = self.backends.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, b)) = all.iter().find(|(n, _)| n == name) {
            return b.clone();
        }
        let made = Arc::new(BackendInstruments::default());
        all.push((name.to_owned(), made.clone()));
        made
    }
}

/// What a scrape reads besides the instruments.
pub trait Sources: Send + Sync + 'static {
    /// Writes the series of the broker's state (keys, backends, store,
    /// migrations, audit, cache) to `out`.
    fn encode(&self, out: &mut Encoder<'_, '_>) -> Result<(), std::fmt::Error>;
}

/// A small helper over prometheus-client's encoder.
pub struct Encoder<'a, 'b> {
    inner: &'a mut DescriptorEncoder<'b>,
}

impl Encoder<'_, '_> {
    /// A metric family with one series per `(labels, value)`.
    pub fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        series: &[(Vec<(&str, String)>, f64)],
    ) -> Result<(), std::fmt::Error> {
        let mut metric = self.inner.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in series {
            let mut one = metric.encode_family(labels)?;
            match kind {
                MetricType::Counter => {
                    one.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&(*value as u64), None)?
                }
                _ => one.encode_gauge(value)?,
            }
        }
        Ok(())
    }
}

/// The collector registered with prometheus-client.
pub struct Collector {
    instruments: Arc<Instruments>,
    sources: Arc<dyn Sources>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector").finish_non_exhaustive()
    }
}

impl Collector {
    /// A collector of `instruments` and `sources`.
    pub fn new(instruments: Arc<Instruments>, sources: Arc<dyn Sources>) -> Self {
        Self { instruments, sources }
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let i = &self.instruments;
        let mut requests = Vec::new();
        for (r, rpc) in RPCS.iter().enumerate() {
            for (c, code) in CODES.iter().enumerate() {
                let n = i.requests[r][c].load(Ordering::Relaxed);
                if n > 0 {
                    requests.push((vec![("rpc", (*rpc).to_owned()), ("code", (*code).to_owned())], n as f64));
                }
            }
        }
        let mut out = Encoder { inner: &mut encoder };
        out.family("keybroker_requests", "keybroker calls by RPC and gRPC code.", MetricType::Counter, &requests)?;
        {
            let mut metric = encoder.encode_descriptor(
                "keybroker_request_duration_seconds",
                "Latency of keybroker calls by RPC.",
                None,
                MetricType::Histogram,
            )?;
            for (r, rpc) in RPCS.iter().enumerate() {
                let (sum, count, buckets) = i.latency[r].snapshot();
                if count == 0 {
                    continue;
                }
                let labels = [("rpc", *rpc)];
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let backends = i.backends.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let mut calls = Vec::new();
        for (name, b) in &backends {
            for (o, op) in BACKEND_OPS.iter().enumerate() {
                for (result, counters) in [("ok", &b.ok), ("error", &b.errors)] {
                    let n = counters[o].load(Ordering::Relaxed);
                    if n > 0 {
                        let labels =
                            vec![("backend", name.clone()), ("op", (*op).to_owned()), ("result", result.to_owned())];
                        calls.push((labels, n as f64));
                    }
                }
            }
        }
        let mut out = Encoder { inner: &mut encoder };
        out.family(
            "keybroker_backend_calls",
            "Calls to backends by backend, operation and result (error: the backend failed or was unreachable).",
            MetricType::Counter,
            &calls,
        )?;
        {
            let mut metric = encoder.encode_descriptor(
                "keybroker_backend_call_duration_seconds",
                "Latency of backend calls by backend and operation.",
                None,
                MetricType::Histogram,
            )?;
            for (name, b) in &backends {
                for (o, op) in BACKEND_OPS.iter().enumerate() {
                    let (sum, count, buckets) = b.latency[o].snapshot();
                    if count == 0 {
                        continue;
                    }
                    let labels = [("backend", name.as_str()), ("op", *op)];
                    metric
                        .encode_family(&labels)?
                        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
                }
            }
        }
        let mut out = Encoder { inner: &mut encoder };
        let refusals = [
            ("in_flight", i.refused_in_flight.load(Ordering::Relaxed)),
            ("per_identity_rate", i.refused_rate.load(Ordering::Relaxed)),
            ("deadline", i.deadline_exceeded.load(Ordering::Relaxed)),
        ];
        let refusals: Vec<_> = refusals.iter().map(|(l, n)| (vec![("limit", (*l).to_owned())], *n as f64)).collect();
        out.family(
            "keybroker_limit_rejections",
            "Calls refused by a limit (RESOURCE_EXHAUSTED) or cut off at their deadline (DEADLINE_EXCEEDED).",
            MetricType::Counter,
            &refusals,
        )?;
        out.family(
            "keybroker_tls_handshake_refusals",
            "TLS handshakes refused (no, untrusted, expired, revoked or wrong-usage client certificate; timeout).",
            MetricType::Counter,
            &[(Vec::new(), i.handshake_refusals.load(Ordering::Relaxed) as f64)],
        )?;
        self.sources.encode(&mut out)
    }
}

/// Renders every metric in the Prometheus text format (0.0.4).
pub fn render(collector: Collector) -> Result<String, std::fmt::Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}
