//! A failing store is a state that heals: the database stopped mid-send (PostgreSQL
//! pass), the data disk full mid-send (redb pass, as root: a small tmpfs). Meanwhile
//! deliveries stop claiming, `/readyz` answers 503 and `/metrics` says the store is
//! down; once the store answers again the job goes on by itself, with no restart,
//! nobody lost, and no re-send beyond what was in flight.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::disk::{Mount, fill};
use crate::support::pg::PgCluster;
use crate::support::process::{Home, Server, spawn_node};
use crate::support::{Api, SmtpServer};

const CONCURRENCY: usize = 8;

/// What one node can have claimed and not recorded: all that can be sent twice.
fn bound() -> usize {
    CONCURRENCY + 2 * letterbox::runner::CLAIM_BATCH
}

fn backend_is_postgres() -> bool {
    std::env::var("LETTERBOX_TEST_BACKEND").as_deref() == Ok("postgres")
}

async fn wait_count(smtp: &SmtpServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while smtp.count() < n {
        assert!(Instant::now() < deadline, "the send never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `/readyz` until it answers `status`; returns its body.
async fn wait_ready(api: &Api, status: u16, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, body) = api.get("/readyz").await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status}: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the job until it is completed, however often the server answers 503 first.
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

/// Everyone got the letter, and every copy of one recipient's letter had one
/// Message-ID; returns how many copies were sent twice.
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

/// What `send_on_own_cluster` starts.
struct Sending {
    cluster: PgCluster,
    smtp: SmtpServer,
    _home: Home,
    _node: Server,
    api: Api,
    job: u64,
}

/// A send of `n` recipients under way on one real node, on a PostgreSQL cluster of the
/// test's own (so the test may stop it), once `started` messages are out. `None`
/// outside the PostgreSQL pass.
async fn send_on_own_cluster(prefix: &str, n: usize, started: usize) -> Option<Sending> {
    if !backend_is_postgres() {
        eprintln!("skipped: stopping or changing PostgreSQL is the PostgreSQL pass's test");
        return None;
    }
    let cluster = PgCluster::start()?;
    let url = letterbox::store::postgres::scratch_database(&cluster.admin_url())
        .await
        .unwrap();
    let home = Home {
        data: tempfile::tempdir().unwrap(),
        database: Some(url),
    };
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(5)).await;
    let smtp_url = smtp.url();
    let (node, api) = spawn_node(&home, &["--smtp", &smtp_url, "--concurrency", "8"]);
    api.wait_healthy().await;
    let letter = api.letter_to_many(prefix, n).await;
    let job = api.send(letter, json!({})).await;
    wait_count(&smtp, started).await;
    Some(Sending {
        cluster,
        smtp,
        _home: home,
        _node: node,
        api,
        job,
    })
}

/// PostgreSQL stops (as a crash would: `pg_ctl -m immediate`) for about 8 s in the
/// middle of a send, then starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_goes_on_by_itself_after_the_database_was_down() {
    const N: usize = 4000;
    // Every field bound (none left to `..`), so the node and its home live to the end.
    let Some(Sending {
        cluster,
        smtp,
        _home,
        _node,
        api,
        job,
    }) = send_on_own_cluster("d", N, 500).await
    else {
        return;
    };

    cluster.stop();
    let down = Instant::now();
    let why = wait_ready(&api, 503, Duration::from_secs(10)).await;
    assert!(why["detail"].as_str().unwrap_or("").contains("store"), "{why}");
    let (status, metrics) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "/metrics is served while the store is down");
    assert!(metrics.contains("letterbox_store_up 0"), "{metrics}");
    let (status, body) = api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("unavailable"),
        "{body}"
    );
    // The node's lease (2 s) goes stale within 1.5 s of its last heartbeat: after that
    // it sends nothing, whatever it had claimed.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down.elapsed())).await;
    let quiet_from = smtp.count();
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(down.elapsed())).await;
    let quiet_to = smtp.count();
    assert_eq!(quiet_from, quiet_to, "nothing is sent while the database is down");
    assert!(quiet_to < N, "the outage came after the send finished");

    cluster.start_again();
    let back = Instant::now();
    let done = wait_completed(&api, job, Duration::from_secs(120)).await;
    let healed = back.elapsed();
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    assert!(done["stalled"].is_null(), "{done}");
    wait_ready(&api, 200, Duration::from_secs(10)).await;
    let duplicates = check_copies(&smtp, N);
    let resent = done["resent_after_crash"].as_u64().unwrap() as usize;
    eprintln!(
        "database down {:.1} s at {quiet_to} of {N} sent; completed {:.1} s after it was back; \
         {resent} re-sent, {duplicates} duplicates (bound {})",
        (back - down).as_secs_f64(),
        healed.as_secs_f64(),
        bound()
    );
    assert!(resent <= bound(), "{resent} re-sent > {}", bound());
    assert!(duplicates <= resent, "every duplicate is one of the re-sent");
}

