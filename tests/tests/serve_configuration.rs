//! `keybroker serve --config FILE`: settings from the file and from
//! KEYBROKER_* variables, and a bad setting fails at start naming it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keybroker_tests::{Broker, pb, tempdir};

/// Runs `keybroker dev` once so `dir` holds a PKI, a root key and a table
/// with the demo key; returns a ciphertext made by it.
async fn prepared(dir: &Path) -> Vec<u8> {
    let mut broker = Broker::start_dev(dir);
    let ciphertext = broker
        .app()
        .await
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![5; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let started = std::time::Instant::now();
    assert_eq!(broker.terminate().await, Some(0), "SIGTERM is a clean stop");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
    ciphertext
}

fn config_text(listen: &str, root_key: Option<&str>) -> String {
    let root = root_key.map(|f| format!("[root_key]\nfile = \"{f}\"\n")).unwrap_or_default();
    format!(
        r#"listen = "{listen}"
{root}
[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"

[store]
type = "sqlite"
path = "keybroker.sqlite"

[auth]
admin_identities = ["spiffe://keybroker.dev/admin"]
app_identities = ["spiffe://keybroker.dev/app"]
"#
    )
}

#[tokio::test]
async fn serve_reads_the_file_and_environment_overrides() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let ciphertext = prepared(&data).await;
    let config = data.join("serve.toml");
    // Port 1 is not ours to bind: only the environment override makes it start.
    std::fs::write(&config, config_text("127.0.0.1:1", Some("root.key"))).unwrap();
    let args = ["serve", "--config", config.to_str().unwrap()];
    let broker = Broker::start(&args, &[("KEYBROKER_LISTEN", "127.0.0.1:0")], &data);
    let opened = broker
        .app()
        .await
        .unwrap(pb::UnwrapRequest { ciphertext: ciphertext.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, vec![5; 32]);
    drop(broker);

    // The root key from KEYBROKER_ROOT_KEY instead of a file.
    std::fs::write(&config, config_text("127.0.0.1:0", None)).unwrap();
    let secret = std::fs::read_to_string(data.join("root.key")).unwrap();
    let broker = Broker::start(&args, &[("KEYBROKER_ROOT_KEY", secret.trim())], &data);
    let opened = broker.app().await.unwrap(pb::UnwrapRequest { ciphertext, ..Default::default() }).await.unwrap();
    assert_eq!(opened.into_inner().plaintext, vec![5; 32]);
    assert!(!broker.stderr().contains(secret.trim()), "the root key reached the log");
    // Nor does it stay in the process environment, where /proc shows it.
    let environ = std::fs::read(format!("/proc/{}/environ", broker.pid())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(secret.trim()), "KEYBROKER_ROOT_KEY is readable in /proc/PID/environ");

    // Limits from the environment apply.
    drop(broker);
    let broker = Broker::start(
        &args,
        &[("KEYBROKER_ROOT_KEY", secret.trim()), ("KEYBROKER_LIMITS__MAX_PLAINTEXT_BYTES", "16")],
        &data,
    );
    let err = broker
        .app()
        .await
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 17], ..Default::default() })
        .await
        .unwrap_err();
    assert!(err.message().contains("limit is 16"), "{}", err.message());
}

#[tokio::test]
async fn bad_settings_fail_at_start_naming_the_setting() {
    let dir = tempdir();
    let data = dir.path().join("kb");
    let _ = prepared(&data).await;
    let config = data.join("serve.toml");
    let args = ["serve", "--config", config.to_str().unwrap()];
    let fails = |text: String, env: &[(&str, &str)], needles: &[&str]| {
        std::fs::write(&config, text).unwrap();
        let failure = match Broker::try_start(&args, env, &data) {
            Ok(_) => panic!("started despite a bad setting; expected {needles:?}"),
            Err(failure) => failure,
        };
        assert_eq!(failure.code, Some(2), "{failure}");
        assert_eq!(failure.stderr.trim_end().lines().count(), 1, "one line, no stray one: {}", failure.stderr);
        for needle in needles {
            assert!(failure.stderr.contains(needle), "{needle:?} not in: {}", failure.stderr);
        }
    };
    let good = config_text("127.0.0.1:0", Some("root.key"));
    fails(
        good.clone(),
        &[("KEYBROKER_LIMITS__MAX_PLAINTEXT_BYTES", "lots")],
        &["limits.max_plaintext_bytes", "KEYBROKER_LIMITS__MAX_PLAINTEXT_BYTES"],
    );
    fails(format!("colour = \"blue\"\n{good}"), &[], &["colour"]);
    fails(good.replace("tls/server.pem", "tls/nope.pem"), &[], &["tls.cert", "nope.pem"]);
    fails(good.replace("127.0.0.1:0", "localhost-ish"), &[], &["listen"]);
    fails(config_text("127.0.0.1:0", None), &[], &["KEYBROKER_ROOT_KEY", "root_key.file"]);
    fails(good.clone(), &[("KEYBROKER_LOG", "[[[")], &["log"]);
    fails(good.clone(), &[("KEYBROKER_HEALTH_CHECK_INTERVAL_MS", "0")], &["health_check_interval_ms", "at least 1"]);

    // An HSM PIN file others can read is refused, like the root key file.
    let pin = data.join("hsm.pin");
    std::fs::write(&pin, "1234\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let with_hsm = format!(
        "{good}\n[backends.local]\ntype = \"local\"\n\n[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"kb\"\npin_file = \"{}\"\n",
        keybroker_tests::SOFTHSM_MODULE,
        pin.display()
    );
    fails(with_hsm, &[], &["backends.hsm.pin_file", "chmod 600"]);

    // Without a configuration file the message says how to give one.
    let failure = match Broker::try_start(&["serve"], &[], &data) {
        Ok(_) => panic!("started without a configuration"),
        Err(failure) => failure,
    };
    assert!(failure.stderr.contains("pass --config FILE or set KEYBROKER_CONFIG"), "{}", failure.stderr);
    // A port in use is reported once, naming the setting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(&config, good.clone()).unwrap();
    let failure = match Broker::try_start(&args, &[("KEYBROKER_LISTEN", &format!("127.0.0.1:{port}"))], &data) {
        Ok(_) => panic!("started on a port in use"),
        Err(failure) => failure,
    };
    assert!(failure.stderr.contains("invalid setting `listen`"), "{}", failure.stderr);
    assert_eq!(failure.stderr.matches("Address already in use").count(), 1, "{}", failure.stderr);
    drop(taken);

    // A root key file others can read is refused.
    let root = data.join("root.key");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails(good.clone(), &[], &["root.key", "chmod 600"]);
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Another root key cannot open the stored KEKs: refuse to start.
    let other = data.join("other.key");
    std::fs::write(&other, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    fails(config_text("127.0.0.1:0", Some("other.key")), &[], &["root key does not open", "wrong root key"]);
}
