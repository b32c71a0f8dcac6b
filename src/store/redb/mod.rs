//! The embedded backend: the only module that knows redb.
//!
//! Reads run on the blocking pool in short read transactions. Every write goes through
//! one writer thread that groups the operations waiting for it into a single redb
//! transaction and commits it with `Durability::Immediate` before answering any of them
//! (group commit). A caller that got `Ok` knows its change is on disk; many concurrent
//! deliveries share one fsync instead of paying one each (≈4 ms per commit here).
//!
//! Invariant for every write operation: it validates before it writes, so an operation
//! that returns a logical error (not found, conflict) has changed nothing and the other
//! operations of its batch still commit. A database error aborts the whole batch.

mod jobs;
mod lists;
mod plugins;
mod tables;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::{NodeInfo, Rescued, StoreError};

/// Most operations committed in one transaction. Bounds the latency one commit adds to
/// the first operation of a batch.
const MAX_BATCH: usize = 1024;

/// redb's page cache.
const CACHE_BYTES: usize = 16 << 20;

/// Errors after which the transaction may hold a half-applied operation.
fn aborts_batch(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Db(_) | StoreError::Corrupt(_) | StoreError::Inconsistent(_)
    )
}

// redb has one error type per step; fold them all into `StoreError::Db` so `?` works.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(redb::Error::from(e).to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError
);

type Completion = Box<dyn FnOnce(Result<(), &str>) + Send>;
type Op = Box<dyn FnOnce(&WriteTransaction) -> (bool, Completion) + Send>;

/// The redb backend. Cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    /// Bumped after every committed change of a subscriber's status (see
    /// `status_epoch`).
    status_epoch: std::sync::atomic::AtomicU64,
    /// The node this process registered (redb has one).
    node: std::sync::Mutex<Option<NodeInfo>>,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// When the last handle goes, close the writer's queue and wait for it to finish its
/// batch and drop its database handle: the file is released when this returns, so the
/// same process can open it again at once (a restart in tests, for instance).
impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl RedbStore {
    /// Opens (or creates) the database file and starts its writer thread. The thread
    /// ends, and the file is closed, when the last `Store` handle is dropped.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        // redb's default page cache is 1 GiB, which a million-recipient job would fill:
        // memory would grow with the list. The hot pages (the job's state index, the
        // tail of the tables) fit in far less.
        let db = Arc::new(Database::builder().set_cache_size(CACHE_BYTES).create(path)?);
        // Create every table up front so readers never meet a missing table.
        let txn = db.begin_write()?;
        {
            use tables::*;
            txn.open_table(SEQUENCES)?;
            txn.open_table(NEWSLETTERS)?;
            txn.open_table(SUBSCRIBERS)?;
            txn.open_table(SUBSCRIBER_EMAILS)?;
            txn.open_table(SUBSCRIBER_HOMES)?;
            txn.open_table(LETTERS)?;
            txn.open_table(PLUGINS)?;
            txn.open_table(PLUGIN_BLOBS)?;
            txn.open_table(PLUGIN_NAMES)?;
            txn.open_table(PLUGIN_VERSIONS)?;
            txn.open_table(JOBS)?;
            txn.open_table(DELIVERIES)?;
            txn.open_table(DELIVERY_STATES)?;
            txn.open_table(RETRY_SCHEDULE)?;
            txn.open_table(IDEMPOTENCY_KEYS)?;
            txn.open_table(SECRETS)?;
        }
        lists::backfill_subscriber_homes(&txn)?;
        txn.commit()?;

        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let writer_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("letterbox-store-writer".into())
            .spawn(move || writer_loop(writer_db, rx))
            .map_err(|e| StoreError::BatchFailed(format!("cannot start writer thread: {e}")))?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                db,
                writer: Some(tx),
                status_epoch: Default::default(),
                node: Default::default(),
                thread: Some(thread),
            }),
        })
    }

    fn bump_status_epoch(&self) {
        self.inner
            .status_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<R, StoreError> + Send + 'static,
    {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db.begin_read()?))
            .await
            .map_err(|e| StoreError::BatchFailed(format!("read task failed: {e}")))?
    }

    /// Queues `f` for the writer and waits until the transaction holding it is durable.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op: Op = Box::new(move |txn| {
            let result = f(txn);
            let aborts = result.as_ref().is_err_and(aborts_batch);
            let complete: Completion = Box::new(move |commit| {
                let out = match (result, commit) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(why)) => Err(StoreError::BatchFailed(why.to_string())),
                    (Ok(r), Ok(())) => Ok(r),
                };
                let _ = tx.send(out);
            });
            (aborts, complete)
        });
        let writer = self.inner.writer.as_ref().ok_or(StoreError::Closed)?;
        writer.send(op).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// One process holds a redb file (redb locks it), so the fleet is this one node.
#[async_trait::async_trait]
impl super::Fleet for RedbStore {
    fn is_shared(&self) -> bool {
        false
    }

