//! The broker's state as metrics, read at scrape time: keys and their
//! versions (from the cache: only keys that exist), backends, the version
//! table, the audit log, the cache, running migrations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::MetricType;

use super::http::Readiness;
use super::metrics::{Encoder, Sources};
use crate::backend::health::HealthBoard;
use crate::core::keyring::{Count, DEFAULT_MAX_WRAPS, Keyring, now};
use crate::core::migration::Migrator;
use crate::security::audit::AuditLog;
use crate::store::VersionState;

/// What a scrape reads about one broker.
pub struct BrokerSources {
    /// The version table's cache.
    pub keyring: Arc<Keyring>,
    /// Backend health.
    pub board: Arc<HealthBoard>,
    /// Running migrations.
    pub migrator: Arc<Migrator>,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// Store reachability.
    pub readiness: Arc<Readiness>,
    /// Most keys given series.
    pub max_key_series: usize,
    /// The hard wrap limit per version (`limits.max_wraps_per_version`).
    pub hard_max_wraps: u64,
    /// Per job: keys handled at the last scrape, and since when.
    progress: Mutex<HashMap<String, (u32, i64)>>,
}

impl BrokerSources {
    /// Sources over the broker's parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        keyring: Arc<Keyring>,
        board: Arc<HealthBoard>,
        migrator: Arc<Migrator>,
        audit: Arc<AuditLog>,
        readiness: Arc<Readiness>,
        max_key_series: usize,
        hard_max_wraps: u64,
    ) -> Self {
        Self {
            keyring,
            board,
            migrator,
            audit,
            readiness,
            max_key_series,
            hard_max_wraps,
            progress: Mutex::new(HashMap::new()),
        }
    }
}

type Series<'a> = Vec<(Vec<(&'a str, String)>, f64)>;

impl Sources for BrokerSources {
    fn encode(&self, out: &mut Encoder<'_, '_>) -> Result<(), std::fmt::Error> {
        let gauge = MetricType::Gauge;
        let counter = MetricType::Counter;
        let one = |v: f64| vec![(Vec::new(), v)];
        let store_up = if self.readiness.not_ready().is_some() { 0.0 } else { 1.0 };
        out.family(
            "keybroker_ready",
            "1 when the key cache is loaded and the version table answers.",
            gauge,
            &one(store_up),
        )?;
        let backends: Series = self
            .keyring
            .backends()
            .iter()
            .map(|(name, _)| (vec![("backend", name.clone())], if self.board.healthy(name) { 1.0 } else { 0.0 }))
            .collect();
        out.family("keybroker_backend_up", "1 when the backend passed its last health check.", gauge, &backends)?;
        let (hits, misses) = self.keyring.cache_counts();
        out.family("keybroker_cache_hits", "Key lookups answered from the cache.", counter, &one(hits as f64))?;
        out.family(
            "keybroker_cache_misses",
            "Key lookups that went to the version table.",
            counter,
            &one(misses as f64),
        )?;
        out.family(
            "keybroker_audit_write_failures",
            "Audit events that could not be written.",
            counter,
            &one(self.audit.failures() as f64),
        )?;
        let (events, writes) = self.audit.written();
        out.family("keybroker_audit_events", "Audit events written.", counter, &one(events as f64))?;
        out.family(
            "keybroker_audit_writes",
            "Writes to the audit sink; each carries the events of the calls that were ready together.",
            counter,
            &one(writes as f64),
        )?;
        out.family(
            "keybroker_audit_up",
            "1 when the last audit write succeeded (or the audit log is off).",
            gauge,
            &one(if self.audit.healthy() { 1.0 } else { 0.0 }),
        )?;

        let (keys, total) = self.keyring.cached(self.max_key_series);
        out.family("keybroker_keys", "Keys of the version table in this broker's cache.", gauge, &one(total as f64))?;
        out.family(
            "keybroker_key_series_dropped",
            "Cached keys beyond metrics.max_key_series, given no per-key series.",
            gauge,
            &one((total - keys.len()) as f64),
        )?;
        let now = now();
        let (mut current, mut age, mut period, mut made, mut limit) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut wraps, mut unwraps) = (vec![], vec![]);
        for key in &keys {
            let r = &key.record;
            let name = || vec![("key", r.name.clone())];
            current.push((name(), f64::from(r.current_version)));
            if let Ok(v) = key.current() {
                age.push((name(), (now - v.created_at).max(0) as f64));
                let count = key.total(v.version, Count::Wraps) + key.total(v.version, Count::RewrapsIn);
                made.push((name(), count as f64));
            }
            if r.rotation_period_secs > 0 {
                period.push((name(), r.rotation_period_secs as f64));
            }
            let rotate_at = if r.max_wraps_per_version > 0 { r.max_wraps_per_version } else { DEFAULT_MAX_WRAPS };
            limit.push((name(), rotate_at.min(self.hard_max_wraps) as f64));
            for v in r.versions.iter().filter(|v| v.state != VersionState::Destroyed) {
                let labels = || vec![("key", r.name.clone()), ("version", v.version.to_string())];
                wraps.push((labels(), key.total(v.version, Count::Wraps) as f64));
                unwraps.push((labels(), key.unwrap_count(v.version) as f64));
            }
        }
        out.family("keybroker_key_current_version", "The version new wraps use, per key.", gauge, &current)?;
        out.family("keybroker_key_current_version_age_seconds", "Age of each key's current version.", gauge, &age)?;
        out.family(
            "keybroker_key_rotation_period_seconds",
            "Each key's rotation period, for keys that have one.",
            gauge,
            &period,
        )?;
        out.family(
            "keybroker_key_current_version_wraps",
            "Wraps (and rewraps into it) the current version has made, summed over the fleet.",
            gauge,
            &made,
        )?;
        out.family(
            "keybroker_key_wrap_limit",
            "Wraps after which a key's version rotates (its policy, by default 2^30, at most limits.max_wraps_per_version).",
            gauge,
            &limit,
        )?;
        out.family("keybroker_key_wraps", "Wraps per key version, summed over the fleet.", counter, &wraps)?;
        out.family("keybroker_key_unwraps", "Unwraps per key version, summed over the fleet.", counter, &unwraps)?;

        let jobs = self.migrator.running();
        let mut seen = self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.retain(|id, _| jobs.iter().any(|j| &j.job_id == id));
        let (mut states, mut moved) = (vec![], vec![]);
        for job in &jobs {
            for (state, n) in [
                ("total", job.keys_total),
                ("done", job.keys_done),
                ("skipped", job.keys_skipped),
                ("failed", job.keys_failed),
            ] {
                states.push((vec![("job_id", job.job_id.clone()), ("state", state.to_owned())], f64::from(n)));
            }
            let handled = job.keys_done + job.keys_skipped + job.keys_failed;
            let entry = seen.entry(job.job_id.clone()).or_insert((handled, now));
            if entry.0 != handled {
                *entry = (handled, now);
            }
            moved.push((vec![("job_id", job.job_id.clone())], entry.1 as f64));
        }
        out.family("keybroker_migration_keys", "Keys of each running migration job, by state.", gauge, &states)?;
        out.family(
            "keybroker_migration_last_progress_timestamp_seconds",
            "When each running migration job last handled a key (Unix seconds).",
            gauge,
            &moved,
        )?;
        out.family(
            "keybroker_migrations_running",
            "Migration jobs this broker runs now.",
            gauge,
            &one(jobs.len() as f64),
        )
    }
}
