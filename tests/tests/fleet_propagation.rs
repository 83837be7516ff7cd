//! A fleet: several broker processes on one version table (three on a real
//! PostgreSQL server, two on one SQLite file). A rotation, a destroyed
//! version or a new key made through one broker takes effect on every
//! other within the documented bound (2 s); a ciphertext naming a version a
//! broker has not seen yet makes it reload instead of failing; concurrent
//! rotations spread over the brokers never duplicate a version; a flood of
//! unknown key names does not become a flood of queries.

use std::time::{Duration, Instant};

use keybroker_client::pb;
use keybroker_tests::{Broker, Postgres, config_with_backends, config_with_postgres, dev_pki, tempdir};
use tonic::Code;

/// The propagation bound the README promises.
const BOUND: Duration = Duration::from_secs(2);

async fn wrap(broker: &Broker, key: &str) -> Result<pb::WrapResponse, tonic::Status> {
    let request = pb::WrapRequest { key: key.into(), plaintext: vec![7; 32], ..Default::default() };
    broker.app().await.wrap(request).await.map(tonic::Response::into_inner)
}

async fn unwrap(broker: &Broker, ciphertext: &[u8]) -> Result<pb::UnwrapResponse, tonic::Status> {
    let request = pb::UnwrapRequest { ciphertext: ciphertext.to_vec(), ..Default::default() };
    broker.app().await.unwrap(request).await.map(tonic::Response::into_inner)
}

