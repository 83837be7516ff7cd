//! `keybroker.v1.KeyAdmin`: key and version lifecycle, and migration. Every
//! call is authorized against the policy for each key it touches (Migrate:
//! every key its pattern selects) and recorded in the audit log; calls that
//! change something are refused while a fail-closed audit log cannot be
//! written.

use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use keybroker_client::pb;
use keybroker_client::pb::key_admin_server::KeyAdmin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{Call, Guards, Touched, key_message};
use crate::backend::health::HealthBoard;
use crate::core::keyring::{CachedKey, Keyring, NewKey, PolicyChange, VersionChange};
use crate::core::migration::Migrator;
use crate::error::{ServiceError, ServiceResult};
use crate::security::policy::Rpc;
use crate::store::KeyMode;

/// Keys per ListKeys page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most keys per ListKeys page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The admin-plane service.
pub struct KeyAdminService {
    keyring: Arc<Keyring>,
    board: Arc<HealthBoard>,
    migrator: Arc<Migrator>,
    guards: Guards,
}

/// The audit subject of a key message: its current version and backend.
fn touched(key: &pb::Key) -> Touched {
    let backend = key.versions.iter().find(|v| v.version == key.current_version).map(|v| v.backend.clone());
    Touched {
        key: key.name.clone(),
        version: key.current_version,
        backend: backend.unwrap_or_default(),
        context_sha256: String::new(),
    }
}

impl KeyAdminService {
    /// A service over `keyring`, reporting backend health from `board`,
    /// running migrations with `migrator`, behind `guards`.
    pub fn new(keyring: Arc<Keyring>, board: Arc<HealthBoard>, migrator: Arc<Migrator>, guards: Guards) -> Self {
        Self { keyring, board, migrator, guards }
    }

    /// Authorizes a change of `key`: the policy allows it and the audit log
    /// can record it.
    fn allow_change(call: &Call<'_>, rpc: Rpc, key: &str) -> ServiceResult<()> {
        call.allow(rpc, key)?;
        call.ready()
    }

    /// Answers a call that returns a key, recorded with its current version.
    async fn key_answer(
        call: Call<'_>,
        key: &str,
        result: ServiceResult<pb::Key>,
    ) -> Result<Response<pb::Key>, Status> {
        let subject = result.as_ref().map_or_else(|_| Touched::key(key), touched);
        call.finish_admin(subject, result).await
    }

    fn message(&self, key: &CachedKey) -> pb::Key {
        key_message(key, self.keyring.backends(), &self.board)
    }
}

fn glob(pattern: &str) -> ServiceResult<globset::GlobMatcher> {
    let pattern = if pattern.is_empty() { "*" } else { pattern };
    globset::GlobBuilder::new(pattern)
        .literal_separator(false)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| ServiceError::invalid(format!("invalid key pattern {pattern:?}: {}", e.kind())))
}

