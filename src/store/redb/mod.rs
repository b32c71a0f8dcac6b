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
//!
//! **I/O errors heal.** After an I/O error (a full disk, a failing device) redb refuses
//! every later operation until the database is opened again. The writer then recovers
//! by itself, whether anything is written meanwhile or not: it opens the database again
//! (redb repairs the file from its last commit) and makes a small write to see whether
//! writes work, trying again with a pause that grows to 2 s while the cause lasts. The
//! writes that arrive meanwhile hear `Unavailable` at once, and `write_failure` says
//! what is wrong and since when. Nothing committed is lost; a commit that succeeds
//! (the small one included) clears the failure.
//!
//! **A panic heals the same way.** The writer thread runs its loop under
//! `catch_unwind`: a panic anywhere in it (an operation's own panic only aborts its
//! batch) drops the batch unapplied, so every caller waiting on it hears `Unavailable`,
//! and the loop starts again on the path an I/O error takes (open the database again,
//! then the small write). The queue outlives the panic, so no caller is left waiting
//! and later writes carry on. Restarts are counted in `letterbox_store_writer_restarts_total`.

mod automations;
mod bounces;
mod events;
mod jobs;
mod lists;
mod messages;
mod plugins;
mod sessions;
mod tables;
mod transfer;
mod webhooks;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::{NodeInfo, Rescued, StoreError};
use crate::faults::Faults;

/// Most operations committed in one transaction. Bounds the latency one commit adds to
/// the first operation of a batch.
const MAX_BATCH: usize = 1024;

/// redb's page cache. 4 MiB, not 16: at 1,000,000 recipients the send's peak RSS was
/// 111 MiB against 146 at the same rate (13.5k and 13.6k msg/s, side by side); the pages
/// a send reads again are few (the job's state index and the tables' tails), and the
/// rest come from the kernel's page cache (ARCHITECTURE, "Memory").
const CACHE_BYTES: usize = 4 << 20;

/// Errors after which the transaction may hold a half-applied operation.
fn aborts_batch(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Db(_) | StoreError::Corrupt(_) | StoreError::Inconsistent(_)
    )
}

// redb has one error type per step; fold them all into `StoreError` so `?` works. An
// I/O error (a full disk, a failing device) makes redb refuse every later operation
// until the database is opened again, which the writer does (`writer_loop`): those are
// `Unavailable`, the rest `Db`.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                let e = redb::Error::from(e);
                match e {
                    redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed => {
                        StoreError::Unavailable(e.to_string())
                    }
                    _ => StoreError::Db(e.to_string()),
                }
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

/// The open database, shared by readers and the writer, which reopens it after an I/O
/// error.
struct Shared {
    path: PathBuf,
    /// `None` while the writer reopens it.
    db: RwLock<Option<Arc<Database>>>,
    /// Why writes fail, and since when (unix seconds); `None` while commits succeed.
    failure: Mutex<Option<(String, u64)>>,
    /// The newest committed event id, published by the writer after each commit.
    event_head: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        match &*self.db.read().unwrap_or_else(|e| e.into_inner()) {
            Some(db) => Ok(db.clone()),
            None => Err(StoreError::Unavailable(format!(
                "the database is being opened again after an I/O error ({})",
                self.failure().map(|(why, _)| why).unwrap_or_default()
            ))),
        }
    }

    fn failure(&self) -> Option<(String, u64)> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_failure(&self, why: Option<String>) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        match why {
            None => {
                if failure.take().is_some() {
                    tracing::info!("the store commits again");
                }
            }
            Some(why) => match &mut *failure {
                Some((reason, _)) => *reason = why,
                None => *failure = Some((why, crate::domain::now())),
            },
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
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

/// Opens (or creates) the database file and makes sure every table exists, so readers
/// never meet a missing one.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    // redb's default page cache is 1 GiB, which a million-recipient job would fill:
    // memory would grow with the list. The hot pages (the job's state index, the tail
    // of the tables) fit in far less.
    let db = Database::builder().set_cache_size(CACHE_BYTES).create(path)?;
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
        txn.open_table(EVENTS)?;
        txn.open_table(EVENTS_BY_SUBSCRIBER)?;
        txn.open_table(BOUNCES)?;
        txn.open_table(BOUNCES_BY_SUBSCRIBER)?;
        txn.open_table(UNATTRIBUTED_BOUNCES)?;
        txn.open_table(SUPPRESSIONS)?;
        txn.open_table(AUTOMATIONS)?;
        txn.open_table(AUTOMATION_NAMES)?;
        txn.open_table(AUTOMATION_VERSIONS)?;
        txn.open_table(AUTOMATION_STATES)?;
        txn.open_table(TIMERS)?;
        txn.open_table(TIMERS_DUE)?;
        txn.open_table(AUTOMATION_FAILURES)?;
        txn.open_table(QUEUED_SENDS)?;
        txn.open_table(MESSAGES)?;
        txn.open_table(MESSAGES_DUE)?;
        txn.open_table(MESSAGE_KEYS)?;
        txn.open_table(MESSAGES_BY_SUBSCRIBER)?;
        txn.open_table(UNCONFIRMED)?;
        txn.open_table(WEBHOOKS)?;
        txn.open_table(WEBHOOK_SENDS)?;
        txn.open_table(WEBHOOK_SENDS_DUE)?;
        txn.open_table(WEBHOOK_SENDS_BY_HOOK)?;
        txn.open_table(WEBHOOK_ATTEMPTS)?;
        txn.open_table(WEBHOOK_ATTEMPT_IDS)?;
        txn.open_table(CONSOLE_SESSIONS)?;
    }
    lists::backfill_subscriber_homes(&txn)?;
    txn.commit()?;
    Ok(db)
}

