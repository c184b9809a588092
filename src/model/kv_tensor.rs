//! The KV store of the portable candle path (any device: CPU, CUDA) and its batched attention.
//!
//! Keys and values live in one pool per layer, `[n_kv_heads, slots, head_dim]`, cut into blocks
//! of [`BLOCK_TOKENS`] slots; each sequence owns a block table (like the native paged store, so
//! a later prefix cache can share blocks). A step touches the pools through index tensors built
//! once per step ([`TensorStep`]) and shared by every layer:
//!
//! - the new rows' keys and values are written with one `scatter_set` per pool;
//! - attention gathers each sequence's keys into a padded `[sequences, keys]` batch with one
//!   `index_select`, and runs one masked batched attention for all of them: grouped-query heads
//!   share their kv head without copies, padding and the future are masked by a bias computed on
//!   the device from the query positions.
//!
//! Decode rows (one query) and prefill chunks (many) are padded separately, so a long chunk does
//! not pad every decode row to its length: at most two batched attentions per layer, never a loop
//! over sequences.

use super::kernels::attention::{BLOCK_TOKENS, KvGeometry};
use super::kv_cache::StepRope;
use super::{ModelError, Result, RopeStyle};
use candle_core::{DType, Device, Tensor};

/// Blocks the pool starts with; it doubles when full.
const INITIAL_BLOCKS: usize = 64;

/// A bias that removes a key from a softmax (finite, so rows that are all padding stay finite).
const MASKED: f64 = -1e30;

/// The pools of all layers, and which blocks are free.
pub(super) struct TensorPool {
    geo: KvGeometry,
    dtype: DType,
    device: Device,
    /// Per layer, `[n_kv_heads, capacity · BLOCK_TOKENS, head_dim]`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Blocks the pools hold.
    capacity: usize,
    /// Returned blocks, reused first.
    free: Vec<u32>,
    /// Blocks never handed out yet: `next..capacity`.
    next: usize,
}

impl TensorPool {
    pub(super) fn new(geo: KvGeometry, dtype: DType, device: Device) -> Self {
        Self { geo, dtype, device, k: Vec::new(), v: Vec::new(), capacity: 0, free: Vec::new(), next: 0 }
    }

    /// A block for a sequence; grows the pools when none is left.
    pub(super) fn alloc(&mut self) -> Result<u32> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if self.next == self.capacity {
            self.grow((self.capacity * 2).max(INITIAL_BLOCKS))?;
        }
        self.next += 1;
        Ok((self.next - 1) as u32)
    }

    pub(super) fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }

    /// Reallocates every pool with room for `blocks` blocks, keeping the cached data (block ids
    /// stay valid). Doubling keeps the copies O(1) per position, amortised.
    fn grow(&mut self, blocks: usize) -> Result<()> {
        let g = self.geo;
        let shape = (g.n_kv_heads, blocks * BLOCK_TOKENS, g.head_dim);
        let grow_one = |old: Option<&Tensor>| -> Result<Tensor> {
            let t = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some(old) = old {
                t.slice_set(old, 1, 0)?;
            }
            Ok(t)
        };
        let k = (0..g.n_layers).map(|l| grow_one(self.k.get(l))).collect::<Result<Vec<_>>>()?;
        let v = (0..g.n_layers).map(|l| grow_one(self.v.get(l))).collect::<Result<Vec<_>>>()?;
        (self.k, self.v, self.capacity) = (k, v, blocks);
        Ok(())
    }
}

/// One sequence's part of a step, with its block table.
pub(super) struct SpanBlocks<'a> {
    /// First new position.
    pub start: usize,
    /// New tokens.
    pub len: usize,
    /// First packed row of the new tokens.
    pub row: usize,
    pub blocks: &'a [u32],
}

impl SpanBlocks<'_> {
    fn slot(&self, pos: usize) -> u32 {
        self.blocks[pos / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (pos % BLOCK_TOKENS) as u32
    }
}

