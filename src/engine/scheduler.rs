//! Admission and step planning: which groups run, and which tokens of theirs go into the next
//! forward.
//!
//! - **Admission** is fair between tenants and FIFO within one: the next request considered is
//!   the oldest waiting request of the tenant that runs the fewest rows per unit of weight (its
//!   policy's `weight`), among the tenants under their own `max_running_rows`. It is admitted as
//!   soon as its rows fit under `max_running_rows` and its whole generation (prompt +
//!   `max_tokens`, every row) fits in the KV budget; nothing overtakes it meanwhile, so a large
//!   request cannot starve. A tenant that floods the queue therefore delays another tenant's
//!   request by the few steps it takes for rows to free up, not by its whole backlog. Because
//!   memory for the whole generation is reserved up front, a running group never needs to be
//!   preempted.
//! - **Each step** gives every decoding row its one token, then fills a prompt-token budget
//!   (`max_batch_tokens`) with chunks of prefilling rows, *shortest remaining prompt first*. A long prompt is therefore prefilled
//!   over several steps and never stalls the decoders for more than one budget's worth of work
//!   (chunked prefill), and a short request arriving meanwhile is prefilled in the very next step
//!   instead of queueing behind the long prompt's chunks. The budget bounds a step's duration,
//!   hence both inter-token latency and time to first token under load. *Aging* bounds the wait
//!   of a long prompt behind a steady stream of short ones: a prompt passed over (given no
//!   tokens) in `max_prefill_wait_steps` steps goes before every other prompt (oldest first). Only
//!   steps it was passed over count: a long prompt that is being prefilled, chunk after chunk,
//!   never ages, so short prompts arriving meanwhile still go first.

