//! LoRA deltas applied **unmerged and per row**: one batch may hold rows with no adapter, with
//! adapter X, with Y, or with X and Y summed, and each row gets exactly its own delta
//! `scale · (x Aᵀ) Bᵀ` added to the base projection's output.
//!
//! This module holds the numbers (factors already in the backend's layout); reading PEFT
//! directories and deciding which adapter a request uses live in [`crate::adapters`].

use super::kernels::{self, PackedMatrix};
use super::{ModelConfig, ModelError, ProjKind, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// One LoRA factor pair in the layout of the backend that runs it.
pub enum LoraFactors {
    /// `a: [r, in]` and `b: [out, r]` tile-packed (f16) for the CPU kernels.
    Packed { a: PackedMatrix, b: PackedMatrix },
    /// Tensors `a: [r, in]`, `b: [out, r]` (f32) on the model's device.
    Tensors { a: Tensor, b: Tensor },
}

/// The LoRA update of one projection.
pub struct LoraPair {
    pub factors: LoraFactors,
    pub rank: usize,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub scale: f32,
}

/// A loaded adapter's numbers: per layer, per projection, an optional update.
pub struct LoraWeights {
    pub layers: Vec<[Option<LoraPair>; 7]>,
    /// Bytes held by the factors.
    pub bytes: usize,
}

impl std::fmt::Debug for LoraWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let modules = self.layers.iter().flatten().filter(|p| p.is_some()).count();
        f.debug_struct("LoraWeights").field("modules", &modules).field("bytes", &self.bytes).finish()
    }
}

/// Input and output sizes of each projection of `cfg`.
pub fn proj_dims(cfg: &ModelConfig, kind: ProjKind) -> (usize, usize) {
    let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    match kind {
        ProjKind::Q => (h, q),
        ProjKind::K | ProjKind::V => (h, kv),
        ProjKind::O => (q, h),
        ProjKind::Gate | ProjKind::Up => (h, f),
        ProjKind::Down => (f, h),
    }
}

impl LoraPair {
    /// Builds a pair from f32 host values `a: [r, in]`, `b: [out, r]`, checked against `dims`.
    pub fn new(
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f32,
        (inp, out): (usize, usize),
        native: bool,
        device: &Device,
    ) -> Result<Self> {
        if a.len() != rank * inp || b.len() != out * rank {
            return Err(ModelError::Config(format!("LoRA factors of rank {rank} do not fit a {inp}→{out} projection")));
        }
        let factors = if native {
            LoraFactors::Packed {
                a: PackedMatrix::from_f32_as_f16(a, rank, inp).map_err(ModelError::Config)?,
                b: PackedMatrix::from_f32_as_f16(b, out, rank).map_err(ModelError::Config)?,
            }
        } else {
            LoraFactors::Tensors {
                a: Tensor::from_slice(a, (rank, inp), device)?,
                b: Tensor::from_slice(b, (out, rank), device)?,
            }
        };
        Ok(Self { factors, rank, scale })
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.factors {
            LoraFactors::Packed { a, b } => a.size_in_bytes() + b.size_in_bytes(),
            LoraFactors::Tensors { a, b } => (a.elem_count() + b.elem_count()) * 4,
        }
    }

    /// `scale · (x Aᵀ) Bᵀ` for host rows `x: [m, in]` (CPU kernels).
    fn delta_host(&self, x: &[f32], m: usize) -> Vec<f32> {
        let LoraFactors::Packed { a, b } = &self.factors else { unreachable!("host deltas run on packed factors") };
        let t = kernels::matmul::matmul_new(a, x, m);
        let mut d = kernels::matmul::matmul_new(b, &t, m);
        d.iter_mut().for_each(|v| *v *= self.scale);
        d
    }
}

/// Which adapters apply to which packed rows of one step.
#[derive(Clone, Default)]
pub struct LoraBatch {
    /// Each distinct adapter of the step, with the packed rows (token rows) that use it.
    pub uses: Vec<(Arc<LoraWeights>, Vec<Range<usize>>)>,
}

impl LoraBatch {
    pub fn is_empty(&self) -> bool {
        self.uses.is_empty()
    }

    /// Adds the deltas of every adapter to `y: [rows, out_total]` (host, row-major) for the
    /// projections fused in `parts`, reading inputs from `x: [rows, in]`.
    pub fn apply_host(
        &self,
        layer: usize,
        parts: &[(ProjKind, Range<usize>)],
        x: &[f32],
        in_features: usize,
        y: &mut [f32],
        out_total: usize,
    ) {
        for (w, ranges) in &self.uses {
            let pairs = &w.layers[layer];
            if parts.iter().all(|(k, _)| pairs[*k as usize].is_none()) {
                continue;
            }
            // Gather this adapter's rows into one contiguous input.
            let m: usize = ranges.iter().map(|r| r.len()).sum();
            let mut xs = Vec::with_capacity(m * in_features);
            for r in ranges {
                xs.extend_from_slice(&x[r.start * in_features..r.end * in_features]);
            }
            for (kind, cols) in parts {
                let Some(pair) = &pairs[*kind as usize] else { continue };
                let d = pair.delta_host(&xs, m);
                let width = cols.len();
                let mut i = 0;
                for r in ranges {
                    for row in r.clone() {
                        let dst = &mut y[row * out_total + cols.start..][..width];
                        for (o, v) in dst.iter_mut().zip(&d[i * width..][..width]) {
                            *o += v;
                        }
                        i += 1;
                    }
                }
            }
        }
    }

    /// The same on candle tensors (any device): returns `y` plus the deltas.
    pub fn apply_tensor(
        &self,
        layer: usize,
        parts: &[(ProjKind, Range<usize>)],
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        let mut y = y;
        for (w, ranges) in &self.uses {
            let pairs = &w.layers[layer];
            for (kind, cols) in parts {
                let Some(pair) = &pairs[*kind as usize] else { continue };
                let LoraFactors::Tensors { a, b } = &pair.factors else {
                    return Err(ModelError::Config("packed LoRA factors on the candle backend".into()));
                };
                for r in ranges {
                    let xs = x.narrow(0, r.start, r.len())?;
                    let d = (xs.matmul(&a.t()?)?.matmul(&b.t()?)? * pair.scale as f64)?.to_dtype(DType::F32)?;
                    let cur = y.narrow(0, r.start, r.len())?.narrow(1, cols.start, cols.len())?;
                    y = y.slice_assign(&[r.clone(), cols.clone()], &(cur + d)?)?;
                }
            }
        }
        Ok(y)
    }
}
