//! Every `/v1` route (and `/metrics`, unless made public) needs the bearer token; the
//! public ones do not.

use serde_json::Value;

use crate::support::{Api, TEST_TOKEN, TestServer};

/// Every route the rest of the suite uses (method, path as the OpenAPI document writes
/// it): the document must describe each of them.
const KNOWN_ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/openapi.json"),
    ("get", "/metrics"),
    ("get", "/u/{token}"),
    ("post", "/u/{token}"),
    ("get", "/s/{newsletter}"),
    ("post", "/s/{newsletter}"),
    ("get", "/s/confirm/{token}"),
    ("post", "/s/confirm/{token}"),
    ("post", "/v1/newsletters"),
    ("get", "/v1/newsletters/{id}"),
    ("post", "/v1/newsletters/{id}/subscribers"),
    ("get", "/v1/newsletters/{id}/subscribers"),
    ("get", "/v1/subscribers/{id}"),
    ("patch", "/v1/subscribers/{id}"),
    ("delete", "/v1/subscribers/{id}"),
    ("post", "/v1/newsletters/{id}/letters"),
    ("get", "/v1/letters/{id}"),
    ("post", "/v1/letters/{id}/send"),
    ("post", "/v1/letters/{id}/preview"),
    ("post", "/v1/plugins"),
    ("get", "/v1/plugins"),
    ("get", "/v1/plugins/{name}"),
    ("delete", "/v1/plugins/{name}"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("get", "/v1/jobs/{id}/deliveries"),
    ("get", "/v1/jobs/{id}/events"),
    ("post", "/v1/jobs/{id}/pause"),
    ("post", "/v1/jobs/{id}/resume"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("post", "/v1/jobs/{id}/retry-failed"),
    ("get", "/v1/events"),
    ("post", "/v1/events"),
    ("get", "/v1/events/stream"),
    ("post", "/v1/bounces"),
    ("get", "/v1/bounces"),
    ("get", "/v1/subscribers/{id}/bounces"),
    ("post", "/v1/subscribers/{id}/reinstate"),
    ("get", "/v1/suppressions"),
    ("post", "/v1/suppressions"),
    ("get", "/v1/suppressions/{email}"),
    ("delete", "/v1/suppressions/{email}"),
];

/// Every operation of the served document: (method, path template, needs the token).
async fn documented(base: &str) -> Vec<(String, String, bool)> {
    let (status, _, doc) = call(None, base, "GET", "/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    let global = doc["security"].as_array().map_or(0, Vec::len);
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            let security = operation.get("security").and_then(Value::as_array).map(Vec::len);
            let protected = security.unwrap_or(global) > 0;
            out.push((method.clone(), path.clone(), protected));
        }
    }
    out
}

async fn call(token: Option<&str>, base: &str, method: &str, path: &str) -> (u16, Option<String>, Value) {
    let client = crate::support::client_builder().build().unwrap();
    let mut request = client.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if method != "GET" && method != "DELETE" {
        request = request.header("content-type", "application/json").body("{}");
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    // The event log's stream never ends: its head is the answer.
    let streaming = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes() == b"text/event-stream");
    if streaming && status == 200 {
        return (status, challenge, Value::Null);
    }
    let body = response.text().await.unwrap();
    (
        status,
        challenge,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_needs_the_token_unless_public() {
    let server = TestServer::start(None).await;
    let base = server.api.base.clone();
    let operations = documented(&base).await;
    for (method, path) in KNOWN_ROUTES {
        assert!(
            operations.iter().any(|(m, p, _)| m == method && p == path),
            "{method} {path} is not in /openapi.json"
        );
    }
    let public: Vec<String> = operations
        .iter()
        .filter(|(_, _, protected)| !protected)
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    assert_eq!(
        public,
        [
            "get /healthz",
            "get /openapi.json",
            "get /readyz",
            "get /s/confirm/{token}",
            "post /s/confirm/{token}",
            "get /s/{newsletter}",
            "post /s/{newsletter}",
            "get /u/{token}",
            "post /u/{token}",
            "post /webhooks/mailgun",
            "post /webhooks/postmark",
            "post /webhooks/ses"
        ],
        "only these are public (and /metrics only when configured); the webhooks \
         authenticate with each provider's own signature or credentials"
    );
    for (method, template, protected) in &operations {
        let method = method.to_uppercase();
        let path = template
            .replace("{id}", "1")
            .replace("{name}", "x")
            .replace("{newsletter}", "1")
            .replace("{token}", "1.1.00");
        if *protected {
            for token in [None, Some("wrong-token-wrong-token")] {
                let (status, challenge, body) = call(token, &base, &method, &path).await;
                assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
                assert_eq!(
                    challenge.as_deref(),
                    Some("Bearer realm=\"letterbox\""),
                    "{method} {path}"
                );
                assert_eq!(body["status"], 401, "{body}");
                assert!(!body.to_string().contains(TEST_TOKEN), "{body}");
            }
        }
        // With the token the request reaches a handler (which may still refuse it): the
        // document describes no route that does not exist.
        let token = protected.then_some(TEST_TOKEN);
        let (status, _, body) = call(token, &base, &method, &path).await;
        assert!(status != 401 && status != 405, "{method} {path}: {status} {body}");
        assert_ne!(body["detail"], "no such endpoint", "{method} {path}");
    }
    // A client without the token gets nowhere, one with it works.
    let anonymous = Api::with_token(base.clone(), None);
    assert_eq!(anonymous.get("/v1/jobs").await.0, 401);
    assert_eq!(server.api.get("/v1/jobs").await.0, 200);
    server.stop().await;
}
