//! Causal attention of a ragged batch over paged per-sequence KV caches, with rotary embeddings
//! applied on the way in.
//!
//! A KV block holds [`BLOCK_TOKENS`] = 16 positions of one sequence for all layers. Per layer and
//! kv head, keys are stored *transposed* (`[head_dim][64]`) and values row-major (`[64][head_dim]`):
//! - scores of 16 keys at once are `Σ_d q[d] · Kᵀ[d][t..t+16]`, one broadcast-FMA per dimension into
//!   a single 16-lane register, with no horizontal sums;
//! - the weighted value sum is `Σ_t w[t] · V[t]`, one broadcast-FMA per key and 16 dimensions.
//!
//! Sequences own lists of blocks, so a cache grows one block at a time (never re-copied).
//!
//! Work items are (sequence, kv head, heads of that group, chunk of query positions): query heads
//! that share a kv head (GQA) are processed together so each key and value is loaded once for
//! all of them; when that leaves too few items to keep every thread busy (a single decoding
//! sequence), items split per query head instead. Threads take items from a shared counter, which
//! balances the uneven cost of causal prefill rows. When several sequences decode (a CFG pair),
//! a participant takes a whole sequence at a time instead, reading its blocks in order.

use super::pool::{self, ThreadPool, split_range};
use crate::model::RopeStyle;
use std::ops::Range;

/// Positions per KV block.
pub const BLOCK_TOKENS: usize = 16;
/// Query positions per work item.
const QUERY_CHUNK: usize = 16;
/// Query heads per kv head handled in registers at once.
pub(crate) const MAX_GROUP: usize = 8;

/// Element type of cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Half the memory traffic of f32 at no measurable quality cost (llama.cpp's default too):
    /// at long contexts attention reads more KV bytes per step than weights.
    #[default]
    F16,
    /// 8-bit integers with one f32 scale per (token, head): half of f16's traffic again, for
    /// many concurrent or long sequences where attention is bound by reading the cache.
    Q8,
    /// Exact; for reference comparisons.
    F32,
}

impl KvDtype {
    /// Bytes per cached value (scales excluded).
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::Q8 => 1,
            Self::F32 => 4,
        }
    }
    /// Whether each (token, head) vector carries a scale.
    pub fn scaled(self) -> bool {
        self == Self::Q8
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "q8" | "q8_0" | "int8" => Ok(Self::Q8),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown KV cache type {s:?} (f16, q8, f32)")),
        }
    }
}

/// A cached element type.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Each (token, head) vector has a scale stored beside it.
    const SCALED: bool;
    fn zero() -> Self;
    fn to_f32(self) -> f32;
    /// Stores one head vector; returns its scale (1 for unscaled types).
    fn quantize(src: &[f32], dst: &mut [Self]) -> f32;
}

impl KvElem for f32 {
    const SCALED: bool = false;
    fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn quantize(src: &[f32], dst: &mut [Self]) -> f32 {
        dst.copy_from_slice(src);
        1.0
    }
}

impl KvElem for half::f16 {
    const SCALED: bool = false;
    fn zero() -> Self {
        half::f16::ZERO
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn quantize(src: &[f32], dst: &mut [Self]) -> f32 {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
        1.0
    }
}

impl KvElem for i8 {
    const SCALED: bool = true;
    fn zero() -> Self {
        0
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    /// Symmetric: `scale = max|x| / 127`, `q = round(x / scale)`.
    fn quantize(src: &[f32], dst: &mut [Self]) -> f32 {
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (x * inv).round() as i8;
        }
        scale
    }
}

/// Shapes shared by every KV block of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvGeometry {
    /// Bytes of one (layer, k or v, kv head) region of a block: the values, then (scaled types)
    /// one f32 scale per position.
    fn region_bytes(&self) -> usize {
        BLOCK_TOKENS * self.head_dim * self.dtype.size() + if self.dtype.scaled() { BLOCK_TOKENS * 4 } else { 0 }
    }
    /// Bytes per block (all layers, keys and values).
    pub fn block_bytes(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.region_bytes()
    }
    /// Byte offset of the keys (`[head_dim][BLOCK_TOKENS]`) of (layer, kv head) within a block.
    #[inline]
    pub(crate) fn k_region(&self, layer: usize, head: usize) -> usize {
        ((layer * 2) * self.n_kv_heads + head) * self.region_bytes()
    }
    /// Byte offset of the values (`[BLOCK_TOKENS][head_dim]`) of (layer, kv head) within a block.
    #[inline]
    pub(crate) fn v_region(&self, layer: usize, head: usize) -> usize {
        ((layer * 2 + 1) * self.n_kv_heads + head) * self.region_bytes()
    }
    /// Byte offset, within a region, of its per-position scales.
    #[inline]
    fn scales_in_region(&self) -> usize {
        BLOCK_TOKENS * self.head_dim * self.dtype.size()
    }
}

