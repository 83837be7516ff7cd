//! `keybroker rewrap`: the rewrap pass for data (step 2 of a KMS rollout
//! runbook). It walks a directory of sidecar files `{key, version,
//! wrapped_dek[, context]}` (the JSON of `keybroker_client::blob::Sidecar`),
//! rewraps every DEK below its key's current version with BatchRewrap (the
//! DEK never leaves the broker), and rewrites each sidecar atomically
//! (temporary file, fsync, rename: never a half-written sidecar).
//!
//! Progress is appended to a checkpoint file in the directory, so a rerun
//! resumes where the last one stopped; failures worth retrying
//! (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`) are retried with backoff; a summary
//! ends the run (rewrapped, already current, failed with reasons).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keybroker_client::blob::Sidecar;
use keybroker_client::{Client, pb};
use serde::{Deserialize, Serialize};

/// Name of the checkpoint file kept in the walked directory.
pub const CHECKPOINT_FILE: &str = ".keybroker-rewrap.checkpoint";

/// How a rewrap pass runs.
#[derive(Debug, Clone)]
pub struct RewrapOptions {
    /// Directory to walk.
    pub dir: PathBuf,
    /// Sidecar files end with this.
    pub suffix: String,
    /// Sidecars per BatchRewrap call.
    pub batch: usize,
    /// Attempts for an item that failed with a retryable code.
    pub attempts: u32,
    /// Stop after this many files (0 = all); a rerun continues.
    pub max_files: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RewrapSummary {
    /// Sidecars moved to the current version.
    pub rewrapped: u64,
    /// Sidecars already at the current version.
    pub current: u64,
    /// Sidecars finished by an earlier run (from the checkpoint).
    pub from_checkpoint: u64,
    /// Sidecars that could not be rewrapped: path and reason.
    pub failed: Vec<(PathBuf, String)>,
}

impl std::fmt::Display for RewrapSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "rewrapped: {}, already current: {}, done by an earlier run: {}, failed: {}",
            self.rewrapped,
            self.current,
            self.from_checkpoint,
            self.failed.len()
        )?;
        let mut reasons: BTreeMap<&str, Vec<&Path>> = BTreeMap::new();
        for (path, why) in &self.failed {
            reasons.entry(why.as_str()).or_default().push(path);
        }
        for (why, paths) in reasons {
            let shown: Vec<String> = paths.iter().take(5).map(|p| p.display().to_string()).collect();
            writeln!(
                f,
                "  {} x {why}: {}{}",
                paths.len(),
                shown.join(", "),
                if paths.len() > 5 { ", ..." } else { "" }
            )?;
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointLine {
    path: String,
    result: String,
    version: u32,
}

fn walk(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, suffix, out)?;
        } else if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)) {
            out.push(path);
        }
    }
    Ok(())
}

/// Writes `contents` to `path` atomically: a temporary file in the same
/// folder, fsync, rename, fsync of the folder.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("sidecar");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn retryable(code: i32) -> bool {
    code == tonic::Code::Unavailable as i32 || code == tonic::Code::ResourceExhausted as i32
}

