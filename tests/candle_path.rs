//! The batched candle path (the one a GPU runs), checked on the CPU against the native kernels:
//! ragged batches mixing guided pairs, rows without adapter, with X, with Y and with X+Y, in
//! prefill, decode and mixed steps; guidance and sampling on the device against the host's;
//! half-precision weights; the paged tensor KV store growing and reusing blocks.
//!
//! Tolerances (f32 weights and KV, logits O(1) on these tiny models): rows without adapter agree
//! to summation order, 1e-4 (measured ~1e-6); rows with adapters to 2e-3 (measured ~1.4e-3),
//! because the native kernels keep LoRA factors in f16 and the candle path in f32, as for
//! unmerged vs merged adapters in `tests/adapters.rs`.

use lethe::adapters::peft;
use lethe::device_sampling::{Choice, choose_tokens};
use lethe::fixtures::{PeftSpec, TempDir, TinySpec, write_peft_adapter, write_tiny_model};
use lethe::guidance::{Guidance, GuidanceMode, sample_guided};
use lethe::model::lora::LoraWeights;
use lethe::model::{Backend, BatchEntry, KvDtype, Llama, LoadOptions, RaggedBatch, SeqId, WeightFormat};
use lethe::sampling::{Rng, SamplingParams, sample_logits};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn load(path: &Path, backend: Backend, weights: WeightFormat) -> Llama {
    Llama::load(path, &LoadOptions { backend, weights, ..Default::default() }).expect("load tiny model")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

struct Fixture {
    _tmp: TempDir,
    base: PathBuf,
    x: PathBuf,
    y: PathBuf,
}

/// A tiny base, adapter X (every projection, rank 4) and Y (attention only, rank 8, rsLoRA).
fn fixture() -> Fixture {
    let tmp = TempDir::new("candle-path").unwrap();
    let spec = TinySpec::default();
    let base = write_tiny_model(&tmp.path().join("base"), &spec).unwrap();
    let x = tmp.path().join("x");
    write_peft_adapter(&x, &spec, &PeftSpec { seed: 31, ..Default::default() }).unwrap();
    let y = tmp.path().join("y");
    let y_spec = PeftSpec {
        rank: 8,
        alpha: 4.0,
        modules: vec!["q_proj", "k_proj", "v_proj", "o_proj"],
        use_rslora: true,
        seed: 32,
        ..Default::default()
    };
    write_peft_adapter(&y, &spec, &y_spec).unwrap();
    Fixture { _tmp: tmp, base, x, y }
}

fn adapter(dir: &Path, m: &Llama) -> Arc<LoraWeights> {
    Arc::new(peft::load(dir, m).unwrap().weights)
}

/// One row of the scenario: its prompt and adapters (by name), and the pair it belongs to.
struct RowSpec {
    prompt: Vec<u32>,
    adapters: &'static str,
}

/// Guided pair A (X on both rows), a plain row, a row with Y, a row with X+Y, guided pair B
/// (no adapter); prompts of different lengths.
fn scenario() -> Vec<RowSpec> {
    let p = |n: usize, salt: usize| (0..n).map(|i| ((i * 7 + salt * 13) % 290 + 3) as u32).collect::<Vec<u32>>();
    vec![
        RowSpec { prompt: p(23, 1), adapters: "x" },
        RowSpec { prompt: p(9, 2), adapters: "x" },
        RowSpec { prompt: p(1, 3), adapters: "" },
        RowSpec { prompt: p(31, 4), adapters: "y" },
        RowSpec { prompt: p(14, 5), adapters: "xy" },
        RowSpec { prompt: p(17, 6), adapters: "" },
        RowSpec { prompt: p(5, 7), adapters: "" },
    ]
}

/// Per step, per row: last-position logits. Steps: one ragged prefill of every row, three
/// decode steps, then a mixed step (rows 1 and 4 prefill 6 more tokens while the others decode).
fn run(m: &Llama, f: &Fixture) -> Vec<Vec<Vec<f32>>> {
    let (x, y) = (adapter(&f.x, m), adapter(&f.y, m));
    let rows = scenario();
    let sets: Vec<Vec<Arc<LoraWeights>>> = rows
        .iter()
        .map(|r| {
            let mut v = Vec::new();
            if r.adapters.contains('x') {
                v.push(x.clone());
            }
            if r.adapters.contains('y') {
                v.push(y.clone());
            }
            v
        })
        .collect();
    let mut kv = m.new_kv_cache_with_dtype(1 << 28, KvDtype::F32);
    let ids: Vec<SeqId> = rows.iter().map(|_| kv.add_sequence()).collect();
    let mut out = Vec::new();
    for step in 0..5 {
        let entries = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let tokens = match step {
                    0 => r.prompt.clone(),
                    4 if i == 1 || i == 4 => (0..6).map(|t| (t * 17 + i) as u32 + 40).collect(),
                    _ => vec![(step * 31 + i * 7) as u32 % 290 + 3],
                };
                BatchEntry::last(ids[i], tokens).with_adapters(sets[i].clone())
            })
            .collect();
        let logits = m.forward(&RaggedBatch::new(entries), &mut kv).unwrap();
        out.push((0..rows.len()).map(|i| logits.last(i).to_vec()).collect());
    }
    out
}