/// The data disk (a small tmpfs) fills in the middle of a send, and is freed again
/// three seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_goes_on_by_itself_after_the_disk_was_full() {
    const N: usize = 20_000;
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
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(1)).await;
    let smtp_url = smtp.url();
    let (_node, api) = spawn_node(&home, &["--smtp", &smtp_url, "--concurrency", "8"]);
    api.wait_healthy().await;
    let letter = api.letter_to_many("f", N).await;
    let job = api.send(letter, json!({})).await;
    wait_count(&smtp, 1000).await;

    let filler = home.data.path().join("filler");
    let filled = fill(&filler);
    let full_at = smtp.count();
    let why = wait_ready(&api, 503, Duration::from_secs(30)).await;
    assert!(why["detail"].as_str().unwrap_or("").contains("store"), "{why}");
    // While the disk is full: what was claimed may still go out (its outcome waits to be
    // recorded), nothing more is claimed; the job shows why, when it can be read.
    let mut stalled = None;
    let mut store_down_seen = false;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (status, body) = api.get(&format!("/v1/jobs/{job}")).await;
        match status {
            200 if !body["stalled"].is_null() => stalled = Some(body["stalled"].clone()),
            200 | 503 => {}
            _ => panic!("GET /v1/jobs/{job} on a full disk: {status} {body}"),
        }
        let (status, metrics) = api.get_text("/metrics").await;
        assert_eq!(status, 200, "/metrics is served on a full disk");
        store_down_seen |= metrics.contains("letterbox_store_up 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Between failed writes a small one may fit in pages redb has free, so these
    // are seen some of the time, not all of it.
    assert!(store_down_seen, "/metrics never said letterbox_store_up 0");
    assert!(stalled.is_some(), "the job never showed it was stalled");
    // What was claimed before the disk filled goes out (at most `bound`). A commit
    // that fits in pages redb already holds can still succeed on a full disk and let
    // one more claim through, so allow a second window's worth, no more.
    let sent_while_full = smtp.count() - full_at;
    assert!(
        sent_while_full <= 2 * bound(),
        "{sent_while_full} sent on a full disk > {}",
        2 * bound()
    );

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let done = wait_completed(&api, job, Duration::from_secs(180)).await;
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    wait_ready(&api, 200, Duration::from_secs(10)).await;
    let duplicates = check_copies(&smtp, N);
    let resent = done["resent_after_crash"].as_u64().unwrap() as usize;
    eprintln!(
        "disk full ({} MiB of filler) at {full_at} of {N} sent; {sent_while_full} sent while full; \
         stalled: {stalled:?}; completed {:.1} s after the disk was freed; {resent} re-sent, \
         {duplicates} duplicates (bound {})",
        filled >> 20,
        freed.elapsed().as_secs_f64(),
        bound()
    );
    assert!(resent <= bound(), "{resent} re-sent > {}", bound());
    assert!(duplicates <= resent, "every duplicate is one of the re-sent");
}

/// Runs SQL statements on the cluster as its superuser, one at a time (ALTER SYSTEM
/// refuses to run inside a transaction, which several statements in one go would be).
async fn admin_sql(url: &str, statements: &[&str]) {
    let (client, driver) = letterbox::store::postgres::connect(url).await.unwrap();
    for sql in statements {
        client.simple_query(sql).await.unwrap();
    }
    drop(client);
    let _ = driver.await;
}

