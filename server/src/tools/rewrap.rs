//! `keybroker rewrap`: the rewrap pass for data (step 2 of a KMS rollout
//! runbook). It walks a directory of sidecar files `{key, version,
//! wrapped_dek[, context]}` (the JSON of `keybroker_client::blob::Sidecar`),
//! rewraps every DEK below its key's current version with BatchRewrap (the
//! DEK never leaves the broker), and rewrites each sidecar atomically
//! (temporary file, filesystem sync, atomic swap: never a half-written
//! sidecar; see [`SidecarWriter`]).
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

/// Finds the sidecars under `dir`, and the temporary files a pass that
/// crashed left (`stale`).
fn walk(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>, stale: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if entry.file_type()?.is_dir() {
            walk(&path, suffix, out, stale)?;
        } else if is_temp_name(name) {
            stale.push(path);
        } else if name.ends_with(suffix) {
            out.push(path);
        }
    }
    Ok(())
}

/// Prefix of the temporary files a pass writes beside the sidecars.
const TEMP_PREFIX: &str = ".keybroker-rewrap.";

fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(".tmp")
}

/// Replaces sidecars atomically and durably, a set at a time, with two
/// filesystem syncs per set instead of two fsyncs per file: every new
/// sidecar is written to a temporary file; one `syncfs` makes them all
/// durable; each temporary file is swapped with its sidecar in one atomic
/// `renameat2(RENAME_EXCHANGE)` (a reader sees the old or the new sidecar,
/// never a part); a second `syncfs` makes the swaps durable before any
/// result is returned. A crash at any point leaves every sidecar old or new
/// (at worst a stray temporary file, which the next pass removes).
///
/// The swap leaves the old sidecar's inode and blocks under the temporary
/// name, and a later set is written over them in place: a pass neither
/// creates nor frees an inode or a block per sidecar. (A rename over the
/// sidecar frees an inode and its blocks per file and creates new ones:
/// on ext4 without a journal every creation scans the recently freed inodes
/// of its group, truncating a file to zero forces its write-back on close,
/// and a `discard` mount trims every freed block synchronously; together
/// they bounded a pass over 100k sidecars at 5–8k files/s.) On a
/// filesystem without RENAME_EXCHANGE the durable temporary file is renamed
/// over the sidecar instead; a spare on another filesystem than the sidecar
/// gives way to the classic replacement (a new file beside it, fsync,
/// rename, fsync of the folder).
#[derive(Default)]
pub struct SidecarWriter {
    /// Temporary files free to be written over, in any folder.
    spares: Vec<PathBuf>,
    /// Temporary names given so far.
    named: u64,
}

impl SidecarWriter {
    /// Writes each `(path, contents)`, keeping the permissions of the
    /// sidecar it replaces; one result per write, in order.
    pub fn write_all(&mut self, writes: &[(PathBuf, Vec<u8>)]) -> Vec<std::io::Result<()>> {
        let Some((first, _)) = writes.first() else { return Vec::new() };
        let mut temps = Vec::with_capacity(writes.len());
        let mut results = Vec::with_capacity(writes.len());
        for (path, contents) in writes {
            let written = self.write_temp(path, contents);
            temps.push(written.as_ref().ok().cloned());
            results.push(written.map(|_| ()));
        }
        let sync = |what: &str| -> std::io::Result<()> {
            let folder = std::fs::File::open(first.parent().unwrap_or(Path::new(".")))?;
            rustix::fs::syncfs(&folder)
                .map_err(|e| std::io::Error::other(format!("syncing the filesystem {what}: {e}")))
        };
        let failed =
            |e: std::io::Error| writes.iter().map(|_| Err(std::io::Error::new(e.kind(), e.to_string()))).collect();
        if let Err(e) = sync("before the swaps") {
            // Nothing was swapped: the temporary files stay spares.
            self.spares.extend(temps.into_iter().flatten());
            return failed(e);
        }
        for ((result, temp), (path, contents)) in results.iter_mut().zip(temps).zip(writes) {
            let Some(temp) = temp else { continue };
            *result = self.swap(temp, path, contents);
        }
        if let Err(e) = sync("after the swaps") {
            return failed(e);
        }
        results
    }

