//! Newsletters and their subscribers.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{ApiJson, ApiPath, FieldError};
use super::{ApiError, AppState};
use crate::domain::{ImportSummary, NewSubscriber, Newsletter};
use crate::mail;

/// Subscriber batches are bigger than the usual request; 32 MiB is ~200k rows.
const SUBSCRIBERS_BODY_LIMIT: usize = 32 << 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/newsletters", post(create))
        .route("/v1/newsletters/{id}", get(show))
        .route(
            "/v1/newsletters/{id}/subscribers",
            post(add_subscribers).layer(DefaultBodyLimit::max(SUBSCRIBERS_BODY_LIMIT)),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateNewsletter {
    name: String,
    from: String,
}

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateNewsletter>,
) -> Result<(StatusCode, Json<Newsletter>), ApiError> {
    let name = body.name.trim().to_string();
    let mut errors = Vec::new();
    if name.is_empty() {
        errors.push(FieldError {
            field: "name".into(),
            message: "must not be empty".into(),
        });
    }
    let from = mail::parse_mailbox(&body.from).map_err(|e| {
        errors.push(FieldError {
            field: "from".into(),
            message: e.to_string(),
        })
    });
    let (Ok(from), true) = (from, errors.is_empty()) else {
        return Err(ApiError::Invalid {
            detail: "invalid newsletter".into(),
            errors,
        });
    };
    let newsletter = state.store.create_newsletter(name, from).await?;
    Ok((StatusCode::CREATED, Json(newsletter)))
}

async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Newsletter>, ApiError> {
    Ok(Json(state.store.newsletter(id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscriberInput {
    email: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
}

impl SubscriberInput {
    /// Checks the email; returns the subscriber to store or why the email is invalid.
    pub(super) fn validate(self) -> Result<NewSubscriber, String> {
        let email = mail::parse_address(&self.email).map_err(|e| e.to_string())?;
        Ok(NewSubscriber {
            email,
            name: self.name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()),
            attributes: self.attributes.unwrap_or_default(),
        })
    }
}

/// Adds or updates (by email) a batch of subscribers. The batch is all or nothing: any
/// invalid row refuses the request, with every bad row listed.
async fn add_subscribers(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(rows): ApiJson<Vec<SubscriberInput>>,
) -> Result<(StatusCode, Json<ImportSummary>), ApiError> {
    let mut errors = Vec::new();
    let mut subscribers = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        match row.validate() {
            Ok(subscriber) => subscribers.push(subscriber),
            Err(message) => errors.push(FieldError {
                field: format!("[{i}].email"),
                message,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid {
            detail: format!("{} subscriber(s) are invalid; nothing was added", errors.len()),
            errors,
        });
    }
    let summary = state.store.upsert_subscribers(id, subscribers).await?;
    Ok((StatusCode::CREATED, Json(summary)))
}
