//! Send jobs: listing, progress (also as Server-Sent Events), the per-recipient log and
//! the controls (pause, resume, cancel, retry-failed).

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiPath, ApiQuery};
use super::{ApiError, AppState, Page, page, page_cursor, page_limit};
use crate::domain::{Counts, Delivery, Job, JobState, StateKind};
use crate::runner::Stall;

/// How often an event stream looks for progress.
const EVENT_POLL: Duration = Duration::from_millis(250);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(deliveries))
        .routes(routes!(events))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(cancel))
        .routes(routes!(retry_failed))
}

/// A job as the API shows it: the stored job and its live rate and ETA.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    #[serde(flatten)]
    job: Job,
    /// Recipients finished per second, recently (0 when not running).
    rate_per_second: f64,
    /// Seconds until the open recipients are done at that rate.
    eta_seconds: Option<u64>,
    /// After `retry-failed`: how many recipients were requeued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) requeued: Option<u64>,
    /// Set while the job cannot progress on this node because the store is failing
    /// (unreachable, a full disk): why, and since when. It clears by itself once the
    /// store answers again, and the job goes on.
    stalled: Option<Stall>,
    /// Set while the job waits on this node before it can send (a policy it uses is
    /// still compiling): why, and since when.
    waiting: Option<Stall>,
    /// Recipient domains this node holds back because their receivers keep refusing
    /// the sender (5.7.x): their recipients wait, as `retrying`, until the pause ends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    paused_domains: Vec<crate::runner::DomainPause>,
}

/// A string that is one of `names`, for the OpenAPI document.
fn one_of(names: impl IntoIterator<Item = &'static str>) -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(names))
        .build()
}

fn job_states() -> utoipa::openapi::schema::Object {
    one_of(JobState::ALL.map(JobState::as_str))
}

fn delivery_states() -> utoipa::openapi::schema::Object {
    one_of(StateKind::ALL.map(StateKind::as_str))
}

/// A `?state=` filter: `parse`d, or 422 naming the states there are (`all`, by `name`).
fn state_filter<T: Copy>(
    value: Option<&str>,
    what: &str,
    parse: fn(&str) -> Option<T>,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<Option<T>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    parse(value).map(Some).ok_or_else(|| {
        let known: Vec<&str> = all.iter().map(|s| name(*s)).collect();
        ApiError::field(
            "state",
            format!("unknown {what} state {value:?}; one of {}", known.join(", ")),
        )
    })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct JobQuery {
    /// Only jobs in this state (scheduled, queued, running, paused, completed,
    /// cancelled, failed).
    #[serde(default)]
    #[param(schema_with = job_states)]
    state: Option<String>,
    /// The previous page's `next`: jobs older than this id.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// Jobs newest first, optionally in one state, a page at a time.
#[utoipa::path(get, operation_id = "list_jobs", path = "/v1/jobs", tag = "jobs", params(JobQuery), responses((status = 200, body = Page<Job>)))]
async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<JobQuery>,
) -> Result<Json<Page<Job>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let wanted = state_filter(
        query.state.as_deref(),
        "job",
        JobState::parse,
        &JobState::ALL,
        JobState::as_str,
    )?;
    let items = state
        .store
        .list_jobs(wanted, page_cursor(query.cursor)?, limit)
        .await?;
    Ok(page(items, limit, |j| j.id))
}

/// A job with its live rate and ETA (while it has a supervisor).
pub(super) async fn with_progress(state: &AppState, job: Job) -> JobView {
    let progress = state.runner.progress(&job).await;
    let stalled = state.runner.stalled(job.id);
    let waiting = state.runner.waiting(job.id);
    let paused_domains = match job.state {
        JobState::Running => state.runner.paused_domains(),
        _ => Vec::new(),
    };
    JobView {
        job,
        rate_per_second: progress.map(|p| p.rate_per_second).unwrap_or(0.0),
        eta_seconds: progress.and_then(|p| p.eta_seconds),
        requeued: None,
        stalled,
        waiting,
        paused_domains,
    }
}

