//! `y = x · Wᵀ` for a few (decode) to a few hundred (prefill) activation rows against a
//! [`PackedMatrix`].
//!
//! Quantized formats first quantize the activations to 8 bits per 32-block (llama.cpp's Q8_0 /
//! Q8_1 scheme: an f16 scale, 32 × i8 and the block's sum), then run integer dot products. Scales
//! are rounded through f16 exactly as GGUF's Q8_1 blocks store them, so our integer sums are
//! llama.cpp's and candle's, and results differ from theirs only by float summation order (the
//! parity test relies on it). Every instruction set computes the same integer sums (the
//! [`KernelSet`] entries); tests check each against the portable one.
//!
//! Work is split across the kernel pool by tiles of 16 output rows; each tile is processed for up
//! to [`MR`] activation rows at once so its weights are read from memory once per step.

use super::packed::{PackedFormat, PackedMatrix, QBLOCK, TILE};
use super::pool::{self, split_range};
use super::{Isa, KernelSet, Tile, kernel_set};
use half::f16;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Activation rows processed together against one tile (register blocking).
pub const MR: usize = 4;

/// How activations are rounded before the integer dot products with quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActPrecision {
    /// 8 bits per block of 32 (llama.cpp's and candle's Q8_1 scheme): the least arithmetic.
    #[default]
    Int8,
    /// 16 bits per block of 32: rounding 256× finer, next-token distributions within ~1e-5
    /// nats of exact f32 arithmetic, for about twice the integer work.
    Int16,
}

impl ActPrecision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Int16 => "int16",
        }
    }
}

impl std::str::FromStr for ActPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" | "8" => Ok(Self::Int8),
            "int16" | "16" => Ok(Self::Int16),
            _ => Err(format!("unknown activation precision {s:?} (int8, int16)")),
        }
    }
}

/// The process-wide activation precision (0 = not chosen yet).
static PRECISION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the activation precision of every later quantized matmul (start-up, benchmarks).
pub fn set_act_precision(p: ActPrecision) {
    PRECISION.store(p as u8 + 1, Ordering::Release);
}

/// The process-wide activation precision: set by [`set_act_precision`], else `LETHE_ACTIVATIONS`
/// (`int8`/`int16`), else the default. An unknown `LETHE_ACTIVATIONS` panics here; programs check
/// it at start-up with [`act_precision_from_env`].
pub fn act_precision() -> ActPrecision {
    match PRECISION.load(Ordering::Acquire) {
        1 => ActPrecision::Int8,
        2 => ActPrecision::Int16,
        _ => {
            let p = act_precision_from_env().unwrap_or_else(|e| panic!("{e}"));
            set_act_precision(p);
            p
        }
    }
}

/// The precision `LETHE_ACTIVATIONS` asks for (the default when unset).
pub fn act_precision_from_env() -> Result<ActPrecision, String> {
    match std::env::var("LETHE_ACTIVATIONS") {
        Ok(v) => v.parse().map_err(|e| format!("LETHE_ACTIVATIONS: {e}")),
        Err(_) => Ok(ActPrecision::default()),
    }
}

/// How far ahead of the block being multiplied the quantized kernels ask for weights, in bytes
/// (0: not at all). A decode step streams ~90 MB of weights that no cache holds; the hardware
/// prefetcher alone leaves the kernels waiting on memory, and asking 4 KiB ahead made a decode
/// step 10–20 % faster on an Intel Xeon (docs/BENCHMARKS.md, "Prefetching the weights").
/// The best distance depends on the CPU's memory latency: `lethe bench decode --prefetch-bytes
/// 0,2048,4096,8192` measures it.
pub const DEFAULT_PREFETCH_BYTES: usize = 4096;

/// Upper bound of the setting: far past any useful distance (a prefetch that arrives after
/// its line was evicted again is wasted bandwidth).
pub const MAX_PREFETCH_BYTES: usize = 1 << 20;

static PREFETCH_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_PREFETCH_BYTES);

