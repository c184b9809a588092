//! The trainable LoRA: which projections get factors, their shapes and scales, PEFT's
//! initialisation, the forward `y += scale · B(A(dropout(x)))` and its backward.
//!
//! All factors live in one flat `Vec<f32>` (and their gradients and AdamW moments in vectors of
//! the same layout), so the optimizer, gradient clipping and checkpoints treat the adapter as
//! one array; [`LoraLayout`] says where each factor sits.

use super::ops::{Mat, Threads, matmul};
use crate::model::lora::proj_dims;
use crate::model::{ModelConfig, ProjKind};
use rayon::prelude::*;

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

/// PEFT's `lora_dropout` (inverted dropout on the input of `A`), with masks drawn from a hash of
/// (seed, layer, projection, element) so that the backward regenerates them instead of storing
/// them.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// `x ⊙ mask / (1 − p)` for one projection's input, or `None` when nothing is dropped.
    fn apply(self, x: &[f32], layer: usize, kind: ProjKind) -> Option<Vec<f32>> {
        if self.p <= 0.0 {
            return None;
        }
        let keep_scale = 1.0 / (1.0 - self.p);
        let threshold = (self.p as f64 * u64::MAX as f64) as u64;
        let base = self.seed ^ ((layer as u64) << 56) ^ ((kind as u64) << 48);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096).zip(x.par_chunks(4096)).enumerate().for_each(|(c, (o, x))| {
            for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                let keep = splitmix64(base ^ (c * 4096 + i) as u64) >= threshold;
                *o = if keep { x * keep_scale } else { 0.0 };
            }
        });
        Some(out)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    let dropped = dropout.and_then(|d| d.apply(x, slot.layer, slot.kind));
    let xin = dropped.as_deref().unwrap_or(x);
    let (a, b) = factors(slot, params);
    let mut t = vec![0f32; rows * slot.rank];
    matmul(&mut t, slot.rank, Mat::new(xin, rows, slot.in_f), a.t(), 1.0, false, Threads::All);
    matmul(&mut y[cols.col..], cols.ld, Mat::new(&t, rows, slot.rank), b.t(), slot.scale, true, Threads::All);
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
    // dA += dtᵀ drop(x)
    let dropped = dropout.and_then(|d| d.apply(x, slot.layer, slot.kind));
    let xin = dropped.as_deref().unwrap_or(x);
    matmul(
        &mut ga[slot.a..slot.a + r * in_f],
        in_f,
        Mat::new(&dt, rows, r).t(),
        Mat::new(xin, rows, in_f),
        1.0,
        true,
        Threads::All,
    );
    // dx += drop'(dt A): the mask and 1/(1−p) scale again, applied to the gradient.
    if let Some(dx) = dx {
        let mut dxin = vec![0f32; rows * in_f];
        matmul(&mut dxin, in_f, Mat::new(&dt, rows, r), a, 1.0, false, Threads::All);
        let masked = dropout.and_then(|d| d.apply(&dxin, slot.layer, slot.kind));
        let dxin = masked.as_deref().unwrap_or(&dxin);
        dx.par_iter_mut().zip(dxin.par_iter()).for_each(|(d, &g)| *d += g);
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
        let d = Dropout { p: 0.25, seed: 99 };
        let x = vec![1f32; 40_000];
        let a = d.apply(&x, 3, ProjKind::Up).unwrap();
        assert_eq!(a, d.apply(&x, 3, ProjKind::Up).unwrap());
        assert_ne!(a, d.apply(&x, 3, ProjKind::Gate).unwrap());
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f32 / x.len() as f32;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }
}
