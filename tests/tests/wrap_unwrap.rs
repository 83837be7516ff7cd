//! Wrap → Unwrap round trips, GenerateDataKey, Rewrap and the batch forms.

use keybroker_tests::{Broker, ctx, pb, tempdir};

#[tokio::test]
async fn wrap_then_unwrap_returns_the_plaintext_with_its_context() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let context = ctx(&[("tenant", "acme"), ("blob", "invoice-17")]);
    let dek: Vec<u8> = (0u8..32).collect();
    let wrapped = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: dek.clone(), context: context.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((wrapped.key.as_str(), wrapped.version), ("demo", 1));
    assert_ne!(wrapped.ciphertext, dek);
    assert!(!wrapped.ciphertext.windows(dek.len()).any(|w| w == dek.as_slice()), "plaintext visible in ciphertext");
    let unwrapped =
        app.unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), context }).await.unwrap().into_inner();
    assert_eq!(unwrapped.plaintext, dek);
    assert_eq!((unwrapped.key.as_str(), unwrapped.version, unwrapped.rewrap_advised), ("demo", 1, false));

    // Two wraps of the same DEK differ (random nonce).
    let again = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: dek.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.ciphertext, wrapped.ciphertext);
}

#[tokio::test]
async fn generate_data_key_returns_a_fresh_dek_and_its_wrapped_form() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let context = ctx(&[("purpose", "gdk")]);
    let a = app
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "demo".into(),
            context: context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.plaintext.len(), 32, "length 0 means 32");
    assert_eq!(a.version, 1);
    let b = app
        .generate_data_key(pb::GenerateDataKeyRequest { key: "demo".into(), length: 16, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.plaintext.len(), 16);
    assert_ne!(a.plaintext[..16], b.plaintext[..], "two DEKs are equal");
    let opened = app.unwrap(pb::UnwrapRequest { ciphertext: a.ciphertext, context }).await.unwrap().into_inner();
    assert_eq!(opened.plaintext, a.plaintext);

    let blind = app
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "demo".into(),
            without_plaintext: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(blind.plaintext.is_empty());
    let opened = app
        .unwrap(pb::UnwrapRequest { ciphertext: blind.ciphertext, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext.len(), 32);
}

#[tokio::test]
async fn batch_forms_give_one_result_per_item_in_order() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let items: Vec<pb::WrapRequest> = (0..50u8)
        .map(|i| pb::WrapRequest {
            key: if i == 7 { "no-such-key".into() } else { "demo".into() },
            plaintext: vec![i; 32],
            context: ctx(&[("i", &i.to_string())]),
        })
        .collect();
    let results = app.batch_wrap(pb::BatchWrapRequest { items: items.clone() }).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 50);
    let mut unwraps = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r.result.unwrap() {
            pb::batch_wrap_result::Result::Ok(w) => {
                assert_ne!(i, 7);
                unwraps.push(pb::UnwrapRequest { ciphertext: w.ciphertext, context: items[i].context.clone() });
            }
            pb::batch_wrap_result::Result::Error(e) => {
                assert_eq!(i, 7, "item {i} failed: {}", e.message);
                assert_eq!(e.code, tonic::Code::NotFound as i32);
                assert!(e.message.contains("no-such-key"), "{}", e.message);
            }
        }
    }
    // Spoil one context: that item alone fails.
    unwraps[3].context = ctx(&[("i", "other")]);
    let opened = app.batch_unwrap(pb::BatchUnwrapRequest { items: unwraps }).await.unwrap().into_inner().results;
    assert_eq!(opened.len(), 49);
    for (n, r) in opened.into_iter().enumerate() {
        match r.result.unwrap() {
            pb::batch_unwrap_result::Result::Ok(u) => {
                assert_ne!(n, 3);
                let i = if n < 7 { n } else { n + 1 } as u8;
                assert_eq!(u.plaintext, vec![i; 32]);
            }
            pb::batch_unwrap_result::Result::Error(e) => {
                assert_eq!(n, 3);
                assert_eq!(e.code, tonic::Code::FailedPrecondition as i32);
            }
        }
    }
}

