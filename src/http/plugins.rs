//! Uploading policies.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiPath, ApiQuery, UploadBody};
use super::{ApiError, AppState};
use crate::domain::{Plugin, PluginKind, PluginSummary, PluginVersion};
use crate::policy::builtin::{DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME};
use crate::runner::PolicyStatus;

/// `max_upload` is the configured largest component (default 64 MiB; the default
/// template, with minijinja, is ~0.8 MiB).
pub fn router(max_upload: usize) -> OpenApiRouter<AppState> {
    let (schemas, paths, upload) = routes!(upload);
    OpenApiRouter::new()
        .routes((schemas, paths, upload.layer(DefaultBodyLimit::max(max_upload))))
        .routes(routes!(list))
        .routes(routes!(show, remove))
}

/// Where a plugin version's compilation stands on the node that answers. Each node
/// compiles for itself; the same bytes get the same answer on every node.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum CompileState {
    /// Stored and checked; not compiled on this node yet (an older version nobody has
    /// used here): compiled when a letter or job needs it.
    Stored,
    /// Stored and checked; being compiled (or waiting for the compilation before it).
    /// A letter or job that needs it waits for it.
    Compiling,
    Ready,
    /// It cannot run; `error` says why. Letters that name it are refused.
    Failed,
}

#[derive(Serialize, ToSchema)]
pub(super) struct Compilation {
    pub(super) status: CompileState,
    /// Why it failed, when `status` is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

impl Compilation {
    /// `latest`: the name's latest version, which starts compiling if it has not.
    fn of(state: &AppState, id: &str, name: &str, kind: PluginKind, latest: bool) -> Compilation {
        match state.runner.policy_status(id, name, kind, latest) {
            PolicyStatus::Stored => Compilation {
                status: CompileState::Stored,
                error: None,
            },
            PolicyStatus::Compiling => Compilation {
                status: CompileState::Compiling,
                error: None,
            },
            PolicyStatus::Ready => Compilation {
                status: CompileState::Ready,
                error: None,
            },
            PolicyStatus::Failed(error) => Compilation {
                status: CompileState::Failed,
                error: Some(error),
            },
        }
    }
}

/// A plugin with where its compilation stands.
#[derive(Serialize, ToSchema)]
pub(super) struct PluginView {
    #[serde(flatten)]
    pub(super) plugin: Plugin,
    #[serde(flatten)]
    pub(super) compilation: Compilation,
}

/// One version of a plugin name, with where its compilation stands.
#[derive(Serialize, ToSchema)]
pub(super) struct VersionView {
    #[serde(flatten)]
    pub(super) version: PluginVersion,
    #[serde(flatten)]
    pub(super) compilation: Compilation,
}

/// A plugin name with its latest version.
#[derive(Serialize, ToSchema)]
pub(super) struct SummaryView {
    pub(super) name: String,
    pub(super) kind: PluginKind,
    pub(super) latest: VersionView,
    pub(super) versions: u64,
}

/// Every plugin name with its latest version.
#[utoipa::path(get, operation_id = "list_plugins", path = "/v1/plugins", tag = "plugins", responses((status = 200, body = Vec<SummaryView>)))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<SummaryView>>, ApiError> {
    Ok(Json(summaries(&state).await?))
}

/// Every plugin name with its latest version and where that version's compilation
/// stands (which starts it, if it has not).
pub(super) async fn summaries(state: &AppState) -> Result<Vec<SummaryView>, ApiError> {
    let summaries = state.store.list_plugins().await?;
    Ok(summaries
        .into_iter()
        .map(|s: PluginSummary| SummaryView {
            latest: VersionView {
                compilation: Compilation::of(state, &s.latest.id, &s.name, s.kind, true),
                version: s.latest,
            },
            name: s.name,
            kind: s.kind,
            versions: s.versions,
        })
        .collect())
}

