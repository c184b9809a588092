//! Metrics and logs, in one place: the metric names (vLLM's, with a `lethe_` prefix, so existing
//! dashboards translate directly), their help texts and histogram buckets, the Prometheus
//! recorder, and the log subscriber.
//!
//! Labels stay bounded: tenant and adapter names (both created by the admin), finish reasons,
//! modes, routes as declared in the router, status codes. Never prompts, ids or user strings.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

// Requests (engine).
pub const TIME_TO_FIRST_TOKEN: &str = "lethe_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "lethe_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "lethe_e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "lethe_request_queue_time_seconds";
pub const NUM_REQUESTS_RUNNING: &str = "lethe_num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "lethe_num_requests_waiting";
pub const PROMPT_TOKENS: &str = "lethe_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "lethe_generation_tokens_total";
/// Labels `finished_reason` (stop, length, cancelled, error) and `tenant`.
pub const REQUESTS: &str = "lethe_requests_total";
// Fair sharing between tenants (label `tenant`).
pub const TENANT_REQUESTS_WAITING: &str = "lethe_tenant_requests_waiting";
pub const TENANT_RUNNING_ROWS: &str = "lethe_tenant_running_rows";
/// Labels `tenant` and `limit` = `tenant` (its own `max_waiting`) | `server` (the server's).
pub const TENANT_REJECTED: &str = "lethe_tenant_rejected_requests_total";
// Guidance.
/// Label `guidance` = `none` | `log` | `prob` (a request whose γ is 1 runs unguided: `none`).
pub const GUIDED_REQUESTS: &str = "lethe_guided_requests_total";
pub const GUIDANCE_GAMMA: &str = "lethe_guidance_gamma";
// Engine.
pub const KV_CACHE_USED_BYTES: &str = "lethe_kv_cache_used_bytes";
pub const KV_CACHE_LIMIT_BYTES: &str = "lethe_kv_cache_limit_bytes";
pub const BATCH_ROWS: &str = "lethe_batch_rows";
pub const BATCH_TOKENS: &str = "lethe_batch_tokens";
pub const STEP_DURATION: &str = "lethe_forward_step_duration_seconds";
// Prefix cache (vLLM's `prefix_cache_queries`/`prefix_cache_hits` count tokens too).
pub const PREFIX_CACHE_QUERIES: &str = "lethe_prefix_cache_queries_total";
pub const PREFIX_CACHE_HIT_TOKENS: &str = "lethe_prefix_cache_hit_tokens_total";
pub const PREFIX_CACHE_HIT_RATE: &str = "lethe_prefix_cache_hit_rate";
pub const PREFIX_CACHE_BLOCKS: &str = "lethe_prefix_cache_blocks";
pub const PREFIX_CACHE_REFERENCED_BLOCKS: &str = "lethe_prefix_cache_referenced_blocks";
pub const PREFIX_CACHE_BYTES: &str = "lethe_prefix_cache_bytes";
pub const PREFIX_CACHE_EVICTABLE_BYTES: &str = "lethe_prefix_cache_evictable_bytes";
pub const PREFIX_CACHE_EVICTED_BLOCKS: &str = "lethe_prefix_cache_evicted_blocks_total";
// Forget-adapters.
/// Label `adapter`: one series per adapter a finished request used.
pub const ADAPTER_REQUESTS: &str = "lethe_adapter_requests_total";
pub const ADAPTERS_LOADED: &str = "lethe_adapters_loaded";
/// Label `state` = `loaded` | `retired` (replaced or unloaded generations still leased).
pub const ADAPTER_MEMORY_BYTES: &str = "lethe_adapter_memory_bytes";
pub const ADAPTER_LOADS: &str = "lethe_adapter_loads_total";
pub const ADAPTER_UNLOADS: &str = "lethe_adapter_unloads_total";
pub const ADAPTER_LOAD_SECONDS: &str = "lethe_adapter_load_seconds";
// Control-plane state (tenants, keys, adapters) and its store.
/// 1 while the state store answers (always 1 for the file store).
pub const STATE_STORE_UP: &str = "lethe_state_store_up";
pub const STATE_REVISION: &str = "lethe_state_revision";
/// Label `result` = `applied` | `current` | `retried` | `error`: full reads of a shared store.
pub const STATE_SYNCS: &str = "lethe_state_syncs_total";
/// From a commit (on any replica) to this replica serving it.
pub const STATE_PROPAGATION_SECONDS: &str = "lethe_state_propagation_seconds";
/// Adapters the state names that this replica cannot load at their recorded generation.
pub const ADAPTERS_UNAVAILABLE: &str = "lethe_adapters_unavailable";
// Process and HTTP.
/// Labels `route` (the router's pattern, e.g. `/admin/tenants/{tenant}`), `method`, `status`.
pub const HTTP_REQUESTS: &str = "lethe_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "lethe_http_request_duration_seconds";
/// 1 while the engine accepts work (what `/ready` answers).
pub const READY: &str = "lethe_ready";
/// Always 1; labels `version`, `model`, `weights` and `kernels` (the instruction set of the CPU
/// kernels, e.g. `avx2`) say what runs.
pub const BUILD_INFO: &str = "lethe_build_info";

