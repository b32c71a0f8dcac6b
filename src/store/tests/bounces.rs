//! Bounce reports and the suppression list: conformance tests (see `store/tests.rs`).

use super::*;
use crate::bounces::{
    BounceFilter, BounceKind, NewBounce, NewSuppression, Rules, SuppressionReason, sources,
};
use crate::events::{EventFilter, types};

fn report(kind: BounceKind, email: &str) -> NewBounce {
    NewBounce {
        status: Some(match kind {
            BounceKind::Soft => "4.2.2".into(),
            _ => "5.1.1".into(),
        }),
        diagnostic: Some(format!("550 5.1.1 <{email}>: user unknown")),
        raw: Some(format!("Final-Recipient: rfc822; {email}")),
        ..NewBounce::new(kind, sources::API, email)
    }
}

async fn newsletter_with(store: &Store, emails: &[&str]) -> (u64, Vec<Subscriber>) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let people = emails.iter().map(|e| person(e)).collect();
    store.upsert_subscribers(newsletter.id, people).await.unwrap();
    let subscribers = store.subscribers_after(newsletter.id, 0, 100).await.unwrap();
    (newsletter.id, subscribers)
}

async fn kinds_since(store: &Store, after: u64) -> Vec<String> {
    let page = store
        .events_after(EventFilter::default(), after, 100)
        .await
        .unwrap();
    page.events.into_iter().map(|e| e.kind).collect()
}

