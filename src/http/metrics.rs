//! `/metrics` in the Prometheus text format.
//!
//! The other modules record through the `metrics` facade (as they log through
//! `tracing`): deliveries by outcome (runner), policy evaluation time (policy), SMTP
//! send time per transport (mail), store commit time (store). This module installs the
//! process-wide Prometheus recorder and, at each scrape, adds what is read from the
//! store: jobs per state and the recipients still to deliver, and the log lines that
//! could not be written (`logging`).

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::{ApiError, AppState};
use crate::domain::JobState;

/// Seconds; from a policy call (tens of µs) to a slow SMTP server (tens of s).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder, once per process (several servers in one process, as in the
/// tests, share it). Call before anything records: earlier measurements are lost.
pub fn install() {
    handle();
}

fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .and_then(|b| b.install_recorder());
            match installed {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics are unavailable");
                    None
                }
            }
        })
        .as_ref()
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Metrics", content_type = "text/plain")))]
pub async fn render(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let handle = handle().ok_or_else(|| ApiError::Unavailable("metrics are unavailable".into()))?;
    // A failing store is what metrics must show, so they are served without it: the
    // figures read from the store keep their last values, and `letterbox_store_up`
    // says 0.
    let overview = state.store.job_overview().await;
    let nodes = state.store.nodes().await;
    // Up: it answers, and takes writes: the last one, the heartbeat's, and every job's
    // here (a job is stalled while its claims or records fail).
    let stalled = state.runner.stalls().len();
    let up = overview.is_ok()
        && nodes.is_ok()
        && state.store.write_failure().is_none()
        && state.runner.heartbeat_error().is_none()
        && stalled == 0;
    metrics::gauge!("letterbox_store_up").set(if up { 1.0 } else { 0.0 });
    // Counted by the log itself (which must not depend on anything that could fail).
    metrics::counter!("letterbox_log_lines_dropped_total").absolute(crate::logging::dropped_lines());
    metrics::gauge!("letterbox_jobs_stalled").set(stalled as f64);
    if let Ok(overview) = overview {
        for job_state in JobState::ALL {
            let count = overview.by_state.get(&job_state).copied().unwrap_or(0);
            metrics::gauge!("letterbox_jobs", "state" => job_state.as_str()).set(count as f64);
        }
        metrics::gauge!("letterbox_queue_depth").set(overview.open_recipients as f64);
    }
    if let Ok(nodes) = nodes {
        metrics::gauge!("letterbox_nodes").set(nodes.len() as f64);
        metrics::gauge!("letterbox_node_claims").set(nodes.iter().map(|n| n.claims).sum::<u64>() as f64);
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle.render(),
    ))
}
