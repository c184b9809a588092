//! Benchmarks behind `lethe bench`: measured side by side in one process, printed as numbers
//! that scripts can read (`--json`).

use crate::engine::{EngineConfig, EngineHandle, Event, Request, SchedulerConfig};
use crate::guidance::{Guidance, GuidanceMode};
use crate::model::kernels::matmul::{
    ActPrecision, act_precision, prefetch_bytes, set_act_precision, set_prefetch_bytes,
};
use crate::model::lora::LoraWeights;
use crate::model::stages::{self, StageTimes};
use crate::model::{BatchEntry, KvDtype, Llama, RaggedBatch, SeqId};
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Deterministic prompt tokens (ordinary vocabulary, no control tokens).
pub fn synthetic_prompt(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut rng = crate::sampling::Rng::new(0xBE7C ^ salt);
    let lo = 100.min(vocab / 2) as u64;
    (0..len).map(|_| (lo + rng.next_u64() % (vocab as u64 - lo)) as u32).collect()
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    pub model: String,
    pub weights: String,
    /// The CPU kernel set that ran (`avx512`, `avx2`, ...).
    pub kernels: &'static str,
    /// Activation precision of the quantized matmuls (`int8`, `int16`).
    pub activations: &'static str,
    /// Weight prefetch distance of the quantized matmuls, in bytes (0: none).
    pub prefetch_bytes: usize,
    pub threads: usize,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_steps_s: f64,
    pub decode_tok_s: f64,
    /// Mean duration of one decode step, in milliseconds.
    pub step_ms: f64,
    pub peak_rss_bytes: u64,
    /// Mean step time of each interleaved round, for ratios paired round by round.
    #[serde(skip)]
    pub round_step_s: Vec<f64>,
    /// Where a decode step's time went, when [`crate::model::stages`] accounting is on.
    pub stages: Option<StageTimes>,
}

/// How much faster `a` decodes than `b` (tok/s of `a` over tok/s of `b`, same batch size): the
/// median over rounds of the per-round ratio, so slow drifts of a noisy machine cancel out.
pub fn paired_speed_ratio(a: &DecodeReport, b: &DecodeReport) -> f64 {
    let r = a.round_step_s.iter().zip(&b.round_step_s).map(|(ta, tb)| tb / ta).collect();
    PairedRatio::of(r).median * a.batch as f64 / b.batch as f64
}

/// Model-level decode benchmark for several batch sizes side by side: each batch size gets its
/// own sequences (`prompt_tokens` each, prefilled in one ragged step), then `gen_tokens` decode
/// steps of all its rows, run in interleaved rounds so that machine noise hits every batch size
/// alike. Step times are the median over rounds.
pub fn decode(
    model: &Llama,
    batches: &[usize],
    prompt_tokens: usize,
    gen_tokens: usize,
    kv_dtype: KvDtype,
) -> anyhow::Result<Vec<DecodeReport>> {
    let cases: Vec<DecodeCase> = batches.iter().map(|&b| DecodeCase::rows(b)).collect();
    decode_cases(model, &cases, prompt_tokens, gen_tokens, kv_dtype)
}

/// One decode configuration: per row, the LoRA adapters applied to it (empty = base model),
/// and optionally the kernel set, activation precision and weight prefetch distance it runs
/// with (default: the process's), so that kernel variants can be compared side by side in one
/// process.
#[derive(Clone, Default)]
pub struct DecodeCase {
    pub rows: Vec<Vec<Arc<LoraWeights>>>,
    pub kernels: Option<crate::simd::Isa>,
    pub activations: Option<ActPrecision>,
    pub prefetch_bytes: Option<usize>,
}

impl DecodeCase {
    /// `n` rows without adapters.
    pub fn rows(n: usize) -> Self {
        Self { rows: vec![Vec::new(); n], ..Default::default() }
    }

    /// Makes this case's kernel settings the process's (before each of its runs).
    fn enter(&self) -> anyhow::Result<()> {
        if let Some(isa) = self.kernels {
            crate::simd::activate(isa)?;
        }
        if let Some(p) = self.activations {
            set_act_precision(p);
        }
        if let Some(b) = self.prefetch_bytes {
            set_prefetch_bytes(b);
        }
        Ok(())
    }
}

