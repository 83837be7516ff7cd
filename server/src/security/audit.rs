//! The audit log: one JSON line per data-plane call (per key, version and
//! outcome for batches), admin call, policy denial, automatic rotation and
//! migration step. Each line carries `prev`, the SHA-256 of the line before
//! it, so removing, reordering or editing a line breaks the chain where it
//! happened (`keybroker audit verify`); the chain continues across file
//! rotations. Events name the caller, RPC, key, version, backend, outcome,
//! latency and a SHA-256 of the encryption context; never key material or
//! plaintext.
//!
//! A call's event is written before the call answers: when the log fails
//! closed (the default), a call whose event cannot be written fails with
//! UNAVAILABLE instead of going unrecorded. Events are written by group
//! commit: a call queues its event; the first call to find no writer under
//! way becomes the writer, lets the calls that are ready run once (one
//! `yield`), then chains and writes every queued event with one `write(2)`
//! and tells the others whether theirs reached the sink. Under load one
//! write carries the events of many calls (a write per event cost more than
//! the rest of the audit log together); alone, a call writes its own. A
//! writer whose call is cancelled still writes the queue (on drop). (No
//! thread hop: handing events to a writer thread and waiting for its
//! acknowledgement cost more than the write itself.)

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::{ErrorCode, ServiceError, ServiceResult};

/// `[audit]`: where events go and what happens when they cannot be written.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File the events are appended to (created mode 0600). With neither
    /// `file` nor `stdout`, nothing is audited (a warning says so at start).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Also write every event to standard output.
    #[serde(default)]
    pub stdout: bool,
    /// When an event cannot be written, data-plane calls fail with
    /// UNAVAILABLE (and admin calls are refused) until the sink works again.
    /// `false` serves on and counts the lost events.
    #[serde(default = "default_true")]
    pub fail_closed: bool,
    /// Rotate the file once it reaches this size: it is renamed
    /// `FILE.<UTC time>` and a new file continues the chain. 0 never rotates
    /// (rotate it from outside; a renamed or removed file is reopened
    /// within a second).
    #[serde(default)]
    pub max_file_bytes: u64,
}

fn default_true() -> bool {
    true
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { file: None, stdout: false, fail_closed: true, max_file_bytes: 0 }
    }
}

/// One audit event as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 UTC time the call finished.
    pub time: String,
    /// The caller, or `keybroker` for the broker's own actions.
    pub identity: String,
    /// The RPC, or `AutoRotate`, `MigrateStep`, `AuditGap`.
    pub rpc: String,
    /// Key name; empty when none applies.
    pub key: String,
    /// Key version; 0 when none applies.
    pub version: u32,
    /// Backend of the version; empty when none applies.
    pub backend: String,
    /// `OK` or the gRPC code name.
    pub code: String,
    /// Wall time of the call, in microseconds.
    pub latency_us: u64,
    /// Calls this event stands for (batch items of one key, version and
    /// outcome), at least 1.
    pub count: u64,
    /// SHA-256 (hex) of the canonical encryption context; empty for none.
    pub context_sha256: String,
    /// The error message or the step's action; never key material.
    pub detail: String,
    /// SHA-256 (hex) of the previous line; zeros for the first.
    pub prev: String,
}

/// What a call reports; the log fills in the sequence, time and chain.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The caller.
    pub identity: Arc<str>,
    /// The RPC.
    pub rpc: &'static str,
    /// Key name.
    pub key: String,
    /// Key version.
    pub version: u32,
    /// Backend.
    pub backend: String,
    /// Outcome: `None` for OK.
    pub code: Option<ErrorCode>,
    /// Latency.
    pub latency_us: u64,
    /// Calls represented.
    pub count: u64,
    /// Hash of the context.
    pub context_sha256: String,
    /// Error message or action.
    pub detail: String,
}

