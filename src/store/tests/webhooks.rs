//! Webhooks' conformance tests (see `store/tests.rs`).

use super::*;
use crate::webhooks::*;

fn new_hook(cursor: u64) -> NewWebhook {
    NewWebhook {
        url: "https://hooks.example.com/in".into(),
        events: vec!["subscriber.*".into()],
        description: Some("CRM".into()),
        secret: Secret::generate().to_text(),
        cursor,
    }
}

fn result(at_ms: u64, ok: bool) -> AttemptResult {
    AttemptResult {
        at_ms,
        ok,
        status: Some(if ok { 200 } else { 500 }),
        latency_ms: 2,
        response: Some("hi".into()),
        error: None,
    }
}

/// The cursor moves only from where its mover read it, with the sends it queued; a
/// claim is a lease; an attempt is recorded by the lease's node only.
async fn webhook_sends_are_queued_once_claimed_and_recorded(store: Store) {
    let hook = store.create_webhook(new_hook(5)).await.unwrap();
    assert_eq!((hook.cursor, hook.state), (5, WebhookState::Active));
    assert_eq!(store.webhook(hook.id).await.unwrap(), hook);
    let events = vec![
        (6, "subscriber.created".to_string()),
        (8, "subscriber.updated".to_string()),
    ];
    assert!(store.fan_out(hook.id, 5, 9, events.clone()).await.unwrap());
    assert!(
        !store.fan_out(hook.id, 5, 9, events).await.unwrap(),
        "a second mover from the same cursor changes nothing"
    );
    assert_eq!(store.webhook(hook.id).await.unwrap().cursor, 9);

    let now = crate::domain::now_ms();
    let claimed = store
        .claim_webhook_sends("a", now, now + 60_000, 10)
        .await
        .unwrap();
    let ids: Vec<Option<u64>> = claimed.iter().map(|(s, _)| s.event_id).collect();
    assert_eq!(ids, [Some(6), Some(8)]);
    assert_eq!(claimed[0].1.id, hook.id);
    assert!(
        store
            .claim_webhook_sends("b", now, now + 60_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    let (first, second) = (claimed[0].0.clone(), claimed[1].0.clone());
    assert!(matches!(
        store
            .record_webhook_attempt(first.id, "b", result(now, true), vec![])
            .await,
        Err(StoreError::TakenOver(_))
    ));
    let ok = store
        .record_webhook_attempt(first.id, "a", result(now, true), vec![])
        .await
        .unwrap();
    assert_eq!((ok.attempt, ok.ok, ok.message_id.as_str()), (1, true, "evt_6"));
    let failed = store
        .record_webhook_attempt(second.id, "a", result(now, false), vec![1_000])
        .await
        .unwrap();
    assert_eq!(failed.next_attempt_ms, Some(now + 1_000));
    assert_eq!(store.next_webhook_due().await.unwrap(), Some(now + 1_000));
    assert!(matches!(
        store
            .record_webhook_attempt(first.id, "a", result(now, true), vec![])
            .await,
        Err(StoreError::TakenOver(_))
    ));

    // Disabling holds what is pending; enabling makes it due now.
    let patch = |state| WebhookPatch {
        state: Some(state),
        ..Default::default()
    };
    let disabled = store
        .update_webhook(hook.id, patch(WebhookState::Disabled))
        .await
        .unwrap();
    assert_eq!(disabled.state, WebhookState::Disabled);
    assert_eq!(store.next_webhook_due().await.unwrap(), None);
    assert!(
        !store.fan_out(hook.id, 9, 12, vec![]).await.unwrap(),
        "a disabled endpoint's cursor waits"
    );
    let test = store.queue_webhook_test(hook.id).await.unwrap();
    assert!(test.held());
    let later = now + 5_000;
    assert!(
        store
            .claim_webhook_sends("a", later, later + 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .update_webhook(hook.id, patch(WebhookState::Active))
        .await
        .unwrap();
    let due = store.next_webhook_due().await.unwrap().unwrap();
    assert!(due <= crate::domain::now_ms(), "{due}");
    let claimed = store
        .claim_webhook_sends("a", later, later + 1, 10)
        .await
        .unwrap();
    let mut ids: Vec<u64> = claimed.iter().map(|(s, _)| s.id).collect();
    ids.sort();
    assert_eq!(ids, [second.id, test.id]);

    // The log, newest first, pages by id.
    let log = store.webhook_attempts(hook.id, 0, 10).await.unwrap();
    assert_eq!(log.iter().map(|a| a.ok).collect::<Vec<_>>(), [false, true]);
    let older = store.webhook_attempts(hook.id, log[0].id, 10).await.unwrap();
    assert_eq!(older, log[1..]);
    assert_eq!(store.webhooks().await.unwrap().len(), 1);

    // Pruning takes attempts and finished sends, never pending ones.
    assert_eq!(
        store
            .prune_webhook_log(now.saturating_sub(60_000), 100)
            .await
            .unwrap(),
        0
    );
    let pruned = store
        .prune_webhook_log(crate::domain::now_ms() + 1, 100)
        .await
        .unwrap();
    assert_eq!(pruned, 3, "two attempts and the delivered send");
    assert!(store.webhook_attempts(hook.id, 0, 10).await.unwrap().is_empty());

    store.delete_webhook(hook.id).await.unwrap();
    assert!(matches!(
        store.webhook(hook.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_webhook(hook.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        store
            .claim_webhook_sends("a", later * 2, later * 2, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.next_webhook_due().await.unwrap(), None);
}

/// A send that fails throughout its schedule disables its endpoint with the reason, and
/// holds the endpoint's other pending sends.
async fn failing_throughout_disables_the_endpoint(store: Store) {
    let hook = store.create_webhook(new_hook(0)).await.unwrap();
    let events = vec![
        (1, "subscriber.created".to_string()),
        (2, "subscriber.created".to_string()),
    ];
    assert!(store.fan_out(hook.id, 0, 2, events).await.unwrap());
    let now = crate::domain::now_ms();
    let claimed = store
        .claim_webhook_sends("a", now, now + 60_000, 1)
        .await
        .unwrap();
    let send = claimed[0].0.clone();
    store
        .record_webhook_attempt(send.id, "a", result(now, false), vec![10])
        .await
        .unwrap();
    let claimed = store
        .claim_webhook_sends("a", now + 20, now + 60_000, 10)
        .await
        .unwrap();
    assert!(claimed.iter().any(|(s, _)| s.id == send.id));
    let last = store
        .record_webhook_attempt(send.id, "a", result(now + 20, false), vec![10])
        .await
        .unwrap();
    assert_eq!((last.attempt, last.next_attempt_ms), (2, None));
    let hook = store.webhook(hook.id).await.unwrap();
    assert_eq!(hook.state, WebhookState::Disabled);
    assert!(hook.disabled_reason.unwrap().contains("HTTP 500"));
    assert_eq!(
        store.next_webhook_due().await.unwrap(),
        None,
        "the other send is held"
    );
}

conformance!(
    webhook_sends_are_queued_once_claimed_and_recorded,
    failing_throughout_disables_the_endpoint,
);
