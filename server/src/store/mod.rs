//! The version table: keys, their versions and where each version lives.
//! Every store implements [`KeyStore`]; the service never sees SQL.

/// The one conformance suite every [`KeyStore`] passes (run by each
/// store's tests, here and against a real PostgreSQL server in `tests/`).
#[doc(hidden)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
pub mod conformance;
pub mod guarded;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::borrow::Cow;
use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::error::{ErrorCode, ServiceError};
pub use crate::material::{BackendRef, KeyMode};

/// Lifecycle state of a key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// The current version: wraps and unwraps.
    Active,
    /// An older version: unwraps only.
    DecryptOnly,
    /// Refuses to unwrap until enabled.
    Disabled,
    /// Material erased for good.
    Destroyed,
}

impl VersionState {
    /// The name stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Active => "active",
            VersionState::DecryptOnly => "decrypt_only",
            VersionState::Disabled => "disabled",
            VersionState::Destroyed => "destroyed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => VersionState::Active,
            "decrypt_only" => VersionState::DecryptOnly,
            "disabled" => VersionState::Disabled,
            "destroyed" => VersionState::Destroyed,
            _ => return None,
        })
    }
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Lifecycle state.
    pub state: VersionState,
    /// Name of the backend holding the material.
    pub backend: String,
    /// The backend's reference to the material (empty once destroyed).
    pub backend_ref: BackendRef,
    /// Direct or hierarchy.
    pub mode: KeyMode,
    /// Unwraps recorded by [`KeyStore::record_usage`]; `create`, `update`
    /// (for versions it adds) and `replace_keys` store the count they are
    /// given, which is 0 for a new version.
    pub unwrap_count: u64,
    /// Last recorded unwrap, Unix seconds (0 = never).
    pub last_unwrap_at: i64,
    /// DEKs wrapped under this version (Wrap, GenerateDataKey), all brokers.
    pub wrap_count: u64,
    /// DEKs rewrapped into this version from another one.
    pub rewrap_in_count: u64,
    /// DEKs rewrapped out of this version into another one.
    pub rewrap_out_count: u64,
    /// Last recorded wrap or rewrap into this version, Unix seconds.
    pub last_wrap_at: i64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last change, Unix seconds.
    pub updated_at: i64,
}

/// A key with all its versions, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Key name.
    pub name: String,
    /// Backend new versions are created in.
    pub backend: String,
    /// Mode of new versions.
    pub mode: KeyMode,
    /// Version new wraps use.
    pub current_version: u32,
    /// Versions below refuse to unwrap.
    pub min_decryption_version: u32,
    /// Whether versions may be destroyed.
    pub deletion_allowed: bool,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// Rotate when the current version is older than this (0 = never).
    pub rotation_period_secs: u64,
    /// Rotate after this many wraps (0 = no limit).
    pub max_wraps_per_version: u64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last change, Unix seconds.
    pub updated_at: i64,
    /// Optimistic-concurrency counter, bumped by every update.
    pub revision: u64,
    /// Versions in ascending order, `versions[i].version == i + 1`.
    pub versions: Vec<VersionRecord>,
}

impl KeyRecord {
    /// The record of `version`, if it exists.
    pub fn version(&self, version: u32) -> Option<&VersionRecord> {
        let index = usize::try_from(version).ok()?.checked_sub(1)?;
        self.versions.get(index).filter(|v| v.version == version)
    }

    /// Mutable access to the record of `version`.
    pub fn version_mut(&mut self, version: u32) -> Option<&mut VersionRecord> {
        let index = usize::try_from(version).ok()?.checked_sub(1)?;
        self.versions.get_mut(index).filter(|v| v.version == version)
    }
}

impl VersionRecord {
    /// A version made at `at` (Unix seconds) that nothing has used yet.
    pub fn unused(
        version: u32,
        state: VersionState,
        backend: String,
        backend_ref: BackendRef,
        mode: KeyMode,
        at: i64,
    ) -> Self {
        Self {
            version,
            state,
            backend,
            backend_ref,
            mode,
            unwrap_count: 0,
            last_unwrap_at: 0,
            wrap_count: 0,
            rewrap_in_count: 0,
            rewrap_out_count: 0,
            last_wrap_at: 0,
            created_at: at,
            updated_at: at,
        }
    }

