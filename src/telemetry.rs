//! Metric names and tracing set-up, in one place. Names follow vLLM's with a `lethe_` prefix so
//! existing dashboards translate directly. Labels stay bounded: tenant and adapter names only,
//! never prompts, ids or user strings.

pub const TIME_TO_FIRST_TOKEN: &str = "lethe_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "lethe_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "lethe_e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "lethe_request_queue_time_seconds";
pub const NUM_REQUESTS_RUNNING: &str = "lethe_num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "lethe_num_requests_waiting";
pub const PROMPT_TOKENS: &str = "lethe_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "lethe_generation_tokens_total";
pub const REQUESTS: &str = "lethe_requests_total";
/// Requests by guidance: label `guidance` = `none` | `log` | `prob`.
pub const GUIDED_REQUESTS: &str = "lethe_guided_requests_total";
pub const GUIDANCE_GAMMA: &str = "lethe_guidance_gamma";
pub const KV_CACHE_USED_BYTES: &str = "lethe_kv_cache_used_bytes";
pub const KV_CACHE_LIMIT_BYTES: &str = "lethe_kv_cache_limit_bytes";
pub const BATCH_ROWS: &str = "lethe_batch_rows";
pub const BATCH_TOKENS: &str = "lethe_batch_tokens";
pub const STEP_DURATION: &str = "lethe_forward_step_duration_seconds";
pub const ADAPTER_LOADS: &str = "lethe_adapter_loads_total";
pub const ADAPTER_UNLOADS: &str = "lethe_adapter_unloads_total";
pub const ADAPTER_LOAD_SECONDS: &str = "lethe_adapter_load_seconds";
