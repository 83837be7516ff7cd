//! The rules of the key lifecycle, over the cache of [`super`]: creation,
//! rotation, `min_decryption_version`, disable / enable / destroy, policy.
//! Every change reads the key fresh from the store, applies its rule, and
//! writes it back under the store's optimistic revision check, so two
//! brokers sharing a store never both create vN+1. Material made for a
//! version that a lost race never recorded is erased again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CachedKey, Keyring, UPDATE_ATTEMPTS, check_key_name, now};
use crate::backend::root_key::ROOT_KEY_NAME;
use crate::backend::{BackendRef, KeyBackend, VersionRef};
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::store::{KeyMode, KeyRecord, StoreError, VersionRecord, VersionState, WrapScan};

/// Wraps under one version after which a key rotates automatically when
/// its policy sets no `max_wraps_per_version`: far below the 2^32 AES-GCM
/// invocations NIST SP 800-38D allows random nonces under one key.
pub const DEFAULT_MAX_WRAPS: u64 = 1 << 30;

/// Usage rows read per look for keys due by wraps ([`Keyring::rotate_due`]):
/// about 15 ms of SQLite; a million keys are all read in 20 looks.
pub const WRAP_SCAN_ROWS: u32 = 50_000;

/// What a new key looks like.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Name.
    pub name: String,
    /// Backend; empty for the default one.
    pub backend: String,
    /// Whether versions may be destroyed.
    pub deletion_allowed: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Rotation period in seconds (0 = none).
    pub rotation_period_secs: u64,
    /// Wraps per version before rotation (0 = no limit).
    pub max_wraps_per_version: u64,
    /// Direct or hierarchy mode.
    pub mode: KeyMode,
    /// Existing material to attach as version 1 (KMS key ARN, HSM label).
    pub backend_key_id: String,
}

/// A change to a key's policy.
#[derive(Debug, Clone, Default)]
pub struct PolicyChange {
    /// New deletion flag.
    pub deletion_allowed: Option<bool>,
    /// New labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// New rotation policy: (period seconds, max wraps).
    pub rotation: Option<(u64, u64)>,
}

/// A version lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionChange {
    /// Refuse unwraps until enabled.
    Disable,
    /// Allow a disabled version to unwrap again.
    Enable,
    /// Erase the material for good.
    Destroy,
}

impl Keyring {
    /// Refuses to retire `versions` of `record` when one was unwrapped within
    /// the retirement window: the data under it is not all rewrapped yet.
    fn check_retirement(
        &self,
        record: &KeyRecord,
        versions: impl Iterator<Item = u32>,
        what: &str,
    ) -> ServiceResult<()> {
        let window = self.retirement_window_secs.load(Ordering::Relaxed);
        let cached = self.read_cache().get(&record.name).cloned();
        let t = now();
        for version in versions {
            let Some(v) = record.version(version) else { continue };
            // The store's counts (this broker flushed its own just before).
            let outstanding = v.outstanding();
            if outstanding > 0 && v.state != VersionState::Destroyed {
                return Err(ServiceError::precondition(format!(
                    "version {version} of key {:?} still has {outstanding} outstanding DEKs (wrapped {}, rewrapped in \
                     {}, rewrapped out {}; the last made {}): rewrap them first (keybroker rewrap), or {what} with force",
                    record.name,
                    v.wrap_count,
                    v.rewrap_in_count,
                    v.rewrap_out_count,
                    describe_time(v.last_wrap_at),
                )));
            }
            let stored = record.version(version).map_or(0, |v| v.last_unwrap_at);
            let last = cached.as_ref().map_or(stored, |c| stored.max(c.last_unwrap(version)));
            if last > 0 && t - last < window {
                return Err(ServiceError::precondition(format!(
                    "version {version} of key {:?} was unwrapped {}s ago (within the retirement window of {window}s): \
                     rewrap the data first, or {what} with force",
                    record.name,
                    (t - last).max(0)
                )));
            }
        }
        Ok(())
    }
    /// The backend that makes new versions in `mode` on backend `name`;
    /// `INVALID_ARGUMENT` naming it when it is not configured or has no such
    /// mode.
    fn backend_for(&self, name: &str, mode: KeyMode) -> ServiceResult<&Arc<dyn crate::backend::KeyBackend>> {
        if !self.backends.contains(name) {
            return Err(ServiceError::invalid(format!("backend {name:?} is not configured on this broker")));
        }
        self.backends.get_mode(name, mode)
    }
    /// Creates a key with version 1 in its backend.
    pub async fn create(&self, spec: NewKey) -> ServiceResult<Arc<CachedKey>> {
        check_key_name(&spec.name)?;
        if spec.name == ROOT_KEY_NAME {
            return Err(ServiceError::invalid(format!(
                "key name {ROOT_KEY_NAME:?} is reserved for the key that seals the root key"
            )));
        }
        let backend_name = if spec.backend.is_empty() { self.default_backend.clone() } else { spec.backend };
        let backend = self.backend_for(&backend_name, spec.mode)?;
        if self.store.get(&spec.name).await?.is_some() {
            return Err(StoreError::AlreadyExists(spec.name).into());
        }
        let created = spec.backend_key_id.is_empty();
        let reference = if created {
            backend.create_version(&spec.name, 1).await?
        } else {
            backend.attach(&spec.name, 1, &spec.backend_key_id).await?
        };
        let discard = (created).then(|| (backend.clone(), reference.clone()));
        let record = first_record(
            spec.name,
            backend_name,
            spec.mode,
            spec.deletion_allowed,
            spec.labels,
            spec.rotation_period_secs,
            spec.max_wraps_per_version,
            reference,
        );
        if let Err(err) = self.store.create(&record).await {
            if let Some((backend, reference)) = discard {
                discard_material(backend.as_ref(), &record.name, 1, &reference).await;
            }
            return Err(err.into());
        }
        Ok(self.install_stored(record))
    }

