//! kill -9 in the middle of a send: the real `letterbox` binary is killed while it
//! delivers to a slow SMTP server, started again on the same data directory, and must
//! finish the job with every recipient served and re-sends within the documented bound.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::process::{Home, Server, letterbox_command, spawn_node};
use crate::support::{Api, SmtpServer};

const RECIPIENTS: usize = 600;
const CONCURRENCY: usize = 8;

/// Starts `letterbox serve` on port 0 and returns it with the API it listens on.
fn spawn_letterbox(home: &Home, smtp: &SmtpServer) -> (Server, Api) {
    spawn_node(
        home,
        &["--concurrency", &CONCURRENCY.to_string(), "--smtp", &smtp.url()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_send_loses_nobody_and_resends_within_the_bound() {
    // ~5 ms per message on top of SMTP round trips: the send takes seconds, so the kill
    // lands mid-send.
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(5)).await;
    let home = Home::new().await;

    let (mut child, api) = spawn_letterbox(&home, &smtp);
    api.wait_healthy().await;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..RECIPIENTS)
        .map(|i| json!({ "email": format!("r{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "Crash test", "text": "Hello {{ email }}\r\n" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({})).await;

    // Kill once a fifth of the list has arrived.
    let deadline = Instant::now() + Duration::from_secs(120);
    while smtp.count() < RECIPIENTS / 5 {
        assert!(Instant::now() < deadline, "send never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill(); // SIGKILL
    let at_kill = smtp.count();
    assert!(
        at_kill < RECIPIENTS,
        "the kill came after the send finished ({at_kill})"
    );

    let (_child, api) = spawn_letterbox(&home, &smtp);
    let done = api.wait_job(job, Duration::from_secs(180)).await;

    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], RECIPIENTS, "{done}");
    let mut copies: HashMap<String, usize> = HashMap::new();
    for message in smtp.received() {
        *copies.entry(message.recipients[0].clone()).or_default() += 1;
    }
    for i in 0..RECIPIENTS {
        assert!(
            copies.contains_key(&format!("r{i}@example.org")),
            "r{i} never got the letter"
        );
    }
    assert_eq!(copies.len(), RECIPIENTS);
    // A copy sent again after the crash carries the first copy's Message-ID.
    let mut ids: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for message in smtp.received() {
        ids.entry(message.recipients[0].clone())
            .or_default()
            .insert(message.header("Message-ID").unwrap());
    }
    assert!(
        ids.values().all(|set| set.len() == 1),
        "a re-sent copy changed its Message-ID"
    );
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let resent = done["resent_after_crash"].as_u64().unwrap() as usize;
    eprintln!("crash: killed at {at_kill}/{RECIPIENTS} received; {duplicates} duplicates, {resent} re-sent");
    // The documented bound (runner module docs): claimed and not yet recorded.
    let bound = CONCURRENCY + 2 * letterbox::runner::CLAIM_BATCH;
    assert!(resent <= bound, "{resent} re-sent > bound {bound}");
    assert!(
        duplicates <= resent,
        "every duplicate is one of the re-sent recipients"
    );
}

/// A graceful stop (what SIGTERM does) in the middle of a send: in-flight deliveries
/// finish and are recorded, so after a restart the job completes with no re-sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_mid_send_resumes_without_resending() {
    const N: usize = 200;
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(20)).await;
    let server = crate::support::TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..N)
        .map(|i| json!({ "email": format!("g{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "Graceful", "text": "Hi\r\n" });
    let letter = api.letter(newsletter, letter).await;
    let send = json!({ "concurrency": 4 });
    let job = api.send(letter, send).await;
    while smtp.count() < N / 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let server = server.restart().await;
    let at_stop = smtp.count();
    assert!(at_stop < N, "the stop came after the send finished");
    let done = server.api.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    assert_eq!(done["resent_after_crash"], 0, "{done}");
    let received = smtp.received();
    assert_eq!(
        received.len(),
        N,
        "every recipient exactly once (stopped at {at_stop})"
    );
    let unique: std::collections::HashSet<_> = received.iter().map(|m| m.recipients[0].clone()).collect();
    assert_eq!(unique.len(), N);
    server.stop().await;
}

/// A random number in `0..n` (test timing only; no need for a real generator).
fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % n.max(1)
}

/// The kill loop: SIGKILL the real binary at six random moments of one 5,000-recipient
/// send, restarting it each time, then stop it with SIGTERM mid-send (exit 0, nothing
/// re-sent after), and finish. Nobody is lost and re-sends stay within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loop_loses_nobody_and_resends_within_the_bound() {
    const N: usize = 5000;
    const KILLS: usize = 6;
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(10)).await;
    let home = Home::new().await;
    let (mut child, mut api) = spawn_letterbox(&home, &smtp);
    api.wait_healthy().await;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..N)
        .map(|i| json!({ "email": format!("k{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "Kill loop", "text": "Hello {{ email }}\r\n" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({})).await;

    let mut kills_at = Vec::new();
    for _ in 0..KILLS {
        let target = smtp.count() + 100 + random_below(400) as usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while smtp.count() < target {
            assert!(Instant::now() < deadline, "the send stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(random_below(30))).await;
        child.kill(); // SIGKILL
        kills_at.push(smtp.count());
        (child, api) = spawn_letterbox(&home, &smtp);
    }
    assert!(
        *kills_at.last().unwrap() < N,
        "all kills landed mid-send: {kills_at:?}"
    );
    // With PostgreSQL a killed node's claims go back once its lease expires: wait
    // until this node is the only one left (with redb it always is).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, nodes) = api.get("/v1/nodes").await;
        assert_eq!(status, 200, "{nodes}");
        if nodes.as_array().map_or(0, Vec::len) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "dead nodes never rescued: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resent_by_kills = api
        .wait_for(job, Duration::from_secs(60), |j| j["state"] == "running")
        .await["resent_after_crash"]
        .as_u64()
        .unwrap();

    // A graceful stop mid-send: exit 0, and the restart re-sends nothing.
    let target = smtp.count() + 200;
    while smtp.count() < target.min(N - 500) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "SIGTERM exits 0, got {exit}");
    let (_child, api) = spawn_letterbox(&home, &smtp);
    let done = api.wait_job(job, Duration::from_secs(180)).await;

    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    let resent = done["resent_after_crash"].as_u64().unwrap() as usize;
    assert_eq!(
        resent as u64, resent_by_kills,
        "the graceful stop re-sent nothing"
    );
    let mut copies: HashMap<String, usize> = HashMap::new();
    for message in smtp.received() {
        *copies.entry(message.recipients[0].clone()).or_default() += 1;
    }
    assert_eq!(copies.len(), N, "every recipient received the letter");
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let bound = CONCURRENCY + 2 * letterbox::runner::CLAIM_BATCH;
    eprintln!(
        "kill loop: kills at {kills_at:?}; {resent} re-sent, {duplicates} duplicates (bound {bound} per kill)"
    );
    assert!(resent <= KILLS * bound, "{resent} re-sent > {KILLS} x {bound}");
    assert!(duplicates <= resent, "every duplicate is one of the re-sent");
}

/// `--log-format json`: every line the binary logs is one JSON object, the request and
/// job spans included; `/readyz` answers once it listens; SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_readiness() {
    let home = Home::new().await;
    let mut child = letterbox_command(&home)
        .args(["--log-format", "json"])
        // tower-http logs each response at debug, inside the request's span.
        .env("LETTERBOX_LOG", "info,tower_http=debug")
        .spawn()
        .expect("spawn letterbox");
    let stdout = child.stdout.take().unwrap();
    let mut child = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let message = value["fields"]["message"].as_str().unwrap_or_default();
            if let Some(addr) = message.strip_prefix("listening on http://") {
                let _ = tx.send(addr.to_string());
            }
            lines.push(value);
        }
        lines
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("listen address logged");
    let api = Api::new(format!("http://{addr}"));
    let (status, body) = api.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(api.get("/healthz").await.0, 200);
    let newsletter = api.newsletter().await;
    assert!(newsletter > 0);

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.0.wait().unwrap().success(), "SIGTERM exits 0");
    let lines = reader.join().expect("every line was JSON");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    // The request that created the newsletter was logged inside its span.
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["name"] == "request" && l["span"]["path"] == "/v1/newsletters"),
        "no line carries a request span: {lines:?}"
    );
}
