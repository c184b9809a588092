//! The model as training sees it: the base weights as dense f32 (frozen), the same decoder as
//! [`crate::model::llama`] written out as a forward that keeps what its backward needs, and the
//! backward itself — input gradients through every frozen projection, factor gradients for the
//! trainable LoRA.
//!
//! ```text
//! x = embed(tokens)                                     [T, hidden]  T = tokens of all sequences
//! for each layer:
//!     h = rms_norm(x)
//!     q|k|v = h·Wqkvᵀ + LoRA_q|k|v(h);  rope(q), rope(k)
//!     x += attn·Woᵀ + LoRA_o(attn),      attn = causal attention of each sequence over itself
//!     h = rms_norm(x)
//!     g|u = h·Wguᵀ + LoRA_gate|up(h)
//!     x += a·Wdᵀ + LoRA_down(a),         a = silu(g)·u
//! log p(target) at the rows asked for = log_softmax(rms_norm(x)·Eᵀ)[target]
//! ```
//!
//! The weights are the ones serving loads (GGUF dequantized, or HF f32/f16/bf16), read through
//! the same [`WeightSource`]; frozen adapters stacked under the trained one (`--on`) are merged
//! into them, which is exact up to rounding because nothing about them changes while training.

use super::TrainError;
use super::lora::{self, Cols, Dropout, LoraLayout, Slot};
use super::ops::{self, AttnShape, Span};
use crate::adapters::peft::PeftFile;
use crate::model::kernels::attention::RopeRows;
use crate::model::load::{WeightName, WeightSource};
use crate::model::{ModelConfig, ProjKind};
use candle_core::Device;
use rayon::prelude::*;

struct Layer {
    attn_norm: Vec<f32>,
    /// `[q + 2·kv, hidden]`: the q, k and v projections stacked.
    qkv: Vec<f32>,
    qkv_bias: Option<Vec<f32>>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// `[2·ffn, hidden]`: gate then up.
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

/// Frozen base weights, f32, on the host.
pub struct BaseModel {
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    /// `None`: the output head is the embedding matrix (tied).
    lm_head: Option<Vec<f32>>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    inv_freqs: Vec<f32>,
}

/// A packed batch of sequences and the next-token log-probabilities wanted from it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub spans: Vec<Span>,
    /// `(row, token)`: the log-probability of `token` given rows `..=row` of its sequence.
    pub targets: Vec<(usize, u32)>,
}

impl Batch {
    /// Appends one sequence; returns its span.
    pub fn push_sequence(&mut self, ids: &[u32]) -> Span {
        let span = Span { start: self.tokens.len(), len: ids.len() };
        self.tokens.extend_from_slice(ids);
        self.positions.extend(0..ids.len() as u32);
        self.spans.push(span);
        span
    }
}

/// What the backward needs from one layer's forward. The normalised inputs of the projections
/// and the SwiGLU output are recomputed instead (O(T·hidden) each).
struct LayerTape {
    x: Vec<f32>,
    inv1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    inv2: Vec<f32>,
    gate_up: Vec<f32>,
    /// `σ(gate)`.
    sig: Vec<f32>,
    /// `t = drop(x)·Aᵀ` of each trained projection, by [`ProjKind`].
    lora_t: [Vec<f32>; 7],
}

/// The forward's saved state, consumed by [`BaseModel::backward`].
pub struct Tape {
    layers: Vec<LayerTape>,
    x_last: Vec<f32>,
    inv_last: Vec<f32>,
    /// `[targets, vocab]` logits of the target rows, and their log-sum-exp.
    logits: Vec<f32>,
    lse: Vec<f32>,
}

/// The trainable adapter as the forward sees it.
#[derive(Clone, Copy)]
pub struct Adapter<'a> {
    pub layout: &'a LoraLayout,
    pub params: &'a [f32],
    /// Training: dropout with this step's seed. Evaluation: none.
    pub dropout: Option<Dropout>,
}

