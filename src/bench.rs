//! Benchmarks behind `lethe bench`: measured side by side in one process, printed as numbers
//! that scripts can read (`--json`).

use crate::engine::{EngineConfig, EngineHandle, Event, Request, SchedulerConfig};
use crate::guidance::{Guidance, GuidanceMode};
use crate::model::{BatchEntry, Llama, RaggedBatch, SeqId};
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
}

/// Model-level decode benchmark: `batch` sequences prefilled with `prompt_tokens` each (one
/// ragged step), then `gen_tokens` decode steps of `batch` rows.
pub fn decode(model: &Llama, batch: usize, prompt_tokens: usize, gen_tokens: usize) -> anyhow::Result<DecodeReport> {
    let vocab = model.config().vocab_size;
    let mut kv = model.new_kv_cache(usize::MAX / 2);
    let seqs: Vec<SeqId> = (0..batch).map(|_| kv.add_sequence()).collect();
    // Warm-up on a throwaway sequence: first-touch page faults and thread start-up.
    let w = kv.add_sequence();
    model.forward(&RaggedBatch::new(vec![BatchEntry::last(w, synthetic_prompt(8, vocab, 99))]), &mut kv)?;
    for _ in 0..3 {
        model.forward(&RaggedBatch::new(vec![BatchEntry::last(w, vec![200])]), &mut kv)?;
    }
    kv.remove_sequence(w);

    let prefill = RaggedBatch::new(
        seqs.iter()
            .enumerate()
            .map(|(i, &s)| BatchEntry::last(s, synthetic_prompt(prompt_tokens, vocab, i as u64)))
            .collect(),
    );
    let t0 = Instant::now();
    let mut logits = model.forward(&prefill, &mut kv)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..gen_tokens {
        let step = RaggedBatch::new(
            seqs.iter()
                .enumerate()
                .map(|(i, &s)| BatchEntry::last(s, vec![crate::sampling::argmax(logits.last(i))]))
                .collect(),
        );
        logits = model.forward(&step, &mut kv)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(DecodeReport {
        model: model.config().name.clone(),
        weights: model.weights_desc().to_string(),
        threads: crate::model::kernels::pool::global().n_threads(),
        batch,
        prompt_tokens,
        gen_tokens,
        prefill_tok_s: (batch * prompt_tokens) as f64 / prefill_s,
        decode_steps_s: gen_tokens as f64 / decode_s,
        decode_tok_s: (batch * gen_tokens) as f64 / decode_s,
        step_ms: decode_s * 1e3 / gen_tokens as f64,
        peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub model: String,
    pub weights: String,
    pub concurrency: usize,
    pub guided: bool,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Mean over requests of generated tokens / (last token − first token).
    pub per_request_tok_s: f64,
    /// All generated tokens / wall time from submission to the last finish.
    pub aggregate_tok_s: f64,
    /// Engine forward steps per second of wall time.
    pub decode_steps_s: f64,
    /// Mean time to first token, in milliseconds.
    pub ttft_ms: f64,
    pub peak_rss_bytes: u64,
}

/// Engine-level benchmark: `concurrency` simultaneous requests (CFG pairs if `guided`), each
/// generating exactly `gen_tokens` tokens.
pub fn engine(
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    concurrency: usize,
    guided: Option<Guidance>,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> anyhow::Result<EngineReport> {
    let vocab = model.config().vocab_size;
    let rows = concurrency * if guided.is_some() { 2 } else { 1 };
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_running_rows: rows.max(1),
            max_batch_tokens: (rows * prompt_tokens).max(rows).max(512),
            max_waiting: concurrency.max(1),
        },
        kv_cache_bytes: 8 << 30,
    };
    let (name, weights) = (model.config().name.clone(), model.weights_desc().to_string());
    let engine = EngineHandle::spawn(model, tokenizer, cfg);
    let make = |i: usize| {
        let mut r = Request::new(synthetic_prompt(prompt_tokens, vocab, i as u64), gen_tokens);
        r.ignore_eos = true;
        if let Some(g) = guided {
            r = r.guided(synthetic_prompt(prompt_tokens, vocab, 1000 + i as u64), g);
        }
        r
    };
    // Warm-up request.
    let mut s = engine.submit(make(usize::MAX / 2))?;
    while let Some(e) = s.blocking_next() {
        if matches!(e, Event::Finished { .. } | Event::Error(_)) {
            break;
        }
    }
    let steps0 = engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    let streams: Vec<_> = (0..concurrency).map(|i| engine.submit(make(i))).collect::<Result<_, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> anyhow::Result<(f64, f64, usize)> {
                let start = Instant::now();
                let (mut first, mut last, mut n) = (None, start, 0);
                while let Some(e) = s.blocking_next() {
                    match e {
                        Event::Token { .. } => {
                            let now = Instant::now();
                            first.get_or_insert(now);
                            last = now;
                            n += 1;
                        }
                        Event::Finished { .. } => break,
                        Event::Error(m) => anyhow::bail!(m),
                    }
                }
                let first = first.unwrap_or(start);
                let rate = if n > 1 { (n - 1) as f64 / (last - first).as_secs_f64() } else { 0.0 };
                Ok((rate, (first - start).as_secs_f64(), n))
            })
        })
        .collect();
    let mut rates = Vec::new();
    let mut ttfts = Vec::new();
    let mut total = 0;
    for h in handles {
        let (rate, ttft, n) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        rates.push(rate);
        ttfts.push(ttft);
        total += n;
    }
    let wall = t0.elapsed().as_secs_f64();
    let steps = engine.stats().steps.load(std::sync::atomic::Ordering::Relaxed) - steps0;
    engine.shutdown(std::time::Duration::from_secs(5));
    Ok(EngineReport {
        model: name,
        weights,
        concurrency,
        guided: guided.is_some(),
        prompt_tokens,
        gen_tokens,
        per_request_tok_s: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        aggregate_tok_s: total as f64 / wall,
        decode_steps_s: steps as f64 / wall,
        ttft_ms: ttfts.iter().sum::<f64>() * 1e3 / ttfts.len().max(1) as f64,
        peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
    })
}

/// Default guidance for benchmarks: the paper's γ = 3, log mode.
pub fn default_guidance() -> Guidance {
    Guidance {
        gamma: 3.0,
        mode: GuidanceMode::Log,
    }
}