/// [`decode`] for arbitrary cases, e.g. rows with different adapters.
pub fn decode_cases(
    model: &Llama,
    cases: &[DecodeCase],
    prompt_tokens: usize,
    gen_tokens: usize,
    kv_dtype: KvDtype,
) -> anyhow::Result<Vec<DecodeReport>> {
    // Rounds of at least 8 steps per case; more rounds, more pairs for the paired ratios.
    let rounds = (gen_tokens / 8).clamp(1, 32);
    let vocab = model.config().vocab_size;
    let mut kv = model.new_kv_cache_with_dtype(usize::MAX / 2, kv_dtype);
    // Warm-up on a throwaway sequence: first-touch page faults and thread start-up.
    let w = kv.add_sequence();
    model.forward(
        &RaggedBatch::new(vec![BatchEntry::last(w, synthetic_prompt(prompt_tokens.max(8), vocab, 99))]),
        &mut kv,
    )?;
    for _ in 0..8 {
        model.forward(&RaggedBatch::new(vec![BatchEntry::last(w, vec![200])]), &mut kv)?;
    }
    kv.remove_sequence(w);

    struct Run<'a> {
        seqs: Vec<SeqId>,
        adapters: &'a [Vec<Arc<LoraWeights>>],
        next: Vec<u32>,
        prefill_s: f64,
        round_s: Vec<f64>,
        steps: usize,
        kernels: &'static str,
        activations: &'static str,
        prefetch_bytes: usize,
        stages: Option<StageTimes>,
    }
    impl Run<'_> {
        fn batch(&self, tokens: impl Fn(usize) -> Vec<u32>) -> RaggedBatch {
            RaggedBatch::new(
                self.seqs
                    .iter()
                    .zip(self.adapters)
                    .enumerate()
                    .map(|(i, (&s, a))| BatchEntry::last(s, tokens(i)).with_adapters(a.clone()))
                    .collect(),
            )
        }
    }
    let before = (crate::simd::active(), act_precision(), prefetch_bytes());
    let mut runs = Vec::new();
    for (ci, case) in cases.iter().enumerate() {
        case.enter()?;
        let batch = case.rows.len();
        let mut run = Run {
            seqs: (0..batch).map(|_| kv.add_sequence()).collect(),
            adapters: &case.rows,
            next: Vec::new(),
            prefill_s: 0.0,
            round_s: Vec::new(),
            steps: 0,
            kernels: "",
            activations: "",
            prefetch_bytes: 0,
            stages: None,
        };
        let prefill = run.batch(|i| synthetic_prompt(prompt_tokens, vocab, (ci * 1000 + i) as u64));
        let t0 = Instant::now();
        // Greedy next tokens where the logits are (on a GPU only the ids come back).
        run.next = model.forward_step(&prefill, &mut kv)?.greedy_last()?;
        run.prefill_s = t0.elapsed().as_secs_f64();
        run.kernels = crate::simd::active().name();
        run.activations = act_precision().name();
        run.prefetch_bytes = prefetch_bytes();
        runs.push(run);
    }
    for round in 0..rounds {
        let steps = gen_tokens / rounds + usize::from(round < gen_tokens % rounds);
        for (run, case) in runs.iter_mut().zip(cases) {
            case.enter()?;
            // The counters are per row count: each run's steps are accounted on their own.
            stages::reset();
            let t = Instant::now();
            for _ in 0..steps {
                let step = run.batch(|i| vec![run.next[i]]);
                run.next = model.forward_step(&step, &mut kv)?.greedy_last()?;
            }
            if steps > 0 {
                run.round_s.push(t.elapsed().as_secs_f64() / steps as f64);
            }
            // Nothing is accounted (None) unless the caller turned the accounting on.
            if let Some(now) = stages::snapshot(run.seqs.len()) {
                run.stages = Some(match run.stages.take() {
                    Some(acc) => acc.merge(&now),
                    None => now,
                });
            }
            run.steps += steps;
        }
    }
    crate::simd::activate(before.0)?;
    set_act_precision(before.1);
    set_prefetch_bytes(before.2);
    let rss = peak_rss_bytes().unwrap_or(0);
    Ok(runs
        .into_iter()
        .map(|run| {
            let batch = run.seqs.len();
            let mut sorted = run.round_s.clone();
            sorted.sort_by(f64::total_cmp);
            let step = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
            DecodeReport {
                model: model.config().name.clone(),
                weights: model.weights_desc().to_string(),
                kernels: run.kernels,
                activations: run.activations,
                prefetch_bytes: run.prefetch_bytes,
                threads: crate::model::kernels::pool::global().n_threads(),
                batch,
                prompt_tokens,
                gen_tokens: run.steps,
                prefill_tok_s: (batch * prompt_tokens) as f64 / run.prefill_s,
                decode_steps_s: 1.0 / step,
                decode_tok_s: batch as f64 / step,
                step_ms: step * 1e3,
                peak_rss_bytes: rss,
                round_step_s: run.round_s,
                stages: run.stages,
            }
        })
        .collect())
}

/// `lethe bench adapters`: the cost of unmerged per-row LoRA.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterBenchReport {
    pub model: String,
    pub weights: String,
    pub kernels: &'static str,
    pub rank: usize,
    /// Bytes of one adapter's factors in memory.
    pub adapter_bytes: usize,
    /// Size of one adapter's `adapter_model.safetensors` (f32).
    pub adapter_file_bytes: u64,
    /// Median wall time to read, validate and pack one adapter.
    pub load_ms: f64,
    /// (label, report) per decode case, measured side by side.
    pub cases: Vec<(String, DecodeReport)>,
    /// One adapter on the only row vs no adapter, decode tok/s.
    pub one_row_ratio: f64,
    /// `batch` rows each with one adapter vs no adapter.
    pub batch_adapter_ratio: f64,
    /// `batch` rows spread over 4 adapters vs all rows on one adapter (aggregate tok/s).
    pub four_adapters_ratio: f64,
}

