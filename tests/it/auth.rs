//! Every `/v1` route (and `/metrics`, unless made public) needs the bearer token; the
//! public ones do not.

use serde_json::Value;

use crate::support::{Api, TEST_TOKEN, TestServer};

/// Every protected route (method, path with ids filled in).
const API_ROUTES: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("POST", "/v1/newsletters"),
    ("GET", "/v1/newsletters/1"),
    ("POST", "/v1/newsletters/1/subscribers"),
    ("GET", "/v1/newsletters/1/subscribers"),
    ("GET", "/v1/subscribers/1"),
    ("PATCH", "/v1/subscribers/1"),
    ("DELETE", "/v1/subscribers/1"),
    ("POST", "/v1/newsletters/1/letters"),
    ("GET", "/v1/letters/1"),
    ("POST", "/v1/letters/1/send"),
    ("POST", "/v1/letters/1/preview"),
    ("POST", "/v1/plugins"),
    ("GET", "/v1/plugins"),
    ("GET", "/v1/plugins/default-filter"),
    ("DELETE", "/v1/plugins/x"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/1"),
    ("GET", "/v1/jobs/1/deliveries"),
    ("GET", "/v1/jobs/1/events"),
    ("POST", "/v1/jobs/1/pause"),
    ("POST", "/v1/jobs/1/resume"),
    ("POST", "/v1/jobs/1/cancel"),
    ("POST", "/v1/jobs/1/retry-failed"),
];

async fn call(token: Option<&str>, base: &str, method: &str, path: &str) -> (u16, Option<String>, Value) {
    let client = reqwest::Client::new();
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
    let body = response.text().await.unwrap();
    (
        status,
        challenge,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_the_token() {
    let server = TestServer::start(None).await;
    let base = server.api.base.clone();
    for &(method, path) in API_ROUTES {
        for token in [None, Some("wrong-token-wrong-token")] {
            let (status, challenge, body) = call(token, &base, method, path).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(
                challenge.as_deref(),
                Some("Bearer realm=\"letterbox\""),
                "{method} {path}"
            );
            assert_eq!(body["status"], 401, "{body}");
            assert!(!body.to_string().contains(TEST_TOKEN), "{body}");
        }
        // With the token the request reaches its handler (which may still refuse it).
        let (status, _, body) = call(Some(TEST_TOKEN), &base, method, path).await;
        assert_ne!(status, 401, "{method} {path}: {body}");
    }
    // Public: health, readiness, unsubscribe pages.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(call(None, &base, "GET", path).await.0, 200, "{path}");
    }
    let (status, _, body) = call(None, &base, "GET", "/u/1.1.00").await;
    assert!(status != 401 && status < 500, "{status} {body}");
    // A client without the token gets nowhere, one with it works.
    let anonymous = Api::with_token(base.clone(), None);
    assert_eq!(anonymous.get("/v1/jobs").await.0, 401);
    assert_eq!(server.api.get("/v1/jobs").await.0, 200);
    server.stop().await;
}
