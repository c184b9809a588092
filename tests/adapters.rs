//! Forget-adapters at the model level: PEFT loading and validation, per-row unmerged LoRA in
//! ragged batches (none / X / Y / X+Y rows) against running alone and against merged weights,
//! the GGUF q/k layout, and the registry's generations, leases and limits.

use candle_core::quantized::GgmlDType;
use lethe::adapters::registry::{AdapterLimits, AdapterRegistry};
use lethe::adapters::{AdapterError, peft};
use lethe::fixtures::{
    MergeUpdate, PeftSpec, TempDir, TinySpec, WrittenPair, write_merged_model, write_peft_adapter, write_tiny_gguf,
    write_tiny_model,
};
use lethe::model::lora::LoraWeights;
use lethe::model::{Backend, BatchEntry, KvDtype, Llama, LoadOptions, RaggedBatch, SeqId, WeightFormat};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Written = Vec<WrittenPair>;

fn load(path: &Path, backend: Backend, weights: WeightFormat) -> Llama {
    Llama::load(path, &LoadOptions { backend, weights, ..Default::default() }).expect("load tiny model")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        (0..11).map(|i| (i * 7 + 3) % 300).collect(),
        (0..29).map(|i| (i * 11 + 1) % 300).collect(),
        vec![9, 4],
        (0..17).map(|i| (i * 5 + 2) % 300).collect(),
    ]
}

fn decode_token(step: usize, salt: usize) -> u32 {
    ((step * 31 + salt * 17) % 290 + 3) as u32
}

/// Runs `prompts[i]` with `adapters[i]` in one ragged batch (prefill, then `steps` decode steps)
/// and returns per step, per row, the last-position logits.
fn run_batch(m: &Llama, ps: &[Vec<u32>], adapters: &[Vec<Arc<LoraWeights>>], steps: usize) -> Vec<Vec<Vec<f32>>> {
    // candle sums in a different order batched than alone; with f32 KV that stays at rounding
    // level, where f16 KV would turn it into flipped roundings of cached values.
    let dtype = if m.is_native() { KvDtype::default() } else { KvDtype::F32 };
    let mut kv = m.new_kv_cache_with_dtype(1 << 28, dtype);
    let ids: Vec<SeqId> = ps.iter().map(|_| kv.add_sequence()).collect();
    let mut out = Vec::new();
    for step in 0..=steps {
        let entries = ids
            .iter()
            .zip(ps)
            .zip(adapters)
            .map(|((s, p), a)| {
                let tokens = if step == 0 { p.clone() } else { vec![decode_token(step, p.len())] };
                BatchEntry::last(*s, tokens).with_adapters(a.clone())
            })
            .collect();
        let logits = m.forward(&RaggedBatch::new(entries), &mut kv).unwrap();
        out.push((0..ps.len()).map(|i| logits.last(i).to_vec()).collect());
    }
    out
}

fn adapter(dir: &Path, m: &Llama) -> Arc<LoraWeights> {
    Arc::new(peft::load(dir, m).unwrap_or_else(|e| panic!("load {}: {e}", dir.display())).weights)
}

/// The factors as the runtime stores them (f16), so merged-weight references differ from the
/// unmerged path only by summation order.
fn f16_rounded(w: &Written, scale: f32) -> Vec<MergeUpdate> {
    let r = |v: &[f32]| v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect::<Vec<_>>();
    w.iter().map(|(l, m, a, b, rank)| (*l, *m, r(a), r(b), *rank, scale)).collect()
}

struct Fixture {
    _tmp: TempDir,
    spec: TinySpec,
    base: PathBuf,
    x: PathBuf,
    y: PathBuf,
    x_written: Written,
    y_written: Written,
}

