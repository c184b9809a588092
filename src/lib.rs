//! lethe: an LLM inference server that makes a model forget, with LoRA forget-adapters and
//! classifier-free guidance decoded as batched cond/uncond pairs.
//!
//! Rooms, with dependencies pointing one way (server → engine → model):
//! - [`model`]: the runtime (weights, batched forward, KV caches, CPU kernels);
//! - [`tokenizer`]: text ⇄ tokens and chat templates;
//! - [`guidance`]: classifier-free guidance mixing (pure);
//! - [`sampling`]: picking the next token from logits (pure);
//! - [`engine`]: the scheduler and loop that run requests (CFG pairs) in batched steps;
//! - [`loader`]: a model and its tokenizer, loaded together;
//! - [`adapters`]: LoRA forget-adapters (PEFT loading, versioned registry with leases);
//! - [`tenants`]: API keys, per-tenant policies, persistent control-plane state;
//! - [`structured`]: grammar-constrained decoding (JSON schemas, tool calls);
//! - [`server`]: the OpenAI-compatible HTTP/SSE layer and the admin API; [`config`]: its settings;
//! - [`train`]: LoRA training (SFT, CFG-aware ORPO) on the same model files, written as PEFT;
//! - [`eval`]: `lethe synth` and `lethe eval`, the planted-secrets forgetting benchmark.

pub mod adapters;
pub mod admin_client;
pub mod bench;
pub mod config;
pub mod device_sampling;
pub mod durable;
pub mod engine;
pub mod eval;
pub mod fixtures;
pub mod guidance;
pub mod loader;
pub mod model;
pub mod quality;
pub mod sampling;
pub mod server;
pub mod simd;
pub mod structured;
pub mod telemetry;
pub mod tenants;
pub mod tokenizer;
pub mod train;

/// Where `scripts/fetch-model.sh` puts the default model (SmolLM2-135M-Instruct, GGUF Q4_1).
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
