//! GPU parity: the candle path on a CUDA device against the CPU. Needs a build with
//! `--features cuda` and a GPU; `scripts/gpu-check.sh` runs these with `LETHE_REQUIRE_GPU=1`,
//! which turns a missing device into a failure. Elsewhere they are skipped with a message.
//!
//! `LETHE_GPU_DEVICE` picks the device (default `cuda:0`).

mod common;

use lethe::adapters::peft;
use lethe::device_sampling::{Choice, choose_tokens};
use lethe::fixtures::{PeftSpec, TempDir, TinySpec, write_peft_adapter, write_tiny_model};
use lethe::guidance::{Guidance, GuidanceMode, sample_guided};
use lethe::loader::ModelBundle;
use lethe::model::lora::LoraWeights;
use lethe::model::{Backend, BatchEntry, KvDtype, Llama, LoadOptions, RaggedBatch, WeightFormat};
use lethe::sampling::{Rng, SamplingParams, argmax};
use lethe::tokenizer::ChatMessage;
use std::path::Path;
use std::sync::Arc;

fn gpu() -> Option<candle_core::Device> {
    let name = std::env::var("LETHE_GPU_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    match lethe::model::load::parse_device(&name) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("LETHE_REQUIRE_GPU").is_ok_and(|v| v == "1") => panic!("{name}: {e}"),
        Err(e) => {
            eprintln!("skipping: no GPU ({name}: {e})");
            None
        }
    }
}

fn load_on(path: &Path, device: &candle_core::Device, weights: WeightFormat) -> Llama {
    let opts = LoadOptions { device: device.clone(), backend: Backend::Candle, weights };
    Llama::load(path, &opts).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Teacher-forced logits: the prompt, then `tokens` one step at a time (f32 KV).
fn logits_along(m: &Llama, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = m.new_kv_cache_with_dtype(1 << 30, KvDtype::F32);
    let s = kv.add_sequence();
    let mut out = vec![m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, prompt.to_vec())]), &mut kv).unwrap()];
    for &t in tokens {
        out.push(m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![t])]), &mut kv).unwrap());
    }
    out.into_iter().map(|l| l.last(0).to_vec()).collect()
}

/// The default model on the GPU against the CPU, along the CPU's greedy continuation: Q4_1
/// through candle's CUDA quantized matmul vs the native CPU kernels (both quantize activations
/// to 8 bits, differently: bounded by twice the CPU's own distance from exact f32 weights, as in
/// `tests/smollm.rs`), and f16 weights vs exact f32.
#[test]
fn default_model_on_gpu_matches_cpu() {
    let (Some(dev), Some(path)) = (gpu(), common::default_model()) else { return };
    let cpu = ModelBundle::load(&path, &LoadOptions::default(), None).unwrap();
    let exact =
        ModelBundle::load(&path, &LoadOptions { weights: WeightFormat::F32, ..Default::default() }, None).unwrap();
    let prompt = cpu.tokenizer.encode_chat(&[ChatMessage::user("Write a short poem about the sea.")], true).unwrap();
    let mut tokens = Vec::new();
    let mut kv = cpu.model.new_kv_cache_with_dtype(1 << 30, KvDtype::F32);
    let s = kv.add_sequence();
    let mut l = cpu.model.forward(&RaggedBatch::new(vec![BatchEntry::last(s, prompt.clone())]), &mut kv).unwrap();
    for _ in 0..16 {
        tokens.push(argmax(l.last(0)));
        l = cpu
            .model
            .forward(&RaggedBatch::new(vec![BatchEntry::last(s, vec![*tokens.last().unwrap()])]), &mut kv)
            .unwrap();
    }
    let reference = logits_along(&exact.model, &prompt, &tokens);
    let native = logits_along(&cpu.model, &prompt, &tokens);
    for (weights, factor) in [(WeightFormat::Native, 2.0), (WeightFormat::F16, 1.0)] {
        let g = load_on(&path, &dev, weights);
        let on_gpu = logits_along(&g, &prompt, &tokens);
        for (step, ((x, n), e)) in on_gpu.iter().zip(&native).zip(&reference).enumerate() {
            let noise = max_diff(n, e).max(0.05);
            let d = max_diff(x, if weights == WeightFormat::F16 { e } else { n });
            eprintln!("{weights:?} step {step}: |gpu − cpu| {d:.3} (cpu noise {noise:.3})");
            assert!(d <= factor * noise, "{weights:?} step {step}: GPU vs CPU {d} > {factor} × {noise}");
        }
    }
}

struct Tiny {
    _tmp: TempDir,
    base: std::path::PathBuf,
    x: std::path::PathBuf,
    y: std::path::PathBuf,
}

