//! Policies in each language, as an author makes them: `letterbox plugin new`, `plugin
//! build` (the real cargo, componentize-js and componentize-py) and `plugin upload DIR`,
//! and the server, all as the real binary; then a preview and a send through it and a
//! real SMTP server. The same example (a segment with a frequency cap, and a template with a loop
//! over an attribute list) must behave the same in Rust, JavaScript and Python. The
//! hostile corpus has a JavaScript and a Python case too.
//!
//! The toolchains must be installed (`.ci/run` and `.ci/test` do it): node and npm on
//! PATH, and componentize-py on PATH or in the venv `.ci/test` makes. A missing one
//! fails the test with the build's own message, which says how to install it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::process::{Home, spawn_node, spawn_node_logged};
use crate::support::{SmtpServer, TEST_TOKEN};

/// The real binary with `args`, run in `dir` with the test token (and `--server` when
/// given), and what it printed.
async fn run(dir: &Path, server: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_letterbox"));
    command
        .args(args)
        .current_dir(dir)
        .env("LETTERBOX_API_TOKEN", TEST_TOKEN)
        // The Rust projects share one target directory, so their dependencies
        // (wit-bindgen, serde_json for wasm32) are built once.
        .env(
            "CARGO_TARGET_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("policy-projects"),
        )
        .env_remove("LETTERBOX_SERVER")
        .envs(env.iter().copied());
    if let Some(server) = server {
        command.args(["--server", server]);
    }
    command.output().await.expect("run letterbox")
}

