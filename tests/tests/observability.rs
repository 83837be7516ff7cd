//! Observability against real receivers: an OTLP trace collector hosted
//! here (a tonic server implementing the collector's TraceService) gets one
//! Wrap's span tree under the caller's trace id; the Prometheus endpoint,
//! scraped after a scripted workload, counts exactly; a dead collector
//! costs the calls nothing; readiness and liveness tell the truth; JSON
//! logs parse.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keybroker_client::pb;
use keybroker_tests::{Broker, tempdir};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::Code;

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    resource: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource: Vec<(String, String)> = rs
                .resource
                .map(|r| r.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received { span, resource: resource.clone() });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A collector on 127.0.0.1; stopped when the sender is dropped or fired.
async fn start_collector() -> (Collector, u16, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let collector = Collector::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (collector, port, stop)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).map(|a| text(&a.value))
}

async fn wrap_traced(app: &mut pb::key_broker_client::KeyBrokerClient<tonic::transport::Channel>, traceparent: &str) {
    let mut request =
        tonic::Request::new(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() });
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    app.wrap(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_wrap_is_one_span_tree_under_the_callers_trace() {
    let (collector, port, _stop) = start_collector().await;
    let dir = tempdir();
    let endpoint = format!("http://127.0.0.1:{port}");
    let broker = Broker::start_dev_with(
        &dir.path().join("kb"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "keybroker-under-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut app = broker.app().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    wrap_traced(&mut app, &format!("00-{trace_id}-{caller_span}-01")).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let ours = loop {
        let spans: Vec<Received> = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|r| hex::encode(&r.span.trace_id) == trace_id)
            .cloned()
            .collect();
        if spans.iter().any(|r| r.span.name == "backend.wrap") && spans.iter().any(|r| r.span.name.ends_with("/Wrap")) {
            break spans;
        }
        assert!(Instant::now() < deadline, "no Wrap span tree reached the collector: {spans:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rpc = &ours.iter().find(|r| r.span.name == "keybroker.v1.KeyBroker/Wrap").expect("the RPC span").span;
    assert_eq!(hex::encode(&rpc.parent_span_id), caller_span, "the RPC span continues the caller's span");
    assert_eq!(attr(rpc, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(rpc, "rpc.method").as_deref(), Some("Wrap"));
    assert_eq!(attr(rpc, "keybroker.identity").as_deref(), Some("spiffe://keybroker.dev/app"));
    assert_eq!(attr(rpc, "keybroker.key").as_deref(), Some("demo"));
    assert_eq!(attr(rpc, "keybroker.version").as_deref(), Some("1"));
    assert_eq!(attr(rpc, "keybroker.backend").as_deref(), Some("local"));
    let backend = &ours.iter().find(|r| r.span.name == "backend.wrap").unwrap().span;
    assert_eq!(backend.parent_span_id, rpc.span_id, "the backend call is a child of the RPC span");
    assert_eq!(attr(backend, "keybroker.backend").as_deref(), Some("local"));
    assert_eq!(attr(backend, "keybroker.key").as_deref(), Some("demo"));
    assert_eq!(attr(backend, "keybroker.version").as_deref(), Some("1"));
    let resource = &ours[0].resource;
    assert!(resource.contains(&("service.name".into(), "keybroker-under-test".into())), "{resource:?}");
    assert!(resource.contains(&("deployment.environment".into(), "ci".into())), "{resource:?}");
    // No attribute carries the plaintext.
    for r in &ours {
        for a in &r.span.attributes {
            assert!(!text(&a.value).contains("AQEBAQEB"), "{a:?}");
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn wrap_latencies(broker: &Broker, n: usize) -> Vec<Duration> {
    let mut app = broker.app().await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        wrap_traced(&mut app, &format!("00-{:032x}-00f067aa0ba902b7-01", i + 1)).await;
        out.push(started.elapsed());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_the_calls_nothing() {
    let (collector, port, stop) = start_collector().await;
    let dir = tempdir();
    let endpoint = format!("http://127.0.0.1:{port}");
    let broker = Broker::start_dev_with(
        &dir.path().join("kb"),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    wrap_latencies(&broker, 50).await;
    let alive = median(wrap_latencies(&broker, 300).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!collector.spans.lock().unwrap().is_empty(), "the collector received nothing while alive");
    // The collector dies; its port refuses connections from now on.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = median(wrap_latencies(&broker, 300).await);
    println!("median Wrap latency: collector alive {alive:?}, dead {dead:?}");
    assert!(
        dead <= alive * 2 + Duration::from_millis(1),
        "calls slowed down with the collector gone: {alive:?} -> {dead:?}"
    );
    // Still serving, still healthy.
    assert_eq!(broker.http_get("/readyz").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_count_a_scripted_workload_exactly() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    let wrap = |key: &str| pb::WrapRequest { key: key.into(), plaintext: vec![5; 32], ..Default::default() };
    let mut ciphertexts = Vec::new();
    for _ in 0..5 {
        ciphertexts.push(app.wrap(wrap("demo")).await.unwrap().into_inner().ciphertext);
    }
    for c in ciphertexts.iter().take(3) {
        app.unwrap(pb::UnwrapRequest { ciphertext: c.clone(), ..Default::default() }).await.unwrap();
    }
    let err = app.unwrap(pb::UnwrapRequest { ciphertext: vec![0; 8], ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A flood of unknown key names makes no series.
    for i in 0..50 {
        let err = app.wrap(wrap(&format!("nosuch-{i}"))).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    app.batch_wrap(pb::BatchWrapRequest { items: vec![wrap("demo"); 4] }).await.unwrap();
    admin.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap();
    admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap();
    app.wrap(wrap("demo")).await.unwrap();
    // Exactly one handshake without a client certificate.
    handshake_without_certificate(&broker);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, scrape) = broker.http_get("/metrics");
    assert_eq!(status, 200);
    let value = |series: &str| Broker::metric(&scrape, series).unwrap_or_else(|| panic!("no {series} in:\n{scrape}"));
    assert_eq!(value(r#"keybroker_requests_total{rpc="Wrap",code="OK"}"#), 6.0);
    assert_eq!(value(r#"keybroker_requests_total{rpc="Wrap",code="NOT_FOUND"}"#), 50.0);
    assert_eq!(value(r#"keybroker_requests_total{rpc="Unwrap",code="OK"}"#), 3.0);
    assert_eq!(value(r#"keybroker_requests_total{rpc="Unwrap",code="INVALID_ARGUMENT"}"#), 1.0);
    assert_eq!(value(r#"keybroker_requests_total{rpc="BatchWrap",code="OK"}"#), 1.0);
    assert_eq!(value(r#"keybroker_requests_total{rpc="Rotate",code="OK"}"#), 1.0);
    assert_eq!(value(r#"keybroker_requests_total{rpc="GetKey",code="OK"}"#), 1.0);
    assert_eq!(value(r#"keybroker_request_duration_seconds_count{rpc="Wrap"}"#), 56.0);
    assert_eq!(value(r#"keybroker_request_duration_seconds_bucket{rpc="Wrap",le="+Inf"}"#), 56.0);
    assert_eq!(value(r#"keybroker_key_wraps_total{key="demo",version="1"}"#), 9.0);
    assert_eq!(value(r#"keybroker_key_wraps_total{key="demo",version="2"}"#), 1.0);
    assert_eq!(value(r#"keybroker_key_unwraps_total{key="demo",version="1"}"#), 3.0);
    assert_eq!(value(r#"keybroker_key_current_version{key="demo"}"#), 2.0);
    assert_eq!(value(r#"keybroker_key_current_version_wraps{key="demo"}"#), 1.0);
    assert_eq!(value(r#"keybroker_key_wrap_limit{key="demo"}"#), (1u64 << 30) as f64);
    // 6 Wraps, and the batch's 4 items of one key sealed in one backend call.
    assert_eq!(value(r#"keybroker_backend_calls_total{backend="local",op="wrap",result="ok"}"#), 7.0);
    assert_eq!(value(r#"keybroker_backend_calls_total{backend="local",op="unwrap",result="ok"}"#), 3.0);
    assert_eq!(value(r#"keybroker_backend_up{backend="local"}"#), 1.0);
    assert_eq!(value("keybroker_tls_handshake_refusals_total"), 1.0);
    assert_eq!(value("keybroker_keys"), 1.0);
    assert_eq!(value("keybroker_ready"), 1.0);
    assert_eq!(value("keybroker_audit_up"), 1.0);
    assert!(value(r#"keybroker_key_current_version_age_seconds{key="demo"}"#) < 60.0);
    assert!(!scrape.contains("nosuch"), "unknown key names made series");
    // Every family is named by Prometheus conventions.
    for line in scrape.lines().filter(|l| l.starts_with("# TYPE ")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (name, kind) = (parts[2], parts[3]);
        assert!(name.starts_with("keybroker_"), "{line}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        if kind == "histogram" {
            assert!(name.ends_with("_seconds"), "{line}");
        }
    }
    assert_eq!(broker.http_get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(broker.http_get("/readyz"), (200, "ready\n".to_owned()));
}

#[tokio::test]
async fn logs_are_json_with_a_setting() {
    let dir = tempdir();
    let broker = Broker::start_dev_with(&dir.path().join("kb"), &[("KEYBROKER_LOG_FORMAT", "json")]);
    let mut app = broker.app().await;
    app.wrap(pb::WrapRequest { key: "nosuch".into(), plaintext: vec![1; 32], ..Default::default() }).await.unwrap_err();
    let stderr = broker.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{stderr}");
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["level"].is_string() && event["timestamp"].is_string(), "{line}");
    }
    assert!(stderr.contains(r#""message":"keybroker serving (mTLS, TLS 1.3)""#), "{stderr}");
}

async fn overall_health(broker: &Broker) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel("client").await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_version_table_and_liveness_stays_up() {
    let dir = tempdir();
    let dev = keybroker_tests::dev_pki(dir.path());
    let pg = keybroker_tests::Postgres::start();
    let config =
        keybroker_tests::config_with_postgres(dir.path(), &dev, &pg.url(), "propagation_interval_ms = 200", "");
    let broker = Broker::serve(&config, &dev, &[("KEYBROKER_METRICS__LISTEN", "127.0.0.1:0")]);
    assert_eq!(broker.http_get("/readyz").0, 200);
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(overall_health(&broker).await, serving);

    pg.stop_server();
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.http_get("/readyz").0 != 503 {
        assert!(Instant::now() < deadline, "/readyz still ready with the database down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, why) = broker.http_get("/readyz");
    assert!(why.contains("version table is unreachable"), "{why}");
    assert_eq!(overall_health(&broker).await, not_serving);
    assert_eq!(broker.http_get("/healthz").0, 200, "liveness stays up");
    let (_, scrape) = broker.http_get("/metrics");
    assert_eq!(Broker::metric(&scrape, "keybroker_ready"), Some(0.0));

    pg.start_server();
    let deadline = Instant::now() + Duration::from_secs(15);
    while broker.http_get("/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "/readyz not ready again after the database came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(overall_health(&broker).await, serving);
}

#[tokio::test]
async fn the_plain_text_health_listener_answers_probes() {
    let dir = tempdir();
    let port = keybroker_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _broker = Broker::start_dev_with(&dir.path().join("kb"), &[("KEYBROKER_HEALTH_LISTEN", addr.as_str())]);
    // No TLS, as the kubelet's gRPC probe dials it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for service in ["keybroker.liveness", "", "keybroker.store", "keybroker.backend.local"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, serving, "{service:?}");
    }
    // Only health: the key services are not on this listener.
    let err = pb::key_broker_client::KeyBrokerClient::new(channel)
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

/// One TLS connection that presents no client certificate (refused by the
/// server once the handshake ends).
fn handshake_without_certificate(broker: &Broker) {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let ca = rustls::pki_types::CertificateDer::from_pem_file(broker.data_dir.join("tls/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut socket = std::net::TcpStream::connect(broker.addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut socket);
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\n");
    let _ = tls.read(&mut [0u8; 64]);
}
