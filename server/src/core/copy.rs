//! Copying keys from one version table into another, as `kes migrate`
//! does; the offline `migrate` and `restore` share it.
//!
//! A key is copied with its name, version numbers, states and policy
//! (deletion flag, labels, rotation policy, min_decryption_version). A
//! version whose material is exportable is imported into the target's
//! backend of the same name (or its default backend) and verified by a
//! round trip; a non-exportable version (KMS, HSM) is carried as a
//! reference when the target has a backend of the same name and type (the
//! same KMS account or HSM), and is otherwise refused with a message that
//! says to move it with the live Migrate first. Every key's plan is worked
//! out first; [`commit`] then writes them all in one transaction.

use std::sync::Arc;

use crate::backend::{Backends, KeyBackend, VersionRef};
use crate::core::migration::verify_copy;
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::store::{ConflictMode, KeyMode, KeyRecord, KeyReplacement, KeyStore, VersionRecord, VersionState};

/// A version table and the backends its versions live in: the target (or
/// source) of a copy. `keybroker migrate` and `restore` open one per
/// configuration ([`crate::server::open_offline`]).
pub struct Side {
    /// Its backends.
    pub backends: Backends,
    /// Its version table.
    pub store: Arc<dyn KeyStore>,
    /// The backend a version goes to when this side has none of the name
    /// it had on the other side.
    pub default_backend: String,
}

impl Side {
    /// The backend of this side that should hold a version that lived in a
    /// backend called `name` on the other side.
    fn target_backend(&self, name: &str) -> ServiceResult<(String, &Arc<dyn KeyBackend>)> {
        match self.backends.get(name) {
            Ok(b) => Ok((name.to_owned(), b)),
            Err(_) => Ok((self.default_backend.clone(), self.backends.get(&self.default_backend)?)),
        }
    }
}

/// Material of a version moved to another side: what its record there says.
async fn carry_version(key: &str, v: &VersionRecord, from: &Backends, to: &Side) -> ServiceResult<VersionRecord> {
    if v.state == VersionState::Destroyed {
        return Ok(VersionRecord { backend_ref: Default::default(), ..v.clone() });
    }
    let source = from.get_mode(&v.backend, v.mode)?;
    let (target_name, target) = to.target_backend(&v.backend)?;
    let here = VersionRef::new(key, v.version, &v.backend_ref);
    if source.exportable() && target.importable() {
        let imported = target.import(key, v.version, &source.export(here).await?).await?;
        let there = VersionRef { reference: &imported.0, ..here };
        verify_copy(source.as_ref(), here, target.as_ref(), there).await?;
        return Ok(VersionRecord { backend: target_name, backend_ref: imported, mode: KeyMode::Direct, ..v.clone() });
    }
    // Not exportable: only a reference to the same KMS account / HSM works.
    let same = to.backends.get_mode(&v.backend, v.mode).ok().filter(|b| b.kind() == source.kind());
    let Some(target) = same else {
        return Err(ServiceError::precondition(format!(
            "version {} of key {key:?} lives in backend {:?} ({}), whose material cannot be exported, and the target \
             has no {} backend of that name to reference it: move it with the live Migrate first",
            v.version,
            v.backend,
            source.kind(),
            source.kind()
        )));
    };
    verify_copy(source.as_ref(), here, target.as_ref(), here).await?;
    Ok(v.clone())
}

/// What copying one key into a target would do.
#[derive(Debug)]
pub struct CopyPlan {
    /// What was (or, in a dry run, would be) done, or why nothing was.
    pub action: String,
    /// The key as the target must store it; `None` when nothing is written.
    pub write: Option<KeyReplacement>,
}

impl CopyPlan {
    fn skip(why: impl Into<String>) -> Self {
        Self { action: format!("skipped: {}", why.into()), write: None }
    }
}

