//! The nodes working on the store: with redb, this process; with PostgreSQL, every live
//! node of the fleet.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, AppState};
use crate::store::NodeInfo;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// The nodes: id, address, version, heartbeat age and the recipients each holds claimed
/// right now. A node whose heartbeat is older than the lease is dead, and is removed
/// (its claims requeued) at the next heartbeat of another node.
#[utoipa::path(get, operation_id = "list_nodes", path = "/v1/nodes", tag = "nodes", responses((status = 200, body = Vec<NodeInfo>)))]
async fn list(State(state): State<AppState>) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    Ok(Json(state.store.nodes().await?))
}
