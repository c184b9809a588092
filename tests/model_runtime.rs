//! The model runtime on tiny random models: ragged batching, KV caches, backends, loading errors.

use lethe::fixtures::{TempDir, TinySpec, write_tiny_model};
use lethe::model::{
    Backend, BatchEntry, KvCache, KvDtype, Llama, LoadOptions, ModelError, RaggedBatch, SeqId, WeightFormat,
};
use std::path::Path;

fn load(dir: &Path, backend: Backend, weights: WeightFormat) -> Llama {
    Llama::load(dir, &LoadOptions { backend, weights, ..Default::default() }).expect("load tiny model")
}

fn tiny(spec: TinySpec) -> (TempDir, std::path::PathBuf) {
    let tmp = TempDir::new("model").unwrap();
    let dir = write_tiny_model(&tmp.path().join("m"), &spec).unwrap();
    (tmp, dir)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Prompts of different lengths (token ids inside the tiny vocabulary).
fn prompts() -> Vec<Vec<u32>> {
    vec![
        (0..13).map(|i| (i * 7 + 3) % 300).collect(),
        vec![5],
        (0..40).map(|i| (i * 11 + 1) % 300).collect(),
        (0..17).map(|i| (i * 5 + 2) % 300).collect(),
    ]
}

/// Runs each prompt alone (prefill, then `steps` fixed decode tokens) and returns every step's
/// logits.
fn run_alone(m: &Llama, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    run_alone_with(m, prompt, steps, KvDtype::default())
}

fn run_alone_with(m: &Llama, prompt: &[u32], steps: usize, dtype: KvDtype) -> Vec<Vec<f32>> {
    let mut kv = m.new_kv_cache_with_dtype(1 << 30, dtype);
    let s = kv.add_sequence();
    let mut out = vec![
        m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, prompt.to_vec())]), &mut kv).unwrap().last(0).to_vec(),
    ];
    for t in 0..steps {
        let tok = decode_token(t, prompt.len());
        out.push(m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![tok])]), &mut kv).unwrap().last(0).to_vec());
    }
    out
}

fn decode_token(step: usize, salt: usize) -> u32 {
    ((step * 31 + salt * 17) % 290 + 3) as u32
}

fn check_ragged_equals_separate(m: &Llama, tol: f32) {
    let ps = prompts();
    let steps = 5;
    let alone: Vec<_> = ps.iter().map(|p| run_alone(m, p, steps)).collect();
    let mut kv = m.new_kv_cache(1 << 30);
    let ids: Vec<SeqId> = ps.iter().map(|_| kv.add_sequence()).collect();
    // Prefill all prompts in one step.
    let batch = RaggedBatch::new(ids.iter().zip(&ps).map(|(s, p)| BatchEntry::last(*s, p.clone())).collect());
    let logits = m.forward(&batch, &mut kv).unwrap();
    for (i, run) in alone.iter().enumerate() {
        let d = max_diff(logits.last(i), &run[0]);
        assert!(d <= tol, "prefill seq {i}: max diff {d}");
    }
    // Decode all sequences together.
    for t in 0..steps {
        let batch = RaggedBatch::new(
            ids.iter().zip(&ps).map(|(s, p)| BatchEntry::last(*s, vec![decode_token(t, p.len())])).collect(),
        );
        let logits = m.forward(&batch, &mut kv).unwrap();
        for (i, run) in alone.iter().enumerate() {
            let d = max_diff(logits.last(i), &run[t + 1]);
            assert!(d <= tol, "decode step {t} seq {i}: max diff {d}");
        }
    }
    // Mixed step: one sequence prefills more tokens while others decode.
    let extra = vec![7u32, 8, 9, 10, 11, 12];
    let mut batch = RaggedBatch::new(vec![BatchEntry::last(ids[0], extra.clone())]);
    batch.entries.push(BatchEntry::last(ids[1], vec![4]));
    let mixed = m.forward(&batch, &mut kv).unwrap();
    let mut kv2 = m.new_kv_cache(1 << 30);
    let s = kv2.add_sequence();
    let mut toks = ps[0].clone();
    toks.extend((0..steps).map(|t| decode_token(t, ps[0].len())));
    toks.extend(&extra);
    let full = m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, toks)]), &mut kv2).unwrap();
    let d = max_diff(mixed.last(0), full.last(0));
    assert!(d <= 1e-3, "mixed prefill+decode vs recompute: {d}");
}

#[test]
fn ragged_batch_equals_separate_native_f32() {
    let (_t, dir) = tiny(TinySpec::default());
    // Native kernels compute each row independently of its batch-mates: bit-identical.
    check_ragged_equals_separate(&load(&dir, Backend::Native, WeightFormat::Native), 0.0);
}

