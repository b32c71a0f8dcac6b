//! The public subscribe form and its confirmation links (double opt-in, `crate::optin`):
//! `GET /s/{newsletter}` shows a form, `POST /s/{newsletter}` (the form, or JSON) asks to
//! subscribe, `GET /s/confirm/{token}` shows a Confirm button (mail scanners follow
//! links, so a GET changes nothing), `POST /s/confirm/{token}` confirms. No token: these
//! are for the public, limited per IP address instead.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiJson, ApiPath};
use super::{ApiError, AppState, Problem};
use crate::optin::{self, Confirmed, OptinError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(subscribe_form, subscribe))
        .routes(routes!(confirmation_page, confirm_subscription))
}

/// Requests per IP address and minute, counted in fixed windows on this node.
pub struct PerIpLimit {
    per_minute: u32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl PerIpLimit {
    pub fn new(per_minute: u32) -> PerIpLimit {
        PerIpLimit {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` if `ip` may ask now; else the seconds until it may.
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<(), u64> {
        const WINDOW: Duration = Duration::from_secs(60);
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        // Forget finished windows now and then, so a crowd of addresses cannot grow it
        // for ever.
        if windows.len() > 10_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let (start, count) = windows.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= self.per_minute {
            return Err((WINDOW - now.duration_since(*start)).as_secs().max(1));
        }
        *count += 1;
        Ok(())
    }
}

/// Who asks to subscribe.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscribeInput {
    #[schema(min_length = 3, max_length = 254)]
    email: String,
    #[serde(default)]
    #[schema(max_length = 256)]
    name: Option<String>,
}

/// The same answer to every well-formed request.
#[derive(Serialize, ToSchema)]
struct SubscribeAnswer {
    detail: &'static str,
}

const ANSWER: &str =
    "If this address can be subscribed, a message with a confirmation link is on its way to it.";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
         <title>{}</title><p>{body}</p>",
        escape(title)
    ))
}

/// The subscribe form of a newsletter.
#[utoipa::path(get, path = "/s/{newsletter}", tag = "subscribe", params(("newsletter" = u64, Path)),
    responses((status = 200, description = "A page with a subscribe form", content_type = "text/html"),
              (status = 404, description = "No such newsletter (a page that says so)", content_type = "text/html")))]
async fn subscribe_form(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Response {
    let newsletter = match state.store.newsletter(id).await {
        Ok(n) => n,
        Err(e) => return as_page("Not found", e.into()),
    };
    page(
        &newsletter.name,
        &format!(
            "Subscribe to <b>{}</b></p>\
             <form method=post><label>Email <input type=email name=email required></label> \
             <label>Name <input name=name></label> <button type=submit>Subscribe</button></form><p>",
            escape(&newsletter.name)
        ),
    )
    .into_response()
}

/// Asks to subscribe: an HTML form post (`application/x-www-form-urlencoded`) or JSON.
/// The answer is the same whether the address is new, waiting for its confirmation or
/// subscribed already; a confirmation link is mailed when it is needed.
#[utoipa::path(post, path = "/s/{newsletter}", tag = "subscribe", params(("newsletter" = u64, Path)),
    request_body(content((SubscribeInput = "application/json"), (SubscribeInput = "application/x-www-form-urlencoded"))),
    responses((status = 202, description = "Taken (for a form: a page that says so)",
                  content((SubscribeAnswer = "application/json"), (String = "text/html"))),
              (status = 404, description = "No such newsletter", content((Problem = "application/problem+json"), (String = "text/html"))),
              (status = 422, description = "Not an address that can be subscribed", content((Problem = "application/problem+json"), (String = "text/html"))),
              (status = 429, description = "Too many requests from this IP address: try again after `Retry-After` seconds",
                  content((Problem = "application/problem+json"), (String = "text/html")))))]
async fn subscribe(State(state): State<AppState>, ApiPath(id): ApiPath<u64>, request: Request) -> Response {
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let answer = async {
        if let Some(ip) = peer {
            state.subscribe_limiter.admit(ip).map_err(|wait| {
                ApiError::TooManyRequests(
                    format!("too many subscribe requests: try again in {wait} s"),
                    wait,
                )
            })?;
        }
        let input = if is_form {
            axum::Form::<SubscribeInput>::from_request(request, &state)
                .await
                .map_err(|e| ApiError::invalid(e.body_text()))?
                .0
        } else {
            ApiJson::<SubscribeInput>::from_request(request, &state).await?.0
        };
        optin::request(
            &state.store,
            &state.runner,
            id,
            &input.email,
            input.name.as_deref(),
        )
        .await
        .map_err(optin_error)
    }
    .await;
    match (answer, is_form) {
        (Ok(()), false) => (StatusCode::ACCEPTED, Json(SubscribeAnswer { detail: ANSWER })).into_response(),
        (Ok(()), true) => (StatusCode::ACCEPTED, page("Almost there", ANSWER)).into_response(),
        (Err(e), false) => e.into_response(),
        (Err(e), true) => as_page("Not subscribed", e),
    }
}

/// The page of a confirmation link: a Confirm button, or why the link does not work.
#[utoipa::path(get, path = "/s/confirm/{token}", tag = "subscribe", params(("token" = String, Path)),
    responses((status = 200, description = "A page with a Confirm button", content_type = "text/html"),
              (status = 404, description = "Not a link letterbox made (a page that says so)", content_type = "text/html"),
              (status = 410, description = "The link has expired (a page that says so)", content_type = "text/html")))]
async fn confirmation_page(State(state): State<AppState>, ApiPath(token): ApiPath<String>) -> Response {
    let key = state.runner.unsubscribe_key();
    let Some((newsletter, _, expires)) = key.verify_confirm(&token) else {
        return link_error(OptinError::UnknownLink);
    };
    if crate::domain::now() > expires {
        return link_error(OptinError::Expired);
    }
    match state.store.newsletter(newsletter).await {
        Ok(n) => page(
            "Confirm",
            &format!(
                "Confirm your subscription to <b>{}</b>?</p>\
                 <form method=post><button type=submit>Confirm</button></form><p>",
                escape(&n.name)
            ),
        )
        .into_response(),
        Err(e) => as_page("Not confirmed", e.into()),
    }
}

/// Confirms a subscription (the page's button). Following a link twice changes nothing.
#[utoipa::path(post, path = "/s/confirm/{token}", tag = "subscribe", params(("token" = String, Path)),
    responses((status = 200, description = "Subscribed", content_type = "text/html"),
              (status = 404, description = "Not a link letterbox made, or its subscriber is gone", content_type = "text/html"),
              (status = 409, description = "The address bounced or complained: it is not subscribed by a link", content_type = "text/html"),
              (status = 410, description = "The link has expired", content_type = "text/html")))]
async fn confirm_subscription(State(state): State<AppState>, ApiPath(token): ApiPath<String>) -> Response {
    match optin::confirm(&state.store, &state.runner, &token).await {
        Ok((newsletter, Confirmed::Now)) => page(
            "Subscribed",
            &format!("You are subscribed to <b>{}</b>. Thank you!", escape(&newsletter)),
        )
        .into_response(),
        Ok((newsletter, Confirmed::Already)) => page(
            "Subscribed",
            &format!("You are subscribed to <b>{}</b> already.", escape(&newsletter)),
        )
        .into_response(),
        Err(e) => link_error(e),
    }
}

/// A link that does not work, as a page with the status that says why.
fn link_error(e: OptinError) -> Response {
    as_page("Not confirmed", optin_error(e))
}

/// An error as a page for people, with the status and headers (`Retry-After`) of its
/// problem response; internal causes are logged by that response and not shown.
fn as_page(title: &str, e: ApiError) -> Response {
    let detail = e.to_string();
    let (mut parts, _) = e.into_response().into_parts();
    let body = page(title, &escape(&detail)).into_response().into_body();
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body)
}

fn optin_error(e: OptinError) -> ApiError {
    match e {
        OptinError::Invalid(why) => ApiError::field("email", why),
        e @ OptinError::NoNewsletter(_) => ApiError::NotFound(e.to_string()),
        e @ OptinError::UnknownLink => ApiError::NotFound(e.to_string()),
        e @ OptinError::Expired => ApiError::Gone(e.to_string()),
        e @ OptinError::Refused => ApiError::Conflict(e.to_string()),
        OptinError::Store(e) => e.into(),
        OptinError::Runner(e) => e.into(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