impl BaseModel {
    /// Reads every tensor as f32 (GGUF quantized types dequantized) and merges `frozen`
    /// adapters into the projections.
    pub fn load(cfg: ModelConfig, src: &mut dyn WeightSource, frozen: &[PeftFile]) -> Result<Self, TrainError> {
        cfg.validate()?;
        let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let mut read = |name: WeightName, dims: &[usize]| -> Result<Option<Vec<f32>>, TrainError> {
            let Some(raw) = src.load(name, &Device::Cpu)? else { return Ok(None) };
            if raw.dims() != dims {
                return Err(crate::model::ModelError::ShapeMismatch {
                    tensor: name.hf(),
                    expected: dims.to_vec(),
                    got: raw.dims(),
                }
                .into());
            }
            Ok(Some(raw.to_f32_cpu()?.flatten_all()?.to_vec1::<f32>()?))
        };
        let missing = |name: WeightName| TrainError::Model(crate::model::ModelError::MissingTensor(name.hf()));
        let mut req = |name: WeightName, dims: &[usize]| read(name, dims)?.ok_or_else(|| missing(name));

        let embed = req(WeightName::Embed, &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_embeddings { None } else { Some(req(WeightName::LmHead, &[cfg.vocab_size, h])?) };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let mut proj = |k: ProjKind, out: usize, inp: usize| req(WeightName::Proj(l, k), &[out, inp]);
            let mut qkv = proj(ProjKind::Q, q, h)?;
            qkv.extend(proj(ProjKind::K, kv, h)?);
            qkv.extend(proj(ProjKind::V, kv, h)?);
            let o = proj(ProjKind::O, h, q)?;
            let mut gate_up = proj(ProjKind::Gate, f, h)?;
            gate_up.extend(proj(ProjKind::Up, f, h)?);
            let down = proj(ProjKind::Down, h, f)?;
            let qkv_bias = if cfg.qkv_bias {
                let mut b = req(WeightName::Bias(l, ProjKind::Q), &[q])?;
                b.extend(req(WeightName::Bias(l, ProjKind::K), &[kv])?);
                b.extend(req(WeightName::Bias(l, ProjKind::V), &[kv])?);
                Some(b)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: req(WeightName::AttnNorm(l), &[h])?,
                qkv,
                qkv_bias,
                o,
                ffn_norm: req(WeightName::FfnNorm(l), &[h])?,
                gate_up,
                down,
            });
        }
        let norm = req(WeightName::OutputNorm, &[h])?;
        let mut model = Self { inv_freqs: cfg.rope_inv_freqs(), cfg, embed, lm_head, layers, norm };
        for adapter in frozen {
            model.merge(adapter);
        }
        Ok(model)
    }

    /// `W += scale · B A` for every module of a frozen adapter (already validated against this
    /// configuration by [`crate::adapters::peft::read`]).
    fn merge(&mut self, adapter: &PeftFile) {
        for m in &adapter.modules {
            let (in_f, out_f) = crate::model::lora::proj_dims(&self.cfg, m.kind);
            let (weight, row0) = self.weight_rows(m.layer, m.kind);
            let rows = &mut weight[row0 * in_f..(row0 + out_f) * in_f];
            ops::matmul(
                rows,
                in_f,
                ops::Mat::new(&m.b, out_f, m.rank),
                ops::Mat::new(&m.a, m.rank, in_f),
                m.scale,
                true,
                ops::Threads::All,
            );
        }
    }

    /// The stacked weight a projection lives in, and its first row there.
    fn weight_rows(&mut self, layer: usize, kind: ProjKind) -> (&mut Vec<f32>, usize) {
        let (q, kv, f) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.cfg.intermediate_size);
        let l = &mut self.layers[layer];
        match kind {
            ProjKind::Q => (&mut l.qkv, 0),
            ProjKind::K => (&mut l.qkv, q),
            ProjKind::V => (&mut l.qkv, q + kv),
            ProjKind::O => (&mut l.o, 0),
            ProjKind::Gate => (&mut l.gate_up, 0),
            ProjKind::Up => (&mut l.gate_up, f),
            ProjKind::Down => (&mut l.down, 0),
        }
    }

    fn head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape { heads: self.cfg.n_heads, kv_heads: self.cfg.n_kv_heads, head_dim: self.cfg.head_dim }
    }

    /// The output columns of each projection in its fused buffer.
    fn cols(&self, kind: ProjKind) -> Cols {
        let (q, kv, f) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.cfg.intermediate_size);
        let qkv = q + 2 * kv;
        match kind {
            ProjKind::Q => Cols { col: 0, ld: qkv },
            ProjKind::K => Cols { col: q, ld: qkv },
            ProjKind::V => Cols { col: q + kv, ld: qkv },
            ProjKind::O => Cols { col: 0, ld: self.cfg.hidden_size },
            ProjKind::Gate => Cols { col: 0, ld: 2 * f },
            ProjKind::Up => Cols { col: f, ld: 2 * f },
            ProjKind::Down => Cols { col: 0, ld: self.cfg.hidden_size },
        }
    }

    /// The log-probability of each target of `batch`, and the tape for the backward when
    /// `keep_tape` (evaluation passes `false` and keeps nothing).
    pub fn forward(
        &self,
        adapter: Adapter,
        batch: &Batch,
        keep_tape: bool,
    ) -> Result<(Vec<f32>, Option<Tape>), TrainError> {
        let cfg = &self.cfg;
        let (h, t) = (cfg.hidden_size, batch.tokens.len());
        if let Some(&bad) = batch.tokens.iter().find(|&&tok| tok as usize >= cfg.vocab_size) {
            return Err(TrainError::Invalid(format!("token id {bad} outside the vocabulary of {}", cfg.vocab_size)));
        }
        let rope = RopeRows::new(&batch.positions, &self.inv_freqs, cfg.rope_style);
        let mut x = vec![0f32; t * h];
        x.par_chunks_mut(h).zip(batch.tokens.par_iter()).for_each(|(row, &tok)| {
            row.copy_from_slice(&self.embed[tok as usize * h..][..h]);
        });
        let mut tapes = Vec::with_capacity(if keep_tape { cfg.n_layers } else { 0 });
        for (l, layer) in self.layers.iter().enumerate() {
            let (next, tape) = self.layer_forward(l, layer, x, adapter, batch, &rope);
            x = next;
            if keep_tape {
                tapes.push(tape);
            }
        }
        let (hidden, inv_last) = ops::rms_norm(&x, &self.norm, cfg.rms_eps);
        let picked: Vec<f32> =
            batch.targets.iter().flat_map(|&(row, _)| &hidden[row * h..(row + 1) * h]).copied().collect();
        let r = batch.targets.len();
        let mut logits = ops::linear(&picked, r, self.head(), cfg.vocab_size, h);
        let v = cfg.vocab_size;
        let mut lse = vec![0f32; r];
        let mut logp = vec![0f32; r];
        logits
            .par_chunks_mut(v)
            .zip(lse.par_iter_mut())
            .zip(logp.par_iter_mut())
            .zip(batch.targets.par_iter())
            .for_each(|(((row, lse), logp), &(_, target))| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
                *lse = max + sum.ln();
                *logp = row[target as usize] - *lse;
            });
        let tape = keep_tape.then_some(Tape { layers: tapes, x_last: x, inv_last, logits, lse });
        Ok((logp, tape))
    }

    fn layer_forward(
        &self,
        l: usize,
        layer: &Layer,
        x: Vec<f32>,
        adapter: Adapter,
        batch: &Batch,
        rope: &RopeRows,
    ) -> (Vec<f32>, LayerTape) {
        let cfg = &self.cfg;
        let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let t = batch.tokens.len();
        let mut lora_t: [Vec<f32>; 7] = Default::default();
        let mut project = |kind: ProjKind, input: &[f32], y: &mut [f32]| {
            if let Some(slot) = adapter.layout.slot(l, kind) {
                lora_t[kind as usize] =
                    lora::forward(slot, adapter.params, input, t, y, self.cols(kind), adapter.dropout);
            }
        };

        let (h1, inv1) = ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps);
        let mut qkv = ops::linear(&h1, t, &layer.qkv, q + 2 * kv, h);
        if let Some(b) = &layer.qkv_bias {
            qkv.par_chunks_mut(q + 2 * kv).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        for kind in [ProjKind::Q, ProjKind::K, ProjKind::V] {
            project(kind, &h1, &mut qkv);
        }
        drop(h1);
        let (mut qs, mut ks, vs) = split_qkv(&qkv, q, kv);
        drop(qkv);
        ops::rope(&mut qs, cfg.n_heads, rope, false);
        ops::rope(&mut ks, cfg.n_kv_heads, rope, false);
        let (attn, lse) = ops::attention(&qs, &ks, &vs, &batch.spans, self.attn_shape());
        let mut o = ops::linear(&attn, t, &layer.o, h, q);
        project(ProjKind::O, &attn, &mut o);
        let mut x_mid = o;
        x_mid.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y += x);

        let (h2, inv2) = ops::rms_norm(&x_mid, &layer.ffn_norm, cfg.rms_eps);
        let mut gate_up = ops::linear(&h2, t, &layer.gate_up, 2 * f, h);
        project(ProjKind::Gate, &h2, &mut gate_up);
        project(ProjKind::Up, &h2, &mut gate_up);
        drop(h2);
        let (act, sig) = ops::swiglu(&gate_up, f);
        let mut out = ops::linear(&act, t, &layer.down, h, f);
        project(ProjKind::Down, &act, &mut out);
        out.par_iter_mut().zip(x_mid.par_iter()).for_each(|(y, &x)| *y += x);
        let tape = LayerTape { x, inv1, q: qs, k: ks, v: vs, attn, lse, x_mid, inv2, gate_up, sig, lora_t };
        (out, tape)
    }

    /// The logits of the next token after `ids` (the whole vocabulary; for checks against the
    /// serving path and for evaluation).
    pub fn next_token_logits(&self, adapter: Adapter, ids: &[u32]) -> Result<Vec<f32>, TrainError> {
        let mut batch = Batch::default();
        let span = batch.push_sequence(ids);
        batch.targets.push((span.start + span.len - 1, 0));
        let (_, tape) = self.forward(adapter, &batch, true)?;
        Ok(tape.expect("kept").logits)
    }

    /// Adds to `grads` (the layout of `adapter.params`) the gradient of `Σ coef[i] · logp[i]`
    /// over the targets of `batch`, from the tape of its forward.
    pub fn backward(&self, adapter: Adapter, batch: &Batch, tape: Tape, coef: &[f32], grads: &mut [f32]) {
        let cfg = &self.cfg;
        let (h, v, t) = (cfg.hidden_size, cfg.vocab_size, batch.tokens.len());
        let Tape { mut layers, x_last, inv_last, mut logits, lse } = tape;
        // d logp / d logits = onehot(target) − softmax, scaled by each row's coefficient.
        logits.par_chunks_mut(v).zip(lse.par_iter()).zip(coef.par_iter()).zip(batch.targets.par_iter()).for_each(
            |(((row, &lse), &c), &(_, target))| {
                for z in row.iter_mut() {
                    *z = -c * (*z - lse).exp();
                }
                row[target as usize] += c;
            },
        );
        let r = batch.targets.len();
        let mut picked = vec![0f32; r * h];
        ops::matmul(
            &mut picked,
            h,
            ops::Mat::new(&logits, r, v),
            ops::Mat::new(self.head(), v, h),
            1.0,
            false,
            ops::Threads::All,
        );
        drop(logits);
        let mut dhidden = vec![0f32; t * h];
        for (i, &(row, _)) in batch.targets.iter().enumerate() {
            dhidden[row * h..(row + 1) * h].iter_mut().zip(&picked[i * h..(i + 1) * h]).for_each(|(d, g)| *d += g);
        }
        let mut dx = vec![0f32; t * h];
        ops::rms_norm_backward(&mut dx, &dhidden, &x_last, &inv_last, &self.norm);
        drop((dhidden, x_last));
        let rope = RopeRows::new(&batch.positions, &self.inv_freqs, cfg.rope_style);
        for l in (0..cfg.n_layers).rev() {
            let tape = layers.pop().expect("one tape per layer");
            dx = self.layer_backward(l, &self.layers[l], tape, dx, adapter, batch, &rope, grads, l > 0);
        }
    }

    /// One layer's backward: from the gradient of its output to the gradient of its input (not
    /// computed for the first layer, whose input is the frozen embedding).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        layer: &Layer,
        tape: LayerTape,
        dout: Vec<f32>,
        adapter: Adapter,
        batch: &Batch,
        rope: &RopeRows,
        grads: &mut [f32],
        want_dx: bool,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let (h, q, kv, f) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let t = batch.tokens.len();
        let LayerTape { x, inv1, q: qs, k: ks, v: vs, attn, lse, x_mid, inv2, gate_up, sig, lora_t } = tape;
        let slot = |kind: ProjKind| adapter.layout.slot(l, kind);
        let lora_back = |s: &Slot, input: &[f32], dy: &[f32], grads: &mut [f32], dx: Option<&mut [f32]>| {
            let kind = s.kind;
            lora::backward(
                s,
                adapter.params,
                grads,
                input,
                &lora_t[kind as usize],
                t,
                dy,
                self.cols(kind),
                adapter.dropout,
                dx,
            );
        };

        // MLP: out = x_mid + down(swiglu(gate_up(norm(x_mid)))).
        let act = ops::swiglu_apply(&gate_up, &sig, f);
        let mut dact = vec![0f32; t * f];
        ops::linear_backward_input(&mut dact, &dout, t, &layer.down, h, f);
        if let Some(s) = slot(ProjKind::Down) {
            lora_back(s, &act, &dout, grads, Some(dact.as_mut_slice()));
        }
        drop(act);
        let dgu = ops::swiglu_backward(&dact, &gate_up, &sig, f);
        drop((dact, gate_up, sig));
        let h2 = ops::rms_norm_apply(&x_mid, &inv2, &layer.ffn_norm);
        let mut dh2 = vec![0f32; t * h];
        ops::linear_backward_input(&mut dh2, &dgu, t, &layer.gate_up, 2 * f, h);
        for kind in [ProjKind::Gate, ProjKind::Up] {
            if let Some(s) = slot(kind) {
                lora_back(s, &h2, &dgu, grads, Some(dh2.as_mut_slice()));
            }
        }
        drop((h2, dgu));
        let mut dmid = dout;
        ops::rms_norm_backward(&mut dmid, &dh2, &x_mid, &inv2, &layer.ffn_norm);
        drop((dh2, x_mid));

        // Attention: x_mid = x + o(attention(rope(q), rope(k), v)).
        let mut dattn = vec![0f32; t * q];
        ops::linear_backward_input(&mut dattn, &dmid, t, &layer.o, h, q);
        if let Some(s) = slot(ProjKind::O) {
            lora_back(s, &attn, &dmid, grads, Some(dattn.as_mut_slice()));
        }
        let (mut dq, mut dk, dv) =
            ops::attention_backward(&dattn, &qs, &ks, &vs, &attn, &lse, &batch.spans, self.attn_shape());
        drop((dattn, qs, ks, vs, attn, lse));
        ops::rope(&mut dq, cfg.n_heads, rope, true);
        ops::rope(&mut dk, cfg.n_kv_heads, rope, true);
        let dqkv = join_qkv(&dq, &dk, &dv, q, kv);
        drop((dq, dk, dv));
        let h1 = ops::rms_norm_apply(&x, &inv1, &layer.attn_norm);
        let mut dh1 = if want_dx { vec![0f32; t * h] } else { Vec::new() };
        if want_dx {
            ops::linear_backward_input(&mut dh1, &dqkv, t, &layer.qkv, q + 2 * kv, h);
        }
        for kind in [ProjKind::Q, ProjKind::K, ProjKind::V] {
            if let Some(s) = slot(kind) {
                lora_back(s, &h1, &dqkv, grads, want_dx.then_some(dh1.as_mut_slice()));
            }
        }
        if !want_dx {
            return Vec::new();
        }
        let mut dx = dmid;
        ops::rms_norm_backward(&mut dx, &dh1, &x, &inv1, &layer.attn_norm);
        dx
    }
}

fn split_qkv(qkv: &[f32], q: usize, kv: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = q + 2 * kv;
    let rows = qkv.len() / w;
    let (mut qs, mut ks, mut vs) =
        (Vec::with_capacity(rows * q), Vec::with_capacity(rows * kv), Vec::with_capacity(rows * kv));
    for row in qkv.chunks_exact(w) {
        qs.extend_from_slice(&row[..q]);
        ks.extend_from_slice(&row[q..q + kv]);
        vs.extend_from_slice(&row[q + kv..]);
    }
    (qs, ks, vs)
}

fn join_qkv(dq: &[f32], dk: &[f32], dv: &[f32], q: usize, kv: usize) -> Vec<f32> {
    let rows = dq.len() / q;
    let mut out = Vec::with_capacity(rows * (q + 2 * kv));
    for i in 0..rows {
        out.extend_from_slice(&dq[i * q..(i + 1) * q]);
        out.extend_from_slice(&dk[i * kv..(i + 1) * kv]);
        out.extend_from_slice(&dv[i * kv..(i + 1) * kv]);
    }
    out
}
