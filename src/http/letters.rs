//! Letters, and submitting them as send jobs.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiJson, ApiPath, ApiQuery};
use super::{ApiError, AppState, Page, page, page_cursor, page_limit};
use crate::domain::{Job, Letter, now};
use crate::policy::Verdict;
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};
use crate::runner::{PreviewTarget, RetryOverride, SendOptions};
use crate::store::IdempotencyKey;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, change, delete))
        .routes(routes!(send))
        .routes(routes!(preview))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateLetter {
    /// One line, not blank: a template for the built-in template policy.
    #[schema(min_length = 1, pattern = r"^[^\r\n]*\S[^\r\n]*$")]
    subject: String,
    text: String,
    #[serde(default)]
    html: Option<String>,
    /// A filter policy's name (default: the built-in one, which sends to everyone).
    #[serde(default)]
    filter: Option<String>,
    /// A template policy's name (default: the built-in minijinja template).
    #[serde(default)]
    template: Option<String>,
    /// Data the policies see, the same for every recipient.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<Map<String, Value>>,
}

/// Writes a letter for a newsletter. Its policies must exist.
#[utoipa::path(post, operation_id = "create_letter", path = "/v1/newsletters/{id}/letters", tag = "letters", params(("id" = u64, Path)),
    request_body = CreateLetter, responses((status = 201, body = Letter)))]
async fn create(
    State(state): State<AppState>,
    ApiPath(newsletter_id): ApiPath<u64>,
    ApiJson(body): ApiJson<CreateLetter>,
) -> Result<(StatusCode, Json<Letter>), ApiError> {
    check_subject(&body.subject)?;
    let filter = body.filter.unwrap_or_else(|| DEFAULT_FILTER_NAME.to_string());
    let template = body.template.unwrap_or_else(|| DEFAULT_TEMPLATE_NAME.to_string());
    let letter = Letter {
        id: 0,
        newsletter_id,
        subject: body.subject,
        text: body.text,
        html: body.html,
        filter,
        template,
        params: body.params.unwrap_or_default(),
        created_at: now(),
    };
    // Named policies must exist now (their version is fixed only when a job starts),
    // and the letter must render.
    state.runner.check_letter(&letter).await?;
    let letter = state.store.create_letter(letter).await?;
    Ok((StatusCode::CREATED, Json(letter)))
}

/// A subject is one header line, not blank. Folding a line break away silently would
/// send something other than what was written; the author decides instead.
pub(super) fn check_subject(subject: &str) -> Result<(), ApiError> {
    if subject.trim().is_empty() {
        return Err(ApiError::field("subject", "must not be empty"));
    }
    if subject.contains(['\r', '\n']) {
        return Err(ApiError::field(
            "subject",
            "must be one line (it contains a line break)",
        ));
    }
    Ok(())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LetterQuery {
    /// The previous page's `next`: the letter id to continue after.
    #[serde(default)]
    cursor: Option<u64>,
    /// Items per page: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default)]
    limit: Option<usize>,
}

/// A newsletter's letters, in id order, a page at a time.
#[utoipa::path(get, operation_id = "list_letters", path = "/v1/newsletters/{id}/letters", tag = "letters", params(("id" = u64, Path), LetterQuery),
    responses((status = 200, body = Page<Letter>)))]
async fn list(
    State(state): State<AppState>,
    ApiPath(newsletter_id): ApiPath<u64>,
    ApiQuery(query): ApiQuery<LetterQuery>,
) -> Result<Json<Page<Letter>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let items = state
        .store
        .letters_after(newsletter_id, page_cursor(query.cursor)?.unwrap_or(0), limit)
        .await?;
    Ok(page(items, limit, |l| l.id))
}

/// `"html": null` must remove the HTML part, which a plain `Option` cannot tell from
/// absence.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LetterChange {
    /// One line, not blank.
    #[serde(default)]
    #[schema(min_length = 1, pattern = r"^[^\r\n]*\S[^\r\n]*$")]
    subject: Option<String>,
    #[serde(default)]
    text: Option<String>,
    /// `null` removes the HTML part.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    html: Option<Option<String>>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    template: Option<String>,
    /// Replaces the params as a whole.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<Map<String, Value>>,
}

/// Changes a letter: what is given replaces what it had, and the result is checked as a
/// new letter is. Refused (409) while a job of the letter is not finished.
#[utoipa::path(patch, operation_id = "change_letter", path = "/v1/letters/{id}", tag = "letters", params(("id" = u64, Path)),
    request_body = LetterChange, responses((status = 200, body = Letter),
        (status = 409, description = "A job of the letter is not finished", body = super::error::Problem, content_type = "application/problem+json")))]
