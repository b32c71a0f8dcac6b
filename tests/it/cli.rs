//! The client commands, run as the real binary against a real server (port 0) and a real
//! SMTP server: a whole send driven from the command line, followed to its end.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::support::smtp::Reply;
use crate::support::{SmtpServer, TEST_TOKEN, TestServer, wasm};

/// What one command printed, and how it exited.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }
}

async fn letterbox(server: &str, token: &str, args: &[&str]) -> Output {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_letterbox"))
        .args(args)
        .args(["--server", server])
        .env("LETTERBOX_API_TOKEN", token)
        .env_remove("LETTERBOX_SERVER")
        .output()
        .await
        .expect("run letterbox");
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write_csv(path: &Path, rows: usize) {
    let mut csv = String::from("email,name,plan\n");
    for i in 0..rows {
        csv.push_str(&format!("reader{i}@example.com,Reader {i},free\n"));
    }
    csv.push_str("not-an-email,Nobody,free\n");
    // A tab in a name: folded to a space, and said so.
    csv.push_str("gone@example.com,Gone\tAway,free\n");
    std::fs::write(path, csv).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_send_from_the_command_line() {
    // One address refuses mail for good, so the first send ends with a failure.
    let script = Arc::new(|rcpt: &str, _tries: u32| match rcpt.starts_with("gone@") {
        true => Reply::PermFail,
        false => Reply::Accept,
    });
    let smtp = SmtpServer::scripted(Duration::ZERO, script).await;
    let server = TestServer::start(Some(&smtp)).await;
    let base = server.api.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let base = base.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            letterbox(&base, TEST_TOKEN, &args).await
        }
    };
    let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();

    let out = run(vec![
        "--json".into(),
        "newsletter".into(),
        "create".into(),
        "--name".into(),
        "CLI weekly".into(),
        "--from".into(),
        "CLI <cli@example.com>".into(),
    ])
    .await;
    assert!(out.ok, "{}", out.stderr);
    let newsletter = out.json()["id"].as_u64().unwrap();

    let csv = dir.path().join("readers.csv");
    write_csv(&csv, 300);
    let out = run(args(&format!(
        "subscribers import {} --newsletter {newsletter}",
        csv.display()
    )))
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("301 inserted, 0 updated, 1 rejected"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("names folded to one line: 1 ("),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("row 301 (line 302): invalid email address"),
        "{}",
        out.stdout
    );

    let component = dir.path().join("everyone.wasm");
    std::fs::write(&component, wasm("default_filter")).unwrap();
    let out = run(args(&format!(
        "plugin upload {} --kind filter --name everyone",
        component.display()
    )))
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("filter everyone uploaded"),
        "{}",
        out.stdout
    );

    let mut create = args(&format!(
        "--json letter create --newsletter {newsletter} --filter everyone --text"
    ));
    create.extend(["Hello {{ name }}".into(), "--subject".into(), "CLI issue".into()]);
    let out = run(create).await;
    assert!(out.ok, "{}", out.stderr);
    let letter = out.json()["id"].as_u64().unwrap();

    // The send, followed to its end: a summary, and a failing exit for the refused one.
    let out = run(args(&format!("send {letter} --follow"))).await;
    assert!(!out.ok, "one recipient failed: {}", out.stdout);
    assert!(
        out.stdout.contains("completed") && out.stdout.contains("300 delivered, 0 skipped, 1 failed"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("1 recipients failed"), "{}", out.stderr);
    assert_eq!(smtp.count(), 300);
    let job = server.api.get("/v1/jobs?limit=1").await.1["items"][0]["id"]
        .as_u64()
        .unwrap();

    // The listing and the job controls.
    let out = run(args("jobs --state completed")).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.lines().nth(1).unwrap().contains("completed"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("301/301"), "{}", out.stdout);
    let out = run(args(&format!("--json job retry-failed {job}"))).await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.json()["requeued"], 1);
    let out = run(args(&format!("job follow {job}"))).await;
    assert!(out.ok, "the bounced recipient is skipped: {}", out.stderr);
    assert!(
        out.stdout.contains("300 delivered, 1 skipped, 0 failed"),
        "{}",
        out.stdout
    );
    assert_eq!(
        smtp.tries("gone@example.com"),
        1,
        "a hard bounce is not tried again"
    );

    // What came back (the 5.1.1 at RCPT), and the operator's answers to it.
    let out = run(args("bounces")).await;
    assert!(out.ok, "{}", out.stderr);
    let line = out.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        line.contains("hard") && line.contains("smtp") && line.contains("gone@example.com"),
        "{}",
        out.stdout
    );
    assert!(
        line.contains("subscriber bounced: hard bounce 5.1.1"),
        "{}",
        out.stdout
    );
    let out = run(args("--json bounces")).await;
    let gone = out.json()["items"][0]["subscriber_id"].as_u64().unwrap();
    let out = run(args(&format!("subscribers reinstate {gone}"))).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("<gone@example.com> is active"),
        "{}",
        out.stdout
    );
    let mut add = args("suppressions add gone@example.com bad-address --note");
    add.push("asked by phone".into());
    let out = run(add).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("1 added, 0 already on the list, 1 rejected"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("row 2: invalid email address"),
        "{}",
        out.stdout
    );
    let out = run(args("suppressions list")).await;
    assert!(out.ok, "{}", out.stderr);
    let line = out.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        line.contains("gone@example.com") && line.contains("manual") && line.contains("asked by phone"),
        "{}",
        out.stdout
    );
    let out = run(args("suppressions remove gone@example.com")).await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "gone@example.com is off the suppression list");
    let out = run(args("suppressions remove gone@example.com")).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    // The event log says it all, one line each; a typo in a type is named.
    let out = run(args(
        "events --after 0 --type delivery.bounced,subscriber.bounced,subscriber.reinstated",
    ))
    .await;
    assert!(out.ok, "{}", out.stderr);
    let kinds: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        kinds,
        ["delivery.bounced", "subscriber.bounced", "subscriber.reinstated"],
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("gone@example.com"), "{}", out.stdout);
    let out = run(args("events --type delivery.bouncd")).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("delivery.bouncd"), "{}", out.stderr);

    // Server errors: the problem's detail and field errors, and a failing exit.
    let out = run(args("job pause 999")).await;
    assert!(!out.ok);
    assert_eq!(out.stderr.trim(), "error: job 999 not found");
    let out = run(args("newsletter create --name x --from nope")).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("from: "), "{}", out.stderr);
    let out = letterbox(&base, "a-wrong-token-a-wrong-token", &["jobs"]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("LETTERBOX_API_TOKEN"), "{}", out.stderr);
    server.stop().await;
}

