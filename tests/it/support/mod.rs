//! Shared test fixtures: the real server on port 0, a real SMTP server, an HTTP client
//! and the test policies built by build.rs.

pub mod browser;
pub mod disk;
pub mod mime;
pub mod pg;
pub mod postfix;
pub mod process;
pub mod smtp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::oneshot;

pub use smtp::SmtpServer;

/// The directory build.rs put the compiled policies in.
pub fn wasm(name: &str) -> Vec<u8> {
    let path = Path::new(env!("LETTERBOX_WASM_DIR")).join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The built-in template's bytes, as embedded in the binary.
pub fn wasm_default_template() -> Vec<u8> {
    letterbox::policy::builtin::DEFAULT_TEMPLATE.to_vec()
}

/// The API token test servers are started with.
pub const TEST_TOKEN: &str = "letterbox-test-token-0123456789";

/// Where the test servers keep their state: redb in their data directory, or with
/// `LETTERBOX_TEST_BACKEND=postgres` a fresh database on the PostgreSQL server that
/// `LETTERBOX_TEST_DATABASE_URL` names (`.ci/with-postgres` starts one). The whole suite
/// runs once per backend (`.ci/test`).
pub async fn test_database() -> Option<String> {
    match std::env::var("LETTERBOX_TEST_BACKEND").as_deref() {
        Err(_) | Ok("redb") => None,
        Ok("postgres") => {
            let admin = std::env::var("LETTERBOX_TEST_DATABASE_URL").expect(
                "LETTERBOX_TEST_BACKEND=postgres needs LETTERBOX_TEST_DATABASE_URL (see .ci/with-postgres)",
            );
            Some(
                letterbox::store::postgres::scratch_database(&admin)
                    .await
                    .expect("create a test database"),
            )
        }
        Ok(other) => panic!("LETTERBOX_TEST_BACKEND={other:?}: expected redb or postgres"),
    }
}

/// letterbox running in-process on 127.0.0.1:0 over a temporary data directory.
pub struct TestServer {
    pub api: Api,
    pub data: tempfile::TempDir,
    config: letterbox::Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), letterbox::Error>>>,
}

impl TestServer {
    /// Delivers to `smtp`, or to the outbox when `None`.
    pub async fn start(smtp: Option<&SmtpServer>) -> TestServer {
        let data = tempfile::tempdir().unwrap();
        let mut config = letterbox::Config::new(data.path());
        config.smtp = smtp.map(|s| letterbox::Config::smtp_url(s.url()));
        Self::start_with(config, data).await
    }

    /// Delivers to `smtp`, after `tweak` adjusted the configuration.
    pub async fn with_smtp(smtp: &SmtpServer, tweak: impl FnOnce(&mut letterbox::Config)) -> TestServer {
        let data = tempfile::tempdir().unwrap();
        let mut config = letterbox::Config::new(data.path());
        config.smtp = Some(letterbox::Config::smtp_url(smtp.url()));
        tweak(&mut config);
        Self::start_with(config, data).await
    }

