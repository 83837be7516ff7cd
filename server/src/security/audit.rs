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
//! commit, in one of two ways:
//!
//! - On the broker's own listeners, a call queues its event and returns at
//!   once; its connection holds its bytes (a [`ReplyGate`] in front of the
//!   connection's writes) until every event queued so far is written with one
//!   `write(2)`. No reply byte leaves before its call's event is in the
//!   file, and the call is polled once, not woken again: under load one
//!   write carries the events of every call answered since the last one. An
//!   event that cannot be written closes the connections whose calls it
//!   covers (their replies are never sent; clients see the connection
//!   close: tonic reports a transport error, gRPC core clients UNAVAILABLE);
//!   while the sink fails, new calls are refused with UNAVAILABLE.
//! - Elsewhere (admin calls, the KMS v2 and XKS listeners), the call waits:
//!   the first call to find no writer under way becomes the writer, lets the
//!   calls that are ready run once (one `yield`), then writes every queued
//!   event and tells the others whether theirs reached the sink. A writer
//!   whose call is cancelled still writes the queue (on drop).
//!
//! (A write per event cost more than the rest of the audit log together;
//! handing events to a writer thread and waiting for its acknowledgement
//! cost more than the write itself.)

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
    /// Events queued since start (the last one's number).
    enqueued: AtomicU64,
    /// Every event up to this number has been written or has failed.
    written_through: AtomicU64,
    /// The highest event number of a write that failed.
    failed_through: AtomicU64,
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
            enqueued: AtomicU64::new(0),
            written_through: AtomicU64::new(0),
            failed_through: AtomicU64::new(0),
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
            enqueued: AtomicU64::new(0),
            written_through: AtomicU64::new(0),
            failed_through: AtomicU64::new(0),
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
        self.write_locked(&mut writer, records)
    }

    fn write_locked(&self, writer: &mut Writer, records: &[Record]) -> bool {
        let written = writer.write_records(records);
        // A probe (no events) is not counted as a write of calls' events.
        if !records.is_empty() {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        let counter = if written { &self.written } else { &self.failures };
        counter.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.healthy.store(written, Ordering::Relaxed);
        written
    }

    /// Queues `records`, with `waiter` to be told whether they were written;
    /// the number of the last queued event, and whether the caller is to
    /// write the queue (it waits, and no writer is under way).
    fn enqueue(
        &self,
        records: impl IntoIterator<Item = Record>,
        waiter: Option<tokio::sync::oneshot::Sender<bool>>,
    ) -> (u64, bool) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = queue.records.len();
        queue.records.extend(records);
        queue.enqueued += (queue.records.len() - before) as u64;
        self.enqueued.store(queue.enqueued, Ordering::Release);
        let lead = match waiter {
            Some(tx) => {
                queue.waiters.push(tx);
                !std::mem::replace(&mut queue.writing, true)
            }
            None => false,
        };
        (queue.enqueued, lead)
    }

    /// Writes every queued event with one write (unless every event up to
    /// `through` is written already: a concurrent write took them), and
    /// tells the waiting calls whether theirs reached the sink.
    fn flush(&self, through: u64) {
        let Some(writer) = &self.writer else { return };
        let mut writer = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.written_through.load(Ordering::Acquire) >= through {
            return;
        }
        // Taken under the writer's lock: events are chained in queue order.
        let (records, waiters, last) = {
            let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.writing = false;
            (std::mem::take(&mut queue.records), std::mem::take(&mut queue.waiters), queue.enqueued)
        };
        let written = self.write_locked(&mut writer, &records);
        if !written {
            self.failed_through.fetch_max(last, Ordering::AcqRel);
        }
        self.written_through.store(last, Ordering::Release);
        drop(writer);
        for waiter in waiters {
            let _ = waiter.send(written);
        }
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
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (_, lead) = self.enqueue(records, Some(tx));
        if lead {
            let mut commit = GroupCommit { log: self, armed: true };
            tokio::task::yield_now().await;
            commit.run();
        }
        // The writer answers even when its own call is cancelled.
        if rx.await.unwrap_or(false) || !self.fail_closed {
            return Ok(());
        }
        Err(unavailable())
    }

    /// Writes the events queued by calls whose replies have not gone out
    /// (a cancelled call's, or any while no connection writes): every
    /// second, and at shutdown.
    pub fn flush_pending(&self) {
        let through = self.enqueued.load(Ordering::Acquire);
        if self.written_through.load(Ordering::Acquire) < through {
            self.flush(through);
        }
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
    /// A waiting call has taken the writing of the queue on itself.
    writing: bool,
    /// Events queued since start.
    enqueued: u64,
}

