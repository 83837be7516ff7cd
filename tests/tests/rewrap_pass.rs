//! `keybroker rewrap`: walks sidecar files, rewraps those below the current
//! version, rewrites each atomically, resumes from its checkpoint, and ends
//! with a summary that names failures.

use std::process::Command;

use keybroker_client::blob::{BlobEncryptor, Sidecar, read_sidecar};
use keybroker_client::{Client, Context};
use keybroker_tests::{Broker, keybroker_bin, pb, tempdir};

fn rewrap(broker: &Broker, dir: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(keybroker_bin())
        .args(["rewrap", dir.to_str().unwrap(), "--url", &broker.url(), "--dev-dir", broker.data_dir.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_rewrap_pass_moves_every_sidecar_to_the_current_version_and_resumes() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let client = Client::mtls(broker.url(), broker.identity("client")).connect().await.unwrap();
    let data = dir.path().join("blobs");
    let mut blobs = Vec::new();
    for i in 0..200 {
        let folder = data.join(format!("shard-{}", i % 7));
        std::fs::create_dir_all(&folder).unwrap();
        let context = Context::from([("blob".to_owned(), format!("b{i}"))]);
        let sealer = BlobEncryptor::new(client.clone(), "demo").with_context(context);
        let blob = sealer.seal(format!("payload {i}").as_bytes()).await.unwrap();
        let sidecar_path = folder.join(format!("b{i}.sidecar.json"));
        std::fs::write(&sidecar_path, read_sidecar(&blob).await.unwrap().to_json()).unwrap();
        blobs.push((sidecar_path, blob));
    }
    std::fs::write(data.join("zz-broken.sidecar.json"), "{not json").unwrap();
    broker.admin().await.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap();

    // A first run stops after 50 files; the checkpoint remembers them.
    let (ok, out, err) = rewrap(&broker, &data, &["--max-files", "50", "--batch", "16"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("rewrapped: 50,"), "{out}");
    // A temporary file of a pass that crashed is removed by the next one.
    std::fs::write(data.join("shard-3").join(".keybroker-rewrap.4242.7.tmp"), "old sidecar").unwrap();
    // The rest: 150 rewrapped, 50 from the checkpoint, the broken one fails.
    let (ok, out, err) = rewrap(&broker, &data, &["--batch", "64"]);
    assert!(!ok, "a failed sidecar must fail the run: {out}{err}");
    assert!(
        out.contains("rewrapped: 150,") && out.contains("done by an earlier run: 50,") && out.contains("failed: 1"),
        "{out}"
    );
    assert!(out.contains("zz-broken.sidecar.json") && out.contains("unreadable sidecar"), "{out}");

    // Every sidecar is at v2 and still opens its blob's DEK.
    for (path, blob) in &blobs {
        let sidecar = Sidecar::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!((sidecar.key.as_str(), sidecar.version), ("demo", 2), "{}", path.display());
        let old = read_sidecar(blob).await.unwrap();
        let new_dek = client.unwrap(&sidecar.wrapped_dek, &sidecar.context).await.unwrap();
        let old_dek = client.unwrap(&old.wrapped_dek, &old.context).await.unwrap();
        assert_eq!(new_dek.plaintext, old_dek.plaintext);
        assert_eq!(new_dek.version, 2);
    }
    assert!(!walk_names(&data).iter().any(|n| n.ends_with(".tmp")), "a temporary file was left behind");
    // The finished pass leaves no DEK depending on v1 (counts are flushed
    // to the table about every second).
    let mut admin = broker.admin().await;
    let mut v1 = None;
    for _ in 0..30 {
        let key = admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap().into_inner();
        v1 = Some(key.versions[0].clone());
        if key.versions[0].rewrapped_out == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let v1 = v1.unwrap();
    assert_eq!((v1.wrap_count, v1.rewrapped_out, v1.outstanding_deks), (200, 200, 0), "{v1:?}");

    // A second rotation: the checkpoint of the first pass must not make
    // the next pass skip anything (it used to report "done by an earlier
    // run: 200" and leave every sidecar on v2).
    std::fs::remove_file(data.join("zz-broken.sidecar.json")).unwrap();
    broker.admin().await.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap();
    let (ok, out, err) = rewrap(&broker, &data, &["--batch", "32"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("rewrapped: 200, already current: 0, done by an earlier run: 0,"), "{out}");
    for (path, _) in &blobs {
        let sidecar = Sidecar::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(sidecar.version, 3, "{}", path.display());
    }
    // The rewritten sidecar is the truth for its blob: once v1 and v2 are
    // retired, the blob's own header copy (still v1) no longer opens it, the
    // sidecar does, and the frames prove it is the same DEK.
    let mut admin = broker.admin().await;
    let raise = pb::SetMinDecryptionVersionRequest { key: "demo".into(), min_decryption_version: 3, force: true };
    admin.set_min_decryption_version(raise).await.unwrap();
    let (path, blob) = &blobs[3];
    let sidecar = Sidecar::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    let opener = BlobEncryptor::new(client.clone(), "demo");
    let expected = Context::from([("blob".to_owned(), "b3".to_owned())]);
    let err = opener.open(blob, &expected).await.unwrap_err();
    assert!(err.to_string().contains("min_decryption_version"), "{err}");
    let opened = opener.open_with_sidecar(blob, &sidecar, &expected).await.unwrap();
    assert_eq!(opened.plaintext.as_slice(), b"payload 3");
    let other = Sidecar::from_json(&std::fs::read_to_string(&blobs[4].0).unwrap()).unwrap();
    assert!(opener.open_with_sidecar(blob, &other, &expected).await.is_err(), "another blob's sidecar opened it");

    // Rerunning the finished pass rewraps nothing: one probe per key, and
    // every file is known from the checkpoint of this pass.
    let (ok, out, err) = rewrap(&broker, &data, &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("rewrapped: 0, already current: 0, done by an earlier run: 200,"), "{out}");
}

fn walk_names(dir: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            names.extend(walk_names(&path));
        } else {
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names
}
