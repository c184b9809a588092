//! The engine's view of a running request: a *group* of one row (unguided) or two rows (a CFG
//! pair), each row a sequence in the KV cache. A group is the scheduling unit: its rows are
//! admitted, stepped, cancelled and freed together, and every sampled token is appended to all
//! of them.

use super::constraint::TokenConstraint;
use super::request::{Event, Request};
use crate::model::kv_cache::PrefixSeed;
use crate::model::{KvCache, SeqId};
use crate::sampling::{Rng, StopMatcher};
use crate::tokenizer::IncrementalDecoder;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One row: a KV-cache sequence and the tokens it still has to consume.
pub struct Row {
    pub seq: SeqId,
    /// Tokens not yet run through the model (the prompt at first, then the last sampled token).
    pub pending: Vec<u32>,
    /// How many of `pending` have been run.
    pub cursor: usize,
    /// Next-token logits, once the row has consumed everything.
    pub logits: Option<RowLogits>,
}

/// Where a row's next-token logits are.
pub enum RowLogits {
    /// Entry `i` of the current step's batch output (no copy).
    InBatch(usize),
    /// Copied out, because the other row of the pair is still prefilling.
    Owned(Vec<f32>),
}

impl Row {
    pub fn new(seq: SeqId, prompt: Vec<u32>) -> Self {
        Self { seq, pending: prompt, cursor: 0, logits: None }
    }
    /// A row whose first `cached` prompt tokens are already in its KV cache (prefix cache).
    pub fn with_cached(seq: SeqId, prompt: Vec<u32>, cached: usize) -> Self {
        Self { seq, pending: prompt, cursor: cached, logits: None }
    }
    pub fn remaining(&self) -> usize {
        self.pending.len() - self.cursor
    }
    /// Still in prefill: more than one token left to run.
    pub fn is_prefilling(&self) -> bool {
        self.remaining() > 1
    }
}

/// A request in the engine.
pub struct Group {
    pub id: u64,
    pub req: Request,
    pub rows: Vec<Row>,
    pub rng: Rng,
    pub decoder: IncrementalDecoder,
    pub stop: StopMatcher,
    pub generated: usize,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
    pub admitted: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    /// Which tokens may come next, when the request is constrained (a grammar).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// The request's place in the waiting queue, counted against the limits until admission
    /// (released when dropped).
    pub ticket: Option<super::engine::Ticket>,
    /// Steps in which this group was prefilling and got no prompt tokens (aging of the prefill
    /// order).
    pub passed_over_steps: usize,
    /// Prompt tokens of each row served from the prefix cache.
    pub cached_tokens: Vec<usize>,
}

impl Group {
    pub fn new(id: u64, req: Request, events: UnboundedSender<Event>) -> Self {
        let rng = Rng::for_params(&req.sampling);
        let stop = StopMatcher::new(req.stop.clone());
        let constraint = req.constraint.as_ref().map(|c| c.start());
        Self {
            id,
            req,
            rows: Vec::new(),
            rng,
            decoder: IncrementalDecoder::default(),
            stop,
            generated: 0,
            events,
            arrived: Instant::now(),
            admitted: None,
            first_token: None,
            last_token: None,
            constraint,
            ticket: None,
            passed_over_steps: 0,
            cached_tokens: Vec::new(),
        }
    }

    /// The seed of the prefix-cache keys of this request's rows: the tenant and the generations
    /// of the adapters applied to them. `None` (no caching) when prefix caching is off or an
    /// adapter's generation is unknown.
    pub fn prefix_seed(&self, kv: &KvCache) -> Option<PrefixSeed> {
        let gens = &self.req.adapter_generations;
        if gens.len() != self.req.adapters.len() || gens.iter().any(|g| g.is_empty()) {
            return None;
        }
        kv.prefix_seed(&self.req.tenant, &gens.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Prompts of the rows this request needs (cond first).
    pub fn row_prompts(&self) -> Vec<&[u32]> {
        let mut v = vec![self.req.prompt.as_slice()];
        if self.req.is_pair() {
            v.push(self.req.uncond_prompt.as_deref().unwrap_or_default());
        }
        v
    }

    /// The client went away (its event receiver was dropped).
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Every row has its next-token logits.
    pub fn ready_to_sample(&self) -> bool {
        self.rows.iter().all(|r| r.logits.is_some())
    }
}
