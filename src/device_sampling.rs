//! Guidance mixing and token choice on candle tensors, on whatever device holds the logits: the
//! candle backend's counterpart of [`crate::guidance`] and [`crate::sampling`]. Every group of a
//! step is handled by a few batched ops, and only the chosen token ids come back to the host
//! (one small copy per step, not `rows × vocab` logits).
//!
//! The math is the host's, written for whole batches:
//! - **log** mode: `s = γ·log_softmax(c) + (1−γ)·log_softmax(u)` with the same finite floor for
//!   impossible tokens; unguided rows are `γ = 1` with no uncond row (`s = log_softmax(c)`).
//! - **prob** mode: `p = max(γ·softmax(c) + (1−γ)·softmax(u), 0)`, renormalised.
//! - greedy: the argmax of `s` (or `p`), exactly as on the host.
//! - sampling: temperature as on the host (`softmax(s/T)`, or `p^(1/T)`), drawn with the
//!   Gumbel-max trick: `argmax(log w + g)` with `g = −ln(−ln U)` is an exact draw from `w`,
//!   needs no cumulative sum, and reads the uniforms `U` from each request's own [`Rng`], so a
//!   seed reproduces a generation on this path (the draws differ from the host path's, the
//!   distribution does not).
//! - top-k / top-p without sorting the vocabulary: the kept set `N` is
//!   `{j : #{w > w_j} < k and mass{w > w_j} < top_p}` (what the host's sorted prefix keeps, up
//!   to exact ties), and with fixed noise the sample is the argmax of `log w + g` over `N`. A
//!   few rounds find it: take the argmax over the candidates; if it is in `N` it is the answer
//!   (the argmax of a superset that lies in `N` is the argmax over `N`); if not, no token as
//!   unlikely as it is can be in `N`, so the candidates shrink to the more likely ones. The
//!   rounds run on the device; only in the rare case that they do not settle every row does a
//!   second small copy happen.

use crate::guidance::{Guidance, GuidanceMode};
use crate::sampling::{Rng, SamplingParams};
use candle_core::{D, DType, Device, Result, Tensor};

/// The host's log-probability floor for impossible tokens (see [`crate::guidance`]).
const LOG_FLOOR: f64 = -1.0e9;

/// Rejection rounds run before the token ids are copied back.
const ROUNDS: usize = 3;

/// One token to choose: a group's rows in the logits and how to mix and sample them.
pub struct Choice<'a> {
    /// Row of the cond (or only) prediction.
    pub cond: usize,
    /// Row of the uncond prediction, for a guided pair.
    pub uncond: Option<usize>,
    pub guidance: Option<Guidance>,
    pub params: &'a SamplingParams,
    pub rng: &'a mut Rng,
}

impl Choice<'_> {
    fn mode(&self) -> GuidanceMode {
        match (self.uncond, self.guidance) {
            (Some(_), Some(g)) => g.mode,
            _ => GuidanceMode::Log,
        }
    }
    /// γ, and the uncond row (the cond row itself when unguided, weighted 0).
    fn mix(&self) -> (f32, usize) {
        match (self.uncond, self.guidance) {
            (Some(u), Some(g)) => (g.gamma, u),
            _ => (1.0, self.cond),
        }
    }
}

