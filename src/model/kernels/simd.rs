//! Small SIMD helpers shared by the kernels.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// e^x for 16 lanes (Cephes-style: 2^n · p(r) with a degree-6 polynomial; ~1 ulp for
/// x ∈ [−87, 88]; smaller inputs flush towards 0, larger ones saturate).
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
}
