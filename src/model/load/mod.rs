//! Reading model files: a GGUF file, or an HF directory (`config.json` + `*.safetensors`).
//!
//! Both are exposed as a [`WeightSource`] that hands out tensors by their role
//! ([`WeightName`]), so the model builder does not care about file formats, and as a
//! [`ModelConfig`](crate::model::ModelConfig). Anything malformed becomes a [`ModelError`] naming the file and the problem.

pub mod gguf;
pub mod safetensors;

use super::{ModelError, ProjKind, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// Which implementation runs the projections and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// lethe's CPU kernels where the device is the CPU (and the weights are not f16/bf16),
    /// candle's otherwise.
    #[default]
    Auto,
    /// lethe's CPU kernels (tile-packed weights, paged KV). CPU only.
    Native,
    /// candle's ops on any device (the portable path; also the reference in tests).
    Candle,
}

/// How weights are stored for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Keep the file's format where a kernel exists for it (GGUF Q8_0/Q4_1, floats as f32);
    /// other quantized types are converted to Q8_0.
    #[default]
    Native,
    /// Re-quantize every projection to Q8_0 at load.
    Q8_0,
    /// Dequantize everything to f32 (exact for float checkpoints, large).
    F32,
    /// Dequantize the projections to f16 (candle backend: a GPU's fast matmul type; the
    /// activations stay f32 between projections).
    F16,
    /// Dequantize the projections to bf16 (candle backend).
    Bf16,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" | "auto" => Ok(Self::Native),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown weight format {s:?} (native, q8_0, f32, f16, bf16)")),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "candle" => Ok(Self::Candle),
            _ => Err(format!("unknown backend {s:?} (auto, native, candle)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub backend: Backend,
    pub weights: WeightFormat,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, backend: Backend::Auto, weights: WeightFormat::Native }
    }
}

impl LoadOptions {
    /// True when lethe's CPU kernels run this model.
    pub fn native(&self) -> Result<bool> {
        let half = matches!(self.weights, WeightFormat::F16 | WeightFormat::Bf16);
        match (self.backend, self.device.is_cpu()) {
            // Only candle runs half-precision weights.
            (Backend::Auto, true) if half => Ok(false),
            (Backend::Native, true) if half => Err(ModelError::Config(
                "f16/bf16 weights run on the candle backend; the native CPU kernels take native, q8_0 or f32".into(),
            )),
            (Backend::Auto, cpu) => Ok(cpu),
            (Backend::Native, true) => Ok(true),
            (Backend::Native, false) => Err(ModelError::Config(
                "the native backend runs on the CPU only; use --backend candle (or auto) on a GPU".into(),
            )),
            (Backend::Candle, _) => Ok(false),
        }
    }
}

/// A tensor's role in a Llama-family model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightName {
    Embed,
    OutputNorm,
    LmHead,
    AttnNorm(usize),
    FfnNorm(usize),
    Proj(usize, ProjKind),
    Bias(usize, ProjKind),
}

impl WeightName {
    /// The tensor's name in a GGUF file (llama.cpp's naming).
    pub fn gguf(&self) -> String {
        let proj = |k: ProjKind| match k {
            ProjKind::Q => "attn_q",
            ProjKind::K => "attn_k",
            ProjKind::V => "attn_v",
            ProjKind::O => "attn_output",
            ProjKind::Gate => "ffn_gate",
            ProjKind::Up => "ffn_up",
            ProjKind::Down => "ffn_down",
        };
        match *self {
            Self::Embed => "token_embd.weight".into(),
            Self::OutputNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Self::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Self::Proj(l, k) => format!("blk.{l}.{}.weight", proj(k)),
            Self::Bias(l, k) => format!("blk.{l}.{}.bias", proj(k)),
        }
    }

    /// The tensor's name in an HF checkpoint.
    pub fn hf(&self) -> String {
        let module = |k: ProjKind| match k {
            ProjKind::Q | ProjKind::K | ProjKind::V | ProjKind::O => {
                format!("self_attn.{}", k.hf_name())
            }
            _ => format!("mlp.{}", k.hf_name()),
        };
        match *self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::OutputNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Self::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Self::Proj(l, k) => format!("model.layers.{l}.{}.weight", module(k)),
            Self::Bias(l, k) => format!("model.layers.{l}.{}.bias", module(k)),
        }
    }
}

/// A tensor as stored in the file.
// `QTensor` is ~250 bytes on aarch64 (larger than on x86-64, where the lint stays quiet); a
// model's few hundred of these live only while it loads, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum RawWeight {
    /// A GGUF tensor (quantized or float), on the requested device.
    Quantized(QTensor),
    /// A float tensor (f32, f16 or bf16 as stored), on the CPU.
    Float(Tensor),
}

impl RawWeight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Quantized(q) => q.shape().dims().to_vec(),
            Self::Float(t) => t.dims().to_vec(),
        }
    }
    /// The values as an f32 tensor on the CPU.
    pub fn to_f32_cpu(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.dequantize(&Device::Cpu)?,
            Self::Float(t) => t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?,
        })
    }
}

/// Hands out a model's tensors by role.
pub trait WeightSource {
    /// The tensor, or `None` if the file does not have it (optional tensors: biases, lm_head).
    fn load(&mut self, name: WeightName, device: &Device) -> Result<Option<RawWeight>>;
    /// Shape of a tensor without loading it.
    fn dims(&self, name: WeightName) -> Option<Vec<usize>>;
}

/// The kind of model at a path.
pub enum ModelFiles {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelFiles {
    /// Recognises a GGUF file (by its magic) or an HF directory (by its `config.json`).
    pub fn detect(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Self::HfDir(path.to_path_buf()));
            }
            return Err(ModelError::UnrecognizedFormat {
                path: path.to_path_buf(),
                reason: "a directory without config.json (expected an HF model directory)".into(),
            });
        }
        let mut magic = [0u8; 4];
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let mut f = std::fs::File::open(path).map_err(io)?;
        use std::io::Read;
        let n = f.read(&mut magic).map_err(io)?;
        if n == 4 && &magic == b"GGUF" {
            return Ok(Self::Gguf(path.to_path_buf()));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let reason = match ext {
            "gguf" => "the file does not start with the GGUF magic bytes".to_string(),
            "safetensors" => "pass the directory holding config.json and the .safetensors files".into(),
            "bin" | "pt" | "pth" => {
                "PyTorch pickles are not supported (they can run code); use safetensors or GGUF".into()
            }
            _ => "expected a .gguf file or an HF directory with config.json and *.safetensors".into(),
        };
        Err(ModelError::UnrecognizedFormat { path: path.to_path_buf(), reason })
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

/// Parses `cpu` or `cuda:N` (`cuda` = `cuda:0`). CUDA needs a build with the `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| ModelError::Config(format!("bad device {s:?} (cpu, cuda, cuda:N)")))?,
                None => {
                    return Err(ModelError::Config(format!("unknown device {s:?} (cpu, cuda, cuda:N)")));
                }
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::Config(format!(
                    "device {s}: this build of lethe has no CUDA support (rebuild with --features cuda)"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}
