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

/// One capped domain's slots on this node: a semaphore sized to the node's share of
/// the cap. `size` is what it should hold; `debt` counts permits given out that must
/// be forgotten instead of returned, because the share shrank while they were held.
struct DomainSlots {
    semaphore: Arc<Semaphore>,
    size: u32,
    debt: u32,
}

type Slots = Arc<Mutex<HashMap<String, Arc<Mutex<DomainSlots>>>>>;

/// This node's place in the fleet, which decides its share of every domain's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Share {
    /// Alone (redb), or every node's share is the whole cap: all of it.
    Whole,
    /// One of `nodes` live nodes, the `rank`-th by id.
    Of { nodes: u32, rank: u32 },
    /// Just joined a fleet: no slots until the other nodes have made room.
    Joining,
}

impl Share {
    /// This node's part of `cap`: an even split, the remainder to the lowest ranks, so
    /// the parts add up to the cap; never less than one slot, so with fewer slots than
    /// nodes the fleet as a whole may use one per node.
    pub(super) fn of(self, cap: u32) -> u32 {
        match self {
            Share::Whole => cap,
            Share::Joining => 0,
            Share::Of { nodes, rank } => {
                let nodes = nodes.max(1);
                let part = cap / nodes + u32::from(rank < cap % nodes);
                part.max(1)
            }
        }
    }
}

/// One semaphore per capped domain, shared by every job: the cap is on what the
/// receiving provider sees, whichever letters it comes from. Semaphores exist only while
/// someone holds or waits for one, so a list with 100k domains costs nothing at rest.
///
/// In a fleet each node holds its share of each cap (`Share`), recomputed from the
/// live nodes at every heartbeat, so the nodes' shares add up to the cap.
pub(super) struct DomainLimiter {
    limits: DomainLimits,
    slots: Slots,
    share: Mutex<Share>,
}

/// A held slot for one domain; frees it (and forgets an idle domain) when dropped.
pub(super) struct DomainPermit {
    permit: Option<OwnedSemaphorePermit>,
    domain: String,
    slots: Slots,
}

impl Drop for DomainPermit {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(permit) = self.permit.take()
            && let Some(domain) = slots.get(&self.domain)
        {
            let mut domain = domain.lock().unwrap_or_else(|e| e.into_inner());
            if domain.debt > 0 {
                // The share shrank: this slot is no longer the node's to use.
                domain.debt -= 1;
                permit.forget();
            }
        }
        // Only the map holds it: nobody has or waits for a slot of this domain.
        if slots.get(&self.domain).is_some_and(|s| {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            Arc::strong_count(&s.semaphore) == 1
        }) {
            slots.remove(&self.domain);
        }
    }
}

impl DomainLimiter {
    pub(super) fn new(limits: DomainLimits) -> Self {
        DomainLimiter {
            limits,
            slots: Default::default(),
            share: Mutex::new(Share::Whole),
        }
    }

    /// Whether any domain is capped.
    pub(super) fn any(&self) -> bool {
        self.limits.default.is_some() || !self.limits.per_domain.is_empty()
    }