#[test]
fn ragged_batch_equals_separate_with_large_head_groups() {
    // 16 query heads on one kv head: batched, the heads are split into passes of 8.
    let (_t, dir) = tiny(TinySpec { hidden: 256, heads: 16, kv_heads: 1, ..Default::default() });
    check_ragged_equals_separate(&load(&dir, Backend::Native, WeightFormat::Native), 1e-5);
}

#[test]
fn ragged_batch_equals_separate_native_q8_0() {
    let (_t, dir) = tiny(TinySpec::default());
    check_ragged_equals_separate(&load(&dir, Backend::Native, WeightFormat::Q8_0), 0.0);
}

#[test]
fn ragged_batch_equals_separate_candle() {
    let (_t, dir) = tiny(TinySpec::default());
    // candle's matmul may block rows differently for different batch sizes: tight tolerance.
    check_ragged_equals_separate(&load(&dir, Backend::Candle, WeightFormat::Native), 1e-4);
}

#[test]
fn cached_decode_equals_full_recompute() {
    let (_t, dir) = tiny(TinySpec::default());
    for backend in [Backend::Native, Backend::Candle] {
        let m = load(&dir, backend, WeightFormat::Native);
        let toks: Vec<u32> = (0..30).map(|i| (i * 13 + 5) % 300).collect();
        // Incremental: 10-token prefill, then one token at a time.
        let mut kv = m.new_kv_cache(1 << 30);
        let s = kv.add_sequence();
        let mut last = m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, toks[..10].to_vec())]), &mut kv).unwrap();
        for &t in &toks[10..] {
            last = m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![t])]), &mut kv).unwrap();
        }
        // Recompute: all positions in one pass, all logits.
        let mut kv2 = m.new_kv_cache(1 << 30);
        let s2 = kv2.add_sequence();
        let all = m
            .forward(
                &RaggedBatch::new(vec![BatchEntry { all_logits: true, ..BatchEntry::last(s2, toks.clone()) }]),
                &mut kv2,
            )
            .unwrap();
        assert_eq!(all.rows[0].len(), toks.len());
        let d = max_diff(last.last(0), all.last(0));
        assert!(d <= 1e-4, "{backend:?}: cached vs recomputed {d}");
    }
}

#[test]
fn native_kernels_match_candle_reference() {
    for spec in [
        TinySpec::default(),
        TinySpec { model_type: "qwen2", ..Default::default() },
        TinySpec { tie_embeddings: true, kv_heads: 4, ..Default::default() },
        TinySpec { dtype: "BF16", ..Default::default() },
        TinySpec { dtype: "F16", ..Default::default() },
        // More query heads per kv head (16, 12) than one attention pass serves (8).
        TinySpec { hidden: 256, heads: 16, kv_heads: 1, ..Default::default() },
        TinySpec { hidden: 192, heads: 12, kv_heads: 1, ..Default::default() },
    ] {
        let (_t, dir) = tiny(spec.clone());
        let native = load(&dir, Backend::Native, WeightFormat::Native);
        let reference = load(&dir, Backend::Candle, WeightFormat::Native);
        for p in prompts() {
            let b = run_alone_with(&reference, &p, 3, KvDtype::F32);
            // f32 KV: the same math as candle up to summation order.
            for (x, y) in run_alone_with(&native, &p, 3, KvDtype::F32).iter().zip(&b) {
                let d = max_diff(x, y);
                assert!(d <= 1e-3, "{spec:?}: native vs candle {d}");
            }
            // f16 KV (the default): rounding of cached keys/values, still close.
            for (x, y) in run_alone_with(&native, &p, 3, KvDtype::F16).iter().zip(&b) {
                let d = max_diff(x, y);
                assert!(d <= 2e-2, "{spec:?}: native (f16 KV) vs candle {d}");
            }
        }
    }
}

#[test]
fn kv_memory_is_accounted_and_returned() {
    let (_t, dir) = tiny(TinySpec::default());
    for backend in [Backend::Native, Backend::Candle] {
        let m = load(&dir, backend, WeightFormat::Native);
        let mut kv = m.new_kv_cache(1 << 30);
        assert_eq!(kv.used_bytes(), 0);
        let a = kv.add_sequence();
        let b = kv.add_sequence();
        m.forward(&RaggedBatch::new(vec![BatchEntry::last(a, vec![1; 40]), BatchEntry::last(b, vec![2; 3])]), &mut kv)
            .unwrap();
        let used = kv.used_bytes();
        assert!(used >= 43 * kv.bytes_per_token(), "{backend:?}: {used}");
        kv.remove_sequence(a);
        assert!(kv.used_bytes() < used);
        kv.remove_sequence(b);
        assert_eq!(kv.used_bytes(), 0, "{backend:?}");
    }
}

