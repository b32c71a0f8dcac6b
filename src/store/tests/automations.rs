//! Automations' conformance tests (see `store/tests.rs`).

use serde_json::{Value, json};

use super::*;
use crate::automations::*;
use crate::events::EventFilter;
use crate::policy::{Action, Reaction, When};

fn spec(name: &str) -> AutomationSpec {
    AutomationSpec {
        name: name.into(),
        policy: "drip".into(),
        events: vec!["subscriber.created".into(), "custom.*".into()],
        newsletter_id: None,
        config: json!({"steps": 3}).as_object().unwrap().clone(),
    }
}

async fn two_people(store: &Store) -> (u64, Subscriber, Subscriber) {
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
    (newsletter.id, a, b)
}

fn reacted(subscriber: u64, trigger: TriggerKey, actions: Vec<Action>, state: Option<Value>) -> Handled {
    Handled {
        trigger,
        subscriber_id: Some(subscriber),
        outcome: Ok(Reaction { actions, state }),
    }
}

fn turn(a: &Automation, cursor: u64, handled: Vec<Handled>, now_ms: u64) -> Turn {
    Turn {
        automation_id: a.id,
        turns: a.turns,
        cursor,
        handled,
        now_ms,
        pause_after: 3,
    }
}

async fn automations_keep_versions_names_and_states(store: Store) {
    let head = store
        .events_after(EventFilter::default(), 0, 1)
        .await
        .unwrap()
        .head;
    let a = store.create_automation(spec("drip")).await.unwrap();
    assert_eq!(
        (a.version, a.state, a.cursor, a.turns),
        (1, AutomationState::Active, head, 0)
    );
    assert!(matches!(
        store.create_automation(spec("drip")).await,
        Err(StoreError::Conflict(_))
    ));
    let b = store.create_automation(spec("other")).await.unwrap();
    let mut changed = spec("drip");
    changed.config = json!({"steps": 4}).as_object().unwrap().clone();
    changed.newsletter_id = Some(7);
    let a2 = store.update_automation(a.id, changed.clone()).await.unwrap();
    assert_eq!(a2.version, 2);
    assert!(matches!(
        store.update_automation(a.id, spec("other")).await,
        Err(StoreError::Conflict(_))
    ));
    let versions = store.automation_versions(a.id).await.unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.spec.config["steps"].clone()))
            .collect::<Vec<_>>(),
        [(1, json!(3)), (2, json!(4))]
    );
    assert_eq!(store.automation(a.id).await.unwrap().spec, changed);
    let paused = store
        .set_automation_state(a.id, AutomationState::Paused, Some("by hand".into()))
        .await
        .unwrap();
    assert_eq!(paused.pause_reason.as_deref(), Some("by hand"));
    let all = store.list_automations().await.unwrap();
    assert_eq!(all.iter().map(|x| x.id).collect::<Vec<_>>(), [a.id, b.id]);
    assert_eq!(all[0].state, AutomationState::Paused);
    store.delete_automation(b.id).await.unwrap();
    assert!(matches!(
        store.automation(b.id).await,
        Err(StoreError::NotFound { .. })
    ));
    // The name is free again.
    store.create_automation(spec("other")).await.unwrap();
}