    /// Sets this node's share of every cap, resizing the semaphores in use.
    pub(super) fn set_share(&self, share: Share) {
        // Under the map's lock, as `acquire` reads the share: a semaphore made while
        // the share changes is made at the new size or resized here.
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut current = self.share.lock().unwrap_or_else(|e| e.into_inner());
            if *current == share {
                return;
            }
            *current = share;
        }
        for (name, domain) in slots.iter() {
            let Some(cap) = self.limits.limit_for(name) else {
                continue;
            };
            let mut domain = domain.lock().unwrap_or_else(|e| e.into_inner());
            resize(&mut domain, share.of(cap));
        }
    }

    /// Waits for a slot for `domain`; `None` when the domain has no cap.
    pub(super) async fn acquire(&self, domain: &str) -> Option<DomainPermit> {
        let limit = self.limits.limit_for(domain)?;
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let share = *self.share.lock().unwrap_or_else(|e| e.into_inner());
            let size = share.of(limit);
            let entry = slots.entry(domain.to_string()).or_insert_with(|| {
                Arc::new(Mutex::new(DomainSlots {
                    semaphore: Arc::new(Semaphore::new(size as usize)),
                    size,
                    debt: 0,
                }))
            });
            entry.lock().unwrap_or_else(|e| e.into_inner()).semaphore.clone()
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

/// Makes a domain's semaphore hold `size` slots: adds permits, or forgets free ones and
/// owes the rest (forgotten as they come back).
fn resize(domain: &mut DomainSlots, size: u32) {
    if size > domain.size {
        let mut grow = size - domain.size;
        // Cancel debt first: those permits are still out and may simply come back.
        let cancelled = grow.min(domain.debt);
        domain.debt -= cancelled;
        grow -= cancelled;
        domain.semaphore.add_permits(grow as usize);
    } else if size < domain.size {
        let shrink = (domain.size - size) as usize;
        let forgotten = domain.semaphore.forget_permits(shrink);
        domain.debt += (shrink - forgotten) as u32;
    }
    domain.size = size;
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

    #[test]
    fn fleet_shares_add_up_to_the_cap() {
        for cap in 1..20 {
            for nodes in 1..6 {
                let parts: Vec<u32> = (0..nodes).map(|rank| Share::Of { nodes, rank }.of(cap)).collect();
                let sum: u32 = parts.iter().sum();
                // Below one slot per node, each node still gets one.
                assert_eq!(sum, cap.max(nodes), "cap {cap}, {nodes} nodes: {parts:?}");
                let spread = parts.iter().max().unwrap() - parts.iter().min().unwrap();
                assert!(spread <= 1, "cap {cap}, {nodes} nodes: {parts:?}");
            }
        }
        assert_eq!(Share::Whole.of(5), 5);
        assert_eq!(Share::Joining.of(5), 0);
    }

    #[tokio::test]
    async fn a_smaller_share_takes_effect_as_held_slots_come_back() {
        let mut limits = DomainLimits::default();
        limits.add("capped.example=4").unwrap();
        let limiter = DomainLimiter::new(limits);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(limiter.acquire("capped.example").await.unwrap());
        }
        // Another node joined: this one's share is 2 of the 4.
        limiter.set_share(Share::Of { nodes: 2, rank: 0 });
        let wait = Duration::from_millis(50);
        held.truncate(2); // two come back, and are forgotten
        let more = tokio::time::timeout(wait, limiter.acquire("capped.example")).await;
        assert!(more.is_err(), "two slots are held: the whole share");
        held.pop();
        let more = tokio::time::timeout(wait, limiter.acquire("capped.example")).await;
        assert!(more.is_ok(), "one of the share is free again");
        drop(more);
        // The other node left: the whole cap again.
        limiter.set_share(Share::Whole);
        let mut again = Vec::new();
        for _ in 0..3 {
            let permit = tokio::time::timeout(wait, limiter.acquire("capped.example")).await;
            again.push(permit.expect("the cap grew back to 4"));
        }
        let more = tokio::time::timeout(wait, limiter.acquire("capped.example")).await;
        assert!(more.is_err(), "four are held: the cap");
    }

    #[tokio::test]
    async fn a_joining_node_waits_for_its_share() {
        let mut limits = DomainLimits::default();
        limits.add("capped.example=3").unwrap();
        let limiter = DomainLimiter::new(limits);
        limiter.set_share(Share::Joining);
        let wait = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(wait, limiter.acquire("free.example"))
                .await
                .is_ok()
        );
        let waiting = tokio::spawn({
            let limiter = Arc::new(limiter);
            let inner = limiter.clone();
            async move {
                let acquire = tokio::spawn(async move { inner.acquire("capped.example").await.is_some() });
                tokio::time::sleep(wait).await;
                assert!(!acquire.is_finished(), "no slot while joining");
                limiter.set_share(Share::Of { nodes: 3, rank: 2 });
                acquire.await.unwrap()
            }
        });
        assert!(waiting.await.unwrap(), "a slot once the share is known");
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

/// A recipient domain whose sends this node holds back because its receiver kept
/// refusing the sender (5.7.x).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct DomainPause {
    pub domain: String,
    /// Until when (unix ms); its recipients wait until then, their attempts not used up.
    pub until_ms: u64,
    /// How many refusals, within how long, and the last one's words.
    pub reason: String,
}

