//! Key material is found by an identity nobody else can take: HSM objects
//! by a random CKA_ID (never by a label two objects may share), the root
//! key's sealing object apart from every data key, imports that replace
//! nothing, lost races that leave nothing behind, and KMS keys that stay
//! alive while another version still uses them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keybroker_server::backend::local::LocalBackend;
use keybroker_server::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings, object_label};
use keybroker_server::backend::root_key::{ROOT_KEY_NAME, RootKey};
use keybroker_server::backend::{Aad, BackendRef, Backends, KeyBackend, VersionRef};
use keybroker_server::core::keyring::{Keyring, NewKey, PolicyChange, VersionChange};
use keybroker_server::error::ErrorCode;
use keybroker_server::store::sqlite::SqliteStore;
use keybroker_tests::{Moto, SOFTHSM_MODULE, SOFTHSM_PIN, SoftHsm, tempdir};

fn settings(sessions: usize, timeout: Duration) -> Pkcs11Settings {
    Pkcs11Settings {
        module: SOFTHSM_MODULE.into(),
        token_label: Some("kb".into()),
        slot: None,
        pin: SOFTHSM_PIN.to_owned().into(),
        sessions,
        timeout,
    }
}

fn token(dir: &std::path::Path) -> SoftHsm {
    let hsm = SoftHsm::new(dir, "kb");
    // SAFETY: set before the module initializes; nextest runs each test in
    // its own process.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", &hsm.conf)
    };
    hsm
}

async fn round_trip(backend: &dyn KeyBackend, key: &str, version: u32, reference: &BackendRef) -> Result<(), String> {
    let context = BTreeMap::new();
    let v = VersionRef::new(key, version, reference);
    let mut payload = Vec::new();
    backend
        .wrap(v, &[7; 32], Aad { header: b"h", context: &context }, &mut payload)
        .await
        .map_err(|e| e.to_string())?;
    let plain =
        backend.unwrap(v, &payload, Aad { header: b"h", context: &context }).await.map_err(|e| e.to_string())?;
    if plain.as_slice() == [7; 32] { Ok(()) } else { Err("round trip changed the data".into()) }
}

#[tokio::test]
async fn hsm_objects_are_found_by_a_unique_id_and_never_created_twice_under_one_label() {
    let dir = tempdir();
    let _hsm = token(dir.path());
    // Two brokers on one token.
    let one = Pkcs11Backend::new("hsm", settings(2, Duration::from_secs(2)));
    let two = Pkcs11Backend::new("hsm", settings(2, Duration::from_secs(2)));
    let first = one.create_version("orders", 1).await.unwrap();
    assert!(String::from_utf8_lossy(&first.0).starts_with("id:"), "the reference records the CKA_ID");
    let err = two.create_version("orders", 1).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{err}");
    assert!(err.to_string().contains(&object_label("orders", 1)) && err.to_string().contains("exists"), "{err}");
    round_trip(&two, "orders", 1, &first).await.unwrap();

    // The root key's sealing object and a data key of the same name are two
    // objects: destroying the data key's version leaves the root key whole.
    let root = one.create_root_key(ROOT_KEY_NAME).await.unwrap();
    let data = one.create_version(ROOT_KEY_NAME, 1).await.unwrap();
    assert_ne!(root, data);
    one.destroy_version(VersionRef::new(ROOT_KEY_NAME, 1, &data)).await.unwrap();
    round_trip(&one, ROOT_KEY_NAME, 1, &root).await.expect("the root key's sealing object was destroyed");
    // Attaching by label finds the one object with that label.
    let attached = one.attach("x", 1, &format!("keybroker-root:{ROOT_KEY_NAME}")).await.unwrap();
    assert_eq!(attached, root);
    assert_eq!(one.attach("x", 1, &one.backend_key_id(&root)).await.unwrap(), root);
}

#[tokio::test]
async fn an_hsm_import_reuses_its_own_object_and_replaces_nothing() {
    let dir = tempdir();
    let _hsm = token(dir.path());
    let hsm = Pkcs11Backend::new("hsm", settings(2, Duration::from_secs(2)));
    let material = [42u8; 32];
    let first = hsm.import("moved", 3, &material).await.unwrap();
    // A resumed migration imports again: the same object, not a second one.
    assert_eq!(hsm.import("moved", 3, &material).await.unwrap(), first);
    // Other material under the same label replaces nothing.
    let err = hsm.import("moved", 3, &[1u8; 32]).await.unwrap_err();
    assert!(err.to_string().contains("other material"), "{err}");
    round_trip(&hsm, "moved", 3, &first).await.expect("the first import must still work");
    // And its material is the imported one: a local backend with the same
    // KEK opens what the HSM wrapped.
    let local =
        LocalBackend::new("local", RootKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "t").unwrap());
    let sealed = local.import("moved", 3, &material).await.unwrap();
    let context = BTreeMap::new();
    let mut payload = Vec::new();
    hsm.wrap(VersionRef::new("moved", 3, &first), b"dek", Aad { header: b"h", context: &context }, &mut payload)
        .await
        .unwrap();
    let opened = local
        .unwrap(VersionRef::new("moved", 3, &sealed), &payload, Aad { header: b"h", context: &context })
        .await
        .unwrap();
    assert_eq!(opened.as_slice(), b"dek");
}