async fn hard_bounces_suppress_at_once_and_soft_ones_at_the_third(store: Store) {
    let (newsletter, people) = newsletter_with(&store, &["a@example.com", "b@example.com"]).await;
    let (a, b) = (&people[0], &people[1]);
    let head = store.event_head().borrow().to_owned();
    let mut hard = report(BounceKind::Hard, "a@EXAMPLE.com");
    hard.newsletter_id = Some(newsletter);
    hard.job_id = Some(9);
    let records = store.record_bounce(hard, Rules::default()).await.unwrap();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.subscriber_id, Some(a.id));
    assert_eq!(
        record.email, "a@example.com",
        "the subscriber's address as stored"
    );
    assert_eq!(record.job_id, Some(9));
    assert_eq!(record.decision, "subscriber bounced: hard bounce 5.1.1");
    assert_eq!(
        store.subscriber(newsletter, a.id).await.unwrap().status,
        SubscriberStatus::Bounced
    );
    assert_eq!(
        kinds_since(&store, head).await,
        [types::DELIVERY_BOUNCED, types::SUBSCRIBER_BOUNCED]
    );

    let soft = || NewBounce {
        subscriber_id: Some(b.id),
        ..report(BounceKind::Soft, "")
    };
    for n in 1..=2 {
        let record = &store.record_bounce(soft(), Rules::default()).await.unwrap()[0];
        assert!(
            record.decision.contains(&format!("{n} of 3 within 7 days")),
            "{}",
            record.decision
        );
        assert_eq!(record.email, "b@example.com", "filled in from the subscriber");
        assert_eq!(
            store.subscriber(newsletter, b.id).await.unwrap().status,
            SubscriberStatus::Active
        );
    }
    let third = &store.record_bounce(soft(), Rules::default()).await.unwrap()[0];
    assert!(
        third.decision.starts_with("subscriber bounced"),
        "{}",
        third.decision
    );
    assert_eq!(
        store.subscriber(newsletter, b.id).await.unwrap().status,
        SubscriberStatus::Bounced
    );
    // Soft bounces older than the window do not count.
    let short = Rules {
        soft_limit: 2,
        soft_window_ms: 0,
    };
    let (_, others) = newsletter_with(&store, &["c@example.com"]).await;
    let c = NewBounce {
        subscriber_id: Some(others[0].id),
        ..report(BounceKind::Soft, "")
    };
    store.record_bounce(c.clone(), short).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = &store.record_bounce(c, short).await.unwrap()[0];
    assert!(again.decision.contains("1 of 2"), "{}", again.decision);

    // Reinstated: the reports stay, listed newest first, and count no more.
    let (after, lifted) = store.reinstate(b.id).await.unwrap();
    assert_eq!((after.status, lifted), (SubscriberStatus::Active, None));
    let listed = store
        .bounces(
            BounceFilter {
                subscriber_id: Some(b.id),
                unattributed: false,
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(listed.iter().all(|r| !r.counted));
    let page = store
        .bounces(
            BounceFilter {
                subscriber_id: Some(b.id),
                unattributed: false,
            },
            Some(listed[0].id),
            1,
        )
        .await
        .unwrap();
    assert_eq!(page, [listed[1].clone()]);
    let fourth = &store.record_bounce(soft(), Rules::default()).await.unwrap()[0];
    assert!(fourth.decision.contains("1 of 3"), "{}", fourth.decision);
    assert_eq!(
        store.subscriber(newsletter, b.id).await.unwrap().status,
        SubscriberStatus::Active
    );
    // A reinstatement is an event; an unsubscribed subscriber is not for the operator to
    // bring back.
    let head = store.event_head().borrow().to_owned();
    store.reinstate(a.id).await.unwrap();
    assert_eq!(kinds_since(&store, head).await, [types::SUBSCRIBER_REINSTATED]);
    store.unsubscribe(newsletter, a.id).await.unwrap();
    let err = store.reinstate(a.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let err = store.reinstate(999_999).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

async fn a_complaint_suppresses_the_address_in_every_newsletter(store: Store) {
    let (first, people) = newsletter_with(&store, &["ann@example.com", "bob@example.com"]).await;
    let (second, theirs) = newsletter_with(&store, &["ann@EXAMPLE.COM"]).await;
    let (ann, bob, ann2) = (&people[0], &people[1], &theirs[0]);
    store.unsubscribe(second, ann2.id).await.unwrap();
    let status_epoch = store.status_epoch();
    let complaint = NewBounce {
        subscriber_id: Some(ann.id),
        job_id: Some(4),
        letter_id: Some(5),
        status: None,
        ..report(BounceKind::Complaint, "")
    };
    let records = store.record_bounce(complaint, Rules::default()).await.unwrap();
    assert!(
        store.status_epoch() > status_epoch,
        "running jobs must look again"
    );
    let about: Vec<_> = records.iter().map(|r| (r.subscriber_id, r.job_id)).collect();
    assert_eq!(about, [(Some(ann.id), Some(4)), (Some(ann2.id), None)]);
    for (newsletter, id) in [(first, ann.id), (second, ann2.id)] {
        assert_eq!(
            store.subscriber(newsletter, id).await.unwrap().status,
            SubscriberStatus::Complained
        );
    }
    assert_eq!(
        store.subscriber(first, bob.id).await.unwrap().status,
        SubscriberStatus::Active
    );
    let listed = store
        .suppressed(vec![
            "Ann@Example.com".into(),
            "ann@example.com".into(),
            "bob@example.com".into(),
        ])
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].reason, SuppressionReason::Complained);
    assert_eq!(listed[0].bounce_id, Some(records[0].id));
    assert!(listed[0].skip_reason().starts_with("address suppressed since 20"));

    // Reinstating one subscriber lifts the address's suppression; the other stays.
    let (after, lifted) = store.reinstate(ann.id).await.unwrap();
    assert_eq!(after.status, SubscriberStatus::Active);
    assert_eq!(lifted.map(|s| s.reason), Some(SuppressionReason::Complained));
    assert!(
        store
            .suppressed(vec!["ann@example.com".into()])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.subscriber(second, ann2.id).await.unwrap().status,
        SubscriberStatus::Complained
    );
}

async fn reports_about_nobody_are_kept_as_unattributed(store: Store) {
    let (newsletter, _) = newsletter_with(&store, &["a@example.com"]).await;
    let unknown = store
        .record_bounce(report(BounceKind::Hard, "who@example.org"), Rules::default())
        .await
        .unwrap();
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].subscriber_id, None);
    assert!(unknown[0].decision.contains("no subscriber has this address"));
    let mut elsewhere = report(BounceKind::Hard, "who@example.org");
    elsewhere.newsletter_id = Some(newsletter);
    store.record_bounce(elsewhere, Rules::default()).await.unwrap();
    // A complaint about an unknown address still keeps it off every list.
    store
        .record_bounce(
            report(BounceKind::Complaint, "spam@example.org"),
            Rules::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .suppressed(vec!["spam@example.org".into()])
            .await
            .unwrap()
            .len(),
        1
    );
    store
        .record_bounce(report(BounceKind::Hard, "a@example.com"), Rules::default())
        .await
        .unwrap();
    let unattributed = store
        .bounces(
            BounceFilter {
                subscriber_id: None,
                unattributed: true,
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(unattributed.len(), 3);
    assert!(unattributed.iter().all(|b| b.subscriber_id.is_none()));
    let all = store.bounces(BounceFilter::default(), None, 10).await.unwrap();
    assert_eq!(all.len(), 4);
    // Junk with NUL bytes (the listener keeps whatever arrives) is kept on every backend.
    let mut junk = report(BounceKind::Soft, "junk\0@example.org");
    junk.raw = Some("\0\u{1}binary\0".into());
    junk.diagnostic = Some("a\0b".into());
    let kept = store.record_bounce(junk, Rules::default()).await.unwrap();
    assert_eq!(kept[0].raw.as_deref(), Some("\u{fffd}\u{1}binary\u{fffd}"));
    assert_eq!(kept[0].diagnostic.as_deref(), Some("a\u{fffd}b"));
    let all = store.bounces(BounceFilter::default(), None, 10).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].email, "junk\u{fffd}@example.org");
    // A newsletter that does not exist is refused, and nothing is recorded.
    let mut nowhere = report(BounceKind::Hard, "a@example.com");
    nowhere.newsletter_id = Some(424_242);
    let err = store.record_bounce(nowhere, Rules::default()).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert_eq!(
        store
            .bounces(BounceFilter::default(), None, 10)
            .await
            .unwrap()
            .len(),
        5
    );
}