/// A turn commits its reactions' effects, states, failures and cursor at once, and a
/// second commit of the same turn (a crash's re-run, another node) changes nothing.
async fn a_turn_applies_once_and_whole(store: Store) {
    let (newsletter, ann, bob) = two_people(&store).await;
    let a = store.create_automation(spec("drip")).await.unwrap();
    let now = 1_000_000;
    let handled = vec![
        reacted(
            ann.id,
            TriggerKey::Event {
                event_id: a.cursor + 1,
            },
            vec![
                Action::StartTimer {
                    name: "step".into(),
                    when: When::AfterSeconds(3),
                    data: json!({"step": 1}),
                },
                Action::StartTimer {
                    name: "later".into(),
                    when: When::At(5_000),
                    data: json!(null),
                },
                Action::SetAttribute {
                    name: "stage".into(),
                    value: json!(1),
                },
                Action::SendLetter { letter: 42 },
                Action::SendMessage {
                    template: "default-template".into(),
                    subject: "Hi {{ name }}".into(),
                    text: "t".into(),
                    html: None,
                    params: json!({"code": "X1"}).as_object().unwrap().clone(),
                },
                Action::Emit {
                    kind: "custom.started".into(),
                    data: json!({"by": "drip"}).as_object().unwrap().clone(),
                },
            ],
            Some(json!({"step": 0})),
        ),
        Handled {
            trigger: TriggerKey::Event {
                event_id: a.cursor + 2,
            },
            subscriber_id: Some(bob.id),
            outcome: Err("trapped: unreachable".into()),
        },
    ];
    let first = turn(&a, a.cursor + 2, handled, now);
    let epoch = store.status_epoch();
    let done = store.commit_turn(first.clone()).await.unwrap();
    assert_eq!((done.queued_sends, done.queued_messages), (1, 1));
    assert!(!done.status_changed);
    assert_eq!(
        store.status_epoch(),
        epoch,
        "no status changed: running jobs need not look again"
    );
    let after = done.automation;
    assert_eq!(
        (after.turns, after.cursor, after.handled, after.failed),
        (1, a.cursor + 2, 1, 1)
    );
    assert!(matches!(
        store.commit_turn(first).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.automation(a.id).await.unwrap(), after);

    let timers = store.timers(a.id, None, 10).await.unwrap();
    assert_eq!(
        timers
            .iter()
            .map(|t| (t.subscriber_id, t.name.as_str(), t.due_ms))
            .collect::<Vec<_>>(),
        [(ann.id, "later", 5_000_000), (ann.id, "step", now + 3_000)]
    );
    assert_eq!(store.next_timer_due(a.id).await.unwrap(), Some(now + 3_000));
    assert!(store.due_timers(a.id, now + 2_999, 10).await.unwrap().is_empty());
    let due = store.due_timers(a.id, now + 3_000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].data, json!({"step": 1}));
    assert_eq!(
        store.automation_states(a.id, vec![ann.id, bob.id]).await.unwrap(),
        [(ann.id, json!({"step": 0}))]
    );
    let ann_now = store.subscriber_by_id(ann.id).await.unwrap();
    assert_eq!(ann_now.attributes["stage"], json!(1));
    let failures = store.automation_failures(a.id, 0, 10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].reason, "trapped: unreachable");
    assert_eq!(failures[0].subscriber_id, Some(bob.id));
    // The message is queued with the turn, once, rendered later with its params.
    let messages = store
        .claim_messages("n", u64::MAX / 2, u64::MAX / 2, 10)
        .await
        .unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (messages[0].subscriber_id, messages[0].email.as_str()),
        (ann.id, "a@example.com")
    );
    assert_eq!(messages[0].content.template.as_deref(), Some("default-template"));
    assert_eq!(messages[0].content.data["code"], "X1");
    let queued = store.queued_sends(10).await.unwrap();
    assert_eq!(
        queued
            .iter()
            .map(|q| (q.subscriber_id, q.letter_id))
            .collect::<Vec<_>>(),
        [(ann.id, 42)]
    );
    let log = store
        .events_after(EventFilter::default(), a.cursor, 100)
        .await
        .unwrap()
        .events;
    let kinds: Vec<&str> = log.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["subscriber.updated", "message.queued", "custom.started"]);
    assert_eq!(log[2].newsletter_id, Some(newsletter));
    assert_eq!(log[2].subscriber_id, Some(ann.id));

    // The timer fires: it goes, unless it was started again (a new id) meanwhile. A
    // reaction that forgets the state and unsubscribes.
    let fired = due[0].clone();
    let second = turn(
        &after,
        after.cursor,
        vec![reacted(
            ann.id,
            TriggerKey::Timer { timer: fired.clone() },
            vec![Action::Unsubscribe, Action::CancelTimer { name: "later".into() }],
            None,
        )],
        now + 3_000,
    );
    let epoch = store.status_epoch();
    let after = store.commit_turn(second).await.unwrap().automation;
    assert_ne!(
        store.status_epoch(),
        epoch,
        "an unsubscribe moves the status epoch"
    );
    assert!(store.timers(a.id, None, 10).await.unwrap().is_empty());
    assert!(
        store
            .automation_states(a.id, vec![ann.id])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.subscriber_by_id(ann.id).await.unwrap().status,
        SubscriberStatus::Unsubscribed
    );

    // A timer restarted after it was read stays when the old one's turn commits.
    let restart = |turns: &Automation, name: &str| {
        turn(
            turns,
            turns.cursor,
            vec![reacted(
                bob.id,
                TriggerKey::Event { event_id: 1 },
                vec![Action::StartTimer {
                    name: name.into(),
                    when: When::AfterSeconds(1),
                    data: json!({}),
                }],
                None,
            )],
            now,
        )
    };
    let after = store.commit_turn(restart(&after, "t")).await.unwrap().automation;
    let old = store.timers(a.id, None, 10).await.unwrap().remove(0);
    let after = store.commit_turn(restart(&after, "t")).await.unwrap().automation;
    let stale = turn(
        &after,
        after.cursor,
        vec![reacted(
            bob.id,
            TriggerKey::Timer { timer: old.clone() },
            vec![],
            None,
        )],
        now + 1_000,
    );
    store.commit_turn(stale).await.unwrap();
    let left = store.timers(a.id, None, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].id, old.id);

    // Erasing a subscriber takes their timers (and states).
    store.delete_subscriber(bob.id).await.unwrap();
    assert!(store.timers(a.id, None, 10).await.unwrap().is_empty());

    // Deleting the automation takes its timers, states, failures and queued sends.
    store.delete_automation(a.id).await.unwrap();
    assert!(store.queued_sends(10).await.unwrap().is_empty());
    let again = store.create_automation(spec("drip")).await.unwrap();
    assert!(store.timers(again.id, None, 10).await.unwrap().is_empty());
}

