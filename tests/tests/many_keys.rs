//! A table of many keys behind a small cache: `keybroker create-keys`
//! provisions them in bulk, the broker serves every one of them although it
//! holds only `cache.max_keys` records and `cache.max_ciphers` opened KEKs,
//! counts of keys the cache let go reach the table, and ListKeys pages
//! through the whole table from the store.

use std::collections::BTreeSet;
use std::process::Command;

use keybroker_client::pb;
use keybroker_tests::{Broker, config_with_backends, dev_pki, keybroker_bin, tempdir};

const KEYS: usize = 2500;
const MAX_KEYS: usize = 300;

fn create_keys(config: &std::path::Path, first: usize, count: usize) -> (bool, String) {
    let out = Command::new(keybroker_bin())
        .args(["create-keys", "--config", config.to_str().unwrap(), "--prefix", "tenant-", "--digits", "5"])
        .args(["--first", &first.to_string(), "--count", &count.to_string()])
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn name(i: usize) -> String {
    format!("tenant-{i:05}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_table_larger_than_the_cache_is_served_and_counted() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("usage_flush_interval_ms = 100\n{text}\n[cache]\nmax_keys = {MAX_KEYS}\nmax_ciphers = 64\n"),
    )
    .unwrap();

    let (ok, out) = create_keys(&config, 0, KEYS);
    assert!(ok, "create-keys failed: {out}");
    assert!(out.contains(&format!("created {KEYS} keys")), "{out}");
    // Names already taken: refused, naming one, and nothing of the chunk made.
    let (ok, out) = create_keys(&config, KEYS - 10, 20);
    assert!(!ok && out.contains("tenant-02490"), "{out}");

    let broker = Broker::serve(&config, &dev, &[]);
    let mut app = broker.app().await;
    let mut admin = broker.admin().await;
    // The new keys past the end of the table were not created.
    let missing = admin.get_key(pb::GetKeyRequest { key: name(KEYS + 5) }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Wrap under keys spread over the table, twice around, so the cache
    // (300 keys, 64 KEKs) lets go of keys with counts not yet flushed.
    let used: Vec<usize> = (0..KEYS).step_by(7).collect();
    let mut ciphertexts = Vec::new();
    for round in 0..2 {
        for &i in &used {
            let dek = format!("dek {i} {round}").into_bytes();
            let wrapped = app
                .wrap(pb::WrapRequest { key: name(i), plaintext: dek.clone(), ..Default::default() })
                .await
                .unwrap_or_else(|e| panic!("wrap under {}: {e}", name(i)))
                .into_inner();
            ciphertexts.push((dek, wrapped.ciphertext));
        }
    }
    for (dek, ciphertext) in &ciphertexts {
        let plain = app.unwrap(pb::UnwrapRequest { ciphertext: ciphertext.clone(), ..Default::default() }).await;
        assert_eq!(&plain.unwrap().into_inner().plaintext, dek);
    }

    // Every wrap reaches the table, those of keys let go included.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let mut counted = 0;
    for &i in &used {
        let key = admin.get_key(pb::GetKeyRequest { key: name(i) }).await.unwrap().into_inner();
        counted += key.versions[0].wrap_count;
    }
    assert_eq!(counted, 2 * used.len() as u64);

    // ListKeys pages through the whole table in name order.
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_keys(pb::ListKeysRequest { pattern: "tenant-*".into(), page_size: 1000, page_token: token })
            .await
            .unwrap()
            .into_inner();
        names.extend(page.keys.into_iter().map(|k| k.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(names, (0..KEYS).map(name).collect::<Vec<_>>());
    // A pattern with a literal prefix lists exactly its keys.
    let page = admin
        .list_keys(pb::ListKeysRequest { pattern: "tenant-001*".into(), page_size: 1000, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    let listed: BTreeSet<String> = page.keys.into_iter().map(|k| k.name).collect();
    assert_eq!(listed, (100..200).map(name).collect::<BTreeSet<_>>());
    assert!(page.next_page_token.is_empty());
}
