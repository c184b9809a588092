//! Small SIMD helpers shared by the model kernels and the guidance/sampling math: a vectorised
//! `exp`, and the two passes of a numerically stable softmax over a vocabulary-sized row.
//! Each has a scalar fallback; AVX-512 is detected at run time.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// e^x for 16 lanes (Cephes-style: 2^n · p(r) with a degree-6 polynomial; ~1 ulp for
/// x ∈ [−87, 88]; smaller inputs flush towards 0, larger ones saturate).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn exp16(x: __m512) -> __m512 {
    unsafe {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), 0);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_66));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(p, n)
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static YES: OnceLock<bool> = OnceLock::new();
        *YES.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Largest finite value (−∞ if there is none; NaN and ±∞ are ignored).
pub fn max_finite(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return unsafe { avx512_max_finite(x) };
    }
    x.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max)
}

/// `out[i] = exp(x[i] − shift)` for finite `x[i]` (0 otherwise); returns `Σ out`.
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return unsafe { avx512_exp_shifted(x, shift, out) };
    }
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if v.is_finite() { (v - shift).exp() } else { 0.0 };
        sum += *o;
    }
    sum
}

/// Σ exp(x[i] − shift) over finite `x[i]`, without storing.
pub fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return unsafe { avx512_exp_shifted_sum(x, shift) };
    }
    x.iter().filter(|v| v.is_finite()).map(|&v| (v - shift).exp()).sum()
}

/// Lanes that hold finite numbers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finite_mask(v: __m512) -> __mmask16 {
    // fpclass 0x99 = QNaN | SNaN | +Inf | −Inf.
    unsafe { !_mm512_fpclass_ps_mask(v, 0x99) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn avx512_max_finite(x: &[f32]) -> f32 {
    unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let chunks = x.len() / 16;
        for c in 0..chunks {
            let v = _mm512_loadu_ps(x.as_ptr().add(c * 16));
            m = _mm512_mask_max_ps(m, finite_mask(v), m, v);
        }
        let mut best = _mm512_reduce_max_ps(m);
        for &v in &x[chunks * 16..] {
            if v.is_finite() && v > best {
                best = v;
            }
        }
        best
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn avx512_exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    unsafe {
        let s = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let chunks = x.len() / 16;
        for c in 0..chunks {
            let v = _mm512_loadu_ps(x.as_ptr().add(c * 16));
            let e = _mm512_maskz_mov_ps(finite_mask(v), exp16(_mm512_sub_ps(v, s)));
            _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), e);
            sum = _mm512_add_ps(sum, e);
        }
        let mut total = _mm512_reduce_add_ps(sum);
        for i in chunks * 16..x.len() {
            out[i] = if x[i].is_finite() { (x[i] - shift).exp() } else { 0.0 };
            total += out[i];
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn avx512_exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
    unsafe {
        let s = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let chunks = x.len() / 16;
        for c in 0..chunks {
            let v = _mm512_loadu_ps(x.as_ptr().add(c * 16));
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(finite_mask(v), exp16(_mm512_sub_ps(v, s))));
        }
        let mut total = _mm512_reduce_add_ps(sum);
        for &v in &x[chunks * 16..] {
            if v.is_finite() {
                total += (v - shift).exp();
            }
        }
        total
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp16_is_accurate() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run(xs: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(xs.as_ptr()))) };
            out
        }
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.37);
            let got = unsafe { run(&xs) };
            for (g, &v) in got.iter().zip(&xs) {
                let want = (v as f64).exp();
                if v <= 88.0 {
                    assert!(((*g as f64) - want).abs() <= 3e-7 * want, "exp({v}) = {g}, want {want}");
                }
            }
            x += 5.9;
        }
    }

    #[test]
    fn row_helpers_match_scalar() {
        let mut x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 613) as f32 * 0.05 - 15.0).collect();
        x[3] = f32::NEG_INFINITY;
        x[10] = f32::NAN;
        x[999] = f32::INFINITY;
        let m = max_finite(&x);
        assert_eq!(m, x.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max));
        let mut out = vec![0f32; x.len()];
        let s = exp_shifted(&x, m, &mut out);
        assert_eq!(out[3], 0.0);
        assert_eq!(out[10], 0.0);
        assert_eq!(out[999], 0.0);
        let want: f64 = x.iter().filter(|v| v.is_finite()).map(|&v| ((v - m) as f64).exp()).sum();
        assert!((s as f64 - want).abs() < 1e-5 * want);
        assert!((exp_shifted_sum(&x, m) as f64 - want).abs() < 1e-5 * want);
    }
}