/// Checks, for `--merge`, that every version both sides have holds the same
/// material (a round trip between the two backends). `Ok(Some(why))` when
/// the key must be skipped.
async fn same_material(
    record: &KeyRecord,
    from: &Backends,
    target: &KeyRecord,
    to: &Side,
) -> ServiceResult<Option<String>> {
    let mut compared = 0;
    for v in record.versions.iter().filter(|v| v.version <= target.current_version) {
        let Some(t) = target.version(v.version) else { continue };
        match (v.state == VersionState::Destroyed, t.state == VersionState::Destroyed) {
            (true, true) => continue,
            (true, false) | (false, true) => {
                return Ok(Some(format!(
                    "version {} is destroyed on one side only, so the keys cannot be proven the same",
                    v.version
                )));
            }
            (false, false) => {}
        }
        let source = from.get_mode(&v.backend, v.mode)?;
        let Ok(there) = to.backends.get_mode(&t.backend, t.mode) else {
            return Ok(Some(format!(
                "the target's backend {:?} of version {} is not configured",
                t.backend, v.version
            )));
        };
        let here = VersionRef::new(&record.name, v.version, &v.backend_ref);
        let theirs = VersionRef::new(&record.name, v.version, &t.backend_ref);
        match verify_copy(source.as_ref(), here, there.as_ref(), theirs).await {
            Ok(()) => compared += 1,
            Err(err) if err.code() == ErrorCode::Unavailable => return Err(err),
            Err(_) => {
                return Ok(Some(format!(
                    "version {} holds different material in the target: a different key of the same name",
                    v.version
                )));
            }
        }
    }
    Ok((compared == 0).then(|| "no live version on both sides to prove the keys are the same".to_owned()))
}

/// Works out what copying `record` (from the side whose backends are
/// `from`) into `to` under `conflict` writes, carrying the material of every
/// version it adds into the target's backends. Writes nothing to the
/// target's store: the caller writes every key's plan in one transaction.
pub async fn plan_copy(
    record: &KeyRecord,
    from: &Backends,
    to: &Side,
    conflict: ConflictMode,
    dry_run: bool,
) -> ServiceResult<CopyPlan> {
    let existing = to.store.get(&record.name).await?;
    let first_new = match (&existing, conflict) {
        (None, _) => 1,
        (Some(_), ConflictMode::Fail) => {
            return Err(ServiceError::new(
                ErrorCode::AlreadyExists,
                format!("key {:?} exists in the target (use --force to overwrite or --merge)", record.name),
            ));
        }
        (Some(_), ConflictMode::Force) => 1,
        (Some(t), ConflictMode::Merge) => {
            if let Some(why) = same_material(record, from, t, to).await? {
                return Ok(CopyPlan::skip(why));
            }
            t.current_version + 1
        }
    };
    let wanted: Vec<&VersionRecord> = record.versions.iter().filter(|v| v.version >= first_new).collect();
    if wanted.is_empty() {
        return Ok(CopyPlan::skip("the target has every version"));
    }
    let numbers: Vec<u32> = wanted.iter().map(|v| v.version).collect();
    if dry_run {
        return Ok(CopyPlan { action: format!("would copy versions {numbers:?}"), write: None });
    }
    let mut carried = Vec::new();
    for v in &wanted {
        carried.push(carry_version(&record.name, v, from, to).await?);
    }
    let write = match (existing, conflict) {
        (Some(mut target), ConflictMode::Merge) => {
            let expected = target.revision;
            target.versions.extend(carried);
            target.current_version = record.current_version;
            for v in target.versions.iter_mut() {
                if v.version == record.current_version {
                    v.state = VersionState::Active;
                } else if v.state == VersionState::Active {
                    v.state = VersionState::DecryptOnly;
                }
            }
            target.backend = to.target_backend(&record.backend)?.0;
            target.updated_at = crate::core::keyring::now();
            KeyReplacement { record: target, expected_revision: Some(expected) }
        }
        (existing, _) => KeyReplacement {
            record: KeyRecord {
                backend: to.target_backend(&record.backend)?.0,
                versions: carried,
                revision: 1,
                ..record.clone()
            },
            expected_revision: existing.map(|t| t.revision),
        },
    };
    Ok(CopyPlan { action: format!("copied versions {numbers:?}, verified"), write: Some(write) })
}

/// Writes the plans' keys into `to` in one transaction: all of them or,
/// on any failure, none.
pub async fn commit(to: &Side, plans: &[CopyPlan]) -> Result<(), String> {
    let writes: Vec<KeyReplacement> = plans.iter().filter_map(|p| p.write.clone()).collect();
    if writes.is_empty() {
        return Ok(());
    }
    to.store
        .replace_keys(&writes)
        .await
        .map_err(|e| format!("writing the target's version table failed ({e}); nothing was written"))
}
