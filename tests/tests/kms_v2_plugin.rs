//! The Kubernetes KMS v2 plugin socket, called by a client that behaves as
//! the API server (tests/kms_v2/kms_client.py: stubs generated from the
//! proto, the API server's limits enforced): Status, Encrypt, Decrypt;
//! a rotation shows as a new key_id while older data keys keep decrypting,
//! also after the key moved to another backend; another uid is refused.

use std::process::Command;

use keybroker_client::pb;
use keybroker_tests::{Broker, config_with_backends, dev_pki, tempdir};
use tokio_stream::StreamExt;

fn phase(name: &str, socket: &std::path::Path, state: &std::path::Path) {
    let root = keybroker_codegen::workspace_root();
    let out = Command::new("python3")
        .arg(root.join("tests/kms_v2/kms_client.py"))
        .args([name, socket.to_str().unwrap(), state.to_str().unwrap(), root.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "phase {name}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_encrypts_and_decrypts_through_rotation_and_migration() {
    let probe = Command::new("python3").args(["-c", "import grpc, grpc_tools"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "grpcio is missing: pip install grpcio grpcio-tools (the README's test command installs them)"
    );
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let config = config_with_backends(dir.path(), &dev, "local", "[backends.spare]\ntype = \"local\"\n");
    let socket = dir.path().join("kms.sock");
    let audit = dir.path().join("audit.log");
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[policy.roles.apiserver]\n\"k8s-secrets\" = [\"Wrap\", \"Unwrap\"]\n[policy.identities]\n\"uid:{uid}\" = [\"apiserver\"]\n\
         [kms_v2]\nsocket = \"{}\"\nkey = \"k8s-secrets\"\n[audit]\nfile = \"{}\"\n",
        socket.display(),
        audit.display()
    ));
    std::fs::write(&config, text).unwrap();
    let broker = Broker::serve(&config, &dev, &[]);
    let mut admin = broker.admin().await;
    admin.create_key(pb::CreateKeyRequest { key: "k8s-secrets".into(), ..Default::default() }).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    let state = dir.path().join("kms-state.json");
    phase("first", &socket, &state);
    admin.rotate(pb::RotateRequest { key: "k8s-secrets".into(), ..Default::default() }).await.unwrap();
    phase("rotated", &socket, &state);
    let migrate = pb::MigrateRequest {
        pattern: "k8s-secrets".into(),
        from_backend: "local".into(),
        to_backend: "spare".into(),
        ..Default::default()
    };
    let mut progress = admin.migrate(migrate).await.unwrap().into_inner();
    while let Some(step) = progress.next().await {
        assert_ne!(step.unwrap().phase, pb::MigrationPhase::Failed as i32);
    }
    phase("migrated", &socket, &state);
    // Open the socket (and its folder) to everyone: the policy still
    // refuses another uid.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    phase("other-uid", &socket, &state);

    let log = std::fs::read_to_string(&audit).unwrap();
    let event = log.lines().find(|l| l.contains("uid=uid-first-1")).expect("Encrypt is audited with the request uid");
    assert!(
        event.contains(r#""rpc":"KmsV2Encrypt""#) && event.contains(&format!(r#""identity":"uid:{uid}""#)),
        "{event}"
    );
    assert!(log.contains(r#""rpc":"KmsV2Decrypt""#) && log.contains(r#""code":"PERMISSION_DENIED""#), "{log}");
}
