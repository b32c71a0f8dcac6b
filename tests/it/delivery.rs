//! The delivery engine against a scriptable SMTP server: retries and permanent
//! failures, timeouts, pause/resume, cancel, retry-failed, idempotent and scheduled
//! submission, the per-domain cap, the rate limit, listings and the event stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::smtp::{Reply, Script};
use crate::support::{Api, SmtpServer, TestServer, emails};

/// A newsletter with `emails` as subscribers and a plain letter; returns the letter.
async fn letter_to(api: &Api, emails: &[String]) -> u64 {
    let newsletter = api.newsletter().await;
    let people: Vec<_> = emails.iter().map(|e| json!({ "email": e })).collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "Hello", "text": "Hi {{ email }}\r\n" });
    api.letter(newsletter, letter).await
}

/// Every delivery of a job, following the cursor.
async fn all_deliveries(api: &Api, job: u64, state: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let filter = state.map(|s| format!("&state={s}")).unwrap_or_default();
        let (status, page) = api
            .get(&format!(
                "/v1/jobs/{job}/deliveries?limit=7&cursor={cursor}{filter}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(next) => cursor = next,
            None => return out,
        }
    }
}

fn by_email(deliveries: &[Value]) -> HashMap<String, Value> {
    deliveries
        .iter()
        .map(|d| (d["email"].as_str().unwrap().to_string(), d.clone()))
        .collect()
}

/// How many messages each recipient received.
fn copies(smtp: &SmtpServer) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for message in smtp.received() {
        *out.entry(message.recipients[0].clone()).or_default() += 1;
    }
    out
}

