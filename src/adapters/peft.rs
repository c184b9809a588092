//! Reading a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`), checking
//! it against the base model, and building its [`LoraWeights`].
//!
//! Everything lethe cannot apply faithfully is refused with a message naming it, never ignored:
//! DoRA, `fan_in_fan_out`, `modules_to_save`, LoRA on embeddings or the output head, biases,
//! pickled `.bin` weights, unknown keys, and shapes that do not fit the base model.

use super::AdapterError;
use super::files::AdapterFiles;
use crate::model::lora::{LoraPair, LoraWeights, proj_dims};
use crate::model::{Llama, ModelConfig, ProjKind, RopeStyle};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// The fields of `adapter_config.json` lethe reads or must refuse.
#[derive(Debug, Deserialize)]
pub struct PeftConfig {
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f32,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
    /// Pattern → rank, in the file's order: like PEFT, the first pattern that matches wins.
    #[serde(default, deserialize_with = "in_order")]
    pub rank_pattern: Vec<(String, usize)>,
    /// Pattern → alpha, in the file's order (first match wins).
    #[serde(default, deserialize_with = "in_order")]
    pub alpha_pattern: Vec<(String, f32)>,
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// lethe's guidance profile beside the PEFT files (`lethe.json`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuidanceProfile {
    pub positive: String,
    pub negative: String,
    #[serde(default)]
    pub gamma: Option<f32>,
    #[serde(default)]
    pub mode: Option<crate::guidance::GuidanceMode>,
    /// Where the adapter was trained with its conditions (serving places them the same way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::engine::prompt::Placement>,
}

/// A parsed, validated adapter directory.
pub struct PeftAdapter {
    pub weights: LoraWeights,
    pub rank: usize,
    pub modules: usize,
    pub profile: Option<GuidanceProfile>,
    pub base_model: Option<String>,
    /// sha256 over the config, the weights and the profile: identical content, identical id.
    pub content_hash: String,
}

/// An adapter directory read and validated against a model configuration, its factors as f32
/// host values with `lora_B`'s rows already in the base model's layout (see
/// `hf_rows_to_interleaved`). Serving packs them into [`LoraWeights`]; training merges frozen
/// adapters into its base weights.
pub struct PeftFile {
    pub modules: Vec<PeftModule>,
    pub rank: usize,
    pub profile: Option<GuidanceProfile>,
    pub base_model: Option<String>,
    /// sha256 over the config, the weights and the profile: identical content, identical id.
    pub content_hash: String,
}

/// One projection's update: `scale · B A` with `a: [rank, in]`, `b: [out, rank]`.
pub struct PeftModule {
    pub layer: usize,
    pub kind: ProjKind,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

/// The HF module name of a projection (`model.layers.3.self_attn.q_proj`).
pub fn module_name(layer: usize, kind: ProjKind) -> String {
    let block = match kind {
        ProjKind::Q | ProjKind::K | ProjKind::V | ProjKind::O => "self_attn",
        _ => "mlp",
    };
    format!("model.layers.{layer}.{block}.{}", kind.hf_name())
}

/// PEFT's pattern rule: a pattern applies to a module whose name ends in `.{pattern}` (the
/// pattern may be a regex), or equals it.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    if module == pattern || module.ends_with(&format!(".{pattern}")) {
        return true;
    }
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).is_ok_and(|re| re.is_match(module))
}

fn targeted(t: &Option<TargetModules>, module: &str) -> bool {
    match t {
        None => true,
        Some(TargetModules::Regex(s)) if s == "all-linear" => true,
        Some(TargetModules::Regex(re)) => regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(module)),
        Some(TargetModules::List(names)) => names.iter().any(|n| module == n || module.ends_with(&format!(".{n}"))),
    }
}

/// Reads and validates `dir` for `model` (the directory is read once, see [`AdapterFiles::read`]).
pub fn load(dir: &Path, model: &Llama) -> Result<PeftAdapter, AdapterError> {
    let real = dir.canonicalize().map_err(|_| AdapterError::NotFound(dir.display().to_string()))?;
    parse(&AdapterFiles::read(&real)?, model)
}

