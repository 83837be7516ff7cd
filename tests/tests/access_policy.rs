//! Per-key policy over typed identities, on a real broker with its own CA:
//! a matrix of identity kind (URI SAN, DNS SAN, CN, SPKI hash, Unix socket
//! uid, a CN that reads like a uid, no role at all) × RPC × key; Rewrap into
//! another key, batches item by item, Migrate over every key it selects;
//! reloading the policy and the TLS files (certificate, CA, CRL) without a
//! restart, and a bad policy that leaves the old one in force.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keybroker_client::{Client, TlsIdentity, pb};
use keybroker_server::security::tls::pki::{Ca, ClientSpec, IssuedCert};
use keybroker_tests::{Broker, dev_pki, tempdir};
use sha2::Digest;
use tonic::Code;
use tonic::transport::Channel;

struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca = Ca::generate(name).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), server.key_pem.as_bytes()).unwrap();
        Pki { dir: dir.to_owned(), ca }
    }

    fn client(&self, spec: &ClientSpec<'_>) -> IssuedCert {
        self.ca.issue_client(spec).unwrap()
    }
}

fn identity_of(pki: &Pki, cert: &IssuedCert) -> TlsIdentity {
    TlsIdentity::from_pem(pki.ca.cert_pem(), cert.cert_pem.as_str(), cert.key_pem.as_bytes())
}

fn spki_sha256(cert: &IssuedCert) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert.cert_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    let (_, parsed) = X509Certificate::from_der(&der).unwrap();
    hex::encode(sha2::Sha256::digest(parsed.public_key().raw))
}

fn config(dir: &Path, pki_dir: &Path, root_key: &Path, policy: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"listen = "127.0.0.1:0"
reload_check_interval_ms = 200
{extra}
[tls]
cert = "{p}/server.pem"
key = "{p}/server.key"
client_ca = "{p}/ca.pem"

[store]
type = "sqlite"
path = "{d}/kb.sqlite"

[root_key]
file = "{root}"

[unix_socket]
path = "{d}/kb.sock"

[audit]
file = "{d}/audit.log"

{policy}
"#,
        p = pki_dir.display(),
        d = dir.display(),
        root = root_key.display()
    );
    let path = dir.join("kb.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn channel(broker: &Broker, identity: &TlsIdentity) -> Result<Channel, String> {
    keybroker_client::connect(&broker.url(), identity).await.map_err(|e| e.to_string())
}

async fn wrap(ch: &Channel, key: &str) -> Result<Vec<u8>, tonic::Status> {
    pb::key_broker_client::KeyBrokerClient::new(ch.clone())
        .wrap(pb::WrapRequest { key: key.into(), plaintext: vec![7; 32], ..Default::default() })
        .await
        .map(|r| r.into_inner().ciphertext)
}

async fn unwrap(ch: &Channel, ciphertext: &[u8]) -> Result<(), tonic::Status> {
    pb::key_broker_client::KeyBrokerClient::new(ch.clone())
        .unwrap(pb::UnwrapRequest { ciphertext: ciphertext.to_vec(), ..Default::default() })
        .await
        .map(|_| ())
}

async fn rewrap(ch: &Channel, ciphertext: &[u8], target: &str) -> Result<(), tonic::Status> {
    pb::key_broker_client::KeyBrokerClient::new(ch.clone())
        .rewrap(pb::RewrapRequest { ciphertext: ciphertext.to_vec(), target_key: target.into(), ..Default::default() })
        .await
        .map(|_| ())
}

fn admin(ch: &Channel) -> pb::key_admin_client::KeyAdminClient<Channel> {
    pb::key_admin_client::KeyAdminClient::new(ch.clone())
}

/// Asserts the outcome, and that a denial names the identity, the RPC and
/// the key but not the policy's roles.
fn expect<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, allowed: bool, who: &str) {
    match (allowed, result) {
        (true, Ok(_)) => {}
        (false, Err(status)) if status.code() == Code::PermissionDenied => {
            let m = status.message();
            assert!(m.contains(who), "{what}: the denial names the identity {who}: {m}");
            assert!(!m.contains("role-"), "{what}: the denial shows the policy's internals: {m}");
        }
        (allowed, other) => {
            panic!("{what}: expected {}, got {other:?}", if allowed { "OK" } else { "PERMISSION_DENIED" })
        }
    }
}

