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

use crate::api::grpc::Guards;
use crate::api::grpc::key_admin::KeyAdminService;
use crate::api::grpc::key_broker::KeyBrokerService;
use crate::api::listener::{Incoming, bind_unix};
use crate::backend::aws_kms::{AwsKmsBackend, AwsKmsSettings};
use crate::backend::health::{HealthBoard, spawn_monitor};
use crate::backend::hierarchy::HierarchyBackend;
use crate::backend::local::LocalBackend;
use crate::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use crate::backend::root_key::{RootKey, RootKeyError};
use crate::backend::{Aad, BackendError, BackendRef, Backends, KeyBackend, VersionRef};
use crate::config::{BackendConfig, Config, ConfigError, Environment, StoreConfig};
use crate::core::broker::Broker;
use crate::core::keyring::{Keyring, NewKey};
use crate::core::migration::Migrator;
use crate::error::ServiceError;
use crate::security::audit::{AuditError, AuditLog};
use crate::security::limits::{LimitLayer, Limits};
use crate::security::policy::{Gate, Policy};
use crate::security::reload::Reloader;
use crate::security::tls::{self, TlsError};
use crate::store::guarded::GuardedStore;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{KeyStore, StoreError, VersionState};
use crate::telemetry::http::Readiness;
use crate::telemetry::metrics;
use crate::telemetry::state::BrokerSources;

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
    #[error("invalid setting `listen`: cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
    /// The configured root key does not open the stored KEKs.
    #[error("root key does not open the stored keys: {0}")]
    WrongRootKey(BackendError),
    /// The audit log cannot be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Something else at start (reflection setup, bootstrap key).
    #[error("{0}")]
    Other(String),
}

/// Extra start-up behaviour for `keybroker dev`.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Keys created at start when missing.
    pub ensure_keys: Vec<String>,
    /// The configuration file, read again on SIGHUP or when it changes.
    pub config_path: Option<std::path::PathBuf>,
}

/// The PIN of a pkcs11 backend, from its file or environment variable.
fn read_pin(
    name: &str,
    pin_file: Option<&std::path::Path>,
    pin_env: Option<&str>,
    env: &Environment,
) -> Result<zeroize::Zeroizing<String>, StartError> {
    if let Some(file) = pin_file {
        let text = crate::backend::root_key::read_private_file(file).map_err(|e| {
            StartError::Other(format!("invalid setting `backends.{name}.pin_file`: {}: {e}", file.display()))
        })?;
        return Ok(zeroize::Zeroizing::new(text.trim().to_owned()));
    }
    let var = pin_env.unwrap_or_default();
    env.get_any(var).ok_or_else(|| {
        StartError::Other(format!("invalid setting `backends.{name}.pin_env`: environment variable {var} is not set"))
    })
}

/// Builds the remote backends (AWS KMS, PKCS#11) and their hierarchy-mode
/// wrappers.
async fn build_remote_backends(config: &Config, env: &Environment) -> Result<Backends, StartError> {
    let mut backends = Backends::default();
    for (name, backend) in &config.backends {
        let (remote, ttl): (Arc<dyn KeyBackend>, u64) = match backend {
            BackendConfig::Local {} => continue,
            BackendConfig::AwsKms { region, endpoint, timeout_ms, hierarchy_ttl_seconds } => {
                let settings = AwsKmsSettings {
                    region: region.clone(),
                    endpoint: endpoint.clone(),
                    timeout: Duration::from_millis(*timeout_ms),
                };
                (Arc::new(AwsKmsBackend::new(name.clone(), &settings).await), *hierarchy_ttl_seconds)
            }
            BackendConfig::Pkcs11 {
                module,
                token_label,
                slot,
                pin_file,
                pin_env,
                sessions,
                timeout_ms,
                hierarchy_ttl_seconds,
            } => {
                let settings = Pkcs11Settings {
                    module: module.clone(),
                    token_label: token_label.clone(),
                    slot: *slot,
                    pin: read_pin(name, pin_file.as_deref(), pin_env.as_deref(), env)?,
                    sessions: *sessions,
                    timeout: Duration::from_millis(*timeout_ms),
                };
                (Arc::new(Pkcs11Backend::new(name.clone(), settings)), *hierarchy_ttl_seconds)
            }
        };
        let hierarchy = Arc::new(
            HierarchyBackend::new(remote.clone(), Duration::from_secs(ttl)).with_max_ciphers(config.cache.max_ciphers),
        );
        HierarchyBackend::spawn_expiry(&hierarchy);
        backends.insert_hierarchy(name, hierarchy);
        backends.insert(remote);
    }
    Ok(backends)
}

