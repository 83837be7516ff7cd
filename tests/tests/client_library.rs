//! The ergonomic client against the real broker: typed errors that keep the
//! gRPC code, deadlines, retries on UNAVAILABLE only, and the Unix socket.

use std::time::Duration;

use keybroker_client::{Client, Context, RetryPolicy};
use keybroker_tests::{Broker, ctx, tempdir};
use tonic::Code;

#[tokio::test]
async fn typed_calls_and_errors_keep_the_grpc_code() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let client = Client::mtls(broker.url(), broker.identity("client")).connect().await.unwrap();
    let context = ctx(&[("tenant", "acme")]);

    let wrapped = client.wrap("demo", &[3; 32], &context).await.unwrap();
    let unwrapped = client.unwrap(&wrapped.ciphertext, &context).await.unwrap();
    assert_eq!(unwrapped.plaintext.as_slice(), &[3; 32]);
    assert!(!format!("{unwrapped:?}").contains("3, 3"), "Debug shows the DEK");
    let dk = client.generate_data_key("demo", 0, &context).await.unwrap();
    assert_eq!(dk.plaintext.len(), 32);
    let rewrapped = client.rewrap(&dk.wrapped.ciphertext, &context, None).await.unwrap();
    assert_eq!(client.unwrap(&rewrapped.ciphertext, &context).await.unwrap().plaintext, dk.plaintext);

    let before = client.calls();
    let err = client.wrap("no-such-key", &[1], &Context::new()).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("no-such-key"), "{err}");
    assert_eq!(client.calls() - before, 1, "NOT_FOUND is an answer, not retried");
    let err = client.unwrap(&wrapped.ciphertext, &Context::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.is_failed_precondition());

    // The app identity is refused on the admin plane, with the code kept.
    let err = client.get_key("demo").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));

    let admin = Client::mtls(broker.url(), broker.identity("admin")).connect().await.unwrap();
    assert_eq!(admin.rotate("demo", Some(1)).await.unwrap().current_version, 2);
    assert_eq!(admin.rotate("demo", Some(1)).await.unwrap_err().code(), Some(Code::Aborted));
    assert_eq!(admin.get_key("demo").await.unwrap().current_version, 2);
}

#[tokio::test]
async fn a_deadline_too_short_fails_with_deadline_exceeded() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let client = Client::mtls(broker.url(), broker.identity("client"))
        .timeout(Duration::from_nanos(1))
        .retry(RetryPolicy::none())
        .connect()
        .await
        .unwrap();
    let err = client.wrap("demo", &[1; 32], &Context::new()).await.unwrap_err();
    assert!(matches!(err.code(), Some(Code::DeadlineExceeded | Code::Cancelled)), "{err}");
}

#[tokio::test]
async fn calls_retry_with_backoff_while_the_broker_is_unavailable() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    // Learn the dev PKI and a free port, then stop the broker.
    let mut first = Broker::start_dev(&data);
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let identity = first.identity("client");
    first.terminate().await;

    let url = format!("https://127.0.0.1:{port}");
    let retry = RetryPolicy {
        max_attempts: 40,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    let client = Client::mtls(url, identity).retry(retry).connect_lazy().unwrap();

    let listen = format!("127.0.0.1:{port}");
    let data_for_start = data.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        Broker::start(
            &["dev", "--data-dir", data_for_start.to_str().unwrap(), "--listen", &listen],
            &[],
            &data_for_start,
        )
    });
    let wrapped = client.wrap("demo", &[1; 32], &Context::new()).await.unwrap();
    assert_eq!(wrapped.version, 1);
    assert!(client.calls() > 1, "the first attempts should have met UNAVAILABLE and been retried");
    drop(starter.join().unwrap());

    // With retries off, the same outage is one failed call.
    let retry = RetryPolicy::none();
    let client = Client::mtls(format!("https://127.0.0.1:{port}"), first.identity("client"))
        .retry(retry)
        .connect_lazy()
        .unwrap();
    let err = client.wrap("demo", &[1; 32], &Context::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert_eq!(client.calls(), 1);
}

#[tokio::test]
async fn the_unix_socket_serves_the_local_uid_as_an_application() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let socket = broker.data_dir.join("keybroker.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let client = Client::unix(&socket).connect().await.unwrap();
    let context = ctx(&[("via", "uds")]);
    let wrapped = client.wrap("demo", &[9; 32], &context).await.unwrap();
    assert_eq!(client.unwrap(&wrapped.ciphertext, &context).await.unwrap().plaintext.as_slice(), &[9; 32]);
    // Interoperable with the mTLS port.
    let tls = Client::mtls(broker.url(), broker.identity("client")).connect().await.unwrap();
    assert_eq!(tls.unwrap(&wrapped.ciphertext, &context).await.unwrap().plaintext.as_slice(), &[9; 32]);
    // The uid is an application identity only.
    let err = client.get_key("demo").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains("uid:"), "{err}");
}

/// The client checks the broker's certificate against the host of the URL
/// it dials, not against `localhost` whatever the URL says.
#[tokio::test]
async fn the_broker_certificate_is_checked_against_the_url_host() {
    use keybroker_server::security::tls::pki::{Ca, ClientSpec};
    let dir = tempdir();
    let dev = keybroker_tests::dev_pki(dir.path());
    // A PKI whose server certificate names `localhost` only, not 127.0.0.1.
    let ca = Ca::generate("url host test CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    let app = ca.issue_client(&ClientSpec::new("app", Some("spiffe://keybroker.dev/app"))).unwrap();
    let tls = dev.join("tls");
    std::fs::write(tls.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(tls.join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(tls.join("server.key"), server.key_pem.as_str()).unwrap();
    std::fs::write(tls.join("client.pem"), &app.cert_pem).unwrap();
    std::fs::write(tls.join("client.key"), app.key_pem.as_str()).unwrap();
    let broker = Broker::serve(&dev.join("keybroker.toml"), &dev, &[]);
    let port = broker.addr.port();
    let quick = RetryPolicy { max_attempts: 1, ..RetryPolicy::default() };

    let by_ip = Client::mtls(format!("https://127.0.0.1:{port}"), broker.identity("client")).retry(quick.clone());
    // The table is empty: a call that reaches the broker gets NOT_FOUND;
    // one refused at the TLS handshake gets something else.
    let reached = |result: keybroker_client::Result<_>| matches!(result, Err(e) if e.is_not_found());
    let refused = match by_ip.connect().await {
        Ok(client) => !reached(client.generate_data_key("absent", 0, &Context::new()).await),
        Err(_) => true,
    };
    assert!(refused, "a certificate for localhost was accepted for 127.0.0.1");

    let by_name = Client::mtls(format!("https://localhost:{port}"), broker.identity("client")).retry(quick.clone());
    assert!(reached(by_name.connect().await.unwrap().generate_data_key("absent", 0, &Context::new()).await));
    // An explicit domain still wins over the URL's host.
    let pinned = broker.identity("client").with_domain("localhost");
    let pinned = Client::mtls(format!("https://127.0.0.1:{port}"), pinned).retry(quick);
    assert!(reached(pinned.connect().await.unwrap().generate_data_key("absent", 0, &Context::new()).await));
}
