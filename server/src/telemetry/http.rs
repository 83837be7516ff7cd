//! The metrics listener (HTTP/1.1, plain: put it on a pod-local or
//! monitoring-only address): `/metrics` in the Prometheus text format,
//! `/healthz` (the process answers: liveness) and `/readyz` (the key cache
//! is loaded and the version table reachable: readiness).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::metrics::{Collector, Instruments, Sources, render};

/// What readiness depends on.
#[derive(Debug, Default)]
pub struct Readiness {
    loaded: AtomicBool,
    store_down: AtomicBool,
}

impl Readiness {
    /// The key cache is loaded.
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Relaxed);
    }

    /// Whether the version table answers.
    pub fn set_store_reachable(&self, reachable: bool) {
        self.store_down.store(!reachable, Ordering::Relaxed);
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.loaded.load(Ordering::Relaxed) {
            Some("the key cache is not loaded yet")
        } else if self.store_down.load(Ordering::Relaxed) {
            Some("the version table is unreachable")
        } else {
            None
        }
    }
}

#[derive(Clone)]
struct AppState {
    instruments: Arc<Instruments>,
    sources: Arc<std::sync::OnceLock<Arc<dyn Sources>>>,
    readiness: Arc<Readiness>,
}

/// The listener's handle: set the broker's state once it exists.
#[derive(Clone)]
pub struct MetricsServer {
    sources: Arc<std::sync::OnceLock<Arc<dyn Sources>>>,
    /// The bound address.
    pub addr: SocketAddr,
}

impl MetricsServer {
    /// Supplies what a scrape reads about the broker (keys, backends, ...).
    pub fn set_sources(&self, sources: Arc<dyn Sources>) {
        let _ = self.sources.set(sources);
    }
}

struct NoSources;

impl Sources for NoSources {
    fn encode(&self, _out: &mut super::metrics::Encoder<'_, '_>) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let sources = state.sources.get().cloned().unwrap_or_else(|| Arc::new(NoSources));
    match render(Collector::new(state.instruments.clone(), sources)) {
        Ok(text) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], text)
                .into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.readiness.not_ready() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Binds `addr` and serves the endpoints until the process ends.
pub async fn serve(
    addr: SocketAddr,
    instruments: Arc<Instruments>,
    readiness: Arc<Readiness>,
) -> std::io::Result<MetricsServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let sources = Arc::new(std::sync::OnceLock::new());
    let state = AppState { instruments, sources: sources.clone(), readiness };
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "the metrics listener stopped");
        }
    });
    Ok(MetricsServer { sources, addr: bound })
}