const FAST_RETRY: &str = r#"{ "max_attempts": 4, "base_ms": 50, "cap_ms": 200 }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_then_succeed_and_permanent_ones_fail_at_once() {
    let script: Script = Arc::new(|rcpt: &str, before: u32| match rcpt {
        r if r.starts_with("flaky") && before < 2 => Reply::TempFail,
        r if r.starts_with("drop") && before < 1 => Reply::DropInData,
        r if r.starts_with("gone") => Reply::PermFail,
        r if r.starts_with("down") => Reply::TempFail,
        _ => Reply::Accept,
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let mut list = Vec::new();
    for prefix in ["ok", "flaky", "drop", "gone", "down"] {
        list.extend(emails(prefix, "example.org", 3));
    }
    let letter = letter_to(api, &list).await;
    let retry: Value = serde_json::from_str(FAST_RETRY).unwrap();
    let job = api.send(letter, json!({ "retry": retry })).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 9, "{done}");
    assert_eq!(done["counts"]["failed"], 6, "{done}");
    assert_eq!(done["counts"]["retrying"], 0, "{done}");

    let deliveries = by_email(&all_deliveries(api, job, None).await);
    for i in 0..3 {
        let d = |p: &str| deliveries[&format!("{p}{i}@example.org")].clone();
        assert_eq!(d("ok")["attempts"], 1);
        assert_eq!(d("flaky")["state"], "delivered", "{}", d("flaky"));
        assert_eq!(d("flaky")["attempts"], 3, "two 451s, then accepted");
        assert_eq!(d("drop")["state"], "delivered", "{}", d("drop"));
        assert_eq!(
            d("drop")["attempts"],
            2,
            "connection dropped mid-DATA, then accepted"
        );
        let gone = d("gone");
        assert_eq!(gone["state"], "failed");
        assert_eq!(gone["attempts"], 1, "a 5xx is not retried: {gone}");
        assert!(gone["reason"].as_str().unwrap().contains("550"), "{gone}");
        let down = d("down");
        assert_eq!(down["state"], "failed");
        assert_eq!(down["attempts"], 4, "{down}");
        assert!(
            down["reason"]
                .as_str()
                .unwrap()
                .starts_with("gave up after 4 attempts"),
            "{down}"
        );
        assert_eq!(smtp.tries(&format!("down{i}@example.org")), 4);
    }
    // The failed ones, and only they, through the state filter.
    let failed = all_deliveries(api, job, Some("failed")).await;
    assert_eq!(failed.len(), 6);
    assert!(failed.iter().all(|d| d["state"] == "failed"));
    // Retries keep the Message-ID: a re-sent message is recognisable.
    let ids: Vec<_> = smtp
        .received()
        .iter()
        .filter(|m| m.recipients[0].starts_with("flaky0"))
        .map(|m| m.header("Message-ID").unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    assert!(ids[0].contains(&format!("letterbox.{job}.")), "{ids:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_out_and_the_recipient_is_retried() {
    let script: Script = Arc::new(|rcpt: &str, before: u32| {
        if rcpt.starts_with("stall") && before == 0 {
            Reply::Stall
        } else {
            Reply::Accept
        }
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::with_smtp(&smtp, |config| {
        let smtp = config.smtp.as_mut().unwrap();
        smtp.command_timeout = Duration::from_millis(300);
    })
    .await;
    let api = &server.api;
    let mut list = emails("stall", "example.org", 2);
    list.extend(emails("ok", "example.org", 4));
    let letter = letter_to(api, &list).await;
    let retry: Value = serde_json::from_str(FAST_RETRY).unwrap();
    let started = Instant::now();
    let job = api.send(letter, json!({ "retry": retry })).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 6, "{done}");
    let deliveries = by_email(&all_deliveries(api, job, None).await);
    for i in 0..2 {
        let d = &deliveries[&format!("stall{i}@example.org")];
        assert_eq!(d["attempts"], 2, "timed out once, then delivered: {d}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timeout, not the stall, decided"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_resume_never_resends_a_delivered_recipient() {
    const N: usize = 300;
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(10)).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("p", "example.org", N)).await;
    let job = api.send(letter, json!({ "concurrency": 4 })).await;
    while smtp.count() < 40 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, paused) = api.post(&format!("/v1/jobs/{job}/pause"), json!({})).await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["pause_reason"], "paused on request");
    // In-flight deliveries finish; nothing is sent afterwards.
    let settled = api
        .wait_for(job, Duration::from_secs(30), |j| j["counts"]["sending"] == 0)
        .await;
    let at_pause = smtp.count();
    assert_eq!(settled["counts"]["delivered"], at_pause as u64, "{settled}");
    assert!(at_pause < N, "paused before the end");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(smtp.count(), at_pause, "nothing is sent while paused");
    // Pausing twice is a conflict, not a second pause.
    assert_eq!(api.post(&format!("/v1/jobs/{job}/pause"), json!({})).await.0, 409);

    let (status, resumed) = api.post(&format!("/v1/jobs/{job}/resume"), json!({})).await;
    assert_eq!(status, 200, "{resumed}");
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], N as u64, "{done}");
    let copies = copies(&smtp);
    assert_eq!(copies.len(), N);
    assert!(copies.values().all(|n| *n == 1), "nobody received a second copy");
    // Connections are pooled: 300 messages, 4 at a time, over a handful of sessions.
    assert!(smtp.connections() <= 8, "{} connections", smtp.connections());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_send_and_marks_the_rest_cancelled() {
    const N: usize = 300;
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(10)).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("c", "example.org", N)).await;
    let job = api.send(letter, json!({ "concurrency": 4 })).await;
    while smtp.count() < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, body) = api.post(&format!("/v1/jobs/{job}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    let done = api
        .wait_for(job, Duration::from_secs(30), |j| {
            j["counts"]["sending"] == 0 && j["counts"]["pending"] == 0 && !j["finished_at"].is_null()
        })
        .await;
    assert_eq!(done["state"], "cancelled", "{done}");
    let delivered = done["counts"]["delivered"].as_u64().unwrap();
    assert_eq!(delivered, smtp.count() as u64, "{done}");
    assert_eq!(
        done["counts"]["cancelled"].as_u64().unwrap(),
        N as u64 - delivered,
        "{done}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.count() as u64, delivered, "nothing is sent after a cancel");
    // A cancelled job cannot be resumed or cancelled again.
    assert_eq!(
        api.post(&format!("/v1/jobs/{job}/resume"), json!({})).await.0,
        409
    );
    assert_eq!(
        api.post(&format!("/v1/jobs/{job}/cancel"), json!({})).await.0,
        409
    );
    let cancelled = all_deliveries(api, job, Some("cancelled")).await;
    assert_eq!(cancelled.len() as u64, N as u64 - delivered);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_requeues_only_the_failed_recipients() {
    // "bad" recipients are refused (5xx, for a reason that is not their address's) the
    // first time only.
    let script: Script = Arc::new(|rcpt: &str, before: u32| {
        if rcpt.starts_with("bad") && before == 0 {
            Reply::Refuse
        } else {
            Reply::Accept
        }
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let mut list = emails("good", "example.org", 20);
    list.extend(emails("bad", "example.org", 5));
    let letter = letter_to(api, &list).await;
    let job = api.send(letter, json!({})).await;
    let first = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(first["state"], "completed");
    assert_eq!(first["counts"]["failed"], 5, "{first}");

    let (status, body) = api.post(&format!("/v1/jobs/{job}/retry-failed"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["requeued"], 5, "{body}");
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 25, "{done}");
    assert_eq!(done["counts"]["failed"], 0, "{done}");
    let copies = copies(&smtp);
    assert_eq!(copies.len(), 25);
    assert!(
        copies.values().all(|n| *n == 1),
        "delivered recipients were not sent again: {copies:?}"
    );
    // Nothing left to retry: requeues none.
    let (_, body) = api.post(&format!("/v1/jobs/{job}/retry-failed"), json!({})).await;
    assert_eq!(body["requeued"], 0, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_gives_one_job_per_request() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("i", "example.org", 5)).await;
    let path = format!("/v1/letters/{letter}/send");
    let key = [("Idempotency-Key", "launch-1")];
    let (status, headers, first) = api
        .post_with_headers(&path, &key, json!({ "concurrency": 2 }))
        .await;
    assert_eq!(status, 202, "{first}");
    assert!(headers.get("idempotent-replayed").is_none());
    // Same key, same request (keys in another order are the same JSON): the same job.
    let (status, headers, again) = api
        .post_with_headers(&path, &key, json!({ "concurrency": 2 }))
        .await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again["job_id"], first["job_id"]);
    // Same key, another request: refused.
    let (status, _, body) = api
        .post_with_headers(&path, &key, json!({ "concurrency": 3 }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );

    // Racing duplicates: never two jobs for one key.
    for round in 0..10 {
        let key = format!("race-{round}");
        let header = [("Idempotency-Key", key.as_str())];
        let (a, b) = tokio::join!(
            api.post_with_headers(&path, &header, json!({})),
            api.post_with_headers(&path, &header, json!({})),
        );
        let mut jobs = Vec::new();
        for (status, _, body) in [a, b] {
            match status {
                202 => jobs.push(body["job_id"].as_u64().unwrap()),
                409 => {}
                other => panic!("unexpected {other}: {body}"),
            }
        }
        assert!(!jobs.is_empty());
        assert!(jobs.windows(2).all(|w| w[0] == w[1]), "one job per key: {jobs:?}");
    }
    let (_, list) = api.get("/v1/jobs?limit=100").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 11, "{list}");
    let job = first["job_id"].as_u64().unwrap();
    api.wait_job(job, Duration::from_secs(30)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_send_waits_for_its_time() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("s", "example.org", 3)).await;
    // A fresh server compiles the built-in policies in the background; the send request
    // would wait for them, eating into the two seconds below.
    assert_eq!(api.compiled("default-template").await["status"], "ready");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let send_at = now + 2;
    let rfc3339 =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(send_at)).to_string();
    let (status, body) = api
        .post(
            &format!("/v1/letters/{letter}/send"),
            json!({ "send_at": rfc3339 }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["job"]["state"], "scheduled");
    assert_eq!(body["job"]["send_at"], send_at);
    let job = body["job_id"].as_u64().unwrap();
    let (_, scheduled) = api.get("/v1/jobs?state=scheduled").await;
    assert_eq!(scheduled["items"][0]["id"], job, "{scheduled}");
    // Nothing until shortly before send_at (the request itself may have waited for the
    // built-in policies' first compilation).
    let at = std::time::UNIX_EPOCH + Duration::from_secs(send_at);
    if let Ok(left) = (at - Duration::from_millis(200)).duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
        assert_eq!(smtp.count(), 0, "nothing before send_at");
    }
    let done = api
        .wait_for(job, Duration::from_secs(30), |j| j["state"] == "completed")
        .await;
    assert_eq!(done["counts"]["delivered"], 3);
    let first_arrival = smtp.received().iter().map(|m| m.at).min().unwrap();
    let arrived = std::time::SystemTime::now() - first_arrival.elapsed();
    assert!(arrived >= at, "sent before send_at");

    // Bad times are refused with the field named.
    let (status, body) = api
        .post(
            &format!("/v1/letters/{letter}/send"),
            json!({ "send_at": "tomorrow" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "send_at", "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_cap_holds_across_the_job() {
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(30)).await;
    let server = TestServer::with_smtp(&smtp, |config| {
        config.domain_limits.add("capped.example=2").unwrap();
    })
    .await;
    let api = &server.api;
    let mut list = emails("c", "capped.example", 30);
    list.extend(emails("f", "free.example", 30));
    let letter = letter_to(api, &list).await;
    let job = api.send(letter, json!({ "concurrency": 12 })).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 60, "{done}");
    let capped = smtp.most_open("capped.example");
    let free = smtp.most_open("free.example");
    eprintln!("most open transactions: capped.example {capped}, free.example {free}");
    assert!(capped <= 2, "capped.example had {capped} at once");
    assert!(
        free > 2,
        "the cap applies to capped.example only (free.example: {free})"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_rate_limit_spaces_the_messages() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |config| {
        let url = format!("{}?rate=20/s", smtp.url());
        config
            .transports
            .push(("metered".into(), letterbox::Config::smtp_url(url)));
    })
    .await;
    let api = &server.api;
    let letter = letter_to(api, &emails("r", "example.org", 30)).await;
    let (status, body) = api
        .post(
            &format!("/v1/letters/{letter}/send"),
            json!({ "transport": "nope" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("nope"), "{body}");

    let job = api
        .send(letter, json!({ "transport": "metered", "concurrency": 8 }))
        .await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 30, "{done}");
    let mut times: Vec<Instant> = smtp.received().iter().map(|m| m.at).collect();
    times.sort();
    let span = times[29] - times[0];
    // 30 messages at 20/s, evenly spaced: 29 gaps of 50 ms.
    assert!(span >= Duration::from_millis(1300), "30 messages in {span:?}");
    for window in times.windows(21) {
        assert!(
            window[20] - window[0] >= Duration::from_millis(900),
            "21 messages within {:?}",
            window[20] - window[0]
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_progress_until_the_end() {
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(5)).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("e", "example.org", 100)).await;
    let job = api.send(letter, json!({ "concurrency": 2 })).await;
    let (status, text) = api.get_text(&format!("/v1/jobs/{job}/events")).await;
    assert_eq!(status, 200);
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect();
    assert!(events.len() >= 2, "{text}");
    let (last_name, last) = events.last().unwrap();
    assert_eq!(*last_name, "end");
    assert_eq!(last["state"], "completed");
    assert_eq!(last["counts"]["delivered"], 100);
    assert!(events[..events.len() - 1].iter().all(|(n, _)| *n == "progress"));
    let delivered: Vec<u64> = events
        .iter()
        .map(|(_, j)| j["counts"]["delivered"].as_u64().unwrap())
        .collect();
    assert!(delivered.windows(2).all(|w| w[0] <= w[1]), "{delivered:?}");

    // The list, newest first, filtered by state; unknown states are named.
    let (_, list) = api.get("/v1/jobs?state=completed").await;
    assert_eq!(list["items"][0]["id"], job, "{list}");
    let (status, body) = api.get("/v1/jobs?state=sleeping").await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api.get(&format!("/v1/jobs/{job}/deliveries?state=lost")).await;
    assert_eq!(status, 422, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_dkim_signed_when_a_key_is_configured() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |config| {
        config.dkim = Some(letterbox::mail::DkimSettings {
            // An Ed25519 seed (32 bytes), base64.
            private_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            selector: "news2026".into(),
            domain: "example.com".into(),
        });
    })
    .await;
    let api = &server.api;
    let letter = letter_to(api, &emails("d", "example.org", 2)).await;
    let job = api.send(letter, json!({})).await;
    assert_eq!(
        api.wait_job(job, Duration::from_secs(30)).await["counts"]["delivered"],
        2
    );
    for message in smtp.received() {
        let signature = message.header("DKIM-Signature").expect("signed");
        assert!(signature.contains("d=example.com"), "{signature}");
        assert!(signature.contains("s=news2026"), "{signature}");
        assert!(signature.contains("list-unsubscribe-post"), "{signature}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_beyond_the_running_limit_wait_queued_and_running_ones_report_a_rate() {
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(5)).await;
    let server = TestServer::with_smtp(&smtp, |config| config.max_running_jobs = 1).await;
    let api = &server.api;
    let first = letter_to(api, &emails("a", "example.org", 150)).await;
    let second = letter_to(api, &emails("b", "example.org", 20)).await;
    let first = api.send(first, json!({ "concurrency": 2 })).await;
    let second = api.send(second, json!({})).await;
    // While the first runs, the second waits in `queued` with nothing sent.
    let running = api
        .wait_for(first, Duration::from_secs(30), |j| {
            j["state"] == "running" && j["counts"]["delivered"].as_u64().unwrap() >= 20
        })
        .await;
    let (_, waiting) = api.get(&format!("/v1/jobs/{second}")).await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    assert_eq!(waiting["counts"]["delivered"], 0, "{waiting}");
    assert!(
        running["rate_per_second"].as_f64().unwrap() > 0.0,
        "a running job reports its rate: {running}"
    );
    assert!(running["eta_seconds"].is_u64(), "{running}");
    let first_done = api.wait_job(first, Duration::from_secs(60)).await;
    let second_done = api.wait_job(second, Duration::from_secs(60)).await;
    assert_eq!(first_done["counts"]["delivered"], 150);
    assert_eq!(second_done["counts"]["delivered"], 20);
    // The slot is freed once the first job's end is recorded, not before.
    assert!(
        second_done["started_at"].as_u64() >= first_done["finished_at"].as_u64(),
        "the second started after the first finished"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_is_replaced_without_a_retry() {
    let smtp = SmtpServer::closing_after_each_message().await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("z", "example.org", 10)).await;
    // One attempt only: a stale connection must not cost the recipient anything.
    let send = json!({ "concurrency": 1, "retry": { "max_attempts": 1 } });
    let job = api.send(letter, send).await;
    let done = api.wait_job(job, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["delivered"], 10, "{done}");
    assert_eq!(smtp.count(), 10);
    assert!(smtp.connections() >= 10, "each message needed a new connection");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_pipelined_only_when_offered_and_the_message_arrives_intact() {
    // Lines starting with a dot must be dot-stuffed on the wire and arrive unchanged.
    let text = "Hi {{ email }}\n.hidden\n..two dots\n.\nend\n";
    for (smtp, offered) in [
        (SmtpServer::start().await, true),
        (SmtpServer::without_pipelining().await, false),
    ] {
        let server = TestServer::with_smtp(&smtp, |_| {}).await;
        let api = &server.api;
        let newsletter = api.newsletter().await;
        let people: Vec<_> = emails("p", "example.org", 20)
            .iter()
            .map(|e| json!({ "email": e }))
            .collect();
        api.add_subscribers(newsletter, json!(people)).await;
        let letter = api
            .letter(newsletter, json!({ "subject": "Dots", "text": text }))
            .await;
        let job = api.send(letter, json!({ "concurrency": 2 })).await;
        let done = api.wait_job(job, Duration::from_secs(30)).await;
        assert_eq!(done["counts"]["delivered"], 20, "{done}");
        let received = smtp.received();
        assert_eq!(received.len(), 20);
        for message in &received {
            let expected = format!(
                "Hi {}\r\n.hidden\r\n..two dots\r\n.\r\nend\r\n",
                message.recipients[0]
            );
            assert!(
                message.body().starts_with(&expected),
                "offered={offered}: {:?}",
                message.body()
            );
        }
        let (pipelined, unannounced) = smtp.pipelined();
        assert_eq!(unannounced, 0, "pipelined to a server that did not offer it");
        assert_eq!(pipelined, if offered { 20 } else { 0 }, "offered={offered}");
        server.stop().await;
    }
}

/// The value of the first sample of `name` whose labels include `labels`.
fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_deliveries_and_time_each_stage() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    let api = &server.api;
    let letter = letter_to(api, &emails("m", "example.org", 12)).await;
    let job = api.send(letter, json!({})).await;
    api.wait_job(job, Duration::from_secs(30)).await;

    let (status, text) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    // The recorder is process-wide and other tests send too: at least this job's.
    let delivered = sample(&text, "letterbox_deliveries_total", "outcome=\"delivered\"");
    assert!(delivered >= Some(12.0), "{text}");
    assert!(
        sample(&text, "letterbox_jobs", "state=\"completed\"") >= Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "letterbox_queue_depth", "").is_some(), "{text}");
    for histogram in [
        "letterbox_smtp_send_seconds_count",
        "letterbox_policy_evaluation_seconds_count",
        "letterbox_store_commit_seconds_count",
    ] {
        assert!(sample(&text, histogram, "") >= Some(1.0), "{histogram}: {text}");
    }
    assert!(
        text.contains("letterbox_smtp_send_seconds_bucket{transport=\"default\",outcome=\"ok\",le=\"0.01\"}"),
        "{text}"
    );
    // Not public by default; public when configured.
    let anonymous = crate::support::Api::with_token(api.base.clone(), None);
    assert_eq!(anonymous.get_text("/metrics").await.0, 401);
    server.stop().await;
    let public = TestServer::with_smtp(&smtp, |c| c.public_metrics = true).await;
    let anonymous = crate::support::Api::with_token(public.api.base.clone(), None);
    assert_eq!(anonymous.get_text("/metrics").await.0, 200);
    public.stop().await;
}
