//! AVX2 + FMA + F16C kernels, with and without AVX-VNNI: 8 lanes, so a 16-row tile is two
//! halves of 8 output rows (the packed layout is the AVX-512 one; half `h` of a 64-byte group is
//! its bytes `32h..32h + 32`). For 1–2 activation rows (decode) both halves go through the blocks
//! in one pass, sharing each activation broadcast; 3–4 rows (prefill) would not fit the 16
//! registers that way and run the halves one after the other.
//!
//! Integer dot products of 4 inputs per output lane:
//! - with AVX-VNNI, `vpdpbusd` on 256-bit registers, as the AVX-512 kernels do;
//! - without, `vpmaddubsw` (u8 × i8 → pairs summed in i16) then `vpmaddwd` by ones (→ i32).
//!   Q4_1 nibbles (≤ 15) times activations (|q| ≤ 127) stay far from i16 saturation, so a whole
//!   block is summed in i16 first (8 pairs of products ≤ 3,810 each: ≤ 30,480). Q8_0 weights are
//!   signed: as llama.cpp does, `|w|` is the unsigned operand and the activation takes `w`'s
//!   sign (`vpsignb`), so a pair of products stays ≤ 2·128·127 = 32,512.
//!
//! Every function here needs a CPU with [`Isa::Avx2`] (and AVX-VNNI for the `vnni` table);
//! [`kernel_set`] is the only way out of this module, and the dispatcher calls it only after
//! checking.

use super::attention::{BLOCK_TOKENS, KvElem, MAX_GROUP, QueryArgs, region};
use super::matmul::{QuantizedActs, prefetch_bytes};
use super::packed::{PackedMatrix, QBLOCK, TILE, prefetch_ahead};
use super::{Isa, KernelSet, MR, Tile, portable};
use crate::simd::x86::avx2::{exp8, hsum};
use crate::simd::x86::prefetch_lines;
use half::f16;
use std::arch::x86_64::*;

/// Output rows per register (half a tile).
const HALF: usize = 8;

const BASE: KernelSet = KernelSet {
    isa: Isa::Avx2,
    quantize_block,
    quantize_block16,
    split16: false,
    q8_0_tile: q8_0_tile::<false>,
    q4_1_tile: q4_1_tile::<false>,
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

static KERNELS: KernelSet = BASE;
static KERNELS_VNNI: KernelSet = KernelSet {
    isa: Isa::Avx2Vnni,
    split16: true,
    q8_0_tile: q8_0_tile_vnni,
    q4_1_tile: q4_1_tile_vnni,
    q8_0_tile16: q8_0_tile16_vnni,
    q4_1_tile16: q4_1_tile16_vnni,
    ..BASE
};

/// # Safety
/// The CPU must support [`Isa::Avx2`], and [`Isa::Avx2Vnni`] if `vnni`.
pub(super) unsafe fn kernel_set(vnni: bool) -> &'static KernelSet {
    if vnni { &KERNELS_VNNI } else { &KERNELS }
}

/// The portable row loop compiled for 256-bit registers (same arithmetic, same result).
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    portable::rms_norm_row(x, w, eps, out)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn add_assign(x: &mut [f32], y: &[f32]) {
    portable::add_assign(x, y)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    unsafe {
        let n = out.len();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + HALF <= n {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, uv));
            i += HALF;
        }
        for j in i..n {
            out[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }
}

/// The block in four registers and `amax / levels`.
#[inline(always)]
unsafe fn load_block(src: &[f32], levels: f32) -> ([__m256; 4], f32) {
    unsafe {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add(8 * i)));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        (v, amax / levels)
    }
}

/// `round(v · inv)` of each register, half away from zero (exactly `f32::round`), and their sum.
#[inline(always)]
unsafe fn round_away(v: [__m256; 4], scale: f32) -> ([__m256i; 4], i32) {
    unsafe {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let round = |v: __m256| -> __m256i {
            let r = _mm256_mul_ps(v, inv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
            let frac = _mm256_and_ps(_mm256_sub_ps(r, t), abs_mask);
            // Half away from zero: |frac| ≥ 0.5 moves one step in the sign of r.
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
            let step = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_andnot_ps(abs_mask, r));
            _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)))
        };
        let q: [__m256i; 4] = std::array::from_fn(|i| round(v[i]));
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        (q, _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s))))
    }
}

