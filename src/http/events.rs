//! The event log over HTTP: pages of it (`GET /v1/events`), the events a user's
//! application posts (`POST /v1/events`), and a live stream (`GET /v1/events/stream`,
//! Server-Sent Events) that resumes after `Last-Event-ID`. The log is the store's
//! (`store::Events`); what each event says is `crate::events`'s.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiJson, ApiQuery};
use super::{ApiError, AppState, int64, page_limit};
use crate::domain::Subscriber;
use crate::events::{self, Event, EventFilter, EventPage, NewEvent, types};
use crate::store::Store;

/// The most a custom event's `data` may hold, as JSON.
const MAX_DATA_BYTES: usize = 16 << 10;

/// Events a stream reads from the store at a time.
const STREAM_BATCH: usize = 256;

/// How long a caught-up stream waits before it reads the log again even if nothing
/// woke it (the head's watch is a hint, not the truth).
const STREAM_POLL: Duration = Duration::from_secs(2);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events, post_event))
        .routes(routes!(stream_events))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    /// Events after this id: the previous page's `next`, or the last event seen.
    /// 0 (the default) reads from the oldest kept.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<u64>,
    /// Comma-separated types, each exact (`job.completed`) or a prefix (`subscriber.*`,
    /// `custom.*`).
    #[serde(default, rename = "type")]
    #[param(rename = "type")]
    types: Option<String>,
    /// Only this subscriber's events: an id, or an email (add `newsletter` when the
    /// address is on more than one list).
    #[serde(default)]
    #[param(pattern = r"^([0-9]{1,19}|[^@]*@[^@]*)$")]
    subscriber: Option<String>,
    /// The newsletter an email in `subscriber` belongs to.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    newsletter: Option<u64>,
    /// Events per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// Events after this id; a `Last-Event-ID` header (what a reconnecting client
    /// sends) takes its place. 0 (the default) starts from the oldest kept.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<u64>,
    /// As for `GET /v1/events`.
    #[serde(default, rename = "type")]
    #[param(rename = "type")]
    types: Option<String>,
    /// As for `GET /v1/events`.
    #[serde(default)]
    #[param(pattern = r"^([0-9]{1,19}|[^@]*@[^@]*)$")]
    subscriber: Option<String>,
    /// As for `GET /v1/events`.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    newsletter: Option<u64>,
}

/// A subscriber named by id or by email.
#[derive(Deserialize, serde::Serialize, ToSchema)]
#[serde(untagged)]
pub(super) enum SubscriberRef {
    Id(u64),
    Email(String),
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PostEvent {
    /// `custom.` and a name of lowercase letters, digits, `.`, `_` and `-` (at most 100
    /// characters in all), e.g. `custom.purchase`.
    #[serde(rename = "type")]
    #[schema(pattern = r"^custom\.[a-z0-9._-]+$", max_length = 100)]
    kind: String,
    /// Who it is about, if anyone: a subscriber id, or an email (add `newsletter` when
    /// the address is on more than one list).
    #[serde(default)]
    subscriber: Option<SubscriberRef>,
    /// The newsletter it belongs to (for an event about nobody), or the one an email
    /// in `subscriber` is on.
    #[serde(default)]
    newsletter: Option<u64>,
    /// Anything, as a JSON object of at most 16 KiB.
    #[serde(default)]
    #[schema(value_type = Object)]
    data: Map<String, Value>,
}

/// Events after a cursor, oldest first. A page can hold fewer than `limit` events (a
/// type filter examines a bounded stretch of the log per request): read on from `next`
/// while `more` is true.
#[utoipa::path(get, operation_id = "list_events", path = "/v1/events", tag = "events", params(EventQuery),
    responses((status = 200, body = EventPage)))]
async fn list_events(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = page_limit(query.limit)?;
    let after = cursor("after", query.after)?;
    cursor("newsletter", query.newsletter)?;
    let filter = filter(
        &state.store,
        query.types.as_deref(),
        query.subscriber.as_deref(),
        query.newsletter,
    )
    .await?;
    Ok(Json(state.store.events_after(filter, after, limit).await?))
}

/// Records an event of the user's own (`custom.*`), about a subscriber or not.
#[utoipa::path(post, operation_id = "post_event", path = "/v1/events", tag = "events", request_body = PostEvent,
    responses((status = 201, body = Event)))]
