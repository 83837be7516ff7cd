//! One conformance suite for the `KeyBackend` trait, run against every
//! implementation on real components: local, aws-kms on moto_server, pkcs11
//! on SoftHSM2, and hierarchy mode over both remote ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keybroker_server::backend::aws_kms::{AwsKmsBackend, AwsKmsSettings};
use keybroker_server::backend::hierarchy::HierarchyBackend;
use keybroker_server::backend::local::LocalBackend;
use keybroker_server::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings, object_label};
use keybroker_server::backend::root_key::RootKey;
use keybroker_server::backend::{Aad, BackendError, BackendRef, KeyBackend, VersionRef};
use keybroker_server::error::ErrorCode;
use keybroker_tests::{Moto, SOFTHSM_MODULE, SOFTHSM_PIN, SoftHsm, tempdir};

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn version<'a>(key: &'a str, version: u32, reference: &'a BackendRef) -> VersionRef<'a> {
    VersionRef::new(key, version, reference)
}

/// What every backend must do. `exportable` says whether export succeeds.
async fn conformance(backend: Arc<dyn KeyBackend>, exportable: bool, remote: bool) {
    let name = backend.name().to_owned();
    let calls_before = backend.stats().remote_calls();
    backend.health().await.unwrap_or_else(|e| panic!("{name}: unhealthy: {e}"));
    let key = format!("conf-{}", rand_suffix());
    let r1 = backend.create_version(&key, 1).await.unwrap();
    let r2 = backend.create_version(&key, 2).await.unwrap();
    assert_ne!(r1, r2, "{name}: two versions share material");
    let context = ctx(&[("tenant", "acme")]);
    let aad = |header: &'static [u8]| Aad { header, context: &context };

    // Wrap and unwrap under each version.
    let mut p1 = Vec::new();
    backend.wrap(version(&key, 1, &r1), b"dek-one-32-bytes-long-0123456789", aad(b"h1"), &mut p1).await.unwrap();
    let mut p2 = Vec::new();
    backend.wrap(version(&key, 2, &r2), b"dek-two", aad(b"h2"), &mut p2).await.unwrap();
    assert_eq!(
        &**backend.unwrap(version(&key, 1, &r1), &p1, aad(b"h1")).await.unwrap(),
        b"dek-one-32-bytes-long-0123456789"
    );
    assert_eq!(&**backend.unwrap(version(&key, 2, &r2), &p2, aad(b"h2")).await.unwrap(), b"dek-two");

    // A payload of v1 does not open under v2.
    let err = backend.unwrap(version(&key, 2, &r2), &p1, aad(b"h1")).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{name}: cross-version unwrap: {err}");

    // Wrong context or header: authentication fails.
    let other = ctx(&[("tenant", "evil")]);
    let err = backend.unwrap(version(&key, 1, &r1), &p1, Aad { header: b"h1", context: &other }).await.unwrap_err();
    assert!(matches!(err, BackendError::AuthenticationFailed { .. }), "{name}: wrong context: {err}");
    let err = backend.unwrap(version(&key, 1, &r1), &p1, aad(b"hX")).await.unwrap_err();
    assert!(matches!(err, BackendError::AuthenticationFailed { .. }), "{name}: wrong header: {err}");
    let mut tampered = p1.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    let err = backend.unwrap(version(&key, 1, &r1), &tampered, aad(b"h1")).await.unwrap_err();
    assert!(matches!(err, BackendError::AuthenticationFailed { .. }), "{name}: tampered payload: {err}");
    assert!(!err.to_string().contains("dek-one"), "{name}: key material in an error");

    // Export where allowed, refused where not.
    assert_eq!(backend.exportable(), exportable, "{name}");
    match backend.export(version(&key, 1, &r1)).await {
        Ok(material) => {
            assert!(exportable, "{name} exported material it should keep");
            assert_eq!(material.len(), 32);
            let local = LocalBackend::new("copy", test_root());
            let copied = local.import(&key, 1, &material).await.unwrap();
            let opened = local.unwrap(version(&key, 1, &copied), &p1, aad(b"h1")).await.unwrap();
            assert_eq!(
                &**opened, b"dek-one-32-bytes-long-0123456789",
                "{name}: exported material does not open its payloads"
            );
        }
        Err(err) => {
            assert!(!exportable, "{name}: export failed: {err}");
            assert!(matches!(err, BackendError::NotExportable { .. }), "{name}: {err}");
            assert_eq!(err.code(), ErrorCode::FailedPrecondition);
        }
    }

    // Attach existing material by its backend id.
    let id = backend.backend_key_id(&r1);
    if remote {
        assert!(!id.is_empty(), "{name}: no backend key id");
        let attached = backend.attach(&key, 3, &id).await.unwrap();
        let mut p3 = Vec::new();
        backend.wrap(version(&key, 3, &attached), b"via-attached", aad(b"h3"), &mut p3).await.unwrap();
        assert_eq!(&**backend.unwrap(version(&key, 3, &attached), &p3, aad(b"h3")).await.unwrap(), b"via-attached");
        let err = backend.attach(&key, 4, "does-not-exist").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{name}: attaching a missing key: {err}");
        assert!(err.to_string().contains("does-not-exist"), "{name}: {err}");
        assert!(backend.stats().remote_calls() > calls_before, "{name}: remote calls are not counted");
    } else {
        assert!(backend.attach(&key, 3, "anything").await.is_err());
        assert_eq!(backend.stats().remote_calls(), 0, "{name}: the local backend made remote calls");
    }

    // Destroy: the material is gone where the backend holds it.
    backend.destroy_version(version(&key, 2, &r2)).await.unwrap();
    // AWS KMS only schedules deletion (7 days at least), and moto keeps
    // decrypting with keys pending deletion; an HSM object is gone at once.
    // keybroker's version table refuses destroyed versions in every backend.
    if remote && backend.kind() == "pkcs11" {
        assert!(
            backend.unwrap(version(&key, 2, &r2), &p2, aad(b"h2")).await.is_err(),
            "{name}: destroyed version opened"
        );
    }
    assert!(backend.unwrap(version(&key, 2, &BackendRef::default()), &p2, aad(b"h2")).await.is_err());
}

