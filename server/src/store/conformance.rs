//! One conformance suite for every [`KeyStore`]: each store's tests call
//! [`run_all`] with a fresh, empty store (as kes and quickwit do).

use super::{KeyMode, KeyRecord, KeyReplacement, KeyStore, StoreError, UsageRecord, VersionRecord, VersionState};
use crate::material::BackendRef;

fn version(v: u32, state: VersionState) -> VersionRecord {
    VersionRecord::unused(
        v,
        state,
        "local".into(),
        BackendRef(vec![v as u8; 61]),
        if v.is_multiple_of(2) { KeyMode::Hierarchy } else { KeyMode::Direct },
        1_700_000_000 + i64::from(v),
    )
}

fn key(name: &str) -> KeyRecord {
    KeyRecord {
        name: name.into(),
        backend: "local".into(),
        mode: KeyMode::Hierarchy,
        current_version: 1,
        min_decryption_version: 1,
        deletion_allowed: false,
        labels: [("team".to_string(), "billing".to_string())].into(),
        rotation_period_secs: 86_400,
        max_wraps_per_version: 1 << 32,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
        revision: 1,
        versions: vec![version(1, VersionState::Active)],
    }
}

/// Runs every conformance check against `store`, which must start empty.
pub async fn run_all(store: &dyn KeyStore) {
    create_get_and_duplicate(store).await;
    update_checks_revision_and_adds_versions(store).await;
    update_of_missing_key_is_not_found(store).await;
    load_all_is_in_name_order(store).await;
    replace_keys_is_all_or_nothing(store).await;
    every_write_of_a_key_is_a_numbered_change(store).await;
    keys_are_due_for_rotation_by_age_or_by_wraps(store).await;
    a_job_lease_has_one_holder_at_a_time(store).await;
    usage_of_many_keys_in_one_batch(store).await;
}

/// The rows of key `old` the usage-table migration tests write in the schema
/// before it, per version: (version, unwraps, last unwrap, wraps, rewraps in,
/// rewraps out, last wrap).
pub const COUNTS_BEFORE_THE_MOVE: [(u32, u64, i64, u64, u64, u64, i64); 2] =
    [(1, 7, 70, 11, 2, 5, 71), (2, 0, 0, 3, 5, 0, 72)];

/// Key `old` with [`COUNTS_BEFORE_THE_MOVE`], as SQL for the schema before
/// the move (a rotation period of 100 s; version N made at N). `blob` writes
/// a one-byte binary literal in the store's dialect.
pub fn rows_before_the_move(blob: fn(u8) -> String) -> String {
    let versions: Vec<String> = COUNTS_BEFORE_THE_MOVE
        .iter()
        .map(|&(v, unwraps, last_unwrap, wraps, rewraps_in, rewraps_out, last_wrap)| {
            let state = if v == 2 { "active" } else { "decrypt_only" };
            format!(
                "('old', {v}, '{state}', 'local', {}, {v}, {v}, {unwraps}, {last_unwrap}, {wraps}, {rewraps_in}, \
                 {rewraps_out}, {last_wrap})",
                blob(v as u8)
            )
        })
        .collect();
    format!(
        "INSERT INTO keys (name, backend, current_version, min_decryption_version, rotation_period_secs, created_at, \
         updated_at) VALUES ('old', 'local', 2, 1, 100, 1, 1); \
         INSERT INTO key_versions (key_name, version, state, backend, backend_ref, created_at, updated_at, \
         unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count, rewrap_out_count, last_wrap_at) VALUES {};",
        versions.join(", ")
    )
}

fn counts(key: &KeyRecord) -> Vec<(u32, u64, i64, u64, u64, u64, i64)> {
    key.versions
        .iter()
        .map(|v| {
            let c = (v.unwrap_count, v.last_unwrap_at, v.wrap_count, v.rewrap_in_count, v.rewrap_out_count);
            (v.version, c.0, c.1, c.2, c.3, c.4, v.last_wrap_at)
        })
        .collect()
}

/// A store opened on a table written before usage counts had their own
/// table ([`COUNTS_BEFORE_THE_MOVE`]; a rotation period of 100 s, its
/// current version 2 made at 2) holds every count, a flush adds to them, a
/// replaced key (removed and written again) keeps them, and the key is due
/// by age from its current version's creation.
pub async fn usage_counts_carried_over_by_the_move(store: &dyn KeyStore) {
    assert!(due_in_one_look(store, 101, 1 << 40).await.is_empty());
    assert_eq!(due_in_one_look(store, 102, 1 << 40).await, vec![("old".to_owned(), 2)]);
    let key = store.get("old").await.unwrap().unwrap();
    assert_eq!(counts(&key), COUNTS_BEFORE_THE_MOVE);
    let usage =
        UsageRecord { key: "old".into(), version: 2, unwraps: 4, last_unwrap_at: 80, wraps: 6, ..Default::default() };
    store.record_usage("after-move", &[usage]).await.unwrap();
    let key = store.get("old").await.unwrap().unwrap();
    assert_eq!(counts(&key)[1], (2, 4, 80, 9, 5, 0, 72));
    let replacement = KeyReplacement { record: key.clone(), expected_revision: Some(key.revision) };
    store.replace_keys(&[replacement]).await.unwrap();
    assert_eq!(counts(&store.get("old").await.unwrap().unwrap()), counts(&key));
}

