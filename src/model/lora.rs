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
    /// `a: [r, in]` and `b: [out, r]` tile-packed as f16 for the CPU kernels (f32 arithmetic).
    /// Q8_0 factors with int8 activations were measured slower: quantizing the activations of
    /// every (adapter, projection) costs more than the halved bytes save at ranks like 16.
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

    /// The packed factors (CPU kernels).
    fn packed(&self) -> (&PackedMatrix, &PackedMatrix) {
        match &self.factors {
            LoraFactors::Packed { a, b } => (a, b),
            LoraFactors::Tensors { .. } => unreachable!("host deltas run on packed factors"),
        }
    }
}

/// The LoRA work of one step, in the form of the backend that runs it.
pub enum StepLora {
    /// Adapters and row ranges for the CPU kernels.
    Host(LoraBatch),
    /// Stacked tensors and a row mask for the candle path.
    Stacked(StackedStep),
}

impl StepLora {
    /// The step's delta for the fused projection `parts` of `layer`, added to `y = x·Wᵀ`, on the
    /// candle path.
    pub fn apply_tensor(
        &self,
        layer: usize,
        parts: &[(ProjKind, Range<usize>)],
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        match self {
            Self::Stacked(s) => s.apply(layer, parts, x, y),
            Self::Host(_) => Err(ModelError::Config("packed LoRA factors on the candle backend".into())),
        }
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

    /// The CPU path: the per-row deltas of the fused projection `parts` at `layer`, as work
    /// that rides inside the base matmul's own launch. Step one ("shrink", as Punica's SGMV):
    /// `t = x Aᵀ` for every (adapter, projection), run as the launch's first work items
    /// ([`Epilogue::run_pre`](kernels::matmul::Epilogue::run_pre)). Step two ("expand",
    /// `scale · t Bᵀ`) is the matmul's epilogue: each output tile gets its deltas while it is
    /// computed. So one projection with any number of adapters costs one thread hand-off, like
    /// the plain matmul; a separate shrink launch cost ~2 µs per projection, and a singleton
    /// shrink (one row, one part: `o`, `down`) left the second thread idle. Launching per adapter
    /// and per projection cost ~20% of decode speed with one adapter. `None`: no adapter touches
    /// these projections.
    pub fn shrink_host<'a>(
        &'a self,
        layer: usize,
        parts: &'a [(ProjKind, Range<usize>)],
        x: &'a [f32],
        in_features: usize,
    ) -> Option<HostDeltas<'a>> {
        use kernels::matmul::MR;
        use kernels::packed::TILE;

        let mut uses: Vec<HostUse> = Vec::with_capacity(self.uses.len());
        let mut t_len = 0;
        for (w, ranges) in &self.uses {
            let slots = &w.layers[layer];
            let m: usize = ranges.iter().map(|r| r.len()).sum();
            let mut pairs = Vec::new();
            for (pi, (kind, _)) in parts.iter().enumerate() {
                if let Some(p) = &slots[*kind as usize] {
                    pairs.push(HostPair { part: pi, pair: p, off: t_len });
                    t_len += m * p.rank;
                }
            }
            if pairs.is_empty() {
                continue;
            }
            // The adapter's input rows, gathered unless they are one run.
            let input = match ranges.as_slice() {
                [r] => std::borrow::Cow::Borrowed(&x[r.start * in_features..r.end * in_features]),
                _ => std::borrow::Cow::Owned(
                    ranges.iter().flat_map(|r| &x[r.start * in_features..r.end * in_features]).copied().collect(),
                ),
            };
            uses.push(HostUse { ranges, m, pairs, input });
        }
        if uses.is_empty() {
            return None;
        }
        // Shrink items: (adapter, part, block of MR rows), so several rows spread over the
        // threads even when one adapter has one projection here.
        let items: Vec<(usize, usize, usize)> = uses
            .iter()
            .enumerate()
            .flat_map(|(u, h)| (0..h.pairs.len()).flat_map(move |j| (0..h.m.div_ceil(MR)).map(move |b| (u, j, b))))
            .collect();
        // Fused parts start on tile boundaries (`Linear::fuse` insists), so every output tile
        // belongs to one part and the deltas can ride on the matmul's tiles.
        debug_assert!(parts.iter().all(|(_, c)| c.start % TILE == 0));
        let mut t = vec![0f32; t_len].into_boxed_slice();
        let t_ptr = kernels::pool::SyncPtr::new(t.as_mut_ptr());
        Some(HostDeltas { parts, uses, items, _t: t, t_ptr, t_len })
    }
}

