//! The version table as the service sees it: an in-memory cache in front of
//! a [`KeyStore`], with the per-version counts (unwraps, wraps, rewraps in
//! and out) this broker flushes to the store in batches. The rules of the
//! key lifecycle are in [`lifecycle`].
//!
//! Reads come from the cache. A key or version this broker has not seen yet
//! (made by another replica) is reloaded from the store on first use
//! instead of failing.

mod lifecycle;

pub use lifecycle::{DEFAULT_MAX_WRAPS, NewKey, PolicyChange, VersionChange, WRAP_SCAN_ROWS};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{Backends, KeyBackend, OpenedKek, VersionRef};
use crate::core::envelope::is_valid_key_name;
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::store::{KeyRecord, KeyStore, UsageRecord, VersionRecord, VersionState};

/// A version unwrapped within this many seconds is not retired without
/// `force` (the default of `retirement_window_seconds`).
pub const DEFAULT_RETIREMENT_WINDOW_SECS: i64 = 24 * 3600;

/// How often a change that lost a concurrent race is retried before the
/// caller gets `ABORTED`.
const UPDATE_ATTEMPTS: usize = 5;

/// What a broker counts per version, flushed to the store in batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Unwraps (a use of the version by an application).
    Unwraps = 0,
    /// DEKs wrapped under the version (Wrap, GenerateDataKey).
    Wraps = 1,
    /// DEKs rewrapped into the version.
    RewrapsIn = 2,
    /// DEKs rewrapped out of the version.
    RewrapsOut = 3,
}

const COUNTS: usize = 4;

/// Every [`Count`], by its index.
const COUNT_ORDER: [Count; COUNTS] = [Count::Unwraps, Count::Wraps, Count::RewrapsIn, Count::RewrapsOut];

/// Per-version counters of this broker, shared by every cached record of
/// the key (a reload installs a new record over the same counters, so a
/// count made through an older record is neither lost nor copied twice).
#[derive(Debug, Default)]
struct VersionCounters {
    /// Counts not yet taken into a batch, by [`Count`].
    pending: [AtomicU64; COUNTS],
    /// Counts taken into the batch being written.
    in_flight: [AtomicU64; COUNTS],
    /// Latest unwrap seen by this broker, Unix seconds.
    last_unwrap: AtomicI64,
}

/// What the cache keeps beside the record of each version, in one place
/// for the call that uses it: the counters, the counts known to be stored,
/// the backend that serves the version (resolved when the record is cached,
/// not per call) and the KEK that backend opened last.
struct CachedVersion {
    /// Shared with newer records of the key.
    counters: Arc<VersionCounters>,
    /// By [`Count`]: the record's counts (copied, so a call reads none of
    /// the record) plus this broker's batches the store applied after the
    /// record was read (so not in it).
    known: [AtomicU64; COUNTS],
    /// `None` when the version's backend (in its mode) is not configured
    /// on this broker: a call then gets the error that says so.
    backend: Option<Arc<dyn KeyBackend>>,
    opened: OpenedKek,
    /// The version's backend reference, copied when it is short (a local
    /// KEK's is 61 bytes): a call that opens the KEK reads it here, not
    /// from the record.
    reference: InlineRef,
}

/// How many bytes of a backend reference a cached version keeps inline.
const REF_INLINE: usize = 64;

/// A backend reference of at most [`REF_INLINE`] bytes, or none.
struct InlineRef {
    len: u8,
    bytes: [u8; REF_INLINE],
}

impl InlineRef {
    /// Marks a reference too long to keep inline.
    const NONE: u8 = u8::MAX;

    fn new(reference: &[u8]) -> Self {
        let mut bytes = [0; REF_INLINE];
        match (bytes.get_mut(..reference.len()), u8::try_from(reference.len())) {
            (Some(inline), Ok(len)) => {
                inline.copy_from_slice(reference);
                Self { len, bytes }
            }
            _ => Self { len: Self::NONE, bytes },
        }
    }

    fn get(&self) -> Option<&[u8]> {
        if self.len == Self::NONE { None } else { self.bytes.get(..usize::from(self.len)) }
    }
}

impl std::fmt::Debug for CachedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedVersion")
            .field("counters", &self.counters)
            .field("known", &self.known)
            .field("backend", &self.backend.as_ref().map(|b| b.name()))
            .finish_non_exhaustive()
    }
}

/// A version's stored count of `count`.
fn stored(version: &VersionRecord, count: Count) -> u64 {
    match count {
        Count::Unwraps => version.unwrap_count,
        Count::Wraps => version.wrap_count,
        Count::RewrapsIn => version.rewrap_in_count,
        Count::RewrapsOut => version.rewrap_out_count,
    }
}

/// A key's cached versions: the current one's inside the cached key itself
/// (every Wrap uses it: read with the key's own memory, not from another
/// allocation), the others in version order in one allocation (none for a
/// key of one version).
#[derive(Debug)]
struct CachedVersions {
    /// Index (version - 1) of `current`; `usize::MAX` when there is none.
    current_index: usize,
    current: Option<CachedVersion>,
    others: Box<[CachedVersion]>,
}

impl CachedVersions {
    fn new(mut all: Vec<CachedVersion>, current_index: usize) -> Self {
        let current = (current_index < all.len()).then(|| all.remove(current_index));
        let current_index = if current.is_some() { current_index } else { usize::MAX };
        Self { current_index, current, others: all.into_boxed_slice() }
    }

    /// The version at `index` (version - 1).
    fn get(&self, index: usize) -> Option<&CachedVersion> {
        if index == self.current_index {
            self.current.as_ref()
        } else if index < self.current_index {
            self.others.get(index)
        } else {
            self.others.get(index - 1)
        }
    }

    /// Every version with its index, in version order.
    fn iter(&self) -> impl Iterator<Item = (usize, &CachedVersion)> {
        let len = self.others.len() + usize::from(self.current.is_some());
        (0..len).filter_map(|i| self.get(i).map(|v| (i, v)))
    }
}

/// How many bytes of a key's name its cached key keeps inline.
const NAME_INLINE: usize = 22;

/// A key's name as the cache's lookup compares it: its length and first
/// bytes, inside the cached key, so a lookup reads no other memory to tell
/// keys apart, nor to match a name of up to [`NAME_INLINE`] bytes.
#[derive(Debug)]
struct NameTag {
    len: u16,
    head: [u8; NAME_INLINE],
}

