//! One-off messages end to end: `POST /v1/messages` through a letter or a template with
//! the message's own data, to a real SMTP server; idempotency keys, retries, bounces,
//! suppression, bad input, and a kill -9 with a message in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::process::{Home, spawn_node};
use crate::support::smtp::{Reply, Script};
use crate::support::{Api, SmtpServer, TestServer};

/// Waits until message `id` is no longer queued; returns it.
async fn settled(api: &Api, id: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, message) = api.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(status, 200, "{message}");
        if message["state"] != "queued" {
            return message;
        }
        assert!(
            Instant::now() < deadline,
            "still queued after {within:?}: {message}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn message(api: &Api, body: Value, key: Option<&str>) -> (u16, Value, bool) {
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    let (status, headers, body) = api.post_with_headers("/v1/messages", &headers, body).await;
    (status, body, headers.get("idempotent-replayed").is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_off_messages_are_rendered_with_their_data_and_sent_once() {
    let script: Script = Arc::new(|rcpt: &str, before: u32| match rcpt {
        r if r.starts_with("flaky") && before < 2 => Reply::TempFail,
        r if r.starts_with("gone") => Reply::PermFail,
        _ => Reply::Accept,
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::with_smtp(&smtp, |c| {
        c.retry.max_attempts = 4;
        c.retry.base_ms = 50;
        c.retry.cap_ms = 200;
    })
    .await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(
        newsletter,
        json!([
            { "email": "ann@example.org", "name": "Ann" },
            { "email": "flaky@example.org" },
            { "email": "gone@example.org" },
            { "email": "left@example.org" },
        ]),
    )
    .await;
    let ids = api.subscriber_ids(newsletter).await;
    let (status, left) = api
        .patch(
            &format!("/v1/subscribers/{}", ids["left@example.org"]),
            json!({ "status": "unsubscribed" }),
        )
        .await;
    assert_eq!(status, 200, "{left}");
    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "Welcome", "text": "Welcome {{ name }}\r\n" }),
        )
        .await;

    let receipt = json!({
        "subscriber": "ann@example.org",
        "subject": "Receipt for order {{ params.order }}",
        "text": "Hello {{ name }}, order {{ params.order }} is paid.\r\n",
        "data": { "order": 42 },
    });
    let (status, first, replayed) = message(api, receipt.clone(), Some("order-42")).await;
    assert_eq!(status, 202, "{first}");
    assert!(!replayed);
    let id = first["message"]["id"].as_u64().unwrap();
    // The same request again, keys in another order: the same message, nothing more sent.
    let reordered = json!({
        "data": { "order": 42 },
        "text": "Hello {{ name }}, order {{ params.order }} is paid.\r\n",
        "subject": "Receipt for order {{ params.order }}",
        "subscriber": "ann@example.org",
    });
    let (status, again, replayed) = message(api, reordered, Some("order-42")).await;
    assert_eq!(
        (status, again["message"]["id"].as_u64()),
        (202, Some(id)),
        "{again}"
    );
    assert!(replayed);
    let mut other = receipt.clone();
    other["data"]["order"] = json!(43);
    let (status, reused, _) = message(api, other, Some("order-42")).await;
    assert_eq!(status, 422, "{reused}");
    assert!(
        reused["detail"].as_str().unwrap().contains("Idempotency-Key"),
        "{reused}"
    );

    let by_letter = |to: &str| json!({ "subscriber": ids[to], "letter_id": letter });
    let mut sent = Vec::new();
    for to in [
        "ann@example.org",
        "flaky@example.org",
        "gone@example.org",
        "left@example.org",
    ] {
        let (status, m, _) = message(api, by_letter(to), None).await;
        assert_eq!(status, 202, "{m}");
        sent.push(m["message"]["id"].as_u64().unwrap());
    }

    let receipt = settled(api, id, Duration::from_secs(30)).await;
    assert_eq!(
        (receipt["state"].as_str(), receipt["attempts"].as_u64()),
        (Some("sent"), Some(1)),
        "{receipt}"
    );
    let ann = settled(api, sent[0], Duration::from_secs(30)).await;
    assert_eq!(ann["state"], "sent", "{ann}");
    let flaky = settled(api, sent[1], Duration::from_secs(30)).await;
    assert_eq!(
        (flaky["state"].as_str(), flaky["attempts"].as_u64()),
        (Some("sent"), Some(3)),
        "{flaky}"
    );
    let gone = settled(api, sent[2], Duration::from_secs(30)).await;
    assert_eq!(
        (gone["state"].as_str(), gone["attempts"].as_u64()),
        (Some("failed"), Some(1)),
        "{gone}"
    );
    assert!(gone["reason"].as_str().unwrap().contains("550"), "{gone}");
    let left = settled(api, sent[3], Duration::from_secs(30)).await;
    assert_eq!(left["state"], "skipped", "{left}");
    assert!(
        left["reason"].as_str().unwrap().contains("unsubscribed"),
        "{left}"
    );
    // The hard bounce suppressed the address: a later message to it is not sent.
    let (_, later, _) = message(api, by_letter("gone@example.org"), None).await;
    let later = settled(
        api,
        later["message"]["id"].as_u64().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(later["state"], "skipped", "{later}");

    let received = smtp.received();
    let to_ann: Vec<_> = received
        .iter()
        .filter(|m| m.recipients == ["ann@example.org"])
        .collect();
    assert_eq!(to_ann.len(), 2, "the receipt once, and the letter");
    let copy = to_ann
        .iter()
        .find(|m| m.header("Subject").as_deref() == Some("Receipt for order 42"))
        .expect("the receipt, rendered with its data");
    assert!(
        copy.body().contains("Hello Ann, order 42 is paid."),
        "{}",
        copy.data
    );
    assert_eq!(
        copy.header("Message-ID").unwrap().trim_matches(['<', '>']),
        receipt["message_id"].as_str().unwrap()
    );
    assert!(
        to_ann
            .iter()
            .any(|m| m.header("Subject").as_deref() == Some("Welcome"))
    );
    assert_eq!(
        received
            .iter()
            .filter(|m| m.recipients == ["flaky@example.org"])
            .count(),
        1
    );
    assert!(!received.iter().any(|m| m.recipients == ["left@example.org"]));

    // Each message's end is in the log.
    let (status, events) = api.get("/v1/events?type=message.sent&limit=100").await;
    assert_eq!(status, 200, "{events}");
    let ended: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["message"].as_u64().unwrap())
        .collect();
    assert_eq!(ended.len(), 3, "{events}");
    assert!(ended.contains(&id) && ended.contains(&sent[1]));
    let (_, failed) = api.get("/v1/events?type=message.failed").await;
    assert_eq!(failed["events"].as_array().unwrap().len(), 1, "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_refused_with_the_field_named() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let other = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "ann@example.org" }]))
        .await;
    let ids = api.subscriber_ids(newsletter).await;
    let ann = ids["ann@example.org"];
    let foreign = api
        .letter(other, json!({ "subject": "s", "text": "t\r\n" }))
        .await;
    let cases = [
        (json!({ "subscriber": ann }), 422, "letter_id"),
        (
            json!({ "subscriber": ann, "letter_id": foreign, "subject": "s", "text": "t" }),
            422,
            "letter_id",
        ),
        (
            json!({ "subscriber": ann, "letter_id": foreign }),
            422,
            "letter_id",
        ),
        (
            json!({ "subscriber": ann, "letter_id": 999_999 }),
            422,
            "letter_id",
        ),
        (json!({ "subscriber": ann, "subject": "s" }), 422, "text"),
        (
            json!({ "subscriber": ann, "subject": "s", "text": "t", "template": "nope" }),
            422,
            "template",
        ),
        (
            json!({ "subscriber": ann, "subject": "s", "text": "t", "transport": "nope" }),
            422,
            "transport",
        ),
        (
            json!({ "subscriber": ann, "subject": "s", "text": "t", "data": { "x": "y".repeat(70_000) } }),
            422,
            "data",
        ),
        (
            json!({ "subscriber": "nobody@example.org", "subject": "s", "text": "t" }),
            404,
            "",
        ),
        (
            json!({ "subscriber": ann, "subject": "s", "text": "t", "colour": 1 }),
            422,
            "",
        ),
    ];
    for (body, want, field) in cases {
        let (status, problem) = api.post("/v1/messages", body.clone()).await;
        assert_eq!(status, want, "{body} → {problem}");
        if !field.is_empty() {
            let named = problem["errors"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["field"] == field));
            assert!(named, "{body} should name {field}: {problem}");
        }
    }
    let (status, problem) = api.get("/v1/messages/12345").await;
    assert_eq!(status, 404, "{problem}");
}

/// A message in flight when the process is killed is sent again after the restart,
/// once its lease runs out: recorded before it was sent, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_flight_at_kill_9_is_sent_after_the_restart() {
    let script: Script =
        Arc::new(|_: &str, before: u32| if before == 0 { Reply::Stall } else { Reply::Accept });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let home = Home::new().await;
    let args = ["--smtp", &smtp.url(), "--lease", "2s"];
    let (mut node, api) = spawn_node(&home, &args);
    api.wait_healthy().await;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "ann@example.org" }]))
        .await;
    let (status, m, _) = message(
        &api,
        json!({ "subscriber": "ann@example.org", "subject": "Code", "text": "Your code is 1234\r\n" }),
        Some("code-1"),
    )
    .await;
    assert_eq!(status, 202, "{m}");
    let id = m["message"]["id"].as_u64().unwrap();
    // The first try stalls at the end of DATA: the message is in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    while smtp.tries("ann@example.org") == 0 {
        assert!(Instant::now() < deadline, "never tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill();
    let (_node, api) = spawn_node(&home, &args);
    api.wait_healthy().await;
    let sent = settled(&api, id, Duration::from_secs(30)).await;
    assert_eq!(sent["state"], "sent", "{sent}");
    assert_eq!(sent["attempts"], 2, "the crashed attempt counts: {sent}");
    assert_eq!(smtp.count(), 1, "accepted once");
    // Its key still names it after the restart.
    let (status, replay, replayed) = message(
        &api,
        json!({ "subscriber": "ann@example.org", "subject": "Code", "text": "Your code is 1234\r\n" }),
        Some("code-1"),
    )
    .await;
    assert_eq!(
        (status, replay["message"]["id"].as_u64(), replayed),
        (202, Some(id), true)
    );
    assert_eq!(smtp.count(), 1);
}
