//! Jobs: the list, and one job's live view (the API's own progress events, read by the
//! script: counts, rate, ETA, stalled and why), its controls (pause, resume, cancel,
//! retry the failed), its deliveries filtered by state, and their CSV export.

use std::convert::Infallible;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::auth::{Form, Session};
use super::{PageError, Path, Query, flash, page, see_other};
use crate::domain::{Delivery, DeliveryState, JobState, StateKind};
use crate::http::jobs::{job_stream, with_progress};
use crate::http::{ApiError, AppState};

/// Jobs and deliveries per page.
const PAGE: usize = 50;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console/jobs", get(list))
        .route("/console/jobs/{id}", get(show))
        .route("/console/jobs/{id}/events", get(events))
        .route("/console/jobs/{id}/deliveries.csv", get(export))
        .route("/console/jobs/{id}/{action}", post(act))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    before: Option<u64>,
}

async fn list(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<ListQuery>,
) -> Result<Response, PageError> {
    let filter = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            JobState::parse(s)
                .ok_or_else(|| ApiError::field("state", format!("{s:?} is not a job state")))?,
        ),
    };
    let jobs = state.store.list_jobs(filter, query.before, PAGE).await?;
    let next = (jobs.len() == PAGE).then(|| jobs.last().map(|j| j.id)).flatten();
    let context = json!({
        "jobs": jobs,
        "next": next,
        "state": query.state.unwrap_or_default(),
        "states": JobState::ALL.map(JobState::as_str),
        "section": "jobs",
    });
    Ok(page(&state, StatusCode::OK, "jobs.html", &session, context))
}

#[derive(Deserialize)]
struct ShowQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    ok: Option<String>,
    #[serde(default)]
    requeued: Option<u64>,
}

/// One delivery as a row: its state and what it says.
fn row(d: &Delivery) -> serde_json::Value {
    let (when, detail) = match &d.state {
        DeliveryState::Pending => (None, String::new()),
        DeliveryState::Sending { since } => (Some(*since), String::new()),
        DeliveryState::Delivered { at, reply } => (Some(*at), reply.clone()),
        DeliveryState::Skipped { reason } => (None, reason.clone()),
        DeliveryState::Retrying {
            next_attempt_at_ms,
            last_error,
        } => (Some(next_attempt_at_ms / 1000), last_error.clone()),
        DeliveryState::Failed { at, reason } => (Some(*at), reason.clone()),
        DeliveryState::Cancelled { at } => (Some(*at), String::new()),
    };
    json!({
        "subscriber_id": d.subscriber_id, "email": d.email, "attempts": d.attempts,
        "state": d.state.kind().as_str(), "when": when, "detail": detail,
    })
}

async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<u64>,
    Query(query): Query<ShowQuery>,
) -> Result<Response, PageError> {
    let job = state.store.job(id).await?;
    let kind = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            StateKind::parse(s)
                .ok_or_else(|| ApiError::field("state", format!("{s:?} is not a delivery state")))?,
        ),
    };
    let deliveries = state
        .store
        .deliveries(id, kind, query.after.unwrap_or(0), PAGE)
        .await?;
    let next = (deliveries.len() == PAGE)
        .then(|| deliveries.last().map(|d| d.subscriber_id))
        .flatten();
    let letter = state.store.letter(job.letter_id).await.ok();
    let finished = job.state.is_finished();
    let flash = match (query.ok.as_deref(), query.requeued) {
        (Some("retried"), Some(n)) => Some(format!("{n} failed recipient(s) requeued.")),
        (code, _) => flash(code).map(str::to_string),
    };
    let context = json!({
        "job": with_progress(&state, job).await,
        "letter": letter,
        "finished": finished,
        "deliveries": deliveries.iter().map(row).collect::<Vec<_>>(),
        "next": next,
        "state": query.state.unwrap_or_default(),
        "states": StateKind::ALL.map(StateKind::as_str),
        "flash": flash,
        "section": "jobs",
    });
    Ok(page(&state, StatusCode::OK, "job.html", &session, context))
}

/// The API's progress events for the job (`progress`, then `end`), for the script.
async fn events(
    State(state): State<AppState>,
    _session: Session,
    Path(id): Path<u64>,
) -> Result<Response, PageError> {
    let first = state.store.job(id).await?;
    let stream = job_stream(state, first);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// Every delivery of the job as CSV, read a page at a time as it is sent.
async fn export(
    State(state): State<AppState>,
    _session: Session,
    Path(id): Path<u64>,
) -> Result<Response, PageError> {
    state.store.job(id).await?;
    let pages = futures_util::stream::unfold(Some(0u64), move |after| {
        let state = state.clone();
        async move {
            let after = after?;
            let header = (after == 0).then(|| "subscriber_id,email,state,attempts,at,detail\n".to_string());
            match state.store.deliveries(id, None, after, 1000).await {
                Ok(page) => {
                    let next = (page.len() == 1000)
                        .then(|| page.last().map(|d| d.subscriber_id))
                        .flatten();
                    let mut out = csv::Writer::from_writer(Vec::new());
                    for d in &page {
                        let r = row(d);
                        let _ = out.write_record([
                            d.subscriber_id.to_string(),
                            d.email.clone(),
                            r["state"].as_str().unwrap_or("").to_string(),
                            d.attempts.to_string(),
                            r["when"]
                                .as_u64()
                                .map(|t| crate::webhooks::rfc3339(t * 1000))
                                .unwrap_or_default(),
                            r["detail"].as_str().unwrap_or("").to_string(),
                        ]);
                    }
                    let mut bytes = header.unwrap_or_default().into_bytes();
                    bytes.extend(out.into_inner().unwrap_or_default());
                    Some((Ok::<_, Infallible>(Bytes::from(bytes)), next))
                }
                Err(e) => {
                    // Headers are gone: the file ends with the reason instead of a row.
                    tracing::error!(job = id, error = %e, "delivery export failed");
                    Some((Ok(Bytes::from(format!("# export stopped: {e}\n"))), None))
                }
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"job-{id}-deliveries.csv\""),
            ),
        ],
        Body::from_stream(pages),
    )
        .into_response())
}

async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(u64, String)>,
    Form(_, _): Form,
) -> Result<Response, PageError> {
    let location = match action.as_str() {
        "pause" => state.runner.pause(id).await.map(|_| "paused".to_string()),
        "resume" => state.runner.resume(id).await.map(|_| "resumed".to_string()),
        "cancel" => state.runner.cancel(id).await.map(|_| "cancelled".to_string()),
        "retry-failed" => state
            .runner
            .retry_failed(id)
            .await
            .map(|(_, n)| format!("retried&requeued={n}")),
        _ => return Err(ApiError::NotFound("no such action".into()).into()),
    }
    .map_err(ApiError::from)?;
    Ok(see_other(&format!("/console/jobs/{id}?ok={location}")))
}
