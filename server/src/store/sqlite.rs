//! The SQLite version table: one file, WAL journal, full sync on commit so a
//! rotation that returned survives a crash. Schema in `migrations/sqlite/`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};

use super::rows::{item_from_row, job_from_row, key_from_row, keys_from_rows, version_from_row};
use super::{
    DueForRotation, JobItem, JobPhase, JobRecord, KeyRecord, KeyReplacement, KeyStore, StoreError,
    USAGE_ROWS_PER_STATEMENT, UsageRecord, VersionRecord, VersionState, WrapScan, merge_usage,
};

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

/// A version table in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and applies the
    /// schema migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        // The table holds sealed KEKs: keep it (and the -wal / -shm files
        // SQLite creates with the same mode) private to the broker's user.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Unavailable(format!("creating SQLite file {}: {e}", path.display())))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(unavailable)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Destroyed versions have their sealed material overwritten on disk,
            // not just unlinked from the b-tree.
            .pragma("secure_delete", "on")
            // 16 MiB of pages per connection (the default is 2 MiB): a usage
            // flush over a large table updates rows all over it.
            .pragma("cache_size", "-16384")
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("opening SQLite file {}: {e}", path.display())))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrating SQLite file {}: {e}", path.display())))?;
        Ok(Self { pool })
    }

    /// A transaction that writes: it takes the write lock at BEGIN, waiting
    /// (busy_timeout) for another writer. A deferred one that read first
    /// would fail at once with SQLITE_BUSY when another connection committed
    /// meanwhile (WAL cannot upgrade a stale snapshot), which a caller would
    /// see as the store being down.
    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)
    }

    /// Copies the WAL into the database and truncates it, so the sealed
    /// material of a destroyed version does not live on in `-wal` (the
    /// database file itself overwrites freed content: `secure_delete`).
    async fn checkpoint_wal(&self, key: &str) {
        let result: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&self.pool).await;
        match result {
            Ok((0, _, _)) => {}
            Ok(_) => {
                tracing::warn!(key, "a version was destroyed, but the SQLite WAL could not be truncated yet (busy)")
            }
            Err(err) => tracing::warn!(key, %err, "a version was destroyed, but the SQLite WAL checkpoint failed"),
        }
    }

    async fn versions_of(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        name: &str,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT version, ",
            version_columns!(),
            " FROM ",
            versions_joined!(),
            " WHERE key_name = ? ORDER BY version"
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
    async fn touch(tx: &mut Transaction<'_, Sqlite>, name: &str) -> Result<(), StoreError> {
        let seq: i64 = sqlx::query_scalar("UPDATE key_change_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq")
            .fetch_one(&mut **tx)
            .await
            .map_err(unavailable)?;
        // With the time its current version is due by age (see migration
        // `rotate_after`): every write of a key ends here.
        sqlx::query(
            "UPDATE keys SET change_seq = ?, rotate_after = CASE WHEN rotation_period_secs > 0 THEN rotation_period_secs + COALESCE((SELECT v.created_at \
             FROM key_versions v WHERE v.key_name = keys.name AND v.version = keys.current_version), 0) ELSE 0 END \
             WHERE name = ?",
        )
            .bind(seq)
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_key(tx: &mut Transaction<'_, Sqlite>, key: &KeyRecord) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&key.labels).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        sqlx::query(concat!("INSERT INTO keys (", key_columns!(), ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"))
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

    async fn insert_version(tx: &mut Transaction<'_, Sqlite>, name: &str, v: &VersionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO key_versions (key_name, version, state, backend, backend_ref, mode, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
             rewrap_out_count, last_wrap_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
impl KeyStore for SqliteStore {
    async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let keys = sqlx::query(concat!("SELECT ", key_columns!(), " FROM keys WHERE name > ? ORDER BY name LIMIT ?"))
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
            " WHERE key_name > ? AND key_name <= ? ORDER BY key_name, version"
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
        let row = sqlx::query(concat!("SELECT ", key_columns!(), " FROM keys WHERE name = ?"))
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
        let mut tx = self.write_tx().await?;
        Self::insert_key(&mut tx, key).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn replace_keys(&self, writes: &[KeyReplacement]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        for write in writes {
            let name = &write.record.name;
            let stored: Option<i64> = sqlx::query_scalar("SELECT revision FROM keys WHERE name = ?")
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
                    sqlx::query("DELETE FROM keys WHERE name = ?")
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
        let mut tx = self.write_tx().await?;
        let updated = sqlx::query(
            "UPDATE keys SET backend = ?, mode = ?, current_version = ?, min_decryption_version = ?, deletion_allowed = ?, \
             labels = ?, rotation_period_secs = ?, max_wraps_per_version = ?, updated_at = ?, \
             revision = revision + 1 WHERE name = ? AND revision = ?",
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
            let exists = sqlx::query("SELECT 1 FROM keys WHERE name = ?")
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
                        "UPDATE key_versions SET state = ?, backend = ?, backend_ref = ?, mode = ?, updated_at = ? \
                         WHERE key_name = ? AND version = ?",
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
        let destroyed = key.versions.iter().any(|v| {
            v.state == VersionState::Destroyed
                && stored.iter().any(|s| s.version == v.version && s.state != VersionState::Destroyed)
        });
        if destroyed {
            self.checkpoint_wal(&key.name).await;
        }
        let mut stored = key.clone();
        stored.revision += 1;
        Ok(stored)
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
            "SELECT key_name FROM key_usage WHERE key_name > ? ORDER BY key_name, version LIMIT 1 OFFSET ?",
        )
        .bind(&scan.after)
        .bind(i64::from(scan.rows.max(1)) - 1)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        // Due by age: from the index of `rotate_after`. Due by wraps: one
        // pass over the window of the narrow usage table for counts at or
        // over the lowest bound, each looked up in `keys` (CROSS JOIN keeps
        // that order: the planner would otherwise look up every key's
        // counts, 8x slower at a million keys).
        let upto = if last.is_some() { "AND u.key_name <= ?4 " } else { "" };
        let sql = format!(
            "SELECT name, current_version FROM keys WHERE rotate_after > 0 AND rotate_after <= ?1 \
             UNION \
             SELECT k.name, k.current_version FROM key_usage u \
             CROSS JOIN keys k ON k.name = u.key_name AND k.current_version = u.version \
             WHERE u.key_name > ?3 {upto}\
             AND u.wrap_count >= MIN(?2, COALESCE((SELECT MIN(max_wraps_per_version) FROM keys \
             WHERE max_wraps_per_version > 0), ?2)) \
             AND u.wrap_count >= CASE WHEN k.max_wraps_per_version > 0 AND k.max_wraps_per_version < ?2 \
             THEN k.max_wraps_per_version ELSE ?2 END \
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
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM keys WHERE change_seq > ? ORDER BY change_seq")
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
        let mut tx = self.write_tx().await?;
        let now = now_secs();
        let fresh = sqlx::query("INSERT INTO usage_batches (batch_id, applied_at) VALUES (?, ?)")
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
        sqlx::query("DELETE FROM usage_batches WHERE applied_at < ?")
            .bind(now - 24 * 3600)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // A few statements of many rows each (bound VALUES rows; a full
        // chunk's statement is prepared once per connection): a flush after
        // a second of calls over many keys has a row per key.
        for chunk in merge_usage(usage).chunks(USAGE_ROWS_PER_STATEMENT) {
            // Built from a count, never from input.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(usage_statement(chunk.len())));
            for u in chunk {
                query = query
                    .bind(&u.key)
                    .bind(u.version)
                    .bind(to_i64(u.unwraps))
                    .bind(u.last_unwrap_at)
                    .bind(to_i64(u.wraps))
                    .bind(to_i64(u.rewraps_in))
                    .bind(to_i64(u.rewraps_out))
                    .bind(u.last_wrap_at);
            }
            query.execute(&mut *tx).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn create_job(&self, job: &JobRecord, keys: &[String]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO migration_jobs (job_id, pattern, from_backend, to_backend, conflict, dry_run, \
             max_keys_per_second, phase, error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                "INSERT INTO migration_items (job_id, key_name, status, updated_at) VALUES (?, ?, 'pending', ?)",
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
             created_at, updated_at FROM migration_jobs WHERE job_id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let items = sqlx::query(
            "SELECT key_name, status, action, error_code, error FROM migration_items WHERE job_id = ? ORDER BY key_name",
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
        sqlx::query("UPDATE migration_jobs SET phase = ?, error = ?, updated_at = ? WHERE job_id = ?")
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
            "UPDATE migration_items SET status = ?, action = ?, error_code = ?, error = ?, updated_at = ? \
             WHERE job_id = ? AND key_name = ?",
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
            "UPDATE migration_jobs SET owner = ?, lease_until_ms = ? \
             WHERE job_id = ? AND phase NOT IN ('done', 'failed') AND (owner = ? OR lease_until_ms < ?)",
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

/// The UPDATE of [`KeyStore::record_usage`] for `rows` rows of eight bound
/// values each (key, version, unwraps, last unwrap, wraps, rewraps in and
/// out, last wrap).
fn usage_statement(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "WITH u (key_name, version, unwraps, last_unwrap_at, wraps, rewraps_in, rewraps_out, last_wrap_at) \
         AS (VALUES {values}) \
         UPDATE key_usage SET unwrap_count = unwrap_count + u.unwraps, \
         last_unwrap_at = MAX(key_usage.last_unwrap_at, u.last_unwrap_at), \
         wrap_count = wrap_count + u.wraps, rewrap_in_count = rewrap_in_count + u.rewraps_in, \
         rewrap_out_count = rewrap_out_count + u.rewraps_out, \
         last_wrap_at = MAX(key_usage.last_wrap_at, u.last_wrap_at) \
         FROM u WHERE key_usage.key_name = u.key_name AND key_usage.version = u.version"
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::Backends;
    use crate::backend::local::LocalBackend;
    use crate::backend::root_key::RootKey;
    use crate::core::keyring::{Keyring, NewKey};
    use crate::store::{BackendRef, KeyMode};

    /// The sealed material of a destroyed version is in neither the
    /// database file nor its WAL afterwards.
    #[tokio::test]
    async fn destroying_a_version_leaves_its_material_in_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.sqlite");
        let store = SqliteStore::open(&path).await.unwrap();
        let sealed = b"SEALED-KEK-0123456789-abcdefghij-0123456789-ABCDEFGHIJ-xyz".to_vec();
        let version = |v: u32, state, reference: Vec<u8>| {
            VersionRecord::unused(v, state, "local".into(), BackendRef(reference), KeyMode::Direct, 1)
        };
        let mut key = KeyRecord {
            name: "k".into(),
            backend: "local".into(),
            mode: KeyMode::Direct,
            current_version: 2,
            min_decryption_version: 1,
            deletion_allowed: true,
            labels: Default::default(),
            rotation_period_secs: 0,
            max_wraps_per_version: 0,
            created_at: 1,
            updated_at: 1,
            revision: 1,
            versions: vec![
                version(1, VersionState::DecryptOnly, sealed.clone()),
                version(2, VersionState::Active, vec![2; 61]),
            ],
        };
        store.create(&key).await.unwrap();
        let holds = |file: &std::path::Path| {
            std::fs::read(file).unwrap_or_default().windows(sealed.len()).any(|w| w == sealed.as_slice())
        };
        let wal = dir.path().join("kb.sqlite-wal");
        assert!(holds(&path) || holds(&wal), "the test's material was never written");
        key.versions[0] = version(1, VersionState::Destroyed, Vec::new());
        store.update(&key).await.unwrap();
        assert!(!holds(&wal), "the destroyed version's material is still in the WAL");
        assert!(!holds(&path), "the destroyed version's material is still in the database file");
    }

    /// A table written before usage counts had their own table keeps every
    /// count through the migration; flushes add to them afterwards, and a
    /// replaced key's counts stay one row per version.
    #[tokio::test]
    async fn usage_counts_move_to_their_own_table_with_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.sqlite");
        // The schema before the move: the migrations up to 0007.
        let before = dir.path().join("migrations");
        std::fs::create_dir(&before).unwrap();
        let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        let mut copied = 0;
        for entry in std::fs::read_dir(&all).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.as_str() < "0008" {
                std::fs::copy(entry.path(), before.join(&name)).unwrap();
                copied += 1;
            }
        }
        assert_eq!(copied, 7);
        let options = SqliteConnectOptions::new().filename(&path).create_if_missing(true).foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        sqlx::migrate::Migrator::new(before.as_path()).await.unwrap().run(&pool).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(crate::store::conformance::rows_before_the_move(|b| format!("x'{b:02x}'"))))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&path).await.unwrap();
        crate::store::conformance::usage_counts_carried_over_by_the_move(&store).await;
        let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('key_versions')")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        assert!(!columns.iter().any(|c| c.ends_with("_count")), "the old count columns are left: {columns:?}");
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_usage").fetch_one(&store.pool).await.unwrap();
        assert_eq!(rows, 2, "one row of counts per version");
    }

    #[tokio::test]
    async fn the_database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.sqlite");
        SqliteStore::open(&path).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    /// Two brokers on one table rotating the same key at once: every
    /// rotation that succeeded made exactly one new version, and versions
    /// stay 1..=current with no duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_rotating_at_once_never_create_the_same_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.sqlite");
        let root = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let mut backends = Backends::default();
            backends.insert(Arc::new(LocalBackend::new("local", RootKey::from_base64(root, "test").unwrap())));
            let store = Arc::new(SqliteStore::open(&path).await.unwrap());
            replicas.push(Arc::new(Keyring::new(store, backends, "local".into())));
        }
        replicas[0].create(NewKey { name: "k".into(), ..Default::default() }).await.unwrap();
        let mut tasks = Vec::new();
        for replica in &replicas {
            for _ in 0..10 {
                let replica = replica.clone();
                tasks.push(tokio::spawn(async move {
                    replica.rotate("k", None, None, None).await.map(|k| k.record.current_version)
                }));
            }
        }
        let mut won = Vec::new();
        for task in tasks {
            if let Ok(version) = task.await.unwrap() {
                won.push(version);
            }
        }
        won.sort_unstable();
        let before = won.len();
        won.dedup();
        assert_eq!(before, won.len(), "two rotations reported the same new version: {won:?}");
        assert!(won.len() >= 10, "only {} of 20 rotations succeeded", won.len());
        let record = SqliteStore::open(&path).await.unwrap().get("k").await.unwrap().unwrap();
        assert_eq!(record.current_version as usize, 1 + won.len());
        let versions: Vec<u32> = record.versions.iter().map(|v| v.version).collect();
        assert_eq!(versions, (1..=record.current_version).collect::<Vec<_>>());
        let active = record.versions.iter().filter(|v| v.state == VersionState::Active).count();
        assert_eq!(active, 1, "exactly one version is current");
    }
}
