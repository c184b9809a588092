//! The portable kernels: plain Rust, vectorised by the compiler as far as the build target
//! allows. They are the reference every instruction-set path is tested against, and what runs
//! on CPUs no other set supports.

use super::attention::{BLOCK_TOKENS, KvElem, QueryArgs, region};
use super::matmul::{QuantizedActs, q16_index};
use super::packed::{PackedMatrix, QBLOCK, TILE, q4_index, q8_index};
use super::{Isa, KernelSet, Tile};
use half::f16;

pub(super) static KERNELS: KernelSet = KernelSet {
    isa: Isa::Portable,
    quantize_block,
    quantize_block16,
    split16: false,
    q8_0_tile,
    q4_1_tile,
    q8_0_tile16,
    q4_1_tile16,
    f32_tile,
    f16_tile,
    add_f16_tile_rows,
    attend_f32: attend::<f32>,
    attend_f16: attend::<f16>,
    attend_q8: attend::<i8>,
    rms_norm_row,
    swiglu_row,
    add_assign,
};

/// One block as llama.cpp's `quantize_row_q8_1`: `d = amax / 127` (stored through f16),
/// `q = round(x / d)` (half away from zero). Returns (d, Σq).
pub fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let exact = amax / 127.0;
    let inv = if exact != 0.0 { 1.0 / exact } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in dst.iter_mut().zip(src) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (f16::from_f32(exact).to_f32(), sum)
}

/// One block to 16 bits: `d = amax / 32767`, `q = round(x / d)` (half away from zero), in
/// input order. Returns (d, Σq).
pub fn quantize_block16(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 32767.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in dst.iter_mut().zip(src) {
        *q = (v * inv).round() as i16;
        sum += *q as i32;
    }
    (d, sum)
}

fn f16x16(src: &[f16]) -> [f32; TILE] {
    std::array::from_fn(|i| src[i].to_f32())
}

pub fn q8_0_tile(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    let kb = w.k_blocks();
    let data = w.data.as_slice();
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        let row = row0 + r;
        let mut acc = [0f32; TILE];
        for b in 0..kb {
            let tb = t * kb + b;
            let q = &data[tb * QBLOCK * TILE..][..QBLOCK * TILE];
            let xa = &a.qs[row * a.k + b * QBLOCK..][..QBLOCK];
            let mut s = [0i32; TILE];
            for g in 0..QBLOCK / 4 {
                for (lane, sl) in s.iter_mut().enumerate() {
                    for j in 0..4 {
                        *sl += q[(g * TILE + lane) * 4 + j] as i32 * xa[g * 4 + j] as i32;
                    }
                }
            }
            let corr = 128 * a.sums[row * kb + b];
            let da = a.d[row * kb + b];
            let dw = f16x16(&w.scales[tb * TILE..]);
            for l in 0..TILE {
                acc[l] += (s[l] - corr) as f32 * (dw[l] * da);
            }
        }
        *o = acc;
    }
}

pub fn q4_1_tile(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    let kb = w.k_blocks();
    let data = w.data.as_slice();
    for r in 0..rows {
        let row = row0 + r;
        let mut acc = [0f32; TILE];
        let mut accm = [0f32; TILE];
        for b in 0..kb {
            let tb = t * kb + b;
            let q = &data[tb * QBLOCK * TILE / 2..][..QBLOCK * TILE / 2];
            let xa = &a.qs[row * a.k + b * QBLOCK..][..QBLOCK];
            let mut s = [0i32; TILE];
            for (i, &xv) in xa.iter().enumerate() {
                for (lane, sl) in s.iter_mut().enumerate() {
                    let (byte, high) = q4_index(i, lane);
                    let v = if high { q[byte] >> 4 } else { q[byte] & 0x0F };
                    *sl += v as i32 * xv as i32;
                }
            }
            let da = a.d[row * kb + b];
            let sa = a.dsums[row * kb + b];
            let dw = f16x16(&w.scales[tb * TILE..]);
            let mw = f16x16(&w.mins[tb * TILE..]);
            for l in 0..TILE {
                acc[l] += s[l] as f32 * (dw[l] * da);
                accm[l] += mw[l] * sa;
            }
        }
        out[r] = std::array::from_fn(|l| acc[l] + accm[l]);
    }
}

pub fn f16_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    let k = w.k;
    let data = w.data.as_slice();
    for r in 0..rows {
        let xr = &x[(row0 + r) * k..][..k];
        let mut acc = [0f32; TILE];
        for (i, &xv) in xr.iter().enumerate() {
            let at = (t * k + i) * TILE * 2;
            for l in 0..TILE {
                acc[l] += f16::from_le_bytes([data[at + 2 * l], data[at + 2 * l + 1]]).to_f32() * xv;
            }
        }
        out[r] = acc;
    }
}