/// Chooses one token per choice from `logits` (`[rows, vocab]` f32, any device).
pub fn choose_tokens(logits: &Tensor, choices: &mut [Choice]) -> Result<Vec<u32>> {
    // Four kinds of rows, each handled by one batched pass: (mode, greedy or sampled).
    let mut sets: [Vec<usize>; 4] = Default::default();
    for (i, c) in choices.iter().enumerate() {
        let prob = c.mode() == GuidanceMode::Prob;
        sets[usize::from(prob) * 2 + usize::from(!c.params.is_greedy())].push(i);
    }
    let mut done: Vec<(Vec<usize>, Tensor)> = Vec::new();
    let mut samplers: Vec<(Vec<usize>, Sampler)> = Vec::new();
    for (kind, set) in sets.into_iter().enumerate() {
        if set.is_empty() {
            continue;
        }
        let mode = if kind >= 2 { GuidanceMode::Prob } else { GuidanceMode::Log };
        let scores = mixed_scores(logits, &set.iter().map(|&i| &choices[i]).collect::<Vec<_>>(), mode)?;
        if kind % 2 == 0 {
            done.push((set, scores.argmax(1)?));
            continue;
        }
        let mut members: Vec<&mut Choice> =
            choices.iter_mut().enumerate().filter(|(i, _)| set.contains(i)).map(|(_, c)| c).collect();
        let mut s = Sampler::new(&scores, mode, &mut members)?;
        match s.filter.is_some() {
            false => done.push((set, s.z.argmax(1)?)),
            true => {
                s.rounds(ROUNDS)?;
                samplers.push((set, s));
            }
        }
    }
    let mut out = vec![0u32; choices.len()];
    loop {
        // One copy: every finished set's tokens, then each sampler's tokens and settled flags.
        let mut parts: Vec<Tensor> = done.iter().map(|(_, t)| t.clone()).collect();
        for (_, s) in &samplers {
            let f = s.filter.as_ref().expect("filtered sampler");
            parts.push(f.token.squeeze(1)?);
            parts.push(f.settled.squeeze(1)?.to_dtype(DType::U32)?);
        }
        if parts.is_empty() {
            return Ok(out);
        }
        let all = Tensor::cat(&parts, 0)?.to_vec1::<u32>()?;
        let mut at = 0;
        for (set, _) in done.drain(..) {
            for i in set {
                out[i] = all[at];
                at += 1;
            }
        }
        let mut unsettled = Vec::new();
        for (set, s) in samplers {
            let n = set.len();
            let (tokens, flags) = (&all[at..at + n], &all[at + n..at + 2 * n]);
            at += 2 * n;
            for (&i, &t) in set.iter().zip(tokens) {
                out[i] = t;
            }
            if flags.contains(&0) {
                unsettled.push((set, s));
            }
        }
        // Rare: some row needs more rounds (a flat distribution under a tight top-k/top-p).
        samplers = unsettled;
        for (_, s) in &mut samplers {
            s.rounds(ROUNDS)?;
        }
    }
}

/// The mixed scores of `members` (`[n, vocab]`): log-mode scores or prob-mode probabilities.
pub fn mixed_scores(logits: &Tensor, members: &[&Choice], mode: GuidanceMode) -> Result<Tensor> {
    let device = logits.device();
    let n = members.len();
    let (gammas, uncond): (Vec<f32>, Vec<u32>) = members.iter().map(|c| (c.mix().0, c.mix().1 as u32)).unzip();
    let cond: Vec<u32> = members.iter().map(|c| c.cond as u32).collect();
    let c = logits.index_select(&Tensor::from_vec(cond, n, device)?, 0)?;
    let u = logits.index_select(&Tensor::from_vec(uncond, n, device)?, 0)?;
    let gamma = Tensor::from_vec(gammas, (n, 1), device)?;
    let rest = gamma.affine(-1.0, 1.0)?;
    match mode {
        GuidanceMode::Log => {
            let lsm = |x: &Tensor| -> Result<Tensor> { candle_nn::ops::log_softmax(x, D::Minus1)?.maximum(LOG_FLOOR) };
            lsm(&c)?.broadcast_mul(&gamma)? + lsm(&u)?.broadcast_mul(&rest)?
        }
        GuidanceMode::Prob => {
            let pc = candle_nn::ops::softmax_last_dim(&c)?;
            let pu = candle_nn::ops::softmax_last_dim(&u)?;
            let p = (pc.broadcast_mul(&gamma)? + pu.broadcast_mul(&rest)?)?.relu()?;
            p.broadcast_div(&p.sum_keepdim(1)?)
        }
    }
}

/// Sampling state of one batch of rows.
struct Sampler {
    /// `log w + g`: its argmax over a set of tokens is a draw from `w` restricted to the set.
    z: Tensor,
    filter: Option<Filter>,
}

/// The top-k/top-p rounds' state.
struct Filter {
    /// `w`, normalised.
    w: Tensor,
    /// Per row: `k` (∞ when off) and `top_p` (∞ when off).
    keep_k: Tensor,
    keep_p: Tensor,
    neg_inf: Tensor,
    /// Candidates are the tokens with `w > pivot`.
    pivot: Tensor,
    token: Tensor,
    settled: Tensor,
}

