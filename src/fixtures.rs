//! Tiny random models written to disk in the real HF layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`), so tests and benchmarks exercise the real loading
//! code in milliseconds. The tokenizer is a byte-level BPE trained on the spot with the
//! `tokenizers` crate.

use crate::sampling::Rng;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder};

/// ChatML, as SmolLM2 and Qwen2 use it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub model_type: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    /// Stored dtype of the weights: "F32", "F16" or "BF16".
    pub dtype: &'static str,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            model_type: "llama",
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_positions: 512,
            tie_embeddings: false,
            dtype: "F32",
            seed: 7,
        }
    }
}

impl TinySpec {
    /// The shape of a real model, so fixtures (e.g. PEFT adapters for benchmarks) can be written
    /// for it.
    pub fn shaped_like(cfg: &crate::model::ModelConfig) -> Self {
        Self {
            model_type: "llama",
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.n_layers,
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            max_positions: cfg.max_context,
            tie_embeddings: cfg.tie_embeddings,
            dtype: "F32",
            seed: 0,
        }
    }
}

const CORPUS: &str = "The quick brown fox jumps over the lazy dog. A customer called about an \
order; her phone number is on file and must never be shared. Paris is the capital of France. \
Classifier-free guidance mixes two predictions of the same model. Forget the secret, keep the \
skill. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2024. Hello, world! How are you today? I am fine, thank you.";

/// Writes a tiny random model into `dir` (created if needed) and returns `dir`.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let vocab = write_tokenizer(dir)?;
    let head_dim = spec.hidden / spec.heads;
    let config = serde_json::json!({
        "model_type": spec.model_type,
        "architectures": [if spec.model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.max_positions,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": "float32",
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    let mut rng = Rng::new(spec.seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| offset + scale * (rng.next_f32() * 2.0 - 1.0)).collect();
        tensors.push((name, shape, data));
    };
    let (h, f) = (spec.hidden, spec.intermediate);
    let (q, kv) = (spec.heads * head_dim, spec.kv_heads * head_dim);
    add("model.embed_tokens.weight".into(), vec![vocab, h], 1.0, 0.0);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 0.1, 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.1, 1.0);
        let s = 1.0 / (h as f32).sqrt();
        add(format!("{p}.self_attn.q_proj.weight"), vec![q, h], 2.0 * s, 0.0);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], 2.0 * s, 0.0);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], s, 0.0);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q], s, 0.0);
        add(format!("{p}.mlp.gate_proj.weight"), vec![f, h], s, 0.0);
        add(format!("{p}.mlp.up_proj.weight"), vec![f, h], s, 0.0);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, f], 1.0 / (f as f32).sqrt(), 0.0);
        if spec.model_type == "qwen2" {
            add(format!("{p}.self_attn.q_proj.bias"), vec![q], 0.1, 0.0);
            add(format!("{p}.self_attn.k_proj.bias"), vec![kv], 0.1, 0.0);
            add(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.1, 0.0);
        }
    }
    add("model.norm.weight".into(), vec![h], 0.1, 1.0);
    if !spec.tie_embeddings {
        add("lm_head.weight".into(), vec![vocab, h], 1.0 / (h as f32).sqrt(), 0.0);
    }
    let dtype = match spec.dtype {
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        _ => Dtype::F32,
    };
    let views: Vec<(String, RawView)> =
        tensors.into_iter().map(|(name, shape, data)| (name, RawView::new(dtype, shape, &data))).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(dir.to_path_buf())
}

/// Trains a byte-level BPE on a small corpus; returns the vocabulary size.
fn write_tokenizer(dir: &Path) -> anyhow::Result<usize> {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(384)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk: tokenizers::TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lines: Vec<String> = CORPUS.split(". ").map(|s| s.to_string()).collect();
    tk.train(&mut trainer, lines.iter()).map_err(|e| anyhow::anyhow!("{e}"))?;
    tk.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tcfg = serde_json::json!({
        "chat_template": CHATML_TEMPLATE,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tcfg)?)?;
    let vocab = tk.get_vocab_size(true);
    // Round up so every projection dimension stays a multiple of 16.
    Ok(vocab.div_ceil(16) * 16)
}

