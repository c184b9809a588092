//! Classifier-free guidance: mixing the cond and uncond predictions of one step. Pure f32 math.
//!
//! With `c`, `u` the logits of the cond and uncond rows and γ the guidance scale:
//! - [`GuidanceMode::Log`] (Sanchez et al. 2023, HF's `UnbatchedClassifierFreeGuidanceLogitsProcessor`):
//!   `s = log_softmax(u) + γ·(log_softmax(c) − log_softmax(u))`, sampled as `softmax(s / T)`.
//! - [`GuidanceMode::Prob`] (the paper's "modified CFG"): `p = softmax(u) + γ·(softmax(c) − softmax(u))`,
//!   clamped at 0 and renormalised. The paper's code fed `p` back as if it were logits, which is
//!   only right for greedy decoding; here `p` is a distribution and is sampled as one.
//!
//! γ = 1 is unguided decoding (the engine then never computes the uncond row); γ < 1 moves
//! towards the uncond prediction. Results are always finite: log-probabilities of impossible
//! tokens (−∞) are replaced by a large finite floor before mixing, so `−∞ + ∞` never arises.

use crate::sampling::{Rng, SamplingParams, sample_logits, sample_probs};
use crate::simd::{self, LogMix};

/// How the two predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuidanceMode {
    #[default]
    Log,
    Prob,
}

impl std::str::FromStr for GuidanceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "log" => Ok(Self::Log),
            "prob" => Ok(Self::Prob),
            _ => Err(format!("unknown guidance mode {s:?} (log, prob)")),
        }
    }
}

impl GuidanceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Prob => "prob",
        }
    }
}

/// Log-probability used for tokens with zero probability: finite, far below any real one, and
/// small enough in magnitude that γ·floor cannot overflow f32 for any sane γ.
const LOG_FLOOR: f32 = -1.0e9;

/// `log_softmax(x)` into `out`, numerically stable; −∞ (or NaN) inputs give `LOG_FLOOR`.
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    let l = RowLse::of(x);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = l.log_prob(v);
    }
}