fn rand_suffix() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

fn test_root() -> RootKey {
    RootKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test").unwrap()
}

async fn aws(moto: &Moto) -> Arc<dyn KeyBackend> {
    for (k, v) in Moto::env() {
        // SAFETY: set before the AWS SDK (or any other thread) reads the
        // environment; nextest runs each test in its own process.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(k, v)
        };
    }
    let settings =
        AwsKmsSettings { region: "us-east-1".into(), endpoint: Some(moto.endpoint()), timeout: Duration::from_secs(2) };
    Arc::new(AwsKmsBackend::new("aws", &settings).await)
}

fn hsm(dir: &std::path::Path) -> (SoftHsm, Arc<dyn KeyBackend>) {
    let store = SoftHsm::new(dir, "kb");
    // SAFETY: as above; SoftHSM reads this when the module initializes.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", &store.conf)
    };
    let settings = Pkcs11Settings {
        module: SOFTHSM_MODULE.into(),
        token_label: Some("kb".into()),
        slot: None,
        pin: SOFTHSM_PIN.to_owned().into(),
        sessions: 4,
        timeout: Duration::from_secs(2),
    };
    (store, Arc::new(Pkcs11Backend::new("hsm", settings)))
}

#[tokio::test]
async fn local_backend_conforms() {
    conformance(Arc::new(LocalBackend::new("local", test_root())), true, false).await;
}

#[tokio::test]
async fn aws_kms_backend_conforms_on_moto() {
    let moto = Moto::start();
    conformance(aws(&moto).await, false, true).await;
}

#[tokio::test]
async fn pkcs11_backend_conforms_on_softhsm() {
    let dir = tempdir();
    let (_store, backend) = hsm(dir.path());
    conformance(backend.clone(), false, true).await;
    assert_eq!(object_label("k", 7), "keybroker:k:v7");
}

#[tokio::test]
async fn hierarchy_mode_conforms_over_aws_kms_and_pkcs11() {
    let moto = Moto::start();
    let over_aws = Arc::new(HierarchyBackend::new(aws(&moto).await, Duration::from_secs(60)));
    conformance(over_aws, false, true).await;
    let dir = tempdir();
    let (_store, inner) = hsm(dir.path());
    conformance(Arc::new(HierarchyBackend::new(inner, Duration::from_secs(60))), false, true).await;
}

#[tokio::test]
async fn pkcs11_sessions_are_pooled_for_concurrent_calls() {
    let dir = tempdir();
    let (_store, backend) = hsm(dir.path());
    let reference = backend.create_version("pool", 1).await.unwrap();
    let context = BTreeMap::new();
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let (backend, reference, context) = (backend.clone(), reference.clone(), context.clone());
        tasks.push(tokio::spawn(async move {
            let v = VersionRef::new("pool", 1, &reference);
            let mut payload = Vec::new();
            backend.wrap(v, &[i; 32], Aad { header: b"h", context: &context }, &mut payload).await.unwrap();
            let plain = backend.unwrap(v, &payload, Aad { header: b"h", context: &context }).await.unwrap();
            assert_eq!(&**plain, &[i; 32]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