/// Every metric with its help text, and for histograms their buckets.
const CATALOG: &[(&str, Kind, &str)] = &[
    (TIME_TO_FIRST_TOKEN, Kind::Histogram(LATENCY_FIRST), "Time from arrival to the first generated token."),
    (INTER_TOKEN_LATENCY, Kind::Histogram(LATENCY_TOKEN), "Time between consecutive tokens of a request."),
    (E2E_REQUEST_LATENCY, Kind::Histogram(LATENCY_REQUEST), "Time from arrival to the end of a request."),
    (REQUEST_QUEUE_TIME, Kind::Histogram(LATENCY_QUEUE), "Time a request waited before it was admitted."),
    (NUM_REQUESTS_RUNNING, Kind::Gauge, "Requests decoding (a guided request counts once)."),
    (NUM_REQUESTS_WAITING, Kind::Gauge, "Requests queued for admission."),
    (PROMPT_TOKENS, Kind::Counter, "Prompt tokens of finished requests (cond row)."),
    (GENERATION_TOKENS, Kind::Counter, "Tokens generated."),
    (REQUESTS, Kind::Counter, "Finished requests by finish reason and tenant."),
    (TENANT_REQUESTS_WAITING, Kind::Gauge, "Requests of a tenant waiting for admission (tokenizing or queued)."),
    (TENANT_RUNNING_ROWS, Kind::Gauge, "Rows of a tenant running (a guided request counts two)."),
    (TENANT_REJECTED, Kind::Counter, "Requests refused with 429, by tenant and by whose waiting limit was full."),
    (GUIDED_REQUESTS, Kind::Counter, "Finished requests by guidance mode (none = unguided)."),
    (GUIDANCE_GAMMA, Kind::Histogram(GAMMA), "Guidance scale of guided requests."),
    (
        KV_CACHE_USED_BYTES,
        Kind::Gauge,
        "KV cache bytes held by running requests (evictable prefix-cache blocks excluded).",
    ),
    (KV_CACHE_LIMIT_BYTES, Kind::Gauge, "KV cache budget in bytes."),
    (BATCH_ROWS, Kind::Histogram(COUNTS), "Rows (sequences) per forward step."),
    (BATCH_TOKENS, Kind::Histogram(COUNTS), "Tokens per forward step (decode rows plus prefill chunk)."),
    (STEP_DURATION, Kind::Histogram(LATENCY_STEP), "Duration of one forward step, sampling included."),
    (PREFIX_CACHE_QUERIES, Kind::Counter, "Prompt tokens looked up in the prefix cache (every row of a request)."),
    (PREFIX_CACHE_HIT_TOKENS, Kind::Counter, "Prompt tokens served from cached KV blocks instead of computed."),
    (
        PREFIX_CACHE_HIT_RATE,
        Kind::Gauge,
        "Hit tokens / queried tokens since start (use the counters' rates for windows).",
    ),
    (PREFIX_CACHE_BLOCKS, Kind::Gauge, "KV blocks in the prefix cache, referenced or not."),
    (PREFIX_CACHE_REFERENCED_BLOCKS, Kind::Gauge, "Prefix-cache blocks held by running rows (not evictable)."),
    (PREFIX_CACHE_BYTES, Kind::Gauge, "Bytes of the prefix cache's blocks, referenced or not."),
    (
        PREFIX_CACHE_EVICTABLE_BYTES,
        Kind::Gauge,
        "Bytes of unreferenced prefix-cache blocks: in use, but freed as soon as memory is needed.",
    ),
    (PREFIX_CACHE_EVICTED_BLOCKS, Kind::Counter, "Unreferenced prefix-cache blocks evicted to make room."),
    (ADAPTER_REQUESTS, Kind::Counter, "Finished requests that used a forget-adapter, per adapter."),
    (ADAPTERS_LOADED, Kind::Gauge, "Forget-adapters loaded."),
    (ADAPTER_MEMORY_BYTES, Kind::Gauge, "Bytes of adapter factors: loaded, and retired but still leased."),
    (ADAPTER_LOADS, Kind::Counter, "Adapter loads and replacements, per adapter."),
    (ADAPTER_UNLOADS, Kind::Counter, "Adapter unloads, per adapter."),
    (ADAPTER_LOAD_SECONDS, Kind::Histogram(LATENCY_LOAD), "Time to read, validate and pack an adapter."),
    (STATE_STORE_UP, Kind::Gauge, "1 while the state store answers; 0 while this replica serves its last known state."),
    (STATE_REVISION, Kind::Gauge, "Revision of the control-plane state this replica serves."),
    (STATE_SYNCS, Kind::Counter, "Full reads of a shared state store, by result."),
    (
        STATE_PROPAGATION_SECONDS,
        Kind::Histogram(LATENCY_PROPAGATION),
        "Time from an admin change's commit to this replica serving it.",
    ),
    (
        ADAPTERS_UNAVAILABLE,
        Kind::Gauge,
        "Adapters named by the state that cannot be loaded here (their tenants get 503).",
    ),
    (HTTP_REQUESTS, Kind::Counter, "HTTP requests by route, method and status."),
    (
        HTTP_REQUEST_DURATION,
        Kind::Histogram(LATENCY_REQUEST),
        "HTTP request duration until the response head (streams: until the stream starts).",
    ),
    (READY, Kind::Gauge, "1 while the engine accepts work."),
    (BUILD_INFO, Kind::Gauge, "Version, model, weight format and CPU kernel set of this process (value 1)."),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

// Buckets for LLM latencies (vLLM's, trimmed at the small end where a CPU never lands).
const LATENCY_FIRST: &[f64] =
    &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const LATENCY_TOKEN: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];