/// [`portable::quantize_block`] on 8-lane registers; rounding is exactly `f32::round`.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    unsafe {
        let (v, exact) = load_block(src, 127.0);
        let (q, sum) = round_away(v, exact);
        // i32 → i16 → i8 packs interleave 128-bit lanes; the permutation restores the order.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, p);
        (f16::from_f32(exact).to_f32(), sum)
    }
}

/// [`portable::quantize_block16`] on 8-lane registers; rounding is exactly `f32::round`.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block16(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    unsafe {
        let (v, d) = load_block(src, 32767.0);
        let (q, sum) = round_away(v, d);
        // The i32 → i16 pack interleaves 128-bit lanes; the permutation restores the order.
        for (i, pair) in q.chunks_exact(2).enumerate() {
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(pair[0], pair[1]));
            _mm256_storeu_si256(dst.as_mut_ptr().add(16 * i) as *mut __m256i, p);
        }
        (d, sum)
    }
}

#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

#[inline(always)]
unsafe fn load_f16x8(p: *const f16) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Runs `body::<R>()` with `R` = the runtime row count as a compile-time constant.
macro_rules! dispatch_rows {
    ($rows:expr, $f:ident $(::<$($g:tt),*>)?, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1 $($(, $g)*)?>($($arg),*),
            2 => $f::<2 $($(, $g)*)?>($($arg),*),
            3 => $f::<3 $($(, $g)*)?>($($arg),*),
            _ => $f::<4 $($(, $g)*)?>($($arg),*),
        }
    };
}

