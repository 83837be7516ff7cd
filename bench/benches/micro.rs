//! Micro-benchmarks of the data path's pieces: envelope encode/parse, the
//! local backend's wrap/unwrap in process, the per-request policy check, and
//! the version-table cache lookup.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keybroker_server::backend::local::LocalBackend;
use keybroker_server::backend::root_key::RootKey;
use keybroker_server::backend::{Aad, Backends, KeyBackend, VersionRef};
use keybroker_server::core::envelope::{Algorithm, additional_data, parse, write_header};
use keybroker_server::core::keyring::{Keyring, NewKey};
use keybroker_server::security::identity::{Identity, Peer, Transport};
use keybroker_server::security::policy::{AuthConfig, Gate, Policy, PolicyConfig, Rpc};
use keybroker_server::store::sqlite::SqliteStore;

fn root() -> RootKey {
    RootKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "bench").unwrap()
}

fn envelope(c: &mut Criterion) {
    let context: BTreeMap<String, String> = [("tenant".to_string(), "acme".to_string())].into();
    c.bench_function("envelope/encode_header_and_aad", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(96);
            let n = write_header(&mut out, Algorithm::Aes256Gcm, black_box("orders-db"), 7);
            let mut aad = Vec::with_capacity(64);
            additional_data(&mut aad, &out[..n], &context);
            black_box((out, aad))
        })
    });
    let mut ct = Vec::new();
    write_header(&mut ct, Algorithm::Aes256Gcm, "orders-db", 7);
    ct.extend_from_slice(&[0xAB; 60]);
    c.bench_function("envelope/parse", |b| b.iter(|| black_box(parse(black_box(&ct)).unwrap())));
}

fn local_backend(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let backend = LocalBackend::new("local", root());
    let reference = rt.block_on(backend.create_version("k", 1)).unwrap();
    let v = VersionRef::new("k", 1, &reference);
    let context = BTreeMap::new();
    let aad = Aad { header: b"KB-header-bytes", context: &context };
    let mut payload = Vec::new();
    rt.block_on(backend.wrap(v, &[7; 32], aad, &mut payload)).unwrap();
    c.bench_function("local_backend/wrap_32B", |b| {
        b.to_async(&rt).iter(|| async {
            let mut out = Vec::with_capacity(64);
            backend.wrap(v, black_box(&[7u8; 32]), aad, &mut out).await.unwrap();
            black_box(out)
        })
    });
    c.bench_function("local_backend/unwrap_32B", |b| {
        b.to_async(&rt).iter(|| async { black_box(backend.unwrap(v, black_box(&payload), aad).await.unwrap()) })
    });
}

fn policy(c: &mut Criterion) {
    // Three teams, the caller's role matched by a glob.
    let config: PolicyConfig = toml::from_str(
        r#"
        [roles.payments]
        "payments-*" = ["Wrap", "Unwrap", "GenerateDataKey"]
        [roles.orders]
        "orders-*" = ["data"]
        [roles.ops]
        "*" = ["admin"]
        [identities]
        "spiffe://prod/payments" = ["payments"]
        "spiffe://prod/orders" = ["orders"]
        "spiffe://prod/ops" = ["ops"]
        "#,
    )
    .unwrap();
    let gate = Gate::new(Policy::compile(&AuthConfig::default(), &config).unwrap());
    let peer = Peer::new(vec![Identity::parse("spiffe://prod/orders").unwrap()], Transport::Tls);
    c.bench_function("policy/unwrap_check_on_a_key_glob", |b| {
        b.iter(|| black_box(gate.check(&peer, Rpc::Unwrap, black_box("orders-eu-1")).is_ok()))
    });
}

/// What metrics add to one Wrap on the hot path: the request counter and
/// latency histogram, and the backend call's counter and histogram (the
/// per-key series cost nothing per call: they are read at scrape time).
fn metrics(c: &mut Criterion) {
    let instruments = keybroker_server::telemetry::metrics::enable();
    let backend = instruments.backend("local");
    let rpc = keybroker_server::telemetry::metrics::rpc_index("Wrap");
    c.bench_function("metrics/instruments_of_one_wrap", |b| {
        b.iter(|| {
            let started = std::time::Instant::now();
            backend.call(0, true, started.elapsed());
            instruments.request(black_box(rpc), 0, started.elapsed());
        })
    });
}

fn cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keyring = rt.block_on(async {
        let store = Arc::new(SqliteStore::open(&dir.path().join("kb.sqlite")).await.unwrap());
        let mut backends = Backends::default();
        backends.insert(Arc::new(LocalBackend::new("local", root())));
        let keyring = Keyring::new(store, backends, "local".into());
        for i in 0..1000 {
            keyring.create(NewKey { name: format!("key-{i:04}"), ..Default::default() }).await.unwrap();
        }
        keyring
    });
    c.bench_function("version_table/cached_lookup_of_1000_keys", |b| {
        b.to_async(&rt).iter(|| async { black_box(keyring.key(black_box("key-0500")).await.unwrap()) })
    });
}

criterion_group!(benches, envelope, local_backend, policy, metrics, cache);
criterion_main!(benches);
