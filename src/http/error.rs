//! The one place errors become HTTP responses. Every error body is RFC 9457
//! `application/problem+json` with a stable `type`, the status, and a `detail` that names
//! the problem. Internal errors are logged here, in the request's span, and the client
//! gets a generic detail: nothing about files, the database or stack traces leaks out.

use axum::Json;
use axum::extract::FromRequest;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::import::ImportError;
use crate::policy::PolicyError;
use crate::runner::RunnerError;
use crate::store::StoreError;

/// One problem with one field of the input, for validation errors.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Where the problem is, e.g. `email` or `[3].email`.
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    /// Understood, and refused (the console's CSRF and same-site checks).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Invalid { detail: String, errors: Vec<FieldError> },
    #[error("{0}")]
    Unavailable(String),
    /// A link that worked once and has expired.
    #[error("{0}")]
    Gone(String),
    /// Too many requests from one client; it may try again after the seconds given.
    #[error("{0}")]
    TooManyRequests(String, u64),
    /// Logged with its cause; the client sees a generic message.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>) -> Self {
        ApiError::Invalid {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// A validation problem with one field: `detail` names it and `errors` carries it.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::Invalid {
            detail: format!("{field}: {message}"),
            errors: vec![FieldError {
                field: field.to_string(),
                message,
            }],
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation-failed"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone"),
            ApiError::TooManyRequests(..) => (StatusCode::TOO_MANY_REQUESTS, "too-many-requests"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// The answer to a request whose handling panicked: a 500 like any internal error.
/// The panic itself (with where it happened) is logged by the panic hook.
pub(super) fn panicked(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let why = crate::logging::panic_message(payload.as_ref());
    ApiError::Internal(format!("the request's handler panicked: {why}")).into_response()
}

/// An RFC 9457 problem: the body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Stable per kind of problem, e.g. `https://letterbox.invalid/problems/not-found`.
    #[serde(rename = "type")]
    kind: String,
    pub(super) title: String,
    pub(super) status: u16,
    /// What went wrong, for people.
    pub(super) detail: String,
    /// For validation problems: each field that is wrong and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) errors: Vec<FieldError>,
}