/// Typed pointers into one region of a block (`block` must be `geo.block_bytes()` long and
/// `offset` one of the geometry's region offsets).
#[inline(always)]
pub(crate) fn region<E>(block: *mut u8, offset: usize, geo: &KvGeometry) -> (*mut E, *mut f32) {
    // In bounds of the block by the geometry's layout; `wrapping_add` keeps even a misuse free
    // of undefined behaviour until a dereference.
    let base = block.wrapping_add(offset);
    (base as *mut E, base.wrapping_add(geo.scales_in_region()) as *mut f32)
}

/// One sequence's slice of the batch as the kernel sees it: its cache blocks, and where its rows
/// are. Blocks it writes are borrowed exclusively for the call (so no two spans can write the
/// same block); leading full blocks shared through the prefix cache are only read, and may be
/// read by several spans.
pub struct SeqSpan<'a> {
    /// Leading blocks shared read-only (a cached prefix): positions `0..16·shared.len()`, all
    /// before `start`.
    pub shared: Vec<&'a [u64]>,
    /// The sequence's own blocks in position order, after the shared ones, each at least
    /// `block_bytes` long (u64 words keep every element type aligned); together with `shared`
    /// enough of them for `start + len` positions.
    pub blocks: Vec<&'a mut [u64]>,
    /// Position of the first new token (tokens already in the cache).
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Row of the first new token in the packed batch.
    pub row: usize,
}

/// Rotary `cos`/`sin` per packed row: `[rows][head_dim / 2]` each.
pub struct RopeRows {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub style: RopeStyle,
}

impl RopeRows {
    pub fn new(positions: &[u32], inv_freqs: &[f32], style: RopeStyle) -> Self {
        let half = inv_freqs.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freqs {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos, sin, half, style }
    }

