//! Assembles a broker from its configuration and serves it: the version
//! table, the backends, both keybroker services behind their role checks,
//! `grpc.health.v1.Health` and server reflection (v1 and v1alpha), all on one
//! mTLS port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keybroker_client::pb;
use keybroker_client::pb::key_admin_server::KeyAdminServer;
use keybroker_client::pb::key_broker_server::KeyBrokerServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::auth::{Authorizer, Plane, require};
use crate::backend::local::LocalBackend;
use crate::backend::root_key::{RootKey, RootKeyError};
use crate::backend::{BackendError, Backends, VersionRef};
use crate::broker::Broker;
use crate::config::{BackendConfig, Config, ConfigError, Environment, StoreConfig};
use crate::error::ServiceError;
use crate::keyring::{Keyring, NewKey};
use crate::listener::{Incoming, bind_unix};
use crate::service::key_admin::KeyAdminService;
use crate::service::key_broker::KeyBrokerService;
use crate::store::sqlite::SqliteStore;
use crate::store::{KeyStore, StoreError, VersionState};
use crate::tls::{self, TlsError};

/// The health service name of a backend: `keybroker.backend.<name>`.
pub fn backend_health_name(backend: &str) -> String {
    format!("keybroker.backend.{backend}")
}

/// Why a broker could not start. Each message names the setting or file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The root key is missing, unreadable or wrong.
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    /// The version table cannot be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listener cannot bind.
    #[error("invalid setting `listen`: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configured root key does not open the stored KEKs.
    #[error("root key does not open the stored keys: {0}")]
    WrongRootKey(BackendError),
    /// Something else at start (reflection setup, bootstrap key).
    #[error("{0}")]
    Other(String),
}

/// Extra start-up behaviour for `keybroker dev`.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Keys created at start when missing.
    pub ensure_keys: Vec<String>,
}

async fn build_backends(config: &Config, env: &Environment) -> Result<Backends, StartError> {
    let mut backends = Backends::default();
    for (name, backend) in &config.backends {
        match backend {
            BackendConfig::Local {} => {
                let root = match (&config.root_key.file, env.root_key_secret()) {
                    (Some(file), _) => RootKey::from_file(file)?,
                    (None, Some(secret)) => RootKey::from_base64(&secret, crate::config::ENV_ROOT_KEY)?,
                    (None, None) => return Err(RootKeyError::Missing.into()),
                };
                backends.insert(Arc::new(LocalBackend::new(name.clone(), root)));
            }
        }
    }
    Ok(backends)
}

async fn open_store(config: &Config) -> Result<Arc<dyn KeyStore>, StartError> {
    match &config.store {
        StoreConfig::Sqlite { path } => Ok(Arc::new(SqliteStore::open(path).await?)),
    }
}

/// Fails start-up when a local backend's root key cannot open the material
/// already in the table (started with the wrong root key).
async fn verify_root_key(keyring: &Keyring) -> Result<(), StartError> {
    let matcher = globset::Glob::new("*").map_err(|e| StartError::Other(e.to_string()))?.compile_matcher();
    let mut checked = std::collections::BTreeSet::new();
    let (keys, _) = keyring.list(&matcher, "", usize::MAX);
    for key in keys {
        for v in &key.record.versions {
            if v.state == VersionState::Destroyed || checked.contains(&v.backend) {
                continue;
            }
            let Ok(backend) = keyring.backends().get(&v.backend) else { continue };
            if backend.kind() != "local" {
                continue;
            }
            let version = VersionRef { key: &key.record.name, version: v.version, reference: &v.backend_ref };
            backend.export(version).await.map_err(StartError::WrongRootKey)?;
            checked.insert(v.backend.clone());
        }
    }
    Ok(())
}

/// Serves `config` until SIGINT or SIGTERM. `on_listening` is called with
/// the bound address once the port accepts connections.
pub async fn run(
    config: Config,
    env: &Environment,
    options: RunOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), StartError> {
    let backends = build_backends(&config, env).await?;
    let store = open_store(&config).await?;
    let keyring = Arc::new(Keyring::new(store, backends.clone(), config.default_backend.clone()));
    let loaded = keyring.load().await.map_err(|e: ServiceError| StartError::Other(e.to_string()))?;
    verify_root_key(&keyring).await?;
    tracing::info!(keys = loaded, "version table loaded");
    for name in &options.ensure_keys {
        let missing = match keyring.key(name).await {
            Ok(_) => false,
            Err(err) if err.code() == crate::error::ErrorCode::NotFound => true,
            Err(err) => return Err(StartError::Other(format!("reading key {name:?}: {err}"))),
        };
        if missing {
            keyring
                .create(NewKey { name: name.clone(), ..Default::default() })
                .await
                .map_err(|e| StartError::Other(format!("creating key {name:?}: {e}")))?;
            tracing::info!(key = %name, "created key");
        }
    }

    let broker = Arc::new(Broker::new(keyring.clone(), config.limits.clone()));
    let max_message = config.limits.max_message_bytes;
    let data_plane = InterceptedService::new(
        KeyBrokerServer::new(KeyBrokerService::new(broker))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        require(Plane::Data),
    );
    let admin_plane = InterceptedService::new(
        KeyAdminServer::new(KeyAdminService::new(keyring.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        require(Plane::Admin),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KeyBrokerServer<KeyBrokerService>>().await;
    health.set_serving::<KeyAdminServer<KeyAdminService>>().await;
    for (name, backend) in backends.iter() {
        let status = match backend.health().await {
            Ok(()) => ServingStatus::Serving,
            Err(err) => {
                tracing::warn!(backend = %name, %err, "backend unhealthy at start");
                ServingStatus::NotServing
            }
        };
        health.set_service_status(backend_health_name(name), status).await;
    }

    // grpcurl 1.8 speaks only v1alpha; newer tools speak v1: serve both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| StartError::Other(format!("reflection: {e}")))?;

    let tls_config = tls::server_config(&config.tls)?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let incoming = Incoming::new(Arc::new(Authorizer::new(&config.auth)));
    incoming.add_tls(listener, tls_config, Duration::from_secs(config.tls.handshake_timeout_seconds));
    if let Some(unix) = &config.unix_socket {
        let listener = bind_unix(&unix.path).map_err(|e| {
            StartError::Other(format!("invalid setting `unix_socket.path`: {}: {e}", unix.path.display()))
        })?;
        incoming.add_unix(listener);
        tracing::info!(path = %unix.path.display(), "keybroker serving on unix socket (mode 0600)");
    }
    let incoming = incoming.into_stream();
    tracing::info!(%addr, "keybroker serving (mTLS, TLS 1.3)");
    on_listening(addr);

    let stop = Arc::new(tokio::sync::Notify::new());
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(data_plane)
        .add_service(admin_plane)
        .serve_with_incoming_shutdown(incoming, {
            let stop = stop.clone();
            async move {
                shutdown_signal().await;
                stop.notify_one();
            }
        });
    // Graceful shutdown waits for every connection to close, and idle gRPC
    // clients keep theirs open: bound the wait.
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    tokio::select! {
        result = serve => result.map_err(|e| StartError::Other(format!("server stopped: {e}")))?,
        () = async { stop.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_seconds = grace.as_secs(), "grace period over; closing remaining connections");
        }
    }
    tracing::info!("keybroker stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}
