//! Webhooks out over HTTP: subscribe an endpoint to event types, change, disable,
//! enable or delete it, read its log of attempts, and send it a test.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::automations::{EventType, event_types};
use super::error::{ApiJson, ApiPath, ApiQuery, FieldError};
use super::{ApiError, AppState, page_limit};
use crate::webhooks::{
    NewWebhook, Secret, SecretError, Webhook, WebhookAttempt, WebhookPatch, WebhookState, check_url,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, change, delete))
        .routes(routes!(deliveries))
        .routes(routes!(test))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct WebhookInput {
    /// Where events are POSTed: http or https. Loopback, private, link-local and other
    /// special addresses are refused (checked on the address connected to), unless the
    /// server runs with `--webhook-allow-private`.
    #[schema(min_length = 1, max_length = 2048)]
    url: String,
    /// The event types it is sent: exact (`subscriber.created`), a prefix
    /// (`subscriber.*`) or `*` for every event.
    #[schema(min_items = 1, max_items = 32, inline)]
    events: Vec<EventType>,
    /// For people.
    #[serde(default)]
    #[schema(max_length = 256)]
    description: Option<String>,
    /// The signing secret, `whsec_` and the base64 of 24 to 64 bytes; one is made when
    /// absent. It is shown once, in this request's answer.
    #[serde(default)]
    #[schema(max_length = 100)]
    secret: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct WebhookChange {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 2048)]
    url: Option<String>,
    #[serde(default)]
    #[schema(min_items = 1, max_items = 32, inline)]
    events: Option<Vec<EventType>>,
    /// An empty string clears it.
    #[serde(default)]
    #[schema(max_length = 256)]
    description: Option<String>,
    /// A new signing secret (`whsec_…`); the old one stops at once.
    #[serde(default)]
    #[schema(max_length = 100)]
    secret: Option<String>,
    /// `disabled` stops sending (its pending sends and its place in the log wait);
    /// `active` goes on from where it stopped.
    #[serde(default)]
    state: Option<WebhookState>,
}

/// An endpoint as the API shows it (never its secret).
#[derive(Serialize, ToSchema)]
struct WebhookView {
    id: u64,
    url: String,
    events: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    state: WebhookState,
    /// Why it is disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
    /// The last event id it has been queued (or passed over).
    cursor: u64,
    /// Since when every attempt has failed (unix ms); absent once one succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    failing_since_ms: Option<u64>,
    created_ms: u64,
    updated_ms: u64,
}

impl From<Webhook> for WebhookView {
    fn from(w: Webhook) -> WebhookView {
        WebhookView {
            id: w.id,
            url: w.url,
            events: w.events,
            description: w.description,
            state: w.state,
            disabled_reason: w.disabled_reason,
            cursor: w.cursor,
            failing_since_ms: w.failing_since_ms,
            created_ms: w.created_ms,
            updated_ms: w.updated_ms,
        }
    }
}

/// A new endpoint and its secret, shown this once.
#[derive(Serialize, ToSchema)]
struct Created {
    webhook: WebhookView,
    /// `whsec_…`: verify each request's `webhook-signature` with it.
    secret: String,
}

#[derive(Serialize, ToSchema)]
struct WebhookList {
    items: Vec<WebhookView>,
}

#[derive(Serialize, ToSchema)]
struct AttemptPage {
    /// Newest first.
    items: Vec<WebhookAttempt>,
    /// `before` for the next (older) page; absent at the oldest.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct TestQueued {
    send_id: u64,
    /// Its `webhook-id` header.
    message_id: String,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AttemptQuery {
    /// Attempts older than this id: the previous page's `next`.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    before: Option<u64>,
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

fn url_checked(state: &AppState, url: &str, errors: &mut Vec<FieldError>) -> String {
    if let Err(message) = check_url(url.trim(), state.webhook_allow_private) {
        errors.push(FieldError {
            field: "url".into(),
            message,
        });
    }
    url.trim().to_string()
}

fn secret_checked(secret: &str, errors: &mut Vec<FieldError>) -> Option<Secret> {
    match Secret::parse(secret.trim()) {
        Ok(s) => Some(s),
        Err(e @ (SecretError::Format | SecretError::Length(_))) => {
            errors.push(FieldError {
                field: "secret".into(),
                message: e.to_string(),
            });
            None
        }
    }
}

fn description(text: Option<String>, errors: &mut Vec<FieldError>) -> Option<String> {
    let text = text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty())?;
    if text.chars().count() > 256 || text.chars().any(char::is_control) {
        errors.push(FieldError {
            field: "description".into(),
            message: "at most 256 characters, on one line".into(),
        });
    }
    Some(text)
}

fn refuse(errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() {
        return Ok(());
    }
    Err(ApiError::Invalid {
        detail: "invalid webhook".into(),
        errors,
    })
}

/// Subscribes an endpoint to event types: it is sent the matching events recorded from
/// now on, each signed (Standard Webhooks), at least once.
#[utoipa::path(post, operation_id = "create_webhook", path = "/v1/webhooks", tag = "webhooks",
    request_body = WebhookInput, responses((status = 201, body = Created)))]