const LATENCY_REQUEST: &[f64] =
    &[0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0];
const LATENCY_QUEUE: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const LATENCY_STEP: &[f64] = &[0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0];
const LATENCY_LOAD: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const LATENCY_PROPAGATION: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const GAMMA: &[f64] = &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0];
const COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle) and
/// describes every metric, so `/metrics` carries HELP and TYPE lines for all of them.
pub fn metrics_handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for &(name, kind, _) in CATALOG {
            if let Kind::Histogram(buckets) = kind {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                    .expect("buckets are not empty");
            }
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // A recorder installed by an embedding program (or a test harness) wins; ours then
        // renders only what it sees, which is nothing: say so rather than fail.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        for &(name, kind, help) in CATALOG {
            match kind {
                Kind::Counter => metrics::describe_counter!(name, help),
                Kind::Gauge => metrics::describe_gauge!(name, help),
                Kind::Histogram(_) => metrics::describe_histogram!(name, help),
            }
        }
        handle
    })
}

/// All metric names lethe exports (the catalog dashboards and alerts may use).
pub fn metric_names() -> impl Iterator<Item = &'static str> {
    CATALOG.iter().map(|(name, _, _)| *name)
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line, span fields included (for log pipelines).
    Json,
}

/// Installs the log subscriber on stderr. `RUST_LOG` filters as usual (default: lethe at info,
/// dependencies at warn).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lethe=info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never in files or log pipelines.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}
