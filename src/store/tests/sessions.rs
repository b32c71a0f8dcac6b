//! The console's sessions (see `store/tests.rs`).

use super::*;

async fn sessions_are_kept_ended_and_pruned(store: Store) {
    store.create_session("a".into(), 100).await.unwrap();
    store.create_session("b".into(), 300).await.unwrap();
    assert_eq!(store.session_expiry("a".into()).await.unwrap(), Some(100));
    assert_eq!(store.session_expiry("nope".into()).await.unwrap(), None);
    store.delete_session("b".into()).await.unwrap();
    store.delete_session("b".into()).await.unwrap();
    assert_eq!(store.session_expiry("b".into()).await.unwrap(), None);
    store.create_session("c".into(), 500).await.unwrap();
    assert_eq!(store.prune_sessions(200, 10).await.unwrap(), 1);
    assert_eq!(store.session_expiry("a".into()).await.unwrap(), None);
    assert_eq!(store.session_expiry("c".into()).await.unwrap(), Some(500));
}

conformance!(sessions_are_kept_ended_and_pruned);
