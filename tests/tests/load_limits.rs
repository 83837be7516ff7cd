//! Load shedding: over the bound on calls in flight, over an identity's
//! rate, or past a call's deadline, a call is answered at once with the
//! limit named (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) instead of queueing;
//! other identities keep being served.

use std::time::{Duration, Instant};

use keybroker_client::{Client, pb};
use keybroker_tests::{Broker, Moto, aws_backend_toml, config_with_backends, dev_pki, tempdir};
use tonic::Code;

async fn wrap(broker: &Broker, key: &str) -> Result<(), tonic::Status> {
    broker
        .app()
        .await
        .wrap(pb::WrapRequest { key: key.into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_in_flight_bound_or_past_their_deadline_are_refused_at_once() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let moto = Moto::start();
    // The KMS call itself would wait 5 s; the broker's deadline is 800 ms.
    let aws = aws_backend_toml("aws", &moto).replace("timeout_ms = 1000", "timeout_ms = 5000");
    let config = config_with_backends(dir.path(), &dev, "local", &aws);
    let env = [
        Moto::env().to_vec(),
        vec![("KEYBROKER_LIMITS__MAX_IN_FLIGHT", "2"), ("KEYBROKER_LIMITS__CALL_DEADLINE_MS", "800")],
    ]
    .concat();
    let broker = Broker::serve(&config, &dev, &env);
    let mut admin = broker.admin().await;
    for (key, backend) in [("on-aws", "aws"), ("on-local", "local")] {
        let req = pb::CreateKeyRequest { key: key.into(), backend: backend.into(), ..Default::default() };
        admin.create_key(req).await.unwrap();
    }
    wrap(&broker, "on-aws").await.unwrap();

    // Two calls hang on a frozen KMS and fill the bound.
    moto.freeze();
    let hung = tokio::spawn({
        let url = broker.url();
        let identity = broker.identity("client");
        async move {
            let channel = keybroker_client::connect(&url, &identity).await.unwrap();
            let one = |ch: tonic::transport::Channel| async move {
                let started = Instant::now();
                let r = pb::key_broker_client::KeyBrokerClient::new(ch)
                    .wrap(pb::WrapRequest { key: "on-aws".into(), plaintext: vec![1; 32], ..Default::default() })
                    .await;
                (r.map(|_| ()), started.elapsed())
            };
            tokio::join!(one(channel.clone()), one(channel))
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third call, on a healthy backend, is refused at once.
    let started = Instant::now();
    let err = wrap(&broker, "on-local").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(250), "refused after {:?}", started.elapsed());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limits.max_in_flight = 2"), "{}", err.message());
    // The hung calls end at their deadline, naming it.
    let ((first, t1), (second, t2)) = hung.await.unwrap();
    for (result, took) in [(first, t1), (second, t2)] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("limits.call_deadline_ms = 800"), "{}", err.message());
        assert!(took >= Duration::from_millis(750) && took < Duration::from_millis(2500), "{took:?}");
    }
    // Their slots are free again.
    wrap(&broker, "on-local").await.unwrap();
    moto.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_rate_is_throttled_and_others_are_not() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let broker = Broker::start_dev_with(
        &data,
        &[("KEYBROKER_LIMITS__PER_IDENTITY_RATE", "5"), ("KEYBROKER_LIMITS__PER_IDENTITY_BURST", "5")],
    );
    let mut app = broker.app().await;
    let mut refused = Vec::new();
    for _ in 0..12 {
        if let Err(err) =
            app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() }).await
        {
            refused.push(err);
        }
    }
    assert!(refused.len() >= 5, "only {} of 12 calls over a burst of 5 were refused", refused.len());
    for err in &refused {
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message().contains("spiffe://keybroker.dev/app")
                && err.message().contains("limits.per_identity_rate = 5"),
            "{}",
            err.message()
        );
    }
    // Another identity (the admin) is served meanwhile.
    let mut admin = broker.admin().await;
    for _ in 0..4 {
        admin.get_key(pb::GetKeyRequest { key: "demo".into() }).await.unwrap();
    }
    // A batch counts one per item: 20 items over a burst of 5 are refused
    // whole, for the socket's identity, which has a bucket of its own.
    let socket = Client::unix(data.join("keybroker.sock")).connect().await.unwrap();
    socket.wrap("demo", &[2; 32], &Default::default()).await.unwrap();
    let items =
        (0..20).map(|_| pb::WrapRequest { key: "demo".into(), plaintext: vec![3; 32], ..Default::default() }).collect();
    let err = socket.data_plane().batch_wrap(pb::BatchWrapRequest { items }).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains(&format!("uid:{}", unsafe_getuid())), "{}", err.message());
    let (_, scrape) = broker.http_get("/metrics");
    let rejected = Broker::metric(&scrape, r#"keybroker_limit_rejections_total{limit="per_identity_rate"}"#);
    assert_eq!(rejected, Some(refused.len() as f64 + 1.0), "every refusal counted, the batch once");
    // The rate refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() }).await.unwrap();
}

fn unsafe_getuid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap()
}