/// One job: state, counts per delivery state, rate and ETA.
#[utoipa::path(get, operation_id = "show_job", path = "/v1/jobs/{id}", tag = "jobs", params(("id" = u64, Path)), responses((status = 200, body = JobView)))]
async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<JobView>, ApiError> {
    let job = state.store.job(id).await?;
    Ok(Json(with_progress(&state, job).await))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeliveryQuery {
    /// Only deliveries in this state (pending, sending, delivered, skipped, retrying,
    /// failed, cancelled).
    #[serde(default)]
    #[param(schema_with = delivery_states)]
    state: Option<String>,
    /// The previous page's `next`: subscriber id to continue after.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// A delivery as the API writes it: `Delivery` with its state's fields beside `state`.
/// Documentation only (what is serialised is `Delivery`): the derived schema of the
/// flattened state is `allOf [oneOf, object]`, which client generators cannot model
/// (openapi-python-client drops the response). Here the state is a plain enum and the
/// fields that only some states have are optional.
#[derive(utoipa::ToSchema)]
#[schema(as = Delivery)]
#[allow(dead_code)]
struct DeliveryRow {
    job_id: u64,
    subscriber_id: u64,
    email: String,
    /// Attempts made so far (a crash re-send counts as one more).
    attempts: u32,
    state: StateKind,
    /// `sending`: since when (unix seconds).
    since: Option<u64>,
    /// `delivered`, `failed`, `cancelled`: when (unix seconds).
    at: Option<u64>,
    /// `delivered`: the SMTP server's reply.
    reply: Option<String>,
    /// `skipped`, `failed`: why.
    reason: Option<String>,
    /// `retrying`: when the next attempt is due (unix milliseconds).
    next_attempt_at_ms: Option<u64>,
    /// `retrying`: the last attempt's error.
    last_error: Option<String>,
}

/// One page of a job's deliveries (all, or those in one state), in subscriber id order,
/// with the cursor for the next.
#[utoipa::path(get, operation_id = "list_deliveries", path = "/v1/jobs/{id}/deliveries", tag = "jobs", params(("id" = u64, Path), DeliveryQuery),
    responses((status = 200, body = Page<DeliveryRow>)))]
async fn deliveries(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<DeliveryQuery>,
) -> Result<Json<Page<Delivery>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let kind = state_filter(
        query.state.as_deref(),
        "delivery",
        StateKind::parse,
        &StateKind::ALL,
        StateKind::as_str,
    )?;
    state.store.job(id).await?;
    let items = state
        .store
        .deliveries(id, kind, page_cursor(query.cursor)?.unwrap_or(0), limit)
        .await?;
    Ok(page(items, limit, |d| d.subscriber_id))
}

/// Progress as Server-Sent Events: a `progress` event with the job (as `GET` shows it)
/// whenever its state or counts change, and a final `end` event once it is completed,
/// cancelled or failed.
#[utoipa::path(get, operation_id = "follow_job", path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = u64, Path)),
    responses((status = 200, description = "`progress` events, then one `end` event; each carries a JobView", content_type = "text/event-stream")))]
async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let first = state.store.job(id).await?;
    let stream = job_stream(state, first);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A job's progress events until it ends or the server starts to stop (a paused job's
/// stream would otherwise hold the graceful shutdown open).
pub(super) fn job_stream(state: AppState, first: Job) -> impl Stream<Item = Result<Event, Infallible>> {
    use futures_util::StreamExt;
    let stopping = state.stopping.clone();
    progress_events(state, first).take_until(stopping.cancelled_owned())
}

/// What an event stream remembers between polls.
struct Watch {
    state: AppState,
    job_id: u64,
    first: Option<Job>,
    last: Option<(JobState, Counts)>,
    ended: bool,
}

