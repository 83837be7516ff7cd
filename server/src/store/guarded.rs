//! The version table behind a circuit breaker ([`crate::breaker`]): once a
//! call finds the database unreachable, calls that need it fail at once
//! with `UNAVAILABLE` naming the store, instead of each waiting for a
//! connection; one call per second goes through as a probe (the change
//! follower makes one every poll), so the broker notices by itself when
//! the database is back. Wraps and unwraps of cached keys never get here.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    DueForRotation, JobItem, JobPhase, JobRecord, KeyRecord, KeyReplacement, KeyStore, StoreError, UsageRecord,
    WrapScan,
};
use crate::breaker::Breaker;

/// A store behind a circuit breaker, named for the messages.
pub struct GuardedStore {
    inner: Arc<dyn KeyStore>,
    name: String,
    breaker: Breaker,
}

impl GuardedStore {
    /// Guards `inner`, called `name` in messages (never with a password).
    pub fn new(inner: Arc<dyn KeyStore>, name: impl Into<String>) -> Self {
        Self { inner, name: name.into(), breaker: Breaker::default() }
    }

    /// Whether the database is known to be down.
    pub fn is_down(&self) -> bool {
        self.breaker.is_down()
    }

    fn admit(&self) -> Result<(), StoreError> {
        self.breaker.admit().map_err(|why| StoreError::Unavailable(format!("{} is {why}", self.name)))
    }

    /// One call through the breaker, in a span.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        use tracing::Instrument;
        self.admit()?;
        let span =
            crate::traced_span!("store", otel.name = format!("store.{op}"), otel.kind = "client", db.operation = op);
        self.observe(call.instrument(span).await)
    }

    fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Err(StoreError::Unavailable(reason)) => {
                if self.breaker.failed(reason) {
                    tracing::warn!(store = %self.name, %reason, "version table unreachable; cached keys keep serving");
                }
            }
            _ => {
                if self.breaker.succeeded() {
                    tracing::info!(store = %self.name, "version table reachable again");
                }
            }
        }
        result
    }
}

#[async_trait]
impl KeyStore for GuardedStore {
    fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.inner.change_signal()
    }

    async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        self.call("list_page", self.inner.list_page(after, limit)).await
    }

    async fn get(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.call("get", self.inner.get(name)).await
    }

    async fn create(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.call("create", self.inner.create(key)).await
    }

    async fn update(&self, key: &KeyRecord) -> Result<KeyRecord, StoreError> {
        self.call("update", self.inner.update(key)).await
    }

    async fn change_seq(&self) -> Result<u64, StoreError> {
        self.call("change_seq", self.inner.change_seq()).await
    }

    async fn changed_since(&self, since: u64) -> Result<(u64, Vec<String>), StoreError> {
        self.call("changed_since", self.inner.changed_since(since)).await
    }

    async fn due_for_rotation(
        &self,
        now: i64,
        default_max_wraps: u64,
        scan: &WrapScan,
    ) -> Result<DueForRotation, StoreError> {
        self.call("due_for_rotation", self.inner.due_for_rotation(now, default_max_wraps, scan)).await
    }

    async fn replace_keys(&self, writes: &[KeyReplacement]) -> Result<(), StoreError> {
        self.call("replace_keys", self.inner.replace_keys(writes)).await
    }

    async fn record_usage(&self, batch: &str, usage: &[UsageRecord]) -> Result<(), StoreError> {
        self.call("record_usage", self.inner.record_usage(batch, usage)).await
    }

    async fn create_job(&self, job: &JobRecord, keys: &[String]) -> Result<(), StoreError> {
        self.call("create_job", self.inner.create_job(job, keys)).await
    }

    async fn get_job(&self, id: &str) -> Result<Option<(JobRecord, Vec<JobItem>)>, StoreError> {
        self.call("get_job", self.inner.get_job(id)).await
    }

    async fn set_job_phase(&self, id: &str, phase: JobPhase, error: &str) -> Result<(), StoreError> {
        self.call("set_job_phase", self.inner.set_job_phase(id, phase, error)).await
    }

    async fn set_job_item(&self, id: &str, item: &JobItem) -> Result<(), StoreError> {
        self.call("set_job_item", self.inner.set_job_item(id, item)).await
    }

    async fn lease_job(&self, id: &str, owner: &str, now_ms: i64, ttl_ms: i64) -> Result<bool, StoreError> {
        self.call("lease_job", self.inner.lease_job(id, owner, now_ms, ttl_ms)).await
    }

    async fn unfinished_jobs(&self) -> Result<Vec<String>, StoreError> {
        self.call("unfinished_jobs", self.inner.unfinished_jobs()).await
    }
}
