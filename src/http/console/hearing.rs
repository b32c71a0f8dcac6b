//! What comes back after a send: bounce and complaint reports (each with its raw
//! message and what the rules decided), the suppression list (add, remove), and the
//! event log, newest first, which follows the log live at its head. Each reads and
//! changes the store through the API's own code (`http::bounces`, `http::events`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Form, Session};
use super::{FlashQuery, PageError, Query, field, form_problems, page, see_other};
use crate::bounces::BounceFilter;
use crate::events::EventFilter;
use crate::http::{ApiError, AppState, bounces, events};

/// Reports and suppressions per page.
const PAGE: usize = 50;

/// Event ids a page of the log covers: a filtered page shows the matches among them.
const EVENT_WINDOW: u64 = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console/bounces", get(list_bounces))
        .route("/console/suppressions", get(list_suppressions).post(add))
        .route("/console/suppressions/remove", post(remove))
        .route("/console/events", get(list_events))
        .route("/console/events/stream", get(stream_events))
}

#[derive(Deserialize)]
struct BounceQuery {
    #[serde(default)]
    unattributed: Option<String>,
    #[serde(default)]
    before: Option<u64>,
}

async fn list_bounces(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<BounceQuery>,
) -> Result<Response, PageError> {
    let unattributed = query.unattributed.as_deref().is_some_and(|v| !v.is_empty());
    let filter = BounceFilter {
        subscriber_id: None,
        unattributed,
    };
    let items = state.store.bounces(filter, query.before, PAGE).await?;
    let next = (items.len() == PAGE)
        .then(|| items.last().map(|b| b.id))
        .flatten();
    let context = json!({
        "bounces": items,
        "next": next,
        "unattributed": unattributed,
        "section": "bounces",
    });
    Ok(page(&state, StatusCode::OK, "bounces.html", &session, context))
}

#[derive(Deserialize)]
struct SuppressionQuery {
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    ok: Option<String>,
}

async fn list_suppressions(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<SuppressionQuery>,
) -> Result<Response, PageError> {
    let flash = FlashQuery { ok: query.ok }.message();
    let context = json!({ "flash": flash, "form": { "emails": "", "note": "" } });
    suppressions_page(&state, &session, query.after, StatusCode::OK, context).await
}

async fn suppressions_page(
    state: &AppState,
    session: &Session,
    after: Option<String>,
    status: StatusCode,
    mut context: Value,
) -> Result<Response, PageError> {
    let items = state.store.suppressions(after.clone(), PAGE).await?;
    let next = (items.len() == PAGE)
        .then(|| items.last().map(|s| s.email.clone()))
        .flatten();
    context["suppressions"] = json!(items);
    context["next"] = json!(next);
    context["after"] = json!(after);
    context["section"] = json!("suppressions");
    Ok(page(state, status, "suppressions.html", session, context))
}

/// Addresses from the form (one per line, or separated by commas), with one note.
async fn add(State(state): State<AppState>, Form(session, form): Form) -> Result<Response, PageError> {
    let note = field(&form, "note").trim();
    let rows: Vec<(String, Option<String>)> = field(&form, "emails")
        .split(['\n', ',', ';'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| (e.to_string(), (!note.is_empty()).then(|| note.to_string())))
        .collect();
    let checked = if rows.is_empty() {
        Err(ApiError::field("emails", "give at least one address"))
    } else {
        bounces::check_note(Some(note)).map(|()| rows)
    };
    let added = match checked {
        Ok(rows) => bounces::suppress(&state, rows).await,
        Err(e) => Err(e),
    };
    let form_values = json!({ "emails": field(&form, "emails"), "note": note });
    match added {
        Ok(added) if added.rejected == 0 => Ok(see_other("/console/suppressions?ok=suppressed")),
        Ok(added) => {
            // The valid ones are on the list; the page says which rows were not addresses.
            let context = json!({ "form": form_values, "added": added });
            suppressions_page(&state, &session, None, StatusCode::UNPROCESSABLE_ENTITY, context).await
        }
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            let context = json!({ "form": form_values, "errors": errors, "detail": detail });
            suppressions_page(&state, &session, None, status, context).await
        }
    }
}

