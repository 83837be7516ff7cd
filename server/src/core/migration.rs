//! Live migration of keys between backends, while both keep serving.
//!
//! A job moves the keys matching a pattern from backend A to backend B:
//! - an exportable source version (local) into a backend that can import
//!   (local, PKCS#11) is copied under the same key name and version number,
//!   verified (a payload wrapped by A must open in B), and only then switched
//!   to B in the version table; ciphertexts made before keep unwrapping
//!   unchanged;
//! - otherwise (AWS KMS or HSM source, or a KMS target) the key gets a new
//!   current version in B, so every new wrap goes to B at once, and the old
//!   versions stay readable where they are (dual read) until the data is
//!   rewrapped.
//!
//! Wrap and Unwrap never stop: a version switches atomically in the table,
//! and the source material stays where it was.
//!
//! Jobs are durable: the plan and every key's outcome live in the store. The
//! job runs in its own task (a client that disconnects does not stop it);
//! a restarted broker resumes unfinished jobs, a re-sent request with the
//! same `job_id` attaches to (or resumes) it, and keys already done are never
//! done again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keybroker_client::pb;
use rand::Rng;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::backend::{Aad, KeyBackend, VersionRef};
use crate::core::keyring::{Keyring, check_key_name, now};
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::store::{ConflictMode, ItemStatus, JobItem, JobPhase, JobRecord, KeyMode, KeyRecord, VersionState};

/// Most per-key results sent in one progress message (all keys are in the
/// store; `GetMigration` on a finished job has them too).
const MAX_RESULTS: usize = 1000;
const VERIFY_HEADER: &[u8] = b"keybroker.migrate.verify.v1";

/// How often a broker that does not hold a job's lease reads its progress
/// and tries to take the lease over.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(300);

/// Runs and tracks migration jobs. In a fleet, every broker follows every
/// unfinished job, and the one holding the job's lease in the store runs
/// it; when that broker dies, another takes the lease over once it runs
/// out and resumes the job where it stopped.
pub struct Migrator {
    keyring: Arc<Keyring>,
    running: Mutex<HashMap<String, watch::Receiver<pb::MigrateProgress>>>,
    /// This broker's name on the leases it holds.
    owner: String,
    lease: Duration,
}

