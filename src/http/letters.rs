//! Letters, and submitting them as send jobs.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::{ApiJson, ApiPath};
use super::{ApiError, AppState};
use crate::domain::{Letter, PluginKind, now};
use crate::policy::Verdict;
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};
use crate::runner::{PreviewTarget, SendOptions};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/newsletters/{id}/letters", post(create))
        .route("/v1/letters/{id}", get(show))
        .route("/v1/letters/{id}/send", post(send))
        .route("/v1/letters/{id}/preview", post(preview))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateLetter {
    subject: String,
    text: String,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    params: Option<Map<String, Value>>,
}

async fn create(
    State(state): State<AppState>,
    ApiPath(newsletter_id): ApiPath<u64>,
    ApiJson(body): ApiJson<CreateLetter>,
) -> Result<(StatusCode, Json<Letter>), ApiError> {
    if body.subject.trim().is_empty() {
        return Err(ApiError::invalid("subject must not be empty"));
    }
    let filter = body.filter.unwrap_or_else(|| DEFAULT_FILTER_NAME.to_string());
    let template = body.template.unwrap_or_else(|| DEFAULT_TEMPLATE_NAME.to_string());
    // Named policies must exist now (their version is fixed only when a job starts).
    state.runner.resolve(&filter, PluginKind::Filter).await?;
    state.runner.resolve(&template, PluginKind::Template).await?;
    let letter = state
        .store
        .create_letter(Letter {
            id: 0,
            newsletter_id,
            subject: body.subject,
            text: body.text,
            html: body.html,
            filter,
            template,
            params: body.params.unwrap_or_default(),
            created_at: now(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(letter)))
}

async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<Letter>, ApiError> {
    Ok(Json(state.store.letter(id).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    #[serde(default)]
    concurrency: Option<u32>,
}

/// Starts a send job. The body is optional (`{"concurrency": N}`).
async fn send(
    State(state): State<AppState>,
    ApiPath(letter_id): ApiPath<u64>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: SendRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SendRequest::default()
    } else {
        serde_json::from_slice::<Option<SendRequest>>(&body)
            .map_err(|e| ApiError::invalid(format!("invalid send request: {e}")))?
            .unwrap_or_default()
    };
    let job = state
        .runner
        .submit(
            letter_id,
            SendOptions {
                concurrency: request.concurrency,
            },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job_id": job.id, "job": job })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    #[serde(default)]
    subscriber_id: Option<u64>,
    #[serde(default)]
    recipient: Option<super::newsletters::SubscriberInput>,
}

/// Runs the letter's policies for one subscriber (`subscriber_id`) or an inline
/// `recipient` and shows the decision and the message. Sends nothing.
async fn preview(
    State(state): State<AppState>,
    ApiPath(letter_id): ApiPath<u64>,
    ApiJson(body): ApiJson<PreviewRequest>,
) -> Result<Json<Value>, ApiError> {
    let target = match (body.subscriber_id, body.recipient) {
        (Some(id), None) => PreviewTarget::Subscriber(id),
        (None, Some(recipient)) => {
            PreviewTarget::Inline(recipient.validate().map_err(|e| ApiError::Invalid {
                detail: "invalid recipient".into(),
                errors: vec![super::FieldError {
                    field: "recipient.email".into(),
                    message: e,
                }],
            })?)
        }
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of subscriber_id and recipient",
            ));
        }
    };
    let preview = state.runner.preview(letter_id, target).await?;
    let mut out = json!({ "filter": preview.filter, "template": preview.template });
    match preview.verdict {
        Verdict::Skip(reason) => {
            out["decision"] = json!("skip");
            out["reason"] = json!(reason);
        }
        Verdict::Send(rendered) => {
            out["decision"] = json!("send");
            out["rendered"] = json!({
                "subject": rendered.subject,
                "text": rendered.text,
                "html": rendered.html,
                "headers": rendered.headers.into_iter().map(|(n, v)| json!({ "name": n, "value": v })).collect::<Vec<_>>(),
            });
            out["message"] = json!(preview.message);
        }
    }
    Ok(Json(out))
}
