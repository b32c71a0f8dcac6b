//! Uploaded policies: validation at upload, and a trapping policy failing only the
//! recipient it trapped on.

use std::time::Duration;

use serde_json::json;

use crate::support::{SmtpServer, TestServer, wasm};

/// A component exporting `filter` with the wrong type: `func()` instead of the world's.
fn mistyped_filter() -> Vec<u8> {
    wat::parse_str(
        r#"(component
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func $f (canon lift (core func $i "f")))
            (export "filter" (func $f)))"#,
    )
    .unwrap()
}

fn detail_of(body: &serde_json::Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_validated() {
    let server = TestServer::start(None).await;
    let api = &server.api;

    let (status, body) = api
        .upload("template", "noise", b"definitely not wasm".to_vec())
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not a valid WebAssembly component"),
        "{body}"
    );

    // The smallest valid core module: a module, not a component.
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let (status, body) = api.upload("filter", "core", core_module).await;
    assert_eq!(status, 422, "{body}");

    // A component importing an interface letterbox does not provide: refused before
    // it is compiled.
    let http =
        wat::parse_str(r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance)))"#).unwrap();
    let (status, body) = api.upload("filter", "net", http).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        detail_of(&body).contains("imports wasi:http/outgoing-handler@0.2.0"),
        "{body}"
    );
    // A component exporting nothing.
    let empty = wat::parse_str("(component)").unwrap();
    let (status, body) = api.upload("filter", "empty", empty).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        detail_of(&body).contains("expects an exported function `filter`"),
        "{body}"
    );

    let (status, body) = api.upload("template", "misfiled", wasm("default_filter")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("letterbox:policy/template world"),
        "{body}"
    );

    // The right name with the wrong type: stored, then found unusable by its
    // compilation; a letter that names it is refused with the reason.
    let (status, body) = api.upload("filter", "mistyped", mistyped_filter()).await;
    assert_eq!(status, 201, "{body}");
    let version = api.compiled("mistyped").await;
    assert_eq!(version["status"], "failed", "{version}");
    let error = version["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("does not implement the letterbox:policy/filter world"),
        "{version}"
    );
    let newsletter = api.newsletter().await;
    let (status, body) = api
        .post(
            &format!("/v1/newsletters/{newsletter}/letters"),
            json!({ "subject": "S", "text": "T", "filter": "mistyped" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(detail_of(&body).contains("filter policy mistyped@"), "{body}");
    assert!(detail_of(&body).contains("cannot be used"), "{body}");

    let (status, body) = api.upload("template", "trap", wasm("test_trap_template")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["kind"], "template");
    assert!(
        ["compiling", "ready"].contains(&body["status"].as_str().unwrap()),
        "{body}"
    );
    assert_eq!(api.compiled("trap").await["status"], "ready");
    assert_eq!(body["id"].as_str().unwrap().len(), 64, "sha256 hex: {body}");
    let (status, again) = api.upload("template", "trap", wasm("test_trap_template")).await;
    assert_eq!(status, 200, "re-uploading the same bytes is idempotent: {again}");
    assert_eq!(again["id"], body["id"]);

    let (status, body) = api
        .upload("template", "default-template", wasm("test_trap_template"))
        .await;
    assert_eq!(status, 422, "built-in names are reserved: {body}");
    let (status, body) = api
        .upload("template", "bad name!", wasm("test_trap_template"))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api.upload("sender", "x", wasm("test_trap_template")).await;
    assert_eq!(status, 400, "{body}");

    // An automation (WIT 0.3) is a kind of its own: uploaded and compiled like the
    // others, refused where a filter or template is expected, and the other way round.
    let (status, body) = api.upload("automation", "auto", wasm("test_automation")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["kind"], "automation");
    assert_eq!(api.compiled("auto").await["status"], "ready");
    let (status, body) = api.upload("filter", "auto2", wasm("test_automation")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        detail_of(&body).contains("upload it with kind=automation"),
        "{body}"
    );
    let newsletter = api.newsletter().await;
    let (status, body) = api
        .post(
            &format!("/v1/newsletters/{newsletter}/letters"),
            json!({ "subject": "S", "text": "T", "filter": "auto" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        detail_of(&body).contains("\"auto\" is an automation policy, not a filter policy"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_template_fails_only_its_recipient() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let (status, body) = api.upload("template", "trap", wasm("test_trap_template")).await;
    assert_eq!(status, 201, "{body}");

    let newsletter = api.newsletter().await;
    let mut people = vec![json!({ "email": "trap@example.org" })];
    people.extend((0..9).map(|i| json!({ "email": format!("ok{i}@example.org") })));
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "S", "text": "T", "template": "trap" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 9, "{done}");
    assert_eq!(done["counts"]["failed"], 1, "{done}");
    assert_eq!(smtp.count(), 9);
    assert!(
        smtp.received()
            .iter()
            .all(|m| m.recipients[0] != "trap@example.org")
    );

    let (_, page) = api.get(&format!("/v1/jobs/{job}/deliveries")).await;
    let failed: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["email"], "trap@example.org");
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("policy trap@") && reason.contains("trapped"),
        "{reason}"
    );

    // The server is unharmed and sends with the default template afterwards.
    let (status, _) = api.get("/healthz").await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_and_memory_limits_fail_only_the_offending_recipient() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let (status, body) = api.upload("filter", "hostile", wasm("test_hostile_filter")).await;
    assert_eq!(status, 201, "{body}");

    let newsletter = api.newsletter().await;
    let people = json!([
        { "email": "loop@example.org" },
        { "email": "bomb@example.org" },
        { "email": "net@example.org" },
        { "email": "fine@example.org" },
    ]);
    api.add_subscribers(newsletter, people).await;
    // A port that would accept the policy's connection, were it allowed out.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let connect = bait.local_addr().unwrap().to_string();
    let letter =
        json!({ "subject": "S", "text": "T", "filter": "hostile", "params": { "connect": connect } });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({})).await;
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 1, "{done}");
    assert_eq!(done["counts"]["failed"], 2, "{done}");
    assert_eq!(done["counts"]["skipped"], 1, "{done}");
    assert_eq!(smtp.received()[0].recipients, ["fine@example.org"]);
    assert!(
        matches!(bait.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the policy reached the network"
    );

    let (_, page) = api.get(&format!("/v1/jobs/{job}/deliveries")).await;
    let reason = |email: &str| {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["email"] == email)
            .unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let looped = reason("loop@example.org");
    assert!(
        looped.contains("hostile@") && looped.contains("timed out"),
        "{looped}"
    );
    let bombed = reason("bomb@example.org");
    assert!(
        bombed.contains("hostile@") && bombed.contains("crashed"),
        "{bombed}"
    );
    // Sockets are linked (CPython imports them), and every use is denied.
    let net = reason("net@example.org");
    assert!(
        net.contains("connect refused") && net.contains("lookup refused"),
        "{net}"
    );
    eprintln!("a policy's network attempts: {net}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_pins_listing_and_delete() {
    let smtp = SmtpServer::start_with_delay(Duration::from_millis(100)).await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let (_, v1) = api.upload("template", "tpl", wasm("test_trap_template")).await;
    let (status, v2) = api
        .upload("template", "tpl", crate::support::wasm_default_template())
        .await;
    assert_eq!(status, 200, "bytes already stored as default-template: {v2}");
    let (v1, v2) = (v1["id"].as_str().unwrap(), v2["id"].as_str().unwrap());

    let (status, history) = api.get("/v1/plugins/tpl").await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["kind"], "template");
    let versions = history["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{history}");
    assert_eq!(
        (versions[0]["version"].as_u64(), versions[0]["id"].as_str()),
        (Some(1), Some(v1))
    );
    assert_eq!(
        (versions[1]["version"].as_u64(), versions[1]["id"].as_str()),
        (Some(2), Some(v2))
    );
    let (_, all) = api.get("/v1/plugins").await;
    let names: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default-filter", "default-template", "tpl"], "{all}");
    let tpl = all
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tpl")
        .unwrap();
    assert_eq!(
        (tpl["versions"].as_u64(), tpl["latest"]["id"].as_str()),
        (Some(2), Some(v2))
    );

    // A pinned version is used as pinned; the bare name means the latest.
    let newsletter = api.newsletter().await;
    let letters = format!("/v1/newsletters/{newsletter}/letters");
    let pinned =
        json!({ "subject": "S", "text": "from default {{ email }}", "template": format!("tpl@{v1}") });
    let pinned = api.letter(newsletter, pinned).await;
    let latest = json!({ "subject": "S", "text": "from default {{ email }}", "template": "tpl" });
    let latest = api.letter(newsletter, latest).await;
    let inline = json!({ "recipient": { "email": "x@example.org" } });
    let (_, preview) = api
        .post(&format!("/v1/letters/{pinned}/preview"), inline.clone())
        .await;
    assert_eq!(preview["rendered"]["text"], "hello x@example.org", "{preview}");
    assert_eq!(preview["template"]["id"], v1);
    let (_, preview) = api.post(&format!("/v1/letters/{latest}/preview"), inline).await;
    assert_eq!(
        preview["rendered"]["text"], "from default x@example.org",
        "{preview}"
    );
    let bad_pin = json!({ "subject": "S", "text": "T", "template": "tpl@0000" });
    let (status, body) = api.post(&letters, bad_pin).await;
    assert_eq!(status, 422, "{body}");

    // Deleting is refused while a job uses the plugin, and for built-ins.
    let people: Vec<_> = (0..10)
        .map(|i| json!({ "email": format!("d{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let job = api.send(latest, json!({ "concurrency": 1 })).await;
    let (status, body) = server.api.delete("/v1/plugins/tpl").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains(&format!("job {job}")),
        "{body}"
    );
    api.wait_job(job, Duration::from_secs(60)).await;
    let (status, body) = api.delete("/v1/plugins/tpl").await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = api.get("/v1/plugins/tpl").await;
    assert_eq!(status, 404);
    let (status, body) = api.delete("/v1/plugins/default-template").await;
    assert_eq!(status, 409, "{body}");
    // The bytes tpl shared with default-template are still there.
    let letter = json!({ "subject": "S", "text": "still {{ email }}" });
    let letter = api.letter(newsletter, letter).await;
    let (status, preview) = api
        .post(
            &format!("/v1/letters/{letter}/preview"),
            json!({ "subscriber_id": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_shows_decision_and_message_and_sends_nothing() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    let newsletter = api.newsletter().await;
    let people = json!([
        { "email": "pro@example.org", "name": "Pat", "attributes": { "plan": "pro" } },
        { "email": "free@example.org", "attributes": { "plan": "free" } },
    ]);
    api.add_subscribers(newsletter, people).await;
    let letter = json!({
        "subject": "Hi {{ name }}",
        "text": "Plan {{ attributes.plan }}",
        "html": "<b>{{ name }}</b>",
        "params": { "segment": { "attribute": "plan", "equals": "pro" } },
    });
    let letter = api.letter(newsletter, letter).await;
    let preview = format!("/v1/letters/{letter}/preview");

    let (status, body) = api.post(&preview, json!({ "subscriber_id": 1 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decision"], "send");
    assert_eq!(body["rendered"]["subject"], "Hi Pat");
    assert_eq!(body["rendered"]["text"], "Plan pro");
    assert_eq!(body["rendered"]["html"], "<b>Pat</b>");
    assert_eq!(body["filter"]["name"], "default-filter");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("To: Pat <pro@example.org>") && message.contains("List-Unsubscribe:"),
        "{message}"
    );

    let (_, body) = api.post(&preview, json!({ "subscriber_id": 2 })).await;
    assert_eq!(body["decision"], "skip", "{body}");
    assert_eq!(body["reason"], "not in segment");
    let inline = json!({ "recipient": { "email": "new@example.org", "attributes": { "plan": "pro" } } });
    let (_, body) = api.post(&preview, inline).await;
    assert_eq!(body["decision"], "send", "{body}");

    for bad in [
        json!({}),
        json!({ "subscriber_id": 1, "recipient": { "email": "a@b.example" } }),
    ] {
        let (status, body) = api.post(&preview, bad).await;
        assert_eq!(status, 422, "{body}");
    }
    let (status, body) = api
        .post(&preview, json!({ "recipient": { "email": "nope" } }))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api.post(&preview, json!({ "subscriber_id": 99 })).await;
    assert_eq!(status, 404, "{body}");

    // A policy that crashes for this recipient: the reason, as a 422.
    api.upload("template", "trap", wasm("test_trap_template")).await;
    let trap = json!({ "subject": "S", "text": "T", "template": "trap" });
    let trap = api.letter(newsletter, trap).await;
    let (status, body) = api
        .post(
            &format!("/v1/letters/{trap}/preview"),
            json!({ "recipient": { "email": "trap@example.org" } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("crashed"), "{body}");

    assert_eq!(smtp.count(), 0, "a preview sends nothing");
    server.stop().await;
}

/// Peak resident memory of this test process, from /proc.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policies_are_contained_while_a_healthy_job_completes() {
    let smtp = SmtpServer::start().await;
    // A generous time budget: this test is about containment, and writing 20 MB to
    // stdout can exceed the default 100 ms on a loaded CI machine. The default
    // deadline has its own test above.
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.smtp = Some(letterbox::Config::smtp_url(smtp.url()));
    config.policy_limits.timeout = Duration::from_secs(1);
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    assert_eq!(
        api.upload("filter", "hostile-filter", wasm("test_hostile_filter"))
            .await
            .0,
        201
    );
    assert_eq!(
        api.upload("template", "hostile-template", wasm("test_hostile_template"))
            .await
            .0,
        201
    );

    let healthy = api.newsletter().await;
    let people: Vec<_> = (0..300)
        .map(|i| json!({ "email": format!("h{i}@example.org") }))
        .collect();
    api.add_subscribers(healthy, json!(people)).await;
    let letter = json!({ "subject": "Healthy", "text": "Hi {{ email }}" });
    let healthy_letter = api.letter(healthy, letter).await;

    let hostile = api.newsletter().await;
    let cases = [
        "loop",
        "bomb",
        "stack",
        "unreachable",
        "huge",
        "big",
        "flood",
        "ok",
    ];
    let people: Vec<_> = cases
        .iter()
        .map(|c| json!({ "email": format!("{c}@example.org") }))
        .collect();
    api.add_subscribers(hostile, json!(people)).await;
    let letter = json!({ "subject": "Hostile", "text": "T", "filter": "hostile-filter", "template": "hostile-template" });
    let hostile_letter = api.letter(hostile, letter).await;

    let hostile_job = api.send(hostile_letter, json!({})).await;
    let healthy_job = api.send(healthy_letter, json!({})).await;

    // The server answers throughout.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let started = std::time::Instant::now();
        let (status, _) = api.get("/healthz").await;
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "/healthz took {:?}",
            started.elapsed()
        );
        let (_, a) = api.get(&format!("/v1/jobs/{hostile_job}")).await;
        let (_, b) = api.get(&format!("/v1/jobs/{healthy_job}")).await;
        if a["state"] == "completed" && b["state"] == "completed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs did not finish: {a} {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (_, healthy) = api.get(&format!("/v1/jobs/{healthy_job}")).await;
    assert_eq!(healthy["counts"]["delivered"], 300, "{healthy}");
    let (_, done) = api.get(&format!("/v1/jobs/{hostile_job}")).await;
    assert_eq!(done["counts"]["delivered"], 2, "flood and ok get through: {done}");
    assert_eq!(done["counts"]["failed"], 6, "{done}");
    let (_, page) = api.get(&format!("/v1/jobs/{hostile_job}/deliveries")).await;
    let reason = |case: &str| -> String {
        let email = format!("{case}@example.org");
        let item = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["email"] == email.as_str())
            .unwrap();
        item["reason"].as_str().unwrap_or("").to_string()
    };
    assert!(
        reason("loop").contains("hostile-filter@") && reason("loop").contains("timed out"),
        "{}",
        reason("loop")
    );
    assert!(
        reason("bomb").contains("hostile-filter@") && reason("bomb").contains("crashed"),
        "{}",
        reason("bomb")
    );
    for case in ["stack", "unreachable", "huge"] {
        let reason = reason(case);
        assert!(
            reason.contains("hostile-template@") && reason.contains("crashed"),
            "{case}: {reason}"
        );
    }
    // Rust keeps its stack in linear memory: runaway recursion runs off that region
    // ("out of bounds memory access") before wasm's own call-stack limit; either way a trap.
    assert!(reason("stack").contains("trapped"), "{}", reason("stack"));
    assert!(
        reason("unreachable").contains("unreachable"),
        "{}",
        reason("unreachable")
    );
    assert!(reason("big").contains("more than the limit"), "{}", reason("big"));

    // Memory stayed bounded: every instance is capped at 64 MiB.
    let peak = peak_rss_mib();
    assert!(peak < 1024, "peak RSS {peak} MiB");
    eprintln!("hostile: peak RSS of the test process {peak} MiB");
    server.stop().await;
}

/// Restart intensity: a policy that fails for everyone pauses the job after more than
/// 20 failures in 10 s instead of failing the whole list; uploading a fixed version
/// under the same name and resuming finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_policy_pauses_its_job_and_resume_uses_the_fixed_version() {
    const N: u64 = 200;
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    assert_eq!(
        api.upload("template", "wip", wasm("test_trap_template")).await.0,
        201
    );
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..N)
        .map(|i| json!({ "email": format!("trap{i}@example.org") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({ "subject": "S", "text": "fixed {{ email }}", "template": "wip" });
    let letter = api.letter(newsletter, letter).await;
    let job = api.send(letter, json!({ "concurrency": 4 })).await;
    let paused = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    let reason = paused["pause_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("policy wip@") && reason.contains("failing"),
        "{reason}"
    );
    let failed = paused["counts"]["failed"].as_u64().unwrap();
    assert!(
        (21..=24).contains(&failed),
        "paused after 21 failures, plus what was in flight: {failed}"
    );
    assert_eq!(smtp.count(), 0);

    // The fix: the default template, uploaded as the next version of "wip".
    assert_eq!(
        api.upload("template", "wip", crate::support::wasm_default_template())
            .await
            .0,
        200
    );
    let (status, body) = api.post(&format!("/v1/jobs/{job}/resume"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(
        done["counts"]["delivered"].as_u64().unwrap(),
        N - failed,
        "{done}"
    );
    assert_eq!(done["template"]["id"], body["template"]["id"]);
    assert!(
        smtp.received()[0].body().contains("fixed trap"),
        "rendered by the fixed version"
    );
    let (status, _) = api.post(&format!("/v1/jobs/{job}/resume"), json!({})).await;
    assert_eq!(status, 409, "only a paused job can be resumed");
    server.stop().await;
}

/// The example A/B policy from plugins/ab-subject: both variants go out, each message's
/// header names the variant its subject came from, and the choice is stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_subject_example_splits_recipients_stably() {
    let smtp = SmtpServer::start().await;
    let server = TestServer::start(Some(&smtp)).await;
    let api = &server.api;
    assert_eq!(api.upload("template", "ab", wasm("ab_subject")).await.0, 201);
    let newsletter = api.newsletter().await;
    let people: Vec<_> = (0..40)
        .map(|i| json!({ "email": format!("ab{i}@example.org"), "name": format!("N{i}") }))
        .collect();
    api.add_subscribers(newsletter, json!(people)).await;
    let letter = json!({
        "subject": "unused",
        "text": "variant {{ variant }}",
        "template": "ab",
        "params": { "ab": { "subjects": ["A for {{ name }}", "B for {{ name }}"] } },
    });
    let letter = api.letter(newsletter, letter).await;
    let preview = format!("/v1/letters/{letter}/preview");
    let (_, first) = api.post(&preview, json!({ "subscriber_id": 1 })).await;
    let (_, again) = api.post(&preview, json!({ "subscriber_id": 1 })).await;
    assert_eq!(
        first["rendered"], again["rendered"],
        "the same recipient gets the same variant"
    );

    let job = api.send(letter, json!({})).await;
    assert_eq!(
        api.wait_job(job, Duration::from_secs(60)).await["counts"]["delivered"],
        40
    );
    let mut per_variant = std::collections::HashMap::new();
    for message in smtp.received() {
        let variant = message.header("X-Letterbox-Variant").unwrap();
        let subject = message.header("Subject").unwrap();
        assert!(
            subject.starts_with(&format!("{variant} for N")),
            "{variant}: {subject}"
        );
        assert!(
            message.body().contains(&format!("variant {variant}")),
            "{}",
            message.data
        );
        *per_variant.entry(variant).or_insert(0) += 1;
    }
    assert_eq!(per_variant.len(), 2, "{per_variant:?}");
    assert!(
        per_variant.values().all(|&n| n >= 8),
        "a roughly even split: {per_variant:?}"
    );
    server.stop().await;
}

/// WIT 0.2 policies check a letter when it is written (`validate`): the built-in filter
/// refuses a malformed segment and the ab-subject template malformed variants, each
/// with the field named, before anything is sent. 0.1 policies (the hostile corpus) are
/// still accepted and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_validate_a_letter_when_it_is_written() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    assert_eq!(api.upload("template", "ab", wasm("ab_subject")).await.0, 201);
    assert_eq!(
        api.upload("filter", "old", wasm("test_hostile_filter")).await.0,
        201
    );
    let newsletter = api.newsletter().await;
    let path = format!("/v1/newsletters/{newsletter}/letters");
    let field_errors = |body: &serde_json::Value| -> Vec<(String, String)> {
        body["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["field"].as_str().unwrap().to_string(),
                    e["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };

    let bad_segment = json!({ "subject": "S", "text": "T", "params": { "segment": { "equals": "pro" } } });
    let (status, body) = api.post(&path, bad_segment).await;
    assert_eq!(status, 422, "{body}");
    let errors = field_errors(&body);
    assert!(
        errors
            .iter()
            .any(|(f, m)| f == "params.segment" && m.contains("\"attribute\"")),
        "{body}"
    );

    let bad_variants = json!({
        "subject": "S", "text": "T", "template": "ab",
        "params": { "ab": { "subjects": [] } },
    });
    let (status, body) = api.post(&path, bad_variants).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        field_errors(&body)
            .iter()
            .any(|(f, m)| f == "params.ab.subjects" && m.contains("non-empty")),
        "{body}"
    );

    // Good letters pass, through a 0.2 template and a 0.1 filter alike.
    let good = json!({
        "subject": "S", "text": "T", "template": "ab", "filter": "old",
        "params": { "ab": { "subjects": ["A", "B"] } },
    });
    let (status, body) = api.post(&path, good).await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
}

/// After a restart, a name's latest version is compiled in the background, and an
/// older one stays `stored` until something needs it: listing a long history does not
/// queue a compilation of every version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_are_compiled_only_when_needed() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let (_, v1) = api.upload("template", "tpl", wasm("test_trap_template")).await;
    let (_, v2) = api.upload("template", "tpl", wasm("ab_subject")).await;
    let v1 = v1["id"].as_str().unwrap().to_string();
    assert_eq!(api.compiled("tpl").await["id"], v2["id"]);
    let server = server.restart().await;
    let api = &server.api;
    let (_, history) = api.get("/v1/plugins/tpl").await;
    assert_eq!(history["versions"][0]["status"], "stored", "{history}");
    assert_eq!(api.compiled("tpl").await["status"], "ready");
    // A letter pinned to the old version compiles it.
    let newsletter = api.newsletter().await;
    let pinned = json!({ "subject": "S", "text": "T", "template": format!("tpl@{v1}") });
    api.letter(newsletter, pinned).await;
    let (_, history) = api.get("/v1/plugins/tpl").await;
    assert_eq!(history["versions"][0]["status"], "ready", "{history}");
    server.stop().await;
}

/// Every compile runs in a child process under `policy.compile_memory_mib`: one that
/// needs more fails that version with the reason, the server goes on serving, and a
/// higher limit after a restart compiles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_over_its_memory_limit_fails_in_its_child_and_the_server_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    // Enough to start the binary, not for Cranelift to compile a 1 MB template.
    config.policy_limits.compile_memory_bytes = SMALL_COMPILE_LIMIT_MIB << 20;
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    let (status, body) = api.upload("template", "tpl", wasm("ab_subject")).await;
    assert_eq!(status, 201, "{body}");
    let version = api.compiled("tpl").await;
    assert_eq!(version["status"], "failed", "{version}");
    let error = version["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("needs more than {SMALL_COMPILE_LIMIT_MIB} MiB"))
            && error.contains("--compile-memory-mib"),
        "{version}"
    );
    // A letter naming it is refused with that reason; the server answers as before.
    let newsletter = api.newsletter().await;
    let (status, body) = api
        .post(
            &format!("/v1/newsletters/{newsletter}/letters"),
            json!({ "subject": "S", "text": "T", "template": "tpl" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(detail_of(&body).contains("--compile-memory-mib"), "{body}");
    assert_eq!(api.get("/healthz").await.0, 200);

    let server = server
        .restart_with(|config| config.policy_limits.compile_memory_bytes = 1024 << 20)
        .await;
    assert_eq!(server.api.compiled("tpl").await["status"], "ready");
    server.stop().await;
}

/// ab_subject (1 MB, minijinja inside) compiles at ~70 MiB resident.
const SMALL_COMPILE_LIMIT_MIB: usize = 64;