/// Writes 4 random rank-`rank` all-linear PEFT adapters shaped for `model` into `dir`, times
/// loading them, and decodes side by side: 1 row without/with an adapter, and `batch` rows
/// without adapters, all on one adapter, and spread over 4 adapters.
pub fn adapters(
    model: &Llama,
    dir: &std::path::Path,
    rank: usize,
    batch: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    kv_dtype: KvDtype,
) -> anyhow::Result<AdapterBenchReport> {
    use crate::fixtures::{PeftSpec, TinySpec, write_peft_adapter};
    let cfg = model.config();
    anyhow::ensure!(cfg.n_heads * cfg.head_dim == cfg.hidden_size, "adapter synthesis needs head_dim = hidden / heads");
    let shape = TinySpec::shaped_like(cfg);
    let mut loaded = Vec::new();
    let mut load_s = Vec::new();
    for i in 0..4 {
        let path = dir.join(format!("adapter{i}"));
        // Small factors, like a trained LoRA's, so activations stay in their normal range.
        let spec =
            PeftSpec { rank, alpha: 2.0 * rank as f32, seed: 100 + i as u64, init_scale: 0.04, ..Default::default() };
        write_peft_adapter(&path, &shape, &spec)?;
        let t = Instant::now();
        let a = crate::adapters::peft::load(&path, model)?;
        load_s.push(t.elapsed().as_secs_f64());
        loaded.push(Arc::new(a.weights));
    }
    // Reload the first one twice more for a steadier load time (page cache warm, as in service).
    for _ in 0..2 {
        let t = Instant::now();
        crate::adapters::peft::load(&dir.join("adapter0"), model)?;
        load_s.push(t.elapsed().as_secs_f64());
    }
    load_s.sort_by(f64::total_cmp);
    let file_bytes = std::fs::metadata(dir.join("adapter0").join("adapter_model.safetensors"))?.len();
    let one = &loaded[0];
    let labelled: Vec<(String, DecodeCase)> = vec![
        ("1 row, base".into(), DecodeCase::rows(1)),
        ("1 row, 1 adapter".into(), DecodeCase { rows: vec![vec![one.clone()]], ..Default::default() }),
        (format!("{batch} rows, base"), DecodeCase::rows(batch)),
        (format!("{batch} rows, 1 adapter"), DecodeCase { rows: vec![vec![one.clone()]; batch], ..Default::default() }),
        (
            format!("{batch} rows, 4 adapters"),
            DecodeCase {
                rows: (0..batch).map(|i| vec![loaded[i * 4 / batch.max(1)].clone()]).collect(),
                ..Default::default()
            },
        ),
    ];
    let cases: Vec<DecodeCase> = labelled.iter().map(|(_, c)| c.clone()).collect();
    let reports = decode_cases(model, &cases, prompt_tokens, gen_tokens, kv_dtype)?;
    let ratio = |a: usize, b: usize| paired_speed_ratio(&reports[a], &reports[b]);
    Ok(AdapterBenchReport {
        model: cfg.name.clone(),
        weights: model.weights_desc().to_string(),
        kernels: crate::simd::active().name(),
        rank,
        adapter_bytes: one.bytes,
        adapter_file_bytes: file_bytes,
        load_ms: load_s[load_s.len() / 2] * 1e3,
        one_row_ratio: ratio(1, 0),
        batch_adapter_ratio: ratio(3, 2),
        four_adapters_ratio: ratio(4, 3),
        cases: labelled.into_iter().map(|(l, _)| l).zip(reports).collect(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub model: String,
    pub weights: String,
    pub kernels: &'static str,
    pub concurrency: usize,
    pub guided: bool,
    /// Constrained to [`BENCH_SCHEMA`].
    pub schema: bool,
    pub prefix_cache: bool,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Mean over requests of generated tokens / (last token − first token); median over rounds.
    pub per_request_tok_s: f64,
    /// Tokens per second of all requests together while all of them are decoding (from the
    /// latest first token to the earliest last token); median over rounds.
    pub aggregate_tok_s: f64,
    /// All generated tokens / wall time from submission to the last finish (prefill included).
    pub aggregate_e2e_tok_s: f64,
    /// Engine forward steps per second of wall time.
    pub decode_steps_s: f64,
    /// Mean time to first token, in milliseconds.
    pub ttft_ms: f64,
    pub peak_rss_bytes: u64,
    /// Per-request tok/s and aggregate tok/s of each interleaved round, for ratios paired round
    /// by round.
    #[serde(skip)]
    pub rounds: Vec<(f64, f64)>,
}

/// Ratios of two engine cases measured in the same interleaved rounds (`a` over `b`): the median
/// of the per-round ratios, and their smallest and largest, which show how noisy the machine was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedRatio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl PairedRatio {
    fn of(mut r: Vec<f64>) -> Self {
        r.sort_by(f64::total_cmp);
        match (r.first(), r.last()) {
            (Some(&min), Some(&max)) => Self { median: r[r.len() / 2], min, max },
            _ => Self { median: f64::NAN, min: f64::NAN, max: f64::NAN },
        }
    }
}

impl std::fmt::Display for PairedRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} (rounds {:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// `a` over `b` per round, (per-request tok/s, aggregate tok/s): the pairing cancels the slow
/// drifts of a noisy machine that a ratio of two medians keeps.
pub fn paired_engine_ratios(a: &EngineReport, b: &EngineReport) -> (PairedRatio, PairedRatio) {
    let pairs = a.rounds.iter().zip(&b.rounds);
    (
        PairedRatio::of(pairs.clone().map(|(x, y)| x.0 / y.0).collect()),
        PairedRatio::of(pairs.map(|(x, y)| x.1 / y.1).collect()),
    )
}

/// One engine benchmark configuration.
#[derive(Debug, Clone, Copy)]
pub struct EngineCase {
    pub concurrency: usize,
    pub guided: Option<Guidance>,
    /// Every request is constrained to [`BENCH_SCHEMA`] (structured outputs).
    pub schema: bool,
    /// The engine caches prefixes (prompts are distinct: nothing is shared, this measures the
    /// bookkeeping's cost).
    pub prefix_cache: bool,
}

/// The JSON schema of structured-output benchmarks: a long list of records mixing integers,
/// bounded strings, booleans and nested arrays (what an extraction app asks for). `minItems`
/// keeps it open for any benchmark length, so every request generates exactly `gen_tokens`.
pub const BENCH_SCHEMA: &str = r#"{"type": "array", "minItems": 10000, "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000}, "name": {"type": "string", "maxLength": 24}, "email": {"type": "string", "maxLength": 40}, "active": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}, "required": ["id", "name", "email", "active", "tags"], "additionalProperties": false}}"#;

/// Engine-level benchmark: for each case, `concurrency` simultaneous requests (CFG pairs when
/// guided), each generating exactly `gen_tokens` tokens, through one engine. Cases run in
/// interleaved rounds so that machine noise affects them alike; figures are medians over rounds.
pub fn engine(
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    cases: &[EngineCase],
    prompt_tokens: usize,
    gen_tokens: usize,
    rounds: usize,
    kv_dtype: KvDtype,
) -> anyhow::Result<Vec<EngineReport>> {
    let vocab = model.config().vocab_size;
    let max_rows = cases.iter().map(|c| c.concurrency * if c.guided.is_some() { 2 } else { 1 }).max().unwrap_or(1);
    let max_conc = cases.iter().map(|c| c.concurrency).max().unwrap_or(1);
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_running_rows: max_rows,
            max_batch_tokens: (max_rows * prompt_tokens).max(512),
            max_waiting: max_conc,
            ..Default::default()
        },
        kv_cache_bytes: 8 << 30,
        prefix_cache: true,
    };
    let (name, weights) = (model.config().name.clone(), model.weights_desc().to_string());
    let constraint = match cases.iter().any(|c| c.schema) {
        true => {
            let structured = crate::structured::Structured::new(&tokenizer, vocab).map_err(anyhow::Error::msg)?;
            let format = crate::structured::ResponseFormat::JsonSchema(serde_json::from_str(BENCH_SCHEMA)?);
            structured.compile(&crate::structured::OutputPlan { format, tools: None })?
        }
        false => None,
    };
    // One engine per prefix-cache setting the cases use.
    let engines: Vec<(bool, EngineHandle)> = [false, true]
        .into_iter()
        .filter(|&on| cases.iter().any(|c| c.prefix_cache == on))
        .map(|on| {
            let cfg = EngineConfig { prefix_cache: on, ..cfg.clone() };
            (on, EngineHandle::spawn_with_kv_dtype(model.clone(), tokenizer.clone(), cfg, kv_dtype))
        })
        .collect();
    let engine_for = |case: &EngineCase| &engines.iter().find(|(on, _)| *on == case.prefix_cache).expect("spawned").1;
    // Every request of every round has prompts of its own: nothing is shared through the
    // prefix cache, as in a workload without common prefixes.
    let make = |i: usize, case: &EngineCase| {
        let mut r = Request::new(synthetic_prompt(prompt_tokens, vocab, 2 * i as u64), gen_tokens);
        r.ignore_eos = true;
        if let Some(g) = case.guided {
            r = r.guided(synthetic_prompt(prompt_tokens, vocab, 2 * i as u64 + 1), g);
        }
        if case.schema {
            r.constraint = constraint.clone();
        }
        r
    };
    // Warm-up.
    for (_, engine) in &engines {
        run_requests(engine, vec![make(usize::MAX / 4, &cases[0])])?;
    }
    let mut samples: Vec<Vec<RoundStats>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds.max(1) {
        for (ci, case) in cases.iter().enumerate() {
            let first = (round * cases.len() + ci) * max_conc;
            let reqs = (0..case.concurrency).map(|i| make(first + i, case)).collect();
            samples[ci].push(run_requests(engine_for(case), reqs)?);
        }
    }
    for (_, engine) in &engines {
        engine.shutdown(std::time::Duration::from_secs(5));
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let rss = peak_rss_bytes().unwrap_or(0);
    Ok(cases
        .iter()
        .zip(samples)
        .map(|(case, rs)| EngineReport {
            model: name.clone(),
            weights: weights.clone(),
            kernels: crate::simd::active().name(),
            concurrency: case.concurrency,
            guided: case.guided.is_some(),
            schema: case.schema,
            prefix_cache: case.prefix_cache,
            prompt_tokens,
            gen_tokens,
            per_request_tok_s: median(rs.iter().map(|r| r.per_request).collect()),
            aggregate_tok_s: median(rs.iter().map(|r| r.aggregate).collect()),
            aggregate_e2e_tok_s: median(rs.iter().map(|r| r.e2e).collect()),
            decode_steps_s: median(rs.iter().map(|r| r.steps_s).collect()),
            ttft_ms: median(rs.iter().map(|r| r.ttft_ms).collect()),
            peak_rss_bytes: rss,
            rounds: rs.iter().map(|r| (r.per_request, r.aggregate)).collect(),
        })
        .collect())
}

#[derive(Debug, Clone)]
struct RoundStats {
    per_request: f64,
    aggregate: f64,
    e2e: f64,
    steps_s: f64,
    ttft_ms: f64,
}

/// What structured outputs cost on their own (no model): building the vocabulary trie (once
/// per server), compiling [`BENCH_SCHEMA`], and per token computing the allowed set and
/// following the sampled token.
#[derive(Debug, Clone, Serialize)]
pub struct ConstraintCosts {
    pub vocab: usize,
    pub trie_build_ms: f64,
    pub compile_ms: f64,
    pub mask_us_per_token: f64,
    pub commit_us_per_token: f64,
    pub tokens: usize,
}

/// Measures [`ConstraintCosts`] over `tokens` tokens of [`BENCH_SCHEMA`], each step taking an
/// allowed token chosen by a fixed pseudo-random sequence (so the walk visits keys, strings,
/// numbers and punctuation).
pub fn constraint_costs(tokenizer: &Tokenizer, vocab: usize, tokens: usize) -> anyhow::Result<ConstraintCosts> {
    use crate::structured::{OutputPlan, ResponseFormat, Structured};
    let t = Instant::now();
    let structured = Structured::new(tokenizer, vocab).map_err(anyhow::Error::msg)?;
    let trie_build_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let plan = OutputPlan { format: ResponseFormat::JsonSchema(serde_json::from_str(BENCH_SCHEMA)?), tools: None };
    let spec = structured.compile(&plan)?.ok_or_else(|| anyhow::anyhow!("no constraint"))?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut run = spec.start();
    let mut rng = crate::sampling::Rng::new(7);
    let (mut mask_s, mut commit_s) = (0.0, 0.0);
    for _ in 0..tokens {
        let t = Instant::now();
        run.prepare();
        let bits = run.allowed().map_err(anyhow::Error::msg)?.map(<[u32]>::to_vec).unwrap_or_default();
        mask_s += t.elapsed().as_secs_f64();
        let allowed: Vec<u32> = (0..vocab as u32).filter(|&i| crate::sampling::allows(&bits, i as usize)).collect();
        anyhow::ensure!(!allowed.is_empty(), "the grammar admits no token");
        let token = allowed[(rng.next_u64() % allowed.len() as u64) as usize];
        let t = Instant::now();
        run.commit(token).map_err(anyhow::Error::msg)?;
        commit_s += t.elapsed().as_secs_f64();
    }
    Ok(ConstraintCosts {
        vocab,
        trie_build_ms,
        compile_ms,
        mask_us_per_token: mask_s * 1e6 / tokens.max(1) as f64,
        commit_us_per_token: commit_s * 1e6 / tokens.max(1) as f64,
        tokens,
    })
}

/// Submits `reqs` at once and collects token timestamps from a thread per stream.
fn run_requests(engine: &EngineHandle, reqs: Vec<Request>) -> anyhow::Result<RoundStats> {
    let steps0 = engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    let streams: Vec<_> = reqs.into_iter().map(|r| engine.submit(r)).collect::<Result<_, _>>()?;
    // One collector thread for all streams (a thread per stream would compete with the engine
    // for the cores on every token). All requests advance one token per step, so reading the
    // streams in turn loses no time.
    let mut streams = streams;
    let mut all: Vec<Vec<Instant>> = vec![Vec::new(); streams.len()];
    let mut open: Vec<usize> = (0..streams.len()).collect();
    while !open.is_empty() {
        let mut still = Vec::with_capacity(open.len());
        for i in open {
            match streams[i].blocking_next() {
                Some(Event::Token { .. }) => {
                    all[i].push(Instant::now());
                    still.push(i);
                }
                Some(Event::Finished { .. }) | None => {}
                Some(Event::Error(m)) => anyhow::bail!(m),
            }
        }
        open = still;
    }
    let wall = t0.elapsed().as_secs_f64();
    let steps = engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed) - steps0;
    let total: usize = all.iter().map(Vec::len).sum();
    let rates: Vec<f64> = all
        .iter()
        .filter(|s| s.len() > 1)
        .map(|s| (s.len() - 1) as f64 / (*s.last().unwrap() - s[0]).as_secs_f64())
        .collect();
    let ttfts: Vec<f64> = all.iter().filter_map(|s| s.first()).map(|f| (*f - t0).as_secs_f64()).collect();
    // Steady state: every request is decoding.
    let from = all.iter().filter_map(|s| s.first()).max().copied().unwrap_or(t0);
    let to = all.iter().filter_map(|s| s.last()).min().copied().unwrap_or(t0);
    let in_window: usize = all.iter().map(|s| s.iter().filter(|&&t| t > from && t <= to).count()).sum();
    let window = to.saturating_duration_since(from).as_secs_f64();
    Ok(RoundStats {
        per_request: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        aggregate: if window > 0.0 { in_window as f64 / window } else { f64::NAN },
        e2e: total as f64 / wall,
        steps_s: steps as f64 / wall,
        ttft_ms: ttfts.iter().sum::<f64>() * 1e3 / ttfts.len().max(1) as f64,
    })
}

/// Default guidance for benchmarks: the paper's γ = 3, log mode.
pub fn default_guidance() -> Guidance {
    Guidance { gamma: 3.0, mode: GuidanceMode::Log }
}

/// One configuration of the HTTP load generator.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub concurrency: usize,
    pub requests: usize,
    pub guidance: Option<Guidance>,
    /// Words of the synthetic user message (≈ tokens).
    pub prompt_words: usize,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub concurrency: usize,
    pub requests: usize,
    pub guided: bool,
    pub errors: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    /// Mean over requests of tokens / (last − first token).
    pub per_request_tok_s: f64,
    /// All output tokens / wall time.
    pub output_tok_s: f64,
}