/// The SHA-256 (hex) of an encryption context in its canonical encoding;
/// empty for an empty context.
pub fn context_hash(context: &BTreeMap<String, String>) -> String {
    if context.is_empty() {
        return String::new();
    }
    let mut bytes = Vec::new();
    crate::core::envelope::additional_data(&mut bytes, &[], context);
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// The gRPC name of an outcome.
pub fn code_name(code: Option<ErrorCode>) -> &'static str {
    match code.map(ErrorCode::grpc) {
        None => "OK",
        Some(tonic::Code::Ok) => "OK",
        Some(tonic::Code::NotFound) => "NOT_FOUND",
        Some(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Some(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Some(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Some(tonic::Code::Aborted) => "ABORTED",
        Some(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Some(tonic::Code::Unavailable) => "UNAVAILABLE",
        Some(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Some(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Some(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Some(_) => "INTERNAL",
    }
}

/// The audit log handle the services share.
pub struct AuditLog {
    writer: Option<std::sync::Mutex<Writer>>,
    /// Events waiting for the group commit under way.
    queue: std::sync::Mutex<Queue>,
    fail_closed: bool,
    healthy: AtomicBool,
    failures: AtomicU64,
    /// Writes to the sink since start (each carries one or more events).
    writes: AtomicU64,
    /// Events written since start.
    written: AtomicU64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("enabled", &self.writer.is_some()).finish_non_exhaustive()
    }
}

/// Why the audit log could not start.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `audit.file`: {path}: {cause}")]
pub struct AuditError {
    path: String,
    cause: String,
}

impl AuditLog {
    /// A log that records nothing.
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self {
            writer: None,
            queue: std::sync::Mutex::default(),
            fail_closed: false,
            healthy: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    /// Opens the sink of `config`. The chain continues from the last line of
    /// the file (or of its newest rotated sibling).
    pub fn open(config: &AuditConfig) -> Result<Arc<Self>, AuditError> {
        if config.file.is_none() && !config.stdout {
            tracing::warn!("audit log off: set audit.file (or audit.stdout) to record every call");
            return Ok(Self::disabled());
        }
        let file = match &config.file {
            Some(path) => Some(FileSink::open(path, config.max_file_bytes)?),
            None => None,
        };
        let (prev, seq) = match &file {
            Some(f) => f.chain_tail(),
            None => (LineHash::ZERO, 0),
        };
        let writer = Writer { file, stdout: config.stdout, prev, seq, lost: 0, lost_since: None, bytes: Vec::new() };
        Ok(Arc::new(Self {
            writer: Some(std::sync::Mutex::new(writer)),
            queue: std::sync::Mutex::default(),
            fail_closed: config.fail_closed,
            healthy: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }))
    }

    /// Whether events are recorded at all.
    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Events that could not be written since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Events written since start, and the writes that carried them (group
    /// commit: fewer writes than events under load).
    pub fn written(&self) -> (u64, u64) {
        (self.written.load(Ordering::Relaxed), self.writes.load(Ordering::Relaxed))
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Writes `records` (none: only the gap event a failing sink owes, as a
    /// probe); whether they were written.
    fn write(&self, records: &[Record]) -> bool {
        let Some(writer) = &self.writer else { return true };
        let mut writer = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = writer.write_records(records);
        drop(writer);
        // A probe (no events) is not counted as a write of calls' events.
        if !records.is_empty() {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        let counter = if written { &self.written } else { &self.failures };
        counter.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.healthy.store(written, Ordering::Relaxed);
        written
    }

    /// UNAVAILABLE when the log fails closed and its sink is failing: admin
    /// calls check this before they change anything (it tries the sink
    /// again first).
    pub fn ready(&self) -> ServiceResult<()> {
        if self.fail_closed && !self.healthy() && !self.write(&[]) {
            return Err(unavailable());
        }
        Ok(())
    }

    /// Records `record` before the call answers; when the log fails closed
    /// and the event cannot be written, UNAVAILABLE.
    pub async fn record(&self, record: Record) -> ServiceResult<()> {
        self.record_all(std::iter::once(record)).await
    }

    /// Records `records` (the events of one call, e.g. a batch's groups)
    /// together, like [`AuditLog::record`].
    pub async fn record_all(&self, records: impl IntoIterator<Item = Record>) -> ServiceResult<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        let waiter = {
            let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.records.extend(records);
            if queue.writing {
                let (tx, rx) = tokio::sync::oneshot::channel();
                queue.waiters.push(tx);
                Some(rx)
            } else {
                queue.writing = true;
                None
            }
        };
        let written = match waiter {
            // The writer answers even when its own call is cancelled.
            Some(rx) => rx.await.unwrap_or(false),
            None => {
                let mut commit = GroupCommit { log: self, armed: true };
                tokio::task::yield_now().await;
                commit.run()
            }
        };
        if written || !self.fail_closed {
            return Ok(());
        }
        Err(unavailable())
    }

    /// Records an action the broker took on its own.
    pub fn record_detached(&self, record: Record) {
        self.write(std::slice::from_ref(&record));
    }
}

/// The events queued for the next group commit and the calls waiting for it.
#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    waiters: Vec<tokio::sync::oneshot::Sender<bool>>,
    /// A call has taken the writing of the queue on itself.
    writing: bool,
}

/// The writing of the queue a call took on; done on drop when the call is
/// cancelled first, so the calls waiting for it are answered.
struct GroupCommit<'a> {
    log: &'a AuditLog,
    armed: bool,
}

impl GroupCommit<'_> {
    /// Writes every queued event with one write; whether they reached the
    /// sink (each waiting call is told the same).
    fn run(&mut self) -> bool {
        self.armed = false;
        let (records, waiters) = {
            let mut queue = self.log.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.writing = false;
            (std::mem::take(&mut queue.records), std::mem::take(&mut queue.waiters))
        };
        let written = self.log.write(&records);
        for waiter in waiters {
            let _ = waiter.send(written);
        }
        written
    }
}

impl Drop for GroupCommit<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.run();
        }
    }
}

fn unavailable() -> ServiceError {
    ServiceError::new(
        ErrorCode::Unavailable,
        "the audit log cannot be written; calls are refused until it can (audit.fail_closed)",
    )
}

/// The SHA-256 of a line in hex, as the next line carries it (kept without
/// an allocation: the writer makes one per event).
#[derive(Clone, Copy)]
struct LineHash([u8; 64]);

impl LineHash {
    const ZERO: Self = Self([b'0'; 64]);

    fn of(line: &[u8]) -> Self {
        let mut hex = [0; 64];
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(sha2::Sha256::digest(line), &mut hex);
        Self(hex)
    }

    fn as_str(&self) -> &str {
        // Hex digits are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// The hash a line passes on to the next one.
pub fn line_hash(line: &[u8]) -> String {
    LineHash::of(line).as_str().to_owned()
}

struct FileSink {
    path: PathBuf,
    file: Option<File>,
    identity: Option<(u64, u64)>,
    size: u64,
    max_bytes: u64,
    checked: Instant,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl FileSink {
    fn open(path: &Path, max_bytes: u64) -> Result<Self, AuditError> {
        let err = |e: std::io::Error| AuditError { path: path.display().to_string(), cause: e.to_string() };
        let file = open_append(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            identity: Some((meta.dev(), meta.ino())),
            size: meta.len(),
            file: Some(file),
            max_bytes,
            checked: Instant::now(),
        })
    }

    /// The hash and sequence number of the last event written, from this
    /// file or, when it is empty, the newest rotated one.
    fn chain_tail(&self) -> (LineHash, u64) {
        let mut candidates = vec![self.path.clone()];
        candidates.extend(rotated_siblings(&self.path).into_iter().rev());
        for path in candidates {
            if let Some(last) = last_line(&path) {
                let seq = serde_json::from_slice::<Event>(&last).map(|e| e.seq).unwrap_or(0);
                return (LineHash::of(&last), seq);
            }
        }
        (LineHash::ZERO, 0)
    }

    /// Reopens the file when it was renamed or removed from outside
    /// (checked at most once a second).
    fn follow(&mut self) {
        if self.file.is_some() && self.checked.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.checked = Instant::now();
        let current = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if self.file.is_none() || current != self.identity {
            self.reopen();
        }
    }

    fn reopen(&mut self) {
        self.file = open_append(&self.path).ok();
        let meta = self.file.as_ref().and_then(|f| f.metadata().ok());
        self.identity = meta.as_ref().map(|m| (m.dev(), m.ino()));
        self.size = meta.map_or(0, |m| m.len());
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.follow();
        if self.max_bytes > 0 && self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("audit file not open"))?;
        match file.write_all(bytes) {
            Ok(()) => {
                self.size += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Try a fresh handle next time (a full disk, a replaced file).
                self.file = None;
                Err(e)
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let stamp = time::OffsetDateTime::now_utc();
        let name = format!(
            "{}.{:04}{:02}{:02}T{:02}{:02}{:02}.{:09}Z",
            self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            stamp.year(),
            u8::from(stamp.month()),
            stamp.day(),
            stamp.hour(),
            stamp.minute(),
            stamp.second(),
            stamp.nanosecond()
        );
        std::fs::rename(&self.path, self.path.with_file_name(name))?;
        self.reopen();
        Ok(())
    }
}

/// Rotated files of `path` (`FILE.<UTC time>`), oldest first.
pub fn rotated_siblings(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Vec::new() };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| {
                        n.strip_prefix(&prefix).is_some_and(|rest| rest.ends_with('Z') && rest.contains('T'))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn last_line(path: &Path) -> Option<Vec<u8>> {
    let file = File::open(path).ok()?;
    std::io::BufReader::new(file).split(b'\n').filter_map(|l| l.ok()).filter(|l| !l.is_empty()).last()
}

struct Writer {
    file: Option<FileSink>,
    stdout: bool,
    prev: LineHash,
    seq: u64,
    /// Events lost since the sink last worked.
    lost: u64,
    lost_since: Option<String>,
    /// The lines being written (kept to reuse its allocation).
    bytes: Vec<u8>,
}

impl Writer {
    /// Appends `records` to the chain, after the gap event a failing sink
    /// owes; whether they reached the sink.
    fn write_records(&mut self, records: &[Record]) -> bool {
        if records.is_empty() && self.lost == 0 {
            return true;
        }
        let now = now_rfc3339();
        let mut bytes = std::mem::take(&mut self.bytes);
        bytes.clear();
        let (mut prev, mut seq) = (self.prev, self.seq);
        let mut append = |record: &Record, bytes: &mut Vec<u8>| {
            seq += 1;
            let event = EventRef {
                seq,
                time: &now,
                identity: &record.identity,
                rpc: record.rpc,
                key: &record.key,
                version: record.version,
                backend: &record.backend,
                code: code_name(record.code),
                latency_us: record.latency_us,
                count: record.count.max(1),
                context_sha256: &record.context_sha256,
                detail: &record.detail,
                prev: prev.as_str(),
            };
            let start = bytes.len();
            // Serializing plain strings and numbers cannot fail.
            let _ = serde_json::to_writer(&mut *bytes, &event);
            prev = LineHash::of(&bytes[start..]);
            bytes.push(b'\n');
        };
        if self.lost > 0 {
            let gap = Record {
                identity: "keybroker".into(),
                rpc: "AuditGap",
                code: Some(ErrorCode::Unavailable),
                count: self.lost,
                detail: format!(
                    "{} events could not be written since {}",
                    self.lost,
                    self.lost_since.as_deref().unwrap_or("?")
                ),
                ..Record::default()
            };
            append(&gap, &mut bytes);
        }
        for record in records {
            append(record, &mut bytes);
        }
        let written = self.emit(&bytes);
        self.bytes = bytes;
        match written {
            Err(err) => {
                if self.lost == 0 {
                    tracing::error!(%err, "cannot write the audit log");
                    self.lost_since = Some(now);
                }
                self.lost += records.len() as u64;
                false
            }
            Ok(()) => {
                if self.lost > 0 {
                    tracing::info!(lost = self.lost, "the audit log is written again");
                }
                self.lost = 0;
                self.lost_since = None;
                self.prev = prev;
                self.seq = seq;
                true
            }
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            file.write(bytes)?;
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// An [`Event`] borrowed from its record, for writing without copies.
#[derive(Serialize)]
struct EventRef<'a> {
    seq: u64,
    time: &'a str,
    identity: &'a str,
    rpc: &'a str,
    key: &'a str,
    version: u32,
    backend: &'a str,
    code: &'a str,
    latency_us: u64,
    count: u64,
    context_sha256: &'a str,
    detail: &'a str,
    prev: &'a str,
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// What `keybroker audit verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line chains to the one before; `events` in all.
    Intact {
        /// Events checked.
        events: u64,
    },
    /// The first line that breaks the chain.
    Broken {
        /// The file.
        file: PathBuf,
        /// Its line number, from 1.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Verifies the chain through `files`, in order (rotated files first). The
/// first line of the first file is trusted as the anchor; every other line
/// must carry the hash of the line before it and the next sequence number.
pub fn verify(files: &[PathBuf]) -> std::io::Result<Verdict> {
    let mut prev: Option<(String, u64)> = None;
    let mut events = 0;
    for path in files {
        let reader = std::io::BufReader::new(File::open(path)?);
        for (index, line) in reader.split(b'\n').enumerate() {
            let line = line?;
            let number = index as u64 + 1;
            let broken = |reason: String| Verdict::Broken { file: path.clone(), line: number, reason };
            if line.is_empty() {
                return Ok(broken("empty line".to_owned()));
            }
            let event: Event = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => return Ok(broken(format!("not an audit event: {e}"))),
            };
            if let Some((hash, seq)) = &prev {
                if event.seq != seq + 1 {
                    return Ok(broken(format!(
                        "sequence {} follows {seq}: {} events removed or reordered before this line",
                        event.seq,
                        if event.seq > *seq { event.seq - seq - 1 } else { 0 }
                    )));
                }
                if &event.prev != hash {
                    return Ok(broken(
                        "does not carry the hash of the line before it: that line was edited, or lines were \
                         removed or reordered"
                            .to_owned(),
                    ));
                }
            }
            prev = Some((line_hash(&line), event.seq));
            events += 1;
        }
    }
    Ok(Verdict::Intact { events })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    async fn write_events(config: &AuditConfig, n: u64) {
        let log = AuditLog::open(config).unwrap();
        for i in 0..n {
            let record = Record { identity: "uid:1".into(), rpc: "Wrap", key: format!("k{i}"), ..Record::default() };
            log.record(record).await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_chain_detects_removed_reordered_and_edited_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig { file: Some(path.clone()), ..AuditConfig::default() };
        write_events(&config, 3).await;
        // A restart continues the chain.
        write_events(&config, 3).await;
        assert_eq!(verify(std::slice::from_ref(&path)).unwrap(), Verdict::Intact { events: 6 });
        let original = lines(&path);
        let check = |edited: Vec<String>| {
            std::fs::write(&path, edited.join("\n") + "\n").unwrap();
            match verify(std::slice::from_ref(&path)).unwrap() {
                Verdict::Broken { line, .. } => line,
                Verdict::Intact { .. } => 0,
            }
        };
        let mut removed = original.clone();
        removed.remove(2);
        assert_eq!(check(removed), 3);
        let mut swapped = original.clone();
        swapped.swap(3, 4);
        assert_eq!(check(swapped), 4);
        let mut edited = original.clone();
        edited[1] = edited[1].replace("\"k1\"", "\"k9\"");
        assert_eq!(check(edited), 3);
    }

    #[tokio::test]
    async fn rotation_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig { file: Some(path.clone()), max_file_bytes: 600, ..AuditConfig::default() };
        write_events(&config, 12).await;
        let mut files = rotated_siblings(&path);
        assert!(files.len() >= 2, "{files:?}");
        files.push(path.clone());
        assert_eq!(verify(&files).unwrap(), Verdict::Intact { events: 12 });
        // A missing middle file breaks the chain at the next one.
        let mut gap = files.clone();
        gap.remove(1);
        assert!(matches!(verify(&gap).unwrap(), Verdict::Broken { line: 1, .. }));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_writes_and_keep_one_unbroken_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig { file: Some(path.clone()), ..AuditConfig::default() };
        let log = AuditLog::open(&config).unwrap();
        let calls: Vec<_> = (0..400)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let record =
                        Record { identity: "uid:1".into(), rpc: "Wrap", key: format!("k{i}"), ..Record::default() };
                    log.record(record).await
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(verify(std::slice::from_ref(&path)).unwrap(), Verdict::Intact { events: 400 });
        let mut keys: Vec<String> =
            lines(&path).iter().map(|l| serde_json::from_str::<Event>(l).unwrap().key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 400, "every call's event once");
        let writes = log.writes.load(Ordering::Relaxed);
        assert!(writes < 400, "{writes} writes for 400 events: calls ready together share one");
    }

    #[tokio::test]
    async fn a_cancelled_writer_still_writes_the_events_waiting_for_it() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig { file: Some(path.clone()), ..AuditConfig::default() };
        let log = AuditLog::open(&config).unwrap();
        let event = |key: &str| Record { identity: "uid:1".into(), rpc: "Wrap", key: key.into(), ..Record::default() };
        // The first call becomes the writer and yields before writing.
        let mut writer = Box::pin(log.record(event("first")));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(writer.as_mut().poll(&mut cx).is_pending());
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.record(event("second")).await }
        });
        tokio::task::yield_now().await;
        assert!(lines(&path).is_empty(), "nothing is written before the writer runs");
        drop(writer);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting call is answered")
            .unwrap()
            .unwrap();
        let keys: Vec<String> = lines(&path).iter().map(|l| serde_json::from_str::<Event>(l).unwrap().key).collect();
        assert_eq!(keys, ["first", "second"]);
        assert_eq!(verify(std::slice::from_ref(&path)).unwrap(), Verdict::Intact { events: 2 });
    }
}
