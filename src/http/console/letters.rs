//! Letters: the editor (a new letter or a saved one), its live checks and preview of
//! the draft as a chosen subscriber (the runner's own `check_letter` and preview, on
//! the unsaved draft), and sending it now or at a time.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::auth::{Form, Session};
use super::{FlashQuery, PageError, Path, Query, field, form_problems, page, see_other};
use crate::domain::{Letter, PluginKind, now};
use crate::http::letters::{check_subject, parse_rfc3339};
use crate::http::{ApiError, AppState, FieldError};
use crate::policy::Verdict;
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};
use crate::runner::{PreviewTarget, SendOptions};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console/newsletters/{id}/letters/new", get(new))
        .route("/console/newsletters/{id}/letters", post(create))
        .route("/console/newsletters/{id}/draft/check", post(check))
        .route("/console/newsletters/{id}/draft/preview", post(preview))
        .route("/console/letters/{id}", get(show).post(change))
        .route("/console/letters/{id}/send", post(send))
        .route("/console/letters/{id}/delete", post(delete))
}

/// The letter a form describes (not yet checked): `id` 0 for a new one.
fn draft(newsletter_id: u64, id: u64, form: &HashMap<String, String>) -> Result<Letter, ApiError> {
    let params = field(form, "params");
    let params: Map<String, Value> = if params.trim().is_empty() {
        Map::new()
    } else {
        serde_json::from_str(params)
            .map_err(|e| ApiError::field("params", format!("must be a JSON object: {e}")))?
    };
    let html = field(form, "html");
    let or_default = |name: &str, default: &str| match field(form, name).trim() {
        "" => default.to_string(),
        given => given.to_string(),
    };
    Ok(Letter {
        id,
        newsletter_id,
        subject: field(form, "subject").to_string(),
        // Browsers send a textarea's lines with CRLF, as mail wants them.
        text: field(form, "text").to_string(),
        html: (!html.trim().is_empty()).then(|| html.to_string()),
        filter: or_default("filter", DEFAULT_FILTER_NAME),
        template: or_default("template", DEFAULT_TEMPLATE_NAME),
        params,
        created_at: now(),
    })
}

/// The draft, checked as the API checks a letter: the subject, then the policies'
/// checks and a trial render.
async fn checked(
    state: &AppState,
    newsletter_id: u64,
    id: u64,
    form: &HashMap<String, String>,
) -> Result<Letter, ApiError> {
    let letter = draft(newsletter_id, id, form)?;
    check_subject(&letter.subject)?;
    state.runner.check_letter(&letter).await?;
    Ok(letter)
}

fn form_of(letter: &Letter) -> Value {
    json!({
        "subject": letter.subject,
        "text": letter.text,
        "html": letter.html.clone().unwrap_or_default(),
        "filter": letter.filter,
        "template": letter.template,
        "params": if letter.params.is_empty() { String::new() } else { serde_json::to_string_pretty(&letter.params).unwrap_or_default() },
    })
}

fn form_values(form: &HashMap<String, String>) -> Value {
    let mut out = Map::new();
    for name in ["subject", "text", "html", "filter", "template", "params"] {
        out.insert(name.into(), json!(field(form, name)));
    }
    Value::Object(out)
}

/// The editor page: `letter` is `None` for a new one.
async fn editor(
    state: &AppState,
    session: &Session,
    newsletter_id: u64,
    letter: Option<&Letter>,
    status: StatusCode,
    mut context: Value,
) -> Result<Response, PageError> {
    let newsletter = state.store.newsletter(newsletter_id).await?;
    let plugins = state.store.list_plugins().await?;
    let names = |kind: PluginKind| -> Vec<String> {
        plugins
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.name.clone())
            .collect()
    };
    // Whom the preview is for: the newsletter's first subscribers, else a sample.
    let subscribers = state.store.subscribers_after(newsletter_id, 0, 50).await?;
    let recipients: Vec<Value> = subscribers
        .iter()
        .map(|s| json!({ "id": s.id, "label": match &s.name { Some(n) => format!("{n} <{}>", s.email), None => s.email.clone() } }))
        .collect();
    context["newsletter"] = json!(newsletter);
    context["letter"] = json!(letter);
    context["filters"] = json!(names(PluginKind::Filter));
    context["templates"] = json!(names(PluginKind::Template));
    context["recipients"] = json!(recipients);
    context["transports"] = json!(state.runner.transport_names());
    context["section"] = json!("newsletters");
    Ok(page(state, status, "letter.html", session, context))
}

async fn new(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<u64>,
) -> Result<Response, PageError> {
    let form = json!({ "subject": "", "text": "", "html": "", "filter": DEFAULT_FILTER_NAME, "template": DEFAULT_TEMPLATE_NAME, "params": "" });
    editor(
        &state,
        &session,
        id,
        None,
        StatusCode::OK,
        json!({ "form": form }),
    )
    .await
}

async fn create(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, form): Form,
) -> Result<Response, PageError> {
    let saved = match checked(&state, id, 0, &form).await {
        Ok(letter) => state.store.create_letter(letter).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match saved {
        Ok(letter) => Ok(see_other(&format!("/console/letters/{}?ok=created", letter.id))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "form": form_values(&form), "errors": errors, "detail": detail });
            editor(&state, &session, id, None, status, context).await
        }
    }
}

async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<u64>,
    Query(query): Query<FlashQuery>,
) -> Result<Response, PageError> {
    let letter = state.store.letter(id).await?;
    let context = json!({ "form": form_of(&letter), "flash": query.message() });
    editor(
        &state,
        &session,
        letter.newsletter_id,
        Some(&letter),
        StatusCode::OK,
        context,
    )
    .await
}