/// Additional data of a root key sealed by a remote backend.
const ROOT_KEY_SEAL_HEADER: &[u8] = b"keybroker.root-key.v1";

/// The remote backend and reference that seal the root key, per `[root_key]`.
async fn root_key_sealer(
    config: &Config,
    backends: &Backends,
) -> Result<Option<(Arc<dyn KeyBackend>, BackendRef)>, StartError> {
    let (Some(by), Some(key)) = (&config.root_key.sealed_by, &config.root_key.sealed_by_key) else {
        return Ok(None);
    };
    let backend = backends.get(by).map_err(|e| StartError::Other(e.to_string()))?.clone();
    let reference = backend
        .attach(crate::backend::root_key::ROOT_KEY_NAME, 1, key)
        .await
        .map_err(|e| StartError::Other(format!("invalid setting `root_key.sealed_by_key`: {e}")))?;
    Ok(Some((backend, reference)))
}

async fn load_root_key(config: &Config, env: &Environment, backends: &Backends) -> Result<RootKey, StartError> {
    if let Some(file) = &config.root_key.file {
        return Ok(RootKey::from_file(file)?);
    }
    if let (Some(sealed_file), Some((backend, reference))) =
        (&config.root_key.sealed_file, root_key_sealer(config, backends).await?)
    {
        let sealed = std::fs::read(sealed_file).map_err(|e| {
            StartError::Other(format!("invalid setting `root_key.sealed_file`: {}: {e}", sealed_file.display()))
        })?;
        let context = Default::default();
        let version = VersionRef::new(crate::backend::root_key::ROOT_KEY_NAME, 1, &reference);
        let key = backend
            .unwrap(version, &sealed, Aad { header: ROOT_KEY_SEAL_HEADER, context: &context })
            .await
            .map_err(|e| StartError::Other(format!("unsealing the root key with backend {:?}: {e}", backend.name())))?;
        return Ok(RootKey::from_bytes(&key)?);
    }
    match env.root_key_secret() {
        Some(secret) => Ok(RootKey::from_base64(&secret, crate::config::ENV_ROOT_KEY)?),
        None => Err(RootKeyError::Missing.into()),
    }
}

pub(crate) async fn build_backends(config: &Config, env: &Environment) -> Result<Backends, StartError> {
    let mut backends = build_remote_backends(config, env).await?;
    let locals: Vec<&String> =
        config.backends.iter().filter(|(_, b)| matches!(b, BackendConfig::Local {})).map(|(n, _)| n).collect();
    if !locals.is_empty() {
        for name in locals {
            let root = load_root_key(config, env, &backends).await?;
            backends.insert(Arc::new(LocalBackend::new(name.clone(), root).with_max_ciphers(config.cache.max_ciphers)));
        }
    }
    Ok(backends)
}

/// `keybroker seal-root-key`: makes a new random root key, seals it with the
/// remote backend of `[root_key]`, and writes `root_key.sealed_file` (mode
/// 0600, never overwritten).
pub async fn seal_root_key(config: &Config, env: &Environment) -> Result<std::path::PathBuf, StartError> {
    let backends = build_remote_backends(config, env).await?;
    let (Some(sealed_file), Some((backend, reference))) =
        (&config.root_key.sealed_file, root_key_sealer(config, &backends).await?)
    else {
        return Err(StartError::Other(
            "set root_key.sealed_file, root_key.sealed_by and root_key.sealed_by_key first".to_owned(),
        ));
    };
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    rand::Rng::fill_bytes(&mut rand::rng(), key.as_mut_slice());
    let context = Default::default();
    let version = VersionRef::new(crate::backend::root_key::ROOT_KEY_NAME, 1, &reference);
    let mut sealed = Vec::new();
    backend
        .wrap(version, key.as_slice(), Aad { header: ROOT_KEY_SEAL_HEADER, context: &context }, &mut sealed)
        .await
        .map_err(|e| StartError::Other(format!("sealing the root key with backend {:?}: {e}", backend.name())))?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(sealed_file).map_err(|e| {
            StartError::Other(format!("invalid setting `root_key.sealed_file`: {}: {e}", sealed_file.display()))
        })?;
    file.write_all(&sealed).map_err(|e| StartError::Other(format!("{}: {e}", sealed_file.display())))?;
    Ok(sealed_file.clone())
}

