//! This process as a node of a fleet: its identity and lease, the heartbeat that renews
//! the lease and rescues what dead nodes held, and (on a shared store) the watcher
//! that picks up jobs and controls that other nodes wrote.
//!
//! **Lease and fencing.** A node may send or record a claimed recipient only while the
//! claim was made under its current id and its lease is fresh by its own monotonic
//! clock: renewed less than `3/4 × lease` ago. The database declares it dead only
//! after a whole lease without a heartbeat, so by then the node has stopped sending on
//! its own; a node that was frozen (SIGSTOP, a stalled VM) finds on waking that its
//! lease is stale, sends nothing more, and the store refuses its records (`TakenOver`).
//! Its heartbeat then fails, and it registers again under a new id.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::health::restart_on_panic;
use super::limits::Share;
use super::{Control, Runner};
use crate::domain::*;
use crate::mail::Transport;
use crate::store::{NodeInfo, Rescued, StoreError};

/// Tokens of fleet-wide rate buckets this node has taken and not yet spent, by
/// transport. A refill holds its pool's lock, so one delivery asks the store at a time.
pub(super) type RatePools =
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<u32>>>>;

/// How often the watcher looks for jobs and controls written by other nodes.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// This node's identity and lease.
pub(super) struct Node {
    lease: Duration,
    /// Whether other nodes share the store; without them there is nothing to fence.
    shared: bool,
    address: String,
    state: RwLock<Lease>,
}

struct Lease {
    id: String,
    /// Claims made under `id` may be sent and recorded until then.
    fresh_until: Option<Instant>,
    /// Why the last heartbeat failed, until one succeeds.
    error: Option<String>,
}

fn new_id() -> String {
    let random = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id())
    });
    format!("n-{random:016x}")
}

impl Node {
    pub(super) fn new(lease: Duration, shared: bool, address: String) -> Node {
        Node {
            lease,
            shared,
            address,
            state: RwLock::new(Lease {
                id: new_id(),
                fresh_until: None,
                error: None,
            }),
        }
    }

    /// The id claims are made under now.
    pub(super) fn id(&self) -> String {
        self.state.read().unwrap_or_else(|e| e.into_inner()).id.clone()
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id(),
            address: self.address.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now(),
            heartbeat_age_ms: 0,
            claims: 0,
        }
    }

    /// Whether a claim made under `id` may still be sent or recorded.
    pub(super) fn holds(&self, id: &str) -> bool {
        if !self.shared {
            return true;
        }
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.id == id && state.fresh_until.is_some_and(|until| Instant::now() < until)
    }

    /// The lease was renewed by a heartbeat that started at `at`.
    fn renewed(&self, at: Instant) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.fresh_until = Some(at + self.lease * 3 / 4);
        state.error = None;
    }

    /// A heartbeat failed with `error`.
    fn heartbeat_failed(&self, error: String) {
        self.state.write().unwrap_or_else(|e| e.into_inner()).error = Some(error);
    }

    /// Why the lease is not being renewed, if the last heartbeat failed.
    pub(super) fn heartbeat_error(&self) -> Option<String> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).error.clone()
    }

    /// Taken over: a new id, with no lease until it is registered.
    fn rename(&self) -> String {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.id = new_id();
        state.fresh_until = None;
        state.id.clone()
    }
}

fn log_rescue(rescued: &Rescued) {
    for (job, requeued) in &rescued.requeued {
        tracing::warn!(
            job,
            requeued,
            dead_nodes = ?rescued.nodes,
            "recipients in flight on a node that stopped will be sent again"
        );
    }
    if !rescued.nodes.is_empty() {
        metrics::counter!("letterbox_nodes_rescued_total").increment(rescued.nodes.len() as u64);
    }
}

