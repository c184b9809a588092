//! Causal attention of a ragged batch over paged per-sequence KV caches, with rotary embeddings
//! applied on the way in.
//!
//! A KV block holds [`BLOCK_TOKENS`] = 16 positions of one sequence for all layers. Per layer and
//! kv head, keys are stored *transposed* (`[head_dim][16]`) and values row-major (`[16][head_dim]`):
//! - scores of 16 keys at once are `Σ_d q[d] · Kᵀ[d][0..16]`, one broadcast-FMA per dimension into
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

use super::pool::{self, ThreadPool};
use crate::model::RopeStyle;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Positions per KV block.
pub const BLOCK_TOKENS: usize = 16;
/// Query positions per work item.
const QUERY_CHUNK: usize = 16;
/// Query heads per kv head handled in registers at once.
const MAX_GROUP: usize = 8;

/// Shapes shared by every KV block of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// f32 values per block.
    pub fn block_len(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * BLOCK_TOKENS * self.head_dim
    }
    /// Start of the keys (`[head_dim][16]`) of (layer, kv head) within a block.
    #[inline]
    fn k_offset(&self, layer: usize, head: usize) -> usize {
        ((layer * 2) * self.n_kv_heads + head) * BLOCK_TOKENS * self.head_dim
    }
    /// Start of the values (`[16][head_dim]`) of (layer, kv head) within a block.
    #[inline]
    fn v_offset(&self, layer: usize, head: usize) -> usize {
        ((layer * 2 + 1) * self.n_kv_heads + head) * BLOCK_TOKENS * self.head_dim
    }
}

/// One sequence's slice of the batch as the kernel sees it.
pub struct SeqSpan {
    /// Base pointers of the sequence's blocks (enough for `start + len` positions).
    pub blocks: Vec<*mut f32>,
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
pub fn paged_attention(geo: &KvGeometry, layer: usize, qkv: &[f32], spans: &[SeqSpan], rope: &RopeRows, out: &mut [f32]) {
    paged_attention_with(pool::global(), geo, layer, qkv, spans, rope, out, super::Isa::detect())
}

/// One unit of parallel work.
struct Item {
    span: usize,
    kv_head: usize,
    heads: Range<usize>,
    queries: Range<usize>,
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
    let hd = geo.head_dim;
    let q_dim = geo.n_heads * hd;
    let kv_dim = geo.n_kv_heads * hd;
    let width = q_dim + 2 * kv_dim;
    let rows = qkv.len() / width;
    let group = geo.n_heads / geo.n_kv_heads;
    assert_eq!(out.len(), rows * q_dim);
    assert!(group <= MAX_GROUP, "at most {MAX_GROUP} query heads per kv head");

    // Serial phase: rotate q into a scratch copy, rotate k and store k/v into the caches.
    let mut q = vec![0f32; rows * q_dim];
    let mut k_rot = vec![0f32; hd];
    for span in spans {
        for i in 0..span.len {
            let row = span.row + i;
            let src = &qkv[row * width..][..width];
            let qr = &mut q[row * q_dim..][..q_dim];
            qr.copy_from_slice(&src[..q_dim]);
            for h in qr.chunks_exact_mut(hd) {
                rope.apply(h, row);
            }
            let pos = span.start + i;
            let block = span.blocks[pos / BLOCK_TOKENS];
            let slot = pos % BLOCK_TOKENS;
            for g in 0..geo.n_kv_heads {
                k_rot.copy_from_slice(&src[q_dim + g * hd..][..hd]);
                rope.apply(&mut k_rot, row);
                // SAFETY: `block` holds `block_len` f32s; offsets stay within (layer, head).
                unsafe {
                    let kt = block.add(geo.k_offset(layer, g));
                    for (d, &x) in k_rot.iter().enumerate() {
                        *kt.add(d * BLOCK_TOKENS + slot) = x;
                    }
                    let v = std::slice::from_raw_parts_mut(block.add(geo.v_offset(layer, g) + slot * hd), hd);
                    v.copy_from_slice(&src[q_dim + kv_dim + g * hd..][..hd]);
                }
            }
        }
    }