/// Runs the real binary with `args`; panics with its output when it fails.
async fn letterbox(dir: &Path, server: Option<&str>, args: &[&str]) -> String {
    let output = run(dir, server, args, &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "letterbox {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// Runs the real binary with `args`, which must fail; returns what it printed on stderr.
async fn letterbox_fails(dir: &Path, server: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> String {
    let output = run(dir, server, args, env).await;
    assert!(!output.status.success(), "letterbox {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `plugin new` then `plugin build` in a fresh directory under `root`; `source`
/// replaces the example's source when given.
async fn project(root: &Path, lang: &str, kind: &str, name: &str, source: Option<&str>) -> PathBuf {
    letterbox(
        root,
        None,
        &["plugin", "new", name, "--lang", lang, "--kind", kind],
    )
    .await;
    let dir = root.join(name);
    if let Some(source) = source {
        let file = match lang {
            "js" => "policy.js",
            "python" => "policy.py",
            _ => "src/lib.rs",
        };
        std::fs::write(dir.join(file), source).unwrap();
    }
    let started = std::time::Instant::now();
    let built = letterbox(root, None, &["plugin", "build", name]).await;
    eprintln!(
        "{lang} {kind}: {} ({:.1} s)",
        built.trim(),
        started.elapsed().as_secs_f64()
    );
    assert!(dir.join("policy.wasm").is_file());
    dir
}

/// The example pair in `lang`: built, uploaded as project directories, previewed for
/// three subscribers (one sent, one capped, one outside the segment), refused with the
/// policies' own field problems, and sent.
async fn the_examples_in(lang: &str) {
    let root = tempfile::tempdir().unwrap();
    let filter = format!("{lang}-segment");
    let template = format!("{lang}-picks");
    let filter_dir = project(root.path(), lang, "filter", &filter, None).await;
    let template_dir = project(root.path(), lang, "template", &template, None).await;

    let smtp = SmtpServer::start().await;
    // The real binary, so the compilations of 12-18 MB components stay out of this
    // process (the hostile tests measure its peak memory).
    let home = Home::new().await;
    let (_node, api) = spawn_node(&home, &["--smtp", &smtp.url()]);
    let api = &api;
    for dir in [&filter_dir, &template_dir] {
        let uploaded = letterbox(
            root.path(),
            Some(&api.base),
            &["--json", "plugin", "upload", dir.to_str().unwrap()],
        )
        .await;
        let uploaded: Value = serde_json::from_str(&uploaded).unwrap();
        assert_eq!(uploaded["status"], "ready", "{uploaded}");
    }

    let newsletter = api.newsletter().await;
    let people = json!([
        { "email": "ann@example.org", "name": "Ann", "attributes": { "plan": "pro", "letters_30d": 1,
            "picks": [{ "title": "Rust 2026", "url": "https://example.org/rust" }, "Tea <3"] } },
        { "email": "bob@example.org", "attributes": { "plan": "pro", "letters_30d": 9 } },
        { "email": "cy@example.org", "attributes": { "plan": "free" } },
        // A count that is not a number fails this recipient alone, in every language.
        { "email": "dee@example.org", "attributes": { "plan": "pro", "letters_30d": "many" } },
    ]);
    api.add_subscribers(newsletter, people).await;
    let params = json!({
        "segment": { "attribute": "plan", "equals": "pro" },
        "frequency_cap": { "attribute": "letters_30d", "max": 4 },
        "picks_heading": "Your picks",
    });

    // Typos are the policies' to find, and they name the fields.
    let (status, refused) = api
        .post(
            &format!("/v1/newsletters/{newsletter}/letters"),
            json!({ "subject": "Hi {{nmae}}", "text": "T", "filter": filter, "template": template,
                    "params": { "segment": { "attr": "plan" }, "picks_heading": 3 } }),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    let fields: Vec<&str> = refused["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["params.segment", "subject", "params.picks_heading"],
        "{refused}"
    );

    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "Hi {{name}}", "text": "Hello {{name}}.\nLeave: {{unsubscribe_url}}",
                    "html": "<html><body><p>Hello {{name}}</p></body></html>",
                    "filter": filter, "template": template, "params": params }),
        )
        .await;
    let (_, subscribers) = api
        .get(&format!("/v1/newsletters/{newsletter}/subscribers"))
        .await;
    let id = |email: &str| {
        subscribers["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["email"] == email)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let preview = |email: &'static str| {
        let subscriber = id(email);
        async move {
            let (status, p) = api
                .post(
                    &format!("/v1/letters/{letter}/preview"),
                    json!({ "subscriber_id": subscriber }),
                )
                .await;
            assert_eq!(status, 200, "{p}");
            p
        }
    };
    let ann = preview("ann@example.org").await;
    assert_eq!(ann["decision"], "send", "{ann}");
    assert_eq!(ann["rendered"]["subject"], "Hi Ann");
    let text = ann["rendered"]["text"].as_str().unwrap();
    assert!(text.starts_with("Hello Ann.\nLeave: http"), "{text}");
    assert!(
        text.ends_with("\n\nYour picks:\n- Rust 2026: https://example.org/rust\n- Tea <3\n"),
        "{text}"
    );
    assert_eq!(
        ann["rendered"]["html"],
        "<html><body><p>Hello Ann</p><h2>Your picks</h2>\n<ul>\n\
         <li><a href=\"https://example.org/rust\">Rust 2026</a></li>\n<li>Tea &lt;3</li>\n</ul>\n</body></html>"
    );
    let bob = preview("bob@example.org").await;
    assert_eq!(bob["decision"], "skip");
    assert_eq!(bob["reason"], "frequency cap: 9 of 4 letters");
    let cy = preview("cy@example.org").await;
    assert_eq!(cy["reason"], "not in segment");

    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 1, "{done}");
    assert_eq!(done["counts"]["skipped"], 2, "{done}");
    assert_eq!(done["counts"]["failed"], 1, "{done}");
    let (_, failed) = api.get(&format!("/v1/jobs/{job}/deliveries?state=failed")).await;
    let reason = failed["items"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("policy {filter}@"))
            && reason.ends_with("attribute letters_30d is not a number: \"many\""),
        "{reason}"
    );
    let received = smtp.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].recipients, ["ann@example.org"]);
    let message = mail_parser::MessageParser::default()
        .parse(received[0].data.as_bytes())
        .unwrap();
    assert_eq!(message.subject(), Some("Hi Ann"));
    let body = message.body_text(0).unwrap();
    assert!(body.contains("- Rust 2026: https://example.org/rust"), "{body}");

    drip_in(lang, root.path(), api, &smtp, newsletter).await;
}