/// Runs a rewrap pass over `options.dir` with `client`.
pub async fn rewrap_dir(client: &Client, options: &RewrapOptions) -> Result<RewrapSummary, String> {
    let mut files = Vec::new();
    walk(&options.dir, &options.suffix, &mut files).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    files.sort();
    let checkpoint_path = options.dir.join(CHECKPOINT_FILE);
    let finished: HashSet<String> = std::fs::read_to_string(&checkpoint_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<CheckpointLine>(l).ok())
        .map(|l| l.path)
        .collect();
    let mut checkpoint = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&checkpoint_path)
        .map_err(|e| format!("{}: {e}", checkpoint_path.display()))?;
    let relative = |p: &Path| p.strip_prefix(&options.dir).unwrap_or(p).display().to_string();

    let mut summary = RewrapSummary::default();
    let mut todo = Vec::new();
    for path in files {
        if finished.contains(&relative(&path)) {
            summary.from_checkpoint += 1;
        } else {
            todo.push(path);
        }
    }
    if options.max_files > 0 {
        todo.truncate(options.max_files);
    }
    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(todo.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sidecars  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    // The current version of each key, learnt from the broker's answers:
    // sidecars already there are counted without a call.
    let mut current: HashMap<String, u32> = HashMap::new();
    let record = |checkpoint: &mut std::fs::File, path: &Path, result: &str, version: u32| {
        let line = CheckpointLine { path: relative(path), result: result.to_owned(), version };
        let _ = writeln!(checkpoint, "{}", serde_json::to_string(&line).unwrap_or_default());
    };
    for chunk in todo.chunks(options.batch.max(1)) {
        let mut pending: Vec<(PathBuf, Sidecar)> = Vec::new();
        for path in chunk {
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| Sidecar::from_json(&t).map_err(|e| e.to_string()))
            {
                Ok(sidecar) if current.get(&sidecar.key).is_some_and(|v| *v <= sidecar.version) => {
                    summary.current += 1;
                    record(&mut checkpoint, path, "current", sidecar.version);
                    bar.inc(1);
                }
                Ok(sidecar) => pending.push((path.clone(), sidecar)),
                Err(why) => {
                    summary.failed.push((path.clone(), format!("unreadable sidecar: {why}")));
                    bar.inc(1);
                }
            }
        }
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            let items = pending
                .iter()
                .map(|(_, s)| pb::RewrapRequest {
                    ciphertext: s.wrapped_dek.clone(),
                    context: s.context.clone(),
                    target_key: String::new(),
                })
                .collect();
            let results = match client.data_plane().batch_rewrap(pb::BatchRewrapRequest { items }).await {
                Ok(r) => r.into_inner().results,
                Err(status) if status.code() == tonic::Code::Unavailable && attempt < options.attempts => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    continue;
                }
                Err(status) => {
                    for (path, _) in pending.drain(..) {
                        summary.failed.push((path, format!("{:?}: {}", status.code(), status.message())));
                        bar.inc(1);
                    }
                    break;
                }
            };
            let mut retry = Vec::new();
            for ((path, sidecar), result) in pending.drain(..).zip(results) {
                match result.result {
                    Some(pb::batch_rewrap_result::Result::Ok(new)) => {
                        current.insert(new.key.clone(), new.version);
                        if new.key == sidecar.key && new.version <= sidecar.version {
                            summary.current += 1;
                            record(&mut checkpoint, &path, "current", sidecar.version);
                        } else {
                            let updated =
                                Sidecar { key: new.key, version: new.version, wrapped_dek: new.ciphertext, ..sidecar };
                            match write_atomically(&path, updated.to_json().as_bytes()) {
                                Ok(()) => {
                                    summary.rewrapped += 1;
                                    record(&mut checkpoint, &path, "rewrapped", updated.version);
                                }
                                Err(e) => summary.failed.push((path, format!("writing the sidecar: {e}"))),
                            }
                        }
                        bar.inc(1);
                    }
                    Some(pb::batch_rewrap_result::Result::Error(e))
                        if retryable(e.code) && attempt < options.attempts =>
                    {
                        retry.push((path, sidecar));
                    }
                    Some(pb::batch_rewrap_result::Result::Error(e)) => {
                        let code = tonic::Code::from_i32(e.code);
                        summary.failed.push((path, format!("{code:?}: {}", e.message)));
                        bar.inc(1);
                    }
                    None => {
                        summary.failed.push((path, "empty result from the broker".to_owned()));
                        bar.inc(1);
                    }
                }
            }
            if !retry.is_empty() {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
            }
            pending = retry;
        }
        let _ = checkpoint.sync_data();
    }
    bar.finish_and_clear();
    Ok(summary)
}
