//! The Llama-family decoder and its forward over a ragged batch.
//!
//! ```text
//! x = embed(tokens)                                  [T, hidden]   T = new tokens of all sequences
//! for each layer:
//!     qkv  = fused_qkv(rms_norm(x))                  [T, q + 2·kv]
//!     x   += o(attention(qkv, caches, positions))    each sequence sees only its own cache
//!     x   += down(silu(gate) · up)   with gate|up = fused_gate_up(rms_norm(x))
//! logits = lm_head(rms_norm(x[rows wanted]))          [R, vocab]
//! ```

use super::batch::{DeviceLogits, StepLogits};
use super::kv_cache::{KvCache, KvStoreKind, StepPlan, StepRope};
use super::linear::with_cpu_f32;
use super::linear::{Linear, LinearWeight};
use super::load::{LoadOptions, ModelFiles, RawWeight, WeightFormat, WeightName, WeightSource};
use super::lora::{LoraBatch, LoraStack, LoraWeights, StackTarget, StackedStep, StepLora};
use super::stages::{Stage, StepTimer};
use super::{BatchLogits, ModelConfig, ModelError, ProjKind, RaggedBatch, Result};
use crate::model::kernels::attention::KvDtype;
use crate::model::kernels::{self, PackedFormat, PackedMatrix, elementwise};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

/// Token embedding table.
enum Embedding {
    /// Rows dequantized on demand (shares the packed output head when tied).
    Packed(Arc<PackedMatrix>),
    /// A float table `[vocab, hidden]` on the device.
    Table(Tensor),
}

struct Layer {
    attn_norm: Tensor,
    qkv: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// A loaded model: immutable weights, shareable across threads. Mutable state (KV caches)
/// lives in a [`KvCache`] owned by whoever drives the forward.
pub struct Llama {
    cfg: ModelConfig,
    device: Device,
    native: bool,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freqs: Vec<f32>,
    weight_bytes: usize,
    weights_desc: String,
    /// The candle path's stacked LoRA factors for the last set of adapters seen: rebuilt only
    /// when the adapters in flight change, not every step.
    lora_stack: Mutex<Option<Arc<LoraStack>>>,
}

impl Llama {
    /// Loads a GGUF file or an HF directory.
    pub fn load(path: &std::path::Path, opts: &LoadOptions) -> Result<Self> {
        match ModelFiles::detect(path)? {
            ModelFiles::Gguf(p) => {
                let mut f = super::load::gguf::GgufFile::open(&p)?;
                let cfg = f.config()?;
                Self::from_source(cfg, &mut f, opts)
            }
            ModelFiles::HfDir(p) => {
                let mut d = super::load::safetensors::SafetensorsDir::open(&p)?;
                let cfg = d.config()?;
                Self::from_source(cfg, &mut d, opts)
            }
        }
    }

    /// Builds the model from any weight source.
    pub fn from_source(cfg: ModelConfig, src: &mut dyn WeightSource, opts: &LoadOptions) -> Result<Self> {
        cfg.validate()?;
        let native = opts.native()?;
        let b = Builder { opts, native, device: if native { Device::Cpu } else { opts.device.clone() } };
        let (h, q, kv, ffn) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);