/// The automation example in `lang`: a three-step drip (days 0, 3 and 7) started by `subscriber.confirmed` and ended by `custom.purchase`. Two
/// people subscribe through the public form and confirm by their links; one buys after
/// the first step, the other gets every step, each once. A day is two seconds here.
async fn drip_in(lang: &str, root: &Path, api: &crate::support::Api, smtp: &SmtpServer, newsletter: u64) {
    let drip = format!("{lang}-drip");
    let dir = project(root, lang, "automation", &drip, None).await;
    let uploaded = letterbox(
        root,
        Some(&api.base),
        &["--json", "plugin", "upload", dir.to_str().unwrap()],
    )
    .await;
    let uploaded: Value = serde_json::from_str(&uploaded).unwrap();
    assert_eq!(uploaded["status"], "ready", "{uploaded}");
    let mut steps = Vec::new();
    for i in 1..=3 {
        let text = json!({ "subject": format!("{lang} step {i}"), "text": "Step {{ name }}\n" });
        steps.push(api.letter(newsletter, text).await);
    }
    let automation = |config: Value| {
        json!({ "name": drip, "policy": drip, "events": ["subscriber.confirmed", "custom.purchase"],
                "config": config })
    };
    // The policy's own `validate` names what is wrong.
    let (status, refused) = api
        .post(
            "/v1/automations",
            automation(json!({ "steps": [], "goal": "purchase" })),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    let fields: Vec<&str> = refused["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["config.steps", "config.goal"], "{refused}");
    let config = json!({
        "steps": [{ "letter": steps[0], "after_days": 0 }, { "letter": steps[1], "after_days": 3 },
                  { "letter": steps[2], "after_days": 7 }],
        "goal": "custom.purchase",
        "seconds_per_day": 2,
    });
    let (status, created) = api.post("/v1/automations", automation(config)).await;
    assert_eq!(status, 201, "{created}");

    let (eve, fay) = (
        format!("eve-{lang}@example.org"),
        format!("fay-{lang}@example.org"),
    );
    for email in [&eve, &fay] {
        let (status, body) = api
            .post(&format!("/s/{newsletter}"), json!({ "email": email }))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    for email in [&eve, &fay] {
        let link = crate::optin::nth_link(smtp, email, 1).await;
        let path = link.strip_prefix(&api.base).expect("a link to this server");
        let (status, _) = api.post(path, json!({})).await;
        assert_eq!(status, 200, "{link}");
    }
    let subject_of = |m: &crate::support::smtp::Received| m.header("Subject").unwrap_or_default();
    let got = |to: &str| -> Vec<String> {
        let mut subjects: Vec<String> = smtp
            .received()
            .iter()
            .filter(|m| m.recipients == [to] && subject_of(m).contains(" step "))
            .map(subject_of)
            .collect();
        subjects.sort();
        subjects
    };
    let wait = |to: String, n: usize| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got(&to).len() < n {
            assert!(std::time::Instant::now() < deadline, "{to} got {:?}", got(&to));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait(fay.clone(), 1).await;
    let (status, bought) = api
        .post(
            "/v1/events",
            json!({ "type": "custom.purchase", "subscriber": fay, "newsletter": newsletter }),
        )
        .await;
    assert_eq!(status, 201, "{bought}");
    wait(eve.clone(), 3).await;
    // Past eve's last step: fay's would have come long before.
    let step = |i: u32| format!("{lang} step {i}");
    assert_eq!(got(&eve), [step(1), step(2), step(3)], "every step once");
    assert_eq!(got(&fay), [step(1)], "the goal ended fay's drip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_examples_build_preview_and_send() {
    the_examples_in("rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_examples_build_preview_and_send() {
    the_examples_in("js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_examples_build_preview_and_send() {
    the_examples_in("python").await;
}

/// A hostile filter in `lang` (tests/policies/): an infinite loop and a memory bomb
/// fail only their recipients, a connect reaches nothing, and the healthy recipient is
/// sent.
/// Returns each recipient's (email, state, reason) and what the node logged.
async fn hostile_in(lang: &str, source: &str) -> (Vec<(String, String, String)>, Vec<String>) {
    let root = tempfile::tempdir().unwrap();
    let dir = project(root.path(), lang, "filter", "hostile", Some(source)).await;
    let smtp = SmtpServer::start().await;
    // The real binary, so the compilations of 12-18 MB components stay out of this
    // process (the hostile tests measure its peak memory).
    let home = Home::new().await;
    let (_node, api, logged) = spawn_node_logged(&home, &["--smtp", &smtp.url()]);
    let api = &api;
    letterbox(
        root.path(),
        Some(&api.base),
        &["plugin", "upload", dir.to_str().unwrap()],
    )
    .await;
    let newsletter = api.newsletter().await;
    let people = ["loop", "bomb", "net", "fine"].map(|p| json!({ "email": format!("{p}@example.org") }));
    api.add_subscribers(newsletter, json!(people)).await;
    // A port that would accept the policy's connection, were it allowed out.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let connect = bait.local_addr().unwrap().to_string();
    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "S", "text": "T", "filter": "hostile", "params": { "connect": connect } }),
        )
        .await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 1, "{done}");
    assert_eq!(smtp.received()[0].recipients, ["fine@example.org"]);
    assert!(
        matches!(bait.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the policy reached the network"
    );
    let (_, page) = api.get(&format!("/v1/jobs/{job}/deliveries")).await;
    let outcomes: Vec<(String, String, String)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let text = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (text("email"), text("state"), text("reason"))
        })
        .collect();
    eprintln!("hostile {lang}: {outcomes:#?}");
    let outcome = |email: &str| outcomes.iter().find(|o| o.0 == email).unwrap().clone();
    let (_, state, reason) = outcome("loop@example.org");
    assert!(
        state == "failed" && reason.contains("hostile@") && reason.contains("timed out"),
        "{reason}"
    );
    let (_, state, reason) = outcome("bomb@example.org");
    assert!(
        state == "failed" && reason.contains("hostile@") && reason.contains("crashed"),
        "{reason}"
    );
    let (_, health) = api.get("/healthz").await;
    assert_eq!(health["status"], "ok", "{health}");
    let logged = logged.lock().unwrap().clone();
    (outcomes, logged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_javascript_is_contained() {
    let (outcomes, logged) = hostile_in("js", include_str!("../policies/hostile.js")).await;
    // console.log reaches the server's log, in UTF-8, with the policy's name.
    assert!(
        logged
            .iter()
            .any(|l| l.contains("hostile prepared for 127.0.0.1:")
                && l.contains("✓")
                && l.contains("policy=hostile@")
                && l.contains("stdout")),
        "no console line in the node's log"
    );
    // QuickJS has no fetch and no sockets (StarlingMonkey's fetch needs wasi:http, which
    // is refused at upload, and a call without it aborts the instance).
    let net = outcomes.iter().find(|o| o.0 == "net@example.org").unwrap();
    assert!(
        (net.1 == "failed" && net.2.contains("crashed"))
            || (net.1 == "skipped" && net.2.starts_with("connect refused")),
        "{net:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_python_is_contained() {
    let (outcomes, _) = hostile_in("python", include_str!("../policies/hostile.py")).await;
    // CPython links wasi:sockets, and the host denies every use.
    let net = outcomes.iter().find(|o| o.0 == "net@example.org").unwrap();
    assert_eq!(net.1, "skipped");
    assert!(net.2.contains("PermissionError"), "{net:?}");
}

/// What a new author sees without the toolchains, or without building first: each
/// message names the missing piece and how to get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_toolchain_or_build_is_named() {
    let root = tempfile::tempdir().unwrap();
    for (lang, missing, hint) in [
        ("js", "node is not installed", "install Node.js"),
        (
            "python",
            "componentize-py is not installed",
            "pip install componentize-py==",
        ),
        ("rust", "cargo is not installed", "https://rustup.rs"),
    ] {
        let name = format!("{lang}-bare");
        letterbox(
            root.path(),
            None,
            &["plugin", "new", &name, "--lang", lang, "--kind", "filter"],
        )
        .await;
        let stderr = letterbox_fails(root.path(), None, &["plugin", "build", &name], &[("PATH", "")]).await;
        assert!(
            stderr.contains(missing) && stderr.contains(hint),
            "{lang}: {stderr}"
        );

        let upload = ["plugin", "upload", name.as_str()];
        let stderr = letterbox_fails(root.path(), Some("http://127.0.0.1:9"), &upload, &[]).await;
        assert!(
            stderr.contains("policy.wasm does not exist: run `letterbox plugin build"),
            "{stderr}"
        );
    }
}

/// An interpreter's policy that needs more than the default 64 MiB per instance asks
/// for it in its policy.toml (`memory_mib`): `plugin build` writes the ask into the
/// component and the server gives its instances that much, up to its ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_gets_the_memory_its_project_asks_for() {
    let root = tempfile::tempdir().unwrap();
    // Holds a 100 MiB table from `prepare` on.
    let source = "\
from componentize_py_types import Ok
from wit_world import WitWorld as Policy
from wit_world.imports.types import Decision_Send

table = []


class WitWorld(Policy):
    def validate(self, letter):
        return None

    def prepare(self, letter):
        table.append(bytearray(100 << 20))

    def filter(self, recipients):
        return [Ok(Decision_Send()) for _ in recipients]
";
    let dir = project(root.path(), "python", "filter", "big", Some(source)).await;
    let smtp = SmtpServer::start().await;
    let home = Home::new().await;
    let (_node, api) = spawn_node(&home, &["--smtp", &smtp.url()]);
    let upload = |extra: &'static [&'static str]| {
        let mut args = vec!["--json", "plugin", "upload", "big"];
        args.extend_from_slice(extra);
        let base = api.base.clone();
        let root = root.path().to_path_buf();
        async move { letterbox(&root, Some(&base), &args).await }
    };
    upload(&[]).await;
    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "a@example.org" }]))
        .await;
    let letter = api
        .letter(
            newsletter,
            json!({ "subject": "S", "text": "T", "filter": "big" }),
        )
        .await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["failed"], 1, "64 MiB cannot hold it: {done}");

    let manifest = dir.join("policy.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("memory_mib = 160\n");
    std::fs::write(&manifest, text).unwrap();
    letterbox(root.path(), None, &["plugin", "build", "big"]).await;
    let v2: Value = serde_json::from_str(&upload(&[]).await).unwrap();
    assert_eq!(v2["status"], "ready", "{v2}");
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["delivered"], 1, "160 MiB holds it: {done}");

    // Above the server's ceiling (512 MiB by default) it is refused at upload.
    let greedy = ["plugin", "upload", "big", "--memory-mib", "1024"];
    let stderr = letterbox_fails(root.path(), Some(&api.base), &greedy, &[]).await;
    assert!(
        stderr.contains("asks for 1024 MiB") && stderr.contains("at most 512"),
        "{stderr}"
    );
}
