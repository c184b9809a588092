//! AVX-512 kernels (F/BW/DQ + VNNI, F16C): 16 lanes, one 512-bit `vpdpbusd` per 4 inputs of a
//! whole 16-row tile.
//!
//! Every function here needs a CPU with [`Isa::Avx512`]; [`kernel_set`] is the only way out of
//! this module, and the dispatcher calls it only after checking.

use super::attention::{BLOCK_TOKENS, KvElem, MAX_GROUP, QueryArgs, region};
use super::matmul::{QuantizedActs, prefetch_bytes};
use super::packed::{PackedMatrix, QBLOCK, TILE, prefetch_ahead};
use super::{Isa, KernelSet, MR, Tile, portable};
use crate::simd::x86::avx512::exp16;
use crate::simd::x86::prefetch_lines;
use half::f16;
use std::arch::x86_64::*;

static KERNELS: KernelSet = KernelSet {
    isa: Isa::Avx512,
    quantize_block,
    quantize_block16,
    split16: true,
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

/// # Safety
/// The CPU must support [`Isa::Avx512`].
pub(super) unsafe fn kernel_set() -> &'static KernelSet {
    &KERNELS
}

/// The portable row loop compiled for 512-bit registers (same arithmetic, same result).
#[target_feature(enable = "avx512f")]
unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    portable::rms_norm_row(x, w, eps, out)
}

#[target_feature(enable = "avx512f")]
unsafe fn add_assign(x: &mut [f32], y: &[f32]) {
    portable::add_assign(x, y)
}

/// Cached elements loaded as 16 f32 lanes.
trait Load16: KvElem {
    /// # Safety
    /// `p` points to 16 readable elements; the CPU supports AVX-512F and F16C.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Load16 for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl Load16 for i8 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
    }
}

/// `round(v · inv)`, half away from zero: exactly `f32::round`, as i32 lanes.
#[inline(always)]
unsafe fn round_away(v: __m512, inv: __m512) -> __m512i {
    unsafe {
        let r = _mm512_mul_ps(v, inv);
        let t = _mm512_roundscale_ps(r, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        let frac = _mm512_sub_ps(r, t);
        // Half away from zero: |frac| ≥ 0.5 moves one step in the sign of r.
        let away = _mm512_cmp_ps_mask(_mm512_abs_ps(frac), _mm512_set1_ps(0.5), _CMP_GE_OQ);
        let step = _mm512_or_ps(_mm512_set1_ps(1.0), _mm512_and_ps(r, _mm512_set1_ps(-0.0)));
        _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step))
    }
}

/// The block's two halves and `1 / (amax / levels)` (0 for an all-zero block).
#[inline(always)]
unsafe fn load_block(src: &[f32], levels: f32) -> ([__m512; 2], f32) {
    unsafe {
        let v = [_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        (v, amax / levels)
    }
}

/// [`portable::quantize_block`] with 16-lane registers; rounding is exactly `f32::round`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    unsafe {
        let ([lo, hi], exact) = load_block(src, 127.0);
        let inv = _mm512_set1_ps(if exact != 0.0 { 1.0 / exact } else { 0.0 });
        let (qa, qb) = (round_away(lo, inv), round_away(hi, inv));
        _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(dst.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        (f16::from_f32(exact).to_f32(), sum)
    }
}

/// [`portable::quantize_block16`] with 16-lane registers; rounding is exactly `f32::round`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block16(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    unsafe {
        let ([lo, hi], d) = load_block(src, 32767.0);
        let inv = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let (qa, qb) = (round_away(lo, inv), round_away(hi, inv));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, _mm512_cvtsepi32_epi16(qa));
        _mm256_storeu_si256(dst.as_mut_ptr().add(16) as *mut __m256i, _mm512_cvtsepi32_epi16(qb));
        (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
    }
}

#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m512i {
    unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
}

