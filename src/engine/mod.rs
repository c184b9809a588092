//! The guided decoding engine: requests in, token events out; every running row of every
//! request in one batched forward per step, CFG pairs scheduled as one unit.
//!
//! - [`request`]: what the engine is asked and the events it returns;
//! - [`constraint`]: the hook for grammar-constrained decoding (which tokens may come next);
//! - [`prompt`]: building the cond/uncond token rows of a request;
//! - [`sequence`]: a request inside the engine (its rows, sampler, detokenizer);
//! - [`scheduler`]: admission and step planning (continuous batching, chunked prefill);
//! - [`engine`]: the loop thread and the handle callers use.

pub mod choose;
pub mod constraint;
mod device_step;
#[allow(clippy::module_inception)]
pub mod engine;
pub mod prompt;
pub mod request;
pub mod scheduler;
pub mod sequence;

pub use constraint::{ConstraintSpec, TokenConstraint};
pub use engine::{EngineConfig, EngineError, EngineHandle, EngineStats, RequestStream, Ticket};
pub use prompt::{Conditions, PromptRows, UncondSource};
pub use request::{Event, FinishReason, Request, TenantLimits, Timing, Usage};
pub use scheduler::SchedulerConfig;