    // Parallel phase.
    let by_group: usize = spans.iter().map(|s| geo.n_kv_heads * s.len.div_ceil(QUERY_CHUNK)).sum();
    let split_heads = by_group < 2 * pool.n_threads();
    let mut items = Vec::new();
    for (si, span) in spans.iter().enumerate() {
        for g in 0..geo.n_kv_heads {
            for c in (0..span.len).step_by(QUERY_CHUNK) {
                let queries = c..(c + QUERY_CHUNK).min(span.len);
                let heads = g * group..(g + 1) * group;
                if split_heads {
                    for h in heads {
                        items.push(Item { span: si, kv_head: g, heads: h..h + 1, queries: queries.clone() });
                    }
                } else {
                    items.push(Item { span: si, kv_head: g, heads, queries });
                }
            }
        }
    }
    let next = AtomicUsize::new(0);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let max_keys = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    let parallel = if items.len() > 1 { pool.n_threads() } else { 1 };
    pool.run(parallel, |_, _| {
        let out_ptr = out_ptr;
        // Scores of up to MAX_GROUP heads, padded to whole blocks.
        let mut scores = vec![0f32; MAX_GROUP * max_keys.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
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
                    std::slice::from_raw_parts_mut(out_ptr.0.add(row * q_dim + item.heads.start * hd), item.heads.len() * hd)
                };
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    super::Isa::Avx512Vnni if hd.is_multiple_of(16) => unsafe { avx512::attend(&args, &mut scores, o) },
                    _ => portable::attend(&args, &mut scores, o),
                }
            }
        }
    });
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One query position of `n_heads` heads sharing kv head `kv_head`.
struct QueryArgs<'a> {
    geo: &'a KvGeometry,
    layer: usize,
    blocks: &'a [*mut f32],
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
    pub fn attend(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
        let hd = a.geo.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let n = a.n_keys;
        for h in 0..a.n_heads {
            let q = &a.q[h * hd..][..hd];
            let s = &mut scores[h * n..][..n];
            for (t, sc) in s.iter_mut().enumerate() {
                let kt = unsafe { a.blocks[t / BLOCK_TOKENS].add(a.geo.k_offset(a.layer, a.kv_head)) };
                let slot = t % BLOCK_TOKENS;
                let mut dot = 0f32;
                for (d, &qd) in q.iter().enumerate() {
                    dot += qd * unsafe { *kt.add(d * BLOCK_TOKENS + slot) };
                }
                *sc = dot * scale;
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
                let v = unsafe {
                    std::slice::from_raw_parts(
                        a.blocks[t / BLOCK_TOKENS].add(a.geo.v_offset(a.layer, a.kv_head) + (t % BLOCK_TOKENS) * hd),
                        hd,
                    )
                };
                for (od, &vd) in o.iter_mut().zip(v) {
                    *od += w * vd;
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
    use crate::model::kernels::simd::exp16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
        unsafe {
            let hd = a.geo.head_dim;
            let nh = a.n_heads;
            let n = a.n_keys;
            let n_blocks = n.div_ceil(BLOCK_TOKENS);
            let stride = n_blocks * BLOCK_TOKENS;
            let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
            let k_off = a.geo.k_offset(a.layer, a.kv_head);
            let v_off = a.geo.v_offset(a.layer, a.kv_head);
            let q = a.q.as_ptr();
            let sp = scores.as_mut_ptr();

            // Scores, 16 keys per block, all heads of the group per loaded key vector.
            let mut maxv = [_mm512_set1_ps(f32::NEG_INFINITY); MAX_GROUP];
            for b in 0..n_blocks {
                let kt = a.blocks[b].add(k_off);
                let mut acc = [_mm512_setzero_ps(); MAX_GROUP];
                for d in 0..hd {
                    let k = _mm512_loadu_ps(kt.add(d * BLOCK_TOKENS));
                    for h in 0..nh {
                        acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(h * hd + d)), k, acc[h]);
                    }
                }
                let valid = n - b * BLOCK_TOKENS;
                let mask: __mmask16 = if valid >= 16 { 0xFFFF } else { (1u16 << valid) - 1 };
                for h in 0..nh {
                    let s = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, _mm512_mul_ps(acc[h], scale));
                    _mm512_storeu_ps(sp.add(h * stride + b * BLOCK_TOKENS), s);
                    maxv[h] = _mm512_max_ps(maxv[h], s);
                }
            }
            // exp(s − max) in place, and the sums.
            let mut inv = [0f32; MAX_GROUP];
            for h in 0..nh {
                let m = _mm512_set1_ps(_mm512_reduce_max_ps(maxv[h]));
                let mut sum = _mm512_setzero_ps();
                for b in 0..n_blocks {
                    let p = sp.add(h * stride + b * BLOCK_TOKENS);
                    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), m));
                    _mm512_storeu_ps(p, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[h] = 1.0 / _mm512_reduce_add_ps(sum);
            }
            // Weighted sum of values, 16 dimensions per register, accumulators kept in registers.
            match hd / 16 {
                2 => weighted_values::<2>(a, sp, stride, &inv, out),
                4 => weighted_values::<4>(a, sp, stride, &inv, out),
                8 => weighted_values::<8>(a, sp, stride, &inv, out),
                c => {
                    // Other head sizes: a generic loop through memory.
                    for h in 0..nh {
                        let o = &mut out[h * hd..][..hd];
                        o.fill(0.0);
                        for t in 0..n {
                            let v = a.blocks[t / BLOCK_TOKENS].add(v_off + (t % BLOCK_TOKENS) * hd);
                            let w = _mm512_set1_ps(*sp.add(h * stride + t) * inv[h]);
                            for ci in 0..c {
                                let op = o.as_mut_ptr().add(ci * 16);
                                _mm512_storeu_ps(op, _mm512_fmadd_ps(w, _mm512_loadu_ps(v.add(ci * 16)), _mm512_loadu_ps(op)));
                            }
                        }
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn weighted_values<const C: usize>(a: &QueryArgs, sp: *const f32, stride: usize, inv: &[f32; MAX_GROUP], out: &mut [f32]) {
        unsafe {
            let hd = a.geo.head_dim;
            let v_off = a.geo.v_offset(a.layer, a.kv_head);
            for h in 0..a.n_heads {
                let mut acc = [_mm512_setzero_ps(); C];
                let w_row = sp.add(h * stride);
                for b in 0..a.n_keys.div_ceil(BLOCK_TOKENS) {
                    let vb = a.blocks[b].add(v_off);
                    let n_in_block = (a.n_keys - b * BLOCK_TOKENS).min(BLOCK_TOKENS);
                    for s in 0..n_in_block {
                        let w = _mm512_set1_ps(*w_row.add(b * BLOCK_TOKENS + s));
                        let v = vb.add(s * hd);
                        for c in 0..C {
                            acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v.add(c * 16)), acc[c]);
                        }
                    }
                }
                let iv = _mm512_set1_ps(inv[h]);
                for c in 0..C {
                    _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + c * 16), _mm512_mul_ps(acc[c], iv));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::Isa;

    /// Both implementations against a direct f64 computation, for GQA groups, uneven lengths
    /// and both head groupings.
    #[test]
    fn kernels_match_reference() {
        let geo = KvGeometry { n_layers: 2, n_heads: 6, n_kv_heads: 2, head_dim: 32 };
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
                let mut storage: Vec<Vec<Vec<f32>>> = lens
                    .iter()
                    .map(|&l| (0..l.div_ceil(BLOCK_TOKENS)).map(|_| vec![0f32; geo.block_len()]).collect())
                    .collect();
                let mut row = 0;
                let spans: Vec<SeqSpan> = storage
                    .iter_mut()
                    .zip(lens)
                    .map(|(blocks, len)| {
                        let s = SeqSpan { blocks: blocks.iter_mut().map(|b| b.as_mut_ptr()).collect(), start: 0, len, row };
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
                                    qv.iter().zip(&k).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / (hd as f64).sqrt()
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
                                assert!((got - want).abs() < 1e-5, "{isa:?} t{threads} row {} head {h} dim {d}: {got} vs {want}", row0 + i);
                            }
                        }
                    }
                    row0 += len;
                }
            }
        }
    }
}