/// `softmax(x)` into `out`; non-finite inputs get probability 0.
pub fn softmax(x: &[f32], out: &mut [f32]) {
    let max = simd::max_finite(x);
    if !max.is_finite() {
        out.fill(1.0 / x.len() as f32);
        return;
    }
    let inv = 1.0 / simd::exp_shifted(x, max, out);
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `log` mode scores: `lsm(u) + γ·(lsm(c) − lsm(u))`, computed as `γ·lsm(c) + (1−γ)·lsm(u)`
/// (identical in exact arithmetic; at γ = 1 it returns `log_softmax(c)` bit for bit).
///
/// One pass over the vocabulary after the two log-sum-exps: `γ·(c − lse_c) + (1−γ)·(u − lse_u)`,
/// with impossible tokens at `LOG_FLOOR`.
pub fn mix_log(cond: &[f32], uncond: &[f32], gamma: f32, out: &mut [f32]) {
    assert_eq!(cond.len(), uncond.len());
    let (lc, lu) = (RowLse::of(cond), RowLse::of(uncond));
    if let Some(mix) = lc.mix_with(&lu, gamma) {
        return simd::mix_log_probs(cond, uncond, &mix, out);
    }
    let rest = 1.0 - gamma;
    for ((o, &c), &u) in out.iter_mut().zip(cond).zip(uncond) {
        *o = gamma * lc.log_prob(c) + rest * lu.log_prob(u);
    }
}

/// The log-sum-exp of a row of logits, to turn logits into log-probabilities one at a time.
struct RowLse {
    /// `None` when the row has no finite logit (then every token is equally likely).
    lse: Option<f32>,
    uniform: f32,
}

impl RowLse {
    fn of(x: &[f32]) -> Self {
        let max = simd::max_finite(x);
        let lse = max.is_finite().then(|| max + simd::exp_shifted_sum(x, max).ln());
        Self { lse, uniform: -(x.len() as f32).ln() }
    }

    /// The vectorised mix's constants, when both rows have a finite logit (the usual case; a
    /// row without one makes every token equally likely, which the scalar path handles).
    fn mix_with(&self, other: &RowLse, gamma: f32) -> Option<LogMix> {
        Some(LogMix { lse_c: self.lse?, lse_u: other.lse?, gamma, floor: LOG_FLOOR })
    }

    #[inline(always)]
    fn log_prob(&self, x: f32) -> f32 {
        match self.lse {
            Some(l) if x.is_finite() => (x - l).max(LOG_FLOOR),
            Some(_) => LOG_FLOOR,
            None => self.uniform,
        }
    }
}

/// `argmax` of [`mix_log`]'s scores without materialising them (the greedy hot path).
pub fn argmax_log_mix(cond: &[f32], uncond: &[f32], gamma: f32) -> u32 {
    let (lc, lu) = (RowLse::of(cond), RowLse::of(uncond));
    if let Some(mix) = lc.mix_with(&lu, gamma) {
        return simd::argmax_mix_log_probs(cond, uncond, &mix);
    }
    let rest = 1.0 - gamma;
    let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
    for (i, (&c, &u)) in cond.iter().zip(uncond).enumerate() {
        let v = gamma * lc.log_prob(c) + rest * lu.log_prob(u);
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// `prob` mode distribution: `softmax(u) + γ·(softmax(c) − softmax(u))`, clamped at 0 and
/// renormalised. The sum before clamping is 1, so after clamping it is ≥ 1: never degenerate.
pub fn mix_prob(cond: &[f32], uncond: &[f32], gamma: f32, out: &mut [f32]) {
    assert_eq!(cond.len(), uncond.len());
    let mut pu = vec![0f32; uncond.len()];
    softmax(cond, out);
    softmax(uncond, &mut pu);
    let rest = 1.0 - gamma;
    let mut sum = 0.0;
    for (o, &u) in out.iter_mut().zip(&pu) {
        *o = (gamma * *o + rest * u).max(0.0);
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Guidance settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    pub gamma: f32,
    pub mode: GuidanceMode,
}

impl Guidance {
    /// True when guidance changes nothing (γ = 1): no uncond row is needed.
    pub fn is_identity(&self) -> bool {
        self.gamma == 1.0
    }
}

/// Picks the next token of a guided pair.
pub fn sample_guided(
    cond: &[f32],
    uncond: &[f32],
    g: Guidance,
    params: &SamplingParams,
    rng: &mut Rng,
    scratch: &mut Vec<f32>,
) -> u32 {
    if params.is_greedy() && g.mode == GuidanceMode::Log {
        return argmax_log_mix(cond, uncond, g.gamma);
    }
    scratch.resize(cond.len(), 0.0);
    match g.mode {
        GuidanceMode::Log => {
            mix_log(cond, uncond, g.gamma, scratch);
            sample_logits(scratch, params, rng)
        }
        GuidanceMode::Prob => {
            mix_prob(cond, uncond, g.gamma, scratch);
            sample_probs(scratch, params, rng)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{Rng, argmax};
    use proptest::prelude::*;

    fn logits_strategy() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (2usize..64).prop_flat_map(|n| {
            let v = prop::collection::vec(-30f32..30.0, n);
            (v.clone(), v)
        })
    }

    /// HF transformers' formula, evaluated in f64 as the reference.
    fn hf_reference(c: &[f32], u: &[f32], g: f64) -> Vec<f64> {
        let lsm = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
            let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            x.iter().map(|&v| v as f64 - m - s.ln()).collect()
        };
        let (lc, lu) = (lsm(c), lsm(u));
        lc.iter().zip(&lu).map(|(c, u)| g * (c - u) + u).collect()
    }

    proptest! {
        #[test]
        fn gamma_one_is_the_cond_prediction((c, u) in logits_strategy()) {
            let mut s = vec![0f32; c.len()];
            mix_log(&c, &u, 1.0, &mut s);
            let mut lc = vec![0f32; c.len()];
            log_softmax(&c, &mut lc);
            prop_assert_eq!(&s, &lc);
            let mut p = vec![0f32; c.len()];
            mix_prob(&c, &u, 1.0, &mut p);
            let mut pc = vec![0f32; c.len()];
            softmax(&c, &mut pc);
            for (a, b) in p.iter().zip(&pc) { prop_assert!((a - b).abs() < 1e-6); }
        }

        #[test]
        fn log_mode_equals_hf_formula((c, u) in logits_strategy(), g in 0f32..8.0) {
            let mut s = vec![0f32; c.len()];
            mix_log(&c, &u, g, &mut s);
            for (a, b) in s.iter().zip(hf_reference(&c, &u, g as f64)) {
                prop_assert!((*a as f64 - b).abs() <= 1e-3 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }

        #[test]
        fn prob_mode_is_a_distribution((c, u) in logits_strategy(), g in 0f32..10.0) {
            let mut p = vec![0f32; c.len()];
            mix_prob(&c, &u, g, &mut p);
            prop_assert!(p.iter().all(|&x| x >= 0.0 && x.is_finite()));
            let s: f32 = p.iter().sum();
            prop_assert!((s - 1.0).abs() < 1e-4, "sum {}", s);
        }

        #[test]
        fn gamma_below_one_swaps_roles((c, u) in logits_strategy(), g in 0f32..1.0) {
            // γ·c + (1−γ)·u with γ < 1 equals the same mix seen from uncond with γ' = 1−γ.
            let (mut a, mut b) = (vec![0f32; c.len()], vec![0f32; c.len()]);
            mix_log(&c, &u, g, &mut a);
            mix_log(&u, &c, 1.0 - g, &mut b);
            for (x, y) in a.iter().zip(&b) { prop_assert!((x - y).abs() <= 1e-3 * (1.0 + x.abs())); }
            // γ = 0 is exactly the uncond prediction.
            mix_log(&c, &u, 0.0, &mut a);
            log_softmax(&u, &mut b);
            prop_assert_eq!(&a, &b);
        }

        #[test]
        fn extreme_logits_never_give_nan(
            n in 2usize..40, seed in any::<u64>(), g in 0f32..20.0
        ) {
            let mut rng = Rng::new(seed);
            let pick = |r: &mut Rng| match r.next_u64() % 5 {
                0 => f32::NEG_INFINITY,
                1 => 1e4,
                2 => -1e4,
                3 => 0.0,
                _ => r.next_f32() * 100.0 - 50.0,
            };
            let c: Vec<f32> = (0..n).map(|_| pick(&mut rng)).collect();
            let u: Vec<f32> = (0..n).map(|_| pick(&mut rng)).collect();
            let mut s = vec![0f32; n];
            mix_log(&c, &u, g, &mut s);
            prop_assert!(s.iter().all(|x| x.is_finite()), "{:?}", s);
            mix_prob(&c, &u, g, &mut s);
            prop_assert!(s.iter().all(|x| x.is_finite() && *x >= 0.0), "{:?}", s);
            let mut scratch = Vec::new();
            for mode in [GuidanceMode::Log, GuidanceMode::Prob] {
                let params = SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.9, seed: None };
                let t = sample_guided(&c, &u, Guidance { gamma: g, mode }, &params, &mut rng, &mut scratch);
                prop_assert!((t as usize) < n);
            }
        }
    }

    proptest! {
        #[test]
        fn fused_greedy_equals_mix_then_argmax((c, u) in logits_strategy(), g in 0f32..8.0) {
            let mut s = vec![0f32; c.len()];
            mix_log(&c, &u, g, &mut s);
            prop_assert_eq!(argmax_log_mix(&c, &u, g), argmax(&s));
        }
    }

    /// The paper's artefact: a token rare under both rows but far rarer under uncond gets a
    /// huge log-mode score (γ·Δ of log-probabilities) and wins; in prob mode its tiny
    /// probabilities barely move and it does not.
    #[test]
    fn log_mode_artefact_prob_mode_is_immune() {
        // Token 0: the sensible answer (likely under both). Token 1: an alternative.
        // Token 2: rare under cond (p ≈ 3e-3), vanishingly rare under uncond (p ≈ 1e-13).
        let cond = [5.0f32, 4.0, 0.0];
        let uncond = [5.0f32, 4.5, -24.0];
        let g = 3.0;
        let mut s = [0f32; 3];
        mix_log(&cond, &uncond, g, &mut s);
        assert_eq!(argmax(&s), 2, "log mode should pick the rare token: {s:?}");
        let mut p = [0f32; 3];
        mix_prob(&cond, &uncond, g, &mut p);
        assert_eq!(argmax(&p), 0, "prob mode should keep the sensible token: {p:?}");
        // Unguided, the rare token is rare.
        assert_eq!(argmax(&cond), 0);
    }
}
