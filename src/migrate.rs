//! `letterbox migrate`: moves an installation between stores, and checks that
//! everything arrived. Mostly a single node (a redb data directory) into an empty
//! PostgreSQL database, to run it as a fleet; and back, from a fleet's database into a
//! data directory. The store's `Transfer` operations do the moving; this owns the
//! procedure:
//!
//! 1. open the source, which nothing may be running on: redb refuses a file a server
//!    holds, and a PostgreSQL source must have no live nodes;
//! 2. put what it had in flight back to pending, as the next start would (counted in
//!    `resent_after_crash`), and adopt secrets older versions kept in files, so
//!    unsubscribe links already sent keep working;
//! 3. refuse a target that holds anything;
//! 4. stream every record across, a chunk per transaction;
//! 5. compare the two inventories (records of each kind, and the jobs' counts).

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::store::{Inventory, Location, NodeInfo, Store, StoreError};
use crate::tokens::{ApiToken, UnsubscribeKey};

/// Where an installation lives, as `migrate` is told: a PostgreSQL URL, or else a data
/// directory.
enum Place {
    Dir(PathBuf),
    Postgres(String),
}

impl Place {
    fn parse(arg: &str) -> Place {
        if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
            Place::Postgres(arg.to_string())
        } else {
            Place::Dir(PathBuf::from(arg))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Source(String),
    #[error("the target: {0}")]
    Target(String),
    #[error("the target is not empty ({0}); migrate copies into an empty store only")]
    NotEmpty(String),
    #[error("copying: {0}")]
    Copy(StoreError),
    #[error("the copy differs from the source: source {source_counts}, target {target_counts}")]
    Mismatch {
        source_counts: String,
        target_counts: String,
    },
}

/// What was moved.
#[derive(Debug)]
pub struct Report {
    pub inventory: Inventory,
    /// Recipients the source had in flight, put back to pending before the copy.
    pub requeued: u64,
}

/// A one-line summary of an inventory.
pub fn describe(i: &Inventory) -> String {
    format!(
        "{} newsletters, {} subscribers, {} letters, {} plugins ({} versions), {} jobs, {} deliveries, \
         {} idempotency keys, {} events, {} bounces, {} suppressions, {} automations ({} timers), {} secrets",
        i.newsletters,
        i.subscribers,
        i.letters,
        i.plugins,
        i.plugin_versions,
        i.jobs,
        i.deliveries,
        i.idempotency_keys,
        i.events,
        i.bounces,
        i.suppressions,
        i.automations,
        i.timers,
        i.secrets
    )
}

/// Copies the installation at `from` (a data directory or a PostgreSQL URL) into the
/// empty store at `to` (likewise). `progress` hears how many records have been copied.
pub async fn run(from: &str, to: &str, mut progress: impl FnMut(u64)) -> Result<Report, MigrateError> {
    let (source, requeued) = open_source(&Place::parse(from)).await?;
    let target = open_target(&Place::parse(to)).await?;
    let target_error = |e: StoreError| MigrateError::Target(e.to_string());
    let before = target.inventory().await.map_err(target_error)?;
    if !before.is_empty() {
        return Err(MigrateError::NotEmpty(describe(&before)));
    }

    let (tx, mut rx) = mpsc::channel(4);
    let exporter = {
        let source = source.clone();
        tokio::spawn(async move { source.export(tx).await })
    };
    let mut copied = 0u64;
    while let Some(chunk) = rx.recv().await {
        let n = chunk.len() as u64;
        target.import(chunk).await.map_err(MigrateError::Copy)?;
        copied += n;
        progress(copied);
    }
    exporter
        .await
        .map_err(|e| MigrateError::Copy(StoreError::BatchFailed(e.to_string())))?
        .map_err(MigrateError::Copy)?;

    let source_counts = source
        .inventory()
        .await
        .map_err(|e| MigrateError::Source(e.to_string()))?;
    let target_counts = target.inventory().await.map_err(target_error)?;
    if source_counts != target_counts {
        return Err(MigrateError::Mismatch {
            source_counts: format!("{source_counts:?}"),
            target_counts: format!("{target_counts:?}"),
        });
    }
    Ok(Report {
        inventory: target_counts,
        requeued,
    })
}

/// Opens the source, makes sure nothing runs on it, and puts what it had in flight
/// back to pending. Returns it and how many recipients went back.
async fn open_source(place: &Place) -> Result<(Store, u64), MigrateError> {
    match place {
        Place::Dir(dir) => {
            let file = dir.join("letterbox.redb");
            if !file.exists() {
                return Err(MigrateError::Source(format!(
                    "{} holds no letterbox.redb: is it a letterbox data directory (--data)?",
                    dir.display()
                )));
            }
            let source = Store::open(Location::Redb(&file)).await.map_err(|e| {
                MigrateError::Source(format!(
                    "cannot open {} ({e}); stop the server that uses it first",
                    file.display()
                ))
            })?;
            let source_error = |e: StoreError| MigrateError::Source(format!("{}: {e}", file.display()));
            // The server is not running: what it had in flight goes back to the queue,
            // as its next start would have done.
            let me = NodeInfo {
                id: "migrate".into(),
                address: String::new(),
                version: env!("CARGO_PKG_VERSION").into(),
                started_at: crate::domain::now(),
                heartbeat_age_ms: 0,
                claims: 0,
            };
            let rescued = source
                .register_node(&me, std::time::Duration::from_secs(10))
                .await
                .map_err(source_error)?;
            adopt_legacy_secrets(&source, dir)
                .await
                .map_err(|e| MigrateError::Source(e.to_string()))?;
            Ok((source, rescued.requeued.iter().map(|(_, n)| n).sum()))
        }
        Place::Postgres(url) => {
            let source = Store::open(Location::Postgres(url))
                .await
                .map_err(|e| MigrateError::Source(e.to_string()))?;
            let source_error = |e: StoreError| MigrateError::Source(e.to_string());
            // Nodes that died are removed and their claims requeued; live ones refuse.
            let rescued = source.rescue().await.map_err(source_error)?;
            let live = source.nodes().await.map_err(source_error)?;
            if !live.is_empty() {
                let ids: Vec<&str> = live.iter().map(|n| n.id.as_str()).collect();
                return Err(MigrateError::Source(format!(
                    "{} node(s) are running on this database ({}): stop them first (letterbox nodes lists them)",
                    live.len(),
                    ids.join(", ")
                )));
            }
            Ok((source, rescued.requeued.iter().map(|(_, n)| n).sum()))
        }
    }
}

/// Opens (creating) the target store.
async fn open_target(place: &Place) -> Result<Store, MigrateError> {
    let target_error = |e: String| MigrateError::Target(e);
    match place {
        Place::Dir(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| target_error(format!("{}: {e}", dir.display())))?;
            Store::open(Location::Redb(&dir.join("letterbox.redb")))
                .await
                .map_err(|e| target_error(format!("{}: {e}", dir.display())))
        }
        Place::Postgres(url) => Store::open(Location::Postgres(url))
            .await
            .map_err(|e| target_error(e.to_string())),
    }
}

/// Secrets an older version kept in files (`unsubscribe.key`, `api-token.sha256`) go
/// into the store first, as `serve` would adopt them at its next start: links already
/// sent must verify on the fleet. Nothing is made up where there was nothing.
async fn adopt_legacy_secrets(store: &Store, data: &Path) -> Result<(), crate::tokens::SecretError> {
    let key = data.join("unsubscribe.key");
    if key.exists() {
        UnsubscribeKey::load_or_create(store, Some(&key)).await?;
    }
    let token = data.join("api-token.sha256");
    if token.exists() {
        ApiToken::load_or_create(None, store, Some(&token)).await?;
    }
    Ok(())
}