/// `keybroker create-remote-key`: creates a key in a remote backend (a KMS
/// key, an HSM object labelled `label`) for `root_key.sealed_by_key`, and
/// returns its id.
pub async fn create_remote_key(
    config: &Config,
    env: &Environment,
    backend: &str,
    label: &str,
) -> Result<String, StartError> {
    let backends = build_remote_backends(config, env).await?;
    let remote = backends.get(backend).map_err(|e| StartError::Other(e.to_string()))?;
    crate::core::keyring::check_key_name(label).map_err(|e| StartError::Other(e.to_string()))?;
    let reference = remote.create_root_key(label).await.map_err(|e| StartError::Other(e.to_string()))?;
    Ok(remote.backend_key_id(&reference))
}

pub(crate) async fn open_store(config: &Config) -> Result<Arc<dyn KeyStore>, StartError> {
    match &config.store {
        StoreConfig::Sqlite { path } => Ok(Arc::new(GuardedStore::new(
            Arc::new(SqliteStore::open(path).await?),
            format!("SQLite file {}", path.display()),
        ))),
        StoreConfig::Postgres { url, pool_size, timeout_ms } => {
            let store = PostgresStore::open(url, *pool_size, Duration::from_millis(*timeout_ms)).await?;
            Ok(Arc::new(GuardedStore::new(Arc::new(store), format!("PostgreSQL at {url}"))))
        }
    }
}

/// Keys whose material start-up opens to check the root key.
const ROOT_KEY_CHECK_KEYS: usize = 256;

/// Fails start-up when a local backend's root key cannot open the material
/// already in the table (started with the wrong root key): one version per
/// local backend among the first keys of the table is opened.
async fn verify_root_key(keyring: &Keyring) -> Result<(), StartError> {
    let mut checked = std::collections::BTreeSet::new();
    let keys = keyring
        .store()
        .list_page("", ROOT_KEY_CHECK_KEYS)
        .await
        .map_err(|e| StartError::Other(format!("reading the version table: {e}")))?;
    for key in keys {
        for v in &key.versions {
            if v.state == VersionState::Destroyed || checked.contains(&v.backend) {
                continue;
            }
            let Ok(backend) = keyring.backends().get(&v.backend) else { continue };
            if backend.kind() != "local" {
                continue;
            }
            let version = VersionRef::new(&key.name, v.version, &v.backend_ref);
            backend.export(version).await.map_err(StartError::WrongRootKey)?;
            checked.insert(v.backend.clone());
        }
    }
    Ok(())
}

/// Reads the version table into the cache behind a serving broker.
fn spawn_cache_warmer(keyring: Arc<Keyring>) {
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        match keyring.warm().await {
            Ok(added) => tracing::info!(
                keys = added,
                cached = keyring.cached_len(),
                ms = started.elapsed().as_millis() as u64,
                "version table read into the cache"
            ),
            Err(err) => tracing::warn!(%err, "reading the version table into the cache stopped; keys are read on use"),
        }
    });
}