#[inline(always)]
unsafe fn load_f16x16(p: *const f16) -> __m512 {
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

/// Runs `body::<R>()` with `R` = the runtime row count as a compile-time constant, so each
/// row count gets fully unrolled register blocking.
macro_rules! dispatch_rows {
    ($rows:expr, $f:ident, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            _ => $f::<4>($($arg),*),
        }
    };
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_0_tile(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q8_0_rows, w, a, t, row0, out) }
}

#[inline(always)]
unsafe fn q8_0_rows<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const i32; R] = std::array::from_fn(|r| a.sums.as_ptr().add((row0 + r) * kb));
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let qb = q.add(b * QBLOCK * TILE);
            prefetch_ahead(qb, QBLOCK * TILE, ahead);
            // Two partial sums per row break the vpdpbusd dependency chain.
            let mut s0 = [_mm512_setzero_si512(); R];
            let mut s1 = [_mm512_setzero_si512(); R];
            for g in (0..8).step_by(2) {
                let w0 = _mm512_load_si512(qb.add(g * 64) as *const __m512i);
                let w1 = _mm512_load_si512(qb.add(g * 64 + 64) as *const __m512i);
                for r in 0..R {
                    let xb = xq[r].add(b * QBLOCK + g * 4);
                    s0[r] = _mm512_dpbusd_epi32(s0[r], w0, bcast4(xb));
                    s1[r] = _mm512_dpbusd_epi32(s1[r], w1, bcast4(xb.add(4)));
                }
            }
            let dw = load_f16x16(scales.add(b * TILE));
            for r in 0..R {
                let s = _mm512_add_epi32(s0[r], s1[r]);
                let s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * *xs[r].add(b)));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q4_1_tile(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q4_1_rows, w, a, t, row0, out) }
}

#[inline(always)]
unsafe fn q4_1_rows<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let mins = w.mins.as_ptr().add(t * kb * TILE);
        let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
        let nib = _mm512_set1_epi8(0x0F);
        // Block terms (d·s) and min terms (m·s) accumulate separately: two independent
        // FMA chains per row.
        let mut acc = [_mm512_setzero_ps(); R];
        let mut accm = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let qb = q.add(b * QBLOCK * TILE / 2);
            prefetch_ahead(qb, QBLOCK * TILE / 2, ahead);
            let mut s = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                let v = _mm512_load_si512(qb.add(g * 64) as *const __m512i);
                let lo = _mm512_and_si512(v, nib);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                for r in 0..R {
                    let xb = xq[r].add(b * QBLOCK + g * 8);
                    s[r] = _mm512_dpbusd_epi32(s[r], lo, bcast4(xb));
                    s[r] = _mm512_dpbusd_epi32(s[r], hi, bcast4(xb.add(4)));
                }
            }
            let dw = load_f16x16(scales.add(b * TILE));
            let mw = load_f16x16(mins.add(b * TILE));
            for r in 0..R {
                let sf = _mm512_cvtepi32_ps(s[r]);
                acc[r] = _mm512_fmadd_ps(sf, _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b))), acc[r]);
                accm[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs[r].add(b)), accm[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], accm[r]));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_0_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q8_0_rows16, w, a, t, row0, out) }
}

/// Q8_0 × 16-bit activations as two 8-bit products per weight (`q = 256·hi + lo`, see
/// [`QuantizedActs::hi`]): `(w + 128)·hi` as in [`q8_0_rows`] (corrected by `128·Σhi`), and
/// `lo·w` with the unsigned `lo` first and the weight flipped back to signed. The weights stay
/// packed as they are; the cost over 8-bit activations is one more `vpdpbusd` per 4 inputs.
#[inline(always)]
unsafe fn q8_0_rows16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xh: [*const i8; R] = std::array::from_fn(|r| a.hi.as_ptr().add((row0 + r) * a.k));
        let xl: [*const u8; R] = std::array::from_fn(|r| a.lo.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const i32; R] = std::array::from_fn(|r| a.hi_sums.as_ptr().add((row0 + r) * kb));
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let qb = q.add(b * QBLOCK * TILE);
            prefetch_ahead(qb, QBLOCK * TILE, ahead);
            let mut sh = [_mm512_setzero_si512(); R];
            let mut sl = [_mm512_setzero_si512(); R];
            for g in 0..8 {
                let wu = _mm512_load_si512(qb.add(g * 64) as *const __m512i);
                let ws = _mm512_xor_si512(wu, flip);
                for r in 0..R {
                    let i = b * QBLOCK + g * 4;
                    sh[r] = _mm512_dpbusd_epi32(sh[r], wu, bcast4(xh[r].add(i)));
                    sl[r] = _mm512_dpbusd_epi32(sl[r], bcast4(xl[r].add(i) as *const i8), ws);
                }
            }
            let dw = load_f16x16(scales.add(b * TILE));
            for r in 0..R {
                let h = _mm512_sub_epi32(sh[r], _mm512_set1_epi32(128 * *xs[r].add(b)));
                let s = _mm512_add_epi32(_mm512_slli_epi32::<8>(h), sl[r]);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q4_1_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q4_1_rows16, w, a, t, row0, out) }
}

