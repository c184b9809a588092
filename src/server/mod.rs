//! The HTTP layer: an axum router over the engine.
//!
//! - [`openai`]: OpenAI-compatible routes (wire types, handlers, SSE); [`output`]: content,
//!   tool calls and log-probabilities as clients read them;
//! - [`validation`]: request checks and the translation to an engine request;
//! - [`extract`]: the JSON body extractor (415/413/400 in OpenAI's error shape);
//! - [`admin`]: the admin API (adapters, tenants, keys, audit); [`auth`]: who is calling;
//! - [`control`]: this replica's control plane (applies and follows the state store);
//! - [`ops`]: health, readiness, Prometheus metrics, HTTP request counting;
//! - [`error`]: the one error type and its HTTP mapping.

pub mod admin;
pub mod auth;
pub mod control;
pub mod error;
pub mod extract;
pub mod openai;
pub mod ops;
pub mod output;
pub mod validation;

use crate::adapters::AdapterRegistry;
use crate::config::ServeConfig;
use crate::engine::EngineHandle;
use crate::tenants::Directory;
use crate::tenants::store::{FileStore, PgStore, StateStore};
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
    /// Applies the state store's state here, and follows it when it is shared.
    pub control: Arc<control::ControlPlane>,
    /// Serializes admin changes (apply, persist, acknowledge, one at a time).
    pub admin_lock: tokio::sync::Mutex<()>,
    /// The grammar compiler for structured outputs and tool calls (built on first use).
    pub structured: crate::structured::LazyStructured,
    /// The fixed pool for tokenization and grammar compilation (`tokenizer_threads` jobs at
    /// once; the rest wait, each already counted against the waiting limits).
    pub blocking: Arc<tokio::sync::Semaphore>,
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
                    max_prefill_wait_steps: config.max_prefill_wait_steps,
                },
                kv_cache_bytes: config.kv_cache_mib << 20,
                prefix_cache: config.prefix_cache,
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
        // The control plane: the state store, then the adapters its state names.
        let store = open_store(&config)?;
        tracing::info!(store = %store.describe(), "state store");
        let tenants =
            Arc::new(Directory::open(store, config.admin_key.as_ref().map(|k| k.expose()), config.require_api_key)?);
        if !tenants.is_persistent() {
            tracing::warn!("no --state-dir: adapters, tenant policies and keys will not survive a restart");
        }
        let adapters =
            Arc::new(AdapterRegistry::new(bundle.model.clone(), config.adapters_root.clone(), config.adapter_limits)?);
        let generations = config.generations_dir.clone().map(crate::adapters::Generations::new);
        let control = Arc::new(control::ControlPlane::new(
            tenants.clone(),
            adapters.clone(),
            generations,
            config.adapter_history,
            control::replica_id(),
        ));
        control.start()?;
        // Saved policies must still hold under this configuration (e.g. a lowered max_gamma):
        // serving a tenant whose policy cannot be enforced is not an option for a forget-server.
        for (tenant, rec) in &tenants.snapshot().tenants {
            let invalid = |why: String| {
                anyhow::anyhow!(
                    "tenant {tenant:?}'s saved policy is not valid with this configuration: {why} \
                     (restore the setting, or fix the policy in the state store)"
                )
            };
            rec.policy.validate(config.max_gamma).map_err(invalid)?;
            let unavailable = control.unavailable();
            if let Some(missing) =
                rec.policy.adapters.iter().find(|a| adapters.get(a).is_none() && !unavailable.contains_key(*a))
            {
                return Err(invalid(format!("adapter {missing:?} is not loaded")));
            }
        }
        Ok(Arc::new(Self {
            engine,
            tokenizer: bundle.tokenizer,
            model_id: bundle.id,
            created: openai::unix_now(),
            fingerprint,
            adapters,
            tenants,
            control,
            admin_lock: tokio::sync::Mutex::new(()),
            structured: Default::default(),
            blocking: Arc::new(tokio::sync::Semaphore::new(config.tokenizer_threads)),
            config,
        }))
    }

    /// Starts following a shared state store (a no-op for the file store). Call once, inside
    /// the serving runtime.
    pub fn follow_store(self: &Arc<Self>) {
        if self.tenants.store().is_shared() {
            let period = Duration::from_secs(self.config.reconcile_secs);
            tokio::spawn(self.control.clone().follow(period));
        }
    }
}

