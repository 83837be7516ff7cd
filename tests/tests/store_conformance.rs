//! One conformance suite for the `KeyStore` trait, run unchanged against
//! the SQLite file and a real PostgreSQL server; and the PostgreSQL URL's
//! password never shows.

use std::time::Duration;

use keybroker_server::config::DatabaseUrl;
use keybroker_server::store::conformance::run_all;
use keybroker_server::store::postgres::PostgresStore;
use keybroker_server::store::sqlite::SqliteStore;
use keybroker_tests::{POSTGRES_TEST_PASSWORD, Postgres, tempdir};

#[tokio::test]
async fn sqlite_passes_the_store_conformance_suite() {
    let dir = tempdir();
    run_all(&SqliteStore::open(&dir.path().join("kb.sqlite")).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_passes_the_store_conformance_suite() {
    let pg = Postgres::start();
    let url = DatabaseUrl::new(pg.url());
    let store = PostgresStore::open(&url, 4, Duration::from_secs(2)).await.unwrap();
    run_all(&store).await;
    // A second broker opening the same database finds the schema in place.
    PostgresStore::open(&url, 2, Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn the_postgres_password_never_shows() {
    let pg = Postgres::start();
    let url = DatabaseUrl::new(pg.url());
    for shown in [format!("{url:?}"), url.to_string(), url.redacted()] {
        assert!(!shown.contains(POSTGRES_TEST_PASSWORD) && shown.contains("kb:***@127.0.0.1"), "{shown}");
    }
    // A wrong password: the error names the server, not the password.
    let wrong = DatabaseUrl::new(pg.url().replace(POSTGRES_TEST_PASSWORD, "Wrong-Pass-123"));
    let err = PostgresStore::open(&wrong, 1, Duration::from_secs(2)).await.unwrap_err().to_string();
    assert!(err.contains("127.0.0.1") && err.contains("password"), "{err}");
    assert!(!err.contains("Wrong-Pass-123"), "{err}");
    // Nothing listening: unavailable, quickly.
    pg.stop_server();
    let started = std::time::Instant::now();
    let err = PostgresStore::open(&url, 1, Duration::from_secs(1)).await.unwrap_err().to_string();
    assert!(err.contains("PostgreSQL at") && !err.contains(POSTGRES_TEST_PASSWORD), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
