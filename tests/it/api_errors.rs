//! Bad input gets a 4xx with an `application/problem+json` body naming the problem.

use serde_json::{Value, json};

use crate::support::TestServer;

fn detail(body: &Value) -> &str {
    body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_named_problem() {
    let server = TestServer::start(None).await;
    let api = &server.api;

    // Bad rows are refused one by one, each named with its row and reason; the rest
    // are imported.
    let newsletter = api.newsletter().await;
    let rows =
        json!([{ "email": "ok@example.org" }, { "email": "nope" }, { "email": "a@@b" }, { "name": "x" }]);
    let (status, body) = api
        .post(&format!("/v1/newsletters/{newsletter}/subscribers"), rows)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["inserted"], 1, "{body}");
    assert_eq!(body["rejected"], 3, "{body}");
    assert_eq!(body["errors"][0]["row"], 2, "{body}");
    assert!(
        body["errors"][0]["reason"].as_str().unwrap().contains("nope"),
        "{body}"
    );
    assert_eq!(body["errors"][1]["row"], 3, "{body}");
    assert!(
        body["errors"][2]["reason"].as_str().unwrap().contains("email"),
        "{body}"
    );
    // A CSV without an email column, and an empty one, are refused as a whole.
    let csv_path = format!("/v1/newsletters/{newsletter}/subscribers");
    let (status, body) = api
        .post_raw(&csv_path, "text/csv", b"mail,name\na@b.example,A\n".to_vec())
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(detail(&body).contains("email"), "{body}");
    let (status, body) = api.post_raw(&csv_path, "text/csv", Vec::new()).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api
        .post_raw(&csv_path, "text/csv", b"email,Email\n".to_vec())
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(detail(&body).contains("twice"), "{body}");
    let (status, body) = api.post_raw(&csv_path, "application/xml", b"<a/>".to_vec()).await;
    assert_eq!(status, 415, "{body}");

    let (status, body) = api
        .post(
            "/v1/newsletters",
            json!({ "name": "N", "from": "not-an-address" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "from", "{body}");

    // Unknown ids.
    for (path, what) in [
        ("/v1/newsletters/999/subscribers", "newsletter 999"),
        ("/v1/newsletters/999/letters", "newsletter 999"),
        ("/v1/letters/999/send", "letter 999"),
    ] {
        let body = if path.ends_with("letters") {
            json!({ "subject": "s", "text": "t" })
        } else {
            json!([])
        };
        let body = if path.ends_with("send") { json!({}) } else { body };
        let (status, body) = api.post(path, body).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(detail(&body).contains(what), "{path}: {body}");
    }
    for path in [
        "/v1/jobs/999",
        "/v1/letters/999",
        "/v1/newsletters/999",
        "/v1/nothing",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, body) = api.get("/v1/jobs/abc").await;
    assert_eq!(status, 400, "{body}");

    // Malformed JSON, wrong shapes, missing content type.
    let (status, body) = api
        .post_raw("/v1/newsletters", "application/json", b"{\"name\":".to_vec())
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .post("/v1/newsletters", json!({ "name": 5, "from": "a@b.example" }))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api.post("/v1/newsletters", json!({ "name": "x" })).await;
    assert_eq!(status, 422, "{body}");
    assert!(detail(&body).contains("from"), "{body}");
    let (status, body) = api
        .post_raw("/v1/newsletters", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(status, 415, "{body}");

    // A letter naming a policy that does not exist, or one of the wrong kind.
    let letters = format!("/v1/newsletters/{newsletter}/letters");
    let (status, body) = api
        .post(
            &letters,
            json!({ "subject": "s", "text": "t", "filter": "ghost" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(detail(&body).contains("ghost"), "{body}");
    let wrong = json!({ "subject": "s", "text": "t", "filter": "default-template" });
    let (status, body) = api.post(&letters, wrong).await;
    assert_eq!(status, 422, "{body}");

    // Validation problems name their fields.
    let (status, body) = api.post(&letters, json!({ "subject": " ", "text": "t" })).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "subject", "{body}");
    let (status, body) = api.get("/v1/jobs?limit=0").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "limit", "{body}");
    let (status, body) = api.get("/v1/jobs?state=sleeping").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "state", "{body}");
    assert!(
        detail(&body).contains("running"),
        "names the states there are: {body}"
    );

    // A bad send request.
    let letter = api
        .letter(newsletter, json!({ "subject": "s", "text": "t" }))
        .await;
    let (status, body) = api
        .post(&format!("/v1/letters/{letter}/send"), json!({ "concurrency": 0 }))
        .await;
    assert_eq!(status, 422, "{body}");

    // A NUL character, which PostgreSQL's text cannot hold, is refused alike on every
    // backend, where it is: in a JSON body, naming the field; in an imported row, that
    // row (JSON or CSV; the rest imported, and a name's NUL folded like any control
    // character).
    let (status, body) = api
        .post(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            json!([{ "email": "nul@example.org", "attributes": { "plan": "pro\u{0}" } }]),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["rejected"], 1, "{body}");
    assert!(
        body["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("\"plan\" may not contain the NUL"),
        "{body}"
    );
    let (status, body) = api
        .post(
            "/v1/events",
            json!({ "type": "custom.x", "data": { "k": "\u{0}" } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        detail(&body),
        "data.k: may not contain the NUL character (U+0000)"
    );
    let (status, body) = api
        .post(
            "/v1/suppressions",
            json!({ "emails": ["n@example.org"], "note": "a\u{0}" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "note", "{body}");
    let (status, body) = api
        .post_raw(
            &format!("/v1/newsletters/{newsletter}/subscribers"),
            "text/csv",
            b"email,name,plan\nnul1@example.org,a,p\0ro\nnul2@example.org,b\0c,free\n".to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["inserted"].as_u64(), body["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{body}"
    );
    assert!(body["errors"][0].to_string().contains("NUL"), "{body}");

    // Oversized uploads.
    let (status, body) = api.upload("filter", "huge", vec![0u8; 65 << 20]).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["status"], 413, "{body}");

    // Error bodies are problem+json.
    let response = crate::support::client_builder()
        .build()
        .unwrap()
        .get(format!("{}/v1/jobs/999", api.base))
        .bearer_auth(crate::support::TEST_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    server.stop().await;
}

/// A request slower than `request_timeout` is answered 503, and what it started still
/// completes: here, a letter that waits for its template's compilation (~0.6 s) under a
/// 20 ms limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_but_its_work_completes() {
    let data = tempfile::tempdir().unwrap();
    let mut config = letterbox::Config::new(data.path());
    config.request_timeout = std::time::Duration::from_millis(20);
    let server = TestServer::start_with(config, data).await;
    let api = &server.api;
    // The upload itself is quick (checked and stored; compiled in the background), but
    // a loaded machine may still take 20 ms over it.
    let (status, body) = api
        .upload("template", "ab", crate::support::wasm("ab_subject"))
        .await;
    assert!(status == 201 || status == 503, "{body}");
    let newsletter = loop {
        let (status, body) = api
            .post("/v1/newsletters", json!({ "name": "n", "from": "a@example.org" }))
            .await;
        if status == 201 {
            break body["id"].as_u64().unwrap();
        }
        assert_eq!(status, 503, "{body}");
    };
    let path = format!("/v1/newsletters/{newsletter}/letters");
    let letter = json!({ "subject": "S", "text": "T", "template": "ab" });
    let (status, body) = api.post(&path, letter.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(detail(&body).contains("took longer than"), "{body}");
    let mut uploaded = false;
    for _ in 0..200 {
        let (status, body) = api.get("/v1/plugins/ab").await;
        if status == 200 && body["versions"][0]["status"] == "ready" {
            uploaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(uploaded, "the compilation finished after the request timed out");
    server.stop().await;
}

/// What the OpenAPI document declares is what the server enforces (schemathesis checks
/// this at large in CI, `.ci/schemathesis/run`); here, the rules that changed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_and_the_server_agree() {
    let server = TestServer::start(None).await;
    let api = &server.api;
    let (_, doc) = api.get("/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["SendRequest"]["properties"]["transport"]["enum"],
        json!(["default", null]),
        "the configured transports"
    );
    assert_eq!(schemas["SendRequest"]["properties"]["concurrency"]["minimum"], 1);
    assert!(
        schemas["PreviewFor"]["oneOf"].is_array(),
        "{}",
        schemas["PreviewFor"]
    );
    // What OpenAPI 3.1 itself requires, and client generators rely on (CI validates
    // the whole document with openapi-spec-validator, .ci/openapi): every response
    // has a description, and operationIds are unique.
    let mut ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"].as_str().unwrap_or_default();
            assert!(
                ids.insert(id.to_string()),
                "{method} {path}: operationId {id:?} repeats"
            );
            for (status, response) in operation["responses"].as_object().unwrap() {
                let described = response["description"].as_str().is_some_and(|d| !d.is_empty());
                assert!(described, "{method} {path} {status}: no description: {response}");
            }
        }
    }
    // A mailbox is a non-empty string that holds an @, as JSON Schema can say it.
    let from = &schemas["CreateNewsletter"]["properties"]["from"];
    assert_eq!(from["minLength"], 3, "{from}");
    assert!(from["pattern"].is_string(), "{from}");

    let newsletter = api.newsletter().await;
    api.add_subscribers(newsletter, json!([{ "email": "ann@example.org" }]))
        .await;
    let letter = api
        .letter(newsletter, json!({ "subject": "S", "text": "T" }))
        .await;
    let send = format!("/v1/letters/{letter}/send");
    // JSON Schema's integers include 2.0; a cap below the first delay is the delay; a
    // time with an offset, or before 1970, is a time (the past means now).
    let at = "2100-01-01T01:00:00+01:00";
    let body = json!({ "concurrency": 2.0, "retry": { "base_ms": 5000, "cap_ms": 10 }, "send_at": at });
    let (status, job) = api.post(&send, body).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["job"]["send_at"], 4_102_444_800u64, "{job}");
    assert_eq!(job["job"]["retry"]["cap_ms"], 5000, "{job}");
    assert_eq!(job["job"]["concurrency"], 2, "{job}");
    let (status, job) = api
        .post(&send, json!({ "send_at": "1969-07-20T20:17:00Z" }))
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["job"]["send_at"], Value::Null, "started now: {job}");

    for (path, field) in [
        (format!("/v1/jobs?cursor={}", u64::MAX), "cursor"),
        (
            format!("/v1/newsletters/{newsletter}/subscribers?email=not-an-address"),
            "email",
        ),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["errors"][0]["field"], field, "{body}");
    }
    let (status, _, body) = api
        .post_with_headers(&send, &[("Idempotency-Key", "has space")], json!({}))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = api.delete("/v1/plugins/default-filter").await;
    assert_eq!(status, 409, "{body}");
    server.stop().await;
}