/// The writing of the queue a call took on; done on drop when the call is
/// cancelled first, so the calls waiting for it are answered.
struct GroupCommit<'a> {
    log: &'a AuditLog,
    armed: bool,
}

impl GroupCommit<'_> {
    fn run(&mut self) {
        self.armed = false;
        self.log.flush(u64::MAX);
    }
}

impl Drop for GroupCommit<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.run();
        }
    }
}

/// A connection's hold on its replies until the audit events of its calls
/// are written (see the module's documentation): its calls queue their
/// events without waiting, and the connection calls
/// [`ReplyGate::before_write`] before it writes any byte.
pub struct ReplyGate {
    log: Arc<AuditLog>,
    /// The number of the latest event of a call on this connection.
    recorded: AtomicU64,
    /// Every event up to this number was written when the connection last
    /// wrote.
    passed: AtomicU64,
}

impl std::fmt::Debug for ReplyGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyGate").field("passed", &self.passed).finish_non_exhaustive()
    }
}

impl ReplyGate {
    /// A gate on `log` for a new connection; none when the log is off.
    pub fn new(log: &Arc<AuditLog>) -> Option<Arc<Self>> {
        log.enabled().then(|| {
            Arc::new(Self {
                passed: AtomicU64::new(log.enqueued.load(Ordering::Acquire)),
                recorded: AtomicU64::new(0),
                log: log.clone(),
            })
        })
    }

    /// Queues the events of a call whose reply goes out through this
    /// connection. While the sink of a log that fails closed is failing,
    /// writes them at once instead: UNAVAILABLE when that fails too.
    pub fn record_all(&self, records: impl IntoIterator<Item = Record>) -> ServiceResult<()> {
        if self.log.fail_closed && !self.log.healthy() {
            // The sink is failing: this call's own write is the probe, and
            // the call is refused (nothing of it answered) unless it works.
            let records: Vec<Record> = records.into_iter().collect();
            return if self.log.write(&records) { Ok(()) } else { Err(unavailable()) };
        }
        let (last, _) = self.log.enqueue(records, None);
        self.recorded.fetch_max(last, Ordering::AcqRel);
        Ok(())
    }