    /// Creates `names` (none may exist) with `spec`'s settings, each with a
    /// new version 1 made by the backend, in store transactions of
    /// [`CREATE_MANY_CHUNK`] keys; calls `progress` with the keys created so
    /// far after each. For provisioning many tenants at once (and the
    /// benchmarks' large tables): one transaction per chunk instead of one
    /// per key. A chunk that fails leaves the chunks before it created.
    pub async fn create_many(
        &self,
        names: &[String],
        spec: &NewKey,
        mut progress: impl FnMut(usize),
    ) -> ServiceResult<usize> {
        let backend_name = if spec.backend.is_empty() { self.default_backend.clone() } else { spec.backend.clone() };
        let backend = self.backend_for(&backend_name, spec.mode)?;
        let mut created = 0;
        for chunk in names.chunks(CREATE_MANY_CHUNK) {
            let mut writes = Vec::with_capacity(chunk.len());
            for name in chunk {
                check_key_name(name)?;
                if name == ROOT_KEY_NAME {
                    return Err(ServiceError::invalid(format!("key name {ROOT_KEY_NAME:?} is reserved")));
                }
                let reference = backend.create_version(name, 1).await?;
                let record = first_record(
                    name.clone(),
                    backend_name.clone(),
                    spec.mode,
                    spec.deletion_allowed,
                    spec.labels.clone(),
                    spec.rotation_period_secs,
                    spec.max_wraps_per_version,
                    reference,
                );
                writes.push(crate::store::KeyReplacement { record, expected_revision: None });
            }
            if let Err(err) = self.store.replace_keys(&writes).await {
                for w in &writes {
                    discard_material(backend.as_ref(), &w.record.name, 1, &w.record.versions[0].backend_ref).await;
                }
                return Err(err.into());
            }
            created += chunk.len();
            progress(created);
        }
        Ok(created)
    }

