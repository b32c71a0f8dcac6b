//! `letterbox migrate`: moves a single-node installation (a redb data directory) into an
//! empty PostgreSQL database, so it can run as a fleet, and checks that everything
//! arrived. The store's `Transfer` operations do the moving; this owns the procedure:
//!
//! 1. open the source (redb refuses a file a running server holds: stop it first);
//! 2. put what it had in flight back to pending, as its next start would (counted in
//!    `resent_after_crash`), and adopt secrets older versions kept in files, so
//!    unsubscribe links already sent keep working;
//! 3. refuse a target that holds anything;
//! 4. stream every record across, a chunk per transaction;
//! 5. compare the two inventories (records of each kind, and the jobs' counts).

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::store::{Inventory, Location, NodeInfo, Store, StoreError};
use crate::tokens::{ApiToken, UnsubscribeKey};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Source(String),
    #[error("the target database: {0}")]
    Target(String),
    #[error("the target database is not empty ({0}); migrate copies into an empty database only")]
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
         {} idempotency keys, {} secrets",
        i.newsletters,
        i.subscribers,
        i.letters,
        i.plugins,
        i.plugin_versions,
        i.jobs,
        i.deliveries,
        i.idempotency_keys,
        i.secrets
    )
}

/// Copies the installation in `from` (a data directory) into the empty PostgreSQL
/// database at `to`. `progress` hears how many records have been copied so far.
pub async fn run(from: &Path, to: &str, mut progress: impl FnMut(u64)) -> Result<Report, MigrateError> {
    let file: PathBuf = from.join("letterbox.redb");
    if !file.exists() {
        return Err(MigrateError::Source(format!(
            "{} holds no letterbox.redb: is it a letterbox data directory (--data)?",
            from.display()
        )));
    }
    let source = Store::open(Location::Redb(&file)).await.map_err(|e| {
        MigrateError::Source(format!(
            "cannot open {} ({e}); stop the server that uses it first",
            file.display()
        ))
    })?;
    let source_error = |e: StoreError| MigrateError::Source(format!("{}: {e}", file.display()));
    // The source is not running: whatever it had in flight goes back to the queue, as
    // its next start would have done, so the fleet sends it.
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
    let requeued = rescued.requeued.iter().map(|(_, n)| n).sum();
    adopt_legacy_secrets(&source, from)
        .await
        .map_err(|e| MigrateError::Source(e.to_string()))?;

    let target = Store::open(Location::Postgres(to))
        .await
        .map_err(|e| MigrateError::Target(e.to_string()))?;
    let before = target
        .inventory()
        .await
        .map_err(|e| MigrateError::Target(e.to_string()))?;
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

    let source_counts = source.inventory().await.map_err(source_error)?;
    let target_counts = target
        .inventory()
        .await
        .map_err(|e| MigrateError::Target(e.to_string()))?;
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
