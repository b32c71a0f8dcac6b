//! Nothing outside the store takes letterbox down. The real binary with its log on a
//! pipe whose reader exits, and with its log on the disk that fills under its data;
//! panics injected into a request, the store's writer and a job's supervisor (the
//! in-process server, `letterbox::faults`). Each time: every request gets an HTTP
//! answer, the send completes by itself, and nobody is lost.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use letterbox::faults::Point;
use serde_json::{Value, json};

use crate::support::disk::{Mount, fill};
use crate::support::process::{Home, spawn_with_output};
use crate::support::{Api, SmtpServer, TestServer};

fn backend_is_postgres() -> bool {
    std::env::var("LETTERBOX_TEST_BACKEND").as_deref() == Ok("postgres")
}

/// Everyone got the letter, each copy of one recipient's letter with one Message-ID;
/// returns how many were sent twice.
fn check_copies(smtp: &SmtpServer, n: usize) -> usize {
    let mut copies: HashMap<String, Vec<Option<String>>> = HashMap::new();
    for message in smtp.received() {
        copies
            .entry(message.recipients[0].clone())
            .or_default()
            .push(message.header("Message-ID"));
    }
    assert_eq!(copies.len(), n, "every recipient received the letter");
    for (to, ids) in &copies {
        let distinct: HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 1, "{to}: one Message-ID for every copy: {ids:?}");
    }
    copies.values().map(|c| c.len() - 1).sum()
}

/// What one node can have claimed and not recorded: all that can be sent twice.
fn bound(concurrency: usize) -> usize {
    concurrency + 2 * letterbox::runner::CLAIM_BATCH
}

/// `letterbox_log_lines_dropped_total` as `/metrics` shows it.
async fn dropped_lines(api: &Api) -> u64 {
    let (status, text) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("letterbox_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no letterbox_log_lines_dropped_total in /metrics:\n{text}")) as u64
}

