//! Newsletters: the list with a form for a new one, and one newsletter's settings.

use std::collections::HashMap;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Form, Session};
use super::{FlashQuery, PageError, Path, Query, field, flash, form_problems, page, see_other};
use crate::domain::Newsletter;
use crate::http::AppState;
use crate::http::newsletters::check_newsletter;

/// Newsletters per page of the list.
const PAGE: usize = 50;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console/newsletters", get(list).post(create))
        .route("/console/newsletters/{id}", get(show).post(change))
        .route("/console/newsletters/{id}/delete", post(delete))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    ok: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<ListQuery>,
) -> Result<Response, PageError> {
    list_page(
        &state,
        &session,
        query.after.unwrap_or(0),
        StatusCode::OK,
        json!({
            "form": { "name": "", "from": "" },
            "flash": flash(query.ok.as_deref()),
        }),
    )
    .await
}

async fn list_page(
    state: &AppState,
    session: &Session,
    after: u64,
    status: StatusCode,
    mut context: Value,
) -> Result<Response, PageError> {
    let newsletters = state.store.newsletters_after(after, PAGE).await?;
    let next = (newsletters.len() == PAGE)
        .then(|| newsletters.last().map(|n| n.id))
        .flatten();
    context["newsletters"] = json!(newsletters);
    context["next"] = json!(next);
    context["section"] = json!("newsletters");
    Ok(page(state, status, "newsletters.html", session, context))
}

async fn create(State(state): State<AppState>, Form(session, form): Form) -> Result<Response, PageError> {
    let created = match check_newsletter(Some(field(&form, "name")), Some(field(&form, "from"))) {
        Ok((Some(name), Some(from))) => state
            .store
            .create_newsletter(name, from)
            .await
            .map_err(Into::into),
        Ok(_) => Err(crate::http::ApiError::Internal(
            "a checked newsletter lost its fields".into(),
        )),
        Err(e) => Err(e),
    };
    match created {
        Ok(newsletter) => Ok(see_other(&format!(
            "/console/newsletters/{}?ok=created",
            newsletter.id
        ))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "form": form_values(&form), "errors": errors, "detail": detail });
            list_page(&state, &session, 0, status, context).await
        }
    }
}

fn form_values(form: &HashMap<String, String>) -> Value {
    json!({ "name": field(form, "name"), "from": field(form, "from") })
}

async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<u64>,
    Query(query): Query<FlashQuery>,
) -> Result<Response, PageError> {
    let newsletter = state.store.newsletter(id).await?;
    let context = json!({
        "form": { "name": newsletter.name, "from": newsletter.from },
        "flash": query.message(),
    });
    show_page(&state, &session, newsletter, StatusCode::OK, context).await
}

async fn show_page(
    state: &AppState,
    session: &Session,
    newsletter: Newsletter,
    status: StatusCode,
    mut context: Value,
) -> Result<Response, PageError> {
    let letters = state.store.letters_after(newsletter.id, 0, 200).await?;
    context["newsletter"] = json!(newsletter);
    context["letters"] = json!(letters);
    context["section"] = json!("newsletters");
    Ok(page(state, status, "newsletter.html", session, context))
}

async fn change(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, form): Form,
) -> Result<Response, PageError> {
    let changed = match check_newsletter(Some(field(&form, "name")), Some(field(&form, "from"))) {
        Ok((name, from)) => state
            .store
            .update_newsletter(id, name, from)
            .await
            .map_err(Into::into),
        Err(e) => Err(e),
    };
    match changed {
        Ok(_) => Ok(see_other(&format!("/console/newsletters/{id}?ok=saved"))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "form": form_values(&form), "errors": errors, "detail": detail });
            let newsletter = state.store.newsletter(id).await?;
            show_page(&state, &session, newsletter, status, context).await
        }
    }
}

async fn delete(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, _): Form,
) -> Result<Response, PageError> {
    match state.store.delete_newsletter(id).await {
        Ok(()) => Ok(see_other("/console/newsletters?ok=deleted")),
        Err(e) => {
            let (status, errors, detail) = form_problems(e.into())?;
            let newsletter = state.store.newsletter(id).await?;
            let context = json!({
                "form": { "name": newsletter.name, "from": newsletter.from },
                "errors": errors, "detail": detail,
            });
            show_page(&state, &session, newsletter, status, context).await
        }
    }
}