    /// DEKs that still depend on this version: wrapped under it, plus
    /// rewrapped into it, minus rewrapped out of it.
    pub fn outstanding(&self) -> u64 {
        (self.wrap_count + self.rewrap_in_count).saturating_sub(self.rewrap_out_count)
    }
}

/// Counts to add to a version's usage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageRecord {
    /// Key name.
    pub key: String,
    /// Version.
    pub version: u32,
    /// Unwraps since the last flush.
    pub unwraps: u64,
    /// Time of the latest of them, Unix seconds.
    pub last_unwrap_at: i64,
    /// Wraps since the last flush.
    pub wraps: u64,
    /// Rewraps into the version since the last flush.
    pub rewraps_in: u64,
    /// Rewraps out of the version since the last flush.
    pub rewraps_out: u64,
    /// Time of the latest wrap or rewrap into it, Unix seconds (0 = none).
    pub last_wrap_at: i64,
}

/// `usage` with the rows of one (key, version) added together, in key and
/// version order: a store applies each row with one multi-row statement,
/// which would take only one of two rows for the same version, and every
/// broker of a fleet updates rows in the same order. Sorted, not built in a
/// map: a flush after traffic over a million keys has a row per key, and
/// only the rows added together are copied.
pub fn merge_usage(usage: &[UsageRecord]) -> Vec<Cow<'_, UsageRecord>> {
    let mut rows: Vec<&UsageRecord> = usage.iter().collect();
    rows.sort_unstable_by(|a, b| (a.key.as_str(), a.version).cmp(&(b.key.as_str(), b.version)));
    let mut merged: Vec<Cow<'_, UsageRecord>> = Vec::with_capacity(rows.len());
    for u in rows {
        match merged.last_mut() {
            Some(m) if m.key == u.key && m.version == u.version => {
                let m = m.to_mut();
                m.unwraps += u.unwraps;
                m.last_unwrap_at = m.last_unwrap_at.max(u.last_unwrap_at);
                m.wraps += u.wraps;
                m.rewraps_in += u.rewraps_in;
                m.rewraps_out += u.rewraps_out;
                m.last_wrap_at = m.last_wrap_at.max(u.last_wrap_at);
            }
            _ => merged.push(Cow::Borrowed(u)),
        }
    }
    merged
}

/// Which usage rows a look for keys due by wraps reads: the keys after
/// `after` in name order, whole keys up to about `rows` rows. A table of a
/// million keys is read in steps of bounded work instead of all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapScan {
    /// Read keys after this name ("": from the first key).
    pub after: String,
    /// Rows to read, rounded up to a whole key.
    pub rows: u32,
}

impl WrapScan {
    /// Every row at once.
    pub fn all() -> Self {
        Self { after: String::new(), rows: u32::MAX }
    }
}

/// What [`KeyStore::due_for_rotation`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DueForRotation {
    /// Each due key's name and current version, in name order.
    pub due: Vec<(String, u32)>,
    /// The last key the window read, where the next one starts; `None`
    /// when it read to the end of the table (the next starts again at the
    /// first key).
    pub last: Option<String>,
}

impl DueForRotation {
    /// From a store's rows of (name, current version); a version out of
    /// range (never written by keybroker) is left out.
    pub fn from_rows(rows: Vec<(String, i64)>, last: Option<String>) -> Self {
        let due = rows.into_iter().filter_map(|(name, v)| Some((name, u32::try_from(v).ok()?))).collect();
        Self { due, last }
    }
}

/// Usage rows per statement of [`KeyStore::record_usage`].
pub const USAGE_ROWS_PER_STATEMENT: usize = 500;

/// One key written by [`KeyStore::replace_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReplacement {
    /// The key as it must be stored, with every version.
    pub record: KeyRecord,
    /// `None`: the key must not exist yet. `Some(r)`: the stored key must
    /// be at revision `r`, and is replaced whole.
    pub expected_revision: Option<u64>,
}

/// What a migration does when the target already holds the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictMode {
    /// Fail the key.
    Fail,
    /// Overwrite.
    Force,
    /// Take only what the target lacks.
    Merge,
}

/// A migration job's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    /// Working out which keys to move.
    Planning,
    /// Moving keys.
    Copying,
    /// Finished (keys may have failed individually).
    Done,
    /// Stopped as a whole.
    Failed,
}

/// The outcome of one key in a migration job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    /// Not started.
    Pending,
    /// Started; a crash here resumes the key where it stopped.
    InProgress,
    /// Moved.
    Done,
    /// Nothing to do (already in the target, or a dry run).
    Skipped,
    /// Could not be moved; see the error.
    Failed,
}

