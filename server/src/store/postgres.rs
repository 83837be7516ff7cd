//! The PostgreSQL version table, for a fleet of brokers sharing one table.
//! Schema in `migrations/postgres/`. Every write of a key takes the next
//! number of one change counter and notifies channel
//! [`CHANGE_CHANNEL`] at commit, so the other brokers reload it at once
//! (LISTEN), and within their poll interval if a notification is lost.
//!
//! The connection URL is a secret (it may carry the password): it is kept
//! redacted in every Debug, log line and error ([`DatabaseUrl`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::Notify;

use super::rows::{item_from_row, job_from_row, key_from_row, keys_from_rows, version_from_row};
use super::{
    DueForRotation, JobItem, JobPhase, JobRecord, KeyRecord, KeyReplacement, KeyStore, StoreError,
    USAGE_ROWS_PER_STATEMENT, UsageRecord, VersionRecord, WrapScan, merge_usage,
};

/// The channel every write notifies, with the new change number.
pub const CHANGE_CHANNEL: &str = "keybroker_changes";

/// Columns of `keys`, as a macro so queries stay string literals.
macro_rules! key_columns {
    () => {
        "name, backend, current_version, min_decryption_version, deletion_allowed, labels, \
         rotation_period_secs, max_wraps_per_version, created_at, updated_at, revision, mode"
    };
}

/// Columns of `versions_joined!` read into a [`VersionRecord`] (but `version`).
macro_rules! version_columns {
    () => {
        "state, backend, backend_ref, mode, unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count, \
         rewrap_out_count, last_wrap_at, created_at, updated_at"
    };
}

/// The versions with their usage counts (every version has one row of
/// counts, created and removed with it).
macro_rules! versions_joined {
    () => {
        "key_versions JOIN key_usage USING (key_name, version)"
    };
}