/// Runs `$f::<R, VNNI, H0, NH>` (the tile's halves `H0..H0 + NH` in one pass over the blocks) for
/// `rows` activation rows: both halves in one pass for 1–2 rows (decode), so that each activation
/// broadcast serves 16 outputs and every weight line is read once; one half per pass for 3–4 rows
/// (prefill), whose accumulators for both halves would not fit the 16 registers.
macro_rules! halves_by_rows {
    ($rows:expr, $f:ident, $vnni:tt, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1, $vnni, 0, 2>($($arg),*),
            2 => $f::<2, $vnni, 0, 2>($($arg),*),
            3 => {
                $f::<3, $vnni, 0, 1>($($arg),*);
                $f::<3, $vnni, 1, 1>($($arg),*)
            }
            _ => {
                $f::<4, $vnni, 0, 1>($($arg),*);
                $f::<4, $vnni, 1, 1>($($arg),*)
            }
        }
    };
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_tile<const VNNI: bool>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    rows: usize,
    out: &mut Tile,
) {
    unsafe { halves_by_rows!(rows, q8_0_halves, VNNI, w, a, t, row0, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q8_0_tile_vnni(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { halves_by_rows!(rows, q8_0_halves, true, w, a, t, row0, out) }
}

/// Halves `H0..H0 + NH` of a Q8_0 tile for `R` rows, in one pass over the blocks.
#[inline(always)]
unsafe fn q8_0_halves<const R: usize, const VNNI: bool, const H0: usize, const NH: usize>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    out: &mut Tile,
) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const i32; R] = std::array::from_fn(|r| a.sums.as_ptr().add((row0 + r) * kb));
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [[_mm256_setzero_ps(); R]; NH];
        for b in 0..kb {
            let qb = q.add(b * QBLOCK * TILE);
            if H0 == 0 {
                // A pass with the first half touches every line of the tile; one over the second
                // half alone follows it and runs from cache.
                prefetch_ahead(qb, QBLOCK * TILE, ahead);
            }
            let mut s = [[_mm256_setzero_si256(); R]; NH];
            for g in 0..QBLOCK / 4 {
                let v: [__m256i; NH] =
                    std::array::from_fn(|h| _mm256_load_si256(qb.add(g * 64 + (H0 + h) * 32) as *const __m256i));
                for r in 0..R {
                    let x = bcast4(xq[r].add(b * QBLOCK + g * 4));
                    for h in 0..NH {
                        if VNNI {
                            // Σ (w + 128)·x, corrected by 128·Σx below.
                            s[h][r] = _mm256_dpbusd_avx_epi32(s[h][r], v[h], x);
                        } else {
                            let ws = _mm256_xor_si256(v[h], flip);
                            let p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
                            s[h][r] = _mm256_add_epi32(s[h][r], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            }
            for h in 0..NH {
                let dw = load_f16x8(scales.add(b * TILE + (H0 + h) * HALF));
                for r in 0..R {
                    let si =
                        if VNNI { _mm256_sub_epi32(s[h][r], _mm256_set1_epi32(128 * *xs[r].add(b))) } else { s[h][r] };
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b)));
                    acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, acc[h][r]);
                }
            }
        }
        for h in 0..NH {
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add((H0 + h) * HALF), acc[h][r]);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_tile<const VNNI: bool>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    rows: usize,
    out: &mut Tile,
) {
    unsafe { halves_by_rows!(rows, q4_1_halves, VNNI, w, a, t, row0, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q4_1_tile_vnni(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { halves_by_rows!(rows, q4_1_halves, true, w, a, t, row0, out) }
}

/// Halves `H0..H0 + NH` of a Q4_1 tile for `R` rows, in one pass over the blocks.
#[inline(always)]
unsafe fn q4_1_halves<const R: usize, const VNNI: bool, const H0: usize, const NH: usize>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    out: &mut Tile,
) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let mins = w.mins.as_ptr().add(t * kb * TILE);
        let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // Block terms (d·s) and min terms (m·s) in one chain per (half, row): fewer registers
        // than two chains, and the same order whatever the pass layout, so a row's result does
        // not depend on how many rows share the call (ragged batches equal separate ones).
        let mut acc = [[_mm256_setzero_ps(); R]; NH];
        for b in 0..kb {
            let qb = q.add(b * QBLOCK * TILE / 2);
            if H0 == 0 {
                // As in `q8_0_halves`: the pass with the first half prefetches for both.
                prefetch_ahead(qb, QBLOCK * TILE / 2, ahead);
            }
            // i32 sums with VNNI; i16 sums of `vpmaddubsw` pairs without (see the module docs).
            let mut s = [[_mm256_setzero_si256(); R]; NH];
            for g in 0..4 {
                let v: [__m256i; NH] =
                    std::array::from_fn(|h| _mm256_load_si256(qb.add(g * 64 + (H0 + h) * 32) as *const __m256i));
                let lo = v.map(|v| _mm256_and_si256(v, nib));
                let hi = v.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib));
                for r in 0..R {
                    let xb = xq[r].add(b * QBLOCK + g * 8);
                    let (xl, xh) = (bcast4(xb), bcast4(xb.add(4)));
                    for h in 0..NH {
                        if VNNI {
                            s[h][r] = _mm256_dpbusd_avx_epi32(s[h][r], lo[h], xl);
                            s[h][r] = _mm256_dpbusd_avx_epi32(s[h][r], hi[h], xh);
                        } else {
                            s[h][r] = _mm256_add_epi16(s[h][r], _mm256_maddubs_epi16(lo[h], xl));
                            s[h][r] = _mm256_add_epi16(s[h][r], _mm256_maddubs_epi16(hi[h], xh));
                        }
                    }
                }
            }
            for h in 0..NH {
                let dw = load_f16x8(scales.add(b * TILE + (H0 + h) * HALF));
                let mw = load_f16x8(mins.add(b * TILE + (H0 + h) * HALF));
                for r in 0..R {
                    let si = if VNNI { s[h][r] } else { _mm256_madd_epi16(s[h][r], ones) };
                    let sf = _mm256_cvtepi32_ps(si);
                    acc[h][r] = _mm256_fmadd_ps(sf, _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b))), acc[h][r]);
                    acc[h][r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs[r].add(b)), acc[h][r]);
                }
            }
        }
        for h in 0..NH {
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add((H0 + h) * HALF), acc[h][r]);
            }
        }
    }
}