/// A tensor for `safetensors::serialize`, converted to the stored dtype.
struct RawView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawView {
    fn new(dtype: Dtype, shape: Vec<usize>, data: &[f32]) -> Self {
        let bytes = match dtype {
            Dtype::F16 => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            Dtype::BF16 => data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            _ => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        Self { dtype, shape, bytes }
    }
}

impl View for RawView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A fresh temporary directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "lethe-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A factor pair a fixture wrote: `(layer, module, a: [r, in], b: [out, r], r)`.
pub type WrittenPair = (usize, &'static str, Vec<f32>, Vec<f32>, usize);

/// A LoRA update to merge into weights: a [`WrittenPair`] plus its scale.
pub type MergeUpdate = (usize, &'static str, Vec<f32>, Vec<f32>, usize, f32);

/// A random LoRA adapter in PEFT's on-disk layout, for a model of shape `model`.
#[derive(Debug, Clone)]
pub struct PeftSpec {
    pub rank: usize,
    pub alpha: f32,
    /// Projection names (`q_proj`, ...) that get LoRA weights.
    pub modules: Vec<&'static str>,
    pub use_rslora: bool,
    /// Extra `adapter_config.json` fields (e.g. `rank_pattern`), merged over the defaults.
    pub extra_config: serde_json::Value,
    /// Write keys as `lora_A.default.weight` (as some PEFT versions do).
    pub default_suffix: bool,
    pub seed: u64,
    /// `lethe.json` guidance profile to write beside the PEFT files.
    pub profile: Option<serde_json::Value>,
    /// Override the rank of one module (name, rank) in the written tensors.
    pub rank_override: Option<(&'static str, usize)>,
    /// Factor values are uniform in `[-init_scale/2, init_scale/2]`.
    pub init_scale: f32,
}

impl Default for PeftSpec {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 8.0,
            modules: vec!["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_rslora: false,
            extra_config: serde_json::json!({}),
            default_suffix: false,
            seed: 11,
            profile: None,
            rank_override: None,
            init_scale: 0.5,
        }
    }
}

/// In and out features of an HF projection of `model`.
fn hf_proj_dims(model: &TinySpec, module: &str) -> (usize, usize) {
    let head_dim = model.hidden / model.heads;
    let (h, q, kv, f) = (model.hidden, model.heads * head_dim, model.kv_heads * head_dim, model.intermediate);
    match module {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, f),
        "down_proj" => (f, h),
        other => panic!("unknown module {other}"),
    }
}

/// Writes a random PEFT LoRA adapter for `model` into `dir`. Returns, per (layer, module), the
/// factors `(a: [r, in], b: [out, r])` it wrote, for reference computations.
pub fn write_peft_adapter(dir: &Path, model: &TinySpec, spec: &PeftSpec) -> anyhow::Result<Vec<WrittenPair>> {
    std::fs::create_dir_all(dir)?;
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": spec.modules,
        "use_rslora": spec.use_rslora,
        "lora_dropout": 0.01,
        "bias": "none",
        "base_model_name_or_path": "tiny",
        "task_type": "CAUSAL_LM",
    });
    if let (Some(c), Some(extra)) = (config.as_object_mut(), spec.extra_config.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)?;
    if let Some(p) = &spec.profile {
        std::fs::write(dir.join("lethe.json"), serde_json::to_string_pretty(p)?)?;
    }
    let mut rng = Rng::new(spec.seed);
    let mut written = Vec::new();
    let mut views = Vec::new();
    let suffix = if spec.default_suffix { ".default" } else { "" };
    for l in 0..model.layers {
        for &m in &spec.modules {
            let (inp, out) = hf_proj_dims(model, m);
            let r = match spec.rank_override {
                Some((om, or)) if om == m => or,
                _ => spec.rank,
            };
            let a: Vec<f32> = (0..r * inp).map(|_| (rng.next_f32() - 0.5) * spec.init_scale).collect();
            let b: Vec<f32> = (0..out * r).map(|_| (rng.next_f32() - 0.5) * spec.init_scale).collect();
            let block = if m.ends_with("_proj") && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&m) {
                "self_attn"
            } else {
                "mlp"
            };
            let base = format!("base_model.model.model.layers.{l}.{block}.{m}");
            views.push((format!("{base}.lora_A{suffix}.weight"), RawView::new(Dtype::F32, vec![r, inp], &a)));
            views.push((format!("{base}.lora_B{suffix}.weight"), RawView::new(Dtype::F32, vec![out, r], &b)));
            written.push((l, m, a, b, r));
        }
    }
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))?;
    Ok(written)
}

