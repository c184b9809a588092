//! The trainable LoRA: which projections get factors, their shapes and scales, PEFT's
//! initialisation, the forward `y += scale · B(A(dropout(x)))` and its backward.
//!
//! All factors live in one flat `Vec<f32>` (and their gradients and AdamW moments in vectors of
//! the same layout), so the optimizer, gradient clipping and checkpoints treat the adapter as
//! one array; [`LoraLayout`] says where each factor sits.

use super::ops::{Mat, Threads, matmul};
use crate::model::lora::proj_dims;
use crate::model::{ModelConfig, ProjKind};

/// LoRA hyper-parameters (PEFT's `LoraConfig` fields of the same names).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    /// Projections that get factors, in [`ProjKind::ALL`] order.
    #[serde(with = "kinds_serde")]
    pub targets: Vec<ProjKind>,
}

impl LoraSettings {
    /// `alpha / r`, or `alpha / √r` with rsLoRA (PEFT's `scaling`).
    pub fn scale(&self) -> f32 {
        if self.use_rslora { self.lora_alpha / (self.r as f32).sqrt() } else { self.lora_alpha / self.r as f32 }
    }
}

/// Parses `--target`: `all-linear`, or a comma list of `q,k,v,o,gate,up,down` (or the HF module
/// names `q_proj`, …).
pub fn parse_targets(s: &str) -> Result<Vec<ProjKind>, String> {
    if s.trim() == "all-linear" {
        return Ok(ProjKind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = ProjKind::ALL
            .into_iter()
            .find(|k| name == k.hf_name() || name == k.hf_name().trim_end_matches("_proj"))
            .ok_or_else(|| format!("unknown projection {name:?} (all-linear, or a list of q,k,v,o,gate,up,down)"))?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    if out.is_empty() {
        return Err("no projection to train (--target)".into());
    }
    out.sort();
    Ok(out)
}

/// Where one projection's factors sit in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub layer: usize,
    pub kind: ProjKind,
    pub in_f: usize,
    pub out_f: usize,
    pub rank: usize,
    pub scale: f32,
    /// `A: [rank, in]` at `a..a + rank·in`.
    pub a: usize,
    /// `B: [out, rank]` at `b..b + out·rank`.
    pub b: usize,
}

/// The layout of every factor of an adapter over a model.
#[derive(Debug, Clone)]
pub struct LoraLayout {
    pub slots: Vec<Slot>,
    /// Per layer and [`ProjKind`], the index into `slots`.
    by_layer: Vec<[Option<usize>; 7]>,
    pub len: usize,
}

impl LoraLayout {
    pub fn new(cfg: &ModelConfig, s: &LoraSettings) -> Self {
        let mut slots = Vec::new();
        let mut by_layer = vec![[None; 7]; cfg.n_layers];
        let mut off = 0;
        for (layer, by_kind) in by_layer.iter_mut().enumerate() {
            for &kind in &s.targets {
                let (in_f, out_f) = proj_dims(cfg, kind);
                let slot = Slot { layer, kind, in_f, out_f, rank: s.r, scale: s.scale(), a: off, b: off + s.r * in_f };
                off += s.r * (in_f + out_f);
                by_kind[kind as usize] = Some(slots.len());
                slots.push(slot);
            }
        }
        Self { slots, by_layer, len: off }
    }

    pub fn slot(&self, layer: usize, kind: ProjKind) -> Option<&Slot> {
        self.by_layer[layer][kind as usize].map(|i| &self.slots[i])
    }

    /// PEFT's initialisation: `A` Kaiming-uniform with `a = √5` (bounds ±1/√in), `B` zero, so
    /// the adapter starts as the identity on the base model.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut p = vec![0f32; self.len];
        let mut rng = crate::sampling::Rng::new(seed);
        for s in &self.slots {
            let bound = 1.0 / (s.in_f as f32).sqrt();
            for v in &mut p[s.a..s.a + s.rank * s.in_f] {
                *v = (rng.next_f32() * 2.0 - 1.0) * bound;
            }
        }
        p
    }
}

