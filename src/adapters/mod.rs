//! LoRA forget-adapters: reading adapter directories once ([`files`], which also keeps every
//! generation content-addressed), validating PEFT ([`peft`]), and keeping versions in memory
//! with leases and limits ([`registry`]). The math of applying them lives in [`crate::model::lora`].

pub mod files;
pub mod peft;
pub mod registry;

pub use files::{AdapterFiles, Generations};
pub use peft::GuidanceProfile;
pub use registry::{AdapterInfo, AdapterLimits, AdapterRegistry, LoadedAdapter};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter directory not found: {0}")]
    NotFound(String),
    #[error("invalid adapter: {0}")]
    Invalid(String),
    #[error("unsupported adapter: {0}")]
    Unsupported(String),
    #[error("adapter {0:?} is already loaded (pass \"replace\": true to replace it)")]
    Exists(String),
    #[error("no adapter named {0:?} is loaded")]
    UnknownAdapter(String),
    #[error("adapter path {0:?} is outside the adapters root")]
    OutsideRoot(String),
    #[error("adapter limit: {0}")]
    Limit(String),
    /// Files that do not hash to the generation recorded for them: never served as that
    /// generation.
    #[error("the adapter files in {path} hash to {actual}, not to the recorded generation {expected}: refused")]
    HashMismatch { path: String, expected: String, actual: String },
}