        let embed_raw = b.required(src, WeightName::Embed, &[cfg.vocab_size, h])?;
        let lm_head_raw =
            if cfg.tie_embeddings { None } else { Some(b.required(src, WeightName::LmHead, &[cfg.vocab_size, h])?) };
        let (embed, lm_head) = b.embedding_and_head(embed_raw, lm_head_raw)?;

        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let proj = |src: &mut dyn WeightSource, k: ProjKind, out: usize, inp: usize| -> Result<Linear> {
                let raw = b.required(src, WeightName::Proj(l, k), &[out, inp])?;
                let bias = if cfg.qkv_bias && matches!(k, ProjKind::Q | ProjKind::K | ProjKind::V) {
                    Some(b.vector(src, WeightName::Bias(l, k), out)?)
                } else {
                    None
                };
                Ok(Linear::new(b.linear_weight(raw, &WeightName::Proj(l, k).gguf())?, bias, k))
            };
            let qp = proj(src, ProjKind::Q, q, h)?;
            let kp = proj(src, ProjKind::K, kv, h)?;
            let vp = proj(src, ProjKind::V, kv, h)?;
            let o = proj(src, ProjKind::O, h, q)?;
            let gate = proj(src, ProjKind::Gate, ffn, h)?;
            let up = proj(src, ProjKind::Up, ffn, h)?;
            let down = proj(src, ProjKind::Down, h, ffn)?;
            layers.push(Layer {
                attn_norm: b.vector(src, WeightName::AttnNorm(l), h)?,
                qkv: b.fuse(vec![qp, kp, vp])?,
                o,
                ffn_norm: b.vector(src, WeightName::FfnNorm(l), h)?,
                gate_up: b.fuse(vec![gate, up])?,
                down,
            });
        }
        let norm = b.vector(src, WeightName::OutputNorm, h)?;
        let weight_bytes = layers
            .iter()
            .map(|l| l.qkv.size_in_bytes() + l.o.size_in_bytes() + l.gate_up.size_in_bytes() + l.down.size_in_bytes())
            .sum::<usize>()
            + lm_head.size_in_bytes();
        let weights_desc = describe(&layers[0].gate_up, native);
        Ok(Self {
            inv_freqs: cfg.rope_inv_freqs(),
            cfg,
            device: b.device.clone(),
            native,
            embed,
            layers,
            norm,
            lm_head,
            weight_bytes,
            weights_desc,
            lora_stack: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// True when lethe's CPU kernels run this model.
    pub fn is_native(&self) -> bool {
        self.native
    }
    /// Bytes of projection weights (what a decode step reads).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
    /// A short description of backend and weight format, e.g. `native/q4_1`.
    pub fn weights_desc(&self) -> &str {
        &self.weights_desc
    }

    /// A KV cache for this model with a byte budget (f16 entries on the native backend).
    pub fn new_kv_cache(&self, limit_bytes: usize) -> KvCache {
        self.new_kv_cache_with_dtype(limit_bytes, KvDtype::default())
    }

    /// A KV cache with an explicit element type (f32 for exact reference comparisons).
    pub fn new_kv_cache_with_dtype(&self, limit_bytes: usize, dtype: KvDtype) -> KvCache {
        let kind = if self.native { KvStoreKind::Paged } else { KvStoreKind::Tensors };
        KvCache::new(&self.cfg, kind, self.device.clone(), limit_bytes, dtype)
    }

    /// Runs one step: appends each entry's tokens to its sequence and returns logits (last
    /// position, or all new positions where asked) on the host. On error no sequence advances.
    pub fn forward(&self, batch: &RaggedBatch, kv: &mut KvCache) -> Result<BatchLogits> {
        if !self.native {
            return Ok(self.forward_device(batch, kv)?.to_host()?);
        }
        let mut timer = StepTimer::start(batch.n_tokens());
        let (x, plan) = self.hidden(batch, kv, &mut timer)?;
        let data = match &self.lm_head.weight {
            // Native: the kernel's output vector becomes the logits, no copy.
            LinearWeight::Packed(w) => {
                with_cpu_f32(&x, |xs| kernels::matmul::matmul_new(w, xs, plan.logit_rows.len()))?
            }
            _ => self.lm_head.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        };
        timer.lap(Stage::LmHead);
        timer.finish();
        kv.commit(&plan);
        Ok(BatchLogits { vocab: self.cfg.vocab_size, data, rows: plan.logit_ranges })
    }

    /// [`Self::forward`] on the candle backend, with the logits left on the device (`[rows,
    /// vocab]` f32) for sampling there.
    pub fn forward_device(&self, batch: &RaggedBatch, kv: &mut KvCache) -> Result<DeviceLogits> {
        if self.native {
            return Err(ModelError::Config("device logits are the candle backend's; this model runs natively".into()));
        }
        let (x, plan) = self.hidden(batch, kv, &mut StepTimer::start(0))?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        kv.commit(&plan);
        Ok(DeviceLogits { logits, vocab: self.cfg.vocab_size, rows: plan.logit_ranges })
    }

    /// One step with the logits where the backend keeps them: on the host for the native
    /// kernels, on the device for candle.
    pub fn forward_step(&self, batch: &RaggedBatch, kv: &mut KvCache) -> Result<StepLogits> {
        Ok(if self.native {
            StepLogits::Host(self.forward(batch, kv)?)
        } else {
            StepLogits::Device(self.forward_device(batch, kv)?)
        })
    }

    /// The decoder stack: final-normed hidden states of the rows whose logits are wanted, and
    /// the step's plan (committed by the caller once the logits exist). `timer` accounts the
    /// stages when [`stages`](super::stages) is on.
    fn hidden(&self, batch: &RaggedBatch, kv: &mut KvCache, timer: &mut StepTimer) -> Result<(Tensor, StepPlan)> {
        let plan = kv.plan(batch)?;
        let kind = if self.native { KvStoreKind::Paged } else { KvStoreKind::Tensors };
        let rope = StepRope::new(&plan.positions, &self.inv_freqs, self.cfg.rope_style, kind, &self.device)?;
        let lora = self.step_lora(batch, &plan)?;
        let mut x = self.embed(&plan.tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let lora = lora.as_ref().map(|s| (s, l));
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            timer.lap(Stage::RowWise);
            let qkv = layer.qkv.forward_lora(&h, lora)?;
            timer.lap(Stage::Qkv);
            let attn = kv.attention(l, &qkv, &plan, &rope)?;
            timer.lap(Stage::Attention);
            let o = layer.o.forward_lora(&attn, lora)?;
            timer.lap(Stage::O);
            x = self.add(&x, &o)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            timer.lap(Stage::RowWise);
            let gate_up = layer.gate_up.forward_lora(&h, lora)?;
            timer.lap(Stage::GateUp);
            let act = self.swiglu(&gate_up)?;
            timer.lap(Stage::RowWise);
            let down = layer.down.forward_lora(&act, lora)?;
            timer.lap(Stage::Down);
            x = self.add(&x, &down)?;
        }
        timer.lap(Stage::RowWise);
        let x = if plan.logit_rows.len() == plan.tokens.len() {
            x
        } else {
            let rows = Tensor::from_slice(&plan.logit_rows, plan.logit_rows.len(), &self.device)?;
            x.index_select(&rows, 0)?
        };
        Ok((self.rms_norm(&x, &self.norm)?, plan))
    }

    /// The step's LoRA work in the backend's form; `None` when no row has an adapter.
    fn step_lora(&self, batch: &RaggedBatch, plan: &StepPlan) -> Result<Option<StepLora>> {
        if self.native {
            let b = lora_batch(batch, plan);
            return Ok((!b.is_empty()).then_some(StepLora::Host(b)));
        }
        // The distinct adapters, in a fixed order (by address) so that the same set finds the
        // cached stack whatever order the rows come in.
        let mut adapters: Vec<Arc<LoraWeights>> = Vec::new();
        for a in batch.entries.iter().flat_map(|e| &e.adapters) {
            if !adapters.iter().any(|x| Arc::ptr_eq(x, a)) {
                adapters.push(a.clone());
            }
        }
        if adapters.is_empty() {
            return Ok(None);
        }
        adapters.sort_by_key(|a| Arc::as_ptr(a) as usize);
        let per_entry: Vec<Vec<usize>> = batch
            .entries
            .iter()
            .map(|e| e.adapters.iter().map(|a| adapters.iter().position(|x| Arc::ptr_eq(x, a)).unwrap_or(0)).collect())
            .collect();
        let mut rows: Vec<&[usize]> = Vec::with_capacity(plan.tokens.len());
        for (used, &(_, _, len, _)) in per_entry.iter().zip(&plan.spans) {
            rows.extend(std::iter::repeat_n(used.as_slice(), len));
        }
        let stack = self.lora_stack(adapters)?;
        Ok(Some(StepLora::Stacked(StackedStep::new(stack, &rows, &self.device)?)))
    }

    /// The stacked factors of `adapters`, from the cache when the set is the last one seen.
    fn lora_stack(&self, adapters: Vec<Arc<LoraWeights>>) -> Result<Arc<LoraStack>> {
        let mut cache = self.lora_stack.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.as_ref().filter(|s| s.holds(&adapters)) {
            return Ok(s.clone());
        }
        let targets: Vec<Vec<StackTarget>> = self
            .layers
            .iter()
            .map(|l| {
                [&l.qkv, &l.o, &l.gate_up, &l.down]
                    .into_iter()
                    .map(|lin| StackTarget { parts: &lin.parts, in_features: lin.in_features })
                    .collect()
            })
            .collect();
        // Drop the old stack first: its copies of the factors are not needed any more.
        *cache = None;
        let stack = Arc::new(LoraStack::build(adapters, &targets, &self.device)?);
        *cache = Some(stack.clone());
        Ok(stack)
    }

    /// RMSNorm over the last dimension of `x: [T, hidden]`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if !self.native {
            return Ok(candle_nn::ops::rms_norm(x, w, self.cfg.rms_eps)?);
        }
        let x = x.contiguous()?;
        let mut out = vec![0f32; x.elem_count()];
        with_cpu_f32(&x, |xs| with_cpu_f32(w, |ws| elementwise::rms_norm(xs, ws, self.cfg.rms_eps, &mut out)))??;
        Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
    }

