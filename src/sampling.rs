//! Choosing the next token, and stopping. Pure functions over f32 slices; no model, no I/O.
//!
//! Two entry points share one pipeline (temperature → top-k → top-p → draw):
//! [`sample_logits`] for scores (unguided logits, or `log`-mode guidance scores), and
//! [`sample_probs`] for an already-normalised distribution (`prob`-mode guidance), where
//! temperature is applied as `p^(1/T)` and renormalised.

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Seed for reproducible sampling; `None` draws a fresh one.
    pub seed: Option<u64>,
}

/// Temperatures below this sample greedily: the distribution is the argmax for any logits
/// that differ by more than ~1e-3, and `1/T` stays far from overflowing f32.
pub const MIN_TEMPERATURE: f32 = 1e-4;

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }
    /// Greedy: temperature 0 (or below [`MIN_TEMPERATURE`], where `1/T` would overflow the
    /// scaled scores and sampling would degenerate), or top-k 1.
    pub fn is_greedy(&self) -> bool {
        // Written so that a NaN temperature also counts as greedy.
        let sampling = self.temperature >= MIN_TEMPERATURE;
        !sampling || self.top_k == 1
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and identical on every platform, so a
/// seed reproduces a generation anywhere.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    /// A generator seeded from the clock and a process counter.
    pub fn from_entropy() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Self::new(t ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn for_params(p: &SamplingParams) -> Self {
        p.seed.map_or_else(Self::from_entropy, Self::new)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Index of the largest finite value (first one on ties); 0 if none is finite.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in xs.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Samples from scores: `softmax(scores / T)`, then top-k / top-p.
pub fn sample_logits(scores: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.is_greedy() {
        return argmax(scores);
    }
    let inv_t = 1.0 / p.temperature;
    let max = crate::simd::max_finite(scores);
    if !max.is_finite() {
        return argmax(scores);
    }
    let mut weights = vec![0f32; scores.len()];
    if inv_t == 1.0 {
        crate::simd::exp_shifted(scores, max, &mut weights);
    } else {
        // Shift before scaling: `(s − max)/T ≤ 0` cannot overflow, whatever T and the logits.
        let scaled: Vec<f32> = scores.iter().map(|&s| (s - max) * inv_t).collect();
        crate::simd::exp_shifted(&scaled, 0.0, &mut weights);
    }
    draw(weights, p, rng)
}

/// Samples from a distribution (non-negative, any total): `p^(1/T)` renormalised, then
/// top-k / top-p. Greedy is the argmax of `p`.
pub fn sample_probs(probs: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.is_greedy() {
        return argmax(probs);
    }
    let inv_t = 1.0 / p.temperature;
    let weights: Vec<f32> = if (inv_t - 1.0).abs() < f32::EPSILON {
        probs.iter().map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 }).collect()
    } else {
        // Raise in log space relative to the max so tiny probabilities do not underflow early.
        let max = probs.iter().copied().filter(|v| v.is_finite()).fold(0f32, f32::max);
        if max <= 0.0 {
            return argmax(probs);
        }
        let lmax = max.ln();
        probs.iter().map(|&x| if x.is_finite() && x > 0.0 { ((x.ln() - lmax) * inv_t).exp() } else { 0.0 }).collect()
    };
    draw(weights, p, rng)
}

/// Applies top-k and top-p to unnormalised weights and draws one index.
fn draw(weights: Vec<f32>, p: &SamplingParams, rng: &mut Rng) -> u32 {
    let total: f32 = weights.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return argmax(&weights);
    }
    let top_k = if p.top_k == 0 { weights.len() } else { p.top_k.min(weights.len()) };
    let top_p = p.top_p.clamp(0.0, 1.0);
    if top_k == weights.len() && top_p >= 1.0 {
        return draw_from(weights.iter().copied().enumerate(), total, rng, weights.len());
    }
    let kept = nucleus(&weights, total, top_k, top_p);
    let kept_total: f32 = kept.iter().map(|&(_, w)| w).sum();
    let fallback = kept.first().map_or(0, |&(i, _)| i);
    draw_from(kept.iter().copied(), kept_total, rng, fallback)
}