impl NameTag {
    fn new(name: &str) -> Self {
        let mut head = [0; NAME_INLINE];
        let n = name.len().min(NAME_INLINE);
        head[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self { len: u16::try_from(name.len()).unwrap_or(u16::MAX), head }
    }

    /// The whole name, when it fits inline (a backend opening a KEK reads
    /// the name: from here, not from the record's copy in other memory).
    fn whole(&self) -> Option<&str> {
        let len = usize::from(self.len);
        if len <= NAME_INLINE { std::str::from_utf8(&self.head[..len]).ok() } else { None }
    }
}

/// A key as cached: its record and what each version needs per call. The
/// fields a call reads come first, in this order (`repr(C)`), so that a
/// Wrap on a key no recent call used touches as few cache lines as it can:
/// a table of a million keys is mostly out of the CPU's caches.
#[derive(Debug)]
#[repr(C)]
pub struct CachedKey {
    name: NameTag,
    /// When a call last used the key (Unix seconds), for the choice of the
    /// keys a full cache lets go.
    used: AtomicU32,
    /// Counted since the last flush took this record's counts: it is in
    /// the keyring's dirty list.
    dirty: AtomicBool,
    /// The keyring's cache holds this record now (set when it goes in,
    /// cleared when it is replaced or let go): a flush re-reads only the
    /// keys whose taken record left the cache.
    cached: AtomicBool,
    versions: CachedVersions,
    /// The stored record.
    pub record: KeyRecord,
    dirty_keys: Weak<DirtyKeys>,
}

/// The records counted on since the last flush: a flush takes the counts of
/// these, not of every cached key. A record is listed by the call that
/// counts on it first, so a record the cache let go (or replaced) is still
/// flushed while a call holds it.
type DirtyKeys = Mutex<std::collections::VecDeque<Arc<CachedKey>>>;

impl CachedKey {
    fn new(record: KeyRecord, previous: Option<&CachedKey>, dirty_keys: &Arc<DirtyKeys>, backends: &Backends) -> Self {
        // Versions are cached only for a record whose versions are in place
        // (`versions[i].version == i + 1`, as every store returns them): a
        // call then finds a version's record by its index without reading
        // it. A record out of place is still served, through its checked
        // lookups, but not Wrapped under (INTERNAL, as for a missing current
        // version).
        let in_place = record.versions.iter().enumerate().all(|(i, v)| v.version as usize == i + 1);
        let cached = if in_place { record.versions.as_slice() } else { &[] };
        let all = cached
            .iter()
            .enumerate()
            .map(|(i, v)| CachedVersion {
                counters: previous.and_then(|p| p.versions.get(i)).map(|p| p.counters.clone()).unwrap_or_default(),
                known: std::array::from_fn(|k| AtomicU64::new(stored(v, COUNT_ORDER[k]))),
                backend: backends.get_mode(&v.backend, v.mode).ok().cloned(),
                opened: OpenedKek::default(),
                reference: InlineRef::new(&v.backend_ref.0),
            })
            .collect();
        let current_index = (record.current_version as usize).wrapping_sub(1);
        Self {
            name: NameTag::new(&record.name),
            used: AtomicU32::new(previous.map_or(0, |p| p.used.load(Ordering::Relaxed))),
            dirty: AtomicBool::new(false),
            cached: AtomicBool::new(false),
            versions: CachedVersions::new(all, current_index),
            record,
            dirty_keys: Arc::downgrade(dirty_keys),
        }
    }

    /// Whether this is the key named `name`: decided by the inline tag
    /// alone for a short name.
    fn is_named(&self, name: &str) -> bool {
        let n = name.len().min(NAME_INLINE);
        usize::from(self.name.len) == name.len()
            && self.name.head[..n] == name.as_bytes()[..n]
            && (name.len() <= NAME_INLINE || self.record.name == name)
    }

    /// Lists this record for the next flush unless it is listed already.
    /// Sequentially consistent with the flush's clearing of the flag and its
    /// taking of the counts, so a count is either taken by a flush or
    /// listed for the next one.
    fn mark_dirty(self: &Arc<Self>) {
        // A plain read first: a listed record (the common case) costs no
        // write to the shared flag.
        if !self.dirty.load(Ordering::SeqCst)
            && !self.dirty.swap(true, Ordering::SeqCst)
            && let Some(list) = self.dirty_keys.upgrade()
        {
            list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back(self.clone());
        }
    }

    /// Notes a use now (a store only when the second changed).
    fn touch(&self) {
        let t = u32::try_from(now_coarse()).unwrap_or(u32::MAX);
        if self.used.load(Ordering::Relaxed) != t {
            self.used.store(t, Ordering::Relaxed);
        }
    }

    fn cached_version(&self, version: u32) -> Option<&CachedVersion> {
        version.checked_sub(1).and_then(|i| self.versions.get(i as usize))
    }

    fn counters(&self, version: u32) -> Option<&VersionCounters> {
        self.cached_version(version).map(|v| v.counters.as_ref())
    }

    /// The current version, read from the cached key's own memory (the
    /// Wrap path reads none of the record); INTERNAL when the record lacks
    /// it.
    pub fn current_version(&self) -> ServiceResult<u32> {
        match self.versions.current {
            Some(_) => Ok(self.versions.current_index as u32 + 1),
            None => Err(self.no_record_of(self.record.current_version)),
        }
    }

    fn no_record_of(&self, version: u32) -> ServiceError {
        ServiceError::internal(format!("key {:?} has no record of its version {version}", self.record.name))
    }

    /// The backend that serves `version` (a version of this key), or
    /// `FAILED_PRECONDITION` when it is not configured on this broker.
    pub fn backend<'a>(&'a self, version: u32, backends: &'a Backends) -> ServiceResult<&'a Arc<dyn KeyBackend>> {
        if let Some(backend) = self.cached_version(version).and_then(|v| v.backend.as_ref()) {
            return Ok(backend);
        }
        let v = self.record.version(version).ok_or_else(|| self.no_record_of(version))?;
        backends.get_mode(&v.backend, v.mode)
    }

    /// `version` (a version of this key) as its backend sees it, with the
    /// place that keeps the KEK the backend opened for it.
    pub fn version_ref(&self, version: u32) -> ServiceResult<VersionRef<'_>> {
        let cached = self.cached_version(version);
        let reference = match cached.and_then(|v| v.reference.get()) {
            Some(reference) => reference,
            None => {
                // A cached version's record is in place: found by its index alone.
                let record = match cached {
                    Some(_) => self.record.versions.get(version as usize - 1),
                    None => self.record.version(version),
                };
                &record.ok_or_else(|| self.no_record_of(version))?.backend_ref.0
            }
        };
        Ok(VersionRef {
            key: self.name.whole().unwrap_or(&self.record.name),
            version,
            reference,
            opened: cached.map(|v| &v.opened),
        })
    }

    /// Counts one event of `count` under `version`.
    pub fn count(self: &Arc<Self>, version: u32, count: Count) {
        self.count_n(version, count, 1);
    }

    /// Counts `n` events of `count` under `version`.
    pub fn count_n(self: &Arc<Self>, version: u32, count: Count, n: u64) {
        if let Some(c) = self.counters(version) {
            c.pending[count as usize].fetch_add(n, Ordering::SeqCst);
            self.mark_dirty();
        }
    }

    /// Counts an unwrap under `version` at `now` (Unix seconds).
    pub fn count_unwrap(self: &Arc<Self>, version: u32, now: i64) {
        if let Some(c) = self.counters(version) {
            c.pending[Count::Unwraps as usize].fetch_add(1, Ordering::SeqCst);
            c.last_unwrap.fetch_max(now, Ordering::Relaxed);
            self.mark_dirty();
        }
    }

