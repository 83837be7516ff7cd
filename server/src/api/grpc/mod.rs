//! The gRPC services: `KeyBroker` (data plane) and `KeyAdmin` (admin plane),
//! thin layers that check input, call the [`crate::core::broker`] or
//! [`crate::core::keyring`], convert, and write one audit event per call.

pub mod key_admin;
pub mod key_broker;

use std::time::Instant;

use keybroker_client::pb;
use tonic::{Request, Status};

use crate::backend::Backends;
use crate::backend::health::HealthBoard;
use crate::core::keyring::{CachedKey, Count};
use crate::error::ServiceError;
use crate::security::identity;
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

/// One audit record in progress: who called what; finished with the key,
/// version and outcome. Never holds key material.
pub struct Audit {
    rpc: &'static str,
    identity: String,
    started: Instant,
}

impl Audit {
    /// Starts the record of `rpc` for the caller of `request`.
    pub fn start<T>(rpc: &'static str, request: &Request<T>) -> Self {
        let identity = identity::peer(request).map(|p| p.identity.clone()).unwrap_or_else(|_| "<none>".to_owned());
        Self { rpc, identity, started: Instant::now() }
    }

    /// Emits the event for a finished call.
    pub fn finish<T>(self, key: &str, version: u32, result: &Result<T, ServiceError>) {
        let latency_us = self.started.elapsed().as_micros() as u64;
        match result {
            Ok(_) => tracing::info!(
                target: "keybroker::audit",
                rpc = self.rpc, identity = %self.identity, key, version, result = "ok", latency_us
            ),
            Err(err) => tracing::info!(
                target: "keybroker::audit",
                rpc = self.rpc, identity = %self.identity, key, version,
                result = ?err.code(), error = %err.message(), latency_us
            ),
        }
    }
}

/// Turns a service result into a tonic one.
pub fn respond<T>(result: Result<T, ServiceError>) -> Result<tonic::Response<T>, Status> {
    result.map(tonic::Response::new).map_err(Status::from)
}