/// The index tensors of one step, shared by all layers.
pub struct TensorStep {
    /// `[n_kv_heads, rows, head_dim]`: the slot of each new row, repeated (`scatter_set` wants
    /// an index per element).
    write: Tensor,
    groups: Vec<AttnGroup>,
    /// Packed row → row of the concatenated group outputs; `None` when they are already in order.
    unpack: Option<Tensor>,
}

/// Sequences attended together: `seqs` queries blocks of `qmax` rows over `keys` keys each.
struct AttnGroup {
    seqs: usize,
    qmax: usize,
    keys: usize,
    /// `[seqs · qmax]` packed rows of the queries (padding repeats a sequence's last row);
    /// `None` when the group is exactly the packed rows in order.
    q_rows: Option<Tensor>,
    /// `[seqs · keys]` pool slots of each sequence's keys in position order (padding: any slot).
    key_slots: Tensor,
    /// `[seqs, 1, qmax, keys]`: 0 where the query may see the key, [`MASKED`] elsewhere.
    bias: Tensor,
}

impl TensorStep {
    /// Lays out a step: `spans` in packed-row order, `rows` new tokens in all.
    pub(super) fn new(geo: &KvGeometry, spans: &[SpanBlocks], rows: usize, device: &Device) -> Result<Self> {
        let mut slots = Vec::with_capacity(rows);
        for s in spans {
            slots.extend((s.start..s.start + s.len).map(|p| s.slot(p)));
        }
        let write = Tensor::from_vec(slots, (1, rows, 1), device)?
            .broadcast_as((geo.n_kv_heads, rows, geo.head_dim))?
            .contiguous()?;
        // Decode rows and prefill chunks are padded separately.
        let (decode, prefill): (Vec<&SpanBlocks>, Vec<&SpanBlocks>) = spans.iter().partition(|s| s.len == 1);
        let mut groups = Vec::new();
        let mut out_row = vec![0u32; rows];
        let mut offset = 0;
        for members in [decode, prefill] {
            if members.is_empty() {
                continue;
            }
            let g = AttnGroup::new(&members, rows, offset, &mut out_row, device)?;
            offset += g.seqs * g.qmax;
            groups.push(g);
        }
        let in_order = out_row.iter().enumerate().all(|(i, &r)| r as usize == i) && offset == rows;
        let unpack = if in_order { None } else { Some(Tensor::from_vec(out_row, rows, device)?) };
        Ok(Self { write, groups, unpack })
    }
}

impl AttnGroup {
    /// Builds the group and records where each of its packed rows lands in the output
    /// (`offset` + its padded position).
    fn new(members: &[&SpanBlocks], rows: usize, offset: usize, out_row: &mut [u32], device: &Device) -> Result<Self> {
        let seqs = members.len();
        let qmax = members.iter().map(|s| s.len).max().unwrap_or(1);
        let keys = members.iter().map(|s| s.start + s.len).max().unwrap_or(1);
        let mut q_rows = Vec::with_capacity(seqs * qmax);
        let mut q_pos = Vec::with_capacity(seqs * qmax);
        let mut key_slots = Vec::with_capacity(seqs * keys);
        for (i, s) in members.iter().enumerate() {
            for j in 0..qmax {
                let k = j.min(s.len - 1);
                q_rows.push((s.row + k) as u32);
                q_pos.push((s.start + k) as u32);
            }
            for j in 0..s.len {
                out_row[s.row + j] = (offset + i * qmax + j) as u32;
            }
            let n = s.start + s.len;
            key_slots.extend((0..keys).map(|p| s.slot(if p < n { p } else { 0 })));
        }
        let identity = q_rows.len() == rows && q_rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        let q_rows = if identity { None } else { Some(Tensor::from_vec(q_rows, seqs * qmax, device)?) };
        // Key position p is visible to a query at position q when p ≤ q: the causal mask and the
        // padding (keys beyond a sequence's length are beyond all its queries) in one compare.
        let q_pos = Tensor::from_vec(q_pos, (seqs, qmax, 1), device)?;
        let key_pos = Tensor::arange(0u32, keys as u32, device)?.reshape((1, 1, keys))?;
        let bias = key_pos.broadcast_le(&q_pos)?.to_dtype(DType::F32)?.affine(-MASKED, MASKED)?.unsqueeze(1)?;
        Ok(Self { seqs, qmax, keys, q_rows, key_slots: Tensor::from_vec(key_slots, seqs * keys, device)?, bias })
    }
}

