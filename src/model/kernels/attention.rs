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
//! balances the uneven cost of causal prefill rows.

use super::pool::{self, ThreadPool, split_range};
use crate::model::RopeStyle;
use std::ops::Range;

/// Positions per KV block.
pub const BLOCK_TOKENS: usize = 16;
/// Query positions per work item.
const QUERY_CHUNK: usize = 16;
/// Query heads per kv head handled in registers at once.
const MAX_GROUP: usize = 8;

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
    /// Loads 16 consecutive elements as f32 lanes (unscaled values).
    ///
    /// # Safety
    /// `p` must point to 16 readable elements, and the CPU must support AVX-512F (and F16C for
    /// f16).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
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
    fn k_region(&self, layer: usize, head: usize) -> usize {
        ((layer * 2) * self.n_kv_heads + head) * self.region_bytes()
    }
    /// Byte offset of the values (`[BLOCK_TOKENS][head_dim]`) of (layer, kv head) within a block.
    #[inline]
    fn v_region(&self, layer: usize, head: usize) -> usize {
        ((layer * 2 + 1) * self.n_kv_heads + head) * self.region_bytes()
    }
    /// Byte offset, within a region, of its per-position scales.
    #[inline]
    fn scales_in_region(&self) -> usize {
        BLOCK_TOKENS * self.head_dim * self.dtype.size()
    }
}

/// Typed pointers into one region of a block.
#[inline(always)]
fn region<E>(block: *mut u8, offset: usize, geo: &KvGeometry) -> (*mut E, *mut f32) {
    // SAFETY: offsets come from the geometry, within the block's `block_bytes`.
    unsafe {
        let base = block.add(offset);
        (base as *mut E, base.add(geo.scales_in_region()) as *mut f32)
    }
}

/// One sequence's slice of the batch as the kernel sees it.
pub struct SeqSpan {
    /// Base pointers of the sequence's blocks (enough for `start + len` positions), each
    /// `block_bytes` long, holding elements of the geometry's dtype.
    pub blocks: Vec<*mut u8>,
    /// Position of the first new token (tokens already in the cache).
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Row of the first new token in the packed batch.
    pub row: usize,
}

// SAFETY: distinct sequences own distinct blocks; the kernel writes a sequence's new slots in a
// serial phase and only reads blocks while running in parallel.
unsafe impl Send for SeqSpan {}
unsafe impl Sync for SeqSpan {}

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
/// k/v rows are rotated and written into the sequences' caches first. Returns `[rows, n_heads·head_dim]`.
pub fn paged_attention(
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &[SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
) {
    paged_attention_with(pool::global(), geo, layer, qkv, spans, rope, out, super::Isa::detect())
}

#[allow(clippy::too_many_arguments)]
pub fn paged_attention_with(
    pool: &ThreadPool,
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &[SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
    isa: super::Isa,
) {
    // A caller may ask for the portable kernels, never for instructions the CPU lacks.
    let isa = if isa == super::Isa::Avx512Vnni { super::Isa::detect() } else { isa };
    match geo.dtype {
        KvDtype::F16 => attention_impl::<half::f16>(pool, geo, layer, qkv, spans, rope, out, isa),
        KvDtype::Q8 => attention_impl::<i8>(pool, geo, layer, qkv, spans, rope, out, isa),
        KvDtype::F32 => attention_impl::<f32>(pool, geo, layer, qkv, spans, rope, out, isa),
    }
}

/// One unit of parallel work.
struct Item {
    span: usize,
    kv_head: usize,
    heads: Range<usize>,
    queries: Range<usize>,
}

#[allow(clippy::too_many_arguments)]
fn attention_impl<E: KvElem>(
    pool: &ThreadPool,
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &[SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
    isa: super::Isa,
) {
    let hd = geo.head_dim;
    let q_dim = geo.n_heads * hd;
    let kv_dim = geo.n_kv_heads * hd;
    let width = q_dim + 2 * kv_dim;
    let rows = qkv.len() / width;
    let group = geo.n_heads / geo.n_kv_heads;
    assert_eq!(out.len(), rows * q_dim);

    // Phase 1, parallel over rows: rotate q into a scratch copy, rotate k and store k/v into
    // the caches (each row writes its own slot).
    let mut q = vec![0f32; rows * q_dim];
    let q_ptr = pool::SyncPtr::new(q.as_mut_ptr());
    let row_span: Vec<(usize, usize)> =
        spans.iter().flat_map(|s| (0..s.len).map(move |i| (s.start + i, s.row + i))).collect();
    let span_of: Vec<&SeqSpan> = spans.iter().flat_map(|s| std::iter::repeat_n(s, s.len)).collect();
    let chunks = if rows >= 8 { pool::n_chunks(rows, pool.n_threads()) } else { 1 };
    pool.run_chunks(chunks, |c| {
        let mut k_rot = vec![0f32; hd];
        let mut k_elems = vec![E::zero(); hd];
        for idx in split_range(rows, c, chunks) {
            let (pos, row) = row_span[idx];
            let src = &qkv[row * width..][..width];
            // SAFETY: each row of `q` is written by one participant.
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
                // SAFETY: the regions lie within the block; this row owns slot `slot`.
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

    // Parallel phase.
    let by_group: usize = spans.iter().map(|s| geo.n_kv_heads * s.len.div_ceil(QUERY_CHUNK)).sum();
    let split_heads = by_group < 2 * pool.n_threads();
    let mut items = Vec::new();
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
    }
    let out_ptr = pool::SyncPtr::new(out.as_mut_ptr());
    let max_keys = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    // Scores of up to MAX_GROUP heads, padded to whole 16-key chunks; one buffer per thread.
    let scores_len = MAX_GROUP * max_keys.div_ceil(16) * 16;
    pool.run_chunks(items.len(), |i| {
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
                // SAFETY: each (row, head) output slice is written by exactly one item.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add(row * q_dim + item.heads.start * hd),
                        item.heads.len() * hd,
                    )
                };
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    super::Isa::Avx512Vnni if matches!(hd, 32 | 64 | 128) => unsafe {
                        avx512::attend::<E>(&args, scores, o)
                    },
                    _ => portable::attend::<E>(&args, scores, o),
                }
            }
        })
    });
}