/// What one streamed request measured.
struct Sample {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
    decode_s: f64,
}

/// `lethe bench serve`: `requests` streaming chat requests, `concurrency` at a time, against an
/// OpenAI-compatible server at `base` (e.g. `http://127.0.0.1:8080`).
pub async fn serve_load(base: &str, model: &str, cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(cfg.concurrency.max(1)).build()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cfg.concurrency.max(1) {
        let (client, next, cfg) = (client.clone(), next.clone(), cfg.clone());
        let url = format!("{}/v1/chat/completions", base.trim_end_matches('/'));
        let model = model.to_string();
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= cfg.requests {
                    break;
                }
                match one_streamed_request(&client, &url, &model, &cfg, i).await {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "load request failed");
                        errors += 1;
                    }
                }
            }
            (samples, errors)
        }));
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (s, e) = w.await?;
        samples.extend(s);
        errors += e;
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    let pct = |v: &mut Vec<f64>, p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize] * 1e3
    };
    let rates: Vec<f64> = samples
        .iter()
        .filter(|s| s.tokens > 1 && s.decode_s > 0.0)
        .map(|s| (s.tokens - 1) as f64 / s.decode_s)
        .collect();
    Ok(LoadReport {
        concurrency: cfg.concurrency,
        requests: cfg.requests,
        guided: cfg.guidance.is_some(),
        errors,
        ttft_p50_ms: pct(&mut ttft, 0.5),
        ttft_p99_ms: pct(&mut ttft, 0.99),
        itl_p50_ms: pct(&mut itl, 0.5),
        itl_p99_ms: pct(&mut itl, 0.99),
        per_request_tok_s: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        output_tok_s: samples.iter().map(|s| s.tokens).sum::<usize>() as f64 / wall,
    })
}

