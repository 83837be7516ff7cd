//! The Grafana dashboard and the Prometheus alert rules under `deploy/`
//! parse, every alert is complete, the alerts the runbooks ask for exist,
//! and every metric they reference is in a real scrape of the broker.

use std::collections::BTreeSet;

use keybroker_client::pb;
use keybroker_tests::{Broker, tempdir};

/// Every `keybroker_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("keybroker_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric families a scrape declares (`# TYPE name kind`).
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn declared(families: &BTreeSet<String>, name: &str) -> bool {
    families.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|base| families.contains(base)))
}

#[tokio::test]
async fn dashboards_and_alerts_reference_only_real_metrics() {
    let root = keybroker_codegen::workspace_root();
    let alerts: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/keybroker-alerts.yaml")).unwrap(),
    )
    .unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("deploy/grafana/keybroker-dashboard.json")).unwrap())
            .unwrap();

    let mut exprs = Vec::new();
    let mut alert_names = Vec::new();
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("every rule is an alert with a name");
            assert!(matches!(rule["labels"]["severity"].as_str(), Some("critical" | "warning")), "{name}: severity");
            assert!(rule["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()), "{name}: summary");
            assert!(rule["annotations"]["description"].as_str().is_some_and(|s| !s.is_empty()), "{name}: description");
            exprs.push((name.to_owned(), rule["expr"].as_str().unwrap().to_owned()));
            alert_names.push(name.to_owned());
        }
    }
    for wanted in [
        "KeybrokerUnwrapErrors",
        "KeybrokerBackendDown",
        "KeybrokerKeyRotationOverdue",
        "KeybrokerWrapCountNearLimit",
        "KeybrokerMigrationStalled",
        "KeybrokerAuditSinkFailing",
    ] {
        assert!(alert_names.iter().any(|a| a == wanted), "no {wanted} alert");
    }
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push((panel["title"].as_str().unwrap().to_owned(), target["expr"].as_str().unwrap().to_owned()));
        }
    }

    // A broker that has served a little, so every family has been declared.
    let dir = tempdir();
    let broker = Broker::start_dev(&dir.path().join("kb"));
    let mut app = broker.app().await;
    let wrapped = app
        .wrap(pb::WrapRequest { key: "demo".into(), plaintext: vec![1; 32], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    app.unwrap(pb::UnwrapRequest { ciphertext: wrapped.ciphertext, ..Default::default() }).await.unwrap();
    let (status, scrape) = broker.http_get("/metrics");
    assert_eq!(status, 200);
    let families = families(&scrape);
    let mut referenced = BTreeSet::new();
    for (where_, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{where_}: references no keybroker metric: {expr}");
        for name in names {
            assert!(declared(&families, &name), "{where_} references {name}, which the broker does not export");
            referenced.insert(name);
        }
    }
    println!("{} metrics referenced by {} expressions, all exported", referenced.len(), exprs.len());
}