/// Q4_1 × 16-bit activations as two 8-bit products per weight (`q = 256·hi + lo`): `w·hi` as
/// in [`q4_1_rows`], and `lo·w` with the unsigned `lo` first (a nibble is a valid signed
/// byte). The nibbles are unpacked once for both, as for 8-bit activations.
#[inline(always)]
unsafe fn q4_1_rows16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let mins = w.mins.as_ptr().add(t * kb * TILE);
        let xh: [*const i8; R] = std::array::from_fn(|r| a.hi.as_ptr().add((row0 + r) * a.k));
        let xl: [*const u8; R] = std::array::from_fn(|r| a.lo.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
        let nib = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut accm = [_mm512_setzero_ps(); R];
        for b in 0..kb {
            let qb = q.add(b * QBLOCK * TILE / 2);
            prefetch_ahead(qb, QBLOCK * TILE / 2, ahead);
            let mut sh = [_mm512_setzero_si512(); R];
            let mut sl = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                let v = _mm512_load_si512(qb.add(g * 64) as *const __m512i);
                let lo = _mm512_and_si512(v, nib);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                for r in 0..R {
                    let i = b * QBLOCK + g * 8;
                    sh[r] = _mm512_dpbusd_epi32(sh[r], lo, bcast4(xh[r].add(i)));
                    sh[r] = _mm512_dpbusd_epi32(sh[r], hi, bcast4(xh[r].add(i + 4)));
                    sl[r] = _mm512_dpbusd_epi32(sl[r], bcast4(xl[r].add(i) as *const i8), lo);
                    sl[r] = _mm512_dpbusd_epi32(sl[r], bcast4(xl[r].add(i + 4) as *const i8), hi);
                }
            }
            let dw = load_f16x16(scales.add(b * TILE));
            let mw = load_f16x16(mins.add(b * TILE));
            for r in 0..R {
                let s = _mm512_add_epi32(_mm512_slli_epi32::<8>(sh[r]), sl[r]);
                let sf = _mm512_cvtepi32_ps(s);
                acc[r] = _mm512_fmadd_ps(sf, _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b))), acc[r]);
                accm[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs[r].add(b)), accm[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], accm[r]));
        }
    }
}

#[target_feature(enable = "avx512f,f16c")]
unsafe fn f16_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, f16_rows, w, x, t, row0, out) }
}

#[inline(always)]
unsafe fn f16_rows<const R: usize>(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let k = w.k;
        let wt = (w.data.as_slice().as_ptr() as *const f16).add(t * k * TILE);
        let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
        // Four independent accumulator chains per row hide the FMA latency even for one
        // row (LoRA's A factors: one tile, hundreds of inputs).
        let mut acc = [[_mm512_setzero_ps(); R]; 4];
        let mut i = 0;
        while i + 4 <= k {
            // LoRA factors come straight from memory in short tiles that cross pages, where
            // the hardware prefetcher stalls: fetch 1 KiB ahead.
            // (`wrapping_add`: near the end the address lies past the matrix; a prefetch
            // never faults, but an out-of-bounds `add` would be undefined behaviour.)
            _mm_prefetch::<_MM_HINT_T0>(wt.wrapping_add((i + 32) * TILE) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wt.wrapping_add((i + 34) * TILE) as *const i8);
            for c in 0..4 {
                let wv = load_f16x16(wt.add((i + c) * TILE));
                for r in 0..R {
                    acc[c][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*xr[r].add(i + c)), acc[c][r]);
                }
            }
            i += 4;
        }
        while i < k {
            let wv = load_f16x16(wt.add(i * TILE));
            for r in 0..R {
                acc[0][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*xr[r].add(i)), acc[0][r]);
            }
            i += 1;
        }
        for r in 0..R {
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
            _mm512_storeu_ps(out[r].as_mut_ptr(), sum);
        }
    }
}

