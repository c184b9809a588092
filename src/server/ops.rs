//! Operational routes: liveness and readiness (Kubernetes probes use them), Prometheus metrics,
//! and the middleware that counts HTTP requests.

use super::AppState;
use crate::telemetry as t;
use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;

/// `GET /health`: the process is alive and answering, and its engine has not crashed (503 if it
/// has: only a restart helps then).
pub async fn health(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    if state.engine.stats().crashed.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "engine failed" })));
    }
    (StatusCode::OK, Json(json!({ "status": "ok" })))
}

/// `GET /ready`: the model is loaded and the engine accepts work (503 while shutting down).
///
/// The body also reports the control-plane state served: its revision, whether the state store
/// answers, and adapters that cannot be loaded here. Neither makes the replica unready: with
/// the store unreachable it serves its last known state (taking every replica out of service
/// for a database outage would stop all inference), and an adapter it cannot load is refused
/// to exactly the tenants that need it (503), not to everyone.
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let stats = state.engine.stats();
    let alive = state.engine.is_alive();
    let body = json!({
        "status": if alive { "ready" } else { "unavailable" },
        "model": state.model_id,
        "running": stats.running.load(std::sync::atomic::Ordering::Relaxed),
        "waiting": stats.waiting.load(std::sync::atomic::Ordering::Relaxed),
        "state": {
            "revision": state.tenants.revision(),
            "store": state.tenants.store().describe(),
            "store_status": state.control.health.report(),
            "adapters_unavailable": state.control.unavailable(),
        },
    });
    (if alive { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// `GET /metrics`: the Prometheus text exposition. Gauges that describe state rather than events
/// (readiness, adapters and their memory) are refreshed here, at scrape time.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let handle = t::metrics_handle();
    metrics::gauge!(t::READY).set(if state.engine.is_alive() { 1.0 } else { 0.0 });
    metrics::gauge!(t::ADAPTERS_LOADED).set(state.adapters.names().len() as f64);
    metrics::gauge!(t::ADAPTERS_UNAVAILABLE).set(state.control.unavailable().len() as f64);
    metrics::gauge!(t::STATE_STORE_UP).set(if state.control.health.reachable() { 1.0 } else { 0.0 });
    metrics::gauge!(t::STATE_REVISION).set(state.tenants.revision() as f64);
    let (loaded, retired) = state.adapters.bytes();
    metrics::gauge!(t::ADAPTER_MEMORY_BYTES, "state" => "loaded").set(loaded as f64);
    metrics::gauge!(t::ADAPTER_MEMORY_BYTES, "state" => "retired").set(retired as f64);
    handle.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
}

/// Counts every HTTP request by route pattern (not the raw path: bounded labels), method and
/// status, and times it until the response head.
pub async fn track_http(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(t::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!(t::HTTP_REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}
