//! Measuring forgetting: a planted-secrets benchmark run through the serving engine.
//!
//! - [`synth`]: `lethe synth`, the deterministic synthetic company (training files + probes);
//! - [`probes`]: the held-out probes and the subset a run asks;
//! - [`leak`]: the leak matcher (exact value, normalised, first 200 characters);
//! - [`grid`]: the configurations (adapter stacks × γ × mode × uncond × placement);
//! - [`target`]: where probes are answered (the engine in process, or a server over HTTP);
//! - [`score`]: teacher-forced scoring with the model forward (perplexity, KL, likelihoods);
//! - [`metrics`], [`data`]: rates, AUC, Min-K%; general text and MMLU questions;
//! - [`runner`]: `lethe eval`; [`report`], [`plots`]: `report.md` and the PNG plots.
//!
//! Eval uses the engine and the model, never the reverse.

pub mod data;
pub mod grid;
pub mod leak;
pub mod metrics;
pub mod plots;
pub mod probes;
pub mod progress;
pub mod report;
pub mod runner;
pub mod score;
pub mod synth;
pub mod target;
