//! The HTTP API: the only module that knows axum. Handlers validate input, call the
//! store or the runner, and shape JSON; they hold no state of their own.

mod error;
mod jobs;
mod letters;
mod newsletters;
mod plugins;
mod unsubscribe;

use axum::Router;
use axum::http::Request;
use axum::routing::get;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, FieldError};

use crate::runner::Runner;
use crate::store::Store;

/// Shared handles for every handler; all fields are cheap clones of `Arc`s.
#[derive(Clone)]
pub struct AppState {
    /// Reads and simple writes (newsletters, subscribers, letters).
    pub store: Store,
    /// Anything that involves policies or jobs.
    pub runner: Runner,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .merge(newsletters::router())
        .merge(letters::router())
        .merge(plugins::router(state.runner.policy_limits().max_upload_bytes))
        .merge(jobs::router())
        .merge(unsubscribe::router())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}
