//! Training objectives: from the log-probabilities of the target tokens to a loss, the gradient
//! of that loss with respect to each log-probability, and the metrics TRL logs.
//!
//! - **SFT**: token-mean negative log-likelihood of the trained tokens.
//! - **ORPO** (TRL's `ORPOTrainer`, SPEC §2): with `ℓ` the *mean* log-probability of an answer's
//!   tokens (EOS included), `log_odds = (ℓw − ℓl) − (log1mexp(ℓw) − log1mexp(ℓl))` and
//!   `L = NLL − β · mean logσ(log_odds)`, where NLL is the token-mean cross-entropy of the chosen
//!   sequences — over prompt and answer by default (TRL's behaviour), or the answer only.
//!
//! All of it in f64: the pieces are O(batch) and precision near `ℓ → 0` matters.

use super::model::Batch;
use super::ops::{log_sigmoid, log1mexp};
use std::collections::BTreeMap;

/// A tokenized sequence and which of its tokens are the completion (the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSeq {
    pub ids: Vec<u32>,
    /// `completion[p]`: token `p` belongs to the completion (is predicted from `..p`).
    pub completion: Vec<bool>,
}

impl TokenSeq {
    /// A prompt followed by a completion.
    pub fn prompt_completion(prompt: &[u32], completion: &[u32]) -> Self {
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(completion);
        let mut mask = vec![false; prompt.len()];
        mask.resize(ids.len(), true);
        Self { ids, completion: mask }
    }

    pub fn completion_len(&self) -> usize {
        self.completion.iter().filter(|&&c| c).count()
    }
}

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    Sft(TokenSeq),
    /// A preference pair: the two sequences share their prompt.
    Pair {
        chosen: TokenSeq,
        rejected: TokenSeq,
    },
}

impl Example {
    pub fn tokens(&self) -> usize {
        match self {
            Self::Sft(s) => s.ids.len(),
            Self::Pair { chosen, rejected } => chosen.ids.len() + rejected.ids.len(),
        }
    }
}

/// Which tokens the ORPO NLL term covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NllOn {
    /// Prompt and answer of the chosen sequence (TRL's default).
    PromptAndCompletion,
    /// The chosen answer only.
    Completion,
}

/// The objective and its settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Objective {
    Sft {
        /// Also train on the prompt tokens (language modelling of the whole sequence).
        train_on_prompt: bool,
    },
    Orpo {
        beta: f64,
        nll_on: NllOn,
    },
}

/// What each target of a batch stands for.
#[derive(Debug, Clone, Copy)]
struct Role {
    seq: usize,
    /// Counted in the NLL term.
    nll: bool,
    /// Counted in its sequence's mean answer log-probability (ORPO).
    answer: bool,
}

/// A batch laid out for the forward, with the bookkeeping to turn its log-probabilities into
/// the loss.
pub struct Planned {
    pub batch: Batch,
    roles: Vec<Role>,
    /// Per sequence: (example index, is the chosen side).
    seqs: Vec<(usize, bool)>,
    examples: usize,
}

/// Metrics of one batch, under TRL's names.
pub type Metrics = BTreeMap<&'static str, f64>;

impl Objective {
    /// Packs `examples` into one batch and decides which log-probabilities it needs.
    pub fn plan(&self, examples: &[&Example]) -> Planned {
        let mut batch = Batch::default();
        let mut roles = Vec::new();
        let mut seqs = Vec::new();
        let mut add = |seq: &TokenSeq, example: usize, chosen: bool, nll: &dyn Fn(bool) -> bool, answer: bool| {
            let span = batch.push_sequence(&seq.ids);
            let id = seqs.len();
            seqs.push((example, chosen));
            for p in 1..seq.ids.len() {
                let c = seq.completion[p];
                let (n, a) = (nll(c), answer && c);
                if n || a {
                    batch.targets.push((span.start + p - 1, seq.ids[p]));
                    roles.push(Role { seq: id, nll: n, answer: a });
                }
            }
        };
        for (i, ex) in examples.iter().enumerate() {
            match (self, ex) {
                (Self::Sft { train_on_prompt }, Example::Sft(s)) => {
                    add(s, i, true, &|c| c || *train_on_prompt, false);
                }
                (Self::Orpo { nll_on, .. }, Example::Pair { chosen, rejected }) => {
                    let nll_prompt = *nll_on == NllOn::PromptAndCompletion;
                    add(chosen, i, true, &|c| c || nll_prompt, true);
                    add(rejected, i, false, &|_| false, true);
                }
                _ => unreachable!("examples are read for their objective"),
            }
        }
        Planned { batch, roles, seqs, examples: examples.len() }
    }