async fn post_event(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<PostEvent>,
) -> Result<(StatusCode, Json<Event>), ApiError> {
    check_custom_type(&body.kind)?;
    let data = body.data;
    if serde_json::to_vec(&data).map_or(0, |d| d.len()) > MAX_DATA_BYTES {
        return Err(ApiError::field(
            "data",
            format!("must be at most {} KiB as JSON", MAX_DATA_BYTES >> 10),
        ));
    }
    let mut event = NewEvent::new(body.kind);
    event.data = data;
    match body.subscriber {
        Some(reference) => {
            let subscriber = resolve(&state.store, reference, body.newsletter).await?;
            event.subscriber_id = Some(subscriber.id);
            event.newsletter_id = Some(subscriber.newsletter_id);
        }
        None => {
            if let Some(newsletter) = body.newsletter {
                state.store.newsletter(newsletter).await?;
                event.newsletter_id = Some(newsletter);
            }
        }
    }
    // The store checks the subscriber again, in the transaction: an erasure between
    // here and there leaves no event behind.
    let mut stored = state.store.append_events(vec![event]).await?;
    let event = stored
        .pop()
        .ok_or_else(|| ApiError::Internal("the store appended no event".into()))?;
    Ok((StatusCode::CREATED, Json(event)))
}

/// The log as it grows, as Server-Sent Events: each event's `id` is its id, its `event`
/// its type, its `data` the event as JSON. A client that reconnects with
/// `Last-Event-ID` (as browsers do) goes on after the last event it got, from any node
/// and across restarts, and misses none.
#[utoipa::path(get, operation_id = "stream_events", path = "/v1/events/stream", tag = "events", params(StreamQuery,
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, minimum = 0, maximum = 9223372036854775807_i64,
            description = "The last event received: the stream goes on after it")),
    responses((status = 200, description = "One SSE event per log event, as they are committed", content_type = "text/event-stream")))]
async fn stream_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let after = match headers.get("last-event-id") {
        Some(value) => {
            let id = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be an event id (a number)".into()))?;
            cursor("Last-Event-ID", Some(id))?
        }
        None => cursor("after", query.after)?,
    };
    cursor("newsletter", query.newsletter)?;
    let filter = filter(
        &state.store,
        query.types.as_deref(),
        query.subscriber.as_deref(),
        query.newsletter,
    )
    .await?;
    Ok(Sse::new(follow(state, filter, after, true)).keep_alive(KeepAlive::default()))
}

/// What a stream carries between reads.
struct Follow {
    store: Store,
    filter: EventFilter,
    after: u64,
    head: tokio::sync::watch::Receiver<u64>,
    stop: tokio_util::sync::CancellationToken,
    ready: VecDeque<Event>,
    named: bool,
}

/// `named`: each SSE event is named by its type (what API clients filter on); else all
/// are plain messages (what a page's one `onmessage` handler reads).
pub(super) fn follow(
    state: AppState,
    filter: EventFilter,
    after: u64,
    named: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let follow = Follow {
        head: state.store.event_head(),
        store: state.store,
        filter,
        after,
        stop: state.stopping,
        ready: VecDeque::new(),
        named,
    };
    futures_util::stream::unfold(follow, |mut f| async move {
        loop {
            if let Some(event) = f.ready.pop_front() {
                let data = serde_json::to_string(&event).unwrap_or_default();
                let sse = SseEvent::default().id(event.id.to_string()).data(data);
                let sse = if f.named { sse.event(&event.kind) } else { sse };
                return Some((Ok(sse), f));
            }
            // The server is stopping: end the stream so the shutdown does not wait for
            // it; the client reconnects (elsewhere) with its Last-Event-ID.
            if f.stop.is_cancelled() {
                return None;
            }
            // Seen before the read: a commit after it wakes the wait below.
            f.head.borrow_and_update();
            let pause = match f
                .store
                .events_after(f.filter.clone(), f.after, STREAM_BATCH)
                .await
            {
                Ok(page) => {
                    f.after = page.next;
                    f.ready.extend(page.events);
                    if page.more || !f.ready.is_empty() {
                        continue;
                    }
                    STREAM_POLL
                }
                Err(e) => {
                    // A failing store is a pause, not the stream's end: it heals.
                    tracing::debug!(error = %e, "the event stream cannot read the log; trying again");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                changed = f.head.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(pause).await;
                    }
                }
                _ = tokio::time::sleep(pause) => {}
                _ = f.stop.cancelled() => return None,
            }
        }
    })
}

/// A cursor or id as the OpenAPI document types it (`int64`); an absent cursor is 0.
fn cursor(name: &str, after: Option<u64>) -> Result<u64, ApiError> {
    Ok(int64(name, after)?.unwrap_or(0))
}

