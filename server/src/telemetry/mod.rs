//! What keybroker tells its operators: logs (human-readable or JSON, level
//! from `RUST_LOG` or the configuration), traces (a span per RPC, backend
//! and store call, exported over OTLP/gRPC when a collector is configured,
//! continuing the caller's W3C trace context) and Prometheus [`metrics`]
//! with `/healthz` and `/readyz` on their own HTTP listener ([`http`]).

pub mod http;
pub mod metrics;
pub mod state;

use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::{Deserialize, Serialize};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (fields, span, target, level, timestamp).
    Json,
}

/// `[telemetry]`: trace export.
#[derive(Debug, Clone, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of a collector (`http://otel-collector:4317`);
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
    /// does the same. Unset: no traces leave the process. The standard
    /// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
    /// (and `_ARG`) and `OTEL_BSP_*` variables are honoured.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

/// Keeps the trace pipeline alive; flushes it when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The log filter: `RUST_LOG` when set, else the configured one.
fn filter(configured: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let text = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let (text, setting) = match &text {
        Some(t) => (t.as_str(), "RUST_LOG"),
        None => (configured, "log"),
    };
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| format!("invalid setting `{setting}`: {text:?}: {e}"))
}

/// The OTLP endpoint from the configuration or the standard variables.
fn otlp_endpoint(config: &TelemetryConfig) -> Option<String> {
    config.otlp_endpoint.clone().or_else(|| {
        ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
    })
}

/// Installs logging (and trace export when an endpoint is configured) for
/// the process. Must run inside the Tokio runtime (the OTLP exporter's
/// channel lives on it). Exporting never blocks a caller: spans queue in a
/// bounded buffer a background thread sends in batches; when the collector
/// is away they are dropped.
pub fn init(log: &str, format: LogFormat, telemetry: &TelemetryConfig) -> Result<TelemetryGuard, String> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter(log)?)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter(log)?)
            .boxed(),
    };
    let (otel, provider) = match otlp_endpoint(telemetry) {
        None => (None, None),
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| format!("invalid setting `telemetry.otlp_endpoint`: {endpoint:?}: {e}"))?;
            let mut resource = opentelemetry_sdk::Resource::builder();
            if std::env::var("OTEL_SERVICE_NAME").is_err() {
                resource = resource.with_service_name("keybroker");
            }
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let tracer = provider.tracer("keybroker");
            // keybroker's own spans (RPC, backend, store), whatever the log level.
            let spans = tracing_subscriber::filter::Targets::new()
                .with_target("keybroker_server", tracing::Level::INFO)
                .with_target("keybroker", tracing::Level::INFO);
            let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans).boxed();
            tracing::debug!(%endpoint, "exporting traces over OTLP");
            EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry().with(fmt).with(otel).try_init().map_err(|e| e.to_string())?;
    Ok(TelemetryGuard { provider })
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported: when not, the request path makes none (a
/// span costs an allocation or two even when nothing reads it).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// A span, or a disabled one when traces are not exported.
#[macro_export]
macro_rules! traced_span {
    ($($arg:tt)*) => {
        if $crate::telemetry::exporting() { tracing::info_span!($($arg)*) } else { tracing::Span::none() }
    };
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

struct Headers<'a>(&'a tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the caller's W3C trace context (`traceparent`,
/// `tracestate` in the request's metadata), when it sent one and the span
/// is exported.
pub fn continue_trace(span: &tracing::Span, headers: &tonic::codegen::http::HeaderMap) {
    if !span.is_disabled() && headers.contains_key("traceparent") {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(propagator().extract(&Headers(headers)));
    }
}