/// Polls the job until it is completed; every poll must get an HTTP answer (the
/// client panics on a connection closed without one), 200 or 503.
async fn wait_completed(api: &Api, job: u64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = api.get(&format!("/v1/jobs/{job}")).await;
        if status == 200 && body["state"] == "completed" {
            return body;
        }
        assert!(
            status == 200 || status == 503,
            "GET /v1/jobs/{job}: {status} {body}"
        );
        assert!(
            Instant::now() < deadline,
            "job {job} did not complete: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `letterbox serve 2>&1 | head -2`: the log's reader exits after two lines. The server
/// keeps answering, a send completes, and the lines it could not write are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_whose_reader_exits_does_not_stop_the_server() {
    const N: usize = 500;
    let home = Home::new().await;
    let (reader, writer) = std::io::pipe().unwrap();
    let smtp = SmtpServer::start().await;
    let (node, api) = spawn_with_output(
        &home,
        &["--smtp", &smtp.url()],
        Stdio::from(writer.try_clone().unwrap()),
        Stdio::from(writer),
    )
    .await;
    // `head -2`: two lines, then the reader is gone (the test holds no writing end).
    let mut lines = BufReader::new(reader).lines();
    for _ in 0..2 {
        let line = lines.next().expect("the server logs").unwrap();
        // A pipe is not a terminal: no colour escapes for the reader to strip.
        assert!(!line.contains('\x1b'), "colour written to a pipe: {line:?}");
    }
    drop(lines);

    let letter = api.letter_to_many("pipe", N).await;
    let job = api.send(letter, json!({})).await;
    let done = wait_completed(&api, job, Duration::from_secs(120)).await;
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    assert_eq!(check_copies(&smtp, N), 0);
    let (status, body) = api.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let dropped = dropped_lines(&api).await;
    assert!(dropped > 0, "the lines written after the reader left are counted");
    drop(node);
    eprintln!("closed log pipe: {N} sent, {dropped} log lines dropped");
}

/// The log is a file on the disk that holds the data directory (`serve >
/// letterbox.log` beside it). The disk fills in the middle of a send and is freed: the
/// job completes by itself, nobody is lost, every request gets an HTTP answer, and the
/// log says how many lines it lost once it can write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_log_and_the_data_heals_by_itself() {
    const N: usize = 8000;
    const CONCURRENCY: usize = 8;
    if backend_is_postgres() {
        eprintln!("skipped: a full redb disk is the redb pass's test");
        return;
    }
    let home = Home {
        data: tempfile::tempdir().unwrap(),
        database: None,
    };
    let Some(_mount) = Mount::tmpfs(home.data.path(), "96m") else {
        return;
    };
    let log_path = home.data.path().join("letterbox.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(1)).await;
    let (_node, api) = spawn_with_output(
        &home,
        &["--smtp", &smtp.url(), "--concurrency", "8"],
        Stdio::from(log.try_clone().unwrap()),
        Stdio::from(log),
    )
    .await;
    let letter = api.letter_to_many("full", N).await;
    let job = api.send(letter, json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while smtp.count() < 500 {
        assert!(Instant::now() < deadline, "the send never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let filler = home.data.path().join("filler");
    fill(&filler);
    let full_at = smtp.count();
    // Every request gets an answer while the disk is full (the client panics on a
    // connection closed without one): a read, a write, /readyz.
    let mut answers: HashMap<u16, usize> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(4);
    let newsletter = json!({"name": "While full", "from": "a@example.com"});
    while Instant::now() < until {
        for (status, _) in [
            api.get(&format!("/v1/jobs/{job}")).await,
            api.post("/v1/newsletters", newsletter.clone()).await,
            api.get("/readyz").await,
        ] {
            *answers.entry(status).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped_while_full = dropped_lines(&api).await;

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let done = wait_completed(&api, job, Duration::from_secs(120)).await;
    let healed = freed.elapsed();
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    let duplicates = check_copies(&smtp, N);
    let resent = done["resent_after_crash"].as_u64().unwrap() as usize;
    assert!(resent <= bound(CONCURRENCY), "{resent} re-sent");
    assert!(duplicates <= resent, "every duplicate is one of the re-sent");
    assert!(
        dropped_while_full > 0,
        "log lines were lost on the full disk, and counted"
    );
    assert!(
        answers.keys().all(|s| [200, 201, 503].contains(s)),
        "answers while full: {answers:?}"
    );
    // The log can be written again, and says what it lost.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        api.get("/healthz").await;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("log line(s) could not be written") {
            break;
        }
        assert!(Instant::now() < deadline, "the log never noted its lost lines");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "log and data on one full disk at {full_at} of {N} sent; answers while full {answers:?}; \
         {dropped_while_full} log lines dropped; completed {:.1} s after the disk was freed; \
         {resent} re-sent, {duplicates} duplicates",
        healed.as_secs_f64()
    );
}

/// A panic while handling a request is that request's 500 (problem+json), for a
/// request handled in its own task and for a CSV import handled inline; the server
/// answers the next request as usual.
#[tokio::test]
async fn a_panic_in_a_request_is_a_500_and_the_server_lives_on() {
    let data = tempfile::tempdir().unwrap();
    let config = letterbox::Config::new(data.path());
    let faults = config.faults.clone();
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;

    faults.arm(Point::Request, 1);
    let (status, body) = api.get(&format!("/v1/newsletters/{newsletter}")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        body["type"], "https://letterbox.invalid/problems/internal",
        "{body}"
    );
    assert_eq!(body["detail"], "internal error", "nothing internal leaks: {body}");

    faults.arm(Point::Request, 1);
    let csv = b"email\nada@example.org\n".to_vec();
    let (status, body) = api
        .post_raw(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            "text/csv",
            csv,
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        body["type"], "https://letterbox.invalid/problems/internal",
        "{body}"
    );

    let (status, body) = api.get(&format!("/v1/newsletters/{newsletter}")).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// The store's writer panics twice in the middle of a send (after applying a batch,
/// before committing it): it is started again, the operations it dropped are retried,
/// and the job completes with everybody sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_store_writer_restarts_it_and_loses_nothing() {
    const N: usize = 3000;
    if backend_is_postgres() {
        eprintln!("skipped: the store's writer thread is redb's");
        return;
    }
    let smtp = SmtpServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(smtp.url()));
    let faults = config.faults.clone();
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let letter = api.letter_to_many("writer", N).await;
    let job = api.send(letter, json!({"concurrency": 8})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while smtp.count() < 300 {
        assert!(Instant::now() < deadline, "the send never got going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    faults.arm(Point::StoreWriter, 2);
    let done = wait_completed(api, job, Duration::from_secs(120)).await;
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    let duplicates = check_copies(&smtp, N);
    assert!(duplicates <= bound(8), "{duplicates} duplicates");
    // The writer works: a write after the send.
    let (status, body) = api
        .post(
            "/v1/newsletters",
            json!({"name": "After", "from": "a@example.com"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// A job's supervisor panics with deliveries in flight: it is started again and the job
/// completes, nobody lost; one that keeps panicking pauses the job with the reason,
/// and a resume finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_job_supervisor_is_restarted_and_one_that_keeps_crashing_pauses_its_job() {
    const N: usize = 2000;
    let smtp = SmtpServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(smtp.url()));
    let faults = config.faults.clone();
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;

    let letter = api.letter_to_many("sup", N).await;
    faults.arm(Point::JobSupervisor, 1);
    let job = api.send(letter, json!({"concurrency": 8})).await;
    let done = wait_completed(api, job, Duration::from_secs(120)).await;
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    let duplicates = check_copies(&smtp, N);
    assert!(duplicates <= bound(8), "{duplicates} duplicates");

    // Four crashes within a minute: the job pauses, saying why.
    let letter = api.letter_to_many("again", 300).await;
    faults.arm(Point::JobSupervisor, 4);
    let job = api.send(letter, json!({"concurrency": 8})).await;
    let paused = api
        .wait_for(job, Duration::from_secs(60), |j| j["state"] == "paused")
        .await;
    let reason = paused["pause_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("supervisor crashed"), "{paused}");
    let (status, body) = api.post(&format!("/v1/jobs/{job}/resume"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let done = wait_completed(api, job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 300, "{done}");
    server.stop().await;
}