/// The top tokens by weight, descending, cut to `top_k` and to cumulative mass `top_p`.
/// Sorts only a growing prefix (64, 256, …) instead of the whole vocabulary.
fn nucleus(weights: &[f32], total: f32, top_k: usize, top_p: f32) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = weights.iter().copied().enumerate().filter(|&(_, w)| w > 0.0).collect();
    let by_weight = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut n = 64.min(idx.len());
    loop {
        let take = n.min(top_k).min(idx.len());
        if take < idx.len() {
            idx.select_nth_unstable_by(take, by_weight);
        }
        let mut head: Vec<(usize, f32)> = idx[..take].to_vec();
        head.sort_unstable_by(by_weight);
        let mut cum = 0.0;
        for (j, &(_, w)) in head.iter().enumerate() {
            cum += w / total;
            if cum >= top_p {
                head.truncate(j + 1);
                return head;
            }
        }
        if take == top_k.min(idx.len()) {
            return head;
        }
        n *= 4;
    }
}

fn draw_from(items: impl Iterator<Item = (usize, f32)>, total: f32, rng: &mut Rng, fallback: usize) -> u32 {
    let target = rng.next_f32() * total;
    let mut acc = 0.0;
    let mut last = fallback;
    for (i, w) in items {
        if w <= 0.0 {
            continue;
        }
        acc += w;
        last = i;
        if acc > target {
            return i as u32;
        }
    }
    last as u32
}

/// A set of tokens as a bitset over the vocabulary: bit `i % 32` of word `i / 32` is set when
/// token `i` is in the set (toktrie's layout, so grammar masks need no conversion).
pub type TokenBits = [u32];

/// True when `bits` contains token `i`.
#[inline]
pub fn allows(bits: &TokenBits, i: usize) -> bool {
    bits.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1)
}

/// A sampled token's log-probability and the most likely alternatives (`top`, descending).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `softmax(scores)` (scores: logits, or `log`-mode guidance scores).
pub fn logprobs_of_scores(scores: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = crate::simd::max_finite(scores);
    let lse = if max.is_finite() { max + crate::simd::exp_shifted_sum(scores, max).ln() } else { 0.0 };
    let lp = |x: f32| if x.is_finite() && max.is_finite() { x - lse } else { f32::NEG_INFINITY };
    logprobs_with(scores, token, top, lp)
}

/// Log-probabilities of a distribution (non-negative, any total; `prob`-mode guidance).
pub fn logprobs_of_probs(probs: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let total: f32 = probs.iter().filter(|p| p.is_finite() && **p > 0.0).sum();
    let ln_total = total.ln();
    let lp = |p: f32| if p.is_finite() && p > 0.0 { p.ln() - ln_total } else { f32::NEG_INFINITY };
    logprobs_with(probs, token, top, lp)
}

/// `lp` maps an entry of `values` to its log-probability (monotonic, so ranking by value ranks
/// by probability).
fn logprobs_with(values: &[f32], token: u32, top: usize, lp: impl Fn(f32) -> f32) -> TokenLogprobs {
    let logprob = values.get(token as usize).map_or(f32::NEG_INFINITY, |&v| lp(v));
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        let by_value = |a: &(usize, f32), b: &(usize, f32)| key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0));
        let mut idx: Vec<(usize, f32)> = values.iter().copied().enumerate().collect();
        let k = top.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k, by_value);
        }
        idx.truncate(k);
        idx.sort_unstable_by(by_value);
        best = idx.into_iter().map(|(i, v)| (i as u32, lp(v))).collect();
    }
    TokenLogprobs { token, logprob, top: best }
}

/// [`argmax`] among the tokens `allowed` contains (visiting only those); `None` when it
/// contains none with a finite score.
pub fn argmax_allowed(xs: &[f32], allowed: &TokenBits) -> Option<u32> {
    let mut best = None;
    let mut best_v = f32::NEG_INFINITY;
    for (w, &word) in allowed.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let i = w * 32 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            match xs.get(i) {
                Some(&v) if v > best_v => {
                    best_v = v;
                    best = Some(i as u32);
                }
                Some(_) => {}
                None => return best,
            }
        }
    }
    best
}