    /// Rotates one head vector in place with the angles of packed row `row`.
    #[inline]
    pub fn apply(&self, x: &mut [f32], row: usize) {
        let (c, s) = (&self.cos[row * self.half..][..self.half], &self.sin[row * self.half..][..self.half]);
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..self.half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * c[i] - b * s[i];
                    x[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
            RopeStyle::Half => {
                let h = self.half;
                for i in 0..h {
                    let (a, b) = (x[i], x[i + h]);
                    x[i] = a * c[i] - b * s[i];
                    x[i + h] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

/// Computes attention for `layer` of a ragged batch.
///
/// `qkv` is `[rows, (n_heads + 2·n_kv_heads)·head_dim]` (q, then k, then v of each row); the new
/// k/v rows are rotated and written into the sequences' caches first. `out` is
/// `[rows, n_heads·head_dim]`. Panics if a span's blocks cannot hold its positions.
pub fn paged_attention(
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &mut [SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
) {
    paged_attention_with(pool::global(), geo, layer, qkv, spans, rope, out, crate::simd::active())
}

/// [`paged_attention`] on a given pool and kernel set (one the CPU supports).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_with(
    pool: &ThreadPool,
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &mut [SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
    isa: super::Isa,
) {
    let ks = super::kernel_set(isa);
    let hd = geo.head_dim;
    let width = (geo.n_heads + 2 * geo.n_kv_heads) * hd;
    assert!(layer < geo.n_layers, "attention: layer {layer} of {}", geo.n_layers);
    assert!(geo.n_kv_heads > 0 && geo.n_heads.is_multiple_of(geo.n_kv_heads), "attention: bad head counts");
    assert!(width > 0 && qkv.len().is_multiple_of(width), "attention: qkv is not [rows, q + 2·kv]");
    let rows = qkv.len() / width;
    assert_eq!(out.len(), rows * geo.n_heads * hd, "attention: out is not [rows, n_heads·head_dim]");
    assert!(rope.half * 2 == hd && rope.cos.len() >= rows * rope.half, "attention: rope rows do not fit");
    // What the raw-pointer kernels below rely on, checked once per call: every span's blocks
    // are whole blocks and cover its positions, it writes only its own blocks, and its rows lie
    // inside the batch. The borrows make written blocks exclusive to one span, shared ones
    // read-only, and all of them alive for the whole call.
    let words = geo.block_bytes().div_ceil(8);
    let raw: Vec<RawSpan> = spans
        .iter_mut()
        .map(|s| {
            let n_blocks = s.shared.len() + s.blocks.len();
            assert!(s.len == 0 || n_blocks * BLOCK_TOKENS >= s.start + s.len, "attention: too few KV blocks");
            assert!(s.len == 0 || s.start >= s.shared.len() * BLOCK_TOKENS, "attention: writes into a shared KV block");
            assert!(s.row + s.len <= rows, "attention: span rows outside the batch");
            assert!(
                s.blocks.iter().all(|b| b.len() >= words) && s.shared.iter().all(|b| b.len() >= words),
                "attention: KV block shorter than block_bytes"
            );
            // Shared blocks are only read below (every write is at a position ≥ `start`).
            let shared = s.shared.iter().map(|b| b.as_ptr() as *mut u8);
            RawSpan {
                blocks: shared.chain(s.blocks.iter_mut().map(|b| b.as_mut_ptr() as *mut u8)).collect(),
                start: s.start,
                len: s.len,
                row: s.row,
            }
        })
        .collect();
    let covered: usize = raw.iter().map(|s| s.len).sum();
    assert!(covered <= rows, "attention: spans cover more rows than the batch has");
    let mut seen = vec![false; rows];
    for s in &raw {
        for r in s.row..s.row + s.len {
            assert!(!std::mem::replace(&mut seen[r], true), "attention: two spans share row {r}");
        }
    }
    // SAFETY: the checks above are the contract of `attention_impl`.
    unsafe {
        match geo.dtype {
            KvDtype::F16 => attention_impl::<half::f16>(pool, ks.attend_f16, geo, layer, qkv, &raw, rope, out),
            KvDtype::Q8 => attention_impl::<i8>(pool, ks.attend_q8, geo, layer, qkv, &raw, rope, out),
            KvDtype::F32 => attention_impl::<f32>(pool, ks.attend_f32, geo, layer, qkv, &raw, rope, out),
        }
    }
}

/// A [`SeqSpan`] with its blocks as raw pointers, shareable with the pool's participants.
struct RawSpan {
    blocks: Vec<*mut u8>,
    start: usize,
    len: usize,
    row: usize,
}

// SAFETY: the pointers come from borrows held by `paged_attention_with` for the whole call,
// exclusive for every block a span writes; participants write disjoint slots of those (phase 1)
// and only read afterwards (phase 2); shared blocks are only ever read.
unsafe impl Send for RawSpan {}
unsafe impl Sync for RawSpan {}

/// One unit of parallel work.
struct Item {
    span: usize,
    kv_head: usize,
    heads: Range<usize>,
    queries: Range<usize>,
}

type AttendFn = unsafe fn(&QueryArgs, &mut [f32], &mut [f32]);

/// # Safety
/// Every span's blocks are valid for reads of `geo.block_bytes()` bytes, aligned for `E`, and
/// cover `start + len` positions; those holding positions `start..start + len` are valid for
/// writes, belong to no other span and are not accessed by anyone else during the call, and the
/// others are not written by anyone during the call; spans' rows are disjoint and inside the batch; `E` is the
/// geometry's element type and `attend` one for `E`.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_impl<E: KvElem>(
    pool: &ThreadPool,
    attend: AttendFn,
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &[RawSpan],
    rope: &RopeRows,
    out: &mut [f32],
) {
    let hd = geo.head_dim;
    let q_dim = geo.n_heads * hd;
    let kv_dim = geo.n_kv_heads * hd;
    let width = q_dim + 2 * kv_dim;
    let rows = qkv.len() / width;
    let group = geo.n_heads / geo.n_kv_heads;

    // Phase 1, in parallel over rows: rotate q into a scratch copy, rotate k and store k/v into
    // the caches. Each row writes only its own slot (its own position of its own sequence), so
    // participants never write the same bytes, and nothing reads the caches until the pool has
    // joined every participant of this phase.
    let mut q = vec![0f32; rows * q_dim];
    let q_ptr = pool::SyncPtr::new(q.as_mut_ptr());
    let row_span: Vec<(usize, usize)> =
        spans.iter().flat_map(|s| (0..s.len).map(move |i| (s.start + i, s.row + i))).collect();
    let span_of: Vec<&RawSpan> = spans.iter().flat_map(|s| std::iter::repeat_n(s, s.len)).collect();
    let chunks = if row_span.len() >= 8 { pool::n_chunks(row_span.len(), pool.n_threads()) } else { 1 };
    pool.run_chunks(chunks, |c| {
        let mut k_rot = vec![0f32; hd];
        let mut k_elems = vec![E::zero(); hd];
        for idx in split_range(row_span.len(), c, chunks) {
            let (pos, row) = row_span[idx];
            let src = &qkv[row * width..][..width];
            // SAFETY: rows of distinct spans are disjoint (caller), so each row of `q` is
            // written by one participant.
            let qr = unsafe { std::slice::from_raw_parts_mut(q_ptr.get().add(row * q_dim), q_dim) };
            qr.copy_from_slice(&src[..q_dim]);
            for h in qr.chunks_exact_mut(hd) {
                rope.apply(h, row);
            }
            let block = span_of[idx].blocks[pos / BLOCK_TOKENS];
            let slot = pos % BLOCK_TOKENS;
            for g in 0..geo.n_kv_heads {
                k_rot.copy_from_slice(&src[q_dim + g * hd..][..hd]);
                rope.apply(&mut k_rot, row);
                let k_scale = E::quantize(&k_rot, &mut k_elems);
                let (kt, k_scales) = region::<E>(block, geo.k_region(layer, g), geo);
                let (vr, v_scales) = region::<E>(block, geo.v_region(layer, g), geo);
                // SAFETY: the regions lie within the block (caller); this row owns slot `slot`.
                unsafe {
                    for (d, &x) in k_elems.iter().enumerate() {
                        *kt.add(d * BLOCK_TOKENS + slot) = x;
                    }
                    let v = std::slice::from_raw_parts_mut(vr.add(slot * hd), hd);
                    let v_scale = E::quantize(&src[q_dim + kv_dim + g * hd..][..hd], v);
                    if E::SCALED {
                        *k_scales.add(slot) = k_scale;
                        *v_scales.add(slot) = v_scale;
                    }
                }
            }
        }
    });

    // Phase 2, in parallel over items; the caches are only read from here on.
    let by_group: usize = spans.iter().map(|s| geo.n_kv_heads * s.len.div_ceil(QUERY_CHUNK)).sum();
    let split_heads = by_group < 2 * pool.n_threads();
    let per_span = whole_spans_per_participant(spans, pool.n_threads());
    let mut items = Vec::new();
    // Items `span_items[s]..span_items[s + 1]` belong to span `s`.
    let mut span_items = vec![0];
    for (si, span) in spans.iter().enumerate() {
        for g in 0..geo.n_kv_heads {
            for c in (0..span.len).step_by(QUERY_CHUNK) {
                let queries = c..(c + QUERY_CHUNK).min(span.len);
                // The query heads of kv head `g`, in items of at most MAX_GROUP heads (what one
                // pass over the keys serves), or one head each when there are few items.
                let per_item = if split_heads { 1 } else { MAX_GROUP };
                for h0 in (g * group..(g + 1) * group).step_by(per_item) {
                    let heads = h0..(h0 + per_item).min((g + 1) * group);
                    items.push(Item { span: si, kv_head: g, heads, queries: queries.clone() });
                }
            }
        }
        span_items.push(items.len());
    }
    let out_ptr = pool::SyncPtr::new(out.as_mut_ptr());
    let max_keys = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    // Scores of up to MAX_GROUP heads, padded to whole 16-key chunks; one buffer per thread.
    let scores_len = MAX_GROUP * max_keys.div_ceil(16) * 16;
    let run_item = |i: usize| {
        let item = &items[i];
        SCORES.with_borrow_mut(|scores| {
            if scores.len() < scores_len {
                scores.resize(scores_len, 0.0);
            }
            let span = &spans[item.span];
            for qi in item.queries.clone() {
                let row = span.row + qi;
                let args = QueryArgs {
                    geo,
                    layer,
                    blocks: &span.blocks,
                    kv_head: item.kv_head,
                    q: &q[row * q_dim + item.heads.start * hd..][..item.heads.len() * hd],
                    n_heads: item.heads.len(),
                    n_keys: span.start + qi + 1,
                };
                // SAFETY: each (row, head) output slice is written by exactly one item; the
                // blocks hold `n_keys` positions (caller) and `scores` was sized for them.
                unsafe {
                    let o = std::slice::from_raw_parts_mut(
                        out_ptr.get().add(row * q_dim + item.heads.start * hd),
                        item.heads.len() * hd,
                    );
                    attend(&args, scores, o)
                }
            }
        })
    };
    if per_span {
        pool.run_chunks(spans.len(), |s| (span_items[s]..span_items[s + 1]).for_each(run_item));
    } else {
        pool.run_chunks(items.len(), run_item);
    }
}

/// Whether each participant should take whole sequences rather than (kv head, query chunk)
/// items: when every sequence decodes a few rows and there are enough of them to keep every
/// thread busy (a CFG pair on two threads).
///
/// Why: a block keeps all kv heads of a layer side by side (`[k heads][v heads]`, 12 KiB for
/// SmolLM2), so one thread reading one sequence's blocks streams them in order, while kv-head
/// items on two threads interleave both sequences' blocks on each core. Measured on the 2-row
/// decode step, with the rest unchanged: attention 10–17 % less (docs/BENCHMARKS.md, "Where a
/// CFG pair's second row goes"). Prefill rows keep the finer items, which balance causal rows
/// of uneven cost.
fn whole_spans_per_participant(spans: &[RawSpan], n_threads: usize) -> bool {
    spans.len() >= n_threads.max(2) && spans.iter().all(|s| s.len <= QUERY_CHUNK)
}

thread_local! {
    /// Per-thread score buffer of the attention kernel (reused across calls).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One query position of `n_heads ≤ 8` heads sharing kv head `kv_head`: what the per-ISA
/// attention kernels receive.
pub(crate) struct QueryArgs<'a> {
    pub(crate) geo: &'a KvGeometry,
    pub(crate) layer: usize,
    /// The sequence's blocks (valid for `n_keys` positions).
    pub(crate) blocks: &'a [*mut u8],
    pub(crate) kv_head: usize,
    /// `[n_heads][head_dim]`, rotated.
    pub(crate) q: &'a [f32],
    pub(crate) n_heads: usize,
    /// Keys visible to this query (causal: positions `0..n_keys`).
    pub(crate) n_keys: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::Isa;

    #[test]
    fn grouped_heads_match_single_heads() {
        // 8 query heads over 2 kv heads (groups of 4) and 1 kv head (group of 8, the per-head path).
        for (n_heads, n_kv_heads) in [(8, 2), (8, 1), (4, 4)] {
            let geo = KvGeometry { n_layers: 2, n_heads, n_kv_heads, head_dim: 64, dtype: KvDtype::F32 };
            check_geometry(geo, 1e-5);
        }
    }

    /// Both implementations against a direct f64 computation, for GQA groups, uneven lengths
    /// and both head groupings.
    #[test]
    fn kernels_match_reference() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8] {
            check_dtype(dtype);
        }
    }

    fn check_dtype(dtype: KvDtype) {
        let geo = KvGeometry { n_layers: 2, n_heads: 6, n_kv_heads: 2, head_dim: 32, dtype };
        let tol = match dtype {
            KvDtype::F32 => 1e-5,
            KvDtype::F16 => 2e-3,
            KvDtype::Q8 => 3e-2,
        };
        check_geometry(geo, tol);
    }

    /// Prefills four sequences of uneven lengths in one call, then decodes one more token of
    /// each in a second call (queries over cached positions), on every instruction set and
    /// pool size, against an f64 computation.
    fn check_geometry(geo: KvGeometry, tol: f64) {
        let dtype = geo.dtype;
        let hd = geo.head_dim;
        let (q_dim, kv_dim) = (geo.n_heads * hd, geo.n_kv_heads * hd);
        let width = q_dim + 2 * kv_dim;
        let mut rng = crate::sampling::Rng::new(5);
        // Total positions per sequence; the last one is decoded in the second call.
        let lens = [38usize, 2, 17, 6];
        let full: Vec<Vec<f32>> =
            lens.iter().map(|&l| (0..l * width).map(|_| rng.next_f32() * 2.0 - 1.0).collect()).collect();
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let rope_for = |pos: &dyn Fn(usize) -> Vec<u32>| {
            let positions: Vec<u32> = (0..lens.len()).flat_map(pos).collect();
            RopeRows::new(&positions, &inv, RopeStyle::Half)
        };
        let prefill_rope = rope_for(&|s| (0..lens[s] as u32 - 1).collect());
        let decode_rope = rope_for(&|s| vec![lens[s] as u32 - 1]);
        let prefill_qkv: Vec<f32> = full.iter().zip(lens).flat_map(|(f, l)| f[..(l - 1) * width].to_vec()).collect();
        let decode_qkv: Vec<f32> = full.iter().zip(lens).flat_map(|(f, l)| f[(l - 1) * width..].to_vec()).collect();
        // The reference output of position `i` of sequence `s`, head `h`.
        let rotate = |v: &[f32], pos: usize| {
            let mut v = v.to_vec();
            RopeRows::new(&[pos as u32], &inv, RopeStyle::Half).apply(&mut v, 0);
            v
        };
        let reference = |s: usize, i: usize, h: usize| -> Vec<f64> {
            let f = &full[s];
            let g = h / (geo.n_heads / geo.n_kv_heads);
            let qv = rotate(&f[i * width + h * hd..][..hd], i);
            let mut sc: Vec<f64> = (0..=i)
                .map(|t| {
                    let k = rotate(&f[t * width + q_dim + g * hd..][..hd], t);
                    qv.iter().zip(&k).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            sc.iter_mut().for_each(|x| *x = (*x - m).exp());
            let z: f64 = sc.iter().sum();
            (0..hd)
                .map(|d| (0..=i).map(|t| sc[t] / z * f[t * width + q_dim + kv_dim + g * hd + d] as f64).sum())
                .collect()
        };
        for isa in Isa::supported() {
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let words = geo.block_bytes().div_ceil(8);
                let mut storage: Vec<Vec<Vec<u64>>> =
                    lens.iter().map(|&l| (0..l.div_ceil(BLOCK_TOKENS)).map(|_| vec![0u64; words]).collect()).collect();
                let spans_of = |storage: &mut Vec<Vec<Vec<u64>>>, decode: bool| -> Vec<Vec<f32>> {
                    let mut row = 0;
                    let mut spans: Vec<SeqSpan> = storage
                        .iter_mut()
                        .zip(lens)
                        .map(|(blocks, l)| {
                            let (start, len) = if decode { (l - 1, 1) } else { (0, l - 1) };
                            let s = SeqSpan {
                                shared: Vec::new(),
                                blocks: blocks.iter_mut().map(|b| &mut b[..]).collect(),
                                start,
                                len,
                                row,
                            };
                            row += len;
                            s
                        })
                        .collect();
                    let (qkv, rope) = if decode { (&decode_qkv, &decode_rope) } else { (&prefill_qkv, &prefill_rope) };
                    let mut out = vec![0f32; row * q_dim];
                    paged_attention_with(&pool, &geo, 1, qkv, &mut spans, rope, &mut out, isa);
                    out.chunks(q_dim).map(|c| c.to_vec()).collect()
                };
                let prefill = spans_of(&mut storage, false);
                let decode = spans_of(&mut storage, true);
                let mut prow = 0;
                for (s, &l) in lens.iter().enumerate() {
                    for i in 0..l {
                        let got = if i + 1 == l { &decode[s] } else { &prefill[prow + i] };
                        for h in 0..geo.n_heads {
                            for (d, want) in reference(s, i, h).into_iter().enumerate() {
                                let g = got[h * hd + d] as f64;
                                assert!(
                                    (g - want).abs() < tol,
                                    "{dtype:?} hd {hd} {isa} t{threads} seq {s} pos {i} head {h} dim {d}: {g} vs {want}"
                                );
                            }
                        }
                    }
                    prow += l - 1;
                }
            }
        }
    }

    #[test]
    fn decoding_sequences_go_whole_to_a_participant_when_there_are_enough() {
        let span = |len| RawSpan { blocks: Vec::new(), start: 40, len, row: 0 };
        // A CFG pair on two threads: one sequence each.
        assert!(whole_spans_per_participant(&[span(1), span(1)], 2));
        assert!(whole_spans_per_participant(&[span(1), span(1), span(1)], 2));
        // One sequence: its kv heads (or query heads) are what spreads over the threads.
        assert!(!whole_spans_per_participant(&[span(1)], 2));
        assert!(!whole_spans_per_participant(&[span(1)], 1));
        // Fewer sequences than threads would leave threads idle.
        assert!(!whole_spans_per_participant(&[span(1), span(1)], 4));
        // A prefill span keeps the finer items that balance causal rows.
        assert!(!whole_spans_per_participant(&[span(1), span(QUERY_CHUNK + 1)], 2));
        assert!(whole_spans_per_participant(&[span(QUERY_CHUNK), span(2)], 2));
    }

    #[test]
    fn every_head_size_matches_reference() {
        // The SIMD kernels specialise 32, 64 and 128; others take a generic path.
        for head_dim in [32, 48, 64, 128] {
            let geo = KvGeometry { n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim, dtype: KvDtype::F16 };
            check_geometry(geo, 2e-3);
        }
    }

    /// Two spans reading the same leading blocks (a shared prefix) in one call give the bits of
    /// a span holding copies of them as its own, and leave them untouched.
    #[test]
    fn shared_prefix_blocks_are_read_only_and_give_the_same_output() {
        let geo = KvGeometry { n_layers: 1, n_heads: 4, n_kv_heads: 2, head_dim: 32, dtype: KvDtype::F16 };
        let (hd, words) = (geo.head_dim, geo.block_bytes().div_ceil(8));
        let width = (geo.n_heads + 2 * geo.n_kv_heads) * hd;
        let q_dim = geo.n_heads * hd;
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let mut rng = crate::sampling::Rng::new(9);
        let mut qkv = |rows: usize| -> Vec<f32> { (0..rows * width).map(|_| rng.next_f32() - 0.5).collect() };
        // 40 positions prefilled in blocks of one sequence.
        let mut a: Vec<Vec<u64>> = (0..3).map(|_| vec![0u64; words]).collect();
        let prompt = qkv(40);
        let rope = RopeRows::new(&(0..40).collect::<Vec<u32>>(), &inv, RopeStyle::Half);
        let mut out = vec![0f32; 40 * q_dim];
        let blocks = a.iter_mut().map(|b| &mut b[..]).collect();
        paged_attention(
            &geo,
            0,
            &prompt,
            &mut [SeqSpan { shared: Vec::new(), blocks, start: 0, len: 40, row: 0 }],
            &rope,
            &mut out,
        );
        // Its first 2 blocks become shared by two sequences, each with its own copy of the third
        // and a fresh fourth; both decode the same token at position 40.
        let cached = a[..2].to_vec();
        let mut tails: Vec<Vec<Vec<u64>>> = (0..2).map(|_| vec![a[2].clone(), vec![0u64; words]]).collect();
        let step = qkv(1);
        let both: Vec<f32> = step.iter().chain(&step).copied().collect();
        let rope2 = RopeRows::new(&[40, 40], &inv, RopeStyle::Half);
        let mut out = vec![0f32; 2 * q_dim];
        let mut spans: Vec<SeqSpan> = tails
            .iter_mut()
            .enumerate()
            .map(|(row, t)| SeqSpan {
                shared: cached.iter().map(|b| &b[..]).collect(),
                blocks: t.iter_mut().map(|b| &mut b[..]).collect(),
                start: 40,
                len: 1,
                row,
            })
            .collect();
        paged_attention(&geo, 0, &both, &mut spans, &rope2, &mut out);
        assert_eq!(cached[..], a[..2], "the shared blocks were not written");
        // The same decode with every block owned.
        a.push(vec![0u64; words]);
        let rope1 = RopeRows::new(&[40], &inv, RopeStyle::Half);
        let mut alone = vec![0f32; q_dim];
        let blocks = a.iter_mut().map(|b| &mut b[..]).collect();
        paged_attention(
            &geo,
            0,
            &step,
            &mut [SeqSpan { shared: Vec::new(), blocks, start: 40, len: 1, row: 0 }],
            &rope1,
            &mut alone,
        );
        assert_eq!(out[..q_dim], alone[..], "shared blocks give the bits of owned ones");
        assert_eq!(out[q_dim..], alone[..]);
    }

    #[test]
    #[should_panic(expected = "writes into a shared KV block")]
    fn writing_into_a_shared_block_is_refused() {
        let geo = KvGeometry { n_layers: 1, n_heads: 2, n_kv_heads: 1, head_dim: 32, dtype: KvDtype::F16 };
        let width = 4 * 32;
        let shared = vec![0u64; geo.block_bytes().div_ceil(8)];
        let mut own = vec![0u64; geo.block_bytes().div_ceil(8)];
        let mut spans =
            vec![SeqSpan { shared: vec![&shared[..]], blocks: vec![&mut own[..]], start: 10, len: 7, row: 0 }];
        let rope = RopeRows::new(&[10; 7], &[1.0; 16], RopeStyle::Half);
        let mut out = vec![0f32; 7 * 64];
        paged_attention(&geo, 0, &vec![0.0; 7 * width], &mut spans, &rope, &mut out);
    }

    #[test]
    #[should_panic(expected = "too few KV blocks")]
    fn spans_without_room_for_their_positions_are_refused() {
        let geo = KvGeometry { n_layers: 1, n_heads: 2, n_kv_heads: 1, head_dim: 32, dtype: KvDtype::F16 };
        let width = 4 * 32;
        let mut block = vec![0u64; geo.block_bytes().div_ceil(8)];
        let mut spans = vec![SeqSpan { shared: Vec::new(), blocks: vec![&mut block[..]], start: 10, len: 7, row: 0 }];
        let rope = RopeRows::new(&[10; 7], &[1.0; 16], RopeStyle::Half);
        let mut out = vec![0f32; 7 * 64];
        paged_attention(&geo, 0, &vec![0.0; 7 * width], &mut spans, &rope, &mut out);
    }
}
