//! `kb-fleet`: what a fleet on PostgreSQL costs and how fast it agrees,
//! against real processes (the harness of `tests/`): Wrap throughput of a
//! broker on PostgreSQL against one on SQLite in the same run (kb-loadgen,
//! interleaved rounds), the database load one idle broker adds (statements
//! per second, from PostgreSQL's statement log), and the propagation delay
//! of 100 rotations to a second broker, on PostgreSQL and on one SQLite
//! file. Prints a Markdown section for BENCHMARKS.md (`bench/fleet.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keybroker_client::pb;
use keybroker_tests::{Broker, Postgres, config_with_backends, config_with_postgres, dev_pki, tempdir};

const ROUNDS: usize = 3;

fn loadgen(broker: &Broker, dev: &Path, label: &str, seconds: u64, json: &Path) {
    let bin = std::env::current_exe().unwrap().parent().unwrap().join("kb-loadgen");
    let mut command = if Path::new("/usr/bin/taskset").is_file() {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let status = command
        .args(["--url", &broker.url(), "--dev-dir", dev.to_str().unwrap(), "--rpc", "wrap", "--concurrency", "64"])
        .args(["--duration", &seconds.to_string(), "--label", label, "--server-pid", &broker.pid().to_string()])
        .args(["--json", json.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "kb-loadgen failed");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Rotates `key` through `first` `n` times; after each, polls `second`
/// with Wrap until it wraps under the new version. Returns the delays.
async fn propagation(first: &Broker, second: &Broker, key: &str, n: usize) -> Vec<Duration> {
    let mut admin = first.admin().await;
    let mut app = second.app().await;
    let mut delays = Vec::with_capacity(n);
    for _ in 0..n {
        let rotated = admin.rotate(pb::RotateRequest { key: key.into(), ..Default::default() }).await.unwrap();
        let version = rotated.into_inner().current_version;
        let started = Instant::now();
        loop {
            let request = pb::WrapRequest { key: key.into(), plaintext: vec![1; 32], ..Default::default() };
            if app.wrap(request).await.unwrap().into_inner().version == version {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "a rotation never reached the second broker");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    delays
}

fn describe(delays: &[Duration]) -> String {
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        percentile(delays, 0.5).as_secs_f64() * 1e3,
        percentile(delays, 0.9).as_secs_f64() * 1e3,
        delays[delays.len() - 1].as_secs_f64() * 1e3
    )
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("DURATION").ok().and_then(|d| d.parse().ok()).unwrap_or(10);
    let pg = Postgres::start();
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let sqlite_dir: PathBuf = dir.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir).unwrap();
    let sqlite_config = config_with_backends(&sqlite_dir, &dev, "local", "");
    let pg_dir = dir.path().join("pg");
    std::fs::create_dir_all(&pg_dir).unwrap();
    let pg_config = config_with_postgres(&pg_dir, &dev, &pg.url(), "", "");
    // Audit lines off, as in bench/run.sh.
    let env = [("KEYBROKER_LOG", "warn")];
    let on_sqlite = Broker::start(&["serve", "--config", sqlite_config.to_str().unwrap()], &env, &dev);
    let on_pg = Broker::start(&["serve", "--config", pg_config.to_str().unwrap()], &env, &dev);
    for broker in [&on_sqlite, &on_pg] {
        let request = pb::CreateKeyRequest { key: "demo".into(), ..Default::default() };
        broker.admin().await.create_key(request).await.unwrap();
    }

    // 1. Wrap throughput, interleaved rounds.
    let json = dir.path().join("load.jsonl");
    for round in 1..=ROUNDS {
        eprintln!("round {round}/{ROUNDS}");
        loadgen(&on_sqlite, &dev, "sqlite", seconds, &json);
        loadgen(&on_pg, &dev, "postgres", seconds, &json);
    }
    let mut rates: std::collections::BTreeMap<String, Vec<(f64, f64, f64)>> = Default::default();
    for line in std::fs::read_to_string(&json).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        rates.entry(v["label"].as_str().unwrap().to_owned()).or_default().push((
            v["requests_per_second"].as_f64().unwrap(),
            v["p99_us"].as_f64().unwrap(),
            v["server_cpu_us_per_request"].as_f64().unwrap_or(0.0),
        ));
    }
    let summary = |label: &str| {
        let runs = &rates[label];
        (
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect()),
            median(runs.iter().map(|r| r.2).collect()),
        )
    };
    let (sqlite_rps, sqlite_p99, sqlite_cpu) = summary("sqlite");
    let (pg_rps, pg_p99, pg_cpu) = summary("postgres");

    // 2. The database load of one idle broker.
    drop(on_sqlite);
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.log_statements();
    let mark = pg.log().len();
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    let statements =
        pg.log()[mark..].matches(" LOG:  execute ").count() + pg.log()[mark..].matches(" LOG:  statement: ").count();
    let per_second = statements as f64 / idle.as_secs_f64();

    // 3. Propagation: 100 rotations to a second broker, on each store.
    let second_pg = Broker::start(&["serve", "--config", pg_config.to_str().unwrap()], &env, &dev);
    let pg_delays = propagation(&on_pg, &second_pg, "demo", 100).await;
    let sqlite_a = Broker::start(&["serve", "--config", sqlite_config.to_str().unwrap()], &env, &dev);
    let sqlite_b = Broker::start(&["serve", "--config", sqlite_config.to_str().unwrap()], &env, &dev);
    let sqlite_delays = propagation(&sqlite_a, &sqlite_b, "demo", 100).await;

    println!("<!-- fleet:start -->");
    println!("## Fleet (PostgreSQL store)\n");
    println!(
        "Produced by `DURATION={seconds} bench/fleet.sh` (kb-fleet: real broker processes, a PostgreSQL 15 server of its \
         own started with initdb, kb-loadgen on core 1 at 64 in flight over 4 connections, median of {ROUNDS} \
         interleaved rounds).\n"
    );
    println!("| store | Wrap req/s | p99 µs | server CPU µs/req |");
    println!("|---|---|---|---|");
    println!("| SQLite (one file) | {sqlite_rps:.0} | {sqlite_p99:.0} | {sqlite_cpu:.1} |");
    println!("| PostgreSQL | {pg_rps:.0} | {pg_p99:.0} | {pg_cpu:.1} |");
    println!(
        "\nPostgreSQL / SQLite Wrap throughput: {:.2}x. The hot path reads the key from the broker's cache and never \
         touches the database; wrap counts are flushed in batches.\n",
        pg_rps / sqlite_rps
    );
    println!(
        "Database load of one idle broker: {statements} statements in {} s = {per_second:.1} per second (the change \
         poll every 500 ms, the due-rotation check every second, the unfinished-jobs check).\n",
        idle.as_secs()
    );
    println!(
        "Propagation of 100 rotations from one broker to another (time until the second wraps under the new version):\n"
    );
    println!("- PostgreSQL (LISTEN/NOTIFY, 500 ms poll as fallback): {}", describe(&pg_delays));
    println!("- one SQLite file shared by two brokers (500 ms poll): {}", describe(&sqlite_delays));
    println!("<!-- fleet:end -->");
}