async fn one_streamed_request(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    cfg: &LoadConfig,
    i: usize,
) -> anyhow::Result<Sample> {
    use futures::StreamExt;
    let words: Vec<&str> = ["customer", "order", "phone", "address", "forget", "guidance", "model", "secret"].to_vec();
    let text: String = (0..cfg.prompt_words).map(|w| words[(w * 7 + i) % words.len()]).collect::<Vec<_>>().join(" ");
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    if let Some(g) = cfg.guidance {
        body["guidance"] = serde_json::json!({"gamma": g.gamma, "mode": g.mode.as_str()});
    }
    let start = Instant::now();
    let resp = client.post(url).json(&body).send().await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let (mut first, mut last) = (None, start);
    let mut gaps = Vec::new();
    let mut chunks = 0;
    let mut usage_tokens = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            let has_content = v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty());
            if has_content {
                let now = Instant::now();
                match first {
                    None => first = Some(now),
                    Some(_) => gaps.push((now - last).as_secs_f64()),
                }
                last = now;
                chunks += 1;
            } else if let Some(n) = usage_completion_tokens(&v) {
                // The usage chunk: count tokens, not chunks (text held back for an incomplete
                // character arrives with a later token, in one chunk).
                usage_tokens = Some(n);
            }
        }
    }
    let first = first.ok_or_else(|| anyhow::anyhow!("no tokens streamed"))?;
    Ok(Sample {
        ttft: (first - start).as_secs_f64(),
        gaps,
        tokens: usage_tokens.unwrap_or(chunks),
        decode_s: (last - first).as_secs_f64(),
    })
}