async fn a_job_lease_has_one_holder_at_a_time(store: &dyn KeyStore) {
    let job = super::JobRecord {
        id: "lease-job".into(),
        pattern: "*".into(),
        from_backend: "a".into(),
        to_backend: "b".into(),
        conflict: super::ConflictMode::Fail,
        dry_run: false,
        max_keys_per_second: 0,
        phase: super::JobPhase::Copying,
        error: String::new(),
        created_at: 1,
        updated_at: 1,
    };
    store.create_job(&job, &["k".to_owned()]).await.unwrap();
    let t = 1_700_000_000_000;
    assert!(store.lease_job("lease-job", "one", t, 1000).await.unwrap(), "a free lease is taken");
    assert!(!store.lease_job("lease-job", "two", t + 500, 1000).await.unwrap(), "a held lease is not");
    assert!(store.lease_job("lease-job", "one", t + 900, 1000).await.unwrap(), "the holder renews");
    assert!(!store.lease_job("lease-job", "two", t + 1500, 1000).await.unwrap(), "renewed until t + 1900");
    assert!(store.lease_job("lease-job", "two", t + 2000, 1000).await.unwrap(), "a lapsed lease is taken over");
    assert!(!store.lease_job("lease-job", "one", t + 2100, 1000).await.unwrap(), "the old holder lost it");
    store.set_job_phase("lease-job", super::JobPhase::Done, "").await.unwrap();
    assert!(!store.lease_job("lease-job", "two", t + 9000, 1000).await.unwrap(), "a finished job has no lease");
    assert!(!store.lease_job("no-such-job", "one", t, 1000).await.unwrap());
}

/// The keys due for rotation at `now` with every usage row read at once.
async fn due_in_one_look(store: &dyn KeyStore, now: i64, default_max_wraps: u64) -> Vec<(String, u32)> {
    let found = store.due_for_rotation(now, default_max_wraps, &super::WrapScan::all()).await.unwrap();
    assert_eq!(found.last, None, "one look reads to the end");
    found.due
}

async fn keys_are_due_for_rotation_by_age_or_by_wraps(store: &dyn KeyStore) {
    // key() versions are created at 1_700_000_001; no key of the suite so
    // far has a period below a day or a wrap count near the limit.
    let mut aged = key("due-by-age");
    aged.rotation_period_secs = 100;
    store.create(&aged).await.unwrap();
    let mut used = key("due-by-wraps");
    used.rotation_period_secs = 0;
    used.max_wraps_per_version = 5;
    store.create(&used).await.unwrap();
    let due = |now| due_in_one_look(store, now, 1 << 30);
    assert!(due(1_700_000_050).await.is_empty(), "nothing is due yet");
    assert_eq!(due(1_700_000_101).await, vec![("due-by-age".to_owned(), 1)]);
    let wraps = |n| super::UsageRecord { key: "due-by-wraps".into(), version: 1, wraps: n, ..Default::default() };
    store.record_usage("due-1", &[wraps(4)]).await.unwrap();
    assert!(due(1_700_000_050).await.is_empty(), "4 of 5 wraps");
    store.record_usage("due-2", &[wraps(1)]).await.unwrap();
    assert_eq!(due(1_700_000_050).await, vec![("due-by-wraps".to_owned(), 1)]);
    // Read in windows of one row: every key's rows are read once per round,
    // whole keys per window, and the key due by wraps is found in its own.
    let mut scan = super::WrapScan { after: String::new(), rows: 1 };
    let (mut looks, mut found, mut read) = (0, Vec::new(), Vec::new());
    loop {
        let step = store.due_for_rotation(1_700_000_050, 1 << 30, &scan).await.unwrap();
        looks += 1;
        found.extend(step.due);
        match step.last {
            Some(last) => {
                assert!(!read.contains(&last), "the window after {:?} read {last:?} again", scan.after);
                read.push(last.clone());
                scan.after = last;
            }
            None => break,
        }
    }
    let keys_with_usage = store.list_page("", 1000).await.unwrap().len();
    assert!(
        looks > 1 && read.len() <= keys_with_usage,
        "{looks} looks, {} windows over {keys_with_usage} keys",
        read.len()
    );
    assert!(read.contains(&"due-by-wraps".to_owned()), "{read:?}");
    assert_eq!(found, vec![("due-by-wraps".to_owned(), 1)], "only the wrap-due key, once");
    // The broker's own limit caps a key's policy: seq-c has 3 wraps under a
    // policy of 2^32.
    let capped = |cap| due_in_one_look(store, 1_700_000_050, cap);
    assert!(capped(3).await.iter().any(|(k, _)| k == "seq-c"), "at the cap");
    assert!(!capped(4).await.iter().any(|(k, _)| k == "seq-c"), "below the cap");

    // Rotated: the new current version's age counts, from its creation.
    let mut rotated = store.get("due-by-age").await.unwrap().unwrap();
    rotated.versions[0].state = VersionState::DecryptOnly;
    let mut v2 = version(2, VersionState::Active);
    v2.created_at = 1_700_000_200;
    rotated.versions.push(v2);
    rotated.current_version = 2;
    store.update(&rotated).await.unwrap();
    assert!(due(1_700_000_250).await.iter().all(|(k, _)| k != "due-by-age"), "the new version is not due yet");
    assert!(due(1_700_000_301).await.contains(&("due-by-age".to_owned(), 2)));
    // A period taken away: never due by age again.
    let mut kept = store.get("due-by-age").await.unwrap().unwrap();
    kept.rotation_period_secs = 0;
    store.update(&kept).await.unwrap();
    assert!(due(1_800_000_000).await.iter().all(|(k, _)| k != "due-by-age"));
}

