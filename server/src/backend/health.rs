//! Backend health: a monitor checks every backend on an interval (each check
//! bounded by the backend's timeout) and publishes the result to
//! `grpc.health.v1` (service `keybroker.backend.<name>`) and to a board that
//! GetKey, ListKeys and ListBackends read.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::Backends;

/// The last health check of each backend: `Ok` or the reason it failed.
#[derive(Debug, Default)]
pub struct HealthBoard {
    status: RwLock<BTreeMap<String, Result<(), String>>>,
}

impl HealthBoard {
    /// Whether `backend` passed its last check (unknown counts as healthy
    /// until the first check).
    pub fn healthy(&self, backend: &str) -> bool {
        self.read().get(backend).is_none_or(Result::is_ok)
    }

    /// The last failure of `backend`, if its last check failed.
    pub fn error(&self, backend: &str) -> Option<String> {
        self.read().get(backend).and_then(|r| r.clone().err())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Result<(), String>>> {
        self.status.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, backend: &str, status: Result<(), String>) {
        self.status.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(backend.to_owned(), status);
    }
}

/// The health service name of a backend: `keybroker.backend.<name>`.
pub fn service_name(backend: &str) -> String {
    format!("keybroker.backend.{backend}")
}

/// Checks every backend once and publishes the results.
pub async fn check_all(backends: &Backends, board: &HealthBoard, reporter: &HealthReporter) {
    for (name, backend) in backends.iter() {
        let status = backend.health().await.map_err(|e| e.to_string());
        let serving = if status.is_ok() { ServingStatus::Serving } else { ServingStatus::NotServing };
        if let Err(reason) = &status {
            if board.healthy(name) {
                tracing::warn!(backend = %name, %reason, "backend unhealthy");
            }
        } else if !board.healthy(name) {
            tracing::info!(backend = %name, "backend healthy again");
        }
        board.set(name, status);
        reporter.set_service_status(service_name(name), serving).await;
    }
}

/// Runs [`check_all`] every `interval` until the process ends.
pub fn spawn_monitor(backends: Backends, board: Arc<HealthBoard>, reporter: HealthReporter, interval: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            check_all(&backends, &board, &reporter).await;
        }
    });
}