/// A plugin name's history.
#[derive(Serialize, ToSchema)]
pub(super) struct PluginHistory {
    pub(super) name: String,
    pub(super) kind: PluginKind,
    /// Oldest first.
    pub(super) versions: Vec<VersionView>,
}

/// A plugin name's versions, oldest first.
#[utoipa::path(get, operation_id = "show_plugin", path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path)),
    responses((status = 200, body = PluginHistory)))]
async fn show(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<PluginHistory>, ApiError> {
    Ok(Json(history(&state, name).await?))
}

/// A plugin name's versions, oldest first, each with where its compilation stands (the
/// latest starts compiling if it has not).
pub(super) async fn history(state: &AppState, name: String) -> Result<PluginHistory, ApiError> {
    let (kind, versions) = state
        .store
        .plugin_versions(name.clone())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("plugin {name} not found")))?;
    let last = versions.len().saturating_sub(1);
    let versions = versions
        .into_iter()
        .enumerate()
        .map(|(i, version)| VersionView {
            compilation: Compilation::of(state, &version.id, &name, kind, i == last),
            version,
        })
        .collect();
    Ok(PluginHistory { name, kind, versions })
}

/// Deletes a plugin name with all its versions; 409 while an unfinished job uses it.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn remove(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    delete(&state, name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether `name` is a built-in policy's (which cannot be uploaded over or deleted).
pub(super) fn is_built_in(name: &str) -> bool {
    [DEFAULT_FILTER_NAME, DEFAULT_TEMPLATE_NAME].contains(&name)
}

/// Deletes a plugin name, unless it is built in or an unfinished job uses it.
pub(super) async fn delete(state: &AppState, name: String) -> Result<(), ApiError> {
    if is_built_in(&name) {
        // The server's own state forbids it, not the request's form: 409.
        return Err(ApiError::Conflict(format!(
            "{name} is built in and cannot be deleted"
        )));
    }
    state.store.delete_plugin(name).await?;
    Ok(())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    kind: PluginKind,
    name: String,
}

/// Stores a component after the checks that need no compilation (a component, importing
/// only what letterbox provides, exporting its kind's function) and compiles it in the
/// background: `status` says `compiling`, then `ready` or `failed` (see
/// `GET /v1/plugins/{name}`). Uploading the same bytes again answers 200 with the
/// existing plugin.
#[utoipa::path(post, path = "/v1/plugins", tag = "plugins", params(UploadQuery),
    request_body(description = "The component's bytes", content((Vec<u8> = "application/wasm"))),
    responses((status = 201, description = "A new version", body = PluginView), (status = 200, description = "These bytes were already uploaded", body = PluginView)))]
async fn upload(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Result<UploadBody, ApiError>,
) -> Result<(StatusCode, Json<PluginView>), ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let content_type = content_type.to_str().unwrap_or_default();
        if !matches!(content_type, "application/wasm" | "application/octet-stream") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "expected the component's raw bytes as application/wasm, got {content_type}"
            )));
        }
    }
    let UploadBody(body) = body?;
    store(&state, &query.name, query.kind, body).await
}

/// Checks and stores an upload's bytes as the latest version of `name`, and starts its
/// compilation: 201 for new bytes, 200 for the name's latest bytes again.
pub(super) async fn store(
    state: &AppState,
    name: &str,
    kind: PluginKind,
    body: Bytes,
) -> Result<(StatusCode, Json<PluginView>), ApiError> {
    let name = name.trim();
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
    if is_built_in(name) {
        return Err(ApiError::field(
            "name",
            format!("{name} is the built-in policy's name; upload yours under another name"),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::invalid("the body is empty: send the component's bytes"));
    }
    let (plugin, created) = state.runner.install_plugin(name.to_string(), kind, body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let compilation = Compilation::of(state, &plugin.id, &plugin.name, plugin.kind, true);
    Ok((status, Json(PluginView { plugin, compilation })))
}
