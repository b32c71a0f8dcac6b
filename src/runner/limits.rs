//! The runner's bookkeeping that is not durable: restart intensity, the per-domain
//! concurrency caps and each running job's recent rate.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Restart intensity, as OTP supervisors have it: more than `max` policy failures
/// within `window` pause the job instead of failing the rest of the list.
#[derive(Debug, Clone, Copy)]
pub struct FailureLimit {
    pub max: u32,
    pub window: Duration,
}

impl Default for FailureLimit {
    fn default() -> Self {
        FailureLimit {
            max: 20,
            window: Duration::from_secs(10),
        }
    }
}

/// Failure times within the sliding window.
pub(super) struct FailureWindow {
    limit: FailureLimit,
    times: VecDeque<Instant>,
}

impl FailureWindow {
    pub(super) fn new(limit: FailureLimit) -> Self {
        FailureWindow {
            limit,
            times: Default::default(),
        }
    }

    /// Notes one failure; true when the limit is exceeded.
    pub(super) fn record(&mut self) -> bool {
        let now = Instant::now();
        self.times.push_back(now);
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.limit.window)
        {
            self.times.pop_front();
        }
        self.times.len() > self.limit.max as usize
    }
}

/// Concurrent deliveries allowed per recipient domain, e.g. `gmail.com=5`, with an
/// optional default for every other domain (`*=10`). No entry and no default: no cap.
#[derive(Debug, Clone, Default)]
pub struct DomainLimits {
    pub default: Option<u32>,
    pub per_domain: HashMap<String, u32>,
}

impl DomainLimits {
    /// Adds one `DOMAIN=N` (or `*=N`) entry.
    pub fn add(&mut self, entry: &str) -> Result<(), String> {
        let bad = || format!("invalid domain limit {entry:?}: expected DOMAIN=N or *=N with N > 0");
        let (domain, n) = entry.split_once('=').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
        let domain = domain.trim().to_ascii_lowercase();
        if domain.is_empty() {
            return Err(bad());
        }
        if domain == "*" {
            self.default = Some(n);
        } else {
            self.per_domain.insert(domain, n);
        }
        Ok(())
    }

    fn limit_for(&self, domain: &str) -> Option<u32> {
        self.per_domain.get(domain).copied().or(self.default)
    }
}

type Slots = Arc<Mutex<HashMap<String, Arc<Semaphore>>>>;

/// One semaphore per capped domain, shared by every job: the cap is on what the
/// receiving provider sees, whichever letters it comes from. Semaphores exist only while
/// someone holds or waits for one, so a list with 100k domains costs nothing at rest.
pub(super) struct DomainLimiter {
    limits: DomainLimits,
    slots: Slots,
}

/// A held slot for one domain; frees it (and forgets an idle domain) when dropped.
pub(super) struct DomainPermit {
    permit: Option<OwnedSemaphorePermit>,
    domain: String,
    slots: Slots,
}

impl Drop for DomainPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map holds it: nobody has or waits for a slot of this domain.
        if slots.get(&self.domain).is_some_and(|s| Arc::strong_count(s) == 1) {
            slots.remove(&self.domain);
        }
    }
}

impl DomainLimiter {
    pub(super) fn new(limits: DomainLimits) -> Self {
        DomainLimiter {
            limits,
            slots: Default::default(),
        }
    }

    /// Waits for a slot for `domain`; `None` when the domain has no cap.
    pub(super) async fn acquire(&self, domain: &str) -> Option<DomainPermit> {
        let limit = self.limits.limit_for(domain)?;
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(domain.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(limit as usize)))
                .clone()
        };
        // Build the guard before waiting, so a cancelled wait still cleans up.
        let mut guard = DomainPermit {
            permit: None,
            domain: domain.to_string(),
            slots: self.slots.clone(),
        };
        // The semaphore is never closed.
        guard.permit = semaphore.acquire_owned().await.ok();
        Some(guard)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.slots.lock().unwrap().len()
    }
}

/// Recent throughput of one job: completions per second over the last few seconds.
pub(super) struct RateMeter {
    /// (second since `start`, completions in that second), oldest first.
    buckets: VecDeque<(u64, u64)>,
    start: Instant,
}

const RATE_WINDOW_SECS: u64 = 10;

impl RateMeter {
    pub(super) fn new() -> Self {
        RateMeter {
            buckets: VecDeque::new(),
            start: Instant::now(),
        }
    }

    pub(super) fn add(&mut self, n: u64) {
        let second = self.start.elapsed().as_secs();
        match self.buckets.back_mut() {
            Some((s, count)) if *s == second => *count += n,
            _ => self.buckets.push_back((second, n)),
        }
        while self
            .buckets
            .front()
            .is_some_and(|(s, _)| *s + RATE_WINDOW_SECS < second)
        {
            self.buckets.pop_front();
        }
    }

    /// Completions per second over the window (or since the meter started, if sooner).
    pub(super) fn per_second(&self) -> f64 {
        let elapsed = self.start.elapsed().as_secs_f64();
        let now = elapsed as u64;
        let recent: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s + RATE_WINDOW_SECS >= now)
            .map(|(_, n)| n)
            .sum();
        let span = elapsed.min(RATE_WINDOW_SECS as f64 + 1.0).max(1.0);
        recent as f64 / span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_window_trips_only_past_the_limit() {
        let mut window = FailureWindow::new(FailureLimit {
            max: 2,
            window: Duration::from_secs(60),
        });
        assert!(!window.record());
        assert!(!window.record());
        assert!(
            window.record(),
            "the third failure within the window exceeds max = 2"
        );

        let mut expired = FailureWindow::new(FailureLimit {
            max: 1,
            window: Duration::from_millis(1),
        });
        assert!(!expired.record());
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            !expired.record(),
            "failures older than the window no longer count"
        );
    }

    #[test]
    fn domain_limits_parse() {
        let mut limits = DomainLimits::default();
        limits.add("Gmail.com=5").unwrap();
        limits.add("*=10").unwrap();
        assert_eq!(limits.limit_for("gmail.com"), Some(5));
        assert_eq!(limits.limit_for("example.org"), Some(10));
        for bad in ["gmail.com", "gmail.com=0", "=3", "x=y"] {
            assert!(limits.add(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn domain_slots_cap_and_are_forgotten_when_idle() {
        let mut limits = DomainLimits::default();
        limits.add("capped.example=1").unwrap();
        let limiter = DomainLimiter::new(limits);
        assert!(limiter.acquire("free.example").await.is_none());
        let first = limiter.acquire("capped.example").await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(50), limiter.acquire("capped.example")).await;
        assert!(second.is_err(), "a second slot must wait while the first is held");
        drop(first);
        let again = limiter.acquire("capped.example").await.unwrap();
        drop(again);
        assert_eq!(limiter.tracked(), 0, "idle domains are forgotten");
    }
}