fn decode_page_token(token: &str) -> ServiceResult<String> {
    if token.is_empty() {
        return Ok(String::new());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|name| crate::core::envelope::is_valid_key_name(name))
        .ok_or_else(|| ServiceError::invalid("invalid page_token: pass next_page_token of the previous page"))
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::MigrateProgress, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl KeyAdmin for KeyAdminService {
    async fn create_key(&self, request: Request<pb::CreateKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let call = self.guards.call("CreateKey", &request)?;
        let req = request.into_inner();
        let policy = req.rotation_policy.unwrap_or_default();
        if let Err(err) = Self::allow_change(&call, Rpc::CreateKey, &req.key) {
            return Self::key_answer(call, &req.key, Err(err)).await;
        }
        let result = self
            .keyring
            .create(NewKey {
                name: req.key.clone(),
                backend: req.backend,
                deletion_allowed: req.deletion_allowed,
                labels: req.labels,
                rotation_period_secs: policy.rotation_period_seconds,
                max_wraps_per_version: policy.max_wraps_per_version,
                mode: match pb::KeyMode::try_from(req.mode) {
                    Ok(pb::KeyMode::Hierarchy) => KeyMode::Hierarchy,
                    _ => KeyMode::Direct,
                },
                backend_key_id: req.backend_key_id,
            })
            .await
            .map(|k| self.message(&k));
        Self::key_answer(call, &req.key, result).await
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let call = self.guards.call("GetKey", &request)?;
        let req = request.get_ref();
        let result = match call.allow(Rpc::GetKey, &req.key) {
            Ok(()) => self.keyring.fresh(&req.key).await.map(|k| self.message(&k)),
            Err(err) => Err(err),
        };
        Self::key_answer(call, &req.key, result).await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        let call = self.guards.call("ListKeys", &request)?;
        let req = request.into_inner();
        let result = async {
            call.allow_somewhere(Rpc::ListKeys)?;
            let matcher = glob(&req.pattern)?;
            let after = decode_page_token(&req.page_token)?;
            let limit = match req.page_size as usize {
                0 => DEFAULT_PAGE_SIZE,
                n => n.min(MAX_PAGE_SIZE),
            };
            let (keys, more) = self.keyring.list(&matcher, &after, limit).await?;
            let next_page_token = match (more, keys.last()) {
                (true, Some(last)) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.record.name),
                _ => String::new(),
            };
            // Only the keys the caller may list; a page may come out shorter.
            let keys =
                keys.iter().filter(|k| call.peer_may(Rpc::ListKeys, &k.record.name)).map(|k| self.message(k)).collect();
            Ok(pb::ListKeysResponse { keys, next_page_token })
        }
        .await;
        call.finish_admin(Touched::key(&req.pattern), result).await
    }

    async fn rotate(&self, request: Request<pb::RotateRequest>) -> Result<Response<pb::Key>, Status> {
        let call = self.guards.call("Rotate", &request)?;
        let req = request.into_inner();
        let backend = Some(req.backend.as_str()).filter(|b| !b.is_empty());
        let key_id = Some(req.backend_key_id.as_str()).filter(|id| !id.is_empty());
        let result = match Self::allow_change(&call, Rpc::Rotate, &req.key) {
            Ok(()) => self
                .keyring
                .rotate(&req.key, req.expected_current_version, backend, key_id)
                .await
                .map(|k| self.message(&k)),
            Err(err) => Err(err),
        };
        Self::key_answer(call, &req.key, result).await
    }

    async fn set_min_decryption_version(
        &self,
        request: Request<pb::SetMinDecryptionVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self.guards.call("SetMinDecryptionVersion", &request)?;
        let req = request.into_inner();
        let result = match Self::allow_change(&call, Rpc::SetMinDecryptionVersion, &req.key) {
            Ok(()) => self
                .keyring
                .set_min_decryption_version(&req.key, req.min_decryption_version, req.force)
                .await
                .map(|k| self.message(&k)),
            Err(err) => Err(err),
        };
        let subject = Touched { version: req.min_decryption_version, ..Touched::key(&req.key) };
        call.finish_admin(subject, result).await
    }

    async fn disable_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::Key>, Status> {
        self.version_change(Rpc::DisableKeyVersion, request, VersionChange::Disable).await
    }

    async fn enable_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::Key>, Status> {
        self.version_change(Rpc::EnableKeyVersion, request, VersionChange::Enable).await
    }

    async fn destroy_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::Key>, Status> {
        self.version_change(Rpc::DestroyKeyVersion, request, VersionChange::Destroy).await
    }

    async fn update_key_policy(
        &self,
        request: Request<pb::UpdateKeyPolicyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self.guards.call("UpdateKeyPolicy", &request)?;
        let req = request.into_inner();
        let change = PolicyChange {
            deletion_allowed: req.deletion_allowed,
            labels: req.replace_labels.then_some(req.labels),
            rotation: req.rotation_policy.map(|p| (p.rotation_period_seconds, p.max_wraps_per_version)),
        };
        let result = match Self::allow_change(&call, Rpc::UpdateKeyPolicy, &req.key) {
            Ok(()) => self.keyring.update_policy(&req.key, change).await.map(|k| self.message(&k)),
            Err(err) => Err(err),
        };
        Self::key_answer(call, &req.key, result).await
    }

    async fn list_backends(
        &self,
        request: Request<pb::ListBackendsRequest>,
    ) -> Result<Response<pb::ListBackendsResponse>, Status> {
        let call = self.guards.call("ListBackends", &request)?;
        if let Err(err) = call.allow_somewhere(Rpc::ListBackends) {
            return call.finish_admin(Touched::default(), Err(err)).await;
        }
        let backends = self
            .keyring
            .backends()
            .iter()
            .map(|(name, backend)| pb::Backend {
                name: name.clone(),
                r#type: backend.kind().to_owned(),
                healthy: self.board.healthy(name),
                error: self.board.error(name).unwrap_or_default(),
                remote_calls: backend.stats().remote_calls(),
                exportable: backend.exportable(),
            })
            .collect();
        call.finish_admin(Touched::default(), Ok(pb::ListBackendsResponse { backends })).await
    }

    type MigrateStream = ProgressStream;

    async fn migrate(&self, request: Request<pb::MigrateRequest>) -> Result<Response<Self::MigrateStream>, Status> {
        let call = self.guards.call("Migrate", &request)?;
        let req = request.into_inner();
        let result = match self.allow_migrate(&call, &req).await {
            Ok(()) => self.migrator.start(req.clone()).await,
            Err(err) => Err(err),
        };
        let subject = Touched { key: req.pattern.clone(), backend: req.to_backend.clone(), ..Touched::default() };
        let rx = call.finish_admin(subject, result).await?.into_inner();
        Ok(Response::new(progress_stream(rx)))
    }

    async fn get_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<pb::MigrateProgress>, Status> {
        let call = self.guards.call("GetMigration", &request)?;
        let result = match call.allow_somewhere(Rpc::GetMigration) {
            Ok(()) => self.migrator.status(&request.get_ref().job_id).await,
            Err(err) => Err(err),
        };
        call.finish_admin(Touched::default(), result).await
    }

    type WatchMigrationStream = ProgressStream;

    async fn watch_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
        let call = self.guards.call("WatchMigration", &request)?;
        if let Err(err) = call.allow_somewhere(Rpc::WatchMigration) {
            return call.finish_admin(Touched::default(), Err(err)).await;
        }
        let rx = self.migrator.attach_or_run(&request.get_ref().job_id).await.map_err(Status::from)?;
        Ok(Response::new(progress_stream(rx)))
    }
}

