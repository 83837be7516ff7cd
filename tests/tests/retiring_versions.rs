//! Retiring old versions safely: each version records its unwrap count and
//! last unwrap (shown by GetKey), and raising min_decryption_version or
//! destroying a version is refused while it was used inside the retirement
//! window, unless forced. That is the proof that a rewrap pass is complete.

use std::time::Duration;

use keybroker_client::pb;
use keybroker_tests::{Broker, config_with_backends, dev_pki, tempdir};
use tonic::Code;

#[tokio::test]
async fn used_versions_are_not_retired_without_force_and_usage_is_shown() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "");
    let env = [("KEYBROKER_RETIREMENT_WINDOW_SECONDS", "3600"), ("KEYBROKER_USAGE_FLUSH_INTERVAL_MS", "100")];
    let mut broker = Broker::serve(&config, &dev, &env);
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    for key in ["busy", "idle"] {
        admin
            .create_key(pb::CreateKeyRequest { key: key.into(), deletion_allowed: true, ..Default::default() })
            .await
            .unwrap();
    }
    let w =
        app.wrap(pb::WrapRequest { key: "busy".into(), plaintext: vec![1; 32], ..Default::default() }).await.unwrap();
    let ct = w.into_inner().ciphertext;
    for key in ["busy", "idle"] {
        admin.rotate(pb::RotateRequest { key: key.into(), ..Default::default() }).await.unwrap();
    }
    for _ in 0..3 {
        app.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await.unwrap();
    }

    // GetKey shows the usage (flushed to the store every 100 ms).
    let busy = admin.get_key(pb::GetKeyRequest { key: "busy".into() }).await.unwrap().into_inner();
    let v1 = &busy.versions[0];
    assert_eq!(v1.unwrap_count, 3);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - v1.last_unwrap_unix_seconds).abs() < 60, "{v1:?}");
    assert_eq!(busy.versions[1].last_unwrap_unix_seconds, 0);

    let raise =
        |key: &str, force| pb::SetMinDecryptionVersionRequest { key: key.into(), min_decryption_version: 2, force };
    let err = admin.set_min_decryption_version(raise("busy", false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("version 1") && err.message().contains("retirement window of 3600s"),
        "{}",
        err.message()
    );
    let destroy = |force| pb::KeyVersionRequest { key: "busy".into(), version: 1, force };
    let err = admin.destroy_key_version(destroy(false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Nothing changed.
    assert!(app.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await.is_ok());

    // A version nobody used retires without force.
    admin.set_min_decryption_version(raise("idle", false)).await.unwrap();

    // The usage survives a crash (it is in the store), and so does the guard.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill9();
    let broker = Broker::serve(&config, &dev, &env);
    let mut admin = broker.admin().await;
    let busy = admin.get_key(pb::GetKeyRequest { key: "busy".into() }).await.unwrap().into_inner();
    assert_eq!(busy.versions[0].unwrap_count, 4, "unwrap counts were lost in the crash");
    assert!(admin.set_min_decryption_version(raise("busy", false)).await.is_err());
    let forced = admin.set_min_decryption_version(raise("busy", true)).await.unwrap().into_inner();
    assert_eq!(forced.min_decryption_version, 2);
    admin.destroy_key_version(destroy(true)).await.unwrap();
}

#[tokio::test]
async fn a_completed_rewrap_pass_lets_the_old_version_retire_without_force() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "");
    let env = [("KEYBROKER_RETIREMENT_WINDOW_SECONDS", "3600"), ("KEYBROKER_USAGE_FLUSH_INTERVAL_MS", "100")];
    let broker = Broker::serve(&config, &dev, &env);
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    admin.create_key(pb::CreateKeyRequest { key: "moving".into(), ..Default::default() }).await.unwrap();
    let old = app
        .wrap(pb::WrapRequest { key: "moving".into(), plaintext: vec![3; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    admin.rotate(pb::RotateRequest { key: "moving".into(), ..Default::default() }).await.unwrap();
    // The rewrap pass moves the data to v2; it is not a use of v1.
    let new = app.rewrap(pb::RewrapRequest { ciphertext: old, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(new.version, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = admin.get_key(pb::GetKeyRequest { key: "moving".into() }).await.unwrap().into_inner();
    assert_eq!((key.versions[0].unwrap_count, key.versions[0].last_unwrap_unix_seconds), (0, 0), "{key:?}");
    let raised = admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            key: "moving".into(),
            min_decryption_version: 2,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raised.min_decryption_version, 2);
    // The rewrapped data still opens, and that read counts against v2.
    app.unwrap(pb::UnwrapRequest { ciphertext: new.ciphertext, ..Default::default() }).await.unwrap();
}
