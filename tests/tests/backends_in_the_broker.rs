//! Backends inside a running broker: keys on local, AWS KMS (moto_server)
//! and PKCS#11 (SoftHSM2) side by side, versions of one key on different
//! backends, health, an outage that fails only the affected keys and
//! recovers without a restart, hierarchy mode's remote-call counts, and a
//! root key sealed by a KMS or HSM.

use std::time::{Duration, Instant};

use keybroker_client::pb;
use keybroker_tests::{
    Broker, Moto, SOFTHSM_PIN, SoftHsm, aws_backend_toml, config_with, config_with_backends, ctx, dev_pki,
    hsm_backend_toml, keybroker_bin, tempdir,
};
use tonic::Code;

fn env_for<'a>(hsm: Option<&'a SoftHsm>, conf: &'a mut String) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<(&str, &str)> = Moto::env().to_vec();
    env.push(("KB_TEST_HSM_PIN", SOFTHSM_PIN));
    if let Some(hsm) = hsm {
        *conf = hsm.conf.display().to_string();
        env.push(("SOFTHSM2_CONF", conf.as_str()));
    }
    env
}

async fn wrap(broker: &Broker, key: &str, dek: u8) -> Result<pb::WrapResponse, tonic::Status> {
    broker
        .app()
        .await
        .wrap(pb::WrapRequest { key: key.into(), plaintext: vec![dek; 32], context: ctx(&[("k", key)]) })
        .await
        .map(|r| r.into_inner())
}

async fn unwrap(broker: &Broker, key: &str, ciphertext: &[u8]) -> Result<pb::UnwrapResponse, tonic::Status> {
    broker
        .app()
        .await
        .unwrap(pb::UnwrapRequest { ciphertext: ciphertext.to_vec(), context: ctx(&[("k", key)]) })
        .await
        .map(|r| r.into_inner())
}

