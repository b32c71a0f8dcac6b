//! Signing in and out, the session every other page needs (`Session`), and the checks
//! every state-changing request passes (`Form`): its session's CSRF token, and that it
//! comes from a page of this site. The API's bearer token is never read here, and the
//! session cookie is never read by the API (it is scoped to `/console`).

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use super::{PageError, Query, cookie, flash, render, see_other};
use crate::console::session::{COOKIE, LIFETIME, SessionSecret};
use crate::domain::now;
use crate::http::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", axum::routing::post(sign_out))
}

/// A signed-in browser. Extracting it from a request without a live session answers
/// with the sign-in page's address (a GET) or 401 (anything else).
pub struct Session(SessionSecret);

impl Session {
    pub fn csrf_token(&self) -> String {
        self.0.csrf_token()
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Session, Response> {
        let Some(secret) = cookie(&parts.headers, COOKIE).and_then(SessionSecret::parse) else {
            return Err(signed_out(parts));
        };
        match state.store.session_expiry(secret.id()).await {
            Ok(Some(expires_at)) if expires_at > now() => Ok(Session(secret)),
            Ok(_) => Err(signed_out(parts)),
            Err(e) => Err(PageError::from(e).into_response()),
        }
    }
}

/// Where a request without a session goes: a page asked for is asked for again after
/// signing in; a change is refused (its form's data cannot be carried over safely).
fn signed_out(parts: &Parts) -> Response {
    if parts.method == Method::GET || parts.method == Method::HEAD {
        let next = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/console");
        let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
        return see_other(&format!("/console/sign-in?next={next}"));
    }
    PageError::from(ApiError::Unauthorized(
        "your session has ended: sign in again, then repeat what you did".into(),
    ))
    .into_response()
}

/// A state-changing request's form fields, from a signed-in page of this site with its
/// CSRF token (`_csrf`). Anything else is refused with 403 before the handler runs.
pub struct Form(pub Session, pub HashMap<String, String>);

impl FromRequest<AppState> for Form {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Form, Response> {
        let (mut parts, body) = request.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        if let Err(why) = same_site(&parts, state) {
            return Err(forbidden(why));
        }
        let request = Request::from_parts(parts, body);
        let axum::Form(fields) = axum::Form::<HashMap<String, String>>::from_request(request, state)
            .await
            .map_err(|e| {
                PageError::from(ApiError::BadRequest(format!("the form could not be read: {e}")))
                    .into_response()
            })?;
        match fields.get("_csrf") {
            Some(token) if session.0.csrf_matches(token) => Ok(Form(session, fields)),
            _ => Err(forbidden(
                "the form's security token is missing or stale: reload the page and try again",
            )),
        }
    }
}

/// A state-changing request the script sends with a body of its own (an upload): its
/// session, from this site, with the session's CSRF token in `X-CSRF-Token`.
pub struct HeaderChecked;

impl FromRequestParts<AppState> for HeaderChecked {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<HeaderChecked, Response> {
        let session = Session::from_request_parts(parts, state).await?;
        if let Err(why) = same_site(parts, state) {
            return Err(forbidden(why));
        }
        let token = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        match token {
            Some(token) if session.0.csrf_matches(token) => Ok(HeaderChecked),
            _ => Err(forbidden(
                "the request's security token is missing or stale: reload the page and try again",
            )),
        }
    }
}

fn forbidden(why: &str) -> Response {
    PageError::from(ApiError::Forbidden(why.to_string())).into_response()
}

/// Whether a request comes from a page of this site. A browser says so in
/// `Sec-Fetch-Site`; an older one in `Origin`, which must name this host (or the public
/// URL). A request with neither (not from a browser) still needs the CSRF token.
fn same_site(parts: &Parts, state: &AppState) -> Result<(), &'static str> {
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return match site {
            "same-origin" | "none" => Ok(()),
            _ => Err("a form from another site may not change anything here"),
        };
    }
    let Some(origin) = header("origin") else {
        return Ok(());
    };
    let origin_host = host_of(origin);
    let host = header("host");
    let public_host = host_of(state.runner.public_url());
    match origin_host {
        Some(o) if Some(o.as_str()) == host || Some(&o) == public_host.as_ref() => Ok(()),
        _ => Err("a form from another site may not change anything here"),
    }
}

/// `host[:port]` of a URL, as a `Host` header names it.
fn host_of(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

#[derive(Deserialize)]
struct SignInQuery {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    ok: Option<String>,
}

/// Only a console page of this site may be where sign-in leads (never another site).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/console") && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/console",
    }
}

async fn sign_in_page(State(state): State<AppState>, Query(query): Query<SignInQuery>) -> Response {
    render(
        &state,
        StatusCode::OK,
        "sign_in.html",
        json!({
            "next": safe_next(query.next.as_deref()),
            "flash": flash(query.ok.as_deref()),
            "errors": {}, "detail": "", "signed_in": false,
        }),
    )
}

async fn sign_in(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let next = safe_next(form.get("next").map(String::as_str)).to_string();
    let again = |status: StatusCode, message: &str| {
        render(
            &state,
            status,
            "sign_in.html",
            json!({ "next": next, "errors": { "token": message }, "detail": "", "signed_in": false }),
        )
    };
    // Every attempt counts, so guessing the token is slow whether it is right or not.
    if let Some(ConnectInfo(peer)) = extensions.get::<ConnectInfo<SocketAddr>>()
        && let Err(wait) = state.console.sign_in_limit.admit(peer.ip())
    {
        let mut page = again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many attempts from your address: try again in {wait} s"),
        );
        page.headers_mut().insert(header::RETRY_AFTER, wait.into());
        return page;
    }
    let token = form.get("token").map(|t| t.trim()).unwrap_or("");
    if token.is_empty() {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "enter the API token");
    }
    if !state.api_token.matches(token) {
        return again(StatusCode::UNAUTHORIZED, "this is not the API token");
    }
    let Some(secret) = SessionSecret::generate() else {
        return PageError::from(ApiError::Internal("no randomness for a session".into())).into_response();
    };
    let expires_at = now() + LIFETIME.as_secs();
    if let Err(e) = state.store.create_session(secret.id(), expires_at).await {
        return PageError::from(e).into_response();
    }
    let secure = if state.console.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        secret.cookie_value(),
        LIFETIME.as_secs()
    );
    let mut response = see_other(&next);
    if let Ok(value) = cookie.parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn sign_out(State(state): State<AppState>, Form(session, _): Form) -> Response {
    if let Err(e) = state.store.delete_session(session.0.id()).await {
        return PageError::from(e).into_response();
    }
    let mut response = see_other("/console/sign-in?ok=signed-out");
    if let Ok(value) = format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0").parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn sign_in_leads_only_to_a_console_page() {
        assert_eq!(safe_next(Some("/console/jobs/3?x=1")), "/console/jobs/3?x=1");
        for bad in [
            "https://evil.example/",
            "//evil.example/console",
            "/v1/jobs",
            "/console\\@evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/console", "{bad}");
        }
        assert_eq!(safe_next(None), "/console");
    }
}