/// Serves `config` until SIGINT or SIGTERM. `on_listening` is called with
/// the bound gRPC address (and the metrics listener's, when on) once the
/// port accepts connections.
pub async fn run(
    config: Config,
    env: &Environment,
    options: RunOptions,
    on_listening: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), StartError> {
    // The metrics listener comes first: /readyz says "not ready" while the
    // rest starts.
    let readiness = Arc::new(Readiness::default());
    let metrics_server = match config.metrics.listen {
        Some(addr) => {
            Some(crate::telemetry::http::serve(addr, metrics::enable(), readiness.clone()).await.map_err(|e| {
                StartError::Other(format!("invalid setting `metrics.listen`: cannot listen on {addr}: {e}"))
            })?)
        }
        None => None,
    };
    let backends = build_backends(&config, env).await?;
    let store = open_store(&config).await?;
    let keyring = Arc::new(Keyring::new(store, backends.clone(), config.default_backend.clone()));
    keyring.set_max_keys(config.cache.max_keys);
    keyring.start().await.map_err(|e: ServiceError| StartError::Other(e.to_string()))?;
    verify_root_key(&keyring).await?;
    let audit = AuditLog::open(&config.audit)?;
    keyring.set_audit(audit.clone());
    if config.cache.warm {
        spawn_cache_warmer(keyring.clone());
    }
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

    keyring.set_retirement_window(i64::try_from(config.retirement_window_seconds).unwrap_or(i64::MAX));
    spawn_usage_flusher(keyring.clone(), Duration::from_millis(config.usage_flush_interval_ms.max(10)));
    let (health, health_service) = tonic_health::server::health_reporter();
    readiness.set_loaded();
    spawn_change_follower(
        keyring.clone(),
        Duration::from_millis(config.propagation_interval_ms),
        health.clone(),
        readiness.clone(),
    );
    spawn_rotation_scheduler(
        keyring.clone(),
        Duration::from_millis(config.rotation_check_interval_ms),
        config.limits.max_wraps_per_version,
    );
    let lease = Duration::from_millis(config.migration_lease_ms);
    let migrator = Migrator::new(keyring.clone(), lease);
    let resumed =
        migrator.resume_unfinished().await.map_err(|e| StartError::Other(format!("resuming migrations: {e}")))?;
    if resumed > 0 {
        tracing::info!(jobs = resumed, "following unfinished migration jobs");
    }
    spawn_job_follower(migrator.clone(), lease / 2);
    let board = Arc::new(HealthBoard::default());
    if let Some(server) = &metrics_server {
        server.set_sources(Arc::new(BrokerSources::new(
            keyring.clone(),
            board.clone(),
            migrator.clone(),
            audit.clone(),
            readiness.clone(),
            config.metrics.max_key_series,
            config.limits.max_wraps_per_version,
        )));
    }
    let broker = Arc::new(Broker::new(keyring.clone(), config.limits.clone()));
    let max_message = config.limits.max_message_bytes;
    let gate = Arc::new(Gate::new(
        Policy::compile(&config.auth, &config.policy).map_err(|e| StartError::Other(format!("policy: {e}")))?,
    ));
    let limits = Limits::new(&config.limits);
    let guards = Guards { gate: gate.clone(), audit: audit.clone(), limits: limits.clone() };
    if let Some(kms) = &config.kms_v2 {
        crate::core::keyring::check_key_name(&kms.key)
            .map_err(|e| StartError::Other(format!("invalid setting `kms_v2.key`: {e}")))?;
        let listener = bind_unix(&kms.socket, 0o600).map_err(|e| {
            StartError::Other(format!("invalid setting `kms_v2.socket`: {}: {e}", kms.socket.display()))
        })?;
        let incoming = Incoming::new(gate.clone(), None);
        incoming.add_unix(listener);
        let service =
            crate::api::kms_v2::KmsV2Service::new(broker.clone(), gate.clone(), audit.clone(), kms.key.clone())
                .into_server();
        tokio::spawn(async move {
            if let Err(err) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming.into_stream())
                .await
            {
                tracing::error!(%err, "the KMS v2 plugin socket stopped");
            }
        });
        tracing::info!(socket = %kms.socket.display(), key = %kms.key, "Kubernetes KMS v2 plugin listening");
    }
    if let Some(xks) = &config.xks {
        let service = crate::api::xks::XksService::new(xks, env, broker.clone(), gate.clone(), audit.clone())
            .map_err(StartError::Other)?;
        let tls = crate::api::xks::tls_config(xks).map_err(StartError::Other)?;
        let listener = TcpListener::bind(xks.listen).await.map_err(|e| {
            StartError::Other(format!("invalid setting `xks.listen`: cannot listen on {}: {e}", xks.listen))
        })?;
        crate::api::xks::serve(Arc::new(service), listener, tls, xks.client_cns.clone());
        tracing::info!(addr = %xks.listen, "XKS proxy API listening (HTTPS, SigV4)");
    }
    let data_plane = tower::Layer::layer(
        &LimitLayer::new(guards.limits.clone()),
        crate::api::grpc::unary::DataPlane::new(KeyBrokerService::new(broker, guards.clone()), max_message),
    );
    let admin_plane = tower::Layer::layer(
        &LimitLayer::new(guards.limits.clone()),
        KeyAdminServer::new(KeyAdminService::new(keyring.clone(), board.clone(), migrator, guards))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
    );

    health.set_serving::<KeyBrokerServer<KeyBrokerService>>().await;
    health.set_service_status(STORE_HEALTH_SERVICE, tonic_health::ServingStatus::Serving).await;
    health.set_serving::<KeyAdminServer<KeyAdminService>>().await;
    health.set_service_status(LIVENESS_HEALTH_SERVICE, tonic_health::ServingStatus::Serving).await;
    if let Some(addr) = config.health_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Other(format!("invalid setting `health_listen`: cannot listen on {addr}: {e}")))?;
        let health_only = health_service.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(err) =
                tonic::transport::Server::builder().add_service(health_only).serve_with_incoming(incoming).await
            {
                tracing::error!(%err, "the plain-text health listener stopped");
            }
        });
        tracing::info!(%addr, "health service (plain text) listening");
    }
    crate::backend::health::check_all(&backends, &board, &health).await;
    spawn_monitor(
        backends.clone(),
        board.clone(),
        health.clone(),
        Duration::from_millis(config.health_check_interval_ms),
    );

    // grpcurl 1.8 speaks only v1alpha; newer tools speak v1: serve both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| StartError::Other(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| StartError::Other(format!("reflection: {e}")))?;

    let tls_config = Arc::new(tls::TlsHolder::new(tls::server_config(&config.tls)?));
    let listener =
        TcpListener::bind(config.listen).await.map_err(|cause| StartError::Bind { addr: config.listen, cause })?;
    let addr = listener.local_addr().map_err(|cause| StartError::Bind { addr: config.listen, cause })?;
    let incoming = Incoming::new(gate.clone(), Some(audit.clone()));
    spawn_audit_flusher(audit.clone());
    incoming.add_tls(listener, tls_config.clone(), Duration::from_secs(config.tls.handshake_timeout_seconds));
    Reloader {
        path: options.config_path.clone(),
        env: env.clone(),
        gate,
        tls: tls_config,
        interval: Duration::from_millis(config.reload_check_interval_ms),
    }
    .spawn(&config);
    if let Some(unix) = &config.unix_socket {
        let mode =
            unix.mode_bits().map_err(|e| StartError::Other(format!("invalid setting `unix_socket.mode`: {e}")))?;
        let listener = bind_unix(&unix.path, mode).map_err(|e| {
            StartError::Other(format!("invalid setting `unix_socket.path`: {}: {e}", unix.path.display()))
        })?;
        incoming.add_unix(listener);
        tracing::info!(path = %unix.path.display(), mode = %unix.mode, "keybroker serving on unix socket");
    }
    let incoming = incoming.into_stream();
    tracing::info!(%addr, "keybroker serving (mTLS, TLS 1.3)");
    on_listening(addr, metrics_server.as_ref().map(|m| m.addr));

    let stop = Arc::new(tokio::sync::Notify::new());
    // The data plane is reached through its own route, not the router.
    let serve = tonic::transport::Server::builder()
        .layer(crate::api::grpc::route::DataPlaneRoute::new(data_plane))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
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
    audit.flush_pending();
    let started = std::time::Instant::now();
    match keyring.flush_usage().await {
        Ok(rows) => tracing::info!(rows, ms = started.elapsed().as_millis() as u64, "last usage counts written"),
        Err(err) => tracing::warn!(%err, "could not write the last usage counts"),
    }
    tracing::info!("keybroker stopped");
    Ok(())
}