    /// The loss of a planned batch from its targets' log-probabilities, the gradient
    /// coefficient of each target (`∂loss/∂logp`, times `weight`), and the metrics.
    pub fn loss(&self, plan: &Planned, logp: &[f32], weight: f64) -> (f64, Vec<f32>, Metrics) {
        let mut coef = vec![0f32; logp.len()];
        let mut m = Metrics::new();
        // NLL: token mean over the targets it covers.
        let nll_n = plan.roles.iter().filter(|r| r.nll).count().max(1) as f64;
        let nll = -plan.roles.iter().zip(logp).filter(|(r, _)| r.nll).map(|(_, &lp)| lp as f64).sum::<f64>() / nll_n;
        for (c, r) in coef.iter_mut().zip(&plan.roles) {
            if r.nll {
                *c += (-weight / nll_n) as f32;
            }
        }
        let beta = match self {
            Self::Sft { .. } => {
                m.insert("loss", nll);
                return (nll, coef, m);
            }
            Self::Orpo { beta, .. } => *beta,
        };

        // Mean answer log-probability of every sequence.
        let mut sum = vec![0f64; plan.seqs.len()];
        let mut count = vec![0usize; plan.seqs.len()];
        for (r, &lp) in plan.roles.iter().zip(logp) {
            if r.answer {
                sum[r.seq] += lp as f64;
                count[r.seq] += 1;
            }
        }
        let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, &n)| s / n.max(1) as f64).collect();
        let mut chosen = vec![0usize; plan.examples];
        let mut rejected = vec![0usize; plan.examples];
        for (s, &(ex, is_chosen)) in plan.seqs.iter().enumerate() {
            if is_chosen {
                chosen[ex] = s;
            } else {
                rejected[ex] = s;
            }
        }
        let p = plan.examples as f64;
        let mut dmean = vec![0f64; plan.seqs.len()];
        let (mut ratio_sum, mut odds_sum, mut acc, mut lw_sum, mut ll_sum) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for ex in 0..plan.examples {
            let (w, l) = (chosen[ex], rejected[ex]);
            let (z, gw, gl) = odds_ratio(mean[w], mean[l]);
            ratio_sum += log_sigmoid(z);
            odds_sum += z;
            lw_sum += mean[w];
            ll_sum += mean[l];
            acc += f64::from(u8::from(mean[w] > mean[l]));
            // L = … − (β/P) Σ logσ(z):  ∂L/∂ℓw = −(β/P)·gw,  ∂L/∂ℓl = +(β/P)·gl.
            dmean[w] = -beta / p * gw;
            dmean[l] = beta / p * gl;
        }
        for (c, r) in coef.iter_mut().zip(&plan.roles) {
            if r.answer {
                *c += (weight * dmean[r.seq] / count[r.seq] as f64) as f32;
            }
        }
        let loss = nll - beta * ratio_sum / p;
        m.insert("loss", loss);
        m.insert("nll_loss", nll);
        m.insert("log_odds_ratio", ratio_sum / p);
        m.insert("log_odds_chosen", odds_sum / p);
        m.insert("logps/chosen", lw_sum / p);
        m.insert("logps/rejected", ll_sum / p);
        m.insert("rewards/chosen", beta * lw_sum / p);
        m.insert("rewards/rejected", beta * ll_sum / p);
        m.insert("rewards/margins", beta * (lw_sum - ll_sum) / p);
        m.insert("rewards/accuracies", acc / p);
        (loss, coef, m)
    }
}

/// Log-probabilities closer to 0 than this are treated as this: only a probability within
/// 1e-15 of 1 (which f32 logits cannot even express) is affected, and `log1mexp(0) = −∞` would
/// make both sides of a pair infinite.
const LOGP_CEILING: f64 = -1e-15;