impl RedbStore {
    /// Opens (or creates) the database file and starts its writer thread. The thread
    /// ends, and the file is closed, when the last `Store` handle is dropped.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_faults(path, Faults::default())
    }

    /// `open`, with faults a test may inject (see `crate::faults`).
    pub fn open_with_faults(path: &Path, faults: Faults) -> Result<RedbStore, StoreError> {
        let db = open_database(path)?;
        let head = events::head(&db.begin_read()?.open_table(tables::SEQUENCES)?)?;
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            failure: Mutex::new(None),
            event_head: tokio::sync::watch::Sender::new(head),
        });
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("letterbox-store-writer".into())
            .spawn(move || supervise_writer(writer_shared, rx, faults))
            .map_err(|e| StoreError::BatchFailed(format!("cannot start writer thread: {e}")))?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                shared,
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
        let db = self.inner.shared.db()?;
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
        // An operation dropped unapplied: the writer cannot write (see `writer_loop`),
        // or it panicked and restarts (`supervise_writer`); `Closed` only once the
        // writer has ended for good.
        rx.await.map_err(|_| match self.inner.shared.failure() {
            Some((why, _)) => StoreError::Unavailable(why),
            None if writer.is_closed() => StoreError::Closed,
            None => StoreError::Unavailable("the store's writer restarted during this operation".into()),
        })?
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

    fn write_failure(&self) -> Option<(String, u64)> {
        self.inner.shared.failure()
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

/// The writer thread: runs `writer_loop`, and starts it again after a panic, on the
/// path an I/O error takes (see the module docs). Ends when every handle is dropped.
fn supervise_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Op>, faults: Faults) {
    let mut after_panic = false;
    let mut pause = Duration::from_millis(100);
    loop {
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            writer_loop(&shared, &mut rx, &faults, after_panic)
        }));
        match run {
            Ok(()) => return,
            Err(payload) => {
                let why = crate::logging::panic_message(payload.as_ref());
                metrics::counter!("letterbox_store_writer_restarts_total").increment(1);
                tracing::error!(panic = %why, ?pause, "the store's writer panicked; it starts again");
                shared.set_failure(Some(format!("the store's writer panicked ({why}) and restarts")));
                after_panic = true;
                // A panic that repeats at once must not spin: the pause grows to 2 s.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The writer: group-commits the operations waiting for it, and after an I/O error
/// opens the database again (see the module docs). `after_panic`: the previous run
/// panicked, so start by recovering as after an I/O error.
fn writer_loop(shared: &Shared, rx: &mut mpsc::Receiver<Op>, faults: &Faults, after_panic: bool) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let (mut commits, mut operations, mut busy) = (0u64, 0u64, Duration::ZERO);
    // After a write failed for want of the disk: when to try to recover by itself
    // (open the database again if redb refuses it, then a small write), whether anything
    // else is written meanwhile or not: readers and /readyz wait for it too.
    let mut recover_at: Option<Instant> = after_panic.then(Instant::now);
    // redb refuses everything after an I/O error until it is opened again.
    let mut needs_reopen = after_panic;
    let mut pause = Duration::from_millis(250);
    loop {
        let first = match recover_at {
            None => rx.blocking_recv(),
            Some(at) => {
                let now = Instant::now();
                if now >= at {
                    match recover(shared, needs_reopen) {
                        Ok(()) => {
                            recover_at = None;
                            needs_reopen = false;
                            pause = Duration::from_millis(250);
                            shared.set_failure(None);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, ?pause, "the store cannot write yet");
                            needs_reopen |= e.is_unavailable();
                            shared.set_failure(Some(e.to_string()));
                            recover_at = Some(now + pause);
                            pause = (pause * 2).min(Duration::from_secs(2));
                        }
                    }
                    continue;
                }
                match rx.try_recv() {
                    Ok(op) => Some(op),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep((at - now).min(Duration::from_millis(20)));
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            }
        };
        let Some(first) = first else { break };
        let started = Instant::now();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if needs_reopen {
            // Until the recovery reopens it, the writes hear the failure at once.
            fail_batch(&mut batch, shared);
            continue;
        }
        let db = match shared.db() {
            Ok(db) => db,
            Err(_) => {
                needs_reopen = true;
                recover_at.get_or_insert_with(Instant::now);
                fail_batch(&mut batch, shared);
                continue;
            }
        };
        let txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                // Nothing was applied: every caller hears why at once.
                let e = StoreError::from(e);
                tracing::error!(error = %e, "cannot begin a write transaction");
                if e.is_unavailable() {
                    needs_reopen = true;
                    recover_at.get_or_insert_with(Instant::now);
                }
                shared.set_failure(Some(e.to_string()));
                fail_batch(&mut batch, shared);
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
        faults.check(crate::faults::Point::StoreWriter);
        // The event head as this transaction leaves it, published once it commits.
        let event_head = match txn.open_table(tables::SEQUENCES) {
            Ok(sequences) => events::head(&sequences).ok(),
            Err(_) => None,
        };
        let outcome = match abort {
            Some(why) => {
                let _ = txn.abort();
                Err(why)
            }
            None => txn.commit().map_err(|e| {
                let e = StoreError::from(e);
                tracing::error!(error = %e, "store commit failed");
                if e.is_unavailable() {
                    needs_reopen = true;
                    recover_at.get_or_insert_with(Instant::now);
                }
                shared.set_failure(Some(e.to_string()));
                e.to_string()
            }),
        };
        drop(db);
        if outcome.is_ok() {
            if let Some(head) = event_head {
                shared.event_head.send_if_modified(|h| {
                    let moved = head > *h;
                    *h = (*h).max(head);
                    moved
                });
            }
            shared.set_failure(None);
            recover_at = None;
            pause = Duration::from_millis(250);
        }
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

/// Drops every operation of `batch` unapplied: each caller hears the store's failure
/// (see `RedbStore::write`).
fn fail_batch(batch: &mut Vec<Op>, shared: &Shared) {
    if shared.failure().is_none() {
        shared.set_failure(Some("the database is being opened again".into()));
    }
    batch.clear();
}

/// One attempt to recover from a failed write: open the database again if redb
/// refuses it, then a small write (a counter in the sequences table), which shows
/// whether writes work again.
fn recover(shared: &Shared, needs_reopen: bool) -> Result<(), StoreError> {
    if needs_reopen {
        reopen_database(shared)?;
    }
    let db = shared.db()?;
    let txn = db.begin_write()?;
    {
        let mut sequences = txn.open_table(tables::SEQUENCES)?;
        let probes = sequences.get("probe")?.map(|v| v.value()).unwrap_or(0);
        sequences.insert("probe", probes + 1)?;
    }
    txn.commit()?;
    Ok(())
}

/// Closes the database and opens it again: redb refuses everything after an I/O error
/// until then. Readers still holding the old handle finish first (they fail fast), so
/// the file's lock is free when it is opened again.
fn reopen_database(shared: &Shared) -> Result<(), StoreError> {
    let old = shared.db.write().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(mut old) = old {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Arc::try_unwrap(old) {
                Ok(db) => {
                    drop(db);
                    break;
                }
                Err(still_shared) if Instant::now() < deadline => {
                    old = still_shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(still_shared) => {
                    *shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(still_shared);
                    return Err(StoreError::Unavailable(
                        "the database cannot be opened again: readers still hold it".into(),
                    ));
                }
            }
        }
    }
    let db = open_database(&shared.path)?;
    *shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
    tracing::info!(path = %shared.path.display(), "the database was opened again after an I/O error");
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain data types to JSON cannot fail.
    serde_json::to_vec(value).expect("domain types serialise to JSON")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// The second halves of the `(first, second)` keys of an index under `first`, in
/// order: one subscriber's event or report ids.
fn ids_under(index: &impl ReadableTable<(u64, u64), ()>, first: u64) -> Result<Vec<u64>, StoreError> {
    index
        .range((first, 0)..=(first, u64::MAX))?
        .map(|row| row.map(|(k, _)| k.value().1).map_err(StoreError::from))
        .collect()
}
