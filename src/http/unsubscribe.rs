//! Public unsubscribe links: `GET /u/{token}` shows a confirmation page (mail scanners
//! follow links, so a GET changes nothing); `POST /u/{token}` unsubscribes, which is also
//! the RFC 8058 one-click request mail clients send.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiPath;
use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(confirm, unsubscribe))
}

/// The confirmation page of an unsubscribe link.
#[utoipa::path(get, path = "/u/{token}", tag = "unsubscribe", params(("token" = String, Path)),
    responses((status = 200, description = "A page with an Unsubscribe button", content_type = "text/html")))]
async fn confirm(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> Result<Html<String>, ApiError> {
    let (newsletter_id, _) = verify(&state, &token)?;
    let newsletter = state.store.newsletter(newsletter_id).await?;
    Ok(Html(format!(
        "<!doctype html><meta charset=utf-8><title>Unsubscribe</title>\
         <p>Unsubscribe from <b>{}</b>?</p>\
         <form method=post><button type=submit>Unsubscribe</button></form>",
        escape(&newsletter.name)
    )))
}

/// Unsubscribes (the page's button, or an RFC 8058 one-click request).
#[utoipa::path(post, path = "/u/{token}", tag = "unsubscribe", params(("token" = String, Path)),
    responses((status = 200, description = "Unsubscribed", content_type = "text/html")))]
async fn unsubscribe(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> Result<(StatusCode, Html<String>), ApiError> {
    let (newsletter_id, subscriber_id) = verify(&state, &token)?;
    state.store.unsubscribe(newsletter_id, subscriber_id).await?;
    tracing::info!(newsletter_id, subscriber_id, "unsubscribed");
    Ok((
        StatusCode::OK,
        Html("<!doctype html><meta charset=utf-8><p>You are unsubscribed.</p>".to_string()),
    ))
}

fn verify(state: &AppState, token: &str) -> Result<(u64, u64), ApiError> {
    state
        .runner
        .unsubscribe_key()
        .verify(token)
        .ok_or_else(|| ApiError::NotFound("unknown or invalid unsubscribe link".into()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
