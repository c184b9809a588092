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
            get(key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("GGUF is missing {arch_name}.{key}")))
        };
        let f32_of = |key: &str, default: f32| get(key).and_then(|v| v.to_f32().ok()).unwrap_or(default);
        let hidden_size = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = usize_of("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = usize_of("attention.key_length")
            .or_else(|_| usize_of("rope.dimension_count"))
            .unwrap_or(hidden_size / n_heads.max(1));
        let vocab_size = match usize_of("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .content
                .tensor_infos
                .get("token_embd.weight")
                .map(|i| i.shape.dims()[0])
                .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
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
            rms_eps: f32_of("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: f32_of("rope.freq_base", 10_000.0),
            rope_style,
            // Llama 3.1 GGUFs carry the scaled frequencies as a `rope_freqs` tensor; we refuse
            // them rather than run with wrong positions.
            rope_scaling: None,
            max_context: usize_of("context_length").unwrap_or(2048),
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
