//! The numbers of the benchmark: rates with their counts, Mann–Whitney AUC, Min-K% scores, and
//! the guided next-token log-probabilities perplexity, KL and likelihoods are computed from.

use crate::guidance::{self, GuidanceMode};
use serde::{Deserialize, Serialize};

/// `hits` out of `n`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub hits: usize,
    pub n: usize,
    /// `hits / n`, or `None` when nothing was measured.
    pub rate: Option<f64>,
}

impl Rate {
    pub fn add(&mut self, hit: bool) {
        self.n += 1;
        self.hits += usize::from(hit);
        self.rate = Some(self.hits as f64 / self.n as f64);
    }
}

/// The probability that a member scores above a non-member (ties count half): 1 = perfectly
/// separable, 0.5 = no trace. `None` if either side is empty.
pub fn auc(members: &[f64], non_members: &[f64]) -> Option<f64> {
    if members.is_empty() || non_members.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for &m in members {
        for &n in non_members {
            wins += if m > n {
                1.0
            } else if m == n {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (members.len() * non_members.len()) as f64)
}

/// Min-K% score (Shi et al. 2024): the mean of the lowest `k` fraction of token log-probs (at
/// least one token). Members of the training data have fewer very unlikely tokens.
pub fn min_k_mean(logprobs: &[f32], k: f64) -> f64 {
    if logprobs.is_empty() {
        return f64::NAN;
    }
    let mut v: Vec<f64> = logprobs.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(f64::total_cmp);
    let take = ((v.len() as f64 * k).ceil() as usize).clamp(1, v.len());
    v[..take].iter().sum::<f64>() / take as f64
}

/// Smallest probability used inside logs (the `prob` mode can give a token exactly 0).
const PROB_FLOOR: f32 = 1e-10;

/// How the next-token distribution is formed from a row's logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mixing {
    /// The cond row alone.
    Plain,
    Guided {
        gamma: f32,
        mode: GuidanceMode,
    },
}

/// The next-token log-distribution under `mixing` (`uncond` required when guided and γ ≠ 1).
pub fn log_distribution(cond: &[f32], uncond: Option<&[f32]>, mixing: Mixing, out: &mut Vec<f32>) {
    out.resize(cond.len(), 0.0);
    match (mixing, uncond) {
        (Mixing::Guided { gamma, mode: GuidanceMode::Log }, Some(u)) if gamma != 1.0 => {
            let mut s = vec![0f32; cond.len()];
            guidance::mix_log(cond, u, gamma, &mut s);
            guidance::log_softmax(&s, out);
        }
        (Mixing::Guided { gamma, mode: GuidanceMode::Prob }, Some(u)) if gamma != 1.0 => {
            guidance::mix_prob(cond, u, gamma, out);
            out.iter_mut().for_each(|p| *p = p.max(PROB_FLOOR).ln());
        }
        _ => guidance::log_softmax(cond, out),
    }
}

/// KL(p ‖ q) for log-distributions, with q's probabilities floored (so a token the guided
/// distribution rules out costs a large but finite amount).
pub fn kl(log_p: &[f32], log_q: &[f32]) -> f64 {
    let floor = PROB_FLOOR.ln();
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = f64::from(lp).exp();
            if p == 0.0 { 0.0 } else { p * (f64::from(lp) - f64::from(lq.max(floor))) }
        })
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count() {
        let mut r = Rate::default();
        assert_eq!(r.rate, None);
        r.add(true);
        r.add(false);
        assert_eq!((r.hits, r.n, r.rate), (1, 2, Some(0.5)));
    }

    #[test]
    fn auc_is_mann_whitney() {
        assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(auc(&[1.0, 2.0], &[3.0, 4.0]), Some(0.0));
        assert_eq!(auc(&[1.0], &[1.0]), Some(0.5));
        assert_eq!(auc(&[2.0, 0.0], &[1.0]), Some(0.5));
        assert_eq!(auc(&[], &[1.0]), None);
    }

    #[test]
    fn min_k_takes_the_lowest_tokens() {
        assert_eq!(min_k_mean(&[-1.0, -5.0, -0.5, -3.0], 0.5), -4.0);
        assert_eq!(min_k_mean(&[-1.0, -2.0], 0.1), -2.0, "at least one token");
    }

    #[test]
    fn distributions_are_normalised_and_kl_is_zero_on_itself() {
        let c = [1.0f32, 2.0, 0.5, -1.0];
        let u = [0.0f32, 3.0, 0.5, 1.0];
        for mixing in [
            Mixing::Plain,
            Mixing::Guided { gamma: 3.0, mode: GuidanceMode::Log },
            Mixing::Guided { gamma: 3.0, mode: GuidanceMode::Prob },
            Mixing::Guided { gamma: 1.0, mode: GuidanceMode::Prob },
        ] {
            let mut d = Vec::new();
            log_distribution(&c, Some(&u), mixing, &mut d);
            let total: f64 = d.iter().map(|&x| f64::from(x).exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "{mixing:?}: {total}");
            assert!(kl(&d, &d).abs() < 1e-9);
        }
        let (mut p, mut q) = (Vec::new(), Vec::new());
        log_distribution(&c, None, Mixing::Plain, &mut p);
        log_distribution(&u, None, Mixing::Plain, &mut q);
        assert!(kl(&p, &q) > 0.1);
    }
}
