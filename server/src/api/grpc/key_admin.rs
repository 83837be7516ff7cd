//! `keybroker.v1.KeyAdmin`: key and version lifecycle. Migration RPCs are
//! declared in the API and answer UNIMPLEMENTED until the migration engine
//! lands.

use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use keybroker_client::pb;
use keybroker_client::pb::key_admin_server::KeyAdmin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{Audit, key_message, respond};
use crate::backend::health::HealthBoard;
use crate::core::keyring::{CachedKey, Keyring, NewKey, PolicyChange, VersionChange};
use crate::core::migration::Migrator;
use crate::error::{ServiceError, ServiceResult};
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
}

impl KeyAdminService {
    /// A service over `keyring`, reporting backend health from `board` and
    /// running migrations with `migrator`.
    pub fn new(keyring: Arc<Keyring>, board: Arc<HealthBoard>, migrator: Arc<Migrator>) -> Self {
        Self { keyring, board, migrator }
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
        let audit = Audit::start("CreateKey", &request);
        let req = request.into_inner();
        let policy = req.rotation_policy.unwrap_or_default();
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
        audit.finish(&req.key, 1, &result);
        respond(result)
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let req = request.get_ref();
        respond(self.keyring.fresh(&req.key).await.map(|k| self.message(&k)))
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        let req = request.into_inner();
        let result = (|| {
            let matcher = glob(&req.pattern)?;
            let after = decode_page_token(&req.page_token)?;
            let limit = match req.page_size as usize {
                0 => DEFAULT_PAGE_SIZE,
                n => n.min(MAX_PAGE_SIZE),
            };
            let (keys, more) = self.keyring.list(&matcher, &after, limit);
            let next_page_token = match (more, keys.last()) {
                (true, Some(last)) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.record.name),
                _ => String::new(),
            };
            Ok(pb::ListKeysResponse { keys: keys.iter().map(|k| self.message(k)).collect(), next_page_token })
        })();
        respond(result)
    }

    async fn rotate(&self, request: Request<pb::RotateRequest>) -> Result<Response<pb::Key>, Status> {
        let audit = Audit::start("Rotate", &request);
        let req = request.into_inner();
        let backend = Some(req.backend.as_str()).filter(|b| !b.is_empty());
        let key_id = Some(req.backend_key_id.as_str()).filter(|id| !id.is_empty());
        let result = self
            .keyring
            .rotate(&req.key, req.expected_current_version, backend, key_id)
            .await
            .map(|k| self.message(&k));
        audit.finish(&req.key, result.as_ref().map_or(0, |k| k.current_version), &result);
        respond(result)
    }

    async fn set_min_decryption_version(
        &self,
        request: Request<pb::SetMinDecryptionVersionRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let audit = Audit::start("SetMinDecryptionVersion", &request);
        let req = request.into_inner();
        let result = self
            .keyring
            .set_min_decryption_version(&req.key, req.min_decryption_version, req.force)
            .await
            .map(|k| self.message(&k));
        audit.finish(&req.key, req.min_decryption_version, &result);
        respond(result)
    }

    async fn disable_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::Key>, Status> {
        self.version_change("DisableKeyVersion", request, VersionChange::Disable).await
    }

    async fn enable_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::Key>, Status> {
        self.version_change("EnableKeyVersion", request, VersionChange::Enable).await
    }

    async fn destroy_key_version(&self, request: Request<pb::KeyVersionRequest>) -> Result<Response<pb::Key>, Status> {
        self.version_change("DestroyKeyVersion", request, VersionChange::Destroy).await
    }

    async fn update_key_policy(
        &self,
        request: Request<pb::UpdateKeyPolicyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let audit = Audit::start("UpdateKeyPolicy", &request);
        let req = request.into_inner();
        let change = PolicyChange {
            deletion_allowed: req.deletion_allowed,
            labels: req.replace_labels.then_some(req.labels),
            rotation: req.rotation_policy.map(|p| (p.rotation_period_seconds, p.max_wraps_per_version)),
        };
        let result = self.keyring.update_policy(&req.key, change).await.map(|k| self.message(&k));
        audit.finish(&req.key, 0, &result);
        respond(result)
    }

    async fn list_backends(
        &self,
        _request: Request<pb::ListBackendsRequest>,
    ) -> Result<Response<pb::ListBackendsResponse>, Status> {
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
        Ok(Response::new(pb::ListBackendsResponse { backends }))
    }

    type MigrateStream = ProgressStream;

    async fn migrate(&self, request: Request<pb::MigrateRequest>) -> Result<Response<Self::MigrateStream>, Status> {
        let audit = Audit::start("Migrate", &request);
        let req = request.into_inner();
        let result = self.migrator.start(req.clone()).await;
        let job_key = format!("{} -> {} ({})", req.from_backend, req.to_backend, req.pattern);
        audit.finish(&job_key, 0, &result);
        Ok(Response::new(progress_stream(result?)))
    }

    async fn get_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<pb::MigrateProgress>, Status> {
        respond(self.migrator.status(&request.get_ref().job_id).await)
    }

    type WatchMigrationStream = ProgressStream;

    async fn watch_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
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
        rpc: &'static str,
        request: Request<pb::KeyVersionRequest>,
        op: VersionChange,
    ) -> Result<Response<pb::Key>, Status> {
        let audit = Audit::start(rpc, &request);
        let req = request.into_inner();
        let result = self.keyring.change_version(&req.key, req.version, op, req.force).await.map(|k| self.message(&k));
        audit.finish(&req.key, req.version, &result);
        respond(result)
    }
}