/// A PostgreSQL connection URL. Its Debug and Display show it with the
/// password replaced by `***`; [`DatabaseUrl::expose`] gives the real one
/// to the driver only.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the driver.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The password, if the URL has one.
    fn password(&self) -> Option<&str> {
        let rest = self.0.split_once("://")?.1;
        let userinfo = rest.split('/').next()?.rsplit_once('@')?.0;
        userinfo.split_once(':').map(|(_, p)| p).filter(|p| !p.is_empty())
    }

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self.password() {
            Some(p) => self.0.replacen(&format!(":{p}@"), ":***@", 1),
            None => self.0.clone(),
        }
    }

    /// `text` with every occurrence of the password replaced by `***` (a
    /// driver error may quote the URL).
    pub fn scrub(&self, text: &str) -> String {
        match self.password() {
            Some(p) => text.replace(p, "***"),
            None => text.to_owned(),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({:?})", self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A version table in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    changed: Arc<Notify>,
}

fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {err}"))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// Connects a pool of at most `pool_size` connections to `url`, applies
    /// the schema migrations, and starts listening for other brokers'
    /// changes. Every call waits at most `timeout` for a connection, so a
    /// database that is down fails calls quickly with `Unavailable`.
    pub async fn open(url: &DatabaseUrl, pool_size: u32, timeout: Duration) -> Result<Self, StoreError> {
        let fail = |what: &str, e: sqlx::Error| {
            StoreError::Unavailable(format!("PostgreSQL at {url}: {what}: {}", url.scrub(&e.to_string())))
        };
        let options = PgConnectOptions::from_str(url.expose()).map_err(|e| fail("invalid URL", e))?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(|e| fail("connecting", e))?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await.map_err(|e| fail("migrating", e.into()))?;
        let changed = Arc::new(Notify::new());
        spawn_listener(pool.clone(), changed.clone());
        Ok(Self { pool, changed })
    }

    async fn versions_of(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT version, ",
            version_columns!(),
            " FROM ",
            versions_joined!(),
            " WHERE key_name = $1 ORDER BY version"
        ))
        .bind(name)
        .fetch_all(&mut **tx)
        .await
        .map_err(unavailable)?;
        rows.iter().map(|row| version_from_row(name, row)).collect()
    }

    /// Marks `name` as written by this transaction: it takes the next
    /// change number (the counter row stays locked until commit, so numbers
    /// are in commit order).
    async fn touch(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<(), StoreError> {
        let seq: i64 = sqlx::query_scalar("UPDATE key_change_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut **tx)
            .await
            .map_err(unavailable)?;
        // With the time its current version is due by age (see migration
        // `rotate_after`): every write of a key ends here.
        sqlx::query(
            "UPDATE keys SET change_seq = $1, rotate_after = CASE WHEN rotation_period_secs > 0 THEN rotation_period_secs + COALESCE((SELECT v.created_at \
             FROM key_versions v WHERE v.key_name = keys.name AND v.version = keys.current_version), 0) ELSE 0 END \
             WHERE name = $2",
        )
            .bind(seq)
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
        // Delivered to every listener when (and only if) the write commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGE_CHANNEL)
            .bind(seq.to_string())
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_key(tx: &mut Transaction<'_, Postgres>, key: &KeyRecord) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&key.labels).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        sqlx::query(concat!(
            "INSERT INTO keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&key.name)
        .bind(&key.backend)
        .bind(i64::from(key.current_version))
        .bind(i64::from(key.min_decryption_version))
        .bind(key.deletion_allowed)
        .bind(labels)
        .bind(to_i64(key.rotation_period_secs))
        .bind(to_i64(key.max_wraps_per_version))
        .bind(key.created_at)
        .bind(key.updated_at)
        .bind(to_i64(key.revision))
        .bind(key.mode.as_str())
        .execute(&mut **tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists(key.name.clone()),
            _ => unavailable(e),
        })?;
        for v in &key.versions {
            Self::insert_version(tx, &key.name, v).await?;
        }
        Self::touch(tx, &key.name).await
    }

    async fn insert_version(
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
        v: &VersionRecord,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO key_versions (key_name, version, state, backend, backend_ref, mode, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(name)
        .bind(i64::from(v.version))
        .bind(v.state.as_str())
        .bind(&v.backend)
        .bind(&v.backend_ref.0)
        .bind(v.mode.as_str())
        .bind(v.created_at)
        .bind(v.updated_at)
        .execute(&mut **tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(name.to_owned()),
            _ => unavailable(e),
        })?;
        sqlx::query(
            "INSERT INTO key_usage (key_name, version, unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count, \
             rewrap_out_count, last_wrap_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(name)
        .bind(i64::from(v.version))
        .bind(to_i64(v.unwrap_count))
        .bind(v.last_unwrap_at)
        .bind(to_i64(v.wrap_count))
        .bind(to_i64(v.rewrap_in_count))
        .bind(to_i64(v.rewrap_out_count))
        .bind(v.last_wrap_at)
        .execute(&mut **tx)
        .await
        // Its version was just inserted; the row of counts goes with it.
        .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let keys = sqlx::query(concat!("SELECT ", key_columns!(), " FROM keys WHERE name > $1 ORDER BY name LIMIT $2"))
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let Some(last) = keys.last().map(|row| row.try_get::<String, _>("name")).transpose().map_err(unavailable)?
        else {
            return Ok(Vec::new());
        };
        let versions = sqlx::query(concat!(
            "SELECT key_name, version, ",
            version_columns!(),
            " FROM ",
            versions_joined!(),
            " WHERE key_name > $1 AND key_name <= $2 ORDER BY key_name, version"
        ))
        .bind(after)
        .bind(&last)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        keys_from_rows(&keys, &versions)
    }

    async fn get(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let row = sqlx::query(concat!("SELECT ", key_columns!(), " FROM keys WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let versions = self.versions_of(&mut tx, name).await?;
        tx.commit().await.map_err(unavailable)?;
        key_from_row(&row, versions).map(Some)
    }

    async fn create(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        Self::insert_key(&mut tx, key).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn replace_keys(&self, writes: &[KeyReplacement]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for write in writes {
            let name = &write.record.name;
            let stored: Option<i64> = sqlx::query_scalar("SELECT revision FROM keys WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
            match (stored, write.expected_revision) {
                (None, None) => {}
                (Some(_), None) => return Err(StoreError::AlreadyExists(name.clone())),
                (None, Some(_)) => return Err(StoreError::NotFound(name.clone())),
                (Some(stored), Some(expected)) if stored != to_i64(expected) => {
                    return Err(StoreError::Conflict(name.clone()));
                }
                (Some(_), Some(_)) => {
                    sqlx::query("DELETE FROM keys WHERE name = $1")
                        .bind(name)
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                }
            }
            let mut record = write.record.clone();
            record.revision = write.expected_revision.map_or(1, |r| r + 1);
            Self::insert_key(&mut tx, &record).await?;
        }
        // Dropping the transaction on any error above rolls everything back.
        tx.commit().await.map_err(unavailable)
    }

    async fn update(&self, key: &KeyRecord) -> Result<KeyRecord, StoreError> {
        let labels = serde_json::to_string(&key.labels).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let updated = sqlx::query(
            "UPDATE keys SET backend = $1, mode = $2, current_version = $3, min_decryption_version = $4, deletion_allowed = $5, \
             labels = $6, rotation_period_secs = $7, max_wraps_per_version = $8, updated_at = $9, \
             revision = revision + 1 WHERE name = $10 AND revision = $11",
        )
        .bind(&key.backend)
        .bind(key.mode.as_str())
        .bind(i64::from(key.current_version))
        .bind(i64::from(key.min_decryption_version))
        .bind(key.deletion_allowed)
        .bind(labels)
        .bind(to_i64(key.rotation_period_secs))
        .bind(to_i64(key.max_wraps_per_version))
        .bind(key.updated_at)
        .bind(&key.name)
        .bind(to_i64(key.revision))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if updated.rows_affected() == 0 {
            let exists = sqlx::query("SELECT 1 FROM keys WHERE name = $1")
                .bind(&key.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?
                .is_some();
            return Err(if exists {
                StoreError::Conflict(key.name.clone())
            } else {
                StoreError::NotFound(key.name.clone())
            });
        }
        let stored = self.versions_of(&mut tx, &key.name).await?;
        for v in &key.versions {
            match stored.iter().find(|s| s.version == v.version) {
                Some(s)
                    if (&s.state, &s.backend, &s.backend_ref, s.mode)
                        == (&v.state, &v.backend, &v.backend_ref, v.mode) => {}
                Some(_) => {
                    sqlx::query(
                        "UPDATE key_versions SET state = $1, backend = $2, backend_ref = $3, mode = $4, updated_at = $5 \
                         WHERE key_name = $6 AND version = $7",
                    )
                    .bind(v.state.as_str())
                    .bind(&v.backend)
                    .bind(&v.backend_ref.0)
                    .bind(v.mode.as_str())
                    .bind(v.updated_at)
                    .bind(&key.name)
                    .bind(i64::from(v.version))
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                }
                None => Self::insert_version(&mut tx, &key.name, v).await?,
            }
        }
        Self::touch(&mut tx, &key.name).await?;
        tx.commit().await.map_err(unavailable)?;
        let mut stored = key.clone();
        stored.revision += 1;
        Ok(stored)
    }

    fn change_signal(&self) -> Option<Arc<Notify>> {
        Some(self.changed.clone())
    }

    async fn change_seq(&self) -> Result<u64, StoreError> {
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM key_change_seq WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    async fn due_for_rotation(
        &self,
        now: i64,
        default_max_wraps: u64,
        scan: &WrapScan,
    ) -> Result<DueForRotation, StoreError> {
        // The window: up to the key of its last row (from the primary key).
        let last: Option<String> = sqlx::query_scalar(
            "SELECT key_name FROM key_usage WHERE key_name > $1 ORDER BY key_name, version LIMIT 1 OFFSET $2",
        )
        .bind(&scan.after)
        .bind(i64::from(scan.rows.max(1)) - 1)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        // Due by age: from the index of `rotate_after`. Due by wraps: the
        // window's usage rows at or over the lowest bound, each checked
        // against its key's own bound.
        let upto = if last.is_some() { "AND u.key_name <= $4 " } else { "" };
        let sql = format!(
            "SELECT name, current_version FROM keys WHERE rotate_after > 0 AND rotate_after <= $1 \
             UNION \
             SELECT k.name, k.current_version FROM key_usage u \
             JOIN keys k ON k.name = u.key_name AND k.current_version = u.version \
             WHERE u.key_name > $3 {upto}\
             AND u.wrap_count >= LEAST($2, COALESCE((SELECT MIN(max_wraps_per_version) FROM keys \
             WHERE max_wraps_per_version > 0), $2)) \
             AND u.wrap_count >= CASE WHEN k.max_wraps_per_version > 0 AND k.max_wraps_per_version < $2 \
             THEN k.max_wraps_per_version ELSE $2 END \
             ORDER BY 1"
        );
        // Built from a fixed choice, never from input.
        let mut query =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(now).bind(to_i64(default_max_wraps)).bind(&scan.after);
        if let Some(last) = &last {
            query = query.bind(last);
        }
        let rows: Vec<(String, i64)> = query.fetch_all(&self.pool).await.map_err(unavailable)?;
        Ok(DueForRotation::from_rows(rows, last))
    }

    async fn changed_since(&self, since: u64) -> Result<(u64, Vec<String>), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM key_change_seq WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM keys WHERE change_seq > $1 ORDER BY change_seq")
            .bind(to_i64(since))
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok((u64::try_from(seq).unwrap_or(0), names))
    }

    async fn record_usage(&self, batch: &str, usage: &[UsageRecord]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let now = now_secs();
        let fresh = sqlx::query("INSERT INTO usage_batches (batch_id, applied_at) VALUES ($1, $2)")
            .bind(batch)
            .bind(now)
            .execute(&mut *tx)
            .await;
        match fresh {
            Ok(_) => {}
            // Applied before: its answer was lost, this is the retry.
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => return Ok(()),
            Err(e) => return Err(unavailable(e)),
        }
        sqlx::query("DELETE FROM usage_batches WHERE applied_at < $1")
            .bind(now - 24 * 3600)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // One statement over arrays: a flush after a second of calls over
        // many keys has a row per key.
        for chunk in merge_usage(usage).chunks(USAGE_ROWS_PER_STATEMENT) {
            let column = |f: fn(&UsageRecord) -> i64| chunk.iter().map(|u| f(u)).collect::<Vec<i64>>();
            sqlx::query(
                "UPDATE key_usage AS kv SET unwrap_count = kv.unwrap_count + u.unwraps, \
                 last_unwrap_at = GREATEST(kv.last_unwrap_at, u.last_unwrap_at), \
                 wrap_count = kv.wrap_count + u.wraps, rewrap_in_count = kv.rewrap_in_count + u.rewraps_in, \
                 rewrap_out_count = kv.rewrap_out_count + u.rewraps_out, \
                 last_wrap_at = GREATEST(kv.last_wrap_at, u.last_wrap_at) \
                 FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], \
                 $7::bigint[], $8::bigint[]) \
                 AS u(key_name, version, unwraps, last_unwrap_at, wraps, rewraps_in, rewraps_out, last_wrap_at) \
                 WHERE kv.key_name = u.key_name AND kv.version = u.version",
            )
            .bind(chunk.iter().map(|u| u.key.clone()).collect::<Vec<String>>())
            .bind(column(|u| i64::from(u.version)))
            .bind(column(|u| to_i64(u.unwraps)))
            .bind(column(|u| u.last_unwrap_at))
            .bind(column(|u| to_i64(u.wraps)))
            .bind(column(|u| to_i64(u.rewraps_in)))
            .bind(column(|u| to_i64(u.rewraps_out)))
            .bind(column(|u| u.last_wrap_at))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn create_job(&self, job: &JobRecord, keys: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO migration_jobs (job_id, pattern, from_backend, to_backend, conflict, dry_run, \
             max_keys_per_second, phase, error, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&job.id)
        .bind(&job.pattern)
        .bind(&job.from_backend)
        .bind(&job.to_backend)
        .bind(job.conflict.as_str())
        .bind(job.dry_run)
        .bind(i64::from(job.max_keys_per_second))
        .bind(job.phase.as_str())
        .bind(&job.error)
        .bind(job.created_at)
        .bind(job.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists(job.id.clone()),
            _ => unavailable(e),
        })?;
        for key in keys {
            sqlx::query(
                "INSERT INTO migration_items (job_id, key_name, status, updated_at) VALUES ($1, $2, 'pending', $3)",
            )
            .bind(&job.id)
            .bind(key)
            .bind(job.created_at)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn get_job(&self, id: &str) -> Result<Option<(JobRecord, Vec<JobItem>)>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let Some(row) = sqlx::query(
            "SELECT job_id, pattern, from_backend, to_backend, conflict, dry_run, max_keys_per_second, phase, error, \
             created_at, updated_at FROM migration_jobs WHERE job_id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let items = sqlx::query(
            "SELECT key_name, status, action, error_code, error FROM migration_items WHERE job_id = $1 ORDER BY key_name",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let job = job_from_row(id, &row)?;
        let items = items.iter().map(|r| item_from_row(id, r)).collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some((job, items)))
    }

    async fn set_job_phase(&self, id: &str, phase: JobPhase, error: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE migration_jobs SET phase = $1, error = $2, updated_at = $3 WHERE job_id = $4")
            .bind(phase.as_str())
            .bind(error)
            .bind(now_secs())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn set_job_item(&self, id: &str, item: &JobItem) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE migration_items SET status = $1, action = $2, error_code = $3, error = $4, updated_at = $5 \
             WHERE job_id = $6 AND key_name = $7",
        )
        .bind(item.status.as_str())
        .bind(&item.action)
        .bind(i64::from(item.error_code))
        .bind(&item.error)
        .bind(now_secs())
        .bind(id)
        .bind(&item.key)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn lease_job(&self, id: &str, owner: &str, now_ms: i64, ttl_ms: i64) -> Result<bool, StoreError> {
        let leased = sqlx::query(
            "UPDATE migration_jobs SET owner = $1, lease_until_ms = $2 \
             WHERE job_id = $3 AND phase NOT IN ('done', 'failed') AND (owner = $4 OR lease_until_ms < $5)",
        )
        .bind(owner)
        .bind(now_ms.saturating_add(ttl_ms))
        .bind(id)
        .bind(owner)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(leased.rows_affected() == 1)
    }

    async fn unfinished_jobs(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT job_id FROM migration_jobs WHERE phase NOT IN ('done', 'failed') ORDER BY created_at, job_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(|r| r.try_get("job_id").map_err(unavailable)).collect()
    }
}

/// Listens on [`CHANGE_CHANNEL`] and raises `changed` for every
/// notification; reconnects by itself after the database comes back (the
/// broker's poll covers the gap).
fn spawn_listener(pool: PgPool, changed: Arc<Notify>) {
    tokio::spawn(async move {
        loop {
            let listening = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(CHANGE_CHANNEL).await?;
                // Anything missed while not listening is found by a sync.
                changed.notify_one();
                loop {
                    listener.recv().await?;
                    changed.notify_one();
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            if let Err(err) = listening.await {
                tracing::debug!(%err, "PostgreSQL change listener stopped; reconnecting");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