const POLICY: &str = r#"
[auth]
certificate_identities = ["uri", "dns", "cn", "spki-sha256"]

[policy.roles.role-payments]
"payments-*" = ["Wrap", "Unwrap", "GenerateDataKey"]
[policy.roles.role-orders]
"orders-*" = ["data"]
[policy.roles.role-ops]
"*" = ["admin"]
[policy.roles.role-readers]
"*" = ["read"]
[policy.roles.role-mover]
"payments-*" = ["Unwrap"]
"orders-*" = ["Wrap"]
[policy.roles.role-orders-migrator]
"orders-*" = ["Migrate", "read"]

[policy.identities]
"spiffe://test/payments" = ["role-payments"]
"dns:orders.internal" = ["role-orders"]
"cn:ops-team" = ["role-ops"]
"spiffe://test/mover" = ["role-mover"]
"spiffe://test/orders-migrator" = ["role-orders-migrator"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_kind_gets_exactly_its_roles_rights_per_key() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let pki = Pki::new(&dir.path().join("pki"), "policy test CA");
    let uid = unsafe_getuid();
    let readers = pki.client(&ClientSpec::new("readers", None));
    let policy = format!(
        "[backends.local]\ntype = \"local\"\n[backends.spare]\ntype = \"local\"\n{POLICY}\
         \"spki-sha256:{}\" = [\"role-readers\"]\n\"uid:{uid}\" = [\"role-orders\"]\n",
        spki_sha256(&readers)
    );
    let cfg = config(dir.path(), &pki.dir, &dev.join("root.key"), &policy, "");
    let broker = Broker::serve(&cfg, dir.path(), &[]);

    let connect = |spec: ClientSpec<'static>| {
        let id = identity_of(&pki, &pki.client(&spec));
        let broker = &broker;
        async move { channel(broker, &id).await.unwrap() }
    };
    let payments = connect(ClientSpec::new("payments", Some("spiffe://test/payments"))).await;
    let orders = connect(ClientSpec { dns: Some("orders.internal"), ..ClientSpec::new("orders", None) }).await;
    let ops = connect(ClientSpec::new("ops-team", None)).await;
    let readers = channel(&broker, &identity_of(&pki, &readers)).await.unwrap();
    let mover = connect(ClientSpec::new("mover", Some("spiffe://test/mover"))).await;
    let nobody = connect(ClientSpec::new("nobody", Some("spiffe://test/nobody"))).await;
    let fake_uid_name = format!("uid:{uid}");
    let fake_uid = {
        let id = identity_of(&pki, &pki.client(&ClientSpec::new(&fake_uid_name, None)));
        channel(&broker, &id).await.unwrap()
    };
    let migrator = connect(ClientSpec::new("om", Some("spiffe://test/orders-migrator"))).await;

    // The admin (CN) creates the keys; nobody else may.
    for key in ["payments-eu", "orders-eu", "hr"] {
        expect(
            "ops CreateKey",
            admin(&ops).create_key(pb::CreateKeyRequest { key: key.into(), ..Default::default() }).await,
            true,
            "cn:ops-team",
        );
    }
    expect(
        "payments CreateKey",
        admin(&payments).create_key(pb::CreateKeyRequest { key: "payments-x".into(), ..Default::default() }).await,
        false,
        "spiffe://test/payments",
    );

    // URI SAN: its own keys, its own RPCs.
    let pay_ct = wrap(&payments, "payments-eu").await.unwrap();
    expect("payments Unwrap own", unwrap(&payments, &pay_ct).await, true, "");
    expect("payments Wrap orders", wrap(&payments, "orders-eu").await, false, "spiffe://test/payments");
    expect("payments Rewrap (not granted)", rewrap(&payments, &pay_ct, "").await, false, "spiffe://test/payments");
    expect(
        "payments GetKey",
        admin(&payments).get_key(pb::GetKeyRequest { key: "payments-eu".into() }).await,
        false,
        "spiffe://test/payments",
    );
    let gdk = pb::key_broker_client::KeyBrokerClient::new(payments.clone())
        .generate_data_key(pb::GenerateDataKeyRequest { key: "payments-eu".into(), ..Default::default() })
        .await;
    expect("payments GenerateDataKey", gdk, true, "");

    // DNS SAN: data rights on orders-*, including Rewrap within the key.
    let ord_ct = wrap(&orders, "orders-eu").await.unwrap();
    expect("orders Unwrap own", unwrap(&orders, &ord_ct).await, true, "");
    expect("orders Rewrap own", rewrap(&orders, &ord_ct, "").await, true, "");
    expect("orders Unwrap payments", unwrap(&orders, &pay_ct).await, false, "dns:orders.internal");
    expect("orders Rewrap into payments", rewrap(&orders, &ord_ct, "payments-eu").await, false, "dns:orders.internal");
    expect(
        "orders Rotate",
        admin(&orders).rotate(pb::RotateRequest { key: "orders-eu".into(), ..Default::default() }).await,
        false,
        "dns:orders.internal",
    );

    // Rewrap into another key: Unwrap on the source and Wrap on the target.
    expect("mover Rewrap payments -> orders", rewrap(&mover, &pay_ct, "orders-eu").await, true, "");
    expect(
        "mover Rewrap orders -> payments",
        rewrap(&mover, &ord_ct, "payments-eu").await,
        false,
        "spiffe://test/mover",
    );
    expect("mover Rewrap payments in place", rewrap(&mover, &pay_ct, "").await, false, "spiffe://test/mover");

    // CN: admin RPCs on every key, no data.
    expect(
        "ops Rotate",
        admin(&ops).rotate(pb::RotateRequest { key: "hr".into(), ..Default::default() }).await,
        true,
        "",
    );
    expect("ops Unwrap", unwrap(&ops, &pay_ct).await, false, "cn:ops-team");

    // SPKI hash: read-only.
    // (Named by its first identity, the CN; its role comes from the SPKI hash.)
    let spki_name = "cn:readers";
    expect("readers GetKey", admin(&readers).get_key(pb::GetKeyRequest { key: "hr".into() }).await, true, "");
    let listed = admin(&readers).list_keys(pb::ListKeysRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.keys.len(), 3);
    expect(
        "readers Rotate",
        admin(&readers).rotate(pb::RotateRequest { key: "hr".into(), ..Default::default() }).await,
        false,
        spki_name,
    );
    expect("readers Wrap", wrap(&readers, "hr").await, false, spki_name);

    // No role: nothing at all, not even listing.
    expect("nobody Wrap", wrap(&nobody, "orders-eu").await, false, "spiffe://test/nobody");
    expect("nobody Unwrap", unwrap(&nobody, &ord_ct).await, false, "spiffe://test/nobody");
    expect(
        "nobody ListKeys",
        admin(&nobody).list_keys(pb::ListKeysRequest::default()).await,
        false,
        "spiffe://test/nobody",
    );
    expect(
        "nobody ListBackends",
        admin(&nobody).list_backends(pb::ListBackendsRequest::default()).await,
        false,
        "spiffe://test/nobody",
    );

    // A certificate CN that reads like the socket's uid is a cn: identity.
    expect("cn uid: Wrap", wrap(&fake_uid, "orders-eu").await, false, &format!("cn:uid:{uid}"));

    // The Unix socket's uid holds the orders role, and nothing more.
    let socket = Client::unix(dir.path().join("kb.sock")).connect().await.unwrap();
    let via_socket = socket.wrap("orders-eu", &[3; 32], &Default::default()).await.unwrap();
    assert_eq!(via_socket.key, "orders-eu");
    let err = socket.wrap("payments-eu", &[3; 32], &Default::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains(&format!("uid:{uid}")), "{err}");

    // Batches: each item is authorized for its own key.
    let batch = pb::key_broker_client::KeyBrokerClient::new(orders.clone())
        .batch_unwrap(pb::BatchUnwrapRequest {
            items: vec![
                pb::UnwrapRequest { ciphertext: ord_ct.clone(), ..Default::default() },
                pb::UnwrapRequest { ciphertext: pay_ct.clone(), ..Default::default() },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(batch.results[0].result, Some(pb::batch_unwrap_result::Result::Ok(_))));
    match &batch.results[1].result {
        Some(pb::batch_unwrap_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::PermissionDenied as i32);
            assert!(e.message.contains("payments-eu") && e.message.contains("Unwrap"), "{}", e.message);
        }
        other => panic!("the payments item was not denied: {other:?}"),
    }

    // Migrate needs the right on every key its pattern selects.
    let migrate = |pattern: &str| pb::MigrateRequest {
        pattern: pattern.into(),
        from_backend: "local".into(),
        to_backend: "spare".into(),
        dry_run: true,
        ..Default::default()
    };
    let err = admin(&migrator).migrate(migrate("*")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("Migrate on key \"hr\""), "{}", err.message());
    expect("migrator Migrate orders-*", admin(&migrator).migrate(migrate("orders-*")).await, true, "");
}

