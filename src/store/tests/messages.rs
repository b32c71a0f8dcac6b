//! One-off messages' conformance tests (see `store/tests.rs`).

use serde_json::json;

use super::*;
use crate::events::{EventFilter, types};
use crate::messages::*;

async fn someone(store: &Store) -> Subscriber {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(newsletter.id, vec![person("a@example.com")])
        .await
        .unwrap();
    store
        .subscribers_after(newsletter.id, 0, 10)
        .await
        .unwrap()
        .remove(0)
}

fn new_message(s: &Subscriber, text: &str) -> NewMessage {
    NewMessage {
        newsletter_id: s.newsletter_id,
        subscriber_id: s.id,
        email: s.email.clone(),
        content: MessageContent {
            letter_id: None,
            template: None,
            subject: Some("Receipt".into()),
            text: Some(text.into()),
            html: None,
            data: json!({"order": 7}).as_object().unwrap().clone(),
        },
        transport: None,
        message_id: "letterbox.message.x@example.com".into(),
        confirmation: false,
    }
}

fn key(key: &str, hash: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey {
        key: key.into(),
        request_hash: hash.into(),
    })
}

async fn a_message_is_recorded_once_per_idempotency_key(store: Store) {
    let s = someone(&store).await;
    let NewMessageOutcome::Created(first) = store
        .create_message(new_message(&s, "one"), key("k1", "h1"))
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    assert_eq!(first.state, MessageState::Queued);
    match store
        .create_message(new_message(&s, "one"), key("k1", "h1"))
        .await
        .unwrap()
    {
        NewMessageOutcome::Existing(m) => assert_eq!(m, first),
        other => panic!("a replay made {other:?}"),
    }
    assert!(matches!(
        store
            .create_message(new_message(&s, "two"), key("k1", "h2"))
            .await
            .unwrap(),
        NewMessageOutcome::KeyReused
    ));
    let NewMessageOutcome::Created(second) =
        store.create_message(new_message(&s, "two"), None).await.unwrap()
    else {
        panic!("not created")
    };
    assert!(second.id > first.id);
    assert_eq!(store.message(first.id).await.unwrap(), first);
    let queued = store
        .events_after(
            EventFilter {
                types: vec![types::MESSAGE_QUEUED.into()],
                subscriber_id: None,
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        queued.events.len(),
        2,
        "one event per message, none for the replay"
    );
    assert_eq!(queued.events[0].data["message"], json!(first.id));
}

async fn a_claimed_message_is_one_nodes_until_its_lease_ends(store: Store) {
    let s = someone(&store).await;
    let NewMessageOutcome::Created(m) = store.create_message(new_message(&s, "t"), None).await.unwrap()
    else {
        panic!("not created")
    };
    let now = m.next_attempt_ms;
    assert_eq!(store.next_message_due().await.unwrap(), Some(now));
    let claimed = store.claim_messages("a", now, now + 1000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].attempts, claimed[0].lease_node.as_deref()),
        (1, Some("a"))
    );
    assert!(
        store
            .claim_messages("b", now + 500, now + 1500, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Its lease ran out: another node takes it, and the first may no longer record.
    let taken = store
        .claim_messages("b", now + 1001, now + 2000, 10)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].attempts, 2);
    let late = store
        .record_message(
            m.id,
            "a",
            Outcome::Delivered {
                reply: "250 a".into(),
            },
        )
        .await;
    assert!(matches!(late, Err(StoreError::TakenOver(_))), "{late:?}");
    let retry = Outcome::Retry {
        at_ms: now + 5000,
        error: "451 later".into(),
    };
    let queued = store.record_message(m.id, "b", retry).await.unwrap();
    assert_eq!(
        (queued.state, queued.lease_node.clone()),
        (MessageState::Queued, None)
    );
    assert_eq!(store.next_message_due().await.unwrap(), Some(now + 5000));
    assert!(
        store
            .claim_messages("b", now + 4999, now + 9000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store
        .claim_messages("b", now + 5000, now + 9000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    let sent = store
        .record_message(
            m.id,
            "b",
            Outcome::Delivered {
                reply: "250 ok".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!((sent.state, sent.attempts), (MessageState::Sent, 3));
    assert_eq!(store.next_message_due().await.unwrap(), None);
    assert!(
        store
            .claim_messages("b", u64::MAX / 2, u64::MAX / 2, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let ended = store
        .events_after(
            EventFilter {
                types: vec![types::MESSAGE_SENT.into()],
                subscriber_id: Some(s.id),
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!(ended.events.len(), 1);
    assert_eq!(ended.events[0].data["reply"], "250 ok");
}

async fn an_erasure_removes_the_subscribers_messages(store: Store) {
    let s = someone(&store).await;
    let NewMessageOutcome::Created(m) = store
        .create_message(new_message(&s, "t"), key("k", "h"))
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    store.delete_subscriber(s.id).await.unwrap();
    assert!(matches!(
        store.message(m.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.next_message_due().await.unwrap(), None);
    // Its key went with it: the same request is a new message.
    assert!(matches!(
        store
            .create_message(new_message(&s, "t"), key("k", "h"))
            .await
            .unwrap(),
        NewMessageOutcome::Created(_)
    ));
}

conformance!(
    a_message_is_recorded_once_per_idempotency_key,
    a_claimed_message_is_one_nodes_until_its_lease_ends,
    an_erasure_removes_the_subscribers_messages,
);