/// Two 16-bit activations (a pair of [`QuantizedActs::qs16`]) in every 32-bit lane.
#[inline(always)]
unsafe fn bcast_pair(p: *const i16) -> __m256i {
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

/// `s += Σ pairs of i16 products` per 32-bit lane (`vpmaddwd` + `vpaddd`).
#[inline(always)]
unsafe fn dot_pairs(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
    unsafe { _mm256_add_epi32(s, _mm256_madd_epi16(w, x)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q8_0_rows16, w, a, t, row0, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q8_0_tile16_vnni(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q8_0_split16, w, a, t, row0, out) }
}

/// Q8_0 × 16-bit activations with AVX-VNNI, as two 8-bit products per weight (`q = 256·hi +
/// lo`; see `q8_0_rows16` in avx512.rs): no unpacking of the weights into 16-bit lanes.
#[inline(always)]
unsafe fn q8_0_split16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xh: [*const i8; R] = std::array::from_fn(|r| a.hi.as_ptr().add((row0 + r) * a.k));
        let xl: [*const u8; R] = std::array::from_fn(|r| a.lo.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const i32; R] = std::array::from_fn(|r| a.hi_sums.as_ptr().add((row0 + r) * kb));
        let flip = _mm256_set1_epi8(-128);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                if half == 0 {
                    // The first half's pass touches every line of the tile; the second runs from cache.
                    prefetch_ahead(q.add(b * QBLOCK * TILE), QBLOCK * TILE, ahead);
                }
                let qb = q.add(b * QBLOCK * TILE + half * 32);
                let mut sh = [_mm256_setzero_si256(); R];
                let mut sl = [_mm256_setzero_si256(); R];
                for g in 0..8 {
                    let wu = _mm256_load_si256(qb.add(g * 64) as *const __m256i);
                    let ws = _mm256_xor_si256(wu, flip);
                    for r in 0..R {
                        let i = b * QBLOCK + g * 4;
                        sh[r] = _mm256_dpbusd_avx_epi32(sh[r], wu, bcast4(xh[r].add(i)));
                        sl[r] = _mm256_dpbusd_avx_epi32(sl[r], bcast4(xl[r].add(i) as *const i8), ws);
                    }
                }
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                for r in 0..R {
                    let h = _mm256_sub_epi32(sh[r], _mm256_set1_epi32(128 * *xs[r].add(b)));
                    let s = _mm256_add_epi32(_mm256_slli_epi32::<8>(h), sl[r]);
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b)));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(half * HALF), acc[r]);
            }
        }
    }
}

/// Q8_0 × 16-bit activations without VNNI, with `vpmaddwd` (pairs of i16 products into i32): a
/// lane's 4 weight bytes, flipped back to signed, give the pairs (0, 2) and (1, 3), matching the
/// activations' `[0, 2, 1, 3]` order ([`QuantizedActs::qs16`]).
#[inline(always)]
unsafe fn q8_0_rows16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xq: [*const i16; R] = std::array::from_fn(|r| a.qs16.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let flip = _mm256_set1_epi8(-128);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                if half == 0 {
                    // The first half's pass touches every line of the tile; the second runs from cache.
                    prefetch_ahead(q.add(b * QBLOCK * TILE), QBLOCK * TILE, ahead);
                }
                let qb = q.add(b * QBLOCK * TILE + half * 32);
                let mut s = [_mm256_setzero_si256(); R];
                for g in 0..8 {
                    let ws = _mm256_xor_si256(_mm256_load_si256(qb.add(g * 64) as *const __m256i), flip);
                    let even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(ws));
                    let odd = _mm256_srai_epi16::<8>(ws);
                    for r in 0..R {
                        let xp = xq[r].add(b * QBLOCK + g * 4);
                        s[r] = dot_pairs(s[r], even, bcast_pair(xp));
                        s[r] = dot_pairs(s[r], odd, bcast_pair(xp.add(2)));
                    }
                }
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                for r in 0..R {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b)));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), scale, acc[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(half * HALF), acc[r]);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q4_1_rows16, w, a, t, row0, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q4_1_tile16_vnni(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q4_1_split16, w, a, t, row0, out) }
}

/// Q4_1 × 16-bit activations with AVX-VNNI, as two 8-bit products per weight (`q = 256·hi +
/// lo`; see `q4_1_rows16` in avx512.rs): the nibbles are unpacked once for both.
#[inline(always)]
unsafe fn q4_1_split16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
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
        let nib = _mm256_set1_epi8(0x0F);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                if half == 0 {
                    // The first half's pass touches every line of the tile; the second runs from cache.
                    prefetch_ahead(q.add(b * QBLOCK * TILE / 2), QBLOCK * TILE / 2, ahead);
                }
                let qb = q.add(b * QBLOCK * TILE / 2 + half * 32);
                let mut sh = [_mm256_setzero_si256(); R];
                let mut sl = [_mm256_setzero_si256(); R];
                for g in 0..4 {
                    let v = _mm256_load_si256(qb.add(g * 64) as *const __m256i);
                    let lo = _mm256_and_si256(v, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                    for r in 0..R {
                        let i = b * QBLOCK + g * 8;
                        sh[r] = _mm256_dpbusd_avx_epi32(sh[r], lo, bcast4(xh[r].add(i)));
                        sh[r] = _mm256_dpbusd_avx_epi32(sh[r], hi, bcast4(xh[r].add(i + 4)));
                        sl[r] = _mm256_dpbusd_avx_epi32(sl[r], bcast4(xl[r].add(i) as *const i8), lo);
                        sl[r] = _mm256_dpbusd_avx_epi32(sl[r], bcast4(xl[r].add(i + 4) as *const i8), hi);
                    }
                }
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                let mw = load_f16x8(mins.add(b * TILE + half * HALF));
                for r in 0..R {
                    let s = _mm256_add_epi32(_mm256_slli_epi32::<8>(sh[r]), sl[r]);
                    let sf = _mm256_cvtepi32_ps(s);
                    acc[r] = _mm256_fmadd_ps(sf, _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b))), acc[r]);
                    accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs[r].add(b)), accm[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(half * HALF), _mm256_add_ps(acc[r], accm[r]));
            }
        }
    }
}

