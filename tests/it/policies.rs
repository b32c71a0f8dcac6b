//! Uploaded policies: validation at upload, and a trapping policy failing only the
//! recipient it trapped on.

use std::time::Duration;

use serde_json::json;

use crate::support::{SmtpServer, TestServer, wasm};

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

    let (status, body) = api.upload("template", "misfiled", wasm("default_filter")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("letterbox:policy/template world"),
        "{body}"
    );

    let (status, body) = api.upload("template", "trap", wasm("test_trap_template")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["kind"], "template");
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
    api.post_ok(
        &format!("/v1/newsletters/{newsletter}/subscribers"),
        json!(people),
        201,
    )
    .await;
    let letter = json!({ "subject": "S", "text": "T", "template": "trap" });
    let letter = api
        .post_ok(&format!("/v1/newsletters/{newsletter}/letters"), letter, 201)
        .await["id"]
        .as_u64()
        .unwrap();
    let job = api
        .post_ok(&format!("/v1/letters/{letter}/send"), json!({}), 202)
        .await["job_id"]
        .as_u64()
        .unwrap();
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
        { "email": "fine@example.org" },
    ]);
    api.post_ok(&format!("/v1/newsletters/{newsletter}/subscribers"), people, 201)
        .await;
    let letter = json!({ "subject": "S", "text": "T", "filter": "hostile" });
    let letter = api
        .post_ok(&format!("/v1/newsletters/{newsletter}/letters"), letter, 201)
        .await["id"]
        .as_u64()
        .unwrap();
    let job = api
        .post_ok(&format!("/v1/letters/{letter}/send"), json!({}), 202)
        .await["job_id"]
        .as_u64()
        .unwrap();
    let done = api.wait_job(job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["delivered"], 1, "{done}");
    assert_eq!(done["counts"]["failed"], 2, "{done}");
    assert_eq!(smtp.received()[0].recipients, ["fine@example.org"]);

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
    server.stop().await;
}
