//! Turning rows of either database into records: the one place that knows
//! how a key, a version and a migration job are stored, shared by the
//! SQLite and the PostgreSQL store (which differ only in their SQL).

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::{
    ConflictMode, ItemStatus, JobItem, JobPhase, JobRecord, KeyMode, KeyRecord, StoreError, VersionRecord, VersionState,
};
use crate::material::BackendRef;

/// Typed columns of a row, whatever the database.
pub(super) trait Columns {
    /// A TEXT column.
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    /// An INTEGER / BIGINT column.
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    /// A BLOB / BYTEA column.
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error>;
    /// A boolean (INTEGER 0/1 in SQLite, BOOLEAN in PostgreSQL).
    fn flag(&self, column: &str) -> Result<bool, sqlx::Error>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> Result<String, sqlx::Error> {
                self.try_get(column)
            }
            fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
                self.try_get(column)
            }
            fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error> {
                self.try_get(column)
            }
            fn flag(&self, column: &str) -> Result<bool, sqlx::Error> {
                self.try_get(column)
            }
        }
    };
}

columns_for!(SqliteRow);
columns_for!(PgRow);

/// Reads columns of one row, turning every failure into `Corrupt` naming
/// `what` (a key, or a migration job).
struct Reader<'a, R> {
    row: &'a R,
    what: &'a str,
}

impl<R: Columns> Reader<'_, R> {
    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt { key: self.what.to_owned(), reason }
    }

    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.row.text(column).map_err(|e| self.corrupt(e.to_string()))
    }

    fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.row.int(column).map_err(|e| self.corrupt(e.to_string()))
    }

    fn count(&self, column: &str) -> Result<u64, StoreError> {
        let v = self.int(column)?;
        u64::try_from(v).map_err(|_| self.corrupt(format!("{column} = {v}")))
    }

    fn number(&self, column: &str) -> Result<u32, StoreError> {
        let v = self.int(column)?;
        u32::try_from(v).map_err(|_| self.corrupt(format!("{column} = {v}")))
    }

    fn parsed<T>(&self, column: &str, parse: fn(&str) -> Option<T>) -> Result<T, StoreError> {
        let text = self.text(column)?;
        parse(&text).ok_or_else(|| self.corrupt(format!("{column} {text:?}")))
    }
}

/// A row of `key_versions` with its `key_usage` (columns `version` and `version_columns!`) of key `name`.
pub(super) fn version_from_row(name: &str, row: &impl Columns) -> Result<VersionRecord, StoreError> {
    let r = Reader { row, what: name };
    Ok(VersionRecord {
        version: r.number("version")?,
        state: r.parsed("state", VersionState::parse)?,
        backend: r.text("backend")?,
        backend_ref: BackendRef(row.bytes("backend_ref").map_err(|e| r.corrupt(e.to_string()))?),
        mode: r.parsed("mode", KeyMode::parse)?,
        unwrap_count: r.count("unwrap_count")?,
        last_unwrap_at: r.int("last_unwrap_at")?,
        wrap_count: r.count("wrap_count")?,
        rewrap_in_count: r.count("rewrap_in_count")?,
        rewrap_out_count: r.count("rewrap_out_count")?,
        last_wrap_at: r.int("last_wrap_at")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
    })
}

/// A row of `keys` (columns `key_columns!`) with its versions, checked to
/// be `1..=current_version`.
pub(super) fn key_from_row(row: &impl Columns, mut versions: Vec<VersionRecord>) -> Result<KeyRecord, StoreError> {
    // Grown by pushes (room for four): a cache of a million keys keeps it.
    versions.shrink_to_fit();
    let name = row.text("name").map_err(|e| StoreError::Corrupt { key: String::new(), reason: e.to_string() })?;
    let r = Reader { row, what: &name };
    let labels: BTreeMap<String, String> =
        serde_json::from_str(&r.text("labels")?).map_err(|e| r.corrupt(format!("labels: {e}")))?;
    let record = KeyRecord {
        backend: r.text("backend")?,
        mode: r.parsed("mode", KeyMode::parse)?,
        current_version: r.number("current_version")?,
        min_decryption_version: r.number("min_decryption_version")?,
        deletion_allowed: row.flag("deletion_allowed").map_err(|e| r.corrupt(e.to_string()))?,
        labels,
        rotation_period_secs: r.count("rotation_period_secs")?,
        max_wraps_per_version: r.count("max_wraps_per_version")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
        revision: r.count("revision")?,
        versions,
        name: name.clone(),
    };
    let dense = record.versions.iter().enumerate().all(|(i, v)| usize::try_from(v.version).ok() == Some(i + 1));
    if !dense || record.version(record.current_version).is_none() {
        return Err(r.corrupt("versions are not 1..=current_version".to_owned()));
    }
    Ok(record)
}

/// Rows of `keys` in name order and the rows of their versions (with
/// `key_name`, in key and version order) as records.
pub(super) fn keys_from_rows<R: Columns>(keys: &[R], versions: &[R]) -> Result<Vec<KeyRecord>, StoreError> {
    let mut by_key: BTreeMap<String, Vec<VersionRecord>> = BTreeMap::new();
    for row in versions {
        let name =
            row.text("key_name").map_err(|e| StoreError::Corrupt { key: String::new(), reason: e.to_string() })?;
        let record = version_from_row(&name, row)?;
        by_key.entry(name).or_default().push(record);
    }
    keys.iter()
        .map(|row| {
            let name =
                row.text("name").map_err(|e| StoreError::Corrupt { key: String::new(), reason: e.to_string() })?;
            key_from_row(row, by_key.remove(&name).unwrap_or_default())
        })
        .collect()
}

/// A row of `migration_jobs`.
pub(super) fn job_from_row(id: &str, row: &impl Columns) -> Result<JobRecord, StoreError> {
    let what = format!("migration job {id}");
    let r = Reader { row, what: &what };
    Ok(JobRecord {
        id: r.text("job_id")?,
        pattern: r.text("pattern")?,
        from_backend: r.text("from_backend")?,
        to_backend: r.text("to_backend")?,
        conflict: r.parsed("conflict", ConflictMode::parse)?,
        dry_run: row.flag("dry_run").map_err(|e| r.corrupt(e.to_string()))?,
        max_keys_per_second: r.number("max_keys_per_second")?,
        phase: r.parsed("phase", JobPhase::parse)?,
        error: r.text("error")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
    })
}

/// A row of `migration_items` of job `id`.
pub(super) fn item_from_row(id: &str, row: &impl Columns) -> Result<JobItem, StoreError> {
    let what = format!("migration job {id}");
    let r = Reader { row, what: &what };
    Ok(JobItem {
        key: r.text("key_name")?,
        status: r.parsed("status", ItemStatus::parse)?,
        action: r.text("action")?,
        error_code: i32::try_from(r.int("error_code")?).unwrap_or(0),
        error: r.text("error")?,
    })
}
