//! Broker-to-broker operations run offline against configurations, as
//! `kes migrate` does: `keybroker migrate --from a.toml --to b.toml`, and the
//! shared plumbing of `backup` / `restore`.
//!
//! A key is copied with its name, version numbers, states and policy
//! (deletion flag, labels, rotation policy, min_decryption_version). A
//! version whose material is exportable is imported into the target's
//! backend of the same name (or its default backend) and verified by a
//! round trip; a non-exportable version (KMS, HSM) is carried as a
//! reference when the target has a backend of the same name and type (the
//! same KMS account or HSM), and is otherwise refused with a message that
//! says to move it with the live Migrate first.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{Backends, KeyBackend, VersionRef};
use crate::config::{Config, Environment};
use crate::error::{ServiceError, ServiceResult};
use crate::migration::verify_copy;
use crate::server::{StartError, build_backends, open_store};
use crate::store::{ConflictMode, KeyMode, KeyRecord, KeyStore, StoreError, VersionRecord, VersionState};

/// One broker's configuration, opened: its backends and its store.
pub struct Side {
    /// The configuration.
    pub config: Config,
    /// Its backends.
    pub backends: Backends,
    /// Its version table.
    pub store: Arc<dyn KeyStore>,
}

impl Side {
    /// Opens the backends and store of the configuration at `path`.
    pub async fn open(path: &Path, env: &Environment) -> Result<Side, StartError> {
        let config = Config::load(Some(path), env)?;
        let backends = build_backends(&config, env).await?;
        let store = open_store(&config).await?;
        Ok(Side { config, backends, store })
    }

    /// The backend of this side that should hold a version that lived in a
    /// backend called `name` on the other side.
    fn target_backend(&self, name: &str) -> ServiceResult<(String, &Arc<dyn KeyBackend>)> {
        match self.backends.get(name) {
            Ok(b) => Ok((name.to_owned(), b)),
            Err(_) => {
                let default = &self.config.default_backend;
                Ok((default.clone(), self.backends.get(default)?))
            }
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
    let here = VersionRef { key, version: v.version, reference: &v.backend_ref };
    if source.exportable() && target.importable() {
        let imported = target.import(key, v.version, &source.export(here).await?).await?;
        let there = VersionRef { reference: &imported, ..here };
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

/// Copies `record` (from the side whose backends are `from`) into `to`,
/// under `conflict`. Returns what was done.
pub async fn copy_key(
    record: &KeyRecord,
    from: &Backends,
    to: &Side,
    conflict: ConflictMode,
    dry_run: bool,
) -> ServiceResult<String> {
    let existing = to.store.get(&record.name).await?;
    let first_new = match (&existing, conflict) {
        (None, _) => 1,
        (Some(_), ConflictMode::Fail) => {
            return Err(ServiceError::new(
                crate::error::ErrorCode::AlreadyExists,
                format!("key {:?} exists in the target (use --force to overwrite or --merge)", record.name),
            ));
        }
        (Some(_), ConflictMode::Force) => 1,
        (Some(t), ConflictMode::Merge) => t.current_version + 1,
    };
    let wanted: Vec<&VersionRecord> = record.versions.iter().filter(|v| v.version >= first_new).collect();
    if wanted.is_empty() {
        return Ok("skipped: the target has every version".to_owned());
    }
    let numbers: Vec<u32> = wanted.iter().map(|v| v.version).collect();
    if dry_run {
        return Ok(format!("would copy versions {numbers:?}"));
    }
    let mut carried = Vec::new();
    for v in &wanted {
        carried.push(carry_version(&record.name, v, from, to).await?);
    }
    match (existing, conflict) {
        (Some(mut target), ConflictMode::Merge) => {
            target.versions.extend(carried);
            target.current_version = record.current_version;
            if let Some(current) = target.versions.iter_mut().find(|v| v.version == record.current_version) {
                current.state = VersionState::Active;
            }
            for v in target.versions.iter_mut().filter(|v| v.version < record.current_version) {
                if v.state == VersionState::Active {
                    v.state = VersionState::DecryptOnly;
                }
            }
            target.backend = to.target_backend(&record.backend)?.0;
            to.store.update(&target).await?;
        }
        (existing, _) => {
            if existing.is_some() {
                to.store.delete(&record.name).await?;
            }
            let new = KeyRecord {
                backend: to.target_backend(&record.backend)?.0,
                versions: carried,
                revision: 1,
                ..record.clone()
            };
            match to.store.create(&new).await {
                Ok(()) => {}
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(ServiceError::new(
                        crate::error::ErrorCode::Aborted,
                        format!("key {:?} was created concurrently", record.name),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(format!("copied versions {numbers:?}, verified"))
}

/// Totals of an offline migration.
#[derive(Debug, Default)]
pub struct OfflineSummary {
    /// Keys copied.
    pub copied: usize,
    /// Keys with nothing to copy.
    pub skipped: usize,
    /// Keys that failed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// `keybroker migrate --from A --to B [PATTERN]`.
pub async fn migrate(
    from: &Side,
    to: &Side,
    pattern: &str,
    conflict: ConflictMode,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<OfflineSummary, String> {
    let matcher = globset::Glob::new(pattern)
        .map_err(|e| format!("invalid pattern {pattern:?}: {}", e.kind()))?
        .compile_matcher();
    let keys: Vec<KeyRecord> = from
        .store
        .load_all()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|k| matcher.is_match(&k.name))
        .collect();
    let mut summary = OfflineSummary::default();
    let total = keys.len();
    for (i, key) in keys.iter().enumerate() {
        let result = copy_key(key, &from.backends, to, conflict, dry_run).await;
        let line = match &result {
            Ok(action) if action.starts_with("skipped") => {
                summary.skipped += 1;
                action.clone()
            }
            Ok(action) => {
                summary.copied += 1;
                action.clone()
            }
            Err(e) => {
                summary.failed.push((key.name.clone(), e.message().to_owned()));
                format!("FAILED: {}", e.message())
            }
        };
        let _ = writeln!(out, "[{}/{total}] {}: {line}", i + 1, key.name);
    }
    let _ = writeln!(
        out,
        "{}{} copied, {} skipped, {} failed",
        if dry_run { "dry run: " } else { "" },
        summary.copied,
        summary.skipped,
        summary.failed.len()
    );
    Ok(summary)
}
