//! Compiling policies off the request and delivery paths.
//!
//! An upload is stored as soon as its cheap checks pass (`policy::inspect`); its
//! compilation (seconds, and hundreds of MiB for an interpreter-sized component) runs in
//! the background, **one at a time** on this node, so uploads cannot exhaust the host's
//! memory or cores. Whoever needs the policy (a letter's check, a job's supervisor)
//! waits for that one compilation instead of starting another.
//!
//! The state is this node's: each node compiles for itself (the compiled code is
//! node-local), and since compiling the same bytes with the same letterbox gives the
//! same answer everywhere, a node asked about a plugin it has not compiled yet starts
//! compiling it and says `compiling`. A failure is remembered for the bytes; a store that
//! could not give the bytes, or an engine failure (the compiling child could not run),
//! is not (the next request tries again).
//!
//! Each compile runs in a child process under `policy.compile_memory_mib`
//! (`policy::compiler`), so the server's memory never holds a compiler's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{Semaphore, watch};

use super::health::Stall;
use super::{Runner, RunnerError};
use crate::domain::PluginKind;
use crate::policy::{Policy, PolicyError};
use crate::store::StoreError;

/// Where one plugin version's compilation stands on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyStatus {
    /// Stored, and not compiled on this node yet: it will be when something needs it.
    Stored,
    Compiling,
    Ready,
    /// Why it cannot run: it was uploaded, but no letter or job can use it.
    Failed(String),
}

type Outcome = Result<Arc<Policy>, Failure>;

#[derive(Clone)]
enum Failure {
    Policy(PolicyError),
    /// The bytes could not be read: not remembered.
    Store(String),
}

/// The compilations of this node, by plugin id (the bytes' sha256).
pub(super) struct Compiles {
    states: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    /// Jobs whose supervisor waits for a compilation here: why, and since when.
    waiting: Mutex<HashMap<u64, Stall>>,
    /// One compilation at a time: a compile takes a core and up to ~20x the component's
    /// size in memory.
    permit: Arc<Semaphore>,
}

impl Default for Compiles {
    fn default() -> Self {
        Compiles {
            states: Default::default(),
            waiting: Default::default(),
            permit: Arc::new(Semaphore::new(1)),
        }
    }
}

