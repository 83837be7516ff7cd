//! The Helm chart with the real Helm engine (helm-python-sdk) and the
//! Kubernetes 1.31 schemas (kubernetes-validate): lint, a matrix of value
//! sets rendered and validated, the container checked against the
//! configuration it gets (which `keybroker serve --check-config` accepts),
//! the sidecar example chart, schema refusals, and the Dockerfile against
//! the chart. The checks are in tests/helm/check_chart.py.

use std::process::Command;

use keybroker_tests::{dev_pki, keybroker_bin, tempdir};

#[test]
fn the_chart_renders_valid_manifests_that_agree_with_keybroker() {
    let probe = Command::new("python3").args(["-c", "import helm_python, kubernetes_validate, yaml"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the Helm engine or the Kubernetes schemas are missing: pip install helm-python-sdk kubernetes-validate pyyaml \
         (the README's test command installs them): {probe:?}"
    );
    let dir = tempdir();
    let dev = dev_pki(dir.path());
    let root = keybroker_codegen::workspace_root();
    let out = Command::new("python3")
        .arg(root.join("tests/helm/check_chart.py"))
        .arg(&root)
        .arg(keybroker_bin())
        .arg(&dev)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("checks passed"), "{stdout}");
}
