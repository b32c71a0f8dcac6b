//! `letterbox migrate`: a single-node installation (the real binary on redb) moves into
//! an empty PostgreSQL database and goes on as a fleet: the same jobs, subscribers and
//! counts, unsubscribe links sent before the move still work, idempotency keys still
//! replay, and new ids follow the old ones; then back from the database into a data
//! directory, once no node runs on it. Runs in the PostgreSQL pass.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::SmtpServer;
use crate::support::process::{Home, signal, spawn_node, spawn_node_logged};

fn migrate(from: impl AsRef<std::ffi::OsStr>, to: &str) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_letterbox"))
        .arg("migrate")
        .arg("--from")
        .arg(from)
        .args(["--to", to])
        .env_remove("LETTERBOX_DATABASE_URL")
        .env("LETTERBOX_LOG", "warn")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_install_moves_into_postgres_and_goes_on_as_a_fleet() {
    let Some(url) = crate::support::test_database().await else {
        eprintln!("skipped: migrating into PostgreSQL is the PostgreSQL pass's test");
        return;
    };
    const N: usize = 50;
    let smtp = SmtpServer::start().await;
    let smtp_url = smtp.url();
    let single = Home {
        data: tempfile::tempdir().unwrap(),
        database: None,
    };
    let (node, api) = spawn_node(&single, &["--smtp", &smtp_url]);
    api.wait_healthy().await;
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..N)
        .map(|i| json!({ "email": format!("m{i}@example.org"), "attributes": { "i": i } }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "Before", "text": "Bye: {{ unsubscribe_url }}\r\n" }),
        )
        .await;
    let send = format!("/v1/letters/{letter}/send");
    let key = [("Idempotency-Key", "launch-1")];
    let (status, _, body) = api.post_with_headers(&send, &key, json!({})).await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_u64().unwrap();
    let before = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(before["counts"]["delivered"], N, "{before}");
    let later = api.send(letter, json!({ "send_at": domain_now() + 3600 })).await;

    // A running server holds its redb file: migrate refuses, and says why.
    let (ok, _, stderr) = migrate(single.data.path(), &url);
    assert!(!ok, "migrate must refuse while the server runs");
    assert!(stderr.contains("stop the server"), "{stderr}");
    signal(&node, "-TERM");
    let mut node = node;
    assert!(node.0.wait().unwrap().success());

    let (ok, stdout, stderr) = migrate(single.data.path(), &url);
    assert!(ok, "migrate failed: {stdout}{stderr}");
    eprintln!("letterbox migrate: {stdout}");
    assert!(stdout.contains("the counts match"), "{stdout}");
    assert!(stdout.contains(&format!("{N} subscribers")), "{stdout}");
    assert!(stdout.contains("2 jobs"), "{stdout}");
    // Only into an empty database.
    let (ok, _, stderr) = migrate(single.data.path(), &url);
    assert!(!ok);
    assert!(stderr.contains("not empty"), "{stderr}");
    let (ok, _, stderr) = migrate(single.data.path().join("nope"), &url);
    assert!(!ok);
    assert!(stderr.contains("no letterbox.redb"), "{stderr}");

    // The fleet: a node on the database, with a data directory of its own.
    let fleet = Home {
        data: tempfile::tempdir().unwrap(),
        database: Some(url),
    };
    let (fleet_node, fleet_api, fleet_log) = spawn_node_logged(&fleet, &["--smtp", &smtp_url]);
    fleet_api.wait_healthy().await;
    let (status, after) = fleet_api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["counts"], before["counts"]);
    assert_eq!(after["state"], "completed");
    let (_, scheduled) = fleet_api.get(&format!("/v1/jobs/{later}")).await;
    assert_eq!(scheduled["state"], "scheduled", "{scheduled}");
    let (status, page) = fleet_api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers?limit=1000"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), N, "{page}");
    let (_, log) = fleet_api
        .get(&format!("/v1/jobs/{job}/deliveries?state=delivered&limit=1000"))
        .await;
    assert_eq!(log["items"].as_array().unwrap().len(), N);

    // A link sent before the move unsubscribes on the fleet.
    let message = smtp
        .received()
        .into_iter()
        .find(|m| m.recipients == ["m0@example.org"])
        .unwrap();
    let link = message.header("List-Unsubscribe").unwrap();
    let link = link.trim_start_matches('<').trim_end_matches('>');
    let token = link.rsplit_once("/u/").unwrap().1;
    let (status, _) = fleet_api.post(&format!("/u/{token}"), json!({})).await;
    assert_eq!(status, 200, "the old link works on the fleet");
    let (_, found) = fleet_api
        .get(&format!(
            "/v1/newsletters/{newsletter}/subscribers?email=m0@example.org"
        ))
        .await;
    assert_eq!(found["items"][0]["status"], "unsubscribed", "{found}");

    // The idempotency key replays; a new send gets a new id and reaches everyone else.
    let (status, headers, replay) = fleet_api.post_with_headers(&send, &key, json!({})).await;
    assert_eq!(status, 202, "{replay}");
    assert_eq!(replay["job_id"], job);
    assert_eq!(headers["idempotent-replayed"], "true");
    let again = fleet_api.send(letter, json!({})).await;
    assert!(again > later, "new job ids follow the old ones: {again}");
    let done = fleet_api.wait_job(again, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], N - 1, "{done}");
    let (status, body) = fleet_api
        .post(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            json!([{ "email": "new@example.org" }]),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // And back: from the fleet's database into a data directory, once no node runs.
    let url = fleet.database.clone().unwrap();
    let back = Home {
        data: tempfile::tempdir().unwrap(),
        database: None,
    };
    let back_dir = back.data.path().to_str().unwrap().to_string();
    let (ok, _, stderr) = migrate(&url, &back_dir);
    assert!(!ok, "migrate must refuse while a node runs on the database");
    assert!(stderr.contains("running on this database"), "{stderr}");
    signal(&fleet_node, "-TERM");
    let mut fleet_node = fleet_node;
    assert!(fleet_node.0.wait().unwrap().success());
    // A node that stopped cleanly has deregistered, at once. (It used to stay listed
    // for a lease now and then: a heartbeat under way when SIGTERM came landed after
    // the deregistration and renewed the lease, or re-registered the node. `leave`
    // now waits for it.) The node's log is shown if it is listed all the same.
    let (ok, stdout, stderr) = migrate(&url, &back_dir);
    assert!(
        ok,
        "migrate back failed: {stdout}{stderr}\n--- the stopped node's log ---\n{}",
        fleet_log.lock().unwrap().join("\n")
    );
    assert!(stdout.contains(&format!("{} subscribers", N + 1)), "{stdout}");
    assert!(stdout.contains("3 jobs"), "{stdout}");
    let (_node, api) = spawn_node(&back, &["--smtp", &smtp_url]);
    api.wait_healthy().await;
    let (_, again_job) = api.get(&format!("/v1/jobs/{again}")).await;
    assert_eq!(again_job["counts"], done["counts"], "{again_job}");
    let (_, found) = api
        .get(&format!(
            "/v1/newsletters/{newsletter}/subscribers?email=m0@example.org"
        ))
        .await;
    assert_eq!(found["items"][0]["status"], "unsubscribed", "{found}");
}

fn domain_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