#[test]
fn candle_equals_native_on_ragged_batches_with_mixed_adapters_and_pairs() {
    let f = fixture();
    let native = run(&load(&f.base, Backend::Native, WeightFormat::Native), &f);
    let candle = run(&load(&f.base, Backend::Candle, WeightFormat::Native), &f);
    let rows = scenario();
    let mut worst = [0f32; 2];
    for (step, (a, b)) in native.iter().zip(&candle).enumerate() {
        for (i, r) in rows.iter().enumerate() {
            let tol = if r.adapters.is_empty() { 1e-4 } else { 2e-3 };
            let d = max_diff(&a[i], &b[i]);
            assert!(d <= tol, "step {step} row {i} (adapters {:?}): native vs candle {d}", r.adapters);
            let w = &mut worst[usize::from(!r.adapters.is_empty())];
            *w = w.max(d);
        }
    }
    eprintln!("native vs candle: max |Δlogit| {:.1e} without adapter, {:.1e} with", worst[0], worst[1]);
}

/// The guided pairs' tokens chosen on the device from the candle logits are the host's choices
/// from the native logits (greedy, both modes), wherever the host's choice is not a near tie.
#[test]
fn device_guidance_picks_the_hosts_tokens() {
    let f = fixture();
    let native = run(&load(&f.base, Backend::Native, WeightFormat::Native), &f);
    let candle_model = load(&f.base, Backend::Candle, WeightFormat::Native);
    let candle = run(&candle_model, &f);
    let greedy = SamplingParams::greedy();
    let mut compared = 0;
    for (host_rows, dev_rows) in native.iter().zip(&candle) {
        let logits = candle_core::Tensor::from_vec(
            dev_rows.concat(),
            (dev_rows.len(), dev_rows[0].len()),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (mode, gamma) in [(GuidanceMode::Log, 3.0), (GuidanceMode::Prob, 2.0), (GuidanceMode::Log, 0.5)] {
            let g = Guidance { gamma, mode };
            // Pairs (0, 1) and (5, 6), and row 2 alone.
            let mut rngs: Vec<Rng> = (0..3).map(Rng::new).collect();
            let mut it = rngs.iter_mut();
            let mut choices = vec![
                Choice { cond: 0, uncond: Some(1), guidance: Some(g), params: &greedy, rng: it.next().unwrap() },
                Choice { cond: 2, uncond: None, guidance: None, params: &greedy, rng: it.next().unwrap() },
                Choice { cond: 5, uncond: Some(6), guidance: Some(g), params: &greedy, rng: it.next().unwrap() },
            ];
            let got = choose_tokens(&logits, &mut choices).unwrap();
            let mut rng = Rng::new(0);
            let mut scratch = Vec::new();
            let mut host = |c: usize, u: Option<usize>| match u {
                Some(u) => sample_guided(&host_rows[c], &host_rows[u], g, &greedy, &mut rng, &mut scratch),
                None => sample_logits(&host_rows[c], &greedy, &mut rng),
            };
            let want = [host(0, Some(1)), host(2, None), host(5, Some(6))];
            for (k, (&a, &b)) in got.iter().zip(&want).enumerate() {
                let (c, u) = [(0, Some(1)), (2, None), (5, Some(6))][k];
                if !near_tie(&host_rows[c], u.map(|u| &host_rows[u][..]), g, 1e-2) {
                    assert_eq!(a, b, "{mode:?} γ={gamma} choice {k}");
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 30, "too few comparisons: {compared}");
}

/// True when the host's top two mixed scores are closer than `eps`.
fn near_tie(c: &[f32], u: Option<&[f32]>, g: Guidance, eps: f32) -> bool {
    let mut s = vec![0f32; c.len()];
    match (u, g.mode) {
        (None, _) => s.copy_from_slice(c),
        (Some(u), GuidanceMode::Log) => lethe::guidance::mix_log(c, u, g.gamma, &mut s),
        (Some(u), GuidanceMode::Prob) => lethe::guidance::mix_prob(c, u, g.gamma, &mut s),
    }
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1] < eps
}

/// f16 and bf16 weights: the same model to the precision of the type.
#[test]
fn half_precision_weights_stay_close_to_f32() {
    let f = fixture();
    let reference = run(&load(&f.base, Backend::Candle, WeightFormat::F32), &f);
    for (weights, tol) in [(WeightFormat::F16, 1e-2), (WeightFormat::Bf16, 6e-2)] {
        let m = load(&f.base, Backend::Candle, weights);
        assert!(m.weights_desc().ends_with(if weights == WeightFormat::F16 { "f16" } else { "bf16" }));
        let got = run(&m, &f);
        let mut worst = 0f32;
        for (a, b) in reference.iter().flatten().zip(got.iter().flatten()) {
            worst = worst.max(max_diff(a, b));
        }
        assert!(worst <= tol, "{weights:?}: {worst}");
        eprintln!("{weights:?} vs f32 weights: max |Δlogit| {worst:.1e}");
        assert!(worst > 0.0, "{weights:?} gave f32's exact numbers: not half precision");
    }
    // Only candle runs them.
    let err = Llama::load(
        &f.base,
        &LoadOptions { backend: Backend::Native, weights: WeightFormat::F16, ..Default::default() },
    );
    assert!(err.is_err());
}

/// More sequences than the tensor pool's first allocation (64 blocks of 16 positions) and
/// freed blocks reused by new sequences: every row still equals a lone run.
#[test]
fn tensor_pool_grows_and_reuses_blocks() {
    let f = fixture();
    let m = load(&f.base, Backend::Candle, WeightFormat::Native);
    let prompt = |n: usize, salt: usize| (0..n).map(|i| ((i * 11 + salt * 5) % 290 + 3) as u32).collect::<Vec<u32>>();
    let alone = |p: &[u32]| -> Vec<f32> {
        let mut kv = m.new_kv_cache_with_dtype(1 << 30, KvDtype::F32);
        let s = kv.add_sequence();
        m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, p.to_vec())]), &mut kv).unwrap().last(0).to_vec()
    };
    let mut kv = m.new_kv_cache_with_dtype(1 << 30, KvDtype::F32);
    // Round one: 3 × 250 positions (47 blocks); round two adds 3 × 300 more (over 64 blocks).
    let first: Vec<Vec<u32>> = (0..3).map(|i| prompt(250, i)).collect();
    let ids: Vec<SeqId> = first.iter().map(|_| kv.add_sequence()).collect();
    let entries = ids.iter().zip(&first).map(|(s, p)| BatchEntry::last(*s, p.clone())).collect();
    m.forward(&RaggedBatch::new(entries), &mut kv).unwrap();
    kv.remove_sequence(ids[1]);
    let second: Vec<Vec<u32>> = (3..6).map(|i| prompt(300, i)).collect();
    let ids2: Vec<SeqId> = second.iter().map(|_| kv.add_sequence()).collect();
    let entries = ids2.iter().zip(&second).map(|(s, p)| BatchEntry::last(*s, p.clone())).collect();
    let logits = m.forward(&RaggedBatch::new(entries), &mut kv).unwrap();
    for (i, p) in second.iter().enumerate() {
        let d = max_diff(logits.last(i), &alone(p));
        assert!(d <= 1e-4, "new sequence {i}: {d}");
    }
    // The survivors of round one still decode as if alone.
    let with_token = |p: &[u32]| [p, &[77]].concat();
    let entries = [ids[0], ids[2]].iter().map(|&s| BatchEntry::last(s, vec![77])).collect();
    let logits = m.forward(&RaggedBatch::new(entries), &mut kv).unwrap();
    for (k, i) in [0, 2].into_iter().enumerate() {
        let d = max_diff(logits.last(k), &alone(&with_token(&first[i])));
        assert!(d <= 1e-4, "surviving sequence {i}: {d}");
    }
}
