//! Health: the nodes working on the store (the fleet, with PostgreSQL) and the checks
//! `/readyz` makes (the store answers and can write, this node's heartbeat, jobs stalled
//! on the store), all of them shown rather than the first that fails.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde_json::json;

use super::auth::Session;
use super::{PageError, page};
use crate::domain::now;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/console/health", get(show))
}

async fn show(State(state): State<AppState>, session: Session) -> Result<Response, PageError> {
    let mut checks = Vec::new();
    let ping = state.store.ping().await;
    checks.push(json!({
        "name": format!("The store ({}) answers", state.store.name()),
        "ok": ping.is_ok(),
        "detail": ping.err().map(|e| e.to_string()),
    }));
    let write = state.store.write_failure();
    checks.push(json!({
        "name": "The store can write",
        "ok": write.is_none(),
        "detail": write.map(|(why, since)| format!("failing for {} s: {why}", now().saturating_sub(since))),
    }));
    let heartbeat = state.runner.heartbeat_error();
    checks.push(json!({
        "name": "This node's heartbeat is written",
        "ok": heartbeat.is_none(),
        "detail": heartbeat,
    }));
    let stalls = state.runner.stalls();
    checks.push(json!({
        "name": "No job is stalled on the store",
        "ok": stalls.is_empty(),
        "detail": (!stalls.is_empty()).then(|| stalls.iter().map(|(job, stall)| format!("job {job}: {}", stall.reason)).collect::<Vec<_>>().join("; ")),
    }));
    checks.push(json!({
        "name": "The node is not shutting down",
        "ok": !state.runner.is_stopping(),
        "detail": state.runner.is_stopping().then_some("jobs are draining"),
    }));
    // The nodes are read from the store, which may be what is failing: say so there.
    let (nodes, nodes_error) = match state.store.nodes().await {
        Ok(nodes) => (nodes, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let context = json!({
        "checks": checks,
        "healthy": checks.iter().all(|c| c["ok"] == true),
        "nodes": nodes,
        "nodes_error": nodes_error,
        "this_node": state.runner.node_id(),
        "shared": state.store.is_shared(),
        "section": "health",
    });
    Ok(page(&state, StatusCode::OK, "health.html", &session, context))
}