async fn failures_in_a_row_pause_the_automation(store: Store) {
    let (_, ann, _) = two_people(&store).await;
    let mut a = store.create_automation(spec("drip")).await.unwrap();
    for i in 1..=3u64 {
        let failed = Handled {
            trigger: TriggerKey::Event { event_id: i },
            subscriber_id: Some(ann.id),
            outcome: Err(format!("boom {i}")),
        };
        a = store
            .commit_turn(turn(&a, i, vec![failed], 1))
            .await
            .unwrap()
            .automation;
    }
    assert_eq!(a.state, AutomationState::Paused);
    assert_eq!(a.failures_in_a_row, 3);
    assert!(a.pause_reason.as_deref().unwrap().contains("boom 3"), "{a:?}");
    let resumed = store
        .set_automation_state(a.id, AutomationState::Active, None)
        .await
        .unwrap();
    assert_eq!((resumed.failures_in_a_row, resumed.pause_reason), (0, None));
    assert_eq!(resumed.cursor, 3);
}

/// Queued sends become one prepared job with a pending delivery each, once.
async fn queued_sends_become_a_job_once(store: Store) {
    let (newsletter, ann, bob) = two_people(&store).await;
    let a = store.create_automation(spec("drip")).await.unwrap();
    let handled = [ann.id, bob.id]
        .into_iter()
        .map(|s| {
            reacted(
                s,
                TriggerKey::Event { event_id: s },
                vec![Action::SendLetter { letter: 9 }],
                None,
            )
        })
        .collect();
    store.commit_turn(turn(&a, a.cursor, handled, 1)).await.unwrap();
    let queued = store.queued_sends(10).await.unwrap();
    let ids: Vec<u64> = queued.iter().map(|q| q.id).collect();
    let mut job = super::job_for(newsletter);
    job.state = JobState::Queued;
    job.prepared = false;
    let made = store
        .dispatch_sends(job.clone(), ids.clone())
        .await
        .unwrap()
        .unwrap();
    assert!(made.prepared);
    assert_eq!(made.counts.pending, 2);
    assert_eq!(store.job(made.id).await.unwrap().counts.pending, 2);
    assert!(store.queued_sends(10).await.unwrap().is_empty());
    assert_eq!(store.dispatch_sends(job, ids).await.unwrap(), None);
    let claimed = store.claim(NODE, made.id, 10, u64::MAX).await.unwrap();
    assert_eq!(
        claimed.iter().map(|(d, _)| d.subscriber_id).collect::<Vec<_>>(),
        [ann.id, bob.id]
    );
}

conformance!(
    automations_keep_versions_names_and_states,
    a_turn_applies_once_and_whole,
    failures_in_a_row_pause_the_automation,
    queued_sends_become_a_job_once,
);
