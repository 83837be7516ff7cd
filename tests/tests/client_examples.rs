//! The client crate's examples run against `keybroker dev` as their docs say.

use std::process::Command;

use keybroker_tests::{Broker, tempdir};

fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|deps| deps.parent()).unwrap().join("examples").join(name);
    assert!(bin.is_file(), "{} is missing: cargo build --workspace --all-targets", bin.display());
    bin
}

#[tokio::test]
async fn the_client_examples_work_against_keybroker_dev() {
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let dev_dir = broker.data_dir.display().to_string();

    let out = Command::new(example("wrap_unwrap")).args([&broker.url(), &dev_dir]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrap_unwrap: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wrapped under demo v1") && stdout.contains("unknown key"), "{stdout}");

    let input = dir.path().join("notes.txt");
    let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&input, &text).unwrap();
    let out = Command::new(example("seal_blob")).arg(&input).args([&broker.url(), &dev_dir]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "seal_blob: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("identical"), "{stdout}");
    let sealed = std::fs::read(dir.path().join("notes.kbb")).unwrap();
    assert!(!sealed.windows(10).any(|w| w == b"line 1234\n"), "plaintext visible in the sealed file");
    let sidecar = std::fs::read_to_string(dir.path().join("notes.kbb.sidecar.json")).unwrap();
    assert!(sidecar.starts_with(r#"{"key":"demo","version":1,"wrapped_dek":""#), "{sidecar}");
}