impl Runner {
    /// Registers this node (rescuing what dead nodes held) and, on a shared store,
    /// starts the heartbeat and the watcher.
    pub(super) async fn join(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let started = Instant::now();
        let rescued = inner
            .store
            .register_node(&inner.node.info(), inner.node.lease)
            .await?;
        inner.node.renewed(started);
        log_rescue(&rescued);
        tracing::info!(
            node = inner.node.id(),
            store = inner.store.name(),
            "node registered"
        );
        let mut tasks = Vec::new();
        // Every node, with either backend; stops with the heartbeat.
        let runner = self.clone();
        tasks.push(tokio::spawn(restart_on_panic("housekeeping", move || {
            let runner = runner.clone();
            async move { runner.housekeeping().await }
        })));
        if inner.store.is_shared() {
            if inner.domains.any() {
                // The others still use the shares they had before this node came: it
                // takes its own once they have had a heartbeat to shrink theirs.
                inner.domains.set_share(Share::Joining);
            }
            // Both live as long as the node; a panic in either starts it again.
            let runner = self.clone();
            tasks.push(tokio::spawn(restart_on_panic("heartbeat", move || {
                let runner = runner.clone();
                async move { runner.heartbeat().await }
            })));
            let runner = self.clone();
            tasks.push(tokio::spawn(restart_on_panic("watcher", move || {
                let runner = runner.clone();
                async move { runner.watch().await }
            })));
        }
        inner
            .fleet_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(tasks);
        Ok(())
    }

    /// Leaves the fleet after the drain: what is still claimed goes back to pending.
    pub(super) async fn leave(&self) {
        let inner = &self.inner;
        inner.fleet_stop.cancel();
        // A heartbeat already under way when the stop came would otherwise land after
        // the deregistration: renewing the lease it just expired (the node then counts
        // as running for a whole lease after it exited), or, finding the row gone,
        // registering the node again under a new id. Wait for it (its statements time
        // out within seconds).
        let tasks = std::mem::take(&mut *inner.fleet_tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(15), task).await.is_err() {
                tracing::warn!("a fleet task did not stop in time; the node deregisters anyway");
            }
        }
        if let Err(e) = inner.store.leave(&inner.node.id()).await {
            tracing::warn!(error = %e, "could not deregister the node; its lease will expire");
        }
    }

    /// Renews the lease every quarter of it, and rescues dead nodes' claims. After a
    /// failed heartbeat it tries again within a second, so a database that comes back
    /// finds this node alive before others can count it dead.
    async fn heartbeat(&self) {
        let inner = &self.inner;
        let every = inner.node.lease / 4;
        let mut failing = false;
        // Heartbeats since this node (last) registered: see `refresh_share`.
        let mut beats: u32 = 0;
        loop {
            let wait = if failing {
                every.min(Duration::from_secs(1))
            } else {
                every
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = inner.fleet_stop.cancelled() => return,
            }
            let started = Instant::now();
            let result = inner.store.heartbeat(&inner.node.id(), inner.node.lease).await;
            let was_failing = failing;
            failing = matches!(&result, Err(e) if e.is_unavailable());
            match result {
                Ok(()) => {
                    inner.node.renewed(started);
                    beats = beats.saturating_add(1);
                    self.refresh_share(beats).await;
                }
                Err(StoreError::TakenOver(why)) => {
                    // Counted dead: the others took its share of the domain caps.
                    inner.domains.set_share(Share::Joining);
                    beats = 0;
                    tracing::warn!(%why, "this node's lease expired; registering again under a new id");
                    let id = inner.node.rename();
                    match inner
                        .store
                        .register_node(&inner.node.info(), inner.node.lease)
                        .await
                    {
                        Ok(rescued) => {
                            inner.node.renewed(started);
                            log_rescue(&rescued);
                            tracing::info!(node = id, "node registered again");
                        }
                        Err(e) => tracing::error!(error = %e, "cannot register the node again"),
                    }
                }
                Err(e) => {
                    // Said once per outage; the job's stall and /readyz show it lasts.
                    if was_failing {
                        tracing::debug!(error = %e, "heartbeat failed again");
                    } else {
                        tracing::warn!(error = %e, "heartbeat failed; claiming stops once the lease is stale");
                    }
                    inner.node.heartbeat_failed(e.to_string());
                }
            }
            match inner.store.rescue().await {
                Ok(rescued) => log_rescue(&rescued),
                Err(e) => tracing::debug!(error = %e, "rescue failed"),
            }
        }
    }

    /// Sets this node's share of the `--domain-limit` caps from the live nodes: the
    /// `rank`-th of `n` nodes by id gets its part of an even split, so the parts add up
    /// to each cap. A node that just joined has no share until its second heartbeat,
    /// by which time every other node has had one and shrunk its own.
    async fn refresh_share(&self, beats: u32) {
        let inner = &self.inner;
        if !inner.domains.any() || beats < 2 {
            return;
        }
        let nodes = match inner.store.nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the nodes; domain shares unchanged");
                return;
            }
        };
        let me = inner.node.id();
        let mut ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        let share = match ids.iter().position(|id| *id == me) {
            Some(rank) => Share::Of {
                nodes: ids.len() as u32,
                rank: rank as u32,
            },
            // Not listed: about to be counted dead.
            None => Share::Joining,
        };
        inner.domains.set_share(share);
    }

    /// Picks up jobs other nodes started or resumed, and passes on the pauses and
    /// cancellations they wrote; wakes idle supervisors so they see recipients that
    /// another node requeued.
    async fn watch(&self) {
        let inner = &self.inner;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = inner.fleet_stop.cancelled() => return,
            }
            if inner.shutdown.is_cancelled() {
                continue;
            }
            // An unsubscribe made on another node reaches the recipients this node
            // already claimed: their next status check reads them again.
            if let Err(e) = inner.store.refresh_status_epoch().await {
                tracing::debug!(error = %e, "cannot read the fleet's status changes");
            }
            // The states are read under the lock local controls hold across their
            // write and signal, so a stale read never undoes a local control.
            let mut active = inner.active.lock().await;
            let jobs = match inner.store.jobs_to_work().await {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the jobs to work on");
                    continue;
                }
            };
            let mut seen = std::collections::HashSet::new();
            for job in &jobs {
                seen.insert(job.id);
                let wanted = Control::for_job(job);
                match active.get(&job.id) {
                    None => self.spawn(&mut active, job.id, wanted),
                    Some(entry) => {
                        let current = *entry.control.borrow();
                        if current != wanted && current != Control::Cancel {
                            let _ = entry.control.send(wanted);
                        } else if wanted == Control::Run {
                            // A nudge: an idle supervisor claims again.
                            entry.control.send_modify(|_| {});
                        }
                    }
                }
            }
            let others: Vec<u64> = active.keys().copied().filter(|id| !seen.contains(id)).collect();
            for id in others {
                let Ok(job) = inner.store.job(id).await else {
                    continue;
                };
                let wanted = match job.state {
                    JobState::Paused => Control::Pause,
                    JobState::Cancelled => Control::Cancel,
                    _ => continue,
                };
                if let Some(entry) = active.get(&id)
                    && *entry.control.borrow() != wanted
                {
                    let _ = entry.control.send(wanted);
                }
            }
        }
    }
}