#[target_feature(enable = "avx512f,f16c")]
unsafe fn add_f16_tile_rows(
    b: &PackedMatrix,
    tile: usize,
    t: &[f32],
    rows: &[(usize, usize)],
    scale: f32,
    out: &mut Tile,
) {
    unsafe {
        let k = b.k;
        let wt = (b.data.as_slice().as_ptr() as *const f16).add(tile * k * TILE);
        // As in `f16_rows`: fetch a few tiles ahead of the matmul's walk.
        prefetch_lines(wt.wrapping_add(4 * k * TILE) as *const u8, k * TILE * 2);
        let n = rows.len();
        let tp: [*const f32; MR] = std::array::from_fn(|r| t.as_ptr().add(rows[r.min(n - 1)].0 * k));
        // Four chains per row: k is small (the rank), so a single chain would be bound by
        // FMA latency rather than throughput.
        let mut acc = [[_mm512_setzero_ps(); MR]; 4];
        let mut i = 0;
        while i + 4 <= k {
            for c in 0..4 {
                let wv = load_f16x16(wt.add((i + c) * TILE));
                for r in 0..MR {
                    if r < n {
                        acc[c][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*tp[r].add(i + c)), acc[c][r]);
                    }
                }
            }
            i += 4;
        }
        while i < k {
            let wv = load_f16x16(wt.add(i * TILE));
            for r in 0..MR {
                if r < n {
                    acc[0][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*tp[r].add(i)), acc[0][r]);
                }
            }
            i += 1;
        }
        let s = _mm512_set1_ps(scale);
        for (r, &(_, o)) in rows.iter().enumerate() {
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
            let cur = _mm512_loadu_ps(out[o].as_ptr());
            _mm512_storeu_ps(out[o].as_mut_ptr(), _mm512_fmadd_ps(sum, s, cur));
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn f32_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, f32_rows, w, x, t, row0, out) }
}