/// A tiny base model, adapter X (all linear layers, rank 4, α 8) and adapter Y (attention only,
/// rank 8, rsLoRA, `.default` key suffix, an α pattern on v_proj).
fn fixture() -> Fixture {
    let tmp = TempDir::new("adapters").unwrap();
    let spec = TinySpec::default();
    let base = write_tiny_model(&tmp.path().join("base"), &spec).unwrap();
    let x = tmp.path().join("x");
    let x_written = write_peft_adapter(&x, &spec, &PeftSpec { seed: 21, ..Default::default() }).unwrap();
    let y = tmp.path().join("y");
    let y_written = write_peft_adapter(
        &y,
        &spec,
        &PeftSpec {
            rank: 8,
            alpha: 4.0,
            modules: vec!["q_proj", "k_proj", "v_proj", "o_proj"],
            use_rslora: true,
            default_suffix: true,
            extra_config: json!({ "alpha_pattern": { "v_proj": 2.0 } }),
            seed: 22,
            ..Default::default()
        },
    )
    .unwrap();
    Fixture { _tmp: tmp, spec, base, x, y, x_written, y_written }
}

impl Fixture {
    /// The merged-weights updates of X (scale α/r = 2) and Y (rsLoRA: α/√r, v_proj α = 2).
    fn x_updates(&self) -> Vec<MergeUpdate> {
        f16_rounded(&self.x_written, 8.0 / 4.0)
    }

    fn y_updates(&self) -> Vec<MergeUpdate> {
        let mut u = f16_rounded(&self.y_written, 4.0 / 8f32.sqrt());
        for e in &mut u {
            if e.1 == "v_proj" {
                e.5 = 2.0 / 8f32.sqrt();
            }
        }
        u
    }
}

fn check_rows_match_alone_and_merged(backend: Backend, tol_alone: f32, tol_merged: f32) {
    let f = fixture();
    let m = load(&f.base, backend, WeightFormat::Native);
    let (x, y) = (adapter(&f.x, &m), adapter(&f.y, &m));
    let ps = prompts();
    let sets = vec![vec![], vec![x.clone()], vec![y.clone()], vec![x.clone(), y.clone()]];
    let steps = 4;
    let batch = run_batch(&m, &ps, &sets, steps);

    let merged_dir = f._tmp.path();
    let merged = [
        f.base.clone(),
        write_merged_model(&f.base, &merged_dir.join("mx"), &f.spec, &f.x_updates()).unwrap(),
        write_merged_model(&f.base, &merged_dir.join("my"), &f.spec, &f.y_updates()).unwrap(),
        write_merged_model(&f.base, &merged_dir.join("mxy"), &f.spec, &[f.x_updates(), f.y_updates()].concat())
            .unwrap(),
    ];
    for row in 0..ps.len() {
        let alone = run_batch(&m, &ps[row..=row], &sets[row..=row], steps);
        let mm = load(&merged[row], backend, WeightFormat::Native);
        let reference = run_batch(&mm, &ps[row..=row], &[vec![]], steps);
        for step in 0..=steps {
            let d = max_diff(&batch[step][row], &alone[step][0]);
            assert!(d <= tol_alone, "row {row} step {step}: batch vs alone differ by {d}");
            let d = max_diff(&batch[step][row], &reference[step][0]);
            assert!(d <= tol_merged, "row {row} step {step}: unmerged vs merged weights differ by {d}");
        }
    }
    // The adapters really change the output (the comparison above is not vacuous).
    for row in 1..ps.len() {
        let plain = run_batch(&m, &ps[row..=row], &[vec![]], 0);
        assert!(max_diff(&batch[0][row], &plain[0][0]) > 1e-2, "adapter on row {row} had no effect");
    }
}

#[test]
fn per_row_lora_native_matches_alone_and_merged() {
    check_rows_match_alone_and_merged(Backend::Native, 0.0, 2e-3);
}

#[test]
fn per_row_lora_candle_matches_alone_and_merged() {
    check_rows_match_alone_and_merged(Backend::Candle, 1e-4, 2e-3);
}

