//! Automations over HTTP: create one (its policy compiled and its config checked by the
//! policy's `validate` first), change it (a new version), pause, resume, delete, and
//! read its versions, timers and failures.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiJson, ApiPath, ApiQuery, FieldError};
use super::{ApiError, AppState, page_limit};
use crate::automations::{Automation, AutomationSpec, AutomationState, AutomationVersion, Failure, Timer};
use crate::policy::PolicyError;
use crate::runner::RunnerError;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, change, delete))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(versions))
        .routes(routes!(timers))
        .routes(routes!(failures))
        .routes(routes!(retry_failures))
}

/// Most event types one automation listens to.
const MAX_EVENT_TYPES: usize = 32;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AutomationInput {
    /// 1 to 64 letters, digits, `-`, `_` or `.`; unique.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._-]+$")]
    name: String,
    /// The automation policy: a plugin of kind `automation`, by name (its latest
    /// version, whenever it runs) or `name@sha256` (that version).
    #[schema(min_length = 1)]
    policy: String,
    /// The event types it is called for: exact (`subscriber.created`, `custom.purchase`),
    /// a prefix (`subscriber.*`, `custom.*`) or `*` for every event.
    #[schema(min_items = 1, max_items = 32, inline)]
    events: Vec<EventType>,
    /// Only events of this newsletter.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9_223_372_036_854_775_807_i64)]
    newsletter_id: Option<u64>,
    /// What the policy's `prepare` and `validate` are given; `{}` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    config: Option<Map<String, Value>>,
}

/// An event type or a prefix of types, as an automation listens to it (and a webhook
/// is sent it).
#[derive(Deserialize, ToSchema)]
#[schema(
    max_length = 100,
    pattern = r"^(\*|custom\.\*|custom\.[a-z0-9_-]+(\.[a-z0-9_-]+)*|subscriber\.(\*|created|confirmed|updated|unsubscribed|bounced|complained|reinstated|erased)|delivery\.(\*|failed|bounced|complained|blocked)|job\.(\*|created|started|paused|resumed|completed|cancelled|failed)|message\.(\*|queued|sent|skipped|failed))$"
)]
#[serde(transparent)]
pub(super) struct EventType(String);

