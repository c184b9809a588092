//! Training forget-adapters (and the fine-tunes they sit on) on the same model files lethe
//! serves: LoRA on the frozen base, SFT or ORPO, the paper's CFG-aware regime, written out as a
//! PEFT directory that `POST /admin/adapters` loads.
//!
//! - [`data`]: TRL's JSONL formats → tokenized examples, rendered like serving renders them;
//! - [`objective`]: SFT and ORPO (TRL's formulas), losses → per-token gradient coefficients;
//! - [`model`]: the base model as dense f32 with a hand-written backward, [`lora`] the
//!   trainable factors, [`ops`] the numeric pieces;
//! - [`optim`]: AdamW, clipping, the cosine schedule;
//! - [`output`]: the PEFT directory, `lethe.json`, `training.json`, checkpoints;
//! - [`trainer`]: the loop (micro-batches, accumulation, logging, progress, Ctrl-C, resume).
//!
//! Dependencies point one way: training uses the model files, tokenizer, prompt rendering and
//! adapter reader of the serving path; nothing there knows about training.

pub mod data;
pub mod lora;
pub mod model;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod output;
pub mod trainer;

pub use lora::LoraSettings;
pub use objective::{NllOn, Objective};
pub use trainer::{TrainConfig, TrainSummary, run};

/// Why training could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    #[error("{0}")]
    Adapter(#[from] crate::adapters::AdapterError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Bad training data: names the file, line and field.
    #[error("bad training data: {0}")]
    Data(String),
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("the loss is {loss} at step {step}: training diverged (lower --lr?)")]
    Diverged { step: usize, loss: f64 },
    #[error("interrupted after step {step}; the checkpoint is in {checkpoint} (run the same command with --resume)")]
    Interrupted { step: usize, checkpoint: std::path::PathBuf },
}
