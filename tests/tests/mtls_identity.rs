//! mTLS by default: no certificate, a certificate from another CA, or an
//! expired one are refused at the handshake; a valid identity only reaches
//! the plane its role allows.

use keybroker_server::security::tls::pki::{Ca, ClientSpec};
use keybroker_tests::{Broker, pb, tempdir};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

async fn wrap_with(broker: &Broker, tls: ClientTlsConfig) -> Result<pb::WrapResponse, tonic::Status> {
    let channel = match Endpoint::from_shared(broker.url()).unwrap().tls_config(tls).unwrap().connect().await {
        Ok(channel) => channel,
        Err(err) => return Err(tonic::Status::unavailable(format!("connect failed: {err}"))),
    };
    pb::key_broker_client::KeyBrokerClient::new(channel)
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .map(|r| r.into_inner())
}

/// A failure of the connection itself (the server's TLS alert), as opposed
/// to a gRPC status the application returned.
fn refused_by_transport(err: &tonic::Status) -> bool {
    matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) && !err.message().contains("identity")
}

fn server_ca(broker: &Broker) -> Certificate {
    Certificate::from_pem(std::fs::read(broker.data_dir.join("tls/ca.pem")).unwrap())
}

/// Waits (up to 10 s) for the server to log a refused handshake whose
/// reason contains `reason`; true when it did.
async fn refused_for(broker: &Broker, reason: &str) -> bool {
    let logged = || broker.stderr().lines().any(|l| l.contains("TLS handshake refused") && l.contains(reason));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !logged() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    logged()
}

#[tokio::test]
async fn clients_without_a_valid_certificate_are_refused_at_the_handshake() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let base = || ClientTlsConfig::new().ca_certificate(server_ca(&broker)).domain_name("localhost");

    let err = wrap_with(&broker, base()).await.unwrap_err();
    assert!(refused_by_transport(&err), "no client cert: {err:?}");
    assert!(refused_for(&broker, "peer sent no certificates").await, "{}", broker.stderr());
    let logged = broker.stderr();
    let line = logged.lines().find(|l| l.contains("TLS handshake refused")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("remote=127.0.0.1:"),
        "refusals are warnings naming the peer: {line}"
    );

    let rogue = Ca::generate("rogue CA").unwrap();
    let cert = rogue.issue_client(&ClientSpec::new("intruder", Some("spiffe://keybroker.dev/app"))).unwrap();
    let err = wrap_with(&broker, base().identity(Identity::from_pem(&cert.cert_pem, cert.key_pem.as_bytes())))
        .await
        .unwrap_err();
    assert!(refused_by_transport(&err), "other CA: {err:?}");
    assert!(refused_for(&broker, "UnknownIssuer").await, "{}", broker.stderr());

    // A valid app identity works.
    let ok = wrap_with(&broker, base().identity(broker_identity(&broker, "client"))).await.unwrap();
    assert_eq!(ok.version, 1);
}

fn broker_identity(broker: &Broker, who: &str) -> Identity {
    let tls = broker.data_dir.join("tls");
    Identity::from_pem(
        std::fs::read(tls.join(format!("{who}.pem"))).unwrap(),
        std::fs::read(tls.join(format!("{who}.key"))).unwrap(),
    )
}

#[tokio::test]
async fn expired_and_wrong_usage_certificates_from_the_trusted_ca_are_refused() {
    // A broker whose CA the test holds, so it can issue bad certificates.
    let dir = tempdir();
    let kb = dir.path().join("kb");
    std::fs::create_dir_all(kb.join("tls")).unwrap();
    let ca = Ca::generate("test CA").unwrap();
    let write = |name: &str, text: &str| std::fs::write(kb.join("tls").join(name), text).unwrap();
    write("ca.pem", ca.cert_pem());
    let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    write("server.pem", &server.cert_pem);
    write("server.key", &server.key_pem);
    for (who, uri) in [("client", "spiffe://keybroker.dev/app"), ("admin", "spiffe://keybroker.dev/admin")] {
        let c = ca.issue_client(&ClientSpec::new(who, Some(uri))).unwrap();
        write(&format!("{who}.pem"), &c.cert_pem);
        write(&format!("{who}.key"), &c.key_pem);
    }
    let broker = Broker::start_dev(&kb);
    let base = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert_pem())).domain_name("localhost");

    let expired = ca
        .issue_client(&ClientSpec {
            valid_days: (-30, -1),
            ..ClientSpec::new("old", Some("spiffe://keybroker.dev/app"))
        })
        .unwrap();
    let err = wrap_with(&broker, base().identity(Identity::from_pem(&expired.cert_pem, expired.key_pem.as_bytes())))
        .await
        .unwrap_err();
    assert!(refused_by_transport(&err), "expired: {err:?}");
    assert!(refused_for(&broker, "certificate expired").await, "{}", broker.stderr());

    let server_usage = ca
        .issue_client(&ClientSpec { client_auth: false, ..ClientSpec::new("srv", Some("spiffe://keybroker.dev/app")) })
        .unwrap();
    let err = wrap_with(
        &broker,
        base().identity(Identity::from_pem(&server_usage.cert_pem, server_usage.key_pem.as_bytes())),
    )
    .await
    .unwrap_err();
    assert!(refused_by_transport(&err), "serverAuth-only: {err:?}");
    assert!(refused_for(&broker, "extended key usage for client authentication").await, "{}", broker.stderr());

    // A valid certificate with an identity in no list: connected, but denied
    // everything (deny by default).
    let stranger = ca.issue_client(&ClientSpec::new("stranger", Some("spiffe://elsewhere/x"))).unwrap();
    let err = wrap_with(&broker, base().identity(Identity::from_pem(&stranger.cert_pem, stranger.key_pem.as_bytes())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("spiffe://elsewhere/x"), "{}", err.message());
}

#[tokio::test]
async fn each_identity_reaches_only_its_own_plane() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let app_channel = broker.channel("client").await;
    let admin_channel = broker.channel("admin").await;

    let err = pb::key_admin_client::KeyAdminClient::new(app_channel.clone())
        .create_key(pb::CreateKeyRequest { key: "sneaky".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("spiffe://keybroker.dev/app"), "{}", err.message());
    let err = pb::key_admin_client::KeyAdminClient::new(app_channel.clone())
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let err = pb::key_broker_client::KeyBrokerClient::new(admin_channel.clone())
        .unwrap(pb::UnwrapRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "admins do not get data keys");

    // The denied create did nothing.
    let err = pb::key_admin_client::KeyAdminClient::new(admin_channel)
        .get_key(pb::GetKeyRequest { key: "sneaky".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let audit = std::fs::read_to_string(dir.path().join("kb/audit.log")).unwrap();
    let denied = audit.lines().find(|l| l.contains(r#""rpc":"CreateKey""#)).expect("the denied CreateKey is audited");
    assert!(denied.contains(r#""code":"PERMISSION_DENIED""#), "{denied}");
    assert!(denied.contains(r#""identity":"spiffe://keybroker.dev/app""#), "{denied}");
    assert!(denied.contains(r#""key":"sneaky""#), "{denied}");
}