/// Sets the weight prefetch distance of every later quantized matmul (start-up, benchmarks).
pub fn set_prefetch_bytes(bytes: usize) {
    PREFETCH_BYTES.store(bytes.min(MAX_PREFETCH_BYTES), Ordering::Relaxed);
}

/// The weight prefetch distance in bytes (see [`DEFAULT_PREFETCH_BYTES`]).
pub fn prefetch_bytes() -> usize {
    PREFETCH_BYTES.load(Ordering::Relaxed)
}

/// The distance `LETHE_PREFETCH_BYTES` asks for (the default when unset).
pub fn prefetch_bytes_from_env() -> Result<usize, String> {
    match std::env::var("LETHE_PREFETCH_BYTES") {
        Ok(v) => parse_prefetch_bytes(&v).map_err(|e| format!("LETHE_PREFETCH_BYTES: {e}")),
        Err(_) => Ok(DEFAULT_PREFETCH_BYTES),
    }
}

/// A prefetch distance: a byte count from 0 to [`MAX_PREFETCH_BYTES`].
pub fn parse_prefetch_bytes(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_PREFETCH_BYTES => Ok(n),
        Ok(n) => Err(format!("{n} bytes is more than the maximum of {MAX_PREFETCH_BYTES}")),
        Err(_) => Err(format!("{s:?} is not a byte count (e.g. 4096, or 0 for none)")),
    }
}

/// Activations quantized per block of 32, to 8 or 16 bits.
pub struct QuantizedActs {
    pub m: usize,
    pub k: usize,
    pub precision: ActPrecision,
    /// 8-bit values (`Int8`), `[m, k]`.
    pub qs: Vec<i8>,
    /// 16-bit values (`Int16`, for kernel sets without `split16`), `[m, k]`, each group of 4
    /// inputs stored as `[0, 2, 1, 3]`: the pairs that 16-bit multiply-adds combine.
    pub qs16: Vec<i16>,
    /// The 16-bit values split into bytes (`Int16`, for kernel sets with `split16`), `[m, k]` in
    /// input order: `q = 256·hi +
    /// lo`, `hi` signed and `lo` unsigned. With `vpdpbusd` (u8 × i8), a 4-bit or 8-bit weight
    /// times a 16-bit activation is two 8-bit products, `w·hi` and `lo·w`, that need no
    /// unpacking of the weights into 16-bit lanes (see `q4_1_rows16` in avx512.rs).
    pub hi: Vec<i8>,
    pub lo: Vec<u8>,
    /// `Σ hi` per (row, block) (`Int16`): Q8_0's stored weights are `w + 128`.
    pub hi_sums: Vec<i32>,
    /// Scale per (row, block).
    pub d: Vec<f32>,
    /// Integer sum of the block's quants per (row, block) (`Int8`).
    pub sums: Vec<i32>,
    /// `d · sum` per (row, block): the term that multiplies a Q4_1 block's minimum. Rounded
    /// through f16 for `Int8`, as GGUF's Q8_1 stores it.
    pub dsums: Vec<f32>,
}

/// Where input `i` of a block sits in [`QuantizedActs::qs16`]: groups of 4 as `[0, 2, 1, 3]`.
#[inline]
pub(crate) fn q16_index(i: usize) -> usize {
    const SWAP: [usize; 4] = [0, 2, 1, 3];
    i / 4 * 4 + SWAP[i % 4]
}

/// Stores a block of 16-bit values `q` (input order) as `qs16`, in [`q16_index`] order.
fn store_paired16(q: &[i16; QBLOCK], qs16: &mut [i16]) {
    for (dst, src) in qs16.chunks_exact_mut(4).zip(q.chunks_exact(4)) {
        dst.copy_from_slice(&[src[0], src[2], src[1], src[3]]);
    }
    debug_assert!((0..QBLOCK).all(|i| qs16[q16_index(i)] == q[i]));
}

/// Stores a block of 16-bit values `q` (input order) split into high and low bytes. Returns
/// `Σ hi`.
fn store_split16(q: &[i16; QBLOCK], hi: &mut [i8], lo: &mut [u8]) -> i32 {
    // Two plain loops rather than one: each is vectorised by the compiler (this runs for every
    // block of every matmul's input, on one thread when the input is a decode step's).
    for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(q) {
        (*h, *l) = ((v >> 8) as i8, v as u8);
    }
    hi.iter().map(|&h| h as i32).sum()
}