/// The health service that is SERVING while the process runs (liveness).
pub const LIVENESS_HEALTH_SERVICE: &str = "keybroker.liveness";

/// The health service that reports whether the version table is reachable.
pub const STORE_HEALTH_SERVICE: &str = "keybroker.store";

/// Follows the changes other brokers make to the table: every `interval`,
/// and at once when the store signals one (PostgreSQL NOTIFY).
fn spawn_change_follower(
    keyring: Arc<Keyring>,
    interval: Duration,
    health: tonic_health::server::HealthReporter,
    readiness: Arc<Readiness>,
) {
    tokio::spawn(async move {
        let signal = keyring.store().change_signal();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            match &signal {
                Some(signal) => tokio::select! {
                    _ = tick.tick() => {},
                    () = signal.notified() => {},
                },
                None => {
                    tick.tick().await;
                }
            }
            match keyring.sync().await {
                Ok(n) => {
                    if failing {
                        tracing::info!("following the version table's changes again");
                        set_store_health(&health, &readiness, true).await;
                    }
                    failing = false;
                    if n > 0 {
                        tracing::debug!(keys = n, seq = keyring.seen_seq(), "reloaded keys changed by other brokers");
                    }
                }
                Err(err) if !failing => {
                    failing = true;
                    set_store_health(&health, &readiness, false).await;
                    tracing::warn!(%err, "cannot follow the version table's changes; serving from the cache");
                }
                Err(_) => {}
            }
        }
    });
}