macro_rules! text_enum {
    ($ty:ty { $($variant:path => $text:literal),* $(,)? }) => {
        impl $ty {
            /// The name stored in the table.
            pub fn as_str(self) -> &'static str {
                match self { $($variant => $text),* }
            }

            /// Parses a stored name.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($variant),)* _ => None }
            }
        }
    };
}

text_enum!(ConflictMode { ConflictMode::Fail => "fail", ConflictMode::Force => "force", ConflictMode::Merge => "merge" });
text_enum!(JobPhase {
    JobPhase::Planning => "planning",
    JobPhase::Copying => "copying",
    JobPhase::Done => "done",
    JobPhase::Failed => "failed",
});
text_enum!(ItemStatus {
    ItemStatus::Pending => "pending",
    ItemStatus::InProgress => "in_progress",
    ItemStatus::Done => "done",
    ItemStatus::Skipped => "skipped",
    ItemStatus::Failed => "failed",
});

/// A migration job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// Glob of the keys to move.
    pub pattern: String,
    /// Source backend.
    pub from_backend: String,
    /// Target backend.
    pub to_backend: String,
    /// Conflict rule.
    pub conflict: ConflictMode,
    /// Plan only.
    pub dry_run: bool,
    /// Pace (0 = unpaced).
    pub max_keys_per_second: u32,
    /// Phase.
    pub phase: JobPhase,
    /// Why the whole job failed.
    pub error: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// One key of a migration job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobItem {
    /// Key name.
    pub key: String,
    /// Outcome so far.
    pub status: ItemStatus,
    /// What was (or would be) done.
    pub action: String,
    /// gRPC code of the failure (0 = none).
    pub error_code: i32,
    /// Why it failed.
    pub error: String,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `create` of a name that exists.
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    /// `update` of a key that does not exist.
    #[error("key {0:?} not found")]
    NotFound(String),
    /// `update` lost against a concurrent writer (revision moved on).
    #[error("key {0:?} was changed concurrently; retry")]
    Conflict(String),
    /// The database cannot be reached or failed.
    #[error("version table unavailable: {0}")]
    Unavailable(String),
    /// A row holds a value this build cannot read.
    #[error("version table holds an invalid row for key {key:?}: {reason}")]
    Corrupt {
        /// Key name.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        let code = match &err {
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Conflict(_) => ErrorCode::Aborted,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Corrupt { .. } => ErrorCode::Internal,
        };
        ServiceError::new(code, err.to_string())
    }
}

/// Keys per page when a whole table is read.
pub const LOAD_PAGE: usize = 1000;