async fn create(broker: &Broker, key: &str, backend: &str, mode: pb::KeyMode) -> pb::Key {
    broker
        .admin()
        .await
        .create_key(pb::CreateKeyRequest {
            key: key.into(),
            backend: backend.into(),
            mode: mode as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("creating {key} on {backend}: {e:?}"))
        .into_inner()
}

async fn backends(broker: &Broker) -> Vec<pb::Backend> {
    broker.admin().await.list_backends(pb::ListBackendsRequest {}).await.unwrap().into_inner().backends
}

async fn health(broker: &Broker, service: &str) -> i32 {
    let channel = broker.channel("client").await;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    match client.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await {
        Ok(r) => r.into_inner().status,
        Err(_) => -1,
    }
}

/// Polls `check` every 50 ms for up to `limit`; true once it holds.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn one_broker_serves_local_aws_kms_and_pkcs11_keys_and_versions_move_between_them() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let moto = Moto::start();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let backends_toml = format!("{}\n{}", aws_backend_toml("aws", &moto), hsm_backend_toml("hsm", "kb"));
    let config = config_with_backends(dir.path(), &dev, "local", &backends_toml);
    let mut conf = String::new();
    let broker = Broker::serve(&config, &dev, &env_for(Some(&hsm), &mut conf));

    let listed = backends(&broker).await;
    let summary: Vec<(String, String, bool, bool)> =
        listed.iter().map(|b| (b.name.clone(), b.r#type.clone(), b.healthy, b.exportable)).collect();
    assert_eq!(
        summary,
        [
            ("aws".into(), "aws-kms".into(), true, false),
            ("hsm".into(), "pkcs11".into(), true, false),
            ("local".into(), "local".into(), true, true)
        ]
    );

    for (key, backend, id_prefix) in
        [("k-local", "local", ""), ("k-aws", "aws", "arn:aws:kms:"), ("k-hsm", "hsm", "id:")]
    {
        let created = create(&broker, key, backend, pb::KeyMode::Direct).await;
        assert_eq!(created.backend, backend);
        assert!(created.versions[0].backend_key_id.starts_with(id_prefix), "{key}: {:?}", created.versions[0]);
        assert!(created.backend_healthy);
        let w = wrap(&broker, key, 7).await.unwrap();
        assert_eq!(unwrap(&broker, key, &w.ciphertext).await.unwrap().plaintext, vec![7; 32], "{key}");
        let err = broker
            .app()
            .await
            .unwrap(pb::UnwrapRequest { ciphertext: w.ciphertext.clone(), context: ctx(&[("k", "other")]) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{key}: {err:?}");
        assert!(err.message().contains("ciphertext authentication failed"), "{key}: {}", err.message());
        assert_eq!(health(&broker, &format!("keybroker.backend.{backend}")).await, 1, "{backend} not SERVING");
    }

    // One key, three versions on three backends; all keep unwrapping.
    let mut admin = broker.admin().await;
    create(&broker, "roaming", "local", pb::KeyMode::Direct).await;
    let v1 = wrap(&broker, "roaming", 1).await.unwrap();
    let rotate =
        |backend: &str| pb::RotateRequest { key: "roaming".into(), backend: backend.into(), ..Default::default() };
    admin.rotate(rotate("aws")).await.unwrap();
    let v2 = wrap(&broker, "roaming", 2).await.unwrap();
    let key = admin.rotate(rotate("hsm")).await.unwrap().into_inner();
    let v3 = wrap(&broker, "roaming", 3).await.unwrap();
    let homes: Vec<&str> = key.versions.iter().map(|v| v.backend.as_str()).collect();
    assert_eq!(homes, ["local", "aws", "hsm"]);
    assert_eq!((v1.version, v2.version, v3.version), (1, 2, 3));
    for (w, dek) in [(&v1, 1u8), (&v2, 2), (&v3, 3)] {
        let u = unwrap(&broker, "roaming", &w.ciphertext).await.unwrap();
        assert_eq!((u.version, u.plaintext), (w.version, vec![dek; 32]));
    }

    // A disabled version on a remote backend is refused by keybroker itself
    // (moto would still decrypt with a disabled KMS key).
    admin.disable_key_version(pb::KeyVersionRequest { key: "roaming".into(), version: 2, force: false }).await.unwrap();
    let err = unwrap(&broker, "roaming", &v2.ciphertext).await.unwrap_err();
    assert!(err.code() == Code::FailedPrecondition && err.message().contains("disabled"), "{err:?}");

    // Bring your own key: attach the KMS key of k-aws v1 to a new key.
    let arn = admin.get_key(pb::GetKeyRequest { key: "k-aws".into() }).await.unwrap().into_inner().versions[0]
        .backend_key_id
        .clone();
    let byok = admin
        .create_key(pb::CreateKeyRequest {
            key: "byok".into(),
            backend: "aws".into(),
            backend_key_id: arn.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(byok.versions[0].backend_key_id, arn);
    let w = wrap(&broker, "byok", 4).await.unwrap();
    assert_eq!(unwrap(&broker, "byok", &w.ciphertext).await.unwrap().plaintext, vec![4; 32]);
    let err = admin
        .create_key(pb::CreateKeyRequest {
            key: "byok2".into(),
            backend: "aws".into(),
            backend_key_id: "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = admin
        .create_key(pb::CreateKeyRequest {
            key: "hier-local".into(),
            mode: pb::KeyMode::Hierarchy as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "hierarchy mode on the local backend: {err:?}");
}

#[tokio::test]
async fn hierarchy_mode_wraps_locally_while_direct_mode_calls_the_kms_each_time() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let moto = Moto::start();
    let config = config_with_backends(dir.path(), &dev, "aws", &aws_backend_toml("aws", &moto));
    let mut conf = String::new();
    let mut env = env_for(None, &mut conf);
    // No health checks during the count: only wraps may reach the KMS.
    env.push(("KEYBROKER_HEALTH_CHECK_INTERVAL_MS", "3600000"));
    let broker = Broker::serve(&config, &dev, &env);
    create(&broker, "direct", "aws", pb::KeyMode::Direct).await;
    let hier = create(&broker, "hier", "aws", pb::KeyMode::Hierarchy).await;
    assert_eq!(hier.mode, pb::KeyMode::Hierarchy as i32);
    assert!(hier.versions[0].backend_key_id.starts_with("arn:aws:kms:"), "{hier:?}");

    let remote_calls = || async { backends(&broker).await.iter().find(|b| b.name == "aws").unwrap().remote_calls };
    let mut app = broker.app().await;
    let count = |key: &'static str| {
        let items = (0..1000u32)
            .map(|i| pb::WrapRequest { key: key.into(), plaintext: i.to_be_bytes().repeat(8), ..Default::default() })
            .collect();
        let mut app = app.clone();
        async move {
            let results = app.batch_wrap(pb::BatchWrapRequest { items }).await.unwrap().into_inner().results;
            assert!(results.iter().all(|r| matches!(r.result, Some(pb::batch_wrap_result::Result::Ok(_)))));
            results
        }
    };
    let before = remote_calls().await;
    let direct = count("direct").await;
    let after_direct = remote_calls().await;
    let hierarchy = count("hier").await;
    let after_hierarchy = remote_calls().await;
    let direct_calls = after_direct - before;
    let hierarchy_calls = after_hierarchy - after_direct;
    println!("remote KMS calls for 1000 wraps: direct {direct_calls}, hierarchy {hierarchy_calls}");
    assert!(direct_calls >= 1000, "direct mode made {direct_calls} KMS calls for 1000 wraps");
    assert!(hierarchy_calls <= 1, "hierarchy mode made {hierarchy_calls} KMS calls for 1000 wraps");

    // Unwraps too; and ciphertexts of both modes open.
    let pick = |r: &pb::BatchWrapResult| match &r.result {
        Some(pb::batch_wrap_result::Result::Ok(w)) => w.ciphertext.clone(),
        _ => unreachable!(),
    };
    let items = hierarchy.iter().map(|r| pb::UnwrapRequest { ciphertext: pick(r), ..Default::default() }).collect();
    let opened = app.batch_unwrap(pb::BatchUnwrapRequest { items }).await.unwrap().into_inner().results;
    assert!(opened.iter().all(|r| matches!(r.result, Some(pb::batch_unwrap_result::Result::Ok(_)))));
    assert!(remote_calls().await - after_hierarchy <= 1, "hierarchy unwraps reached the KMS");
    let u = app.unwrap(pb::UnwrapRequest { ciphertext: pick(&direct[0]), ..Default::default() }).await.unwrap();
    assert_eq!(u.into_inner().plaintext, 0u32.to_be_bytes().repeat(8));
}

/// A broker with a local and an aws-kms backend on a fresh moto, and key
/// `on-aws` in the KMS.
async fn broker_with_aws(dir: &std::path::Path) -> (Moto, Broker) {
    let dev = dev_pki(dir);
    let moto = Moto::start();
    let config = config_with_backends(dir, &dev, "local", &aws_backend_toml("aws", &moto));
    let mut conf = String::new();
    let broker = Broker::serve(&config, &dev, &env_for(None, &mut conf));
    create(&broker, "on-aws", "aws", pb::KeyMode::Direct).await;
    (moto, broker)
}

#[tokio::test]
async fn an_aws_kms_outage_fails_only_its_keys_quickly_and_recovers_without_restart() {
    let dir = tempdir();
    let (moto, broker) = broker_with_aws(dir.path()).await;
    create(&broker, "on-local", "local", pb::KeyMode::Direct).await;
    let before = wrap(&broker, "on-aws", 1).await.unwrap();

    moto.freeze();
    let started = Instant::now();
    let err = wrap(&broker, "on-aws", 2).await.unwrap_err();
    let took = started.elapsed();
    println!("wrap on a frozen KMS failed after {} ms", took.as_millis());
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("\"aws\""), "the message names the backend: {}", err.message());
    assert!(took < Duration::from_secs(3), "the outage took {took:?} to surface (timeout_ms = 1000)");
    let err = unwrap(&broker, "on-aws", &before.ciphertext).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // Keys on other backends are untouched.
    let local = wrap(&broker, "on-local", 3).await.unwrap();
    assert_eq!(unwrap(&broker, "on-local", &local.ciphertext).await.unwrap().plaintext, vec![3; 32]);
    assert!(
        eventually(Duration::from_secs(10), || async { health(&broker, "keybroker.backend.aws").await == 2 }).await,
        "health did not report NOT_SERVING"
    );
    // Known to be down: its keys answer at once (a circuit breaker), not
    // after the 1 s backend timeout each, and never with a raw SDK error.
    for i in 0..5 {
        let started = Instant::now();
        let err = wrap(&broker, "on-aws", 5).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("\"aws\"") && !err.message().contains("arn:"), "{}", err.message());
        assert!(took < Duration::from_millis(300) || i == 0, "call {i} on a known-down backend took {took:?}");
    }
    let key = broker.admin().await.get_key(pb::GetKeyRequest { key: "on-aws".into() }).await.unwrap().into_inner();
    assert!(!key.backend_healthy && !key.versions[0].backend_healthy);
    let listed = backends(&broker).await;
    assert!(listed.iter().any(|b| b.name == "aws" && !b.healthy && b.error.contains("aws")), "{listed:?}");

    moto.thaw();
    assert!(
        eventually(Duration::from_secs(10), || async { wrap(&broker, "on-aws", 4).await.is_ok() }).await,
        "no recovery after the KMS came back"
    );
    assert_eq!(unwrap(&broker, "on-aws", &before.ciphertext).await.unwrap().plaintext, vec![1; 32]);
    assert!(
        eventually(Duration::from_secs(10), || async { health(&broker, "keybroker.backend.aws").await == 1 }).await
    );
}

#[tokio::test]
async fn a_missing_hsm_token_fails_only_its_keys_and_recovers_without_restart() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let config = config_with_backends(dir.path(), &dev, "local", &hsm_backend_toml("hsm", "kb"));
    let mut conf = String::new();
    let env = env_for(Some(&hsm), &mut conf);
    let mut broker = Broker::serve(&config, &dev, &env);
    create(&broker, "on-hsm", "hsm", pb::KeyMode::Direct).await;
    create(&broker, "on-local", "local", pb::KeyMode::Direct).await;
    let sealed = wrap(&broker, "on-hsm", 1).await.unwrap();
    broker.terminate().await;

    // The token goes away while the broker is down; it starts anyway.
    let parked = dir.path().join("tokens-parked");
    std::fs::rename(&hsm.tokens, &parked).unwrap();
    std::fs::create_dir_all(&hsm.tokens).unwrap();
    let broker = Broker::serve(&config, &dev, &env);
    let started = Instant::now();
    let err = unwrap(&broker, "on-hsm", &sealed.ciphertext).await.unwrap_err();
    println!("unwrap with the token missing failed after {} ms", started.elapsed().as_millis());
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("\"hsm\"") && err.message().contains("\"on-hsm\""), "{}", err.message());
    assert!(broker.stderr().contains("no token labelled"), "the reason is not in the log");
    let local = wrap(&broker, "on-local", 2).await.unwrap();
    assert_eq!(unwrap(&broker, "on-local", &local.ciphertext).await.unwrap().plaintext, vec![2; 32]);
    assert_eq!(health(&broker, "keybroker.backend.hsm").await, 2, "NOT_SERVING expected");

    // The token comes back: the broker reconnects by itself.
    std::fs::remove_dir_all(&hsm.tokens).unwrap();
    std::fs::rename(&parked, &hsm.tokens).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { unwrap(&broker, "on-hsm", &sealed.ciphertext).await.is_ok() })
            .await,
        "no recovery after the token came back: {}",
        broker.stderr()
    );
    assert!(
        eventually(Duration::from_secs(10), || async { health(&broker, "keybroker.backend.hsm").await == 1 }).await
    );
}

fn run_keybroker(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(keybroker_bin()).args(args).envs(env.iter().copied()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_root_key_sealed_by_aws_kms_or_an_hsm_leaves_no_plaintext_root_key_on_disk() {
    for sealer in ["aws", "hsm"] {
        let dir = tempdir();
        let dev = dev_pki(dir.path());
        std::fs::remove_file(dev.join("root.key")).unwrap();
        let moto = Moto::start();
        let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
        let backends_toml = format!("{}\n{}", aws_backend_toml("aws", &moto), hsm_backend_toml("hsm", "kb"));
        let mut conf = String::new();
        let env = env_for(Some(&hsm), &mut conf);

        // 1. A remote key to seal with.
        let bootstrap = config_with(dir.path(), &dev, "local", "", &backends_toml);
        let (ok, id, err) =
            run_keybroker(&["create-remote-key", "--config", bootstrap.to_str().unwrap(), "--backend", sealer], &env);
        assert!(ok, "create-remote-key: {err}");
        let id = id.trim().to_owned();
        // 2. Seal a fresh root key with it.
        let root = format!(
            "[root_key]\nsealed_file = \"{}/root.sealed\"\nsealed_by = \"{sealer}\"\nsealed_by_key = \"{id}\"\n",
            dir.path().display()
        );
        let config = config_with(dir.path(), &dev, "local", &root, &backends_toml);
        let (ok, out, err) = run_keybroker(&["seal-root-key", "--config", config.to_str().unwrap()], &env);
        assert!(ok && out.contains("root.sealed"), "seal-root-key: {out}{err}");
        let (ok, _, err) = run_keybroker(&["seal-root-key", "--config", config.to_str().unwrap()], &env);
        assert!(!ok && err.contains("root.sealed"), "an existing sealed root key was overwritten: {err}");

        // 3. Serve local keys under it, across a restart.
        let mut broker = Broker::serve(&config, &dev, &env);
        create(&broker, "local-key", "local", pb::KeyMode::Direct).await;
        let w = wrap(&broker, "local-key", 9).await.unwrap();
        broker.kill9();
        let broker = Broker::serve(&config, &dev, &env);
        assert_eq!(unwrap(&broker, "local-key", &w.ciphertext).await.unwrap().plaintext, vec![9; 32], "{sealer}");
        assert!(!dev.join("root.key").exists());
        drop(broker);

        // A damaged sealed file: refuse to start, naming the sealer.
        let sealed_path = dir.path().join("root.sealed");
        let mut bytes = std::fs::read(&sealed_path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&sealed_path, bytes).unwrap();
        let failure = Broker::try_start(&["serve", "--config", config.to_str().unwrap()], &env, &dev).err().unwrap();
        assert!(failure.stderr.contains("unsealing the root key") && failure.stderr.contains(sealer), "{failure}");
    }
}

/// What AWS KMS says about a failure (ARNs, principals) reaches the
/// broker's log, not the application: it gets the code and a message
/// naming the backend, the key and the version.
#[tokio::test]
async fn application_callers_see_no_raw_kms_error() {
    let dir = tempdir();
    let (moto, broker) = broker_with_aws(dir.path()).await;
    let sealed = wrap(&broker, "on-aws", 1).await.unwrap();
    drop(moto);
    for err in [
        wrap(&broker, "on-aws", 2).await.unwrap_err(),
        unwrap(&broker, "on-aws", &sealed.ciphertext).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        let message = err.message();
        assert!(
            message.contains("\"aws\"") && message.contains("\"on-aws\"") && message.contains("version 1"),
            "{message}"
        );
        assert!(
            !message.contains("arn:") && !message.contains("127.0.0.1"),
            "a raw KMS error reached the caller: {message}"
        );
    }
    assert!(broker.stderr().contains("arn:aws:kms:"), "the details are not in the log");
}