/// One adapter of a step at one layer: its rows, its input rows and its pairs for the fused
/// parts.
struct HostUse<'a> {
    ranges: &'a [Range<usize>],
    m: usize,
    pairs: Vec<HostPair<'a>>,
    input: std::borrow::Cow<'a, [f32]>,
}

/// One (adapter, part): where its `t = x Aᵀ` rows (`rank` floats each) live in the buffer.
struct HostPair<'a> {
    part: usize,
    pair: &'a LoraPair,
    off: usize,
}

/// `n` consecutive rows, starting at row `t_row0` of an adapter's `t` and row `out_row0` of
/// the output tile.
#[derive(Clone, Copy)]
struct RowRun {
    t_row0: usize,
    out_row0: usize,
    n: usize,
}

/// The LoRA work of one fused projection, run inside its matmul: the shrink items first, then
/// the expansion of every output tile.
pub struct HostDeltas<'a> {
    parts: &'a [(ProjKind, Range<usize>)],
    uses: Vec<HostUse<'a>>,
    items: Vec<(usize, usize, usize)>,
    /// Owns the shrunk activations `t`; all access goes through `t_ptr` (taken from the owned
    /// buffer before any sharing): shrink items write disjoint parts of it, and the matmul
    /// starts epilogues only after every shrink item has finished.
    _t: Box<[f32]>,
    t_ptr: kernels::pool::SyncPtr<f32>,
    t_len: usize,
}

type Tile = [[f32; kernels::packed::TILE]; kernels::matmul::MR];

impl HostDeltas<'_> {
    /// Shrink item `item`: `t = x Aᵀ` for one (adapter, part, block of rows).
    fn shrink(&self, item: usize) {
        use kernels::matmul::{MR, float_tile};
        use kernels::packed::TILE;
        let (u, j, block) = self.items[item];
        let h = &self.uses[u];
        let p = &h.pairs[j];
        let (a, _) = p.pair.packed();
        let mut buf = [[0f32; TILE]; MR];
        let row0 = block * MR;
        let rows = (h.m - row0).min(MR);
        for tile in 0..a.n_tiles() {
            float_tile(a, &h.input, tile, row0, rows, &mut buf);
            let cols = (p.pair.rank - tile * TILE).min(TILE);
            for (i, vals) in buf.iter().enumerate().take(rows) {
                // SAFETY: each (adapter, part, row block) item writes its own rows of `t`, inside
                // `t_len` (offsets were laid out in `shrink_host`); nothing reads `t` before the
                // matmul has seen every shrink item finish.
                unsafe {
                    let dst = self.t_ptr.get().add(p.off + (row0 + i) * p.pair.rank + tile * TILE);
                    std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, cols);
                }
            }
        }
    }

    /// The shrunk activations; only valid once every shrink item has run.
    fn t(&self) -> &[f32] {
        // SAFETY: called from the epilogue, which the matmul runs only after all shrink items
        // (the only writers) have finished; the buffer lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.t_ptr.get(), self.t_len) }
    }

    /// Adds `p`'s delta for output tile `local_tile` of its part to `out`, for `rows`: pairs
    /// (row of `t`, row of `out`), consecutive in both.
    fn add_run(&self, p: &HostPair, m: usize, local_tile: usize, run: RowRun, out: &mut Tile) {
        let RowRun { t_row0, out_row0, n } = run;
        use kernels::matmul::{MR, add_f16_tile_rows};
        let (_, b) = p.pair.packed();
        let rows: [(usize, usize); MR] = std::array::from_fn(|i| (t_row0 + i.min(n - 1), out_row0 + i.min(n - 1)));
        let r = p.pair.rank;
        add_f16_tile_rows(b, local_tile, &self.t()[p.off..p.off + m * r], &rows[..n], p.pair.scale, out);
    }

    /// Adds the deltas of rows `row0..row0 + rows` for output tile `tile` into `out` (whose
    /// row `i` is row `row0 + i`).
    fn add_tile(&self, tile: usize, row0: usize, rows: usize, out: &mut Tile) {
        use kernels::packed::TILE;
        let c0 = tile * TILE;
        let Some(pi) = self.parts.iter().position(|(_, c)| c.contains(&c0)) else { return };
        let local_tile = (c0 - self.parts[pi].1.start) / TILE;
        let block = row0..row0 + rows;
        for h in &self.uses {
            let Some(p) = h.pairs.iter().find(|p| p.part == pi) else { continue };
            // The adapter's runs of rows inside the block.
            let mut idx = 0;
            for r in h.ranges {
                let (lo, hi) = (r.start.max(block.start), r.end.min(block.end));
                if lo < hi {
                    self.add_run(
                        p,
                        h.m,
                        local_tile,
                        RowRun { t_row0: idx + lo - r.start, out_row0: lo - row0, n: hi - lo },
                        out,
                    );
                }
                idx += r.len();
            }
        }
    }
}