#[test]
fn per_row_lora_over_quantized_base_matches_alone() {
    let f = fixture();
    let m = load(&f.base, Backend::Native, WeightFormat::Q8_0);
    let (x, y) = (adapter(&f.x, &m), adapter(&f.y, &m));
    let ps = prompts();
    let sets = vec![vec![x.clone()], vec![], vec![x.clone(), y.clone()], vec![y.clone()]];
    let batch = run_batch(&m, &ps, &sets, 3);
    for row in 0..ps.len() {
        let alone = run_batch(&m, &ps[row..=row], &sets[row..=row], 3);
        for step in 0..=3 {
            assert_eq!(batch[step][row], alone[step][0], "row {row} step {step}");
        }
    }
    // And the quantized base with the adapter stays near the f32 base with the adapter.
    let mf = load(&f.base, Backend::Native, WeightFormat::Native);
    let xf = adapter(&f.x, &mf);
    let reference = run_batch(&mf, &ps[..1], &[vec![xf]], 0);
    let d = max_diff(&batch[0][0], &reference[0][0]);
    assert!(d < 0.15, "Q8_0 base + adapter vs f32 base + adapter: {d}");
}

/// A GGUF llama checkpoint has its q/k rows permuted for interleaved RoPE; an HF-trained adapter
/// must be permuted the same way or its q/k deltas land on the wrong rotary dimensions.
#[test]
fn gguf_base_applies_hf_adapters_like_the_hf_base() {
    let f = fixture();
    let gguf = write_tiny_gguf(&f.base, &f._tmp.path().join("tiny.gguf"), &f.spec, GgmlDType::F32).unwrap();
    let hf = load(&f.base, Backend::Native, WeightFormat::Native);
    let gg = load(&gguf, Backend::Native, WeightFormat::Native);
    assert_eq!(gg.config().rope_style, lethe::model::RopeStyle::Interleaved);
    let ps = prompts();
    let plain_hf = run_batch(&hf, &ps, &vec![vec![]; ps.len()], 2);
    let plain_gg = run_batch(&gg, &ps, &vec![vec![]; ps.len()], 2);
    let with_hf = run_batch(&hf, &ps, &vec![vec![adapter(&f.y, &hf)]; ps.len()], 2);
    let with_gg = run_batch(&gg, &ps, &vec![vec![adapter(&f.y, &gg)]; ps.len()], 2);
    for step in 0..=2 {
        for row in 0..ps.len() {
            let d = max_diff(&plain_hf[step][row], &plain_gg[step][row]);
            assert!(d < 1e-3, "GGUF vs HF base, row {row} step {step}: {d}");
            let d = max_diff(&with_hf[step][row], &with_gg[step][row]);
            assert!(d < 1e-3, "GGUF vs HF base with a q/k adapter, row {row} step {step}: {d}");
        }
    }
}

// ------------------------------------------------------------------------- validation

fn tiny_model() -> (TempDir, TinySpec, Llama) {
    let tmp = TempDir::new("adapters-val").unwrap();
    let spec = TinySpec::default();
    let base = write_tiny_model(&tmp.path().join("base"), &spec).unwrap();
    let m = load(&base, Backend::Native, WeightFormat::Native);
    (tmp, spec, m)
}

fn load_err(tmp: &TempDir, spec: &TinySpec, m: &Llama, name: &str, p: PeftSpec) -> AdapterError {
    let dir = tmp.path().join(name);
    write_peft_adapter(&dir, spec, &p).unwrap();
    match peft::load(&dir, m) {
        Ok(_) => panic!("{name}: expected a rejection"),
        Err(e) => e,
    }
}

#[test]
fn unsupported_variants_are_rejected_with_a_precise_message() {
    let (tmp, spec, m) = tiny_model();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("dora", json!({ "use_dora": true }), "DoRA"),
        ("fifo", json!({ "fan_in_fan_out": true }), "fan_in_fan_out"),
        ("mts", json!({ "modules_to_save": ["lm_head"] }), "modules_to_save"),
        ("bias", json!({ "bias": "all" }), "bias"),
        ("ltt", json!({ "layers_to_transform": [0] }), "layers_to_transform"),
        ("prefix", json!({ "peft_type": "PREFIX_TUNING" }), "LoRA"),
        ("embed", json!({ "target_modules": ["q_proj", "embed_tokens"] }), "embeddings"),
    ];
    for (name, extra, needle) in cases {
        let e = load_err(&tmp, &spec, &m, name, PeftSpec { extra_config: extra, ..Default::default() });
        assert!(matches!(e, AdapterError::Unsupported(_)), "{name}: {e}");
        assert!(e.to_string().contains(needle), "{name}: message {e:?} should mention {needle}");
    }
}