/// PostgreSQL answers reads but refuses writes for a few seconds (as a standby does
/// until it is promoted): the job shows it is stalled and why, `/readyz` says 503,
/// and once writes are accepted again the job goes on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_goes_on_by_itself_after_the_database_was_read_only() {
    const N: usize = 3000;
    // Every field bound (none left to `..`), so the node and its home live to the end.
    let Some(Sending {
        cluster,
        smtp,
        _home,
        _node,
        api,
        job,
    }) = send_on_own_cluster("r", N, 300).await
    else {
        return;
    };
    let admin = cluster.admin_url();

    // Every session, the pooled ones included, takes the new default at the reload.
    admin_sql(
        &admin,
        &[
            "ALTER SYSTEM SET default_transaction_read_only = on",
            "SELECT pg_reload_conf()",
        ],
    )
    .await;
    let why = wait_ready(&api, 503, Duration::from_secs(10)).await;
    assert!(
        why["detail"].as_str().unwrap_or("").contains("read-only"),
        "{why}"
    );
    // Reads work: the job can be seen, stalled, with the database's reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stalled = loop {
        let (status, body) = api.get(&format!("/v1/jobs/{job}")).await;
        assert_eq!(status, 200, "reads work on a read-only database: {body}");
        if !body["stalled"].is_null() {
            break body["stalled"].clone();
        }
        assert!(Instant::now() < deadline, "the job never showed a stall: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        stalled["reason"].as_str().unwrap().contains("read-only"),
        "{stalled}"
    );
    assert_eq!(api.get(&format!("/v1/jobs/{job}")).await.1["state"], "running");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = smtp.count();
    assert!(during < N, "the send finished before the database was read-only");

    admin_sql(
        &admin,
        &[
            "SET default_transaction_read_only = off",
            "ALTER SYSTEM RESET default_transaction_read_only",
            "SELECT pg_reload_conf()",
        ],
    )
    .await;
    let done = wait_completed(&api, job, Duration::from_secs(120)).await;
    assert_eq!(done["counts"]["delivered"], N, "{done}");
    assert!(done["stalled"].is_null(), "{done}");
    wait_ready(&api, 200, Duration::from_secs(10)).await;
    let duplicates = check_copies(&smtp, N);
    let resent = done["resent_after_crash"].as_u64().unwrap() as usize;
    eprintln!(
        "read-only database at {during} of {N} sent; stalled: {stalled}; {resent} re-sent, \
         {duplicates} duplicates (bound {})",
        bound()
    );
    assert!(resent <= bound(), "{resent} re-sent > {}", bound());
    assert!(duplicates <= resent, "every duplicate is one of the re-sent");
}

/// An idle server heals too: a write that fails on a full disk (redb then refuses
/// everything until it is opened again) and no write after it; once the disk is freed,
/// reads and `/readyz` come back by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_heals_after_a_write_failed_on_a_full_disk() {
    if backend_is_postgres() {
        eprintln!("skipped: a full redb disk is the redb pass's test");
        return;
    }
    let home = Home {
        data: tempfile::tempdir().unwrap(),
        database: None,
    };
    let Some(_mount) = Mount::tmpfs(home.data.path(), "64m") else {
        return;
    };
    let (_node, api) = spawn_node(&home, &[]);
    api.wait_healthy().await;
    let newsletter = api.newsletter().await;

    let filler = home.data.path().join("filler");
    fill(&filler);
    // Enough subscribers that the write needs pages redb does not have.
    let people: Vec<_> = (0..20_000)
        .map(|i| json!({ "email": format!("idle{i}@example.org"), "name": "x".repeat(200) }))
        .collect();
    let (status, body) = api
        .post(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            json!(people),
        )
        .await;
    assert_eq!(status, 503, "a write on a full disk: {body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("unavailable"),
        "{body}"
    );
    // The store tries to recover by itself (reopen, a small write); whether a small
    // write fits depends on the pages redb has free, so /readyz may say either.
    let (ready_while_full, _) = api.get("/readyz").await;

    std::fs::remove_file(&filler).unwrap();
    // No write from here on: the store must come back by itself.
    wait_ready(&api, 200, Duration::from_secs(15)).await;
    let (status, body) = api.get(&format!("/v1/newsletters/{newsletter}")).await;
    assert_eq!(status, 200, "{body}");
    let (status, page) = api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        0,
        "the failed import left nothing"
    );
    eprintln!("idle server on a full disk: /readyz {ready_while_full} while full, 200 after");
}