impl kernels::matmul::Epilogue for HostDeltas<'_> {
    fn pre_items(&self) -> usize {
        self.items.len()
    }

    fn run_pre(&self, item: usize) {
        self.shrink(item);
    }

    fn apply(&self, tile: usize, row0: usize, rows: usize, out: &mut Tile) {
        self.add_tile(tile, row0, rows, out);
    }
}

/// The adapters of a step stacked for the candle path (any device): per layer and fused
/// projection, one shrink matrix `a: [P·Σr, in]` and one expand matrix `b: [out, P·Σr]` over the
/// concatenated ranks of every adapter (`P` fused parts, `Σr` the sum of the adapters' ranks).
///
/// This is the Punica/S-LoRA "BGMV" idea written with dense ops: every row is shrunk by all the
/// step's adapters at once (`t = x·aᵀ`), a per-row mask keeps the columns of the adapters the
/// row uses (none, one, or several: their deltas then sum), and one expansion `t·bᵀ` adds the
/// deltas of all parts and adapters. Two matmuls per projection whatever the mix of adapters, no
/// per-row or per-adapter launch; the price is `Σr` instead of one adapter's rank in the thin
/// inner dimension, small next to the base projection while few adapters share a step.
///
/// The scale is folded into `b`; adapters whose ranks differ between modules are padded with
/// zeros to their largest rank, and a module an adapter lacks is zeros.
pub struct LoraStack {
    /// The adapters in column order: the stack's identity (see [`Self::holds`]).
    adapters: Vec<Arc<LoraWeights>>,
    /// Columns of each adapter in the stacked rank dimension.
    ranks: Vec<usize>,
    /// Per layer, indexed by the first part of a fused projection.
    layers: Vec<[Option<(Tensor, Tensor)>; 7]>,
}

/// A fused projection as [`LoraStack::build`] needs it: its parts and input size.
pub struct StackTarget<'a> {
    pub parts: &'a [(ProjKind, Range<usize>)],
    pub in_features: usize,
}

impl LoraStack {
    /// Stacks `adapters` (tensor factors) for the projections `layers[l]` of each layer.
    pub fn build(adapters: Vec<Arc<LoraWeights>>, layers: &[Vec<StackTarget>], device: &Device) -> Result<Self> {
        let ranks: Vec<usize> =
            adapters.iter().map(|w| w.layers.iter().flatten().flatten().map(|p| p.rank).max().unwrap_or(0)).collect();
        let mut stacked = Vec::with_capacity(layers.len());
        for (l, targets) in layers.iter().enumerate() {
            let mut slots: [Option<(Tensor, Tensor)>; 7] = Default::default();
            for t in targets {
                slots[t.parts[0].0 as usize] = Self::stack_projection(&adapters, &ranks, l, t, device)?;
            }
            stacked.push(slots);
        }
        Ok(Self { adapters, ranks, layers: stacked })
    }

