//! The fleet backend: the only module that knows SQL and PostgreSQL.
//!
//! Every operation is one transaction on a pooled connection (deadpool-postgres over
//! tokio-postgres), at READ COMMITTED. Statements are prepared once per connection
//! (`prepare_cached`). Several nodes share one database, so:
//! - recipients are claimed with `FOR UPDATE SKIP LOCKED`: concurrent claimers never
//!   wait for each other nor get the same recipient;
//! - a job's counts are columns changed by increments, written last in a transaction,
//!   so the job's row is locked only from that statement to the commit;
//! - rows are locked in one order everywhere (deliveries by subscriber id, then the
//!   job), so transactions do not deadlock each other;
//! - schema migrations (`schema.rs`) run at start under an advisory lock.

mod automations;
mod bounces;
mod deliveries;
mod events;
mod fleet;
mod jobs;
mod lists;
mod messages;
mod plugins;
mod schema;
mod sessions;
mod tls;
mod transfer;
mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;

use super::StoreError;

/// Connections per node. Deliveries write in batches (a claim per 128 recipients, a
/// record per up to 256 outcomes), so a few connections carry a node's whole load; the
/// rest serve the API.
const POOL_SIZE: usize = 16;

/// How long a session may sit idle inside a transaction before the server ends it.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(3);

/// How long an operation waits to connect, or for a free connection, before it fails
/// (and the failure shows) instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // tokio-postgres's own text for a server error is just "db error": say what
        // the server said.
        match e.as_db_error() {
            Some(db) => {
                let text = format!("{} ({})", db.message(), db.code().code());
                // 22021 (a NUL byte in a text parameter) and 22P05 (`\u0000` in JSONB).
                if matches!(db.code().code(), "22021" | "22P05") {
                    StoreError::Unstorable(format!(
                        "text may not contain the NUL character (U+0000): {}",
                        db.message()
                    ))
                } else if transient_sqlstate(db.code().code()) {
                    StoreError::Unavailable(text)
                } else {
                    StoreError::Db(text)
                }
            }
            // No answer from the server: the connection failed or was lost. "error
            // connecting to server" alone does not say why: add the cause.
            None => match std::error::Error::source(&e) {
                Some(cause) => StoreError::Unavailable(format!("{e}: {cause}")),
                None => StoreError::Unavailable(e.to_string()),
            },
        }
    }
}

/// Server errors that say the database cannot work right now, not that the statement
/// is wrong: connection exceptions (08), serialization failures and deadlocks (40),
/// insufficient resources such as a full disk (53), operator intervention such as a
/// shutdown (57), system errors such as I/O (58), and a database that is read-only for
/// now (25006: a standby not yet promoted, `default_transaction_read_only`).
fn transient_sqlstate(code: &str) -> bool {
    code == "25006"
        || ["08", "40", "53", "57", "58"]
            .iter()
            .any(|class| code.starts_with(class))
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(format!("no database connection: {other}")),
        }
    }
}

/// Whether a database error is a unique violation (another writer got there first).
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Ids and counts are u64 in the domain and BIGINT in SQL; every value letterbox makes
/// fits in 63 bits. Larger ones (a client's id in a URL) saturate and match nothing.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn domain_int(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A limit as SQL takes it.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

