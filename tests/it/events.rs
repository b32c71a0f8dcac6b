//! The event log through the API: what a send and a list's changes record, the user's
//! own events, filters and pages, the errors a typo gets, and the live stream that
//! resumes after `Last-Event-ID` across a restart and across a fleet's nodes.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::process::{Home, spawn_node};
use crate::support::{Api, SmtpServer, TestServer};

/// An SSE stream being read: its events as (id, type, data).
struct Sse {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Sse {
    async fn open(api: &Api, path: &str, last_event_id: Option<u64>) -> Sse {
        let id = last_event_id.map(|id| id.to_string());
        let headers: Vec<(&str, &str)> = id.iter().map(|id| ("last-event-id", id.as_str())).collect();
        let response = api.get_response(path, &headers).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` if the stream ended or nothing came within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<(u64, String, Value)> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                // Keep-alive comments carry no id.
                if let Some(id) = id {
                    return Some((id, kind, serde_json::from_str(&data).unwrap()));
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// The next `n` events, failing if they do not all come within `wait`.
    async fn take(&mut self, n: usize, wait: Duration) -> Vec<(u64, String, Value)> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(event) => out.push(event),
                None => panic!("got {} of {n} events: {out:?}", out.len()),
            }
        }
        out
    }
}

async fn events(api: &Api, query: &str) -> Value {
    let (status, body) = api.get(&format!("/v1/events{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn types(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_and_a_lists_changes_are_in_the_log_with_the_users_own_events() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    api.add_subscribers(
        newsletter,
        json!([{ "email": "ann@example.org" }, { "email": "bob@example.org" }]),
    )
    .await;
    let letter = api
        .letter(newsletter, json!({ "subject": "Hi", "text": "Hello\r\n" }))
        .await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    let posted = api
        .post_ok(
            "/v1/events",
            json!({ "type": "custom.purchase", "subscriber": "ann@EXAMPLE.org", "data": { "sku": "A-1" } }),
            201,
        )
        .await;
    assert_eq!(posted["type"], "custom.purchase");
    assert_eq!(posted["newsletter_id"], newsletter);

    let all = events(api, "").await;
    assert_eq!(
        types(&all),
        [
            "subscriber.created",
            "subscriber.created",
            "job.created",
            "job.started",
            "job.completed",
            "custom.purchase",
        ],
        "{all}"
    );
    assert_eq!(all["more"], false);
    assert_eq!(all["next"], posted["id"]);
    let completed = &all["events"][4];
    assert_eq!(completed["job_id"], job);
    assert_eq!(completed["data"]["counts"]["delivered"], 2);

    // Filters: types and prefixes, a subscriber by email, and pages.
    assert_eq!(
        types(&events(api, "?type=job.*").await),
        ["job.created", "job.started", "job.completed"]
    );
    let ann = events(api, "?subscriber=ann@example.org").await;
    assert_eq!(types(&ann), ["subscriber.created", "custom.purchase"]);
    assert_eq!(ann["events"][1]["data"]["sku"], "A-1");
    let first = events(api, "?limit=4").await;
    assert_eq!(
        (first["events"].as_array().unwrap().len(), &first["more"]),
        (4, &json!(true))
    );
    let rest = events(api, &format!("?after={}", first["next"])).await;
    assert_eq!(types(&rest), ["job.completed", "custom.purchase"]);

    // What a typo gets: a status and a body that names the problem.
    for (query, status, says) in [
        ("?type=job.complete", 422, "unknown event type `job.complete`"),
        (
            "?subscriber=nobody@example.org",
            404,
            "no subscriber has the email",
        ),
        ("?subscriber=ann", 422, "neither a subscriber id nor an email"),
        ("?limit=0", 422, "limit"),
        ("?after=-1", 400, "after"),
    ] {
        let (got, body) = api.get(&format!("/v1/events{query}")).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(says), "{query}: {body}");
    }
    for (body, status, says) in [
        (json!({ "type": "purchase" }), 422, "not a custom event type"),
        (
            json!({ "type": "custom.x", "subscriber": 999999 }),
            404,
            "subscriber 999999 not found",
        ),
        (
            json!({ "type": "custom.x", "subscriber": "bob@example.org", "newsletter": 99 }),
            404,
            "newsletter 99 not found",
        ),
        (
            json!({ "type": "custom.x", "data": { "big": "x".repeat(20_000) } }),
            422,
            "16 KiB",
        ),
        (json!({ "type": "custom.x", "colour": "red" }), 422, "colour"),
    ] {
        let (got, answer) = api.post("/v1/events", body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["detail"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }
    assert_eq!(
        events(api, "").await["events"].as_array().unwrap().len(),
        6,
        "refusals wrote nothing"
    );

    // An erasure leaves the events' types and ids, not the person.
    let (status, _) = api
        .delete(&format!("/v1/subscribers/{}", ann["events"][0]["subscriber_id"]))
        .await;
    assert_eq!(status, 204);
    let text = events(api, "").await.to_string();
    assert!(
        !text.contains("ann@example.org") && !text.contains("A-1"),
        "{text}"
    );
    assert!(text.contains("subscriber.erased"));
    server.stop().await;
}

/// A client following the stream is ended by a graceful stop (which must not wait for
/// it), and picks up after its Last-Event-ID from the restarted server: every event
/// once, in order, none missed while it was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_resumes_after_last_event_id_across_a_restart() {
    let server = TestServer::start(None).await;
    let post = |api: Api, i: usize| async move {
        api.post_ok(
            "/v1/events",
            json!({ "type": "custom.tick", "data": { "i": i } }),
            201,
        )
        .await["id"]
            .as_u64()
            .unwrap()
    };
    for i in 0..3 {
        post(server.api.clone(), i).await;
    }
    let mut stream = Sse::open(&server.api, "/v1/events/stream?type=custom.*", None).await;
    let got = stream.take(3, Duration::from_secs(10)).await;
    // Live: events committed while the client waits arrive at once.
    let live = post(server.api.clone(), 3).await;
    let next = stream.take(1, Duration::from_secs(5)).await;
    assert_eq!(next[0].0, live);
    let last_seen = next[0].0;

    let stopping = Instant::now();
    let server = tokio::time::timeout(Duration::from_secs(20), server.restart())
        .await
        .expect("a graceful stop does not wait for an open event stream");
    assert!(stopping.elapsed() < Duration::from_secs(20));
    assert_eq!(
        stream.next(Duration::from_secs(5)).await,
        None,
        "the stream ended"
    );
    for i in 4..6 {
        post(server.api.clone(), i).await;
    }
    let mut stream = Sse::open(&server.api, "/v1/events/stream?type=custom.*", Some(last_seen)).await;
    let resumed = stream.take(2, Duration::from_secs(10)).await;
    let ticks: Vec<u64> = got
        .iter()
        .chain(&next)
        .chain(&resumed)
        .map(|(_, kind, data)| {
            assert_eq!(kind, "custom.tick");
            data["data"]["i"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(ticks, [0, 1, 2, 3, 4, 5]);
    assert!(resumed[0].0 > last_seen);
    assert_eq!(
        stream.next(Duration::from_millis(500)).await,
        None,
        "nothing more"
    );
    let refused = server
        .api
        .get_response("/v1/events/stream", &[("last-event-id", "yesterday")])
        .await;
    let status = refused.status();
    let body = refused.text().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Last-Event-ID"), "{status}: {body}");
    server.stop().await;
}

/// Two nodes of a fleet: a client streaming from one hears, in order and within about
/// a second, the events posted on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_one_node_hears_what_another_node_records() {
    if std::env::var("LETTERBOX_TEST_BACKEND").as_deref() != Ok("postgres") {
        eprintln!("skipped: a fleet needs the PostgreSQL pass (LETTERBOX_TEST_BACKEND=postgres)");
        return;
    }
    let first = Home::new().await;
    let second = Home {
        data: tempfile::tempdir().unwrap(),
        database: first.database.clone(),
    };
    let (_a, a) = spawn_node(&first, &[]);
    let (_b, b) = spawn_node(&second, &[]);
    let mut stream = Sse::open(&a, "/v1/events/stream", None).await;
    let started = Instant::now();
    let mut posted = Vec::new();
    for i in 0..20 {
        let api = if i % 2 == 0 { &b } else { &a };
        let event = api
            .post_ok(
                "/v1/events",
                json!({ "type": "custom.tick", "data": { "i": i } }),
                201,
            )
            .await;
        posted.push(event["id"].as_u64().unwrap());
    }
    let got = stream.take(20, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), posted);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Retention prunes a backlog while a send runs: the events older than
/// `--event-retention` go in small batches between the send's commits, the send goes on
/// meanwhile (nobody lost, nobody twice), and the log's ids go on after the pruned ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_a_backlog_while_a_send_runs() {
    const BACKLOG: usize = 100_000;
    const PEOPLE: usize = 3_000;
    // 10 ms a message at concurrency 4: the send lasts several seconds.
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(10)).await;
    let server = TestServer::with_smtp(&smtp, |_| {}).await;
    // A backlog: a subscriber.created event for each person of another list.
    server.api.letter_to_many("old", BACKLOG).await;
    let letter = server.api.letter_to_many("keep", PEOPLE).await;
    let first_created = |page: &Value| page["events"][0]["id"].as_u64();
    let (_, page) = server.api.get("/v1/events?type=subscriber.created&limit=1").await;
    let oldest = first_created(&page).expect("a backlog");
    let job = server.api.send(letter, json!({ "concurrency": 4 })).await;
    server
        .api
        .wait_for(job, Duration::from_secs(60), |view| {
            view["counts"]["delivered"].as_u64() > Some(0)
        })
        .await;
    // Restarted with a retention every event so far has outlived: its first
    // housekeeping round meets the backlog while the job resumes.
    let server = server
        .restart_with(|config| config.event_retention = Duration::from_millis(100))
        .await;
    let api = &server.api;
    let mut samples = Vec::new();
    loop {
        let (_, page) = api.get("/v1/events?type=subscriber.created&limit=1").await;
        let (_, view) = api.get(&format!("/v1/jobs/{job}")).await;
        let delivered = view["counts"]["delivered"].as_u64().unwrap();
        samples.push((first_created(&page), delivered));
        if view["state"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Pruning and sending overlapped: between two samples both moved on.
    let overlapped = samples.windows(2).any(|w| {
        let ((pruned_to_a, sent_a), (pruned_to_b, sent_b)) = (w[0], w[1]);
        pruned_to_a.is_some_and(|a| pruned_to_b.is_none_or(|b| b > a)) && sent_b > sent_a
    });
    assert!(overlapped, "{samples:?}");
    assert!(samples[0].0.is_some_and(|id| id >= oldest));
    // The whole backlog went; the send lost nobody and sent nobody twice.
    let (_, page) = api.get("/v1/events?type=subscriber.created&limit=1").await;
    assert_eq!(page["events"], json!([]), "{page}");
    let (_, view) = api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(view["counts"]["delivered"], PEOPLE, "{view}");
    let received = smtp.received();
    let distinct: std::collections::HashSet<_> = received.iter().map(|m| m.recipients[0].clone()).collect();
    assert_eq!((distinct.len(), received.len()), (PEOPLE, PEOPLE));
    // New events get ids after the pruned ones.
    let posted = api
        .post_ok("/v1/events", json!({ "type": "custom.after", "data": {} }), 201)
        .await;
    assert!(
        posted["id"].as_u64().unwrap() > oldest + (BACKLOG + PEOPLE) as u64,
        "{posted}"
    );
    server.stop().await;
}