/// Validates the files of an adapter for `model` and builds its weights. Everything works on
/// the bytes given: the content hash covers exactly what was parsed.
pub fn parse(files: &AdapterFiles, model: &Llama) -> Result<PeftAdapter, AdapterError> {
    let file = parse_file(files, model.config())?;
    let mcfg = model.config();
    let mut layers: Vec<[Option<LoraPair>; 7]> = (0..mcfg.n_layers).map(|_| std::array::from_fn(|_| None)).collect();
    let mut total = 0;
    let modules = file.modules.len();
    for m in file.modules {
        let dims = proj_dims(mcfg, m.kind);
        let pair = LoraPair::new(&m.a, &m.b, m.rank, m.scale, dims, model.is_native(), model.device())
            .map_err(|e| AdapterError::Invalid(e.to_string()))?;
        total += pair.size_in_bytes();
        layers[m.layer][m.kind as usize] = Some(pair);
    }
    Ok(PeftAdapter {
        weights: LoraWeights { layers, bytes: total },
        rank: file.rank,
        modules,
        profile: file.profile,
        base_model: file.base_model,
        content_hash: file.content_hash,
    })
}

/// Reads and validates `dir` against a model of configuration `mcfg`, without building weights
/// for a runtime (the trainer merges them into its own).
pub fn read(dir: &Path, mcfg: &ModelConfig) -> Result<PeftFile, AdapterError> {
    let real = dir.canonicalize().map_err(|_| AdapterError::NotFound(dir.display().to_string()))?;
    parse_file(&AdapterFiles::read(&real)?, mcfg)
}

/// Validates the files of an adapter against a model of configuration `mcfg`.
pub fn parse_file(files: &AdapterFiles, mcfg: &ModelConfig) -> Result<PeftFile, AdapterError> {
    let bad = |m: String| AdapterError::Invalid(m);
    let cfg: PeftConfig =
        serde_json::from_slice(&files.config).map_err(|e| bad(format!("invalid adapter_config.json: {e}")))?;
    check_config(&cfg)?;
    let st = safetensors::SafeTensors::deserialize(&files.weights)
        .map_err(|e| bad(format!("adapter_model.safetensors is corrupt: {e:?}")))?;
    let profile: Option<GuidanceProfile> = match &files.profile {
        Some(t) => Some(serde_json::from_slice(t).map_err(|e| bad(format!("invalid lethe.json: {e}")))?),
        None => None,
    };
    if let Some(p) = &profile {
        if p.positive.trim().is_empty() {
            return Err(bad("lethe.json: the positive condition is empty".into()));
        }
        if p.gamma.is_some_and(|g| !g.is_finite() || g < 0.0) {
            return Err(bad("lethe.json: gamma must be a finite number ≥ 0".into()));
        }
    }

    // Index the tensors by (module, A|B).
    let mut factors: HashMap<(String, bool), (Vec<usize>, Vec<f32>)> = HashMap::new();
    for (name, view) in st.tensors() {
        let (module, is_b) = parse_key(&name)?;
        let values = to_f32(&name, &view)?;
        factors.insert((module, is_b), (view.shape().to_vec(), values));
    }

    let mut modules = Vec::new();
    let mut max_rank = 0;
    for layer in 0..mcfg.n_layers {
        for kind in ProjKind::ALL {
            let module = module_name(layer, kind);
            let a = factors.remove(&(module.clone(), false));
            let b = factors.remove(&(module.clone(), true));
            let (a, b) = match (a, b) {
                (None, None) => continue,
                (Some(a), Some(b)) => (a, b),
                _ => return Err(bad(format!("{module}: lora_A and lora_B must both be present"))),
            };
            if !targeted(&cfg.target_modules, &module) {
                return Err(bad(format!("{module} has LoRA weights but is not in target_modules")));
            }
            let (inp, out) = proj_dims(mcfg, kind);
            let rank = cfg.rank_pattern.iter().find(|(p, _)| pattern_matches(p, &module)).map_or(cfg.r, |(_, r)| *r);
            let alpha =
                cfg.alpha_pattern.iter().find(|(p, _)| pattern_matches(p, &module)).map_or(cfg.lora_alpha, |(_, a)| *a);
            if a.0 != [rank, inp] {
                return Err(bad(format!(
                    "{module}.lora_A has shape {:?}, expected [{rank}, {inp}] (rank {rank}, base input {inp})",
                    a.0
                )));
            }
            if b.0 != [out, rank] {
                return Err(bad(format!(
                    "{module}.lora_B has shape {:?}, expected [{out}, {rank}] (base output {out})",
                    b.0
                )));
            }
            if rank == 0 {
                return Err(bad(format!("{module}: rank 0")));
            }
            let scale = if cfg.use_rslora { alpha / (rank as f32).sqrt() } else { alpha / rank as f32 };
            if !scale.is_finite() {
                return Err(bad(format!("{module}: LoRA scale alpha/rank = {alpha}/{rank} is not finite")));
            }
            let b_rows = match kind {
                ProjKind::Q if mcfg.rope_style == RopeStyle::Interleaved => {
                    hf_rows_to_interleaved(&b.1, rank, mcfg.n_heads, mcfg.head_dim)
                }
                ProjKind::K if mcfg.rope_style == RopeStyle::Interleaved => {
                    hf_rows_to_interleaved(&b.1, rank, mcfg.n_kv_heads, mcfg.head_dim)
                }
                _ => b.1,
            };
            max_rank = max_rank.max(rank);
            modules.push(PeftModule { layer, kind, a: a.1, b: b_rows, rank, scale });
        }
    }
    if let Some(((module, _), _)) = factors.into_iter().next() {
        return Err(bad(format!("{module}: not a projection of this {}-layer model", mcfg.n_layers)));
    }
    if modules.is_empty() {
        return Err(bad("the adapter has no LoRA weights".into()));
    }
    let content_hash = files.content_hash();
    Ok(PeftFile { modules, rank: max_rank, profile, base_model: cfg.base_model_name_or_path, content_hash })
}