async fn change(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<u64>,
    ApiJson(body): ApiJson<LetterChange>,
) -> Result<Json<Letter>, ApiError> {
    let mut letter = state.store.letter(id).await?;
    if let Some(subject) = body.subject {
        check_subject(&subject)?;
        letter.subject = subject;
    }
    letter.text = body.text.unwrap_or(letter.text);
    letter.html = body.html.unwrap_or(letter.html);
    letter.filter = body.filter.unwrap_or(letter.filter);
    letter.template = body.template.unwrap_or(letter.template);
    letter.params = body.params.unwrap_or(letter.params);
    state.runner.check_letter(&letter).await?;
    Ok(Json(state.store.update_letter(letter).await?))
}

/// Deletes a letter. Refused (409) while a job of it is not finished; finished jobs stay
/// as the record of what was sent.
#[utoipa::path(delete, operation_id = "delete_letter", path = "/v1/letters/{id}", tag = "letters", params(("id" = u64, Path)),
    responses((status = 204, description = "Deleted"),
        (status = 409, description = "A job of the letter is not finished", body = super::error::Problem, content_type = "application/problem+json")))]
async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<StatusCode, ApiError> {
    state.store.delete_letter(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One letter.
#[utoipa::path(get, operation_id = "show_letter", path = "/v1/letters/{id}", tag = "letters", params(("id" = u64, Path)),
    responses((status = 200, body = Letter)))]
async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<Letter>, ApiError> {
    Ok(Json(state.store.letter(id).await?))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    /// Deliveries in flight for this job (default: the server's).
    #[serde(default, deserialize_with = "crate::domain::whole_number")]
    #[schema(minimum = 1, maximum = 1000)]
    concurrency: Option<u32>,
    /// A configured transport's name; the default one otherwise.
    #[serde(default)]
    transport: Option<String>,
    #[serde(default)]
    retry: Option<RetryOverride>,
    /// RFC 3339 time (`2026-12-01T09:00:00Z`) or unix seconds; a time past is now.
    #[serde(default)]
    #[schema(value_type = Option<SendAt>)]
    send_at: Option<Value>,
}

/// A submitted job.
#[derive(Serialize, ToSchema)]
struct Submitted {
    job_id: u64,
    job: Job,
}

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The request's `Idempotency-Key`, if it has one, with the hash of `canonical` (the
/// request as parsed, re-serialised: object keys sorted, so the same request with other
/// whitespace or key order is the same request).
pub(super) fn idempotency_key(
    headers: &HeaderMap,
    canonical: &Value,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| ApiError::field("Idempotency-Key", "must be 1 to 255 visible ASCII characters"))?;
    use sha2::Digest;
    let canonical = serde_json::to_vec(canonical).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Some(IdempotencyKey {
        key: key.to_string(),
        request_hash: hex::encode(sha2::Sha256::digest(&canonical)),
    }))
}

fn parse_send_at(value: &Value) -> Result<u64, ApiError> {
    let field_error = |message: String| ApiError::Invalid {
        detail: "invalid send_at".into(),
        errors: vec![super::FieldError {
            field: "send_at".into(),
            message,
        }],
    };
    match value {
        Value::Number(n) => crate::domain::whole(n)
            .ok_or_else(|| field_error("unix seconds must be a whole number ≥ 0".into())),
        // A time before 1970 is in the past like any other: the job starts now.
        Value::String(s) => parse_rfc3339(s)
            .map(|seconds| seconds.max(0) as u64)
            .ok_or_else(|| {
                field_error(format!(
                    "{s:?} is not an RFC 3339 time (e.g. 2026-12-01T09:00:00Z)"
                ))
            }),
        _ => Err(field_error("expected an RFC 3339 string or unix seconds".into())),
    }
}

/// `send_at` as the OpenAPI document describes it: an RFC 3339 date-time or unix seconds.
struct SendAt;

impl utoipa::PartialSchema for SendAt {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
            .into()
    }
}

impl ToSchema for SendAt {}

/// Seconds since 1970 (negative before) of an RFC 3339 date-time:
/// `YYYY-MM-DD(T|t| )HH:MM:SS(.fraction)?(Z|z|±HH:MM)`.
pub(super) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0i64, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[month as usize - 1] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = i64::from(h1.checked_sub(b'0')?) * 10 + i64::from(h2.checked_sub(b'0')?);
            let minutes = i64::from(m1.checked_sub(b'0')?) * 10 + i64::from(m2.checked_sub(b'0')?);
            if !(h1.is_ascii_digit() && h2.is_ascii_digit() && m1.is_ascii_digit() && m2.is_ascii_digit())
                || hours > 23
                || minutes > 59
            {
                return None;
            }
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Starts (or schedules) a send job. The body is optional. With an `Idempotency-Key`
/// header, repeating the same request returns the same job (`Idempotent-Replayed:
/// true`) instead of sending twice.
#[utoipa::path(post, operation_id = "send_letter", path = "/v1/letters/{id}/send", tag = "letters",
    params(("id" = u64, Path), ("Idempotency-Key" = Option<String>, Header, description = "Repeat-safe submission: 1 to 255 visible ASCII characters",
        min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    request_body(content = Option<SendRequest>, description = "Optional"),
    responses((status = 202, body = Submitted)))]