/// Durable storage of the version table.
///
/// Every method is one transaction. Implementations: SQLite (one file, the
/// embedded default) and PostgreSQL (one table for a fleet of brokers).
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// At most `limit` keys with their versions whose names sort after
    /// `after`, in name order (one page; `""` starts at the first key).
    /// Returns `Unavailable` when the database cannot be read, `Corrupt` for
    /// a row it cannot decode.
    async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<KeyRecord>, StoreError>;

    /// Every key with its versions, in name order, read page by page (each
    /// page is a transaction of its own). For the offline tools and
    /// migrations; a serving broker reads keys as it needs them.
    async fn load_all(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut all: Vec<KeyRecord> = Vec::new();
        loop {
            let after = all.last().map_or("", |k| k.name.as_str()).to_owned();
            let page = self.list_page(&after, LOAD_PAGE).await?;
            let done = page.len() < LOAD_PAGE;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// One key with its versions; `Ok(None)` when it does not exist.
    async fn get(&self, name: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// Inserts a new key with its versions. Returns `AlreadyExists` when the
    /// name is taken.
    async fn create(&self, key: &KeyRecord) -> Result<(), StoreError>;

    /// Replaces a key and its versions if its stored revision still equals
    /// `key.revision`, and bumps the revision. Versions absent from the table
    /// are inserted under the unique (key, version) constraint, so two
    /// writers can never both create the same version. Returns `NotFound`
    /// when the key is gone and `Conflict` when another writer changed it
    /// first. Returns the stored record.
    async fn update(&self, key: &KeyRecord) -> Result<KeyRecord, StoreError>;

    /// The table's change sequence: every write of a key (create, update,
    /// replace) raises it, in commit order; usage counts do not. Returns
    /// `Unavailable` when the database cannot be read.
    async fn change_seq(&self) -> Result<u64, StoreError>;

    /// The keys written after change `since`, and the change sequence the
    /// caller has then seen. Returns `Unavailable` when the database cannot
    /// be read.
    async fn changed_since(&self, since: u64) -> Result<(u64, Vec<String>), StoreError>;

    /// Raised when another writer may have changed the table (PostgreSQL
    /// LISTEN/NOTIFY), so a broker looks at once instead of at its next
    /// poll; `None` for a store that is only polled.
    fn change_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Keys whose current version is due for rotation at Unix time `now`:
    /// older than the key's rotation period (every key, from an index), or
    /// with at least the key's `max_wraps_per_version` wraps
    /// (`default_max_wraps` when the key sets none, and never above
    /// `default_max_wraps`) among the keys of `scan` (a window of the usage
    /// rows: the wrap counts have no index, which every flush would have to
    /// update). Returns each key's name and current version (for a
    /// compare-and-swap rotation), and where the next window starts.
    async fn due_for_rotation(
        &self,
        now: i64,
        default_max_wraps: u64,
        scan: &WrapScan,
    ) -> Result<DueForRotation, StoreError>;

    /// Writes every key of `writes` in one transaction, all or nothing
    /// (offline migration and restore). Returns `AlreadyExists` for a key
    /// expected to be new, `NotFound` for one expected to exist, and
    /// `Conflict` for one whose revision moved on; then nothing is written.
    async fn replace_keys(&self, writes: &[KeyReplacement]) -> Result<(), StoreError>;

    /// Adds unwrap, wrap and rewrap counts and raises the last-use times;
    /// versions that no longer exist are ignored. Does not touch revisions.
    /// Applies the batch `batch` of counts once: a batch id already applied
    /// (a retry after an answer was lost) changes nothing and succeeds.
    async fn record_usage(&self, batch: &str, usage: &[UsageRecord]) -> Result<(), StoreError>;

    /// Stores a new migration job and its keys (all pending). Returns
    /// `AlreadyExists` when the id is taken.
    async fn create_job(&self, job: &JobRecord, keys: &[String]) -> Result<(), StoreError>;

    /// A job and its keys in name order; `Ok(None)` when unknown.
    async fn get_job(&self, id: &str) -> Result<Option<(JobRecord, Vec<JobItem>)>, StoreError>;

    /// Sets a job's phase and error.
    async fn set_job_phase(&self, id: &str, phase: JobPhase, error: &str) -> Result<(), StoreError>;

    /// Records the outcome of one key of a job.
    async fn set_job_item(&self, id: &str, item: &JobItem) -> Result<(), StoreError>;

    /// Takes or renews the lease of job `id` for `owner` until `now_ms +
    /// ttl_ms` (milliseconds since the Unix epoch): succeeds when the job is
    /// unfinished and its lease is `owner`'s or has run out. Returns
    /// whether `owner` holds the lease now.
    async fn lease_job(&self, id: &str, owner: &str, now_ms: i64, ttl_ms: i64) -> Result<bool, StoreError>;

    /// Ids of jobs neither done nor failed, oldest first (resumed at start).
    async fn unfinished_jobs(&self) -> Result<Vec<String>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, version: u32, unwraps: u64, last_unwrap_at: i64, wraps: u64) -> UsageRecord {
        UsageRecord { key: key.to_owned(), version, unwraps, last_unwrap_at, wraps, ..Default::default() }
    }

    #[test]
    fn usage_rows_of_one_version_are_added_together_in_key_and_version_order() {
        let usage = [
            row("b", 1, 1, 10, 0),
            row("a", 2, 0, 0, 5),
            row("b", 1, 2, 30, 1),
            row("a", 1, 3, 20, 0),
            row("b", 1, 4, 20, 2),
        ];
        let merged = merge_usage(&usage);
        let rows: Vec<UsageRecord> = merged.iter().map(|u| u.as_ref().clone()).collect();
        assert_eq!(rows, [row("a", 1, 3, 20, 0), row("a", 2, 0, 0, 5), row("b", 1, 7, 30, 3)]);
        // Rows of their own are the caller's, not copies.
        assert!(matches!(merged[0], Cow::Borrowed(u) if std::ptr::eq(u, &usage[3])));
        assert!(matches!(merged[2], Cow::Owned(_)));
        assert!(merge_usage(&[]).is_empty());
    }
}
