//! kill -9 of the broker loses nothing: after a restart on the same data
//! directory every key and version is there and every earlier ciphertext
//! unwraps.

use keybroker_tests::{Broker, ctx, pb, tempdir};

#[tokio::test]
async fn kill_9_and_restart_keeps_every_key_version_and_ciphertext() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let mut broker = Broker::start_dev(&data);
    let first_ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let mut ciphertexts = Vec::new();
    let mut expected_keys = Vec::new();
    {
        let (mut app, mut admin) = (broker.app().await, broker.admin().await);
        for k in 0..5 {
            let name = format!("svc-{k}");
            admin.create_key(pb::CreateKeyRequest { key: name.clone(), ..Default::default() }).await.unwrap();
            for v in 1..=k + 1 {
                for n in 0..4u8 {
                    let context = ctx(&[("n", &n.to_string())]);
                    let w = app
                        .wrap(pb::WrapRequest { key: name.clone(), plaintext: vec![n; 32], context: context.clone() })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(w.version, v);
                    ciphertexts.push((w.ciphertext, context, vec![n; 32], name.clone(), v));
                }
                if v <= k {
                    admin.rotate(pb::RotateRequest { key: name.clone(), ..Default::default() }).await.unwrap();
                }
            }
            expected_keys.push((name, k + 1));
        }
        admin
            .disable_key_version(pb::KeyVersionRequest { key: "svc-4".into(), version: 2, force: false })
            .await
            .unwrap();
    }
    let pid = broker.pid();
    broker.kill9();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} survived kill -9");

    let broker = Broker::start_dev(&data);
    assert_eq!(std::fs::read(data.join("tls/ca.pem")).unwrap(), first_ca, "the dev PKI was regenerated");
    let (mut app, mut admin) = (broker.app().await, broker.admin().await);
    for (name, current) in &expected_keys {
        let key = admin.get_key(pb::GetKeyRequest { key: name.clone() }).await.unwrap().into_inner();
        assert_eq!(key.current_version, *current, "{name}");
        assert_eq!(key.versions.len() as u32, *current, "{name}");
    }
    let svc4 = admin.get_key(pb::GetKeyRequest { key: "svc-4".into() }).await.unwrap().into_inner();
    assert_eq!(svc4.versions[1].state, pb::VersionState::Disabled as i32, "a disable was lost");
    let mut opened = 0;
    for (ciphertext, context, plaintext, name, version) in ciphertexts {
        let result = app.unwrap(pb::UnwrapRequest { ciphertext, context }).await;
        if name == "svc-4" && version == 2 {
            assert_eq!(result.unwrap_err().code(), tonic::Code::FailedPrecondition);
            continue;
        }
        let u = result.unwrap().into_inner();
        assert_eq!((u.plaintext, u.key, u.version), (plaintext, name, version));
        opened += 1;
    }
    assert_eq!(opened, 4 * (1 + 2 + 3 + 4 + 5) - 4);
    let demo = admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap().into_inner();
    assert_eq!(demo.current_version, 1, "the demo key was recreated");
}
