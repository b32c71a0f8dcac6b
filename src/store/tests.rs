//! The conformance suite: the same tests against every backend, through `Store` only.
//!
//! Each test is an `async fn(Store)`; `conformance!` makes one `#[tokio::test]` per
//! backend. The PostgreSQL variants need a server: `LETTERBOX_TEST_DATABASE_URL` names
//! one whose user may create databases (each test gets a fresh database). Without it they
//! are skipped with a note, unless `LETTERBOX_REQUIRE_POSTGRES=1` (CI) makes that a
//! failure.

use std::collections::HashSet;

use serde_json::json;

use super::*;

/// The node id the single-node tests claim under.
const NODE: &str = "n-test";

/// A store and whatever must outlive it (a temporary directory).
pub(crate) struct Fixture {
    pub store: Store,
    _dir: Option<tempfile::TempDir>,
    /// The database's URL, for PostgreSQL.
    url: Option<String>,
}

pub(crate) async fn redb() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Location::Redb(&dir.path().join("test.redb")))
        .await
        .unwrap();
    Fixture {
        store,
        _dir: Some(dir),
        url: None,
    }
}

/// The URL of a fresh database on the test server, or `None` (skip) when there is none
/// and none is required.
pub(crate) async fn scratch_url() -> Option<String> {
    let Ok(admin) = std::env::var("LETTERBOX_TEST_DATABASE_URL") else {
        assert!(
            std::env::var("LETTERBOX_REQUIRE_POSTGRES").is_err(),
            "LETTERBOX_REQUIRE_POSTGRES is set but LETTERBOX_TEST_DATABASE_URL is not"
        );
        eprintln!("skipped: no PostgreSQL (set LETTERBOX_TEST_DATABASE_URL, or run under .ci/with-postgres)");
        return None;
    };
    Some(postgres::scratch_database(&admin).await.unwrap())
}

/// A fresh database on the test server, or `None` (skip): see `scratch_url`.
pub(crate) async fn postgres() -> Option<Fixture> {
    let url = scratch_url().await?;
    let store = Store::open(Location::Postgres(&url)).await.unwrap();
    Some(Fixture {
        store,
        _dir: None,
        url: Some(url),
    })
}

fn job_for(newsletter_id: u64) -> Job {
    let version = |name: &str| PolicyVersion {
        name: name.into(),
        id: "0".repeat(64),
    };
    Job {
        id: 0,
        letter_id: 1,
        newsletter_id,
        state: JobState::Running,
        filter: version("default-filter"),
        template: version("default-template"),
        concurrency: 4,
        retry: RetryPolicy::default(),
        transport: None,
        send_at: None,
        counts: Counts::default(),
        prepared: true,
        resent_after_crash: 0,
        error: None,
        pause_reason: None,
        message_id_nonce: Some("00ff".into()),
        created_at: now(),
        started_at: Some(now()),
        finished_at: None,
    }
}

fn person(email: &str) -> NewSubscriber {
    NewSubscriber {
        email: email.into(),
        name: None,
        attributes: Default::default(),
    }
}

/// A newsletter with `n` subscribers (`s1@example.com`, ...) and a running job over all
/// of them. Returns (newsletter id, job).
async fn job_with(store: &Store, n: usize) -> (u64, Job) {
    let newsletter = store
        .create_newsletter("Weekly".into(), "news@example.com".into())
        .await
        .unwrap();
    let people = (1..=n).map(|i| person(&format!("s{i}@example.com"))).collect();
    store.upsert_subscribers(newsletter.id, people).await.unwrap();
    let job = match store.create_job(job_for(newsletter.id), None).await.unwrap() {
        NewJob::Created(job) => job,
        other => panic!("{other:?}"),
    };
    let subscribers = store.subscribers_after(newsletter.id, 0, n).await.unwrap();
    let recipients = subscribers.into_iter().map(|s| (s.id, s.email)).collect();
    assert_eq!(store.add_recipients(job.id, recipients).await.unwrap(), n as u64);
    let job = store.job(job.id).await.unwrap();
    (newsletter.id, job)
}

