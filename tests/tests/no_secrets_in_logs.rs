//! A whole scenario with logging at TRACE (every crate: tonic, h2, rustls,
//! sqlx, the AWS SDK's neighbours, keybroker) and the audit log on: create,
//! wrap, unwrap, generate, rewrap, rotate, migrate to an HSM, a denied call,
//! a backup with a passphrase. No DEK, plaintext, root key, passphrase or
//! HSM PIN appears in any log line or audit event, in any encoding a logger
//! would use.

use std::process::Command;

use base64::Engine;
use keybroker_client::pb;
use keybroker_tests::{
    Broker, SOFTHSM_PIN, SoftHsm, config_with_backends, dev_pki, hsm_backend_toml, keybroker_bin, tempdir,
};
use tonic::Code;

/// The forms a secret takes in a log: raw text, hex, base64 and Rust's
/// Debug of a byte slice.
fn forms(secret: &[u8]) -> Vec<String> {
    let mut forms = vec![
        secret.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        format!("{:?}", &secret[..12]).trim_end_matches(']').to_owned(),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(text.to_owned());
    }
    forms
}

fn assert_absent(log: &str, what: &str, secret: &[u8]) {
    for form in forms(secret) {
        assert!(!log.contains(&form), "{what} appears in the log as {form:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_reaches_a_log_at_trace() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let hsm = SoftHsm::new(&dir.path().join("hsm"), "kb");
    let config = config_with_backends(dir.path(), &dev, "local", &hsm_backend_toml("hsm", "kb"));
    let audit_file = dir.path().join("audit.log");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[audit]\nfile = \"{}\"\n", audit_file.display()));
    std::fs::write(&config, text).unwrap();
    let conf = hsm.env().1;
    let env = [
        ("KB_TEST_HSM_PIN", SOFTHSM_PIN),
        ("SOFTHSM2_CONF", conf.as_str()),
        ("KEYBROKER_LOG", "trace"),
        ("RUST_LOG", "trace"),
    ];
    let broker = Broker::serve(&config, &dev, &env);
    let (mut admin, mut app) = (broker.admin().await, broker.app().await);

    let dek = b"DEK-canary-7f3a9c-0123456789-XYZ".to_vec();
    admin.create_key(pb::CreateKeyRequest { key: "secretive".into(), ..Default::default() }).await.unwrap();
    let wrapped = app
        .wrap(pb::WrapRequest { key: "secretive".into(), plaintext: dek.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let opened = app
        .unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, dek);
    let generated = app
        .generate_data_key(pb::GenerateDataKeyRequest { key: "secretive".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    admin.rotate(pb::RotateRequest { key: "secretive".into(), ..Default::default() }).await.unwrap();
    app.rewrap(pb::RewrapRequest { ciphertext: wrapped.ciphertext.clone(), ..Default::default() }).await.unwrap();
    let migrate = pb::MigrateRequest {
        pattern: "secretive".into(),
        from_backend: "local".into(),
        to_backend: "hsm".into(),
        ..Default::default()
    };
    let mut progress = admin.migrate(migrate).await.unwrap().into_inner();
    while let Some(step) = progress.message().await.unwrap() {
        assert_ne!(step.phase, pb::MigrationPhase::Failed as i32, "{step:?}");
    }
    app.unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), ..Default::default() }).await.unwrap();
    // A denied call: the application identity on the admin plane.
    let denied = app_on_admin(&broker).await;
    assert_eq!(denied, Code::PermissionDenied);

    // A backup with a passphrase, by another process at TRACE too.
    let passphrase = "correct-horse-canary-5e1d-battery";
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, format!("{passphrase}\n")).unwrap();
    let bundle = dir.path().join("b.kbb");
    let backup = Command::new(keybroker_bin())
        .args(["backup", "--config", config.to_str().unwrap(), "--out", bundle.to_str().unwrap()])
        .args(["--passphrase-file", pass_file.to_str().unwrap()])
        .envs(env)
        .output()
        .unwrap();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));

    let audit = std::fs::read_to_string(&audit_file).unwrap();
    for rpc in ["CreateKey", "Wrap", "Unwrap", "GenerateDataKey", "Rotate", "Rewrap", "Migrate", "MigrateStep"] {
        assert!(audit.contains(&format!(r#""rpc":"{rpc}""#)), "no {rpc} event in the audit log:\n{audit}");
    }
    assert!(audit.contains(r#""code":"PERMISSION_DENIED""#), "the denied call is audited");
    let log = format!("{}{}{audit}", broker.stderr(), String::from_utf8_lossy(&backup.stderr));
    assert!(log.lines().count() > 100, "TRACE logging is not on: the test would prove nothing");
    assert_absent(&log, "the HSM PIN", SOFTHSM_PIN.as_bytes());
    assert_absent(&log, "the wrapped DEK's plaintext", &dek);
    assert_absent(&log, "a generated DEK", &generated.plaintext);
    let root = std::fs::read_to_string(dev.join("root.key")).unwrap();
    assert_absent(&log, "the root key", root.trim().as_bytes());
    let root_bytes = base64::engine::general_purpose::STANDARD.decode(root.trim()).unwrap();
    assert_absent(&log, "the root key's bytes", &root_bytes);
    assert_absent(&log, "the backup passphrase", passphrase.as_bytes());
}

async fn app_on_admin(broker: &Broker) -> Code {
    let mut admin_as_app = pb::key_admin_client::KeyAdminClient::new(broker.channel("client").await);
    admin_as_app.get_key(pb::GetKeyRequest { key: "secretive".into() }).await.unwrap_err().code()
}