#[inline(always)]
unsafe fn f32_rows<const R: usize>(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let k = w.k;
        let wt = w.data.as_f32().as_ptr().add(t * k * TILE);
        let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        let mut i = 0;
        while i + 1 < k {
            let w0 = _mm512_load_ps(wt.add(i * TILE));
            let w1 = _mm512_load_ps(wt.add((i + 1) * TILE));
            for r in 0..R {
                acc0[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*xr[r].add(i)), acc0[r]);
                acc1[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(*xr[r].add(i + 1)), acc1[r]);
            }
            i += 2;
        }
        if i < k {
            let w0 = _mm512_load_ps(wt.add(i * TILE));
            for r in 0..R {
                acc0[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*xr[r].add(i)), acc0[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc0[r], acc1[r]));
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn swiglu_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    unsafe {
        let n = out.len();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i + 16 <= n {
            let gv = _mm512_loadu_ps(g.as_ptr().add(i));
            let uv = _mm512_loadu_ps(u.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(s, uv));
            i += 16;
        }
        for j in i..n {
            out[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }
}

#[target_feature(enable = "avx512f,f16c")]
unsafe fn attend<E: Load16>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
    unsafe {
        match a.geo.head_dim {
            32 => attend_c::<E, 2>(a, scores, out),
            64 => attend_c::<E, 4>(a, scores, out),
            128 => attend_c::<E, 8>(a, scores, out),
            _ => portable::attend::<E>(a, scores, out),
        }
    }
}

/// `out[h0 + h] = Σ_t w[h][t]·v[t] / Σ_t w[h][t]` for `NH` heads from `h0`, loading each value
/// vector once for all of them.
#[inline(always)]
unsafe fn weighted_values<E: Load16, const C: usize, const NH: usize>(
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
        let lines_per_key = (BLOCK_TOKENS * hd * std::mem::size_of::<E>()).div_ceil(64).div_ceil(BLOCK_TOKENS);
        let mut acc = [[_mm512_setzero_ps(); C]; NH];
        let n_blocks = n.div_ceil(BLOCK_TOKENS);
        for b in 0..n_blocks {
            let (vb, v_scales) = region::<E>(a.blocks[b], v_off, a.geo);
            // The next block's values, a few lines per key (as the keys in `attend_c`).
            let next_values = a.blocks[(b + 1).min(n_blocks - 1)].wrapping_add(v_off);
            let n_in_block = (n - b * BLOCK_TOKENS).min(BLOCK_TOKENS);
            for s in 0..n_in_block {
                prefetch_lines(next_values.wrapping_add(s * lines_per_key * 64), lines_per_key * 64);
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
unsafe fn attend_c<E: Load16, const C: usize>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
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
        let n_blocks = n.div_ceil(BLOCK_TOKENS);
        // Lines of a block's keys to prefetch per chunk of 16 keys.
        let lines_per_chunk = values_bytes.div_ceil(64) / (BLOCK_TOKENS / 16);

        // Scores, all heads of the group per loaded key vector.
        let mut maxv = [_mm512_set1_ps(f32::NEG_INFINITY); MAX_GROUP];
        // The values of the first block are needed right after the scores: start loading them.
        prefetch_lines(a.blocks[0].add(v_off), values_bytes);
        for c in 0..n_chunks {
            let (b, sub) = (c * 16 / BLOCK_TOKENS, (c * 16) % BLOCK_TOKENS / 16);
            // Blocks are separate allocations: the next block's keys are asked for a line at a
            // time while this chunk computes, which measured faster than asking for the whole
            // region at the block's start (docs/BENCHMARKS.md, "Attention's KV reads").
            let next_keys = a.blocks[(b + 1).min(n_blocks - 1)].wrapping_add(k_off);
            let (kt, k_scales) = region::<E>(a.blocks[b], k_off, a.geo);
            let kt = kt.add(sub * 16);
            // Even and odd dimensions in separate accumulators: two dependency chains per head,
            // so a lone head (a single decoding sequence splits per query head) is not bound by
            // the FMA latency (1-row attention 5–14 % less, docs/BENCHMARKS.md).
            let mut acc = [_mm512_setzero_ps(); MAX_GROUP];
            let mut acc_odd = [_mm512_setzero_ps(); MAX_GROUP];
            for d in (0..hd).step_by(2) {
                if d < lines_per_chunk {
                    prefetch_lines(next_keys.wrapping_add((sub * lines_per_chunk + d) * 64), 128);
                }
                let k_even = E::load16(kt.add(d * BLOCK_TOKENS));
                let k_odd = E::load16(kt.add((d + 1) * BLOCK_TOKENS));
                for h in 0..nh {
                    acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(h * hd + d)), k_even, acc[h]);
                    acc_odd[h] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(h * hd + d + 1)), k_odd, acc_odd[h]);
                }
            }
            for h in 0..nh {
                acc[h] = _mm512_add_ps(acc[h], acc_odd[h]);
            }
            // Per-key scales (int8 cache) fold into the softmax scale.
            let key_scale =
                if E::SCALED { _mm512_mul_ps(scale, _mm512_loadu_ps(k_scales.add(sub * 16))) } else { scale };
            let valid = n - c * 16;
            let mask: __mmask16 = if valid >= 16 { 0xFFFF } else { (1u16 << valid) - 1 };
            for h in 0..nh {
                let s = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, _mm512_mul_ps(acc[h], key_scale));
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
