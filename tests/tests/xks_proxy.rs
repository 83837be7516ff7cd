//! The AWS KMS External Key Store proxy API, driven by real SigV4 signers:
//! botocore's SigV4Auth (tests/xks/xks_client.py: every operation, every
//! error of the specification's table a caller can provoke, AAD and CDIV,
//! tampering of each field) and `curl --aws-sigv4`; a key rotated and moved
//! to another backend keeps decrypting its old ciphertexts; every call is
//! audited with its request metadata.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use keybroker_client::pb;
use keybroker_tests::{
    Broker, Moto, aws_backend_toml, config_with_backends, dev_pki, free_port, require_tool, tempdir,
};
use tokio_stream::StreamExt;

const AKID_A: &str = "AKIAXKSTESTCREDENTIALA";
const AKID_B: &str = "AKIAXKSTESTCREDENTIALB";
const AKID_ROOT: &str = "AKIAXKSROOTPREFIXCRED";
const ALICE: &str = "arn:aws:iam::123456789012:user/Alice";

fn secret() -> String {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(rand_byte()));
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn rand_byte() -> u8 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u8
}

struct Setup {
    env: Vec<(String, String)>,
    base: String,
    ca: String,
}

fn phase(setup: &Setup, phase: &str, state: &Path) {
    let out = Command::new("python3")
        .arg(keybroker_codegen::workspace_root().join("tests/xks/xks_client.py"))
        .args([phase, &setup.base, &setup.ca, state.to_str().unwrap()])
        .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "phase {phase}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

fn curl(setup: &Setup, path: &str, body: &str, secret: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-sS", "--cacert", &setup.ca, "--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy"])
        .args(["--user", &format!("{AKID_A}:{secret}")])
        .args(["-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}"])
        .arg(format!("{}/kb/test/kms/xks/v1/{path}", setup.base))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), serde_json::from_str(json).unwrap_or(serde_json::Value::Null))
}

