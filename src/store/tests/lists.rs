//! Newsletters and letters: listing, changing and deleting them (see `store/tests.rs`).

use serde_json::json;

use super::*;

fn letter_for(newsletter_id: u64, subject: &str) -> Letter {
    Letter {
        id: 0,
        newsletter_id,
        subject: subject.into(),
        text: "Body".into(),
        html: None,
        filter: "default-filter".into(),
        template: "default-template".into(),
        params: Default::default(),
        created_at: now(),
    }
}

async fn newsletters_page_in_id_order_and_change(store: Store) {
    let mut made = Vec::new();
    for i in 0..5 {
        let n = store
            .create_newsletter(format!("N{i}"), "news@example.com".into())
            .await
            .unwrap();
        made.push(n.id);
    }
    let first = store.newsletters_after(0, 3).await.unwrap();
    assert_eq!(first.iter().map(|n| n.id).collect::<Vec<_>>(), made[..3]);
    let rest = store.newsletters_after(first[2].id, 3).await.unwrap();
    assert_eq!(rest.iter().map(|n| n.id).collect::<Vec<_>>(), made[3..]);

    let renamed = store
        .update_newsletter(made[0], Some("Renamed".into()), None)
        .await
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.from.as_str()),
        ("Renamed", "news@example.com")
    );
    let moved = store
        .update_newsletter(made[0], None, Some("Ann <ann@example.com>".into()))
        .await
        .unwrap();
    assert_eq!(
        (moved.name.as_str(), moved.from.as_str()),
        ("Renamed", "Ann <ann@example.com>")
    );
    assert_eq!(
        store.newsletter(made[0]).await.unwrap().from,
        "Ann <ann@example.com>"
    );
    assert!(matches!(
        store.update_newsletter(9_999, Some("x".into()), None).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn letters_page_per_newsletter_and_change_unless_a_job_is_open(store: Store) {
    let a = store
        .create_newsletter("A".into(), "a@example.com".into())
        .await
        .unwrap();
    let b = store
        .create_newsletter("B".into(), "b@example.com".into())
        .await
        .unwrap();
    let mut of_a = Vec::new();
    for i in 0..4 {
        of_a.push(
            store
                .create_letter(letter_for(a.id, &format!("a{i}")))
                .await
                .unwrap(),
        );
        store
            .create_letter(letter_for(b.id, &format!("b{i}")))
            .await
            .unwrap();
    }
    let page = store.letters_after(a.id, 0, 3).await.unwrap();
    assert_eq!(
        page.iter().map(|l| l.subject.as_str()).collect::<Vec<_>>(),
        ["a0", "a1", "a2"]
    );
    let rest = store.letters_after(a.id, page[2].id, 3).await.unwrap();
    assert_eq!(
        rest.iter().map(|l| l.subject.as_str()).collect::<Vec<_>>(),
        ["a3"]
    );
    assert!(matches!(
        store.letters_after(9_999, 0, 3).await,
        Err(StoreError::NotFound { .. })
    ));

    // An edit keeps the id, newsletter and creation time whatever the caller passes.
    let mut edit = of_a[0].clone();
    edit.subject = "edited".into();
    edit.html = Some("<p>x</p>".into());
    edit.newsletter_id = b.id;
    edit.created_at = 1;
    let edited = store.update_letter(edit).await.unwrap();
    assert_eq!(edited.newsletter_id, a.id);
    assert_eq!(edited.created_at, of_a[0].created_at);
    let read = store.letter(of_a[0].id).await.unwrap();
    assert_eq!(
        (read.subject.as_str(), read.html.as_deref()),
        ("edited", Some("<p>x</p>"))
    );

    // A job that is not finished holds its letter: no edit, no delete.
    let mut job = job_for(a.id);
    job.letter_id = of_a[1].id;
    job.state = JobState::Paused;
    let NewJob::Created(job) = store.create_job(job, None).await.unwrap() else {
        panic!("no job");
    };
    let mut edit = of_a[1].clone();
    edit.subject = "too late".into();
    let refused = store.update_letter(edit.clone()).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains(&format!("job {}", job.id))),
        "{refused:?}"
    );
    assert!(matches!(
        store.delete_letter(of_a[1].id).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.letter(of_a[1].id).await.unwrap().subject, "a1");
    // Once it is finished, the letter may change or go; the job stays.
    store
        .update_job(job.id, |j| j.state = JobState::Cancelled)
        .await
        .unwrap();
    store.update_letter(edit).await.unwrap();
    store.delete_letter(of_a[1].id).await.unwrap();
    assert!(matches!(
        store.letter(of_a[1].id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.job(job.id).await.unwrap().letter_id, of_a[1].id);
    assert!(matches!(
        store.delete_letter(of_a[1].id).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn a_newsletter_is_deleted_only_without_subscribers_or_open_jobs(store: Store) {
    let n = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let letter = store.create_letter(letter_for(n.id, "hi")).await.unwrap();
    store
        .upsert_subscribers(n.id, vec![person("ann@example.com")])
        .await
        .unwrap();
    let refused = store.delete_newsletter(n.id).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("1 subscriber")),
        "{refused:?}"
    );
    let ann = store.subscribers_after(n.id, 0, 10).await.unwrap().remove(0);
    store.delete_subscriber(ann.id).await.unwrap();

    let mut job = job_for(n.id);
    job.letter_id = letter.id;
    job.state = JobState::Scheduled;
    let NewJob::Created(job) = store.create_job(job, None).await.unwrap() else {
        panic!("no job");
    };
    assert!(matches!(
        store.delete_newsletter(n.id).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .update_job(job.id, |j| j.state = JobState::Completed)
        .await
        .unwrap();
    store.delete_newsletter(n.id).await.unwrap();
    assert!(matches!(
        store.newsletter(n.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.letter(letter.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.newsletters_after(0, 10).await.unwrap().is_empty());
    assert!(matches!(
        store.delete_newsletter(n.id).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn a_search_finds_by_text_status_and_attribute_within_its_scan(store: Store) {
    let n = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let mut people = Vec::new();
    for i in 0..30 {
        let mut p = person(&format!("p{i}@Example.com"));
        p.name = Some(if i % 10 == 3 {
            format!("Zoë Ünal {i}")
        } else {
            format!("Person {i}")
        });
        p.attributes
            .insert("plan".into(), json!(if i % 3 == 0 { "pro" } else { "free" }));
        p.attributes.insert("n".into(), json!(i));
        people.push(p);
    }
    store.upsert_subscribers(n.id, people).await.unwrap();
    let all = store.subscribers_after(n.id, 0, 100).await.unwrap();
    store
        .update_subscriber(
            all[5].id,
            SubscriberPatch {
                status: Some(SubscriberStatus::Unsubscribed),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let all = store.subscribers_after(n.id, 0, 100).await.unwrap();
    let search = |filter: SubscriberFilter, after: u64, limit: usize, scan: usize| {
        let store = store.clone();
        async move {
            store
                .search_subscribers(n.id, filter, after, limit, scan)
                .await
                .unwrap()
        }
    };
    let text = |t: &str| SubscriberFilter {
        text: Some(t.to_lowercase()),
        ..Default::default()
    };
    // Every filter agrees with `SubscriberFilter::matches`, on every backend.
    let filters = [
        text("ünal"),
        text("P1"),
        text("EXAMPLE.COM"),
        SubscriberFilter {
            status: Some(SubscriberStatus::Unsubscribed),
            ..Default::default()
        },
        SubscriberFilter {
            attribute: Some(("plan".into(), "pro".into())),
            ..Default::default()
        },
        SubscriberFilter {
            attribute: Some(("n".into(), "7".into())),
            ..Default::default()
        },
        SubscriberFilter {
            text: Some("person".into()),
            attribute: Some(("plan".into(), "free".into())),
            ..Default::default()
        },
    ];
    for filter in filters {
        let expected: Vec<u64> = all.iter().filter(|s| filter.matches(s)).map(|s| s.id).collect();
        assert!(!expected.is_empty(), "{filter:?} matches nothing");
        let found = search(filter.clone(), 0, 100, 1000).await;
        assert_eq!(
            found.items.iter().map(|s| s.id).collect::<Vec<_>>(),
            expected,
            "{filter:?}"
        );
        assert_eq!(found.next, None);
    }
    // A full page says where to go on: after its last match.
    let page = search(text("person"), 0, 4, 1000).await;
    assert_eq!(page.items.len(), 4);
    assert_eq!(page.next, Some(page.items[3].id));
    // A scan that ends before the page is full says where it stopped.
    let page = search(text("ünal"), 0, 10, 5).await;
    assert_eq!(page.items.iter().map(|s| s.id).collect::<Vec<_>>(), [all[3].id]);
    assert_eq!(page.next, Some(all[4].id));
    let page = search(text("ünal"), all[4].id, 10, 10).await;
    assert_eq!(page.items.iter().map(|s| s.id).collect::<Vec<_>>(), [all[13].id]);
    assert_eq!(page.next, Some(all[14].id));
    assert!(matches!(
        store.search_subscribers(9_999, text("x"), 0, 10, 10).await,
        Err(StoreError::NotFound { .. })
    ));
}

conformance!(
    a_search_finds_by_text_status_and_attribute_within_its_scan,
    newsletters_page_in_id_order_and_change,
    letters_page_per_newsletter_and_change_unless_a_job_is_open,
    a_newsletter_is_deleted_only_without_subscribers_or_open_jobs,
);
