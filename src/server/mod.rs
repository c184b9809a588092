//! The HTTP layer: an axum router over the engine.
//!
//! - [`openai`]: OpenAI-compatible routes (wire types, handlers, SSE); [`output`]: content,
//!   tool calls and log-probabilities as clients read them;
//! - [`validation`]: request checks and the translation to an engine request;
//! - [`extract`]: the JSON body extractor (415/413/400 in OpenAI's error shape);
//! - [`admin`]: the admin API (adapters, tenants, keys); [`auth`]: who is calling;
//! - [`ops`]: health, readiness, Prometheus metrics, HTTP request counting;
//! - [`error`]: the one error type and its HTTP mapping.

pub mod admin;
pub mod auth;
pub mod error;
pub mod extract;
pub mod openai;
pub mod ops;
pub mod output;
pub mod validation;

use crate::adapters::AdapterRegistry;
use crate::config::ServeConfig;
use crate::engine::EngineHandle;
use crate::tenants::{Directory, Store};
use crate::tokenizer::Tokenizer;
use axum::Router;
use axum::http::{HeaderName, Request};
use axum::routing::{delete, get, post, put};
use error::ApiError;
use std::sync::Arc;
use std::time::Duration;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// What every handler can reach.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// The id clients use in `model`.
    pub model_id: String,
    /// `created` of the model card.
    pub created: u64,
    /// `system_fingerprint`: lethe's version and how the model runs.
    pub fingerprint: String,
    pub config: ServeConfig,
    /// Loaded forget-adapters.
    pub adapters: Arc<AdapterRegistry>,
    /// Tenants, keys and policies (persisted).
    pub tenants: Arc<Directory>,
    /// Serializes admin changes (apply, persist, acknowledge, one at a time).
    pub admin_lock: tokio::sync::Mutex<()>,
    /// The grammar compiler for structured outputs and tool calls (built on first use).
    pub structured: crate::structured::LazyStructured,
}

impl AppState {
    /// Loads the model of `config` and starts its engine.
    pub fn load(config: ServeConfig) -> anyhow::Result<Arc<Self>> {
        use crate::engine::{EngineConfig, SchedulerConfig};
        use crate::loader::ModelBundle;
        use crate::model::{LoadOptions, load::parse_device};
        // Before anything records a metric: the recorder must already be there.
        crate::telemetry::metrics_handle();
        // An instruction set the CPU lacks (LETHE_KERNELS) stops the server here, not mid-request.
        let kernels = crate::simd::init_from_env()?;
        if let Some(n) = config.threads {
            crate::model::kernels::pool::init_global(n);
        }
        if !config.model.exists() && config.model == std::path::Path::new(crate::DEFAULT_MODEL_PATH) {
            anyhow::bail!(
                "the default model is not there yet: run scripts/fetch-model.sh (or pass --model PATH)\n  expected {}",
                config.model.display()
            );
        }
        let opts =
            LoadOptions { device: parse_device(&config.device)?, backend: config.backend, weights: config.weights };
        let bundle = ModelBundle::load(&config.model, &opts, config.tokenizer.as_deref())
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", config.model.display()))?;
        let engine = EngineHandle::spawn_with_kv_dtype(
            bundle.model.clone(),
            bundle.tokenizer.clone(),
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_running_rows: config.max_running_rows,
                    max_batch_tokens: config.max_batch_tokens,
                    max_waiting: config.max_waiting,
                },
                kv_cache_bytes: config.kv_cache_mib << 20,
            },
            config.kv_dtype,
        );
        let fingerprint =
            format!("lethe-{}-{}", env!("CARGO_PKG_VERSION"), bundle.model.weights_desc().replace('/', "-"));
        metrics::gauge!(
            crate::telemetry::BUILD_INFO,
            "version" => env!("CARGO_PKG_VERSION"),
            "model" => bundle.id.clone(),
            "weights" => bundle.model.weights_desc().to_string(),
            "kernels" => kernels.name()
        )
        .set(1.0);
        // The control plane: persisted tenants, then the adapters they were using.
        let tenants =
            Directory::open(Store::new(config.state_dir.clone()), config.admin_key.as_deref(), config.require_api_key)?;
        if !tenants.is_persistent() {
            tracing::warn!("no --state-dir: adapters, tenant policies and keys will not survive a restart");
        }
        let adapters = AdapterRegistry::new(bundle.model.clone(), config.adapters_root.clone(), config.adapter_limits)?;
        for (name, path) in tenants.snapshot().adapters {
            adapters
                .load(&name, &path, false)
                .map_err(|e| anyhow::anyhow!("restoring adapter {name:?} from the state directory: {e}"))?;
            tracing::info!(adapter = %name, "adapter restored");
        }
        // Saved policies must still hold under this configuration (e.g. a lowered max_gamma):
        // serving a tenant whose policy cannot be enforced is not an option for a forget-server.
        for (tenant, rec) in &tenants.snapshot().tenants {
            let invalid = |why: String| {
                anyhow::anyhow!(
                    "tenant {tenant:?}'s saved policy is not valid with this configuration: {why} \
                     (restore the setting, or fix the policy in the state directory)"
                )
            };
            rec.policy.validate(config.max_gamma).map_err(invalid)?;
            if let Some(missing) = rec.policy.adapters.iter().find(|a| adapters.get(a).is_none()) {
                return Err(invalid(format!("adapter {missing:?} is not loaded")));
            }
        }
        Ok(Arc::new(Self {
            engine,
            tokenizer: bundle.tokenizer,
            model_id: bundle.id,
            created: openai::unix_now(),
            fingerprint,
            config,
            adapters: Arc::new(adapters),
            tenants: Arc::new(tenants),
            admin_lock: tokio::sync::Mutex::new(()),
            structured: Default::default(),
        }))
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids: the client's `x-request-id` if it sent one, else a random one.
#[derive(Clone, Copy)]
struct RandomId;