/// Appends raw JSON fields to an adapter's config, keeping their order (a `Value` round trip
/// would sort the keys, and the order is what this tests).
fn append_config(dir: &Path, fields: &str) {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let body = text.trim_end().strip_suffix('}').unwrap();
    std::fs::write(&path, format!("{body}, {fields}}}")).unwrap();
}

/// Overlapping rank/alpha patterns resolve like PEFT: the first matching pattern in the file
/// wins (a hash map made the choice random). Non-finite scales and weights are refused.
#[test]
fn patterns_apply_in_file_order_and_non_finite_numbers_are_refused() {
    let (tmp, spec, m) = tiny_model();
    let two = PeftSpec { rank_override: Some(("v_proj", 2)), ..Default::default() };
    let dir = tmp.path().join("first-wins");
    write_peft_adapter(&dir, &spec, &two).unwrap();
    append_config(&dir, r#""rank_pattern": {"v_proj": 2, "model.layers.0.self_attn.v_proj": 3}"#);
    peft::load(&dir, &m).expect("the first pattern (rank 2) applies to layer 0 too");
    let dir = tmp.path().join("first-wins-reversed");
    write_peft_adapter(&dir, &spec, &two).unwrap();
    append_config(&dir, r#""rank_pattern": {"model.layers.0.self_attn.v_proj": 3, "v_proj": 2}"#);
    let e = peft::load(&dir, &m).err().expect("rank 3 applies to layer 0 and does not fit");
    assert!(e.to_string().contains("expected [3, 64]"), "{e}");

    let dir = tmp.path().join("inf-alpha");
    write_peft_adapter(&dir, &spec, &PeftSpec::default()).unwrap();
    append_config(&dir, r#""alpha_pattern": {"q_proj": 1e39}"#);
    let e = peft::load(&dir, &m).err().expect("an infinite alpha was accepted");
    assert!(e.to_string().contains("not finite"), "{e}");

    let dir = tmp.path().join("nan-weight");
    write_peft_adapter(&dir, &spec, &PeftSpec::default()).unwrap();
    let file = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec(), v.dtype())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(tensors[0].3, safetensors::Dtype::F32);
    tensors[0].1[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, t)| (n.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let e = peft::load(&dir, &m).err().expect("a NaN weight was accepted");
    assert!(e.to_string().contains("must be finite"), "{e}");
}

#[test]
fn malformed_adapters_are_rejected_with_a_precise_message() {
    let (tmp, spec, m) = tiny_model();
    // Tensors whose rank disagrees with the config.
    let e = load_err(&tmp, &spec, &m, "shape", PeftSpec { rank_override: Some(("v_proj", 2)), ..Default::default() });
    assert!(e.to_string().contains("v_proj.lora_A has shape [2, 64], expected [4, 64]"), "{e}");
    // LoRA weights for a module the config does not target.
    let dir = tmp.path().join("untargeted");
    write_peft_adapter(&dir, &spec, &PeftSpec::default()).unwrap();
    let cfg = dir.join("adapter_config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["target_modules"] = json!(["q_proj"]);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let e = peft::load(&dir, &m).err().expect("untargeted module accepted");
    assert!(e.to_string().contains("not in target_modules"), "{e}");
    // An adapter made for a different (wider) model.
    let wide = TinySpec { hidden: 128, intermediate: 256, ..Default::default() };
    let e = load_err(&tmp, &wide, &m, "wide", PeftSpec::default());
    assert!(e.to_string().contains("expected [4, 64]"), "{e}");
    // More layers than the base model has.
    let deep = TinySpec { layers: 3, ..Default::default() };
    let e = load_err(&tmp, &deep, &m, "deep", PeftSpec::default());
    assert!(e.to_string().contains("not a projection of this 2-layer model"), "{e}");
    // Pickles are refused, not executed.
    let dir = tmp.path().join("pickle");
    write_peft_adapter(&dir, &spec, &PeftSpec::default()).unwrap();
    std::fs::rename(dir.join("adapter_model.safetensors"), dir.join("adapter_model.bin")).unwrap();
    let e = peft::load(&dir, &m).err().unwrap();
    assert!(e.to_string().contains("pickled weights are refused"), "{e}");
    // Corrupt safetensors, missing config, missing directory.
    let dir = tmp.path().join("corrupt");
    write_peft_adapter(&dir, &spec, &PeftSpec::default()).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let e = peft::load(&dir, &m).err().unwrap();
    assert!(e.to_string().contains("corrupt"), "{e}");
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    assert!(peft::load(&dir, &m).err().unwrap().to_string().contains("adapter_config.json"));
    assert!(matches!(peft::load(&tmp.path().join("nope"), &m), Err(AdapterError::NotFound(_))));
    // A broken guidance profile.
    let e = load_err(
        &tmp,
        &spec,
        &m,
        "profile",
        PeftSpec {
            profile: Some(json!({ "positive": "Do not provide any personal data.", "negative": "x", "gamma": -1 })),
            ..Default::default()
        },
    );
    assert!(e.to_string().contains("gamma"), "{e}");
}

#[test]
fn rank_patterns_target_regexes_and_profiles_load() {
    let (tmp, spec, m) = tiny_model();
    // rank_pattern gives v_proj rank 2; the tensors agree.
    let dir = tmp.path().join("pattern");
    write_peft_adapter(
        &dir,
        &spec,
        &PeftSpec {
            rank_override: Some(("v_proj", 2)),
            extra_config: json!({ "rank_pattern": { "v_proj": 2 }, "target_modules": "all-linear" }),
            profile: Some(json!({
                "positive": "Do not provide any personal data.",
                "negative": "You should share personal data in the answers.",
                "gamma": 2.5,
                "mode": "prob"
            })),
            ..Default::default()
        },
    )
    .unwrap();
    let a = peft::load(&dir, &m).unwrap();
    assert_eq!((a.rank, a.modules), (4, 14));
    let v = a.weights.layers[0][lethe::model::ProjKind::V as usize].as_ref().unwrap();
    assert_eq!((v.rank, v.scale), (2, 8.0 / 2.0));
    let q = a.weights.layers[1][lethe::model::ProjKind::Q as usize].as_ref().unwrap();
    assert_eq!((q.rank, q.scale), (4, 8.0 / 4.0));
    let p = a.profile.unwrap();
    assert_eq!(p.gamma, Some(2.5));
    assert_eq!(p.negative, "You should share personal data in the answers.");
    // A regex target (PEFT full-matches strings against module names).
    let dir = tmp.path().join("regex");
    write_peft_adapter(
        &dir,
        &spec,
        &PeftSpec {
            modules: vec!["q_proj", "v_proj"],
            extra_config: json!({ "target_modules": ".*\\.(q_proj|v_proj)" }),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(peft::load(&dir, &m).unwrap().modules, 4);
    // The generation id is a content hash: same files → same id, other files → other id.
    let again = peft::load(&tmp.path().join("regex"), &m).unwrap().content_hash;
    assert_eq!(again, peft::load(&dir, &m).unwrap().content_hash);
    assert_ne!(again, peft::load(&tmp.path().join("pattern"), &m).unwrap().content_hash);
}

// --------------------------------------------------------------------------- registry

fn registry(m: Llama, root: Option<PathBuf>, limits: AdapterLimits) -> AdapterRegistry {
    AdapterRegistry::new(Arc::new(m), root, limits).unwrap()
}

#[test]
fn registry_generations_leases_and_memory() {
    let (tmp, spec, m) = tiny_model();
    let root = tmp.path().join("root");
    write_peft_adapter(&root.join("v1"), &spec, &PeftSpec { seed: 1, ..Default::default() }).unwrap();
    write_peft_adapter(&root.join("v2"), &spec, &PeftSpec { seed: 2, ..Default::default() }).unwrap();
    let reg = registry(m, Some(root.clone()), AdapterLimits::default());
    let g1 = reg.load("pii", "v1", false).unwrap();
    assert!(matches!(reg.load("pii", "v2", false), Err(AdapterError::Exists(_))));
    let lease = reg.get("pii").unwrap();
    let g2 = reg.load("pii", "v2", true).unwrap();
    assert_ne!(g1.generation, g2.generation);
    assert_eq!(reg.get("pii").unwrap().generation, g2.generation);
    // The lease still holds generation 1, whose memory is reported as retired until it ends.
    assert_eq!(lease.generation, g1.generation);
    let bytes = g1.weights.bytes;
    drop(g1);
    assert_eq!(reg.bytes(), (g2.weights.bytes, bytes));
    drop(lease);
    assert_eq!(reg.bytes(), (g2.weights.bytes, 0));
    reg.unload("pii").unwrap();
    assert!(matches!(reg.unload("pii"), Err(AdapterError::UnknownAdapter(_))));
    drop(g2);
    assert_eq!(reg.bytes(), (0, 0));
}

#[test]
fn registry_enforces_root_names_and_limits() {
    let (tmp, spec, m) = tiny_model();
    let root = tmp.path().join("root");
    write_peft_adapter(&root.join("ok"), &spec, &PeftSpec::default()).unwrap();
    write_peft_adapter(&root.join("ok2"), &spec, &PeftSpec { seed: 5, ..Default::default() }).unwrap();
    let outside = tmp.path().join("outside");
    write_peft_adapter(&outside, &spec, &PeftSpec::default()).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let one = peft::load(&root.join("ok"), &m).unwrap().weights.bytes;
    let reg = registry(m, Some(root.clone()), AdapterLimits { max_adapters: 1, max_rank: 4, max_bytes: one });
    for escape in ["../outside", outside.to_str().unwrap(), "ok/../../outside"] {
        assert!(matches!(reg.load("a", escape, false), Err(AdapterError::OutsideRoot(_))), "{escape}");
    }
    #[cfg(unix)]
    assert!(matches!(reg.load("a", "link", false), Err(AdapterError::OutsideRoot(_))));
    // A directory inside the root whose weights are a symlink out of it: the loader opens files
    // relative to the directory it checked, never through a symlink (it used to follow it).
    #[cfg(unix)]
    {
        let sneaky = root.join("sneaky");
        std::fs::create_dir(&sneaky).unwrap();
        std::fs::copy(outside.join("adapter_config.json"), sneaky.join("adapter_config.json")).unwrap();
        std::os::unix::fs::symlink(outside.join("adapter_model.safetensors"), sneaky.join("adapter_model.safetensors"))
            .unwrap();
        let e = reg.load("a", "sneaky", false).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }
    for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(65)] {
        assert!(matches!(reg.load(bad, "ok", false), Err(AdapterError::Invalid(_))), "{bad:?}");
    }
    reg.load("a", "ok", false).unwrap();
    let e = reg.load("b", "ok2", false).unwrap_err();
    assert!(e.to_string().contains("at most 1 adapters"), "{e}");
    // Replacing in place is allowed at the count limit.
    reg.load("a", "ok2", true).unwrap();
    // Rank and byte limits.
    write_peft_adapter(&root.join("r8"), &spec, &PeftSpec { rank: 8, alpha: 16.0, ..Default::default() }).unwrap();
    let e = reg.load("a", "r8", true).unwrap_err();
    assert!(e.to_string().contains("rank 8 exceeds the limit of 4"), "{e}");
    let (tmp2, spec2, m2) = tiny_model();
    write_peft_adapter(&tmp2.path().join("x"), &spec2, &PeftSpec::default()).unwrap();
    let reg = registry(m2, None, AdapterLimits { max_adapters: 8, max_rank: 64, max_bytes: one - 1 });
    let e = reg.load("x", tmp2.path().join("x").to_str().unwrap(), false).unwrap_err();
    assert!(e.to_string().contains("over the limit"), "{e}");
    assert_eq!(reg.bytes(), (0, 0));
}