async fn every_write_of_a_key_is_a_numbered_change(store: &dyn KeyStore) {
    let before = store.change_seq().await.unwrap();
    let mut c = key("seq-c");
    store.create(&c).await.unwrap();
    let after_create = store.change_seq().await.unwrap();
    assert!(after_create > before, "a create is a change");
    let (seen, names) = store.changed_since(before).await.unwrap();
    assert_eq!((seen, names), (after_create, vec!["seq-c".to_owned()]));

    // Usage counts are not changes of the key.
    let usage = super::UsageRecord { key: "seq-c".into(), version: 1, wraps: 3, ..Default::default() };
    store.record_usage("seq-batch", std::slice::from_ref(&usage)).await.unwrap();
    assert_eq!(store.change_seq().await.unwrap(), after_create);
    assert_eq!(store.get("seq-c").await.unwrap().unwrap().versions[0].wrap_count, 3);
    // A batch retried after its answer was lost is not applied twice.
    store.record_usage("seq-batch", &[usage]).await.unwrap();
    assert_eq!(store.get("seq-c").await.unwrap().unwrap().versions[0].wrap_count, 3, "a batch applied twice");
    c.min_decryption_version = 1;
    c.labels.insert("x".into(), "y".into());
    store.update(&c).await.unwrap();
    let (seen, names) = store.changed_since(after_create).await.unwrap();
    assert!(seen > after_create);
    assert_eq!(names, vec!["seq-c".to_owned()]);
    let (same, none) = store.changed_since(seen).await.unwrap();
    assert_eq!((same, none.len()), (seen, 0), "nothing changed since");
}

async fn replace_keys_is_all_or_nothing(store: &dyn KeyStore) {
    let mut old = key("r-old");
    old.versions[0].unwrap_count = 5;
    store.create(&old).await.unwrap();
    let stored = store.get("r-old").await.unwrap().unwrap();
    let mut replaced = stored.clone();
    replaced.labels = [("team".to_string(), "payments".to_string())].into();
    replaced.versions[0].state = VersionState::DecryptOnly;
    replaced.versions.push(version(2, VersionState::Active));
    replaced.current_version = 2;
    let write = |record: &KeyRecord, expected| KeyReplacement { record: record.clone(), expected_revision: expected };
    let taken = key("a");
    let failing = [
        write(&replaced, Some(stored.revision)),
        write(&key("r-new"), None),
        // Fails last: a key expected to be new exists.
        write(&taken, None),
    ];
    assert!(matches!(store.replace_keys(&failing).await, Err(StoreError::AlreadyExists(n)) if n == "a"));
    assert_eq!(store.get("r-old").await.unwrap(), Some(stored.clone()), "a failed replace changed a key");
    assert!(store.get("r-new").await.unwrap().is_none(), "a failed replace created a key");
    let stale = [write(&replaced, Some(stored.revision + 7))];
    assert!(matches!(store.replace_keys(&stale).await, Err(StoreError::Conflict(_))));
    let missing = [write(&key("r-missing"), Some(1))];
    assert!(matches!(store.replace_keys(&missing).await, Err(StoreError::NotFound(_))));

    store.replace_keys(&[write(&replaced, Some(stored.revision)), write(&key("r-new"), None)]).await.unwrap();
    let now = store.get("r-old").await.unwrap().unwrap();
    assert_eq!((now.current_version, now.versions.len(), now.revision), (2, 2, stored.revision + 1));
    assert_eq!(now.labels, replaced.labels);
    assert_eq!(now.versions[0].unwrap_count, 5, "usage counts survive a replacement");
    assert!(store.get("r-new").await.unwrap().is_some());
}

