//! The HTTP API: the only module that knows axum. Handlers validate input, call the
//! store or the runner, and shape JSON; they hold no state of their own.

mod auth;
mod automations;
mod bounces;
mod console;
mod error;
mod events;
pub(crate) mod jobs;
pub(crate) mod letters;
mod messages;
mod metrics;
pub(crate) mod newsletters;
mod nodes;
mod openapi;
mod plugins;
mod providers;
mod subscribe;
mod timeout;
mod unsubscribe;
mod webhooks;

use std::collections::BTreeSet;

use axum::http::Request;
use axum::{Extension, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, FieldError, Problem};
pub use metrics::install as install_metrics;
pub use subscribe::PerIpLimit;

use crate::runner::Runner;
use crate::store::Store;
use crate::tokens::ApiToken;

/// Shared handles for every handler; all fields are cheap clones of `Arc`s.
#[derive(Clone)]
pub struct AppState {
    /// Reads and simple writes (newsletters, subscribers, letters).
    pub store: Store,
    /// Anything that involves policies or jobs.
    pub runner: Runner,
    /// What every `/v1` request must present.
    pub api_token: ApiToken,
    /// Whether `/metrics` may be read without the token.
    pub public_metrics: bool,
    /// How long a request may take before it is answered 503.
    pub request_timeout: std::time::Duration,
    /// Panics a test injects into requests (see `crate::faults`).
    pub faults: crate::faults::Faults,
    /// The provider webhooks' verifiers (`None` where a provider is off).
    pub providers: crate::providers::Providers,
    /// Cancelled when the server starts to stop: responses that go on (event
    /// streams) end, so the graceful shutdown does not wait for them.
    pub stopping: tokio_util::sync::CancellationToken,
    /// The public subscribe form's limit per IP address.
    pub subscribe_limiter: std::sync::Arc<subscribe::PerIpLimit>,
    /// Whether webhook endpoints may be private addresses (`--webhook-allow-private`).
    pub webhook_allow_private: bool,
    /// Wakes the node's webhook worker (an endpoint made or changed, a test queued).
    pub webhook_wake: std::sync::Arc<tokio::sync::Notify>,
    /// The web console's templates, sign-in limit and cookie settings.
    pub console: std::sync::Arc<console::ConsoleState>,
}

pub use console::ConsoleState;

/// The routes, and the OpenAPI document that describes them (served at `/openapi.json`).
pub fn router(state: AppState) -> Router {
    let (router, document) = routes_and_document(&state);
    let document = serde_json::to_value(&document)
        .map(|mut document| {
            openapi::describe_transports(&mut document, state.runner.transport_names());
            document
        })
        .and_then(|document| serde_json::to_vec(&document))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "the OpenAPI document does not serialise");
            b"{}".to_vec()
        });
    router
        .merge(console::router(state.runner.policy_limits().max_upload_bytes))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(Extension(openapi::Document(document.into())))
        .layer(axum::middleware::from_fn_with_state(
            state.request_timeout,
            timeout::limit_time,
        ))
        // A panic while handling a request (a CSV import runs outside the timeout's
        // task) is that request's 500, never the connection's end without an answer.
        .layer(CatchPanicLayer::custom(error::panicked))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

/// Every route, registered with its OpenAPI description in one step (`routes!`).
fn routes_and_document(state: &AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let metrics = OpenApiRouter::new().routes(routes!(metrics::render));
    let (public_metrics, private_metrics) = match state.public_metrics {
        true => (metrics, OpenApiRouter::new()),
        false => (OpenApiRouter::new(), metrics),
    };
    let public = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi::serve))
        .merge(public_metrics)
        .merge(unsubscribe::router())
        .merge(subscribe::router())
        .merge(providers::router());
    let public_paths: BTreeSet<String> = public.get_openapi().paths.paths.keys().cloned().collect();
    // The API proper (and `/metrics` unless public): every route needs the bearer token.
    let api = OpenApiRouter::new()
        .merge(private_metrics)
        .merge(newsletters::router())
        .merge(letters::router())
        .merge(plugins::router(state.runner.policy_limits().max_upload_bytes))
        .merge(jobs::router())
        .merge(events::router())
        .merge(bounces::router())
        .merge(automations::router())
        .merge(webhooks::router())
        .merge(messages::router())
        .merge(nodes::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.faults.clone(),
            inject_faults,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.api_token.clone(),
            auth::require_token,
        ));
    let (router, mut document) = OpenApiRouter::with_openapi(openapi::base())
        .merge(public)
        .merge(api)
        .split_for_parts();
    openapi::finish(&mut document, &public_paths);
    (router, document)
}

