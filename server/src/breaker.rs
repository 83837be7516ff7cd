//! A circuit breaker for a dependency that can go down (a KMS, an HSM, the
//! version table's database): once a call shows it is unreachable, calls
//! fail at once instead of each waiting for its timeout, except one probe
//! per interval that finds out when it is back. Shared by the backends and
//! the store, below both.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a call is let through to a dependency known to be down.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Down {
    since: Instant,
    reason: String,
    last_probe: Instant,
}

/// The state of one dependency: up, or down since when and why.
#[derive(Debug, Default)]
pub struct Breaker {
    down: Mutex<Option<Down>>,
    /// Whether `down` holds a state (set and cleared under its lock): the
    /// calls to a dependency that is up, nearly all of them, take no lock.
    is_down: AtomicBool,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        // Every critical section replaces the state whole.
        self.down.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Ok` when a call may go ahead: the dependency is up, or it is down
    /// and no probe went through within [`PROBE_INTERVAL`] (this call is
    /// the probe). Otherwise why it is known to be down.
    pub fn admit(&self) -> Result<(), String> {
        if !self.is_down.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut down = self.lock();
        match down.as_mut() {
            None => Ok(()),
            Some(d) if d.last_probe.elapsed() >= PROBE_INTERVAL => {
                d.last_probe = Instant::now();
                Ok(())
            }
            Some(d) => Err(format!(
                "known to be down for {} ms ({}); probing every {} ms",
                d.since.elapsed().as_millis(),
                d.reason,
                PROBE_INTERVAL.as_millis()
            )),
        }
    }

    /// Records that the dependency answered. Returns whether it was down.
    pub fn succeeded(&self) -> bool {
        if !self.is_down.load(Ordering::Acquire) {
            return false;
        }
        let mut down = self.lock();
        self.is_down.store(false, Ordering::Release);
        down.take().is_some()
    }

    /// Records that the dependency could not be reached. Returns whether it
    /// was up until now.
    pub fn failed(&self, reason: &str) -> bool {
        let mut down = self.lock();
        match down.as_mut() {
            Some(d) => {
                reason.clone_into(&mut d.reason);
                // The next probe comes an interval after this one ended, so
                // a probe that waited for a timeout is not followed at once
                // by another.
                d.last_probe = Instant::now();
                false
            }
            None => {
                let now = Instant::now();
                *down = Some(Down { since: now, reason: reason.to_owned(), last_probe: now });
                self.is_down.store(true, Ordering::Release);
                true
            }
        }
    }

    /// Whether the dependency is known to be down.
    pub fn is_down(&self) -> bool {
        self.is_down.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_dependency_gets_one_probe_per_interval() {
        let breaker = Breaker::default();
        assert!(breaker.admit().is_ok());
        assert!(breaker.failed("connection refused"));
        let refused = breaker.admit().unwrap_err();
        assert!(refused.contains("known to be down") && refused.contains("connection refused"), "{refused}");
        std::thread::sleep(PROBE_INTERVAL);
        assert!(breaker.admit().is_ok(), "the probe goes through");
        assert!(breaker.admit().is_err(), "only one probe per interval");
        assert!(breaker.succeeded());
        assert!(breaker.admit().is_ok() && !breaker.is_down());
    }
}
