//! The whole pipeline: HTTP → segment filter → per-recipient template → SMTP, and the
//! outbox used when no SMTP server is configured.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{SmtpServer, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_send_renders_per_recipient_and_reaches_only_the_segment() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;

    let subscribers: Vec<_> = (0..60)
        .map(|i| {
            json!({
                "email": format!("user{i}@example.org"),
                "name": format!("User {i}"),
                "attributes": { "plan": if i % 3 == 0 { "pro" } else { "free" }, "city": format!("C{i}") },
            })
        })
        .collect();
    let added = api
        .post_ok(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            json!(subscribers),
            201,
        )
        .await;
    assert_eq!(added["inserted"], 60);

    let letter = api
        .letter(
            newsletter,
            json!({
                "subject": "Hi {{ name }}",
                "text": "Hello {{ name }}\r\nplan {{ attributes.plan }} city {{ attributes.city }}\r\n",
                "html": "<p>Hello {{ name }}</p>",
                "params": { "segment": { "attribute": "plan", "equals": "pro" } },
            }),
        )
        .await;

    let started = Instant::now();
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 20, "{done}");
    assert_eq!(done["counts"]["skipped"], 40, "{done}");
    assert_eq!(done["counts"]["failed"], 0, "{done}");
    assert_eq!(done["counts"]["pending"], 0, "{done}");
    assert_eq!(done["counts"]["sending"], 0, "{done}");
    eprintln!(
        "e2e: 60 recipients (20 sent) in {:.3}s = {:.0} recipients/s",
        elapsed.as_secs_f64(),
        60.0 / elapsed.as_secs_f64()
    );

    let received = smtp.received();
    assert_eq!(received.len(), 20);
    let mut by_recipient: HashMap<String, _> = HashMap::new();
    for message in &received {
        assert_eq!(message.recipients.len(), 1);
        assert!(
            by_recipient
                .insert(message.recipients[0].clone(), message)
                .is_none()
        );
    }
    for i in (0..60).filter(|i| i % 3 == 0) {
        let message = by_recipient
            .get(&format!("user{i}@example.org"))
            .unwrap_or_else(|| panic!("user{i} got nothing"));
        assert_eq!(message.header("Subject").unwrap(), format!("Hi User {i}"));
        assert!(
            message
                .body()
                .contains(&format!("Hello User {i}\r\nplan pro city C{i}\r\n")),
            "{}",
            message.data
        );
        assert!(
            message.body().contains(&format!("<p>Hello User {i}</p>")),
            "{}",
            message.data
        );
        let id = message.header("Message-ID").unwrap();
        assert!(
            id.starts_with(&format!("<letterbox.{job}.")) && id.ends_with("@example.com>"),
            "{id}"
        );
        assert!(message.header("List-Unsubscribe").is_some());
    }

    // The per-recipient log says why the others were skipped.
    let (status, page) = api.get(&format!("/v1/jobs/{job}/deliveries?limit=3")).await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["state"], "delivered");
    assert_eq!(items[1]["state"], "skipped");
    assert_eq!(items[1]["reason"], "not in segment");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_link_stops_later_letters() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people = json!([{ "email": "ann@example.org" }, { "email": "bob@example.org" }]);
    api.add_subscribers(newsletter, people).await;
    let letter = json!({ "subject": "One", "text": "Bye: {{ unsubscribe_url }}\r\n" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({})).await;
    assert_eq!(
        api.wait_job(job, Duration::from_secs(30)).await["counts"]["delivered"],
        2
    );

    let to_ann = smtp
        .received()
        .into_iter()
        .find(|m| m.recipients == ["ann@example.org"])
        .unwrap();
    let header = to_ann.header("List-Unsubscribe").unwrap();
    let url = header.trim_start_matches('<').trim_end_matches('>').to_string();
    assert!(
        to_ann.body().contains(&url),
        "template and header carry the same link"
    );
    let path = url.strip_prefix(&api.base).expect("link points at this server");
    let (status, page) = api.get(path).await;
    assert_eq!(status, 200, "{page}");
    let (status, _) = api.post(path, json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = api.post(&format!("{path}x"), json!({})).await;
    assert_eq!(status, 404, "a tampered token is refused");

    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["delivered"], 1, "{done}");
    let to_ann = smtp
        .received()
        .iter()
        .filter(|m| m.recipients == ["ann@example.org"])
        .count();
    assert_eq!(to_ann, 1, "ann got nothing after unsubscribing");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_smtp_messages_land_in_the_outbox() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..3)
        .map(|i| json!({ "email": format!("p{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "Hello {{ email }}", "text": "Hi\r\n" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!(null)).await;
    assert_eq!(
        api.wait_job(job, Duration::from_secs(30)).await["state"],
        "completed"
    );
    let mut files: Vec<_> = std::fs::read_dir(server.outbox())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for (i, file) in files.iter().enumerate() {
        assert_eq!(file.extension().unwrap(), "eml");
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.contains(&format!("Subject: Hello p{i}@example.org")),
            "{text}"
        );
    }
    server.stop().await;
}