impl QuantizedActs {
    /// Quantizes `x: [m, k]` with the process-wide kernels and precision.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        Self::quantize_with(super::active(), act_precision(), x, m, k)
    }

    fn quantize_with(ks: &KernelSet, precision: ActPrecision, x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k);
        assert!(k.is_multiple_of(QBLOCK));
        let kb = k / QBLOCK;
        let wide = precision == ActPrecision::Int16;
        // 16-bit activations in the one layout this kernel set reads.
        let (paired, split) = (wide && !ks.split16, wide && ks.split16);
        let mut a = Self {
            m,
            k,
            precision,
            qs: vec![0i8; if wide { 0 } else { m * k }],
            qs16: vec![0i16; if paired { m * k } else { 0 }],
            hi: vec![0i8; if split { m * k } else { 0 }],
            lo: vec![0u8; if split { m * k } else { 0 }],
            hi_sums: vec![0i32; if split { m * kb } else { 0 }],
            d: vec![0f32; m * kb],
            sums: vec![0i32; m * kb],
            dsums: vec![0f32; m * kb],
        };
        // Rows are independent: prefill-sized inputs are quantized on the pool.
        let rows_per_chunk =
            if m * k >= 64 * 1024 { m.div_ceil(pool::n_chunks(m, pool::global().n_threads())) } else { m };
        let chunks = m.div_ceil(rows_per_chunk.max(1));
        let (qs, qs16, d, sums, dsums) = (
            pool::SyncPtr::new(a.qs.as_mut_ptr()),
            pool::SyncPtr::new(a.qs16.as_mut_ptr()),
            pool::SyncPtr::new(a.d.as_mut_ptr()),
            pool::SyncPtr::new(a.sums.as_mut_ptr()),
            pool::SyncPtr::new(a.dsums.as_mut_ptr()),
        );
        let (hi, lo, hi_sums) = (
            pool::SyncPtr::new(a.hi.as_mut_ptr()),
            pool::SyncPtr::new(a.lo.as_mut_ptr()),
            pool::SyncPtr::new(a.hi_sums.as_mut_ptr()),
        );
        pool::global().run_chunks(chunks, |c| {
            let rows = c * rows_per_chunk..((c + 1) * rows_per_chunk).min(m);
            for bi in rows.start * kb..rows.end * kb {
                let src = &x[bi * QBLOCK..][..QBLOCK];
                // SAFETY: chunks cover disjoint rows, hence disjoint blocks of every array; the
                // block lengths are what the quantizers need.
                unsafe {
                    let (scale, sum) = if wide {
                        let mut q = [0i16; QBLOCK];
                        let (scale, sum) = (ks.quantize_block16)(src, &mut q);
                        *dsums.get().add(bi) = scale * sum as f32;
                        if split {
                            *hi_sums.get().add(bi) = store_split16(
                                &q,
                                std::slice::from_raw_parts_mut(hi.get().add(bi * QBLOCK), QBLOCK),
                                std::slice::from_raw_parts_mut(lo.get().add(bi * QBLOCK), QBLOCK),
                            );
                        } else {
                            store_paired16(&q, std::slice::from_raw_parts_mut(qs16.get().add(bi * QBLOCK), QBLOCK));
                        }
                        (scale, sum)
                    } else {
                        let dst = std::slice::from_raw_parts_mut(qs.get().add(bi * QBLOCK), QBLOCK);
                        let (scale, sum) = (ks.quantize_block)(src, dst);
                        // As ggml/candle: `s = f16(sum) * f16(d)`, kept in f16.
                        *dsums.get().add(bi) = (f16::from_f32(sum as f32) * f16::from_f32(scale)).to_f32();
                        (scale, sum)
                    };
                    *d.get().add(bi) = scale;
                    *sums.get().add(bi) = sum;
                }
            }
        });
        a
    }
}