/// Publishes whether the version table answers: its own health service,
/// the whole server's (`""`: NOT_SERVING while the store is unreachable;
/// keys are still served from the cache, but a new or changed key would not
/// be seen), and `/readyz`.
async fn set_store_health(health: &tonic_health::server::HealthReporter, readiness: &Readiness, reachable: bool) {
    let status = if reachable { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.set_service_status(STORE_HEALTH_SERVICE, status).await;
    health.set_service_status("", status).await;
    readiness.set_store_reachable(reachable);
}

/// Follows the unfinished migration jobs of the table (started on any
/// broker), every `interval`, so a job whose broker died is taken over.
fn spawn_job_follower(migrator: Arc<Migrator>, interval: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(err) = migrator.resume_unfinished().await {
                tracing::debug!(%err, "cannot list unfinished migration jobs; will retry");
            }
        }
    });
}

/// Rotates the keys due for rotation, every `interval`.
fn spawn_rotation_scheduler(keyring: Arc<Keyring>, interval: Duration, hard_max_wraps: u64) {
    tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let wait = match keyring.rotate_due(hard_max_wraps).await {
                Ok(_) => paced(interval, started.elapsed(), keyring.cached_len() > LARGE_WORK),
                Err(err) => {
                    tracing::debug!(%err, "cannot look for keys due for rotation; will retry");
                    interval
                }
            };
            tokio::time::sleep_until(started + wait).await;
        }
    });
}

/// Writes, every second, the audit events queued by calls whose replies
/// did not go out (connections write the others before their replies).
fn spawn_audit_flusher(audit: Arc<AuditLog>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            audit.flush_pending();
        }
    });
}

/// Writes unwrap counts to the store every `interval`, a batch at a time
/// (`Keyring::flush_usage_batch`).
fn spawn_usage_flusher(keyring: Arc<Keyring>, interval: Duration) {
    tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let wait = match keyring.flush_usage_batch().await {
                Ok((rows, more)) => {
                    let took = started.elapsed();
                    tracing::debug!(rows, more, ms = took.as_millis() as u64, "usage counts written");
                    // More keys listed (traffic over many keys): the next
                    // batch follows at the background share, not after a
                    // whole interval nor at once.
                    if more {
                        took.saturating_mul(BACKGROUND_SHARE).min(MAX_BACKGROUND_INTERVAL)
                    } else {
                        paced(interval, took, rows > LARGE_WORK)
                    }
                }
                // Time spent waiting on a store that is down is not work.
                Err(err) => {
                    tracing::warn!(%err, "writing unwrap counts failed; will retry");
                    interval
                }
            };
            tokio::time::sleep_until(started + wait).await;
        }
    });
}

/// Background work that succeeded in `took` runs again after `interval`, or,
/// when it was `large` (over [`LARGE_WORK`] keys or rows), after
/// [`BACKGROUND_SHARE`] times what it took when that is longer (at most
/// [`MAX_BACKGROUND_INTERVAL`]): a table of a million keys makes the rotation
/// check and the usage flush longer, not a larger share of the time. Small
/// work is never paced: a flush of a few rows that waited on a database
/// reconnecting is slow without being work, and pacing it held later counts
/// back for up to 30 s.
fn paced(interval: Duration, took: Duration, large: bool) -> Duration {
    if !large {
        return interval;
    }
    interval.max(took.saturating_mul(BACKGROUND_SHARE).min(MAX_BACKGROUND_INTERVAL))
}

/// See [`paced`]: keys cached or rows flushed beyond which background work
/// paces itself.
const LARGE_WORK: usize = 10_000;

/// See [`paced`]: background work takes at most 1/20 of the time.
const BACKGROUND_SHARE: u32 = 20;
/// See [`paced`].
const MAX_BACKGROUND_INTERVAL: Duration = Duration::from_secs(30);

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

/// Opens the version table and backends of the configuration at `path`
/// without serving (offline migrate, backup, restore).
pub async fn open_offline(path: &std::path::Path, env: &Environment) -> Result<crate::core::copy::Side, StartError> {
    let config = Config::load(Some(path), env)?;
    let backends = build_backends(&config, env).await?;
    let store = open_store(&config).await?;
    Ok(crate::core::copy::Side { backends, store, default_backend: config.default_backend })
}

/// The async runtime for `workers` threads: with one, a single-threaded
/// runtime. A multi-threaded runtime with one worker runs a connection's
/// task right after each call that answers on it (its last-woken slot), so
/// every answer went out in a write of its own; single-threaded, the calls
/// that are ready run first and their connection writes their answers
/// together (a fifth of the writes, about 20% less CPU per call on one
/// core). The benchmark's echo server and load generator use it too.
pub fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
}

/// The CPUs this process may use (affinity and cgroup quota count).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