impl ApiError {
    /// The problem this error shows, and the seconds of its `Retry-After` if it has one.
    /// An internal error's cause is logged here and not part of it.
    pub(super) fn problem(self) -> (Problem, Option<u64>) {
        let (status, slug) = self.parts();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(cause, "internal error");
        }
        let detail = self.to_string();
        let retry_after = match &self {
            ApiError::TooManyRequests(_, seconds) => Some(*seconds),
            _ => None,
        };
        let errors = match self {
            ApiError::Invalid { errors, .. } => errors,
            _ => Vec::new(),
        };
        let problem = Problem {
            kind: format!("https://letterbox.invalid/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            status: status.as_u16(),
            detail,
            errors,
        };
        (problem, retry_after)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (problem, retry_after) = self.problem();
        let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"letterbox\""),
            );
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            StoreError::Conflict(detail) => ApiError::Conflict(detail),
            StoreError::Unstorable(detail) => ApiError::invalid(detail),
            StoreError::Closed => ApiError::Unavailable("the server is shutting down".into()),
            // A failing database is a state that heals, not a bug: 503, so clients and
            // load balancers try again. The cause (hosts, paths) stays in the log.
            StoreError::Unavailable(_) | StoreError::BatchFailed(_) => {
                tracing::warn!(cause = %e, "store unavailable");
                ApiError::Unavailable("the database is unavailable right now; try again shortly".into())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ImportError> for ApiError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Invalid(detail) => ApiError::invalid(detail),
            // What was committed stays; the message says how much.
            e @ ImportError::Interrupted { .. } => ApiError::BadRequest(e.to_string()),
            ImportError::Store(e) => e.into(),
        }
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::InvalidComponent(_)
            | PolicyError::RefusedImport { .. }
            | PolicyError::TooMuchMemory { .. }
            | PolicyError::CompileMemory { .. }
            | PolicyError::WrongWorld { .. } => ApiError::invalid(e.to_string()),
            // A stored policy failing when run for a request (e.g. a preview).
            PolicyError::Trap { .. }
            | PolicyError::Rejected { .. }
            | PolicyError::BadReaction { .. }
            | PolicyError::OutputTooLarge { .. } => ApiError::invalid(e.to_string()),
            PolicyError::Engine(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<RunnerError> for ApiError {
    fn from(e: RunnerError) -> Self {
        match e {
            RunnerError::Store(e) => e.into(),
            RunnerError::Policy(e) => e.into(),
            RunnerError::Invalid(detail) => ApiError::invalid(detail),
            e @ RunnerError::InvalidFields(_) => {
                let detail = e.to_string();
                let RunnerError::InvalidFields(fields) = e else {
                    unreachable!()
                };
                ApiError::Invalid {
                    detail,
                    errors: fields
                        .into_iter()
                        .map(|(field, message)| FieldError { field, message })
                        .collect(),
                }
            }
            RunnerError::Conflict(detail) => ApiError::Conflict(detail),
            RunnerError::ShuttingDown => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<crate::providers::ProviderError> for ApiError {
    fn from(e: crate::providers::ProviderError) -> Self {
        use crate::providers::ProviderError;
        match e {
            ProviderError::Off(detail) => ApiError::NotFound(detail.into()),
            ProviderError::Unauthenticated(detail) => ApiError::Unauthorized(detail),
            ProviderError::Invalid(detail) => ApiError::BadRequest(detail),
            // The provider retries a 503: the certificate may be reachable then.
            ProviderError::Unavailable(detail) => {
                tracing::warn!(cause = %detail, "provider webhook");
                ApiError::Unavailable(detail)
            }
            ProviderError::Store(e) => e.into(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let detail = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => ApiError::invalid(detail),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "expected a JSON body with `Content-Type: application/json`".into(),
            ),
            JsonRejection::BytesRejection(b) => b.into(),
            _ => ApiError::BadRequest(detail),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", rejection.body_text()))
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

/// `axum::Json` with our error body on rejection, which also refuses strings with a
/// NUL character (`\u0000`), naming where: PostgreSQL's text cannot hold one, and a
/// request must mean the same on every backend.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(request.headers()) {
            return Err(ApiError::UnsupportedMediaType(
                "expected a JSON body with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(request, state).await?;
        refuse_nul(&bytes)?;
        // Every body taken this way is an object; serde would also read a struct from
        // an array of its fields in order (`[null, null]`), which no client means.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(ApiError::invalid("the body must be a JSON object, not an array"));
        }
        let Json(value) = Json::<T>::from_bytes(&bytes)?;
        Ok(ApiJson(value))
    }
}

/// A large body (a policy component, tens of MB) read into one buffer sized by its
/// `Content-Length`. `Bytes`' own extractor gathers the chunks and then copies them
/// into one, holding the body twice at its peak. The route's `DefaultBodyLimit`
/// applies as to any extractor.
pub struct UploadBody(pub axum::body::Bytes);

/// The most an upload's buffer is sized ahead by what a client says it will send.
const MAX_PRESIZE: usize = 256 << 20;

impl<S: Send + Sync> FromRequest<S> for UploadBody {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, _: &S) -> Result<Self, ApiError> {
        use axum::RequestExt;
        use futures_util::StreamExt;
        let announced = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let mut chunks = request.into_limited_body().into_data_stream();
        let mut body = Vec::with_capacity(announced.min(MAX_PRESIZE));
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>());
                if too_large {
                    ApiError::PayloadTooLarge(format!("request body too large: {e}"))
                } else {
                    ApiError::BadRequest(format!("failed to read the request body: {e}"))
                }
            })?;
            body.extend_from_slice(&chunk);
        }
        Ok(UploadBody(body.into()))
    }
}

/// Refuses a JSON body with a NUL character (`\u0000`) in a string or key, naming
/// where. Only a body that spells the escape is parsed for it.
pub fn refuse_nul(body: &[u8]) -> Result<(), ApiError> {
    if !body.windows(6).any(|w| w == b"\\u0000") {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(()); // not JSON: the caller's parser says so
    };
    match crate::domain::nul_at(&value, String::new()) {
        Some(field) => Err(ApiError::field(
            if field.is_empty() { "body" } else { &field },
            "may not contain the NUL character (U+0000)",
        )),
        None => Ok(()),
    }
}

/// `application/json` or `application/*+json`, as axum's `Json` accepts.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `axum::extract::Path` with our error body on rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `axum::extract::Query` with our error body on rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);