/// The PostgreSQL backend. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Bumped after every committed change of a subscriber's status made through this
    /// node, and when `refresh_status_epoch` finds that the fleet's count moved.
    status_epoch: Arc<AtomicU64>,
    /// The fleet's count (`fleet_counters`) as last read; -1 before the first read.
    shared_epoch: Arc<AtomicI64>,
    /// The newest event id this node knows committed (see `Events::event_head`).
    event_head: Arc<tokio::sync::watch::Sender<u64>>,
    /// Where this node's next claim of each job starts looking (`deliveries::ClaimHints`).
    claim_hints: Arc<deliveries::ClaimHints>,
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and brings the
    /// schema up to date. Refuses a database whose schema is newer than this binary.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let (mut config, tls) = tls::connect_config(url)?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("letterbox");
        // The migrations' `IF NOT EXISTS` make the server send NOTICEs at every start,
        // which the driver logs; warnings and errors still arrive. A session idle in a
        // transaction for 3 s is a stuck or frozen node (letterbox's transactions take
        // milliseconds): the server ends it, so its row locks do not hold up the rest
        // of the fleet, and the rescue of its claims, for longer.
        config.options(format!(
            "-c client_min_messages=warning -c idle_in_transaction_session_timeout={}",
            IDLE_IN_TRANSACTION.as_millis()
        ));
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(CONNECT_TIMEOUT * 2))
            .build()
            .map_err(|e| StoreError::Db(format!("database pool: {e}")))?;
        let store = PgStore {
            pool,
            status_epoch: Default::default(),
            shared_epoch: Arc::new(AtomicI64::new(-1)),
            event_head: Arc::new(tokio::sync::watch::Sender::new(0)),
            claim_hints: Default::default(),
        };
        let mut client = store.client().await?;
        schema::migrate(&mut client).await?;
        drop(client);
        // The fleet's count as this node starts: only later changes move the epoch.
        super::Backend::refresh_status_epoch(&store).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    fn bump_status_epoch(&self) {
        self.status_epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs a prepared (and per connection cached) statement, returning its rows. `tx` is a
/// transaction, or a connection for a read of one statement.
async fn query(
    tx: &impl GenericClient,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await?;
    Ok(tx.query(&statement, params).await?)
}

/// `query` for at most one row.
async fn query_opt(
    tx: &impl GenericClient,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<tokio_postgres::Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await?;
    Ok(tx.query_opt(&statement, params).await?)
}

/// `query` for a statement without rows; returns how many rows it changed.
async fn execute(tx: &impl GenericClient, sql: &str, params: &Params<'_>) -> Result<u64, StoreError> {
    let statement = tx.prepare_cached(sql).await?;
    Ok(tx.execute(&statement, params).await?)
}

/// Commits, timing the commit (the wait for the WAL to be flushed) as redb's writer
/// times its commits.
async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    tx.commit().await?;
    metrics::histogram!("letterbox_store_commit_seconds").record(started.elapsed().as_secs_f64());
    Ok(())
}

#[async_trait::async_trait]
impl super::Backend for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    fn status_epoch(&self) -> u64 {
        self.status_epoch.load(Ordering::SeqCst)
    }

    /// One read of both fleet counters: the status epoch and the event head.
    async fn refresh_status_epoch(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let rows = query(
            &client,
            "SELECT name, value FROM fleet_counters WHERE name IN ('status_epoch', 'event_id')",
            &[],
        )
        .await?;
        let counter = |name: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == name)
                .map(|r| r.get::<_, i64>(1))
                .unwrap_or(0)
        };
        let shared = counter("status_epoch");
        if self.shared_epoch.swap(shared, Ordering::SeqCst) != shared {
            self.bump_status_epoch();
        }
        self.publish_head(domain_int(counter("event_id")));
        Ok(())
    }

    async fn secret(&self, name: &str, candidate: Vec<u8>) -> Result<(Vec<u8>, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Whoever inserts first wins; the others read the winner's value.
        let inserted = execute(
            &tx,
            "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &candidate],
        )
        .await?;
        let row = query_opt(&tx, "SELECT value FROM secrets WHERE name = $1", &[&name])
            .await?
            .ok_or_else(|| StoreError::Inconsistent(format!("secret {name} vanished")))?;
        commit(tx).await?;
        Ok((row.get(0), inserted == 1))
    }
}

/// A new, empty database on the server `admin_url` points at, for a test or a benchmark:
/// returns its URL. The user must be allowed to create databases.
pub async fn scratch_database(admin_url: &str) -> Result<String, StoreError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut url =
        url::Url::parse(admin_url).map_err(|e| StoreError::Db(format!("invalid database URL: {e}")))?;
    let name = format!(
        "letterbox_{}_{}_{:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst),
        getrandom::u32().unwrap_or(0)
    );
    let (client, driver) = connect(admin_url).await?;
    client.simple_query(&format!("CREATE DATABASE {name}")).await?;
    drop(client);
    let _ = driver.await;
    url.set_path(&name);
    Ok(url.to_string())
}

/// One connection to `url` (its `sslmode` and `sslrootcert` as the nodes read them),
/// outside the pool, for an administrator's statement in a test or a benchmark. The
/// connection lives until the client is dropped and the returned task ends.
pub async fn connect(url: &str) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), StoreError> {
    let (config, tls) = tls::connect_config(url)?;
    let (client, connection) = config.connect(tls).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, driver))
}