fn tiny() -> Tiny {
    let tmp = TempDir::new("gpu").unwrap();
    let spec = TinySpec::default();
    let base = write_tiny_model(&tmp.path().join("base"), &spec).unwrap();
    let x = tmp.path().join("x");
    write_peft_adapter(&x, &spec, &PeftSpec { seed: 41, ..Default::default() }).unwrap();
    let y = tmp.path().join("y");
    write_peft_adapter(
        &y,
        &spec,
        &PeftSpec { rank: 8, seed: 42, modules: vec!["q_proj", "v_proj"], ..Default::default() },
    )
    .unwrap();
    Tiny { _tmp: tmp, base, x, y }
}

/// Prompts of different lengths, each with its adapters (none, X, Y, X+Y); one ragged prefill
/// then `steps` decode steps.
fn run_ragged(m: &Llama, t: &Tiny, rows: &[usize], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let ad = |p: &Path| -> Arc<LoraWeights> { Arc::new(peft::load(p, m).unwrap().weights) };
    let (x, y) = (ad(&t.x), ad(&t.y));
    let sets = [vec![], vec![x.clone()], vec![y.clone()], vec![x, y]];
    let mut kv = m.new_kv_cache_with_dtype(1 << 28, KvDtype::F32);
    let ids: Vec<_> = rows.iter().map(|_| kv.add_sequence()).collect();
    let mut out = Vec::new();
    for step in 0..=steps {
        let entries = rows
            .iter()
            .zip(&ids)
            .map(|(&r, &s)| {
                let tokens: Vec<u32> = if step == 0 {
                    (0..5 + 9 * r).map(|i| ((i * 7 + r * 3) % 290 + 3) as u32).collect()
                } else {
                    vec![((step * 31 + r * 17) % 290 + 3) as u32]
                };
                BatchEntry::last(s, tokens).with_adapters(sets[r % 4].clone())
            })
            .collect();
        let l = m.forward(&RaggedBatch::new(entries), &mut kv).unwrap();
        out.push((0..rows.len()).map(|i| l.last(i).to_vec()).collect());
    }
    out
}

/// Ragged batches with per-row LoRA on the GPU: equal to each row run alone on the GPU, and to
/// the CPU candle path (f32 everywhere; GPU matmuls sum in another order: 1e-3).
#[test]
fn ragged_batch_with_per_row_lora_on_gpu() {
    let Some(dev) = gpu() else { return };
    let t = tiny();
    let g = load_on(&t.base, &dev, WeightFormat::F32);
    let c = load_on(&t.base, &candle_core::Device::Cpu, WeightFormat::F32);
    let rows = [0, 1, 2, 3, 5, 6];
    let batched = run_ragged(&g, &t, &rows, 4);
    let cpu = run_ragged(&c, &t, &rows, 4);
    for (i, &r) in rows.iter().enumerate() {
        let alone = run_ragged(&g, &t, &[r], 4);
        for step in 0..=4 {
            let d = max_diff(&batched[step][i], &alone[step][0]);
            assert!(d <= 1e-3, "row {r} step {step}: batched vs alone on GPU {d}");
            let d = max_diff(&batched[step][i], &cpu[step][i]);
            assert!(d <= 1e-3, "row {r} step {step}: GPU vs CPU {d}");
        }
    }
}

/// Guidance and sampling on the GPU: greedy tokens equal the host's from the same logits, and
/// seeded draws repeat.
#[test]
fn guided_pair_sampled_on_gpu() {
    let Some(dev) = gpu() else { return };
    let t = tiny();
    let g = load_on(&t.base, &dev, WeightFormat::F32);
    let rows = [0, 4, 1, 5];
    let logits = run_ragged(&g, &t, &rows, 3);
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, seed: Some(3) };
    for step in &logits {
        let v = step[0].len();
        let on_gpu = candle_core::Tensor::from_vec(step.concat(), (step.len(), v), &dev).unwrap();
        for mode in [GuidanceMode::Log, GuidanceMode::Prob] {
            let guide = Guidance { gamma: 3.0, mode };
            let mut rngs = [Rng::new(1), Rng::new(2)];
            let [r0, r1] = &mut rngs;
            let mut choices = [
                Choice { cond: 0, uncond: Some(1), guidance: Some(guide), params: &greedy, rng: r0 },
                Choice { cond: 2, uncond: Some(3), guidance: Some(guide), params: &greedy, rng: r1 },
            ];
            let got = choose_tokens(&on_gpu, &mut choices).unwrap();
            let mut rng = Rng::new(0);
            let mut scratch = Vec::new();
            let want = [
                sample_guided(&step[0], &step[1], guide, &greedy, &mut rng, &mut scratch),
                sample_guided(&step[2], &step[3], guide, &greedy, &mut rng, &mut scratch),
            ];
            assert_eq!(got, want, "{mode:?}");
            let draw = |seed: u64| {
                let mut rng = Rng::new(seed);
                let mut c =
                    [Choice { cond: 0, uncond: Some(1), guidance: Some(guide), params: &seeded, rng: &mut rng }];
                choose_tokens(&on_gpu, &mut c).unwrap()[0]
            };
            assert_eq!(draw(9), draw(9));
        }
    }
}
