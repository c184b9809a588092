//! Per-sequence KV caches and the attention that reads them.
//!
//! Two stores, chosen with the backend at load:
//! - **paged** (CPU kernels): each sequence owns a list of fixed-size blocks
//!   ([`attention::BLOCK_TOKENS`] positions, all layers) taken from a shared free list. Growing
//!   never re-copies, freeing returns whole blocks, and memory is accounted per block. A block
//!   table per sequence is also what a later prefix cache needs (shared, ref-counted blocks).
//! - **tensors** (portable candle path, e.g. CUDA): per sequence and layer, k and v tensors
//!   `[n_kv_heads, capacity, head_dim]` written in place with `slice_set`; capacity grows in
//!   doublings, so each position is copied O(1) times amortised.
//!
//! The cache also plans each step ([`StepPlan`]): positions of the new tokens, the context
//! limit, and block reservations, all checked before any compute so a failing request cannot
//! leave a half-updated cache.

use super::batch::{RaggedBatch, SeqId};
use super::kernels::attention::{self, BLOCK_TOKENS, KvDtype, KvGeometry, RopeRows, SeqSpan};
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
    Tensors { k: Vec<Tensor>, v: Vec<Tensor>, capacity: usize },
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
}

/// The sizing rule of a [`KvCache`] (see [`KvCache::sizing`]).
#[derive(Debug, Clone, Copy)]
pub struct KvSizing {
    kind: KvStoreKind,
    block_bytes: usize,
    bytes_per_token: usize,
    max_context: usize,
}

impl KvSizing {
    /// Bytes one sequence of `n` positions occupies (whole blocks / capacity doublings).
    pub fn bytes_for_tokens(&self, n: usize) -> usize {
        match self.kind {
            KvStoreKind::Paged => n.div_ceil(BLOCK_TOKENS) * self.block_bytes,
            KvStoreKind::Tensors => tensor_capacity(n, self.max_context) * self.bytes_per_token,
        }
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
}

impl KvCache {
    /// `dtype` applies to the paged store; the tensor store keeps f32.
    pub fn new(cfg: &ModelConfig, kind: KvStoreKind, device: Device, limit_bytes: usize, dtype: KvDtype) -> Self {
        let dtype = if kind == KvStoreKind::Paged { dtype } else { KvDtype::F32 };
        Self {
            geo: KvGeometry {
                n_layers: cfg.n_layers,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
                dtype,
            },
            kind,
            device,
            max_context: cfg.max_context,
            limit_bytes,
            used_bytes: 0,
            seqs: HashMap::new(),
            next_id: 1,
            free_blocks: Vec::new(),
        }
    }

    /// Bytes of one position across all layers (k and v).
    pub fn bytes_per_token(&self) -> usize {
        self.geo.n_layers * 2 * self.geo.n_kv_heads * self.geo.head_dim * self.geo.dtype.size()
    }
    pub fn dtype(&self) -> KvDtype {
        self.geo.dtype
    }
    /// Bytes one sequence of `n` positions occupies (whole blocks / capacity doublings).
    pub fn bytes_for_tokens(&self, n: usize) -> usize {
        self.sizing().bytes_for_tokens(n)
    }

    /// How this cache sizes sequences, detached from it: what a request will need can then be
    /// checked where the cache is not (the engine's submit path), by the same rule admission uses.
    pub fn sizing(&self) -> KvSizing {
        KvSizing {
            kind: self.kind,
            block_bytes: self.block_bytes(),
            bytes_per_token: self.bytes_per_token(),
            max_context: self.max_context,
        }
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
            KvStoreKind::Tensors => SeqStore::Tensors { k: Vec::new(), v: Vec::new(), capacity: 0 },
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
        if let SeqStore::Paged(blocks) = entry.store {
            // Keep a few blocks around for the next sequences; return the rest to the allocator.
            let keep = 64usize.saturating_sub(self.free_blocks.len());
            self.free_blocks.extend(blocks.into_iter().take(keep));
        }
    }

    /// Positions already cached for `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        self.seqs.get(&id).map(|e| e.len).ok_or(ModelError::UnknownSequence(id))
    }

