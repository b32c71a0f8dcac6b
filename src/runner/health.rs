//! A failing store as a visible state that heals: which jobs are stalled on the store
//! here, since when and why, and how long to wait before trying again.
//!
//! When the store cannot be written (PostgreSQL down or unreachable, redb on a full
//! disk, an I/O error), a job's supervisor does not end: it stops claiming, keeps the
//! deliveries already in flight, marks the job stalled with the store's error, and
//! tries again with a growing pause (`Backoff`). Outcomes that cannot be recorded are
//! retried for recording, never dropped. The first store operation that succeeds again
//! clears the stall, and the job goes on by itself.
//!
//! The same for a crash: `restart_on_panic` runs a long-lived task (a node's heartbeat,
//! its watcher) and starts it again after a panic, with the same growing pause.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Why a job is not progressing, and since when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Stall {
    /// The store's error, as the job last met it.
    pub reason: String,
    /// When the job first stalled (unix seconds).
    pub since: u64,
}

/// The jobs stalled on the store on this node.
#[derive(Default)]
pub(super) struct Stalls(Mutex<HashMap<u64, Stall>>);

impl Stalls {
    /// Marks `job` stalled because of `reason`, keeping when it first stalled.
    pub(super) fn stall(&self, job: u64, reason: impl ToString) {
        let reason = reason.to_string();
        let mut stalls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match stalls.get_mut(&job) {
            Some(stall) => stall.reason = reason,
            None => {
                tracing::warn!(
                    job,
                    reason,
                    "job stalled: the store is failing; it goes on once the store answers"
                );
                metrics::counter!("letterbox_job_stalls_total").increment(1);
                stalls.insert(
                    job,
                    Stall {
                        reason,
                        since: crate::domain::now(),
                    },
                );
            }
        }
    }

    /// The store answered `job` again.
    pub(super) fn clear(&self, job: u64) {
        let mut stalls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stall) = stalls.remove(&job) {
            let seconds = crate::domain::now().saturating_sub(stall.since);
            tracing::info!(
                job,
                stalled_seconds = seconds,
                "job goes on: the store answers again"
            );
        }
    }

    pub(super) fn get(&self, job: u64) -> Option<Stall> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
            .cloned()
    }

    pub(super) fn all(&self) -> Vec<(u64, Stall)> {
        let stalls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = stalls.iter().map(|(id, s)| (*id, s.clone())).collect();
        all.sort_by_key(|(id, _)| *id);
        all
    }
}

/// Pauses between attempts at a failing store: 250 ms, doubling, at most 2 s, so a
/// store that comes back is noticed within 2 s and one that stays down costs a few
/// attempts a second.
pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(2);

    pub(super) fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The pause before the next attempt; each call doubles the one after.
    pub(super) fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Runs the task `make` makes until it ends by itself, starting a new one (after a
/// pause: `Backoff`) each time one panics. For long-lived tasks whose death would
/// otherwise go unnoticed while the process lives on: a node without its heartbeat
/// would be counted dead by the fleet and fence itself out for good.
pub(crate) async fn restart_on_panic<F, Fut>(task: &'static str, make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures_util::FutureExt;
    let mut backoff = Backoff::new();
    loop {
        match std::panic::AssertUnwindSafe(make()).catch_unwind().await {
            Ok(()) => return,
            Err(payload) => {
                let why = crate::logging::panic_message(payload.as_ref());
                metrics::counter!("letterbox_task_restarts_total", "task" => task).increment(1);
                let pause = backoff.next();
                tracing::error!(task, panic = %why, ?pause, "a task panicked: it starts again");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..6).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next().as_millis(), 250);
    }

    #[tokio::test]
    async fn a_task_that_panics_is_started_again_and_one_that_ends_is_not() {
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = runs.clone();
        restart_on_panic("test", move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn a_stall_keeps_its_start_and_takes_the_latest_reason() {
        let stalls = Stalls::default();
        stalls.stall(7, "disk full");
        let first = stalls.get(7).unwrap();
        stalls.stall(7, "connection refused");
        let second = stalls.get(7).unwrap();
        assert_eq!(second.since, first.since);
        assert_eq!(second.reason, "connection refused");
        assert_eq!(stalls.all().len(), 1);
        stalls.clear(7);
        assert!(stalls.get(7).is_none());
    }
}