thread_local! {
    /// Per-thread score buffer of the attention kernel (reused across calls).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One query position of `n_heads` heads sharing kv head `kv_head`.
struct QueryArgs<'a> {
    geo: &'a KvGeometry,
    layer: usize,
    blocks: &'a [*mut u8],
    kv_head: usize,
    /// `[n_heads][head_dim]`, rotated.
    q: &'a [f32],
    n_heads: usize,
    /// Keys visible to this query (causal: positions `0..n_keys`).
    n_keys: usize,
}

mod portable {
    use super::*;

    /// softmax(q·Kᵀ/√d)·V for each head, scalar reference implementation of the same layout.
    pub fn attend<E: KvElem>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
        let hd = a.geo.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let n = a.n_keys;
        for h in 0..a.n_heads {
            let q = &a.q[h * hd..][..hd];
            let s = &mut scores[h * n..][..n];
            for (t, sc) in s.iter_mut().enumerate() {
                let (kt, k_scales) = region::<E>(a.blocks[t / BLOCK_TOKENS], a.geo.k_region(a.layer, a.kv_head), a.geo);
                let slot = t % BLOCK_TOKENS;
                let mut dot = 0f32;
                for (d, &qd) in q.iter().enumerate() {
                    dot += qd * unsafe { *kt.add(d * BLOCK_TOKENS + slot) }.to_f32();
                }
                let ks = if E::SCALED { unsafe { *k_scales.add(slot) } } else { 1.0 };
                *sc = dot * ks * scale;
            }
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for sc in s.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let o = &mut out[h * hd..][..hd];
            o.fill(0.0);
            for (t, &w) in s.iter().enumerate() {
                let (vr, v_scales) = region::<E>(a.blocks[t / BLOCK_TOKENS], a.geo.v_region(a.layer, a.kv_head), a.geo);
                let slot = t % BLOCK_TOKENS;
                let v = unsafe { std::slice::from_raw_parts(vr.add(slot * hd), hd) };
                let w = if E::SCALED { w * unsafe { *v_scales.add(slot) } } else { w };
                for (od, &vd) in o.iter_mut().zip(v) {
                    *od += w * vd.to_f32();
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use crate::simd::exp16;
    use std::arch::x86_64::*;

    /// Hints the cache to load `len` bytes from `p`.
    #[inline(always)]
    unsafe fn prefetch_region(p: *const u8, len: usize) {
        unsafe {
            let mut off = 0;
            while off < len {
                _mm_prefetch::<_MM_HINT_T0>(p.add(off) as *const i8);
                off += 64;
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn attend<E: KvElem>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
        unsafe {
            match a.geo.head_dim / 16 {
                2 => attend_c::<E, 2>(a, scores, out),
                4 => attend_c::<E, 4>(a, scores, out),
                _ => attend_c::<E, 8>(a, scores, out),
            }
        }
    }

    /// `out[h0 + h] = Σ_t w[h][t]·v[t] / Σ_t w[h][t]` for `NH` heads from `h0`, loading each value
    /// vector once for all of them.
    #[inline(always)]
    unsafe fn weighted_values<E: KvElem, const C: usize, const NH: usize>(
        a: &QueryArgs,
        sp: *const f32,
        stride: usize,
        inv: &[f32; MAX_GROUP],
        out: &mut [f32],
        h0: usize,
    ) {
        unsafe {
            let hd = C * 16;
            let n = a.n_keys;
            let v_off = a.geo.v_region(a.layer, a.kv_head);
            let values_bytes = BLOCK_TOKENS * hd * std::mem::size_of::<E>();
            let mut acc = [[_mm512_setzero_ps(); C]; NH];
            let n_blocks = n.div_ceil(BLOCK_TOKENS);
            for b in 0..n_blocks {
                let (vb, v_scales) = region::<E>(a.blocks[b], v_off, a.geo);
                if b + 1 < n_blocks {
                    prefetch_region(a.blocks[b + 1].add(v_off), values_bytes);
                }
                let n_in_block = (n - b * BLOCK_TOKENS).min(BLOCK_TOKENS);
                for s in 0..n_in_block {
                    let t = b * BLOCK_TOKENS + s;
                    let vs = if E::SCALED { *v_scales.add(s) } else { 1.0 };
                    let vp = vb.add(s * hd);
                    let v: [__m512; C] = std::array::from_fn(|c| E::load16(vp.add(c * 16)));
                    for h in 0..NH {
                        let w = _mm512_set1_ps(*sp.add((h0 + h) * stride + t) * vs);
                        for c in 0..C {
                            acc[h][c] = _mm512_fmadd_ps(w, v[c], acc[h][c]);
                        }
                    }
                }
            }
            for h in 0..NH {
                let iv = _mm512_set1_ps(inv[h0 + h]);
                for c in 0..C {
                    _mm512_storeu_ps(out.as_mut_ptr().add((h0 + h) * hd + c * 16), _mm512_mul_ps(acc[h][c], iv));
                }
            }
        }
    }

    /// `C` = head_dim / 16 (the dispatcher only sends head sizes 32, 64 and 128 here).
    #[inline(always)]
    unsafe fn attend_c<E: KvElem, const C: usize>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
        unsafe {
            let hd = C * 16;
            let nh = a.n_heads;
            let n = a.n_keys;
            // Keys are scored 16 at a time (one register of lanes); a block may hold several.
            let n_chunks = n.div_ceil(16);
            let stride = n_chunks * 16;
            let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
            let (k_off, v_off) = (a.geo.k_region(a.layer, a.kv_head), a.geo.v_region(a.layer, a.kv_head));
            let q = a.q.as_ptr();
            let sp = scores.as_mut_ptr();
            let values_bytes = BLOCK_TOKENS * hd * std::mem::size_of::<E>();

            // Scores, all heads of the group per loaded key vector.
            let mut maxv = [_mm512_set1_ps(f32::NEG_INFINITY); MAX_GROUP];
            // The values of the first block are needed right after the scores: start loading them.
            prefetch_region(a.blocks[0].add(v_off), values_bytes);
            for c in 0..n_chunks {
                let (b, sub) = (c * 16 / BLOCK_TOKENS, (c * 16) % BLOCK_TOKENS / 16);
                // Blocks are separate allocations: ask for the next block's keys ahead of time.
                if sub == 0 && (b + 1) * BLOCK_TOKENS < n {
                    prefetch_region(a.blocks[b + 1].add(k_off), values_bytes);
                }
                let (kt, k_scales) = region::<E>(a.blocks[b], k_off, a.geo);
                let kt = kt.add(sub * 16);
                let mut acc = [_mm512_setzero_ps(); MAX_GROUP];
                for d in 0..hd {
                    let k = E::load16(kt.add(d * BLOCK_TOKENS));
                    for h in 0..nh {
                        acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(h * hd + d)), k, acc[h]);
                    }
                }
                // Per-key scales (int8 cache) fold into the softmax scale.
                let key_scale =
                    if E::SCALED { _mm512_mul_ps(scale, _mm512_loadu_ps(k_scales.add(sub * 16))) } else { scale };
                let valid = n - c * 16;
                let mask: __mmask16 = if valid >= 16 { 0xFFFF } else { (1u16 << valid) - 1 };
                for h in 0..nh {
                    let s =
                        _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, _mm512_mul_ps(acc[h], key_scale));
                    _mm512_storeu_ps(sp.add(h * stride + c * 16), s);
                    maxv[h] = _mm512_max_ps(maxv[h], s);
                }
            }
            // exp(s − max) in place, and the sums.
            let mut inv = [0f32; MAX_GROUP];
            for h in 0..nh {
                let m = _mm512_set1_ps(_mm512_reduce_max_ps(maxv[h]));
                let mut sum = _mm512_setzero_ps();
                for c in 0..n_chunks {
                    let p = sp.add(h * stride + c * 16);
                    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), m));
                    _mm512_storeu_ps(p, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[h] = 1.0 / _mm512_reduce_add_ps(sum);
            }
            // Weighted sum of values, 16 dimensions per register, accumulators in registers. All
            // heads of the group share each loaded value vector when their accumulators fit.
            match (nh, C) {
                (1, _) => weighted_values::<E, C, 1>(a, sp, stride, &inv, out, 0),
                (2, _) if C <= 4 => weighted_values::<E, C, 2>(a, sp, stride, &inv, out, 0),
                (3, _) if C <= 4 => weighted_values::<E, C, 3>(a, sp, stride, &inv, out, 0),
                (4, _) if C <= 4 => weighted_values::<E, C, 4>(a, sp, stride, &inv, out, 0),
                _ => {
                    for h in 0..nh {
                        weighted_values::<E, C, 1>(a, sp, stride, &inv, out, h);
                    }
                }
            }
        }
    }
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

