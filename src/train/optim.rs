//! The optimizer side: AdamW (PyTorch's, as HF's Trainer uses it), clipping by the global
//! gradient norm, and the learning-rate schedule (linear warm-up, then cosine decay to a floor).

use rayon::prelude::*;

/// AdamW settings; the defaults are HF `TrainingArguments`' (weight decay 0, unlike candle's
/// AdamW default of 0.01).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW's state: first and second moments and the step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub settings: AdamWSettings,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: u64,
}

impl AdamW {
    pub fn new(settings: AdamWSettings, len: usize) -> Self {
        Self { settings, m: vec![0.0; len], v: vec![0.0; len], t: 0 }
    }

    /// One step of `torch.optim.AdamW`: decoupled weight decay `θ ← θ·(1 − lr·wd)`, then
    /// `θ ← θ − lr · m̂ / (√v̂ + ε)` with bias-corrected moments.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.t += 1;
        let s = self.settings;
        let bc1 = 1.0 - s.beta1.powi(self.t as i32);
        let bc2 = 1.0 - s.beta2.powi(self.t as i32);
        let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
        let decay = (1.0 - lr * s.weight_decay) as f32;
        let step = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = s.eps as f32;
        params.par_iter_mut().zip(grads).zip(self.m.par_iter_mut()).zip(self.v.par_iter_mut()).for_each(
            |(((p, &g), m), v)| {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p = *p * decay - step * *m / ((*v).sqrt() / bc2_sqrt + eps);
            },
        );
    }
}

/// The global L2 norm of `grads`; if above `max_norm`, scales them down to it (PyTorch's
/// `clip_grad_norm_`, coefficient `max_norm / (norm + 1e-6)`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grads.par_iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let c = coef as f32;
            grads.par_iter_mut().for_each(|g| *g *= c);
        }
    }
    norm
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over
/// `warmup` steps, then cosine decay from `lr` to `floor·lr` — the paper's schedule is
/// `floor = 0.1`: `lr · (0.1 + 0.9 · ½(1 + cos πp))`.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, floor: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let p = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    lr * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr_in_the_gradient_sign() {
        // With bias correction, the first Adam step is lr·g/(|g| + ε) ≈ lr·sign(g).
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.3f32, -4.0, 0.0];
        let mut opt = AdamW::new(AdamWSettings::default(), 3);
        opt.step(&mut p, &g, 0.1);
        assert!((p[0] - 0.9).abs() < 1e-5 && (p[1] + 1.9).abs() < 1e-5 && p[2] == 0.5, "{p:?}");
        // Decoupled weight decay shrinks parameters even where the gradient is zero.
        let mut opt = AdamW::new(AdamWSettings { weight_decay: 0.5, ..Default::default() }, 3);
        let mut q = vec![2.0f32, 0.0, 0.0];
        opt.step(&mut q, &[0.0, 0.0, 0.0], 0.1);
        assert!((q[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert!((clip_grad_norm(&mut g, 1.0) - 5.0).abs() < 1e-9);
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((lr_at(0, 10, 0, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 10, 0, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(5, 10, 0, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(0, 10, 2, 1.0, 0.1) - 0.5).abs() < 1e-12);
        assert!((lr_at(2, 10, 2, 1.0, 0.1) - 1.0).abs() < 1e-12);
    }
}