/// Two brokers on one table and one token rotate the same key at once:
/// every version has exactly one object, and the losers' objects are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_rotation_races_leave_no_hsm_object_behind() {
    let dir = tempdir();
    let _hsm = token(dir.path());
    let path = dir.path().join("kb.sqlite");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut backends = Backends::default();
        // A timeout generous enough for a loaded CI machine: this test is
        // about races, not about a slow HSM.
        backends.insert(Arc::new(Pkcs11Backend::new("hsm", settings(4, Duration::from_secs(30)))));
        let store = Arc::new(SqliteStore::open(&path).await.unwrap());
        replicas.push(Arc::new(Keyring::new(store, backends, "hsm".into())));
    }
    replicas[0].create(NewKey { name: "k".into(), ..Default::default() }).await.unwrap();
    let mut tasks = Vec::new();
    for replica in &replicas {
        for _ in 0..8 {
            let replica = replica.clone();
            tasks.push(tokio::spawn(async move { replica.rotate("k", None, None, None).await.map(|_| ()) }));
        }
    }
    let mut won = 0;
    let mut lost = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => won += 1,
            Err(err) => lost.push(format!("{:?}: {}", err.code(), err.message())),
        }
    }
    // A rotation that loses may give up (ABORTED after five lost races, or
    // FAILED_PRECONDITION when a concurrent one holds its version's label):
    // how many win depends on the schedule, and at least one always does.
    // What matters is below: nothing a loser made is left behind.
    assert!(won >= 1, "no rotation of 16 succeeded: {lost:?}");
    let record = replicas[0].store().get("k").await.unwrap().unwrap();
    assert_eq!(record.current_version as usize, 1 + won);
    let probe = Pkcs11Backend::new("hsm", settings(2, Duration::from_secs(2)));
    for v in 1..=record.current_version {
        // Exactly one object carries the label of each recorded version…
        let found = probe.attach("k", v, &object_label("k", v)).await;
        assert_eq!(found.as_ref().ok(), Some(&record.version(v).unwrap().backend_ref), "version {v}: {found:?}");
    }
    for v in record.current_version + 1..record.current_version + 4 {
        // …and no lost race left an object for a version never recorded.
        let err = probe.attach("k", v, &object_label("k", v)).await.unwrap_err();
        assert!(err.to_string().contains("no secret key"), "version {v}: {err}");
    }
    let err = replicas[0].create(NewKey { name: ROOT_KEY_NAME.into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err:?}");
}

/// A call the HSM does not answer in time keeps its session permit until
/// the blocking call returns: callers that gave up cannot make the broker
/// open more sessions than configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_calls_that_time_out_keep_their_session_until_they_return() {
    let dir = tempdir();
    let _hsm = token(dir.path());
    let setup = Pkcs11Backend::new("hsm", settings(1, Duration::from_secs(2)));
    let reference = setup.create_version("slow", 1).await.unwrap();
    let hsm = Arc::new(Pkcs11Backend::new("hsm", settings(1, Duration::from_micros(1))));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (hsm, reference) = (hsm.clone(), reference.clone());
        tasks.push(tokio::spawn(async move { round_trip(hsm.as_ref(), "slow", 1, &reference).await }));
    }
    let mut timed_out = 0;
    for task in tasks {
        if task.await.unwrap().is_err_and(|e| e.contains("no answer within")) {
            timed_out += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(timed_out > 0, "no call timed out; the test proves nothing");
    assert_eq!(hsm.sessions_opened(), 1, "{timed_out} calls timed out and the pool grew past its one session");
}

fn kms_key_state(moto: &Moto, key_id: &str) -> String {
    let script = format!(
        "import boto3\nc = boto3.client('kms', endpoint_url='{}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n\
         print(c.describe_key(KeyId='{key_id}')['KeyMetadata']['KeyState'])",
        moto.endpoint()
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Destroying an AWS KMS version does not schedule the deletion of a KMS
/// key another key still uses; the last user's destroy does.
#[tokio::test]
async fn a_kms_key_another_version_uses_is_not_scheduled_for_deletion() {
    use keybroker_server::backend::aws_kms::{AwsKmsBackend, AwsKmsSettings};
    let moto = Moto::start();
    for (k, v) in Moto::env() {
        // SAFETY: as above, before the SDK reads the environment.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(k, v)
        };
    }
    let settings =
        AwsKmsSettings { region: "us-east-1".into(), endpoint: Some(moto.endpoint()), timeout: Duration::from_secs(2) };
    let aws: Arc<dyn KeyBackend> = Arc::new(AwsKmsBackend::new("aws", &settings).await);
    let shared = aws.create_version("shared", 1).await.unwrap();
    let arn = aws.backend_key_id(&shared);
    let dir = tempdir();
    let mut backends = Backends::default();
    backends.insert(aws.clone());
    let store = Arc::new(SqliteStore::open(&dir.path().join("kb.sqlite")).await.unwrap());
    let keyring = Keyring::new(store, backends, "aws".into());
    for name in ["a", "b"] {
        keyring
            .create(NewKey {
                name: name.into(),
                backend_key_id: arn.clone(),
                deletion_allowed: true,
                ..Default::default()
            })
            .await
            .unwrap();
        keyring.rotate(name, None, None, None).await.unwrap();
    }
    keyring.update_policy("a", PolicyChange { deletion_allowed: Some(true), ..Default::default() }).await.unwrap();
    keyring.change_version("a", 1, VersionChange::Destroy, true).await.unwrap();
    assert_eq!(kms_key_state(&moto, &arn), "Enabled", "key b version 1 still uses the KMS key");
    keyring.change_version("b", 1, VersionChange::Destroy, true).await.unwrap();
    assert_eq!(kms_key_state(&moto, &arn), "PendingDeletion", "the last user's destroy schedules deletion");
}
