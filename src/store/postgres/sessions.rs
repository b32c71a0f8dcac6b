//! The console's sessions in PostgreSQL (migrations/0011_console_sessions.sql).

use super::{PgStore, execute, query_opt, sql_int, sql_limit};
use crate::store::{Sessions, StoreError};

#[async_trait::async_trait]
impl Sessions for PgStore {
    async fn create_session(&self, id: String, expires_at: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        execute(
            &client,
            "INSERT INTO console_sessions (id, expires_at) VALUES ($1, $2)",
            &[&id, &sql_int(expires_at)],
        )
        .await?;
        Ok(())
    }

    async fn session_expiry(&self, id: String) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = query_opt(
            &client,
            "SELECT expires_at FROM console_sessions WHERE id = $1",
            &[&id],
        )
        .await?;
        Ok(row.map(|row| super::domain_int(row.get(0))))
    }

    async fn delete_session(&self, id: String) -> Result<(), StoreError> {
        let client = self.client().await?;
        execute(&client, "DELETE FROM console_sessions WHERE id = $1", &[&id]).await?;
        Ok(())
    }

    async fn prune_sessions(&self, now: u64, limit: usize) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let n = execute(
            &client,
            "DELETE FROM console_sessions WHERE id IN (
                 SELECT id FROM console_sessions WHERE expires_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&sql_int(now), &sql_limit(limit)],
        )
        .await?;
        Ok(n as usize)
    }
}