fn unsafe_getuid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_reloads_without_a_restart_and_a_bad_one_is_refused() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let pki = Pki::new(&dir.path().join("pki"), "reload CA");
    let grant = |rpcs: &str| {
        format!(
            "[auth]\nadmin_identities = [\"spiffe://test/admin\"]\n[policy.roles.r]\n\"k-*\" = [{rpcs}]\n\
             [policy.identities]\n\"spiffe://test/app\" = [\"r\"]\n"
        )
    };
    let cfg = config(dir.path(), &pki.dir, &dev.join("root.key"), &grant("\"Wrap\""), "");
    let broker = Broker::serve(&cfg, dir.path(), &[]);
    let admin_ch =
        channel(&broker, &identity_of(&pki, &pki.client(&ClientSpec::new("a", Some("spiffe://test/admin")))))
            .await
            .unwrap();
    admin(&admin_ch).create_key(pb::CreateKeyRequest { key: "k-1".into(), ..Default::default() }).await.unwrap();
    // One connection, kept open across every change.
    let app = channel(&broker, &identity_of(&pki, &pki.client(&ClientSpec::new("app", Some("spiffe://test/app")))))
        .await
        .unwrap();
    let ct = wrap(&app, "k-1").await.unwrap();
    assert_eq!(unwrap(&app, &ct).await.unwrap_err().code(), Code::PermissionDenied);

    // Granting Unwrap in the file takes effect on the open connection.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[\"Wrap\"]", "[\"Wrap\", \"Unwrap\"]")).unwrap();
    eventually("the Unwrap grant", || async { unwrap(&app, &ct).await.is_ok() }).await;
    assert!(broker.stderr().contains("policy reloaded"), "{}", broker.stderr());

    // A policy that does not parse: refused with the reason, the old one stays.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("[\"Wrap\", \"Unwrap\"]", "[\"Wrap\", \"Unwarp\"]")).unwrap();
    eventually("the refusal", || async { broker.stderr().contains("\"Unwarp\" is not an RPC") }).await;
    assert!(broker.stderr().contains("reload refused"), "{}", broker.stderr());
    unwrap(&app, &ct).await.expect("the previous policy stays in force");

    drop(broker);

    // With file checks off, only SIGHUP reloads: revoke Unwrap.
    std::fs::write(&cfg, good.replace("reload_check_interval_ms = 200", "reload_check_interval_ms = 0")).unwrap();
    let broker = Broker::serve(&cfg, dir.path(), &[]);
    let app = channel(&broker, &identity_of(&pki, &pki.client(&ClientSpec::new("app", Some("spiffe://test/app")))))
        .await
        .unwrap();
    unwrap(&app, &ct).await.unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[\"Wrap\", \"Unwrap\"]", "[\"Wrap\"]")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    unwrap(&app, &ct).await.expect("no reload without SIGHUP when file checks are off");
    unsafe_kill_hup(broker.pid());
    eventually("the revocation", || async {
        unwrap(&app, &ct).await.map_err(|e| e.code()) == Err(Code::PermissionDenied)
    })
    .await;
    assert!(broker.stderr().contains("SIGHUP"), "{}", broker.stderr());
}

