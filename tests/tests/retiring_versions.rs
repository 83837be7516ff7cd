//! Retiring old versions safely: each version records the DEKs wrapped
//! under it, rewrapped into and out of it (summed over every broker on the
//! table), its unwrap count and last unwrap, all shown by GetKey. Raising
//! min_decryption_version past a version or destroying it is refused while
//! DEKs still depend on it or it was used inside the retirement window,
//! unless forced. That is the proof that a rewrap pass is complete.

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
    assert!(err.message().contains("version 1") && err.message().contains("1 outstanding DEKs"), "{}", err.message());
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

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Outstanding DEKs per version, summed over two brokers on one table: a
/// version with DEKs left is not retired without force, whatever the
/// unwrap window says, and a finished rewrap brings it to zero.
#[tokio::test]
async fn outstanding_deks_are_counted_across_brokers_and_a_rewrap_brings_them_to_zero() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "");
    // No retirement window: only the DEK counts guard the version.
    let env = [("KEYBROKER_RETIREMENT_WINDOW_SECONDS", "0"), ("KEYBROKER_USAGE_FLUSH_INTERVAL_MS", "100")];
    let one = Broker::serve(&config, &dev, &env);
    let two = Broker::serve(&config, &dev, &env);
    let mut admin = one.admin().await;
    admin
        .create_key(pb::CreateKeyRequest { key: "ledger".into(), deletion_allowed: true, ..Default::default() })
        .await
        .unwrap();
    let mut old = Vec::new();
    for (i, broker) in [&one, &one, &one, &two, &two].into_iter().enumerate() {
        let w = broker
            .app()
            .await
            .wrap(pb::WrapRequest { key: "ledger".into(), plaintext: vec![i as u8; 32], ..Default::default() })
            .await
            .unwrap();
        old.push(w.into_inner().ciphertext);
    }
    let dk = two
        .app()
        .await
        .generate_data_key(pb::GenerateDataKeyRequest { key: "ledger".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    old.push(dk.ciphertext);
    admin.rotate(pb::RotateRequest { key: "ledger".into(), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let key = admin.get_key(pb::GetKeyRequest { key: "ledger".into() }).await.unwrap().into_inner();
    let v1 = &key.versions[0];
    assert_eq!((v1.wrap_count, v1.outstanding_deks), (6, 6), "counts of both brokers: {v1:?}");
    assert!((now() - v1.last_wrap_unix_seconds).abs() < 60, "{v1:?}");
    let destroy = |force| pb::KeyVersionRequest { key: "ledger".into(), version: 1, force };
    let err = admin.destroy_key_version(destroy(false)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let year = time_year();
    assert!(
        err.message().contains("6 outstanding DEKs") && err.message().contains(&format!("the last made at {year}")),
        "{}",
        err.message()
    );
    let raise = pb::SetMinDecryptionVersionRequest { key: "ledger".into(), min_decryption_version: 2, force: false };
    assert!(admin.set_min_decryption_version(raise.clone()).await.unwrap_err().message().contains("outstanding"));

    // The rewrap pass, through the broker that rotated (the other one
    // learns of a rotation only when it reloads the key): v1 drains into v2.
    let mut new = Vec::new();
    for ct in &old {
        let mut app = one.app().await;
        let r = app.rewrap(pb::RewrapRequest { ciphertext: ct.clone(), ..Default::default() }).await.unwrap();
        new.push(r.into_inner().ciphertext);
    }
    // Rewrapping data already on v2 (as a rewrap pass's probe does) moves
    // nothing: one in, one out.
    one.app().await.rewrap(pb::RewrapRequest { ciphertext: new[0].clone(), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let key = admin.get_key(pb::GetKeyRequest { key: "ledger".into() }).await.unwrap().into_inner();
    let (v1, v2) = (&key.versions[0], &key.versions[1]);
    assert_eq!((v1.rewrapped_out, v1.outstanding_deks), (6, 0), "{v1:?}");
    assert_eq!((v2.rewrapped_in, v2.rewrapped_out, v2.outstanding_deks), (7, 1, 6), "{v2:?}");
    admin.set_min_decryption_version(raise).await.unwrap();
    admin.destroy_key_version(destroy(false)).await.unwrap();
    for ct in &new {
        one.app().await.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await.unwrap();
    }
}

fn time_year() -> String {
    // 365.2425 days a year since 1970 is close enough for the current year.
    (1970 + now() / 31_556_952).to_string()
}