    /// Events of `count` under `version`, across every broker sharing the
    /// table (as of their last flush) plus this broker's unflushed ones.
    pub fn total(&self, version: u32, count: Count) -> u64 {
        let k = count as usize;
        match self.cached_version(version) {
            Some(v) => {
                let c = &v.counters;
                v.known[k].load(Ordering::Relaxed)
                    + c.pending[k].load(Ordering::Relaxed)
                    + c.in_flight[k].load(Ordering::Relaxed)
            }
            None => self.record.version(version).map_or(0, |v| stored(v, count)),
        }
    }

    /// Unwraps under `version` (see [`CachedKey::total`]).
    pub fn unwrap_count(&self, version: u32) -> u64 {
        self.total(version, Count::Unwraps)
    }

    /// Wraps under `version` (see [`CachedKey::total`]).
    pub fn wrap_count(&self, version: u32) -> u64 {
        self.total(version, Count::Wraps)
    }

    /// DEKs that still depend on `version`: wrapped under it plus
    /// rewrapped into it, minus rewrapped out of it.
    pub fn outstanding(&self, version: u32) -> u64 {
        (self.total(version, Count::Wraps) + self.total(version, Count::RewrapsIn))
            .saturating_sub(self.total(version, Count::RewrapsOut))
    }

    /// Latest unwrap under `version`, Unix seconds (0 = never).
    pub fn last_unwrap(&self, version: u32) -> i64 {
        let stored = self.record.version(version).map_or(0, |v| v.last_unwrap_at);
        self.counters(version).map_or(stored, |c| stored.max(c.last_unwrap.load(Ordering::Relaxed)))
    }

    /// The current version's record.
    pub fn current(&self) -> ServiceResult<&VersionRecord> {
        self.record.version(self.record.current_version).ok_or_else(|| self.no_record_of(self.record.current_version))
    }

    /// The record of `version` if it may unwrap: it exists, is neither
    /// disabled nor destroyed, and is not below `min_decryption_version`.
    pub fn unwrappable(&self, version: u32) -> ServiceResult<&VersionRecord> {
        let name = &self.record.name;
        let v = self
            .record
            .version(version)
            .ok_or_else(|| ServiceError::new(ErrorCode::NotFound, format!("key {name:?} has no version {version}")))?;
        match v.state {
            VersionState::Destroyed => {
                Err(ServiceError::precondition(format!("version {version} of key {name:?} is destroyed")))
            }
            VersionState::Disabled => {
                Err(ServiceError::precondition(format!("version {version} of key {name:?} is disabled")))
            }
            _ if version < self.record.min_decryption_version => Err(ServiceError::precondition(format!(
                "version {version} of key {name:?} is below its min_decryption_version {}",
                self.record.min_decryption_version
            ))),
            _ => Ok(v),
        }
    }
}

/// The cached keys by name: a table of the records alone, hashed by their
/// own name (no second copy of each name as a map key). Hashed with
/// foldhash, seeded per process: every call hashes a name here, and only
/// names of keys that exist (made by admins) are ever inserted.
struct KeyCache {
    table: hashbrown::HashTable<Arc<CachedKey>>,
    hasher: foldhash::fast::RandomState,
}

impl KeyCache {
    fn new() -> Self {
        Self { table: hashbrown::HashTable::new(), hasher: foldhash::fast::RandomState::default() }
    }