fn ids(claimed: &[ClaimedRecipient]) -> Vec<u64> {
    claimed.iter().map(|(d, _)| d.subscriber_id).collect()
}

async fn counts(store: &Store, job_id: u64) -> Counts {
    store.job(job_id).await.unwrap().counts
}

/// The counts kept in the job agree with the deliveries listed per state.
async fn assert_counts_match_index(store: &Store, job_id: u64) {
    let counts = counts(store, job_id).await;
    let mut by_kind = Counts::default();
    for kind in StateKind::ALL {
        let n = store
            .deliveries(job_id, Some(kind), 0, usize::MAX)
            .await
            .unwrap()
            .len() as u64;
        let slot = match kind {
            StateKind::Pending => &mut by_kind.pending,
            StateKind::Sending => &mut by_kind.sending,
            StateKind::Delivered => &mut by_kind.delivered,
            StateKind::Skipped => &mut by_kind.skipped,
            StateKind::Retrying => &mut by_kind.retrying,
            StateKind::Failed => &mut by_kind.failed,
            StateKind::Cancelled => &mut by_kind.cancelled,
        };
        *slot = n;
    }
    assert_eq!(counts, by_kind, "job counts vs the state index");
    let all = store.deliveries(job_id, None, 0, usize::MAX).await.unwrap();
    assert_eq!(all.len() as u64, counts.total());
}

async fn claim_moves_pending_to_sending_in_subscriber_order(store: Store) {
    let (newsletter, job) = job_with(&store, 10).await;
    assert_eq!(job.counts.pending, 10);
    let first = store.claim(NODE, job.id, 4, now_ms()).await.unwrap();
    let second = store.claim(NODE, job.id, 4, now_ms()).await.unwrap();
    let all = store.subscribers_after(newsletter, 0, 100).await.unwrap();
    let expected: Vec<u64> = all.iter().map(|s| s.id).collect();
    assert_eq!(ids(&first), expected[..4]);
    assert_eq!(ids(&second), expected[4..8]);
    for (delivery, subscriber) in &first {
        assert!(matches!(delivery.state, DeliveryState::Sending { .. }));
        assert_eq!(delivery.attempts, 1);
        let subscriber = subscriber.as_ref().expect("the claim reads the subscriber");
        assert_eq!(subscriber.id, delivery.subscriber_id);
        assert_eq!(subscriber.email, delivery.email);
    }
    let c = counts(&store, job.id).await;
    assert_eq!((c.pending, c.sending), (2, 8));
    let rest = store.claim(NODE, job.id, 100, now_ms()).await.unwrap();
    assert_eq!(ids(&rest), expected[8..]);
    assert!(store.claim(NODE, job.id, 100, now_ms()).await.unwrap().is_empty());
    assert_counts_match_index(&store, job.id).await;
}

async fn record_moves_sending_to_outcomes_and_keeps_counts(store: Store) {
    let (_, job) = job_with(&store, 5).await;
    let claimed = ids(&store.claim(NODE, job.id, 5, now_ms()).await.unwrap());
    let later = now_ms() + 60_000;
    let outcomes = vec![
        (
            claimed[0],
            Outcome::Delivered {
                reply: "250 ok".into(),
            },
        ),
        (
            claimed[1],
            Outcome::Skipped {
                reason: "filtered".into(),
            },
        ),
        (
            claimed[2],
            Outcome::Retry {
                at_ms: later,
                error: "451 later".into(),
            },
        ),
        (
            claimed[3],
            Outcome::Failed {
                reason: "550 no".into(),
            },
        ),
        (claimed[4], Outcome::Released),
    ];
    let job_after = store.record(NODE, job.id, outcomes).await.unwrap();
    let c = job_after.counts;
    assert_eq!(
        (c.pending, c.sending, c.delivered, c.skipped, c.retrying, c.failed),
        (1, 0, 1, 1, 1, 1)
    );
    let released = &store
        .deliveries(job.id, Some(StateKind::Pending), 0, 10)
        .await
        .unwrap()[0];
    assert_eq!(released.subscriber_id, claimed[4]);
    assert_eq!(released.attempts, 0, "a released claim is not an attempt");
    let delivered = &store
        .deliveries(job.id, Some(StateKind::Delivered), 0, 10)
        .await
        .unwrap()[0];
    assert!(matches!(&delivered.state, DeliveryState::Delivered { reply, .. } if reply == "250 ok"));
    assert_counts_match_index(&store, job.id).await;
}

