//! Uploading policies.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::error::ApiQuery;
use super::{ApiError, AppState};
use crate::domain::{Plugin, PluginKind};
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};

/// `max_upload` is the configured largest component (default 10 MiB; the default
/// template, with minijinja, is ~0.8 MiB).
pub fn router(max_upload: usize) -> Router<AppState> {
    Router::new().route(
        "/v1/plugins",
        post(upload).layer(DefaultBodyLimit::max(max_upload)),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    kind: PluginKind,
    name: String,
}

/// Stores a component after checking it compiles and implements the world of its kind.
/// Uploading the same bytes again answers 200 with the existing plugin.
async fn upload(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Plugin>), ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let content_type = content_type.to_str().unwrap_or_default();
        if !matches!(content_type, "application/wasm" | "application/octet-stream") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "expected the component's raw bytes as application/wasm, got {content_type}"
            )));
        }
    }
    let name = query.name.trim();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(ApiError::invalid(
            "name must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    if [DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME].contains(&name) {
        return Err(ApiError::invalid(format!(
            "{name} is the built-in policy's name; upload yours under another name"
        )));
    }
    let body = body?;
    if body.is_empty() {
        return Err(ApiError::invalid("the body is empty: send the component's bytes"));
    }
    let (plugin, created) = state
        .runner
        .install_plugin(name.to_string(), query.kind, body.to_vec())
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(plugin)))
}