impl Sampler {
    fn new(scores: &Tensor, mode: GuidanceMode, members: &mut [&mut Choice]) -> Result<Self> {
        let device = scores.device().clone();
        let n = members.len();
        let vocab = scores.dim(1)?;
        let inv_t = Tensor::from_vec(members.iter().map(|c| 1.0 / c.params.temperature).collect(), (n, 1), &device)?;
        // log w up to a constant per row, ≤ 0: the temperature applied as on the host.
        let log_w = match mode {
            GuidanceMode::Log => scores.broadcast_sub(&scores.max_keepdim(1)?)?.broadcast_mul(&inv_t)?,
            GuidanceMode::Prob => scores.log()?.broadcast_sub(&scores.max_keepdim(1)?.log()?)?.broadcast_mul(&inv_t)?,
        };
        let z = (&log_w + gumbel_noise(members, vocab, &device)?)?;
        if !members.iter().any(|c| c.params.top_k > 0 || c.params.top_p < 1.0) {
            return Ok(Self { z, filter: None });
        }
        let (k, p): (Vec<f32>, Vec<f32>) = members
            .iter()
            .map(|c| {
                let k = if c.params.top_k == 0 { f32::INFINITY } else { c.params.top_k as f32 };
                let p = if c.params.top_p >= 1.0 { f32::INFINITY } else { c.params.top_p };
                (k, p)
            })
            .unzip();
        let filter = Filter {
            w: candle_nn::ops::softmax_last_dim(&log_w)?,
            keep_k: Tensor::from_vec(k, (n, 1), &device)?,
            keep_p: Tensor::from_vec(p, (n, 1), &device)?,
            neg_inf: Tensor::full(f32::NEG_INFINITY, (n, vocab), &device)?,
            pivot: Tensor::full(-1f32, (n, 1), &device)?,
            token: Tensor::zeros((n, 1), DType::U32, &device)?,
            settled: Tensor::zeros((n, 1), DType::U8, &device)?,
        };
        Ok(Self { z, filter: Some(filter) })
    }

    /// `n` rejection rounds for the rows not settled yet.
    fn rounds(&mut self, n: usize) -> Result<()> {
        let f = self.filter.as_mut().expect("filtered sampler");
        for _ in 0..n {
            let cand = f.w.broadcast_gt(&f.pivot)?.where_cond(&self.z, &f.neg_inf)?.argmax_keepdim(1)?;
            let w_cand = f.w.gather(&cand, 1)?;
            let above = f.w.broadcast_gt(&w_cand)?.to_dtype(DType::F32)?;
            let count = above.sum_keepdim(1)?;
            let mass = (&above * &f.w)?.sum_keepdim(1)?;
            let ok = count.lt(&f.keep_k)?.minimum(&mass.lt(&f.keep_p)?)?;
            // Rows settled earlier keep their token; the others take the candidate if it is in
            // the kept set, else narrow to the tokens more likely than it.
            let take = ok.minimum(&f.settled.affine(-1.0, 1.0)?)?;
            f.token = take.where_cond(&cand, &f.token)?;
            f.settled = f.settled.maximum(&ok)?;
            f.pivot = ok.where_cond(&f.pivot, &w_cand)?;
        }
        Ok(())
    }
}

/// Gumbel noise `[n, vocab]` from each row's generator: `−ln(−ln U)`, `U` in (0, 1).
fn gumbel_noise(members: &mut [&mut Choice], vocab: usize, device: &Device) -> Result<Tensor> {
    let mut u = vec![0f32; members.len() * vocab];
    for (row, c) in u.chunks_exact_mut(vocab).zip(members.iter_mut()) {
        fill_open_unit(c.rng, row);
    }
    Tensor::from_vec(u, (members.len(), vocab), device)?.log()?.neg()?.log()?.neg()
}