/// `x · Wᵀ` into a new `[m, n]` vector.
pub fn matmul_new(w: &PackedMatrix, x: &[f32], m: usize) -> Vec<f32> {
    matmul_new_then(w, x, m, &NoEpilogue)
}

/// [`matmul_new`] with `epilogue` applied to every computed tile before it is stored.
pub fn matmul_new_then(w: &PackedMatrix, x: &[f32], m: usize, epilogue: &(impl Epilogue + ?Sized)) -> Vec<f32> {
    // Zero-filled rather than a slice over uninitialised capacity (unsound even if every
    // element is written before it is read); the fill costs a few µs next to the product.
    let mut y = vec![0f32; m * w.n];
    matmul_with(pool::global(), w, x, m, &mut y, crate::simd::active(), act_precision(), epilogue);
    y
}

/// `y[m, n] = x[m, k] · Wᵀ` using the global kernel pool.
pub fn matmul(w: &PackedMatrix, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_with(pool::global(), w, x, m, y, crate::simd::active(), act_precision(), &NoEpilogue)
}

/// Work fused into a matmul, applied to each freshly computed tile (16 output columns of up to
/// [`MR`] rows) while it is still in registers' reach, e.g. adding LoRA deltas: this costs no
/// extra pass over the output and no extra thread hand-off.
///
/// An epilogue may also bring independent work the tiles depend on (e.g. LoRA's shrink,
/// `t = x Aᵀ`, which the deltas need): the matmul runs those `pre` items as the first work
/// items of its own launch and applies the epilogue to a tile only once all of them are done.
/// The pool claims work items in order, so by the time a participant waits for them they are
/// all being run by someone: the wait cannot deadlock and is short, since the tile's own dot
/// products come first. A pre item that panics counts as finished-and-failed: the tiles waiting
/// for it give up, and the panic reaches the matmul's caller.
pub trait Epilogue: Sync {
    /// `out[r]` holds outputs `16·tile ..` of row `row0 + r`, for `r < rows`.
    fn apply(&self, tile: usize, row0: usize, rows: usize, out: &mut Tile);

    /// How many work items must run before any [`Self::apply`].
    fn pre_items(&self) -> usize {
        0
    }

    /// Runs work item `item < pre_items()`; items are independent of each other.
    fn run_pre(&self, _item: usize) {}
}

/// The plain matmul.
pub struct NoEpilogue;

impl Epilogue for NoEpilogue {
    #[inline(always)]
    fn apply(&self, _: usize, _: usize, _: usize, _: &mut Tile) {}
}

/// Progress of an epilogue's pre items within one launch.
struct PreItems {
    total: usize,
    /// Items finished, whether they returned or panicked.
    done: AtomicUsize,
    failed: AtomicBool,
}

impl PreItems {
    fn run(&self, epilogue: &(impl Epilogue + ?Sized), item: usize) {
        /// Counts the item as done however it ends, so that waiting tiles never spin forever.
        struct Done<'a>(&'a PreItems);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.failed.store(true, Ordering::Release);
                }
                self.0.done.fetch_add(1, Ordering::Release);
            }
        }
        let _done = Done(self);
        epilogue.run_pre(item);
    }

    /// Waits until every item has finished; false if one of them failed (its panic reaches the
    /// caller through the pool).
    fn wait(&self) -> bool {
        // Items are claimed in order: every pre item is already running somewhere.
        while self.done.load(Ordering::Acquire) < self.total {
            std::hint::spin_loop();
        }
        !self.failed.load(Ordering::Acquire)
    }
}