    /// Every recipient left in flight belongs to an earlier process, which is dead.
    async fn register_node(
        &self,
        node: &NodeInfo,
        _lease: std::time::Duration,
    ) -> Result<Rescued, StoreError> {
        *self.inner.node.lock().unwrap_or_else(|e| e.into_inner()) = Some(NodeInfo {
            started_at: crate::domain::now(),
            heartbeat_age_ms: 0,
            claims: 0,
            ..node.clone()
        });
        let mut rescued = Rescued::default();
        let in_flight: Vec<u64> = self
            .read(|txn| {
                let mut out = Vec::new();
                for row in txn.open_table(tables::JOBS)?.iter()? {
                    let job: crate::domain::Job = decode(row?.1.value())?;
                    if job.counts.sending > 0 {
                        out.push(job.id);
                    }
                }
                Ok(out)
            })
            .await?;
        for job_id in in_flight {
            let n = self.requeue_inflight(job_id).await?;
            rescued.requeued.push((job_id, n));
        }
        Ok(rescued)
    }

    async fn heartbeat(&self, _node: &str, _lease: std::time::Duration) -> Result<(), StoreError> {
        Ok(())
    }

    async fn rescue(&self) -> Result<Rescued, StoreError> {
        Ok(Rescued::default())
    }

    async fn leave(&self, _node: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn take_tokens(
        &self,
        _bucket: &str,
        _per_second: f64,
        _burst: f64,
        want: u32,
    ) -> Result<(u32, std::time::Duration), StoreError> {
        Ok((want, std::time::Duration::ZERO))
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let node = self.inner.node.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(mut node) = node else {
            return Ok(Vec::new());
        };
        node.claims = self
            .read(|txn| {
                let mut claims = 0;
                for row in txn.open_table(tables::JOBS)?.iter()? {
                    let job: crate::domain::Job = decode(row?.1.value())?;
                    claims += job.counts.sending;
                }
                Ok(claims)
            })
            .await?;
        Ok(vec![node])
    }
}

#[async_trait::async_trait]
impl super::Backend for RedbStore {
    fn name(&self) -> &'static str {
        "redb"
    }

    /// A read transaction on the jobs table.
    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(tables::JOBS)?;
            Ok(())
        })
        .await
    }

    /// Subscribers change only through this process, so a counter in memory is exact.
    fn status_epoch(&self) -> u64 {
        self.inner.status_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn secret(&self, name: &str, candidate: Vec<u8>) -> Result<(Vec<u8>, bool), StoreError> {
        let name = name.to_string();
        self.write(move |txn| {
            let mut table = txn.open_table(tables::SECRETS)?;
            if let Some(stored) = table.get(name.as_str())? {
                return Ok((stored.value().to_vec(), false));
            }
            table.insert(name.as_str(), candidate.as_slice())?;
            Ok((candidate, true))
        })
        .await
    }
}

fn writer_loop(db: Arc<Database>, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let (mut commits, mut operations, mut busy) = (0u64, 0u64, std::time::Duration::ZERO);
    while let Some(first) = rx.blocking_recv() {
        let started = std::time::Instant::now();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                // Nothing was applied. Dropping the operations drops their reply
                // channels, so every caller gets `StoreError::Closed` at once.
                tracing::error!(error = %e, "cannot begin a write transaction");
                batch.clear();
                continue;
            }
        };
        let mut completions = Vec::with_capacity(batch.len());
        let mut abort: Option<String> = None;
        for op in batch.drain(..) {
            // A panic inside one operation must not kill the writer (and with it every
            // later write): treat it like a database error and abort the batch.
            match std::panic::catch_unwind(AssertUnwindSafe(|| op(&txn))) {
                Ok((aborts, complete)) => {
                    if aborts && abort.is_none() {
                        abort = Some("another operation in the same commit failed".into());
                    }
                    completions.push(complete);
                }
                Err(_) => abort = Some("a store operation panicked".into()),
            }
        }
        let outcome = match abort {
            Some(why) => {
                let _ = txn.abort();
                Err(why)
            }
            None => txn.commit().map_err(|e| {
                tracing::error!(error = %e, "store commit failed");
                e.to_string()
            }),
        };
        commits += 1;
        operations += completions.len() as u64;
        let took = started.elapsed();
        busy += took;
        metrics::histogram!("letterbox_store_commit_seconds").record(took.as_secs_f64());
        for complete in completions {
            complete(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
    if let Some(mean_batch) = operations.checked_div(commits) {
        tracing::info!(
            commits,
            operations,
            mean_batch,
            mean_commit_ms = format!("{:.2}", busy.as_secs_f64() * 1000.0 / commits as f64),
            "store writer stopped"
        );
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain data types to JSON cannot fail.
    serde_json::to_vec(value).expect("domain types serialise to JSON")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_json::from_slice(bytes)?)
}
