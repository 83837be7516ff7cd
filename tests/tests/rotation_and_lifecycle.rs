//! Rotation (with compare-and-swap) and the version lifecycle: new wraps go
//! to the current version while older versions keep unwrapping until they
//! are put below min_decryption_version, disabled or destroyed.

use keybroker_tests::{Broker, pb, tempdir};
use tonic::Code;

async fn wrap(
    app: &mut pb::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
    dek: u8,
) -> pb::WrapResponse {
    app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![dek; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

async fn unwrap(
    app: &mut pb::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
    ciphertext: &[u8],
) -> Result<pb::UnwrapResponse, tonic::Status> {
    app.unwrap(pb::UnwrapRequest { ciphertext: ciphertext.to_vec(), ..Default::default() })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn rotation_sends_new_wraps_to_v2_and_v1_keeps_unwrapping() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let (mut app, mut admin) = (broker.app().await, broker.admin().await);
    let v1 = wrap(&mut app, 1).await;
    let key = admin.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(key.current_version, 2);
    assert_eq!(key.versions.len(), 2);
    assert_eq!(key.versions[0].state, pb::VersionState::DecryptOnly as i32);
    assert_eq!(key.versions[1].state, pb::VersionState::Active as i32);
    let v2 = wrap(&mut app, 2).await;
    assert_eq!(v2.version, 2);
    let old = unwrap(&mut app, &v1.ciphertext).await.unwrap();
    assert_eq!((old.version, old.rewrap_advised, old.plaintext), (1, true, vec![1; 32]));
    let new = unwrap(&mut app, &v2.ciphertext).await.unwrap();
    assert_eq!((new.version, new.rewrap_advised), (2, false));
}

#[tokio::test]
async fn compare_and_swap_rotation_with_a_stale_version_is_aborted() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut admin = broker.admin().await;
    let rotate =
        |expected| pb::RotateRequest { key: "demo".into(), expected_current_version: expected, ..Default::default() };
    let key = admin.rotate(rotate(Some(1))).await.unwrap().into_inner();
    assert_eq!(key.current_version, 2);
    let err = admin.rotate(rotate(Some(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("version 2") && err.message().contains("expected 1"), "{}", err.message());
    let key = admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap().into_inner();
    assert_eq!(key.current_version, 2, "a lost CAS must not rotate");

    // Concurrent rotations with the same expectation: exactly one wins.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut admin = broker.admin().await;
        tasks.push(tokio::spawn(async move { admin.rotate(rotate(Some(2))).await }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    assert_eq!(wins, 1);
    let key = admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap().into_inner();
    assert_eq!(key.current_version, 3);
    assert_eq!(key.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 2, 3]);
}

#[tokio::test]
async fn min_decryption_version_disable_and_destroy_refuse_unwrap_naming_the_version() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let (mut app, mut admin) = (broker.app().await, broker.admin().await);
    let mut cts = vec![wrap(&mut app, 1).await.ciphertext];
    for v in 2..=4u8 {
        admin.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap();
        cts.push(wrap(&mut app, v).await.ciphertext);
    }
    let version_req = |version| pb::KeyVersionRequest { key: "demo".into(), version, force: false };

    // min_decryption_version = 2 (forced: v1 still has its DEK): v1 refused, v2 opens.
    admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            key: "demo".into(),
            min_decryption_version: 2,
            force: true,
        })
        .await
        .unwrap();
    let err = unwrap(&mut app, &cts[0]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("version 1") && err.message().contains("min_decryption_version 2"),
        "{}",
        err.message()
    );
    assert!(unwrap(&mut app, &cts[1]).await.is_ok());
    let err = admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            key: "demo".into(),
            min_decryption_version: 9,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Disable v2: refused until enabled again.
    let key = admin.disable_key_version(version_req(2)).await.unwrap().into_inner();
    assert_eq!(key.versions[1].state, pb::VersionState::Disabled as i32);
    let err = unwrap(&mut app, &cts[1]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("version 2") && err.message().contains("disabled"), "{}", err.message());
    admin.enable_key_version(version_req(2)).await.unwrap();
    assert_eq!(unwrap(&mut app, &cts[1]).await.unwrap().plaintext, vec![2; 32]);

    // The current version can be neither disabled nor destroyed.
    let err = admin.disable_key_version(version_req(4)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("current version"), "{}", err.message());

    // Destroy needs deletion_allowed.
    let err = admin.destroy_key_version(version_req(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("deletion"), "{}", err.message());
    assert!(unwrap(&mut app, &cts[2]).await.is_ok(), "a refused destroy changed something");
    admin
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            key: "demo".into(),
            deletion_allowed: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    // v3 still has its DEK (not rewrapped): destroying it now is refused,
    // unless forced.
    let err = admin.destroy_key_version(version_req(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("version 3") && err.message().contains("outstanding DEK"), "{}", err.message());
    let key =
        admin.destroy_key_version(pb::KeyVersionRequest { force: true, ..version_req(3) }).await.unwrap().into_inner();
    assert_eq!(key.versions[2].state, pb::VersionState::Destroyed as i32);
    let err = unwrap(&mut app, &cts[2]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("version 3") && err.message().contains("destroyed"), "{}", err.message());
    let err = admin.enable_key_version(version_req(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a destroyed version came back");
    let err = admin.disable_key_version(version_req(9)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The current version still works throughout.
    assert_eq!(unwrap(&mut app, &cts[3]).await.unwrap().plaintext, vec![4; 32]);
}
