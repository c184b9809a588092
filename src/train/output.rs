//! What training writes: a PEFT LoRA directory any PEFT-aware loader accepts, lethe's guidance
//! profile, a record of how it was made, and resumable checkpoints.
//!
//! The output directory appears only when training has finished: everything is written into a
//! temporary sibling and renamed into place, so an error or an interruption never leaves a
//! half-trained adapter where a loader would pick it up.

use super::TrainError;
use super::lora::{LoraLayout, LoraSettings};
use crate::adapters::peft::{GuidanceProfile, interleaved_rows_to_hf, module_name};
use crate::model::{ModelConfig, ProjKind, RopeStyle};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The factors of `params` under PEFT's key names, as f32 tensors in the HF layout.
fn peft_tensors(layout: &LoraLayout, params: &[f32], cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for s in &layout.slots {
        let base = format!("base_model.model.{}", module_name(s.layer, s.kind));
        let a = params[s.a..s.a + s.rank * s.in_f].to_vec();
        let b = params[s.b..s.b + s.out_f * s.rank].to_vec();
        // Trained against a GGUF llama, whose q/k rows llama.cpp's converter permuted: PEFT
        // files hold the HF layout, so undo that permutation on B's rows.
        let b = match s.kind {
            ProjKind::Q if cfg.rope_style == RopeStyle::Interleaved => {
                interleaved_rows_to_hf(&b, s.rank, cfg.n_heads, cfg.head_dim)
            }
            ProjKind::K if cfg.rope_style == RopeStyle::Interleaved => {
                interleaved_rows_to_hf(&b, s.rank, cfg.n_kv_heads, cfg.head_dim)
            }
            _ => b,
        };
        out.push((format!("{base}.lora_A.weight"), vec![s.rank, s.in_f], a));
        out.push((format!("{base}.lora_B.weight"), vec![s.out_f, s.rank], b));
    }
    out
}

/// Writes f32 tensors as safetensors with `{"format": "pt"}` metadata (older loaders — PEFT's
/// among them — refuse files without it).
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<(), TrainError> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| TrainError::Io(format!("{}: {e:?}", path.display())))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| TrainError::Io(format!("{}: {e:?}", path.display())))
}

/// Everything that goes into the output directory.
pub struct AdapterFiles<'a> {
    pub layout: &'a LoraLayout,
    pub params: &'a [f32],
    pub cfg: &'a ModelConfig,
    pub lora: &'a LoraSettings,
    /// `base_model_name_or_path`.
    pub base_model: String,
    pub profile: Option<&'a GuidanceProfile>,
    /// `training.json`.
    pub record: serde_json::Value,
}

impl AdapterFiles<'_> {
    /// Writes the directory at `out` (which must not exist): into a temporary sibling first,
    /// renamed into place when complete.
    pub fn write(&self, out: &Path) -> Result<(), TrainError> {
        let tmp = sibling(out, "tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", tmp.display()));
        std::fs::create_dir_all(&tmp).map_err(io)?;
        let result = (|| {
            let config = serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": self.base_model,
                "r": self.lora.r,
                "lora_alpha": self.lora.lora_alpha,
                "lora_dropout": self.lora.lora_dropout,
                "use_rslora": self.lora.use_rslora,
                "target_modules": self.lora.targets.iter().map(|k| k.hf_name()).collect::<Vec<_>>(),
                "bias": "none",
                "fan_in_fan_out": false,
                "use_dora": false,
                "init_lora_weights": true,
                "inference_mode": true,
                "modules_to_save": null,
                "layers_to_transform": null,
                "layers_pattern": null,
                "rank_pattern": {},
                "alpha_pattern": {},
                "revision": null,
            });
            write_json(&tmp.join("adapter_config.json"), &config)?;
            write_safetensors(
                &tmp.join("adapter_model.safetensors"),
                &peft_tensors(self.layout, self.params, self.cfg),
            )?;
            if let Some(p) = self.profile {
                write_json(&tmp.join("lethe.json"), &serde_json::to_value(p).expect("profile serializes"))?;
            }
            write_json(&tmp.join("training.json"), &self.record)?;
            std::fs::rename(&tmp, out).map_err(|e| TrainError::Io(format!("{}: {e}", out.display())))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// `out` with a suffix on its last component (`out.tmp`, `out.checkpoint`).
pub fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    out.with_file_name(name)
}

/// Resumable training state: the adapter, the optimizer's moments, and where the run was.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    /// The settings of the run, which a resumed run must share.
    pub fingerprint: String,
    pub adam_t: u64,
    /// Metrics logged so far (for training.json).
    pub history_len: usize,
}

/// A checkpoint: `state.json` plus `state.safetensors` (params, m, v).
pub struct Checkpoint;

impl Checkpoint {
    pub fn save(dir: &Path, state: &CheckpointState, params: &[f32], m: &[f32], v: &[f32]) -> Result<(), TrainError> {
        let tmp = sibling(dir, "tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::Io(format!("{}: {e}", tmp.display())))?;
        let n = params.len();
        let tensors = [
            ("params".to_string(), vec![n], params.to_vec()),
            ("adam_m".to_string(), vec![n], m.to_vec()),
            ("adam_v".to_string(), vec![n], v.to_vec()),
        ];
        write_safetensors(&tmp.join("state.safetensors"), &tensors)?;
        write_json(&tmp.join("state.json"), &serde_json::to_value(state).expect("state serializes"))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))
    }

    /// Reads a checkpoint saved for a parameter vector of `len` values.
    pub fn load(dir: &Path, len: usize) -> Result<(CheckpointState, [Vec<f32>; 3]), TrainError> {
        let bad = |m: String| TrainError::Resume(format!("{}: {m}", dir.display()));
        let state: CheckpointState = serde_json::from_slice(
            &std::fs::read(dir.join("state.json")).map_err(|e| bad(format!("state.json: {e}")))?,
        )
        .map_err(|e| bad(format!("state.json: {e}")))?;
        let bytes = std::fs::read(dir.join("state.safetensors")).map_err(|e| bad(format!("state.safetensors: {e}")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("state.safetensors: {e:?}")))?;
        let get = |name: &str| -> Result<Vec<f32>, TrainError> {
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e:?}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != [len] {
                return Err(bad(format!("{name} has shape {:?}, expected [{len}]", t.shape())));
            }
            Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        Ok((state, [get("params")?, get("adam_m")?, get("adam_v")?]))
    }
}