#[tokio::test]
async fn rewrap_moves_a_v1_ciphertext_to_v2_without_changing_the_dek() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let mut admin = broker.admin().await;
    let context = ctx(&[("row", "42")]);
    let dek = vec![9u8; 32];
    let v1 = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: dek.clone(), context: context.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.version, 1);
    admin.rotate(pb::RotateRequest { key: "demo".into(), ..Default::default() }).await.unwrap();

    let v2 = app
        .rewrap(pb::RewrapRequest {
            ciphertext: v1.ciphertext.clone(),
            context: context.clone(),
            target_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v2.key.as_str(), v2.version), ("demo", 2));
    let opened = app
        .unwrap(pb::UnwrapRequest { ciphertext: v2.ciphertext.clone(), context: context.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, dek);
    assert_eq!((opened.version, opened.rewrap_advised), (2, false));

    // Rewrap into another key.
    admin.create_key(pb::CreateKeyRequest { key: "archive".into(), ..Default::default() }).await.unwrap();
    let moved = app
        .rewrap(pb::RewrapRequest { ciphertext: v1.ciphertext, context: context.clone(), target_key: "archive".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((moved.key.as_str(), moved.version), ("archive", 1));
    let opened = app.unwrap(pb::UnwrapRequest { ciphertext: moved.ciphertext, context }).await.unwrap().into_inner();
    assert_eq!(opened.plaintext, dek);

    // Batch rewrap: per-item results.
    let bad = pb::RewrapRequest { ciphertext: b"junk".to_vec(), ..Default::default() };
    let good = pb::RewrapRequest { ciphertext: v2.ciphertext, context: ctx(&[("row", "42")]), ..Default::default() };
    let results =
        app.batch_rewrap(pb::BatchRewrapRequest { items: vec![good, bad] }).await.unwrap().into_inner().results;
    assert!(matches!(results[0].result, Some(pb::batch_rewrap_result::Result::Ok(_))));
    match &results[1].result {
        Some(pb::batch_rewrap_result::Result::Error(e)) => assert_eq!(e.code, tonic::Code::InvalidArgument as i32),
        other => panic!("junk rewrapped: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_threaded_broker_serves_many_concurrent_calls_and_audits_each() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let broker = Broker::start_dev_with(&data, &[("KEYBROKER_WORKER_THREADS", "1")]);
    assert!(broker.stderr().contains("single-threaded"), "{}", broker.stderr());
    // 8 connections with 50 calls each in flight: Wrap, then Unwrap.
    let mut calls = Vec::new();
    for c in 0..8u8 {
        let app = broker.app().await;
        for i in 0..50u8 {
            let mut app = app.clone();
            calls.push(tokio::spawn(async move {
                let dek = vec![c, i, 7, 7];
                let context = ctx(&[("call", &format!("{c}-{i}"))]);
                let wrapped = app
                    .wrap(pb::WrapRequest { key: "demo".into(), plaintext: dek.clone(), context: context.clone() })
                    .await?
                    .into_inner();
                let unwrapped = app.unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext, context }).await?;
                Ok::<_, tonic::Status>(unwrapped.into_inner().plaintext == dek)
            }));
        }
    }
    for call in calls {
        assert!(call.await.unwrap().unwrap(), "a DEK came back changed");
    }
    // Every call has its audit event; calls ready together shared writes.
    let (_, scrape) = broker.http_get("/metrics");
    let events = Broker::metric(&scrape, "keybroker_audit_events_total").unwrap();
    let writes = Broker::metric(&scrape, "keybroker_audit_writes_total").unwrap();
    assert!(events >= 800.0, "{events} audit events for 800 calls");
    assert!(writes < events, "{writes} writes for {events} events");
    assert_eq!(Broker::metric(&scrape, r#"keybroker_requests_total{rpc="Wrap",code="OK"}"#), Some(400.0));
    assert_eq!(Broker::metric(&scrape, r#"keybroker_requests_total{rpc="Unwrap",code="OK"}"#), Some(400.0));
    let lines = std::fs::read_to_string(data.join("audit.log")).unwrap().lines().count();
    assert_eq!(lines as f64, events, "the audit file holds every event counted");

    // A thread count that is not one is refused, naming the variable.
    let failure = Broker::try_start(
        &["dev", "--data-dir", dir.path().join("kb2").to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[("KEYBROKER_WORKER_THREADS", "0")],
        &dir.path().join("kb2"),
    )
    .err()
    .expect("KEYBROKER_WORKER_THREADS=0 started");
    assert!(failure.stderr.contains("KEYBROKER_WORKER_THREADS"), "{}", failure.stderr);
}