    /// Writes `contents` over a spare temporary file (or into a new one
    /// beside `path`) with the permissions of `path`.
    fn write_temp(&mut self, path: &Path, contents: &[u8]) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(path).ok().map(|m| m.permissions());
        // The temporary file, its size and its permissions (none: new).
        let (temp, mut file, size, had) = loop {
            let Some(temp) = self.spares.pop() else {
                let temp = self.temp_name(path);
                let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
                break (temp, file, 0, None);
            };
            // A replaced sidecar keeps its contents for whoever still has
            // it: its inode is only unnamed here if it has other hard links
            // or is open elsewhere (a reader that opened it before the swap).
            let spare = std::fs::OpenOptions::new().write(true).open(&temp).and_then(|file| {
                let meta = file.metadata()?;
                if meta.nlink() > 1 || !open_only_here(&file) {
                    return Err(std::io::Error::other("in use"));
                }
                Ok((file, meta.len(), meta.permissions()))
            });
            match spare {
                Ok((file, size, had)) => break (temp, file, size, Some(had)),
                Err(_) => {
                    let _ = std::fs::remove_file(&temp);
                }
            }
        };
        if let Some(mode) = mode
            && had.as_ref() != Some(&mode)
        {
            file.set_permissions(mode)?;
        }
        // Written over in place; cut only what is left of a longer file (a
        // truncation to zero would free the blocks and force a write-back).
        file.write_all(contents)?;
        if size != contents.len() as u64 {
            file.set_len(contents.len() as u64)?;
        }
        Ok(temp)
    }

    /// A new temporary name in `path`'s folder.
    fn temp_name(&mut self, path: &Path) -> PathBuf {
        self.named += 1;
        path.with_file_name(format!("{TEMP_PREFIX}{}.{}.tmp", std::process::id(), self.named))
    }

    /// Puts `temp` (written and synced) in the place of `path`; the old
    /// sidecar becomes a spare.
    fn swap(&mut self, temp: PathBuf, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, &temp, cwd, path, rustix::fs::RenameFlags::EXCHANGE) {
            Ok(()) => {
                self.spares.push(temp);
                Ok(())
            }
            // Another filesystem than the spare's: a new file beside it.
            Err(rustix::io::Errno::XDEV) => {
                let _ = std::fs::remove_file(&temp);
                self.replace(path, contents)
            }
            // No swap on this filesystem (or no sidecar any more): the
            // temporary file, already durable, is renamed over it; the
            // second sync makes that durable.
            Err(_) => std::fs::rename(&temp, path),
        }
    }

    /// The classic atomic replacement: a new file beside `path`, fsync,
    /// rename over it, fsync of the folder.
    fn replace(&mut self, path: &Path, contents: &[u8]) -> std::io::Result<()> {
        let temp = self.temp_name(path);
        let written = std::fs::OpenOptions::new().write(true).create_new(true).open(&temp).and_then(|mut file| {
            if let Ok(meta) = std::fs::metadata(path) {
                file.set_permissions(meta.permissions())?;
            }
            file.write_all(contents)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written?;
        std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }

    /// Removes the spare temporary files.
    pub fn finish(&mut self) {
        for temp in self.spares.drain(..) {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Whether `file` (opened for writing) is open nowhere else, in this
/// process or another: the kernel grants a write lease only then. The lease
/// is given back at once; an open elsewhere in between would break it with
/// SIGIO, which [`rewrap_dir`] catches. False where leases are refused (a
/// file of another owner, a filesystem without leases).
#[allow(unsafe_code)]
fn open_only_here(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is open for the whole call (borrowed from `file`);
    // F_SETLEASE takes an int and touches no memory of ours.
    let leased = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } == 0;
    if leased {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    }
    leased
}

impl Drop for SidecarWriter {
    fn drop(&mut self) {
        self.finish();
    }
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
    /// The checkpoint, flushed and synced after every chunk.
    journal: std::io::BufWriter<std::fs::File>,
    /// The current version of each key, learnt from the broker's answers in
    /// this run (never from the checkpoint, which may predate a rotation).
    current: HashMap<String, u32>,
    summary: RewrapSummary,
    bar: indicatif::ProgressBar,
    writer: SidecarWriter,
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
            for ((path, updated), written) in writes.into_iter().zip(self.writer.write_all(&contents)) {
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
        let _ = self.journal.flush().and_then(|()| self.journal.get_ref().sync_data());
    }
}

/// Runs a rewrap pass over `options.dir` with `client`.
pub async fn rewrap_dir(client: &Client, options: &RewrapOptions) -> Result<RewrapSummary, String> {
    // A lease taken by SidecarWriter and broken by another process's open
    // raises SIGIO, whose default action would end the pass.
    let _sigio = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io())
        .map_err(|e| format!("catching SIGIO: {e}"))?;
    let (mut files, mut stale) = (Vec::new(), Vec::new());
    walk(&options.dir, &options.suffix, &mut files, &mut stale)
        .map_err(|e| format!("{}: {e}", options.dir.display()))?;
    for temp in stale {
        std::fs::remove_file(&temp).map_err(|e| format!("removing {}: {e}", temp.display()))?;
    }
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
    let journal = std::io::BufWriter::with_capacity(1 << 16, journal);
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
    let mut pass = Pass {
        options,
        client,
        checkpoint,
        journal,
        current: HashMap::new(),
        summary: RewrapSummary::default(),
        bar,
        writer: SidecarWriter::default(),
    };
    // `max_files` bounds the sidecars sent to the broker, not the ones
    // found already current: a rerun continues where this one stopped.
    let mut budget = if options.max_files == 0 { usize::MAX } else { options.max_files };
    for chunk in files.chunks(options.batch.max(1)) {
        if budget == 0 {
            break;
        }
        pass.chunk(chunk, &mut budget).await;
    }
    pass.writer.finish();
    pass.bar.finish_and_clear();
    Ok(pass.summary)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn temps(dir: &Path) -> Vec<PathBuf> {
        let (mut sidecars, mut stale) = (Vec::new(), Vec::new());
        walk(dir, ".json", &mut sidecars, &mut stale).unwrap();
        stale
    }

    #[test]
    fn sidecars_are_swapped_into_place_and_the_old_inodes_reused_unless_someone_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..16 {
            let folder = dir.path().join(format!("f{}", i % 2));
            std::fs::create_dir_all(&folder).unwrap();
            let path = folder.join(format!("s{i}.json"));
            std::fs::write(&path, format!("v1 {i:02}")).unwrap();
            paths.push(path);
        }
        std::fs::set_permissions(&paths[3], std::fs::Permissions::from_mode(0o600)).unwrap();
        let linked = dir.path().join("backup-of-s5.json");
        std::fs::hard_link(&paths[5], &linked).unwrap();
        let mut reader = std::fs::File::open(&paths[7]).unwrap();
        let v1_inodes: Vec<u64> = paths.iter().map(|p| std::fs::metadata(p).unwrap().ino()).collect();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let v1_modes: Vec<u32> = paths.iter().map(|p| mode(p)).collect();

        let mut writer = SidecarWriter::default();
        let round = |writer: &mut SidecarWriter, version: &str| {
            let writes: Vec<(PathBuf, Vec<u8>)> = paths
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), format!("{version} {i:02}{}", "+".repeat(i % 3)).into_bytes()))
                .collect();
            assert!(writer.write_all(&writes).iter().all(Result::is_ok));
            for (path, contents) in &writes {
                assert_eq!(&std::fs::read(path).unwrap(), contents, "{}", path.display());
            }
        };
        round(&mut writer, "v2");
        assert_eq!(writer.named, 16, "the first set needs new temporary files");
        assert_eq!(temps(dir.path()).len(), 16, "the replaced sidecars are kept as spares");
        round(&mut writer, "v3");
        // Two spares were not written over: the hard-linked one and the one
        // a reader holds open; they are unnamed and two files made instead.
        assert_eq!(writer.named, 18);
        let v3_inodes: Vec<u64> = paths.iter().map(|p| std::fs::metadata(p).unwrap().ino()).collect();
        let reused = v3_inodes.iter().filter(|ino| v1_inodes.contains(ino)).count();
        assert_eq!(reused, 14, "v3 went into the inodes of v1");
        let mut held = String::new();
        std::io::Read::read_to_string(&mut reader, &mut held).unwrap();
        assert_eq!(held, "v1 07", "a reader's open sidecar was written over");
        assert_eq!(std::fs::read_to_string(&linked).unwrap(), "v1 05", "a hard link's contents changed");
        // Each sidecar keeps its permissions, whichever inode it got.
        assert_eq!(paths.iter().map(|p| mode(p)).collect::<Vec<_>>(), v1_modes);
        assert_eq!(mode(&paths[3]), 0o600);

        writer.finish();
        assert!(temps(dir.path()).is_empty(), "spares left behind");
    }
}