async fn remove(State(state): State<AppState>, Form(_, form): Form) -> Result<Response, PageError> {
    state
        .store
        .remove_suppression(field(&form, "email").to_string())
        .await?;
    Ok(see_other("/console/suppressions?ok=unsuppressed"))
}

#[derive(Deserialize)]
struct EventQuery {
    /// As the API's `type`: comma-separated, each exact or a prefix (`subscriber.*`).
    #[serde(default, rename = "type")]
    types: Option<String>,
    /// An id or an email.
    #[serde(default)]
    subscriber: Option<String>,
    /// Only events with ids up to this one (an earlier page); none: the newest.
    #[serde(default)]
    before: Option<u64>,
}

impl EventQuery {
    async fn filter(&self, state: &AppState) -> Result<EventFilter, ApiError> {
        let types = self.types.as_deref().map(str::trim).filter(|t| !t.is_empty());
        let subscriber = self
            .subscriber
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        events::filter(&state.store, types, subscriber, None)
            .await
            .map_err(|e| match e {
                // An address no list has is a mistake in the form, shown at its field.
                ApiError::NotFound(detail) => ApiError::field("subscriber", detail),
                // The API asks for a newsletter; this form takes an id instead.
                ApiError::Conflict(_) => ApiError::field(
                    "subscriber",
                    format!(
                        "{} is on more than one list: give the subscriber's id (shown on their page)",
                        subscriber.unwrap_or_default()
                    ),
                ),
                other => other,
            })
    }
}

/// A window of the log, newest first: the events matching the filter among the
/// `EVENT_WINDOW` ids up to `before` (or the head). At the head, the script follows the
/// log from there.
async fn list_events(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<EventQuery>,
) -> Result<Response, PageError> {
    let filter = match query.filter(&state).await {
        Ok(filter) => filter,
        Err(e) => {
            let (status, errors, detail) = form_problems(e)?;
            // The form with its problems; no log (the page shows none for a bad filter).
            let context = json!({
                "query": query_values(&query), "errors": errors, "detail": detail, "section": "events",
            });
            return Ok(page(&state, status, "events.html", &session, context));
        }
    };
    let head = state
        .store
        // After the largest id there can be (int64): reads nothing, and says the head.
        .events_after(EventFilter::default(), i64::MAX as u64, 1)
        .await?
        .head;
    let upper = query.before.unwrap_or(head).min(head);
    let lower = upper.saturating_sub(EVENT_WINDOW);
    let found = state
        .store
        .events_after(filter, lower, EVENT_WINDOW as usize)
        .await?;
    let mut events: Vec<_> = found.events.into_iter().filter(|e| e.id <= upper).collect();
    events.reverse();
    let context = json!({
        "events": events,
        "query": query_values(&query),
        "upper": upper,
        "lower": lower,
        // Following the log makes sense at its head only.
        "live": query.before.is_none_or(|b| b >= head),
        "section": "events",
    });
    Ok(page(&state, StatusCode::OK, "events.html", &session, context))
}

fn query_values(query: &EventQuery) -> Value {
    json!({
        "type": query.types.clone().unwrap_or_default(),
        "subscriber": query.subscriber.clone().unwrap_or_default(),
    })
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default, rename = "type")]
    types: Option<String>,
    #[serde(default)]
    subscriber: Option<String>,
    #[serde(default)]
    after: u64,
}

/// The log as it grows after `after`, through the API's own follower: the script adds
/// each event to the top of the page.
async fn stream_events(
    State(state): State<AppState>,
    _session: Session,
    headers: axum::http::HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Response {
    // A reconnecting browser says where it got to.
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(query.after);
    let filter = EventQuery {
        types: query.types,
        subscriber: query.subscriber,
        before: None,
    };
    let filter = match filter.filter(&state).await {
        Ok(filter) => filter,
        Err(e) => return e.into_response(),
    };
    Sse::new(events::follow(state, filter, after, false))
        .keep_alive(KeepAlive::default())
        .into_response()
}
