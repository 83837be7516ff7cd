//! A wrong context and every single-byte change or truncation of a
//! ciphertext are refused with FAILED_PRECONDITION or INVALID_ARGUMENT, and
//! the broker keeps serving (no panic reached anything).

use keybroker_tests::{Broker, ctx, pb, tempdir};
use tonic::Code;

#[tokio::test]
async fn context_mismatch_fails_authentication() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let wrapped = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], context: ctx(&[("tenant", "a")]) })
        .await
        .unwrap()
        .into_inner();
    for wrong in [ctx(&[]), ctx(&[("tenant", "b")]), ctx(&[("tenant", "a"), ("extra", "x")]), ctx(&[("Tenant", "a")])] {
        let err = app
            .unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext.clone(), context: wrong.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "context {wrong:?}: {err:?}");
        assert!(err.message().contains("ciphertext authentication failed"), "{}", err.message());
        assert!(err.message().contains("demo") && err.message().contains("version 1"), "{}", err.message());
    }
}

#[tokio::test]
async fn every_single_byte_flip_and_truncation_is_rejected() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let context = ctx(&[("k", "v")]);
    let wrapped = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![7; 32], context: context.clone() })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;

    let mut tampered = Vec::new();
    for i in 0..wrapped.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut c = wrapped.clone();
            c[i] ^= mask;
            tampered.push((format!("byte {i} ^ {mask:#04x}"), c));
        }
    }
    for len in 0..wrapped.len() {
        tampered.push((format!("truncated to {len}"), wrapped[..len].to_vec()));
    }
    let mut extended = wrapped.clone();
    extended.push(0);
    tampered.push(("one byte appended".into(), extended));

    for (what, ciphertext) in &tampered {
        let err = app
            .unwrap(pb::UnwrapRequest { ciphertext: ciphertext.clone(), context: context.clone() })
            .await
            .expect_err(what);
        assert!(
            matches!(err.code(), Code::FailedPrecondition | Code::InvalidArgument),
            "{what}: got {:?} {}",
            err.code(),
            err.message()
        );
        assert!(!err.message().is_empty(), "{what}: empty message");
    }

    // The same through BatchUnwrap: one error per item, none dropped.
    let items = tampered
        .iter()
        .map(|(_, c)| pb::UnwrapRequest { ciphertext: c.clone(), context: context.clone() })
        .collect::<Vec<_>>();
    let results = app.batch_unwrap(pb::BatchUnwrapRequest { items }).await.unwrap().into_inner().results;
    assert_eq!(results.len(), tampered.len());
    for ((what, _), r) in tampered.iter().zip(results) {
        match r.result {
            Some(pb::batch_unwrap_result::Result::Error(e)) => assert!(
                e.code == Code::FailedPrecondition as i32 || e.code == Code::InvalidArgument as i32,
                "{what}: {e:?}"
            ),
            other => panic!("{what}: accepted: {other:?}"),
        }
    }

    // Still serving, and the original still opens.
    let ok = app.unwrap(pb::UnwrapRequest { ciphertext: wrapped, context }).await.unwrap().into_inner();
    assert_eq!(ok.plaintext, vec![7; 32]);
    assert!(!broker.stderr().contains("panicked"), "a panic reached the log");
}

#[tokio::test]
async fn a_header_moved_onto_another_keys_payload_fails() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut admin = broker.admin().await;
    admin.create_key(pb::CreateKeyRequest { key: "demp".into(), ..Default::default() }).await.unwrap();
    let mut app = broker.app().await;
    let a = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let b = app
        .wrap(pb::WrapRequest { key: "demp".into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    // Same header length: splice b's header onto a's payload.
    let header_len = 13 + 4;
    let mut spliced = b[..header_len].to_vec();
    spliced.extend_from_slice(&a[header_len..]);
    let err = app.unwrap(pb::UnwrapRequest { ciphertext: spliced, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
