//! Per-sequence KV caches and the attention that reads them.
//!
//! Two stores, chosen with the backend at load:
//! - **paged** (CPU kernels): each sequence owns a list of fixed-size blocks
//!   ([`attention::BLOCK_TOKENS`] positions, all layers) taken from a shared free list. Growing
//!   never re-copies, freeing returns whole blocks, and memory is accounted per block. A block
//!   table per sequence is also what a later prefix cache needs (shared, ref-counted blocks).
//! - **tensors** (portable candle path, e.g. CUDA): the same block tables over one device tensor
//!   per layer, read and written through index tensors by one batched attention per step
//!   ([`super::kv_tensor`]).
//!
//! The cache also plans each step ([`StepPlan`]): positions of the new tokens, the context
//! limit, and block reservations, all checked before any compute so a failing request cannot
//! leave a half-updated cache.

use super::batch::{RaggedBatch, SeqId};
use super::kernels::attention::{self, BLOCK_TOKENS, KvDtype, KvGeometry, RopeRows, SeqSpan};
use super::kv_tensor::{self, SpanBlocks, TensorPool, TensorStep};
use super::linear::with_cpu_f32;
use super::{ModelConfig, ModelError, Result, RopeStyle};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Where KV data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStoreKind {
    Paged,
    Tensors,
}

/// One paged block: `block_bytes` of f16 or f32 elements (u64 storage for alignment).
type Block = Box<[u64]>;

enum SeqStore {
    Paged(Vec<Block>),
    /// Block ids in the [`TensorPool`].
    Tensors(Vec<u32>),
}

struct SeqEntry {
    /// Positions already in the cache.
    len: usize,
    store: SeqStore,
}

/// The KV caches of every live sequence of one model.
pub struct KvCache {
    geo: KvGeometry,
    kind: KvStoreKind,
    device: Device,
    max_context: usize,
    /// Byte budget for KV data (all sequences).
    limit_bytes: usize,
    used_bytes: usize,
    seqs: HashMap<SeqId, SeqEntry>,
    next_id: u64,
    /// Freed paged blocks kept for reuse (bounded), so steady-state decoding does not allocate.
    free_blocks: Vec<Block>,
    /// The device pools of the tensor store.
    pool: Option<TensorPool>,
}

/// The sizing rule of a [`KvCache`] (see [`KvCache::sizing`]).
#[derive(Debug, Clone, Copy)]
pub struct KvSizing {
    block_bytes: usize,
}

impl KvSizing {
    /// Bytes one sequence of `n` positions occupies (whole blocks).
    pub fn bytes_for_tokens(&self, n: usize) -> usize {
        n.div_ceil(BLOCK_TOKENS) * self.block_bytes
    }
}

/// A step's layout, computed before the forward.
pub struct StepPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per batch entry: (sequence, first position, number of tokens, first packed row).
    pub spans: Vec<(SeqId, usize, usize, usize)>,
    /// Packed rows whose logits are returned, in output order.
    pub logit_rows: Vec<u32>,
    /// For each entry, its range in `logit_rows`.
    pub logit_ranges: Vec<std::ops::Range<usize>>,
    /// The tensor store's index tensors for this step.
    pub tensors: Option<TensorStep>,
}

impl KvCache {
    /// `dtype` applies as given to the paged store; the tensor store keeps f32 or f16 (for
    /// `Q8`, an int8 layout of the CPU kernels).
    pub fn new(cfg: &ModelConfig, kind: KvStoreKind, device: Device, limit_bytes: usize, dtype: KvDtype) -> Self {
        let dtype = match (kind, dtype) {
            (KvStoreKind::Tensors, KvDtype::Q8) => KvDtype::F16,
            (_, d) => d,
        };
        let geo = KvGeometry {
            n_layers: cfg.n_layers,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            dtype,
        };
        let pool = (kind == KvStoreKind::Tensors).then(|| {
            let dt = if dtype == KvDtype::F32 { DType::F32 } else { DType::F16 };
            TensorPool::new(geo, dt, device.clone())
        });
        Self {
            geo,
            kind,
            device,
            max_context: cfg.max_context,
            limit_bytes,
            used_bytes: 0,
            seqs: HashMap::new(),
            next_id: 1,
            free_blocks: Vec::new(),
            pool,
        }
    }

    /// Bytes of one position across all layers (k and v).
    pub fn bytes_per_token(&self) -> usize {
        self.geo.n_layers * 2 * self.geo.n_kv_heads * self.geo.head_dim * self.geo.dtype.size()
    }
    pub fn dtype(&self) -> KvDtype {
        self.geo.dtype
    }
    /// Bytes one sequence of `n` positions occupies (whole blocks).
    pub fn bytes_for_tokens(&self, n: usize) -> usize {
        self.sizing().bytes_for_tokens(n)
    }