pub(super) async fn filter(
    store: &Store,
    types: Option<&str>,
    subscriber: Option<&str>,
    newsletter: Option<u64>,
) -> Result<EventFilter, ApiError> {
    let subscriber_id = match subscriber {
        None => None,
        Some(spec) => match spec.parse::<u64>() {
            // An id alone is not looked up: an erased subscriber's events stay readable.
            Ok(id) => Some(cursor("subscriber", Some(id))?),
            Err(_) => Some(
                resolve(store, SubscriberRef::Email(spec.to_string()), newsletter)
                    .await?
                    .id,
            ),
        },
    };
    Ok(EventFilter {
        types: parse_types(types)?,
        subscriber_id,
    })
}

/// The subscriber a reference names: an id, or an email (on one newsletter, or on
/// `newsletter`).
pub(super) async fn resolve(
    store: &Store,
    reference: SubscriberRef,
    newsletter: Option<u64>,
) -> Result<Subscriber, ApiError> {
    let subscriber = match reference {
        SubscriberRef::Id(id) => store.subscriber_by_id(id).await?,
        SubscriberRef::Email(email) => {
            if !email.contains('@') {
                return Err(ApiError::field(
                    "subscriber",
                    format!("`{email}` is neither a subscriber id nor an email"),
                ));
            }
            match newsletter {
                Some(newsletter) => store
                    .subscriber_by_email(newsletter, email.clone())
                    .await?
                    .ok_or_else(|| {
                        ApiError::NotFound(format!("newsletter {newsletter} has no subscriber {email}"))
                    })?,
                None => {
                    let mut found = store.subscribers_with_email(email.clone()).await?;
                    match found.len() {
                        0 => return Err(ApiError::NotFound(format!("no subscriber has the email {email}"))),
                        1 => found.remove(0),
                        _ => {
                            let lists: Vec<String> =
                                found.iter().map(|s| s.newsletter_id.to_string()).collect();
                            return Err(ApiError::Conflict(format!(
                                "{email} is a subscriber of newsletters {}: say which with `newsletter`",
                                lists.join(", ")
                            )));
                        }
                    }
                }
            }
        }
    };
    if let Some(newsletter) = newsletter
        && subscriber.newsletter_id != newsletter
    {
        return Err(ApiError::field(
            "newsletter",
            format!(
                "subscriber {} is on newsletter {}, not {newsletter}",
                subscriber.id, subscriber.newsletter_id
            ),
        ));
    }
    Ok(subscriber)
}

fn check_custom_type(kind: &str) -> Result<(), ApiError> {
    if events::is_custom(kind) {
        return Ok(());
    }
    Err(ApiError::field(
        "type",
        format!(
            "`{kind}` is not a custom event type: `custom.` and a name of lowercase letters, digits, \
             `.`, `_` and `-` (at most {} characters)",
            events::MAX_TYPE_LEN
        ),
    ))
}

/// A `type` filter: comma-separated types or `prefix.*`. An unknown built-in type is
/// refused (a typo would otherwise match nothing, silently).
pub(super) fn parse_types(spec: Option<&str>) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for t in spec
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if t == "*" {
            return Ok(Vec::new());
        }
        let (name, prefix) = match t.strip_suffix(".*") {
            Some(name) => (name, true),
            None => (t, false),
        };
        let custom = name == "custom" || name.starts_with(types::CUSTOM_PREFIX);
        let known = if prefix {
            custom || types::BUILT_IN.iter().any(|b| b.starts_with(&format!("{name}.")))
        } else {
            (custom && name != "custom") || types::BUILT_IN.contains(&name)
        };
        if !events::well_formed(name) || !known {
            return Err(ApiError::field(
                "type",
                format!(
                    "unknown event type `{t}`: the types are {}, `custom.*` for your own, or a prefix such as `subscriber.*`",
                    types::BUILT_IN.join(", ")
                ),
            ));
        }
        out.push(if prefix {
            format!("{name}.*")
        } else {
            name.to_string()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_filters_take_known_types_prefixes_and_custom_ones() {
        assert_eq!(parse_types(None).unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_types(Some("job.completed, subscriber.*,custom.buy")).unwrap(),
            ["job.completed", "subscriber.*", "custom.buy"]
        );
        assert_eq!(parse_types(Some("custom.*")).unwrap(), ["custom.*"]);
        assert!(parse_types(Some("*")).unwrap().is_empty());
        for bad in [
            "job.complete",
            "subscriber",
            "jobs.*",
            "custom",
            "Custom.buy",
            "custom.buy!",
        ] {
            assert!(parse_types(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn custom_types_are_named_under_custom() {
        assert!(check_custom_type("custom.purchase").is_ok());
        assert!(check_custom_type("custom.order.paid-v2").is_ok());
        for bad in [
            "purchase",
            "custom.",
            "custom..x",
            "custom.Buy",
            "job.completed",
            &format!("custom.{}", "x".repeat(100)),
        ] {
            assert!(check_custom_type(bad).is_err(), "{bad}");
        }
    }
}