/// The state store of `config`: PostgreSQL, files in the state directory, or memory.
fn open_store(config: &ServeConfig) -> anyhow::Result<Arc<dyn StateStore>> {
    Ok(match (&config.state_store, &config.state_dir) {
        (Some(url), _) => Arc::new(PgStore::open(url.expose()).map_err(|e| anyhow::anyhow!("{e}"))?),
        (None, Some(dir)) => Arc::new(FileStore::open(dir)?),
        (None, None) => Arc::new(FileStore::memory()),
    })
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

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// Everything (the default: one listener).
    All,
    /// The OpenAI routes, `/health` and `/ready` (with `--admin-addr`: the public side).
    Public,
    /// The admin API, `/metrics`, `/health` and `/ready` (the `--admin-addr` side).
    Admin,
}

/// The full router with its middleware.
pub fn router(state: Arc<AppState>) -> Router {
    router_for(state, Routes::All)
}

/// The router of one listener, with its middleware.
pub fn router_for(state: Arc<AppState>, routes: Routes) -> Router {
    let public = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models));
    let probes = Router::new()
        // Probes answer on every listener.
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready));
    let admin_routes = Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/admin/adapters", get(admin::list_adapters).post(admin::load_adapter))
        .route("/admin/adapters/{name}", delete(admin::unload_adapter))
        .route("/admin/adapters/{name}/history", get(admin::adapter_history))
        .route("/admin/adapters/{name}/rollback", post(admin::rollback_adapter))
        .route("/admin/audit", get(admin::audit_log))
        .route("/admin/tenants", get(admin::list_tenants))
        .route("/admin/tenants/{tenant}", get(admin::get_tenant).put(admin::put_tenant).delete(admin::delete_tenant))
        .route("/admin/tenants/{tenant}/keys", post(admin::create_key))
        .route("/admin/tenants/{tenant}/keys/{key_id}", delete(admin::delete_key))
        .route("/admin/tenants/{tenant}/adapters/{name}", put(admin::enable_adapter).delete(admin::disable_adapter));
    let app = match routes {
        Routes::All => public.merge(probes).merge(admin_routes),
        Routes::Public => public.merge(probes),
        Routes::Admin => admin_routes.merge(probes),
    };
    app.fallback(|uri: axum::http::Uri| async move { ApiError::RouteNotFound(uri.path().chars().take(200).collect()) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::MethodNotAllowed(method.to_string())
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), deadline))
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

/// Ends a request that takes longer than `request_timeout_secs` until its response starts
/// (504; dropping the handler cancels its generation). A stream, once started, is not cut.
async fn deadline(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let secs = state.config.request_timeout_secs;
    match tokio::time::timeout(Duration::from_secs(secs), next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Timeout { secs }.into_response(),
    }
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
    serve_split(listener, None, state, shutdown, grace).await
}

/// As [`serve`]; with `admin`, the admin API and `/metrics` are served on that listener only,
/// and `listener` serves the public routes. Also starts following a shared state store.
pub async fn serve_split(
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    state.follow_store();
    let header_timeout = Duration::from_secs(state.config.header_timeout_secs);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = match admin {
        Some(admin_listener) => {
            let admin_app = router_for(state.clone(), Routes::Admin);
            tokio::spawn(serve_app(admin_listener, admin_app, header_timeout, std::future::pending()));
            router_for(state, Routes::Public)
        }
        None => router(state),
    };
    let server = serve_app(listener, app, header_timeout, async move {
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

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for the
/// open connections to finish. Unlike `axum::serve`, a client gets `header_timeout` to send a
/// request's headers, and an idle keep-alive connection is closed after the same time (hyper
/// starts that timer whenever it waits for the next request): a connection that sends nothing
/// cannot hold a socket and a task forever. No Nagle delay on small SSE writes.
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // HTTP/1.1, as axum::serve without its http2 feature.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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