/// Q4_1 × 16-bit activations without VNNI, with `vpmaddwd`: masking a lane's 4 bytes with
/// `0x000F000F` after shifts of 0, 8, 4 and 12 bits gives the nibble pairs (0, 2), (1, 3), (4, 6),
/// (5, 7) of its 8 inputs, matching the activations' order.
#[inline(always)]
unsafe fn q4_1_rows16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let ahead = prefetch_bytes();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let mins = w.mins.as_ptr().add(t * kb * TILE);
        let xq: [*const i16; R] = std::array::from_fn(|r| a.qs16.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
        let m = _mm256_set1_epi32(0x000F_000F);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                if half == 0 {
                    // The first half's pass touches every line of the tile; the second runs from cache.
                    prefetch_ahead(q.add(b * QBLOCK * TILE / 2), QBLOCK * TILE / 2, ahead);
                }
                let qb = q.add(b * QBLOCK * TILE / 2 + half * 32);
                let mut s = [_mm256_setzero_si256(); R];
                for g in 0..4 {
                    let v = _mm256_load_si256(qb.add(g * 64) as *const __m256i);
                    let pairs = [
                        _mm256_and_si256(v, m),
                        _mm256_and_si256(_mm256_srli_epi32::<8>(v), m),
                        _mm256_and_si256(_mm256_srli_epi32::<4>(v), m),
                        _mm256_and_si256(_mm256_srli_epi32::<12>(v), m),
                    ];
                    for r in 0..R {
                        let xp = xq[r].add(b * QBLOCK + g * 8);
                        for (j, p) in pairs.iter().enumerate() {
                            s[r] = dot_pairs(s[r], *p, bcast_pair(xp.add(2 * j)));
                        }
                    }
                }
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                let mw = load_f16x8(mins.add(b * TILE + half * HALF));
                for r in 0..R {
                    let sf = _mm256_cvtepi32_ps(s[r]);
                    acc[r] = _mm256_fmadd_ps(sf, _mm256_mul_ps(dw, _mm256_set1_ps(*xd[r].add(b))), acc[r]);
                    accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs[r].add(b)), accm[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(half * HALF), _mm256_add_ps(acc[r], accm[r]));
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, f32_rows, w, x, t, row0, out) }
}

