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

use std::collections::{BTreeMap, HashMap};
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

/// One line of the checkpoint: a sidecar this pass rewrote, and the key
/// and version it rewrote it to. A checkpoint belongs to a pass, that is to
/// a (key, target version): a line only lets a resumed pass skip a file
/// whose sidecar still names that key and version and whose key is still at
/// that version. The sidecar's own version stays the truth; a pass after a
/// rotation rewraps everything below the new current version.
#[derive(Serialize, Deserialize)]
struct CheckpointLine {
    path: String,
    #[serde(default)]
    key: String,
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

/// Writes each `(path, contents)` atomically and durably, as
/// [`write_atomically`] does, with two filesystem syncs for the whole set
/// instead of two fsyncs per file: every file is written to a temporary
/// file beside its sidecar; one `syncfs` makes them all durable; each is
/// renamed over its sidecar (atomic: a reader sees the old or the new one);
/// a second `syncfs` makes the renames durable before any result is
/// returned. A crash at any point leaves every sidecar old or new, never
/// partial (at worst a stray temporary file).
pub fn write_atomically_many(writes: &[(PathBuf, Vec<u8>)]) -> Vec<std::io::Result<()>> {
    let Some((first, _)) = writes.first() else { return Vec::new() };
    let tmp_of = |path: &Path| {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("sidecar");
        path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    };
    let mut results: Vec<std::io::Result<()>> = writes
        .iter()
        .map(|(path, contents)| std::fs::File::create(tmp_of(path)).and_then(|mut f| f.write_all(contents)))
        .collect();
    let sync = |what: &str| -> std::io::Result<()> {
        let folder = std::fs::File::open(first.parent().unwrap_or(Path::new(".")))?;
        rustix::fs::syncfs(&folder).map_err(|e| std::io::Error::other(format!("syncing the filesystem {what}: {e}")))
    };
    if let Err(e) = sync("before the renames") {
        return writes.iter().map(|_| Err(std::io::Error::new(e.kind(), e.to_string()))).collect();
    }
    for (result, (path, _)) in results.iter_mut().zip(writes) {
        if result.is_ok() {
            *result = std::fs::rename(tmp_of(path), path);
        }
    }
    if let Err(e) = sync("after the renames") {
        return writes.iter().map(|_| Err(std::io::Error::new(e.kind(), e.to_string()))).collect();
    }
    results
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

/// What the pass knows of each file it walks.
struct Pass<'a> {
    options: &'a RewrapOptions,
    client: &'a Client,
    /// Rewritten in an earlier run: relative path -> (key, version).
    checkpoint: HashMap<String, (String, u32)>,
    journal: std::fs::File,
    /// The current version of each key, learnt from the broker's answers in
    /// this run (never from the checkpoint, which may predate a rotation).
    current: HashMap<String, u32>,
    summary: RewrapSummary,
    bar: indicatif::ProgressBar,
}

impl Pass<'_> {
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.options.dir).unwrap_or(path).display().to_string()
    }

    fn record(&mut self, path: &Path, key: &str, result: &str, version: u32) {
        let line =
            CheckpointLine { path: self.relative(path), key: key.to_owned(), result: result.to_owned(), version };
        let _ = writeln!(self.journal, "{}", serde_json::to_string(&line).unwrap_or_default());
    }

    /// Counts a sidecar found at its key's current version: done by an
    /// earlier run of this pass when the checkpoint says so, else current.
    fn count_current(&mut self, path: &Path, sidecar: &Sidecar) {
        let relative = self.relative(path);
        if self.checkpoint.get(&relative).is_some_and(|(k, v)| *k == sidecar.key && *v == sidecar.version) {
            self.summary.from_checkpoint += 1;
        } else {
            self.summary.current += 1;
            self.record(path, &sidecar.key, "current", sidecar.version);
        }
        self.bar.inc(1);
    }

    fn fail(&mut self, path: PathBuf, why: String) {
        self.summary.failed.push((path, why));
        self.bar.inc(1);
    }

    fn is_current(&self, sidecar: &Sidecar) -> bool {
        self.current.get(&sidecar.key).is_some_and(|v| *v <= sidecar.version)
    }

    /// Rewraps `pending` with BatchRewrap, retrying what failed with a
    /// retryable code, and rewrites each sidecar that moved.
    async fn rewrap(&mut self, mut pending: Vec<(PathBuf, Sidecar)>) {
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
            let results = match self.client.data_plane().batch_rewrap(pb::BatchRewrapRequest { items }).await {
                Ok(r) => r.into_inner().results,
                Err(status) if retryable(status.code() as i32) && attempt < self.options.attempts => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    continue;
                }
                Err(status) => {
                    for (path, _) in pending.drain(..) {
                        self.fail(path, format!("{:?}: {}", status.code(), status.message()));
                    }
                    return;
                }
            };
            if results.len() != pending.len() {
                for (path, _) in pending.drain(..) {
                    self.fail(path, "the broker answered a different number of items".to_owned());
                }
                return;
            }
            let mut retry = Vec::new();
            let mut writes: Vec<(PathBuf, Sidecar)> = Vec::new();
            for ((path, sidecar), result) in pending.drain(..).zip(results) {
                match result.result {
                    Some(pb::batch_rewrap_result::Result::Ok(new)) => {
                        self.current.insert(new.key.clone(), new.version);
                        if new.key == sidecar.key && new.version <= sidecar.version {
                            self.count_current(&path, &sidecar);
                            continue;
                        }
                        writes.push((
                            path,
                            Sidecar { key: new.key, version: new.version, wrapped_dek: new.ciphertext, ..sidecar },
                        ));
                    }
                    Some(pb::batch_rewrap_result::Result::Error(e))
                        if retryable(e.code) && attempt < self.options.attempts =>
                    {
                        retry.push((path, sidecar));
                    }
                    Some(pb::batch_rewrap_result::Result::Error(e)) => {
                        let code = tonic::Code::from_i32(e.code);
                        self.fail(path, format!("{code:?}: {}", e.message));
                    }
                    None => self.fail(path, "empty result from the broker".to_owned()),
                }
            }
            // The batch's sidecars are written together, each atomically, and
            // all durable before any is recorded as done.
            let contents: Vec<(PathBuf, Vec<u8>)> =
                writes.iter().map(|(path, s)| (path.clone(), s.to_json().into_bytes())).collect();
            for ((path, updated), written) in writes.into_iter().zip(write_atomically_many(&contents)) {
                match written {
                    Ok(()) => {
                        self.summary.rewrapped += 1;
                        self.record(&path, &updated.key, "rewrapped", updated.version);
                        self.bar.inc(1);
                    }
                    Err(e) => self.fail(path, format!("writing the sidecar: {e}")),
                }
            }
            if !retry.is_empty() {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
            }
            pending = retry;
        }
    }

    /// Handles one chunk of files. A key whose current version this run has
    /// not learnt yet is probed with one of its sidecars first, so files
    /// already at the current version cost no call.
    async fn chunk(&mut self, chunk: &[PathBuf], budget: &mut usize) {
        let mut unknown: Vec<(PathBuf, Sidecar)> = Vec::new();
        for path in chunk {
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| Sidecar::from_json(&t).map_err(|e| e.to_string()))
            {
                Ok(sidecar) => unknown.push((path.clone(), sidecar)),
                Err(why) => self.fail(path.clone(), format!("unreadable sidecar: {why}")),
            }
        }
        let mut probes = Vec::new();
        let mut rest = Vec::new();
        for item in unknown {
            let probing = probes.iter().any(|(_, s): &(PathBuf, Sidecar)| s.key == item.1.key);
            if self.current.contains_key(&item.1.key) || probing {
                rest.push(item);
            } else {
                probes.push(item);
            }
        }
        if !probes.is_empty() {
            *budget = budget.saturating_sub(probes.len());
            self.rewrap(probes).await;
        }
        let mut pending = Vec::new();
        for (path, sidecar) in rest {
            if self.is_current(&sidecar) {
                self.count_current(&path, &sidecar);
            } else if *budget > 0 {
                *budget -= 1;
                pending.push((path, sidecar));
            }
        }
        self.rewrap(pending).await;
        let _ = self.journal.sync_data();
    }
}

