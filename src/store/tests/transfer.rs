//! `Transfer`: every record out of one store and into another, ids and all (what
//! `letterbox migrate` does), on every pair of backends (see `store/tests.rs`).

use super::*;

/// Every record a store holds, in a canonical order (backends order some kinds
/// differently: subscribers by newsletter or by id).
async fn export_all(store: &Store) -> Vec<Record> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let exporter = {
        let store = store.clone();
        tokio::spawn(async move { store.export(tx).await })
    };
    let mut all = Vec::new();
    while let Some(chunk) = rx.recv().await {
        all.extend(chunk);
    }
    exporter.await.unwrap().unwrap();
    all.sort_by_cached_key(|r| format!("{r:?}"));
    all
}

async fn transfer_copies_everything_ids_and_all(store: Store) {
    // An installation with some of everything: two newsletters (ids interleave), an
    // unsubscribed reader, plugin versions, a job with recipients in every kind of
    // state but sending, an idempotency key and a secret.
    store.secret("k", b"secret bytes".to_vec()).await.unwrap();
    let (newsletter, job) = job_with(&store, 6).await;
    let other = store
        .create_newsletter("Other".into(), "o@example.com".into())
        .await
        .unwrap();
    store
        .upsert_subscribers(other.id, vec![person("x@Example.COM")])
        .await
        .unwrap();
    let first = store.subscribers_after(newsletter, 0, 1).await.unwrap()[0].id;
    store.unsubscribe(newsletter, first).await.unwrap();
    let mut params = serde_json::Map::new();
    params.insert("segment".into(), json!({"attribute": "plan"}));
    let letter = Letter {
        id: 0,
        newsletter_id: newsletter,
        subject: "Hi {{ name }}".into(),
        text: "Body".into(),
        html: Some("<p>Body</p>".into()),
        filter: "seg".into(),
        template: "default-template".into(),
        params,
        created_at: now(),
    };
    let letter = store.create_letter(letter).await.unwrap();
    store
        .put_plugin(plugin("aa", "seg", PluginKind::Filter), b"one".to_vec().into())
        .await
        .unwrap();
    store
        .put_plugin(plugin("bb", "seg", PluginKind::Filter), b"two".to_vec().into())
        .await
        .unwrap();
    store
        .put_plugin(
            plugin("cc", "tpl", PluginKind::Template),
            b"three".to_vec().into(),
        )
        .await
        .unwrap();
    let claimed = ids(&store.claim(NODE, job.id, 5, now_ms()).await.unwrap());
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
                at_ms: now_ms() + 60_000,
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
    store.record(NODE, job.id, outcomes).await.unwrap();
    let key = IdempotencyKey {
        key: "key-1".into(),
        request_hash: "h".into(),
    };
    let NewJob::Created(keyed) = store.create_job(job_for(other.id), Some(key)).await.unwrap() else {
        panic!("a new job")
    };
    let bounce = crate::bounces::NewBounce {
        raw: Some("Action: failed".into()),
        ..crate::bounces::NewBounce::new(crate::bounces::BounceKind::Hard, "api", "x@example.com")
    };
    let bounced = store
        .record_bounce(bounce.clone(), Default::default())
        .await
        .unwrap();
    store
        .add_suppressions(vec![crate::bounces::NewSuppression {
            email: "no@example.com".into(),
            reason: crate::bounces::SuppressionReason::Manual,
            note: None,
            bounce_id: None,
        }])
        .await
        .unwrap();

    // An automation that has handled something: a state, a timer, a failure and a
    // queued send to carry over.
    let automation = store
        .create_automation(crate::automations::AutomationSpec {
            name: "drip".into(),
            policy: "drip".into(),
            events: vec!["custom.*".into()],
            newsletter_id: None,
            config: Default::default(),
        })
        .await
        .unwrap();
    let someone = store.subscribers_after(other.id, 0, 1).await.unwrap()[0].id;
    let handled = |event_id, outcome| crate::automations::Handled {
        trigger: crate::automations::TriggerKey::Event { event_id },
        subscriber_id: Some(someone),
        outcome,
    };
    let reaction = crate::policy::Reaction {
        actions: vec![
            crate::policy::Action::StartTimer {
                name: "t".into(),
                when: crate::policy::When::At(4_000_000_000),
                data: json!({"step": 1}),
            },
            crate::policy::Action::SendLetter { letter: letter.id },
        ],
        state: Some(json!({"step": 0})),
    };
    store
        .commit_turn(crate::automations::Turn {
            automation_id: automation.id,
            turns: 0,
            cursor: automation.cursor,
            handled: vec![handled(1, Ok(reaction)), handled(2, Err("trapped".into()))],
            now_ms: 1,
            pause_after: 10,
        })
        .await
        .unwrap();

    // Two one-off messages: one sent, one queued with an idempotency key.
    let one_off = |text: &str| crate::messages::NewMessage {
        newsletter_id: other.id,
        subscriber_id: someone,
        email: "x@example.com".into(),
        content: crate::messages::MessageContent {
            letter_id: None,
            template: None,
            subject: Some("s".into()),
            text: Some(text.into()),
            html: None,
            data: json!({"order": 1}).as_object().unwrap().clone(),
        },
        transport: None,
        message_id: "letterbox.message.1@example.com".into(),
        confirmation: false,
    };
    let message_key = || {
        Some(IdempotencyKey {
            key: "message-1".into(),
            request_hash: "m".into(),
        })
    };
    store.create_message(one_off("sent"), None).await.unwrap();
    let sent = store
        .claim_messages(NODE, now_ms(), now_ms() + 60_000, 1)
        .await
        .unwrap();
    store
        .record_message(sent[0].id, NODE, Outcome::Delivered { reply: "250".into() })
        .await
        .unwrap();
    let crate::store::NewMessageOutcome::Created(keyed_message) = store
        .create_message(one_off("queued"), message_key())
        .await
        .unwrap()
    else {
        panic!("not created")
    };

    let hook = store
        .create_webhook(crate::webhooks::NewWebhook {
            url: "https://hooks.example.com/in".into(),
            events: vec!["subscriber.*".into()],
            description: None,
            secret: crate::webhooks::Secret::generate().to_text(),
            cursor: 0,
        })
        .await
        .unwrap();
    assert!(
        store
            .fan_out(hook.id, 0, 3, vec![(2, "subscriber.created".into())])
            .await
            .unwrap()
    );
    let hook = store.webhook(hook.id).await.unwrap();

    let records = export_all(&store).await;
    let inventory = store.inventory().await.unwrap();
    let mut counted = Inventory::default();
    for record in &records {
        counted.add(record);
    }
    assert_eq!(counted, inventory, "the export holds what the inventory counts");
    assert_eq!(
        (
            inventory.newsletters,
            inventory.subscribers,
            inventory.jobs,
            inventory.deliveries
        ),
        (2, 7, 2, 6)
    );
    assert_eq!(
        (
            inventory.plugins,
            inventory.plugin_versions,
            inventory.plugin_names
        ),
        (3, 3, 2)
    );
    assert_eq!((inventory.bounces, inventory.suppressions), (1, 1));
    assert_eq!(
        (
            inventory.automations,
            inventory.automation_versions,
            inventory.automation_states,
            inventory.timers,
            inventory.automation_failures,
            inventory.queued_sends
        ),
        (1, 1, 1, 1, 1, 1)
    );
    assert_eq!(inventory.messages, 2);
    assert_eq!((inventory.webhooks, inventory.webhook_sends), (1, 1));

    let mut targets = vec![redb().await];
    targets.extend(postgres().await);
    for target in targets {
        let target = target.store;
        assert!(target.inventory().await.unwrap().is_empty());
        // In small chunks, as the export sends them: order matters across chunks.
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let exporter = {
            let store = store.clone();
            tokio::spawn(async move { store.export(tx).await })
        };
        while let Some(chunk) = rx.recv().await {
            for part in chunk.chunks(2) {
                target.import(part.to_vec()).await.unwrap();
            }
        }
        exporter.await.unwrap().unwrap();
        let name = target.name();
        assert_eq!(export_all(&target).await, records, "{name}: the same records");
        assert_eq!(target.inventory().await.unwrap(), inventory, "{name}");
        // It works as the original did: reads by id, claims, idempotency.
        assert_eq!(target.letter(letter.id).await.unwrap(), letter, "{name}");
        assert_eq!(
            target.job(job.id).await.unwrap(),
            store.job(job.id).await.unwrap(),
            "{name}"
        );
        let replay = IdempotencyKey {
            key: "key-1".into(),
            request_hash: "h".into(),
        };
        match target.create_job(job_for(other.id), Some(replay)).await.unwrap() {
            NewJob::Existing(j) => assert_eq!(j.id, keyed.id, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        match target
            .create_message(one_off("queued"), message_key())
            .await
            .unwrap()
        {
            crate::store::NewMessageOutcome::Existing(m) => assert_eq!(m, keyed_message, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        let crate::store::NewMessageOutcome::Created(fresh_message) =
            target.create_message(one_off("new"), None).await.unwrap()
        else {
            panic!("{name}: not created")
        };
        assert!(fresh_message.id > keyed_message.id, "{name}: message id reused");
        assert_eq!(target.webhook(hook.id).await.unwrap(), hook, "{name}");
        let test = target.queue_webhook_test(hook.id).await.unwrap();
        let copied = records
            .iter()
            .find_map(|r| match r {
                Record::WebhookSend(s) => Some(s.id),
                _ => None,
            })
            .unwrap();
        assert!(test.id > copied, "{name}: webhook send id reused");
        let claimed = target
            .claim_webhook_sends(NODE, now_ms(), now_ms() + 1000, 10)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2, "{name}: the copied send and the new one");
        let pending = target.claim(NODE, job.id, 10, now_ms()).await.unwrap();
        assert_eq!(
            pending.len(),
            2,
            "{name}: the released and never-claimed recipient"
        );
        // New ids come after the copied ones.
        let fresh = target
            .create_newsletter("New".into(), "n@example.com".into())
            .await
            .unwrap();
        assert!(fresh.id > other.id, "{name}: newsletter id {} reused", fresh.id);
        target
            .upsert_subscribers(fresh.id, vec![person("new@example.com")])
            .await
            .unwrap();
        let new_subscriber = target.subscribers_after(fresh.id, 0, 1).await.unwrap()[0].id;
        assert!(
            new_subscriber > 7,
            "{name}: subscriber id {new_subscriber} reused"
        );
        let NewJob::Created(new_job) = target.create_job(job_for(fresh.id), None).await.unwrap() else {
            panic!()
        };
        assert!(new_job.id > keyed.id, "{name}: job id reused");
        // The log goes on after the copied events.
        let last_copied = records
            .iter()
            .filter_map(|r| match r {
                Record::Event(e) => Some(e.id),
                _ => None,
            })
            .max()
            .expect("the changes above made events");
        let fresh_events = target
            .events_after(crate::events::EventFilter::default(), last_copied, 10)
            .await
            .unwrap();
        assert_eq!(
            fresh_events.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            [last_copied + 1, last_copied + 2, last_copied + 3],
            "{name}: the new message's, the new subscriber's and the new job's events"
        );
        let rebounced = target
            .record_bounce(bounce.clone(), Default::default())
            .await
            .unwrap();
        assert!(rebounced[0].id > bounced[0].id, "{name}: bounce id reused");
        assert_eq!(
            target
                .suppressed(vec!["no@example.com".into()])
                .await
                .unwrap()
                .len(),
            1,
            "{name}"
        );
        // Automations go on where they were, with new ids after the copied ones.
        assert_eq!(
            target.automation(automation.id).await.unwrap(),
            store.automation(automation.id).await.unwrap(),
            "{name}"
        );
        assert_eq!(
            target.next_timer_due(automation.id).await.unwrap(),
            Some(4_000_000_000_000),
            "{name}"
        );
        let again = target
            .create_automation(crate::automations::AutomationSpec {
                name: "again".into(),
                ..target.automation(automation.id).await.unwrap().spec
            })
            .await
            .unwrap();
        assert!(again.id > automation.id, "{name}: automation id reused");
        // A recipient in flight cannot be moved: the source must be rescued first.
        let in_flight = Delivery {
            job_id: new_job.id,
            subscriber_id: new_subscriber,
            email: "new@example.com".into(),
            attempts: 1,
            state: DeliveryState::Sending { since: now() },
        };
        let err = target
            .import(vec![Record::Delivery(in_flight)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{name}: {err}");
    }
}

conformance!(transfer_copies_everything_ids_and_all,);