/// The types `input` names, checked; each problem is added to `errors`.
pub(super) fn event_types(
    input: &[EventType],
    errors: &mut Vec<FieldError>,
) -> Result<Vec<String>, ApiError> {
    let mut problem = |field: String, message: String| errors.push(FieldError { field, message });
    if input.is_empty() || input.len() > MAX_EVENT_TYPES {
        problem(
            "events".into(),
            format!("must name 1 to {MAX_EVENT_TYPES} event types"),
        );
    }
    let mut events = Vec::new();
    for (i, EventType(kind)) in input.iter().enumerate() {
        if kind.trim() == "*" {
            events.push("*".to_string());
            continue;
        }
        match super::events::parse_types(Some(kind)) {
            Ok(parsed) if parsed.len() == 1 => events.push(parsed.into_iter().next().unwrap_or_default()),
            Ok(_) => problem(format!("events[{i}]"), format!("{kind:?} is not one event type")),
            Err(ApiError::Invalid { errors: found, .. }) => {
                for e in found {
                    problem(format!("events[{i}]"), e.message);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(events)
}

/// The spec `input` describes, checked: its name and event types, its newsletter, its
/// policy (an automation, compiled) and its config (the policy's `validate`).
async fn checked(state: &AppState, input: AutomationInput) -> Result<AutomationSpec, ApiError> {
    let mut errors = Vec::new();
    let events = event_types(&input.events, &mut errors)?;
    let mut problem = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.into(),
            message,
        })
    };
    let name = input.name.trim().to_string();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        problem(
            "name",
            "must be 1 to 64 characters of letters, digits, '-', '_' or '.'".into(),
        );
    }
    if let Some(id) = input.newsletter_id {
        super::int64("newsletter_id", Some(id))?;
        match state.store.newsletter(id).await {
            Ok(_) => {}
            Err(crate::store::StoreError::NotFound { .. }) => {
                problem("newsletter_id", format!("there is no newsletter {id}"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid {
            detail: "invalid automation".into(),
            errors,
        });
    }
    let config = input.config.unwrap_or_default();
    let policy = state
        .runner
        .automation_policy(&input.policy)
        .await
        .map_err(|e| match e {
            RunnerError::Invalid(message) => ApiError::field("policy", message),
            RunnerError::Policy(e) if e.failed_policy().is_none() && !matches!(e, PolicyError::Engine(_)) => {
                ApiError::field("policy", format!("{:?} cannot be used: {e}", input.policy))
            }
            e => e.into(),
        })?;
    let automaton = std::sync::Arc::new(state.runner.policies().automaton(policy, &config)?);
    let problems = automaton.validate_async().await.map_err(|e| match e {
        PolicyError::Engine(_) => ApiError::from(e),
        e => ApiError::field("config", format!("checking the config failed: {e}")),
    })?;
    if !problems.is_empty() {
        return Err(ApiError::Invalid {
            detail: format!(
                "the policy refuses the config: {}",
                problems
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            errors: problems
                .into_iter()
                .map(|p| FieldError {
                    field: p.field,
                    message: p.message,
                })
                .collect(),
        });
    }
    Ok(AutomationSpec {
        name,
        policy: input.policy,
        events,
        newsletter_id: input.newsletter_id,
        config,
    })
}

/// Creates an automation, active at once: it is called for events recorded from now on
/// and for the timers it starts.
#[utoipa::path(post, operation_id = "create_automation", path = "/v1/automations", tag = "automations",
    request_body = AutomationInput, responses((status = 201, body = Automation)))]
async fn create(
    State(state): State<AppState>,
    ApiJson(input): ApiJson<AutomationInput>,
) -> Result<(StatusCode, Json<Automation>), ApiError> {
    let spec = checked(&state, input).await?;
    Ok((
        StatusCode::CREATED,
        Json(state.store.create_automation(spec).await?),
    ))
}

/// Every automation.
#[utoipa::path(get, operation_id = "list_automations", path = "/v1/automations", tag = "automations",
    responses((status = 200, body = Vec<Automation>)))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<Automation>>, ApiError> {
    Ok(Json(state.store.list_automations().await?))
}

/// One automation: its spec, state, cursor in the event log and counts.
#[utoipa::path(get, operation_id = "show_automation", path = "/v1/automations/{id}", tag = "automations",
    params(("id" = u64, Path)), responses((status = 200, body = Automation)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Automation>, ApiError> {
    Ok(Json(state.store.automation(id).await?))
}

/// Changes an automation: a new version of its spec. Its cursor, timers and states stay.
#[utoipa::path(put, operation_id = "change_automation", path = "/v1/automations/{id}", tag = "automations",
    params(("id" = u64, Path)), request_body = AutomationInput, responses((status = 200, body = Automation)))]
async fn change(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(input): ApiJson<AutomationInput>,
) -> Result<Json<Automation>, ApiError> {
    state.store.automation(id).await?;
    let spec = checked(&state, input).await?;
    Ok(Json(state.store.update_automation(id, spec).await?))
}

/// Deletes an automation with its timers, states, failures and sends not yet queued
/// as jobs.
#[utoipa::path(delete, operation_id = "delete_automation", path = "/v1/automations/{id}", tag = "automations",
    params(("id" = u64, Path)), responses((status = 204)))]
async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<StatusCode, ApiError> {
    state.store.delete_automation(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses an automation: events recorded meanwhile wait for it, and so do its timers.
#[utoipa::path(post, operation_id = "pause_automation", path = "/v1/automations/{id}/pause", tag = "automations",
    params(("id" = u64, Path)), responses((status = 200, body = Automation)))]
