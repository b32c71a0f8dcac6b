//! Provider webhooks: `POST /webhooks/ses`, `/webhooks/mailgun`, `/webhooks/postmark`.
//! They are outside `/v1` and take no bearer token (a provider cannot send one): each
//! request is authenticated by its provider's own means (`crate::providers`) before its
//! content is read or anything recorded. A provider not configured answers 404.
//! Recorded reports go through the same rules as every other; a failing store answers
//! 503, so the provider delivers again.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::{Json, body::Bytes};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, AppState};
use crate::bounces::sources;
use crate::providers::{self, ProviderError};

/// Providers post one event (Mailgun, Postmark) or one SNS message per request.
const BODY_LIMIT: usize = 1 << 20;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ses))
        .routes(routes!(mailgun))
        .routes(routes!(postmark))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

/// What a webhook did.
#[derive(Serialize, ToSchema)]
struct Received {
    /// Reports recorded (one per subscriber a report was about; 0 for events that
    /// report nothing, such as deliveries or a subscription confirmation).
    recorded: usize,
}

/// Amazon SES bounces and complaints, through an SNS topic subscribed over HTTPS. The
/// SNS signature is checked against its signing certificate (fetched from an
/// `sns.<region>.amazonaws.com` host); a subscription request is confirmed. Needs
/// `bounces.ses_topics`.
#[utoipa::path(post, operation_id = "webhook_ses", path = "/webhooks/ses", tag = "providers",
    request_body(content = String, content_type = "text/plain", description = "An SNS message (JSON, sent as text/plain)"),
    responses((status = 200, body = Received)))]
async fn ses(State(state): State<AppState>, body: Bytes) -> Result<Json<Received>, ApiError> {
    let sns = state.providers.sns.as_ref().ok_or(ProviderError::Off(
        "SES webhooks are off (set bounces.ses_topics)",
    ))?;
    let (findings, raw) = providers::ses(sns, &body).await?;
    record(&state, sources::SES, findings, &raw).await
}

/// Mailgun's `failed` and `complained` events, signed with the webhook signing key
/// (`bounces.mailgun_signing_key`); replays are refused.
#[utoipa::path(post, operation_id = "webhook_mailgun", path = "/webhooks/mailgun", tag = "providers",
    request_body(content = Object, description = "Mailgun's webhook JSON"),
    responses((status = 200, body = Received)))]
async fn mailgun(State(state): State<AppState>, body: Bytes) -> Result<Json<Received>, ApiError> {
    let mailgun = state.providers.mailgun.as_ref().ok_or(ProviderError::Off(
        "Mailgun webhooks are off (set bounces.mailgun_signing_key)",
    ))?;
    let findings = mailgun.read(&body)?;
    record(
        &state,
        sources::MAILGUN,
        findings,
        &String::from_utf8_lossy(&body),
    )
    .await
}

/// Postmark's bounce and spam-complaint webhooks, with the basic-auth credentials of
/// `bounces.postmark_auth` in the webhook URL.
#[utoipa::path(post, operation_id = "webhook_postmark", path = "/webhooks/postmark", tag = "providers",
    request_body(content = Object, description = "Postmark's webhook JSON"),
    responses((status = 200, body = Received)))]
async fn postmark(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Received>, ApiError> {
    let postmark = state.providers.postmark.as_ref().ok_or(ProviderError::Off(
        "Postmark webhooks are off (set bounces.postmark_auth)",
    ))?;
    postmark.authorized(headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    let findings = postmark.read(&body)?;
    record(
        &state,
        sources::POSTMARK,
        findings,
        &String::from_utf8_lossy(&body),
    )
    .await
}

async fn record(
    state: &AppState,
    source: &str,
    findings: Vec<providers::Finding>,
    raw: &str,
) -> Result<Json<Received>, ApiError> {
    let recorded =
        providers::record(&state.store, state.runner.bounce_rules(), source, findings, raw).await?;
    Ok(Json(Received {
        recorded: recorded.len(),
    }))
}
