//! Bounces, complaints and the suppression list over HTTP: reports from the user's own
//! pipeline (`POST /v1/bounces`), the reports kept (`GET /v1/bounces`,
//! `GET /v1/subscribers/{id}/bounces`), reinstatement, and the list of addresses no
//! newsletter sends to (`/v1/suppressions`, JSON or CSV). What a report does is the
//! store's and `crate::bounces`'s; this file only checks and shapes.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiJson, ApiPath, ApiQuery, FieldError};
use super::{ApiError, AppState, Page, int64, is_csv, page, page_cursor, page_limit};
use crate::bounces::{
    Bounce, BounceFilter, BounceKind, NewBounce, NewSuppression, Status, Suppression, SuppressionReason,
    sources,
};
use crate::domain::{RowError, Subscriber};
use crate::mail;

/// The largest suppression list one request adds (JSON or CSV): about 400,000 addresses.
const SUPPRESSIONS_BODY_LIMIT: usize = 16 << 20;

/// Addresses per store write when a list is added.
const SUPPRESSION_BATCH: usize = 5_000;

/// Row errors an answer lists at most (all are counted).
const MAX_ROW_ERRORS: usize = 100;

pub fn router() -> OpenApiRouter<AppState> {
    let (schemas, paths, add) = routes!(add_suppressions);
    OpenApiRouter::new()
        .routes(routes!(list_bounces, report_bounce))
        .routes(routes!(subscriber_bounces))
        .routes(routes!(reinstate))
        .routes(routes!(list_suppressions))
        .routes((
            schemas,
            paths,
            add.layer(DefaultBodyLimit::max(SUPPRESSIONS_BODY_LIMIT)),
        ))
        .routes(routes!(show_suppression, remove_suppression))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReportBounce {
    /// What happened. Without it, `status` decides: 5.1.x, 5.2.1 and other 5.x.x are
    /// hard, x.2.2 and other 4.x.x soft, 5.7.x `blocked`.
    #[serde(default, rename = "type")]
    kind: Option<BounceKind>,
    /// The address that bounced or complained.
    #[serde(default)]
    #[schema(format = Email)]
    email: Option<String>,
    /// The Message-ID of the letter it answers (`<letterbox.…@…>`, from the bounce or
    /// the complaint): names the job and the subscriber exactly.
    #[serde(default)]
    message_id: Option<String>,
    /// The subscriber it is about, by id.
    #[serde(default)]
    subscriber: Option<u64>,
    /// The newsletter whose subscriber with `email` it is about. Without it (and
    /// without `subscriber`, `job` or `message_id`), it is about every subscriber with
    /// the address.
    #[serde(default)]
    newsletter: Option<u64>,
    /// The job it answers.
    #[serde(default)]
    job: Option<u64>,
    /// The enhanced status code (RFC 3463), e.g. `5.1.1`.
    #[serde(default)]
    #[schema(pattern = r"^[45]\.[0-9]{1,3}\.[0-9]{1,3}$")]
    status: Option<String>,
    /// The remote server's words (kept, at most 2 KiB).
    #[serde(default)]
    diagnostic: Option<String>,
    /// The report as received, e.g. the DSN or the provider's JSON (kept, at most 64 KiB).
    #[serde(default)]
    raw: Option<String>,
}

/// What a report did: one record per subscriber it was about, or one unattributed.
#[derive(Serialize, ToSchema)]
struct Reported {
    bounces: Vec<Bounce>,
}

fn push(errors: &mut Vec<FieldError>, field: &str, message: String) {
    errors.push(FieldError {
        field: field.into(),
        message,
    });
}

/// The kind a report's status code says, for a report that gives no type.
fn kind_of(status: Status) -> BounceKind {
    status.bounce_kind().unwrap_or(match status.class {
        4 => BounceKind::Soft,
        _ => BounceKind::Hard,
    })
}

/// Records a bounce or complaint the user's own pipeline received (a provider's
/// webhook, a mailbox it reads). The rules apply as for any other: a hard bounce makes
/// the subscriber `bounced`, soft ones do at the third within 7 days, a complaint
/// suppresses the address in every newsletter. Running jobs skip them within a second.
#[utoipa::path(post, operation_id = "report_bounce", path = "/v1/bounces", tag = "bounces", request_body = ReportBounce,
    responses((status = 201, body = Reported)))]