    /// How this cache sizes sequences, detached from it: what a request will need can then be
    /// checked where the cache is not (the engine's submit path), by the same rule admission uses.
    pub fn sizing(&self) -> KvSizing {
        KvSizing { block_bytes: self.block_bytes() }
    }
    fn block_bytes(&self) -> usize {
        self.geo.block_bytes()
    }
    /// Bytes currently held by live sequences.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }
    pub fn n_sequences(&self) -> usize {
        self.seqs.len()
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Registers a new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let store = match self.kind {
            KvStoreKind::Paged => SeqStore::Paged(Vec::new()),
            KvStoreKind::Tensors => SeqStore::Tensors(Vec::new()),
        };
        self.seqs.insert(id, SeqEntry { len: 0, store });
        id
    }

    /// Frees a sequence and its memory. Unknown ids are ignored (freeing is idempotent).
    pub fn remove_sequence(&mut self, id: SeqId) {
        let Some(entry) = self.seqs.remove(&id) else {
            return;
        };
        self.used_bytes -= self.entry_bytes(&entry);
        match entry.store {
            SeqStore::Paged(blocks) => {
                // Keep a few blocks around for the next sequences; return the rest to the allocator.
                let keep = 64usize.saturating_sub(self.free_blocks.len());
                self.free_blocks.extend(blocks.into_iter().take(keep));
            }
            SeqStore::Tensors(blocks) => self.pool.as_mut().expect("tensor pool").release(blocks),
        }
    }

