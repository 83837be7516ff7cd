//! Automatic rotation from each key's rotation policy, in a fleet: a key
//! whose current version is older than its period, or has made its
//! maximum number of wraps, is rotated by exactly one broker; a version at
//! the AES-GCM invocation limit refuses to wrap rather than exceed it.

use std::time::{Duration, Instant};

use keybroker_client::pb;
use keybroker_tests::{Broker, Postgres, config_with_backends, config_with_postgres, dev_pki, tempdir};
use tonic::Code;

async fn current(broker: &Broker, key: &str) -> pb::Key {
    broker.admin().await.get_key(pb::GetKeyRequest { key: key.into() }).await.unwrap().into_inner()
}

async fn wrap(broker: &Broker, key: &str) -> Result<u32, tonic::Status> {
    let request = pb::WrapRequest { key: key.into(), plaintext: vec![9; 32], ..Default::default() };
    broker.app().await.wrap(request).await.map(|r| r.into_inner().version)
}

fn policy(period: u64, wraps: u64) -> Option<pb::RotationPolicy> {
    Some(pb::RotationPolicy { rotation_period_seconds: period, max_wraps_per_version: wraps })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_rotate_each_due_key_exactly_once() {
    let pg = Postgres::start();
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_postgres(dir.path(), &dev, &pg.url(), "", "");
    let env = [("KEYBROKER_ROTATION_CHECK_INTERVAL_MS", "100"), ("KEYBROKER_USAGE_FLUSH_INTERVAL_MS", "200")];
    let brokers: Vec<Broker> = (0..3).map(|_| Broker::serve(&config, &dev, &env)).collect();
    let mut admin = brokers[0].admin().await;

    // By age: a 2-second period, watched for 7 seconds by three brokers.
    let started = Instant::now();
    let create =
        |key: &str, rotation_policy| pb::CreateKeyRequest { key: key.into(), rotation_policy, ..Default::default() };
    admin.create_key(create("by-age", policy(2, 0))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(7000)).await;
    let key = current(&brokers[1], "by-age").await;
    let elapsed = started.elapsed().as_secs();
    println!("after {elapsed} s: version {}", key.current_version);
    assert!(
        (3..=5).contains(&key.current_version),
        "{} rotations in {elapsed} s with a 2 s period",
        key.current_version - 1
    );
    let created: Vec<i64> = key.versions.iter().map(|v| v.created_at_unix_seconds).collect();
    for pair in created.windows(2) {
        assert!(pair[1] - pair[0] >= 2, "two rotations within one period (versions made at {created:?})");
    }
    let logged: usize = brokers
        .iter()
        .map(|b| b.stderr().lines().filter(|l| l.contains("rotated automatically") && l.contains("by-age")).count())
        .sum();
    assert_eq!(logged as u32, key.current_version - 1, "each due rotation is done by exactly one broker");

    // By wraps: a policy of 10 wraps per version, wrapped through two brokers.
    admin.create_key(create("by-wraps", policy(0, 10))).await.unwrap();
    for i in 0..10 {
        assert_eq!(wrap(&brokers[i % 2], "by-wraps").await.unwrap(), 1);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while current(&brokers[2], "by-wraps").await.current_version < 2 {
        assert!(Instant::now() < deadline, "10 wraps of a 10-wrap policy did not rotate the key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = current(&brokers[2], "by-wraps").await;
    assert_eq!(key.current_version, 2, "rotated once, not once per broker");
    assert_eq!(key.versions[0].wrap_count, 10);
    assert_eq!(wrap(&brokers[2], "by-wraps").await.unwrap(), 2);
}

#[tokio::test]
async fn a_version_at_the_wrap_limit_refuses_to_wrap() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "");
    // Counts stay in this broker (no flush), so nothing rotates by itself:
    // the limit alone decides.
    let env = [("KEYBROKER_LIMITS__MAX_WRAPS_PER_VERSION", "5"), ("KEYBROKER_USAGE_FLUSH_INTERVAL_MS", "600000")];
    let broker = Broker::serve(&config, &dev, &env);
    broker.admin().await.create_key(pb::CreateKeyRequest { key: "capped".into(), ..Default::default() }).await.unwrap();
    for _ in 0..5 {
        assert_eq!(wrap(&broker, "capped").await.unwrap(), 1);
    }
    let err = wrap(&broker, "capped").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("version 1") && err.message().contains("limits.max_wraps_per_version = 5"),
        "{}",
        err.message()
    );
    // GenerateDataKey and Rewrap into the version are invocations too.
    let err = broker
        .app()
        .await
        .generate_data_key(pb::GenerateDataKeyRequest { key: "capped".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    broker.admin().await.rotate(pb::RotateRequest { key: "capped".into(), ..Default::default() }).await.unwrap();
    assert_eq!(wrap(&broker, "capped").await.unwrap(), 2);
    // A batch run of one key takes what room is left (4 wraps of v2), item
    // by item: a bad item takes none, the items past the limit are refused.
    let item = |plaintext: &[u8]| pb::WrapRequest {
        key: "capped".into(),
        plaintext: plaintext.to_vec(),
        ..Default::default()
    };
    let items = vec![item(b"a"), item(b"b"), item(b""), item(b"c"), item(b"d"), item(b"e")];
    let results = broker.app().await.batch_wrap(pb::BatchWrapRequest { items }).await.unwrap().into_inner().results;
    let codes: Vec<i32> = results
        .iter()
        .map(|r| match r.result.as_ref().unwrap() {
            pb::batch_wrap_result::Result::Ok(w) => {
                assert_eq!(w.version, 2);
                0
            }
            pb::batch_wrap_result::Result::Error(e) => e.code,
        })
        .collect();
    let (ok, invalid, exhausted) = (0, Code::InvalidArgument as i32, Code::ResourceExhausted as i32);
    assert_eq!(codes, [ok, ok, invalid, ok, ok, exhausted]);
}
