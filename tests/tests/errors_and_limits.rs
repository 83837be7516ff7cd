//! Bad input gets the right gRPC code and a message that names what is
//! wrong: unknown keys, oversize or empty input, bad names and patterns,
//! duplicates, and RPCs of later milestones.

use keybroker_tests::{Broker, pb, tempdir};
use tonic::Code;

#[tokio::test]
async fn data_plane_errors_have_the_right_codes() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let wrap = |key: &str, plaintext: Vec<u8>| pb::WrapRequest { key: key.into(), plaintext, ..Default::default() };

    let err = app.wrap(wrap("nope", vec![1; 32])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());

    let err = app.wrap(wrap("demo", vec![1; 4097])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("4097") && err.message().contains("4096"), "{}", err.message());
    assert!(app.wrap(wrap("demo", vec![1; 4096])).await.is_ok(), "the limit itself is allowed");

    let err = app.wrap(wrap("demo", vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = app.wrap(wrap("bad/name", vec![1])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("bad/name"), "{}", err.message());

    let big_context = [("k".to_string(), "v".repeat(9000))].into();
    let err =
        app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1], context: big_context }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = app
        .generate_data_key(pb::GenerateDataKeyRequest { key: "demo".into(), length: 5000, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = app.unwrap(pb::UnwrapRequest { ciphertext: b"hello".to_vec(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A ciphertext of a key this broker never had: NOT_FOUND naming it.
    let other = tempdir();
    let other_broker = Broker::start_dev(&other.path().join("kb"));
    let mut other_admin = other_broker.admin().await;
    other_admin.create_key(pb::CreateKeyRequest { key: "elsewhere".into(), ..Default::default() }).await.unwrap();
    let foreign = other_broker.app().await.wrap(wrap("elsewhere", vec![1; 32])).await.unwrap().into_inner().ciphertext;
    let err = app.unwrap(pb::UnwrapRequest { ciphertext: foreign, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("elsewhere"), "{}", err.message());

    let items = vec![wrap("demo", vec![1]); 10_001];
    let err = app.batch_wrap(pb::BatchWrapRequest { items }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("max_batch_items"), "{}", err.message());
}

#[tokio::test]
async fn admin_plane_errors_have_the_right_codes() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut admin = broker.admin().await;
    let create = |key: &str, backend: &str| pb::CreateKeyRequest {
        key: key.into(),
        backend: backend.into(),
        ..Default::default()
    };

    let err = admin.create_key(create("demo", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = admin.create_key(create("x", "hsm-that-is-not-configured")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hsm-that-is-not-configured"), "{}", err.message());
    let err = admin.create_key(create("", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = admin.get_key(pb::GetKeyRequest { key: "missing".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin.rotate(pb::RotateRequest { key: "missing".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin.list_keys(pb::ListKeysRequest { pattern: "[a-".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = admin
        .list_keys(pb::ListKeysRequest { page_token: "!!not-a-token".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = admin.migrate(pb::MigrateRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("from_backend"), "{}", err.message());
    let same = pb::MigrateRequest { from_backend: "local".into(), to_backend: "local".into(), ..Default::default() };
    assert_eq!(admin.migrate(same).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown =
        pb::MigrateRequest { from_backend: "local".into(), to_backend: "nowhere".into(), ..Default::default() };
    let err = admin.migrate(unknown).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("nowhere"), "{err:?}");
    let err = admin.get_migration(pb::GetMigrationRequest { job_id: "no-such-job".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn list_keys_filters_by_glob_and_pages_in_name_order() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut admin = broker.admin().await;
    for i in 0..25 {
        admin.create_key(pb::CreateKeyRequest { key: format!("tenant-{i:02}"), ..Default::default() }).await.unwrap();
    }
    admin.create_key(pb::CreateKeyRequest { key: "other".into(), ..Default::default() }).await.unwrap();

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_keys(pb::ListKeysRequest { pattern: "tenant-*".into(), page_size: 10, page_token: token })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.keys.len() <= 10);
        names.extend(page.keys.into_iter().map(|k| k.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("tenant-{i:02}")).collect();
    assert_eq!(names, expected);

    let all = admin.list_keys(pb::ListKeysRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.keys.len(), 27, "25 tenants + other + demo");
    let one = admin
        .list_keys(pb::ListKeysRequest { pattern: "tenant-1?".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.keys.len(), 10);
}

/// A method the `KeyBroker` service does not have, a service whose name
/// starts like it, and a path outside every service: each UNIMPLEMENTED,
/// while the service's own methods (reached only through the data plane's
/// own route: tonic's router does not hold it) and the admin plane answer.
#[tokio::test]
async fn unknown_methods_and_services_are_unimplemented() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let channel = broker.channel("client").await;
    let call = |path: &'static str| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.unwrap();
            let request = pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() };
            let codec = tonic_prost::ProstCodec::<pb::WrapRequest, pb::WrapResponse>::default();
            grpc.unary(tonic::Request::new(request), tonic::codegen::http::uri::PathAndQuery::from_static(path), codec)
                .await
        }
    };
    for path in ["/keybroker.v1.KeyBroker/NoSuchMethod", "/keybroker.v1.KeyBrokerX/Wrap", "/no.such.Service/Wrap"] {
        let err = call(path).await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
    }
    let wrapped = call("/keybroker.v1.KeyBroker/Wrap").await.unwrap().into_inner();
    assert_eq!((wrapped.key.as_str(), wrapped.version), ("demo", 1));
    let mut admin = broker.admin().await;
    assert!(admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.is_ok());
}

/// One data-plane call sent as raw HTTP/2: `chunks` are the request body's
/// DATA frames, `encoding` its `grpc-encoding`. Answers the response's
/// message (without its prefix) and its `grpc-status` and `grpc-message`.
async fn raw_call(
    channel: &tonic::transport::Channel,
    path: &str,
    encoding: Option<&str>,
    chunks: Vec<Vec<u8>>,
) -> (Option<Vec<u8>>, Code, String) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let frames = chunks.into_iter().map(|c| Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from(c))));
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
    let mut request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(encoding) = encoding {
        request = request.header("grpc-encoding", encoding);
    }
    let response = channel.clone().oneshot(request.body(body).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    // A trailers-only answer carries its status in the headers.
    let trailers = collected.trailers().cloned().unwrap_or_else(|| parts.headers.clone());
    let data = collected.to_bytes();
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status");
    let message = (data.len() >= 5).then(|| {
        let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
        assert_eq!((data[0], data.len()), (0, 5 + len), "one uncompressed message");
        data[5..].to_vec()
    });
    (message, status.code(), status.message().to_owned())
}

/// The gRPC length-prefixed form of `message`.
fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The data plane frames its unary calls itself (not through tonic's
/// generic server): a message split over DATA frames is joined, a second
/// message is ignored as tonic ignores it, and every malformed body gets
/// the code tonic gives it; a compressed request still reaches tonic's
/// server, which refuses the encoding.
#[tokio::test]
async fn the_data_planes_own_framing_reads_split_bodies_and_rejects_malformed_ones() {
    use prost::Message;
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let channel = broker.channel("client").await;
    let wrap = "/keybroker.v1.KeyBroker/Wrap";
    let request = pb::WrapRequest { key: "demo".into(), plaintext: vec![7; 32], ..Default::default() }.encode_to_vec();
    let whole = framed(0, &request);

    // Split inside the prefix and inside the message, then a second message.
    let chunks = vec![whole[..3].to_vec(), whole[3..20].to_vec(), whole[20..].to_vec(), framed(0, b"\xff\xff")];
    let (message, code, text) = raw_call(&channel, wrap, None, chunks).await;
    assert_eq!(code, Code::Ok, "{text}");
    let wrapped = pb::WrapResponse::decode(message.expect("a message").as_slice()).unwrap();
    assert_eq!((wrapped.key.as_str(), wrapped.version), ("demo", 1));
    let mut app = broker.app().await;
    let unwrapped = app
        .unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, vec![7; 32]);

    // What is sent, its grpc-encoding and body frames; the code and words it gets.
    type Case = (&'static str, Option<&'static str>, Vec<Vec<u8>>, Code, &'static str);
    let cases: Vec<Case> = vec![
        ("empty body", None, vec![], Code::Internal, "Missing request message"),
        ("cut short", None, vec![whole[..whole.len() - 1].to_vec()], Code::Internal, "Unexpected EOF"),
        ("prefix only in part", None, vec![whole[..3].to_vec()], Code::Internal, "Unexpected EOF"),
        ("compressed flag", None, vec![framed(1, &request)], Code::Internal, "compressed-flag"),
        ("unknown flag", None, vec![framed(7, &request)], Code::Internal, "invalid compression flag: 7"),
        (
            "over the limit",
            None,
            vec![vec![0, 0xff, 0xff, 0xff, 0xff]],
            Code::OutOfRange,
            "the limit is: 16777216 bytes (limits.max_message_bytes)",
        ),
        ("not protobuf", None, vec![framed(0, b"\x0a\xff\xff\xff")], Code::Internal, "decode"),
        ("gzip", Some("gzip"), vec![framed(1, &request)], Code::Unimplemented, "gzip"),
    ];
    for (what, encoding, chunks, want, says) in cases {
        let (message, code, text) = raw_call(&channel, wrap, encoding, chunks).await;
        assert_eq!((code, message), (want, None), "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
    }
    // Errors of the service itself still come back as a status, not a message.
    let unknown = pb::WrapRequest { key: "no-such-key".into(), plaintext: vec![1; 32], ..Default::default() };
    let (message, code, text) = raw_call(&channel, wrap, None, vec![framed(0, &unknown.encode_to_vec())]).await;
    assert_eq!((code, message), (Code::NotFound, None), "{text}");
}
