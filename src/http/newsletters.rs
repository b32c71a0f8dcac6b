//! Newsletters and their subscribers: create and list them, and read, change or erase
//! one subscriber.

use axum::Json;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde::Deserializer;
use serde_json::{Map, Value};

use super::error::{ApiJson, ApiPath, ApiQuery, FieldError};
use super::{ApiError, AppState, Page, is_csv, page, page_cursor, page_limit};
use crate::domain::{
    ImportSummary, NewSubscriber, Newsletter, Subscriber, SubscriberFilter, SubscriberPatch, SubscriberStatus,
};
use crate::{import, mail};
use futures_util::TryStreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// JSON subscriber arrays are bigger than the usual request; 32 MiB is ~200k rows. (CSV
/// is streamed, and not limited.)
const SUBSCRIBERS_BODY_LIMIT: usize = 32 << 20;

pub fn router() -> OpenApiRouter<AppState> {
    let (schemas, paths, add) = routes!(add_subscribers);
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, change, delete))
        .routes((
            schemas,
            paths,
            add.layer(DefaultBodyLimit::max(SUBSCRIBERS_BODY_LIMIT)),
        ))
        .routes(routes!(list_subscribers))
        .routes(routes!(show_subscriber, change_subscriber, erase_subscriber))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateNewsletter {
    /// Not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    name: String,
    /// The From of every letter: `Name <address>` or `address` (format `mailbox`: an
    /// RFC 5322 mailbox, its name one line of at most 256 characters).
    // Generic tools do not know `mailbox`, so the length and pattern say in standard
    // JSON Schema what every mailbox has: a character, `@`, a character.
    #[schema(format = "mailbox", min_length = 3, pattern = r"[^\s@]@[^\s@]")]
    from: String,
}

/// Creates a newsletter.
#[utoipa::path(post, operation_id = "create_newsletter", path = "/v1/newsletters", tag = "newsletters", request_body = CreateNewsletter,
    responses((status = 201, body = Newsletter)))]
async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateNewsletter>,
) -> Result<(StatusCode, Json<Newsletter>), ApiError> {
    let (Some(name), Some(from)) = check_newsletter(Some(&body.name), Some(&body.from))? else {
        return Err(ApiError::Internal("a checked newsletter lost its fields".into()));
    };
    let newsletter = state.store.create_newsletter(name, from).await?;
    Ok((StatusCode::CREATED, Json(newsletter)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// The previous page's `next`: the id to continue after.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// The newsletters, in id order, a page at a time.
#[utoipa::path(get, operation_id = "list_newsletters", path = "/v1/newsletters", tag = "newsletters", params(PageQuery),
    responses((status = 200, body = Page<Newsletter>)))]
async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Page<Newsletter>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let items = state
        .store
        .newsletters_after(page_cursor(query.cursor)?.unwrap_or(0), limit)
        .await?;
    Ok(page(items, limit, |n| n.id))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewsletterChange {
    /// Not blank.
    #[serde(default)]
    #[schema(min_length = 1, pattern = r"\S")]
    name: Option<String>,
    /// As when created: `Name <address>` or `address`.
    #[serde(default)]
    #[schema(format = "mailbox", min_length = 3, pattern = r"[^\s@]@[^\s@]")]
    from: Option<String>,
}

/// Renames a newsletter or changes its From; letters sent from now on use it.
#[utoipa::path(patch, operation_id = "change_newsletter", path = "/v1/newsletters/{id}", tag = "newsletters", params(("id" = u64, Path)),
    request_body = NewsletterChange, responses((status = 200, body = Newsletter)))]
async fn change(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(body): ApiJson<NewsletterChange>,
) -> Result<Json<Newsletter>, ApiError> {
    let (name, from) = check_newsletter(body.name.as_deref(), body.from.as_deref())?;
    Ok(Json(state.store.update_newsletter(id, name, from).await?))
}

/// Deletes a newsletter and its letters. Refused (409) while it has subscribers or a job
/// that is not finished; its finished jobs stay as the record of what was sent.
#[utoipa::path(delete, operation_id = "delete_newsletter", path = "/v1/newsletters/{id}", tag = "newsletters", params(("id" = u64, Path)),
    responses((status = 204, description = "Deleted"),
        (status = 409, description = "It has subscribers or a job that is not finished", body = super::error::Problem, content_type = "application/problem+json")))]