async fn change(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, form): Form,
) -> Result<Response, PageError> {
    let before = state.store.letter(id).await?;
    let saved = match checked(&state, before.newsletter_id, id, &form).await {
        Ok(letter) => state.store.update_letter(letter).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Ok(see_other(&format!("/console/letters/{id}?ok=saved"))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "form": form_values(&form), "errors": errors, "detail": detail });
            editor(
                &state,
                &session,
                before.newsletter_id,
                Some(&before),
                status,
                context,
            )
            .await
        }
    }
}

/// The draft's problems by field, for the script to show as the author types (an
/// empty list when it would save), with the subject as the chosen recipient gets it.
async fn check(State(state): State<AppState>, Path(id): Path<u64>, Form(_, form): Form) -> Response {
    let problems = match checked(&state, id, 0, &form).await {
        Ok(_) => Vec::new(),
        Err(ApiError::Invalid { detail, errors }) if errors.is_empty() => vec![FieldError {
            field: "letter".into(),
            message: detail,
        }],
        Err(ApiError::Invalid { errors, .. }) => errors,
        Err(e) => return e.into_response(),
    };
    Json(json!({ "errors": problems })).into_response()
}

/// The draft rendered for the chosen recipient, as a document for the editor's preview
/// frame: the HTML part (or the text part, or why the filter skips them). It is the
/// letter's own markup, so it gets its own policy: no script at all (CSP `sandbox`),
/// its inline styles and images allowed, framed only by the console.
async fn preview(State(state): State<AppState>, Path(id): Path<u64>, Form(_, form): Form) -> Response {
    let target = match field(&form, "preview_as").parse::<u64>() {
        Ok(subscriber) => PreviewTarget::Subscriber(subscriber),
        Err(_) => PreviewTarget::Inline(crate::domain::NewSubscriber {
            email: "reader@example.com".into(),
            name: Some("Sample Reader".into()),
            attributes: Map::new(),
        }),
    };
    let body = match checked(&state, id, 0, &form).await {
        Ok(letter) => match state.runner.preview_letter(&letter, target).await {
            Ok(preview) => match preview.verdict {
                Verdict::Send(rendered) => match rendered.html {
                    Some(html) => html,
                    None => format!(
                        "<pre style=\"white-space:pre-wrap;font:14px/1.5 monospace\">{}</pre>",
                        escape(&rendered.text)
                    ),
                },
                Verdict::Skip(reason) => note(&format!("The filter skips this recipient: {reason}")),
            },
            Err(e) => note(&ApiError::from(e).problem().0.detail),
        },
        Err(e) => note(&format!(
            "Nothing to preview until the letter checks out: {}",
            e.problem().0.detail
        )),
    };
    let mut response = Html(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data: https: http:; frame-ancestors 'self'"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("SAMEORIGIN"));
    response
}

fn note(text: &str) -> String {
    format!(
        "<p style=\"font:15px/1.5 system-ui,sans-serif;color:#444\">{}</p>",
        escape(text)
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn send(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, form): Form,
) -> Result<Response, PageError> {
    let letter = state.store.letter(id).await?;
    let options = send_options(&form);
    let submitted = match options {
        Ok(options) => state.runner.submit(id, options).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match submitted {
        Ok((job, _)) => Ok(see_other(&format!("/console/jobs/{}?ok=submitted", job.id))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "form": form_of(&letter), "send_errors": errors, "send_detail": detail, "send": form_values_send(&form) });
            editor(
                &state,
                &session,
                letter.newsletter_id,
                Some(&letter),
                status,
                context,
            )
            .await
        }
    }
}

fn form_values_send(form: &HashMap<String, String>) -> Value {
    json!({ "concurrency": field(form, "concurrency"), "transport": field(form, "transport"), "when": field(form, "when"), "send_at": field(form, "send_at") })
}

/// The send form as the API's send options: `when` is `now` or `later` with `send_at`
/// a local date and time (`datetime-local`) and `tz_offset` the browser's offset from
/// UTC in minutes (`Date.getTimezoneOffset`, set by the script; UTC without it).
fn send_options(form: &HashMap<String, String>) -> Result<SendOptions, ApiError> {
    let concurrency = match field(form, "concurrency").trim() {
        "" => None,
        n => Some(
            n.parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| ApiError::field("concurrency", "must be a whole number from 1 to 1000"))?,
        ),
    };
    let transport = Some(field(form, "transport").trim().to_string()).filter(|t| !t.is_empty());
    let send_at = match field(form, "when") {
        "later" => {
            let local = field(form, "send_at").trim();
            let seconds = if local.len() == 16 {
                format!("{local}:00Z")
            } else {
                format!("{local}Z")
            };
            let utc = parse_rfc3339(&seconds)
                .ok_or_else(|| ApiError::field("send_at", "choose a date and time"))?;
            let offset: i64 = field(form, "tz_offset").trim().parse().unwrap_or(0);
            Some((utc + offset * 60).max(0) as u64)
        }
        _ => None,
    };
    Ok(SendOptions {
        concurrency,
        transport,
        retry: Default::default(),
        send_at,
        idempotency: None,
    })
}

async fn delete(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, _): Form,
) -> Result<Response, PageError> {
    let letter = state.store.letter(id).await?;
    match state.store.delete_letter(id).await {
        Ok(()) => Ok(see_other(&format!(
            "/console/newsletters/{}?ok=deleted",
            letter.newsletter_id
        ))),
        Err(e) => {
            let (status, _, detail) = form_problems(e.into())?;
            let context = json!({ "form": form_of(&letter), "detail": detail });
            editor(
                &state,
                &session,
                letter.newsletter_id,
                Some(&letter),
                status,
                context,
            )
            .await
        }
    }
}