    /// Makes version N+1 current, created in `backend` (or the key's
    /// backend), and moves N to decrypt-only. With `expected_current`, a
    /// compare-and-swap: `ABORTED` when the current version is another.
    pub async fn rotate(
        &self,
        name: &str,
        expected_current: Option<u32>,
        backend: Option<&str>,
        backend_key_id: Option<&str>,
    ) -> ServiceResult<Arc<CachedKey>> {
        check_key_name(name)?;
        for _ in 0..UPDATE_ATTEMPTS {
            let mut record = self.store.get(name).await?.ok_or_else(|| ServiceError::key_not_found(name))?;
            let current = record.current_version;
            if let Some(expected) = expected_current
                && expected != current
            {
                return Err(ServiceError::new(
                    ErrorCode::Aborted,
                    format!("key {name:?} is at version {current}, not the expected {expected}: rotation not done"),
                ));
            }
            let next = current
                .checked_add(1)
                .ok_or_else(|| ServiceError::precondition(format!("key {name:?} has run out of version numbers")))?;
            let backend_name = backend.filter(|b| !b.is_empty()).unwrap_or(&record.backend).to_owned();
            let target = self.backend_for(&backend_name, record.mode)?;
            let attached = backend_key_id.filter(|id| !id.is_empty());
            let made = match attached {
                Some(id) => target.attach(name, next, id).await,
                None => target.create_version(name, next).await,
            };
            let reference = match made {
                Ok(reference) => reference,
                // Another replica may be creating the same version on a
                // shared HSM: once it has committed, the next attempt
                // creates the version after it.
                Err(err) if self.moved_on(name, current).await => {
                    tracing::info!(key = %name, version = next, %err, "lost a rotation race; retrying");
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let discard = attached.is_none().then(|| reference.clone());
            let t = now();
            if let Some(old) = record.version_mut(current)
                && old.state == VersionState::Active
            {
                old.state = VersionState::DecryptOnly;
                old.updated_at = t;
            }
            let mode = record.mode;
            record.versions.push(VersionRecord::unused(
                next,
                VersionState::Active,
                backend_name.clone(),
                reference,
                mode,
                t,
            ));
            record.current_version = next;
            record.backend = backend_name;
            record.updated_at = t;
            let stored = self.store.update(&record).await;
            if stored.is_err()
                && let Some(reference) = &discard
            {
                // The version was not recorded: its new material must not
                // outlive the lost race.
                discard_material(target.as_ref(), name, next, reference).await;
            }
            match stored {
                Ok(stored) => return Ok(self.install_stored(stored)),
                Err(StoreError::Conflict(_)) if expected_current.is_none() => continue,
                Err(StoreError::Conflict(_)) => {
                    return Err(ServiceError::new(
                        ErrorCode::Aborted,
                        format!("key {name:?} was rotated concurrently past version {current}: rotation not done"),
                    ));
                }
                Err(err) => return Err(err.into()),
            }
        }
        Err(ServiceError::new(ErrorCode::Aborted, format!("key {name:?} keeps changing concurrently; retry")))
    }

    /// Rotates every key due for rotation: by age, or by wraps against its
    /// policy's `max_wraps_per_version` (by default [`DEFAULT_MAX_WRAPS`],
    /// never above `hard_max_wraps`) among the next [`WRAP_SCAN_ROWS`] usage
    /// rows (a table larger than that is read over several calls, each of
    /// bounded work, starting again at the first key after the last). Each
    /// rotation is a compare-and-swap on the version the key was due at, so
    /// when every broker of a fleet looks, exactly one rotates it. Returns
    /// the keys this broker rotated, with their new version.
    pub async fn rotate_due(&self, hard_max_wraps: u64) -> ServiceResult<Vec<(String, u32)>> {
        let scan = WrapScan { after: self.lock_wrap_scan().clone(), rows: WRAP_SCAN_ROWS };
        let found = self.store.due_for_rotation(now(), DEFAULT_MAX_WRAPS.min(hard_max_wraps), &scan).await?;
        *self.lock_wrap_scan() = found.last.unwrap_or_default();
        let mut rotated = Vec::new();
        for (name, version) in found.due {
            match self.rotate(&name, Some(version), None, None).await {
                Ok(key) => {
                    tracing::info!(key = %name, from = version, to = key.record.current_version, "rotated automatically");
                    let backend = key.current().map(|v| v.backend.clone()).unwrap_or_default();
                    let action = Ok(format!("rotated automatically from version {version}"));
                    self.audit_action("AutoRotate", &name, key.record.current_version, &backend, action);
                    rotated.push((name, key.record.current_version));
                }
                // Another broker rotated it first.
                Err(err) if err.code() == ErrorCode::Aborted => {}
                Err(err) => {
                    tracing::warn!(key = %name, version, %err, "automatic rotation failed; will retry");
                    self.audit_action("AutoRotate", &name, version, "", Err(&err));
                }
            }
        }
        Ok(rotated)
    }

    /// Whether `name` is no longer at version `current` in the store.
    async fn moved_on(&self, name: &str, current: u32) -> bool {
        matches!(self.store.get(name).await, Ok(Some(record)) if record.current_version != current)
    }

    /// Where else the material of `version` (held by `backend` as
    /// `backend_key_id`) is in use: another version or key attached to the
    /// same KMS key or HSM object. Destroying the version must not erase it.
    async fn other_users(
        &self,
        name: &str,
        version: u32,
        backend: &str,
        backend_key_id: &str,
    ) -> ServiceResult<Vec<String>> {
        let mut users = Vec::new();
        for record in self.store.load_all().await? {
            for v in &record.versions {
                if (record.name.as_str(), v.version) == (name, version)
                    || v.backend != backend
                    || v.state == VersionState::Destroyed
                {
                    continue;
                }
                let Ok(b) = self.backends.get_mode(&v.backend, v.mode) else { continue };
                if b.backend_key_id(&v.backend_ref) == backend_key_id {
                    users.push(format!("{} v{}", record.name, v.version));
                }
            }
        }
        Ok(users)
    }

    /// Reads `name` fresh, applies `change`, and stores it, retrying when a
    /// concurrent writer got there first.
    async fn modify<F>(&self, name: &str, change: F) -> ServiceResult<Arc<CachedKey>>
    where
        F: Fn(&mut KeyRecord) -> ServiceResult<()>,
    {
        check_key_name(name)?;
        for _ in 0..UPDATE_ATTEMPTS {
            let mut record = self.store.get(name).await?.ok_or_else(|| ServiceError::key_not_found(name))?;
            let before = record.clone();
            change(&mut record)?;
            if record == before {
                return Ok(self.install(record));
            }
            record.updated_at = now();
            match self.store.update(&record).await {
                Ok(stored) => return Ok(self.install_stored(stored)),
                Err(StoreError::Conflict(_)) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(ServiceError::new(ErrorCode::Aborted, format!("key {name:?} keeps changing concurrently; retry")))
    }

    /// Sets `min_decryption_version` (1..=current).
    pub async fn set_min_decryption_version(&self, name: &str, min: u32, force: bool) -> ServiceResult<Arc<CachedKey>> {
        if !force {
            self.flush_usage().await?;
        }
        self.modify(name, |record| {
            if min == 0 || min > record.current_version {
                return Err(ServiceError::invalid(format!(
                    "min_decryption_version {min} of key {name:?} must be between 1 and the current version {}",
                    record.current_version
                )));
            }
            if !force && min > record.min_decryption_version {
                self.check_retirement(record, record.min_decryption_version..min, "raise min_decryption_version")?;
            }
            record.min_decryption_version = min;
            Ok(())
        })
        .await
    }

    /// Disables, enables or destroys a non-current version.
    pub async fn change_version(
        &self,
        name: &str,
        version: u32,
        op: VersionChange,
        force: bool,
    ) -> ServiceResult<Arc<CachedKey>> {
        if op == VersionChange::Destroy && !force {
            self.flush_usage().await?;
        }
        // The material reference is erased from the table by a destroy:
        // keep it to erase the material in its backend afterwards.
        let before = match op {
            VersionChange::Destroy => self.store.get(name).await?.and_then(|r| r.version(version).cloned()),
            _ => None,
        };
        let key = self
            .modify(name, |record| {
                let deletion_allowed = record.deletion_allowed;
                let record_snapshot = record.clone();
                let current = record.current_version;
                let v = record.version_mut(version).ok_or_else(|| {
                    ServiceError::new(ErrorCode::NotFound, format!("key {name:?} has no version {version}"))
                })?;
                if version == current && op != VersionChange::Enable {
                    return Err(ServiceError::precondition(format!(
                        "version {version} is the current version of key {name:?}: rotate before {}",
                        if op == VersionChange::Disable { "disabling it" } else { "destroying it" }
                    )));
                }
                match (op, v.state) {
                    (_, VersionState::Destroyed) if op != VersionChange::Destroy => {
                        Err(ServiceError::precondition(format!("version {version} of key {name:?} is destroyed")))
                    }
                    (VersionChange::Disable, _) => {
                        v.state = VersionState::Disabled;
                        Ok(())
                    }
                    (VersionChange::Enable, VersionState::Disabled) => {
                        v.state = VersionState::DecryptOnly;
                        Ok(())
                    }
                    (VersionChange::Enable, _) => Ok(()),
                    (VersionChange::Destroy, _) if !deletion_allowed => Err(ServiceError::precondition(format!(
                        "key {name:?} does not allow deletion (set deletion_allowed with UpdateKeyPolicy first)"
                    ))),
                    (VersionChange::Destroy, VersionState::Destroyed) => Ok(()),
                    (VersionChange::Destroy, _) => {
                        if !force {
                            let snapshot = record_snapshot.clone();
                            self.check_retirement(&snapshot, std::iter::once(version), "destroy it")?;
                        }
                        v.state = VersionState::Destroyed;
                        v.backend_ref = Default::default();
                        Ok(())
                    }
                }
            })
            .await?;
        if let Some(old) = before.filter(|v| v.state != VersionState::Destroyed) {
            // The table no longer lets the version unwrap; erasing the
            // material itself is best effort, and logged when it fails.
            let erased = match self.backends.get_mode(&old.backend, old.mode) {
                Ok(backend) => {
                    let id = backend.backend_key_id(&old.backend_ref);
                    let users = if id.is_empty() {
                        Vec::new()
                    } else {
                        // When the table cannot say, keep the material: a
                        // key left behind costs less than one erased in use.
                        self.other_users(name, version, &old.backend, &id)
                            .await
                            .unwrap_or_else(|err| vec![format!("unknown ({err})")])
                    };
                    if users.is_empty() {
                        backend.destroy_version(VersionRef::new(name, version, &old.backend_ref)).await
                    } else {
                        tracing::info!(key = %name, version, backend = %old.backend, users = %users.join(", "),
                            "version destroyed in the table; its backend material is kept: other versions use it");
                        Ok(())
                    }
                }
                Err(err) => Err(crate::backend::BackendError::Unavailable {
                    backend: old.backend.clone(),
                    reason: err.to_string(),
                }),
            };
            if let Err(err) = erased {
                tracing::warn!(key = %name, version, backend = %old.backend, %err,
                    "version destroyed in the table, but its material could not be erased in the backend");
            }
        }
        Ok(key)
    }

    /// Moves version `version` of `name` from backend `from` to `to` (new
    /// material reference `reference`), if it is still in `from`.
    pub async fn switch_version_backend(
        &self,
        name: &str,
        version: u32,
        from: &str,
        to: &str,
        reference: crate::backend::BackendRef,
    ) -> ServiceResult<Arc<CachedKey>> {
        self.modify(name, |record| {
            if let Some(v) = record.version_mut(version)
                && v.backend == from
            {
                v.backend = to.to_owned();
                v.backend_ref = reference.clone();
                v.mode = KeyMode::Direct;
                v.updated_at = now();
            }
            Ok(())
        })
        .await
    }

    /// Sets the backend (and optionally the mode) of a key's future versions.
    pub async fn set_key_backend(
        &self,
        name: &str,
        backend: &str,
        mode: Option<KeyMode>,
    ) -> ServiceResult<Arc<CachedKey>> {
        self.modify(name, |record| {
            record.backend = backend.to_owned();
            if let Some(mode) = mode {
                record.mode = mode;
            }
            Ok(())
        })
        .await
    }

    /// Changes the deletion flag, labels or rotation policy.
    pub async fn update_policy(&self, name: &str, change: PolicyChange) -> ServiceResult<Arc<CachedKey>> {
        self.modify(name, |record| {
            if let Some(d) = change.deletion_allowed {
                record.deletion_allowed = d;
            }
            if let Some(labels) = &change.labels {
                record.labels = labels.clone();
            }
            if let Some((period, wraps)) = change.rotation {
                record.rotation_period_secs = period;
                record.max_wraps_per_version = wraps;
            }
            Ok(())
        })
        .await
    }
}

/// A Unix time for a message: RFC 3339 and how long ago.
fn describe_time(unix: i64) -> String {
    if unix <= 0 {
        return "at an unrecorded time".to_owned();
    }
    let at = time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string());
    format!("at {at}, {}s ago", (now() - unix).max(0))
}

/// Erases material made for a version that was never recorded (a lost race
/// or a failed store write); logged when it cannot be erased.
async fn discard_material(backend: &dyn KeyBackend, key: &str, version: u32, reference: &BackendRef) {
    if let Err(err) = backend.destroy_version(VersionRef::new(key, version, reference)).await {
        tracing::warn!(key, version, backend = backend.name(), %err,
            "material made for a version that was not recorded could not be erased");
    }
}

/// Keys per store transaction of [`Keyring::create_many`].
pub const CREATE_MANY_CHUNK: usize = 1000;

/// The record of a new key whose version 1 is `reference` in `backend`.
#[allow(clippy::too_many_arguments)]
fn first_record(
    name: String,
    backend: String,
    mode: crate::store::KeyMode,
    deletion_allowed: bool,
    labels: std::collections::BTreeMap<String, String>,
    rotation_period_secs: u64,
    max_wraps_per_version: u64,
    reference: crate::store::BackendRef,
) -> KeyRecord {
    let t = now();
    KeyRecord {
        name,
        backend: backend.clone(),
        mode,
        current_version: 1,
        min_decryption_version: 1,
        deletion_allowed,
        labels,
        rotation_period_secs,
        max_wraps_per_version,
        created_at: t,
        updated_at: t,
        revision: 1,
        versions: vec![VersionRecord::unused(1, VersionState::Active, backend, reference, mode, t)],
    }
}