/// Why a run of a job ended without an error.
enum RunEnd {
    /// Every key was handled.
    Finished,
    /// Another broker holds the lease now.
    LeaseLost,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Insert/remove only: a poisoned map is consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn conflict_mode(mode: i32) -> ConflictMode {
    match pb::ConflictMode::try_from(mode) {
        Ok(pb::ConflictMode::Force) => ConflictMode::Force,
        Ok(pb::ConflictMode::Merge) => ConflictMode::Merge,
        _ => ConflictMode::Fail,
    }
}

fn phase(p: JobPhase) -> pb::MigrationPhase {
    match p {
        JobPhase::Planning => pb::MigrationPhase::Planning,
        JobPhase::Copying => pb::MigrationPhase::Copying,
        JobPhase::Done => pb::MigrationPhase::Done,
        JobPhase::Failed => pb::MigrationPhase::Failed,
    }
}

/// The progress message of a job and its items.
pub fn progress(job: &JobRecord, items: &[JobItem], current_key: &str) -> pb::MigrateProgress {
    let count = |s: ItemStatus| items.iter().filter(|i| i.status == s).count() as u32;
    let results = items
        .iter()
        .filter(|i| job.dry_run || matches!(i.status, ItemStatus::Failed | ItemStatus::Skipped))
        .take(MAX_RESULTS)
        .map(|i| pb::MigrationKeyResult {
            key: i.key.clone(),
            action: i.action.clone(),
            error: (i.error_code != 0).then(|| pb::ItemError { code: i.error_code, message: i.error.clone() }),
        })
        .collect();
    pb::MigrateProgress {
        job_id: job.id.clone(),
        phase: phase(job.phase) as i32,
        keys_total: items.len() as u32,
        keys_done: count(ItemStatus::Done),
        keys_skipped: count(ItemStatus::Skipped),
        keys_failed: count(ItemStatus::Failed),
        current_key: current_key.to_owned(),
        results,
        dry_run: job.dry_run,
        pattern: job.pattern.clone(),
        from_backend: job.from_backend.clone(),
        to_backend: job.to_backend.clone(),
        error: job.error.clone(),
    }
}

fn new_job_id() -> String {
    let mut id = [0u8; 12];
    rand::rng().fill_bytes(&mut id);
    format!("mig-{}", id.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// What happened to one key.
struct Outcome {
    status: ItemStatus,
    action: String,
}

impl Migrator {
    /// A migrator over `keyring` whose job leases last `lease`.
    pub fn new(keyring: Arc<Keyring>, lease: Duration) -> Arc<Self> {
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let owner =
            format!("broker-{}-{}", std::process::id(), id.iter().map(|b| format!("{b:02x}")).collect::<String>());
        Arc::new(Self { keyring, running: Mutex::new(HashMap::new()), owner, lease })
    }

    /// Holds (takes or renews) the lease of job `id`.
    async fn hold_lease(&self, id: &str) -> bool {
        let ttl = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        match self.keyring.store().lease_job(id, &self.owner, now_ms(), ttl).await {
            Ok(held) => held,
            Err(err) => {
                tracing::debug!(job_id = %id, %err, "cannot renew the job's lease");
                false
            }
        }
    }

    /// Resumes every job a previous run left unfinished.
    /// Follows every unfinished job of the table this broker does not
    /// follow yet (at start, and then periodically: jobs started on other
    /// brokers, or whose broker died). Returns how many it took up.
    pub async fn resume_unfinished(self: &Arc<Self>) -> ServiceResult<usize> {
        let ids = self.keyring.store().unfinished_jobs().await?;
        let mut taken = 0;
        for id in &ids {
            if lock(&self.running).contains_key(id) {
                continue;
            }
            tracing::info!(job_id = %id, "following unfinished migration job");
            self.attach_or_run(id).await?;
            taken += 1;
        }
        Ok(taken)
    }

    /// Starts a job, or attaches to / resumes the job `request.job_id`.
    pub async fn start(
        self: &Arc<Self>,
        request: pb::MigrateRequest,
    ) -> ServiceResult<watch::Receiver<pb::MigrateProgress>> {
        let backends = self.keyring.backends();
        for (setting, name) in [("from_backend", &request.from_backend), ("to_backend", &request.to_backend)] {
            if name.is_empty() {
                return Err(ServiceError::invalid(format!("{setting} is empty")));
            }
            if !backends.contains(name) {
                return Err(ServiceError::invalid(format!("{setting} {name:?} is not configured on this broker")));
            }
        }
        if request.from_backend == request.to_backend {
            return Err(ServiceError::invalid("from_backend and to_backend are the same backend"));
        }
        let pattern = if request.pattern.is_empty() { "*".to_owned() } else { request.pattern.clone() };
        let matcher = globset::Glob::new(&pattern)
            .map_err(|e| ServiceError::invalid(format!("invalid key pattern {pattern:?}: {}", e.kind())))?
            .compile_matcher();
        let job = JobRecord {
            id: if request.job_id.is_empty() { new_job_id() } else { request.job_id.clone() },
            pattern,
            from_backend: request.from_backend.clone(),
            to_backend: request.to_backend.clone(),
            conflict: conflict_mode(request.conflict),
            dry_run: request.dry_run,
            max_keys_per_second: request.max_keys_per_second,
            phase: JobPhase::Copying,
            error: String::new(),
            created_at: now(),
            updated_at: now(),
        };
        check_key_name(&job.id)
            .map_err(|_| ServiceError::invalid("job_id: use 1..=128 characters of [A-Za-z0-9._-]"))?;
        let store = self.keyring.store();
        if let Some((existing, _)) = store.get_job(&job.id).await? {
            let same =
                (&existing.pattern, &existing.from_backend, &existing.to_backend, existing.conflict, existing.dry_run)
                    == (&job.pattern, &job.from_backend, &job.to_backend, job.conflict, job.dry_run);
            if !same {
                return Err(ServiceError::new(
                    ErrorCode::AlreadyExists,
                    format!("migration job {:?} exists with other parameters", job.id),
                ));
            }
            return self.attach_or_run(&job.id).await;
        }
        let keys: Vec<String> = store
            .load_all()
            .await?
            .into_iter()
            .filter(|k| matcher.is_match(&k.name))
            .filter(|k| {
                k.backend == job.from_backend
                    || k.versions.iter().any(|v| v.backend == job.from_backend && v.state != VersionState::Destroyed)
            })
            .map(|k| k.name)
            .collect();
        store.create_job(&job, &keys).await?;
        tracing::info!(job_id = %job.id, keys = keys.len(), from = %job.from_backend, to = %job.to_backend,
            dry_run = job.dry_run, "migration job started");
        self.attach_or_run(&job.id).await
    }

    /// The live progress of a running job, or runs an unfinished one, or the
    /// final state of a finished one.
    pub async fn attach_or_run(self: &Arc<Self>, id: &str) -> ServiceResult<watch::Receiver<pb::MigrateProgress>> {
        if let Some(rx) = lock(&self.running).get(id).cloned() {
            return Ok(rx);
        }
        let (job, items) = self
            .keyring
            .store()
            .get_job(id)
            .await?
            .ok_or_else(|| ServiceError::new(ErrorCode::NotFound, format!("migration job {id:?} not found")))?;
        let (tx, rx) = watch::channel(progress(&job, &items, ""));
        if matches!(job.phase, JobPhase::Done | JobPhase::Failed) {
            // Finished: the receiver holds the final state; the sender drops.
            return Ok(rx);
        }
        {
            let mut running = lock(&self.running);
            if let Some(rx) = running.get(id).cloned() {
                return Ok(rx);
            }
            running.insert(id.to_owned(), rx.clone());
        }
        let this = self.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            this.drive(&id, &tx).await;
            lock(&this.running).remove(&id);
        });
        Ok(rx)
    }

    /// Follows job `id` until it is finished: runs it while this broker
    /// holds its lease, and otherwise publishes the progress its owner
    /// writes to the store, taking the lease over if the owner dies.
    async fn drive(&self, id: &str, tx: &watch::Sender<pb::MigrateProgress>) {
        let store = self.keyring.store().clone();
        loop {
            if self.hold_lease(id).await {
                let job = match store.get_job(id).await {
                    Ok(Some(job)) => job,
                    Ok(None) => return,
                    Err(_) => {
                        tokio::time::sleep(FOLLOW_INTERVAL).await;
                        continue;
                    }
                };
                match self.run(job.0, job.1, tx).await {
                    Ok(RunEnd::Finished) => return,
                    Ok(RunEnd::LeaseLost) => {
                        tracing::warn!(job_id = %id, "lost the migration job's lease; another broker runs it");
                    }
                    Err(err) => {
                        tracing::error!(job_id = %id, %err, "migration job failed");
                        let _ = store.set_job_phase(id, JobPhase::Failed, err.message()).await;
                        if let Ok(Some((job, items))) = store.get_job(id).await {
                            let _ = tx.send(progress(&job, &items, ""));
                        }
                        return;
                    }
                }
            } else if let Ok(Some((job, items))) = store.get_job(id).await {
                let _ = tx.send(progress(&job, &items, ""));
                if matches!(job.phase, JobPhase::Done | JobPhase::Failed) {
                    return;
                }
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    }

    /// The latest progress of a job.
    /// The progress of every job this broker is running now.
    pub fn running(&self) -> Vec<pb::MigrateProgress> {
        lock(&self.running).values().map(|rx| rx.borrow().clone()).collect()
    }

    /// The stored progress of a job.
    pub async fn status(&self, id: &str) -> ServiceResult<pb::MigrateProgress> {
        if let Some(rx) = lock(&self.running).get(id) {
            return Ok(rx.borrow().clone());
        }
        let (job, items) = self
            .keyring
            .store()
            .get_job(id)
            .await?
            .ok_or_else(|| ServiceError::new(ErrorCode::NotFound, format!("migration job {id:?} not found")))?;
        Ok(progress(&job, &items, ""))
    }

    async fn run(
        &self,
        mut job: JobRecord,
        mut items: Vec<JobItem>,
        tx: &watch::Sender<pb::MigrateProgress>,
    ) -> ServiceResult<RunEnd> {
        let store = self.keyring.store().clone();
        let pace =
            (job.max_keys_per_second > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(job.max_keys_per_second)));
        for i in 0..items.len() {
            if !matches!(items[i].status, ItemStatus::Pending | ItemStatus::InProgress) {
                continue;
            }
            // Renewed before every key: a broker that lost it stops here.
            if !self.hold_lease(&job.id).await {
                return Ok(RunEnd::LeaseLost);
            }
            let started = Instant::now();
            let key = items[i].key.clone();
            let resumed = items[i].status == ItemStatus::InProgress;
            let _ = tx.send(progress(&job, &items, &key));
            let outcome = if job.dry_run {
                self.plan_key(&job, &key).await.map(|action| Outcome { status: ItemStatus::Skipped, action })
            } else {
                items[i].status = ItemStatus::InProgress;
                store.set_job_item(&job.id, &items[i]).await?;
                self.migrate_key(&job, &key, resumed).await
            };
            if !job.dry_run {
                let action = outcome.as_ref().map(|o| format!("job {}: {}", job.id, o.action));
                self.keyring.audit_action("MigrateStep", &key, 0, &job.to_backend, action);
            }
            items[i] = match outcome {
                Ok(o) => JobItem {
                    key: key.clone(),
                    status: o.status,
                    action: o.action,
                    error_code: 0,
                    error: String::new(),
                },
                Err(e) => {
                    tracing::warn!(job_id = %job.id, key = %key, error = %e, "key not migrated");
                    JobItem {
                        key: key.clone(),
                        status: ItemStatus::Failed,
                        action: String::new(),
                        error_code: e.code().grpc() as i32,
                        error: e.message().to_owned(),
                    }
                }
            };
            store.set_job_item(&job.id, &items[i]).await?;
            let _ = tx.send(progress(&job, &items, &key));
            if let Some(pace) = pace {
                tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
            }
        }
        job.phase = JobPhase::Done;
        store.set_job_phase(&job.id, JobPhase::Done, "").await?;
        tracing::info!(job_id = %job.id, "migration job done");
        let _ = tx.send(progress(&job, &items, ""));
        Ok(RunEnd::Finished)
    }

    fn backends(&self, job: &JobRecord) -> ServiceResult<(Arc<dyn KeyBackend>, Arc<dyn KeyBackend>)> {
        let b = self.keyring.backends();
        Ok((b.get(&job.from_backend)?.clone(), b.get(&job.to_backend)?.clone()))
    }

    fn conflict(&self, job: &JobRecord, record: &KeyRecord) -> Option<String> {
        let in_target = record.backend == job.to_backend
            || record.versions.iter().any(|v| v.backend == job.to_backend && v.state != VersionState::Destroyed);
        in_target.then(|| {
            format!(
                "key {:?} already has material in backend {:?} (conflict: re-send with FORCE or MERGE)",
                record.name, job.to_backend
            )
        })
    }

    /// What migrating `key` would do (dry run).
    async fn plan_key(&self, job: &JobRecord, key: &str) -> ServiceResult<String> {
        let record = self.keyring.store().get(key).await?.ok_or_else(|| ServiceError::key_not_found(key))?;
        let (source, target) = self.backends(job)?;
        let on_source: Vec<u32> = record
            .versions
            .iter()
            .filter(|v| v.backend == job.from_backend && v.state != VersionState::Destroyed)
            .map(|v| v.version)
            .collect();
        let mut plan = match (self.conflict(job, &record), job.conflict) {
            (Some(why), ConflictMode::Fail) => return Ok(format!("would fail: {why}")),
            (Some(_), mode) => format!("{} (conflict in the target); ", mode.as_str()),
            (None, _) => String::new(),
        };
        if source.exportable() && target.importable() {
            plan +=
                &format!("copy versions {on_source:?} to {:?} under the same numbers, verify, switch", job.to_backend);
        } else {
            plan += &format!(
                "create version {} in {:?}; versions {on_source:?} stay readable in {:?} ({})",
                record.current_version + 1,
                job.to_backend,
                job.from_backend,
                why_not_copied(source.as_ref(), target.as_ref())
            );
        }
        Ok(plan)
    }

    async fn migrate_key(&self, job: &JobRecord, key: &str, resumed: bool) -> ServiceResult<Outcome> {
        let record = self.keyring.store().get(key).await?.ok_or_else(|| ServiceError::key_not_found(key))?;
        if !resumed
            && job.conflict == ConflictMode::Fail
            && let Some(why) = self.conflict(job, &record)
        {
            return Err(ServiceError::precondition(why));
        }
        let (source, target) = self.backends(job)?;
        let on_source: Vec<_> = record
            .versions
            .iter()
            .filter(|v| v.backend == job.from_backend && v.state != VersionState::Destroyed)
            .cloned()
            .collect();
        if on_source.is_empty() && record.backend != job.from_backend {
            // A resumed key whose last step landed before the crash is done,
            // not skipped: the earlier run moved it.
            if resumed {
                return Ok(Outcome {
                    status: ItemStatus::Done,
                    action: format!("already moved to {:?} (resumed)", job.to_backend),
                });
            }
            return Ok(Outcome { status: ItemStatus::Skipped, action: format!("nothing in {:?}", job.from_backend) });
        }
        if source.exportable() && target.importable() {
            let mut copied = Vec::new();
            for v in on_source.iter().filter(|v| v.mode == KeyMode::Direct) {
                let from = VersionRef::new(key, v.version, &v.backend_ref);
                let material = Zeroizing::new(source.export(from).await?.to_vec());
                let reference = target.import(key, v.version, &material).await?;
                verify_copy(source.as_ref(), from, target.as_ref(), VersionRef { reference: &reference.0, ..from })
                    .await?;
                self.keyring
                    .switch_version_backend(key, v.version, &job.from_backend, &job.to_backend, reference)
                    .await?;
                copied.push(v.version);
            }
            self.keyring.set_key_backend(key, &job.to_backend, None).await?;
            return Ok(Outcome {
                status: ItemStatus::Done,
                action: format!("copied versions {copied:?} to {:?}, verified, switched", job.to_backend),
            });
        }
        // Not exportable: dual read. New wraps go to a new version in the
        // target; the old versions stay readable in the source.
        let current_in_target = record.version(record.current_version).is_some_and(|v| v.backend == job.to_backend);
        if resumed && current_in_target {
            return Ok(Outcome {
                status: ItemStatus::Done,
                action: "new version already in the target (resumed)".into(),
            });
        }
        if record.mode == KeyMode::Hierarchy
            && self.keyring.backends().get_mode(&job.to_backend, KeyMode::Hierarchy).is_err()
        {
            self.keyring.set_key_backend(key, &record.backend, Some(KeyMode::Direct)).await?;
        }
        // Compare-and-swap on the version read above: if another broker
        // (one that held the lease before) made the new version meanwhile,
        // this one makes none.
        let rotated = match self.keyring.rotate(key, Some(record.current_version), Some(&job.to_backend), None).await {
            Ok(rotated) => rotated,
            Err(err) if err.code() == ErrorCode::Aborted => {
                let now = self.keyring.store().get(key).await?.ok_or_else(|| ServiceError::key_not_found(key))?;
                if now.version(now.current_version).is_some_and(|v| v.backend == job.to_backend) {
                    return Ok(Outcome {
                        status: ItemStatus::Done,
                        action: "new version already in the target (made concurrently)".into(),
                    });
                }
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        let kept: Vec<u32> = on_source.iter().map(|v| v.version).collect();
        Ok(Outcome {
            status: ItemStatus::Done,
            action: format!(
                "created version {} in {:?}; versions {kept:?} stay readable in {:?} until rewrapped",
                rotated.record.current_version, job.to_backend, job.from_backend
            ),
        })
    }
}

/// Proves a copied version holds the same material: a payload wrapped by the
/// source opens in the target, and one wrapped by the target opens in the
/// source.
pub async fn verify_copy(
    source: &dyn KeyBackend,
    from: VersionRef<'_>,
    target: &dyn KeyBackend,
    to: VersionRef<'_>,
) -> ServiceResult<()> {
    let context = Default::default();
    let aad = Aad { header: VERIFY_HEADER, context: &context };
    let mut probe = [0u8; 32];
    rand::rng().fill_bytes(&mut probe);
    for (w, wv, u, uv) in [(source, from, target, to), (target, to, source, from)] {
        let mut payload = Vec::new();
        w.wrap(wv, &probe, aad, &mut payload).await?;
        let opened = u.unwrap(uv, &payload, aad).await?;
        if opened.as_slice() != probe {
            return Err(ServiceError::internal(format!(
                "verification of key {:?} version {} failed between {:?} and {:?}",
                from.key,
                from.version,
                source.name(),
                target.name()
            )));
        }
    }
    Ok(())
}

/// Why versions cannot be copied from `source` to `target`: the source
/// keeps its material inside, the target cannot take material, or both.
fn why_not_copied(source: &dyn crate::backend::KeyBackend, target: &dyn crate::backend::KeyBackend) -> String {
    match (source.exportable(), target.importable()) {
        (false, false) => {
            format!("{} material is not exportable, and {} cannot import material", source.kind(), target.kind())
        }
        (false, true) => format!("{} material is not exportable", source.kind()),
        _ => format!("{} cannot import material", target.kind()),
    }
}
