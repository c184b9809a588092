//! Causal attention of a ragged batch over paged per-sequence KV caches, with rotary embeddings
//! applied on the way in.
//!
//! A KV block holds [`BLOCK_TOKENS`] positions of one sequence for all layers:
//! `[layer][k|v][kv_head][slot][head_dim]` f32. Sequences own lists of blocks, so a cache grows
//! one block at a time (never re-copied) and is freed block by block.
//!
//! Work items are (sequence, query head, chunk of query positions); a thread takes the next item
//! from a shared counter, which balances the uneven cost of causal prefill rows.

use super::pool::{self, ThreadPool};
use crate::model::RopeStyle;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Positions per KV block.
pub const BLOCK_TOKENS: usize = 16;
/// Query positions per work item.
const QUERY_CHUNK: usize = 16;

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
    /// Offset of (layer, k or v, head, slot) within a block.
    #[inline]
    fn offset(&self, layer: usize, v: bool, head: usize, slot: usize) -> usize {
        (((layer * 2 + v as usize) * self.n_kv_heads + head) * BLOCK_TOKENS + slot) * self.head_dim
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
pub fn paged_attention(
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &[SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
) {
    paged_attention_with(pool::global(), geo, layer, qkv, spans, rope, out)
}

pub fn paged_attention_with(
    pool: &ThreadPool,
    geo: &KvGeometry,
    layer: usize,
    qkv: &[f32],
    spans: &[SeqSpan],
    rope: &RopeRows,
    out: &mut [f32],
) {
    let hd = geo.head_dim;
    let q_dim = geo.n_heads * hd;
    let kv_dim = geo.n_kv_heads * hd;
    let width = q_dim + 2 * kv_dim;
    let rows = qkv.len() / width;
    assert_eq!(out.len(), rows * q_dim);

    // Serial phase: rotate q into a scratch copy, rotate k and store k/v into the caches.
    let mut q = vec![0f32; rows * q_dim];
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
                // SAFETY: `block` holds `block_len` f32s and the offsets stay within it.
                let (k_dst, v_dst) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(block.add(geo.offset(layer, false, g, slot)), hd),
                        std::slice::from_raw_parts_mut(block.add(geo.offset(layer, true, g, slot)), hd),
                    )
                };
                k_dst.copy_from_slice(&src[q_dim + g * hd..][..hd]);
                rope.apply(k_dst, row);
                v_dst.copy_from_slice(&src[q_dim + kv_dim + g * hd..][..hd]);
            }
        }
    }

    // Parallel phase: one item per (span, head, chunk of queries).
    let mut items = Vec::new();
    for (s, span) in spans.iter().enumerate() {
        for h in 0..geo.n_heads {
            for c in (0..span.len).step_by(QUERY_CHUNK) {
                items.push((s, h, c));
            }
        }
    }
    let next = AtomicUsize::new(0);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let max_keys = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
    let parallel = if items.len() > 1 { pool.n_threads() } else { 1 };
    let simd = super::Isa::detect() == super::Isa::Avx512Vnni;
    pool.run(parallel, |_, _| {
        let out_ptr = out_ptr;
        let mut scores = vec![0f32; max_keys];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(s, h, c)) = items.get(i) else { break };
            let span = &spans[s];
            for qi in c..(c + QUERY_CHUNK).min(span.len) {
                let row = span.row + qi;
                let qv = &q[row * q_dim + h * hd..][..hd];
                // SAFETY: each (row, head) output slice is written by exactly one item.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(row * q_dim + h * hd), hd) };
                let n_keys = span.start + qi + 1;
                let args = HeadArgs { geo, layer, span, head: h, q: qv, n_keys };
                #[cfg(target_arch = "x86_64")]
                if simd {
                    unsafe { attend_head_avx512(&args, &mut scores, o) };
                    continue;
                }
                let _ = simd;
                attend_head(&args, &mut scores, o);
            }
        }
    });
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

struct HeadArgs<'a> {
    geo: &'a KvGeometry,
    layer: usize,
    span: &'a SeqSpan,
    head: usize,
    q: &'a [f32],
    n_keys: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_head_avx512(a: &HeadArgs, scores: &mut [f32], out: &mut [f32]) {
    attend_head(a, scores, out)
}

/// softmax(q·Kᵀ/√d)·V for one query row and head over the first `n_keys` cached positions.
#[inline(always)]
fn attend_head(a: &HeadArgs, scores: &mut [f32], out: &mut [f32]) {
    let geo = a.geo;
    let hd = geo.head_dim;
    let g = a.head / (geo.n_heads / geo.n_kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let scores = &mut scores[..a.n_keys];
    let mut max = f32::NEG_INFINITY;
    for (t, sc) in scores.iter_mut().enumerate() {
        let k = key(a, g, t, false);
        let s = dot(a.q, k) * scale;
        *sc = s;
        max = max.max(s);
    }
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (t, &w) in scores.iter().enumerate() {
        let v = key(a, g, t, true);
        let w = w * inv;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
}

#[inline(always)]
fn key<'a>(a: &HeadArgs<'a>, g: usize, t: usize, v: bool) -> &'a [f32] {
    let block = a.span.blocks[t / BLOCK_TOKENS];
    // SAFETY: positions below `n_keys` were written into the sequence's blocks.
    unsafe { std::slice::from_raw_parts(block.add(a.geo.offset(a.layer, v, g, t % BLOCK_TOKENS)), a.geo.head_dim) }
}

/// Dot product with 16 independent lanes, so it vectorises without reassociating floats.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..][..16], &b[c * 16..][..16]);
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        s += a[i] * b[i];
    }
    s
}