async fn create(broker: &Broker, key: &str, backend: &str, mode: pb::KeyMode) {
    let req =
        pb::CreateKeyRequest { key: key.into(), backend: backend.into(), mode: mode as i32, ..Default::default() };
    broker.admin().await.create_key(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xks_client_signing_with_sigv4_uses_keybroker_keys_through_rotation_and_migration() {
    let probe = Command::new("python3").args(["-c", "import botocore"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "botocore is missing: pip install botocore (moto[server] brings it; the README's test command installs it)"
    );
    require_tool("curl", "apt-get install -y curl");
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let moto = Moto::start();
    let port = free_port();
    // Hierarchy-mode KEKs of the aws backend stay unsealed one second only.
    let backends =
        format!("{}hierarchy_ttl_seconds = 1\n\n[backends.spare]\ntype = \"local\"\n", aws_backend_toml("aws", &moto));
    let config = config_with_backends(dir.path(), &dev, "local", &backends);
    let audit = dir.path().join("audit.log");
    let tls = dev.join("tls");
    let xks = format!(
        r#"
[audit]
file = "{audit}"

[policy.roles.xks]
"xks-*" = ["Wrap", "Unwrap", "GetKey"]
[policy.identities]
"aws:{ALICE}" = ["xks"]

[xks]
listen = "127.0.0.1:{port}"
cert = "{tls}/server.pem"
key = "{tls}/server.key"
authorize_principals = true

[[xks.prefixes]]
path = "/kb/test"
credentials = [
  {{ access_key_id = "{AKID_A}", secret_access_key_env = "XKS_SECRET_A" }},
  {{ access_key_id = "{AKID_B}", secret_access_key_env = "XKS_SECRET_B" }},
]

[[xks.prefixes]]
path = ""
credentials = [{{ access_key_id = "{AKID_ROOT}", secret_access_key_env = "XKS_SECRET_ROOT" }}]

[[xks.prefixes]]
path = "/kb/limited"
requests_per_second = 5
credentials = [{{ access_key_id = "{AKID_A}", secret_access_key_env = "XKS_SECRET_A" }}]
"#,
        audit = audit.display(),
        tls = tls.display(),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&xks);
    std::fs::write(&config, text).unwrap();
    let (secret_a, secret_b, secret_root) = (secret(), secret() + "B", secret() + "R");
    let mut env: Vec<(String, String)> = Moto::env().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.push(("XKS_SECRET_A".into(), secret_a.clone()));
    env.push(("XKS_SECRET_B".into(), secret_b.clone()));
    env.push(("XKS_SECRET_ROOT".into(), secret_root.clone()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let broker = Broker::serve(&config, &dev, &env_refs);
    create(&broker, "xks-orders", "local", pb::KeyMode::Direct).await;
    create(&broker, "xks-aws", "aws", pb::KeyMode::Direct).await;
    create(&broker, "xks-aws-hier", "aws", pb::KeyMode::Hierarchy).await;

    let mut client_env = env.clone();
    for (k, v) in [
        ("XKS_PREFIX", "/kb/test"),
        ("XKS_LIMITED_PREFIX", "/kb/limited"),
        ("XKS_AKID_A", AKID_A),
        ("XKS_AKID_B", AKID_B),
        ("XKS_AKID_ROOT", AKID_ROOT),
        ("XKS_AWS_KEY", "xks-aws"),
        ("XKS_AWS_HIER_KEY", "xks-aws-hier"),
    ] {
        client_env.push((k.into(), v.into()));
    }
    let setup = Setup {
        env: client_env,
        base: format!("https://localhost:{port}"),
        ca: tls.join("ca.pem").display().to_string(),
    };
    let state = dir.path().join("xks-state.json");
    phase(&setup, "main", &state);

    // curl --aws-sigv4: Encrypt and Decrypt.
    let md = format!(
        r#""requestMetadata":{{"awsPrincipalArn":"{ALICE}","kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/k","kmsOperation":"Encrypt","kmsRequestId":"curl-1"}}"#
    );
    let plaintext = base64::engine::general_purpose::STANDARD.encode(b"sealed by curl");
    let (code, enc) = curl(
        &setup,
        "keys/xks-orders/encrypt",
        &format!(r#"{{{md},"plaintext":"{plaintext}","encryptionAlgorithm":"AES_GCM"}}"#),
        &secret_a,
    );
    assert_eq!(code, 200, "{enc}");
    let decrypt_body = format!(
        r#"{{{md},"encryptionAlgorithm":"AES_GCM","ciphertext":{},"initializationVector":{},"authenticationTag":{},"ciphertextMetadata":{}}}"#,
        enc["ciphertext"], enc["initializationVector"], enc["authenticationTag"], enc["ciphertextMetadata"]
    );
    let (code, dec) = curl(&setup, "keys/xks-orders/decrypt", &decrypt_body, &secret_a);
    assert_eq!((code, dec["plaintext"].as_str()), (200, Some(plaintext.as_str())), "{dec}");
    let (code, err) =
        curl(&setup, "keys/xks-orders/decrypt", &decrypt_body, "not-the-secret-000000000000000000000000000000");
    assert_eq!((code, err["errorName"].as_str()), (401, Some("AuthenticationFailedException")), "{err}");

    // Rotate the key and move it to another backend while XKS ciphertexts
    // of version 1 exist.
    let mut admin = broker.admin().await;
    admin.rotate(pb::RotateRequest { key: "xks-orders".into(), ..Default::default() }).await.unwrap();
    let migrate = pb::MigrateRequest {
        pattern: "xks-orders".into(),
        from_backend: "local".into(),
        to_backend: "spare".into(),
        ..Default::default()
    };
    let mut progress = admin.migrate(migrate).await.unwrap().into_inner();
    let mut last = None;
    while let Some(step) = progress.next().await {
        last = Some(step.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.phase, pb::MigrationPhase::Done as i32, "{last:?}");
    let key = admin.get_key(pb::GetKeyRequest { key: "xks-orders".into() }).await.unwrap().into_inner();
    assert!(key.versions.iter().all(|v| v.backend == "spare"), "{key:?}");
    phase(&setup, "after-rotation", &state);
    phase(&setup, "throttle", &state);

    // The KMS behind a hierarchy-mode key goes away (once its KEK's second
    // in memory is over).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    moto.freeze();
    phase(&setup, "down", &state);
    moto.thaw();

    // Version 1 is disabled (the current one never can be).
    admin
        .disable_key_version(pb::KeyVersionRequest { key: "xks-orders".into(), version: 1, ..Default::default() })
        .await
        .unwrap();
    phase(&setup, "disabled", &state);

    // Audited with the request metadata; never the plaintext.
    let log = std::fs::read_to_string(&audit).unwrap();
    let encrypts: Vec<&str> = log.lines().filter(|l| l.contains(r#""rpc":"XksEncrypt""#)).collect();
    assert!(encrypts.len() > 5, "{log}");
    let curl_event = log.lines().find(|l| l.contains("kmsRequestId=curl-1")).expect("the curl call is audited");
    assert!(curl_event.contains(&format!(r#""identity":"xks:{AKID_A}@/kb/test""#)), "{curl_event}");
    assert!(curl_event.contains(&format!("awsPrincipalArn={ALICE}")) && curl_event.contains(r#""key":"xks-orders""#));
    assert!(curl_event.contains(r#""version":1"#) && curl_event.contains(r#""code":"OK""#), "{curl_event}");
    assert!(
        log.contains(r#""rpc":"XksDecrypt""#) && log.contains("InvalidCiphertextException"),
        "failures are audited"
    );
    assert!(log.contains("AccessDeniedException"), "denials are audited");
    assert!(!log.contains(&plaintext), "a plaintext in the audit log");
    assert!(!broker.stderr().contains(&plaintext), "a plaintext in the log");
    assert!(!broker.stderr().contains(&secret_a), "a SigV4 secret in the log");
}

/// With `client_ca` and `client_cns`, only a client certificate of that CA
/// with an admitted subject name (AWS KMS presents
/// CN=cks.kms.<region>.amazonaws.com) completes a request; SigV4 is still
/// required on top.
#[tokio::test]
async fn mtls_admits_only_the_configured_client_names() {
    use keybroker_server::security::tls::pki::{Ca, ClientSpec};
    require_tool("curl", "apt-get install -y curl");
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let port = free_port();
    let clients = Ca::generate("AWS KMS stand-in CA").unwrap();
    let ca_path = dir.path().join("clients-ca.pem");
    std::fs::write(&ca_path, clients.cert_pem()).unwrap();
    let mut certs = Vec::new();
    for cn in ["cks.kms.eu-west-1.amazonaws.com", "intruder.example.com"] {
        let issued = clients.issue_client(&ClientSpec::new(cn, None)).unwrap();
        let (cert, key) = (dir.path().join(format!("{cn}.pem")), dir.path().join(format!("{cn}.key")));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
        certs.push((cert, key));
    }
    let config = config_with_backends(dir.path(), &dev, "local", "");
    let tls = dev.join("tls");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[xks]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{tls}/server.pem\"\nkey = \"{tls}/server.key\"\n\
         client_ca = \"{ca}\"\nclient_cns = [\"cks.kms.eu-west-1.amazonaws.com\"]\n\
         [[xks.prefixes]]\npath = \"\"\ncredentials = [{{ access_key_id = \"{AKID_A}\", secret_access_key_env = \"XKS_SECRET_A\" }}]\n",
        tls = tls.display(),
        ca = ca_path.display()
    ));
    std::fs::write(&config, text).unwrap();
    let secret_a = secret();
    let _broker = Broker::serve(&config, &dev, &[("XKS_SECRET_A", secret_a.as_str())]);
    let health = |cert: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--cacert", tls.join("ca.pem").to_str().unwrap(), "-w", "\n%{http_code}"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy", "--user", &format!("{AKID_A}:{secret_a}")])
            .args(["-H", "Content-Type: application/json"])
            .args(["-d", r#"{"requestMetadata":{"kmsRequestId":"m1","kmsOperation":"KmsHealthCheck"}}"#]);
        if let Some((c, k)) = cert {
            curl.args(["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()]);
        }
        let out = curl.arg(format!("https://localhost:{port}/kms/xks/v1/health")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success(), text.rsplit('\n').next().unwrap_or_default().trim().to_owned())
    };
    let (ok, code) = health(Some(&certs[0]));
    assert!(ok && code == "200", "AWS KMS's name: {ok} {code}");
    let (ok, code) = health(Some(&certs[1]));
    assert!(!ok || code != "200", "another subject name got in: {code}");
    let (ok, code) = health(None);
    assert!(!ok || code != "200", "no client certificate got in: {code}");
}
