//! A job's two batching tasks and the guard they share. The evaluator runs the
//! recipients waiting together through the policies in one trip to the blocking pool;
//! the recorder writes the outcomes that arrive together in one store operation (one
//! commit, one update of the job's counts). `FailureGuard` is the job's restart
//! intensity for policy failures, counted as they happen.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Runner;
use super::health::Backoff;
use super::limits::FailureWindow;
use crate::domain::*;
use crate::policy::{Evaluator, PolicyError, Verdict};
use crate::store::StoreError;

/// Restart intensity, counted as policies fail (not when their outcome is recorded), so
/// a job stops on the failure that crosses the limit.
pub(super) struct FailureGuard {
    pub(super) failures: std::sync::Mutex<FailureWindow>,
    /// Set when the failures exceeded the limit: the reason the job pauses with.
    pub(super) pausing: std::sync::Mutex<Option<String>>,
    pub(super) stop: CancellationToken,
}

impl FailureGuard {
    /// Notes one evaluation's result; false once the job must stop.
    pub(super) fn note(&self, result: &Result<Verdict, PolicyError>) -> bool {
        if let Err(e) = result
            && let Some(policy) = e.failed_policy()
        {
            let tripped = self.failures.lock().unwrap_or_else(|e| e.into_inner()).record();
            if tripped {
                self.pause(format!("policy {policy} failing: {e}"));
            }
        }
        !self.stop.is_cancelled()
    }

    /// Stops the job, to pause with `reason` (unless it is pausing already).
    pub(super) fn pause(&self, reason: String) {
        let mut pausing = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if pausing.is_none() {
            *pausing = Some(reason);
            self.stop.cancel();
        }
    }

    pub(super) fn pausing(&self) -> Option<String> {
        self.pausing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the evaluator task answers.
pub(super) enum Evaluated {
    Done(Subscriber, Verdict),
    Failed(PolicyError),
    /// The job stopped before this recipient was evaluated.
    Stopped,
}

pub(super) type Evaluation = (Subscriber, String, oneshot::Sender<Evaluated>);

/// Evaluates the recipients waiting together, up to two batches at once (a core each),
/// until every sender is gone.
pub(super) async fn evaluator(
    evaluator: Arc<Evaluator>,
    guard: Arc<FailureGuard>,
    mut rx: mpsc::UnboundedReceiver<Evaluation>,
) {
    const EVAL_BATCH: usize = 64;
    const BATCHES_IN_FLIGHT: usize = 2;
    let mut in_flight = JoinSet::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let mut batch = Vec::new();
        tokio::select! {
            n = rx.recv_many(&mut batch, EVAL_BATCH), if open && in_flight.len() < BATCHES_IN_FLIGHT => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let (items, replies): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|(s, url, tx)| ((s, url), tx)).unzip();
                let (evaluator, guard) = (evaluator.clone(), guard.clone());
                in_flight.spawn(async move {
                    let results = evaluator.evaluate_batch(items, move |r| guard.note(r)).await;
                    match results {
                        Ok(results) => {
                            for ((subscriber, result), reply) in results.into_iter().zip(replies) {
                                let _ = reply.send(match result {
                                    Some(Ok(verdict)) => Evaluated::Done(subscriber, verdict),
                                    Some(Err(e)) => Evaluated::Failed(e),
                                    None => Evaluated::Stopped,
                                });
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Evaluated::Failed(PolicyError::Engine(e.to_string())));
                            }
                        }
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

/// One outcome for the recorder: the recipient, its outcome, the node id it was
/// claimed under, and where to say it is durable.
pub(super) type Recording = (u64, Outcome, String, Reply);

/// Where a delivery hears that its outcome is durable.
pub(super) type Reply = oneshot::Sender<Result<(), StoreError>>;

/// Outcomes to record, and whom to answer, per node id.
pub(super) type ByNode = HashMap<String, (Vec<(u64, Outcome)>, Vec<Reply>)>;

/// Records outcomes in batches until every sender is gone. A batch is sent once it has
/// `RECORD_BATCH` outcomes or its first is `RECORD_LINGER` old, and up to
/// `RECORDS_IN_FLIGHT` batches are with the store at once. Every commit costs the same
/// whatever it holds (an fsync and its pages), so fewer, fuller commits are what keeps
/// the store's CPU per message low; the linger adds a few milliseconds to each record,
/// which only the claim window sees.
///
/// On a shared store, outcomes the store refuses because their claims were taken over
/// (this node's lease had expired) are dropped: the recipients belong to other nodes
/// now, which send and record them. Outcomes the store cannot take now (it is
/// unavailable) are tried again until it can: see `record_for`.
pub(super) async fn recorder(runner: Runner, job_id: u64, mut rx: mpsc::UnboundedReceiver<Recording>) {
    const RECORD_BATCH: usize = 256;
    const RECORD_LINGER: std::time::Duration = std::time::Duration::from_millis(3);
    const RECORDS_IN_FLIGHT: usize = 2;
    let mut in_flight = JoinSet::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let mut batch = Vec::new();
        tokio::select! {
            n = rx.recv_many(&mut batch, RECORD_BATCH), if open && in_flight.len() < RECORDS_IN_FLIGHT => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let deadline = tokio::time::Instant::now() + RECORD_LINGER;
                while batch.len() < RECORD_BATCH {
                    let room = RECORD_BATCH - batch.len();
                    match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                        Ok(0) => {
                            open = false;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                // A batch holds one node id, but for the moment this node registers
                // again under a new one.
                let mut by_node: ByNode = HashMap::new();
                for (sid, outcome, node, tx) in batch.drain(..) {
                    let entry = by_node.entry(node).or_default();
                    entry.0.push((sid, outcome));
                    entry.1.push(tx);
                }
                let runner = runner.clone();
                in_flight.spawn(async move {
                    for (node, (outcomes, replies)) in by_node {
                        record_for(&runner, &node, job_id, outcomes, replies).await;
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
}

/// Records one node's outcomes and answers their deliveries. An outcome is never
/// forgotten because the store is down: while it is unavailable the job shows as
/// stalled and the same outcomes are tried again, with a pause that grows to 2 s,
/// until the store takes them or refuses them. Only a drain that timed out at
/// shutdown gives up; those recipients stay `sending` and are sent again later.
pub(super) async fn record_for(
    runner: &Runner,
    node: &str,
    job_id: u64,
    outcomes: Vec<(u64, Outcome)>,
    replies: Vec<Reply>,
) {
    let inner = &runner.inner;
    let store = &inner.store;
    let n = outcomes.len();
    let mut backoff = Backoff::new();
    let mut stalled = false;
    let result = loop {
        match store.record(node, job_id, outcomes.clone()).await {
            Ok(_) => break Ok(()),
            Err(StoreError::TakenOver(why) | StoreError::Conflict(why)) if store.is_shared() => {
                tracing::warn!(node, recipients = n, %why, "outcomes not recorded: the claims were taken over");
                metrics::counter!("letterbox_outcomes_taken_over_total").increment(n as u64);
                break Ok(());
            }
            Err(e) if e.is_unavailable() && !inner.abandon.is_cancelled() => {
                metrics::counter!("letterbox_record_retries_total").increment(1);
                inner
                    .stalls
                    .stall(job_id, format!("{n} outcomes wait to be recorded: {e}"));
                stalled = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = inner.abandon.cancelled() => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    if stalled && result.is_ok() {
        inner.stalls.clear(job_id);
    }
    for reply in replies {
        let shared = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::BatchFailed(e.to_string())),
        };
        let _ = reply.send(shared);
    }
}