/// [`matmul`] on a given pool, kernel set (which must be one the CPU supports) and activation
/// precision (for quantized weights).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    pool: &pool::ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    isa: Isa,
    precision: ActPrecision,
    epilogue: &(impl Epilogue + ?Sized),
) {
    let ks = kernel_set(isa);
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "matmul: input is not [m, k]");
    assert_eq!(y.len(), m * n, "matmul: output is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let acts = match w.format {
        PackedFormat::F32 | PackedFormat::F16 => None,
        _ => Some(QuantizedActs::quantize_with(ks, precision, x, m, k)),
    };
    let tiles = w.n_tiles();
    let out = pool::SyncPtr::new(y.as_mut_ptr());
    // Tiny products are not worth a thread hand-off.
    let work = m * n * k;
    let chunks = if work < 64 * 1024 { 1 } else { pool::n_chunks(tiles, pool.n_threads()) };
    let pre = PreItems { total: epilogue.pre_items(), done: AtomicUsize::new(0), failed: AtomicBool::new(false) };
    pool.run_chunks(pre.total + chunks, |c| {
        if c < pre.total {
            return pre.run(epilogue, c);
        }
        let c = c - pre.total;
        let mut pre_ready = pre.total == 0;
        let mut buf = [[0f32; TILE]; MR];
        for t in split_range(tiles, c, chunks) {
            let mut row0 = 0;
            while row0 < m {
                let rows = (m - row0).min(MR);
                // SAFETY: `t < tiles`, `rows ≤ MR`, `x` and `acts` hold all `m` rows (asserted
                // above), and `ks` matches `w`'s format in `compute_tile`.
                unsafe { compute_tile(ks, w, x, acts.as_ref(), t, row0, rows, &mut buf) };
                if !pre_ready {
                    if !pre.wait() {
                        return;
                    }
                    pre_ready = true;
                }
                epilogue.apply(t, row0, rows, &mut buf);
                let cols = (n - t * TILE).min(TILE);
                for (r, vals) in buf.iter().enumerate().take(rows) {
                    // SAFETY: tile `t` of rows `row0..row0+rows` is written by this participant only.
                    unsafe {
                        let dst = out.get().add((row0 + r) * n + t * TILE);
                        std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, cols);
                    }
                }
                row0 += rows;
            }
        }
    });
}

/// One tile (16 outputs) of `rows ≤ MR` activation rows starting at `row0`, for float formats
/// (F32/F16), which need no activation quantization: the building block of kernels that
/// schedule their own tiles (e.g. LoRA's grouped shrink/expand).
pub fn float_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    assert!(matches!(w.format, PackedFormat::F32 | PackedFormat::F16), "float_tile needs an F32/F16 matrix");
    assert!((1..=MR).contains(&rows) && (row0 + rows) * w.k <= x.len() && t < w.n_tiles());
    // SAFETY: bounds asserted above; the format selects a matching entry.
    unsafe { compute_tile(super::active(), w, x, None, t, row0, rows, out) }
}

/// `out[o][l] += scale · Σᵢ t[tr·k + i] · B[16·tile + l, i]` for each pair `(tr, o)` of
/// `rows` (`k` = `b.k`): one output tile of an F16 matrix `b`, for a few rows whose inputs sit
/// at rows `tr` of `t`. LoRA's "expand" step fused into the base matmul: `k` is the rank, so the
/// tile (16·k halves) is loaded once and serves every row.
pub fn add_f16_tile_rows(
    b: &PackedMatrix,
    tile: usize,
    t: &[f32],
    rows: &[(usize, usize)],
    scale: f32,
    out: &mut Tile,
) {
    assert_eq!(b.format, PackedFormat::F16, "add_f16_tile_rows needs an F16 matrix");
    assert!(tile < b.n_tiles() && rows.len() <= MR);
    assert!(rows.iter().all(|&(tr, o)| (tr + 1) * b.k <= t.len() && o < MR));
    // SAFETY: the entry's bounds are asserted above.
    unsafe { (super::active().add_f16_tile_rows)(b, tile, t, rows, scale, out) }
}