/// PEFT's `lora_dropout`: inverted dropout on the input of `A` (`x ⊙ mask / (1 − p)`).
///
/// Rates are small (the paper's 0.01), so the mask is kept as the list of dropped elements,
/// drawn with geometric gaps from a generator seeded by (seed, layer, projection): the backward
/// regenerates the same list, and neither direction materialises a dropped copy of the input —
/// `drop(x)·Aᵀ = (x·Aᵀ)/(1 − p)` minus the dropped elements' terms. (Drawing a Bernoulli per
/// element cost ~14 % of a training step on SmolLM2.)
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// `1 / (1 − p)`.
    fn keep_scale(self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// The dropped elements of a `[rows, cols]` input, as flat indices in increasing order.
    fn dropped(self, n: usize, layer: usize, kind: ProjKind) -> Vec<usize> {
        if self.p <= 0.0 {
            return Vec::new();
        }
        let mut rng = crate::sampling::Rng::new(splitmix64(self.seed ^ ((layer as u64) << 56) ^ ((kind as u64) << 48)));
        // Gaps between Bernoulli(p) successes are geometric: ⌊ln U / ln(1 − p)⌋.
        let log_keep = (1.0 - self.p as f64).ln();
        let mut out = Vec::with_capacity((n as f64 * self.p as f64 * 1.2) as usize + 8);
        let mut pos = 0usize;
        loop {
            let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64; // (0, 1]
            pos = pos.saturating_add((u.ln() / log_keep) as usize);
            if pos >= n {
                return out;
            }
            out.push(pos);
            pos += 1;
        }
    }

    /// The dense mask (`x ⊙ mask / (1 − p)`), for tests.
    #[cfg(test)]
    fn apply(self, x: &[f32], layer: usize, kind: ProjKind) -> Vec<f32> {
        let mut out: Vec<f32> = x.iter().map(|v| v * self.keep_scale()).collect();
        for d in self.dropped(x.len(), layer, kind) {
            out[d] = 0.0;
        }
        out
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The scale and dropped elements of one projection's input at one step.
fn mask(dropout: Option<Dropout>, slot: &Slot, rows: usize) -> (f32, Vec<usize>) {
    match dropout {
        Some(d) if d.p > 0.0 => (d.keep_scale(), d.dropped(rows * slot.in_f, slot.layer, slot.kind)),
        _ => (1.0, Vec::new()),
    }
}

/// The output columns of a fused projection that one part writes: `y[:, col..col + out]` of a
/// `[rows, ld]` buffer.
#[derive(Clone, Copy)]
pub struct Cols {
    pub col: usize,
    pub ld: usize,
}

/// `y[:, cols] += scale · (drop(x) Aᵀ) Bᵀ`; returns `t = drop(x) Aᵀ` (`[rows, rank]`), which
/// the backward needs.
pub fn forward(
    slot: &Slot,
    params: &[f32],
    x: &[f32],
    rows: usize,
    y: &mut [f32],
    cols: Cols,
    dropout: Option<Dropout>,
) -> Vec<f32> {
    let (a, b) = factors(slot, params);
    let (r, in_f) = (slot.rank, slot.in_f);
    let (keep, dropped) = mask(dropout, slot, rows);
    let mut t = vec![0f32; rows * r];
    matmul(&mut t, r, Mat::new(x, rows, in_f), a.t(), keep, false, Threads::All);
    // The dropped elements' share of x·Aᵀ, taken back out.
    let a_vals = &params[slot.a..slot.a + r * in_f];
    for d in dropped {
        let (i, j) = (d / in_f, d % in_f);
        let c = keep * x[d];
        for (k, tv) in t[i * r..(i + 1) * r].iter_mut().enumerate() {
            *tv -= c * a_vals[k * in_f + j];
        }
    }
    matmul(&mut y[cols.col..], cols.ld, Mat::new(&t, rows, r), b.t(), slot.scale, true, Threads::All);
    t
}

/// Backward of [`forward`] given `dy` (the gradient of the fused output, `[rows, ld]`): adds
/// the factor gradients to `grads` and, if `dx` is given, the input gradient to it.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    slot: &Slot,
    params: &[f32],
    grads: &mut [f32],
    x: &[f32],
    t: &[f32],
    rows: usize,
    dy: &[f32],
    cols: Cols,
    dropout: Option<Dropout>,
    dx: Option<&mut [f32]>,
) {
    let (a, b) = factors(slot, params);
    let (r, in_f, out_f) = (slot.rank, slot.in_f, slot.out_f);
    let dys = Mat::strided(&dy[cols.col..], rows, out_f, cols.ld);
    // dB += scale · dYᵀ t
    let (ga, gb) = grads.split_at_mut(slot.b);
    matmul(&mut gb[..out_f * r], r, dys.t(), Mat::new(t, rows, r), slot.scale, true, Threads::All);
    // dt = scale · dY B
    let mut dt = vec![0f32; rows * r];
    matmul(&mut dt, r, dys, b, slot.scale, false, Threads::All);
    // dA += dtᵀ drop(x): the dense product scaled, minus the dropped elements' terms.
    let (keep, dropped) = mask(dropout, slot, rows);
    let ga = &mut ga[slot.a..slot.a + r * in_f];
    matmul(ga, in_f, Mat::new(&dt, rows, r).t(), Mat::new(x, rows, in_f), keep, true, Threads::All);
    for &d in &dropped {
        let (i, j) = (d / in_f, d % in_f);
        let c = keep * x[d];
        for (k, &dtv) in dt[i * r..(i + 1) * r].iter().enumerate() {
            ga[k * in_f + j] -= c * dtv;
        }
    }
    // dx += drop'(dt A): scaled, with the dropped elements' gradient taken back out.
    if let Some(dx) = dx {
        matmul(dx, in_f, Mat::new(&dt, rows, r), a, keep, true, Threads::All);
        let a_vals = &params[slot.a..slot.a + r * in_f];
        for &d in &dropped {
            let (i, j) = (d / in_f, d % in_f);
            let g: f32 = dt[i * r..(i + 1) * r].iter().enumerate().map(|(k, &v)| v * a_vals[k * in_f + j]).sum();
            dx[d] -= keep * g;
        }
    }
}

fn factors<'a>(slot: &Slot, params: &'a [f32]) -> (Mat<'a>, Mat<'a>) {
    (
        Mat::new(&params[slot.a..slot.a + slot.rank * slot.in_f], slot.rank, slot.in_f),
        Mat::new(&params[slot.b..slot.b + slot.out_f * slot.rank], slot.out_f, slot.rank),
    )
}