use super::engine::{EngineError, too_many_rows};
use super::sequence::{Group, Row};
use crate::model::KvCache;
use std::collections::{HashMap, VecDeque};

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
    /// Steps a prefilling request may be passed over (given no prompt tokens) before its prompt
    /// goes first, whatever its length (aging: shortest-prompt-first would otherwise let a
    /// stream of short prompts starve a long one).
    pub max_prefill_wait_steps: usize,
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
            max_prefill_wait_steps: 16,
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
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self { cfg, waiting: VecDeque::new(), running: Vec::new() }
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

    /// Removes the waiting groups that can never be admitted (more KV cache or rows than the
    /// limits): admission would otherwise hold one at the head of its tenant's queue forever,
    /// and everything behind it. Only decidable when nothing runs, since then the whole
    /// capacity is free, which is also the only time such a group blocks anything for good;
    /// while requests run this costs nothing. The submit path checks the same limits up front;
    /// this is the guarantee that a miss there cannot wedge the engine.
    pub fn take_unfittable(&mut self, kv: &KvCache) -> Vec<(Group, EngineError)> {
        let mut out = Vec::new();
        if !self.running.is_empty() {
            return out;
        }
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        for g in std::mem::take(&mut self.waiting) {
            let (rows, needed, limit) = (g.req.n_rows(), Self::kv_need(kv, &g), kv.limit_bytes());
            let max_rows =
                g.req.limits.max_running_rows.map_or(self.cfg.max_running_rows, |t| t.min(self.cfg.max_running_rows));
            if rows > max_rows {
                out.push((g, too_many_rows(rows, max_rows)));
            } else if needed > limit {
                out.push((g, EngineError::TooLarge { needed, limit }));
            } else {
                keep.push_back(g);
            }
        }
        self.waiting = keep;
        out
    }

    /// Running rows per tenant.
    pub fn rows_by_tenant(&self) -> HashMap<&str, usize> {
        let mut by: HashMap<&str, usize> = HashMap::new();
        for g in &self.running {
            *by.entry(g.req.tenant.as_str()).or_default() += g.rows.len();
        }
        by
    }

    /// The waiting group to admit next: the oldest of the tenant running the fewest rows per
    /// unit of weight (ties: the oldest request), among tenants with room under their own row
    /// limit. `None` when no tenant may admit anything.
    fn next_candidate(&self) -> Option<usize> {
        let running = self.rows_by_tenant();
        let mut seen: Vec<&str> = Vec::new();
        let mut best: Option<(f64, u64, usize)> = None;
        for (i, g) in self.waiting.iter().enumerate() {
            let tenant = g.req.tenant.as_str();
            if seen.contains(&tenant) {
                continue;
            }
            seen.push(tenant);
            let rows = running.get(tenant).copied().unwrap_or(0);
            if g.req.limits.max_running_rows.is_some_and(|max| rows + g.req.n_rows() > max) {
                continue;
            }
            let load = rows as f64 / f64::from(g.req.limits.weight.max(1));
            if best.is_none_or(|(l, id, _)| (load, g.id) < (l, id)) {
                best = Some((load, g.id, i));
            }
        }
        best.map(|(_, _, i)| i)
    }

    /// Moves waiting groups to running, in fair order (`next_candidate`), while they
    /// fit. Returns how many.
    pub fn admit(&mut self, kv: &mut KvCache) -> usize {
        let mut admitted = 0;
        while let Some(i) = self.next_candidate() {
            let g = &self.waiting[i];
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
            let mut g = self.waiting.remove(i).expect("candidate exists");
            // Admitted: its place in the queue (and its tenant's) is free again.
            g.ticket = None;
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
            g.admitted = Some(std::time::Instant::now());
            self.running.push(g);
            admitted += 1;
        }
        admitted
    }

    /// Removes running group `i`, freeing its rows (and with them the KV memory committed to
    /// them, which the cache accounts).
    pub fn finish(&mut self, i: usize, kv: &mut KvCache) -> Group {
        let g = self.running.swap_remove(i);
        for r in &g.rows {
            kv.remove_sequence(r.seq);
        }
        g
    }

    /// The rows and token counts of the next step. Counts a passed-over step for every group
    /// still prefilling that gets no prompt tokens in it (aging).
    pub fn plan(&mut self) -> Vec<PlannedRow> {
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
        // Then prompt chunks: first the prompts that waited too long (oldest first), then the
        // shortest remaining prompt first (ties: oldest request first).
        let max_wait = self.cfg.max_prefill_wait_steps;
        let mut prefilling: Vec<(bool, usize, usize, usize, u64)> = self
            .running
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| {
                g.rows
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.is_prefilling())
                    .map(move |(ri, r)| (g.passed_over_steps < max_wait, gi, ri, r.remaining(), g.id))
            })
            .collect();
        // Aged prompts (`false` sorts first) by age, the others by length.
        prefilling.sort_by_key(|&(young, _, _, remaining, id)| (young, if young { remaining } else { 0 }, id));
        let mut served = vec![false; self.running.len()];
        for (_, gi, ri, remaining, _) in prefilling.iter().copied() {
            if budget == 0 {
                break;
            }
            let n = remaining.min(budget);
            plan.push(PlannedRow { group: gi, row: ri, n_tokens: n });
            served[gi] = true;
            budget -= n;
        }
        for (_, gi, ..) in prefilling {
            if !served[gi] {
                self.running[gi].passed_over_steps += 1;
            }
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

    /// Runs a planned step as the engine would, without a model: every planned row consumes its
    /// tokens; a row that consumed its whole prompt gets a sampled token (it decodes next).
    fn fake_step(s: &mut Scheduler) -> Vec<PlannedRow> {
        let plan = s.plan();
        for p in &plan {
            let r = &mut s.running[p.group].rows[p.row];
            r.cursor += p.n_tokens;
            if r.remaining() == 0 {
                r.pending = vec![1];
                r.cursor = 0;
            }
        }
        plan
    }

    fn is_prefilling(s: &Scheduler, id: u64) -> bool {
        s.running.iter().find(|g| g.id == id).is_some_and(|g| g.rows.iter().any(|r| r.is_prefilling()))
    }

    /// Shortest-prompt-first alone lets a steady stream of short prompts starve a long one; with
    /// aging, the long prompt goes first once it has waited `max_prefill_wait_steps` steps, and
    /// its prefill then ends within its own chunks' worth of steps.
    #[test]
    fn a_long_prompt_is_prefilled_within_the_aging_bound_while_short_ones_keep_coming() {
        let (budget, long_len, wait) = (4, 40, 5);
        let run = |max_prefill_wait_steps: usize| -> Option<usize> {
            let mut kv = kv(64 << 20);
            let cfg = SchedulerConfig {
                max_running_rows: 1000,
                max_batch_tokens: budget,
                max_waiting: 1000,
                max_prefill_wait_steps,
            };
            let mut s = Scheduler::new(cfg);
            let mut keep = Vec::new();
            let (long, rx) = group(1, long_len, 4);
            keep.push(rx);
            s.waiting.push_back(long);
            assert_eq!(s.admit(&mut kv), 1);
            for step in 0..200 {
                // A new short prompt every step, as long as the whole budget.
                let (short, rx) = group(100 + step as u64, budget + 1, 4);
                keep.push(rx);
                s.waiting.push_back(short);
                s.admit(&mut kv);
                fake_step(&mut s);
                if !is_prefilling(&s, 1) {
                    return Some(step + 1);
                }
            }
            None
        };
        assert_eq!(run(usize::MAX), None, "without aging the long prompt starves");
        let steps = run(wait).expect("with aging the long prompt is prefilled");
        let bound = wait + 1 + long_len.div_ceil(budget);
        assert!(steps <= bound, "prefilled after {steps} steps, bound {bound}");
    }

    /// Aging counts only the steps a prompt was passed over: a long prompt that is being
    /// prefilled chunk after chunk, for longer than the aging bound, does not age, and a short
    /// prompt arriving then is still prefilled in the very next step.
    #[test]
    fn a_long_prompt_being_prefilled_does_not_age_ahead_of_a_new_short_one() {
        let (budget, wait) = (4, 3);
        let mut kv = kv(64 << 20);
        let cfg = SchedulerConfig {
            max_running_rows: 100,
            max_batch_tokens: budget,
            max_waiting: 100,
            max_prefill_wait_steps: wait,
        };
        let mut s = Scheduler::new(cfg);
        let (long, _rx) = group(1, 100, 4);
        s.waiting.push_back(long);
        s.admit(&mut kv);
        for _ in 0..4 * wait {
            fake_step(&mut s);
        }
        assert!(is_prefilling(&s, 1));
        let (short, _rx2) = group(2, 3, 4);
        s.waiting.push_back(short);
        s.admit(&mut kv);
        let plan = fake_step(&mut s);
        let short_row = s.running.iter().position(|g| g.id == 2).unwrap();
        assert!(
            plan.iter().any(|p| p.group == short_row && p.n_tokens == 3),
            "the short prompt goes first in the next step: {plan:?}"
        );
        assert!(!is_prefilling(&s, 2));
    }

    fn tenant_group(
        id: u64,
        tenant: &str,
        limits: crate::engine::TenantLimits,
    ) -> (Group, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut req = Request::new(vec![1; 3], 4);
        req.tenant = tenant.into();
        req.limits = limits;
        (Group::new(id, req, tx), rx)
    }

    /// One tenant's backlog does not hold back another tenant: rows go to the tenant running the
    /// fewest (per unit of weight), and a tenant at its own row limit admits nothing more.
    #[test]
    fn admission_is_fair_between_tenants_and_honours_their_row_limits() {
        let mut kv = kv(64 << 20);
        let mut s = Scheduler::new(SchedulerConfig { max_running_rows: 4, ..Default::default() });
        let mut keep = Vec::new();
        let a = crate::engine::TenantLimits { max_running_rows: Some(3), ..Default::default() };
        for id in 1..=20 {
            let (g, rx) = tenant_group(id, "a", a);
            keep.push(rx);
            s.waiting.push_back(g);
        }
        assert_eq!(s.admit(&mut kv), 3, "tenant a stops at its own limit of 3 rows");
        let (b, rx) = tenant_group(21, "b", Default::default());
        keep.push(rx);
        s.waiting.push_back(b);
        assert_eq!(s.admit(&mut kv), 1);
        assert!(s.running.iter().any(|g| g.id == 21), "b is admitted ahead of a's backlog");
        // Rows free up: the next goes to a (b has nothing waiting), within a's limit.
        let i = s.running.iter().position(|g| g.id == 21).unwrap();
        s.finish(i, &mut kv);
        let (b2, rx) = tenant_group(22, "b", Default::default());
        keep.push(rx);
        s.waiting.push_back(b2);
        let i = s.running.iter().position(|g| g.id == 1).unwrap();
        s.finish(i, &mut kv);
        // a runs 2, b runs 0: both waiting; b goes first, then a fills its third row.
        assert_eq!(s.admit(&mut kv), 2);
        let rows = s.rows_by_tenant();
        assert_eq!((rows["a"], rows["b"]), (3, 1));
    }
}