    /// Positions already cached for `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        self.seqs.get(&id).map(|e| e.len).ok_or(ModelError::UnknownSequence(id))
    }

    fn entry_bytes(&self, e: &SeqEntry) -> usize {
        match &e.store {
            SeqStore::Paged(b) => b.len() * self.block_bytes(),
            SeqStore::Tensors(b) => b.len() * self.block_bytes(),
        }
    }

    /// Validates a batch, reserves cache space for it and lays it out. Nothing is modified if
    /// this fails, except that reserved blocks stay with their (still valid) sequences.
    pub fn plan(&mut self, batch: &RaggedBatch) -> Result<StepPlan> {
        if batch.is_empty() {
            return Err(ModelError::InvalidBatch("empty batch".into()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut extra_bytes = 0;
        for e in &batch.entries {
            if e.tokens.is_empty() {
                return Err(ModelError::InvalidBatch(format!("no tokens for {:?}", e.seq)));
            }
            if !seen.insert(e.seq) {
                return Err(ModelError::InvalidBatch(format!("{:?} appears twice", e.seq)));
            }
            let entry = self.seqs.get(&e.seq).ok_or(ModelError::UnknownSequence(e.seq))?;
            let needed = entry.len + e.tokens.len();
            if needed > self.max_context {
                return Err(ModelError::ContextOverflow { needed, max: self.max_context });
            }
            extra_bytes += self.growth_bytes(entry, needed);
        }
        if self.used_bytes + extra_bytes > self.limit_bytes {
            return Err(ModelError::KvCacheFull {
                needed: extra_bytes,
                free: self.limit_bytes.saturating_sub(self.used_bytes),
                limit: self.limit_bytes,
            });
        }
        let mut plan = StepPlan {
            tokens: Vec::with_capacity(batch.n_tokens()),
            positions: Vec::with_capacity(batch.n_tokens()),
            spans: Vec::with_capacity(batch.entries.len()),
            logit_rows: Vec::new(),
            logit_ranges: Vec::new(),
            tensors: None,
        };
        for e in &batch.entries {
            let start = self.seqs[&e.seq].len;
            let row = plan.tokens.len();
            self.reserve(e.seq, start + e.tokens.len())?;
            plan.spans.push((e.seq, start, e.tokens.len(), row));
            plan.tokens.extend_from_slice(&e.tokens);
            plan.positions.extend((start..start + e.tokens.len()).map(|p| p as u32));
            let first = plan.logit_rows.len();
            if e.all_logits {
                plan.logit_rows.extend((row..row + e.tokens.len()).map(|r| r as u32));
            } else {
                plan.logit_rows.push((row + e.tokens.len() - 1) as u32);
            }
            plan.logit_ranges.push(first..plan.logit_rows.len());
        }
        if self.kind == KvStoreKind::Tensors {
            plan.tensors = Some(self.tensor_step(&plan)?);
        }
        Ok(plan)
    }

    /// The tensor store's index tensors for a planned step (blocks already reserved).
    fn tensor_step(&self, plan: &StepPlan) -> Result<TensorStep> {
        let mut spans = Vec::with_capacity(plan.spans.len());
        for &(seq, start, len, row) in &plan.spans {
            let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
            let SeqStore::Tensors(blocks) = &entry.store else { unreachable!("tensor store") };
            spans.push(SpanBlocks { start, len, row, blocks });
        }
        TensorStep::new(&self.geo, &spans, plan.tokens.len(), &self.device)
    }

    fn growth_bytes(&self, e: &SeqEntry, needed: usize) -> usize {
        let held = match &e.store {
            SeqStore::Paged(blocks) => blocks.len(),
            SeqStore::Tensors(blocks) => blocks.len(),
        };
        needed.div_ceil(BLOCK_TOKENS).saturating_sub(held) * self.block_bytes()
    }

    fn reserve(&mut self, id: SeqId, needed: usize) -> Result<()> {
        let block_words = self.block_bytes() / 8;
        let block_bytes = self.block_bytes();
        let entry = self.seqs.get_mut(&id).ok_or(ModelError::UnknownSequence(id))?;
        match &mut entry.store {
            SeqStore::Paged(blocks) => {
                while blocks.len() * BLOCK_TOKENS < needed {
                    let block = self.free_blocks.pop().unwrap_or_else(|| vec![0u64; block_words].into_boxed_slice());
                    blocks.push(block);
                    self.used_bytes += block_bytes;
                }
            }
            SeqStore::Tensors(blocks) => {
                let pool = self.pool.as_mut().expect("tensor pool");
                while blocks.len() * BLOCK_TOKENS < needed {
                    blocks.push(pool.alloc()?);
                    self.used_bytes += block_bytes;
                }
            }
        }
        Ok(())
    }

    /// Marks the planned tokens as cached (after a successful forward).
    pub fn commit(&mut self, plan: &StepPlan) {
        for &(seq, start, len, _) in &plan.spans {
            if let Some(e) = self.seqs.get_mut(&seq) {
                e.len = start + len;
            }
        }
    }

    /// Attention for one layer: stores the new k/v rows of `qkv` (`[rows, q + 2·kv]`) in the
    /// caches (rotated) and returns `[rows, n_heads·head_dim]`.
    pub fn attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        match self.kind {
            KvStoreKind::Paged => self.paged_attention(layer, qkv, plan, rope),
            KvStoreKind::Tensors => self.tensor_attention(layer, qkv, plan, rope),
        }
    }

    fn paged_attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        let rows = plan.tokens.len();
        let q_dim = self.geo.n_heads * self.geo.head_dim;
        // Each planned sequence's blocks, borrowed exclusively for the kernel.
        let mut stores: HashMap<SeqId, &mut Vec<Block>> = self
            .seqs
            .iter_mut()
            .filter_map(|(id, e)| match &mut e.store {
                SeqStore::Paged(blocks) => Some((*id, blocks)),
                _ => None,
            })
            .collect();
        let mut spans = Vec::with_capacity(plan.spans.len());
        for &(seq, start, len, row) in &plan.spans {
            let blocks = stores.remove(&seq).ok_or(ModelError::UnknownSequence(seq))?;
            spans.push(SeqSpan { blocks: blocks.iter_mut().map(|b| &mut b[..]).collect(), start, len, row });
        }
        let mut out = vec![0f32; rows * q_dim];
        let qkv = qkv.contiguous()?;
        with_cpu_f32(&qkv, |data| {
            attention::paged_attention(&self.geo, layer, data, &mut spans, &rope.host, &mut out)
        })?;
        Ok(Tensor::from_vec(out, (rows, q_dim), &Device::Cpu)?)
    }

    /// The portable path: candle ops over the whole step at once.
    fn tensor_attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        let step =
            plan.tensors.as_ref().ok_or_else(|| ModelError::InvalidBatch("step planned for another store".into()))?;
        kv_tensor::attention(self.pool.as_ref().expect("tensor pool"), layer, qkv, step, rope)
    }
}

/// Rotary tables for the rows of one step, shared by all layers.
pub struct StepRope {
    pub host: RopeRows,
    /// `(cos, sin)` as `[rows, head_dim/2]` tensors on the model's device (tensor store only).
    pub tensors: Option<(Tensor, Tensor)>,
}

impl StepRope {
    pub fn new(
        positions: &[u32],
        inv_freqs: &[f32],
        style: RopeStyle,
        kind: KvStoreKind,
        device: &Device,
    ) -> Result<Self> {
        let host = RopeRows::new(positions, inv_freqs, style);
        let tensors = match kind {
            KvStoreKind::Paged => None,
            KvStoreKind::Tensors => {
                let shape = (positions.len(), host.half);
                Some((Tensor::from_slice(&host.cos, shape, device)?, Tensor::from_slice(&host.sin, shape, device)?))
            }
        };
        Ok(Self { host, tensors })
    }
}
