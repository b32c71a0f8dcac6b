//! The web console's routes (`/console/…`, and `/` which leads there): the only part of
//! the console that knows axum. Handlers read and change the store and the runner
//! through the same calls and checks as the API's handlers, and give plain data to
//! `console::Views`. Every response carries a strict Content-Security-Policy (scripts
//! and styles from our own assets only, no inline script), `X-Frame-Options: DENY`,
//! `Referrer-Policy` and `Cache-Control: no-store` (pages hold subscribers' data).

mod auth;
mod health;
mod hearing;
mod jobs;
mod letters;
mod newsletters;
mod policies;
mod subscribers;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::HashMap;

use super::{ApiError, AppState};
use crate::console::Views;

pub use auth::Session;

/// What the console's handlers share.
pub struct ConsoleState {
    pub views: Views,
    /// Sign-in attempts per IP address and minute: a wrong token costs a guesser time.
    pub sign_in_limit: super::PerIpLimit,
    /// Whether the session cookie is `Secure` (the public URL is https).
    pub secure_cookie: bool,
}

impl ConsoleState {
    pub fn new(public_url: Option<&str>) -> Result<ConsoleState, crate::console::RenderError> {
        Ok(ConsoleState {
            views: Views::new()?,
            sign_in_limit: super::PerIpLimit::new(10),
            secure_cookie: public_url.is_some_and(|u| u.starts_with("https://")),
        })
    }
}

/// `max_upload`: the largest policy component an upload may send.
pub fn router(max_upload: usize) -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(|| async { Redirect::to("/console/newsletters") }))
        .route(
            "/console/",
            get(|| async { Redirect::to("/console/newsletters") }),
        )
        .route("/console/assets/{file}", get(asset))
        .merge(auth::router())
        .merge(newsletters::router())
        .merge(letters::router())
        .merge(jobs::router())
        .merge(health::router())
        .merge(hearing::router())
        .merge(policies::router(max_upload))
        .merge(subscribers::router())
        // The server's own fallback answers JSON; a console address that names nothing
        // gets a page.
        .route(
            "/console/{*rest}",
            axum::routing::any(|_: Session| async {
                PageError::from(ApiError::NotFound("no such page".into()))
            }),
        )
        .layer(axum::middleware::from_fn(security_headers))
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'";

/// The console's headers, on every response that did not set its own.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers
            .entry(name)
            .or_insert_with(|| HeaderValue::from_static(value));
    }
    response
}

/// An embedded asset. Its name carries its hash, so it may be kept for a year.
async fn asset(uri: axum::http::Uri) -> Response {
    match crate::console::assets::find(uri.path()) {
        Some(asset) => (
            [
                (header::CONTENT_TYPE, asset.content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            asset.bytes,
        )
            .into_response(),
        None => PageError::from(ApiError::NotFound("no such asset".into())).into_response(),
    }
}

/// A page: `template` with `context` and what every page has (the session's CSRF token,
/// the flash message named by `?ok=`).
pub(super) fn page(
    state: &AppState,
    status: StatusCode,
    template: &str,
    session: &Session,
    mut context: Value,
) -> Response {
    if let Value::Object(map) = &mut context {
        map.insert("signed_in".into(), json!(true));
        map.insert("csrf".into(), json!(session.csrf_token()));
        map.entry("errors").or_insert(json!({}));
        map.entry("detail").or_insert(json!(""));
    }
    render(state, status, template, context)
}

fn render(state: &AppState, status: StatusCode, template: &str, context: impl Serialize) -> Response {
    match state.console.views.render(template, context) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => PageError::from(ApiError::Internal(e.to_string())).into_response(),
    }
}

/// A page's query when it only shows a flash message (`?ok=`).
#[derive(serde::Deserialize)]
pub(super) struct FlashQuery {
    #[serde(default)]
    ok: Option<String>,
}

impl FlashQuery {
    pub(super) fn message(&self) -> Option<&'static str> {
        flash(self.ok.as_deref())
    }
}

/// The message a `?ok=` code stands for, after a change that redirected.
fn flash(code: Option<&str>) -> Option<&'static str> {
    Some(match code? {
        "created" => "Created.",
        "saved" => "Saved.",
        "deleted" => "Deleted.",
        "uploaded" => "Uploaded: this node compiles it now, and this page shows when it is ready.",
        "submitted" => "Submitted: the job is on its way.",
        "paused" => "Paused: deliveries in flight finish, no new ones start.",
        "resumed" => "Resumed.",
        "cancelled" => "Cancelled: recipients not yet sent are marked cancelled.",
        "unsubscribed" => "Unsubscribed: no letter goes to them any more.",
        "erased" => "Erased, with their personal data in past deliveries and the event log.",
        "signed-out" => "You are signed out.",
        "suppressed" => "Added to the suppression list: no newsletter sends to them.",
        "unsuppressed" => "Taken off the suppression list (subscribers' own statuses are unchanged).",
        "reinstated" => "Reinstated: active again, and off the suppression list.",
        _ => return None,
    })
}

/// Where a successful form post goes: a 303, so reloading the page does not post again.
fn see_other(location: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, location.to_string())]).into_response()
}

/// `axum::extract::Query` whose refusal (`?after=abc`) is a page, not axum's plain text.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(PageError))]
pub(super) struct Query<T>(pub T);

/// `axum::extract::Path` whose refusal (`/console/jobs/abc`) is a page.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(PageError))]
pub(super) struct Path<T>(pub T);

impl From<axum::extract::rejection::QueryRejection> for PageError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        PageError(e.into())
    }
}

impl From<axum::extract::rejection::PathRejection> for PageError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        PageError(e.into())
    }
}

/// An error as a page: the problem's status, title and detail (never a blank page).
/// Internal causes are logged by `ApiError`'s own response and not shown.
pub(super) struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        // The API's own problem: the same status, detail and logging as there.
        let (problem, retry_after) = self.0.problem();
        let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let context = json!({
            "status": problem.status,
            "title": problem.title,
            "detail": problem.detail,
            "errors": problem.errors,
            "signed_in": false,
        });
        let html = ERROR_VIEWS
            .get_or_init(|| Views::new().ok())
            .as_ref()
            .and_then(|v| v.render("error.html", &context).ok())
            .unwrap_or_else(|| format!("<!doctype html><title>{status}</title><p>{status}</p>"));
        let mut response = (status, Html(html)).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The error page's templates: a `PageError` has no state at hand.
static ERROR_VIEWS: std::sync::OnceLock<Option<Views>> = std::sync::OnceLock::new();

/// A validation error's problems by field, for the form that shows each at its field;
/// and the detail of any other error, shown above the form.
fn form_problems(error: ApiError) -> Result<(StatusCode, Value, String), PageError> {
    match error {
        ApiError::Invalid { detail, errors } => {
            // The fields say what is wrong; the summary only points at them.
            let detail = match errors.len() {
                0 => detail,
                1 => "One field needs a change: see below.".to_string(),
                n => format!("{n} fields need a change: see below."),
            };
            let by_field: HashMap<String, String> =
                errors.into_iter().map(|e| (e.field, e.message)).collect();
            Ok((StatusCode::UNPROCESSABLE_ENTITY, json!(by_field), detail))
        }
        ApiError::Conflict(detail) => Ok((StatusCode::CONFLICT, json!({}), detail)),
        other => Err(PageError(other)),
    }
}

/// The value of form field `name`, or "".
fn field<'a>(form: &'a HashMap<String, String>, name: &str) -> &'a str {
    form.get(name).map(String::as_str).unwrap_or("")
}

/// The header map's cookie `name`, if sent.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}
