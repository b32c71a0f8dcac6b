//! The storage interface of the web console's sign-in sessions (`crate::console`). A
//! session is kept by the SHA-256 of its cookie, so the database does not give a
//! session away; it is in the store (not a node's memory) so that every node of a fleet
//! knows it, and signing out ends it everywhere.

use async_trait::async_trait;

use super::StoreError;

#[async_trait]
pub trait Sessions: Send + Sync {
    /// Records a session (`id`: the hex SHA-256 of its secret) that ends at `expires_at`
    /// (unix seconds).
    async fn create_session(&self, id: String, expires_at: u64) -> Result<(), StoreError>;

    /// When the session ends, if it exists (an ended one may still be listed until it
    /// is pruned: the caller compares).
    async fn session_expiry(&self, id: String) -> Result<Option<u64>, StoreError>;

    /// Ends a session. Idempotent.
    async fn delete_session(&self, id: String) -> Result<(), StoreError>;

    /// Forgets up to `limit` sessions that ended before `now`; how many went.
    async fn prune_sessions(&self, now: u64, limit: usize) -> Result<usize, StoreError>;
}