async fn pause(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Automation>, ApiError> {
    let paused = state
        .store
        .set_automation_state(id, AutomationState::Paused, Some("paused by request".into()))
        .await?;
    Ok(Json(paused))
}

/// Resumes an automation where it stopped: the events recorded while it was paused
/// come first.
#[utoipa::path(post, operation_id = "resume_automation", path = "/v1/automations/{id}/resume", tag = "automations",
    params(("id" = u64, Path)), responses((status = 200, body = Automation)))]
async fn resume(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Automation>, ApiError> {
    let resumed = state
        .store
        .set_automation_state(id, AutomationState::Active, None)
        .await?;
    Ok(Json(resumed))
}

/// An automation's versions, oldest first.
#[utoipa::path(get, operation_id = "automation_versions", path = "/v1/automations/{id}/versions", tag = "automations",
    params(("id" = u64, Path)), responses((status = 200, body = Vec<AutomationVersion>)))]
async fn versions(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Vec<AutomationVersion>>, ApiError> {
    Ok(Json(state.store.automation_versions(id).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct TimersQuery {
    /// Resume after this subscriber's timer named `after_name` (from the last page).
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after_subscriber: Option<u64>,
    after_name: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// An automation's pending timers, by subscriber and name.
#[utoipa::path(get, operation_id = "automation_timers", path = "/v1/automations/{id}/timers", tag = "automations",
    params(("id" = u64, Path), TimersQuery), responses((status = 200, body = Vec<Timer>)))]
async fn timers(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<TimersQuery>,
) -> Result<Json<Vec<Timer>>, ApiError> {
    let limit = page_limit(query.limit)?;
    state.store.automation(id).await?;
    let after = match (query.after_subscriber, query.after_name) {
        (Some(s), Some(n)) => Some((s, n)),
        (None, None) => None,
        _ => {
            return Err(ApiError::invalid(
                "after_subscriber and after_name go together (the last timer of the previous page)",
            ));
        }
    };
    Ok(Json(state.store.timers(id, after, limit).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct FailuresQuery {
    /// Failures after this id.
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after: Option<u64>,
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RetryInput {
    /// The failures to retry; absent or empty (`{}`): the oldest 1,000.
    #[serde(default)]
    #[schema(max_items = 1000)]
    ids: Vec<u64>,
}

/// Retries failed events and timers: each is due again now, and the policy (its current
/// version) is called for it in the next turn, whose effects commit once as any turn's.
/// A failed timer the policy has started again since is kept as it is (`kept`).
#[utoipa::path(post, operation_id = "retry_automation_failures", path = "/v1/automations/{id}/failures/retry",
    tag = "automations", params(("id" = u64, Path)), request_body = RetryInput,
    responses((status = 200, body = crate::automations::Retried)))]
async fn retry_failures(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(input): ApiJson<RetryInput>,
) -> Result<Json<crate::automations::Retried>, ApiError> {
    if input.ids.len() > 1000 {
        return Err(ApiError::field("ids", "at most 1000 at a time"));
    }
    for id in &input.ids {
        super::int64("ids", Some(*id))?;
    }
    Ok(Json(state.store.retry_failures(id, input.ids, 1000).await?))
}

/// The events and timers an automation failed on, oldest first, with the reason.
#[utoipa::path(get, operation_id = "automation_failures", path = "/v1/automations/{id}/failures", tag = "automations",
    params(("id" = u64, Path), FailuresQuery), responses((status = 200, body = Vec<Failure>)))]
async fn failures(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<FailuresQuery>,
) -> Result<Json<Vec<Failure>>, ApiError> {
    let limit = page_limit(query.limit)?;
    state.store.automation(id).await?;
    let after = super::int64("after", query.after)?.unwrap_or(0);
    Ok(Json(state.store.automation_failures(id, after, limit).await?))
}
