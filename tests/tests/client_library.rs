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
