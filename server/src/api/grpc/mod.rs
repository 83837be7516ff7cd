//! The gRPC services: `KeyBroker` (data plane) and `KeyAdmin` (admin plane),
//! thin layers that check input, call the [`crate::core::broker`] or
//! [`crate::core::keyring`], convert, authorize every key they touch
//! against the policy, and write the call's audit event.

pub mod key_admin;
pub mod key_broker;
pub mod route;
pub mod unary;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use keybroker_client::pb;
use tonic::{Request, Status};

use crate::backend::Backends;
use crate::backend::health::HealthBoard;
use crate::core::keyring::{CachedKey, Count};
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::security::audit::{AuditLog, Record, ReplyGate};
use crate::security::identity::{self, Peer};
use crate::security::limits::Limits;
use crate::security::policy::{Gate, Rpc};
use crate::store::{KeyMode, VersionState};

/// Converts a cached key into its API message, with the health of the
/// backends holding its versions.
pub fn key_message(key: &CachedKey, backends: &Backends, board: &HealthBoard) -> pb::Key {
    let r = &key.record;
    let key_id = |v: &crate::store::VersionRecord| {
        backends.get_mode(&v.backend, v.mode).map(|b| b.backend_key_id(&v.backend_ref)).unwrap_or_default()
    };
    pb::Key {
        name: r.name.clone(),
        backend: r.backend.clone(),
        current_version: r.current_version,
        min_decryption_version: r.min_decryption_version,
        versions: r
            .versions
            .iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: version_state(v.state) as i32,
                backend: v.backend.clone(),
                created_at_unix_seconds: v.created_at,
                wrap_count: key.wrap_count(v.version),
                backend_healthy: board.healthy(&v.backend),
                backend_key_id: key_id(v),
                mode: key_mode(v.mode) as i32,
                unwrap_count: key.unwrap_count(v.version),
                last_unwrap_unix_seconds: key.last_unwrap(v.version),
                rewrapped_in: key.total(v.version, Count::RewrapsIn),
                rewrapped_out: key.total(v.version, Count::RewrapsOut),
                outstanding_deks: key.outstanding(v.version),
                last_wrap_unix_seconds: v.last_wrap_at,
            })
            .collect(),
        deletion_allowed: r.deletion_allowed,
        labels: r.labels.clone(),
        // No policy is shown as none, not as an empty message.
        rotation_policy: (r.rotation_period_secs > 0 || r.max_wraps_per_version > 0).then_some(pb::RotationPolicy {
            rotation_period_seconds: r.rotation_period_secs,
            max_wraps_per_version: r.max_wraps_per_version,
        }),
        created_at_unix_seconds: r.created_at,
        updated_at_unix_seconds: r.updated_at,
        mode: key_mode(r.mode) as i32,
        backend_healthy: board.healthy(&r.backend),
    }
}

/// The API form of a key mode.
pub fn key_mode(mode: KeyMode) -> pb::KeyMode {
    match mode {
        KeyMode::Direct => pb::KeyMode::Direct,
        KeyMode::Hierarchy => pb::KeyMode::Hierarchy,
    }
}

fn version_state(state: VersionState) -> pb::VersionState {
    match state {
        VersionState::Active => pb::VersionState::Active,
        VersionState::DecryptOnly => pb::VersionState::DecryptOnly,
        VersionState::Disabled => pb::VersionState::Disabled,
        VersionState::Destroyed => pb::VersionState::Destroyed,
    }
}

/// The per-item error of a batch, with the code the single RPC would give.
pub fn item_error(err: &ServiceError) -> pb::ItemError {
    pb::ItemError { code: err.code().grpc() as i32, message: err.message().to_owned() }
}

/// What both services share to authorize, shed and record calls.
#[derive(Clone, Debug)]
pub struct Guards {
    /// The policy in force.
    pub gate: Arc<Gate>,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// The load limits (batches are charged per item).
    pub limits: Arc<Limits>,
}