async fn create(
    State(state): State<AppState>,
    ApiJson(input): ApiJson<WebhookInput>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let mut errors = Vec::new();
    let url = url_checked(&state, &input.url, &mut errors);
    let events = event_types(&input.events, &mut errors)?;
    let description = description(input.description, &mut errors);
    let secret = match &input.secret {
        Some(text) => secret_checked(text, &mut errors),
        None => Some(Secret::generate()),
    };
    refuse(errors)?;
    let secret = secret.map(|s| s.to_text()).unwrap_or_default();
    let cursor = *state.store.event_head().borrow();
    let webhook = state
        .store
        .create_webhook(NewWebhook {
            url,
            events,
            description,
            secret: secret.clone(),
            cursor,
        })
        .await?;
    state.webhook_wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(Created {
            webhook: webhook.into(),
            secret,
        }),
    ))
}

/// Every endpoint.
#[utoipa::path(get, operation_id = "list_webhooks", path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList)))]
async fn list(State(state): State<AppState>) -> Result<Json<WebhookList>, ApiError> {
    let items = state
        .store
        .webhooks()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(WebhookList { items }))
}

/// One endpoint: its state (and why it is disabled) and where it is in the log.
#[utoipa::path(get, operation_id = "show_webhook", path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = u64, Path)), responses((status = 200, body = WebhookView)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(state.store.webhook(id).await?.into()))
}

/// Changes an endpoint: its URL, events, description or secret; disables or enables it.
#[utoipa::path(patch, operation_id = "change_webhook", path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = u64, Path)), request_body = WebhookChange, responses((status = 200, body = WebhookView)))]
async fn change(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(input): ApiJson<WebhookChange>,
) -> Result<Json<WebhookView>, ApiError> {
    let mut errors = Vec::new();
    let url = input.url.map(|u| url_checked(&state, &u, &mut errors));
    let events = match &input.events {
        Some(events) => Some(event_types(events, &mut errors)?),
        None => None,
    };
    let clear = input.description.as_deref().is_some_and(|d| d.trim().is_empty());
    let description = match description(input.description, &mut errors) {
        Some(text) => Some(Some(text)),
        None if clear => Some(None),
        None => None,
    };
    let secret = input
        .secret
        .and_then(|s| secret_checked(&s, &mut errors))
        .map(|s| s.to_text());
    refuse(errors)?;
    let patch = WebhookPatch {
        url,
        events,
        description,
        secret,
        state: input.state,
    };
    let webhook = state.store.update_webhook(id, patch).await?;
    state.webhook_wake.notify_one();
    Ok(Json(webhook.into()))
}

/// Deletes an endpoint with its pending sends and its log.
#[utoipa::path(delete, operation_id = "delete_webhook", path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = u64, Path)), responses((status = 204)))]
async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<StatusCode, ApiError> {
    state.store.delete_webhook(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The endpoint's attempts, newest first: when, the HTTP status, the latency, the start
/// of the answer (1 KiB at most) or the error, and when it is tried again.
#[utoipa::path(get, operation_id = "webhook_deliveries", path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = u64, Path), AttemptQuery), responses((status = 200, body = AttemptPage)))]
async fn deliveries(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<AttemptQuery>,
) -> Result<Json<AttemptPage>, ApiError> {
    let limit = page_limit(query.limit)?;
    let before = super::int64("before", query.before)?.unwrap_or(0);
    let items = state.store.webhook_attempts(id, before, limit).await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|a| a.id))
        .flatten();
    Ok(Json(AttemptPage { items, next }))
}

/// Sends the endpoint a test event (`webhook.test`), signed like any other, now (or
/// when it is enabled again).
#[utoipa::path(post, operation_id = "test_webhook", path = "/v1/webhooks/{id}/test", tag = "webhooks",
    params(("id" = u64, Path)), responses((status = 202, body = TestQueued)))]
async fn test(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<(StatusCode, Json<TestQueued>), ApiError> {
    let send = state.store.queue_webhook_test(id).await?;
    state.webhook_wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(TestQueued {
            send_id: send.id,
            message_id: send.message_id(),
        }),
    ))
}
