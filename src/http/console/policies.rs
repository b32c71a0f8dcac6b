//! Policies: every plugin name with its latest version's compilation, an upload (the
//! script sends the component's bytes, then shows `compiling` turn into `ready` or
//! `failed` on the policy's page), a name's versions, and the letters and automations
//! that name it. Uploads, listings and deletes go through the API's own code
//! (`http::plugins`), so the checks are the same.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auth::{Form, HeaderChecked, Session};
use super::{FlashQuery, PageError, Path, Query, form_problems, page, see_other};
use crate::domain::PluginKind;
use crate::http::error::UploadBody;
use crate::http::{ApiError, AppState, plugins};

/// At most this many letters are read to find which ones name a policy: a listing
/// stays quick however many letters an installation keeps.
const USES_SCAN: usize = 10_000;

pub fn router(max_upload: usize) -> Router<AppState> {
    Router::new()
        // The upload is posted to the list (not to `policies/upload`, which would hide a
        // policy called `upload`).
        .route(
            "/console/policies",
            get(list).post(upload).layer(DefaultBodyLimit::max(max_upload)),
        )
        .route("/console/policies/{name}", get(show))
        .route("/console/policies/{name}/status", get(status))
        .route("/console/policies/{name}/delete", post(delete))
}

/// Where a policy's name is used.
#[derive(Serialize, Default)]
struct Uses {
    letters: Vec<LetterUse>,
    automations: Vec<AutomationUse>,
}

#[derive(Serialize)]
struct LetterUse {
    letter_id: u64,
    subject: String,
    newsletter_id: u64,
    newsletter: String,
    /// `filter` or `template`.
    role: &'static str,
    /// The version id the letter is pinned to (`name@id`); none: the latest.
    pinned: Option<String>,
}

#[derive(Serialize)]
struct AutomationUse {
    id: u64,
    name: String,
    pinned: Option<String>,
}

/// A reference (`name` or `name@id`) as its name and pinned id.
fn reference(text: &str) -> (&str, Option<String>) {
    match text.split_once('@') {
        Some((name, id)) => (name, Some(id.to_string())),
        None => (text, None),
    }
}

/// Which letters and automations name each policy, by name; and whether the letters
/// were read only up to `USES_SCAN`.
async fn uses(state: &AppState) -> Result<(BTreeMap<String, Uses>, bool), ApiError> {
    let mut by_name: BTreeMap<String, Uses> = BTreeMap::new();
    let mut read = 0;
    let mut after_newsletter = 0;
    'newsletters: loop {
        let newsletters = state.store.newsletters_after(after_newsletter, 100).await?;
        let Some(last) = newsletters.last() else { break };
        after_newsletter = last.id;
        for newsletter in newsletters {
            let mut after_letter = 0;
            loop {
                let letters = state
                    .store
                    .letters_after(newsletter.id, after_letter, 100)
                    .await?;
                let Some(last) = letters.last() else { break };
                after_letter = last.id;
                for letter in letters {
                    read += 1;
                    if read > USES_SCAN {
                        break 'newsletters;
                    }
                    for (role, text) in [("filter", &letter.filter), ("template", &letter.template)] {
                        let (name, pinned) = reference(text);
                        by_name
                            .entry(name.to_string())
                            .or_default()
                            .letters
                            .push(LetterUse {
                                letter_id: letter.id,
                                subject: letter.subject.clone(),
                                newsletter_id: newsletter.id,
                                newsletter: newsletter.name.clone(),
                                role,
                                pinned,
                            });
                    }
                }
            }
        }
    }
    for automation in state.store.list_automations().await? {
        let (name, pinned) = reference(&automation.spec.policy);
        by_name
            .entry(name.to_string())
            .or_default()
            .automations
            .push(AutomationUse {
                id: automation.id,
                name: automation.spec.name.clone(),
                pinned,
            });
    }
    Ok((by_name, read > USES_SCAN))
}

async fn list(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<FlashQuery>,
) -> Result<Response, PageError> {
    let policies = plugins::summaries(&state).await?;
    let (uses, partial) = uses(&state).await?;
    let rows: Vec<Value> = policies
        .iter()
        .map(|p| {
            let used = uses.get(&p.name);
            json!({
                "policy": p,
                "letters": used.map_or(0, |u| u.letters.len()),
                "automations": used.map_or(0, |u| u.automations.len()),
            })
        })
        .collect();
    let context = json!({
        "policies": rows,
        "partial": partial,
        "kinds": PluginKind::ALL.map(PluginKind::as_str),
        "form": { "name": "", "kind": "template" },
        "flash": query.message(),
        "section": "policies",
    });
    Ok(page(&state, StatusCode::OK, "policies.html", &session, context))
}

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
}

/// The component's bytes as the body, sent by the script with the page's CSRF token in a
/// header; answers with the API's plugin view (or its problem) as JSON.
async fn upload(
    State(state): State<AppState>,
    _checked: HeaderChecked,
    Query(query): Query<UploadQuery>,
    body: Result<UploadBody, ApiError>,
) -> Response {
    let Some(kind) = PluginKind::parse(&query.kind) else {
        return ApiError::field("kind", format!("{:?} is not a policy kind", query.kind)).into_response();
    };
    let body = match body {
        Ok(UploadBody(body)) => body,
        Err(e) => return e.into_response(),
    };
    match plugins::store(&state, &query.name, kind, body).await {
        Ok(answer) => answer.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(name): Path<String>,
    Query(query): Query<FlashQuery>,
) -> Result<Response, PageError> {
    let context = json!({ "flash": query.message() });
    show_page(&state, &session, name, StatusCode::OK, context).await
}

async fn show_page(
    state: &AppState,
    session: &Session,
    name: String,
    status: StatusCode,
    mut context: Value,
) -> Result<Response, PageError> {
    let history = plugins::history(state, name).await?;
    let (mut uses, partial) = uses(state).await?;
    let used = uses.remove(&history.name).unwrap_or_default();
    // A pinned letter names a version by id: show its number.
    let numbers: BTreeMap<&str, u64> = history
        .versions
        .iter()
        .map(|v| (v.version.id.as_str(), v.version.version))
        .collect();
    let letters: Vec<Value> = used
        .letters
        .iter()
        .map(|u| {
            json!({
                "use": u,
                "version": u.pinned.as_deref().map(|id| numbers.get(id).copied()),
            })
        })
        .collect();
    let compiling = history
        .versions
        .iter()
        .any(|v| matches!(v.compilation.status, plugins::CompileState::Compiling));
    context["policy"] = json!(history);
    context["letters"] = json!(letters);
    context["automations"] = json!(used.automations);
    context["partial"] = json!(partial);
    context["compiling"] = json!(compiling);
    context["built_in"] = json!(plugins::is_built_in(&history.name));
    context["section"] = json!("policies");
    Ok(page(state, status, "policy.html", session, context))
}

/// A name's versions and their compilations as JSON, which the policy page's script
/// reads while one is compiling.
async fn status(State(state): State<AppState>, _session: Session, Path(name): Path<String>) -> Response {
    match plugins::history(&state, name).await {
        Ok(history) => axum::Json(history).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Form(session, _): Form,
) -> Result<Response, PageError> {
    match plugins::delete(&state, name.clone()).await {
        Ok(()) => Ok(see_other("/console/policies?ok=deleted")),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "errors": errors, "detail": detail });
            show_page(&state, &session, name, status, context).await
        }
    }
}