/// # Safety
/// `t < w.n_tiles()`, `1 ≤ rows ≤ MR`; `x` holds `row0 + rows` rows of `w.k` values for float
/// formats, `acts` as many quantized rows for the others.
#[allow(clippy::too_many_arguments)]
unsafe fn compute_tile(
    ks: &KernelSet,
    w: &PackedMatrix,
    x: &[f32],
    acts: Option<&QuantizedActs>,
    t: usize,
    row0: usize,
    rows: usize,
    out: &mut Tile,
) {
    let quantized = || acts.expect("quantized formats come with quantized activations");
    let wide = || quantized().precision == ActPrecision::Int16;
    unsafe {
        match w.format {
            PackedFormat::Q8_0 if wide() => (ks.q8_0_tile16)(w, quantized(), t, row0, rows, out),
            PackedFormat::Q4_1 if wide() => (ks.q4_1_tile16)(w, quantized(), t, row0, rows, out),
            PackedFormat::Q8_0 => (ks.q8_0_tile)(w, quantized(), t, row0, rows, out),
            PackedFormat::Q4_1 => (ks.q4_1_tile)(w, quantized(), t, row0, rows, out),
            PackedFormat::F32 => (ks.f32_tile)(w, x, t, row0, rows, out),
            PackedFormat::F16 => (ks.f16_tile)(w, x, t, row0, rows, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::pool::ThreadPool;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn prefetch_distance_is_parsed_with_the_offending_value_named() {
        assert_eq!(parse_prefetch_bytes("4096"), Ok(4096));
        assert_eq!(parse_prefetch_bytes(" 0 "), Ok(0));
        assert_eq!(parse_prefetch_bytes(&MAX_PREFETCH_BYTES.to_string()), Ok(MAX_PREFETCH_BYTES));
        let too_far = parse_prefetch_bytes("2000000").unwrap_err();
        assert!(too_far.contains("2000000") && too_far.contains("maximum"), "{too_far}");
        let not_a_number = parse_prefetch_bytes("4k").unwrap_err();
        assert!(not_a_number.contains("\"4k\""), "{not_a_number}");
        assert!(parse_prefetch_bytes("-1").is_err());
    }

    fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                y[r * n + c] = (0..k).map(|i| x[r * k + i] as f64 * w[c * k + i] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn q4_1_raw(w: &[f32]) -> Vec<u8> {
        let mut raw = Vec::new();
        for blk in w.chunks_exact(32) {
            let (mn, mx) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let d = (mx - mn) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            raw.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            raw.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
            for j in 0..16 {
                let lo = (((blk[j] - mn) * id).round() as u8).min(15);
                let hi = (((blk[j + 16] - mn) * id).round() as u8).min(15);
                raw.push(lo | (hi << 4));
            }
        }
        raw
    }

    const PRECISIONS: [ActPrecision; 2] = [ActPrecision::Int8, ActPrecision::Int16];

    fn check_all_isas(w: &PackedMatrix, x: &[f32], m: usize, tol: [f32; 2]) {
        let want = reference(&w.dequantize(), x, m, w.n, w.k);
        let pool = ThreadPool::new(2);
        for isa in Isa::supported() {
            for (p, tol) in PRECISIONS.into_iter().zip(tol) {
                let mut y = vec![0f32; m * w.n];
                matmul_with(&pool, w, x, m, &mut y, isa, p, &NoEpilogue);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * (1.0 + b.abs()),
                        "{:?} {isa} {p:?} m={m} i={i}: {a} vs {b}",
                        w.format
                    );
                }
            }
        }
    }

    #[test]
    fn all_formats_match_reference_for_many_row_counts() {
        let (n, k) = (40, 96); // a partial last tile
        let wf = rand_vec(n * k, 7);
        let formats = [
            PackedMatrix::from_f32(&wf, n, k).unwrap(),
            PackedMatrix::from_f32_as_f16(&wf, n, k).unwrap(),
            PackedMatrix::quantize_q8_0(&wf, n, k).unwrap(),
            PackedMatrix::from_q4_1_blocks(&q4_1_raw(&wf), n, k).unwrap(),
        ];
        for m in [1, 2, 3, 4, 5, 9] {
            let x = rand_vec(m * k, 100 + m as u64);
            for w in &formats {
                // Activation quantization error dominates for the quantized formats; 16-bit
                // activations bring it within f32 summation noise.
                let tol =
                    if matches!(w.format, PackedFormat::F32 | PackedFormat::F16) { [1e-5; 2] } else { [0.05, 5e-4] };
                check_all_isas(w, &x, m, tol);
            }
        }
    }

    /// An epilogue whose `apply` reads what its pre items wrote: every tile must see all of
    /// them finished, however the pool's participants interleave.
    #[test]
    fn epilogues_run_after_every_pre_item() {
        use std::sync::atomic::AtomicU32;
        struct Gated {
            done: Vec<AtomicU32>,
        }
        impl Epilogue for Gated {
            fn pre_items(&self) -> usize {
                self.done.len()
            }
            fn run_pre(&self, item: usize) {
                // Uneven work, so items finish out of order.
                let spin = (item % 5) * 2000;
                let mut acc = 0u64;
                for i in 0..spin {
                    acc = std::hint::black_box(acc.wrapping_add(i as u64));
                }
                self.done[item].store(1, Ordering::Relaxed);
            }
            fn apply(&self, _: usize, _: usize, rows: usize, out: &mut [[f32; TILE]; MR]) {
                let finished = self.done.iter().map(|d| d.load(Ordering::Relaxed)).sum::<u32>() as f32;
                out.iter_mut().take(rows).for_each(|r| r.iter_mut().for_each(|v| *v += finished));
            }
        }
        let (n, k, m) = (256, 512, 3); // large enough to be split over the pool
        let w = PackedMatrix::from_f32(&rand_vec(n * k, 3), n, k).unwrap();
        let x = rand_vec(m * k, 4);
        let pool = ThreadPool::new(2);
        let mut plain = vec![0f32; m * n];
        matmul_with(&pool, &w, &x, m, &mut plain, Isa::best(), ActPrecision::Int8, &NoEpilogue);
        for pre in [1, 2, 7, 40] {
            for _ in 0..20 {
                let gated = Gated { done: (0..pre).map(|_| AtomicU32::new(0)).collect() };
                let mut y = vec![0f32; m * n];
                matmul_with(&pool, &w, &x, m, &mut y, Isa::best(), ActPrecision::Int8, &gated);
                for (a, b) in y.iter().zip(&plain) {
                    assert_eq!(*a, b + pre as f32, "a tile ran before all {pre} pre items finished");
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_agree_closely() {
        let (n, k) = (64, 1536);
        let wf = rand_vec(n * k, 9);
        let x = rand_vec(3 * k, 10);
        let pool = ThreadPool::new(2);
        for w in [
            PackedMatrix::quantize_q8_0(&wf, n, k).unwrap(),
            PackedMatrix::from_q4_1_blocks(&q4_1_raw(&wf), n, k).unwrap(),
        ] {
            for precision in PRECISIONS {
                let mut a = vec![0f32; 3 * n];
                matmul_with(&pool, &w, &x, 3, &mut a, Isa::Portable, precision, &NoEpilogue);
                for isa in Isa::supported() {
                    let mut b = vec![0f32; 3 * n];
                    matmul_with(&pool, &w, &x, 3, &mut b, isa, precision, &NoEpilogue);
                    for (p, q) in a.iter().zip(&b) {
                        assert!(
                            (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                            "{isa} {precision:?} {:?}: {p} vs {q}",
                            w.format
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_quantizer_rounds_exactly_like_f32_round() {
        let mut x = rand_vec(32 * 200, 21);
        // Exact ties and near-ties after scaling by 127/amax: amax = 127 makes inv = 1.
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = -8.0 + i as f32 * 0.5;
        }
        x[0] = 127.0;
        // Blocks of zeros, of one value, and of huge and tiny magnitudes.
        x[32..64].fill(0.0);
        x[64..96].fill(-3.5);
        x[96..128].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 2 == 0 { 1e30 } else { -1e-30 });
        // The same ties at 16 bits: amax = 32767 makes inv = 1.
        for (i, v) in x[128..160].iter_mut().enumerate() {
            *v = -8.0 + i as f32 * 0.5;
        }
        x[128] = -32767.0;
        let reference = kernel_set(Isa::Portable);
        for isa in Isa::supported() {
            let ks = kernel_set(isa);
            for b in x.chunks_exact(32) {
                let (mut p, mut q) = ([0i8; 32], [0i8; 32]);
                let (a, c) = unsafe { ((reference.quantize_block)(b, &mut p), (ks.quantize_block)(b, &mut q)) };
                assert_eq!((a, p), (c, q), "{isa}");
                let (mut p, mut q) = ([0i16; 32], [0i16; 32]);
                let (a, c) = unsafe { ((reference.quantize_block16)(b, &mut p), (ks.quantize_block16)(b, &mut q)) };
                assert_eq!((a, p), (c, q), "{isa} 16-bit");
            }
        }
    }

    #[test]
    fn sixteen_bit_activations_split_into_bytes_exactly() {
        let mut q = [0i16; QBLOCK];
        let edges = [i16::MIN + 1, -32767, -256, -255, -129, -128, -1, 0, 1, 127, 128, 255, 256, 32767];
        q.iter_mut().zip(edges.iter().cycle()).for_each(|(v, e)| *v = *e);
        let (mut qs16, mut hi, mut lo) = ([0i16; QBLOCK], [0i8; QBLOCK], [0u8; QBLOCK]);
        store_paired16(&q, &mut qs16);
        let hi_sum = store_split16(&q, &mut hi, &mut lo);
        for i in 0..QBLOCK {
            assert_eq!(256 * hi[i] as i32 + lo[i] as i32, q[i] as i32, "input {i}");
            assert_eq!(qs16[q16_index(i)], q[i], "input {i}");
        }
        assert_eq!(hi_sum, hi.iter().map(|&h| h as i32).sum::<i32>());
    }

    #[test]
    fn rows_are_independent() {
        // A row's result must not depend on which other rows share the call (ragged batching
        // relies on this for exact batched == separate), whatever the row's place in a
        // register block.
        let (n, k) = (48, 128);
        let wf = rand_vec(n * k, 11);
        let pool = ThreadPool::new(2);
        for w in [
            PackedMatrix::quantize_q8_0(&wf, n, k).unwrap(),
            PackedMatrix::from_q4_1_blocks(&q4_1_raw(&wf), n, k).unwrap(),
            PackedMatrix::from_f32(&wf, n, k).unwrap(),
            PackedMatrix::from_f32_as_f16(&wf, n, k).unwrap(),
        ] {
            let x = rand_vec(6 * k, 12);
            for (isa, p) in Isa::supported().into_iter().flat_map(|i| PRECISIONS.map(|p| (i, p))) {
                let mut all = vec![0f32; 6 * n];
                matmul_with(&pool, &w, &x, 6, &mut all, isa, p, &NoEpilogue);
                for r in 0..6 {
                    let mut one = vec![0f32; n];
                    matmul_with(&pool, &w, &x[r * k..][..k], 1, &mut one, isa, p, &NoEpilogue);
                    assert_eq!(&all[r * n..][..n], &one[..], "{isa} {p:?} {:?} row {r}", w.format);
                }
            }
        }
    }

    /// A panicking pre item (e.g. a LoRA shrink) must end the matmul with that panic, never
    /// leave the tiles that wait for it spinning; the pool keeps all its threads afterwards.
    #[test]
    fn a_panicking_pre_item_ends_the_matmul_instead_of_hanging() {
        struct Failing {
            bad: usize,
        }
        impl Epilogue for Failing {
            fn pre_items(&self) -> usize {
                6
            }
            fn run_pre(&self, item: usize) {
                if item == self.bad {
                    panic!("pre item {item} failed");
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            fn apply(&self, _: usize, _: usize, _: usize, _: &mut Tile) {}
        }
        let (n, k, m) = (256, 512, 3);
        let w = PackedMatrix::from_f32(&rand_vec(n * k, 3), n, k).unwrap();
        let x = rand_vec(m * k, 4);
        let pool = ThreadPool::new(2);
        for bad in [0, 3, 5] {
            for _ in 0..10 {
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let mut y = vec![0f32; m * n];
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            matmul_with(&pool, &w, &x, m, &mut y, Isa::best(), ActPrecision::Int8, &Failing { bad })
                        }));
                        tx.send(r.is_err()).unwrap();
                    });
                    let panicked = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the matmul hung");
                    assert!(panicked, "the pre item's panic was swallowed");
                });
            }
        }
        assert!(pool.all_threads_join(), "the pool lost a thread after the panics");
    }
}
