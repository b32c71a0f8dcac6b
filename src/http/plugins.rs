//! Uploading policies.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiPath, ApiQuery};
use super::{ApiError, AppState};
use crate::domain::{Plugin, PluginKind, PluginSummary, PluginVersion};
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};

/// `max_upload` is the configured largest component (default 10 MiB; the default
/// template, with minijinja, is ~0.8 MiB).
pub fn router(max_upload: usize) -> OpenApiRouter<AppState> {
    let (schemas, paths, upload) = routes!(upload);
    OpenApiRouter::new()
        .routes((schemas, paths, upload.layer(DefaultBodyLimit::max(max_upload))))
        .routes(routes!(list))
        .routes(routes!(show, remove))
}

/// Every plugin name with its latest version.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins", responses((status = 200, body = Vec<PluginSummary>)))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<PluginSummary>>, ApiError> {
    Ok(Json(state.store.list_plugins().await?))
}

/// A plugin name's history.
#[derive(Serialize, ToSchema)]
struct PluginHistory {
    name: String,
    kind: PluginKind,
    /// Oldest first.
    versions: Vec<PluginVersion>,
}

/// A plugin name's versions, oldest first.
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path)),
    responses((status = 200, body = PluginHistory)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<PluginHistory>, ApiError> {
    let (kind, versions) = state
        .store
        .plugin_versions(name.clone())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("plugin {name} not found")))?;
    Ok(Json(PluginHistory { name, kind, versions }))
}

/// Deletes a plugin name with all its versions; 409 while an unfinished job uses it.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn remove(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if [DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME].contains(&name.as_str()) {
        // The server's own state forbids it, not the request's form: 409.
        return Err(ApiError::Conflict(format!(
            "{name} is built in and cannot be deleted"
        )));
    }
    state.store.delete_plugin(name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    kind: PluginKind,
    name: String,
}

/// Stores a component after checking it compiles and implements the world of its kind.
/// Uploading the same bytes again answers 200 with the existing plugin.
#[utoipa::path(post, path = "/v1/plugins", tag = "plugins", params(UploadQuery),
    request_body(description = "The component's bytes", content((Vec<u8> = "application/wasm"))),
    responses((status = 201, description = "A new version", body = Plugin), (status = 200, description = "These bytes were already uploaded", body = Plugin)))]
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
        return Err(ApiError::field(
            "name",
            "must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    if [DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME].contains(&name) {
        return Err(ApiError::field(
            "name",
            format!("{name} is the built-in policy's name; upload yours under another name"),
        ));
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
