//! `keybroker migrate --from a.toml --to b.toml [PATTERN]`: copies keys
//! between two brokers' configurations offline, as `kes migrate` does (see
//! [`crate::core::copy`] for what a copy carries), and prints a line per key
//! and a summary that lists every skipped key and why.

use std::io::Write;

use crate::core::copy::{Side, commit, plan_copy};
use crate::store::{ConflictMode, KeyRecord};

/// Totals of an offline migration.
#[derive(Debug, Default)]
pub struct OfflineSummary {
    /// Keys copied.
    pub copied: usize,
    /// Keys left as they are in the target, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Keys that failed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// `keybroker migrate --from A --to B [PATTERN]`.
pub async fn migrate(
    from: &Side,
    to: &Side,
    pattern: &str,
    conflict: ConflictMode,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<OfflineSummary, String> {
    let matcher = globset::Glob::new(pattern)
        .map_err(|e| format!("invalid pattern {pattern:?}: {}", e.kind()))?
        .compile_matcher();
    let keys: Vec<KeyRecord> = from
        .store
        .load_all()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|k| matcher.is_match(&k.name))
        .collect();
    let mut summary = OfflineSummary::default();
    let total = keys.len();
    let mut plans = Vec::new();
    let mut lines = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let line = match plan_copy(key, &from.backends, to, conflict, dry_run).await {
            Ok(plan) => {
                if plan.action.starts_with("skipped") {
                    summary.skipped.push((key.name.clone(), plan.action.clone()));
                } else {
                    summary.copied += 1;
                }
                let line = plan.action.clone();
                plans.push(plan);
                line
            }
            Err(e) => {
                summary.failed.push((key.name.clone(), e.message().to_owned()));
                format!("FAILED: {}", e.message())
            }
        };
        lines.push(format!("[{}/{total}] {}: {line}", i + 1, key.name));
    }
    commit(to, &plans).await?;
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{}{} copied, {} skipped, {} failed",
        if dry_run { "dry run: " } else { "" },
        summary.copied,
        summary.skipped.len(),
        summary.failed.len()
    );
    for (key, why) in &summary.skipped {
        let _ = writeln!(out, "  skipped {key}: {}", why.trim_start_matches("skipped: "));
    }
    Ok(summary)
}
