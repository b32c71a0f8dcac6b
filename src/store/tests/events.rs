//! The event log's conformance tests (see `store/tests.rs`).

use std::collections::BTreeSet;

use serde_json::json;

use super::*;
use crate::events::{EventFilter, NewEvent, types};

async fn all_events(store: &Store) -> Vec<crate::events::Event> {
    let page = store
        .events_after(EventFilter::default(), 0, 10_000)
        .await
        .unwrap();
    assert!(!page.more);
    page.events
}

fn kinds(events: &[crate::events::Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn custom(kind: &str, subscriber: Option<u64>) -> NewEvent {
    let mut event = NewEvent::new(kind);
    event.subscriber_id = subscriber;
    event.data.insert("n".into(), json!(1));
    event
}

async fn changes_append_their_events_in_order(store: Store) {
    let head = store.event_head();
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let people = vec![person("a@example.com"), person("b@example.com")];
    store
        .upsert_subscribers(newsletter.id, people.clone())
        .await
        .unwrap();
    // The same list again changes nothing, so says nothing.
    store.upsert_subscribers(newsletter.id, people).await.unwrap();
    let mut renamed = person("a@EXAMPLE.COM");
    renamed.name = Some("Ann".into());
    let summary = store
        .upsert_subscribers(newsletter.id, vec![renamed])
        .await
        .unwrap();
    assert_eq!((summary.inserted, summary.updated), (0, 1));
    let [a, b] =
        <[Subscriber; 2]>::try_from(store.subscribers_after(newsletter.id, 0, 10).await.unwrap()).unwrap();
    store.unsubscribe(newsletter.id, b.id).await.unwrap();
    store.unsubscribe(newsletter.id, b.id).await.unwrap();
    let patch = SubscriberPatch {
        status: Some(SubscriberStatus::Active),
        ..Default::default()
    };
    store.update_subscriber(b.id, patch).await.unwrap();

    let mut job = job_for(newsletter.id);
    job.state = JobState::Queued;
    let NewJob::Created(job) = store.create_job(job, None).await.unwrap() else {
        panic!("a new job")
    };
    store
        .add_recipients(job.id, vec![(a.id, a.email.clone()), (b.id, b.email.clone())])
        .await
        .unwrap();
    assert!(store.start_job(job.id, 4).await.unwrap().1);
    let claimed = ids(&store.claim(NODE, job.id, 2, now_ms()).await.unwrap());
    let outcomes = vec![
        (
            claimed[0],
            Outcome::Delivered {
                reply: "250 ok".into(),
            },
        ),
        (
            claimed[1],
            Outcome::Failed {
                reason: "550 5.1.1 no such user".into(),
            },
        ),
    ];
    store.record(NODE, job.id, outcomes).await.unwrap();
    assert!(store.complete_if_done(job.id).await.unwrap().1);

    let events = all_events(&store).await;
    assert_eq!(
        kinds(&events),
        [
            types::SUBSCRIBER_CREATED,
            types::SUBSCRIBER_CREATED,
            types::SUBSCRIBER_UPDATED,
            types::SUBSCRIBER_UNSUBSCRIBED,
            types::SUBSCRIBER_REINSTATED,
            types::JOB_CREATED,
            types::JOB_STARTED,
            types::DELIVERY_FAILED,
            types::JOB_COMPLETED,
        ]
    );
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "ids follow each other"
    );
    assert_eq!(events[2].data["changed"], json!(["name"]));
    assert_eq!(events[2].subscriber_id, Some(a.id));
    let failed = &events[7];
    assert_eq!(
        (failed.job_id, failed.subscriber_id, failed.letter_id),
        (Some(job.id), Some(claimed[1]), Some(job.letter_id))
    );
    assert_eq!(failed.data["reason"], json!("550 5.1.1 no such user"));
    assert_eq!(events[8].data["counts"]["delivered"], json!(1));
    assert_eq!(
        *head.borrow(),
        events.len() as u64,
        "the head moved to the last event"
    );
}

async fn the_log_pages_filters_and_resumes(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(newsletter.id, vec![person("a@example.com")])
        .await
        .unwrap();
    let a = store.subscribers_after(newsletter.id, 0, 1).await.unwrap()[0].id;
    let appended = store
        .append_events(
            (0..24)
                .map(|i| {
                    custom(
                        if i % 3 == 0 { "custom.buy" } else { "custom.view" },
                        (i % 2 == 0).then_some(a),
                    )
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(appended.len(), 24);
    assert_eq!(appended[0].id, 2, "after subscriber.created");
    assert_eq!(appended[23].id, 25);

    // Pages of 10 from the start: every event once, in order.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .events_after(EventFilter::default(), after, 10)
            .await
            .unwrap();
        assert!(page.events.len() <= 10);
        seen.extend(page.events.iter().map(|e| e.id));
        assert!(page.next >= after);
        after = page.next;
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());

    let buys = EventFilter {
        types: vec!["custom.buy".into()],
        subscriber_id: None,
    };
    let page = store.events_after(buys.clone(), 0, 100).await.unwrap();
    assert_eq!(page.events.len(), 8);
    assert!(page.events.iter().all(|e| e.kind == "custom.buy"));
    assert_eq!((page.next, page.more), (25, false));
    let prefixed = EventFilter {
        types: vec!["custom.*".into()],
        subscriber_id: Some(a),
    };
    let page = store.events_after(prefixed, 0, 100).await.unwrap();
    assert_eq!(page.events.len(), 12, "a's custom events");
    let mine = EventFilter {
        types: vec![],
        subscriber_id: Some(a),
    };
    let page = store.events_after(mine.clone(), 0, 5).await.unwrap();
    assert_eq!(page.events.len(), 5);
    assert_eq!(page.events[0].kind, types::SUBSCRIBER_CREATED);
    assert!(page.more);
    let rest = store.events_after(mine, page.next, 100).await.unwrap();
    assert_eq!(rest.events.len(), 8);
    assert_eq!((rest.next, rest.more), (25, false));
    // Past the end: nothing, and the cursor stays.
    let page = store.events_after(buys, 25, 10).await.unwrap();
    assert_eq!((page.events.len(), page.next, page.more), (0, 25, false));

    // An event for a subscriber who does not exist is refused, and nothing is written.
    let err = store
        .append_events(vec![custom("custom.x", None), custom("custom.x", Some(999_999))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert_eq!(all_events(&store).await.len(), 25);
}

async fn erasure_scrubs_a_subscribers_events(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(
            newsletter.id,
            vec![person("gone@example.com"), person("kept@example.com")],
        )
        .await
        .unwrap();
    let [gone, kept] =
        <[Subscriber; 2]>::try_from(store.subscribers_after(newsletter.id, 0, 10).await.unwrap()).unwrap();
    store
        .append_events(vec![
            custom("custom.buy", Some(gone.id)),
            custom("custom.buy", Some(kept.id)),
        ])
        .await
        .unwrap();
    store.delete_subscriber(gone.id).await.unwrap();
    let events = all_events(&store).await;
    assert_eq!(events.len(), 5);
    let text = serde_json::to_string(&events).unwrap();
    assert!(!text.contains("gone@example.com"), "{text}");
    assert!(text.contains("kept@example.com"));
    for event in events.iter().filter(|e| e.subscriber_id == Some(gone.id)) {
        assert!(event.data.is_empty(), "{event:?}");
    }
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.subscriber_id),
        (types::SUBSCRIBER_ERASED, Some(gone.id))
    );
    assert_eq!(
        events[3].data["n"],
        json!(1),
        "the other subscriber's event is whole"
    );
}

async fn old_events_are_pruned_in_batches(store: Store) {
    store
        .append_events((0..5).map(|_| custom("custom.x", None)).collect())
        .await
        .unwrap();
    assert_eq!(store.prune_events(0, 10).await.unwrap(), 0, "nothing that old");
    let later = now_ms() + 1_000;
    assert_eq!(store.prune_events(later, 2).await.unwrap(), 2);
    assert_eq!(store.prune_events(later, 2).await.unwrap(), 2);
    assert_eq!(store.prune_events(later, 2).await.unwrap(), 1);
    assert_eq!(store.prune_events(later, 2).await.unwrap(), 0);
    assert!(all_events(&store).await.is_empty());
    // Ids go on after the pruned ones.
    let next = store.append_events(vec![custom("custom.x", None)]).await.unwrap();
    assert_eq!(next[0].id, 6);
}

/// Appends from many concurrent transactions while a reader follows the log: the
/// reader sees every id exactly once, in order, though it reads while appends are in
/// flight (on PostgreSQL, a sequence would let it skip an id committed late).
async fn a_reader_following_concurrent_appends_misses_nothing(store: Store) {
    const WRITERS: u64 = 8;
    const EACH: u64 = 40;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let n = 1 + (w as usize % 3);
                store
                    .append_events((0..n).map(|_| custom("custom.x", None)).collect())
                    .await
                    .unwrap();
            }
        }));
    }
    let total: u64 = (0..WRITERS).map(|w| EACH * (1 + w % 3)).sum();
    let mut seen = Vec::new();
    let mut after = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while (seen.len() as u64) < total {
        assert!(
            std::time::Instant::now() < deadline,
            "saw {} of {total}",
            seen.len()
        );
        let page = store
            .events_after(EventFilter::default(), after, 7)
            .await
            .unwrap();
        seen.extend(page.events.iter().map(|e| e.id));
        after = page.next;
        if page.events.is_empty() {
            tokio::task::yield_now().await;
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    let distinct: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(distinct.len() as u64, total);
}

/// The public form's subscribers: unconfirmed until confirmed (`subscriber.confirmed`),
/// found for expiry by their age until then, and a second request changes nothing.
async fn unconfirmed_subscribers_are_confirmed_or_found_for_expiry(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(newsletter.id, vec![person("on@example.com")])
        .await
        .unwrap();
    let (active, new) = store
        .subscribe_unconfirmed(newsletter.id, person("on@EXAMPLE.com"))
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(
        active.status,
        SubscriberStatus::Active,
        "a stranger's form changes nothing"
    );
    let (u, new) = store
        .subscribe_unconfirmed(newsletter.id, person("u@example.com"))
        .await
        .unwrap();
    assert!(new);
    assert_eq!(u.status, SubscriberStatus::Unconfirmed);
    let (again, new) = store
        .subscribe_unconfirmed(newsletter.id, person("u@Example.COM"))
        .await
        .unwrap();
    assert_eq!((again.id, new), (u.id, false));
    let (v, _) = store
        .subscribe_unconfirmed(newsletter.id, person("v@example.com"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .subscribe_unconfirmed(newsletter.id + 99, person("w@example.com"))
            .await,
        Err(StoreError::NotFound { .. })
    ));

    let later = crate::domain::now() + 2;
    assert_eq!(store.unconfirmed_before(later, 10).await.unwrap(), [u.id, v.id]);
    assert_eq!(store.unconfirmed_before(later, 1).await.unwrap(), [u.id]);
    assert!(
        store
            .unconfirmed_before(u.created_at, 10)
            .await
            .unwrap()
            .is_empty(),
        "only those created before"
    );

    let confirm = SubscriberPatch {
        status: Some(SubscriberStatus::Active),
        confirming: true,
        ..Default::default()
    };
    let confirmed = store.update_subscriber(v.id, confirm).await.unwrap();
    assert_eq!(confirmed.status, SubscriberStatus::Active);
    assert_eq!(store.unconfirmed_before(later, 10).await.unwrap(), [u.id]);
    store.delete_subscriber(u.id).await.unwrap();
    assert!(store.unconfirmed_before(later, 10).await.unwrap().is_empty());

    let events = all_events(&store).await;
    let about = |id: u64| -> Vec<&str> {
        events
            .iter()
            .filter(|e| e.subscriber_id == Some(id))
            .map(|e| e.kind.as_str())
            .collect()
    };
    assert_eq!(
        about(v.id),
        [types::SUBSCRIBER_CREATED, types::SUBSCRIBER_CONFIRMED]
    );
    assert_eq!(about(u.id), [types::SUBSCRIBER_CREATED, types::SUBSCRIBER_ERASED]);
    assert_eq!(about(active.id), [types::SUBSCRIBER_CREATED]);
}

conformance!(
    changes_append_their_events_in_order,
    the_log_pages_filters_and_resumes,
    erasure_scrubs_a_subscribers_events,
    old_events_are_pruned_in_batches,
    a_reader_following_concurrent_appends_misses_nothing,
    unconfirmed_subscribers_are_confirmed_or_found_for_expiry,
);