/// Attention of one layer for a whole step: stores the new keys and values (rotated) of
/// `qkv` (`[rows, q + 2·kv]`) and returns `[rows, n_heads·head_dim]`.
pub(super) fn attention(
    pool: &TensorPool,
    layer: usize,
    qkv: &Tensor,
    step: &TensorStep,
    rope: &StepRope,
) -> Result<Tensor> {
    let g = pool.geo;
    let (hd, nh, nkv) = (g.head_dim, g.n_heads, g.n_kv_heads);
    let rep = nh / nkv;
    let rows = qkv.dim(0)?;
    // [rows, heads·hd] → [heads, rows, hd] (the layout of candle's rope kernels, batch 1).
    let heads = |x: Tensor, h: usize| -> Result<Tensor> {
        Ok(x.reshape((rows, h, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?)
    };
    let (cos, sin) = rope.tensors.as_ref().ok_or_else(|| ModelError::Config("rope tables missing".into()))?;
    let rot = |x: &Tensor| -> Result<Tensor> {
        Ok(match rope.host.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(x, cos, sin)?,
        })
    };
    let q = rot(&heads(qkv.narrow(1, 0, nh * hd)?, nh)?)?.squeeze(0)?;
    let k = rot(&heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv)?)?.squeeze(0)?;
    let v = heads(qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?, nkv)?.squeeze(0)?;
    pool.k[layer].scatter_set(&step.write, &k.to_dtype(pool.dtype)?, 1)?;
    pool.v[layer].scatter_set(&step.write, &v.to_dtype(pool.dtype)?, 1)?;

    // Query heads of one kv head are consecutive: [nh, rows, hd] = [nkv, rep, rows, hd].
    let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((nkv, rep, rows, hd))?;
    let mut outs = Vec::with_capacity(step.groups.len());
    for grp in &step.groups {
        let (s, qm, nk) = (grp.seqs, grp.qmax, grp.keys);
        let qg = match &grp.q_rows {
            Some(idx) => q.index_select(idx, 2)?,
            None => q.clone(),
        };
        // [nkv, rep, s·qm, hd] → [nkv·s, rep·qm, hd]: one batch entry per (kv head, sequence).
        let qg = qg.reshape((nkv, rep, s, qm, hd))?.transpose(1, 2)?.contiguous()?.reshape((nkv * s, rep * qm, hd))?;
        let gather = |pool: &Tensor| -> Result<Tensor> {
            Ok(pool.index_select(&grp.key_slots, 1)?.to_dtype(DType::F32)?.reshape((nkv * s, nk, hd))?)
        };
        let (kg, vg) = (gather(&pool.k[layer])?, gather(&pool.v[layer])?);
        let scores = qg.matmul(&kg.t()?)?.reshape((nkv, s, rep, qm, nk))?.broadcast_add(&grp.bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv * s, rep * qm, nk))?;
        let o = probs.matmul(&vg)?.reshape((nkv, s, rep, qm, hd))?;
        // → [s, qm, nkv, rep, hd] = [s·qm, nh·hd] (head h = kv·rep + r, as in the weights).
        outs.push(o.permute((1, 3, 0, 2, 4))?.contiguous()?.reshape((s * qm, nh * hd))?);
    }
    let out = if outs.len() == 1 { outs.pop().expect("one group") } else { Tensor::cat(&outs, 0)? };
    Ok(match &step.unpack {
        Some(idx) => out.index_select(idx, 0)?,
        None => out,
    })
}
