//! The request timeout. A request that takes too long is answered 503, but its work is
//! not cut off half-way: the handler runs in its own task and finishes (a job created,
//! a state written), so a timeout never leaves something half-done. What is exempt: a
//! CSV import (it lasts as long as its upload) and anything after the response head (an
//! event stream is a response whose body goes on).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use tracing::Instrument;

use super::{ApiError, is_csv};

pub async fn limit_time(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    if is_csv(request.headers()) {
        return next.run(request).await;
    }
    // In its own task, still inside the request's span.
    let work = tokio::spawn(next.run(request).instrument(tracing::Span::current()));
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => ApiError::Internal(format!("request handler failed: {e}")).into_response(),
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {limit:?}; what it started still completes"
        ))
        .into_response(),
    }
}