/// Sets the scores of tokens that `allowed` (a bitset) excludes to −∞.
pub fn mask_scores(scores: &mut [f32], allowed: &TokenBits) {
    for (i, s) in scores.iter_mut().enumerate() {
        if !allows(allowed, i) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Sets the probabilities of tokens that `allowed` (a bitset) excludes to 0.
pub fn mask_probs(probs: &mut [f32], allowed: &TokenBits) {
    for (i, p) in probs.iter_mut().enumerate() {
        if !allows(allowed, i) {
            *p = 0.0;
        }
    }
}

/// OpenAI's `logit_bias` on scores: added.
pub fn bias_scores(scores: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        if let Some(s) = scores.get_mut(t as usize) {
            *s += b;
        }
    }
}

/// `logit_bias` on probabilities: `p·e^b` (the same as adding `b` to a logit), renormalised by
/// the sampler. −100 removes a token, as OpenAI documents.
pub fn bias_probs(probs: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        if let Some(p) = probs.get_mut(t as usize) {
            *p = if b <= -100.0 { 0.0 } else { *p * b.exp() };
        }
    }
}

/// Finds stop strings in streamed text, holding back any tail that could still become one.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to do with text after [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and continue.
    Continue(String),
    /// A stop string matched: emit this text (what preceded the stop) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        let hold = self.held_tail_start();
        let out = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        StopOutcome::Continue(out)
    }

    /// Text held back at the end of generation (it never completed a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Start of the longest suffix of `pending` that is a proper prefix of some stop string.
    fn held_tail_start(&self) -> usize {
        for (i, _) in self.pending.char_indices() {
            let tail = &self.pending[i..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail)) {
                return i;
            }
        }
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;
    use super::*;
    use proptest::prelude::*;

    fn params(t: f32, k: usize, p: f32) -> SamplingParams {
        SamplingParams { temperature: t, top_k: k, top_p: p, seed: Some(1) }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut rng = Rng::new(0);
        assert_eq!(sample_logits(&[0.1, 3.0, -1.0, 3.0], &SamplingParams::greedy(), &mut rng), 1);
        assert_eq!(sample_probs(&[0.2, 0.5, 0.3], &SamplingParams::greedy(), &mut rng), 1);
    }

    /// Tiny and low temperatures never degenerate to token 0: they pick the argmax (or near it).
    #[test]
    fn tiny_temperatures_pick_the_best_token() {
        let mut rng = Rng::new(3);
        let logits = [1.0f32, 9.0, 30.0, 29.0, -4.0];
        for t in [1e-40, 1e-10, 1e-5, 1e-3] {
            assert_eq!(sample_logits(&logits, &params(t, 0, 1.0), &mut rng), 2, "T = {t}");
            assert_eq!(sample_probs(&[0.1, 0.2, 0.6, 0.1], &params(t, 0, 1.0), &mut rng), 2, "T = {t}");
        }
        // Large logits at a low (valid) temperature: no overflow.
        let big = [3.0e4f32, 2.9e4, -1.0e4];
        assert_eq!(sample_logits(&big, &params(0.01, 0, 1.0), &mut rng), 0);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let p = params(1.0, 0, 0.9);
        let a: Vec<u32> = {
            let mut r = Rng::new(42);
            (0..20).map(|_| sample_logits(&logits, &p, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(42);
            (0..20).map(|_| sample_logits(&logits, &p, &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let probs = [0.1f32, 0.6, 0.3];
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[sample_probs(&probs, &params(1.0, 0, 1.0), &mut rng) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            let f = *c as f32 / 20_000.0;
            assert!((f - p).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [5.0f32, 4.0, 1.0, 0.0, -1.0];
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            assert!(sample_logits(&logits, &params(1.0, 2, 1.0), &mut rng) < 2);
            // p(0) ≈ 0.72, p(1) ≈ 0.26: 0.9 keeps exactly the first two.
            assert!(sample_logits(&logits, &params(1.0, 0, 0.9), &mut rng) < 2);
        }
    }

    #[test]
    fn prob_temperature_sharpens() {
        let probs = [0.4f32, 0.6];
        let mut rng = Rng::new(11);
        let n = 10_000;
        let ones = (0..n).filter(|_| sample_probs(&probs, &params(0.25, 0, 1.0), &mut rng) == 1).count();
        // 0.6^4 / (0.4^4 + 0.6^4) ≈ 0.835
        assert!((ones as f32 / n as f32 - 0.835).abs() < 0.02, "{ones}");
    }

    #[test]
    fn stop_strings_hold_back_prefixes() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(m.push("Hello"), StopOutcome::Continue("Hello".into()));
        assert_eq!(m.push(" world\nUs"), StopOutcome::Continue(" world".into()));
        assert_eq!(m.push("er: hi"), StopOutcome::Stopped(String::new()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abcEN"), StopOutcome::Continue("abc".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("ENx".into()));
        assert_eq!(m.push("E"), StopOutcome::Continue(String::new()));
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn logprobs_are_those_of_the_distribution() {
        let scores = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let l = logprobs_of_scores(&scores, 2, 2);
        let z: f32 = scores.iter().map(|s| s.exp()).sum();
        assert!((l.logprob - (2f32.exp() / z).ln()).abs() < 1e-6, "{l:?}");
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((l.top[0].1 - (3f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(logprobs_of_scores(&scores, 3, 0).logprob, f32::NEG_INFINITY);
        let probs = [0.2f32, 0.0, 0.6];
        let l = logprobs_of_probs(&probs, 0, 5);
        assert!((l.logprob - 0.25f32.ln()).abs() < 1e-6, "{l:?}");
        assert_eq!(l.top.len(), 3);
        assert_eq!(l.top[0].0, 2);
        assert_eq!(l.top[2].1, f32::NEG_INFINITY);
    }

    #[test]
    fn masked_argmax_equals_mask_then_argmax() {
        let xs: Vec<f32> = (0..100).map(|i| ((i * 37) % 23) as f32).collect();
        for bits in [vec![0u32, 0, 0, 0], vec![0x8000_0001, 0, 0xF0, 0xF], vec![u32::MAX; 4], vec![0, 0, 0, 1 << 3]] {
            let mut masked = xs.clone();
            mask_scores(&mut masked, &bits);
            let want = masked.iter().any(|v| v.is_finite()).then(|| argmax(&masked));
            assert_eq!(argmax_allowed(&xs, &bits), want, "{bits:x?}");
        }
    }

    #[test]
    fn masks_and_biases() {
        let mut s = [1.0f32, 2.0, 3.0, 4.0];
        mask_scores(&mut s, &[0b0101]);
        assert_eq!(s, [1.0, f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]);
        let mut p = [0.1f32, 0.2, 0.3, 0.4];
        mask_probs(&mut p, &[0b1010]);
        assert_eq!(p, [0.0, 0.2, 0.0, 0.4]);
        bias_probs(&mut p, &[(1, -100.0), (3, 0.0)]);
        assert_eq!(p, [0.0, 0.0, 0.0, 0.4]);
        let mut s = [0.0f32; 3];
        bias_scores(&mut s, &[(2, 5.0), (7, 1.0)]);
        assert_eq!(s, [0.0, 0.0, 5.0]);
    }

    proptest! {
        #[test]
        fn never_samples_outside_support(
            logits in prop::collection::vec(-50f32..50.0, 1..200),
            t in 0.05f32..3.0, k in 0usize..20, top_p in 0.05f32..1.0, seed in any::<u64>()
        ) {
            let mut rng = Rng::new(seed);
            let i = sample_logits(&logits, &params(t, k, top_p), &mut rng) as usize;
            prop_assert!(i < logits.len());
            if k > 0 {
                let mut sorted = logits.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                prop_assert!(logits[i] >= sorted[(k - 1).min(sorted.len() - 1)]);
            }
        }

        #[test]
        fn stop_matcher_output_is_text_before_first_stop(
            text in "[ab\\n]{0,40}", cuts in prop::collection::vec(0usize..40, 0..6)
        ) {
            let stop = "ab\n".to_string();
            let mut m = StopMatcher::new(vec![stop.clone()]);
            let mut out = String::new();
            let mut stopped = false;
            let mut pieces = Vec::new();
            let mut last = 0;
            let mut cuts = cuts.clone();
            cuts.sort();
            for c in cuts { let c = c.min(text.len()); pieces.push(&text[last..c]); last = c; }
            pieces.push(&text[last..]);
            for p in pieces {
                match m.push(p) {
                    StopOutcome::Continue(s) => out.push_str(&s),
                    StopOutcome::Stopped(s) => { out.push_str(&s); stopped = true; break; }
                }
            }
            if !stopped { out.push_str(&m.flush()); }
            let want = match text.find(&stop) { Some(i) => &text[..i], None => &text[..] };
            prop_assert_eq!(out, want);
        }
    }
}
