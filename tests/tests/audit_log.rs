//! The audit log: one JSON event per call (per key, version and outcome for
//! batches) with the caller, key, version, backend, code, latency and a hash
//! of the context; a hash chain `keybroker audit verify` checks across
//! rotations; and calls that fail closed when the log cannot be written.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keybroker_client::pb;
use keybroker_tests::{Broker, ctx, keybroker_bin, tempdir};
use sha2::Digest;
use tonic::Code;

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Waits (up to 5 s) until the log has at least `n` events.
async fn wait_for_events(path: &Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..250 {
        let all = events(path);
        if all.len() >= n {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    events(path)
}

/// The canonical context encoding of the envelope format (a count, then
/// length-prefixed keys and values in key order), hashed: computed here
/// from the format's description, not by the server's code.
fn context_sha256(pairs: &[(&str, &str)]) -> String {
    let mut sorted = pairs.to_vec();
    sorted.sort();
    let mut bytes = (sorted.len() as u32).to_be_bytes().to_vec();
    for (k, v) in sorted {
        bytes.extend_from_slice(&(k.len() as u32).to_be_bytes());
        bytes.extend_from_slice(k.as_bytes());
        bytes.extend_from_slice(&(v.len() as u32).to_be_bytes());
        bytes.extend_from_slice(v.as_bytes());
    }
    hex::encode(sha2::Sha256::digest(&bytes))
}

fn verify(files: &[&Path]) -> (bool, String) {
    let out = Command::new(keybroker_bin()).arg("audit").arg("verify").args(files).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn find<'a>(all: &'a [serde_json::Value], rpc: &str) -> Vec<&'a serde_json::Value> {
    all.iter().filter(|e| e["rpc"] == rpc).collect()
}

#[tokio::test]
async fn every_call_is_one_chained_event_without_key_material() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let broker = Broker::start_dev(&data);
    let log = data.join("audit.log");
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    admin.create_key(pb::CreateKeyRequest { key: "other".into(), ..Default::default() }).await.unwrap();
    let context = [("tenant", "acme"), ("table", "orders")];
    let dek = b"audit-canary-DEK-0123456789abcdef".to_vec();
    let wrapped = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: dek.clone(), context: ctx(&context) })
        .await
        .unwrap()
        .into_inner();
    app.unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), context: ctx(&context) }).await.unwrap();
    let other = app
        .wrap(pb::WrapRequest { key: "other".into(), plaintext: vec![2; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // A batch: two items of demo v1, one of other v1, one with a wrong
    // context (demo v1, FAILED_PRECONDITION).
    let items = vec![
        pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), context: ctx(&context) },
        pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), context: ctx(&context) },
        pb::UnwrapRequest { ciphertext: other.ciphertext.clone(), ..Default::default() },
        pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), ..Default::default() },
    ];
    app.batch_unwrap(pb::BatchUnwrapRequest { items }).await.unwrap();
    admin.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap();
    admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap();
    admin.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    let err = pb::key_admin_client::KeyAdminClient::new(broker.channel("client").await)
        .rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let all = wait_for_events(&log, 11).await;
    let wrap = find(&all, "Wrap")[0];
    assert_eq!(wrap["identity"], "spiffe://keybroker.dev/app");
    assert_eq!(wrap["key"], "demo");
    assert_eq!(wrap["version"], 1);
    assert_eq!(wrap["backend"], "local");
    assert_eq!(wrap["code"], "OK");
    assert_eq!(wrap["count"], 1);
    assert_eq!(wrap["context_sha256"], context_sha256(&context));
    assert!(wrap["latency_us"].as_u64().unwrap() > 0);
    assert!(wrap["time"].as_str().unwrap().starts_with("20"));
    let unwrap = find(&all, "Unwrap")[0];
    assert_eq!((unwrap["key"].as_str(), unwrap["version"].as_u64()), (Some("demo"), Some(1)));
    assert_eq!(unwrap["context_sha256"], context_sha256(&context));
    // The batch: one event per key, version and outcome, with its count.
    let mut batch: Vec<(String, u64, String, u64)> = find(&all, "BatchUnwrap")
        .iter()
        .map(|e| {
            let s = |f: &str| e[f].as_str().unwrap().to_owned();
            (s("key"), e["version"].as_u64().unwrap(), s("code"), e["count"].as_u64().unwrap())
        })
        .collect();
    batch.sort();
    assert_eq!(
        batch,
        vec![
            ("demo".to_owned(), 1, "FAILED_PRECONDITION".to_owned(), 1),
            ("demo".to_owned(), 1, "OK".to_owned(), 2),
            ("other".to_owned(), 1, "OK".to_owned(), 1),
        ]
    );
    let rotate = find(&all, "Rotate");
    assert_eq!((rotate[0]["code"].as_str(), rotate[0]["version"].as_u64()), (Some("OK"), Some(2)));
    assert_eq!(rotate[1]["code"], "PERMISSION_DENIED");
    assert_eq!(rotate[1]["identity"], "spiffe://keybroker.dev/app");
    assert_eq!(find(&all, "GetKey")[0]["code"], "OK");
    assert_eq!(find(&all, "ListKeys")[0]["code"], "OK");
    // Sequence and chain.
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let next: serde_json::Value = serde_json::from_str(pair[1]).unwrap();
        assert_eq!(next["prev"], hex::encode(sha2::Sha256::digest(pair[0].as_bytes())));
    }
    // Never the DEK, in any form.
    for form in [hex::encode(&dek), String::from_utf8(dek.clone()).unwrap()] {
        assert!(!text.contains(&form), "a DEK in the audit log");
    }

    let (ok, out) = verify(&[&log]);
    assert!(ok && out.contains(&format!("intact: {} events", lines.len())), "{out}");
    // Every event was counted; the batch's three events took one write.
    let (_, scrape) = broker.http_get("/metrics");
    assert_eq!(Broker::metric(&scrape, "keybroker_audit_events_total"), Some(lines.len() as f64), "{scrape}");
    let writes = Broker::metric(&scrape, "keybroker_audit_writes_total").unwrap();
    assert!(writes >= 1.0 && writes <= (lines.len() - 2) as f64, "{writes} writes for {} events", lines.len());
    // An edited line is found, by its line number.
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    edited[3] = edited[3].replace(r#""code":"OK""#, r#""code":"NOT_FOUND""#);
    let copy = dir.path().join("edited.log");
    std::fs::write(&copy, edited.join("\n") + "\n").unwrap();
    let (ok, out) = verify(&[&copy]);
    assert!(!ok && out.contains("edited.log:5"), "{out}");
    // A removed line too.
    let mut removed: Vec<&str> = lines.clone();
    removed.remove(6);
    std::fs::write(&copy, removed.join("\n") + "\n").unwrap();
    let (ok, out) = verify(&[&copy]);
    assert!(!ok && out.contains("edited.log:7") && out.contains("1 events removed"), "{out}");
}