async fn send(
    State(state): State<AppState>,
    ApiPath(letter_id): ApiPath<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Json<Submitted>), ApiError> {
    let parsed: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        super::error::refuse_nul(&body)?;
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid send request: {e}")))?
    };
    let request: SendRequest = match &parsed {
        Value::Null => SendRequest::default(),
        other => serde_json::from_value(other.clone())
            .map_err(|e| ApiError::invalid(format!("invalid send request: {e}")))?,
    };
    let idempotency = idempotency_key(&headers, &json!({ "letter": letter_id, "body": parsed }))?;
    let send_at = request.send_at.as_ref().map(parse_send_at).transpose()?;
    let (job, created) = state
        .runner
        .submit(
            letter_id,
            SendOptions {
                concurrency: request.concurrency,
                transport: request.transport,
                retry: request.retry.unwrap_or_default(),
                send_at,
                idempotency,
            },
        )
        .await?;
    let mut out_headers = HeaderMap::new();
    if !created {
        out_headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((
        StatusCode::ACCEPTED,
        out_headers,
        Json(Submitted { job_id: job.id, job }),
    ))
}

/// Exactly one of the two; documented as `PreviewFor`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    #[serde(default, deserialize_with = "crate::domain::whole_number")]
    subscriber_id: Option<u64>,
    #[serde(default)]
    recipient: Option<super::newsletters::SubscriberInput>,
}

/// Whom a preview is for: a stored subscriber, or a recipient given inline.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // describes PreviewRequest in the OpenAPI document
enum PreviewFor {
    Subscriber(PreviewSubscriber),
    Recipient(PreviewRecipient),
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PreviewSubscriber {
    subscriber_id: u64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PreviewRecipient {
    recipient: super::newsletters::SubscriberInput,
}

/// Runs the letter's policies for one subscriber (`subscriber_id`) or an inline
/// `recipient` and shows the decision and the message. Sends nothing.
#[utoipa::path(post, operation_id = "preview_letter", path = "/v1/letters/{id}/preview", tag = "letters", params(("id" = u64, Path)),
    request_body = PreviewFor,
    responses((status = 200, description = "`decision` (send or skip), the policy versions, and the `rendered` parts and whole `message` or the skip `reason`", body = Object)))]
async fn preview(
    State(state): State<AppState>,
    ApiPath(letter_id): ApiPath<u64>,
    ApiJson(body): ApiJson<PreviewRequest>,
) -> Result<Json<Value>, ApiError> {
    let target = match (body.subscriber_id, body.recipient) {
        (Some(id), None) => PreviewTarget::Subscriber(id),
        (None, Some(recipient)) => {
            PreviewTarget::Inline(recipient.validate().map_err(|e| ApiError::Invalid {
                detail: "invalid recipient".into(),
                errors: vec![super::FieldError {
                    field: "recipient.email".into(),
                    message: e,
                }],
            })?)
        }
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of subscriber_id and recipient",
            ));
        }
    };
    let preview = state.runner.preview(letter_id, target).await?;
    let mut out = json!({ "filter": preview.filter, "template": preview.template });
    match preview.verdict {
        Verdict::Skip(reason) => {
            out["decision"] = json!("skip");
            out["reason"] = json!(reason);
        }
        Verdict::Send(rendered) => {
            out["decision"] = json!("send");
            out["rendered"] = json!({
                "subject": rendered.subject,
                "text": rendered.text,
                "html": rendered.html,
                "headers": rendered.headers.into_iter().map(|(n, v)| json!({ "name": n, "value": v })).collect::<Vec<_>>(),
            });
            out["message"] = json!(preview.message);
        }
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn rfc3339_times_parse_with_offsets_and_before_1970() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-12-01T09:00:00Z"), Some(1_796_115_600));
        assert_eq!(parse_rfc3339("2026-12-01t10:30:00.25+01:30"), Some(1_796_115_600));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59z"), Some(-1));
        assert_eq!(parse_rfc3339("2000-02-29 00:00:00-00:00"), Some(951_782_400));
        for bad in [
            "2001-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-01T09:00:00",
            "tomorrow",
            "2026-12-01T09:00:00+1:00",
            "2026-12-01T09:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