/// PEFT adapters are trained against HF checkpoints, whose q/k rows are laid out for "rotate
/// half" RoPE. llama.cpp's converter permutes those rows so RoPE can rotate adjacent pairs; a
/// GGUF base therefore needs the same permutation applied to `lora_B`'s rows, or the delta
/// would land on the wrong rotary dimensions. Within each head, HF row `s·d/2 + j` (s ∈ {0,1})
/// becomes row `2j + s`.
fn hf_rows_to_interleaved(b: &[f32], rank: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; b.len()];
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let (dst, src) = (h * head_dim + 2 * j + s, h * head_dim + s * half + j);
                out[dst * rank..(dst + 1) * rank].copy_from_slice(&b[src * rank..(src + 1) * rank]);
            }
        }
    }
    out
}

/// The inverse of `hf_rows_to_interleaved`: `lora_B` rows trained against a GGUF base back
/// into the HF layout that PEFT files use (row `2j + s` of a head becomes `s·d/2 + j`).
pub fn interleaved_rows_to_hf(b: &[f32], rank: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; b.len()];
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let (hf, gguf) = (h * head_dim + s * half + j, h * head_dim + 2 * j + s);
                out[hf * rank..(hf + 1) * rank].copy_from_slice(&b[gguf * rank..(gguf + 1) * rank]);
            }
        }
    }
    out
}

fn check_config(cfg: &PeftConfig) -> Result<(), AdapterError> {
    let bad = |m: &str| Err(AdapterError::Unsupported(m.to_string()));
    if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return bad("only LoRA adapters are supported (peft_type must be LORA)");
    }
    if cfg.use_dora {
        return bad("DoRA (use_dora) is not supported");
    }
    if cfg.fan_in_fan_out {
        return bad("fan_in_fan_out (Conv1D-style weights) is not supported");
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return bad("modules_to_save is not supported: lethe applies LoRA deltas only, it does not replace modules");
    }
    if cfg.bias.as_deref().is_some_and(|b| b != "none") {
        return bad("LoRA biases (bias != \"none\") are not supported");
    }
    if cfg.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return bad("layers_to_transform is not supported");
    }
    if cfg.r == 0 || !cfg.lora_alpha.is_finite() {
        return bad("r must be positive and lora_alpha finite");
    }
    if matches!(&cfg.target_modules, Some(TargetModules::List(l)) if l.iter().any(|m| m.contains("embed") || m.contains("lm_head")))
    {
        return bad("LoRA on embeddings or the output head is not supported");
    }
    Ok(())
}

