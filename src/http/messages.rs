//! One-off messages over HTTP: ask for one (`POST /v1/messages`, with an optional
//! `Idempotency-Key`) and read where it stands.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiJson, ApiPath};
use super::events::{SubscriberRef, resolve};
use super::letters::idempotency_key;
use super::{ApiError, AppState};
use crate::messages::{Message, MessageContent, NewMessage};
use crate::store::{NewMessageOutcome, StoreError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create)).routes(routes!(show))
}

/// The most JSON a message's `data` may be.
const MAX_DATA_BYTES: usize = 64 * 1024;

/// A message to one subscriber: a stored letter (`letter_id`), or a subject and body of
/// its own rendered by a template policy (`template`, the built-in one when absent).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MessageInput {
    /// Whom it goes to: a subscriber id, or an email (add `newsletter` when the address
    /// is on more than one list).
    subscriber: SubscriberRef,
    /// The newsletter an email in `subscriber` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9_223_372_036_854_775_807_i64)]
    newsletter: Option<u64>,
    /// The letter it sends (of the subscriber's newsletter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 9_223_372_036_854_775_807_i64)]
    letter_id: Option<u64>,
    /// The template policy for a message with its own subject and body: a name (its
    /// latest version) or `name@sha256`. The built-in template when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1)]
    template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1)]
    subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1)]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    html: Option<String>,
    /// Merged over the letter's params: the template sees it as `params` (at most
    /// 64 KiB of JSON).
    #[serde(default)]
    #[schema(value_type = Object)]
    data: Map<String, Value>,
    /// The transport it goes through; the default one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1)]
    transport: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct Accepted {
    message: Message,
}

/// Queues a one-off message; it is recorded before it is sent, and sent by the next
/// free worker of the fleet. With an `Idempotency-Key`, the same request again gets the
/// same message (and `Idempotent-Replayed: true`) and sends nothing more; the key with a
/// different request is refused. A subscriber who is not active, or whose address is
/// suppressed, is not sent to: the message ends `skipped`, with the reason.
#[utoipa::path(post, operation_id = "create_message", path = "/v1/messages", tag = "messages",
    request_body = MessageInput,
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters")),
    responses((status = 202, body = Accepted)))]
async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(input): ApiJson<MessageInput>,
) -> Result<(StatusCode, HeaderMap, Json<Accepted>), ApiError> {
    let canonical = serde_json::to_value(&input).map_err(|e| ApiError::Internal(e.to_string()))?;
    let idempotency = idempotency_key(&headers, &canonical)?;
    let new = checked(&state, input).await?;
    let (message, created) = match state.runner.queue_message(new, idempotency).await? {
        NewMessageOutcome::Created(m) => (m, true),
        NewMessageOutcome::Existing(m) => (m, false),
        NewMessageOutcome::KeyReused => {
            return Err(ApiError::invalid(
                "this Idempotency-Key was used before with a different request",
            ));
        }
    };
    let mut out = HeaderMap::new();
    if !created {
        out.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((StatusCode::ACCEPTED, out, Json(Accepted { message })))
}

/// The message a request asks for, once everything it names exists and fits.
async fn checked(state: &AppState, input: MessageInput) -> Result<NewMessage, ApiError> {
    let subscriber = resolve(&state.store, input.subscriber, input.newsletter).await?;
    let own_body =
        input.template.is_some() || input.subject.is_some() || input.text.is_some() || input.html.is_some();
    match (input.letter_id, own_body) {
        (Some(_), true) => {
            return Err(ApiError::field(
                "letter_id",
                "give a letter_id, or a subject and text (and template) of the message's own, not both",
            ));
        }
        (None, false) => {
            return Err(ApiError::field(
                "letter_id",
                "give a letter_id, or a subject and text of the message's own",
            ));
        }
        (None, true) => {
            for (field, value) in [("subject", &input.subject), ("text", &input.text)] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    return Err(ApiError::field(
                        field,
                        "is required for a message without a letter_id",
                    ));
                }
            }
        }
        (Some(_), false) => {}
    }
    if let Some(id) = input.letter_id {
        let letter = match state.store.letter(id).await {
            Ok(letter) => letter,
            Err(StoreError::NotFound { .. }) => {
                return Err(ApiError::field("letter_id", format!("there is no letter {id}")));
            }
            Err(e) => return Err(e.into()),
        };
        if letter.newsletter_id != subscriber.newsletter_id {
            return Err(ApiError::field(
                "letter_id",
                format!(
                    "letter {id} is of newsletter {}, not the subscriber's ({})",
                    letter.newsletter_id, subscriber.newsletter_id
                ),
            ));
        }
    }
    if let Some(template) = &input.template {
        state
            .runner
            .check_message_template(template)
            .await
            .map_err(|e| ApiError::field("template", e.to_string()))?;
    }
    if let Some(transport) = &input.transport
        && !state.runner.transport_names().contains(transport)
    {
        return Err(ApiError::field(
            "transport",
            format!(
                "no transport is named {transport:?}; configured: {}",
                state.runner.transport_names().join(", ")
            ),
        ));
    }
    let data_bytes = serde_json::to_vec(&input.data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if data_bytes > MAX_DATA_BYTES {
        return Err(ApiError::field(
            "data",
            format!("is {data_bytes} bytes of JSON; at most {MAX_DATA_BYTES}"),
        ));
    }
    let newsletter = state.store.newsletter(subscriber.newsletter_id).await?;
    Ok(NewMessage {
        newsletter_id: subscriber.newsletter_id,
        subscriber_id: subscriber.id,
        email: subscriber.email,
        content: MessageContent {
            letter_id: input.letter_id,
            template: input.template,
            subject: input.subject,
            text: input.text,
            html: input.html,
            data: input.data,
        },
        transport: input.transport,
        message_id: crate::messages::one_off_message_id(&newsletter.from),
        confirmation: false,
    })
}

/// One message: where it stands (`queued`, `sent`, `skipped`, `failed`), its attempts,
/// and the server's reply or the reason.
#[utoipa::path(get, operation_id = "show_message", path = "/v1/messages/{id}", tag = "messages",
    params(("id" = u64, Path)), responses((status = 200, body = Message)))]
async fn show(State(state): State<AppState>, ApiPath(id): ApiPath<u64>) -> Result<Json<Message>, ApiError> {
    Ok(Json(state.store.message(id).await?))
}