async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<StatusCode, ApiError> {
    state.store.delete_newsletter(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A newsletter's name and From as given (each optional), checked: the name trimmed and
/// not blank, the From a mailbox. Every problem is named at its field.
pub(super) fn check_newsletter(
    name: Option<&str>,
    from: Option<&str>,
) -> Result<(Option<String>, Option<String>), ApiError> {
    let mut errors = Vec::new();
    let name = name.map(str::trim).map(str::to_string);
    if name.as_deref() == Some("") {
        errors.push(FieldError {
            field: "name".into(),
            message: "must not be empty".into(),
        });
    }
    let from = match from.map(mail::parse_mailbox) {
        Some(Ok(from)) => Some(from),
        Some(Err(e)) => {
            errors.push(FieldError {
                field: "from".into(),
                message: e.to_string(),
            });
            None
        }
        None => None,
    };
    if !errors.is_empty() {
        return Err(ApiError::Invalid {
            detail: "invalid newsletter".into(),
            errors,
        });
    }
    Ok((name, from))
}

/// One newsletter.
#[utoipa::path(get, operation_id = "show_newsletter", path = "/v1/newsletters/{id}", tag = "newsletters", params(("id" = u64, Path)),
    responses((status = 200, body = Newsletter)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Newsletter>, ApiError> {
    Ok(Json(state.store.newsletter(id).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscriberInput {
    #[schema(format = Email)]
    email: String,
    /// At most 256 characters; line breaks and control characters become spaces.
    #[serde(default)]
    #[schema(max_length = 256)]
    name: Option<String>,
    /// Free-form data the policies see.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    attributes: Option<Map<String, Value>>,
}

impl SubscriberInput {
    /// Checks the email; returns the subscriber to store or why the email is invalid.
    pub(super) fn validate(self) -> Result<NewSubscriber, String> {
        import::subscriber(
            &self.email,
            self.name.as_deref(),
            self.attributes.unwrap_or_default(),
        )
    }
}

/// Adds or updates (by email) subscribers from a JSON array or a CSV file (`text/csv`,
/// streamed: any length in bounded memory). Bad rows are refused one by one and listed;
/// the others are imported.
#[utoipa::path(post, path = "/v1/newsletters/{id}/subscribers", tag = "subscribers", params(("id" = u64, Path)),
    request_body(description = "A JSON array of subscribers (`SubscriberInput`; each row is checked on its own, and a bad row is refused and listed, not the request), or CSV with a header row: email, name, then attribute columns",
        content((Vec<serde_json::Value> = "application/json"), (String = "text/csv"))),
    responses((status = 201, description = "What was imported, and the rows refused", body = ImportSummary)))]
async fn add_subscribers(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    request: Request,
) -> Result<(StatusCode, Json<ImportSummary>), ApiError> {
    let summary = if is_csv(request.headers()) {
        let stream = request
            .into_body()
            .into_data_stream()
            .map_err(std::io::Error::other);
        let reader = SyncIoBridge::new(StreamReader::new(stream));
        import::csv(&state.store, id, reader).await?
    } else {
        // Anything else must be JSON; the JSON extractor says so if it is not. Rows are
        // checked one by one (a NUL refused in its row, or folded in a name), so not
        // through `ApiJson`, which refuses a NUL anywhere in the body.
        let Json(rows) = Json::<Vec<Value>>::from_request(request, &state).await?;
        import::json(&state.store, id, rows).await?
    };
    Ok((StatusCode::CREATED, Json(summary)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SubscriberQuery {
    /// The previous page's `next`: subscriber id to continue after.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
    /// Only the subscriber with this email (domain case-insensitive).
    #[serde(default)]
    #[param(format = Email)]
    email: Option<String>,
    /// Only subscribers whose email or name contains this, in any case (empty or blank:
    /// no such condition).
    #[serde(default)]
    q: Option<String>,
    /// Only subscribers in this status.
    #[serde(default)]
    status: Option<SubscriberStatus>,
    /// Only subscribers with this attribute and value, as `key=value` (a string
    /// attribute as it is, any other as its JSON: `plan=pro`, `age=42`; empty: no such
    /// condition).
    #[serde(default)]
    #[param(pattern = r"^\s*$|^[^=]*[^=\s][^=]*=")]
    attribute: Option<String>,
}

/// Subscribers one filtered page looks at, at most: a search for something rare in a
/// big list answers in bounded time, with `next` where to go on (a page may then hold
/// fewer than `limit`, or none, and still have a `next`).
pub(super) const SEARCH_SCAN: usize = 50_000;

/// A search's filter from its parameters, each problem named at its parameter.
pub(super) fn subscriber_filter(
    q: Option<&str>,
    status: Option<SubscriberStatus>,
    attribute: Option<&str>,
) -> Result<SubscriberFilter, ApiError> {
    let text = q.map(str::trim).filter(|q| !q.is_empty()).map(str::to_lowercase);
    let attribute = match attribute.map(str::trim).filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => match a.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Some((key.trim().to_string(), value.trim().to_string()))
            }
            _ => return Err(ApiError::field("attribute", "must be key=value, e.g. plan=pro")),
        },
    };
    Ok(SubscriberFilter {
        text,
        status,
        attribute,
    })
}

/// A newsletter's subscribers in id order, a page at a time, or the one with an email;
/// optionally only those a search (`q`, `status`, `attribute`) wants.
#[utoipa::path(get, path = "/v1/newsletters/{id}/subscribers", tag = "subscribers", params(("id" = u64, Path), SubscriberQuery),
    responses((status = 200, body = Page<Subscriber>)))]
async fn list_subscribers(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<SubscriberQuery>,
) -> Result<Json<Page<Subscriber>>, ApiError> {
    let limit = page_limit(query.limit)?;
    if let Some(email) = query.email {
        let email = mail::parse_address(&email).map_err(|e| ApiError::field("email", e.to_string()))?;
        let found = state.store.subscriber_by_email(id, email).await?;
        return Ok(Json(Page {
            items: Vec::from_iter(found),
            next: None,
        }));
    }
    let filter = subscriber_filter(query.q.as_deref(), query.status, query.attribute.as_deref())?;
    let after = page_cursor(query.cursor)?.unwrap_or(0);
    if !filter.is_empty() {
        let found = state
            .store
            .search_subscribers(id, filter, after, limit, SEARCH_SCAN)
            .await?;
        return Ok(Json(Page {
            items: found.items,
            next: found.next,
        }));
    }
    state.store.newsletter(id).await?;
    let items = state.store.subscribers_after(id, after, limit).await?;
    Ok(page(items, limit, |s| s.id))
}

/// One subscriber.
#[utoipa::path(get, path = "/v1/subscribers/{id}", tag = "subscribers", params(("id" = u64, Path)),
    responses((status = 200, body = Subscriber)))]