    /// `(a, b)` of one fused projection, or `None` when no adapter touches it.
    fn stack_projection(
        adapters: &[Arc<LoraWeights>],
        ranks: &[usize],
        layer: usize,
        target: &StackTarget,
        device: &Device,
    ) -> Result<Option<(Tensor, Tensor)>> {
        fn pair(w: &LoraWeights, layer: usize, kind: ProjKind) -> Option<&LoraPair> {
            w.layers.get(layer).and_then(|s| s[kind as usize].as_ref())
        }
        if !adapters.iter().any(|w| target.parts.iter().any(|(k, _)| pair(w, layer, *k).is_some())) {
            return Ok(None);
        }
        let total: usize = ranks.iter().sum();
        let n_parts = target.parts.len();
        let mut a_blocks = Vec::with_capacity(n_parts * adapters.len());
        let mut b_rows = Vec::with_capacity(n_parts);
        for (p, (kind, cols)) in target.parts.iter().enumerate() {
            let out = cols.len();
            let mut b_blocks = Vec::with_capacity(adapters.len() + 2);
            if p > 0 {
                b_blocks.push(Tensor::zeros((out, p * total), DType::F32, device)?);
            }
            for (w, &r) in adapters.iter().zip(ranks) {
                match pair(w, layer, *kind) {
                    Some(pair) => {
                        let LoraFactors::Tensors { a, b } = &pair.factors else {
                            return Err(ModelError::Config("packed LoRA factors on the candle backend".into()));
                        };
                        a_blocks.push(a.pad_with_zeros(0, 0, r - pair.rank)?);
                        b_blocks.push((b * pair.scale as f64)?.pad_with_zeros(1, 0, r - pair.rank)?);
                    }
                    None => {
                        a_blocks.push(Tensor::zeros((r, target.in_features), DType::F32, device)?);
                        b_blocks.push(Tensor::zeros((out, r), DType::F32, device)?);
                    }
                }
            }
            if p + 1 < n_parts {
                b_blocks.push(Tensor::zeros((out, (n_parts - 1 - p) * total), DType::F32, device)?);
            }
            b_rows.push(Tensor::cat(&b_blocks, 1)?);
        }
        Ok(Some((Tensor::cat(&a_blocks, 0)?, Tensor::cat(&b_rows, 0)?)))
    }

    /// True when this stack is of exactly `adapters`, in this order.
    pub fn holds(&self, adapters: &[Arc<LoraWeights>]) -> bool {
        self.adapters.len() == adapters.len() && self.adapters.iter().zip(adapters).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// A [`LoraStack`] with the step's row mask.
pub struct StackedStep {
    stack: Arc<LoraStack>,
    /// `[rows, 1, Σr]`: 1 in the columns of the adapters each row uses.
    mask: Tensor,
}

impl StackedStep {
    /// `row_adapters[r]`: indices (into the stack's adapters) of the adapters of packed row `r`.
    pub fn new(stack: Arc<LoraStack>, row_adapters: &[&[usize]], device: &Device) -> Result<Self> {
        let total: usize = stack.ranks.iter().sum();
        let offsets: Vec<usize> =
            stack.ranks.iter().scan(0, |acc, &r| Some(std::mem::replace(acc, *acc + r))).collect();
        let mut mask = vec![0f32; row_adapters.len() * total];
        for (row, used) in mask.chunks_exact_mut(total.max(1)).zip(row_adapters) {
            // An adapter listed twice counts twice, as on the CPU kernels.
            for &k in *used {
                row[offsets[k]..offsets[k] + stack.ranks[k]].iter_mut().for_each(|m| *m += 1.0);
            }
        }
        let mask = Tensor::from_vec(mask, (row_adapters.len(), 1, total), device)?;
        Ok(Self { stack, mask })
    }

    fn apply(&self, layer: usize, parts: &[(ProjKind, Range<usize>)], x: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some((a, b)) = self.stack.layers.get(layer).and_then(|s| s[parts[0].0 as usize].as_ref()) else {
            return Ok(y);
        };
        let rows = x.dim(0)?;
        let total = self.mask.dim(2)?;
        let t = x.matmul(&a.t()?)?.reshape((rows, parts.len(), total))?.broadcast_mul(&self.mask)?;
        let delta = t.reshape((rows, parts.len() * total))?.matmul(&b.t()?)?;
        let delta = delta.to_dtype(y.dtype())?;
        Ok((y + delta)?)
    }
}
