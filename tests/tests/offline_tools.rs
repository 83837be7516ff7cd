//! Offline tools between brokers: `keybroker migrate --from a.toml --to
//! b.toml` (kes style) and `keybroker backup` / `restore`. Names, version
//! numbers, states and policy survive; ciphertexts made by the first broker
//! open on the second; a tampered or truncated bundle restores nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use keybroker_client::pb;
use keybroker_tests::{
    Broker, SOFTHSM_PIN, SoftHsm, config_with_backends, dev_pki, hsm_backend_toml, keybroker_bin, tempdir,
};
use tonic::Code;

fn run(args: &[&str], hsm: &SoftHsm) -> (bool, String, String) {
    let out = Command::new(keybroker_bin())
        .args(args)
        .env("KB_TEST_HSM_PIN", SOFTHSM_PIN)
        .env(hsm.env().0, hsm.env().1)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Side {
    dev: PathBuf,
    config: PathBuf,
}

fn side(root: &Path, name: &str) -> Side {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let dev = dev_pki(&dir);
    let config = config_with_backends(&dir, &dev, "local", &hsm_backend_toml("hsm", "kb"));
    Side { dev, config }
}

/// Runs SQL on a side's version table with Python's sqlite3 (another
/// process, as an operator or a failing disk would).
fn sql(side: &Side, statement: &str) -> String {
    let db = side.config.parent().unwrap().join("keybroker.sqlite");
    let script = "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nrows = c.execute(sys.argv[2]).fetchall()\n\
                  c.commit()\nprint(rows)";
    let out = Command::new("python3").args(["-c", script, db.to_str().unwrap(), statement]).output().unwrap();
    assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Makes every insert of key `name` into the side's table fail, as a full
/// disk or a lost connection part-way through would.
fn fail_inserts_of(side: &Side, name: &str) {
    sql(
        side,
        &format!(
            "CREATE TRIGGER fail_{name} BEFORE INSERT ON keys WHEN NEW.name = '{name}' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        ),
    );
}

fn serve(side: &Side, hsm: &SoftHsm) -> Broker {
    let conf = hsm.env().1;
    Broker::serve(&side.config, &side.dev, &[("KB_TEST_HSM_PIN", SOFTHSM_PIN), ("SOFTHSM2_CONF", &conf)])
}

/// Creates alpha (local, 3 versions, min_decryption 2, labels, deletion
/// allowed), beta (hsm) and gamma (local); returns (key, ciphertext,
/// plaintext) for every version of each.
async fn populate(broker: &Broker) -> Vec<(String, u32, Vec<u8>, Vec<u8>)> {
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    let create = |key: &str, backend: &str| pb::CreateKeyRequest {
        key: key.into(),
        backend: backend.into(),
        deletion_allowed: key == "alpha",
        labels: [("team".to_string(), format!("{key}-team"))].into(),
        ..Default::default()
    };
    let mut made = Vec::new();
    for (key, backend, versions) in [("alpha", "local", 3u32), ("beta", "hsm", 1), ("gamma", "local", 1)] {
        admin.create_key(create(key, backend)).await.unwrap();
        for v in 1..=versions {
            if v > 1 {
                admin.rotate(pb::RotateRequest { key: key.into(), ..Default::default() }).await.unwrap();
            }
            let pt = format!("{key}-v{v}-dek-0123456789abcdef").into_bytes();
            let w = app
                .wrap(pb::WrapRequest { key: key.into(), plaintext: pt.clone(), ..Default::default() })
                .await
                .unwrap();
            made.push((key.to_owned(), v, w.into_inner().ciphertext, pt));
        }
    }
    admin
        .set_min_decryption_version(pb::SetMinDecryptionVersionRequest {
            key: "alpha".into(),
            min_decryption_version: 2,
            force: true,
        })
        .await
        .unwrap();
    made
}

async fn check_copy(broker: &Broker, made: &[(String, u32, Vec<u8>, Vec<u8>)]) {
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);
    let alpha = admin.get_key(pb::GetKeyRequest { key: "alpha".into() }).await.unwrap().into_inner();
    assert_eq!((alpha.current_version, alpha.min_decryption_version, alpha.versions.len()), (3, 2, 3));
    assert!(alpha.deletion_allowed);
    assert_eq!(alpha.labels.get("team").map(String::as_str), Some("alpha-team"));
    let beta = admin.get_key(pb::GetKeyRequest { key: "beta".into() }).await.unwrap().into_inner();
    assert_eq!(beta.backend, "hsm");
    assert!(beta.versions[0].backend_key_id.starts_with("id:"), "{:?}", beta.versions[0]);
    for (key, version, ct, pt) in made {
        let result = app.unwrap(pb::UnwrapRequest { ciphertext: ct.clone(), ..Default::default() }).await;
        if key == "alpha" && *version == 1 {
            let err = result.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "min_decryption_version was not carried over");
            continue;
        }
        assert_eq!(&result.unwrap_or_else(|e| panic!("{key} v{version}: {e:?}")).into_inner().plaintext, pt);
    }
}

#[tokio::test]
async fn offline_migrate_copies_keys_to_another_broker_with_names_versions_and_policy() {
    let dir = tempdir();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let (a, b) = (side(dir.path(), "a"), side(dir.path(), "b"));
    let mut broker = serve(&a, &hsm);
    let made = populate(&broker).await;
    broker.terminate().await;
    let (from, to) = (a.config.to_str().unwrap(), b.config.to_str().unwrap());

    let (ok, out, err) = run(&["migrate", "--from", from, "--to", to, "--dry-run"], &hsm);
    assert!(ok && out.contains("would copy versions [1, 2, 3]") && out.contains("dry run: 3 copied"), "{out}{err}");
    let (ok, out, err) = run(&["migrate", "--from", from, "--to", to, "al*"], &hsm);
    assert!(ok && out.contains("[1/1] alpha: copied versions [1, 2, 3], verified"), "{out}{err}");
    // alpha exists now: by default that key fails, the others are copied.
    let (ok, out, _) = run(&["migrate", "--from", from, "--to", to], &hsm);
    assert!(!ok && out.contains("alpha: FAILED") && out.contains("--force") && out.contains("2 copied"), "{out}");
    let (ok, out, err) = run(&["migrate", "--from", from, "--to", to, "--merge"], &hsm);
    assert!(ok && out.contains("0 copied, 3 skipped, 0 failed"), "{out}{err}");

    // A --force whose write fails part-way (the last key, gamma) writes
    // nothing: no key is left deleted or half replaced.
    let before = sql(&b, "SELECT name, revision FROM keys ORDER BY name");
    fail_inserts_of(&b, "gamma");
    let (ok, out, err) = run(&["migrate", "--from", from, "--to", to, "--force"], &hsm);
    assert!(!ok && err.contains("nothing was written"), "{out}{err}");
    assert_eq!(sql(&b, "SELECT name, revision FROM keys ORDER BY name"), before, "a failed --force changed the target");
    sql(&b, "DROP TRIGGER fail_gamma");

    // The second broker (another root key) opens what the first one made.
    let mut broker = serve(&b, &hsm);
    check_copy(&broker, &made).await;
    broker.admin().await.create_key(pb::CreateKeyRequest { key: "delta".into(), ..Default::default() }).await.unwrap();
    broker.terminate().await;

    // --merge follows kes: a key with the same material gets only the
    // versions the target lacks; a same-named key with other material is
    // skipped, and the summary says why.
    let mut broker = serve(&a, &hsm);
    let mut admin = broker.admin().await;
    admin.rotate(pb::RotateRequest { key: "alpha".into(), ..Default::default() }).await.unwrap();
    admin.create_key(pb::CreateKeyRequest { key: "delta".into(), ..Default::default() }).await.unwrap();
    admin.rotate(pb::RotateRequest { key: "delta".into(), ..Default::default() }).await.unwrap();
    broker.terminate().await;
    let (ok, out, err) = run(&["migrate", "--from", from, "--to", to, "--merge"], &hsm);
    assert!(ok, "{out}{err}");
    assert!(out.contains("alpha: copied versions [4], verified"), "{out}");
    assert!(out.contains("delta: skipped: version 1 holds different material"), "{out}");
    assert!(out.contains("1 copied, 3 skipped, 0 failed") && out.contains("  skipped delta: version 1"), "{out}");
    let broker = serve(&b, &hsm);
    let mut admin = broker.admin().await;
    let delta = admin.get_key(pb::GetKeyRequest { key: "delta".into() }).await.unwrap().into_inner();
    assert_eq!(delta.current_version, 1, "the target's own delta changed hands");
    let alpha = admin.get_key(pb::GetKeyRequest { key: "alpha".into() }).await.unwrap().into_inner();
    assert_eq!(alpha.current_version, 4);
}

#[tokio::test]
async fn backup_and_restore_round_trip_and_a_damaged_bundle_restores_nothing() {
    let dir = tempdir();
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let (a, c) = (side(dir.path(), "a"), side(dir.path(), "c"));
    let mut broker = serve(&a, &hsm);
    let made = populate(&broker).await;
    broker.terminate().await;
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    let bundle = dir.path().join("backup.kbb");
    let (pass, config_a, config_c) =
        (passphrase.to_str().unwrap(), a.config.to_str().unwrap(), c.config.to_str().unwrap());

    let (ok, out, err) =
        run(&["backup", "--config", config_a, "--out", bundle.to_str().unwrap(), "--passphrase-file", pass], &hsm);
    assert!(ok, "{out}{err}");
    assert!(out.contains("3 keys, 4 versions with material, 1 references"), "{out}");
    let sha = out.lines().find_map(|l| l.strip_prefix("sha256 ")).unwrap().to_owned();
    assert_eq!(sha.len(), 64);
    let raw = std::fs::read(&bundle).unwrap();
    // Argon2id at RFC 9106's second recommendation, in the authenticated header.
    let word = |at: usize| u32::from_be_bytes(raw[at..at + 4].try_into().unwrap());
    assert_eq!((word(23), word(27), word(31)), (64 * 1024, 3, 4), "Argon2id memory KiB, passes, lanes");
    assert!(!raw.windows(5).any(|w| w == b"alpha"), "key names are readable in the bundle");

    let restore = |path: &Path, sha: &str, extra: &[&str]| {
        let mut args =
            vec!["restore", path.to_str().unwrap(), "--config", config_c, "--sha256", sha, "--passphrase-file", pass];
        args.extend_from_slice(extra);
        run(&args.iter().map(|s| &**s).collect::<Vec<_>>(), &hsm)
    };
    // A wrong checksum, a truncated and a tampered bundle: refused, nothing restored.
    let (ok, _, err) = restore(&bundle, &"0".repeat(64), &[]);
    assert!(!ok && err.contains("SHA-256") && err.contains("nothing restored"), "{err}");
    let cut = dir.path().join("cut.kbb");
    std::fs::write(&cut, &raw[..raw.len() - 10]).unwrap();
    let cut_sha = sha256_of(&cut);
    let (ok, _, err) = restore(&cut, &cut_sha, &[]);
    assert!(!ok && err.contains("cannot decrypt the bundle"), "{err}");
    let bent = dir.path().join("bent.kbb");
    let mut bytes = raw.clone();
    bytes[100] ^= 1;
    std::fs::write(&bent, &bytes).unwrap();
    let (ok, _, err) = restore(&bent, &sha256_of(&bent), &[]);
    assert!(!ok && err.contains("tampered"), "{err}");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not the right passphrase\n").unwrap();
    let (ok, _, err) = run(
        &[
            "restore",
            bundle.to_str().unwrap(),
            "--config",
            config_c,
            "--sha256",
            &sha,
            "--passphrase-file",
            wrong.to_str().unwrap(),
        ],
        &hsm,
    );
    assert!(!ok && err.contains("wrong passphrase"), "{err}");
    {
        let broker = serve(&c, &hsm);
        let keys = broker.admin().await.list_keys(pb::ListKeysRequest::default()).await.unwrap().into_inner().keys;
        assert!(keys.is_empty(), "a refused restore wrote keys: {keys:?}");
    }

    let (ok, out, err) = restore(&bundle, &sha, &[]);
    assert!(ok && out.contains("restored 3 keys"), "{out}{err}");
    let (ok, _, err) = restore(&bundle, &sha, &[]);
    assert!(!ok && err.contains("exists in the target"), "{err}");
    let (ok, out, err) = restore(&bundle, &sha, &["--merge"]);
    assert!(ok && out.contains("restored 0 keys (3 already complete)"), "{out}{err}");
    // A --force restore whose write fails part-way restores nothing and
    // deletes nothing (it used to delete gamma, then fail to re-create it).
    let before = sql(&c, "SELECT name, revision FROM keys ORDER BY name");
    fail_inserts_of(&c, "gamma");
    let (ok, out, err) = restore(&bundle, &sha, &["--force"]);
    assert!(!ok && err.contains("nothing was written"), "{out}{err}");
    assert_eq!(sql(&c, "SELECT name, revision FROM keys ORDER BY name"), before);
    sql(&c, "DROP TRIGGER fail_gamma");

    let broker = serve(&c, &hsm);
    check_copy(&broker, &made).await;
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}