    fn entry_bytes(&self, e: &SeqEntry) -> usize {
        match &e.store {
            SeqStore::Paged(b) => b.len() * self.block_bytes(),
            SeqStore::Tensors { capacity, .. } => capacity * self.bytes_per_token(),
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
        Ok(plan)
    }

    fn growth_bytes(&self, e: &SeqEntry, needed: usize) -> usize {
        match &e.store {
            SeqStore::Paged(blocks) => needed.div_ceil(BLOCK_TOKENS).saturating_sub(blocks.len()) * self.block_bytes(),
            SeqStore::Tensors { capacity, .. } => {
                if needed <= *capacity {
                    0
                } else {
                    (tensor_capacity(needed, self.max_context) - capacity) * self.bytes_per_token()
                }
            }
        }
    }

    fn reserve(&mut self, id: SeqId, needed: usize) -> Result<()> {
        let block_words = self.block_bytes() / 8;
        let block_bytes = self.block_bytes();
        let bytes_per_token = self.bytes_per_token();
        let (geo, device, max_context) = (self.geo, self.device.clone(), self.max_context);
        let entry = self.seqs.get_mut(&id).ok_or(ModelError::UnknownSequence(id))?;
        match &mut entry.store {
            SeqStore::Paged(blocks) => {
                while blocks.len() * BLOCK_TOKENS < needed {
                    let block = self.free_blocks.pop().unwrap_or_else(|| vec![0u64; block_words].into_boxed_slice());
                    blocks.push(block);
                    self.used_bytes += block_bytes;
                }
            }
            SeqStore::Tensors { k, v, capacity } => {
                if needed > *capacity {
                    let new_cap = tensor_capacity(needed, max_context);
                    let shape = (geo.n_kv_heads, new_cap, geo.head_dim);
                    let grow = |old: &mut Vec<Tensor>| -> Result<()> {
                        for l in 0..geo.n_layers {
                            let t = Tensor::zeros(shape, DType::F32, &device)?;
                            if let Some(prev) = old.get(l) {
                                t.slice_set(prev, 1, 0)?;
                            }
                            if l < old.len() {
                                old[l] = t;
                            } else {
                                old.push(t);
                            }
                        }
                        Ok(())
                    };
                    grow(k)?;
                    grow(v)?;
                    self.used_bytes += (new_cap - *capacity) * bytes_per_token;
                    *capacity = new_cap;
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

    /// The portable path: candle ops, one sequence at a time.
    fn tensor_attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        let g = self.geo;
        let (hd, nh, nkv) = (g.head_dim, g.n_heads, g.n_kv_heads);
        let rows = plan.tokens.len();
        let q = qkv.narrow(1, 0, nh * hd)?;
        let k = qkv.narrow(1, nh * hd, nkv * hd)?;
        let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?;
        // [rows, heads, hd] -> [1, heads, rows, hd] for candle's rope kernels.
        let to_heads = |x: Tensor, h: usize| -> Result<Tensor> {
            Ok(x.reshape((rows, h, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?)
        };
        let (cos, sin) = rope.tensors.as_ref().expect("tensor rope tables for the tensor store");
        let rot = |x: &Tensor| -> Result<Tensor> {
            Ok(match rope.host.style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
                RopeStyle::Half => candle_nn::rotary_emb::rope(x, cos, sin)?,
            })
        };
        let q = rot(&to_heads(q, nh)?)?.squeeze(0)?; // [nh, rows, hd]
        let k = rot(&to_heads(k, nkv)?)?.squeeze(0)?; // [nkv, rows, hd]
        let v = to_heads(v, nkv)?.squeeze(0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(plan.spans.len());
        for &(seq, start, len, row) in &plan.spans {
            let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
            let SeqStore::Tensors { k: kc, v: vc, .. } = &mut entry.store else { unreachable!("tensor store") };
            kc[layer].slice_set(&k.narrow(1, row, len)?.contiguous()?, 1, start)?;
            vc[layer].slice_set(&v.narrow(1, row, len)?.contiguous()?, 1, start)?;
            let n_keys = start + len;
            let keys = repeat_kv(&kc[layer].narrow(1, 0, n_keys)?, nh / nkv)?;
            let vals = repeat_kv(&vc[layer].narrow(1, 0, n_keys)?, nh / nkv)?;
            let qs = q.narrow(1, row, len)?.contiguous()?;
            let scores = (qs.matmul(&keys.t()?.contiguous()?)? * scale)?; // [nh, len, n_keys]
            let scores = if len > 1 {
                let mask: Vec<f32> = (0..len)
                    .flat_map(|i| (0..n_keys).map(move |t| if t <= start + i { 0.0 } else { f32::NEG_INFINITY }))
                    .collect();
                let mask = Tensor::from_vec(mask, (1, len, n_keys), scores.device())?;
                scores.broadcast_add(&mask)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&vals.contiguous()?)?; // [nh, len, hd]
            outs.push(o.transpose(0, 1)?.reshape((len, nh * hd))?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (h, t, d) = x.dims3()?;
    Ok(x.unsqueeze(1)?.expand((h, n_rep, t, d))?.reshape((h * n_rep, t, d))?)
}

/// Capacity for a tensor store that must hold `needed` positions: doublings from 64.
fn tensor_capacity(needed: usize, max_context: usize) -> usize {
    let mut cap = 64;
    while cap < needed {
        cap *= 2;
    }
    cap.min(max_context.max(needed))
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