/// Two accumulator chains per row (the same for any row count, so a row's sum never depends
/// on its neighbours).
#[inline(always)]
unsafe fn f32_rows<const R: usize>(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let k = w.k;
        let wt = w.data.as_f32().as_ptr().add(t * k * TILE);
        let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
        for half in 0..2 {
            let wh = wt.add(half * HALF);
            let mut acc0 = [_mm256_setzero_ps(); R];
            let mut acc1 = [_mm256_setzero_ps(); R];
            let mut i = 0;
            while i + 1 < k {
                let w0 = _mm256_load_ps(wh.add(i * TILE));
                let w1 = _mm256_load_ps(wh.add((i + 1) * TILE));
                for r in 0..R {
                    acc0[r] = _mm256_fmadd_ps(w0, _mm256_set1_ps(*xr[r].add(i)), acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(w1, _mm256_set1_ps(*xr[r].add(i + 1)), acc1[r]);
                }
                i += 2;
            }
            if i < k {
                let w0 = _mm256_load_ps(wh.add(i * TILE));
                for r in 0..R {
                    acc0[r] = _mm256_fmadd_ps(w0, _mm256_set1_ps(*xr[r].add(i)), acc0[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(half * HALF), _mm256_add_ps(acc0[r], acc1[r]));
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe {
        // Pairs of rows with four chains each (eight accumulators per pass): LoRA's A factors
        // are one tile of hundreds of inputs, where one chain would be bound by FMA latency.
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(2);
            let o: &mut [[f32; TILE]; 2] = (&mut out[r..r + 2]).try_into().expect("MR is even");
            if n == 2 {
                f16_rows::<2>(w, x, t, row0 + r, o)
            } else {
                f16_rows::<1>(w, x, t, row0 + r, o)
            }
            r += 2;
        }
    }
}

#[inline(always)]
unsafe fn f16_rows<const R: usize>(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, out: &mut [[f32; TILE]; 2]) {
    unsafe {
        let k = w.k;
        let wt = (w.data.as_slice().as_ptr() as *const f16).add(t * k * TILE);
        let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
        for half in 0..2 {
            let wh = wt.add(half * HALF);
            let mut acc = [[_mm256_setzero_ps(); R]; 4];
            let mut i = 0;
            while i + 4 <= k {
                // Factor tiles cross pages in short runs: fetch 1 KiB ahead (see avx512.rs).
                _mm_prefetch::<_MM_HINT_T0>(wt.wrapping_add((i + 32) * TILE) as *const i8);
                for c in 0..4 {
                    let wv = load_f16x8(wh.add((i + c) * TILE));
                    for r in 0..R {
                        acc[c][r] = _mm256_fmadd_ps(wv, _mm256_set1_ps(*xr[r].add(i + c)), acc[c][r]);
                    }
                }
                i += 4;
            }
            while i < k {
                let wv = load_f16x8(wh.add(i * TILE));
                for r in 0..R {
                    acc[0][r] = _mm256_fmadd_ps(wv, _mm256_set1_ps(*xr[r].add(i)), acc[0][r]);
                }
                i += 1;
            }
            for r in 0..R {
                let sum = _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r]));
                _mm256_storeu_ps(out[r].as_mut_ptr().add(half * HALF), sum);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
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
        prefetch_lines(wt.wrapping_add(4 * k * TILE) as *const u8, k * TILE * 2);
        let n = rows.len();
        if n == 0 {
            return;
        }
        let tp: [*const f32; MR] = std::array::from_fn(|r| t.as_ptr().add(rows[r.min(n - 1)].0 * k));
        let s = _mm256_set1_ps(scale);
        for half in 0..2 {
            let wh = wt.add(half * HALF);
            // Two chains per row, whatever the number of rows (a row's delta never depends on
            // its neighbours).
            let mut acc = [[_mm256_setzero_ps(); MR]; 2];
            let mut i = 0;
            while i + 2 <= k {
                for c in 0..2 {
                    let wv = load_f16x8(wh.add((i + c) * TILE));
                    for r in 0..MR {
                        if r < n {
                            acc[c][r] = _mm256_fmadd_ps(wv, _mm256_set1_ps(*tp[r].add(i + c)), acc[c][r]);
                        }
                    }
                }
                i += 2;
            }
            if i < k {
                let wv = load_f16x8(wh.add(i * TILE));
                for r in 0..MR {
                    if r < n {
                        acc[0][r] = _mm256_fmadd_ps(wv, _mm256_set1_ps(*tp[r].add(i)), acc[0][r]);
                    }
                }
            }
            for (r, &(_, o)) in rows.iter().enumerate() {
                let p = out[o].as_mut_ptr().add(half * HALF);
                let sum = _mm256_add_ps(acc[0][r], acc[1][r]);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(sum, s, _mm256_loadu_ps(p)));
            }
        }
    }
}

/// Cached elements loaded as 8 f32 lanes.
trait Load8: KvElem {
    /// # Safety
    /// `p` points to 8 readable elements; the CPU supports AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Load8 for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl Load8 for i8 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }
}

/// Head sizes that are whole numbers of 32-dimension slices take the vector path.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend<E: Load8>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
    unsafe {
        let hd = a.geo.head_dim;
        if hd == 0 || !hd.is_multiple_of(32) {
            return portable::attend::<E>(a, scores, out);
        }
        let (stride, inv) = softmax_scores::<E>(a, scores);
        // Values in slices of 32 dimensions (4 registers per head), up to 3 heads per pass, so
        // each value vector is loaded once for the heads of a GQA group.
        let sp = scores.as_ptr();
        let mut h = 0;
        while h < a.n_heads {
            let nh = (a.n_heads - h).min(3);
            for d0 in (0..hd).step_by(32) {
                match nh {
                    1 => weighted_values::<E, 1>(a, sp, stride, &inv, out, h, d0),
                    2 => weighted_values::<E, 2>(a, sp, stride, &inv, out, h, d0),
                    _ => weighted_values::<E, 3>(a, sp, stride, &inv, out, h, d0),
                }
            }
            h += nh;
        }
    }
}

/// Scores `q·k/√d` of every visible key for each head (8 keys per register; lanes past
/// `n_keys` are −∞), then `exp(s − max)` in place. Returns the row stride of `scores` and
/// `1 / Σ exp` per head.
#[inline(always)]
unsafe fn softmax_scores<E: Load8>(a: &QueryArgs, scores: &mut [f32]) -> (usize, [f32; MAX_GROUP]) {
    unsafe {
        let hd = a.geo.head_dim;
        let nh = a.n_heads;
        let n = a.n_keys;
        let stride = n.div_ceil(16) * 16;
        let scale = _mm256_set1_ps(1.0 / (hd as f32).sqrt());
        let (k_off, v_off) = (a.geo.k_region(a.layer, a.kv_head), a.geo.v_region(a.layer, a.kv_head));
        let keys_bytes = BLOCK_TOKENS * hd * std::mem::size_of::<E>();
        let q = a.q.as_ptr();
        let sp = scores.as_mut_ptr();
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut maxv = [ninf; MAX_GROUP];
        prefetch_lines(a.blocks[0].wrapping_add(v_off), keys_bytes);
        let n_blocks = n.div_ceil(BLOCK_TOKENS);
        // A block's row of 16 keys at a time, as two registers of 8: two dependency chains per
        // head, each query element broadcast once for both. Heads in passes of up to 4 keep
        // the accumulators in registers.
        for b in 0..n_blocks {
            let (kt, k_scales) = region::<E>(a.blocks[b], k_off, a.geo);
            let next_keys = a.blocks[(b + 1).min(n_blocks - 1)].wrapping_add(k_off);
            let row = ScoreRow { kt, k_scales, next_keys, valid: (n - b * BLOCK_TOKENS).min(BLOCK_TOKENS) };
            let out = sp.add(b * BLOCK_TOKENS);
            let mut h0 = 0;
            while h0 < nh {
                let g = (nh - h0).min(4);
                let prefetch = h0 == 0;
                match g {
                    1 => score_row::<E, 1>(&row, q, hd, scale, out, stride, &mut maxv, h0, prefetch),
                    2 => score_row::<E, 2>(&row, q, hd, scale, out, stride, &mut maxv, h0, prefetch),
                    3 => score_row::<E, 3>(&row, q, hd, scale, out, stride, &mut maxv, h0, prefetch),
                    _ => score_row::<E, 4>(&row, q, hd, scale, out, stride, &mut maxv, h0, prefetch),
                }
                h0 += g;
            }
        }
        let mut inv = [0f32; MAX_GROUP];
        for h in 0..nh {
            let m = maxv[h];
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m))));
            let mut sum = _mm256_setzero_ps();
            for c in 0..n.div_ceil(HALF) {
                let p = sp.add(h * stride + c * HALF);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
            inv[h] = 1.0 / hsum(sum);
        }
        (stride, inv)
    }
}

