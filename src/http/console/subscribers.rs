//! Subscribers: a newsletter's list with search and filters (the API's search, bounded
//! per page), the CSV import (streamed like the API's, with upload progress from the
//! script), and one subscriber's page: edit, unsubscribe, erase.

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::auth::{Form, HeaderChecked, Session};
use super::{FlashQuery, PageError, Path, Query, field, flash, form_problems, page, see_other};
use crate::domain::{Subscriber, SubscriberPatch, SubscriberStatus};
use crate::http::newsletters::{SEARCH_SCAN, subscriber_filter, subscriber_patch};
use crate::http::{ApiError, AppState};

/// Subscribers per page.
const PAGE: usize = 50;

/// A subscriber's newest bounce and complaint reports shown on their page.
const BOUNCES_SHOWN: usize = 20;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console/newsletters/{id}/subscribers", get(list))
        .route("/console/newsletters/{id}/import", post(import))
        .route("/console/subscribers/{id}", get(show).post(change))
        .route("/console/subscribers/{id}/unsubscribe", post(unsubscribe))
        .route("/console/subscribers/{id}/erase", post(erase))
        .route("/console/subscribers/{id}/reinstate", post(reinstate))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    attribute: Option<String>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    ok: Option<String>,
}

fn statuses() -> Vec<&'static str> {
    SubscriberStatus::ALL.iter().map(|s| s.as_str()).collect()
}

async fn list(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<u64>,
    Query(query): Query<ListQuery>,
) -> Result<Response, PageError> {
    let newsletter = state.store.newsletter(id).await?;
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            SubscriberStatus::parse(s)
                .ok_or_else(|| ApiError::field("status", format!("{s:?} is not a status")))?,
        ),
    };
    let filter = subscriber_filter(query.q.as_deref(), status, query.attribute.as_deref());
    let (items, next, searching, errors) = match filter {
        Ok(filter) if !filter.is_empty() => {
            let found = state
                .store
                .search_subscribers(id, filter, query.after.unwrap_or(0), PAGE, SEARCH_SCAN)
                .await?;
            (found.items, found.next, true, json!({}))
        }
        Ok(_) => {
            let items = state
                .store
                .subscribers_after(id, query.after.unwrap_or(0), PAGE)
                .await?;
            let next = (items.len() == PAGE)
                .then(|| items.last().map(|s| s.id))
                .flatten();
            (items, next, false, json!({}))
        }
        Err(e) => {
            let (_, errors, _) = form_problems(e)?;
            (Vec::new(), None, true, errors)
        }
    };
    let mut next_query = vec![];
    for (key, value) in [
        ("q", &query.q),
        ("status", &query.status),
        ("attribute", &query.attribute),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            next_query.push(format!(
                "{key}={}",
                url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            ));
        }
    }
    let shown = items.len();
    let context = json!({
        "newsletter": newsletter,
        "subscribers": items,
        "next": next.map(|n| { let mut q = next_query.clone(); q.push(format!("after={n}")); q.join("&") }),
        "searching": searching,
        // A search that stopped at its scan before the page filled: say so, not "no more".
        "short": searching && next.is_some() && shown < PAGE,
        "query": { "q": query.q.unwrap_or_default(), "status": query.status.unwrap_or_default(), "attribute": query.attribute.unwrap_or_default() },
        "statuses": statuses(),
        "scan": SEARCH_SCAN,
        "errors": errors,
        "flash": flash(query.ok.as_deref()),
        "section": "newsletters",
    });
    Ok(page(
        &state,
        StatusCode::OK,
        "subscribers.html",
        &session,
        context,
    ))
}

