//! x86-64: vectorised `exp` and the row helpers for AVX-512 (16 lanes) and AVX2 + FMA (8 lanes).
//!
//! Every function here but [`prefetch_lines`] (plain x86-64) is `unsafe`: the CPU must support
//! the module's instruction set, which callers guarantee by dispatching on an [`super::Isa`] the
//! CPU supports. That is the whole safety contract of each function (slices are bounds-checked or
//! sized by their own lengths), so it is stated once here rather than on each.
#![allow(clippy::missing_safety_doc)]

use super::LogMix;
use std::arch::x86_64::*;

/// Asks the cache for the `len` bytes from `p`, one prefetch per 64-byte line (the KV blocks of
/// attention, the packed weights of the matmuls). Safe whatever the address: a prefetch is a
/// hint that never faults, hence also `wrapping_add` (callers may point past their buffer).
#[inline(always)]
pub fn prefetch_lines(p: *const u8, len: usize) {
    for off in (0..len).step_by(64) {
        // SAFETY: `_mm_prefetch` (SSE, part of x86-64) neither faults nor reads visibly.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
    }
}

/// Constants of the Cephes-style `exp`: `e^x = 2^n · p(r)`, `n = round(x·log2 e)`,
/// `r = x − n·ln 2` (in two parts), `p` of degree 6. ~1 ulp for x ∈ [−87, 88]; smaller inputs
/// flush towards 0, larger ones saturate. Both widths use the same steps, so they agree.
mod exp_consts {
    pub const LO: f32 = -87.0;
    pub const HI: f32 = 88.0;
    pub const LN2_HI: f32 = 0.693_145_75;
    pub const LN2_LO: f32 = 1.428_606_8e-6;
    pub const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_66, 0.5];
}

pub mod avx512 {
    use super::exp_consts::*;
    use super::*;