/// The keys of one block row (16 positions) of one kv head, for [`score_row`].
struct ScoreRow<E> {
    /// Transposed keys `[head_dim][BLOCK_TOKENS]`.
    kt: *const E,
    k_scales: *const f32,
    /// The next block's keys region (prefetched a line per dimension).
    next_keys: *const u8,
    /// Positions of the row that are visible (the rest score −∞).
    valid: usize,
}

/// Scores of the 16 keys of `row` for heads `h0..h0 + NH`, written to `out[h·stride..][..16]`
/// (scaled, invisible lanes −∞), and folded into the running maxima.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn score_row<E: Load8, const NH: usize>(
    row: &ScoreRow<E>,
    q: *const f32,
    hd: usize,
    scale: __m256,
    out: *mut f32,
    stride: usize,
    maxv: &mut [__m256; MAX_GROUP],
    h0: usize,
    prefetch: bool,
) {
    unsafe {
        let lines = (BLOCK_TOKENS * hd * std::mem::size_of::<E>()).div_ceil(64);
        let mut lo = [_mm256_setzero_ps(); NH];
        let mut hi = [_mm256_setzero_ps(); NH];
        for d in 0..hd {
            if prefetch && d < lines {
                prefetch_lines(row.next_keys.wrapping_add(d * 64), 64);
            }
            let k = row.kt.add(d * BLOCK_TOKENS);
            let (k_lo, k_hi) = (E::load8(k), E::load8(k.add(HALF)));
            for h in 0..NH {
                let qd = _mm256_set1_ps(*q.add((h0 + h) * hd + d));
                lo[h] = _mm256_fmadd_ps(qd, k_lo, lo[h]);
                hi[h] = _mm256_fmadd_ps(qd, k_hi, hi[h]);
            }
        }
        // Per-key scales (int8 cache) fold into the softmax scale.
        let (scale_lo, scale_hi) = if E::SCALED {
            (
                _mm256_mul_ps(scale, _mm256_loadu_ps(row.k_scales)),
                _mm256_mul_ps(scale, _mm256_loadu_ps(row.k_scales.add(HALF))),
            )
        } else {
            (scale, scale)
        };
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let keep_lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(row.valid as i32), lanes));
        let keep_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(row.valid as i32 - HALF as i32), lanes));
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        for h in 0..NH {
            let s_lo = _mm256_blendv_ps(ninf, _mm256_mul_ps(lo[h], scale_lo), keep_lo);
            let s_hi = _mm256_blendv_ps(ninf, _mm256_mul_ps(hi[h], scale_hi), keep_hi);
            let o = out.add((h0 + h) * stride);
            _mm256_storeu_ps(o, s_lo);
            _mm256_storeu_ps(o.add(HALF), s_hi);
            maxv[h0 + h] = _mm256_max_ps(maxv[h0 + h], _mm256_max_ps(s_lo, s_hi));
        }
    }
}