async fn report_bounce(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ReportBounce>,
) -> Result<(StatusCode, Json<Reported>), ApiError> {
    let mut errors = Vec::new();
    let status = match body.status.as_deref().map(|s| (s, Status::parse(s.trim()))) {
        Some((_, Some(status))) if status.class != 2 => Some(status),
        Some((text, _)) => {
            push(
                &mut errors,
                "status",
                format!("{text:?} is not an enhanced status code of a failure (4.x.x or 5.x.x)"),
            );
            None
        }
        None => None,
    };
    let kind = match (body.kind, status) {
        (Some(kind), _) => Some(kind),
        (None, Some(status)) => Some(kind_of(status)),
        (None, None) => {
            push(
                &mut errors,
                "type",
                "give the type (hard, soft, complaint or blocked) or a status code".into(),
            );
            None
        }
    };
    let email = match body.email.as_deref().map(mail::parse_address) {
        Some(Ok(email)) => Some(email),
        Some(Err(e)) => {
            push(&mut errors, "email", e.to_string());
            None
        }
        None => None,
    };
    let message = match body.message_id.as_deref() {
        Some(text) => match crate::runner::parse_message_id(text) {
            Some(_) => Some(text),
            None => {
                push(
                    &mut errors,
                    "message_id",
                    format!("{text:?} is not the Message-ID of a letterbox message"),
                );
                None
            }
        },
        None => None,
    };
    if email.is_none() && body.subscriber.is_none() && message.is_none() && errors.is_empty() {
        push(
            &mut errors,
            "email",
            "say whom it is about: email, subscriber or message_id".into(),
        );
    }
    for (field, value) in [
        ("subscriber", body.subscriber),
        ("newsletter", body.newsletter),
        ("job", body.job),
    ] {
        if let Err(ApiError::Invalid { errors: mut more, .. }) = int64(field, value) {
            errors.append(&mut more);
        }
    }
    let Some(kind) = kind.filter(|_| errors.is_empty()) else {
        return Err(ApiError::Invalid {
            detail: "invalid bounce report".into(),
            errors,
        });
    };
    let mut report = NewBounce::new(kind, sources::API, email.unwrap_or_default());
    report.status = status.map(|s| s.to_string());
    report.diagnostic = body.diagnostic;
    report.raw = body.raw;
    report.subscriber_id = body.subscriber;
    report.newsletter_id = body.newsletter;
    let job = match message {
        Some(message_id) => {
            // A store that fails is a 503, not a verdict on the Message-ID.
            let Some((found, subscriber)) = crate::bounces::answered(&state.store, message_id).await? else {
                return Err(ApiError::field(
                    "message_id",
                    "names no message this installation sent",
                ));
            };
            report.subscriber_id = Some(subscriber);
            Some(found)
        }
        None => match body.job {
            Some(id) => Some(state.store.job(id).await?),
            None => None,
        },
    };
    if let Some(job) = &job {
        report = report.answering(job);
    }
    let rules = state.runner.bounce_rules();
    let bounces = state.store.record_bounce(report, rules).await?;
    Ok((StatusCode::CREATED, Json(Reported { bounces })))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct BounceQuery {
    /// Only reports about nobody in the store (an address no subscriber has).
    #[serde(default)]
    unattributed: Option<bool>,
    /// The previous page's `next`: reports older than this id.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// Every bounce and complaint report kept, newest first: what it said, its raw
/// message, and what the rules decided.
#[utoipa::path(get, operation_id = "list_bounces", path = "/v1/bounces", tag = "bounces", params(BounceQuery),
    responses((status = 200, body = Page<Bounce>)))]
