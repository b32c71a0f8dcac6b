//! Nodes: a dead node's claims go back to the others and its late records are
//! fenced; a node gives back its own earlier claims; a frozen node does not hold up
//! the rescue (see `store/tests.rs`).

use super::*;

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: "http://127.0.0.1:0".into(),
        version: "test".into(),
        started_at: 0,
        heartbeat_age_ms: 0,
        claims: 0,
    }
}

/// A node that stops heartbeating loses its claims to the others, which count them as
/// re-sent; its late records are refused (fencing) and its heartbeat tells it so. With
/// redb the earlier node is the previous process, and registering is the rescue.
async fn a_dead_nodes_claims_go_back_to_pending_and_it_is_fenced(store: Store) {
    let lease = std::time::Duration::from_millis(400);
    // A long lease while the job is made: on a loaded machine that can outlast 400 ms.
    store
        .register_node(&node("n-a"), std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let (_, job) = job_with(&store, 5).await;
    let claimed = ids(&store.claim("n-a", job.id, 3, now_ms()).await.unwrap());
    let listed = store.nodes().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id.as_str(), listed[0].claims), ("n-a", 3));
    if store.is_shared() {
        // Alive (a long lease, so a slow machine cannot let it lapse): a rescue now
        // finds nothing.
        store
            .heartbeat("n-a", std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.rescue().await.unwrap(), Rescued::default());
        // Its last heartbeat, with a lease that then runs out.
        store.heartbeat("n-a", lease).await.unwrap();
        tokio::time::sleep(lease + std::time::Duration::from_millis(300)).await;
    }
    let rescued = store
        .register_node(&node("n-b"), std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(rescued.requeued, vec![(job.id, 3)]);
    let job_now = store.job(job.id).await.unwrap();
    assert_eq!((job_now.counts.pending, job_now.counts.sending), (5, 0));
    assert_eq!(job_now.resent_after_crash, 3);
    let delivered = || vec![(claimed[0], Outcome::Delivered { reply: "250".into() })];
    let late = store.record("n-a", job.id, delivered()).await;
    assert!(
        matches!(late, Err(StoreError::Conflict(_) | StoreError::TakenOver(_))),
        "{late:?}"
    );
    // Claimed again: the attempt made before still counts.
    let again = store.claim("n-b", job.id, 5, now_ms()).await.unwrap();
    let attempts: Vec<u32> = again.iter().map(|(d, _)| d.attempts).collect();
    assert_eq!(attempts.iter().filter(|&&a| a == 2).count(), 3);
    if store.is_shared() {
        let late = store.record("n-a", job.id, delivered()).await;
        assert!(matches!(late, Err(StoreError::TakenOver(_))), "{late:?}");
        let beat = store.heartbeat("n-a", lease).await;
        assert!(matches!(beat, Err(StoreError::TakenOver(_))), "{beat:?}");
        let ids: Vec<String> = store.nodes().await.unwrap().into_iter().map(|n| n.id).collect();
        assert_eq!(ids, vec!["n-b".to_string()]);
    }
    store.record("n-b", job.id, delivered()).await.unwrap();
    // Leaving hands back what is still claimed.
    store.leave("n-b").await.unwrap();
    if store.is_shared() {
        assert_eq!(store.job(job.id).await.unwrap().counts.sending, 0);
        assert!(store.nodes().await.unwrap().is_empty());
    }
    assert_counts_match_index(&store, job.id).await;
}

/// A node gives back the claims an earlier supervisor of its own left behind; with
/// PostgreSQL another node's claims stay where they are.
async fn release_claims_returns_a_nodes_own_claims(store: Store) {
    let (_, job) = job_with(&store, 6).await;
    store.claim("n-mine", job.id, 2, now_ms()).await.unwrap();
    store.claim("n-other", job.id, 3, now_ms()).await.unwrap();
    let released = store.release_claims("n-mine", job.id).await.unwrap();
    let job_now = store.job(job.id).await.unwrap();
    if store.is_shared() {
        assert_eq!(released, 2);
        assert_eq!((job_now.counts.pending, job_now.counts.sending), (3, 3));
    } else {
        // One process: every claim of the job is this node's.
        assert_eq!(released, 5);
        assert_eq!((job_now.counts.pending, job_now.counts.sending), (6, 0));
    }
    assert_eq!(job_now.resent_after_crash, released);
    assert_counts_match_index(&store, job.id).await;
}