/// `letterbox automation`: create (with the config from a file, checked by the policy),
/// list, pause, resume, failures; a config the policy refuses names its field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automations_from_the_command_line() {
    let server = TestServer::start(None).await;
    let base = server.api.base.clone();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (base, args): (String, Vec<String>) =
            (base.clone(), args.iter().map(|a| a.to_string()).collect());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            letterbox(&base, TEST_TOKEN, &args).await
        }
    };
    let component = dir.path().join("script.wasm");
    std::fs::write(&component, wasm("test_automation")).unwrap();
    let path = component.display().to_string();
    let out = run(&[
        "plugin",
        "upload",
        &path,
        "--kind",
        "automation",
        "--name",
        "script",
    ])
    .await;
    assert!(out.ok, "{}", out.stderr);

    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"validate": [["config.steps", "must be a list"]]}"#).unwrap();
    let with = format!("@{}", config.display());
    let out = run(&[
        "automation",
        "create",
        "drip",
        "--policy",
        "script",
        "--events",
        "custom.signup,subscriber.*",
        "--with",
        &with,
    ])
    .await;
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("config.steps: must be a list"),
        "{}",
        out.stderr
    );

    std::fs::write(&config, r#"{"steps": []}"#).unwrap();
    let out = run(&[
        "automation",
        "create",
        "drip",
        "--policy",
        "script",
        "--events",
        "custom.signup,subscriber.*",
        "--with",
        &with,
    ])
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout.trim(),
        "automation 1 (drip) created: script on custom.signup,subscriber.*"
    );
    let out = run(&["automation", "pause", "1"]).await;
    assert!(
        out.ok && out.stdout.trim() == "automation 1 is paused",
        "{} {}",
        out.stdout,
        out.stderr
    );
    let out = run(&["automation", "list"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("drip") && out.stdout.contains("paused: paused by request"),
        "{}",
        out.stdout
    );
    let out = run(&["--json", "automation", "resume", "1"]).await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.json()["state"], "active");
    let out = run(&["automation", "failures", "1"]).await;
    assert_eq!(out.stdout.trim(), "automation 1 has no failures");
    let out = run(&["automation", "retry", "1"]).await;
    assert_eq!(
        out.stdout.trim(),
        "automation 1: 0 failures to be retried",
        "{}",
        out.stderr
    );
    let out = run(&["automation", "retry", "1", "77"]).await;
    assert!(
        !out.ok && out.stderr.contains("77"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    let out = run(&[
        "automation",
        "create",
        "x",
        "--policy",
        "script",
        "--events",
        "custom.x",
        "--with",
        "{nope",
    ])
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("--with is not JSON"), "{}", out.stderr);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newsletters_and_letters_are_listed_edited_and_deleted_from_the_command_line() {
    let server = TestServer::start(None).await;
    let base = server.api.base.clone();
    let run = |args: &[&str]| {
        let (base, args) = (
            base.clone(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            letterbox(&base, TEST_TOKEN, &args).await
        }
    };
    let made = run(&[
        "--json",
        "newsletter",
        "create",
        "--name",
        "Weekly",
        "--from",
        "w@example.com",
    ])
    .await;
    assert!(made.ok, "{}", made.stderr);
    let id = made.json()["id"].as_u64().unwrap().to_string();

    let out = run(&["newsletter", "edit", &id, "--name", "Weekly news"]).await;
    assert!(out.ok, "{}", out.stderr);
    let out = run(&["newsletter", "list"]).await;
    assert!(
        out.ok && out.stdout.contains("Weekly news"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let out = run(&["newsletter", "edit", &id]).await;
    assert!(
        !out.ok && out.stderr.contains("--name or --from"),
        "{}",
        out.stderr
    );

    // A letter: created without its text is refused here, before any request.
    let out = run(&["letter", "create", "--newsletter", &id, "--subject", "Hi"]).await;
    assert!(!out.ok && out.stderr.contains("--text"), "{}", out.stderr);
    let made = run(&[
        "--json",
        "letter",
        "create",
        "--newsletter",
        &id,
        "--subject",
        "Hi",
        "--text",
        "Hello",
    ])
    .await;
    assert!(made.ok, "{}", made.stderr);
    let letter = made.json()["id"].as_u64().unwrap().to_string();
    let out = run(&["letter", "edit", &letter, "--subject", "Hi {{ name }}"]).await;
    assert!(out.ok, "{}", out.stderr);
    // A template error is the API's, with its field.
    let out = run(&["letter", "edit", &letter, "--text", "Hello {{ name"]).await;
    assert!(!out.ok && out.stderr.contains("text"), "{}", out.stderr);
    let out = run(&["letter", "list", "--newsletter", &id]).await;
    assert!(out.ok && out.stdout.contains("Hi {{ name }}"), "{}", out.stdout);
    let out = run(&["--json", "letter", "show", &letter]).await;
    assert_eq!(out.json()["text"], "Hello", "{}", out.stdout);

    // A newsletter with letters but no subscribers goes, with its letters.
    let out = run(&["letter", "delete", &letter]).await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(server.api.get(&format!("/v1/letters/{letter}")).await.0, 404);
    let out = run(&["newsletter", "delete", &id]).await;
    assert!(out.ok, "{}", out.stderr);
    let out = run(&["newsletter", "list"]).await;
    assert!(out.stdout.contains("no newsletters"), "{}", out.stdout);
}