pub fn f32_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    let k = w.k;
    let data = w.data.as_f32();
    for r in 0..rows {
        let xr = &x[(row0 + r) * k..][..k];
        let mut acc = [0f32; TILE];
        for (i, &xv) in xr.iter().enumerate() {
            let wv = &data[(t * k + i) * TILE..][..TILE];
            for l in 0..TILE {
                acc[l] += wv[l] * xv;
            }
        }
        out[r] = acc;
    }
}

/// Q8_0 weights × 16-bit activations.
pub fn q8_0_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    let kb = w.k_blocks();
    let data = w.data.as_slice();
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        let row = row0 + r;
        let mut acc = [0f32; TILE];
        for b in 0..kb {
            let tb = t * kb + b;
            let q = &data[tb * QBLOCK * TILE..][..QBLOCK * TILE];
            let xa = &a.qs16[row * a.k + b * QBLOCK..][..QBLOCK];
            let mut s = [0i32; TILE];
            for i in 0..QBLOCK {
                let xv = xa[q16_index(i)] as i32;
                for (lane, sl) in s.iter_mut().enumerate() {
                    *sl += (q[q8_index(i, lane)] as i32 - 128) * xv;
                }
            }
            let da = a.d[row * kb + b];
            let dw = f16x16(&w.scales[tb * TILE..]);
            for l in 0..TILE {
                acc[l] += s[l] as f32 * (dw[l] * da);
            }
        }
        *o = acc;
    }
}

/// Q4_1 weights × 16-bit activations.
pub fn q4_1_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    let kb = w.k_blocks();
    let data = w.data.as_slice();
    for r in 0..rows {
        let row = row0 + r;
        let mut acc = [0f32; TILE];
        let mut accm = [0f32; TILE];
        for b in 0..kb {
            let tb = t * kb + b;
            let q = &data[tb * QBLOCK * TILE / 2..][..QBLOCK * TILE / 2];
            let xa = &a.qs16[row * a.k + b * QBLOCK..][..QBLOCK];
            let mut s = [0i32; TILE];
            for i in 0..QBLOCK {
                let xv = xa[q16_index(i)] as i32;
                for (lane, sl) in s.iter_mut().enumerate() {
                    let (byte, high) = q4_index(i, lane);
                    let v = if high { q[byte] >> 4 } else { q[byte] & 0x0F };
                    *sl += v as i32 * xv;
                }
            }
            let (da, sa) = (a.d[row * kb + b], a.dsums[row * kb + b]);
            let dw = f16x16(&w.scales[tb * TILE..]);
            let mw = f16x16(&w.mins[tb * TILE..]);
            for l in 0..TILE {
                acc[l] += s[l] as f32 * (dw[l] * da);
                accm[l] += mw[l] * sa;
            }
        }
        out[r] = std::array::from_fn(|l| acc[l] + accm[l]);
    }
}

pub fn add_f16_tile_rows(
    b: &PackedMatrix,
    tile: usize,
    t: &[f32],
    rows: &[(usize, usize)],
    scale: f32,
    out: &mut Tile,
) {
    let (k, data) = (b.k, b.data.as_slice());
    for &(tr, o) in rows {
        for i in 0..k {
            let tv = t[tr * k + i] * scale;
            let at = (tile * k + i) * TILE * 2;
            for (l, v) in out[o].iter_mut().enumerate() {
                *v += f16::from_le_bytes([data[at + 2 * l], data[at + 2 * l + 1]]).to_f32() * tv;
            }
        }
    }
}

/// `out = x / rms(x) · w`.
#[inline(always)]
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // 16 independent partial sums: vectorises without reassociating a single float sum, and
    // every instruction set that compiles this loop gets the same result.
    let mut acc = [0f32; 16];
    let chunks = x.len() / 16;
    for c in 0..chunks {
        for l in 0..16 {
            let v = x[c * 16 + l];
            acc[l] += v * v;
        }
    }
    let mut ss: f32 = acc.iter().sum();
    for &v in &x[chunks * 16..] {
        ss += v * v;
    }
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// `out = silu(g) · u`.
pub fn swiglu_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `x += y`.
#[inline(always)]
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// softmax(q·Kᵀ/√d)·V for each head, scalar reference implementation of the same layout.
///
/// # Safety
/// As [`KernelSet::attend_f16`](super::KernelSet): `a.blocks` hold `a.n_keys` positions of `E`.
pub unsafe fn attend<E: KvElem>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
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
