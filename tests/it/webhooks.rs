//! Signed webhooks out, end to end: a real HTTP receiver on port 0, events from the log
//! POSTed to it and verified by the `standardwebhooks` package from PyPI as a receiver
//! would (`.ci/policy-tools` installs it), retries with the same `webhook-id`, the log
//! of attempts, an endpoint disabled with its reason and enabled again, test events,
//! and the SSRF guard (address literals, a name that resolves to loopback, redirects).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::support::process::{Home, spawn_node};
use crate::support::{Api, TestServer};

#[derive(Clone, Debug)]
struct Request {
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
    status: u16,
}

impl Request {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// An HTTP endpoint that records what it is sent and answers with `status` (a request
/// to `/flaky` fails its first two tries of each message; `/redirect` answers 302).
#[derive(Clone)]
struct Receiver {
    requests: Arc<Mutex<Vec<Request>>>,
    status: Arc<AtomicU16>,
    /// How long it takes to answer (ms), so that requests are in flight.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    addr: SocketAddr,
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let delay = receiver.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut requests = receiver.requests.lock().unwrap();
    let id = headers.get("webhook-id").cloned().unwrap_or_default();
    let before = requests
        .iter()
        .filter(|r| r.headers.get("webhook-id") == Some(&id))
        .count();
    let status = match path.as_str() {
        "flaky" if before < 2 => 500,
        "redirect" => 302,
        _ => receiver.status.load(Ordering::SeqCst),
    };
    requests.push(Request {
        path: path.clone(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        status,
    });
    let status = StatusCode::from_u16(status).unwrap();
    if status == StatusCode::FOUND {
        return (status, [("location", "/elsewhere")], "moved").into_response();
    }
    (status, format!("answer {}", status.as_u16())).into_response()
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            requests: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::default(),
            addr: listener.local_addr().unwrap(),
        };
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `done` holds of what was received.
    async fn wait(&self, what: &str, done: impl Fn(&[Request]) -> bool) -> Vec<Request> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            assert!(Instant::now() < deadline, "{what}: received {requests:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Verifies each request with the `standardwebhooks` package, as a receiver would.
fn verify_with_standardwebhooks(secret: &str, requests: &[Request]) {
    let input: Vec<Value> = requests
        .iter()
        .map(|r| json!({ "body": r.body, "headers": r.headers }))
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, requests = json.load(sys.stdin)
for r in requests:
    Webhook(secret).verify(r["body"], r["headers"])
print(len(requests))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (PATH=\"$(.ci/policy-tools):$PATH\")");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(json!([secret, input]).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks refused a request (is it installed? .ci/policy-tools does it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        requests.len().to_string()
    );
}

async fn webhook(api: &Api, body: Value) -> (u64, String) {
    let (status, created) = api.post("/v1/webhooks", body).await;
    assert_eq!(status, 201, "{created}");
    (
        created["webhook"]["id"].as_u64().unwrap(),
        created["secret"].as_str().unwrap().to_string(),
    )
}

async fn attempts(api: &Api, id: u64) -> Vec<Value> {
    let (status, page) = api.get(&format!("/v1/webhooks/{id}/deliveries")).await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().clone()
}

fn allow_private(c: &mut letterbox::Config) {
    c.webhook_allow_private = true;
    c.webhook_retry_delays = vec![Duration::from_millis(100), Duration::from_millis(200)];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_endpoint_signed_and_a_failure_is_retried_with_the_same_id() {
    let receiver = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    allow_private(&mut config);
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;

    let (id, secret) = webhook(
        api,
        json!({ "url": receiver.url("flaky"), "events": ["subscriber.*", "custom.*"], "description": "CRM" }),
    )
    .await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    let (_, shown) = api.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(
        (shown["state"].as_str(), shown.get("secret")),
        (Some("active"), None),
        "{shown}"
    );

    api.add_subscribers(
        newsletter,
        json!([{ "email": "ann@example.org" }, { "email": "bob@example.org" }]),
    )
    .await;
    let (status, posted) = api
        .post(
            "/v1/events",
            json!({ "type": "custom.purchase", "subscriber": "ann@example.org", "newsletter": newsletter, "data": { "sku": "b-1" } }),
        )
        .await;
    assert_eq!(status, 201, "{posted}");
    // Not subscribed to: a letter's job events.
    let letter = api
        .letter(newsletter, json!({ "subject": "Hi", "text": "Hi\r\n" }))
        .await;
    api.send(letter, json!({})).await;

    let requests = receiver
        .wait("three events delivered", |r| {
            r.iter().filter(|r| r.status == 200).count() == 3
        })
        .await;
    verify_with_standardwebhooks(&secret, &requests);
    // In the log's order (sends go concurrently, and retries overtake: no order is promised).
    let mut delivered: Vec<&Request> = requests.iter().filter(|r| r.status == 200).collect();
    delivered.sort_by_key(|r| r.json()["data"]["id"].as_u64());
    let types: Vec<String> = delivered
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        ["subscriber.created", "subscriber.created", "custom.purchase"]
    );
    for r in &delivered {
        let body = r.json();
        assert_eq!(r.id(), format!("evt_{}", body["data"]["id"]), "{body}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");
    }
    assert_eq!(delivered[2].json()["data"]["data"]["sku"], "b-1");
    // Each message was tried three times, with one id throughout.
    for r in &delivered {
        let tries: Vec<&Request> = requests.iter().filter(|o| o.id() == r.id()).collect();
        assert_eq!(
            tries.iter().map(|t| t.status).collect::<Vec<_>>(),
            [500, 500, 200],
            "{}",
            r.id()
        );
    }

    // The log: newest first, with status, latency, the answer and the next try.
    let log = attempts(api, id).await;
    assert_eq!(log.len(), 9, "{log:#?}");
    let failed: Vec<&Value> = log.iter().filter(|a| a["ok"] == false).collect();
    assert_eq!(failed.len(), 6);
    for a in &failed {
        assert_eq!(
            (a["status"].as_u64(), a["response"].as_str()),
            (Some(500), Some("answer 500")),
            "{a}"
        );
        assert!(a["next_attempt_ms"].as_u64().is_some(), "{a}");
    }
    assert!(
        log.iter()
            .filter(|a| a["ok"] == true)
            .all(|a| a.get("next_attempt_ms").is_none())
    );
    let (_, page) = api.get(&format!("/v1/webhooks/{id}/deliveries?limit=4")).await;
    let older = page["next"].as_u64().unwrap();
    let (_, rest) = api
        .get(&format!("/v1/webhooks/{id}/deliveries?before={older}"))
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 5, "{rest}");

    // A test event, signed like the rest.
    let (status, test) = api.post(&format!("/v1/webhooks/{id}/test"), json!({})).await;
    assert_eq!(status, 202, "{test}");
    let message_id = test["message_id"].as_str().unwrap().to_string();
    let requests = receiver
        .wait("the test delivered", |r| {
            r.iter().any(|r| r.id() == message_id && r.status == 200)
        })
        .await;
    let tests: Vec<Request> = requests.into_iter().filter(|r| r.id() == message_id).collect();
    assert_eq!(tests[0].json()["type"], "webhook.test");
    verify_with_standardwebhooks(&secret, &tests);

    // Bad input names the field.
    let (status, bad) = api
        .post(
            "/v1/webhooks",
            json!({ "url": "ftp://example.com/", "events": ["subscriber.*"] }),
        )
        .await;
    assert_eq!(
        (status, bad["errors"][0]["field"].as_str()),
        (422, Some("url")),
        "{bad}"
    );
    let (status, bad) = api
        .post(
            "/v1/webhooks",
            json!({ "url": receiver.url("x"), "events": ["subscriber.*"], "secret": "not-a-secret" }),
        )
        .await;
    assert_eq!(
        (status, bad["errors"][0]["field"].as_str()),
        (422, Some("secret")),
        "{bad}"
    );
    let (status, bad) = api
        .post(
            "/v1/webhooks",
            json!({ "url": receiver.url("x"), "events": ["nothing.here"] }),
        )
        .await;
    assert_eq!(status, 422, "{bad}");
    assert_eq!(api.get("/v1/webhooks/999").await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_throughout_is_disabled_with_the_reason_and_goes_on_when_enabled() {
    let receiver = Receiver::start().await;
    receiver.status.store(503, Ordering::SeqCst);
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    allow_private(&mut config);
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (id, secret) = webhook(
        api,
        json!({ "url": receiver.url("down"), "events": ["subscriber.created"], "secret": given }),
    )
    .await;
    assert_eq!(secret, given);
    api.add_subscribers(newsletter, json!([{ "email": "first@example.org" }]))
        .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let disabled = loop {
        let (_, hook) = api.get(&format!("/v1/webhooks/{id}")).await;
        if hook["state"] == "disabled" {
            break hook;
        }
        assert!(Instant::now() < deadline, "never disabled: {hook}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = disabled["disabled_reason"].as_str().unwrap();
    assert!(
        reason.contains("HTTP 503") && reason.contains("3 attempts"),
        "{reason}"
    );
    assert_eq!(receiver.requests().len(), 3);

    // While it is disabled, events wait for it.
    api.add_subscribers(newsletter, json!([{ "email": "second@example.org" }]))
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(receiver.requests().len(), 3, "nothing is sent while disabled");

    receiver.status.store(204, Ordering::SeqCst);
    let (status, enabled) = api
        .patch(&format!("/v1/webhooks/{id}"), json!({ "state": "active" }))
        .await;
    assert_eq!(status, 200, "{enabled}");
    assert_eq!(
        (enabled["state"].as_str(), enabled.get("disabled_reason")),
        (Some("active"), None)
    );
    let requests = receiver
        .wait("the waiting event delivered", |r| {
            r.iter().any(|r| r.status == 204)
        })
        .await;
    let emails: Vec<String> = requests
        .iter()
        .filter(|r| r.status == 204)
        .map(|r| r.json()["data"]["data"]["email"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        emails,
        ["second@example.org"],
        "the failed one stays failed; the waiting one goes"
    );
    verify_with_standardwebhooks(&secret, &requests);

    let (status, _) = api.delete(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(status, 204);
    assert_eq!(api.get(&format!("/v1/webhooks/{id}/deliveries")).await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_and_redirects_are_not_followed() {
    let receiver = Receiver::start().await;
    let server = TestServer::start(None).await;
    let api = &server.api;
    for url in [
        receiver.url("hook"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]:9/".to_string(),
        "http://10.0.0.1/".to_string(),
    ] {
        let (status, refused) = api
            .post("/v1/webhooks", json!({ "url": url, "events": ["*"] }))
            .await;
        assert_eq!(
            (status, refused["errors"][0]["field"].as_str()),
            (422, Some("url")),
            "{url}: {refused}"
        );
        assert!(
            refused.to_string().contains("--webhook-allow-private"),
            "{refused}"
        );
    }
    // A name is checked on the address it resolves to, when it is used.
    let by_name = format!("http://localhost:{}/hook", receiver.addr.port());
    let (id, _) = webhook(api, json!({ "url": by_name, "events": ["*"] })).await;
    api.post(&format!("/v1/webhooks/{id}/test"), json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let attempt = loop {
        if let Some(a) = attempts(api, id).await.into_iter().next() {
            break a;
        }
        assert!(Instant::now() < deadline, "no attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = attempt["error"].as_str().unwrap();
    assert!(
        error.contains("localhost resolves to") && error.contains("loopback"),
        "{attempt}"
    );
    assert!(receiver.requests().is_empty(), "nothing reached the receiver");
    server.stop().await;

    // With private addresses allowed, a redirect is still an answer, not followed.
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    allow_private(&mut config);
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let (id, _) = webhook(api, json!({ "url": receiver.url("redirect"), "events": ["*"] })).await;
    api.post(&format!("/v1/webhooks/{id}/test"), json!({})).await;
    receiver.wait("the redirect", |r| !r.is_empty()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let attempt = loop {
        if let Some(a) = attempts(api, id).await.into_iter().next() {
            break a;
        }
        assert!(Instant::now() < deadline, "no attempt");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (attempt["status"].as_u64(), attempt["ok"].as_bool()),
        (Some(302), Some(false)),
        "{attempt}"
    );
    let paths: Vec<String> = receiver.requests().iter().map(|r| r.path.clone()).collect();
    assert!(paths.iter().all(|p| p == "redirect"), "{paths:?}");
    server.stop().await;
}

/// Every event reaches the endpoint at least once across a kill -9 of the node with
/// sends in flight; a send made again carries the id it had, and every request, first
/// or again, verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_at_least_once_across_kill_9() {
    const N: usize = 300;
    let receiver = Receiver::start().await;
    receiver.delay_ms.store(20, Ordering::SeqCst);
    let home = Home::new().await;
    let args = ["--webhook-allow-private", "--lease", "2s"];
    let (mut node, api) = spawn_node(&home, &args);
    api.wait_healthy().await;
    let newsletter = api.newsletter().await;
    let (id, secret) = webhook(
        &api,
        json!({ "url": receiver.url("hook"), "events": ["subscriber.created"] }),
    )
    .await;
    let people: Vec<Value> = (0..N)
        .map(|i| json!({ "email": format!("w{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    // Killed with sends in flight: some arrived, not all.
    receiver.wait("the first sends", |r| r.len() >= N / 5).await;
    node.kill();
    let before = receiver.requests().len();
    assert!(before < N, "everything arrived before the kill ({before})");
    let (node, api) = spawn_node(&home, &args);
    api.wait_healthy().await;
    let requests = receiver
        .wait("every event", |r| {
            r.iter()
                .map(|r| r.id().to_string())
                .collect::<std::collections::HashSet<_>>()
                .len()
                == N
        })
        .await;
    verify_with_standardwebhooks(&secret, &requests);
    // Each id names one event, whatever attempt brought it.
    for r in &requests {
        assert_eq!(r.id(), format!("evt_{}", r.json()["data"]["id"]), "{}", r.body);
        assert_eq!(r.json()["type"], "subscriber.created");
    }
    let again = requests.len() - N;
    eprintln!(
        "{N} events, {} requests: {again} sent again after the kill",
        requests.len()
    );
    // At most what was in flight (32 at a time) comes twice.
    assert!(again <= 32, "{again} sent again");
    let (status, log) = api.get(&format!("/v1/webhooks/{id}/deliveries?limit=1000")).await;
    assert_eq!(status, 200, "{log}");
    drop(node);
}