/// Streams every change of a job's progress until the job ends (the
/// sender drops); the first message is the state at attach time, with the
/// job id.
fn progress_stream(rx: tokio::sync::watch::Receiver<pb::MigrateProgress>) -> ProgressStream {
    use tokio_stream::StreamExt;
    Box::pin(tokio_stream::wrappers::WatchStream::new(rx).map(Ok))
}

impl KeyAdminService {
    async fn version_change(
        &self,
        rpc: Rpc,
        request: Request<pb::KeyVersionRequest>,
        op: VersionChange,
    ) -> Result<Response<pb::Key>, Status> {
        let call = self.guards.call(rpc.name(), &request)?;
        let req = request.into_inner();
        let result = match Self::allow_change(&call, rpc, &req.key) {
            Ok(()) => self.keyring.change_version(&req.key, req.version, op, req.force).await.map(|k| self.message(&k)),
            Err(err) => Err(err),
        };
        let backend = result
            .as_ref()
            .ok()
            .and_then(|k| k.versions.iter().find(|v| v.version == req.version))
            .map(|v| v.backend.clone())
            .unwrap_or_default();
        let subject = Touched { version: req.version, backend, ..Touched::key(&req.key) };
        call.finish_admin(subject, result).await
    }

    /// Migrate needs the Migrate right on every key it selects (for a
    /// resumed job, the keys of its pattern now).
    async fn allow_migrate(&self, call: &Call<'_>, req: &pb::MigrateRequest) -> ServiceResult<()> {
        call.allow_somewhere(Rpc::Migrate)?;
        // A resumed job migrates its own pattern; a new one (with or
        // without a chosen id) the request's.
        let pattern = match self.migrator.status(&req.job_id).await {
            Ok(job) if !req.job_id.is_empty() => job.pattern,
            Err(err) if !req.job_id.is_empty() && err.code() != crate::error::ErrorCode::NotFound => return Err(err),
            _ => req.pattern.clone(),
        };
        let matcher = glob(&pattern)?;
        let (keys, _) = self.keyring.list(&matcher, "", usize::MAX).await?;
        for key in &keys {
            call.allow(Rpc::Migrate, &key.record.name)?;
        }
        call.ready()
    }
}
