//! Operational routes: liveness and readiness (Kubernetes probes use them).

use super::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;

/// `GET /health`: the process is alive and answering.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /ready`: the model is loaded and the engine accepts work (503 while shutting down).
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let stats = state.engine.stats();
    let alive = state.engine.is_alive();
    let body = json!({
        "status": if alive { "ready" } else { "unavailable" },
        "model": state.model_id,
        "running": stats.running.load(std::sync::atomic::Ordering::Relaxed),
        "waiting": stats.waiting.load(std::sync::atomic::Ordering::Relaxed),
    });
    (if alive { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}
