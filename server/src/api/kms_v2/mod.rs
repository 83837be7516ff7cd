//! The Kubernetes KMS v2 plugin API on a Unix socket beside the API server:
//! Status, Encrypt and Decrypt of the API server's data keys under one
//! keybroker key. Encrypt wraps under the key's current version (the
//! ciphertext is a keybroker envelope, well under the API server's 1 KiB);
//! `key_id` names the key and its current version, so a rotation shows in
//! the next Status and the API server moves to a new data key; Decrypt
//! routes by the envelope's header, so data keys of older versions (or of a
//! key since migrated to another backend) keep decrypting. The caller is
//! `uid:<n>` from the socket's peer credentials, authorized by the policy
//! (Encrypt as Wrap, Decrypt as Unwrap) and audited with the request uid.

/// Generated from proto/kubernetes/kms/v2/api.proto (`cargo run -p
/// keybroker-codegen`); the client half serves the benchmarks.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod generated;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use generated::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::core::broker::Broker;
use crate::error::ServiceError;
use crate::security::audit::{AuditLog, Record};
use crate::security::identity::{Peer, peer};
use crate::security::policy::{Gate, Rpc};

pub use generated::{DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse};

impl std::fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptRequest").field("uid", &self.uid).field("plaintext", &"<redacted>").finish()
    }
}

impl std::fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptResponse").field("plaintext", &"<redacted>").finish()
    }
}

/// `[kms_v2]`: the Kubernetes KMS v2 plugin socket.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KmsV2Config {
    /// Path of the socket the API server's EncryptionConfiguration names
    /// (`endpoint: unix:///...`); created mode 0600.
    pub socket: PathBuf,
    /// The keybroker key that protects the API server's data keys.
    pub key: String,
}

/// The service.
pub struct KmsV2Service {
    broker: Arc<Broker>,
    gate: Arc<Gate>,
    audit: Arc<AuditLog>,
    key: String,
}

impl KmsV2Service {
    /// A plugin answering with `key` of `broker`.
    pub fn new(broker: Arc<Broker>, gate: Arc<Gate>, audit: Arc<AuditLog>, key: String) -> Self {
        Self { broker, gate, audit, key }
    }

    /// The generated server over this service.
    pub fn into_server(self) -> KeyManagementServiceServer<Self> {
        KeyManagementServiceServer::new(self)
    }

    async fn key_id(&self) -> Result<String, ServiceError> {
        let key = self.broker.keyring().key(&self.key).await?;
        Ok(format!("keybroker/{}/v{}", self.key, key.record.current_version))
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        peer: &Peer,
        rpc: &'static str,
        uid: &str,
        started: Instant,
        key: &str,
        version: u32,
        backend: String,
        result: Result<(), &ServiceError>,
    ) -> Result<(), Status> {
        let (code, detail) = match result {
            Ok(()) => (None, format!("uid={uid}")),
            Err(e) => (Some(e.code()), format!("uid={uid}: {}", e.message())),
        };
        let record = Record {
            identity: peer.name().clone(),
            rpc,
            key: key.to_owned(),
            version,
            backend,
            code,
            latency_us: started.elapsed().as_micros() as u64,
            count: 1,
            detail,
            ..Record::default()
        };
        self.audit.record(record).await.map_err(Status::from)
    }
}

/// The annotation naming the key version of a data key.
pub const VERSION_ANNOTATION: &str = "version.keybroker.kms.k8s.io";

/// The API server's limit on a ciphertext.
pub const MAX_CIPHERTEXT: usize = 1024;

#[tonic::async_trait]
impl KeyManagementService for KmsV2Service {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        // A deep check: a real round trip under the current version.
        let healthz = async {
            let probe = [0x5au8; 32];
            let wrapped = self.broker.wrap_uncounted(&self.key, &probe, &BTreeMap::new()).await?;
            let opened = self.broker.unwrap_uncounted(&wrapped.ciphertext, &BTreeMap::new()).await?;
            if opened.plaintext.as_slice() == probe {
                Ok(())
            } else {
                Err(ServiceError::internal("the health round trip returned other bytes"))
            }
        }
        .await;
        let key_id = self.key_id().await.unwrap_or_default();
        let healthz = match healthz {
            Ok(()) => "ok".to_owned(),
            Err(err) => {
                tracing::warn!(%err, key = %self.key, "KMS v2 status: unhealthy");
                format!("unhealthy: {}", err.message())
            }
        };
        Ok(Response::new(StatusResponse { version: "v2".to_owned(), healthz, key_id }))
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let peer = peer(&request)?;
        let req = request.into_inner();
        let result = async {
            self.gate.check(&peer, Rpc::Wrap, &self.key)?;
            let wrapped = self.broker.wrap(&self.key, &req.plaintext, &BTreeMap::new()).await?;
            if wrapped.ciphertext.len() > MAX_CIPHERTEXT {
                return Err(ServiceError::invalid(format!(
                    "the ciphertext would be {} bytes, over the API server's {MAX_CIPHERTEXT}",
                    wrapped.ciphertext.len()
                )));
            }
            Ok(wrapped)
        }
        .await;
        match result {
            Ok(w) => {
                self.record(&peer, "KmsV2Encrypt", &req.uid, started, &w.key, w.version, w.backend.clone(), Ok(()))
                    .await?;
                let key_id = format!("keybroker/{}/v{}", w.key, w.version);
                // For operators reading etcd: the version, under the suffix
                // the API server requires of annotation keys.
                let annotations = BTreeMap::from([(VERSION_ANNOTATION.to_owned(), w.version.to_string().into_bytes())]);
                Ok(Response::new(EncryptResponse { ciphertext: w.ciphertext, key_id, annotations }))
            }
            Err(err) => {
                self.record(&peer, "KmsV2Encrypt", &req.uid, started, &self.key, 0, String::new(), Err(&err)).await?;
                Err(err.into())
            }
        }
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        let peer = peer(&request)?;
        let req = request.into_inner();
        let result = async {
            // Only ciphertexts of this plugin's key.
            let env =
                crate::core::envelope::parse(&req.ciphertext).map_err(|e| ServiceError::invalid(e.to_string()))?;
            if env.key != self.key {
                return Err(ServiceError::invalid(format!(
                    "the ciphertext is of key {:?}, not of this plugin's key {:?}",
                    env.key, self.key
                )));
            }
            self.gate.check(&peer, Rpc::Unwrap, &self.key)?;
            self.broker.unwrap(&req.ciphertext, &BTreeMap::new()).await
        }
        .await;
        match result {
            Ok(u) => {
                self.record(&peer, "KmsV2Decrypt", &req.uid, started, &u.key, u.version, u.backend.clone(), Ok(()))
                    .await?;
                Ok(Response::new(DecryptResponse { plaintext: u.plaintext.to_vec() }))
            }
            Err(err) => {
                self.record(&peer, "KmsV2Decrypt", &req.uid, started, &self.key, 0, String::new(), Err(&err)).await?;
                Err(err.into())
            }
        }
    }
}