    /// e^x for 16 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline(always)]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        unsafe {
            let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
            let n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), 0);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(P[0]);
            for &c in &P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
            _mm512_scalef_ps(p, n)
        }
    }

    /// Lanes that hold finite numbers.
    #[inline(always)]
    unsafe fn finite_mask(v: __m512) -> __mmask16 {
        // fpclass 0x99 = QNaN | SNaN | +Inf | −Inf.
        unsafe { !_mm512_fpclass_ps_mask(v, 0x99) }
    }

    /// Lanes `0..n` of a 16-lane mask.
    #[inline(always)]
    fn head(n: usize) -> __mmask16 {
        if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 }
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn max_finite(x: &[f32]) -> f32 {
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < x.len() {
                let k = head(x.len() - i);
                let v = _mm512_maskz_loadu_ps(k, x.as_ptr().add(i));
                m = _mm512_mask_max_ps(m, k & finite_mask(v), m, v);
                i += 16;
            }
            _mm512_reduce_max_ps(m)
        }
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        unsafe {
            let s = _mm512_set1_ps(shift);
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < x.len() {
                let k = head(x.len() - i);
                let v = _mm512_maskz_loadu_ps(k, x.as_ptr().add(i));
                let e = _mm512_maskz_mov_ps(k & finite_mask(v), exp16(_mm512_sub_ps(v, s)));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, e);
                sum = _mm512_add_ps(sum, e);
                i += 16;
            }
            _mm512_reduce_add_ps(sum)
        }
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
        unsafe {
            let s = _mm512_set1_ps(shift);
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < x.len() {
                let k = head(x.len() - i);
                let v = _mm512_maskz_loadu_ps(k, x.as_ptr().add(i));
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k & finite_mask(v), exp16(_mm512_sub_ps(v, s))));
                i += 16;
            }
            _mm512_reduce_add_ps(sum)
        }
    }

    /// [`LogMix::score`] for 16 lanes, the same operations in the same order.
    #[inline(always)]
    unsafe fn mix16(c: __m512, u: __m512, m: &LogMix) -> __m512 {
        unsafe {
            let floor = _mm512_set1_ps(m.floor);
            let lc = _mm512_max_ps(_mm512_sub_ps(c, _mm512_set1_ps(m.lse_c)), floor);
            let lu = _mm512_max_ps(_mm512_sub_ps(u, _mm512_set1_ps(m.lse_u)), floor);
            let lc = _mm512_mask_mov_ps(floor, finite_mask(c), lc);
            let lu = _mm512_mask_mov_ps(floor, finite_mask(u), lu);
            _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(m.gamma), lc), _mm512_mul_ps(_mm512_set1_ps(1.0 - m.gamma), lu))
        }
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn mix_log_probs(c: &[f32], u: &[f32], m: &LogMix, out: &mut [f32]) {
        unsafe {
            let mut i = 0;
            while i < c.len() {
                let k = head(c.len() - i);
                let v =
                    mix16(_mm512_maskz_loadu_ps(k, c.as_ptr().add(i)), _mm512_maskz_loadu_ps(k, u.as_ptr().add(i)), m);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, v);
                i += 16;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn argmax_mix_log_probs(c: &[f32], u: &[f32], m: &LogMix) -> u32 {
        unsafe {
            // Per lane: the best score and the first index reaching it; ties resolved to the
            // lowest index at the end, as the scalar loop does.
            let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut best_i = _mm512_setzero_si512();
            let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let step = _mm512_set1_epi32(16);
            let mut i = 0;
            while i < c.len() {
                let k = head(c.len() - i);
                let v =
                    mix16(_mm512_maskz_loadu_ps(k, c.as_ptr().add(i)), _mm512_maskz_loadu_ps(k, u.as_ptr().add(i)), m);
                let better = k & _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
                best = _mm512_mask_mov_ps(best, better, v);
                best_i = _mm512_mask_mov_epi32(best_i, better, idx);
                idx = _mm512_add_epi32(idx, step);
                i += 16;
            }
            let mut vals = [0f32; 16];
            let mut ids = [0u32; 16];
            _mm512_storeu_ps(vals.as_mut_ptr(), best);
            _mm512_storeu_si512(ids.as_mut_ptr() as *mut __m512i, best_i);
            lowest_best(&vals, &ids)
        }
    }
}

/// The index of the largest lane value, lowest index among equals (0 if none beats −∞).
fn lowest_best(vals: &[f32], ids: &[u32]) -> u32 {
    let (mut bv, mut bi) = (f32::NEG_INFINITY, 0u32);
    for (&v, &i) in vals.iter().zip(ids) {
        if v > bv || (v == bv && v > f32::NEG_INFINITY && i < bi) {
            bv = v;
            bi = i;
        }
    }
    bi
}

pub mod avx2 {
    use super::exp_consts::*;
    use super::*;

    /// e^x for 8 lanes (the steps of [`super::avx512::exp16`]; `2^n` built in the exponent bits,
    /// exact for the clamped range, where `n ∈ [−126, 127]`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        unsafe {
            let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(P[0]);
            for &c in &P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
            let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
            _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
        }
    }

    /// All-ones in lanes holding finite numbers (`x − x` is NaN exactly for NaN and ±∞).
    #[inline(always)]
    pub unsafe fn finite_mask(v: __m256) -> __m256 {
        unsafe { _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ) }
    }

    /// Loads lanes `0..n` of `p` (n ≤ 8 readable floats), −∞ in the others when `fill` says so.
    #[inline(always)]
    unsafe fn load_tail(p: *const f32, n: usize, fill: f32) -> __m256 {
        let mut buf = [fill; 8];
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n.min(8)) };
        unsafe { _mm256_loadu_ps(buf.as_ptr()) }
    }

    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        unsafe {
            let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            _mm_cvtss_f32(m)
        }
    }

    #[inline(always)]
    pub unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max_finite(x: &[f32]) -> f32 {
        unsafe {
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut m = ninf;
            let mut i = 0;
            while i < x.len() {
                let v = if i + 8 <= x.len() {
                    _mm256_loadu_ps(x.as_ptr().add(i))
                } else {
                    load_tail(x.as_ptr().add(i), x.len() - i, f32::NEG_INFINITY)
                };
                m = _mm256_max_ps(m, _mm256_blendv_ps(ninf, v, finite_mask(v)));
                i += 8;
            }
            hmax(m)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        unsafe {
            let s = _mm256_set1_ps(shift);
            let mut sum = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= x.len() {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let e = _mm256_and_ps(finite_mask(v), exp8(_mm256_sub_ps(v, s)));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), e);
                sum = _mm256_add_ps(sum, e);
                i += 8;
            }
            if i < x.len() {
                let n = x.len() - i;
                let v = load_tail(x.as_ptr().add(i), n, f32::NEG_INFINITY);
                let e = _mm256_and_ps(finite_mask(v), exp8(_mm256_sub_ps(v, s)));
                let mut buf = [0f32; 8];
                _mm256_storeu_ps(buf.as_mut_ptr(), e);
                out[i..].copy_from_slice(&buf[..n]);
                sum = _mm256_add_ps(sum, e);
            }
            hsum(sum)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
        unsafe {
            let s = _mm256_set1_ps(shift);
            let mut sum = _mm256_setzero_ps();
            let mut i = 0;
            while i < x.len() {
                let v = if i + 8 <= x.len() {
                    _mm256_loadu_ps(x.as_ptr().add(i))
                } else {
                    load_tail(x.as_ptr().add(i), x.len() - i, f32::NEG_INFINITY)
                };
                sum = _mm256_add_ps(sum, _mm256_and_ps(finite_mask(v), exp8(_mm256_sub_ps(v, s))));
                i += 8;
            }
            hsum(sum)
        }
    }

    /// [`LogMix::score`] for 8 lanes, the same operations in the same order.
    #[inline(always)]
    unsafe fn mix8(c: __m256, u: __m256, m: &LogMix) -> __m256 {
        unsafe {
            let floor = _mm256_set1_ps(m.floor);
            let lc = _mm256_max_ps(_mm256_sub_ps(c, _mm256_set1_ps(m.lse_c)), floor);
            let lu = _mm256_max_ps(_mm256_sub_ps(u, _mm256_set1_ps(m.lse_u)), floor);
            let lc = _mm256_blendv_ps(floor, lc, finite_mask(c));
            let lu = _mm256_blendv_ps(floor, lu, finite_mask(u));
            _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(m.gamma), lc), _mm256_mul_ps(_mm256_set1_ps(1.0 - m.gamma), lu))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mix_log_probs(c: &[f32], u: &[f32], m: &LogMix, out: &mut [f32]) {
        unsafe {
            let mut i = 0;
            while i + 8 <= c.len() {
                let v = mix8(_mm256_loadu_ps(c.as_ptr().add(i)), _mm256_loadu_ps(u.as_ptr().add(i)), m);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
                i += 8;
            }
            for j in i..c.len() {
                out[j] = m.score(c[j], u[j]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn argmax_mix_log_probs(c: &[f32], u: &[f32], m: &LogMix) -> u32 {
        unsafe {
            let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut best_i = _mm256_setzero_si256();
            let mut idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let step = _mm256_set1_epi32(8);
            let mut i = 0;
            while i + 8 <= c.len() {
                let v = mix8(_mm256_loadu_ps(c.as_ptr().add(i)), _mm256_loadu_ps(u.as_ptr().add(i)), m);
                let better = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
                best = _mm256_blendv_ps(best, v, better);
                best_i = _mm256_blendv_epi8(best_i, idx, _mm256_castps_si256(better));
                idx = _mm256_add_epi32(idx, step);
                i += 8;
            }
            let mut vals = [0f32; 8];
            let mut ids = [0u32; 8];
            _mm256_storeu_ps(vals.as_mut_ptr(), best);
            _mm256_storeu_si256(ids.as_mut_ptr() as *mut __m256i, best_i);
            let mut bi = lowest_best(&vals, &ids);
            let mut bv = if vals.iter().any(|&v| v > f32::NEG_INFINITY) {
                m.score(c[bi as usize], u[bi as usize])
            } else {
                f32::NEG_INFINITY
            };
            for j in i..c.len() {
                let v = m.score(c[j], u[j]);
                if v > bv {
                    bv = v;
                    bi = j as u32;
                }
            }
            bi
        }
    }
}