/// The generated tokens a streamed chunk reports (`usage.completion_tokens` of the final usage
/// chunk); `None` for other chunks.
fn usage_completion_tokens(chunk: &serde_json::Value) -> Option<usize> {
    chunk.get("usage")?.get("completion_tokens")?.as_u64().map(|n| n as usize)
}

#[derive(Debug, Clone, Serialize)]
pub struct TtftReport {
    pub long_prompt_tokens: usize,
    pub short_prompt_tokens: usize,
    pub max_batch_tokens: usize,
    /// Median time to first token of the short request with nothing else running.
    pub idle_ttft_ms: f64,
    /// Median time to first token of the short request submitted while the long prompt is
    /// being prefilled.
    pub loaded_ttft_ms: f64,
    pub ratio: f64,
    /// Median time to first token of the long request itself (its prefill time).
    pub long_ttft_ms: f64,
}

/// Time to first token of a short request, idle and while a long prompt is prefilling (chunked
/// prefill at work), alternating over `rounds`.
pub fn ttft_under_prefill(
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    scheduler: SchedulerConfig,
    long_tokens: usize,
    short_tokens: usize,
    rounds: usize,
) -> anyhow::Result<TtftReport> {
    let vocab = model.config().vocab_size;
    let budget = scheduler.max_batch_tokens;
    let engine =
        EngineHandle::spawn(model, tokenizer, EngineConfig { scheduler, kv_cache_bytes: 2 << 30, prefix_cache: true });
    let ttft = |s: &mut crate::engine::RequestStream, t0: Instant| -> anyhow::Result<f64> {
        match s.blocking_next() {
            Some(Event::Token { .. }) => Ok(t0.elapsed().as_secs_f64() * 1e3),
            Some(Event::Error(e)) => anyhow::bail!(e),
            Some(Event::Finished { .. }) | None => anyhow::bail!("no token"),
        }
    };
    let short = |i: usize| Request::new(synthetic_prompt(short_tokens, vocab, 500 + i as u64), 1);
    let (mut idle, mut loaded, mut longs) = (Vec::new(), Vec::new(), Vec::new());
    // Warm-up.
    let mut s = engine.submit(short(0))?;
    ttft(&mut s, Instant::now())?;
    for round in 0..rounds.max(1) {
        let t0 = Instant::now();
        let mut s = engine.submit(short(round))?;
        idle.push(ttft(&mut s, t0)?);
        drop(s);
        let t_long = Instant::now();
        let mut long = engine.submit(Request::new(synthetic_prompt(long_tokens, vocab, 900 + round as u64), 1))?;
        // Let the long prompt get going: wait for its first few steps.
        let steps0 = engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed);
        while engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed) < steps0 + 2 {
            std::thread::yield_now();
        }
        let t0 = Instant::now();
        let mut s = engine.submit(short(round))?;
        loaded.push(ttft(&mut s, t0)?);
        longs.push(ttft(&mut long, t_long)?);
    }
    engine.shutdown(std::time::Duration::from_secs(5));
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (i, l) = (median(idle), median(loaded));
    Ok(TtftReport {
        long_prompt_tokens: long_tokens,
        short_prompt_tokens: short_tokens,
        max_batch_tokens: budget,
        idle_ttft_ms: i,
        loaded_ttft_ms: l,
        ratio: l / i,
        long_ttft_ms: median(longs),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefixCacheReport {
    pub history_tokens: usize,
    pub turn_tokens: usize,
    /// Median time to first token of a conversation's second turn (the whole history resent),
    /// without and with prefix caching.
    pub second_turn_ttft_off_ms: f64,
    pub second_turn_ttft_on_ms: f64,
    pub second_turn_speedup: f64,
    pub system_tokens: usize,
    pub user_tokens: usize,
    pub shared_requests: usize,
    /// Prompt tokens the model computed for `shared_requests` requests submitted together,
    /// sharing a system prompt (medians over rounds), without and with prefix caching.
    pub shared_computed_off: u64,
    pub shared_computed_on: u64,
    /// `on / off`: 1/`shared_requests` would be perfect sharing of the system prompt.
    pub shared_computed_ratio: f64,
    /// Wall time from submission to the last first token, without and with.
    pub shared_wall_off_ms: f64,
    pub shared_wall_on_ms: f64,
}

/// Prefix caching, measured against the same engine settings without it (two engines, rounds
/// interleaved, fresh prompts every round so no round reuses another's blocks):
/// - a conversation's second turn: turn 1 is a `history`-token prompt generating `turn` tokens;
///   turn 2 resends all of it plus a `turn`-token user message; its time to first token;
/// - `n` requests submitted at once sharing a `system`-token prompt, each with its own
///   `user`-token message: the prompt tokens actually computed.
#[allow(clippy::too_many_arguments)]
pub fn prefix_cache(
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    history: usize,
    turn: usize,
    system: usize,
    user: usize,
    n: usize,
    rounds: usize,
) -> anyhow::Result<PrefixCacheReport> {
    use std::sync::atomic::Ordering::Relaxed;
    let vocab = model.config().vocab_size;
    let spawn = |on: bool| {
        let scheduler = SchedulerConfig { max_waiting: n.max(4), ..Default::default() };
        EngineHandle::spawn(
            model.clone(),
            tokenizer.clone(),
            EngineConfig { scheduler, kv_cache_bytes: 4 << 30, prefix_cache: on },
        )
    };
    let engines = [spawn(false), spawn(true)];
    let first_token = |s: &mut crate::engine::RequestStream| -> anyhow::Result<(Instant, Vec<u32>)> {
        let mut ids = Vec::new();
        let mut first = None;
        loop {
            match s.blocking_next() {
                Some(Event::Token { id, .. }) => {
                    first.get_or_insert_with(Instant::now);
                    ids.push(id);
                }
                Some(Event::Finished { .. }) => return Ok((first.ok_or_else(|| anyhow::anyhow!("no token"))?, ids)),
                Some(Event::Error(e)) => anyhow::bail!(e),
                None => anyhow::bail!("stream closed"),
            }
        }
    };
    let request = |prompt: Vec<u32>, max_tokens: usize| {
        let mut r = Request::new(prompt, max_tokens);
        r.ignore_eos = true;
        r
    };
    let (mut ttft, mut computed, mut wall) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
    // Warm-up.
    for e in &engines {
        first_token(&mut e.submit(request(synthetic_prompt(32, vocab, 7), 2))?)?;
    }
    for round in 0..rounds.max(1) {
        for (i, e) in engines.iter().enumerate() {
            let salt = (round * 2 + i) as u64 * 1000;
            // Second turn of a conversation.
            let turn1 = synthetic_prompt(history, vocab, salt + 1);
            let (_, answer) = first_token(&mut e.submit(request(turn1.clone(), turn))?)?;
            let mut turn2 = turn1;
            turn2.extend(answer);
            turn2.extend(synthetic_prompt(turn, vocab, salt + 2));
            let t0 = Instant::now();
            let (t, _) = first_token(&mut e.submit(request(turn2, 1))?)?;
            ttft[i].push((t - t0).as_secs_f64() * 1e3);
            // Requests sharing a system prompt, submitted together.
            let sys = synthetic_prompt(system, vocab, salt + 3);
            let before = e.stats().forward_tokens.load(Relaxed);
            let t0 = Instant::now();
            let mut streams = (0..n)
                .map(|k| {
                    let mut p = sys.clone();
                    p.extend(synthetic_prompt(user, vocab, salt + 10 + k as u64));
                    e.submit(request(p, 1))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut last = t0;
            for s in &mut streams {
                last = last.max(first_token(s)?.0);
            }
            wall[i].push((last - t0).as_secs_f64() * 1e3);
            computed[i].push((e.stats().forward_tokens.load(Relaxed) - before) as f64);
        }
    }
    for e in &engines {
        e.shutdown(std::time::Duration::from_secs(5));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t_off, t_on) = (median(&mut ttft[0]), median(&mut ttft[1]));
    let (c_off, c_on) = (median(&mut computed[0]), median(&mut computed[1]));
    Ok(PrefixCacheReport {
        history_tokens: history,
        turn_tokens: turn,
        second_turn_ttft_off_ms: t_off,
        second_turn_ttft_on_ms: t_on,
        second_turn_speedup: t_off / t_on,
        system_tokens: system,
        user_tokens: user,
        shared_requests: n,
        shared_computed_off: c_off as u64,
        shared_computed_on: c_on as u64,
        shared_computed_ratio: c_on / c_off,
        shared_wall_off_ms: median(&mut wall[0]),
        shared_wall_on_ms: median(&mut wall[1]),
    })
}

#[cfg(test)]
mod tests {
    use super::{PairedRatio, usage_completion_tokens};

    /// A paired ratio is the median of the per-round ratios, with their range; no rounds is NaN,
    /// never a panic.
    #[test]
    fn paired_ratio_is_the_median_of_rounds() {
        let r = PairedRatio::of(vec![0.9, 0.7, 0.85, 1.1, 0.8]);
        assert_eq!(r, PairedRatio { median: 0.85, min: 0.7, max: 1.1 });
        assert_eq!(r.to_string(), "0.850 (rounds 0.70–1.10)");
        assert!(PairedRatio::of(Vec::new()).median.is_nan());
    }

    /// `bench serve` counts tokens from the usage chunk, not content chunks.
    #[test]
    fn completion_tokens_come_from_the_usage_chunk() {
        let parse = |s: &str| usage_completion_tokens(&serde_json::from_str(s).unwrap());
        let usage =
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":31,"completion_tokens":128,"total_tokens":159}}"#;
        assert_eq!(parse(usage), Some(128));
        let content = r#"{"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
        assert_eq!(parse(content), None);
        assert_eq!(parse(r#"{"choices":[]}"#), None);
    }
}