    fn check_geometry(geo: KvGeometry, tol: f64) {
        let dtype = geo.dtype;
        let hd = geo.head_dim;
        let (q_dim, kv_dim) = (geo.n_heads * hd, geo.n_kv_heads * hd);
        let width = q_dim + 2 * kv_dim;
        let mut rng = crate::sampling::Rng::new(5);
        let lens = [37usize, 1, 16, 5];
        let rows: usize = lens.iter().sum();
        let qkv: Vec<f32> = (0..rows * width).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
        let rope = RopeRows::new(&positions, &inv, RopeStyle::Half);
        for isa in [Isa::Portable, Isa::detect()] {
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let mut storage: Vec<Vec<Vec<u8>>> = lens
                    .iter()
                    .map(|&l| (0..l.div_ceil(BLOCK_TOKENS)).map(|_| vec![0u8; geo.block_bytes()]).collect())
                    .collect();
                let mut row = 0;
                let spans: Vec<SeqSpan> = storage
                    .iter_mut()
                    .zip(lens)
                    .map(|(blocks, len)| {
                        let s =
                            SeqSpan { blocks: blocks.iter_mut().map(|b| b.as_mut_ptr()).collect(), start: 0, len, row };
                        row += len;
                        s
                    })
                    .collect();
                let mut out = vec![0f32; rows * q_dim];
                paged_attention_with(&pool, &geo, 1, &qkv, &spans, &rope, &mut out, isa);
                // Reference.
                let mut row0 = 0;
                for &len in &lens {
                    for i in 0..len {
                        for h in 0..geo.n_heads {
                            let g = h / (geo.n_heads / geo.n_kv_heads);
                            let mut qv = qkv[(row0 + i) * width + h * hd..][..hd].to_vec();
                            rope.apply(&mut qv, row0 + i);
                            let mut s: Vec<f64> = (0..=i)
                                .map(|t| {
                                    let mut k = qkv[(row0 + t) * width + q_dim + g * hd..][..hd].to_vec();
                                    rope.apply(&mut k, row0 + t);
                                    qv.iter().zip(&k).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>()
                                        / (hd as f64).sqrt()
                                })
                                .collect();
                            let m = s.iter().cloned().fold(f64::MIN, f64::max);
                            s.iter_mut().for_each(|x| *x = (*x - m).exp());
                            let z: f64 = s.iter().sum();
                            for d in 0..hd {
                                let want: f64 = (0..=i)
                                    .map(|t| s[t] / z * qkv[(row0 + t) * width + q_dim + kv_dim + g * hd + d] as f64)
                                    .sum();
                                let got = out[(row0 + i) * q_dim + h * hd + d] as f64;
                                assert!(
                                    (got - want).abs() < tol,
                                    "{dtype:?} {isa:?} t{threads} row {} head {h} dim {d}: {got} vs {want}",
                                    row0 + i
                                );
                            }
                        }
                    }
                    row0 += len;
                }
            }
        }
    }
}