impl Runner {
    /// On a shared store, waits for a token of the transport's fleet-wide rate (its
    /// `rate` counts for the whole fleet, not per node): tokens come from the store's
    /// bucket for the transport, a tenth of a second's worth at a time, so no node can
    /// run ahead of the others by more than that. The transport's own limiter still
    /// spaces this node's messages evenly. If the store cannot be asked, nothing is
    /// sent: a rate limit fails closed.
    pub(super) async fn fleet_rate_token(&self, transport: &Transport) {
        let inner = &self.inner;
        let Some(rate) = transport.rate() else { return };
        if !inner.store.is_shared() {
            return;
        }
        let per_second = f64::from(rate.messages) / rate.per.as_secs_f64();
        let burst = (per_second / 10.0).max(1.0);
        let want = burst.floor() as u32;
        let pool = {
            let mut pools = inner.rate_pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.entry(transport.name().to_string()).or_default().clone()
        };
        let bucket = format!("transport:{}", transport.name());
        let mut pool = pool.lock().await;
        loop {
            if *pool > 0 {
                *pool -= 1;
                return;
            }
            match inner.store.take_tokens(&bucket, per_second, burst, want).await {
                Ok((granted, _)) if granted > 0 => *pool += granted,
                Ok((_, wait)) => tokio::time::sleep(wait).await,
                Err(e) => {
                    tracing::warn!(error = %e, transport = transport.name(), "cannot take a rate token; waiting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