/// Where a test's injected panic in a request fires (see `crate::faults`).
async fn inject_faults(
    axum::extract::State(faults): axum::extract::State<crate::faults::Faults>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    faults.check(crate::faults::Point::Request);
    next.run(request).await
}

/// The most items one page of a listing holds.
const MAX_PAGE: usize = 1000;

/// One page of a listing.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The cursor of the following page (the last item's, when the page is full); pass
    /// it as `?cursor=`. `null` on the last page.
    pub next: Option<u64>,
}

/// `items` as a page of at most `limit`, with `cursor` giving an item's cursor.
fn page<T>(items: Vec<T>, limit: usize, cursor: fn(&T) -> u64) -> axum::Json<Page<T>> {
    let next = (items.len() == limit).then(|| items.last().map(cursor)).flatten();
    axum::Json(Page { items, next })
}

/// Whether the request body is CSV (`text/csv`, any parameters): a streamed import.
fn is_csv(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/csv"))
}

/// A listing's `?cursor=` (see `int64`).
fn page_cursor(cursor: Option<u64>) -> Result<Option<u64>, ApiError> {
    int64("cursor", cursor)
}

/// An id or cursor in `field`: ids are int64 in the OpenAPI document (what JSON clients
/// can hold), so a larger one is refused rather than read as an id no row has.
fn int64(field: &str, value: Option<u64>) -> Result<Option<u64>, ApiError> {
    match value {
        Some(v) if v > i64::MAX as u64 => {
            Err(ApiError::field(field, format!("must be at most {}", i64::MAX)))
        }
        other => Ok(other),
    }
}

/// A listing's `?limit=`: 100 when absent, 422 outside 1..=`MAX_PAGE`.
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(limit)
}

/// Alive: the process answers HTTP.
#[utoipa::path(get, path = "/healthz", tag = "meta", responses((status = 200, description = "Alive")))]
async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Ready for work: the store answers and the runner is not shutting down (the server
/// only listens once start-up recovery is done). 503 otherwise, with the reason.
#[utoipa::path(get, path = "/readyz", tag = "meta", responses(
    (status = 200, description = "Ready"),
    (status = 503, description = "Not ready, and why", body = error::Problem, content_type = "application/problem+json")))]
async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if state.runner.is_stopping() {
        return Err(ApiError::Unavailable("shutting down: jobs are draining".into()));
    }
    // The reasons name the store's own error: /readyz is for operators and load
    // balancers, and "why" is what they need when a node is out of rotation.
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("the store does not answer: {e}")))?;
    // The heartbeat is a write every quarter lease: it fails when the database can be
    // read but not written (read-only, out of disk).
    if let Some(why) = state.runner.heartbeat_error() {
        return Err(ApiError::Unavailable(format!(
            "this node's heartbeat fails: {why}"
        )));
    }
    if let Some((why, since)) = state.store.write_failure() {
        let age = crate::domain::now().saturating_sub(since);
        return Err(ApiError::Unavailable(format!(
            "the store cannot write (for {age} s): {why}"
        )));
    }
    let stalls = state.runner.stalls();
    if let Some((job, stall)) = stalls.first() {
        return Err(ApiError::Unavailable(format!(
            "{} job(s) stalled on the store (job {job} since {}): {}",
            stalls.len(),
            stall.since,
            stall.reason
        )));
    }
    Ok(axum::Json(serde_json::json!({ "status": "ready" })))
}