/// Runs a rewrap pass over `options.dir` with `client`.
pub async fn rewrap_dir(client: &Client, options: &RewrapOptions) -> Result<RewrapSummary, String> {
    let mut files = Vec::new();
    walk(&options.dir, &options.suffix, &mut files).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    files.sort();
    let checkpoint_path = options.dir.join(CHECKPOINT_FILE);
    let checkpoint: HashMap<String, (String, u32)> = std::fs::read_to_string(&checkpoint_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<CheckpointLine>(l).ok())
        .map(|l| (l.path, (l.key, l.version)))
        .collect();
    let journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&checkpoint_path)
        .map_err(|e| format!("{}: {e}", checkpoint_path.display()))?;
    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(files.len() as u64);
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
    let mut pass =
        Pass { options, client, checkpoint, journal, current: HashMap::new(), summary: RewrapSummary::default(), bar };
    // `max_files` bounds the sidecars sent to the broker, not the ones
    // found already current: a rerun continues where this one stopped.
    let mut budget = if options.max_files == 0 { usize::MAX } else { options.max_files };
    for chunk in files.chunks(options.batch.max(1)) {
        if budget == 0 {
            break;
        }
        pass.chunk(chunk, &mut budget).await;
    }
    pass.bar.finish_and_clear();
    Ok(pass.summary)
}
