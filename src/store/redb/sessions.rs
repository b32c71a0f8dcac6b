//! The console's sessions in redb: one table, session id → expiry. Sessions are few (one
//! per signed-in browser), so pruning scans them.

use redb::ReadableTable;

use super::RedbStore;
use super::tables::CONSOLE_SESSIONS;
use crate::store::{Sessions, StoreError};

#[async_trait::async_trait]
impl Sessions for RedbStore {
    async fn create_session(&self, id: String, expires_at: u64) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.open_table(CONSOLE_SESSIONS)?
                .insert(id.as_str(), expires_at)?;
            Ok(())
        })
        .await
    }

    async fn session_expiry(&self, id: String) -> Result<Option<u64>, StoreError> {
        self.read(move |txn| {
            Ok(txn
                .open_table(CONSOLE_SESSIONS)?
                .get(id.as_str())?
                .map(|v| v.value()))
        })
        .await
    }

    async fn delete_session(&self, id: String) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.open_table(CONSOLE_SESSIONS)?.remove(id.as_str())?;
            Ok(())
        })
        .await
    }

    async fn prune_sessions(&self, now: u64, limit: usize) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(CONSOLE_SESSIONS)?;
            let mut ended = Vec::new();
            for row in table.iter()? {
                let (id, expires_at) = row?;
                if expires_at.value() < now {
                    ended.push(id.value().to_string());
                    if ended.len() == limit {
                        break;
                    }
                }
            }
            for id in &ended {
                table.remove(id.as_str())?;
            }
            Ok(ended.len())
        })
        .await
    }
}
