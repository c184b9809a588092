//! Teacher-forced scoring with the model's forward (in process only): the guided log-probability
//! of given continuation tokens, and the KL divergence from a reference row at each position.
//! Perplexity, multiple-choice accuracy and the membership signal are built on it.
//!
//! The rows are the serving rows (the same prompt functions, adapters applied per row as in the
//! engine); the engine itself only returns sampled tokens, so scoring runs the same model forward
//! on a KV cache of its own. Run it while the engine is idle: both use the kernel thread pool.

use super::metrics::{Mixing, kl, log_distribution};
use crate::model::lora::LoraWeights;
use crate::model::{BatchEntry, KvCache, Llama, RaggedBatch, SeqId};
use std::sync::Arc;

/// One thing to score: the rows' prompts and the continuation they share.
#[derive(Debug, Clone)]
pub struct ScoreItem {
    /// The cond row's prompt (the only row when unguided).
    pub cond: Vec<u32>,
    /// The uncond row's prompt (guided with γ ≠ 1).
    pub uncond: Option<Vec<u32>>,
    /// A reference row's prompt (e.g. the base model, unguided), for the KL divergence.
    pub reference: Option<Vec<u32>>,
    /// Tokens after the prompt; each is predicted from everything before it.
    pub continuation: Vec<u32>,
    /// Continuation positions before this index are context, not scored.
    pub score_from: usize,
}

/// The scores of one item, per scored continuation token.
#[derive(Debug, Clone, Default)]
pub struct ItemScore {
    pub logprobs: Vec<f32>,
    /// KL(reference ‖ mixed) at each scored position, when the item had a reference row.
    pub kl: Vec<f64>,
    /// The mixed log-distribution at the last continuation position, when asked for.
    pub last: Option<Vec<f32>>,
}

/// Which adapters each kind of row uses.
#[derive(Clone, Default)]
pub struct RowAdapters {
    pub scored: Vec<Arc<LoraWeights>>,
    pub reference: Vec<Arc<LoraWeights>>,
}

pub struct Scorer {
    model: Arc<Llama>,
    kv: KvCache,
    /// Scored positions × rows per forward (bounds the logits kept in memory).
    position_budget: usize,
}

impl Scorer {
    pub fn new(model: Arc<Llama>) -> Self {
        let kv = model.new_kv_cache(1 << 30);
        Self { model, kv, position_budget: 384 }
    }

    /// Scores `items` under `mixing`; `keep_last` also returns the full distribution at the last
    /// position (multiple choice).
    pub fn score(
        &mut self,
        items: &[ScoreItem],
        mixing: Mixing,
        adapters: &RowAdapters,
        keep_last: bool,
    ) -> anyhow::Result<Vec<ItemScore>> {
        let mut out = Vec::with_capacity(items.len());
        let mut start = 0;
        while start < items.len() {
            // As many items as fit the position budget (at least one).
            let mut end = start;
            let mut positions = 0;
            while end < items.len() {
                let it = &items[end];
                let rows = 1 + usize::from(it.uncond.is_some()) + usize::from(it.reference.is_some());
                let p = rows * it.continuation.len().max(1);
                if end > start && positions + p > self.position_budget {
                    break;
                }
                positions += p;
                end += 1;
            }
            out.extend(self.score_chunk(&items[start..end], mixing, adapters, keep_last)?);
            start = end;
        }
        Ok(out)
    }

    fn score_chunk(
        &mut self,
        items: &[ScoreItem],
        mixing: Mixing,
        adapters: &RowAdapters,
        keep_last: bool,
    ) -> anyhow::Result<Vec<ItemScore>> {
        // Each row: its prompt without the last token is prefilled first; then the last prompt
        // token and the continuation (minus its last token) run with every position's logits.
        struct Row {
            seq: SeqId,
            prompt: Vec<u32>,
            adapters: Vec<Arc<LoraWeights>>,
        }
        let mut rows: Vec<[Option<usize>; 3]> = Vec::new();
        let mut all: Vec<Row> = Vec::new();
        for it in items {
            anyhow::ensure!(!it.cond.is_empty(), "empty prompt");
            anyhow::ensure!(!it.continuation.is_empty(), "empty continuation");
            let mut idx = [None; 3];
            for (k, (prompt, ad)) in [
                (Some(&it.cond), &adapters.scored),
                (it.uncond.as_ref(), &adapters.scored),
                (it.reference.as_ref(), &adapters.reference),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(p) = prompt {
                    anyhow::ensure!(!p.is_empty(), "empty prompt");
                    idx[k] = Some(all.len());
                    all.push(Row { seq: self.kv.add_sequence(), prompt: p.clone(), adapters: ad.clone() });
                }
            }
            rows.push(idx);
        }
        let result = (|| -> anyhow::Result<Vec<ItemScore>> {
            let prefill: Vec<BatchEntry> = all
                .iter()
                .filter(|r| r.prompt.len() > 1)
                .map(|r| {
                    BatchEntry::last(r.seq, r.prompt[..r.prompt.len() - 1].to_vec()).with_adapters(r.adapters.clone())
                })
                .collect();
            if !prefill.is_empty() {
                self.model.forward(&RaggedBatch::new(prefill), &mut self.kv)?;
            }
            let mut entries = Vec::with_capacity(all.len());
            for (it, idx) in items.iter().zip(&rows) {
                for r in idx.iter().flatten() {
                    let row = &all[*r];
                    let mut tokens = vec![*row.prompt.last().expect("non-empty")];
                    tokens.extend_from_slice(&it.continuation[..it.continuation.len() - 1]);
                    let mut e = BatchEntry::last(row.seq, tokens).with_adapters(row.adapters.clone());
                    e.all_logits = true;
                    entries.push(e);
                }
            }
            let logits = self.model.forward(&RaggedBatch::new(entries), &mut self.kv)?;
            // Entries were pushed in `all` order, so a row's index in `all` is its entry index.
            let mut scores = Vec::with_capacity(items.len());
            let (mut dist, mut refd) = (Vec::new(), Vec::new());
            for (it, idx) in items.iter().zip(&rows) {
                let positions = |i: Option<usize>| i.map(|i| logits.positions(i).collect::<Vec<_>>());
                let cond = positions(idx[0]).expect("every item has a cond row");
                let uncond = positions(idx[1]);
                let reference = positions(idx[2]);
                let mut s = ItemScore::default();
                let n = it.continuation.len();
                for t in it.score_from.min(n)..n {
                    let u = uncond.as_ref().map(|u| u[t]);
                    log_distribution(cond[t], u, mixing, &mut dist);
                    s.logprobs.push(dist[it.continuation[t] as usize]);
                    if let Some(r) = &reference {
                        log_distribution(r[t], None, Mixing::Plain, &mut refd);
                        s.kl.push(kl(&refd, &dist));
                    }
                    if keep_last && t == n - 1 {
                        s.last = Some(dist.clone());
                    }
                }
                scores.push(s);
            }
            Ok(scores)
        })();
        for r in &all {
            self.kv.remove_sequence(r.seq);
        }
        result
    }
}
