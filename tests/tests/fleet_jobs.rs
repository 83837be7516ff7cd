//! Migration jobs in a fleet: a job is run by the one broker holding its
//! lease in the version table; when that broker is killed (kill -9),
//! another takes the job over once the lease runs out and finishes it, with
//! nothing done twice.

use std::time::{Duration, Instant};

use keybroker_client::pb;
use keybroker_tests::{Broker, Moto, Postgres, aws_backend_toml, config_with_postgres, dev_pki, tempdir};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_broker_dies_is_taken_over_and_finishes_with_nothing_done_twice() {
    let pg = Postgres::start();
    let moto = Moto::start();
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_postgres(dir.path(), &dev, &pg.url(), "", &aws_backend_toml("aws", &moto));
    let mut env: Vec<(&str, &str)> = Moto::env().to_vec();
    env.push(("KEYBROKER_MIGRATION_LEASE_MS", "1000"));
    let mut brokers: Vec<Broker> = (0..3).map(|_| Broker::serve(&config, &dev, &env)).collect();
    let mut admin = brokers[0].admin().await;
    let n = 30;
    let mut old = Vec::new();
    for i in 0..n {
        let key = format!("job-{i:02}");
        admin.create_key(pb::CreateKeyRequest { key: key.clone(), ..Default::default() }).await.unwrap();
        let request = pb::WrapRequest { key: key.clone(), plaintext: vec![i as u8; 32], ..Default::default() };
        old.push((key, brokers[1].app().await.wrap(request).await.unwrap().into_inner().ciphertext));
    }

    // local -> aws-kms: AWS KMS cannot import, so each key gets a new
    // version in the KMS; doing a key twice would make two.
    let request = pb::MigrateRequest {
        pattern: "job-*".into(),
        from_backend: "local".into(),
        to_backend: "aws".into(),
        max_keys_per_second: 10,
        ..Default::default()
    };
    let mut stream = admin.migrate(request).await.unwrap().into_inner();
    let job_id = stream.next().await.unwrap().unwrap().job_id;
    drop(stream);
    let mut watcher = brokers[1].admin().await;
    loop {
        let request = pb::GetMigrationRequest { job_id: job_id.clone() };
        let p = watcher.get_migration(request).await.unwrap().into_inner();
        if p.keys_done >= 8 {
            assert!(p.keys_done < n, "the job finished before the kill; slow it down");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed_at = Instant::now();
    brokers[0].kill9();

    // Another broker takes the lease over and finishes; a third watches.
    let mut watch = brokers[2]
        .admin()
        .await
        .watch_migration(pb::GetMigrationRequest { job_id: job_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = watch.next().await {
        last = Some(p.unwrap());
    }
    let last = last.unwrap();
    println!("finished {} ms after the kill", killed_at.elapsed().as_millis());
    assert_eq!(last.phase, pb::MigrationPhase::Done as i32, "{last:?}");
    assert_eq!((last.keys_total, last.keys_done, last.keys_failed), (n, n, 0), "{last:?}");
    let took_over: Vec<usize> = (1..3).filter(|&i| brokers[i].stderr().contains("migration job done")).collect();
    assert_eq!(took_over.len(), 1, "exactly one surviving broker finished the job");

    let mut admin = brokers[1].admin().await;
    for (key, ciphertext) in &old {
        let k = admin.get_key(pb::GetKeyRequest { key: key.clone() }).await.unwrap().into_inner();
        let homes: Vec<(u32, &str)> = k.versions.iter().map(|v| (v.version, v.backend.as_str())).collect();
        assert_eq!(homes, [(1, "local"), (2, "aws")], "{key} was not migrated exactly once");
        let request = pb::UnwrapRequest { ciphertext: ciphertext.clone(), ..Default::default() };
        brokers[2].app().await.unwrap(request).await.unwrap();
    }
}
