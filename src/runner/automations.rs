//! What the automation worker asks of the runner: the policy host and this node's id,
//! and turning queued sends into a job that sends them like any other.

use std::sync::Arc;

use super::{Control, RetryPolicy, Runner, RunnerError, message_id_nonce};
use crate::domain::{Counts, Job, JobState, PluginKind, now};
use crate::policy::{Policy, PolicyHost};

impl Runner {
    pub fn policies(&self) -> &PolicyHost {
        &self.inner.policies
    }

    /// This node's id (its lease's name in a fleet).
    pub fn node_id(&self) -> String {
        self.inner.node.id()
    }

    /// How long this node's lease lasts without a renewal (`--lease`): automations'
    /// leases last as long.
    pub fn lease(&self) -> std::time::Duration {
        self.inner.config.lease
    }

    /// An automation's policy, resolved (`NAME` or `NAME@ID`) and compiled.
    pub async fn automation_policy(&self, reference: &str) -> Result<Arc<Policy>, RunnerError> {
        let version = self.resolve(reference, PluginKind::Automation).await?;
        self.load_policy(&version, PluginKind::Automation).await
    }

    /// Turns queued sends of one letter into one job (with the letter's policies and the
    /// server's defaults) and starts it. `None` if another node took them first.
    pub async fn dispatch_sends(&self, letter_id: u64, sends: Vec<u64>) -> Result<Option<Job>, RunnerError> {
        self.check_running()?;
        let store = &self.inner.store;
        let letter = store.letter(letter_id).await?;
        let ((filter, _), (template, _)) = self.resolve_letter(&letter).await?;
        let config = &self.inner.config;
        let job = Job {
            id: 0,
            letter_id,
            newsletter_id: letter.newsletter_id,
            state: JobState::Queued,
            filter,
            template,
            concurrency: config.default_concurrency,
            retry: RetryPolicy {
                max_attempts: config.retry.max_attempts,
                base_ms: config.retry.base_ms,
                cap_ms: config.retry.cap_ms.max(config.retry.base_ms),
            },
            transport: None,
            send_at: None,
            counts: Counts::default(),
            prepared: true,
            resent_after_crash: 0,
            error: None,
            pause_reason: None,
            message_id_nonce: Some(message_id_nonce()),
            created_at: now(),
            started_at: None,
            finished_at: None,
        };
        let Some(job) = store.dispatch_sends(job, sends).await? else {
            return Ok(None);
        };
        let mut active = self.inner.active.lock().await;
        self.spawn(&mut active, job.id, Control::Run);
        Ok(Some(job))
    }
}
