//! The command-line client: the same binary, talking to a running server over its HTTP
//! API. It owns the client commands (clap), the requests (reqwest) and the terminal
//! output (indicatif progress bars); it shares nothing with the server but the domain's
//! JSON. Server errors are shown as their problem `detail` (and field errors), and make
//! the process exit non-zero.

mod automations;
mod bounces;
mod commands;
mod events;
mod lists;
mod log;
mod output;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub use commands::{Command, run};

/// Installs the TLS crypto provider (ring, the one lettre uses too) for `https://`
/// servers. reqwest is built without a default provider so the binary carries one.
/// Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the server is and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub server: String,
    pub token: Option<String>,
    /// Print the server's JSON instead of the human summary.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a problem.
    #[error("{detail}")]
    Problem {
        status: StatusCode,
        detail: String,
        errors: Vec<(String, String)>,
    },
    #[error("cannot reach the server at {server}")]
    Unreachable {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Usage(String),
    /// A policy project could not be made, read or built (`plugin new`, `build`,
    /// `upload DIR`); `report` prints its causes.
    #[error(transparent)]
    Project(#[from] crate::project::ProjectError),
    /// The command ran, and its outcome is a failure (a job that failed, recipients that
    /// could not be delivered); the message was already printed.
    #[error("{0}")]
    Outcome(String),
}

impl ClientError {
    /// The lines to print on stderr.
    pub fn report(&self) -> String {
        let mut out = format!("error: {self}");
        // reqwest's own message is generic ("error sending request"); the cause is below.
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            out.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        if let ClientError::Problem {
            status,
            errors,
            detail,
        } = self
        {
            for (field, message) in errors {
                let line = format!("{field}: {message}");
                // A problem with one field says it in its detail already: once is enough.
                if *detail != line {
                    out.push_str(&format!("\n  {line}"));
                }
            }
            if *status == StatusCode::UNAUTHORIZED {
                out.push_str("\n  (set LETTERBOX_API_TOKEN or --token to the server's API token)");
            }
        }
        out
    }
}

/// An HTTP client for one server.
pub struct Client {
    target: Target,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: Target) -> Result<Client, ClientError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("letterbox-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot build an HTTP client: {e}")))?;
        let server = target.server.trim_end_matches('/').to_string();
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(ClientError::Usage(format!(
                "--server must be an http:// or https:// URL, got {server:?}"
            )));
        }
        Ok(Client {
            target: Target { server, ..target },
            http,
        })
    }

    pub fn json_output(&self) -> bool {
        self.target.json
    }

    /// A request to `path` (starting with `/`), with the token.
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.target.server));
        match &self.target.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; a success's body as JSON (`null` when empty), a problem as an
    /// error.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            if body.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&body)
                .map_err(|e| ClientError::Io(format!("the server's answer is not JSON: {e}")));
        }
        Err(problem(status, &body))
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.request(Method::PATCH, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.request(Method::DELETE, path)).await
    }

    /// A POST of `body` as it is, with its content type (a CSV file).
    pub async fn post_bytes(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Value, ClientError> {
        let request = self
            .request(Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.send(request).await
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            server: self.target.server.clone(),
            source,
        }
    }
}

/// A failed response as an error: its problem `detail` and field `errors`, or the
/// status and body text when it is not problem+json (e.g. from a proxy).
fn problem(status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let detail = parsed
        .as_ref()
        .and_then(|p| p["detail"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            match text.is_empty() {
                true => format!("the server answered {status}"),
                false => format!(
                    "the server answered {status}: {}",
                    text.chars().take(200).collect::<String>()
                ),
            }
        });
    let errors = parsed
        .as_ref()
        .and_then(|p| p["errors"].as_array())
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or("?").to_string(),
                        e["message"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ClientError::Problem {
        status,
        detail,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_show_their_detail_and_field_errors() {
        let body = br#"{"type":"x","title":"Unprocessable Entity","status":422,"detail":"invalid newsletter","errors":[{"field":"from","message":"bad address"}]}"#;
        let error = problem(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(error.report(), "error: invalid newsletter\n  from: bad address");
        // One field's problem, whose detail is that field's error: printed once.
        let body = br#"{"type":"x","title":"Unprocessable Entity","status":422,"detail":"subject: line 1, column 10: syntax error","errors":[{"field":"subject","message":"line 1, column 10: syntax error"}]}"#;
        let error = problem(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(error.report(), "error: subject: line 1, column 10: syntax error");
        let error = problem(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(
            error.report(),
            "error: the server answered 502 Bad Gateway: <html>bad gateway</html>"
        );
    }
}