/// `out[h] = Σ_t w[h][t]·v[t] / Σ_t w[h][t]` for dimensions `d0..d0 + 32` of `NH` heads from
/// `h0`, loading each slice of a value vector once for all of them.
#[inline(always)]
unsafe fn weighted_values<E: Load8, const NH: usize>(
    a: &QueryArgs,
    sp: *const f32,
    stride: usize,
    inv: &[f32; MAX_GROUP],
    out: &mut [f32],
    h0: usize,
    d0: usize,
) {
    unsafe {
        let hd = a.geo.head_dim;
        let n = a.n_keys;
        let v_off = a.geo.v_region(a.layer, a.kv_head);
        let lines_per_key = (BLOCK_TOKENS * hd * std::mem::size_of::<E>()).div_ceil(64).div_ceil(BLOCK_TOKENS);
        let mut acc = [[_mm256_setzero_ps(); 4]; NH];
        let n_blocks = n.div_ceil(BLOCK_TOKENS);
        for b in 0..n_blocks {
            let (vb, v_scales) = region::<E>(a.blocks[b], v_off, a.geo);
            // The next block's values, a few lines per key, on the first pass over the dimensions.
            let next_values = a.blocks[(b + 1).min(n_blocks - 1)].wrapping_add(v_off);
            for s in 0..(n - b * BLOCK_TOKENS).min(BLOCK_TOKENS) {
                if d0 == 0 {
                    prefetch_lines(next_values.wrapping_add(s * lines_per_key * 64), lines_per_key * 64);
                }
                let t = b * BLOCK_TOKENS + s;
                let vs = if E::SCALED { *v_scales.add(s) } else { 1.0 };
                let vp = vb.add(s * hd + d0);
                let v: [__m256; 4] = std::array::from_fn(|c| E::load8(vp.add(c * HALF)));
                for h in 0..NH {
                    let w = _mm256_set1_ps(*sp.add((h0 + h) * stride + t) * vs);
                    for c in 0..4 {
                        acc[h][c] = _mm256_fmadd_ps(w, v[c], acc[h][c]);
                    }
                }
            }
        }
        for h in 0..NH {
            let iv = _mm256_set1_ps(inv[h0 + h]);
            for c in 0..4 {
                _mm256_storeu_ps(out.as_mut_ptr().add((h0 + h) * hd + d0 + c * HALF), _mm256_mul_ps(acc[h][c], iv));
            }
        }
    }
}
