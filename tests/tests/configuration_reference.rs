//! The configuration reference (docs/CONFIGURATION.md) is generated from
//! the configuration types and kept fresh; `keybroker serve --check-config`
//! checks a file and shows the effective configuration without secrets.

use std::process::Command;

use keybroker_tests::{config_with_postgres, dev_pki, keybroker_bin, tempdir};

#[test]
fn the_committed_configuration_reference_is_fresh() {
    let path = keybroker_codegen::workspace_root().join("docs/CONFIGURATION.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = keybroker_server::tools::config_reference::markdown();
    assert!(
        committed == generated,
        "{} is stale: run `cargo run -p keybroker-server -- config-reference > docs/CONFIGURATION.md`",
        path.display()
    );
    // Every setting the README's examples and the code rely on is there.
    for setting in ["store.url", "propagation_interval_ms", "usage_flush_interval_ms", "limits.max_wraps_per_version"] {
        assert!(generated.contains(&format!("| `{setting}` |")), "{setting} missing from the reference");
    }
}

#[test]
fn check_config_validates_a_file_and_shows_it_without_secrets() {
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let url = "postgres://kb:Very-Secret-Pw-9@127.0.0.1:5432/kb";
    let config = config_with_postgres(dir.path(), &dev, url, "propagation_interval_ms = 250", "");
    let out =
        Command::new(keybroker_bin()).args(["serve", "--check-config", config.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("valid") && stdout.contains("propagation_interval_ms = 250"), "{stdout}");
    assert!(stdout.contains("postgres://kb:***@127.0.0.1:5432/kb") && !stdout.contains("Very-Secret-Pw-9"), "{stdout}");

    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("propagation_interval_ms = 250", "propagation_interval_ms = 0"),
    )
    .unwrap();
    let out =
        Command::new(keybroker_bin()).args(["serve", "--check-config", config.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("propagation_interval_ms"), "{stderr}");
}