    /// The residual connection `a + b`.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if !self.native {
            return Ok((a + b)?);
        }
        let mut out = a.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        with_cpu_f32(&b.contiguous()?, |bs| elementwise::add_assign(&mut out, bs))?;
        Ok(Tensor::from_vec(out, a.shape(), &Device::Cpu)?)
    }

    /// `silu(gate) · up` from the fused `[T, 2·ffn]` projection.
    fn swiglu(&self, gu: &Tensor) -> Result<Tensor> {
        let ffn = self.cfg.intermediate_size;
        if !self.native {
            return Ok((candle_nn::ops::silu(&gu.narrow(1, 0, ffn)?)? * gu.narrow(1, ffn, ffn)?)?);
        }
        let t = gu.dim(0)?;
        let mut out = vec![0f32; t * ffn];
        with_cpu_f32(&gu.contiguous()?, |g| elementwise::swiglu(g, ffn, &mut out))?;
        Ok(Tensor::from_vec(out, (t, ffn), &Device::Cpu)?)
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidBatch(format!("token id {bad} outside the vocabulary of {vocab}")));
        }
        match &self.embed {
            Embedding::Packed(m) => {
                let h = self.cfg.hidden_size;
                let mut out = vec![0f32; tokens.len() * h];
                for (row, &t) in out.chunks_exact_mut(h).zip(tokens) {
                    m.dequantize_row(t as usize, row);
                }
                Ok(Tensor::from_vec(out, (tokens.len(), h), &Device::Cpu)?)
            }
            Embedding::Table(t) => {
                let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
                Ok(t.index_select(&ids, 0)?)
            }
        }
    }
}