async fn record_refuses_what_is_not_in_flight_and_changes_nothing(store: Store) {
    let (_, job) = job_with(&store, 3).await;
    let claimed = ids(&store.claim(NODE, job.id, 1, now_ms()).await.unwrap());
    let pending = store
        .deliveries(job.id, Some(StateKind::Pending), 0, 10)
        .await
        .unwrap()[0]
        .subscriber_id;
    let delivered = || Outcome::Delivered { reply: "250".into() };
    let err = store
        .record(
            NODE,
            job.id,
            vec![(claimed[0], delivered()), (pending, delivered())],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let c = counts(&store, job.id).await;
    assert_eq!((c.pending, c.sending, c.delivered), (2, 1, 0), "nothing recorded");
    // A recipient recorded once cannot be recorded again.
    store
        .record(NODE, job.id, vec![(claimed[0], delivered())])
        .await
        .unwrap();
    let err = store.record(NODE, job.id, vec![(claimed[0], delivered())]).await;
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    assert!(matches!(
        store.record(NODE, job.id + 1000, vec![]).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn retries_come_due_first_and_in_time_order(store: Store) {
    let (_, job) = job_with(&store, 6).await;
    let claimed = ids(&store.claim(NODE, job.id, 3, now_ms()).await.unwrap());
    let base = now_ms();
    let retry = |at_ms| Outcome::Retry {
        at_ms,
        error: "451".into(),
    };
    store
        .record(
            NODE,
            job.id,
            vec![
                (claimed[0], retry(base + 20_000)),
                (claimed[1], retry(base + 10_000)),
                (claimed[2], retry(base + 30_000)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(store.next_retry_at(job.id).await.unwrap(), Some(base + 10_000));
    // Not due yet: only pending ones are claimed.
    let now_claim = store.claim(NODE, job.id, 1, base).await.unwrap();
    assert!(!claimed.contains(&now_claim[0].0.subscriber_id));
    // Two are due at base + 25 s: they come first, earliest first, then pending.
    let later = store.claim(NODE, job.id, 3, base + 25_000).await.unwrap();
    assert_eq!(ids(&later)[..2], [claimed[1], claimed[0]]);
    assert!(!claimed.contains(&ids(&later)[2]));
    assert_eq!(later[0].0.attempts, 2, "a retry's claim is another attempt");
    assert_eq!(store.next_retry_at(job.id).await.unwrap(), Some(base + 30_000));
    assert_counts_match_index(&store, job.id).await;
    let other = job_with(&store, 1).await.1;
    assert_eq!(store.next_retry_at(other.id).await.unwrap(), None);
}

async fn job_slots_go_to_the_oldest_queued_jobs(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut job = job_for(newsletter.id);
        job.state = JobState::Queued;
        job.started_at = None;
        let NewJob::Created(job) = store.create_job(job, None).await.unwrap() else {
            panic!()
        };
        ids.push(job.id);
    }
    let (first, started) = store.start_job(ids[0], 2).await.unwrap();
    assert!(started && first.state == JobState::Running && first.started_at.is_some());
    assert!(
        !store.start_job(ids[2], 2).await.unwrap().1,
        "the second came first"
    );
    assert!(store.start_job(ids[1], 2).await.unwrap().1);
    let (third, started) = store.start_job(ids[2], 2).await.unwrap();
    assert!(!started && third.state == JobState::Queued, "both slots taken");
    assert!(
        store.start_job(ids[1], 2).await.unwrap().1,
        "a running job holds its slot"
    );
    store
        .update_job(ids[0], |j| j.state = JobState::Completed)
        .await
        .unwrap();
    assert!(store.start_job(ids[2], 2).await.unwrap().1);
    let (done, started) = store.start_job(ids[0], 2).await.unwrap();
    assert!(!started && done.state == JobState::Completed);
}

async fn cancel_and_retry_failed_move_in_bounded_batches(store: Store) {
    let (_, job) = job_with(&store, 7).await;
    let claimed = ids(&store.claim(NODE, job.id, 3, now_ms()).await.unwrap());
    let failed = |reason: &str| Outcome::Failed {
        reason: reason.into(),
    };
    store
        .record(
            NODE,
            job.id,
            vec![
                (claimed[0], failed("a")),
                (claimed[1], failed("b")),
                (
                    claimed[2],
                    Outcome::Retry {
                        at_ms: now_ms() + 1_000_000,
                        error: "451".into(),
                    },
                ),
            ],
        )
        .await
        .unwrap();
    // 4 pending + 1 retrying are open; cancel them 2 at a time.
    let mut total = 0;
    loop {
        let n = store.cancel_open(job.id, 2).await.unwrap();
        assert!(n <= 2);
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, 5);
    assert_eq!(
        store.next_retry_at(job.id).await.unwrap(),
        None,
        "schedule emptied"
    );
    let job_now = store
        .update_job(job.id, |j| j.state = JobState::Completed)
        .await
        .unwrap();
    assert_eq!(job_now.counts.cancelled, 5);
    assert_eq!(store.requeue_failed(job.id, 1).await.unwrap(), 1);
    let reopened = store.job(job.id).await.unwrap();
    assert_eq!(
        reopened.state,
        JobState::Running,
        "retry-failed reopens a completed job"
    );
    assert_eq!(store.requeue_failed(job.id, 10).await.unwrap(), 1);
    assert_eq!(store.requeue_failed(job.id, 10).await.unwrap(), 0);
    let pending = store
        .deliveries(job.id, Some(StateKind::Pending), 0, 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 2);
    assert!(pending.iter().all(|d| d.attempts == 0), "a fresh attempt budget");
    assert_counts_match_index(&store, job.id).await;
}

async fn complete_if_done_only_when_nothing_is_open(store: Store) {
    let (_, job) = job_with(&store, 2).await;
    assert!(!store.complete_if_done(job.id).await.unwrap().1);
    let claimed = ids(&store.claim(NODE, job.id, 2, now_ms()).await.unwrap());
    assert!(!store.complete_if_done(job.id).await.unwrap().1, "in flight");
    let done = claimed
        .into_iter()
        .map(|id| (id, Outcome::Delivered { reply: "250".into() }))
        .collect();
    store.record(NODE, job.id, done).await.unwrap();
    let (job_now, completed) = store.complete_if_done(job.id).await.unwrap();
    assert!(completed);
    assert_eq!(job_now.state, JobState::Completed);
    assert!(job_now.finished_at.is_some());
    assert!(!store.complete_if_done(job.id).await.unwrap().1, "only once");
}

async fn deliveries_page_by_subscriber_and_state(store: Store) {
    let (_, job) = job_with(&store, 9).await;
    let all = store.deliveries(job.id, None, 0, 100).await.unwrap();
    assert_eq!(all.len(), 9);
    let page1 = store.deliveries(job.id, None, 0, 4).await.unwrap();
    let page2 = store
        .deliveries(job.id, None, page1[3].subscriber_id, 4)
        .await
        .unwrap();
    assert_eq!(page1.len() + page2.len(), 8);
    assert!(page2[0].subscriber_id > page1[3].subscriber_id);
    assert!(
        store
            .deliveries(job.id, None, u64::MAX, 4)
            .await
            .unwrap()
            .is_empty()
    );
    store.claim(NODE, job.id, 3, now_ms()).await.unwrap();
    let sending = store
        .deliveries(job.id, Some(StateKind::Sending), 0, 2)
        .await
        .unwrap();
    assert_eq!(sending.len(), 2);
    let rest = store
        .deliveries(job.id, Some(StateKind::Sending), sending[1].subscriber_id, 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    // Adding the same recipients again adds nothing.
    let again: Vec<(u64, String)> = all.iter().map(|d| (d.subscriber_id, d.email.clone())).collect();
    assert_eq!(store.add_recipients(job.id, again).await.unwrap(), 0);
    assert_counts_match_index(&store, job.id).await;
}

async fn jobs_list_recover_change_and_overview(store: Store) {
    let (newsletter, running) = job_with(&store, 3).await;
    let mut paused = job_for(newsletter);
    paused.state = JobState::Paused;
    let NewJob::Created(paused) = store.create_job(paused, None).await.unwrap() else {
        panic!()
    };
    let mut done = job_for(newsletter);
    done.state = JobState::Completed;
    let NewJob::Created(done) = store.create_job(done, None).await.unwrap() else {
        panic!()
    };
    assert!(running.id < paused.id && paused.id < done.id);
    let listed: Vec<u64> = store
        .list_jobs(None, None, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(listed, vec![done.id, paused.id, running.id], "newest first");
    let page = store.list_jobs(None, Some(done.id), 1).await.unwrap();
    assert_eq!(page[0].id, paused.id);
    let only = store.list_jobs(Some(JobState::Paused), None, 10).await.unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].id, paused.id);

    let recover: HashSet<u64> = store.jobs_to_work().await.unwrap().iter().map(|j| j.id).collect();
    assert_eq!(recover, HashSet::from([running.id]));

    let overview = store.job_overview().await.unwrap();
    assert_eq!(overview.by_state.get(&JobState::Running), Some(&1));
    assert_eq!(overview.by_state.get(&JobState::Paused), Some(&1));
    assert_eq!(overview.open_recipients, 3);

    let err = store
        .update_job_from(done.id, &[JobState::Running], |j| j.state = JobState::Paused)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("completed") && m.contains("running")),
        "{err:?}"
    );
    assert_eq!(store.job(done.id).await.unwrap().state, JobState::Completed);
    let resumed = store
        .update_job_from(paused.id, &[JobState::Paused], |j| {
            j.state = JobState::Running;
            j.pause_reason = None;
        })
        .await
        .unwrap();
    assert_eq!(store.job(paused.id).await.unwrap().state, resumed.state);
    assert!(matches!(
        store.job(999_999).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn idempotency_keys_return_the_first_job_or_refuse(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let key = |hash: &str| {
        Some(IdempotencyKey {
            key: "k-1".into(),
            request_hash: hash.into(),
        })
    };
    let NewJob::Created(first) = store.create_job(job_for(newsletter.id), key("h")).await.unwrap() else {
        panic!()
    };
    match store.create_job(job_for(newsletter.id), key("h")).await.unwrap() {
        NewJob::Existing(job) => assert_eq!(job.id, first.id),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store
            .create_job(job_for(newsletter.id), key("other"))
            .await
            .unwrap(),
        NewJob::KeyReused
    ));
    assert_eq!(store.list_jobs(None, None, 10).await.unwrap().len(), 1);

    // Keys recorded before a time are pruned, a limited number at a time; a pruned
    // key makes a new job.
    let other = |name: &str| {
        Some(IdempotencyKey {
            key: name.into(),
            request_hash: "h".into(),
        })
    };
    store
        .create_job(job_for(newsletter.id), other("k-2"))
        .await
        .unwrap();
    store
        .create_job(job_for(newsletter.id), other("k-3"))
        .await
        .unwrap();
    assert_eq!(store.prune_idempotency_keys(now() - 3600, 10).await.unwrap(), 0);
    assert_eq!(store.prune_idempotency_keys(now() + 2, 2).await.unwrap(), 2);
    assert_eq!(store.prune_idempotency_keys(now() + 2, 2).await.unwrap(), 1);
    match store
        .create_job(job_for(newsletter.id), key("other"))
        .await
        .unwrap()
    {
        NewJob::Created(job) => assert_ne!(job.id, first.id),
        other => panic!("a pruned key makes a new job: {other:?}"),
    }
}

async fn subscribers_upsert_by_normalised_email(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let mut ann = person("Ann@Example.COM");
    ann.name = Some("Ann".into());
    ann.attributes.insert("plan".into(), json!("pro"));
    let summary = store
        .upsert_subscribers(newsletter.id, vec![ann, person("bob@example.com")])
        .await
        .unwrap();
    assert_eq!((summary.inserted, summary.updated), (2, 0));
    let mut again = person("Ann@example.com");
    again.attributes.insert("city".into(), json!("Oslo"));
    let summary = store
        .upsert_subscribers(newsletter.id, vec![again, person("ann@example.com")])
        .await
        .unwrap();
    assert_eq!(
        (summary.inserted, summary.updated),
        (1, 1),
        "the local part is case-sensitive, the domain not"
    );
    let found = store
        .subscriber_by_email(newsletter.id, "Ann@EXAMPLE.com".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.email, "Ann@Example.COM", "kept as first written");
    assert_eq!(found.name.as_deref(), Some("Ann"), "no name given keeps the name");
    assert_eq!(found.attributes["plan"], json!("pro"));
    assert_eq!(found.attributes["city"], json!("Oslo"));
    assert_eq!(store.subscriber_by_id(found.id).await.unwrap().email, found.email);
    assert!(matches!(
        store.subscriber_by_email(newsletter.id + 99, "x@y".into()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store
            .upsert_subscribers(newsletter.id + 99, vec![person("x@y.z")])
            .await,
        Err(StoreError::NotFound { .. })
    ));
    // Ids are unique across newsletters.
    let other = store
        .create_newsletter("M".into(), "m@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(other.id, vec![person("ann@example.com")])
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for n in [newsletter.id, other.id] {
        for s in store.subscribers_after(n, 0, 100).await.unwrap() {
            assert!(seen.insert(s.id), "subscriber ids are unique");
            assert_eq!(s.newsletter_id, n);
        }
    }
    assert_eq!(seen.len(), 4);
}

async fn subscriber_updates_status_and_email_conflicts(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(
            newsletter.id,
            vec![person("a@example.com"), person("b@example.com")],
        )
        .await
        .unwrap();
    let [a, b] =
        <[Subscriber; 2]>::try_from(store.subscribers_after(newsletter.id, 0, 10).await.unwrap()).unwrap();
    let epoch = store.status_epoch();
    let unsubscribed = store.unsubscribe(newsletter.id, a.id).await.unwrap();
    assert_eq!(unsubscribed.status, SubscriberStatus::Unsubscribed);
    assert_ne!(store.status_epoch(), epoch, "a status change moves the epoch");
    assert!(matches!(
        store.unsubscribe(newsletter.id, 999_999).await,
        Err(StoreError::NotFound { .. })
    ));

    let patch = SubscriberPatch {
        email: Some("b@EXAMPLE.com".into()),
        ..Default::default()
    };
    let err = store.update_subscriber(a.id, patch).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let mut attributes = serde_json::Map::new();
    attributes.insert("k".into(), json!(1));
    let patch = SubscriberPatch {
        email: Some("c@example.com".into()),
        name: Some(Some("Cee".into())),
        attributes: Some(attributes),
        status: Some(SubscriberStatus::Active),
        confirming: false,
    };
    let changed = store.update_subscriber(a.id, patch).await.unwrap();
    assert_eq!(
        (changed.email.as_str(), changed.name.as_deref(), changed.status),
        ("c@example.com", Some("Cee"), SubscriberStatus::Active)
    );
    assert!(
        store
            .subscriber_by_email(newsletter.id, "a@example.com".into())
            .await
            .unwrap()
            .is_none(),
        "the old email is free"
    );
    let mut removal = serde_json::Map::new();
    removal.insert("k".into(), serde_json::Value::Null);
    let patch = SubscriberPatch {
        attributes: Some(removal),
        name: Some(None),
        ..Default::default()
    };
    let changed = store.update_subscriber(a.id, patch).await.unwrap();
    assert!(changed.attributes.is_empty() && changed.name.is_none());
    assert_eq!(
        store.subscriber(newsletter.id, b.id).await.unwrap().email,
        "b@example.com"
    );
}

async fn erasure_removes_the_subscriber_and_blanks_their_deliveries(store: Store) {
    let (newsletter, job) = job_with(&store, 2).await;
    let claimed = store.claim(NODE, job.id, 2, now_ms()).await.unwrap();
    let (victim, email) = (claimed[0].0.subscriber_id, claimed[0].0.email.clone());
    let reason = format!("550 <{email}>: no such user");
    store
        .record(
            NODE,
            job.id,
            vec![
                (victim, Outcome::Failed { reason }),
                (claimed[1].0.subscriber_id, Outcome::Released),
            ],
        )
        .await
        .unwrap();
    store.delete_subscriber(victim).await.unwrap();
    assert!(matches!(
        store.subscriber_by_id(victim).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        store
            .subscriber_by_email(newsletter, email.clone())
            .await
            .unwrap()
            .is_none()
    );
    let records = store.deliveries(job.id, None, 0, 10).await.unwrap();
    let erased = records.iter().find(|d| d.subscriber_id == victim).unwrap();
    let text = serde_json::to_string(erased).unwrap();
    assert!(!text.contains(&email), "no trace of the address: {text}");
    assert!(text.contains("[erased]"), "{text}");
    // The claim of a deleted subscriber says so.
    let claimed = store.claim(NODE, job.id, 2, now_ms()).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].1.is_some());
    assert!(matches!(
        store.delete_subscriber(victim).await,
        Err(StoreError::NotFound { .. })
    ));
    // The address can subscribe again, as a new subscriber.
    let summary = store
        .upsert_subscribers(newsletter, vec![person(&email)])
        .await
        .unwrap();
    assert_eq!(summary.inserted, 1);
}

async fn a_claimed_subscriber_deleted_before_the_claim_is_none(store: Store) {
    let (_, job) = job_with(&store, 1).await;
    let only = store.deliveries(job.id, None, 0, 1).await.unwrap()[0].subscriber_id;
    store.delete_subscriber(only).await.unwrap();
    let claimed = store.claim(NODE, job.id, 1, now_ms()).await.unwrap();
    assert_eq!(claimed[0].0.subscriber_id, only);
    assert!(claimed[0].1.is_none());
}

async fn letters_and_newsletters_round_trip(store: Store) {
    let newsletter = store
        .create_newsletter("Weekly".into(), "Weekly <news@example.com>".into())
        .await
        .unwrap();
    assert_eq!(
        store.newsletter(newsletter.id).await.unwrap().from,
        newsletter.from
    );
    let mut params = serde_json::Map::new();
    params.insert("variant".into(), json!(["a", "b"]));
    let letter = Letter {
        id: 0,
        newsletter_id: newsletter.id,
        subject: "Hi {{ name }}".into(),
        text: "Body".into(),
        html: Some("<p>Body</p>".into()),
        filter: "default-filter".into(),
        template: "default-template@abc".into(),
        params,
        created_at: now(),
    };
    let stored = store.create_letter(letter.clone()).await.unwrap();
    assert_ne!(stored.id, 0);
    let read = store.letter(stored.id).await.unwrap();
    assert_eq!(
        serde_json::to_value(&read).unwrap(),
        serde_json::to_value(&stored).unwrap()
    );
    let mut orphan = letter;
    orphan.newsletter_id = 999_999;
    assert!(matches!(
        store.create_letter(orphan).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.letter(999_999).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.newsletter(999_999).await,
        Err(StoreError::NotFound { .. })
    ));
}

/// Concurrent claims never hand out a recipient twice, and every recipient is handed
/// out once; concurrent records and claims keep the counts exact.
async fn concurrent_claims_never_overlap(store: Store) {
    let (_, job) = job_with(&store, 600).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let store = store.clone();
        let node = format!("n-{i}");
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store.claim(&node, job.id, 17, now_ms()).await.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                let got = ids(&claimed);
                let outcomes = got
                    .iter()
                    .map(|&id| (id, Outcome::Delivered { reply: "250".into() }))
                    .collect();
                store.record(&node, job.id, outcomes).await.unwrap();
                mine.extend(got);
            }
        });
    }
    let mut seen = HashSet::new();
    while let Some(mine) = tasks.join_next().await {
        for id in mine.unwrap() {
            assert!(seen.insert(id), "recipient {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), 600);
    let c = counts(&store, job.id).await;
    assert_eq!((c.delivered, c.pending, c.sending), (600, 0, 0));
}

/// Concurrent imports into one newsletter: every email once, whichever writer wins.
async fn concurrent_upserts_keep_emails_unique(store: Store) {
    let newsletter = store
        .create_newsletter("N".into(), "n@example.com".into())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.spawn(async move {
            let people = (0..200).map(|i| person(&format!("p{i}@example.com"))).collect();
            store.upsert_subscribers(newsletter.id, people).await.unwrap()
        });
    }
    let mut inserted = 0;
    while let Some(summary) = tasks.join_next().await {
        let summary = summary.unwrap();
        assert_eq!(summary.inserted + summary.updated, 200);
        inserted += summary.inserted;
    }
    assert_eq!(inserted, 200);
    assert_eq!(
        store
            .subscribers_after(newsletter.id, 0, 1000)
            .await
            .unwrap()
            .len(),
        200
    );
}

fn plugin(id: &str, name: &str, kind: PluginKind) -> Plugin {
    Plugin {
        id: id.into(),
        name: name.into(),
        kind,
        size: 3,
        created_at: now(),
    }
}

/// One `#[tokio::test]` per backend for each test above.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod redb_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = super::redb().await;
                    super::$name(fixture.store.clone()).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(fixture) = super::postgres().await {
                        super::$name(fixture.store.clone()).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    claim_moves_pending_to_sending_in_subscriber_order,
    record_moves_sending_to_outcomes_and_keeps_counts,
    record_refuses_what_is_not_in_flight_and_changes_nothing,
    retries_come_due_first_and_in_time_order,
    job_slots_go_to_the_oldest_queued_jobs,
    cancel_and_retry_failed_move_in_bounded_batches,
    complete_if_done_only_when_nothing_is_open,
    deliveries_page_by_subscriber_and_state,
    jobs_list_recover_change_and_overview,
    idempotency_keys_return_the_first_job_or_refuse,
    subscribers_upsert_by_normalised_email,
    subscriber_updates_status_and_email_conflicts,
    erasure_removes_the_subscriber_and_blanks_their_deliveries,
    a_claimed_subscriber_deleted_before_the_claim_is_none,
    letters_and_newsletters_round_trip,
    concurrent_claims_never_overlap,
    concurrent_upserts_keep_emails_unique,
);

mod automations;
mod bounces;
mod events;
mod fleet;
mod lists;
mod messages;
mod plugins;
mod sessions;
mod transfer;
mod webhooks;