/// A CSV file as the body, sent by the script with the page's CSRF token in a header;
/// answers with the API's import summary (or its problem) as JSON, which the script
/// shows. Streamed: any length in bounded memory.
async fn import(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    _checked: HeaderChecked,
    request: Request,
) -> Response {
    let stream = request
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    match crate::import::csv(&state.store, id, reader).await {
        Ok(summary) => (StatusCode::CREATED, Json(summary)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<u64>,
    Query(query): Query<FlashQuery>,
) -> Result<Response, PageError> {
    let subscriber = state.store.subscriber_by_id(id).await?;
    let context = json!({ "form": form_of(&subscriber), "flash": query.message() });
    show_page(&state, &session, subscriber, StatusCode::OK, context).await
}

/// The edit form's values for a subscriber as stored.
fn form_of(subscriber: &Subscriber) -> Value {
    json!({
        "email": subscriber.email,
        "name": subscriber.name.clone().unwrap_or_default(),
        "attributes": serde_json::to_string_pretty(&subscriber.attributes).unwrap_or_default(),
        "status": subscriber.status.as_str(),
    })
}

async fn show_page(
    state: &AppState,
    session: &Session,
    subscriber: Subscriber,
    status: StatusCode,
    mut context: Value,
) -> Result<Response, PageError> {
    let newsletter = state.store.newsletter(subscriber.newsletter_id).await?;
    let filter = crate::bounces::BounceFilter {
        subscriber_id: Some(subscriber.id),
        unattributed: false,
    };
    let bounces = state.store.bounces(filter, None, BOUNCES_SHOWN).await?;
    context["bounces"] = json!(bounces);
    context["more_bounces"] = json!(bounces.len() == BOUNCES_SHOWN);
    context["subscriber"] = json!(subscriber);
    context["newsletter"] = json!(newsletter);
    context["statuses"] = json!(statuses());
    context["section"] = json!("newsletters");
    Ok(page(state, status, "subscriber.html", session, context))
}

/// The form's attributes (a JSON object) as the API's merge patch: what is given is
/// set, and a key the form no longer has is removed.
fn attributes_patch(before: &Map<String, Value>, text: &str) -> Result<Map<String, Value>, ApiError> {
    let after: Map<String, Value> = if text.trim().is_empty() {
        Map::new()
    } else {
        serde_json::from_str(text)
            .map_err(|e| ApiError::field("attributes", format!("must be a JSON object: {e}")))?
    };
    let mut patch = after.clone();
    for key in before.keys() {
        if !after.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    Ok(patch)
}

async fn change(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, form): Form,
) -> Result<Response, PageError> {
    let before = state.store.subscriber_by_id(id).await?;
    let status = SubscriberStatus::parse(field(&form, "status"));
    let name = Some(Some(field(&form, "name").to_string()).filter(|n| !n.trim().is_empty()));
    let patch = attributes_patch(&before.attributes, field(&form, "attributes")).and_then(|attributes| {
        subscriber_patch(
            Some(field(&form, "email").to_string()),
            name,
            Some(attributes),
            status,
        )
    });
    let changed = match patch {
        Ok(patch) => state
            .store
            .update_subscriber(id, patch)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match changed {
        Ok(_) => Ok(see_other(&format!("/console/subscribers/{id}?ok=saved"))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let values = json!({
                "email": field(&form, "email"), "name": field(&form, "name"),
                "attributes": field(&form, "attributes"), "status": field(&form, "status"),
            });
            let context = json!({ "form": values, "errors": errors, "detail": detail });
            // A refused change changed nothing: the subscriber is as read before it.
            show_page(&state, &session, before, status, context).await
        }
    }
}

async fn unsubscribe(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(_, _): Form,
) -> Result<Response, PageError> {
    let patch = SubscriberPatch {
        status: Some(SubscriberStatus::Unsubscribed),
        ..Default::default()
    };
    state.store.update_subscriber(id, patch).await?;
    Ok(see_other(&format!("/console/subscribers/{id}?ok=unsubscribed")))
}

async fn erase(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(_, _): Form,
) -> Result<Response, PageError> {
    let subscriber = state.store.subscriber_by_id(id).await?;
    state.store.delete_subscriber(id).await?;
    Ok(see_other(&format!(
        "/console/newsletters/{}/subscribers?ok=erased",
        subscriber.newsletter_id
    )))
}

/// Makes a bounced or complained subscriber active again (the API's reinstatement:
/// their reports stay, no longer counted, and their address leaves the suppression
/// list). An unsubscribed one is refused: only they can subscribe again.
async fn reinstate(
    State(state): State<AppState>,
    Path(id): Path<u64>,
    Form(session, _): Form,
) -> Result<Response, PageError> {
    match state.store.reinstate(id).await {
        Ok(_) => Ok(see_other(&format!("/console/subscribers/{id}?ok=reinstated"))),
        Err(e) => {
            let (status, errors, detail) = form_problems(e.into())?;
            let subscriber = state.store.subscriber_by_id(id).await?;
            let context = json!({ "form": form_of(&subscriber), "errors": errors, "detail": detail });
            show_page(&state, &session, subscriber, status, context).await
        }
    }
}