impl Runner {
    /// The compilation of `id` (a version of plugin `name`), started now if this node has
    /// not started it. `bytes` saves reading them from the store when the caller has them.
    fn compilation(
        &self,
        id: &str,
        name: &str,
        kind: PluginKind,
        bytes: Option<Bytes>,
    ) -> watch::Receiver<Option<Outcome>> {
        let compiles = &self.inner.compiles;
        let mut states = compiles.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = states.get(id) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        states.insert(id.to_string(), rx.clone());
        drop(states);

        let runner = self.clone();
        let (id, name) = (id.to_string(), name.to_string());
        tokio::spawn(async move {
            // A panic here would leave every waiter, now and later, without an answer:
            // it is this version's failure instead, like a compilation that failed.
            let outcome = std::panic::AssertUnwindSafe(runner.compile(&id, &name, kind, bytes))
                .catch_unwind()
                .await
                .unwrap_or_else(|payload| {
                    Err(Failure::Policy(PolicyError::Engine(format!(
                        "the compilation panicked: {}",
                        crate::logging::panic_message(payload.as_ref())
                    ))))
                });
            if let Err(failure) = &outcome {
                let reason = match failure {
                    Failure::Policy(e) => e.to_string(),
                    Failure::Store(e) => e.clone(),
                };
                tracing::warn!(plugin = %name, id = %&id[..id.len().min(12)], %reason, "policy cannot be used");
            }
            // A store that could not give the bytes, or a node that could not run the
            // compile (no process to spare, a child stopped): not the bytes' fault,
            // so not remembered. The next request tries again.
            if let Err(Failure::Store(_) | Failure::Policy(PolicyError::Engine(_))) = &outcome {
                runner
                    .inner
                    .compiles
                    .states
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    async fn compile(&self, id: &str, name: &str, kind: PluginKind, bytes: Option<Bytes>) -> Outcome {
        let host = self.inner.policies.clone();
        if let Some(policy) = host.cached(id) {
            return Ok(policy);
        }
        let _permit = self.inner.compiles.permit.clone().acquire_owned().await;
        let bytes = match bytes {
            Some(bytes) => bytes,
            None => self
                .inner
                .store
                .plugin_bytes(id.to_string())
                .await
                .map_err(|e| Failure::Store(e.to_string()))?
                .into(),
        };
        let (id, name) = (id.to_string(), name.to_string());
        let started = std::time::Instant::now();
        let size = bytes.len();
        let compiled = tokio::task::spawn_blocking(move || host.prepare(&id, &name, kind, &bytes))
            .await
            .map_err(|e| {
                Failure::Policy(PolicyError::Engine(format!(
                    "policy compilation task failed: {e}"
                )))
            })?
            .map_err(Failure::Policy)?;
        tracing::info!(
            policy = %compiled.label(),
            bytes = size,
            seconds = started.elapsed().as_secs_f64(),
            "policy ready"
        );
        Ok(compiled)
    }

    /// Where version `id` of plugin `name` stands on this node. With `start`, compiling
    /// it starts now if nothing here has (for a name's latest version, which letters
    /// use by default); otherwise an older version nobody asked for stays `Stored`, so
    /// listing a long history does not queue a compilation of each version.
    pub fn policy_status(&self, id: &str, name: &str, kind: PluginKind, start: bool) -> PolicyStatus {
        if self.inner.policies.cached(id).is_some() {
            return PolicyStatus::Ready;
        }
        let known = self
            .inner
            .compiles
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id);
        if !known && !start {
            return PolicyStatus::Stored;
        }
        let rx = self.compilation(id, name, kind, None);
        let outcome = rx.borrow().clone();
        match outcome {
            None => PolicyStatus::Compiling,
            Some(Ok(_)) => PolicyStatus::Ready,
            Some(Err(Failure::Policy(e))) => PolicyStatus::Failed(e.to_string()),
            // Not remembered: asked again, it is compiling again.
            Some(Err(Failure::Store(_))) => PolicyStatus::Compiling,
        }
    }

    /// Starts compiling bytes just stored, so the first letter that uses them finds
    /// them ready (or failed) sooner.
    pub(super) fn compile_in_background(&self, id: &str, name: &str, kind: PluginKind, bytes: Bytes) {
        drop(self.compilation(id, name, kind, Some(bytes)));
    }

    /// `load_policy` for a job's supervisor: while the policy compiles, the job shows
    /// what it waits for (`waiting`), instead of `running` with nothing happening.
    pub(super) async fn job_policy(
        &self,
        job_id: u64,
        version: &crate::domain::PolicyVersion,
        kind: PluginKind,
    ) -> Result<Arc<Policy>, RunnerError> {
        if let Some(policy) = self.inner.policies.cached(&version.id) {
            return Ok(policy);
        }
        let waiting = &self.inner.compiles.waiting;
        waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(
            job_id,
            Stall {
                reason: format!("policy {} is compiling", version.name),
                since: crate::domain::now(),
            },
        );
        // Cleared however the wait ends (ready, failed, or the supervisor gone).
        struct Clear<'a>(&'a Mutex<HashMap<u64, Stall>>, u64);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
            }
        }
        let _clear = Clear(waiting, job_id);
        self.load_policy(version, kind).await
    }

    /// What a job waits for on this node before it can send, if anything.
    pub fn waiting(&self, job_id: u64) -> Option<Stall> {
        self.inner
            .compiles
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job_id)
            .cloned()
    }

    /// The compiled policy `id`, waiting for its compilation (started now if needed).
    pub(super) async fn compiled(
        &self,
        id: &str,
        name: &str,
        kind: PluginKind,
    ) -> Result<Arc<Policy>, RunnerError> {
        if let Some(policy) = self.inner.policies.cached(id) {
            return Ok(policy);
        }
        let mut rx = self.compilation(id, name, kind, None);
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        match outcome {
            Some(Ok(policy)) => Ok(policy),
            Some(Err(Failure::Policy(e))) => Err(e.into()),
            Some(Err(Failure::Store(e))) => Err(StoreError::Unavailable(e).into()),
            None => Err(RunnerError::ShuttingDown),
        }
    }

    /// Starts compiling the latest version of every plugin, so jobs and letters after a
    /// start find them ready; one at a time, in the background.
    pub async fn warm_policies(&self) -> Result<(), RunnerError> {
        for summary in self.inner.store.list_plugins().await? {
            drop(self.compilation(&summary.latest.id, &summary.name, summary.kind, None));
        }
        Ok(())
    }
}
