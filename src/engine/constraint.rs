//! The engine's hook for constrained decoding (structured outputs, tool calls): per request, a
//! [`ConstraintSpec`] (a compiled grammar, shared by clones of the request) starts one
//! [`TokenConstraint`] per generation, which says which tokens may come next and follows the
//! tokens sampled. The engine applies the allowed set to the distribution it samples from (after
//! CFG mixing, before temperature and top-p), so guidance and structure compose.
//!
//! Computing the allowed set can take a millisecond; the engine does it for every constrained
//! request of a step on a helper thread while the forward runs (see `engine::step`).

/// A compiled constraint, ready to start generations.
pub trait ConstraintSpec: Send + Sync + std::fmt::Debug {
    fn start(&self) -> Box<dyn TokenConstraint>;
}

pub use crate::sampling::{TokenBits, allows};

/// One generation's constraint state.
pub trait TokenConstraint: Send {
    /// Computes the allowed next tokens, unless known already. The slow part: the engine calls
    /// it off the sampling path, beside the forward.
    fn prepare(&mut self);
    /// The allowed next tokens (`None`: anything may come next). An error when the grammar
    /// admits no token at all or failed: the request must end, never wait.
    fn allowed(&mut self) -> Result<Option<&TokenBits>, String>;
    /// Follows the sampled token.
    fn commit(&mut self, token: u32) -> Result<(), String>;
    /// The grammar is complete and nothing but end-of-sequence may follow: the generation is done.
    fn is_complete(&self) -> bool;
}
