//! Architecture hyper-parameters of a Llama-family decoder, read from GGUF metadata or from an
//! HF `config.json`.

use super::ModelError;
use serde::Deserialize;

/// The architectures the runtime can run. All are the same decoder (RMSNorm, RoPE, GQA
/// attention, SwiGLU MLP); they differ in small switches captured by [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM, Mistral (GQA) and friends.
    Llama,
    /// Qwen2: a Llama with biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: GGUF llama checkpoints, whose q/k weights the converter permuted.
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])` ("rotate half", GPT-NeoX): HF checkpoints, GGUF qwen2.
    Half,
}

/// Llama 3.x frequency scaling for long contexts (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Human-readable name (GGUF `general.name` or the directory name).
    pub name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest sequence (prompt + generation) the model supports.
    pub max_context: usize,
    /// Output head shares the token embedding matrix.
    pub tie_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the invariants the forward relies on, so a bad file fails at load, not mid-request.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layers == 0 || self.hidden_size == 0 || self.intermediate_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size, intermediate size and vocabulary must be non-zero".into());
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if self.max_context == 0 {
            return bad("context length must be non-zero".into());
        }
        if self.rms_eps.is_nan() || self.rms_eps <= 0.0 || self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad("rms epsilon and rope theta must be positive".into());
        }
        // Far above any real model; below them, sizes cannot overflow or ask for absurd
        // allocations before a single tensor has been checked.
        let limits = [
            ("layers", self.n_layers, 1 << 12),
            ("attention heads", self.n_heads, 1 << 12),
            ("head dimension", self.head_dim, 1 << 12),
            ("hidden size", self.hidden_size, 1 << 17),
            ("intermediate size", self.intermediate_size, 1 << 19),
            ("vocabulary", self.vocab_size, 1 << 22),
            ("context length", self.max_context, 1 << 24),
        ];
        if let Some((what, v, max)) = limits.iter().find(|(_, v, max)| v > max) {
            return bad(format!("{what} {v} is beyond what lethe accepts ({max})"));
        }
        if let Some(s) = self.rope_scaling {
            let ok = s.factor > 0.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0;
            if !ok {
                return bad(format!(
                    "llama3 rope_scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and \
                     original_max_position_embeddings > 0, got {s:?}"
                ));
            }
        }
        if !self.rope_inv_freqs().iter().all(|f| f.is_finite()) {
            return bad("the rotary frequencies are not finite (rope theta / scaling)".into());
        }
        Ok(())
    }

    /// Inverse rotary frequencies per pair, with Llama 3 scaling applied when configured.
    pub fn rope_inv_freqs(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f32 / d as f32);
                match self.rope_scaling {
                    None => f,
                    Some(s) => llama3_scale(f, s),
                }
            })
            .collect()
    }
}

/// Llama 3.1's piecewise frequency scaling (as in HF transformers' `_compute_llama3_parameters`).
fn llama3_scale(freq: f32, s: Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// The subset of an HF `config.json` we read.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_rms_eps() -> f32 {
    1e-6
}
fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    pub fn to_config(&self, name: String) -> Result<ModelConfig, ModelError> {
        let model_type = self.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                let archs = self.architectures.clone().unwrap_or_default().join(", ");
                return Err(ModelError::UnsupportedArchitecture(format!(
                    "model_type {other:?} ({archs}); supported: llama, mistral, qwen2"
                )));
            }
        };
        let rope_scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
                if kind != "llama3" {
                    return Err(ModelError::Config(format!(
                        "unsupported rope_scaling type {kind:?} (only \"llama3\" is implemented)"
                    )));
                }
                Some(
                    serde_json::from_value(v.clone())
                        .map_err(|e| ModelError::Config(format!("bad llama3 rope_scaling: {e}")))?,
                )
            }
        };
        let n_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let cfg = ModelConfig {
            arch,
            name,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::Half,
            rope_scaling,
            max_context: self.max_position_embeddings,
            tie_embeddings: self.tie_word_embeddings,
            qkv_bias: arch == Arch::Qwen2,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(llama3_scale(1.0, s), 1.0);
        let low = 2.0 * std::f32::consts::PI / 100_000.0;
        assert!((llama3_scale(low, s) - low / 8.0).abs() < 1e-12);
    }

    /// Degenerate llama3 scaling would give NaN positions (and NaN logits) without an error.
    #[test]
    fn degenerate_rope_scaling_is_refused() {
        let with = |scaling: &str| {
            let cfg: HfConfig = serde_json::from_str(&format!(
                r#"{{"model_type":"llama","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                    "num_attention_heads":2,"vocab_size":10,"rope_scaling":{scaling}}}"#
            ))
            .unwrap();
            cfg.to_config("x".into())
        };
        let good = r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#;
        assert!(with(good).is_ok());
        for bad in [good.replace("\"factor\":8.0", "\"factor\":0.0"), good.replace("4.0", "1.0")] {
            let e = with(&bad).unwrap_err().to_string();
            assert!(e.contains("rope_scaling"), "{e}");
        }
    }

    #[test]
    fn hf_config_rejects_unknown_architectures() {
        let cfg: HfConfig = serde_json::from_str(
            r#"{"model_type":"gpt2","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2,"vocab_size":10}"#,
        )
        .unwrap();
        let err = cfg.to_config("x".into()).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }
}