    /// Starts with `config`; its API token is `TEST_TOKEN` unless it names one.
    pub async fn start_with(mut config: letterbox::Config, data: tempfile::TempDir) -> TestServer {
        config.api_token.get_or_insert_with(|| TEST_TOKEN.to_string());
        // Policies compile as the binary compiles them: in its child process.
        config
            .policy_compiler
            .get_or_insert_with(|| env!("CARGO_BIN_EXE_letterbox").into());
        if config.database_url.is_none() {
            config.database_url = test_database().await;
            // What a killed node held comes back after its lease: keep tests quick.
            config.lease = Duration::from_secs(2);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(letterbox::run(listener, config.clone(), async {
            let _ = stopped.await;
        }));
        let api = Api::with_token(base, config.api_token.as_deref());
        // `run` installs the built-in policies before it accepts connections; the
        // listener is already bound, so requests simply wait until then. If `run` fails
        // instead, say why rather than time out.
        tokio::select! {
            _ = api.wait_healthy() => {}
            _ = async { while !task.is_finished() { tokio::time::sleep(Duration::from_millis(20)).await } } => {
                panic!("letterbox::run ended before serving: {:?}", task.await)
            }
        }
        TestServer {
            api,
            data,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn outbox(&self) -> PathBuf {
        self.data.path().join("outbox")
    }

    /// Graceful shutdown; returns once `run` has returned.
    pub async fn stop(mut self) {
        self.shut_down().await;
    }

    /// Graceful shutdown, then a new server on the same data directory and config.
    pub async fn restart(mut self) -> TestServer {
        self.shut_down().await;
        let TestServer { data, config, .. } = self;
        Self::start_with(config, data).await
    }

    /// Graceful shutdown, then a new server on the same data directory, its
    /// configuration changed by `tweak`.
    pub async fn restart_with(mut self, tweak: impl FnOnce(&mut letterbox::Config)) -> TestServer {
        self.shut_down().await;
        let TestServer { data, mut config, .. } = self;
        tweak(&mut config);
        Self::start_with(config, data).await
    }

    async fn shut_down(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// A free local port (bound, then let go), for a listener the test configures.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` addresses `{prefix}{i}@{domain}`, i from 0.
pub fn emails(prefix: &str, domain: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}@{domain}")).collect()
}

/// A reqwest client builder, with the TLS crypto provider the binary uses installed.
pub fn client_builder() -> reqwest::ClientBuilder {
    letterbox::client::install_crypto_provider();
    reqwest::Client::builder()
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    client: reqwest::Client,
}

impl Api {
    /// A client sending `TEST_TOKEN` (what test servers and spawned binaries are given).
    pub fn new(base: String) -> Api {
        Api::with_token(base, Some(TEST_TOKEN))
    }

    /// A client sending `token` as its bearer token, or no `Authorization` at all.
    pub fn with_token(base: String, token: Option<&str>) -> Api {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Api {
            base,
            client: client_builder()
                .timeout(Duration::from_secs(60))
                .default_headers(headers)
                .build()
                .unwrap(),
        }
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.client.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server at {} never became healthy",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::finish(
            self.client
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        Self::finish(
            self.client
                .delete(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// `method` with `body` as JSON.
    async fn send_json(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let request = self.client.request(method, format!("{}{path}", self.base));
        Self::finish(request.json(&body).send().await.unwrap()).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.send_json(reqwest::Method::PATCH, path, body).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        Self::finish(
            self.client
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// POST expecting `status`; returns the JSON body.
    pub async fn post_ok(&self, path: &str, body: Value, status: u16) -> Value {
        let (got, body) = self.post(path, body).await;
        assert_eq!(got, status, "POST {path}: {body}");
        body
    }

    pub async fn newsletter(&self) -> u64 {
        let body = json!({ "name": "Weekly", "from": "Weekly <news@example.com>" });
        self.post_ok("/v1/newsletters", body, 201).await["id"]
            .as_u64()
            .unwrap()
    }

    /// Adds subscribers (a JSON array) to a newsletter; returns the import summary.
    pub async fn add_subscribers(&self, newsletter: u64, people: Value) -> Value {
        self.post_ok(&format!("/v1/newsletters/{newsletter}/subscribers"), people, 201)
            .await
    }

    /// Creates a letter; returns its id.
    pub async fn letter(&self, newsletter: u64, letter: Value) -> u64 {
        let body = self
            .post_ok(&format!("/v1/newsletters/{newsletter}/letters"), letter, 201)
            .await;
        body["id"].as_u64().unwrap()
    }

    /// Every subscriber of `newsletter`: id by email, all pages read.
    pub async fn subscriber_ids(&self, newsletter: u64) -> std::collections::HashMap<String, u64> {
        let mut ids = std::collections::HashMap::new();
        let mut cursor = 0;
        loop {
            let (status, page) = self
                .get(&format!(
                    "/v1/newsletters/{newsletter}/subscribers?limit=1000&cursor={cursor}"
                ))
                .await;
            assert_eq!(status, 200, "{page}");
            for s in page["items"].as_array().unwrap() {
                ids.insert(
                    s["email"].as_str().unwrap().to_string(),
                    s["id"].as_u64().unwrap(),
                );
            }
            match page["next"].as_u64() {
                Some(next) => cursor = next,
                None => return ids,
            }
        }
    }

    /// A newsletter of `n` recipients (`{prefix}{i}@example.org`) and a letter to them;
    /// returns the letter's id.
    pub async fn letter_to_many(&self, prefix: &str, n: usize) -> u64 {
        let newsletter = self.newsletter().await;
        for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
            let people: Vec<_> = chunk
                .iter()
                .map(|i| json!({ "email": format!("{prefix}{i}@example.org") }))
                .collect();
            self.add_subscribers(newsletter, json!(people)).await;
        }
        let letter = json!({ "subject": "Many", "text": "Hello {{ email }}\r\n" });
        self.letter(newsletter, letter).await
    }

    /// Starts a send job (`options` is the send request body); returns the job id.
    pub async fn send(&self, letter: u64, options: Value) -> u64 {
        let body = self
            .post_ok(&format!("/v1/letters/{letter}/send"), options, 202)
            .await;
        body["job_id"].as_u64().unwrap()
    }

    /// The latest version of plugin `name` once its compilation ended (`ready` or
    /// `failed`).
    pub async fn compiled(&self, name: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (status, history) = self.get(&format!("/v1/plugins/{name}")).await;
            assert_eq!(status, 200, "{history}");
            let latest = history["versions"].as_array().unwrap().last().unwrap().clone();
            if latest["status"] != "compiling" {
                return latest;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} is still compiling: {latest}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn upload(&self, kind: &str, name: &str, bytes: Vec<u8>) -> (u16, Value) {
        self.post_raw(
            &format!("/v1/plugins?kind={kind}&name={name}"),
            "application/wasm",
            bytes,
        )
        .await
    }

    /// POST with extra headers; returns status, response headers and JSON body.
    pub async fn post_with_headers(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let headers = response.headers().clone();
        let (status, body) = Self::finish(response).await;
        (status, headers, body)
    }

    /// GET with extra headers, the response left unread (an event stream to follow).
    pub async fn get_response(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self.client.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// GET returning the body as text (e.g. an event stream, read until it ends).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Polls a job until `done` says so; returns the job.
    pub async fn wait_for(&self, job: u64, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(&format!("/v1/jobs/{job}")).await;
            assert_eq!(status, 200, "{body}");
            if done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {job}: condition not reached: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls a job until it is no longer queued or running.
    pub async fn wait_job(&self, job: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(&format!("/v1/jobs/{job}")).await;
            assert_eq!(status, 200, "{body}");
            if !matches!(body["state"].as_str(), Some("queued" | "running")) {
                return body;
            }
            assert!(Instant::now() < deadline, "job {job} did not finish: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