/// A node's claims start after the last recipient it claimed (`ClaimHints`), and still
/// find every pending recipient: rows that became pending behind that point through
/// another node (which this node cannot know of) are claimed once the rows ahead run
/// out, and a release made through this node puts its own claims first again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claims_find_recipients_pending_behind_where_they_look() {
    let Some(fixture) = postgres().await else { return };
    let store = fixture.store.clone();
    let other = Store::open(Location::Postgres(fixture.url.as_deref().unwrap()))
        .await
        .unwrap();
    let (_, job) = job_with(&store, 6).await;
    let first = ids(&store.claim("n-a", job.id, 2, now_ms()).await.unwrap());
    let second = ids(&store.claim("n-a", job.id, 2, now_ms()).await.unwrap());
    assert!(first.iter().max() < second.iter().min(), "{first:?} {second:?}");
    // Another node's process gives n-a's claims back: four pending behind n-a's hint.
    assert_eq!(other.release_claims("n-a", job.id).await.unwrap(), 4);
    let ahead = ids(&store.claim("n-a", job.id, 1, now_ms()).await.unwrap());
    assert!(ahead[0] > second[1], "{ahead:?} {second:?}");
    let mut rest = ids(&store.claim("n-a", job.id, 10, now_ms()).await.unwrap());
    let mut expected: Vec<u64> = (store.deliveries(job.id, None, 0, 10).await.unwrap())
        .into_iter()
        .map(|d| d.subscriber_id)
        .filter(|id| *id != ahead[0])
        .collect();
    rest.sort();
    expected.sort();
    assert_eq!(
        rest, expected,
        "every pending recipient, the ones behind included"
    );
    assert_eq!(counts(&store, job.id).await.pending, 0);
    // A release through this node: the next claim starts from the front.
    assert_eq!(store.release_claims("n-a", job.id).await.unwrap(), 6);
    let front = ids(&store.claim("n-a", job.id, 2, now_ms()).await.unwrap());
    assert_eq!(front, first);
    assert_counts_match_index(&store, job.id).await;
}

/// A node frozen (SIGSTOP, a stalled VM) in the middle of a transaction keeps its rows
/// locked. The rescue of its claims must not wait for them, or the rescuing node's own
/// heartbeat would stop too: it gives up within about a second, and succeeds once the
/// server has ended the frozen session (`idle_in_transaction_session_timeout`, which
/// letterbox sets on its sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_node_frozen_inside_a_transaction_does_not_hold_up_the_rescue() {
    let Some(fixture) = postgres().await else { return };
    let store = fixture.store.clone();
    let url = fixture.url.clone().unwrap();
    let frozen = NodeInfo {
        id: "n-frozen".into(),
        address: "http://frozen".into(),
        version: "test".into(),
        started_at: now(),
        heartbeat_age_ms: 0,
        claims: 0,
    };
    store
        .register_node(&frozen, std::time::Duration::from_millis(300))
        .await
        .unwrap();
    let (_, job) = job_with(&store, 3).await;
    assert_eq!(
        store.claim("n-frozen", job.id, 3, now_ms()).await.unwrap().len(),
        3
    );
    // The frozen node's session, as letterbox opens it, stopped inside a transaction
    // that holds its claimed rows.
    let (client, _driver) = crate::store::postgres::connect(&url).await.unwrap();
    client
        .batch_execute("SET idle_in_transaction_session_timeout = 3000")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let frozen_at = std::time::Instant::now();
    client
        .batch_execute("SELECT 1 FROM deliveries WHERE claimed_by = 'n-frozen' FOR UPDATE")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;

    let started = std::time::Instant::now();
    let blocked = store.rescue().await;
    let waited = started.elapsed();
    assert!(
        blocked.is_err(),
        "the locked rows cannot be rescued yet: {blocked:?}"
    );
    assert!(
        waited < std::time::Duration::from_millis(2500),
        "the rescue waited {waited:?}"
    );

    // The server ends the frozen session after 3 s idle; then the rescue goes through.
    tokio::time::sleep(std::time::Duration::from_millis(3500).saturating_sub(frozen_at.elapsed())).await;
    let rescued = store.rescue().await.unwrap();
    assert_eq!(rescued.nodes, vec!["n-frozen".to_string()]);
    assert_eq!(rescued.requeued, vec![(job.id, 3)]);
    assert!(
        client.batch_execute("SELECT 1").await.is_err(),
        "the frozen session was ended"
    );
}

conformance!(
    a_dead_nodes_claims_go_back_to_pending_and_it_is_fenced,
    release_claims_returns_a_nodes_own_claims,
);