async fn list_bounces(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<BounceQuery>,
) -> Result<Json<Page<Bounce>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let filter = BounceFilter {
        subscriber_id: None,
        unattributed: query.unattributed.unwrap_or(false),
    };
    let items = state
        .store
        .bounces(filter, page_cursor(query.cursor)?, limit)
        .await?;
    Ok(page(items, limit, |b| b.id))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// The previous page's `next`: reports older than this id.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// One subscriber's bounce and complaint reports, newest first, including those a
/// reinstatement no longer counts.
#[utoipa::path(get, operation_id = "subscriber_bounces", path = "/v1/subscribers/{id}/bounces", tag = "bounces",
    params(("id" = u64, Path), PageQuery), responses((status = 200, body = Page<Bounce>)))]
async fn subscriber_bounces(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Page<Bounce>>, ApiError> {
    let limit = page_limit(query.limit)?;
    state.store.subscriber_by_id(id).await?;
    let filter = BounceFilter {
        subscriber_id: Some(id),
        unattributed: false,
    };
    let items = state
        .store
        .bounces(filter, page_cursor(query.cursor)?, limit)
        .await?;
    Ok(page(items, limit, |b| b.id))
}

/// A reinstated subscriber, and the suppression of their address it lifted.
#[derive(Serialize, ToSchema)]
struct Reinstated {
    subscriber: Subscriber,
    lifted_suppression: Option<Suppression>,
}

/// Makes a bounced or complained subscriber active again (an operator's decision,
/// e.g. after a false positive). Their reports stay, no longer counted; their address
/// leaves the suppression list. 409 for an unsubscribed subscriber: only they can
/// subscribe again.
#[utoipa::path(post, operation_id = "reinstate_subscriber", path = "/v1/subscribers/{id}/reinstate", tag = "bounces",
    params(("id" = u64, Path)), responses((status = 200, body = Reinstated)))]