/// Groups the step's rows by adapter: each distinct adapter (by identity) with the packed rows of
/// the entries that use it.
fn lora_batch(batch: &RaggedBatch, plan: &super::kv_cache::StepPlan) -> LoraBatch {
    let mut out = LoraBatch::default();
    for (e, &(_, _, len, row)) in batch.entries.iter().zip(&plan.spans) {
        for a in &e.adapters {
            let rows = row..row + len;
            match out.uses.iter_mut().find(|(w, _)| Arc::ptr_eq(w, a)) {
                Some((_, ranges)) => ranges.push(rows),
                None => out.uses.push((a.clone(), vec![rows])),
            }
        }
    }
    out
}

fn describe(l: &Linear, native: bool) -> String {
    let fmt = match &l.weight {
        LinearWeight::Packed(p) => p.format.name().to_string(),
        LinearWeight::Quantized(q) => match q.as_ref() {
            QMatMul::QTensor(t) => format!("{:?}", t.dtype()).to_lowercase(),
            _ => "f32".into(),
        },
        LinearWeight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
    };
    format!("{}/{fmt}", if native { "native" } else { "candle" })
}

/// Turns raw tensors into the weights of the chosen backend and format.
struct Builder<'a> {
    opts: &'a LoadOptions,
    native: bool,
    device: Device,
}