/// How long until `check` holds, polling every 20 ms; `None` past 10 s.
async fn time_until<F, Fut>(mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Rotation, destroy and new keys through `brokers[0]` reach the others
/// within the bound.
async fn changes_reach_every_broker(brokers: &[Broker]) {
    let mut admin = brokers[0].admin().await;
    admin
        .create_key(pb::CreateKeyRequest { key: "fleet".into(), deletion_allowed: true, ..Default::default() })
        .await
        .unwrap();
    let mut v1 = Vec::new();
    for broker in brokers {
        let w = wrap(broker, "fleet").await.unwrap();
        assert_eq!(w.version, 1);
        v1.push(w.ciphertext);
    }

    admin.rotate(pb::RotateRequest { key: "fleet".into(), ..Default::default() }).await.unwrap();
    // A v2 ciphertext opens at once everywhere: the broker reloads the key.
    let fresh = wrap(&brokers[0], "fleet").await.unwrap();
    assert_eq!(fresh.version, 2);
    for broker in &brokers[1..] {
        let opened = unwrap(broker, &fresh.ciphertext).await.unwrap();
        assert_eq!((opened.version, opened.plaintext), (2, vec![7; 32]));
    }
    for (i, broker) in brokers.iter().enumerate().skip(1) {
        let took = time_until(|| async { wrap(broker, "fleet").await.is_ok_and(|w| w.version == 2) }).await;
        let took = took.unwrap_or_else(|| panic!("broker {i} never wrapped under v2"));
        println!("broker {i} wrapped under the new version after {} ms", took.as_millis());
        assert!(took < BOUND, "broker {i} took {took:?} to see the rotation");
    }

    // Destroy v1 through the first broker: no broker unwraps it after the bound.
    admin.rotate(pb::RotateRequest { key: "fleet".into(), ..Default::default() }).await.unwrap();
    admin.destroy_key_version(pb::KeyVersionRequest { key: "fleet".into(), version: 1, force: true }).await.unwrap();
    for (i, broker) in brokers.iter().enumerate() {
        let took = time_until(|| async {
            unwrap(broker, &v1[i]).await.is_err_and(|e| {
                e.code() == Code::FailedPrecondition
                    && e.message().contains("version 1")
                    && e.message().contains("destroyed")
            })
        })
        .await;
        let took = took.unwrap_or_else(|| panic!("broker {i} still unwraps the destroyed version"));
        println!("broker {i} refused the destroyed version after {} ms", took.as_millis());
        assert!(took < BOUND, "broker {i} took {took:?} to refuse the destroyed version");
    }
}

/// Concurrent rotations spread over every broker: one new version per
/// successful call, none twice; compare-and-swap has exactly one winner.
async fn concurrent_rotations_never_duplicate(brokers: &[Broker]) {
    let mut admin = brokers[0].admin().await;
    admin.create_key(pb::CreateKeyRequest { key: "spin".into(), ..Default::default() }).await.unwrap();
    let mut calls = Vec::new();
    for broker in brokers {
        for _ in 0..5 {
            let mut admin = broker.admin().await;
            calls.push(tokio::spawn(async move {
                admin.rotate(pb::RotateRequest { key: "spin".into(), ..Default::default() }).await
            }));
        }
    }
    let mut made = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(key) => made.push(key.into_inner().current_version),
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    made.sort_unstable();
    let count = made.len();
    made.dedup();
    assert_eq!(made.len(), count, "two rotations reported the same version: {made:?}");
    let key = admin.get_key(pb::GetKeyRequest { key: "spin".into() }).await.unwrap().into_inner();
    assert_eq!(key.current_version as usize, 1 + count, "{count} rotations succeeded");
    let numbers: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, (1..=key.current_version).collect::<Vec<_>>());

    let current = key.current_version;
    let mut calls = Vec::new();
    for broker in brokers.iter().cycle().take(6) {
        let mut admin = broker.admin().await;
        calls.push(tokio::spawn(async move {
            let request =
                pb::RotateRequest { key: "spin".into(), expected_current_version: Some(current), ..Default::default() };
            admin.rotate(request).await.map_err(|s| s.code())
        }));
    }
    let mut won = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => won += 1,
            Err(code) => assert_eq!(code, Code::Aborted),
        }
    }
    assert_eq!(won, 1, "compare-and-swap rotation must have exactly one winner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_on_postgres_agree_within_two_seconds() {
    let pg = Postgres::start();
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_postgres(dir.path(), &dev, &pg.url(), "", "");
    let brokers: Vec<Broker> = (0..3).map(|_| Broker::serve(&config, &dev, &[])).collect();
    changes_reach_every_broker(&brokers).await;
    concurrent_rotations_never_duplicate(&brokers).await;

    // A flood of one unknown key name costs a handful of queries, not one
    // per request; the key still appears within the bound once created.
    pg.log_statements();
    let mark = pg.log().len();
    let started = Instant::now();
    for broker in &brokers {
        let mut app = broker.app().await;
        for _ in 0..200 {
            let request = pb::WrapRequest { key: "not-yet".into(), plaintext: vec![1; 32], ..Default::default() };
            assert_eq!(app.wrap(request).await.unwrap_err().code(), Code::NotFound);
        }
    }
    let flood = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lookups = pg.log()[mark..].matches("FROM keys WHERE name = $1").count();
    println!("600 calls for an unknown key in {} ms cost {lookups} key lookups", flood.as_millis());
    assert!(lookups >= 1, "the statement log shows no lookup at all: the count proves nothing");
    let most = 3 * (flood.as_secs() as usize + 2);
    assert!(lookups <= most, "{lookups} key lookups for 600 calls on one unknown key in {flood:?}");
    brokers[0]
        .admin()
        .await
        .create_key(pb::CreateKeyRequest { key: "not-yet".into(), ..Default::default() })
        .await
        .unwrap();
    for broker in &brokers[1..] {
        let took = time_until(|| async { wrap(broker, "not-yet").await.is_ok() }).await.unwrap();
        assert!(took < BOUND, "a new key took {took:?} to appear");
    }
    for broker in &brokers {
        assert!(!broker.stderr().contains(&pg.password), "the database password reached a log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_on_one_sqlite_file_agree_within_two_seconds() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "");
    let brokers: Vec<Broker> = (0..2).map(|_| Broker::serve(&config, &dev, &[])).collect();
    changes_reach_every_broker(&brokers).await;
    concurrent_rotations_never_duplicate(&brokers).await;
}

async fn store_health(broker: &Broker) -> i32 {
    let mut client = tonic_health::pb::health_client::HealthClient::new(broker.channel("client").await);
    let request = tonic_health::pb::HealthCheckRequest { service: "keybroker.store".into() };
    client.check(request).await.map_or(-1, |r| r.into_inner().status)
}

/// PostgreSQL stops while two brokers serve: wraps and unwraps of cached
/// keys go on, calls that need the table fail at once with UNAVAILABLE
/// naming it, health says so, and everything recovers by itself when the
/// database is back, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_stops_admin_changes_not_wraps_and_heals_by_itself() {
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;
    let pg = Postgres::start();
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_postgres(dir.path(), &dev, &pg.url(), "", "");
    let env = [("KEYBROKER_USAGE_FLUSH_INTERVAL_MS", "200")];
    let brokers: Vec<Broker> = (0..2).map(|_| Broker::serve(&config, &dev, &env)).collect();
    let mut admin = brokers[0].admin().await;
    admin.create_key(pb::CreateKeyRequest { key: "steady".into(), ..Default::default() }).await.unwrap();
    let mut made = Vec::new();
    for broker in &brokers {
        made.push(wrap(broker, "steady").await.unwrap().ciphertext);
    }

    pg.stop_server();
    // The data path does not wait on the database.
    for broker in &brokers {
        for ct in &made {
            let started = Instant::now();
            assert_eq!(unwrap(broker, ct).await.unwrap().plaintext, vec![7; 32]);
            made_quickly(started);
        }
        for _ in 0..5 {
            let started = Instant::now();
            wrap(broker, "steady").await.unwrap();
            made_quickly(started);
        }
    }
    // Changes need the table: UNAVAILABLE naming it, at once once it is
    // known to be down (the first call may wait for its 1 s connection
    // timeout).
    let create = |key: &str| pb::CreateKeyRequest { key: key.into(), ..Default::default() };
    let err = admin.create_key(create("during")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    for _ in 0..3 {
        let started = Instant::now();
        let err = admin.create_key(create("during")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("PostgreSQL at") && err.message().contains("known to be down"),
            "{}",
            err.message()
        );
        assert!(!err.message().contains(&pg.password), "{}", err.message());
        made_quickly(started);
    }
    let err = wrap(&brokers[1], "never-cached").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "an unknown key is not NOT_FOUND while the table cannot say: {err:?}");
    for broker in &brokers {
        assert!(time_until(|| async { store_health(broker).await == NOT_SERVING }).await.is_some());
    }

    pg.start_server();
    let healed = time_until(|| async {
        let mut admin = brokers[0].admin().await;
        admin.create_key(create("after")).await.is_ok()
    })
    .await
    .expect("no recovery after the database came back");
    println!("the first change after the database came back went through after {} ms", healed.as_millis());
    for broker in &brokers {
        assert!(time_until(|| async { store_health(broker).await == SERVING }).await.is_some());
    }
    admin.rotate(pb::RotateRequest { key: "steady".into(), ..Default::default() }).await.unwrap();
    // Wraps made while broker 1 has not seen the rotation yet count on v1.
    let late = std::sync::atomic::AtomicU64::new(0);
    let took = time_until(|| async {
        match wrap(&brokers[1], "steady").await {
            Ok(w) if w.version == 2 => true,
            Ok(_) => {
                late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(took.is_some_and(|t| t < BOUND), "propagation did not resume: {took:?}");
    let expected = 12 + late.load(std::sync::atomic::Ordering::Relaxed);
    // Nothing lost: the wraps made during the outage are counted (2 + 10).
    let seen = std::sync::Mutex::new(0);
    let counted = time_until(|| async {
        let mut admin = brokers[0].admin().await;
        let key = admin.get_key(pb::GetKeyRequest { key: "steady".into() }).await.unwrap().into_inner();
        *seen.lock().unwrap() = key.versions[0].wrap_count;
        key.versions[0].wrap_count == expected
    })
    .await;
    let seen = *seen.lock().unwrap();
    assert!(counted.is_some(), "{expected} wraps, {seen} counted: none may be lost or counted twice");
}

fn made_quickly(started: Instant) {
    let took = started.elapsed();
    assert!(took < Duration::from_millis(300), "a call of a cached key took {took:?} with the database down");
}
