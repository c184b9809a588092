//! aarch64 NEON (4 lanes): vectorised `exp` and the row helpers.
//!
//! NEON is part of every aarch64 CPU; the functions are still `unsafe` and `target_feature`
//! gated like the x86 ones, so that one dispatch rule (a supported [`super::Isa`]) covers all.
//! That is the whole safety contract of each function (slices are bounds-checked or sized by
//! their own lengths), so it is stated once here rather than on each.
#![allow(clippy::missing_safety_doc)]

use super::LogMix;
use std::arch::aarch64::*;

/// e^x for 4 lanes: the steps of the x86 `exp16`/`exp8` (see `x86.rs`), `2^n` built in the
/// exponent bits.
///
/// # Safety
/// The CPU must support NEON.
#[inline(always)]
pub unsafe fn exp4(x: float32x4_t) -> float32x4_t {
    unsafe {
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0)), vdupq_n_f32(88.0));
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
        let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_145_75));
        let r = vfmsq_f32(r, n, vdupq_n_f32(1.428_606_8e-6));
        let mut p = vdupq_n_f32(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_66, 0.5] {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), p, vmulq_f32(r, r));
        let pow2 = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(p, vreinterpretq_f32_s32(pow2))
    }
}

/// All-ones in lanes holding finite numbers (`x − x` is NaN exactly for NaN and ±∞).
#[inline(always)]
pub unsafe fn finite_mask(v: float32x4_t) -> uint32x4_t {
    unsafe { vceqq_f32(vsubq_f32(v, v), vdupq_n_f32(0.0)) }
}

#[inline(always)]
unsafe fn load_tail(p: *const f32, n: usize, fill: f32) -> float32x4_t {
    let mut buf = [fill; 4];
    unsafe {
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n.min(4));
        vld1q_f32(buf.as_ptr())
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn max_finite(x: &[f32]) -> f32 {
    unsafe {
        let ninf = vdupq_n_f32(f32::NEG_INFINITY);
        let mut m = ninf;
        let mut i = 0;
        while i < x.len() {
            let v = if i + 4 <= x.len() {
                vld1q_f32(x.as_ptr().add(i))
            } else {
                load_tail(x.as_ptr().add(i), x.len() - i, f32::NEG_INFINITY)
            };
            m = vmaxq_f32(m, vbslq_f32(finite_mask(v), v, ninf));
            i += 4;
        }
        vmaxvq_f32(m)
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    unsafe {
        let s = vdupq_n_f32(shift);
        let mut sum = vdupq_n_f32(0.0);
        let mut i = 0;
        while i < x.len() {
            let n = (x.len() - i).min(4);
            let v =
                if n == 4 { vld1q_f32(x.as_ptr().add(i)) } else { load_tail(x.as_ptr().add(i), n, f32::NEG_INFINITY) };
            let e = vreinterpretq_f32_u32(vandq_u32(finite_mask(v), vreinterpretq_u32_f32(exp4(vsubq_f32(v, s)))));
            if n == 4 {
                vst1q_f32(out.as_mut_ptr().add(i), e);
            } else {
                let mut buf = [0f32; 4];
                vst1q_f32(buf.as_mut_ptr(), e);
                out[i..].copy_from_slice(&buf[..n]);
            }
            sum = vaddq_f32(sum, e);
            i += 4;
        }
        vaddvq_f32(sum)
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
    unsafe {
        let s = vdupq_n_f32(shift);
        let mut sum = vdupq_n_f32(0.0);
        let mut i = 0;
        while i < x.len() {
            let v = if i + 4 <= x.len() {
                vld1q_f32(x.as_ptr().add(i))
            } else {
                load_tail(x.as_ptr().add(i), x.len() - i, f32::NEG_INFINITY)
            };
            let e = vandq_u32(finite_mask(v), vreinterpretq_u32_f32(exp4(vsubq_f32(v, s))));
            sum = vaddq_f32(sum, vreinterpretq_f32_u32(e));
            i += 4;
        }
        vaddvq_f32(sum)
    }
}

/// [`LogMix::score`] for 4 lanes, the same operations in the same order.
#[inline(always)]
unsafe fn mix4(c: float32x4_t, u: float32x4_t, m: &LogMix) -> float32x4_t {
    unsafe {
        let floor = vdupq_n_f32(m.floor);
        let lc = vmaxq_f32(vsubq_f32(c, vdupq_n_f32(m.lse_c)), floor);
        let lu = vmaxq_f32(vsubq_f32(u, vdupq_n_f32(m.lse_u)), floor);
        let lc = vbslq_f32(finite_mask(c), lc, floor);
        let lu = vbslq_f32(finite_mask(u), lu, floor);
        vaddq_f32(vmulq_f32(vdupq_n_f32(m.gamma), lc), vmulq_f32(vdupq_n_f32(1.0 - m.gamma), lu))
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn mix_log_probs(c: &[f32], u: &[f32], m: &LogMix, out: &mut [f32]) {
    unsafe {
        let mut i = 0;
        while i + 4 <= c.len() {
            vst1q_f32(out.as_mut_ptr().add(i), mix4(vld1q_f32(c.as_ptr().add(i)), vld1q_f32(u.as_ptr().add(i)), m));
            i += 4;
        }
        for j in i..c.len() {
            out[j] = m.score(c[j], u[j]);
        }
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn argmax_mix_log_probs(c: &[f32], u: &[f32], m: &LogMix) -> u32 {
    unsafe {
        let mut best = vdupq_n_f32(f32::NEG_INFINITY);
        let mut best_i = vdupq_n_u32(0);
        let lanes: [u32; 4] = [0, 1, 2, 3];
        let mut idx = vld1q_u32(lanes.as_ptr());
        let mut i = 0;
        while i + 4 <= c.len() {
            let v = mix4(vld1q_f32(c.as_ptr().add(i)), vld1q_f32(u.as_ptr().add(i)), m);
            let better = vcgtq_f32(v, best);
            best = vbslq_f32(better, v, best);
            best_i = vbslq_u32(better, idx, best_i);
            idx = vaddq_u32(idx, vdupq_n_u32(4));
            i += 4;
        }
        let mut vals = [0f32; 4];
        let mut ids = [0u32; 4];
        vst1q_f32(vals.as_mut_ptr(), best);
        vst1q_u32(ids.as_mut_ptr(), best_i);
        let (mut bv, mut bi) = (f32::NEG_INFINITY, 0u32);
        for (&v, &id) in vals.iter().zip(&ids) {
            if v > bv || (v == bv && v > f32::NEG_INFINITY && id < bi) {
                bv = v;
                bi = id;
            }
        }
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