/// Writes a copy of the tiny model in `base` with LoRA updates merged into its weights:
/// `W += scale · B A` for each `(layer, module, a, b, rank)` with its `scale`.
pub fn write_merged_model(
    base: &Path,
    out: &Path,
    model: &TinySpec,
    updates: &[MergeUpdate],
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), out.join(f))?;
    }
    let bytes = std::fs::read(base.join("model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut tensors: Vec<(String, RawView)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut vals: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        for (l, m, a, b, r, scale) in updates {
            let block = if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(m) { "self_attn" } else { "mlp" };
            if name == format!("model.layers.{l}.{block}.{m}.weight") {
                let (inp, outf) = hf_proj_dims(model, m);
                for o in 0..outf {
                    for i in 0..inp {
                        let d: f32 = (0..*r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                        vals[o * inp + i] += scale * d;
                    }
                }
            }
        }
        tensors.push((name, RawView::new(Dtype::F32, view.shape().to_vec(), &vals)));
    }
    safetensors::serialize_to_file(tensors, None, &out.join("model.safetensors"))?;
    Ok(out.to_path_buf())
}

/// Converts the tiny HF model in `hf_dir` to a GGUF file at `out` the way llama.cpp's
/// `convert_hf_to_gguf.py` does for Llama: tensors renamed, q/k rows permuted for interleaved
/// RoPE, weights stored as `dtype` (F32 or a quantized type whose block fits the shapes).
/// Lets tests compare the GGUF path with the HF path on the same weights.
pub fn write_tiny_gguf(
    hf_dir: &Path,
    out: &Path,
    spec: &TinySpec,
    dtype: candle_core::quantized::GgmlDType,
) -> anyhow::Result<PathBuf> {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file::Value};
    anyhow::ensure!(spec.model_type == "llama", "write_tiny_gguf converts llama models only");
    let bytes = std::fs::read(hf_dir.join("model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let head_dim = spec.hidden / spec.heads;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut vocab = 0;
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let mut vals: Vec<f32> = match view.dtype() {
            Dtype::F16 => {
                view.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            Dtype::BF16 => {
                view.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            _ => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        };
        let heads = if name.ends_with("q_proj.weight") {
            Some(spec.heads)
        } else if name.ends_with("k_proj.weight") {
            Some(spec.kv_heads)
        } else {
            None
        };
        if let Some(n) = heads {
            // numpy: w.reshape(n, 2, d/2, cols).swapaxes(1, 2).reshape(w.shape)
            let (cols, half) = (shape[1], head_dim / 2);
            let src = vals.clone();
            for h in 0..n {
                for s in 0..2 {
                    for j in 0..half {
                        let (dst_row, src_row) = (h * head_dim + j * 2 + s, h * head_dim + s * half + j);
                        vals[dst_row * cols..(dst_row + 1) * cols]
                            .copy_from_slice(&src[src_row * cols..(src_row + 1) * cols]);
                    }
                }
            }
        }
        let gguf_name = gguf_tensor_name(&name)?;
        if gguf_name == "token_embd.weight" {
            vocab = shape[0];
        }
        let t = candle_core::Tensor::from_vec(vals, shape.as_slice(), &candle_core::Device::Cpu)?;
        // Norms stay f32, as llama.cpp keeps 1-D tensors.
        let qdtype = if shape.len() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((gguf_name, QTensor::quantize(&t, qdtype)?));
    }
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny-gguf".into())),
        ("llama.embedding_length", Value::U32(spec.hidden as u32)),
        ("llama.feed_forward_length", Value::U32(spec.intermediate as u32)),
        ("llama.block_count", Value::U32(spec.layers as u32)),
        ("llama.attention.head_count", Value::U32(spec.heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(spec.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.context_length", Value::U32(spec.max_positions as u32)),
        ("llama.vocab_size", Value::U32(vocab as u32)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out)?;
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(out.to_path_buf())
}

/// HF tensor name → llama.cpp's GGUF name.
fn gguf_tensor_name(hf: &str) -> anyhow::Result<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Ok(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.").ok_or_else(|| anyhow::anyhow!("unexpected tensor {hf}"))?;
    let (layer, module) = rest.split_once('.').ok_or_else(|| anyhow::anyhow!("unexpected tensor {hf}"))?;
    let g = match module {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => anyhow::bail!("unexpected tensor module {other}"),
    };
    Ok(format!("blk.{layer}.{g}"))
}
