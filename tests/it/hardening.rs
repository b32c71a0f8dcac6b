//! Messages every mail system accepts and data that never costs a delivery: names with
//! line breaks (folded at import and PATCH, and at send time for what was stored
//! before), Message-IDs unique across installations, valid MIME (checked by
//! `support::mime` on everything the SMTP server receives), and letters whose templates
//! do not parse refused when they are written.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::support::{SmtpServer, TestServer, wasm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_line_breaks_are_folded_and_delivered() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;

    // A CSV export with a quoted line break in a name, and JSON with an injection try.
    let csv = "email,name,plan\r\nann@example.org,\"Ann\r\nLee\",pro\r\nbob@example.org,Bob,free\r\n";
    let (status, summary) = api
        .post_raw(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            "text/csv",
            csv.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{summary}");
    assert_eq!(
        (summary["inserted"].as_u64(), summary["names_folded"].as_u64()),
        (Some(2), Some(1)),
        "{summary}"
    );
    let people = json!([
        { "email": "eve@example.org", "name": "Eve\r\nBcc: x@example.org" },
        { "email": "tab@example.org", "name": "\tTab\u{0}Name " },
        { "email": "long@example.org", "name": "x".repeat(300) },
    ]);
    let summary = api.add_subscribers(newsletter, people).await;
    assert_eq!(
        (
            summary["inserted"].as_u64(),
            summary["names_folded"].as_u64(),
            summary["rejected"].as_u64()
        ),
        (Some(2), Some(2), Some(1)),
        "{summary}"
    );
    assert!(
        summary["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 256"),
        "{summary}"
    );

    let (_, found) = api
        .get(&format!(
            "/v1/newsletters/{newsletter}/subscribers?email=eve@example.org"
        ))
        .await;
    let eve = &found["items"][0];
    assert_eq!(eve["name"], "Eve Bcc: x@example.org", "{found}");
    let (status, changed) = api
        .patch(
            &format!("/v1/subscribers/{}", eve["id"]),
            json!({ "name": "Eve\nAgain" }),
        )
        .await;
    assert_eq!(
        (status, changed["name"].as_str()),
        (200, Some("Eve Again")),
        "{changed}"
    );
    let (status, refused) = api
        .patch(
            &format!("/v1/subscribers/{}", eve["id"]),
            json!({ "name": "y".repeat(257) }),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["errors"][0]["field"], "name", "{refused}");

    let letter = json!({ "subject": "Hi {{ name }}", "text": "Hello {{ name }}, {{ attributes.plan }}" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 4, "{done}");
    assert_eq!(done["counts"]["failed"], 0, "{done}");

    // received() checks each message's MIME; here: one recipient each, nobody else.
    let received = smtp.received();
    let recipients: HashSet<_> = received.iter().flat_map(|m| m.recipients.clone()).collect();
    let expected: HashSet<_> = [
        "ann@example.org",
        "bob@example.org",
        "eve@example.org",
        "tab@example.org",
    ]
    .map(String::from)
    .into();
    assert_eq!(recipients, expected);
    for message in &received {
        assert!(message.header("Bcc").is_none(), "{}", message.data);
        let parsed = mail_parser::MessageParser::default()
            .parse(message.data.as_bytes())
            .unwrap();
        let to = parsed.to().unwrap();
        assert_eq!(to.iter().count(), 1, "{}", message.data);
        let name = to.first().unwrap().name().unwrap_or_default().to_string();
        match message.recipients[0].as_str() {
            "ann@example.org" => assert_eq!(name, "Ann Lee"),
            "eve@example.org" => {
                assert_eq!(name, "Eve Again");
                assert_eq!(parsed.subject(), Some("Hi Eve Again"));
            }
            "tab@example.org" => assert_eq!(name, "Tab Name"),
            _ => {}
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_differ_between_installations_and_stay_per_job() {
    // Two fresh installations: both number their first job and subscriber 1.
    let mut ids = Vec::new();
    let mut files = Vec::new();
    for _ in 0..2 {
        let server = TestServer::start(None).await;
        let api = &server.api;
        let newsletter = api.newsletter().await;
        api.add_subscribers(newsletter, json!([{ "email": "ann@example.org" }]))
            .await;
        let letter = api
            .letter(newsletter, json!({ "subject": "S", "text": "T" }))
            .await;
        let job = api.send(letter, json!({})).await;
        let done = api.wait_job(job, Duration::from_secs(60)).await;
        assert_eq!(
            (job, done["counts"]["delivered"].as_u64()),
            (1, Some(1)),
            "{done}"
        );
        let nonce = done["message_id_nonce"].as_str().unwrap().to_string();
        assert_eq!(nonce.len(), 16, "{done}");
        let names: Vec<_> = std::fs::read_dir(server.outbox())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let eml = std::fs::read_to_string(server.outbox().join(&names[0])).unwrap();
        crate::support::mime::check_message(&eml).unwrap_or_else(|why| panic!("{why}\n{eml}"));
        let id = eml
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap()
            .to_string();
        assert_eq!(id, format!("<letterbox.1.1.{nonce}@example.com>"));
        // The outbox file is named after the ID, so a re-send overwrites it.
        assert_eq!(names[0], format!("letterbox.1.1.{nonce}_example.com.eml"));
        ids.push(id);
        files.push(names[0].clone());
        server.stop().await;
    }
    assert_ne!(ids[0], ids[1], "two installations gave the same Message-ID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_whose_templates_do_not_parse_are_refused() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let path = format!("/v1/newsletters/{newsletter}/letters");

    let (status, body) = api
        .post(&path, json!({ "subject": "Hi {{ name", "text": "ok" }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "subject", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.starts_with("line 1, column "), "{body}");

    let letter = json!({ "subject": "ok", "text": "one\n{% for %}", "html": "<p>{{ name | shout }}</p>" });
    let (status, body) = api.post(&path, letter).await;
    assert_eq!(status, 422, "{body}");
    let fields: Vec<_> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["text", "html"], "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 2, "),
        "{body}"
    );
    assert!(
        body["errors"][1]["message"]
            .as_str()
            .unwrap()
            .contains("unknown filter"),
        "{body}"
    );

    let (status, body) = api
        .post(&path, json!({ "subject": "two\nlines", "text": "ok" }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "subject", "{body}");

    // A custom template is checked by rendering it for a sample recipient, as a
    // preview would: the A/B example parses the letter with minijinja and says why it
    // cannot, or refuses params it cannot use.
    let (status, _) = api.upload("template", "ab", wasm("ab_subject")).await;
    assert_eq!(status, 201);
    let (status, body) = api
        .post(
            &path,
            json!({ "subject": "ok", "text": "{% for %}", "template": "ab" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "template", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("text template") && message.contains("ab@"),
        "{body}"
    );
    let bad_params =
        json!({ "subject": "ok", "text": "ok", "template": "ab", "params": { "ab": { "subjects": [] } } });
    let (status, body) = api.post(&path, bad_params).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ab.subjects"),
        "{body}"
    );
    // One that fails only for some recipients' data is theirs to fail at send time.
    let (status, _) = api
        .upload("template", "trapper", wasm("test_trap_template"))
        .await;
    assert_eq!(status, 201);
    api.add_subscribers(newsletter, json!([{ "email": "trap@example.org" }]))
        .await;
    api.letter(
        newsletter,
        json!({ "subject": "ok", "text": "ok", "template": "trapper" }),
    )
    .await;
    api.letter(
        newsletter,
        json!({ "subject": "ok", "text": "ok", "template": "ab" }),
    )
    .await;

    // Nothing refused was stored; a good letter still is.
    api.letter(newsletter, json!({ "subject": "Hi {{ name }}", "text": "ok" }))
        .await;
    server.stop().await;
}