impl Builder<'_> {
    fn required(&self, src: &mut dyn WeightSource, name: WeightName, dims: &[usize]) -> Result<RawWeight> {
        let raw = src
            .load(name, &self.device)?
            .ok_or_else(|| ModelError::MissingTensor(format!("{} / {}", name.gguf(), name.hf())))?;
        if raw.dims() != dims {
            return Err(ModelError::ShapeMismatch { tensor: name.gguf(), expected: dims.to_vec(), got: raw.dims() });
        }
        Ok(raw)
    }

    /// A 1-D f32 vector (norm weights, biases) on the device.
    fn vector(&self, src: &mut dyn WeightSource, name: WeightName, len: usize) -> Result<Tensor> {
        let raw = self.required(src, name, &[len])?;
        Ok(raw.to_f32_cpu()?.to_device(&self.device)?)
    }

    fn fuse(&self, parts: Vec<Linear>) -> Result<Linear> {
        // Fusing quantized tensors needs one dtype; mixed-type files keep separate projections.
        match Linear::fuse(parts.clone()) {
            Ok(l) => Ok(l),
            Err(_) if !self.native => fuse_as_dense(parts),
            Err(e) => Err(e),
        }
    }

    fn linear_weight(&self, raw: RawWeight, name: &str) -> Result<LinearWeight> {
        if self.native { Ok(LinearWeight::Packed(Arc::new(self.pack(raw, name)?))) } else { self.candle_weight(raw) }
    }

    /// Converts a tensor to the packed format the CPU kernels run.
    fn pack(&self, raw: RawWeight, name: &str) -> Result<PackedMatrix> {
        let (n, k) = match raw.dims()[..] {
            [n, k] => (n, k),
            _ => return Err(ModelError::Config(format!("{name} is not a matrix"))),
        };
        let bad = |e: String| ModelError::Config(format!("{name}: {e}"));
        let blocks_ok = k.is_multiple_of(32);
        let want = self.opts.weights;
        if let RawWeight::Quantized(q) = &raw {
            match (q.dtype(), want) {
                (GgmlDType::Q8_0, WeightFormat::Native | WeightFormat::Q8_0) => {
                    return PackedMatrix::from_q8_0_blocks(&q.data()?, n, k).map_err(bad);
                }
                (GgmlDType::Q4_1, WeightFormat::Native) => {
                    return PackedMatrix::from_q4_1_blocks(&q.data()?, n, k).map_err(bad);
                }
                _ => {}
            }
        }
        let is_float = match &raw {
            RawWeight::Float(_) => true,
            RawWeight::Quantized(q) => {
                matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
            }
        };
        let values = raw.to_f32_cpu()?.flatten_all()?.to_vec1::<f32>()?;
        let to_q8 = match want {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => false,
            WeightFormat::Q8_0 => blocks_ok,
            // Floats stay exact; other quantized types go to our 8-bit kernel.
            WeightFormat::Native => !is_float && blocks_ok,
        };
        if to_q8 {
            PackedMatrix::quantize_q8_0(&values, n, k).map_err(bad)
        } else {
            PackedMatrix::from_f32(&values, n, k).map_err(bad)
        }
    }

    fn candle_weight(&self, raw: RawWeight) -> Result<LinearWeight> {
        Ok(match (raw, self.opts.weights) {
            (RawWeight::Quantized(q), WeightFormat::Native) if !is_float_q(&q) => {
                LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(q)?))
            }
            (raw, WeightFormat::Q8_0) if raw.dims().last().is_some_and(|k| k % 32 == 0) => {
                let t = raw.to_f32_cpu()?.to_device(&self.device)?;
                LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q8_0)?)?))
            }
            (raw, WeightFormat::F16 | WeightFormat::Bf16) => {
                LinearWeight::Dense(raw.to_f32_cpu()?.to_dtype(self.half_dtype())?.to_device(&self.device)?)
            }
            (raw, _) => LinearWeight::Dense(raw.to_f32_cpu()?.to_device(&self.device)?),
        })
    }

    /// The element type of `--weights f16|bf16`.
    fn half_dtype(&self) -> DType {
        if self.opts.weights == WeightFormat::Bf16 { DType::BF16 } else { DType::F16 }
    }

    fn embedding_and_head(&self, embed: RawWeight, head: Option<RawWeight>) -> Result<(Embedding, Linear)> {
        if self.native {
            let e = Arc::new(self.pack(embed, "token_embd")?);
            let head = match head {
                None => e.clone(),
                Some(h) => Arc::new(self.pack(h, "output")?),
            };
            // An embedding kept as f32 is exact; a quantized one is dequantized row by row.
            debug_assert!(matches!(e.format, PackedFormat::Q8_0 | PackedFormat::Q4_1 | PackedFormat::F32));
            Ok((Embedding::Packed(e), Linear::new(LinearWeight::Packed(head), None, ProjKind::O)))
        } else {
            let table = embed.to_f32_cpu()?.to_device(&self.device)?;
            let head = match head {
                Some(h) => self.candle_weight(h)?,
                None => match self.opts.weights {
                    WeightFormat::F32 => LinearWeight::Dense(table.clone()),
                    WeightFormat::F16 | WeightFormat::Bf16 => LinearWeight::Dense(table.to_dtype(self.half_dtype())?),
                    _ => match embed_as_quant(&embed) {
                        Some(q) => LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(q)?)),
                        None => LinearWeight::Dense(table.clone()),
                    },
                },
            };
            Ok((Embedding::Table(table), Linear::new(head, None, ProjKind::O)))
        }
    }
}

