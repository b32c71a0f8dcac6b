//! The message worker: one task per node that claims due queued messages (up to
//! `IN_FLIGHT` at a time, each under a lease as long as the node's), has the runner
//! send each (`Runner::send_message`), and records the outcome.
//!
//! Waiting costs nothing: with nothing claimable it sleeps until a message is queued on
//! this node, the earliest queued one falls due, or `POLL` passes (other nodes' messages).

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::{Outcome, now_ms};
use crate::messages::Message;
use crate::runner::Runner;
use crate::store::{Store, StoreError};

/// Messages being sent at once by this node's worker.
const IN_FLIGHT: usize = 64;

/// The longest the worker sleeps without looking again.
const POLL: Duration = Duration::from_millis(500);

pub struct Worker {
    store: Store,
    runner: Runner,
}

impl Worker {
    pub fn new(store: Store, runner: Runner) -> Worker {
        Worker { store, runner }
    }

    /// Claims and sends until `stop`; what is in flight then is released (recorded as
    /// not tried) before it returns.
    pub async fn run(self, stop: CancellationToken) {
        let node = self.runner.node_id();
        let mut running: JoinSet<()> = JoinSet::new();
        loop {
            if stop.is_cancelled() || self.runner.is_stopping() {
                break;
            }
            let room = IN_FLIGHT - running.len();
            let mut claimed = 0;
            let mut next_due = None;
            if room >= IN_FLIGHT / 2 {
                let now = now_ms();
                let until = now + self.runner.lease().as_millis() as u64;
                match self.store.claim_messages(&node, now, until, room).await {
                    Ok(messages) => {
                        claimed = messages.len();
                        for message in messages {
                            let (store, runner, node, stop) = (
                                self.store.clone(),
                                self.runner.clone(),
                                node.clone(),
                                stop.clone(),
                            );
                            running.spawn(async move {
                                let outcome = runner.send_message(&message, &node, until, &stop).await;
                                record(&store, &message, &node, outcome, &stop).await;
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming messages failed; trying again"),
                }
                if claimed < room {
                    next_due = self.store.next_message_due().await.ok().flatten();
                }
            }
            if claimed > 0 && claimed == room {
                // There may be more: make room first.
                running.join_next().await;
                continue;
            }
            let wait = next_due
                .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                .unwrap_or(POLL)
                .clamp(Duration::from_millis(10), POLL);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.runner.message_queued() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // The sends see `stop` and come back released; their records are written.
        while running.join_next().await.is_some() {}
    }
}

/// Records an outcome, trying again while the store is away and the message is still
/// this node's: one that is never recorded is sent again once its lease runs out.
async fn record(store: &Store, message: &Message, node: &str, outcome: Outcome, stop: &CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.record_message(message.id, node, outcome.clone()).await {
            Ok(_) => return,
            Err(StoreError::TakenOver(why)) => {
                tracing::warn!(message = message.id, why, "a message's outcome was not recorded");
                return;
            }
            Err(e) => {
                tracing::warn!(message = message.id, error = %e, "recording a message's outcome failed; trying again");
                if now_ms() >= message.lease_until_ms || stop.is_cancelled() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