#[test]
fn step_errors_leave_caches_unchanged() {
    let (_t, dir) = tiny(TinySpec { max_positions: 32, ..Default::default() });
    let m = load(&dir, Backend::Native, WeightFormat::Native);
    let mut kv: KvCache = m.new_kv_cache(1 << 30);
    let s = kv.add_sequence();
    m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![3; 30])]), &mut kv).unwrap();
    let err = m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![3; 5])]), &mut kv).unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { needed: 35, max: 32 }), "{err}");
    assert_eq!(kv.seq_len(s).unwrap(), 30);
    let err = m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![100_000])]), &mut kv).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!(kv.seq_len(s).unwrap(), 30);
    let err = m.forward(&RaggedBatch::new(vec![BatchEntry::last(SeqId(999), vec![1])]), &mut kv).unwrap_err();
    assert!(matches!(err, ModelError::UnknownSequence(_)));
    // A tiny budget refuses new work with a typed error instead of allocating.
    let mut small = m.new_kv_cache(1000);
    let s = small.add_sequence();
    let err = m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![1; 20])]), &mut small).unwrap_err();
    assert!(matches!(err, ModelError::KvCacheFull { .. }), "{err}");
}

#[test]
fn bad_model_files_give_clear_errors() {
    let tmp = TempDir::new("bad").unwrap();
    let opts = LoadOptions::default();
    let err = |p: &Path| match Llama::load(p, &opts) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    };

    let missing = err(&tmp.path().join("nope.gguf"));
    assert!(missing.contains("not found"), "{missing}");

    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let e = err(&junk);
    assert!(e.contains("GGUF magic"), "{e}");

    // GGUF magic, then garbage: a huge tensor count and truncated header.
    let corrupt = tmp.path().join("corrupt.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(7u64.to_le_bytes());
    std::fs::write(&corrupt, &bytes).unwrap();
    let e = err(&corrupt);
    assert!(e.contains("corrupt"), "{e}");

    let pickle = tmp.path().join("model.bin");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let e = err(&pickle);
    assert!(e.contains("pickle"), "{e}");

    // A valid tiny model, then broken in several ways.
    let dir = write_tiny_model(&tmp.path().join("m"), &TinySpec::default()).unwrap();
    let st = dir.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, &full[..full.len() - 100]).unwrap();
    let e = err(&dir);
    assert!(e.contains("corrupt or truncated"), "{e}");
    std::fs::write(&st, &full).unwrap();

    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
    let e = err(&dir);
    assert!(e.contains("unsupported architecture") && e.contains("gpt_neox"), "{e}");
    std::fs::write(&cfg_path, cfg.replace("\"hidden_size\": 64", "\"hidden_size\": 96")).unwrap();
    let e = err(&dir);
    assert!(e.contains("shape"), "{e}");
    let mut zero: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    zero["intermediate_size"] = serde_json::json!(0);
    std::fs::write(&cfg_path, zero.to_string()).unwrap();
    let e = err(&dir);
    assert!(e.contains("intermediate size") && e.contains("non-zero"), "{e}");
    std::fs::write(&cfg_path, "{not json").unwrap();
    let e = err(&dir);
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(&cfg_path, &cfg).unwrap();

    // An integer tensor where a float is expected.
    let int_dir = tmp.path().join("int");
    std::fs::create_dir_all(&int_dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), int_dir.join(f)).unwrap();
    }
    let data = vec![0u8; 64 * 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![64], &data).unwrap();
    safetensors::serialize_to_file(vec![("model.norm.weight", view)], None, &int_dir.join("model.safetensors"))
        .unwrap();
    let e = err(&int_dir);
    assert!(e.contains("missing tensor") || e.contains("unsupported data type"), "{e}");
}

#[test]
fn unsupported_dtype_is_named() {
    let tmp = TempDir::new("dtype").unwrap();
    let dir = write_tiny_model(&tmp.path().join("m"), &TinySpec::default()).unwrap();
    // Rewrite the file with the embedding stored as I64.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = vec![0u8; 8 * st.tensor("model.embed_tokens.weight").unwrap().shape().iter().product::<usize>()];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (name, v) in st.tensors() {
        if name == "model.embed_tokens.weight" {
            views.push((
                name,
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, v.shape().to_vec(), &ints).unwrap(),
            ));
        } else {
            views.push((name, v));
        }
    }
    safetensors::serialize_to_file(views, None, &dir.join("model2.safetensors")).unwrap();
    std::fs::rename(dir.join("model2.safetensors"), dir.join("model.safetensors")).unwrap();
    let e = Llama::load(&dir, &LoadOptions::default()).err().expect("I64 must be refused").to_string();
    assert!(e.contains("I64") && e.contains("model.embed_tokens.weight"), "{e}");
}

