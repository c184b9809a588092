//! Admission and step planning: which groups run, and which tokens of theirs go into the next
//! forward.
//!
//! - **Admission** is FIFO: the oldest waiting request is admitted as soon as its rows fit under
//!   `max_running_rows` and its whole generation (prompt + `max_tokens`, every row) fits in the KV
//!   budget; nothing overtakes it, so a large request cannot starve. Because memory for the whole
//!   generation is reserved up front, a running group never needs to be preempted.
//! - **Each step** gives every decoding row its one token, then fills a prompt-token budget
//!   (`max_batch_tokens`) with chunks of prefilling rows, *shortest remaining prompt first*. A long prompt is therefore prefilled
//!   over several steps and never stalls the decoders for more than one budget's worth of work
//!   (chunked prefill), and a short request arriving meanwhile is prefilled in the very next step
//!   instead of queueing behind the long prompt's chunks. The budget bounds a step's duration,
//!   hence both inter-token latency and time to first token under load.

use super::engine::{EngineError, too_many_rows};
use super::sequence::{Group, Row};
use crate::model::KvCache;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Rows (sequences) decoding at once; a CFG pair counts two.
    pub max_running_rows: usize,
    /// Prompt tokens per forward step (chunked prefill), on top of one token per decoding row.
    /// Bounds how much prefill work can lengthen a step, hence inter-token latency and time to
    /// first token under load.
    pub max_batch_tokens: usize,
    /// Requests allowed to wait for admission; more is an `Overloaded` error.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running_rows: 32,
            // Measured on 2 cores with SmolLM2-135M: 32 keeps a short request's time to first
            // token within 2x of idle while a 2,000-token prompt prefills (64: 3.7x), at some
            // cost in long-prompt prefill speed (docs/BENCHMARKS.md).
            max_batch_tokens: 32,
            max_waiting: 256,
        }
    }
}