/// A JSON object as its (key, value) pairs in document order (a map would lose the order that
/// decides which of several matching patterns applies).
fn in_order<'de, D, T>(d: D) -> Result<Vec<(String, T)>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Pairs<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Pairs<T> {
        type Value = Vec<(String, T)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(pair) = map.next_entry()? {
                out.push(pair);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Pairs(std::marker::PhantomData))
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A[.default].weight` → (module, is_b).
fn parse_key(key: &str) -> Result<(String, bool), AdapterError> {
    let bad = |m: String| Err(AdapterError::Unsupported(m));
    if key.contains("embed_tokens") || key.contains("lm_head") || key.contains("lora_embedding") {
        return bad(format!("{key}: LoRA on embeddings or the output head is not supported"));
    }
    if key.contains("lora_magnitude_vector") {
        return bad(format!("{key}: DoRA is not supported"));
    }
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let rest = rest.strip_suffix(".weight").ok_or_else(|| AdapterError::Invalid(format!("unexpected tensor {key}")))?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(m) = rest.strip_suffix(".lora_A") {
        return Ok((m.to_string(), false));
    }
    if let Some(m) = rest.strip_suffix(".lora_B") {
        return Ok((m.to_string(), true));
    }
    Err(AdapterError::Invalid(format!("unexpected tensor {key} (only lora_A / lora_B weights are expected)")))
}

fn to_f32(name: &str, view: &safetensors::tensor::TensorView) -> Result<Vec<f32>, AdapterError> {
    use safetensors::Dtype;
    let d = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(AdapterError::Unsupported(format!("{name}: dtype {other:?} (supported: F32, F16, BF16)")));
        }
    };
    // One NaN in a factor would turn every logit of every row using the adapter into NaN.
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(AdapterError::Invalid(format!("{name}: element {i} is {} (weights must be finite)", values[i])));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight").unwrap(),
            ("model.layers.3.self_attn.q_proj".to_string(), false)
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight").unwrap(),
            ("model.layers.0.mlp.down_proj".to_string(), true)
        );
        assert!(parse_key("base_model.model.lm_head.lora_A.weight").is_err());
        assert!(parse_key("base_model.model.model.embed_tokens.lora_embedding_A").is_err());
    }

    #[test]
    fn the_row_permutations_are_inverses() {
        let (rank, heads, d) = (3, 2, 8);
        let b: Vec<f32> = (0..heads * d * rank).map(|i| i as f32).collect();
        let there = hf_rows_to_interleaved(&b, rank, heads, d);
        assert_ne!(there, b);
        assert_eq!(interleaved_rows_to_hf(&there, rank, heads, d), b);
    }

    #[test]
    fn patterns_follow_peft() {
        assert!(pattern_matches("q_proj", "model.layers.1.self_attn.q_proj"));
        assert!(pattern_matches("layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"));
        assert!(!pattern_matches("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"));
        assert!(pattern_matches(r"layers\.[0-3]\.mlp\.up_proj", "model.layers.2.mlp.up_proj"));
        assert!(targeted(&Some(TargetModules::List(vec!["v_proj".into()])), "model.layers.2.self_attn.v_proj"));
        assert!(!targeted(&Some(TargetModules::List(vec!["v_proj".into()])), "model.layers.2.self_attn.q_proj"));
        assert!(targeted(&Some(TargetModules::Regex(r".*\.(q|v)_proj".into())), "model.layers.2.self_attn.q_proj"));
        assert!(targeted(&Some(TargetModules::Regex("all-linear".into())), "model.layers.2.mlp.gate_proj"));
    }
}
