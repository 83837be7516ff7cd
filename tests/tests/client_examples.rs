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

    let out =
        Command::new(example("wrap_unwrap")).arg(broker.url()).env("KEYBROKER_DEV_DIR", &dev_dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrap_unwrap: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wrapped under demo v1") && stdout.contains("unknown key"), "{stdout}");

    let input = dir.path().join("notes.txt");
    let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&input, &text).unwrap();
    let output = dir.path().join("out").join("notes.txt.kbb");
    std::fs::create_dir_all(output.parent().unwrap()).unwrap();
    let seal = |input: &std::path::Path| {
        Command::new(example("seal_blob"))
            .arg(input)
            .arg(&output)
            .arg(broker.url())
            .env("KEYBROKER_DEV_DIR", &dev_dir)
            .output()
            .unwrap()
    };
    let out = seal(&input);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "seal_blob: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("identical"), "{stdout}");
    let sealed = std::fs::read(&output).unwrap();
    assert!(!sealed.windows(10).any(|w| w == b"line 1234\n"), "plaintext visible in the sealed file");
    let sidecar = std::fs::read_to_string(dir.path().join("out/notes.txt.kbb.sidecar.json")).unwrap();
    assert!(sidecar.starts_with(r#"{"key":"demo","version":1,"wrapped_dek":""#), "{sidecar}");
    // It never overwrites, and an error names the file.
    let out = seal(&input);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("notes.txt.kbb") && stderr.contains("exists"), "{stderr}");
    assert_eq!(std::fs::read(&output).unwrap(), sealed, "the sealed file was overwritten");
    let out = seal(&dir.path().join("missing.txt"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing.txt"), "{stderr}");
}
