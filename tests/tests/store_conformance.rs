//! One conformance suite for the `KeyStore` trait, run unchanged against
//! the SQLite file and a real PostgreSQL server; and the PostgreSQL URL's
//! password never shows.

use std::time::Duration;

use keybroker_server::config::DatabaseUrl;
use keybroker_server::store::conformance::{rows_before_the_move, run_all, usage_counts_carried_over_by_the_move};
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
    usage_counts_move_to_their_own_table_with_the_migration(&pg).await;
}

/// A database written before usage counts had their own table keeps every
/// count through the migration, and flushes add to them afterwards.
async fn usage_counts_move_to_their_own_table_with_the_migration(pg: &Postgres) {
    let url = pg.new_database("before_usage_table");
    let dir = tempdir();
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/migrations/postgres");
    for name in ["0001_version_table.sql", "0002_job_lease.sql", "0003_usage_batches.sql"] {
        std::fs::copy(all.join(name), dir.path().join(name)).unwrap();
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(dir.path()).await.unwrap().run(&pool).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(rows_before_the_move(|b| format!("'\\x{b:02x}'")))).execute(&pool).await.unwrap();
    pool.close().await;

    let store = PostgresStore::open(&DatabaseUrl::new(url), 2, Duration::from_secs(2)).await.unwrap();
    usage_counts_carried_over_by_the_move(&store).await;
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