async fn show_subscriber(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Subscriber>, ApiError> {
    Ok(Json(state.store.subscriber_by_id(id).await?))
}

/// `"name": null` must clear the name, which a plain `Option` cannot tell from absence.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SubscriberChange {
    #[serde(default)]
    #[schema(format = Email)]
    email: Option<String>,
    /// `null` clears the name; at most 256 characters, line breaks and control
    /// characters become spaces.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 256)]
    name: Option<Option<String>>,
    /// Merged as a JSON merge patch: `null` removes a key.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    status: Option<SubscriberStatus>,
}

/// Changes a subscriber's email, name, attributes or status. A status other than
/// `active` stops every running job from sending to them, whatever its filter says.
#[utoipa::path(patch, path = "/v1/subscribers/{id}", tag = "subscribers", params(("id" = u64, Path)),
    request_body = SubscriberChange, responses((status = 200, body = Subscriber)))]
async fn change_subscriber(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(change): ApiJson<SubscriberChange>,
) -> Result<Json<Subscriber>, ApiError> {
    let patch = subscriber_patch(change.email, change.name, change.attributes, change.status)?;
    Ok(Json(state.store.update_subscriber(id, patch).await?))
}

/// A change to a subscriber, checked: the email an address, the name at most 256
/// characters and folded like an imported one.
pub(super) fn subscriber_patch(
    email: Option<String>,
    name: Option<Option<String>>,
    attributes: Option<Map<String, Value>>,
    status: Option<SubscriberStatus>,
) -> Result<SubscriberPatch, ApiError> {
    let email = match email {
        Some(email) => Some(mail::parse_address(&email).map_err(|e| ApiError::Invalid {
            detail: "invalid subscriber change".into(),
            errors: vec![FieldError {
                field: "email".into(),
                message: e.to_string(),
            }],
        })?),
        None => None,
    };
    if let Some(Some(name)) = &name {
        import::check_name_length(name).map_err(|message| ApiError::field("name", message))?;
    }
    let name = name.map(|n| n.and_then(|n| import::name(&n).0));
    Ok(SubscriberPatch {
        email,
        // Folded like an imported name: one header line.
        name,
        attributes,
        status,
        confirming: false,
    })
}

/// Erases a subscriber and their personal data, also from past deliveries.
#[utoipa::path(delete, path = "/v1/subscribers/{id}", tag = "subscribers", params(("id" = u64, Path)),
    responses((status = 204, description = "Erased")))]
async fn erase_subscriber(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<StatusCode, ApiError> {
    state.store.delete_subscriber(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
