//! GGUF files (llama.cpp's format): metadata → [`ModelConfig`], tensors → [`RawWeight`].

use super::{RawWeight, WeightName, WeightSource};
use crate::model::config::{Arch, ModelConfig, RopeStyle};
use crate::model::{ModelError, Result};
use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let mut reader = BufReader::new(file);
        let corrupt = |reason: String| ModelError::Corrupt { path: path.to_path_buf(), reason };
        // candle's reader bounds-checks counts against the file size; the unwind guard is a
        // second line of defence so no malformed file can take the process down.
        let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)))
            .map_err(|_| corrupt("malformed GGUF header".into()))?
            .map_err(|e| corrupt(e.to_string()))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if elems.is_none() {
                return Err(corrupt(format!("tensor {name} has an impossible shape {:?}", info.shape.dims())));
            }
        }
        Ok(Self { path: path.to_path_buf(), reader, content })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the architecture hyper-parameters from `general.architecture` and `{arch}.*` keys.
    pub fn config(&self) -> Result<ModelConfig> {
        let md = &self.content.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| ModelError::Config("GGUF has no general.architecture".into()))?;
        let (arch, rope_style) = match arch_name.as_str() {
            "llama" | "mistral" => (Arch::Llama, RopeStyle::Interleaved),
            "qwen2" => (Arch::Qwen2, RopeStyle::Half),
            other => {
                return Err(ModelError::UnsupportedArchitecture(format!(
                    "GGUF architecture {other:?}; supported: llama (incl. SmolLM, Mistral), qwen2"
                )));
            }
        };
        let get = |key: &str| md.get(&format!("{arch_name}.{key}"));
        let usize_of = |key: &str| -> Result<usize> {
            let v = get(key).ok_or_else(|| ModelError::Config(format!("GGUF is missing {arch_name}.{key}")))?;
            v.to_u64()
                .ok()
                .or_else(|| v.to_u32().ok().map(u64::from))
                .or_else(|| v.to_i64().ok().and_then(|i| u64::try_from(i).ok()))
                .or_else(|| v.to_i32().ok().and_then(|i| u64::try_from(i).ok()))
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ModelError::Config(format!("GGUF key {arch_name}.{key} is not a non-negative integer")))
        };
        // Absent → the default; present with another numeric type → converted; anything else is
        // an error, never a silent default (a wrong rope theta still "works", badly).
        let f32_of = |key: &str, default: f32| -> Result<f32> {
            use candle_core::quantized::gguf_file::Value as V;
            match get(key) {
                None => Ok(default),
                Some(V::F32(v)) => Ok(*v),
                Some(V::F64(v)) => Ok(*v as f32),
                Some(v) => v
                    .to_u64()
                    .map(|u| u as f32)
                    .or_else(|_| v.to_i64().map(|i| i as f32))
                    .or_else(|_| v.to_u32().map(|u| u as f32))
                    .or_else(|_| v.to_i32().map(|i| i as f32))
                    .map_err(|_| ModelError::Config(format!("GGUF key {arch_name}.{key} is not a number"))),
            }
        };
        let optional_usize = |key: &str, default: usize| -> Result<usize> {
            if get(key).is_none() { Ok(default) } else { usize_of(key) }
        };
        let hidden_size = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = optional_usize("attention.head_count_kv", n_heads)?;
        let head_dim = match get("attention.key_length") {
            Some(_) => usize_of("attention.key_length")?,
            None => optional_usize("rope.dimension_count", hidden_size / n_heads.max(1))?,
        };
        let vocab_size = match get("vocab_size") {
            Some(_) => usize_of("vocab_size")?,
            None => {
                let info = self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
                *info.shape.dims().first().ok_or_else(|| ModelError::Corrupt {
                    path: self.path.clone(),
                    reason: "token_embd.weight has no dimensions".into(),
                })?
            }
        };
        let name = md
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| self.path.file_stem().unwrap_or_default().to_string_lossy().into_owned());
        let cfg = ModelConfig {
            arch,
            name,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            n_layers: usize_of("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rms_eps: f32_of("attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: f32_of("rope.freq_base", 10_000.0)?,
            rope_style,
            // Llama 3.1 GGUFs carry the scaled frequencies as a `rope_freqs` tensor; we refuse
            // them rather than run with wrong positions.
            rope_scaling: None,
            max_context: optional_usize("context_length", 2048)?,
            tie_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: arch == Arch::Qwen2,
        };
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(ModelError::UnsupportedArchitecture(
                "GGUF with rope_freqs (Llama 3.1 rope scaling) is not supported yet; use the HF checkpoint".into(),
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

impl WeightSource for GgufFile {
    fn load(&mut self, name: WeightName, device: &Device) -> Result<Option<RawWeight>> {
        let key = name.gguf();
        if !self.content.tensor_infos.contains_key(&key) {
            return Ok(None);
        }
        let t = self
            .content
            .tensor(&mut self.reader, &key, device)
            .map_err(|e| ModelError::Corrupt { path: self.path.clone(), reason: format!("tensor {key}: {e}") })?;
        Ok(Some(RawWeight::Quantized(t)))
    }

    fn dims(&self, name: WeightName) -> Option<Vec<usize>> {
        self.content.tensor_infos.get(&name.gguf()).map(|i| i.shape.dims().to_vec())
    }
}