impl MakeRequestId for RandomId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        openai::random_hex(16).parse().ok().map(RequestId::new)
    }
}

/// The full router with its middleware.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/admin/adapters", get(admin::list_adapters).post(admin::load_adapter))
        .route("/admin/adapters/{name}", delete(admin::unload_adapter))
        .route("/admin/tenants", get(admin::list_tenants))
        .route("/admin/tenants/{tenant}", get(admin::get_tenant).put(admin::put_tenant).delete(admin::delete_tenant))
        .route("/admin/tenants/{tenant}/keys", post(admin::create_key))
        .route("/admin/tenants/{tenant}/keys/{key_id}", delete(admin::delete_key))
        .route("/admin/tenants/{tenant}/adapters/{name}", put(admin::enable_adapter).delete(admin::disable_adapter))
        .fallback(|uri: axum::http::Uri| async move { ApiError::RouteNotFound(uri.path().chars().take(200).collect()) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::MethodNotAllowed(method.to_string())
        })
        .layer(axum::middleware::from_fn(ops::track_http))
        .with_state(state)
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, RandomId))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                    let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        request_id = %id,
                        method = %req.method(),
                        path = %req.uri().path(),
                        tenant = tracing::field::Empty
                    )
                }))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
}

/// The router of the separate metrics port (`--metrics-port`): scrapes stay off the API port's
/// network policy and never queue behind API traffic.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/health", get(ops::health))
        .fallback(|uri: axum::http::Uri| async move { ApiError::RouteNotFound(uri.path().chars().take(200).collect()) })
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting, gives in-flight requests
/// `grace` to finish (streams still running then are ended with an error event), and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(state);
    // Tokens go out as they are made: no Nagle delay on small SSE writes.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        let _ = tx.send(());
    });
    let drain = tokio::spawn(async move {
        if rx.await.is_ok() {
            // Blocks until the engine thread has stopped; streams get their last events.
            let _ = tokio::task::spawn_blocking(move || engine.shutdown(grace)).await;
        }
    });
    let result = server.await;
    drain.abort();
    result
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