/// Rewrites a GGUF file with edited metadata (same tensors).
fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>),
) {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut md = content.metadata.clone();
    edit(&mut md);
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> =
        names.iter().map(|n| (n.clone(), content.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap())).collect();
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md_refs, &t_refs).unwrap();
}

/// GGUF hyper-parameters of another numeric type are converted, of a non-numeric type or an
/// absurd size are errors (never a silent default, never an allocation failure).
#[test]
fn gguf_metadata_is_read_strictly() {
    use candle_core::quantized::gguf_file::Value;
    let tmp = TempDir::new("gguf-md").unwrap();
    let spec = TinySpec::default();
    let hf = write_tiny_model(&tmp.path().join("hf"), &spec).unwrap();
    let gguf = lethe::fixtures::write_tiny_gguf(
        &hf,
        &tmp.path().join("tiny.gguf"),
        &spec,
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let variant = |name: &str, key: &str, v: Option<Value>| {
        let out = tmp.path().join(name);
        rewrite_gguf(&gguf, &out, |md| match v {
            Some(v) => {
                md.insert(key.to_string(), v);
            }
            None => {
                md.remove(key);
            }
        });
        Llama::load(&out, &LoadOptions::default())
    };
    let m = variant("f64-theta.gguf", "llama.rope.freq_base", Some(Value::F64(100_000.0))).unwrap();
    assert_eq!(m.config().rope_theta, 100_000.0);
    let e = variant("str-theta.gguf", "llama.rope.freq_base", Some(Value::String("1e4".into()))).err().unwrap();
    assert!(e.to_string().contains("llama.rope.freq_base is not a number"), "{e}");
    let e = variant("deep.gguf", "llama.block_count", Some(Value::U64(1 << 40))).err().unwrap();
    assert!(e.to_string().contains("layers 1099511627776 is beyond"), "{e}");
    let e = variant("str-ctx.gguf", "llama.context_length", Some(Value::String("x".into()))).err().unwrap();
    assert!(e.to_string().contains("llama.context_length is not a non-negative integer"), "{e}");
    // Without vocab_size, the embedding's first dimension.
    let want = Llama::load(&gguf, &LoadOptions::default()).unwrap().config().vocab_size;
    let m = variant("no-vocab.gguf", "llama.vocab_size", None).unwrap();
    assert_eq!(m.config().vocab_size, want);
}

/// `bench decode --stages`: every decode step of each batch size is accounted, stage by stage,
/// on its own (1- and 2-row steps are not mixed), and only while the accounting is on.
#[test]
fn decode_steps_are_accounted_by_stage() {
    use lethe::model::stages::{self, Stage};
    let (_tmp, dir) = tiny(TinySpec::default());
    let m = load(&dir, Backend::Native, WeightFormat::Native);
    let gen_tokens = 16;
    let off = lethe::bench::decode(&m, &[1, 2], 8, gen_tokens, KvDtype::F16).unwrap();
    assert!(off.iter().all(|r| r.stages.is_none()), "accounting is off by default");
    stages::enable(true);
    let on = lethe::bench::decode(&m, &[1, 2], 8, gen_tokens, KvDtype::F16);
    stages::enable(false);
    for (r, rows) in on.unwrap().iter().zip([1, 2]) {
        let s = r.stages.as_ref().expect("accounted");
        assert_eq!((s.rows, s.steps), (rows, gen_tokens as u64), "{s:?}");
        for (stage, us) in &s.us_per_step {
            assert!(*us > 0.0, "{} took no time: {s:?}", stage.name());
        }
        assert_eq!(s.us_per_step.iter().map(|(st, _)| *st).collect::<Vec<_>>(), Stage::ALL);
    }
}

/// `lethe bench decode --random-model`: the shape is written as a Q4_1 GGUF, loaded through the
/// real GGUF path, benchmarked at every batch size, and its temporary directory removed after.
#[test]
fn bench_decode_runs_a_random_model_and_cleans_up() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["bench", "decode", "--random-model", "135m", "--batch", "1,2"])
        .args(["--prompt-tokens", "16", "--gen-tokens", "4", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    for r in runs {
        assert_eq!(r["weights"], "native/q4_1", "{r}");
        assert!(r["step_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    // "writing a random 135m model (Q4_1) under DIR ..."
    let dir = stderr.lines().find_map(|l| l.split(" under ").nth(1)).unwrap().trim_end_matches(" ...");
    assert!(dir.contains("bench-random-model"), "{stderr}");
    assert!(!Path::new(dir).exists(), "{dir} was left behind");
}
