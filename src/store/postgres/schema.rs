//! Versioned schema migrations. Each is applied once, in order, in one transaction with
//! its row in `letterbox_schema`; all of them run under a transaction-level advisory
//! lock, so nodes starting together migrate once and the others wait, then find nothing
//! to do. A database migrated by a newer letterbox is refused: this binary would not
//! know its tables.

use super::StoreError;

/// (version, SQL), in order. Never edit a released one: add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (2, include_str!("migrations/0002_fleet.sql")),
    (3, include_str!("migrations/0003_rates.sql")),
    (4, include_str!("migrations/0004_status_epoch.sql")),
    (5, include_str!("migrations/0005_events.sql")),
    (6, include_str!("migrations/0006_bounces.sql")),
    (7, include_str!("migrations/0007_automations.sql")),
    (8, include_str!("migrations/0008_messages.sql")),
    (9, include_str!("migrations/0009_opt_in.sql")),
    (10, include_str!("migrations/0010_webhooks.sql")),
    (11, include_str!("migrations/0011_console_sessions.sql")),
];

/// The newest schema version this binary knows.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The advisory lock key migrations hold ("letterbx" in ASCII).
const LOCK_KEY: i64 = 0x6c65_7474_6572_6278;

/// Brings the schema to `LATEST`; returns the version found before.
pub async fn migrate(client: &mut deadpool_postgres::Object) -> Result<i32, StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS letterbox_schema (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM letterbox_schema", &[])
        .await?
        .get(0);
    if found > LATEST {
        return Err(StoreError::Db(format!(
            "the database's schema is version {found}, newer than this letterbox knows \
             ({LATEST}): run a letterbox at least as new as the one that migrated it"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO letterbox_schema (version) VALUES ($1)", &[version])
            .await?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().await?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::PgStore;
    use crate::store::tests::scratch_url as scratch;

    async fn versions(url: &str) -> Vec<i32> {
        let (client, _driver) = super::super::connect(url).await.unwrap();
        let rows = client
            .query("SELECT version FROM letterbox_schema ORDER BY version", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_migrate_once() {
        let Some(url) = scratch().await else { return };
        let opens = (0..6).map(|_| PgStore::open(&url));
        for opened in futures_util::future::join_all(opens).await {
            opened.expect("every node starts");
        }
        assert_eq!(versions(&url).await, (1..=LATEST).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schema_newer_than_this_binary_is_refused() {
        let Some(url) = scratch().await else { return };
        PgStore::open(&url).await.unwrap();
        let (client, _driver) = super::super::connect(&url).await.unwrap();
        client
            .execute(
                "INSERT INTO letterbox_schema (version) VALUES ($1)",
                &[&(LATEST + 1)],
            )
            .await
            .unwrap();
        let refused = PgStore::open(&url)
            .await
            .err()
            .expect("a newer schema is refused");
        let text = refused.to_string();
        assert!(text.contains("newer than this letterbox knows"), "{text}");
    }
}