fn progress_events(state: AppState, first: Job) -> impl Stream<Item = Result<Event, Infallible>> {
    let watch = Watch {
        state,
        job_id: first.id,
        first: Some(first),
        last: None,
        ended: false,
    };
    futures_util::stream::unfold(watch, |mut w| async move {
        if w.ended {
            return None;
        }
        loop {
            let job = match w.first.take() {
                Some(job) => job,
                None => {
                    tokio::time::sleep(EVENT_POLL).await;
                    w.state.store.job(w.job_id).await.ok()?
                }
            };
            let key = (job.state, job.counts);
            if w.last == Some(key) {
                continue;
            }
            w.last = Some(key);
            w.ended = job.state.is_finished();
            let name = if w.ended { "end" } else { "progress" };
            let body = with_progress(&w.state, job).await;
            let event = Event::default()
                .event(name)
                .json_data(body)
                .unwrap_or_else(|_| Event::default().event(name));
            return Some((Ok(event), w));
        }
    })
}

/// Pauses a job: deliveries in flight finish, no new ones start.
#[utoipa::path(post, operation_id = "pause_job", path = "/v1/jobs/{id}/pause", tag = "jobs", params(("id" = u64, Path)), responses((status = 200, body = JobView)))]
async fn pause(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<JobView>, ApiError> {
    let job = state.runner.pause(id).await?;
    Ok(Json(with_progress(&state, job).await))
}

/// Resumes a paused job (409 if it is not paused).
#[utoipa::path(post, operation_id = "resume_job", path = "/v1/jobs/{id}/resume", tag = "jobs", params(("id" = u64, Path)), responses((status = 200, body = JobView)))]
async fn resume(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<JobView>, ApiError> {
    let job = state.runner.resume(id).await?;
    Ok(Json(with_progress(&state, job).await))
}

/// Cancels a job: recipients not yet sent are marked cancelled.
#[utoipa::path(post, operation_id = "cancel_job", path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = u64, Path)), responses((status = 200, body = JobView)))]
async fn cancel(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<JobView>, ApiError> {
    let job = state.runner.cancel(id).await?;
    Ok(Json(with_progress(&state, job).await))
}

/// Requeues only the failed recipients; returns the job and how many were requeued.
#[utoipa::path(post, operation_id = "retry_failed_recipients", path = "/v1/jobs/{id}/retry-failed", tag = "jobs", params(("id" = u64, Path)), responses((status = 200, body = JobView)))]
async fn retry_failed(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<JobView>, ApiError> {
    let (job, requeued) = state.runner.retry_failed(id).await?;
    let mut out = with_progress(&state, job).await;
    out.requeued = Some(requeued);
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeliveryState;

    /// `DeliveryRow` is a hand-written description of what `Delivery` serialises to:
    /// every state's JSON has only documented keys, with `state` among the enum's
    /// values, and every required key present.
    #[test]
    fn the_documented_delivery_row_matches_what_is_served() {
        let schema = serde_json::to_value(<DeliveryRow as utoipa::PartialSchema>::schema()).unwrap();
        let properties = schema["properties"].as_object().expect("properties");
        let required: Vec<&str> = schema["required"]
            .as_array()
            .expect("required")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let states = [
            DeliveryState::Pending,
            DeliveryState::Sending { since: 1 },
            DeliveryState::Delivered {
                at: 1,
                reply: "250 ok".into(),
            },
            DeliveryState::Skipped {
                reason: "filter".into(),
            },
            DeliveryState::Retrying {
                next_attempt_at_ms: 1,
                last_error: "421".into(),
            },
            DeliveryState::Failed {
                at: 1,
                reason: "550".into(),
            },
            DeliveryState::Cancelled { at: 1 },
        ];
        for state in states {
            let kind = state.kind();
            let row = serde_json::to_value(Delivery {
                job_id: 1,
                subscriber_id: 2,
                email: "a@example.com".into(),
                attempts: 1,
                state,
            })
            .unwrap();
            let row = row.as_object().unwrap();
            for key in row.keys() {
                assert!(
                    properties.contains_key(key),
                    "{kind:?}: `{key}` is not documented"
                );
            }
            for key in &required {
                assert!(row.contains_key(*key), "{kind:?}: required `{key}` is missing");
            }
            assert_eq!(row["state"], serde_json::to_value(kind).unwrap());
        }
    }
}