/// `log_odds` of a pair and the two derivative factors of `logσ(log_odds)`:
/// `gw = ∂logσ/∂ℓw = σ(−z)/(1 − e^ℓw)` and `gl = −∂logσ/∂ℓl = σ(−z)/(1 − e^ℓl)`.
///
/// Both are written without `σ(−z)` and `1/(1 − e^ℓ)` apart, whose product is finite even when
/// one factor overflows: with `a = 1 − e^ℓw`, `b = 1 − e^ℓl` and `e^z = e^(ℓw−ℓl)·b/a`,
/// `gw = 1/(a + e^(ℓw−ℓl)·b)` and `gl = a/(a·b + e^(ℓw−ℓl)·b²)`.
pub fn odds_ratio(lw: f64, ll: f64) -> (f64, f64, f64) {
    let (lw, ll) = (lw.min(LOGP_CEILING), ll.min(LOGP_CEILING));
    let z = (lw - ll) - (log1mexp(lw) - log1mexp(ll));
    let (a, b) = (-lw.exp_m1(), -ll.exp_m1());
    let e = (lw - ll).exp();
    (z, 1.0 / (a + e * b), a / (a * b + e * b * b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ops::sigmoid;

    #[test]
    fn odds_ratio_derivatives_match_finite_differences() {
        for &(lw, ll) in &[(-0.5, -2.0), (-3.0, -0.2), (-1e-6, -4.0), (-5.0, -1e-7), (-0.7, -0.69)] {
            let f = |lw: f64, ll: f64| log_sigmoid(odds_ratio(lw, ll).0);
            let (z, gw, gl) = odds_ratio(lw, ll);
            let hw = 1e-6 * lw.abs();
            let hl = 1e-6 * ll.abs();
            let dw = (f(lw + hw, ll) - f(lw - hw, ll)) / (2.0 * hw);
            let dl = (f(lw, ll + hl) - f(lw, ll - hl)) / (2.0 * hl);
            assert!((dw - gw).abs() <= 1e-4 * gw.abs().max(1e-3), "({lw},{ll}): ∂w {dw} vs {gw}");
            assert!((dl + gl).abs() <= 1e-4 * gl.abs().max(1e-3), "({lw},{ll}): ∂l {dl} vs {gl}");
            // The closed forms agree with the textbook ones where those are finite.
            let s = sigmoid(-z);
            assert!((gw - s / (1.0 - lw.exp())).abs() <= 1e-9 * gw.abs().max(1.0));
        }
        // ℓ exactly 0 (a certain answer) stays finite.
        let (z, gw, gl) = odds_ratio(0.0, -1.0);
        assert!(z.is_finite() && gw.is_finite() && gl.is_finite());
    }

    fn seq(prompt: &[u32], answer: &[u32]) -> TokenSeq {
        TokenSeq::prompt_completion(prompt, answer)
    }

    #[test]
    fn orpo_plans_the_tokens_trl_uses() {
        let ex = Example::Pair { chosen: seq(&[1, 5, 6], &[7, 2]), rejected: seq(&[1, 5, 6], &[8, 9, 2]) };
        let obj = Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion };
        let plan = obj.plan(&[&ex]);
        // Chosen: every token after the first (prompt + answer); rejected: the answer only.
        assert_eq!(plan.batch.targets, vec![(0, 5), (1, 6), (2, 7), (3, 2), (7, 8), (8, 9), (9, 2)]);
        let only = Objective::Orpo { beta: 0.1, nll_on: NllOn::Completion }.plan(&[&ex]);
        assert_eq!(only.batch.targets, vec![(2, 7), (3, 2), (7, 8), (8, 9), (9, 2)]);
    }

    #[test]
    fn orpo_loss_and_coefficients_agree_with_finite_differences() {
        let exs = [
            Example::Pair { chosen: seq(&[1, 5], &[7, 2]), rejected: seq(&[1, 5], &[8, 9, 2]) },
            Example::Pair { chosen: seq(&[1, 4, 4], &[3]), rejected: seq(&[1, 4, 4], &[6, 2]) },
        ];
        let refs: Vec<&Example> = exs.iter().collect();
        for nll_on in [NllOn::PromptAndCompletion, NllOn::Completion] {
            let obj = Objective::Orpo { beta: 0.1, nll_on };
            let plan = obj.plan(&refs);
            let logp: Vec<f32> = (0..plan.batch.targets.len()).map(|i| -0.3 - 0.4 * (i % 3) as f32).collect();
            let (loss, coef, m) = obj.loss(&plan, &logp, 1.0);
            assert!((m["loss"] - (m["nll_loss"] - 0.1 * m["log_odds_ratio"])).abs() < 1e-12);
            for i in 0..logp.len() {
                let h = 1e-3f32;
                let mut up = logp.clone();
                up[i] += h;
                let mut down = logp.clone();
                down[i] -= h;
                let d = (obj.loss(&plan, &up, 1.0).0 - obj.loss(&plan, &down, 1.0).0) / (2.0 * h as f64);
                assert!((d - coef[i] as f64).abs() < 1e-4, "target {i}: {d} vs {}", coef[i]);
            }
            assert!(loss.is_finite());
        }
    }
}
