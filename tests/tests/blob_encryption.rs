//! The blob envelope-encryption helper against the real broker: large blobs
//! in frames, tampering refused, and the optional DEK cache cutting broker
//! round trips within its limits.

use std::time::Duration;

use keybroker_client::blob::{BlobEncryptor, read_sidecar};
use keybroker_client::{CachePolicy, Client, Context};
use keybroker_tests::{Broker, ctx, tempdir};

async fn client(broker: &Broker) -> Client {
    Client::mtls(broker.url(), broker.identity("client")).connect().await.unwrap()
}

#[tokio::test]
async fn a_large_blob_streams_through_frames_and_back() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let sealer = BlobEncryptor::new(client(&broker).await, "demo")
        .with_context(ctx(&[("blob", "b-1")]))
        .with_frame_size(16 * 1024)
        .unwrap();
    let data: Vec<u8> = (0..2 * 1024 * 1024 + 123).map(|i: u32| (i % 251) as u8).collect();

    let mut blob = Vec::new();
    let sealed_len = sealer.seal_stream(&mut &data[..], &mut blob).await.unwrap();
    assert_eq!(sealed_len, data.len() as u64);
    let frames = data.len().div_ceil(16 * 1024);
    assert!(blob.len() > data.len() + frames * 20, "every frame carries a length and a tag");

    let sidecar = read_sidecar(&blob).await.unwrap();
    assert_eq!((sidecar.key.as_str(), sidecar.version), ("demo", 1));
    assert_eq!(sidecar.context, ctx(&[("blob", "b-1")]));

    let mut out = Vec::new();
    let expected = ctx(&[("blob", "b-1")]);
    let (len, verified) = sealer.open_stream(&mut &blob[..], &mut out, &expected).await.unwrap();
    assert_eq!((len, verified), (data.len() as u64, expected.clone()));
    assert!(out == data, "round trip changed the data");

    // Another encryptor (any key) opens it: the sidecar says what to unwrap.
    let opener_client = client(&broker).await;
    let opener = BlobEncryptor::new(opener_client.clone(), "unused");
    assert!(opener.open(&blob, &expected).await.unwrap().plaintext.as_slice() == data.as_slice());
    // A blob that belongs to another record is refused before any unwrap.
    let calls = opener_client.calls();
    let err = opener.open(&blob, &ctx(&[("blob", "b-2")])).await.unwrap_err();
    assert!(err.to_string().contains("belongs to another record"), "{err}");
    let err = opener.open(&blob, &ctx(&[("tenant", "acme")])).await.unwrap_err();
    assert!(err.to_string().contains("belongs to another record"), "{err}");
    assert_eq!(opener_client.calls(), calls, "a refused blob still reached the broker");

    // Tampering anywhere, and truncation, are refused.
    for at in [10, 60, blob.len() / 2, blob.len() - 3] {
        let mut bad = blob.clone();
        bad[at] ^= 0x40;
        assert!(opener.open(&bad, &expected).await.is_err(), "flip at {at} accepted");
    }
    assert!(opener.open(&blob[..blob.len() - 100], &expected).await.is_err());
    let err = opener.open(&blob[..blob.len() - 20], &expected).await.unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[tokio::test]
async fn the_dek_cache_cuts_broker_round_trips_within_its_limits() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let blobs = 1000;

    let plain = client(&broker).await;
    let uncached = BlobEncryptor::new(plain.clone(), "demo");
    let mut sealed = Vec::new();
    for i in 0..blobs {
        sealed.push(uncached.seal(format!("record {i}").as_bytes()).await.unwrap());
    }
    assert_eq!(plain.calls(), blobs, "without a cache every blob gets its own DEK");

    let cached_client = client(&broker).await;
    let cached =
        BlobEncryptor::new(cached_client.clone(), "demo").with_cache(CachePolicy::new(Duration::from_secs(300)));
    let mut cached_blobs = Vec::new();
    for i in 0..blobs {
        cached_blobs.push(cached.seal(format!("record {i}").as_bytes()).await.unwrap());
    }
    assert_eq!(cached_client.calls(), 1, "one GenerateDataKey for {blobs} blobs");
    for (i, blob) in cached_blobs.iter().enumerate() {
        let opened = cached.open(blob, &Context::new()).await.unwrap();
        assert_eq!(opened.plaintext.as_slice(), format!("record {i}").as_bytes());
    }
    assert_eq!(cached_client.calls(), 2, "one Unwrap for {blobs} blobs sharing a DEK");
    // Uncached blobs opened through the cache: one Unwrap each (distinct DEKs).
    for blob in sealed.iter().take(10) {
        cached.open(blob, &Context::new()).await.unwrap();
    }
    assert_eq!(cached_client.calls(), 12);

    // max_messages bounds how often one DEK is used.
    let limited_client = client(&broker).await;
    let limited = BlobEncryptor::new(limited_client.clone(), "demo")
        .with_cache(CachePolicy::new(Duration::from_secs(300)).with_max_messages(100));
    for _ in 0..1000 {
        limited.seal(b"x").await.unwrap();
    }
    assert_eq!(limited_client.calls(), 10);

    // max_bytes too.
    let bytes_client = client(&broker).await;
    let by_bytes = BlobEncryptor::new(bytes_client.clone(), "demo")
        .with_cache(CachePolicy::new(Duration::from_secs(300)).with_max_bytes(1000));
    for _ in 0..10 {
        by_bytes.seal(&[0u8; 300]).await.unwrap();
    }
    assert_eq!(bytes_client.calls(), 4, "3 blobs of 300 bytes fit under 1000 bytes per DEK");

    // max_age expires a DEK.
    let aging_client = client(&broker).await;
    let aging =
        BlobEncryptor::new(aging_client.clone(), "demo").with_cache(CachePolicy::new(Duration::from_millis(200)));
    aging.seal(b"a").await.unwrap();
    aging.seal(b"b").await.unwrap();
    assert_eq!(aging_client.calls(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    aging.seal(b"c").await.unwrap();
    assert_eq!(aging_client.calls(), 2, "an expired DEK was reused");
}