    fn hash(&self, name: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, name)
    }

    fn get(&self, name: &str) -> Option<&Arc<CachedKey>> {
        self.table.find(self.hash(name), |k| k.is_named(name))
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Inserts `key`, replacing the record of the same name.
    fn insert(&mut self, key: Arc<CachedKey>) {
        key.cached.store(true, Ordering::SeqCst);
        let hash = self.hash(&key.record.name);
        let hasher = &self.hasher;
        match self.table.entry(
            hash,
            |k| k.is_named(&key.record.name),
            |k| std::hash::BuildHasher::hash_one(hasher, k.record.name.as_str()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut entry) => {
                std::mem::replace(entry.get_mut(), key).cached.store(false, Ordering::SeqCst);
            }
            hashbrown::hash_table::Entry::Vacant(entry) => {
                entry.insert(key);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(entry) = self.table.find_entry(self.hash(name), |k| k.is_named(name)) {
            entry.remove().0.cached.store(false, Ordering::SeqCst);
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn values(&self) -> impl Iterator<Item = &Arc<CachedKey>> {
        self.table.iter()
    }

    /// Keeps the records `keep` accepts.
    fn retain(&mut self, mut keep: impl FnMut(&Arc<CachedKey>) -> bool) {
        self.table.retain(|key| {
            let kept = keep(key);
            if !kept {
                key.cached.store(false, Ordering::SeqCst);
            }
            kept
        });
    }
}

/// Counts taken from the cache and not yet applied by the store.
struct UsageBatch {
    /// Unique per broker and batch: the store applies an id once.
    id: String,
    /// Shared with the store call, so a retry does not copy it.
    usage: Arc<[UsageRecord]>,
    /// Where the counts came from, to count them as flushed once applied.
    taken: Vec<(Arc<CachedKey>, usize, [u64; COUNTS])>,
    /// Keys listed when it was taken were left for later batches (not keys
    /// listed again while it is written: a busy key is not a backlog).
    more: bool,
}

/// The cached version table.
pub struct Keyring {
    store: Arc<dyn KeyStore>,
    backends: Backends,
    default_backend: String,
    cache: RwLock<KeyCache>,
    /// Most keys held in the cache (the least recently used beyond go).
    max_keys: AtomicUsize,
    /// The records counted on since the last flush.
    dirty: Arc<DirtyKeys>,
    retirement_window_secs: std::sync::atomic::AtomicI64,
    /// The store's change sequence this cache reflects.
    seen_seq: AtomicU64,
    /// Names recently found in neither the cache nor the store, and when:
    /// a flood of unknown names costs one query per name per TTL.
    absent: Mutex<HashMap<String, Instant>>,
    absent_ttl: Duration,
    /// This broker's name on its usage batches.
    broker_id: String,
    batches: AtomicU64,
    /// The batch being written (kept, under its id, until the store has it).
    in_flight: Mutex<Option<UsageBatch>>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
    /// Most keys whose counts one batch takes ([`FLUSH_KEYS`]).
    flush_keys: usize,
    /// The key after which the next look for keys due by wraps reads.
    wrap_scan: Mutex<String>,
    /// Where the broker's own actions (automatic rotation, migration
    /// steps) are recorded.
    audit: std::sync::OnceLock<Arc<crate::security::audit::AuditLog>>,
    /// Lookups answered from the cache, and those that went to the store.
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// How long an unknown key name is answered NOT_FOUND without asking the
/// store again (a key created meanwhile on another broker still shows up
/// within the propagation bound: the change poll clears its entry).
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Most keys a broker caches unless configured (`cache.max_keys`): a table
/// of a million keys fits with room to grow (a cached key takes about
/// 0.85 KiB, BENCHMARKS.md "Many keys").
pub const DEFAULT_MAX_CACHED_KEYS: usize = 2_000_000;
/// A cache over its bound lets go of the least recently used
/// `1 / EVICT_SLICE` of its keys at once: the scan that finds them reads
/// every cached key, so it runs once per this many new keys, and a table a
/// little larger than the cache, used evenly, reads at most about this
/// share of its calls from the store (with an eighth, random-key Wraps over
/// a table one key larger than a million-key cache ran 17% slower here).
const EVICT_SLICE: usize = 64;
/// Keys per store read when the cache is warmed or keys are listed.
const PAGE: usize = 1000;
/// Most keys whose counts one usage batch takes: after traffic over many
/// keys, the counts go out in batches of this many keys (about 0.2 s of
/// SQLite here each), oldest listed first, instead of in one long write.
const FLUSH_KEYS: usize = 20_000;
/// Most unknown names remembered at once.
const ABSENT_CAPACITY: usize = 10_000;

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// [`now`] from the kernel's coarse clock (a few milliseconds behind, read
/// at a fraction of the cost): for the use time every call notes.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn now_coarse() -> i64 {
    rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse).tv_sec
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn now_coarse() -> i64 {
    now()
}

/// `INVALID_ARGUMENT` unless `name` is a valid key name.
pub fn check_key_name(name: &str) -> ServiceResult<()> {
    if is_valid_key_name(name) {
        Ok(())
    } else if name.is_empty() {
        Err(ServiceError::invalid("key name is empty"))
    } else {
        Err(ServiceError::invalid(format!(
            "invalid key name {:?}: use 1..=128 characters of [A-Za-z0-9._-]",
            name.chars().take(140).collect::<String>()
        )))
    }
}

impl Keyring {
    /// A keyring over `store`, creating keys in `default_backend` unless told
    /// otherwise.
    pub fn new(store: Arc<dyn KeyStore>, backends: Backends, default_backend: String) -> Self {
        Self {
            store,
            backends,
            default_backend,
            cache: RwLock::new(KeyCache::new()),
            max_keys: AtomicUsize::new(DEFAULT_MAX_CACHED_KEYS),
            dirty: Arc::default(),
            retirement_window_secs: AtomicI64::new(DEFAULT_RETIREMENT_WINDOW_SECS),
            seen_seq: AtomicU64::new(0),
            absent: Mutex::new(HashMap::new()),
            absent_ttl: DEFAULT_NEGATIVE_TTL,
            broker_id: {
                let mut id = [0u8; 8];
                rand::Rng::fill_bytes(&mut rand::rng(), &mut id);
                id.iter().map(|b| format!("{b:02x}")).collect()
            },
            batches: AtomicU64::new(0),
            in_flight: Mutex::new(None),
            flushing: tokio::sync::Mutex::new(()),
            flush_keys: FLUSH_KEYS,
            wrap_scan: Mutex::new(String::new()),
            audit: std::sync::OnceLock::new(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }

    /// Brings the cache up to the store: reloads every key written (by any
    /// broker) since the change this cache last saw. Returns how many keys
    /// were reloaded. A broker calls it on every poll tick and whenever the
    /// store signals a change.
    pub async fn sync(&self) -> ServiceResult<usize> {
        let seen = self.seen_seq.load(Ordering::Acquire);
        if self.store.change_seq().await? == seen {
            return Ok(0);
        }
        let (seq, names) = self.store.changed_since(seen).await?;
        for name in &names {
            self.forget_absent(name);
            match self.store.get(name).await? {
                Some(record) => {
                    self.install(record);
                }
                None => {
                    self.write_cache().remove(name);
                }
            }
        }
        self.seen_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(names.len())
    }

    /// The store's change sequence this cache reflects.
    pub fn seen_seq(&self) -> u64 {
        self.seen_seq.load(Ordering::Acquire)
    }

    fn lock_absent(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Single inserts and removals: a poisoned map is consistent.
        self.absent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn known_absent(&self, name: &str) -> bool {
        let absent = self.lock_absent();
        absent.get(name).is_some_and(|at| at.elapsed() < self.absent_ttl)
    }

    fn remember_absent(&self, name: &str) {
        let mut absent = self.lock_absent();
        if absent.len() >= ABSENT_CAPACITY {
            let ttl = self.absent_ttl;
            absent.retain(|_, at| at.elapsed() < ttl);
            if absent.len() >= ABSENT_CAPACITY {
                absent.clear();
            }
        }
        absent.insert(name.to_owned(), Instant::now());
    }

    fn forget_absent(&self, name: &str) {
        self.lock_absent().remove(name);
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Sets the audit log of the broker's own actions.
    pub fn set_audit(&self, audit: Arc<crate::security::audit::AuditLog>) {
        let _ = self.audit.set(audit);
    }

    /// Records an action the broker took on its own (identity `keybroker`).
    pub fn audit_action(
        &self,
        rpc: &'static str,
        key: &str,
        version: u32,
        backend: &str,
        result: Result<String, &ServiceError>,
    ) {
        let Some(audit) = self.audit.get() else { return };
        let (code, detail) = match result {
            Ok(action) => (None, action),
            Err(err) => (Some(err.code()), err.message().to_owned()),
        };
        audit.record_detached(crate::security::audit::Record {
            identity: "keybroker".into(),
            rpc,
            key: key.to_owned(),
            version,
            backend: backend.to_owned(),
            code,
            count: 1,
            detail,
            ..Default::default()
        });
    }

    /// Sets how long after its last unwrap a version is kept from being
    /// retired without force.
    pub fn set_retirement_window(&self, seconds: i64) {
        self.retirement_window_secs.store(seconds, Ordering::Relaxed);
    }

    /// Writes this broker's unflushed counts to the store: every key listed
    /// now, in batches of at most [`FLUSH_KEYS`] keys, each with an id of
    /// its own. A batch that failed is retried as it was, under the same
    /// id, before new counts are taken: the store applies a batch id once,
    /// so a flush whose answer was lost neither loses nor doubles counts.
    /// Returns the rows written.
    pub async fn flush_usage(&self) -> ServiceResult<usize> {
        // The keys listed now are taken within this many batches (later
        // ones are listed after them): bounded under any load.
        let batches = self.dirty_len().div_ceil(self.flush_keys) + 1;
        let mut rows = 0;
        for _ in 0..batches {
            let (written, more) = self.flush_usage_batch().await?;
            rows += written;
            if !more {
                break;
            }
        }
        Ok(rows)
    }

    /// Writes one batch: the unflushed counts of at most [`FLUSH_KEYS`]
    /// keys, those listed first (or the batch that failed before). Returns
    /// the rows written and whether keys listed when it was taken were left
    /// for the next batch.
    pub async fn flush_usage_batch(&self) -> ServiceResult<(usize, bool)> {
        let _flushing = self.flushing.lock().await;
        if self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none() {
            let batch = self.take_pending();
            if batch.usage.is_empty() {
                return Ok((0, batch.more));
            }
            *self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(batch);
        }
        let (id, usage, more) = {
            let in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(batch) = in_flight.as_ref() else { return Ok((0, false)) };
            (batch.id.clone(), Arc::clone(&batch.usage), batch.more)
        };
        self.store.record_usage(&id, &usage).await?;
        let done = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let taken = done.map(|b| b.taken).unwrap_or_default();
        for (key, i, n) in &taken {
            for (k, v) in n.iter().enumerate() {
                // Applied: now in the store, and in the record taken from.
                if let Some(version) = key.versions.get(*i) {
                    version.known[k].fetch_add(*v, Ordering::Relaxed);
                    version.counters.in_flight[k].fetch_sub(*v, Ordering::Relaxed);
                }
            }
        }
        // A record read while the batch was on its way holds neither its
        // counts nor their in-flight share: read again the keys whose taken
        // record left the cache (replaced by a newer read, or let go and read
        // again) unless the record cached now is one taken too. Usually none
        // did, so a flush over a million keys makes no lookup here.
        let left: Vec<&str> = taken
            .iter()
            .filter(|(key, _, _)| !key.cached.load(Ordering::SeqCst))
            .map(|(key, _, _)| key.record.name.as_str())
            .collect();
        if !left.is_empty() {
            let records: HashSet<usize> = taken.iter().map(|(key, _, _)| Arc::as_ptr(key).addr()).collect();
            let names: HashSet<&str> = left.into_iter().collect();
            for name in names {
                let current = self.read_cache().get(name).map(|key| Arc::as_ptr(key).addr());
                if current.is_some_and(|current| !records.contains(&current)) {
                    let _ = self.reload(name).await;
                }
            }
        }
        Ok((usage.len(), more))
    }

    fn dirty_len(&self) -> usize {
        self.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Takes the unflushed counts of the keys listed first (at most
    /// `flush_keys` of them) into a new batch.
    fn take_pending(&self) -> UsageBatch {
        let (keys, more): (Vec<Arc<CachedKey>>, bool) = {
            let mut dirty = self.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = dirty.len().min(self.flush_keys);
            (dirty.drain(..n).collect(), !dirty.is_empty())
        };
        let t = now();
        let mut usage = Vec::with_capacity(keys.len());
        let mut taken = Vec::with_capacity(keys.len());
        for key in &keys {
            // Before its counts are taken: a count made after this lists the
            // record again.
            key.dirty.store(false, Ordering::SeqCst);
            for (i, c) in key.versions.iter().map(|(i, v)| (i, &v.counters)) {
                let n: [u64; COUNTS] = std::array::from_fn(|k| {
                    // Moved, not copied: a reader sees each count exactly once.
                    let v = c.pending[k].swap(0, Ordering::SeqCst);
                    c.in_flight[k].fetch_add(v, Ordering::Relaxed);
                    v
                });
                if n.iter().all(|v| *v == 0) {
                    continue;
                }
                let made = n[Count::Wraps as usize] + n[Count::RewrapsIn as usize];
                usage.push(UsageRecord {
                    key: key.record.name.clone(),
                    version: i as u32 + 1,
                    unwraps: n[Count::Unwraps as usize],
                    last_unwrap_at: c.last_unwrap.load(Ordering::Relaxed),
                    wraps: n[Count::Wraps as usize],
                    rewraps_in: n[Count::RewrapsIn as usize],
                    rewraps_out: n[Count::RewrapsOut as usize],
                    // Wraps are timed at the flush, not on the hot path.
                    last_wrap_at: if made > 0 { t } else { 0 },
                });
                taken.push((key.clone(), i, n));
            }
        }
        UsageBatch {
            id: format!("{}-{}", self.broker_id, self.batches.fetch_add(1, Ordering::Relaxed)),
            usage: usage.into(),
            taken,
            more,
        }
    }

    /// The configured backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Sets the most keys the cache holds (at least 1).
    pub fn set_max_keys(&self, max: usize) {
        self.max_keys.store(max.max(1), Ordering::Relaxed);
    }

    /// Takes the store's change sequence as the point the cache follows
    /// from: every later write is seen by [`Keyring::sync`]. Called once,
    /// before serving; the cache fills as keys are used and from
    /// [`Keyring::warm`].
    pub async fn start(&self) -> ServiceResult<()> {
        let seq = self.store.change_seq().await?;
        self.seen_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// Reads the table into the cache page by page, while the broker
    /// serves, until the cache is full: the keys it finds already cached
    /// (used, or reloaded by a change meanwhile) are left as they are.
    /// Returns how many keys it added.
    pub async fn warm(&self) -> ServiceResult<usize> {
        let mut after = String::new();
        let mut added = 0;
        loop {
            let page = self.store.list_page(&after, PAGE).await?;
            let done = page.len() < PAGE;
            after = page.last().map(|k| k.name.clone()).unwrap_or_default();
            let (n, full) = self.install_new(page);
            added += n;
            if done || full {
                return Ok(added);
            }
            // Let calls in between pages.
            tokio::task::yield_now().await;
        }
    }

    /// Caches the keys of `records` not cached yet, while the cache has
    /// room: how many it added, and whether the cache is full.
    fn install_new(&self, records: Vec<KeyRecord>) -> (usize, bool) {
        let max = self.max_keys.load(Ordering::Relaxed);
        let mut cache = self.write_cache();
        let mut added = 0;
        for record in records {
            if cache.len() >= max {
                return (added, true);
            }
            if !cache.contains_key(&record.name) {
                cache.insert(Arc::new(CachedKey::new(record, None, &self.dirty, &self.backends)));
                added += 1;
            }
        }
        (added, false)
    }

    /// Keys in the cache now.
    pub fn cached_len(&self) -> usize {
        self.read_cache().len()
    }

    /// The first `limit` cached keys by name, and how many keys are cached.
    pub fn cached(&self, limit: usize) -> (Vec<Arc<CachedKey>>, usize) {
        let cache = self.read_cache();
        let mut keys: Vec<&Arc<CachedKey>> = cache.values().collect();
        let by_name = |a: &&Arc<CachedKey>, b: &&Arc<CachedKey>| a.record.name.cmp(&b.record.name);
        if keys.len() > limit {
            keys.select_nth_unstable_by(limit, by_name);
            keys.truncate(limit);
        }
        keys.sort_unstable_by(by_name);
        (keys.into_iter().cloned().collect(), cache.len())
    }

    /// Over `max_keys`, lets the least recently used keys go, down to
    /// [`EVICT_SLICE`] under the bound (their unflushed counts stay listed
    /// in `dirty`; a call that still holds one lists it again when it
    /// counts). Returns them, for the caller to drop once it has let go of
    /// the cache's lock (a key's record is freed there, not under it).
    #[must_use = "the keys let go are dropped by the caller, outside the cache's lock"]
    fn evict(&self, cache: &mut KeyCache) -> Vec<Arc<CachedKey>> {
        let max = self.max_keys.load(Ordering::Relaxed);
        if cache.len() <= max {
            return Vec::new();
        }
        let target = max - (max / EVICT_SLICE).max(1).min(max - 1);
        let excess = cache.len() - target;
        let mut stamps: Vec<u32> = cache.values().map(|k| k.used.load(Ordering::Relaxed)).collect();
        let (older, cutoff, _) = stamps.select_nth_unstable(excess - 1);
        let cutoff = *cutoff;
        // Every key used before the cutoff goes, and as many of those used
        // at it as make up the excess.
        let mut at_cutoff = excess - older.iter().filter(|&&t| t < cutoff).count();
        let mut gone = Vec::with_capacity(excess);
        cache.retain(|key| {
            let used = key.used.load(Ordering::Relaxed);
            let go = used < cutoff || (used == cutoff && at_cutoff > 0);
            if go {
                at_cutoff -= usize::from(used == cutoff);
                gone.push(key.clone());
            }
            !go
        });
        gone
    }

    fn lock_wrap_scan(&self) -> std::sync::MutexGuard<'_, String> {
        self.wrap_scan.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, KeyCache> {
        // Every write is a single insert: a panic elsewhere cannot leave the
        // map half-changed, so a poisoned lock is still consistent.
        self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, KeyCache> {
        self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Caches `record` (read from the store) unless a newer record of the
    /// key is cached; returns the cached record, the newer one if so.
    fn install(&self, record: KeyRecord) -> Arc<CachedKey> {
        self.cache_record(record, false)
    }

    /// Caches `record`, a change this broker has just stored, unless a
    /// newer record of the key is cached; returns `record` either way: a
    /// change is answered with its own result, not with one made
    /// concurrently after it (two rotations report two versions).
    fn install_stored(&self, record: KeyRecord) -> Arc<CachedKey> {
        self.cache_record(record, true)
    }

    fn cache_record(&self, record: KeyRecord, own: bool) -> Arc<CachedKey> {
        let mut cache = self.write_cache();
        let previous = cache.get(&record.name).cloned();
        if let Some(p) = &previous {
            // Never replace a newer record with an older one read concurrently.
            if p.record.revision > record.revision {
                // Not cached: for the answer, sharing the counters.
                return if own {
                    Arc::new(CachedKey::new(record, Some(p), &self.dirty, &self.backends))
                } else {
                    p.clone()
                };
            }
        }
        let cached = Arc::new(CachedKey::new(record, previous.as_deref(), &self.dirty, &self.backends));
        if previous.is_none() {
            // Read for a call (or a change): used now, so not the first
            // key the eviction below lets go.
            cached.touch();
        }
        cache.insert(cached.clone());
        // Nothing when the cache is within its bound (a replaced record
        // never takes it over).
        let gone = self.evict(&mut cache);
        drop(cache);
        drop(gone);
        cached
    }

    async fn reload(&self, name: &str) -> ServiceResult<Option<Arc<CachedKey>>> {
        match self.store.get(name).await? {
            Some(record) => {
                self.forget_absent(name);
                Ok(Some(self.install(record)))
            }
            None => {
                self.remember_absent(name);
                Ok(None)
            }
        }
    }

    /// A key, from the cache or else the store. `NOT_FOUND` if it exists in
    /// neither (an unknown name is remembered for a short while, so it does
    /// not cost a query per request).
    pub async fn key(&self, name: &str) -> ServiceResult<Arc<CachedKey>> {
        if let Some(key) = self.read_cache().get(name).cloned() {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            key.touch();
            return Ok(key);
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        check_key_name(name)?;
        if self.known_absent(name) {
            return Err(ServiceError::key_not_found(name));
        }
        self.reload(name).await?.ok_or_else(|| ServiceError::key_not_found(name))
    }

    /// A key read fresh from the store (with the counts every broker has
    /// flushed), for admin reads; the cached record when the store cannot
    /// be read.
    pub async fn fresh(&self, name: &str) -> ServiceResult<Arc<CachedKey>> {
        check_key_name(name)?;
        match self.reload(name).await {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err(ServiceError::key_not_found(name)),
            Err(err) => {
                tracing::warn!(key = name, %err, "version table unreadable; answering from the cache");
                self.read_cache().get(name).cloned().ok_or(err)
            }
        }
    }

    /// A key that should hold `version` (read from a ciphertext): reloaded
    /// from the store when the cached record does not have it yet.
    pub async fn key_for_version(&self, name: &str, version: u32) -> ServiceResult<Arc<CachedKey>> {
        let cached = self.read_cache().get(name).cloned();
        let hit = matches!(&cached, Some(key) if version <= key.record.current_version);
        let counter = if hit { &self.cache_hits } else { &self.cache_misses };
        counter.fetch_add(1, Ordering::Relaxed);
        match cached {
            Some(key) if version <= key.record.current_version => {
                key.touch();
                Ok(key)
            }
            None if self.known_absent(name) => Err(ServiceError::key_not_found(name)),
            _ => self.reload(name).await?.ok_or_else(|| ServiceError::key_not_found(name)),
        }
    }

    /// Lookups answered from the cache and lookups that went to the store
    /// (or were answered from the list of unknown names), since start.
    pub fn cache_counts(&self) -> (u64, u64) {
        (self.cache_hits.load(Ordering::Relaxed), self.cache_misses.load(Ordering::Relaxed))
    }

    /// Keys whose names match `pattern`, after `after`, in name order, at
    /// most `limit` of them; and whether more follow. Read from the store
    /// page by page (from the glob's literal prefix on), with this broker's
    /// counts for the keys it has cached; listing does not fill the cache.
    pub async fn list(
        &self,
        pattern: &globset::GlobMatcher,
        after: &str,
        limit: usize,
    ) -> ServiceResult<(Vec<Arc<CachedKey>>, bool)> {
        let glob = pattern.glob().glob();
        let prefix = &glob[..glob.find(['*', '?', '[', '{', '\\']).unwrap_or(glob.len())];
        // Names that start with `prefix` sort after it minus its last character.
        let floor = &prefix[..prefix.len().saturating_sub(1)];
        let mut cursor = if after < floor { floor.to_owned() } else { after.to_owned() };
        let page_size = limit.saturating_add(1).clamp(1, PAGE);
        let mut found = Vec::new();
        loop {
            let page = self.store.list_page(&cursor, page_size).await?;
            let done = page.len() < page_size;
            cursor = page.last().map(|k| k.name.clone()).unwrap_or_default();
            for record in page {
                if record.name.as_str() > prefix && !record.name.starts_with(prefix) {
                    return Ok(Self::page_of(found, limit));
                }
                if !pattern.is_match(&record.name) {
                    continue;
                }
                let cached = self.read_cache().get(&record.name).cloned();
                found.push(match cached {
                    Some(key) if key.record.revision >= record.revision => key,
                    Some(_) => self.install(record),
                    None => Arc::new(CachedKey::new(record, None, &self.dirty, &self.backends)),
                });
                if found.len() > limit {
                    return Ok(Self::page_of(found, limit));
                }
            }
            if done {
                return Ok(Self::page_of(found, limit));
            }
        }
    }

    fn page_of(mut found: Vec<Arc<CachedKey>>, limit: usize) -> (Vec<Arc<CachedKey>>, bool) {
        let more = found.len() > limit;
        found.truncate(limit);
        (found, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::LocalBackend;
    use crate::backend::root_key::RootKey;
    use crate::store::sqlite::SqliteStore;

    async fn keyring(dir: &tempfile::TempDir) -> Keyring {
        let root = RootKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test").unwrap();
        let mut backends = Backends::default();
        backends.insert(Arc::new(LocalBackend::new("local", root)));
        let store = Arc::new(SqliteStore::open(&dir.path().join("kb.sqlite")).await.unwrap());
        Keyring::new(store, backends, "local".into())
    }

    #[test]
    fn the_coarse_clock_tells_the_same_second() {
        let (before, coarse, after) = (now(), now_coarse(), now());
        // Coarse: up to a tick (a few ms) behind, so at most a second.
        assert!(coarse >= before - 1 && coarse <= after, "{before} {coarse} {after}");
    }

    /// Counts a flush takes from a record that has since left the cache
    /// (replaced by a newer read, or let go and read again) are in the
    /// totals of the record cached after the flush: neither lost nor
    /// counted twice.
    #[tokio::test]
    async fn counts_of_a_record_read_again_before_the_flush_are_in_the_cache_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(&dir).await;
        for name in ["a", "b"] {
            keyring.create(NewKey { name: name.into(), ..Default::default() }).await.unwrap();
        }
        let a = keyring.key("a").await.unwrap();
        let b = keyring.key("b").await.unwrap();
        for _ in 0..3 {
            a.count(1, Count::Wraps);
        }
        b.count_n(1, Count::Wraps, 2);
        // Replaced: the newer record shares the counters.
        keyring.reload("a").await.unwrap();
        assert!(!a.cached.load(Ordering::SeqCst));
        assert_eq!(keyring.key("a").await.unwrap().wrap_count(1), 3);
        // Let go and read again: the new record starts from the store.
        keyring.write_cache().remove("b");
        assert!(!b.cached.load(Ordering::SeqCst));
        assert_eq!(keyring.key("b").await.unwrap().wrap_count(1), 0);

        assert_eq!(keyring.flush_usage().await.unwrap(), 2);
        assert_eq!(keyring.key("a").await.unwrap().wrap_count(1), 3);
        assert_eq!(keyring.key("b").await.unwrap().wrap_count(1), 2);
        // A record still cached is not read again: its own flushed counts hold.
        let b = keyring.key("b").await.unwrap();
        b.count(1, Count::Wraps);
        assert_eq!(keyring.flush_usage().await.unwrap(), 1);
        assert!(Arc::ptr_eq(&b, &keyring.key("b").await.unwrap()));
        assert_eq!(b.wrap_count(1), 3);
    }

    /// A cache one key over its bound lets go of the least recently used
    /// sixty-fourth, not of the key just read for a call, and a key let go
    /// is read again on its next use.
    #[tokio::test]
    async fn a_full_cache_lets_the_least_recently_used_sixty_fourth_go() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(&dir).await;
        keyring.set_max_keys(128);
        let name = |i: usize| format!("k{i:03}");
        let mut keys = Vec::new();
        for i in 0..128 {
            keyring.create(NewKey { name: name(i), ..Default::default() }).await.unwrap();
            keys.push(keyring.key(&name(i)).await.unwrap());
        }
        assert_eq!(keyring.cached_len(), 128);
        // Oldest uses: k000 and k001, then k002 and k003; the rest recent.
        for (i, key) in keys.iter().enumerate() {
            key.used.store(
                match i {
                    0 | 1 => 1,
                    2 | 3 => 2,
                    _ => 100,
                },
                Ordering::Relaxed,
            );
        }
        keyring.create(NewKey { name: name(128), ..Default::default() }).await.unwrap();
        // 129 over a bound of 128: down to 126 (128 less a sixty-fourth).
        assert_eq!(keyring.cached_len(), 126);
        assert!(keyring.read_cache().contains_key(&name(128)));
        let gone: Vec<usize> = (0..128).filter(|&i| !keys[i].cached.load(Ordering::SeqCst)).collect();
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(gone.starts_with(&[0, 1]) && (gone[2] == 2 || gone[2] == 3), "{gone:?}");
        for i in 4..128 {
            assert!(keyring.read_cache().contains_key(&name(i)), "{} let go", name(i));
        }
        // Read again on use, counts and all.
        keys[0].count(1, Count::Wraps);
        keyring.flush_usage().await.unwrap();
        let again = keyring.key(&name(0)).await.unwrap();
        assert!(!Arc::ptr_eq(&again, &keys[0]));
        assert_eq!(again.wrap_count(1), 1);
        assert_eq!(keyring.cached_len(), 127);
    }

    /// A batch takes the counts of at most `flush_keys` keys, those listed
    /// first; a key counted again goes to the back of the list. A flush
    /// writes every key listed when it starts.
    #[tokio::test]
    async fn counts_go_out_in_batches_of_the_keys_listed_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut keyring = keyring(&dir).await;
        keyring.flush_keys = 2;
        for name in ["a", "b", "c"] {
            keyring.create(NewKey { name: name.into(), ..Default::default() }).await.unwrap();
        }
        let wrap = |name: &'static str| {
            let keyring = &keyring;
            async move { keyring.key(name).await.unwrap().count(1, Count::Wraps) }
        };
        let stored = |name: &'static str| {
            let keyring = &keyring;
            async move { keyring.store().get(name).await.unwrap().unwrap().versions[0].wrap_count }
        };
        for name in ["a", "b", "c"] {
            wrap(name).await;
        }
        assert_eq!(keyring.flush_usage_batch().await.unwrap(), (2, true));
        assert_eq!([stored("a").await, stored("b").await, stored("c").await], [1, 1, 0]);
        wrap("a").await;
        assert_eq!(keyring.flush_usage_batch().await.unwrap(), (2, false), "c, then a again");
        assert_eq!([stored("a").await, stored("b").await, stored("c").await], [2, 1, 1]);
        assert_eq!(keyring.flush_usage_batch().await.unwrap(), (0, false));

        for name in ["c", "b", "a"] {
            wrap(name).await;
        }
        assert_eq!(keyring.flush_usage().await.unwrap(), 3, "a flush writes every batch");
        assert_eq!([stored("a").await, stored("b").await, stored("c").await], [3, 2, 2]);
    }

    /// A change this broker stored is answered with its own record even
    /// when a newer one (made concurrently, read by a reload) is cached
    /// already; the cache keeps the newer one.
    #[tokio::test]
    async fn a_stored_change_answers_with_its_own_record_not_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(&dir).await;
        keyring.create(NewKey { name: "a".into(), ..Default::default() }).await.unwrap();
        let mine = keyring.rotate("a", None, None, None).await.unwrap().record.clone();
        let newer = keyring.rotate("a", None, None, None).await.unwrap().record.clone();
        assert_eq!((mine.current_version, newer.current_version), (2, 3));
        assert!(newer.revision > mine.revision);

        let answer = keyring.install_stored(mine.clone());
        assert_eq!(answer.record.current_version, 2, "answered with a newer change");
        assert_eq!(keyring.key("a").await.unwrap().record.current_version, 3, "the cache went back");
        // A record read from the store gives way to the newer one cached.
        assert_eq!(keyring.install(mine).record.current_version, 3);
    }

    /// Names longer than the inline tag, alike in length and in every byte
    /// it holds, are told apart by the rest of the name; a name of exactly
    /// the tag's length, and one a byte longer, by the tag and the length.
    #[tokio::test]
    async fn names_alike_in_their_first_bytes_find_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(&dir).await;
        let head = "t".repeat(NAME_INLINE);
        let names = [format!("{head}-first"), format!("{head}-other"), head.clone(), format!("{head}x")];
        for (i, name) in names.iter().enumerate() {
            let labels = [("n".to_owned(), i.to_string())].into();
            keyring.create(NewKey { name: name.clone(), labels, ..Default::default() }).await.unwrap();
        }
        for (i, name) in names.iter().enumerate() {
            let key = keyring.key(name).await.unwrap();
            assert_eq!(&key.record.name, name);
            assert_eq!(key.record.labels["n"], i.to_string());
        }
        let err = keyring.key(&format!("{head}-third")).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotFound);
        assert_eq!(keyring.cached_len(), names.len());
    }

    /// The current version is kept apart from the others; each version is
    /// found at its own index wherever the current one is.
    #[test]
    fn cached_versions_find_each_version_around_the_current_one() {
        let version = |n: u64| CachedVersion {
            counters: Arc::default(),
            known: std::array::from_fn(|_| AtomicU64::new(n)),
            backend: None,
            opened: OpenedKek::default(),
            reference: InlineRef::new(b""),
        };
        let known = |v: Option<&CachedVersion>| v.map(|v| v.known[0].load(Ordering::Relaxed));
        for current in 0..4 {
            let versions = CachedVersions::new((0..3).map(version).collect(), current);
            for i in 0..3 {
                assert_eq!(known(versions.get(i as usize)), Some(i), "current {current}, index {i}");
            }
            assert!(versions.get(3).is_none());
            assert_eq!(versions.current.is_some(), current < 3);
            let order: Vec<_> = versions.iter().map(|(i, v)| (i, known(Some(v)).unwrap())).collect();
            assert_eq!(order, [(0, 0), (1, 1), (2, 2)]);
        }
    }

    /// A cached version carries the backend that serves it and the KEK that
    /// backend opened for it; a broker without that backend answers
    /// FAILED_PRECONDITION naming it.
    #[tokio::test]
    async fn a_cached_version_carries_its_backend_and_the_kek_it_opened() {
        use crate::core::broker::Broker;
        let dir = tempfile::tempdir().unwrap();
        let keyring = Arc::new(keyring(&dir).await);
        keyring.create(NewKey { name: "a".into(), ..Default::default() }).await.unwrap();
        let broker = Broker::new(keyring.clone(), Default::default());
        let context = Default::default();

        let cached = keyring.key("a").await.unwrap();
        let current = cached.current_version().unwrap();
        assert_eq!(cached.backend(current, keyring.backends()).unwrap().name(), "local");
        let opened = cached.version_ref(current).unwrap().opened.expect("a cached version keeps its opened KEK");
        assert!(opened.kept().open().is_none(), "nothing opened before the first call");
        let wrapped = broker.wrap("a", b"0123456789abcdef", &context).await.unwrap();
        assert_eq!(wrapped.backend, "local");
        assert!(opened.kept().open().is_some(), "the call kept the KEK it opened");
        let unwrapped = broker.unwrap(&wrapped.ciphertext, &context).await.unwrap();
        assert_eq!(unwrapped.plaintext.as_slice(), b"0123456789abcdef");
        assert_eq!(unwrapped.backend, "local");

        // The same table seen by a broker whose only backend has another name.
        let root = RootKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test").unwrap();
        let mut backends = Backends::default();
        backends.insert(Arc::new(LocalBackend::new("elsewhere", root)));
        let other = Arc::new(Keyring::new(keyring.store().clone(), backends, "elsewhere".into()));
        let cached = other.key("a").await.unwrap();
        let Err(err) = cached.backend(cached.current_version().unwrap(), other.backends()) else {
            panic!("a backend this broker does not have was resolved");
        };
        assert_eq!(err.code(), ErrorCode::FailedPrecondition);
        assert!(err.message().contains("\"local\" is not configured"), "{}", err.message());
        let broker = Broker::new(other, Default::default());
        let err = broker.wrap("a", b"0123456789abcdef", &context).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{}", err.message());
        let err = broker.unwrap(&wrapped.ciphertext, &context).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::FailedPrecondition, "{}", err.message());
    }

    /// A cached version hands its backend the name and the reference from
    /// the cached key's own memory when they fit inline (22 bytes of name,
    /// 64 of reference: a local KEK's 61), and from the record otherwise;
    /// either way the same bytes.
    #[tokio::test]
    async fn a_version_ref_reads_short_names_and_references_inline() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(&dir).await;
        let short = "a".repeat(NAME_INLINE);
        let long = "b".repeat(NAME_INLINE + 1);
        for name in [&short, &long] {
            keyring.create(NewKey { name: name.clone(), ..Default::default() }).await.unwrap();
            let cached = keyring.key(name).await.unwrap();
            let v = cached.version_ref(1).unwrap();
            let record = cached.record.version(1).unwrap();
            assert_eq!(v.key, name.as_str());
            assert_eq!(std::ptr::eq(v.key.as_ptr(), cached.record.name.as_ptr()), name.len() > NAME_INLINE, "{name}");
            assert_eq!(v.reference, record.backend_ref.0.as_slice());
            assert_eq!(v.reference.len(), 61);
            assert!(!std::ptr::eq(v.reference.as_ptr(), record.backend_ref.0.as_ptr()), "a 61-byte reference inline");
        }

        // A reference longer than the inline room is read from the record.
        let mut record = keyring.key(&short).await.unwrap().record.clone();
        record.versions[0].backend_ref = crate::backend::BackendRef(vec![7; REF_INLINE + 1]);
        let dirty_keys = Arc::default();
        let cached = CachedKey::new(record, None, &dirty_keys, keyring.backends());
        let v = cached.version_ref(1).unwrap();
        assert_eq!(v.reference, &[7; REF_INLINE + 1][..]);
        assert!(std::ptr::eq(v.reference.as_ptr(), cached.record.versions[0].backend_ref.0.as_ptr()));
        assert!(v.opened.is_some(), "still a cached version");
    }
}