impl Guards {
    /// Starts a call of `rpc` for the caller of `request`.
    pub fn call<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<Call<'_>, Status> {
        let info = identity::peer_info(request)?;
        Ok(Call {
            guards: self,
            rpc,
            identity: info.peer.name().clone(),
            peer: info.peer.clone(),
            replies: info.replies.clone(),
            started: Instant::now(),
            took: std::sync::OnceLock::new(),
            last: Default::default(),
        })
    }
}

/// The outcomes of a batch: per key, version, backend and outcome, how many
/// items.
pub type BatchGroups = BTreeMap<(String, u32, String, &'static str), (u64, Option<ErrorCode>)>;

/// What an audit event says about the key a call touched.
#[derive(Debug, Default, Clone)]
pub struct Touched {
    /// Key name.
    pub key: String,
    /// Key version; 0 when none applies.
    pub version: u32,
    /// Backend of the version.
    pub backend: String,
    /// SHA-256 of the encryption context.
    pub context_sha256: String,
}

impl Touched {
    /// A key, with no version.
    pub fn key(key: &str) -> Self {
        Self { key: key.to_owned(), ..Self::default() }
    }
}

/// One call in progress: who called what, since when.
pub struct Call<'a> {
    guards: &'a Guards,
    rpc: &'static str,
    peer: Arc<Peer>,
    identity: Arc<str>,
    /// The connection's hold on the reply until its event is written.
    replies: Option<Arc<ReplyGate>>,
    started: Instant,
    /// The call's duration, read from the clock once (for the metrics and
    /// the audit event) when its outcome is known.
    took: std::sync::OnceLock<std::time::Duration>,
    /// A batch's last decision: items of one key share it.
    last: std::sync::Mutex<Option<(Rpc, String, bool)>>,
}