mod kinds_serde {
    use crate::model::ProjKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kinds: &[ProjKind], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(kinds.iter().map(|k| k.hf_name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ProjKind>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        super::parse_targets(&names.join(",")).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_targets("all-linear").unwrap(), ProjKind::ALL.to_vec());
        assert_eq!(parse_targets("v, q,q_proj").unwrap(), vec![ProjKind::Q, ProjKind::V]);
        assert!(parse_targets("embed").unwrap_err().contains("embed"));
        assert!(parse_targets(" , ").is_err());
    }

    #[test]
    fn dropout_masks_are_reproducible_and_have_the_right_rate() {
        for p in [0.01f32, 0.25] {
            let d = Dropout { p, seed: 99 };
            let x = vec![1f32; 200_000];
            let a = d.apply(&x, 3, ProjKind::Up);
            assert_eq!(a, d.apply(&x, 3, ProjKind::Up));
            assert_ne!(a, d.apply(&x, 3, ProjKind::Gate));
            let dropped = a.iter().filter(|&&v| v == 0.0).count() as f32 / x.len() as f32;
            assert!((dropped - p).abs() < 0.1 * p, "{dropped} for p = {p}");
            assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / (1.0 - p)).abs() < 1e-6));
        }
    }

    /// The sparse form of dropout equals the dense one: `t`, `dA` and `dx` computed from the
    /// list of dropped elements match the same products on `drop(x)` written out.
    #[test]
    fn sparse_dropout_equals_the_dense_mask() {
        let (rows, in_f, out_f, r) = (7, 40, 24, 3);
        let slot = Slot { layer: 1, kind: ProjKind::Q, in_f, out_f, rank: r, scale: 0.5, a: 0, b: r * in_f };
        let mut rng = crate::sampling::Rng::new(4);
        let mut rnd = |n: usize| (0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>();
        let params = rnd(r * (in_f + out_f));
        let x = rnd(rows * in_f);
        let dy = rnd(rows * out_f);
        let d = Dropout { p: 0.2, seed: 5 };
        let cols = Cols { col: 0, ld: out_f };
        let mut y = vec![0f32; rows * out_f];
        let t = forward(&slot, &params, &x, rows, &mut y, cols, Some(d));
        let mut grads = vec![0f32; params.len()];
        let mut dx = vec![0f32; x.len()];
        backward(&slot, &params, &mut grads, &x, &t, rows, &dy, cols, Some(d), Some(&mut dx));
        // Dense reference.
        let xd = d.apply(&x, 1, ProjKind::Q);
        let mut y2 = vec![0f32; rows * out_f];
        let t2 = forward(&slot, &params, &xd, rows, &mut y2, cols, None);
        let mut g2 = vec![0f32; params.len()];
        let mut dxd = vec![0f32; x.len()];
        backward(&slot, &params, &mut g2, &xd, &t2, rows, &dy, cols, None, Some(&mut dxd));
        let mask = d.apply(&vec![1f32; x.len()], 1, ProjKind::Q);
        let dx2: Vec<f32> = dxd.iter().zip(&mask).map(|(g, m)| g * m).collect();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(u, v)| (u - v).abs() < 1e-5);
        assert!(close(&t, &t2) && close(&y, &y2) && close(&grads, &g2) && close(&dx, &dx2));
        assert!(mask.contains(&0.0));
    }
}