    /// Writes the queued events before the connection writes: an error (the
    /// connection closes with its replies unsent) when the log fails closed
    /// and an event of a call on this connection may not have been written.
    pub fn before_write(&self) -> std::io::Result<()> {
        let log = &self.log;
        let through = log.enqueued.load(Ordering::Acquire);
        let passed = self.passed.load(Ordering::Relaxed);
        if through <= passed {
            return Ok(());
        }
        log.flush(through);
        if log.fail_closed
            && log.failed_through.load(Ordering::Acquire) > passed
            && self.recorded.load(Ordering::Acquire) > passed
        {
            return Err(std::io::Error::other("the audit log cannot be written: replies withheld (audit.fail_closed)"));
        }
        self.passed.store(through, Ordering::Relaxed);
        Ok(())
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
    /// The range of the file handed to the kernel last ([`FileSink::shed`]).
    shed: (u64, u64),
}

/// How much is appended to the audit file between two hands of its pages
/// to the kernel ([`FileSink::shed`]): a hint every MiB (about 3,600
/// events), so at most about three times this stays in the page cache.
/// Smaller hints are shorter stalls: with one every 8 MiB, the p99.9 of
/// production Wrap rose from 1.7-1.8 to about 2.5 ms (interleaved A/B);
/// with one every MiB it stayed at 1.8 ms.
const SHED_BYTES: u64 = 1 << 20;

/// `offset` rounded down to a page (4 KiB: the hint of [`FileSink::shed`]
/// covers whole pages, never the one still being appended to).
fn page_floor(offset: u64) -> u64 {
    offset & !4095
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
            shed: (page_floor(meta.len()), page_floor(meta.len())),
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
        self.shed = (page_floor(self.size), page_floor(self.size));
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
                if self.size >= self.shed.1 + SHED_BYTES {
                    self.shed();
                }
                Ok(())
            }
            Err(e) => {
                // Try a fresh handle next time (a full disk, a replaced file).
                self.file = None;
                Err(e)
            }
        }
    }

    /// Hands the pages written since the last call to the kernel, with the
    /// range of the last call again: `POSIX_FADV_DONTNEED` starts writing
    /// back the new pages and drops from the page cache those of the last
    /// range, written back since (a page still being written stays cached
    /// until the kernel needs the memory). The audit file is written once
    /// and read rarely: without this a busy log fills the page cache, and a
    /// container's memory limit, which counts it, with pages nobody reads,
    /// each of them memory the kernel has to find (on a VM whose balloon
    /// hands free memory back to its host, a fresh page costs microseconds
    /// at the first touch). A hint: an error (a FIFO, an old kernel) is
    /// ignored, and nothing is lost either way.
    fn shed(&mut self) {
        let end = page_floor(self.size);
        #[cfg(target_os = "linux")]
        if let (Some(file), Some(len)) = (&self.file, std::num::NonZeroU64::new(end.saturating_sub(self.shed.0))) {
            let _ = rustix::fs::fadvise(file, self.shed.0, Some(len), rustix::fs::Advice::DontNeed);
        }
        self.shed = (self.shed.1, end);
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
            let start = bytes.len();
            write_line(bytes, seq, &now, record, &prev);
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

/// Appends the JSON of one event (the fields of [`Event`], in its order;
/// byte for byte what `serde_json` writes for it), without a newline.
fn write_line(out: &mut Vec<u8>, seq: u64, time: &str, record: &Record, prev: &LineHash) {
    let mut numbers = itoa::Buffer::new();
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(numbers.format(seq).as_bytes());
    out.extend_from_slice(b",\"time\":");
    json_plain(out, time);
    out.extend_from_slice(b",\"identity\":");
    json_str(out, &record.identity);
    out.extend_from_slice(b",\"rpc\":");
    json_plain(out, record.rpc);
    out.extend_from_slice(b",\"key\":");
    json_str(out, &record.key);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(numbers.format(record.version).as_bytes());
    out.extend_from_slice(b",\"backend\":");
    json_str(out, &record.backend);
    out.extend_from_slice(b",\"code\":");
    json_plain(out, code_name(record.code));
    out.extend_from_slice(b",\"latency_us\":");
    out.extend_from_slice(numbers.format(record.latency_us).as_bytes());
    out.extend_from_slice(b",\"count\":");
    out.extend_from_slice(numbers.format(record.count.max(1)).as_bytes());
    out.extend_from_slice(b",\"context_sha256\":");
    json_str(out, &record.context_sha256);
    out.extend_from_slice(b",\"detail\":");
    json_str(out, &record.detail);
    out.extend_from_slice(b",\"prev\":");
    json_plain(out, prev.as_str());
    out.push(b'}');
}

/// A JSON string: copied as is when nothing in it needs escaping (the
/// common case), else escaped by `serde_json`.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        json_plain(out, s);
    } else {
        // Writing a string to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// A JSON string the broker made itself (a time, a name of its own, a hex
/// hash): nothing in it needs escaping.
fn json_plain(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'), "{s:?}");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
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

    /// A log on a new file (kept while the folder is).
    fn fresh_log() -> (tempfile::TempDir, PathBuf, Arc<AuditLog>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditConfig { file: Some(path.clone()), ..AuditConfig::default() }).unwrap();
        (dir, path, log)
    }

    /// Bytes of `path` in the page cache, as `fincore` (util-linux) sees them.
    fn cached_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore missing: apt-get install util-linux-extra (./scripts/test.sh installs it)");
        assert!(out.status.success(), "fincore: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn written_pages_leave_the_page_cache_and_every_byte_stays_in_the_file() {
        // Beside the test binary, on the disk the build uses (a tmpfs keeps
        // every page whatever the hint says).
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let path = dir.path().join("audit.log");
        let mut sink = FileSink::open(&path, 0).unwrap();
        let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let written = 32 * SHED_BYTES;
        for _ in 0..written / block.len() as u64 {
            sink.write(&block).unwrap();
            // Time for the kernel to write back the range handed to it.
            std::thread::sleep(Duration::from_millis(50));
        }
        // About two hints' worth stays; a quarter of the file leaves room
        // for ranges a busy disk had not written back when advised again.
        let cached = cached_bytes(&path);
        assert!(
            cached <= written / 4,
            "{cached} of {written} bytes still cached: the written pages were not handed back"
        );
        let content = std::fs::read(&path).unwrap();
        assert_eq!(content.len() as u64, written);
        assert!(content.chunks(block.len()).all(|c| c == block.as_slice()), "the file lost or changed bytes");
    }

    fn event(key: &str) -> Record {
        Record { identity: "uid:1".into(), rpc: "Wrap", key: key.into(), ..Record::default() }
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
        let (_dir, path, log) = fresh_log();
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

    #[test]
    fn a_line_is_what_serde_json_writes_for_the_event() {
        let record = Record {
            identity: "spiffe://prod/orders \"quoted\" \\ back\u{1}".into(),
            rpc: "Wrap",
            key: "orders-\u{e9}t\u{e9}".into(),
            version: 7,
            backend: "local".into(),
            code: Some(ErrorCode::InvalidArgument),
            latency_us: 41,
            count: 0,
            context_sha256: "ab".repeat(32),
            detail: "line\nbreak\ttab".into(),
        };
        let prev = LineHash::of(b"previous");
        let mut line = Vec::new();
        write_line(&mut line, 42, "2026-11-30T04:05:12.123456Z", &record, &prev);
        let event = Event {
            seq: 42,
            time: "2026-11-30T04:05:12.123456Z".into(),
            identity: record.identity.to_string(),
            rpc: "Wrap".into(),
            key: record.key.clone(),
            version: 7,
            backend: "local".into(),
            code: "INVALID_ARGUMENT".into(),
            latency_us: 41,
            count: 1,
            context_sha256: record.context_sha256.clone(),
            detail: record.detail.clone(),
            prev: prev.as_str().into(),
        };
        assert_eq!(String::from_utf8(line).unwrap(), serde_json::to_string(&event).unwrap());
    }

    #[tokio::test]
    async fn a_gated_connection_writes_the_queued_events_before_its_bytes() {
        let (_dir, path, log) = fresh_log();
        let (busy, idle) = (ReplyGate::new(&log).unwrap(), ReplyGate::new(&log).unwrap());
        busy.record_all([event("a"), event("b")]).unwrap();
        assert!(lines(&path).is_empty(), "a call queues its events without writing");
        idle.before_write().unwrap();
        assert_eq!(lines(&path).len(), 2, "any connection's write carries every queued event");
        busy.record_all([event("c")]).unwrap();
        busy.before_write().unwrap();
        busy.before_write().unwrap();
        let keys: Vec<String> = lines(&path).iter().map(|l| serde_json::from_str::<Event>(l).unwrap().key).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(log.written(), (3, 2), "three events in two writes");
        // An event whose reply never goes out (its call was cancelled, no
        // connection writes) is written by the periodic flush.
        busy.record_all([event("cancelled")]).unwrap();
        log.flush_pending();
        assert_eq!(lines(&path).len(), 4);
        busy.before_write().unwrap();
        assert_eq!(log.written(), (4, 3), "nothing left for the connection to write");

        // The sink fails (noticed on the first write a second after the last
        // check): the connection whose call's event was lost is refused its
        // bytes, one with no call since is not; new calls are refused.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        busy.record_all([event("lost")]).unwrap();
        let err = busy.before_write().unwrap_err();
        assert!(err.to_string().contains("audit log cannot be written"), "{err}");
        idle.before_write().unwrap();
        let refused = idle.record_all([event("refused")]).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Unavailable);
        assert_eq!(log.failures(), 2);

        // Writable again: the next call's own write is the probe; the first
        // line says how many events were lost.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        idle.record_all([event("back")]).unwrap();
        idle.before_write().unwrap();
        let events: Vec<Event> = lines(&path).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!((events[0].rpc.as_str(), events[0].count), ("AuditGap", 2), "{events:?}");
        assert_eq!(events[1].key, "back");
    }
}