async fn create_get_and_duplicate(store: &dyn KeyStore) {
    assert!(store.get("a").await.unwrap().is_none());
    let a = key("a");
    store.create(&a).await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), Some(a.clone()), "a key reads back exactly");
    assert!(matches!(store.create(&a).await, Err(StoreError::AlreadyExists(n)) if n == "a"));
}

async fn update_checks_revision_and_adds_versions(store: &dyn KeyStore) {
    let mut b = key("b");
    store.create(&b).await.unwrap();
    b.versions[0].state = VersionState::DecryptOnly;
    b.versions.push(version(2, VersionState::Active));
    b.current_version = 2;
    b.min_decryption_version = 2;
    b.deletion_allowed = true;
    let stored = store.update(&b).await.unwrap();
    assert_eq!(stored.revision, 2);
    assert_eq!(store.get("b").await.unwrap(), Some(stored.clone()));

    // A writer holding the old revision loses, and changes nothing.
    let mut stale = b.clone();
    stale.versions.push(version(3, VersionState::Active));
    stale.current_version = 3;
    assert!(matches!(store.update(&stale).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.get("b").await.unwrap(), Some(stored.clone()));

    // Destroy: state and erased reference persist.
    let mut destroyed = stored.clone();
    destroyed.versions[0].state = VersionState::Destroyed;
    destroyed.versions[0].backend_ref = BackendRef::default();
    let stored = store.update(&destroyed).await.unwrap();
    let read = store.get("b").await.unwrap().unwrap();
    assert_eq!(read, stored);
    assert!(read.versions[0].backend_ref.0.is_empty());
}

async fn update_of_missing_key_is_not_found(store: &dyn KeyStore) {
    assert!(matches!(store.update(&key("ghost")).await, Err(StoreError::NotFound(n)) if n == "ghost"));
}

async fn load_all_is_in_name_order(store: &dyn KeyStore) {
    for name in ["z", "m"] {
        store.create(&key(name)).await.unwrap();
    }
    let names: Vec<String> = store.load_all().await.unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["a", "b", "m", "z"]);
    let b = store.load_all().await.unwrap().into_iter().find(|k| k.name == "b").unwrap();
    assert_eq!(b.versions.len(), 2);
    // Pages: each key with exactly its own versions, across page limits.
    let first = store.list_page("", 2).await.unwrap();
    assert_eq!(first.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(first[1].versions.len(), 2);
    assert_eq!(first[1].versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
    let second = store.list_page("b", 2).await.unwrap();
    assert_eq!(second.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["m", "z"]);
    assert!(second.iter().all(|k| k.versions.len() == 1));
    assert!(store.list_page("z", 2).await.unwrap().is_empty());
    assert_eq!(store.list_page("a", 1).await.unwrap()[0].name, "b");
}

async fn usage_of_many_keys_in_one_batch(store: &dyn KeyStore) {
    // A batch of many keys (more than one statement's rows), a version twice.
    let many: Vec<KeyRecord> = (0..super::USAGE_ROWS_PER_STATEMENT + 20).map(|i| key(&format!("use-{i:04}"))).collect();
    store
        .replace_keys(
            &many
                .iter()
                .map(|k| super::KeyReplacement { record: k.clone(), expected_revision: None })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let mut rows: Vec<super::UsageRecord> = many
        .iter()
        .enumerate()
        .map(|(i, k)| super::UsageRecord {
            key: k.name.clone(),
            version: 1,
            wraps: i as u64 + 1,
            unwraps: 2,
            last_unwrap_at: 1_700_000_100 + i as i64,
            ..Default::default()
        })
        .collect();
    rows.push(super::UsageRecord {
        key: "use-0007".into(),
        version: 1,
        wraps: 100,
        last_unwrap_at: 1_800_000_000,
        ..Default::default()
    });
    store.record_usage("many-keys", &rows).await.unwrap();
    for (i, k) in many.iter().enumerate() {
        let v = &store.get(&k.name).await.unwrap().unwrap().versions[0];
        let (wraps, last) = if i == 7 { (108, 1_800_000_000) } else { (i as u64 + 1, 1_700_000_100 + i as i64) };
        assert_eq!((v.wrap_count, v.unwrap_count, v.last_unwrap_at), (wraps, 2, last), "{}", k.name);
    }
}
