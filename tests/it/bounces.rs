//! Hearing back through the API and the SMTP transaction: rejections classified by
//! their enhanced status code (a bad mailbox bounces the subscriber, a block of the
//! sender never blames the address but pauses its domain), reports from the user's
//! pipeline (`POST /v1/bounces`), the suppression list, reinstatement, and suppression
//! stopping a job that is already running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::smtp::{Reply, Script};
use crate::support::{Api, SmtpServer, TestServer, emails};

/// A newsletter with `emails` as subscribers, in that order, and a letter to them.
/// Returns the newsletter, the letter and the subscribers' ids by email.
async fn list_and_letter(api: &Api, emails: &[String]) -> (u64, u64, HashMap<String, u64>) {
    let newsletter = api.newsletter().await;
    let people: Vec<_> = emails.iter().map(|e| json!({ "email": e })).collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "Hello", "text": "Hi {{ email }}\r\n" }),
        )
        .await;
    let ids = api.subscriber_ids(newsletter).await;
    (newsletter, letter, ids)
}

async fn deliveries(api: &Api, job: u64) -> HashMap<String, Value> {
    let (status, page) = api.get(&format!("/v1/jobs/{job}/deliveries?limit=1000")).await;
    assert_eq!(status, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["email"].as_str().unwrap().to_string(), d.clone()))
        .collect()
}

async fn status_of(api: &Api, id: u64) -> String {
    let (_, s) = api.get(&format!("/v1/subscribers/{id}")).await;
    s["status"].as_str().unwrap().to_string()
}