fn is_float_q(q: &QTensor) -> bool {
    matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The quantized tensor behind a GGUF embedding, if it is one (for a tied output head).
fn embed_as_quant(raw: &RawWeight) -> Option<QTensor> {
    match raw {
        RawWeight::Quantized(q) if !is_float_q(q) => {
            let data = q.data().ok()?.into_owned();
            let storage =
                candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(data), &q.device(), q.dtype())
                    .ok()?;
            QTensor::new(storage, q.shape().clone()).ok()
        }
        _ => None,
    }
}

/// Fusion for the candle path when the parts cannot be concatenated as stored (mixed quant
/// types): dequantize and concatenate as f32.
fn fuse_as_dense(parts: Vec<Linear>) -> Result<Linear> {
    {
        let mut dense = Vec::new();
        for p in &parts {
            let t = match &p.weight {
                LinearWeight::Dense(t) => t.clone(),
                LinearWeight::Quantized(q) => match q.as_ref() {
                    QMatMul::QTensor(t) => t.dequantize(&t.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
                },
                LinearWeight::Packed(_) => unreachable!("native weights always fuse"),
            };
            let mut l = p.clone();
            l.weight = LinearWeight::Dense(t);
            dense.push(l);
        }
        Linear::fuse(dense)
    }
}
