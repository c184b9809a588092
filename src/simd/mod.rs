//! SIMD shared by the model kernels and the guidance/sampling math: which instruction set runs
//! ([`Isa`], chosen once per process), vectorised `exp` per instruction set, and the passes of a
//! numerically stable softmax over a vocabulary-sized row.
//!
//! Each row helper has one implementation per [`Isa`]; the portable one is the reference the
//! tests compare the others with.

#[cfg(target_arch = "aarch64")]
pub mod arm;
pub mod isa;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use isa::{Isa, IsaError, activate, active, init_from_env};

/// Largest finite value (−∞ if there is none; NaN and ±∞ are ignored).
pub fn max_finite(x: &[f32]) -> f32 {
    max_finite_on(active(), x)
}

/// `out[i] = exp(x[i] − shift)` for finite `x[i]` (0 otherwise); returns `Σ out`.
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    assert_eq!(x.len(), out.len());
    exp_shifted_on(active(), x, shift, out)
}

/// `Σ exp(x[i] − shift)` over finite `x[i]`, without storing.
pub fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
    exp_shifted_sum_on(active(), x, shift)
}

/// `γ·(c − lse_c) + (1−γ)·(u − lse_u)` per token, each log-probability floored at `floor` and
/// non-finite logits mapped to `floor` (guidance's `log` mode, see [`crate::guidance`]).
pub fn mix_log_probs(c: &[f32], u: &[f32], mix: &LogMix, out: &mut [f32]) {
    assert!(c.len() == u.len() && u.len() == out.len());
    mix_log_probs_on(active(), c, u, mix, out)
}

/// Index of the largest [`mix_log_probs`] score (first on ties), without storing the scores.
pub fn argmax_mix_log_probs(c: &[f32], u: &[f32], mix: &LogMix) -> u32 {
    assert_eq!(c.len(), u.len());
    argmax_mix_log_probs_on(active(), c, u, mix)
}

/// The constants of one log-mode guidance mix.
pub struct LogMix {
    pub lse_c: f32,
    pub lse_u: f32,
    pub gamma: f32,
    pub floor: f32,
}

impl LogMix {
    /// The reference definition every vectorised version must reproduce bit for bit: the same
    /// operations in the same order (`γ·a + (1−γ)·b` as two products and a sum, no FMA).
    #[inline(always)]
    pub fn score(&self, c: f32, u: f32) -> f32 {
        let lc = if c.is_finite() { (c - self.lse_c).max(self.floor) } else { self.floor };
        let lu = if u.is_finite() { (u - self.lse_u).max(self.floor) } else { self.floor };
        self.gamma * lc + (1.0 - self.gamma) * lu
    }
}

fn max_finite_on(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        // SAFETY (all arms): `isa` is the active set, which is only ever one the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::max_finite(x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::avx2::max_finite(x) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => unsafe { arm::max_finite(x) },
        _ => portable::max_finite(x),
    }
}

fn exp_shifted_on(isa: Isa, x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::exp_shifted(x, shift, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::avx2::exp_shifted(x, shift, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => unsafe { arm::exp_shifted(x, shift, out) },
        _ => portable::exp_shifted(x, shift, out),
    }
}

fn exp_shifted_sum_on(isa: Isa, x: &[f32], shift: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::exp_shifted_sum(x, shift) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::avx2::exp_shifted_sum(x, shift) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => unsafe { arm::exp_shifted_sum(x, shift) },
        _ => portable::exp_shifted_sum(x, shift),
    }
}

fn mix_log_probs_on(isa: Isa, c: &[f32], u: &[f32], mix: &LogMix, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::mix_log_probs(c, u, mix, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::avx2::mix_log_probs(c, u, mix, out) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => unsafe { arm::mix_log_probs(c, u, mix, out) },
        _ => portable::mix_log_probs(c, u, mix, out),
    }
}

