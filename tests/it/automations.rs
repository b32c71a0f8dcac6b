//! Automations end to end: the real binary, a real SMTP server, the scripted test
//! automation (`plugins/test-automation`, which answers what an event's or a timer's
//! data tells it to), and kill -9 while its timers wait.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::process::{Home, spawn_node};
use crate::support::{Api, SmtpServer, TestServer, wasm};

/// A three-step drip as the test automation runs it: step 1 now, step 2 `gap` seconds
/// later, step 3 `gap` after that, each a letter.
pub(crate) fn drip(letters: [u64; 3], gap: u64) -> Value {
    let step3 = json!({ "actions": [{ "send_letter": letters[2] }], "state": { "step": 3 } });
    let step2 = json!({
        "actions": [
            { "send_letter": letters[1] },
            { "start_timer": { "name": "drip", "after_seconds": gap, "data": step3 } }
        ],
        "state": { "step": 2 }
    });
    json!({
        "actions": [
            { "send_letter": letters[0] },
            { "start_timer": { "name": "drip", "after_seconds": gap, "data": step2 } }
        ],
        "state": { "step": 1 }
    })
}

/// A newsletter of `n` people, three letters and the drip automation; returns the
/// subscribers' ids by email and the letters.
pub(crate) async fn drip_setup(api: &Api, n: usize) -> (HashMap<String, u64>, [u64; 3]) {
    let newsletter = api.newsletter().await;
    let people: Vec<Value> = (0..n)
        .map(|i| json!({ "email": format!("p{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let mut letters = [0; 3];
    for (i, letter) in letters.iter_mut().enumerate() {
        *letter = api
            .letter(
                newsletter,
                json!({ "subject": format!("step {}", i + 1), "text": "Hello\r\n" }),
            )
            .await;
    }
    let (status, body) = api.upload("automation", "script", wasm("test_automation")).await;
    assert_eq!(status, 201, "{body}");
    let created = api
        .post_ok(
            "/v1/automations",
            json!({ "name": "drip", "policy": "script", "events": ["custom.signup"] }),
            201,
        )
        .await;
    assert_eq!(created["state"], "active", "{created}");
    (api.subscriber_ids(newsletter).await, letters)
}

/// (recipient, subject) → copies received.
pub(crate) fn copies(smtp: &SmtpServer) -> HashMap<(String, String), usize> {
    let mut out = HashMap::new();
    for m in smtp.received() {
        *out.entry((m.recipients[0].clone(), m.header("Subject").unwrap_or_default()))
            .or_default() += 1;
    }
    out
}

pub(crate) async fn wait_for_messages(smtp: &SmtpServer, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while smtp.count() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} messages arrived in {within:?}",
            smtp.count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every step of a drip is sent once to every subscriber, across two kill -9s while
/// its timers wait (after step 1 and after step 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drip_sends_every_step_once_across_kill_9() {
    const N: usize = 20;
    const GAP: u64 = 4;
    let smtp = SmtpServer::start().await;
    let home = Home::new().await;
    let args = ["--smtp", &smtp.url()];
    let (mut node, api) = spawn_node(&home, &args);
    api.wait_healthy().await;
    let (ids, letters) = drip_setup(&api, N).await;
    let started = Instant::now();
    for id in ids.values() {
        api.post_ok(
            "/v1/events",
            json!({ "type": "custom.signup", "subscriber": id, "data": drip(letters, GAP) }),
            201,
        )
        .await;
    }
    let mut api = api;
    for step in 1..=2 {
        wait_for_messages(&smtp, N * step, Duration::from_secs(60)).await;
        // Its deliveries recorded: a message sent and not yet recorded is sent again
        // after a crash (the documented bound), which is not what this test is about.
        wait_delivered(&api, N * step).await;
        // Killed while the next step's timers wait.
        assert!(
            started.elapsed() < Duration::from_secs(GAP * step as u64),
            "step {step} came too late to kill during the wait"
        );
        node.kill();
        (node, api) = spawn_node(&home, &args);
        api.wait_healthy().await;
        let (status, timers) = api.get("/v1/automations/1/timers").await;
        assert_eq!(status, 200, "{timers}");
        assert_eq!(timers.as_array().unwrap().len(), N, "{timers}");
    }
    wait_for_messages(&smtp, N * 3, Duration::from_secs(60)).await;
    // Nothing more comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = copies(&smtp);
    for email in ids.keys() {
        for step in 1..=3 {
            let n = got.get(&(email.clone(), format!("step {step}"))).copied();
            assert_eq!(n, Some(1), "{email} got step {step} {n:?} times");
        }
    }
    assert_eq!(smtp.count(), N * 3);
    drop(node);
}

/// A loop, a memory bomb and a trap fail their own events, kept with the reason; the
/// events between them are handled; too many failures in a row pause the automation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_automation_fails_only_its_events() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |config| config.policy_failures.max = 5).await;
    let api = &server.api;
    let (ids, letters) = drip_setup(api, 1).await;
    let id = ids["p0@example.org"];
    let post = |kind: &str, data: Value| {
        api.post_ok(
            "/v1/events",
            json!({ "type": kind, "subscriber": id, "data": data }),
            201,
        )
    };
    let (status, body) = api
        .put(
            "/v1/automations/1",
            json!({ "name": "drip", "policy": "script", "events": ["custom.*"] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    for kind in ["custom.loop", "custom.bomb", "custom.trap"] {
        post(kind, json!({})).await;
        post("custom.ok", json!({ "actions": [{ "send_letter": letters[0] }] })).await;
    }
    // The same letter three times to one subscriber: three jobs, three messages.
    wait_for_messages(&smtp, 3, Duration::from_secs(60)).await;
    let failures = wait_failures(api, 3).await;
    let reasons: Vec<&str> = failures.iter().map(|f| f["reason"].as_str().unwrap()).collect();
    assert!(reasons[0].contains("timed out"), "{reasons:?}");
    // Rust's allocator aborts when memory runs out: a trap too.
    assert!(reasons[1].contains("crashed"), "{reasons:?}");
    assert!(reasons[2].contains("trapped"), "{reasons:?}");
    let (_, automation) = api.get("/v1/automations/1").await;
    assert_eq!(automation["state"], "active", "{automation}");
    assert_eq!(
        (automation["handled"].as_u64(), automation["failed"].as_u64()),
        (Some(3), Some(3))
    );

    // Five failures in a row pause it, with the last reason; what came after waits.
    for _ in 0..5 {
        post("custom.fail", json!({})).await;
    }
    post("custom.ok", json!({ "actions": [{ "send_letter": letters[1] }] })).await;
    wait_failures(api, 8).await;
    let (_, automation) = api.get("/v1/automations/1").await;
    assert_eq!(automation["state"], "paused", "{automation}");
    assert!(
        automation["pause_reason"]
            .as_str()
            .unwrap()
            .contains("fails event"),
        "{automation}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(smtp.count(), 3, "nothing is handled while paused");
    api.post_ok("/v1/automations/1/resume", json!({}), 200).await;
    wait_for_messages(&smtp, 4, Duration::from_secs(30)).await;
    server.stop().await;
}

/// Failed events and timers are kept, and retried on request: the policy is called for
/// each again, and its effects happen once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_events_and_timers_are_retried_on_request() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let (ids, letters) = drip_setup(api, 1).await;
    let id = ids["p0@example.org"];
    let (status, body) = api
        .put(
            "/v1/automations/1",
            json!({ "name": "drip", "policy": "script", "events": ["custom.*"] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Letters that do not exist yet: the next two ids.
    let (later_a, later_b) = (letters[2] + 1, letters[2] + 2);
    let post = |data: Value| {
        api.post_ok(
            "/v1/events",
            json!({ "type": "custom.go", "subscriber": id, "data": data }),
            201,
        )
    };
    post(json!({ "actions": [{ "send_letter": later_a }] })).await;
    post(
        json!({ "actions": [{ "start_timer": { "name": "t", "after_seconds": 0,
        "data": { "actions": [{ "send_letter": later_b }] } } }] }),
    )
    .await;
    post(json!({ "actions": [{ "start_timer": { "name": "letterbox.mine", "after_seconds": 1 } }] })).await;
    let failures = wait_failures(api, 3).await;
    let reasons: Vec<&str> = failures.iter().map(|f| f["reason"].as_str().unwrap()).collect();
    assert!(
        reasons
            .iter()
            .filter(|r| r.contains("there is no letter"))
            .count()
            == 2,
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("`letterbox.`")), "{reasons:?}");
    let retry: Vec<u64> = failures
        .iter()
        .filter(|f| f["reason"].as_str().unwrap().contains("no letter"))
        .map(|f| f["id"].as_u64().unwrap())
        .collect();
    assert!(
        failures.iter().any(|f| f["trigger"]["kind"] == "timer"),
        "{failures:?}"
    );

    let newsletter = api.get(&format!("/v1/letters/{}", letters[0])).await.1["newsletter_id"]
        .as_u64()
        .unwrap();
    for subject in ["late a", "late b"] {
        api.letter(newsletter, json!({ "subject": subject, "text": "Hi\r\n" }))
            .await;
    }
    let (status, missing) = api
        .post("/v1/automations/1/failures/retry", json!({ "ids": [999_999] }))
        .await;
    assert_eq!(status, 404, "{missing}");
    let (status, retried) = api
        .post("/v1/automations/1/failures/retry", json!({ "ids": retry }))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(
        (
            retried["retried"].as_u64(),
            retried["kept"].as_array().map(Vec::len)
        ),
        (Some(2), Some(0))
    );
    wait_for_messages(&smtp, 2, Duration::from_secs(30)).await;
    let (_, left) = api.get("/v1/automations/1/failures").await;
    assert_eq!(
        left.as_array().unwrap().len(),
        1,
        "only the unretried one: {left}"
    );
    // Once each: nothing more arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = copies(&smtp);
    assert_eq!(
        (
            got.get(&("p0@example.org".into(), "late a".into())),
            got.get(&("p0@example.org".into(), "late b".into()))
        ),
        (Some(&1), Some(&1)),
        "{got:?}"
    );
    let (_, all) = api.post("/v1/automations/1/failures/retry", json!({})).await;
    assert_eq!(all["retried"], 1, "{all}");
    server.stop().await;
}

/// Waits until the jobs' deliveries recorded as delivered add up to `n`.
pub(crate) async fn wait_delivered(api: &Api, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, jobs) = api.get("/v1/jobs?limit=1000").await;
        assert_eq!(status, 200, "{jobs}");
        let delivered: u64 = jobs["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["counts"]["delivered"].as_u64().unwrap())
            .sum();
        if delivered >= n as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {n} recorded delivered: {jobs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_failures(api: &Api, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, failures) = api.get("/v1/automations/1/failures").await;
        assert_eq!(status, 200, "{failures}");
        let failures = failures.as_array().unwrap().clone();
        if failures.len() >= n {
            return failures;
        }
        assert!(Instant::now() < deadline, "{} of {n} failures", failures.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bad automations are refused with the field that is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_automations_are_refused_with_the_field() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let (status, body) = api.upload("automation", "script", wasm("test_automation")).await;
    assert_eq!(status, 201, "{body}");
    let cases = [
        (
            json!({ "name": "a", "policy": "nope", "events": ["custom.x"] }),
            "policy",
        ),
        (
            json!({ "name": "a", "policy": "default-filter", "events": ["custom.x"] }),
            "policy",
        ),
        (
            json!({ "name": "a b", "policy": "script", "events": ["custom.x"] }),
            "name",
        ),
        (json!({ "name": "a", "policy": "script", "events": [] }), "events"),
        (
            json!({ "name": "a", "policy": "script", "events": ["subscriber.typo"] }),
            "events[0]",
        ),
        (
            json!({ "name": "a", "policy": "script", "events": ["custom.x"], "newsletter_id": 999 }),
            "newsletter_id",
        ),
        (
            json!({ "name": "a", "policy": "script", "events": ["custom.x"],
                    "config": { "validate": [["config.delay", "must be a number"]] } }),
            "config.delay",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = api.post("/v1/automations", body.clone()).await;
        assert_eq!(status, 422, "{body}: {answer}");
        let fields: Vec<&str> = answer["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{body}: {answer}");
    }
    let ok = json!({ "name": "a", "policy": "script", "events": ["custom.x", "subscriber.*"] });
    api.post_ok("/v1/automations", ok.clone(), 201).await;
    let (status, answer) = api.post("/v1/automations", ok).await;
    assert_eq!(status, 409, "{answer}");
    // An event about nobody: what needs a subscriber fails the event, with the reason.
    api.post_ok(
        "/v1/events",
        json!({ "type": "custom.x", "data": { "actions": [{ "send_letter": 1 }] } }),
        201,
    )
    .await;
    let failures = wait_failures(api, 1).await;
    assert!(
        failures[0]["reason"]
            .as_str()
            .unwrap()
            .contains("send-letter: the event names no subscriber"),
        "{failures:?}"
    );
    let (status, answer) = api.get("/v1/automations/99").await;
    assert_eq!(status, 404, "{answer}");
    server.stop().await;
}

/// A reaction's `send_message` becomes a one-off message, rendered with the action's
/// params and sent once; a template that cannot be used fails the event instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reactions_message_is_sent_once_with_its_params() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "ann@example.org", "name": "Ann" }]))
        .await;
    let ann = api.subscriber_ids(newsletter).await["ann@example.org"];
    let (status, body) = api.upload("automation", "script", wasm("test_automation")).await;
    assert_eq!(status, 201, "{body}");
    api.post_ok(
        "/v1/automations",
        json!({ "name": "welcome", "policy": "script", "events": ["custom.signup"] }),
        201,
    )
    .await;
    let send = |template: &str| {
        json!({ "actions": [{ "send_message": {
            "template": template,
            "subject": "Welcome {{ name }}",
            "text": "Your code is {{ params.code }}.\r\n",
            "params": { "code": "X1" },
        } }] })
    };
    for data in [send("default-template"), send("no-such-template")] {
        api.post_ok(
            "/v1/events",
            json!({ "type": "custom.signup", "subscriber": ann, "data": data }),
            201,
        )
        .await;
    }
    let failures = wait_failures(api, 1).await;
    assert!(
        failures[0]["reason"].as_str().unwrap().contains("send_message"),
        "{failures:?}"
    );
    wait_for_messages(&smtp, 1, Duration::from_secs(30)).await;
    // The message's end is in the log, and nothing more is sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, sent) = api.get("/v1/events?type=message.sent").await;
        if !sent["events"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no message.sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = smtp.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("Subject").as_deref(), Some("Welcome Ann"));
    assert!(
        received[0].body().contains("Your code is X1."),
        "{}",
        received[0].data
    );
    server.stop().await;
}
