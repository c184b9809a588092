//! One projection `y = x · Wᵀ (+ b)`: the base weight in whichever form the backend runs, and the
//! per-row hook where LoRA deltas are added.
//!
//! Projections that read the same input (q/k/v, gate/up) are fused into one [`Linear`] at load:
//! one kernel call and one thread hand-off instead of three. `parts` remembers which output
//! columns belong to which projection, so per-projection deltas still land in the right place.

use super::kernels::{self, PackedMatrix};
use super::lora::StepLora;
use super::{ModelError, ProjKind, Result};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// The base weight of a projection.
#[derive(Clone)]
pub enum LinearWeight {
    /// Tile-packed weights for lethe's CPU kernels.
    Packed(Arc<PackedMatrix>),
    /// A GGUF quantized tensor run by candle (any device).
    Quantized(Arc<QMatMul>),
    /// A float tensor `[out, in]` run by candle's matmul (any device).
    Dense(Tensor),
}

#[derive(Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
    /// Which output columns belong to which projection (one part unless fused).
    pub parts: Vec<(ProjKind, Range<usize>)>,
}

impl Linear {
    pub fn new(weight: LinearWeight, bias: Option<Tensor>, kind: ProjKind) -> Self {
        let (out_features, in_features) = match &weight {
            LinearWeight::Packed(p) => (p.n, p.k),
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims2().unwrap_or((0, 0)),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2().unwrap_or((0, 0)),
            },
            LinearWeight::Dense(t) => t.dims2().unwrap_or((0, 0)),
        };
        Self { weight, bias, in_features, out_features, parts: vec![(kind, 0..out_features)] }
    }

    /// `x: [T, in]` → `[T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_lora(x, None)
    }

    /// The projection plus the per-row LoRA deltas of `lora` (adapters of layer `.1`): the hook
    /// point where forget-adapters enter the model.
    pub fn forward_lora(&self, x: &Tensor, lora: Option<(&StepLora, usize)>) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Packed(w) => {
                let (t, k) = x.dims2()?;
                if k != w.k {
                    return Err(ModelError::InvalidBatch(format!("projection expects {} inputs, got {k}", w.k)));
                }
                let x = x.contiguous()?;
                let host = match lora {
                    Some((StepLora::Host(l), layer)) if !l.is_empty() => Some((l, layer)),
                    Some((StepLora::Stacked(_), _)) => {
                        return Err(ModelError::Config("stacked LoRA tensors on the native backend".into()));
                    }
                    _ => None,
                };
                let y = with_cpu_f32(&x, |xs| {
                    match host.and_then(|(l, layer)| l.shrink_host(layer, &self.parts, xs, k)) {
                        None => kernels::matmul::matmul_new(w, xs, t),
                        Some(deltas) => kernels::matmul::matmul_new_then(w, xs, t, &deltas),
                    }
                })?;
                Tensor::from_vec(y, (t, w.n), &Device::Cpu)?
            }
            LinearWeight::Quantized(q) => self.with_tensor_lora(q.forward(x)?, x, lora)?,
            LinearWeight::Dense(w) if w.dtype() == x.dtype() => self.with_tensor_lora(x.matmul(&w.t()?)?, x, lora)?,
            // Half-precision weights (GPU): the matmul runs in their type, the stream stays f32.
            LinearWeight::Dense(w) => {
                let y = x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())?;
                self.with_tensor_lora(y, x, lora)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn with_tensor_lora(&self, y: Tensor, x: &Tensor, lora: Option<(&StepLora, usize)>) -> Result<Tensor> {
        match lora {
            Some((l, layer)) => l.apply_tensor(layer, &self.parts, x, y),
            None => Ok(y),
        }
    }

    /// Fuses projections of the same input into one (outputs concatenated in order).
    pub fn fuse(parts: Vec<Linear>) -> Result<Linear> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap());
        }
        let in_features = parts[0].in_features;
        if parts.iter().any(|p| p.in_features != in_features) {
            return Err(ModelError::Config("fused projections differ in input size".into()));
        }
        let mut ranges = Vec::new();
        let mut offset = 0;
        for p in &parts {
            for (kind, r) in &p.parts {
                ranges.push((*kind, offset + r.start..offset + r.end));
            }
            offset += p.out_features;
        }
        let weight = match &parts[0].weight {
            LinearWeight::Packed(_) => {
                let ms: Vec<&PackedMatrix> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        LinearWeight::Packed(m) => Ok(m.as_ref()),
                        _ => Err(ModelError::Config("cannot fuse mixed weight kinds".into())),
                    })
                    .collect::<Result<_>>()?;
                LinearWeight::Packed(Arc::new(PackedMatrix::concat_rows(&ms).map_err(ModelError::Config)?))
            }
            LinearWeight::Quantized(_) => {
                let qs: Vec<Arc<QTensor>> = parts
                    .iter()
                    .map(|p| match p.weight.clone() {
                        LinearWeight::Quantized(q) => match q.as_ref() {
                            QMatMul::QTensor(t) => Ok(t.clone()),
                            _ => Err(ModelError::Config("cannot fuse dequantized weights".into())),
                        },
                        _ => Err(ModelError::Config("cannot fuse mixed weight kinds".into())),
                    })
                    .collect::<Result<_>>()?;
                LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(concat_qtensors(&qs)?)?))
            }
            LinearWeight::Dense(_) => {
                let ts: Vec<Tensor> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        LinearWeight::Dense(t) => Ok(t.clone()),
                        _ => Err(ModelError::Config("cannot fuse mixed weight kinds".into())),
                    })
                    .collect::<Result<_>>()?;
                LinearWeight::Dense(Tensor::cat(&ts, 0)?)
            }
        };
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            let mut bs = Vec::new();
            for p in &parts {
                bs.push(match &p.bias {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(p.out_features, candle_core::DType::F32, &bias_device(&parts))?,
                });
            }
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Linear { weight, bias, in_features, out_features: offset, parts: ranges })
    }

    /// Bytes held by the weight.
    pub fn size_in_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Packed(p) => p.size_in_bytes(),
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
            },
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

fn bias_device(parts: &[Linear]) -> Device {
    parts.iter().find_map(|p| p.bias.as_ref().map(|b| b.device().clone())).unwrap_or(Device::Cpu)
}

/// Concatenates quantized `[n_i, k]` tensors of one dtype along the rows (block rows are
/// contiguous in GGUF layouts, so this is a byte concatenation).
fn concat_qtensors(parts: &[Arc<QTensor>]) -> Result<QTensor> {
    let dtype = parts[0].dtype();
    let (_, k) = parts[0].shape().dims2()?;
    let mut bytes = Vec::new();
    let mut n = 0;
    for p in parts {
        let (pn, pk) = p.shape().dims2()?;
        if p.dtype() != dtype || pk != k {
            return Err(ModelError::Config("cannot fuse quantized tensors of different types".into()));
        }
        bytes.extend_from_slice(&p.data()?);
        n += pn;
    }
    let device = parts[0].device();
    let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(bytes), &device, dtype)?;
    Ok(QTensor::new(storage, (n, k))?)
}

/// Calls `f` with the contiguous f32 data of a CPU tensor.
pub(crate) fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    use candle_core::Storage;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Config("native CPU kernels need tensors on the CPU".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(f(&data[start..end])),
        None => Err(ModelError::Config("native CPU kernels need contiguous tensors".into())),
    }
}
