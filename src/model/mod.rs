//! The model runtime: loading weights, the batched forward over a [`RaggedBatch`], per-sequence
//! KV caches, and the CPU kernels candle lacks.
//!
//! One forward ([`llama::Llama::forward`]) is written on candle tensors and runs on any candle
//! device. Two operations dominate a decode step and have a native CPU implementation next to
//! the portable candle one: the projections ([`linear`], tile-packed quantized weights and
//! multi-row kernels) and attention over the KV caches ([`kv_cache`], paged blocks). Which one
//! runs is decided once at load ([`Backend`]), never by a device check in the hot path.

pub mod batch;
pub mod config;
pub mod kernels;
pub mod kv_cache;
pub mod kv_tensor;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
pub mod stages;

pub use batch::{BatchEntry, BatchLogits, DeviceLogits, RaggedBatch, SeqId, StepLogits};
pub use config::{Arch, ModelConfig, RopeStyle};
pub use kernels::attention::KvDtype;
pub use kv_cache::{KvCache, KvSizing};
pub use llama::Llama;
pub use load::{Backend, LoadOptions, WeightFormat};

use std::path::PathBuf;

/// The projections of a decoder layer, by role. LoRA adapters address them by these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ProjKind {
    pub const ALL: [ProjKind; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The HF/PEFT module name (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a model lethe can load: {reason}")]
    UnrecognizedFormat { path: PathBuf, reason: String },
    #[error("corrupt or truncated model file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("unsupported architecture: {0}")]
    UnsupportedArchitecture(String),
    #[error("tensor {tensor}: unsupported data type {dtype} (supported: {supported})")]
    UnsupportedDtype { tensor: String, dtype: String, supported: &'static str },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {tensor} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { tensor: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("unknown sequence {0:?}")]
    UnknownSequence(SeqId),
    #[error("sequence would reach {needed} tokens, beyond the model's context of {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error("KV cache full: {needed} more bytes needed, {free} of {limit} free")]
    KvCacheFull { needed: usize, free: usize, limit: usize },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