fn unsafe_kill_hup(pid: u32) {
    let status = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_ca_and_crl_reload_and_client_certificates_need_client_auth() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let pki = Pki::new(&dir.path().join("pki"), "first CA");
    let alice = pki.client(&ClientSpec::new("alice", Some("spiffe://test/app")));
    let bob = pki.client(&ClientSpec::new("bob", Some("spiffe://test/app")));
    std::fs::write(pki.dir.join("crl.pem"), pki.ca.crl(&[]).unwrap()).unwrap();
    let policy = "[auth]\napp_identities = [\"spiffe://test/app\"]\nadmin_identities = [\"spiffe://test/app\"]\n";
    let cfg = config(dir.path(), &pki.dir, &dev.join("root.key"), policy, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[tls]\n", &format!("[tls]\ncrl = \"{}/crl.pem\"\n", pki.dir.display())))
        .unwrap();
    let broker = Broker::serve(&cfg, dir.path(), &[]);
    let alice_ch = channel(&broker, &identity_of(&pki, &alice)).await.unwrap();
    admin(&alice_ch).create_key(pb::CreateKeyRequest { key: "k".into(), ..Default::default() }).await.unwrap();
    wrap(&channel(&broker, &identity_of(&pki, &bob)).await.unwrap(), "k").await.unwrap();

    // Client certificates need the clientAuth usage: none, or serverAuth
    // only, is refused at the handshake.
    for (what, spec) in [
        ("no EKU", ClientSpec { no_eku: true, ..ClientSpec::new("x", Some("spiffe://test/app")) }),
        ("serverAuth only", ClientSpec { client_auth: false, ..ClientSpec::new("y", Some("spiffe://test/app")) }),
    ] {
        let id = identity_of(&pki, &pki.client(&spec));
        let refused = match channel(&broker, &id).await {
            Err(_) => true,
            Ok(ch) => wrap(&ch, "k").await.is_err_and(|e| e.code() != Code::PermissionDenied),
        };
        assert!(refused, "{what}: accepted");
    }

    // Revoking bob in the CRL file: refused at his next handshake.
    std::fs::write(pki.dir.join("crl.pem"), pki.ca.crl(&[bob.cert_pem.as_str()]).unwrap()).unwrap();
    eventually("bob's revocation", || async {
        match channel(&broker, &identity_of(&pki, &bob)).await {
            Err(_) => true,
            Ok(ch) => wrap(&ch, "k").await.is_err(),
        }
    })
    .await;
    assert!(broker.stderr().contains("TLS certificates reloaded"), "{}", broker.stderr());
    wrap(&channel(&broker, &identity_of(&pki, &alice)).await.unwrap(), "k").await.expect("alice is not revoked");

    // A new CA and server certificate replace the old ones on disk.
    let next = Pki::new(&dir.path().join("pki-next"), "second CA");
    let carol = next.client(&ClientSpec::new("carol", Some("spiffe://test/app")));
    std::fs::write(pki.dir.join("crl.pem"), next.ca.crl(&[]).unwrap()).unwrap();
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(next.dir.join(f), pki.dir.join(f)).unwrap();
    }
    eventually("the new CA", || async {
        match channel(&broker, &identity_of(&next, &carol)).await {
            Ok(ch) => wrap(&ch, "k").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let old = match channel(&broker, &identity_of(&pki, &alice)).await {
        Err(_) => true,
        Ok(ch) => wrap(&ch, "k").await.is_err(),
    };
    assert!(old, "a certificate of the replaced CA still gets in");

    // Broken TLS files: refused with the reason, the current ones stay.
    let refusals = || broker.stderr().matches("TLS reload refused").count();
    let before = refusals();
    std::fs::write(pki.dir.join("server.pem"), "not a certificate").unwrap();
    eventually("the refusal", || async { refusals() > before }).await;
    wrap(&channel(&broker, &identity_of(&next, &carol)).await.unwrap(), "k").await.expect("still serving");
}
