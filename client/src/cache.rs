//! An optional cache of data keys for [`crate::blob::BlobEncryptor`], with
//! the limits of the AWS Encryption SDK's caching: a required maximum age,
//! and maximum messages and bytes per data key. Off unless asked for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::sidecar::Sidecar;

/// How long and how much one cached data key may be used.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// A data key older than this is never used again (required).
    pub max_age: Duration,
    /// Blobs sealed with one data key at most.
    pub max_messages: u64,
    /// Plaintext bytes sealed with one data key at most.
    pub max_bytes: u64,
    /// Most data keys held at once (each direction).
    pub capacity: usize,
}

impl CachePolicy {
    /// A policy with `max_age` and no message or byte limit below the safe
    /// defaults (2^32 messages, unlimited bytes), holding 1000 keys.
    pub fn new(max_age: Duration) -> Self {
        Self { max_age, max_messages: 1 << 32, max_bytes: u64::MAX, capacity: 1000 }
    }

    /// At most `n` blobs per data key.
    pub fn with_max_messages(mut self, n: u64) -> Self {
        self.max_messages = n;
        self
    }

    /// At most `n` plaintext bytes per data key.
    pub fn with_max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }
}

/// A DEK shared by the cache and the blobs that use it.
pub(crate) type SharedDek = Arc<Zeroizing<Vec<u8>>>;

struct EncryptEntry {
    dek: SharedDek,
    sidecar: Sidecar,
    created: Instant,
    messages: u64,
    bytes: u64,
}

struct DecryptEntry {
    dek: SharedDek,
    created: Instant,
}

/// The cache itself: one side for sealing (by key and context), one for
/// opening (by wrapped DEK).
pub(crate) struct DekCache {
    policy: CachePolicy,
    seal: Mutex<HashMap<String, EncryptEntry>>,
    /// By wrapped DEK and canonical context: a DEK unwrapped under one
    /// context is never handed to a blob that claims another.
    open: Mutex<HashMap<(Vec<u8>, String), DecryptEntry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Entries are inserted and removed whole; a poisoned map is consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DekCache {
    pub(crate) fn new(policy: CachePolicy) -> Self {
        Self { policy, seal: Mutex::new(HashMap::new()), open: Mutex::new(HashMap::new()) }
    }

    /// A cached DEK for sealing `len` more bytes under `id`, counted as used;
    /// `None` when absent or when using it would break a limit.
    pub(crate) fn take_for_seal(&self, id: &str, len: u64) -> Option<(SharedDek, Sidecar)> {
        let mut seal = lock(&self.seal);
        let entry = seal.get_mut(id)?;
        let fresh = entry.created.elapsed() < self.policy.max_age;
        let room =
            entry.messages < self.policy.max_messages && entry.bytes.saturating_add(len) <= self.policy.max_bytes;
        if fresh && room {
            entry.messages += 1;
            entry.bytes += len;
            return Some((entry.dek.clone(), entry.sidecar.clone()));
        }
        seal.remove(id);
        None
    }

    /// Caches a DEK just used to seal `len` bytes under `id`.
    pub(crate) fn put_for_seal(&self, id: String, dek: SharedDek, sidecar: Sidecar, len: u64) {
        if self.policy.max_messages <= 1 || len > self.policy.max_bytes {
            return;
        }
        let mut seal = lock(&self.seal);
        evict_oldest(&mut seal, self.policy.capacity, |e| e.created);
        seal.insert(id, EncryptEntry { dek, sidecar, created: Instant::now(), messages: 1, bytes: len });
    }

    /// The DEK of a wrapped DEK unwrapped under `context` (canonical form)
    /// recently enough.
    pub(crate) fn get_for_open(&self, wrapped: &[u8], context: &str) -> Option<SharedDek> {
        let mut open = lock(&self.open);
        let id = (wrapped.to_vec(), context.to_owned());
        let entry = open.get(&id)?;
        if entry.created.elapsed() < self.policy.max_age {
            return Some(entry.dek.clone());
        }
        open.remove(&id);
        None
    }

    /// Caches a DEK unwrapped under `context` (canonical form).
    pub(crate) fn put_for_open(&self, wrapped: Vec<u8>, context: String, dek: SharedDek) {
        let mut open = lock(&self.open);
        evict_oldest(&mut open, self.policy.capacity, |e| e.created);
        open.insert((wrapped, context), DecryptEntry { dek, created: Instant::now() });
    }
}

fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    capacity: usize,
    age: impl Fn(&V) -> Instant,
) {
    while map.len() >= capacity.max(1) {
        let Some(oldest) = map.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| k.clone()) else { return };
        map.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwrapped_dek_is_only_reused_under_the_same_context() {
        let cache = DekCache::new(CachePolicy::new(Duration::from_secs(60)));
        let dek: SharedDek = Arc::new(Zeroizing::new(vec![9; 32]));
        cache.put_for_open(b"wrapped".to_vec(), r#"{"tenant":"a"}"#.to_owned(), dek);
        assert!(cache.get_for_open(b"wrapped", r#"{"tenant":"a"}"#).is_some());
        assert!(cache.get_for_open(b"wrapped", r#"{"tenant":"b"}"#).is_none(), "a DEK crossed tenants");
        assert!(cache.get_for_open(b"wrapped", "{}").is_none());
    }
}