/// Uniforms in (0, 1) with 24 random bits each, two per 64-bit draw.
fn fill_open_unit(rng: &mut Rng, out: &mut [f32]) {
    const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
    for pair in out.chunks_mut(2) {
        let x = rng.next_u64();
        pair[0] = ((x >> 40) as f32 + 0.5) * SCALE;
        if let Some(second) = pair.get_mut(1) {
            *second = (((x >> 8) & 0xFF_FFFF) as f32 + 0.5) * SCALE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guidance::{mix_log, mix_prob, sample_guided};
    use crate::sampling::{Rng, sample_logits};
    use proptest::prelude::*;

    fn logits_tensor(rows: &[Vec<f32>]) -> Tensor {
        let v = rows[0].len();
        Tensor::from_vec(rows.concat(), (rows.len(), v), &Device::Cpu).unwrap()
    }

    fn greedy() -> SamplingParams {
        SamplingParams::greedy()
    }

    /// Random logits, some impossible tokens among them.
    fn logits_strategy(rows: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
        (4usize..300).prop_flat_map(move |v| {
            let x = prop_oneof![9 => -20f32..20.0, 1 => Just(f32::NEG_INFINITY)];
            prop::collection::vec(prop::collection::vec(x, v), rows)
        })
    }

    fn guided(gamma: f32, mode: GuidanceMode) -> Option<Guidance> {
        Some(Guidance { gamma, mode })
    }

    proptest! {
        /// The mixed scores are the host's (same formula, same floor), to rounding.
        #[test]
        fn mixing_equals_the_host(rows in logits_strategy(2), gamma in 0f32..6.0) {
            let t = logits_tensor(&rows);
            let p = greedy();
            let mut rng = Rng::new(1);
            for mode in [GuidanceMode::Log, GuidanceMode::Prob] {
                let c = Choice { cond: 0, uncond: Some(1), guidance: guided(gamma, mode), params: &p, rng: &mut rng };
                let dev = mixed_scores(&t, &[&c], mode).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut host = vec![0f32; rows[0].len()];
                match mode {
                    GuidanceMode::Log => mix_log(&rows[0], &rows[1], gamma, &mut host),
                    GuidanceMode::Prob => mix_prob(&rows[0], &rows[1], gamma, &mut host),
                }
                for (a, b) in dev.iter().zip(&host) {
                    prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{:?}: {} vs {}", mode, a, b);
                }
            }
        }

        /// Greedy choices are the host's, for a mix of guided pairs and single rows in one call.
        #[test]
        fn greedy_tokens_equal_the_host(rows in logits_strategy(5), gamma in 0f32..6.0) {
            let t = logits_tensor(&rows);
            let p = greedy();
            let mut rngs: Vec<Rng> = (0..4u64).map(Rng::new).collect();
            let mut it = rngs.iter_mut();
            let mut choices = vec![
                Choice { cond: 0, uncond: Some(1), guidance: guided(gamma, GuidanceMode::Log), params: &p, rng: it.next().unwrap() },
                Choice { cond: 2, uncond: None, guidance: None, params: &p, rng: it.next().unwrap() },
                Choice { cond: 3, uncond: Some(4), guidance: guided(gamma, GuidanceMode::Prob), params: &p, rng: it.next().unwrap() },
                Choice { cond: 4, uncond: Some(0), guidance: guided(gamma, GuidanceMode::Log), params: &p, rng: it.next().unwrap() },
            ];
            let got = choose_tokens(&t, &mut choices).unwrap();
            let mut rng = Rng::new(0);
            let mut scratch = Vec::new();
            let want = [
                sample_guided(&rows[0], &rows[1], guided(gamma, GuidanceMode::Log).unwrap(), &p, &mut rng, &mut scratch),
                sample_logits(&rows[2], &p, &mut rng),
                sample_guided(&rows[3], &rows[4], guided(gamma, GuidanceMode::Prob).unwrap(), &p, &mut rng, &mut scratch),
                sample_guided(&rows[4], &rows[0], guided(gamma, GuidanceMode::Log).unwrap(), &p, &mut rng, &mut scratch),
            ];
            prop_assert_eq!(got, want.to_vec());
        }
    }

    /// What the host keeps and with which probability: the weights after temperature, sorted,
    /// cut by top-k and top-p as `sampling::nucleus` does, renormalised.
    fn host_distribution(scores: &[f32], mode: GuidanceMode, p: &SamplingParams) -> Vec<f64> {
        let w: Vec<f64> = match mode {
            GuidanceMode::Log => {
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                scores.iter().map(|&s| ((s as f64 - m) / p.temperature as f64).exp()).collect()
            }
            GuidanceMode::Prob => scores.iter().map(|&x| (x as f64).powf(1.0 / p.temperature as f64)).collect(),
        };
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        let k = if p.top_k == 0 { w.len() } else { p.top_k };
        let mut kept = vec![0f64; w.len()];
        let mut cum = 0.0;
        for &i in order.iter().take(k) {
            kept[i] = w[i];
            cum += w[i] / total;
            if cum >= p.top_p as f64 {
                break;
            }
        }
        let s: f64 = kept.iter().sum();
        kept.iter().map(|x| x / s).collect()
    }

    /// Sampled tokens follow the host's distribution, top-k and top-p included: never outside
    /// its support, frequencies within 4 standard deviations.
    #[test]
    fn sampling_follows_the_host_distribution() {
        let cond: Vec<f32> = vec![2.0, 1.5, 1.4, 0.3, -0.5, -1.0, -3.0, 0.9];
        let uncond: Vec<f32> = vec![1.0, 1.9, 0.2, 0.1, -0.4, -2.0, -1.0, 0.5];
        let t = logits_tensor(&[cond.clone(), uncond.clone()]);
        let draws = 6000;
        for (mode, temperature, top_k, top_p) in [
            (GuidanceMode::Log, 1.0, 0, 1.0),
            (GuidanceMode::Log, 0.7, 3, 1.0),
            (GuidanceMode::Log, 1.3, 0, 0.8),
            (GuidanceMode::Prob, 1.0, 0, 0.9),
            (GuidanceMode::Prob, 0.5, 4, 0.95),
        ] {
            let p = SamplingParams { temperature, top_k, top_p, seed: None };
            let g = guided(2.0, mode);
            let mut rngs: Vec<Rng> = (0..draws).map(|i| Rng::new(1000 + i as u64)).collect();
            let mut choices: Vec<Choice> =
                rngs.iter_mut().map(|rng| Choice { cond: 0, uncond: Some(1), guidance: g, params: &p, rng }).collect();
            let tokens = choose_tokens(&t, &mut choices).unwrap();
            let mut scores = vec![0f32; cond.len()];
            match mode {
                GuidanceMode::Log => mix_log(&cond, &uncond, 2.0, &mut scores),
                GuidanceMode::Prob => mix_prob(&cond, &uncond, 2.0, &mut scores),
            }
            let want = host_distribution(&scores, mode, &p);
            let mut counts = vec![0usize; cond.len()];
            for t in tokens {
                counts[t as usize] += 1;
            }
            for (i, (&c, &q)) in counts.iter().zip(&want).enumerate() {
                if q == 0.0 {
                    assert_eq!(c, 0, "{mode:?} T={temperature} k={top_k} p={top_p}: token {i} outside the support");
                }
                let sd = (q * (1.0 - q) / draws as f64).sqrt();
                let f = c as f64 / draws as f64;
                assert!(
                    (f - q).abs() <= 4.0 * sd + 1e-9,
                    "{mode:?} T={temperature} k={top_k} p={top_p}: token {i} {f} vs {q}"
                );
            }
        }
    }

    /// A flat distribution under a tight top-k needs more rounds than the first batch: the
    /// extra rounds run and the answer stays inside the top k.
    #[test]
    fn rejection_rounds_continue_until_settled() {
        let v = 2000;
        let row: Vec<f32> = (0..v).map(|i| (i as f32) * 1e-4).collect();
        let t = logits_tensor(&[row]);
        let p = SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, seed: None };
        let mut rngs: Vec<Rng> = (0..64).map(|i| Rng::new(i as u64)).collect();
        let mut choices: Vec<Choice> =
            rngs.iter_mut().map(|rng| Choice { cond: 0, uncond: None, guidance: None, params: &p, rng }).collect();
        for tok in choose_tokens(&t, &mut choices).unwrap() {
            assert!(tok as usize >= v - 2, "token {tok} outside the top 2");
        }
    }

    /// A seed reproduces the draws; different seeds draw differently.
    #[test]
    fn seeds_reproduce_draws() {
        let row: Vec<f32> = (0..500).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let t = logits_tensor(&[row]);
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, seed: None };
        let draw = |seed: u64| -> Vec<u32> {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| {
                    let mut c = [Choice { cond: 0, uncond: None, guidance: None, params: &p, rng: &mut rng }];
                    choose_tokens(&t, &mut c).unwrap()[0]
                })
                .collect()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }
}