/// One entry of a step: `tokens` of row `row` of running group `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRow {
    pub group: usize,
    pub row: usize,
    pub n_tokens: usize,
}

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub waiting: VecDeque<Group>,
    pub running: Vec<Group>,
    reserved_bytes: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self { cfg, waiting: VecDeque::new(), running: Vec::new(), reserved_bytes: 0 }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn running_rows(&self) -> usize {
        self.running.iter().map(|g| g.rows.len()).sum()
    }

    /// KV bytes a group needs for its whole generation.
    pub fn kv_need(kv: &KvCache, g: &Group) -> usize {
        g.row_prompts().iter().map(|p| kv.bytes_for_tokens(p.len() + g.req.max_tokens)).sum()
    }

    /// Removes the waiting groups at the head of the queue that can never be admitted (more KV
    /// cache or rows than the limits): FIFO admission would otherwise hold one at the head
    /// forever, and everything behind it. Only decidable when nothing runs, since then the
    /// whole capacity is free, which is also the only time such a head blocks anything for
    /// good; while requests run this costs nothing. The submit path checks the same limits up
    /// front; this is the guarantee that a miss there cannot wedge the engine.
    pub fn take_unfittable(&mut self, kv: &KvCache) -> Vec<(Group, EngineError)> {
        let mut out = Vec::new();
        if !self.running.is_empty() {
            return out;
        }
        while let Some(g) = self.waiting.front() {
            let (rows, needed, limit) = (g.req.n_rows(), Self::kv_need(kv, g), kv.limit_bytes());
            let error = if rows > self.cfg.max_running_rows {
                too_many_rows(rows, self.cfg.max_running_rows)
            } else if needed > limit {
                EngineError::TooLarge { needed, limit }
            } else {
                break;
            };
            out.push((self.waiting.pop_front().expect("front exists"), error));
        }
        out
    }

    /// Moves waiting groups to running, oldest first, while they fit. Returns how many.
    pub fn admit(&mut self, kv: &mut KvCache) -> usize {
        let mut admitted = 0;
        while let Some(g) = self.waiting.front() {
            let rows = g.req.n_rows();
            // Prefix-cache blocks already held by running rows are counted once, by the cache.
            let seed = g.prefix_seed(kv);
            let specs: Vec<_> = g.row_prompts().into_iter().map(|p| (seed, p, p.len() + g.req.max_tokens)).collect();
            let need = kv.admission_bytes(&specs);
            let rows_ok = self.running_rows() + rows <= self.cfg.max_running_rows;
            let kv_ok = kv.committed_bytes() + need <= kv.limit_bytes();
            if !(rows_ok && kv_ok) {
                break;
            }
            let mut g = self.waiting.pop_front().expect("front exists");
            let prompts: Vec<Vec<u32>> = g.row_prompts().iter().map(|p| p.to_vec()).collect();
            let target = g.req.max_tokens;
            g.rows = prompts
                .into_iter()
                .map(|p| {
                    let (seq, cached) = kv.add_sequence_cached(seed, &p, p.len() + target);
                    g.cached_tokens.push(cached);
                    Row::with_cached(seq, p, cached)
                })
                .collect();
            g.kv_reserved = need;
            g.admitted = Some(std::time::Instant::now());
            self.reserved_bytes += need;
            self.running.push(g);
            admitted += 1;
        }
        admitted
    }

    /// Removes running group `i`, freeing its rows and reservation.
    pub fn finish(&mut self, i: usize, kv: &mut KvCache) -> Group {
        let g = self.running.swap_remove(i);
        for r in &g.rows {
            kv.remove_sequence(r.seq);
        }
        self.reserved_bytes -= g.kv_reserved;
        g
    }

    /// The rows and token counts of the next step.
    pub fn plan(&self) -> Vec<PlannedRow> {
        let mut plan = Vec::new();
        // Decoders first: one token each.
        for (gi, g) in self.running.iter().enumerate() {
            for (ri, r) in g.rows.iter().enumerate() {
                if r.remaining() == 1 && r.logits.is_none() {
                    plan.push(PlannedRow { group: gi, row: ri, n_tokens: 1 });
                }
            }
        }
        let mut budget = self.cfg.max_batch_tokens;
        // Then prompt chunks, shortest remaining prompt first (ties: oldest request first).
        let mut prefilling: Vec<(usize, usize, usize, u64)> = self
            .running
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| {
                g.rows
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.is_prefilling())
                    .map(move |(ri, r)| (gi, ri, r.remaining(), g.id))
            })
            .collect();
        prefilling.sort_by_key(|&(_, _, remaining, id)| (remaining, id));
        for (gi, ri, remaining, _) in prefilling {
            if budget == 0 {
                break;
            }
            let n = remaining.min(budget);
            plan.push(PlannedRow { group: gi, row: ri, n_tokens: n });
            budget -= n;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Event, Request};
    use crate::model::kv_cache::KvStoreKind;
    use crate::model::{Arch, KvDtype, ModelConfig, RopeStyle};

    fn kv(limit_bytes: usize) -> KvCache {
        let cfg = ModelConfig {
            arch: Arch::Llama,
            name: "t".into(),
            hidden_size: 16,
            intermediate_size: 32,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
            vocab_size: 32,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Half,
            rope_scaling: None,
            max_context: 256,
            tie_embeddings: true,
            qkv_bias: false,
        };
        KvCache::new(&cfg, KvStoreKind::Paged, candle_core::Device::Cpu, limit_bytes, KvDtype::F32)
    }

    fn group(id: u64, prompt_len: usize, max_tokens: usize) -> (Group, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Group::new(id, Request::new(vec![1; prompt_len], max_tokens), tx), rx)
    }

    /// A request that can never fit must not sit at the head of the FIFO queue and block the
    /// ones behind it; the ones that fit stay queued, in order.
    #[test]
    fn unfittable_requests_are_taken_out_of_the_queue() {
        let one_block = kv(0).bytes_for_tokens(1);
        let mut kv = kv(2 * one_block);
        let mut s = Scheduler::new(SchedulerConfig { max_running_rows: 4, ..Default::default() });
        let (too_big, _rx0) = group(1, 20, 100); // 8 blocks of 16 positions
        let (small, _rx1) = group(2, 3, 5);
        s.waiting.push_back(too_big);
        s.waiting.push_back(small);
        assert_eq!(s.admit(&mut kv), 0, "the head does not fit and FIFO keeps the rest behind it");
        let out = s.take_unfittable(&kv);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.id, 1);
        assert!(matches!(out[0].1, EngineError::TooLarge { .. }), "{:?}", out[0].1);
        assert_eq!(s.waiting.iter().map(|g| g.id).collect::<Vec<_>>(), [2]);
        assert_eq!(s.admit(&mut kv), 1);
    }
}