/// Refusals of the sender per recipient domain on this node, and the domains they
/// paused (`bounces::BlockLimit`). Per node: a block is usually of the sending IP.
pub(super) struct DomainBlocks {
    limit: crate::bounces::BlockLimit,
    domains: Mutex<HashMap<String, Blocks>>,
}

#[derive(Default)]
struct Blocks {
    times: VecDeque<Instant>,
    paused: Option<(Instant, DomainPause)>,
}

impl DomainBlocks {
    pub(super) fn new(limit: crate::bounces::BlockLimit) -> Self {
        DomainBlocks {
            limit,
            domains: Default::default(),
        }
    }

    /// Notes one refusal of the sender by `domain`'s receiver; returns the pause it
    /// starts, if it is the one that reaches the limit.
    pub(super) fn note(&self, domain: &str, reply: &str) -> Option<DomainPause> {
        let now = Instant::now();
        let mut domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        // Forget domains with nothing recent and no pause, so the map stays small.
        domains.retain(|_, b| {
            b.paused.as_ref().is_some_and(|(until, _)| *until > now)
                || b.times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) <= self.limit.window)
        });
        let blocks = domains.entry(domain.to_string()).or_default();
        blocks.times.push_back(now);
        while blocks
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.limit.window)
        {
            blocks.times.pop_front();
        }
        let paused = blocks.paused.as_ref().is_some_and(|(until, _)| *until > now);
        if paused || blocks.times.len() < self.limit.after as usize {
            return None;
        }
        let pause = DomainPause {
            domain: domain.to_string(),
            until_ms: crate::domain::now_ms() + self.limit.pause.as_millis() as u64,
            reason: format!(
                "{} refusals of the sender within {} (the last: {reply})",
                blocks.times.len(),
                humantime::format_duration(self.limit.window)
            ),
        };
        blocks.times.clear();
        blocks.paused = Some((now + self.limit.pause, pause.clone()));
        Some(pause)
    }

    /// The pause `domain` is under, if any.
    pub(super) fn paused(&self, domain: &str) -> Option<DomainPause> {
        let domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let (until, pause) = domains.get(domain)?.paused.as_ref()?;
        (*until > Instant::now()).then(|| pause.clone())
    }

    /// Every domain paused now, by name.
    pub(super) fn all(&self) -> Vec<DomainPause> {
        let now = Instant::now();
        let domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<DomainPause> = domains
            .values()
            .filter_map(|b| b.paused.as_ref().filter(|(until, _)| *until > now))
            .map(|(_, pause)| pause.clone())
            .collect();
        out.sort_by(|a, b| a.domain.cmp(&b.domain));
        out
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;

    #[test]
    fn refusals_pause_a_domain_at_the_limit_and_only_then() {
        let blocks = DomainBlocks::new(crate::bounces::BlockLimit {
            after: 3,
            window: Duration::from_secs(60),
            pause: Duration::from_secs(60),
        });
        assert_eq!(blocks.note("gmail.com", "550 5.7.1 no"), None);
        assert_eq!(blocks.note("yahoo.com", "550 5.7.1 no"), None);
        assert_eq!(blocks.note("gmail.com", "550 5.7.1 no"), None);
        assert_eq!(blocks.paused("gmail.com"), None);
        let pause = blocks
            .note("gmail.com", "550 5.7.1 spam")
            .expect("the third pauses");
        assert!(
            pause.reason.contains("3 refusals of the sender within 1m"),
            "{}",
            pause.reason
        );
        assert!(pause.reason.contains("550 5.7.1 spam"));
        assert_eq!(blocks.paused("gmail.com"), Some(pause.clone()));
        assert_eq!(blocks.paused("yahoo.com"), None);
        assert_eq!(blocks.note("gmail.com", "again"), None, "already paused");
        assert_eq!(blocks.all(), [pause]);
    }

    #[test]
    fn a_pause_ends() {
        let blocks = DomainBlocks::new(crate::bounces::BlockLimit {
            after: 1,
            window: Duration::from_secs(60),
            pause: Duration::from_millis(1),
        });
        assert!(blocks.note("gmail.com", "550 5.7.1").is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(blocks.paused("gmail.com"), None);
        assert!(blocks.all().is_empty());
    }
}