#[tokio::test]
async fn the_chain_is_verified_across_rotated_files_and_restarts() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let broker = Broker::start_dev_with(&data, &[("KEYBROKER_AUDIT__MAX_FILE_BYTES", "2000")]);
    let mut app = broker.app().await;
    for _ in 0..20 {
        app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() }).await.unwrap();
    }
    drop(broker);
    // A restart continues the chain where the last file ended.
    let broker = Broker::start_dev_with(&data, &[("KEYBROKER_AUDIT__MAX_FILE_BYTES", "2000")]);
    let mut app = broker.app().await;
    for _ in 0..5 {
        app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() }).await.unwrap();
    }
    let log = data.join("audit.log");
    wait_for_events(&log, 1).await;
    let rotated: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("audit.log."))
        .collect();
    assert!(rotated.len() >= 3, "{rotated:?}");
    let (ok, out) = verify(&[&log]);
    assert!(ok && out.contains("intact: 25 events"), "{out}");
    // Without the oldest rotated file but one, the chain breaks at the next.
    let mut sorted = rotated.clone();
    sorted.sort();
    let mut files: Vec<&Path> = sorted.iter().map(|p| p.as_path()).collect();
    files.remove(1);
    files.push(&log);
    let (ok, out) = verify(&files);
    assert!(!ok && out.contains(":1:"), "{out}");
}

async fn wrap(
    app: &mut keybroker_client::pb::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
) -> Result<u32, tonic::Status> {
    app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .map(|r| r.into_inner().version)
}

#[tokio::test]
async fn calls_fail_closed_while_the_audit_log_cannot_be_written() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let broker = Broker::start_dev(&data);
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    wrap(&mut app).await.unwrap();
    // The file becomes unwritable: replaced by /dev/full (every write fails
    // with ENOSPC, even for root). The broker notices within a second.
    let log = data.join("audit.log");
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The call that finds the sink failing gets no reply: its connection
    // holds the reply until the event is written, and closes instead (tonic
    // reports the closed connection as a transport error, gRPC core clients
    // as UNAVAILABLE).
    let err = wrap(&mut app).await.unwrap_err();
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown), "{err:?}");
    // From then on calls are refused with UNAVAILABLE, on a new connection.
    let err = wrap(&mut app).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit log cannot be written"), "{}", err.message());
    let err = app.unwrap(pb::UnwrapRequest { ciphertext: vec![0; 10], ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "no answer without its audit event: {err:?}");
    // Admin calls are refused before they change anything.
    let err = admin.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The metrics say so.
    let (_, scrape) = broker.http_get("/metrics");
    assert_eq!(Broker::metric(&scrape, "keybroker_audit_up"), Some(0.0));
    assert!(Broker::metric(&scrape, "keybroker_audit_write_failures_total").unwrap() >= 2.0, "{scrape}");
    // The file is writable again: calls succeed, and the first event says
    // how many could not be written.
    std::fs::remove_file(&log).unwrap();
    let mut recovered = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if wrap(&mut app).await.is_ok() {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "calls did not resume once the audit log was writable");
    let key = admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap().into_inner();
    assert_eq!(key.current_version, 1, "the refused Rotate changed nothing");
    let all = events(&log);
    let gap = &all[0];
    assert_eq!(gap["rpc"], "AuditGap", "{all:?}");
    assert!(gap["count"].as_u64().unwrap() >= 3, "{gap}");
    assert!(broker.stderr().contains("cannot write the audit log"), "{}", broker.stderr());
}

#[tokio::test]
async fn an_audit_log_that_fails_open_keeps_serving() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let broker = Broker::start_dev_with(&data, &[("KEYBROKER_AUDIT__FAIL_CLOSED", "false")]);
    let mut app = broker.app().await;
    let log = data.join("audit.log");
    wrap(&mut app).await.unwrap();
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..3 {
        wrap(&mut app).await.unwrap();
    }
}
