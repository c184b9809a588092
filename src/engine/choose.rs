//! Picking a request's next token from its rows' logits, in this order: CFG mixing (a guided
//! pair) → log-probabilities for the client (of the mixed distribution) → `logit_bias` → the
//! constraint's mask → temperature, top-k/p and the draw. The mask applies to the *mixed*
//! distribution, so guidance and structure compose; the token goes to both rows of a pair.

use super::constraint::TokenConstraint;
use super::request::Request;
use crate::guidance::{self, GuidanceMode};
use crate::sampling::{
    self, Rng, TokenBits, TokenLogprobs, allows, bias_probs, bias_scores, mask_probs, mask_scores, sample_logits,
    sample_probs,
};

/// The token picked, and its log-probabilities when the request asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprobs: Option<Box<TokenLogprobs>>,
}

/// Picks the next token and commits it to the constraint. `uncond` is the uncond row's logits
/// for a guided pair. An error when the constraint admits no token or fails: the request must
/// end.
pub fn choose(
    req: &Request,
    constraint: Option<&mut (dyn TokenConstraint + 'static)>,
    rng: &mut Rng,
    cond: &[f32],
    uncond: Option<&[f32]>,
    scratch: &mut Vec<f32>,
) -> Result<Choice, String> {
    let guide = req.guidance.filter(|_| req.is_pair()).zip(uncond);
    let mut constraint = constraint;
    // Copied out (a few KB) so the constraint can take the commit below.
    let allowed: Option<Vec<u32>> = match constraint.as_deref_mut() {
        Some(c) => c.allowed()?.map(<[u32]>::to_vec),
        None => None,
    };
    let untouched = req.logit_bias.is_empty() && req.logprobs.is_none();
    let choice = if allowed.is_none() && untouched {
        // The hot path of unconstrained decoding: nothing to change in the distribution.
        let token = match guide {
            Some((g, u)) => guidance::sample_guided(cond, u, g, &req.sampling, rng, scratch),
            None => sample_logits(cond, &req.sampling, rng),
        };
        Choice { token, logprobs: None }
    } else if let (Some(a), None, true, true) = (&allowed, guide, untouched, req.sampling.is_greedy())
        && let Some(token) = sampling::argmax_allowed(cond, a)
    {
        // The hot path of constrained greedy decoding: one pass over the allowed tokens.
        Choice { token, logprobs: None }
    } else {
        pick_adjusted(req, allowed.as_deref(), rng, cond, guide, scratch)
    };
    if let Some(a) = &allowed
        && !allows(a, choice.token as usize)
    {
        return Err(format!("no token the output grammar allows could be sampled (picked {})", choice.token));
    }
    if let Some(c) = constraint {
        c.commit(choice.token)?;
    }
    Ok(choice)
}

/// The general path: the distribution is materialised, reported, biased and masked.
fn pick_adjusted(
    req: &Request,
    allowed: Option<&TokenBits>,
    rng: &mut Rng,
    cond: &[f32],
    guide: Option<(guidance::Guidance, &[f32])>,
    scratch: &mut Vec<f32>,
) -> Choice {
    scratch.resize(cond.len(), 0.0);
    let probs = match guide {
        Some((g, u)) if g.mode == GuidanceMode::Prob => {
            guidance::mix_prob(cond, u, g.gamma, scratch);
            true
        }
        Some((g, u)) => {
            guidance::mix_log(cond, u, g.gamma, scratch);
            false
        }
        None => {
            scratch.copy_from_slice(cond);
            false
        }
    };
    let reference = req.logprobs.map(|_| scratch.clone());
    let mut token = None;
    if probs {
        bias_probs(scratch, &req.logit_bias);
        if let Some(a) = allowed {
            mask_probs(scratch, a);
        }
        // Clamping can leave every allowed token at probability 0 (γ > 1 pushes them below the
        // uncond row): then the cond row decides among the allowed tokens.
        if scratch.iter().any(|&p| p > 0.0) {
            token = Some(sample_probs(scratch, &req.sampling, rng));
        } else {
            scratch.copy_from_slice(cond);
        }
    }
    let token = token.unwrap_or_else(|| {
        bias_scores(scratch, &req.logit_bias);
        if let Some(a) = allowed {
            mask_scores(scratch, a);
        }
        sample_logits(scratch, &req.sampling, rng)
    });
    let logprobs = match (req.logprobs, reference) {
        (Some(k), Some(r)) if probs => Some(sampling::logprobs_of_probs(&r, token, k)),
        (Some(k), Some(r)) => Some(sampling::logprobs_of_scores(&r, token, k)),
        _ => None,
    };
    Choice { token, logprobs: logprobs.map(Box::new) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guidance::Guidance;
    use crate::sampling::SamplingParams;

    /// Allows a fixed set of tokens, records commits.
    struct Fixed {
        bits: Vec<u32>,
        committed: Vec<u32>,
    }

    impl TokenConstraint for Fixed {
        fn prepare(&mut self) {}
        fn allowed(&mut self) -> Result<Option<&TokenBits>, String> {
            Ok(Some(&self.bits))
        }
        fn commit(&mut self, token: u32) -> Result<(), String> {
            self.committed.push(token);
            Ok(())
        }
        fn is_complete(&self) -> bool {
            false
        }
    }

    fn request(guidance: Option<Guidance>, temperature: f32) -> Request {
        let mut r = Request::new(vec![1], 4);
        if let Some(g) = guidance {
            r = r.guided(vec![1], g);
        }
        r.sampling = SamplingParams { temperature, top_k: 0, top_p: 0.9, seed: Some(5) };
        r
    }

    fn logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32 * 2654435761u32) ^ salt) % 1000) as f32 / 100.0).collect()
    }

    /// Only allowed tokens are ever picked, in every mode; the picked token is committed.
    #[test]
    fn picks_only_allowed_tokens() {
        let (c, u) = (logits(100, 1), logits(100, 99));
        let bits = vec![0, 0, 0b1001_0000, 0]; // tokens 68 and 71
        for g in [
            None,
            Some(Guidance { gamma: 3.0, mode: GuidanceMode::Log }),
            Some(Guidance { gamma: 3.0, mode: GuidanceMode::Prob }),
        ] {
            for t in [0.0, 1.0] {
                let req = request(g, t);
                let mut rng = Rng::new(1);
                let mut fixed = Fixed { bits: bits.clone(), committed: Vec::new() };
                for _ in 0..20 {
                    let ch = choose(&req, Some(&mut fixed), &mut rng, &c, g.map(|_| &u[..]), &mut Vec::new()).unwrap();
                    assert!(ch.token == 68 || ch.token == 71, "{g:?} T={t}: {}", ch.token);
                }
                assert_eq!(fixed.committed.len(), 20);
            }
        }
    }

    /// A guided pair at γ = 1 through the mixing path picks what the unguided row picks, with
    /// and without a mask (the mask applies to the same distribution).
    #[test]
    fn mixed_path_at_gamma_one_equals_unguided() {
        let (c, u) = (logits(64, 3), logits(64, 77));
        let bits = vec![0xF0F0_F0F0u32, 0x0F0F_0F0F];
        for mode in [GuidanceMode::Log, GuidanceMode::Prob] {
            let mut guided = request(Some(Guidance { gamma: 1.0, mode }), 0.8);
            // Force the pair path (γ = 1 normally skips the uncond row altogether).
            guided.guidance = Some(Guidance { gamma: 1.0 + f32::EPSILON, mode });
            let plain = request(None, 0.8);
            let (mut r1, mut r2) = (Rng::new(9), Rng::new(9));
            for _ in 0..50 {
                let mut f1 = Fixed { bits: bits.clone(), committed: Vec::new() };
                let mut f2 = Fixed { bits: bits.clone(), committed: Vec::new() };
                let a = choose(&guided, Some(&mut f1), &mut r1, &c, Some(&u), &mut Vec::new()).unwrap();
                let b = choose(&plain, Some(&mut f2), &mut r2, &c, None, &mut Vec::new()).unwrap();
                assert_eq!(a.token, b.token, "{mode:?}");
            }
        }
    }

    #[test]
    fn logprobs_report_the_mixed_distribution_before_the_mask() {
        let (c, u) = (logits(32, 5), logits(32, 6));
        let g = Guidance { gamma: 2.0, mode: GuidanceMode::Log };
        let mut req = request(Some(g), 0.0);
        req.logprobs = Some(3);
        let mut fixed = Fixed { bits: vec![1 << 7], committed: Vec::new() };
        let ch = choose(&req, Some(&mut fixed), &mut Rng::new(0), &c, Some(&u), &mut Vec::new()).unwrap();
        assert_eq!(ch.token, 7);
        let mut mixed = vec![0f32; 32];
        guidance::mix_log(&c, &u, 2.0, &mut mixed);
        let want = sampling::logprobs_of_scores(&mixed, 7, 3);
        assert_eq!(*ch.logprobs.unwrap(), want);
    }

    #[test]
    fn logit_bias_moves_the_choice() {
        let c = logits(16, 1);
        let mut req = request(None, 0.0);
        let best = sampling::argmax(&c);
        let other = (best + 1) % 16;
        req.logit_bias = vec![(other, 100.0)];
        let ch = choose(&req, None, &mut Rng::new(0), &c, None, &mut Vec::new()).unwrap();
        assert_eq!(ch.token, other);
        req.logit_bias = vec![(best, -100.0)];
        assert_ne!(choose(&req, None, &mut Rng::new(0), &c, None, &mut Vec::new()).unwrap().token, best);
    }
}
