//! `lethe bench quality`: how far each CPU kernel path's predictions are from exact f32
//! arithmetic on the same weights.
//!
//! The quantized kernels round activations to 8 bits per block of 32 (as llama.cpp does), and
//! each instruction set sums in its own order; both change the next-token distribution a
//! little. This measures it on a fixed held-out text (teacher-forced, every position):
//! - perplexity of each path;
//! - mean and 99th-percentile KL(f32 ‖ path) of the next-token distributions, the f32 path being
//!   the same model with every weight dequantized to f32 and f32 activations throughout;
//! - how often the path's top token is the f32 path's;
//! - and, as a sanity check anyone can read, each path's greedy answer to a short question.
//!
//! The held-out text (`heldout.txt`) was written for this benchmark, so no model has seen it.

use crate::model::kernels::matmul::{ActPrecision, act_precision, set_act_precision};
use crate::model::{BatchEntry, KvDtype, Llama, RaggedBatch};
use crate::simd::Isa;
use crate::tokenizer::{ChatMessage, Tokenizer};
use serde::Serialize;

/// The default held-out text.
pub const HELDOUT_TEXT: &str = include_str!("heldout.txt");

/// The question whose greedy answer is shown per path.
pub const QUESTION: &str = "What is the capital of France?";

/// Positions scored per forward (teacher forcing in chunks, through the KV cache).
const CHUNK: usize = 64;

/// One kernel path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PathQuality {
    /// The kernel set.
    pub kernels: &'static str,
    /// How activations are rounded for the quantized weights (`int8`, `int16`).
    pub activations: &'static str,
    pub perplexity: f64,
    /// Mean over positions of KL(f32 ‖ this path), in nats.
    pub mean_kl: f64,
    pub p99_kl: f64,
    /// Share of positions whose most likely token is the f32 path's.
    pub top1_agreement: f64,
    /// Greedy answer to [`QUESTION`].
    pub answer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub model: String,
    pub weights: String,
    /// Tokens of held-out text scored (positions predicted = tokens − 1).
    pub tokens: usize,
    pub reference_perplexity: f64,
    pub reference_answer: String,
    pub paths: Vec<PathQuality>,
}

/// A model run with one kernel set: its own KV cache, advanced chunk by chunk.
struct Run<'a> {
    model: &'a Llama,
    path: Path,
    kv: crate::model::KvCache,
    seq: crate::model::SeqId,
}

/// A kernel set and an activation precision.
pub type Path = (Isa, ActPrecision);

fn activate((isa, precision): Path) -> anyhow::Result<()> {
    crate::simd::activate(isa)?;
    set_act_precision(precision);
    Ok(())
}

impl<'a> Run<'a> {
    fn new(model: &'a Llama, path: Path, dtype: KvDtype) -> Self {
        let mut kv = model.new_kv_cache_with_dtype(1 << 30, dtype);
        let seq = kv.add_sequence();
        Self { model, path, kv, seq }
    }

    /// Log-probabilities of every position of `tokens` (appended to the sequence).
    fn log_probs(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<Vec<f32>>> {
        activate(self.path)?;
        let mut e = BatchEntry::last(self.seq, tokens.to_vec());
        e.all_logits = true;
        let logits = self.model.forward(&RaggedBatch::new(vec![e]), &mut self.kv)?;
        Ok(logits
            .positions(0)
            .map(|l| {
                let mut lp = vec![0f32; l.len()];
                crate::guidance::log_softmax(l, &mut lp);
                lp
            })
            .collect())
    }
}

/// Greedy continuation of `prompt` (up to `max` tokens, stopping at EOS) on `path`.
fn greedy(model: &Llama, tok: &Tokenizer, path: Path, prompt: &[u32], max: usize) -> anyhow::Result<String> {
    activate(path)?;
    let mut kv = model.new_kv_cache(1 << 28);
    let s = kv.add_sequence();
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max {
        let l = model.forward(&RaggedBatch::new(vec![BatchEntry::last(s, next)]), &mut kv)?;
        let t = crate::sampling::argmax(l.last(0));
        if tok.is_eos(t) {
            break;
        }
        out.push(t);
        next = vec![t];
    }
    Ok(tok.decode(&out, true)?.trim().to_string())
}

/// Scores `text` with `reference` (f32 weights: the f32 path) and with `candidate` on each
/// path (kernel set, activation precision). Both are switched process-wide, one forward at a
/// time; the ones active before are restored at the end.
pub fn measure(
    reference: &Llama,
    candidate: &Llama,
    tok: &Tokenizer,
    text: &str,
    max_tokens: usize,
    paths: &[Path],
) -> anyhow::Result<QualityReport> {
    let before = (crate::simd::active(), act_precision());
    let result = measure_inner(reference, candidate, tok, text, max_tokens, paths);
    activate(before)?;
    result
}

fn measure_inner(
    reference: &Llama,
    candidate: &Llama,
    tok: &Tokenizer,
    text: &str,
    max_tokens: usize,
    paths: &[Path],
) -> anyhow::Result<QualityReport> {
    let mut tokens = tok.encode_prompt(text)?;
    tokens.truncate(max_tokens.min(reference.config().max_context));
    anyhow::ensure!(tokens.len() >= 2, "the held-out text is too short to score");
    // f32 weights take no activation rounding; the precision is irrelevant there.
    let best = (Isa::best(), ActPrecision::Int8);
    let mut reference_run = Run::new(reference, best, KvDtype::F32);
    let mut runs: Vec<Run> = paths.iter().map(|&p| Run::new(candidate, p, KvDtype::default())).collect();
    let mut ref_nll = 0f64;
    let mut nll = vec![0f64; paths.len()];
    let mut kls: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut agree = vec![0usize; paths.len()];
    let inputs = &tokens[..tokens.len() - 1];
    for (c, chunk) in inputs.chunks(CHUNK).enumerate() {
        let targets = &tokens[c * CHUNK + 1..][..chunk.len()];
        let want = reference_run.log_probs(chunk)?;
        for (p, run) in runs.iter_mut().enumerate() {
            let got = run.log_probs(chunk)?;
            for ((w, g), &t) in want.iter().zip(&got).zip(targets) {
                nll[p] -= g[t as usize] as f64;
                let kl: f64 = w.iter().zip(g).map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64)).sum();
                kls[p].push(kl.max(0.0));
                agree[p] += usize::from(crate::sampling::argmax(w) == crate::sampling::argmax(g));
            }
        }
        ref_nll -= want.iter().zip(targets).map(|(w, &t)| w[t as usize] as f64).sum::<f64>();
    }
    let n = inputs.len() as f64;
    let question = tok.encode_chat(&[ChatMessage::user(QUESTION)], true)?;
    let mut out = Vec::new();
    for (p, &path) in paths.iter().enumerate() {
        let mut k = std::mem::take(&mut kls[p]);
        k.sort_by(f64::total_cmp);
        out.push(PathQuality {
            kernels: path.0.name(),
            activations: path.1.name(),
            perplexity: (nll[p] / n).exp(),
            mean_kl: k.iter().sum::<f64>() / n,
            p99_kl: k[((k.len() - 1) as f64 * 0.99).round() as usize],
            top1_agreement: agree[p] as f64 / n,
            answer: greedy(candidate, tok, path, &question, 16)?,
        });
    }
    Ok(QualityReport {
        model: candidate.config().name.clone(),
        weights: candidate.weights_desc().to_string(),
        tokens: tokens.len(),
        reference_perplexity: (ref_nll / n).exp(),
        reference_answer: greedy(reference, tok, best, &question, 16)?,
        paths: out,
    })
}
