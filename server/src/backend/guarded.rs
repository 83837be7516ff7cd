//! Every configured backend behind a circuit breaker ([`crate::breaker`]):
//! once a call or a health check finds the backend unreachable, its keys
//! answer `UNAVAILABLE` at once, naming the backend, instead of each call
//! waiting for the backend's timeout; one call per second goes through as
//! a probe, and the health monitor's checks always do, so recovery is seen
//! within a second of it.

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::{Aad, BackendError, BackendRef, BackendStats, KeyBackend, VersionRef, WrapItem};
use crate::breaker::Breaker;
use crate::core::envelope::Algorithm;
use crate::telemetry::metrics::{BACKEND_OPS, BackendInstruments};

/// A backend behind a circuit breaker, with a span and metrics per call.
pub struct GuardedBackend {
    inner: std::sync::Arc<dyn KeyBackend>,
    breaker: Breaker,
    instruments: Option<std::sync::Arc<BackendInstruments>>,
}

/// Indexes in [`crate::telemetry::metrics::BACKEND_OPS`].
const WRAP: usize = 0;
const UNWRAP: usize = 1;
const CREATE: usize = 2;
const ATTACH: usize = 3;
const EXPORT: usize = 4;
const IMPORT: usize = 5;
const DESTROY: usize = 6;
const HEALTH: usize = 7;

impl GuardedBackend {
    /// Guards `inner`.
    pub fn new(inner: std::sync::Arc<dyn KeyBackend>) -> Self {
        let instruments = crate::telemetry::metrics::get().map(|m| m.backend(inner.name()));
        Self { inner, breaker: Breaker::default(), instruments }
    }

    /// Runs one call of operation `op`: through the breaker (unless
    /// `always`), in a span, timed and counted.
    async fn call<T>(
        &self,
        op: usize,
        key: &str,
        version: u32,
        always: bool,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        use tracing::Instrument;
        if !always {
            self.admit()?;
        }
        let span = crate::traced_span!(
            "backend",
            otel.name = format!("backend.{}", BACKEND_OPS[op]),
            otel.kind = "client",
            keybroker.backend = self.inner.name(),
            keybroker.backend_type = self.inner.kind(),
            keybroker.key = key,
            keybroker.version = version,
            otel.status_code = tracing::field::Empty,
        );
        // Timed only for the metrics.
        let started = self.instruments.as_ref().map(|_| std::time::Instant::now());
        let result = call.instrument(span.clone()).await;
        // A refused ciphertext or request is the caller's error, not the
        // backend's.
        let failed = matches!(result, Err(BackendError::Unavailable { .. } | BackendError::Material { .. }));
        if failed {
            span.record("otel.status_code", "ERROR");
        }
        if let (Some(instruments), Some(started)) = (&self.instruments, started) {
            instruments.call(op, !failed, started.elapsed());
        }
        self.observe(result)
    }

    fn admit(&self) -> Result<(), BackendError> {
        self.breaker
            .admit()
            .map_err(|why| BackendError::Unavailable { backend: self.inner.name().to_owned(), reason: why })
    }

    fn observe<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        match &result {
            Err(BackendError::Unavailable { reason, .. }) => {
                if self.breaker.failed(reason) {
                    tracing::warn!(backend = self.inner.name(), %reason, "backend down; failing its calls at once");
                }
            }
            // Any other answer, even a refusal, shows the backend is there.
            _ => {
                if self.breaker.succeeded() {
                    tracing::info!(backend = self.inner.name(), "backend reachable again");
                }
            }
        }
        result
    }
}

#[async_trait]
impl KeyBackend for GuardedBackend {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn algorithm(&self) -> Algorithm {
        self.inner.algorithm()
    }

    fn exportable(&self) -> bool {
        self.inner.exportable()
    }

    fn importable(&self) -> bool {
        self.inner.importable()
    }

    fn stats(&self) -> &BackendStats {
        self.inner.stats()
    }

    async fn create_version(&self, key: &str, version: u32) -> Result<BackendRef, BackendError> {
        self.call(CREATE, key, version, false, self.inner.create_version(key, version)).await
    }

    async fn create_root_key(&self, label: &str) -> Result<BackendRef, BackendError> {
        self.call(CREATE, label, 0, false, self.inner.create_root_key(label)).await
    }

    async fn attach(&self, key: &str, version: u32, backend_key_id: &str) -> Result<BackendRef, BackendError> {
        self.call(ATTACH, key, version, false, self.inner.attach(key, version, backend_key_id)).await
    }

    fn backend_key_id(&self, reference: &BackendRef) -> String {
        self.inner.backend_key_id(reference)
    }

    async fn wrap(
        &self,
        version: VersionRef<'_>,
        plaintext: &[u8],
        aad: Aad<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.call(WRAP, version.key, version.version, false, self.inner.wrap(version, plaintext, aad, out)).await
    }

    /// One guarded call for the whole run: admitted, timed and counted once
    /// (a failure of any item that shows the backend down counts it failed).
    async fn wrap_many(
        &self,
        version: VersionRef<'_>,
        header: &[u8],
        items: &[WrapItem<'_>],
    ) -> Vec<Result<Vec<u8>, BackendError>> {
        let outcome = self
            .call(WRAP, version.key, version.version, false, async {
                let results = self.inner.wrap_many(version, header, items).await;
                // An item that found the backend down or its material
                // unusable makes the call's outcome.
                let down = results.iter().find_map(|r| match r {
                    Err(e @ (BackendError::Unavailable { .. } | BackendError::Material { .. })) => Some(e.clone()),
                    _ => None,
                });
                match down {
                    Some(err) => Err(err),
                    None => Ok(results),
                }
            })
            .await;
        outcome.unwrap_or_else(|err| items.iter().map(|_| Err(err.clone())).collect())
    }

    async fn unwrap(
        &self,
        version: VersionRef<'_>,
        payload: &[u8],
        aad: Aad<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        self.call(UNWRAP, version.key, version.version, false, self.inner.unwrap(version, payload, aad)).await
    }

    async fn export(&self, version: VersionRef<'_>) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        self.call(EXPORT, version.key, version.version, false, self.inner.export(version)).await
    }

    async fn import(&self, key: &str, version: u32, material: &[u8]) -> Result<BackendRef, BackendError> {
        self.call(IMPORT, key, version, false, self.inner.import(key, version, material)).await
    }

    async fn destroy_version(&self, version: VersionRef<'_>) -> Result<(), BackendError> {
        // Erasing material (a destroyed version, a lost race's leftover) is
        // always tried: an unrelated failure must not leave it behind.
        self.call(DESTROY, version.key, version.version, true, self.inner.destroy_version(version)).await
    }

    async fn health(&self) -> Result<(), BackendError> {
        // The health monitor always probes: it is how recovery is found.
        self.call(HEALTH, "", 0, true, self.inner.health()).await
    }
}