async fn reinstate(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Reinstated>, ApiError> {
    let (subscriber, lifted_suppression) = state.store.reinstate(id).await?;
    Ok(Json(Reinstated {
        subscriber,
        lifted_suppression,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SuppressionQuery {
    /// The previous page's `next`: addresses after this one.
    #[serde(default)]
    after: Option<String>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// A page of the suppression list.
#[derive(Serialize, ToSchema)]
struct SuppressionPage {
    items: Vec<Suppression>,
    /// Pass as `?after=` for the next page; `null` on the last one.
    next: Option<String>,
}

/// The addresses no newsletter sends to, by address: complained ones and those the
/// operator added.
#[utoipa::path(get, operation_id = "list_suppressions", path = "/v1/suppressions", tag = "bounces", params(SuppressionQuery),
    responses((status = 200, body = SuppressionPage)))]
async fn list_suppressions(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SuppressionQuery>,
) -> Result<Json<SuppressionPage>, ApiError> {
    let limit = page_limit(query.limit)?;
    let items = state.store.suppressions(query.after, limit).await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|s| s.email.clone()))
        .flatten();
    Ok(Json(SuppressionPage { items, next }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddSuppressions {
    #[schema(min_items = 1)]
    emails: Vec<String>,
    /// Why, for whoever reads the list later (at most 500 characters).
    #[serde(default)]
    #[schema(max_length = 500)]
    note: Option<String>,
}

/// What adding a list did.
#[derive(Serialize, ToSchema, Default)]
pub(super) struct Added {
    /// Addresses new to the list.
    added: u64,
    /// Valid addresses that were on it already (they keep their reason and date).
    already: u64,
    pub(super) rejected: u64,
    /// The first 100 rejected rows.
    errors: Vec<RowError>,
}

/// Puts addresses on the suppression list: JSON `{"emails": [...], "note": ...}`, or
/// CSV (`text/csv`) with an `email` column and an optional `note` column. No newsletter
/// sends to them; a delivery to one is skipped with the reason and the date.
#[utoipa::path(post, operation_id = "add_suppressions", path = "/v1/suppressions", tag = "bounces", request_body = AddSuppressions,
    responses((status = 200, body = Added)))]
async fn add_suppressions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Added>, ApiError> {
    let rows: Vec<(String, Option<String>)> = if is_csv(&headers) {
        csv_rows(&body)?
    } else {
        super::error::refuse_nul(&body)?;
        let json: AddSuppressions = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
        if json.emails.is_empty() {
            return Err(ApiError::field("emails", "must not be empty"));
        }
        check_note(json.note.as_deref())?;
        json.emails.into_iter().map(|e| (e, json.note.clone())).collect()
    };
    Ok(Json(suppress(&state, rows).await?))
}

/// A suppression's note: at most 500 characters.
pub(super) fn check_note(note: Option<&str>) -> Result<(), ApiError> {
    match note {
        Some(n) if n.chars().count() > 500 => Err(ApiError::field("note", "must be at most 500 characters")),
        _ => Ok(()),
    }
}

/// Puts each row's address (with its note) on the suppression list, in batches; the
/// rows that are not addresses are counted and the first ones named.
pub(super) async fn suppress(
    state: &AppState,
    rows: Vec<(String, Option<String>)>,
) -> Result<Added, ApiError> {
    let mut answer = Added::default();
    let mut valid = Vec::new();
    for (i, (email, note)) in rows.into_iter().enumerate() {
        match mail::parse_address(&email) {
            Ok(email) => valid.push(NewSuppression {
                email,
                reason: SuppressionReason::Manual,
                note: note.filter(|n| !n.trim().is_empty()),
                bounce_id: None,
            }),
            Err(e) => {
                answer.rejected += 1;
                if answer.errors.len() < MAX_ROW_ERRORS {
                    answer.errors.push(RowError {
                        row: i as u64 + 1,
                        line: None,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    let total = valid.len() as u64;
    let mut rest = valid;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(SUPPRESSION_BATCH));
        answer.added += state.store.add_suppressions(rest).await?;
        rest = tail;
    }
    answer.already = total - answer.added;
    Ok(answer)
}

/// The `email` (and optional `note`) column of a CSV body.
fn csv_rows(body: &[u8]) -> Result<Vec<(String, Option<String>)>, ApiError> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| ApiError::invalid(format!("invalid CSV: {e}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let email = column("email").ok_or_else(|| ApiError::invalid("the CSV needs an `email` column"))?;
    let note = column("note");
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| ApiError::invalid(format!("invalid CSV: {e}")))?;
        rows.push((
            record.get(email).unwrap_or_default().to_string(),
            note.and_then(|n| record.get(n)).map(str::to_string),
        ));
    }
    Ok(rows)
}

/// One address's suppression; 404 when it is not on the list.
#[utoipa::path(get, operation_id = "show_suppression", path = "/v1/suppressions/{email}", tag = "bounces",
    params(("email" = String, Path)), responses((status = 200, body = Suppression)))]
async fn show_suppression(
    State(state): State<AppState>,
    ApiPath(email): ApiPath<String>,
) -> Result<Json<Suppression>, ApiError> {
    let mut found = state.store.suppressed(vec![email.clone()]).await?;
    found
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("{email} is not on the suppression list")))
}

/// Takes an address off the suppression list (its subscribers' own statuses do not
/// change: reinstate them for that).
#[utoipa::path(delete, operation_id = "remove_suppression", path = "/v1/suppressions/{email}", tag = "bounces",
    params(("email" = String, Path)), responses((status = 200, body = Suppression)))]
async fn remove_suppression(
    State(state): State<AppState>,
    ApiPath(email): ApiPath<String>,
) -> Result<Json<Suppression>, ApiError> {
    Ok(Json(state.store.remove_suppression(email).await?))
}
