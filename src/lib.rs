//! lethe: an LLM inference server that makes a model forget, with LoRA forget-adapters and
//! classifier-free guidance decoded as batched cond/uncond pairs.
//!
//! Rooms, with dependencies pointing one way (server → engine → model):
//! - [`model`]: the runtime (weights, batched forward, KV caches, CPU kernels);
//! - [`tokenizer`]: text ⇄ tokens and chat templates;
//! - [`sampling`]: picking the next token from logits (pure);
//! - [`loader`]: a model and its tokenizer, loaded together.

pub mod fixtures;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod tokenizer;