impl Call<'_> {
    /// The caller.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The caller's name.
    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    /// The hash of a context for this call's audit event; batch events
    /// (one per key, version and outcome) carry none, so their items skip it.
    pub fn context_hash(&self, context: &std::collections::BTreeMap<String, String>) -> String {
        if self.rpc.starts_with("Batch") { String::new() } else { crate::security::audit::context_hash(context) }
    }

    /// PERMISSION_DENIED unless the caller may call `rpc` on `key`. In a
    /// batch, consecutive items of one key are decided once.
    pub fn allow(&self, rpc: Rpc, key: &str) -> ServiceResult<()> {
        if !self.rpc.starts_with("Batch") {
            return self.guards.gate.check(&self.peer, rpc, key);
        }
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let allowed = match last.as_ref() {
            Some((r, k, allowed)) if *r == rpc && k == key => *allowed,
            _ => {
                let allowed = self.guards.gate.policy().allows(&self.peer, rpc, key);
                *last = Some((rpc, key.to_owned(), allowed));
                allowed
            }
        };
        if allowed { Ok(()) } else { Err(crate::security::policy::denied(&self.peer, rpc, Some(key))) }
    }

    /// Whether the caller may call `rpc` on `key` (to filter a listing).
    pub fn peer_may(&self, rpc: Rpc, key: &str) -> bool {
        self.guards.gate.policy().allows(&self.peer, rpc, key)
    }

    /// PERMISSION_DENIED unless the caller may call `rpc` on some key.
    pub fn allow_somewhere(&self, rpc: Rpc) -> ServiceResult<()> {
        self.guards.gate.check_somewhere(&self.peer, rpc)
    }

    /// How long the call took, as of the first time this is asked.
    fn took(&self) -> std::time::Duration {
        *self.took.get_or_init(|| self.started.elapsed())
    }

    /// Counts the call in the metrics and names its key in its span.
    fn observe(&self, touched: &Touched, code: Option<ErrorCode>) {
        if let Some(m) = crate::telemetry::metrics::get() {
            let code = code.map_or(0, |c| c.grpc() as usize);
            m.request(crate::telemetry::metrics::rpc_index(self.rpc), code, self.took());
        }
        if crate::telemetry::exporting() {
            let span = tracing::Span::current();
            span.record("keybroker.key", touched.key.as_str());
            span.record("keybroker.version", touched.version);
            span.record("keybroker.backend", touched.backend.as_str());
            if let Some(code) = code {
                span.record("rpc.grpc.status_code", code.grpc() as i32);
                span.record("otel.status_code", "ERROR");
            }
        }
    }

    /// The audit record of one outcome.
    pub fn record(&self, touched: Touched, code: Option<ErrorCode>, count: u64, detail: String) -> Record {
        if code == Some(ErrorCode::PermissionDenied) {
            tracing::info!(identity = %self.identity, rpc = self.rpc, key = %touched.key, "permission denied");
        }
        Record {
            identity: self.identity.clone(),
            rpc: self.rpc,
            key: touched.key,
            version: touched.version,
            backend: touched.backend,
            code,
            latency_us: self.took().as_micros() as u64,
            count,
            context_sha256: touched.context_sha256,
            detail,
        }
    }

    /// Records a data-plane call and answers it. Fails closed: a call whose
    /// event cannot be written answers UNAVAILABLE, and its result (a
    /// plaintext, a ciphertext) is withheld.
    pub async fn finish_data<T>(
        self,
        touched: Touched,
        result: ServiceResult<T>,
    ) -> Result<tonic::Response<T>, Status> {
        let (code, detail) = outcome(&result);
        self.observe(&touched, code);
        let record = self.record(touched, code, 1, detail);
        self.record_before_reply(std::iter::once(record)).await?;
        respond(result)
    }

    /// Records the events of a batch (one per key, version and outcome,
    /// with its count) and answers it, failing closed like a single call.
    pub async fn finish_batch<T>(
        self,
        groups: BatchGroups,
        result: ServiceResult<T>,
    ) -> Result<tonic::Response<T>, Status> {
        let first = groups.keys().next().map(|(k, v, b, _)| Touched {
            key: k.clone(),
            version: *v,
            backend: b.clone(),
            ..Touched::default()
        });
        self.observe(&first.unwrap_or_default(), result.as_ref().err().map(ServiceError::code));
        if let Err(err) = &result {
            let record = self.record(Touched::default(), Some(err.code()), 1, err.message().to_owned());
            self.record_before_reply(std::iter::once(record)).await?;
            return respond(result);
        }
        let records: Vec<Record> = groups
            .into_iter()
            .map(|((key, version, backend, _), (count, code))| {
                let touched = Touched { key, version, backend, context_sha256: String::new() };
                self.record(touched, code, count, String::new())
            })
            .collect();
        self.record_before_reply(records).await?;
        respond(result)
    }

    /// Records a data-plane call's events so that none of its reply leaves
    /// before they are written: queued for the connection's gate when it has
    /// one (no wait here), else written before this returns.
    async fn record_before_reply(&self, records: impl IntoIterator<Item = Record>) -> ServiceResult<()> {
        match &self.replies {
            Some(gate) => gate.record_all(records),
            None => self.guards.audit.record_all(records).await,
        }
    }

    /// Records an admin call and answers it. The change is made already, so
    /// a failed audit write does not turn it into an error (admin calls are
    /// refused beforehand while the audit sink fails, see [`Call::ready`]);
    /// it is logged and counted.
    pub async fn finish_admin<T>(
        self,
        touched: Touched,
        result: ServiceResult<T>,
    ) -> Result<tonic::Response<T>, Status> {
        let (code, detail) = outcome(&result);
        self.observe(&touched, code);
        let record = self.record(touched, code, 1, detail);
        if let Err(err) = self.guards.audit.record(record).await {
            tracing::error!(rpc = self.rpc, %err, "an admin call's audit event was not written");
        }
        respond(result)
    }

    /// UNAVAILABLE while a fail-closed audit log cannot be written: admin
    /// calls check this before they change anything.
    pub fn ready(&self) -> ServiceResult<()> {
        self.guards.audit.ready()
    }
}

fn outcome<T>(result: &ServiceResult<T>) -> (Option<ErrorCode>, String) {
    match result {
        Ok(_) => (None, String::new()),
        Err(err) => (Some(err.code()), err.message().to_owned()),
    }
}

/// Turns a service result into a tonic one.
pub fn respond<T>(result: Result<T, ServiceError>) -> Result<tonic::Response<T>, Status> {
    result.map(tonic::Response::new).map_err(Status::from)
}