fn argmax_mix_log_probs_on(isa: Isa, c: &[f32], u: &[f32], mix: &LogMix) -> u32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::avx512::argmax_mix_log_probs(c, u, mix) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni => unsafe { x86::avx2::argmax_mix_log_probs(c, u, mix) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => unsafe { arm::argmax_mix_log_probs(c, u, mix) },
        _ => portable::argmax_mix_log_probs(c, u, mix),
    }
}

/// The reference implementations.
mod portable {
    use super::LogMix;

    pub fn max_finite(x: &[f32]) -> f32 {
        x.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max)
    }

    pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        let mut sum = 0.0;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = if v.is_finite() { (v - shift).exp() } else { 0.0 };
            sum += *o;
        }
        sum
    }

    pub fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
        x.iter().filter(|v| v.is_finite()).map(|&v| (v - shift).exp()).sum()
    }

    pub fn mix_log_probs(c: &[f32], u: &[f32], m: &LogMix, out: &mut [f32]) {
        for ((o, &c), &u) in out.iter_mut().zip(c).zip(u) {
            *o = m.score(c, u);
        }
    }

    pub fn argmax_mix_log_probs(c: &[f32], u: &[f32], m: &LogMix) -> u32 {
        let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
        for (i, (&c, &u)) in c.iter().zip(u).enumerate() {
            let v = m.score(c, u);
            if v > best_v {
                best_v = v;
                best = i;
            }
        }
        best as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Vec<f32> {
        let mut x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 613) as f32 * 0.05 - 15.0).collect();
        x[3] = f32::NEG_INFINITY;
        x[10] = f32::NAN;
        x[999] = f32::INFINITY;
        x
    }

    #[test]
    fn row_helpers_match_scalar_on_every_isa() {
        let x = row();
        for isa in Isa::supported() {
            let m = max_finite_on(isa, &x);
            assert_eq!(m, portable::max_finite(&x), "{isa}");
            let mut out = vec![0f32; x.len()];
            let s = exp_shifted_on(isa, &x, m, &mut out);
            assert_eq!((out[3], out[10], out[999]), (0.0, 0.0, 0.0), "{isa}");
            let want: f64 = x.iter().filter(|v| v.is_finite()).map(|&v| ((v - m) as f64).exp()).sum();
            assert!((s as f64 - want).abs() < 1e-5 * want, "{isa}");
            for (o, &v) in out.iter().zip(&x) {
                if v.is_finite() {
                    let w = ((v - m) as f64).exp();
                    assert!((*o as f64 - w).abs() <= 3e-7 * w + 1e-30, "{isa}: exp({}) = {o}, want {w}", v - m);
                }
            }
            assert!((exp_shifted_sum_on(isa, &x, m) as f64 - want).abs() < 1e-5 * want, "{isa}");
            // Tails shorter than a register, and empty rows.
            for n in [0, 1, 5, 17, 33] {
                assert_eq!(max_finite_on(isa, &x[..n]), portable::max_finite(&x[..n]), "{isa} n={n}");
            }
        }
    }

    #[test]
    fn log_mix_is_bit_identical_on_every_isa() {
        let c = row();
        let mut u: Vec<f32> = c.iter().rev().map(|v| v * 0.7 + 1.0).collect();
        u[500] = f32::NEG_INFINITY;
        let m = LogMix { lse_c: 12.5, lse_u: 9.25, gamma: 3.0, floor: -1.0e9 };
        let mut want = vec![0f32; c.len()];
        portable::mix_log_probs(&c, &u, &m, &mut want);
        let want_arg = portable::argmax_mix_log_probs(&c, &u, &m);
        for isa in Isa::supported() {
            let mut got = vec![0f32; c.len()];
            mix_log_probs_on(isa, &c, &u, &m, &mut got);
            assert_eq!(got, want, "{isa}");
            assert_eq!(argmax_mix_log_probs_on(isa, &c, &u, &m), want_arg, "{isa}");
            for n in [0, 1, 7, 9, 31] {
                let a = argmax_mix_log_probs_on(isa, &c[..n], &u[..n], &m);
                assert_eq!(a, portable::argmax_mix_log_probs(&c[..n], &u[..n], &m), "{isa} n={n}");
            }
        }
    }
}