async fn bounces_of(api: &Api, id: u64) -> Vec<Value> {
    let (status, page) = api.get(&format!("/v1/subscribers/{id}/bounces")).await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_bounce_the_address_or_blame_the_sender() {
    let script: Script = Arc::new(|rcpt: &str, _before: u32| match rcpt {
        r if r.starts_with("unknown") => Reply::PermFail,
        r if r.starts_with("full") => Reply::Full,
        r if r.starts_with("blocked") => Reply::Blocked,
        r if r.starts_with("refused") => Reply::Refuse,
        _ => Reply::Accept,
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::with_smtp(&smtp, |config| {
        config.bounces.blocks = letterbox::bounces::BlockLimit {
            after: 3,
            window: Duration::from_secs(600),
            pause: Duration::from_secs(3600),
        };
    })
    .await;
    let api = &server.api;
    let mut list = emails("ok", "example.org", 3);
    list.extend(emails("unknown", "example.org", 2));
    list.extend(emails("full", "example.org", 1));
    list.extend(emails("refused", "example.org", 1));
    list.extend(emails("blocked", "blocked.example", 4));
    let (newsletter, letter, ids) = list_and_letter(api, &list).await;
    // One at a time: the fourth block finds its domain paused.
    let options = json!({ "concurrency": 1, "retry": { "max_attempts": 2, "base_ms": 20, "cap_ms": 50 } });
    let job = api.send(letter, options).await;
    let view = api
        .wait_for(job, Duration::from_secs(60), |j| {
            j["counts"]["pending"] == 0 && j["counts"]["sending"] == 0 && j["counts"]["retrying"] == 1
        })
        .await;
    assert_eq!(view["state"], "running", "{view}");
    assert_eq!(view["counts"]["delivered"], 3, "{view}");
    assert_eq!(view["counts"]["failed"], 7, "{view}");
    let d = deliveries(api, job).await;
    let paused = &view["paused_domains"];
    assert_eq!(paused.as_array().map(Vec::len), Some(1), "{view} {d:#?}");
    assert_eq!(paused[0]["domain"], "blocked.example");
    assert!(
        paused[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("3 refusals of the sender within 10m"),
        "{paused}"
    );
    let d = deliveries(api, job).await;

    // A bad mailbox (5.1.1 at RCPT) is a hard bounce: the subscriber is bounced, the
    // report kept with the job it answers.
    for i in 0..2 {
        let email = format!("unknown{i}@example.org");
        let reason = d[&email]["reason"].as_str().unwrap();
        assert!(
            reason.contains("550") && reason.contains("5.1.1 no such user"),
            "{reason}"
        );
        assert!(
            reason.contains("[subscriber bounced: hard bounce 5.1.1]"),
            "{reason}"
        );
        assert_eq!(status_of(api, ids[&email]).await, "bounced");
        let reports = bounces_of(api, ids[&email]).await;
        assert_eq!(reports.len(), 1, "{reports:?}");
        let r = &reports[0];
        assert_eq!(
            (r["kind"].as_str(), r["source"].as_str()),
            (Some("hard"), Some("smtp"))
        );
        assert_eq!(r["status"], "5.1.1");
        assert_eq!(r["job_id"], job);
        assert!(r["diagnostic"].as_str().unwrap().contains("no such user"), "{r}");
    }
    // A full mailbox that outlasts the retries is one soft bounce: counted, not yet
    // suppressing.
    let full = "full0@example.org";
    assert_eq!(d[full]["attempts"], 2, "{}", d[full]);
    assert_eq!(status_of(api, ids[full]).await, "active");
    let reports = bounces_of(api, ids[full]).await;
    assert_eq!(reports[0]["kind"], "soft");
    assert!(
        reports[0]["decision"]
            .as_str()
            .unwrap()
            .contains("1 of 3 within 7 days"),
        "{reports:?}"
    );
    // A refusal that says nothing about the address is a plain failure.
    let refused = "refused0@example.org";
    assert_eq!(d[refused]["state"], "failed");
    assert!(bounces_of(api, ids[refused]).await.is_empty());
    assert_eq!(status_of(api, ids[refused]).await, "active");
    // A block of the sender (5.7.1) never blames the address...
    let blocked: Vec<String> = emails("blocked", "blocked.example", 4);
    let (refused_ones, waiting): (Vec<&String>, Vec<&String>) =
        blocked.iter().partition(|e| d[e.as_str()]["state"] == "failed");
    assert_eq!(refused_ones.len(), 3, "{d:#?}");
    for email in refused_ones {
        assert_eq!(status_of(api, ids[email]).await, "active");
        let reports = bounces_of(api, ids[email]).await;
        assert_eq!(reports[0]["kind"], "blocked");
        assert!(
            reports[0]["decision"]
                .as_str()
                .unwrap()
                .contains("not counted against the address"),
            "{reports:?}"
        );
    }
    // ...but three of them pause the domain: the fourth waits, its attempt not used
    // (which one is fourth is the order the deliveries got the job's one slot).
    let waiting = &d[waiting[0].as_str()];
    assert_eq!(waiting["state"], "retrying", "{waiting}");
    assert_eq!(waiting["attempts"], 0, "{waiting}");
    assert!(
        waiting["last_error"]
            .as_str()
            .unwrap()
            .starts_with("recipient domain blocked.example paused until "),
        "{waiting}"
    );
    assert_eq!(smtp.tries(waiting["email"].as_str().unwrap()), 0);
    let (_, metrics) = api.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"letterbox_sender_blocks_total{domain="blocked.example"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"letterbox_rejections_total{kind="hard"} 2"#),
        "{metrics}"
    );
    // The log says it all: the bounces, the blocks, the status changes.
    let (_, log) = api
        .get("/v1/events?type=delivery.bounced,delivery.blocked,subscriber.bounced&limit=100")
        .await;
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for e in log["events"].as_array().unwrap() {
        *kinds.entry(e["type"].as_str().unwrap().into()).or_default() += 1;
    }
    assert_eq!(kinds["delivery.bounced"], 3, "{kinds:?}");
    assert_eq!(kinds["delivery.blocked"], 3, "{kinds:?}");
    assert_eq!(kinds["subscriber.bounced"], 2, "{kinds:?}");
    api.post_ok(&format!("/v1/jobs/{job}/cancel"), json!({}), 200)
        .await;

    // The next letter leaves the bounced out, and holds the paused domain back.
    let second = api
        .letter(newsletter, json!({ "subject": "Again", "text": "Hi\r\n" }))
        .await;
    let again = api.send(second, json!({ "concurrency": 4 })).await;
    let view = api
        .wait_for(again, Duration::from_secs(60), |j| {
            j["counts"]["delivered"] == 3 && j["counts"]["retrying"].as_u64() >= Some(4)
        })
        .await;
    assert_eq!(view["counts"]["pending"], 0, "{view}");
    let d = deliveries(api, again).await;
    assert!(!d.contains_key("unknown0@example.org"), "{d:#?}");
    assert_eq!(smtp.tries("unknown0@example.org"), 1, "never tried again");
    for email in emails("blocked", "blocked.example", 4) {
        assert_eq!(d[&email]["attempts"], 0, "{}", d[&email]);
    }
    api.post_ok(&format!("/v1/jobs/{again}/cancel"), json!({}), 200)
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_and_suppressions_stop_a_running_job_and_can_be_undone() {
    // Slow enough that the last recipients are claimed long before they are sent.
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(15)).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let list = emails("r", "example.org", 300);
    let (newsletter, letter, ids) = list_and_letter(api, &list).await;
    // Another newsletter shares an address: a complaint reaches it too.
    let other = api.newsletter().await;
    api.add_subscribers(other, json!([{ "email": "r250@example.org" }]))
        .await;
    let job = api.send(letter, json!({ "concurrency": 2 })).await;
    api.wait_for(job, Duration::from_secs(30), |j| {
        j["counts"]["delivered"].as_u64() >= Some(20)
    })
    .await;
    let (_, view) = api.get(&format!("/v1/jobs/{job}")).await;
    assert!(
        view["counts"]["sending"].as_u64().unwrap() > 100,
        "claimed ahead: {view}"
    );

    // A complaint by address alone, a hard bounce by the Message-ID of a message not
    // sent yet, an address the operator suppresses.
    let reported = api
        .post_ok(
            "/v1/bounces",
            json!({ "type": "complaint", "email": "r250@example.org", "raw": "Feedback-Type: abuse" }),
            201,
        )
        .await;
    let records = reported["bounces"].as_array().unwrap();
    assert_eq!(records.len(), 2, "both subscribers with the address: {reported}");
    let nonce = view["message_id_nonce"].as_str().unwrap();
    let message_id = format!(
        "<letterbox.{job}.{}.{nonce}@example.com>",
        ids["r260@example.org"]
    );
    let reported = api
        .post_ok(
            "/v1/bounces",
            json!({ "message_id": message_id, "status": "5.1.1", "diagnostic": "550 5.1.1 gone" }),
            201,
        )
        .await;
    assert_eq!(reported["bounces"][0]["kind"], "hard", "{reported}");
    assert_eq!(reported["bounces"][0]["job_id"], job, "{reported}");
    let added = api
        .post_ok(
            "/v1/suppressions",
            json!({ "emails": ["r270@example.org", "not-an-address"], "note": "asked by phone" }),
            200,
        )
        .await;
    assert_eq!(
        (added["added"].as_u64(), added["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{added}"
    );
    assert_eq!(added["errors"][0]["row"], 2, "{added}");

    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["skipped"], 3, "{done}");
    assert_eq!(done["counts"]["delivered"], 297, "{done}");
    let d = deliveries(api, job).await;
    assert_eq!(d["r250@example.org"]["reason"], "subscriber is complained");
    assert_eq!(d["r260@example.org"]["reason"], "subscriber is bounced");
    let suppressed = d["r270@example.org"]["reason"].as_str().unwrap();
    assert!(
        suppressed.starts_with("address suppressed since 20")
            && suppressed.ends_with(": manual (asked by phone)"),
        "{suppressed}"
    );
    for skipped in ["r250@example.org", "r260@example.org", "r270@example.org"] {
        assert_eq!(smtp.tries(skipped), 0, "{skipped} was sent");
    }
    // The complaint put the address on the list; the list pages by address.
    let (_, page) = api.get("/v1/suppressions?limit=1").await;
    assert_eq!(page["items"][0]["email"], "r250@example.org", "{page}");
    assert_eq!(page["items"][0]["reason"], "complained");
    let (_, rest) = api
        .get(&format!(
            "/v1/suppressions?after={}",
            page["next"].as_str().unwrap()
        ))
        .await;
    assert_eq!(rest["items"][0]["email"], "r270@example.org", "{rest}");
    assert_eq!(rest["next"], Value::Null);

    // Undone: the operator reinstates the complainer (lifting the suppression) and
    // takes the other address off the list; the next letter reaches them.
    let (status, body) = api
        .post(
            &format!("/v1/subscribers/{}/reinstate", ids["r250@example.org"]),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subscriber"]["status"], "active");
    assert_eq!(body["lifted_suppression"]["reason"], "complained");
    let (status, body) = api.delete("/v1/suppressions/r270@example.org").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = api.delete("/v1/suppressions/r270@example.org").await;
    assert_eq!(status, 404);
    let (status, _) = api.get("/v1/suppressions/r270@example.org").await;
    assert_eq!(status, 404);
    let reports = bounces_of(api, ids["r250@example.org"]).await;
    assert_eq!(reports.len(), 1, "the record stays");
    let second = api
        .letter(newsletter, json!({ "subject": "Again", "text": "Hi\r\n" }))
        .await;
    let again = api.send(second, json!({ "concurrency": 8 })).await;
    let done = api.wait_job(again, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 299, "{done}");
    assert_eq!(done["counts"]["total"], Value::Null);
    assert_eq!(
        done["counts"]["skipped"], 0,
        "the bounced one is not on its list: {done}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_and_requests_get_clear_errors() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "a@example.com" }]))
        .await;
    let field = |body: &Value| body["errors"][0]["field"].as_str().unwrap_or("").to_string();
    for (body, expected) in [
        (json!({ "type": "hard" }), "email"),
        (json!({ "email": "a@example.com" }), "type"),
        (json!({ "email": "a@example.com", "status": "9.1.1" }), "status"),
        (json!({ "email": "a@example.com", "status": "2.0.0" }), "status"),
        (json!({ "type": "hard", "email": "nope" }), "email"),
        (
            json!({ "type": "hard", "message_id": "<abc@example.com>" }),
            "message_id",
        ),
        (
            json!({ "type": "hard", "message_id": "<letterbox.1.1.ffff@example.com>" }),
            "message_id",
        ),
        (
            json!({ "type": "hard", "subscriber": 9_223_372_036_854_775_808u64 }),
            "subscriber",
        ),
    ] {
        let (status, answer) = api.post("/v1/bounces", body.clone()).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(field(&answer), expected, "{body}: {answer}");
    }
    let (status, answer) = api
        .post(
            "/v1/bounces",
            json!({ "type": "bounce", "email": "a@example.com" }),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("hard"), "{answer}");
    let (status, answer) = api
        .post(
            "/v1/bounces",
            json!({ "type": "hard", "email": "a@example.com", "newsletter": 999 }),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    // A status alone gives the type; an unknown address is kept, unattributed.
    let answer = api
        .post_ok(
            "/v1/bounces",
            json!({ "email": "who@example.net", "status": "4.2.2" }),
            201,
        )
        .await;
    assert_eq!(answer["bounces"][0]["kind"], "soft", "{answer}");
    let (_, page) = api.get("/v1/bounces?unattributed=true").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["items"][0]["email"], "who@example.net");
    let (status, _) = api.get("/v1/subscribers/999/bounces").await;
    assert_eq!(status, 404);
    let (status, answer) = api.get("/v1/bounces?unattributed=maybe").await;
    assert_eq!(status, 400, "{answer}");

    // Reinstating needs a subscriber who did not unsubscribe.
    let (_, list) = api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers"))
        .await;
    let id = list["items"][0]["id"].as_u64().unwrap();
    let (status, _) = api
        .patch(
            &format!("/v1/subscribers/{id}"),
            json!({ "status": "unsubscribed" }),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = api
        .post(&format!("/v1/subscribers/{id}/reinstate"), json!({}))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("only they can subscribe again")
    );
    let (status, _) = api.post("/v1/subscribers/999/reinstate", json!({})).await;
    assert_eq!(status, 404);

    // Suppressions: CSV with a bad row, CSV without its column, an empty list.
    let csv = b"email,note\nx@example.com,bounced elsewhere\nbroken,\ny@example.com,\n".to_vec();
    let (status, answer) = api.post_raw("/v1/suppressions", "text/csv", csv).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["added"].as_u64(), answer["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{answer}"
    );
    assert_eq!(answer["errors"][0]["row"], 2, "{answer}");
    let (_, x) = api.get("/v1/suppressions/x@example.com").await;
    assert_eq!(x["note"], "bounced elsewhere", "{x}");
    let (status, answer) = api
        .post_raw(
            "/v1/suppressions",
            "text/csv",
            b"address\nx@example.com\n".to_vec(),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("email"), "{answer}");
    let (status, answer) = api.post("/v1/suppressions", json!({ "emails": [] })).await;
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = api
        .post("/v1/suppressions", json!({ "email": "x@example.com" }))
        .await;
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = api
        .post("/v1/suppressions", json!({ "emails": ["x@example.com"] }))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["added"].as_u64(), answer["already"].as_u64()),
        (Some(0), Some(1))
    );
    server.stop().await;
}