async fn the_suppression_list_adds_pages_and_removes(store: Store) {
    let manual = |email: &str| NewSuppression {
        email: email.into(),
        reason: SuppressionReason::Manual,
        note: Some("asked by phone".into()),
        bounce_id: None,
    };
    let epoch = store.status_epoch();
    let added = store
        .add_suppressions(vec![
            manual("c@example.com"),
            manual("a@example.com"),
            manual("b@example.com"),
            manual("a@EXAMPLE.COM"),
        ])
        .await
        .unwrap();
    assert_eq!(added, 3, "one address twice is one entry");
    assert!(store.status_epoch() > epoch);
    assert_eq!(
        store
            .add_suppressions(vec![manual("b@example.com")])
            .await
            .unwrap(),
        0
    );
    let first = store.suppressions(None, 2).await.unwrap();
    let emails: Vec<_> = first.iter().map(|s| s.email.as_str()).collect();
    assert_eq!(emails, ["a@example.com", "b@example.com"]);
    assert_eq!(first[0].note.as_deref(), Some("asked by phone"));
    let rest = store
        .suppressions(Some("b@example.com".into()), 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].email, "c@example.com");
    let removed = store.remove_suppression("b@example.COM".into()).await.unwrap();
    assert_eq!(removed.email, "b@example.com");
    let err = store
        .remove_suppression("b@example.com".into())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert_eq!(store.suppressions(None, 10).await.unwrap().len(), 2);
}

async fn erasure_scrubs_a_subscribers_reports(store: Store) {
    let (_, people) = newsletter_with(&store, &["gone@example.com", "kept@example.com"]).await;
    for person in &people {
        let mut hard = report(BounceKind::Hard, &person.email);
        hard.subscriber_id = Some(person.id);
        store.record_bounce(hard, Rules::default()).await.unwrap();
    }
    store.delete_subscriber(people[0].id).await.unwrap();
    let all = store.bounces(BounceFilter::default(), None, 10).await.unwrap();
    assert_eq!(all.len(), 2, "the reports stay");
    let gone = all
        .iter()
        .find(|b| b.subscriber_id == Some(people[0].id))
        .unwrap();
    assert_eq!(
        (gone.email.as_str(), &gone.raw, &gone.diagnostic),
        ("", &None, &None)
    );
    assert_eq!(gone.kind, BounceKind::Hard);
    assert!(!format!("{gone:?}").contains("gone@"));
    let kept = all
        .iter()
        .find(|b| b.subscriber_id == Some(people[1].id))
        .unwrap();
    assert!(kept.raw.as_deref().unwrap().contains("kept@example.com"));
    let theirs = BounceFilter {
        subscriber_id: Some(people[0].id),
        unattributed: false,
    };
    let listed = store.bounces(theirs, None, 10).await.unwrap();
    assert!(listed.iter().all(|b| b.email.is_empty()), "{listed:?}");
}

conformance!(
    hard_bounces_suppress_at_once_and_soft_ones_at_the_third,
    a_complaint_suppresses_the_address_in_every_newsletter,
    reports_about_nobody_are_kept_as_unattributed,
    the_suppression_list_adds_pages_and_removes,
    erasure_scrubs_a_subscribers_reports,
);
