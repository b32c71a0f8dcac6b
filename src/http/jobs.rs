//! Send jobs: progress and the per-recipient log.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiPath, ApiQuery};
use super::{ApiError, AppState};
use crate::domain::Job;

const MAX_PAGE: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/deliveries", get(deliveries))
        .route("/v1/jobs/{id}/resume", post(resume))
}

async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<Job>, ApiError> {
    Ok(Json(state.store.job(id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    /// Subscriber id to continue after (the previous page's `next`).
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

/// One page of a job's deliveries, in subscriber id order, with the cursor for the next.
async fn deliveries(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    state.store.job(id).await?;
    let items = state.store.deliveries_after(id, page.after, limit).await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|d| d.subscriber_id))
        .flatten();
    Ok(Json(json!({ "items": items, "next": next })))
}

/// Resumes a paused job (409 if it is not paused).
async fn resume(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<Job>, ApiError> {
    Ok(Json(state.runner.resume(id).await?))
}
