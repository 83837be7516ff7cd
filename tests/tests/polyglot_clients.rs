//! Clients in other languages, generated from proto/, against the real
//! server over mTLS: Python (grpcio-tools stubs) and Node.js (@grpc/grpc-js +
//! @grpc/proto-loader). Each does Wrap -> Unwrap -> Rewrap, sees NOT_FOUND
//! for an unknown key, and opens a ciphertext the Rust client made; Rust then
//! opens theirs.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use keybroker_client::{Client, Context};
use keybroker_tests::{Broker, ctx, require_tool, tempdir};

fn root() -> std::path::PathBuf {
    keybroker_codegen::workspace_root()
}

async fn foreign_ciphertext(client: &Client) -> (Vec<u8>, String) {
    let dek: Vec<u8> = (100u8..132).collect();
    let wrapped = client.wrap("demo", &dek, &ctx(&[("made-by", "rust")])).await.unwrap();
    (dek, base64::engine::general_purpose::STANDARD.encode(wrapped.ciphertext))
}

async fn check_result(client: &Client, stdout: &[u8], lang: &str, rust_dek: &[u8], own_dek: &[u8]) {
    let text = String::from_utf8_lossy(stdout);
    let json: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{lang} printed no JSON ({e}): {text}"));
    assert_eq!(json["wrap_key"], "demo", "{json}");
    assert_eq!(json["wrap_version"], 1, "{json}");
    assert_eq!(json["unwrap_ok"], true, "{json}");
    assert_eq!(json["rewrap_version"], 1, "{json}");
    assert_eq!(json["not_found"], "NOT_FOUND", "{json}");
    assert!(json["not_found_message"].as_str().unwrap().contains("no-such-key"), "{json}");
    let hex: String = rust_dek.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(json["foreign_plaintext_hex"], hex.as_str(), "{lang} could not open the Rust ciphertext");
    let theirs = base64::engine::general_purpose::STANDARD.decode(json["ciphertext_b64"].as_str().unwrap()).unwrap();
    let context: Context = ctx(&[("lang", lang), ("tenant", "acme")]);
    let opened = client.unwrap(&theirs, &context).await.unwrap();
    assert_eq!(opened.plaintext.as_slice(), own_dek, "Rust could not open the {lang} ciphertext");
}

#[tokio::test]
async fn a_python_grpcio_client_wraps_unwraps_and_rewraps() {
    let python = require_tool("python3", "apt-get install -y python3");
    let probe = Command::new(&python).args(["-c", "import grpc, grpc_tools"]).output().unwrap();
    assert!(
        probe.status.success(),
        "Python's grpcio / grpcio-tools are missing: pip install grpcio grpcio-tools (the README's test command \
         installs them)"
    );
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let stubs = dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto = root().join("proto");
    let mut protoc = Command::new(&python);
    protoc.args(["-m", "grpc_tools.protoc", "-I"]).arg(&proto);
    protoc.arg(format!("--python_out={}", stubs.display())).arg(format!("--grpc_python_out={}", stubs.display()));
    for file in keybroker_codegen::PROTO_FILES {
        protoc.arg(proto.join(file));
    }
    let generated = protoc.output().unwrap();
    assert!(generated.status.success(), "grpc_tools.protoc: {}", String::from_utf8_lossy(&generated.stderr));

    let client = Client::mtls(broker.url(), broker.identity("client")).connect().await.unwrap();
    let (rust_dek, foreign) = foreign_ciphertext(&client).await;
    let out = Command::new(&python)
        .arg(root().join("tests/polyglot/python/roundtrip.py"))
        .arg(broker.addr.to_string())
        .arg(broker.data_dir.join("tls"))
        .arg(&stubs)
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(out.status.success(), "python client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    check_result(&client, &out.stdout, "python", &rust_dek, &(0u8..32).collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn a_node_grpc_js_client_wraps_unwraps_and_rewraps() {
    let node = require_tool("node", "apt-get install -y nodejs npm");
    let package = root().join("tests/polyglot/node");
    assert!(
        Path::new(&package.join("node_modules/@grpc/grpc-js")).is_dir()
            && Path::new(&package.join("node_modules/@grpc/proto-loader")).is_dir(),
        "Node packages are missing: run `npm ci` in {} (the README's test command does)",
        package.display()
    );
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let client = Client::mtls(broker.url(), broker.identity("client")).connect().await.unwrap();
    let (rust_dek, foreign) = foreign_ciphertext(&client).await;
    let out = Command::new(node)
        .arg(package.join("roundtrip.js"))
        .arg(broker.addr.to_string())
        .arg(broker.data_dir.join("tls"))
        .arg(root().join("proto"))
        .arg(&foreign)
        .current_dir(&package)
        .output()
        .unwrap();
    assert!(out.status.success(), "node client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let node_dek: Vec<u8> = (0u8..32).map(|i| 255 - i).collect();
    check_result(&client, &out.stdout, "node", &rust_dek, &node_dek).await;
}
