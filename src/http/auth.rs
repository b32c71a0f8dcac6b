//! Bearer-token authentication for the `/v1` API. The public routes (`/healthz`,
//! `/readyz`, `/u/*`) are outside it.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::tokens::ApiToken;

/// Lets the request through only with `Authorization: Bearer TOKEN`; 401 otherwise,
/// saying whether the header was missing or the token wrong (never what it should be).
pub async fn require_token(State(token): State<ApiToken>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match presented {
        Some(t) if token.matches(t) => next.run(request).await,
        Some(_) => ApiError::Unauthorized("the bearer token is not valid".into()).into_response(),
        None => ApiError::Unauthorized(
            "this endpoint needs an `Authorization: Bearer TOKEN` header (the token is set with \
             LETTERBOX_API_TOKEN, or was printed at the first start)"
                .into(),
        )
        .into_response(),
    }
}
