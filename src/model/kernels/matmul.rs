//! `y = x · Wᵀ` for a few (decode) to a few hundred (prefill) activation rows against a
//! [`PackedMatrix`].
//!
//! Quantized formats first quantize the activations to 8 bits per 32-block (llama.cpp's Q8_0 /
//! Q8_1 scheme: an f16 scale, 32 × i8 and the block's sum), then run integer dot products. Scales
//! are rounded through f16 exactly as GGUF's Q8_1 blocks store them, so our integer sums are
//! llama.cpp's and candle's, and results differ from theirs only by float summation order (the
//! parity test relies on it).
//! Two implementations compute the same integer sums: an AVX-512 VNNI one (runtime-detected) and a
//! portable one that the compiler vectorises; tests check they agree.
//!
//! Work is split across the kernel pool by tiles of 16 output rows; each tile is processed for up
//! to [`MR`] activation rows at once so its weights are read from memory once per step.

use super::packed::{PackedFormat, PackedMatrix, QBLOCK, TILE};
use super::pool::{self, split_range};
use half::f16;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Activation rows processed together against one tile (register blocking).
pub const MR: usize = 4;

/// Activations quantized to 8 bits per block of 32.
pub struct QuantizedActs {
    pub m: usize,
    pub k: usize,
    pub qs: Vec<i8>,
    /// Scale per (row, block).
    pub d: Vec<f32>,
    /// Integer sum of the block's quants per (row, block).
    pub sums: Vec<i32>,
    /// `d · sum` per (row, block), rounded through f16 as GGUF's Q8_1 stores it (the term that
    /// multiplies a Q4_1 block's minimum).
    pub dsums: Vec<f32>,
}

impl QuantizedActs {
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k);
        assert!(k.is_multiple_of(QBLOCK));
        let kb = k / QBLOCK;
        let mut a = Self {
            m,
            k,
            qs: vec![0i8; m * k],
            d: vec![0f32; m * kb],
            sums: vec![0i32; m * kb],
            dsums: vec![0f32; m * kb],
        };
        let isa = Isa::detect();
        // Rows are independent: prefill-sized inputs are quantized on the pool.
        let rows_per_chunk =
            if m * k >= 64 * 1024 { m.div_ceil(pool::n_chunks(m, pool::global().n_threads())) } else { m };
        let chunks = m.div_ceil(rows_per_chunk.max(1));
        let (qs, d, sums, dsums) = (
            pool::SyncPtr::new(a.qs.as_mut_ptr()),
            pool::SyncPtr::new(a.d.as_mut_ptr()),
            pool::SyncPtr::new(a.sums.as_mut_ptr()),
            pool::SyncPtr::new(a.dsums.as_mut_ptr()),
        );
        pool::global().run_chunks(chunks, |c| {
            let rows = c * rows_per_chunk..((c + 1) * rows_per_chunk).min(m);
            for bi in rows.start * kb..rows.end * kb {
                let src = &x[bi * QBLOCK..][..QBLOCK];
                // SAFETY: chunks cover disjoint rows, hence disjoint blocks of every array.
                let dst = unsafe { std::slice::from_raw_parts_mut(qs.get().add(bi * QBLOCK), QBLOCK) };
                let (scale, sum) = match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni => unsafe { avx512::quantize_block(src, dst) },
                    _ => quantize_block(src, dst),
                };
                unsafe {
                    *d.get().add(bi) = scale;
                    *sums.get().add(bi) = sum;
                    // As ggml/candle: `s = f16(sum) * f16(d)`, kept in f16.
                    *dsums.get().add(bi) = (f16::from_f32(sum as f32) * f16::from_f32(scale)).to_f32();
                }
            }
        });
        a
    }
}

/// One block as llama.cpp's `quantize_row_q8_1`: `d = amax / 127` (stored through f16),
/// `q = round(x / d)` (half away from zero). Returns (d, Σq).
fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let exact = amax / 127.0;
    let inv = if exact != 0.0 { 1.0 / exact } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in dst.iter_mut().zip(src) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (f16::from_f32(exact).to_f32(), sum)
}

/// `x · Wᵀ` into a new `[m, n]` vector (not zero-filled first: every element is written).
pub fn matmul_new(w: &PackedMatrix, x: &[f32], m: usize) -> Vec<f32> {
    matmul_new_then(w, x, m, &NoEpilogue)
}

/// [`matmul_new`] with `epilogue` applied to every computed tile before it is stored.
pub fn matmul_new_then(w: &PackedMatrix, x: &[f32], m: usize, epilogue: &(impl Epilogue + ?Sized)) -> Vec<f32> {
    // Zero-filled rather than a slice over uninitialised capacity (unsound even if every
    // element is written before it is read); the fill costs a few µs next to the product.
    let mut y = vec![0f32; m * w.n];
    matmul_with(pool::global(), w, x, m, &mut y, Isa::detect(), epilogue);
    y
}

/// `y[m, n] = x[m, k] · Wᵀ` using the global kernel pool.
pub fn matmul(w: &PackedMatrix, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_with(pool::global(), w, x, m, y, Isa::detect(), &NoEpilogue)
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
/// products come first.
pub trait Epilogue: Sync {
    /// `out[r]` holds outputs `16·tile ..` of row `row0 + r`, for `r < rows`.
    fn apply(&self, tile: usize, row0: usize, rows: usize, out: &mut [[f32; TILE]; MR]);

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
    fn apply(&self, _: usize, _: usize, _: usize, _: &mut [[f32; TILE]; MR]) {}
}

/// Which instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW + VNNI (`vpdpbusd`) and F16C.
    Avx512Vnni,
    /// Portable Rust, vectorised by the compiler as far as the target allows.
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
                let off = std::env::var("LETHE_PORTABLE_KERNELS").is_ok_and(|v| v == "1");
                if !off
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("f16c")
                {
                    Isa::Avx512Vnni
                } else {
                    Isa::Portable
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Isa::Portable
        }
    }
}

pub fn matmul_with(
    pool: &pool::ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    isa: Isa,
    epilogue: &(impl Epilogue + ?Sized),
) {
    // A caller may ask for the portable kernels, never for instructions the CPU lacks.
    let isa = if isa == Isa::Avx512Vnni { Isa::detect() } else { isa };
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "matmul: input is not [m, k]");
    assert_eq!(y.len(), m * n, "matmul: output is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let acts = match w.format {
        PackedFormat::F32 | PackedFormat::F16 => None,
        _ => Some(QuantizedActs::quantize(x, m, k)),
    };
    let tiles = w.n_tiles();
    let out = pool::SyncPtr::new(y.as_mut_ptr());
    // Tiny products are not worth a thread hand-off.
    let work = m * n * k;
    let chunks = if work < 64 * 1024 { 1 } else { pool::n_chunks(tiles, pool.n_threads()) };
    let pre = epilogue.pre_items();
    let pre_done = AtomicUsize::new(0);
    pool.run_chunks(pre + chunks, |c| {
        if c < pre {
            epilogue.run_pre(c);
            pre_done.fetch_add(1, Ordering::Release);
            return;
        }
        let c = c - pre;
        let mut pre_ready = pre == 0;
        let mut buf = [[0f32; TILE]; MR];
        for t in split_range(tiles, c, chunks) {
            let mut row0 = 0;
            while row0 < m {
                let rows = (m - row0).min(MR);
                compute_tile(w, x, acts.as_ref(), t, row0, rows, &mut buf, isa);
                if !pre_ready {
                    // Items are claimed in order: every pre item is already running somewhere.
                    while pre_done.load(Ordering::Acquire) < pre {
                        std::hint::spin_loop();
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
pub fn float_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut [[f32; TILE]; MR]) {
    assert!(matches!(w.format, PackedFormat::F32 | PackedFormat::F16), "float_tile needs an F32/F16 matrix");
    assert!(rows <= MR && (row0 + rows) * w.k <= x.len() && t < w.n_tiles());
    compute_tile(w, x, None, t, row0, rows, out, Isa::detect());
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
    out: &mut [[f32; TILE]; MR],
) {
    assert_eq!(b.format, PackedFormat::F16, "add_f16_tile_rows needs an F16 matrix");
    assert!(tile < b.n_tiles() && rows.len() <= MR);
    assert!(rows.iter().all(|&(tr, o)| (tr + 1) * b.k <= t.len() && o < MR));
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512Vnni {
        // SAFETY: the CPU has AVX-512F and F16C (checked by `Isa::detect`); bounds asserted above.
        unsafe { avx512::add_f16_tile_rows(b, tile, t, rows, scale, out) };
        return;
    }
    let (k, data) = (b.k, b.data.as_slice());
    for &(tr, o) in rows {
        for i in 0..k {
            let tv = t[tr * k + i] * scale;
            let at = (tile * k + i) * TILE * 2;
            for (l, v) in out[o].iter_mut().enumerate() {
                *v += f16::from_le_bytes([data[at + 2 * l], data[at + 2 * l + 1]]).to_f32() * tv;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compute_tile(
    w: &PackedMatrix,
    x: &[f32],
    acts: Option<&QuantizedActs>,
    t: usize,
    row0: usize,
    rows: usize,
    out: &mut [[f32; TILE]; MR],
    isa: Isa,
) {
    match (w.format, isa) {
        #[cfg(target_arch = "x86_64")]
        (PackedFormat::Q8_0, Isa::Avx512Vnni) => unsafe { avx512::q8_0_tile(w, acts.unwrap(), t, row0, rows, out) },
        #[cfg(target_arch = "x86_64")]
        (PackedFormat::Q4_1, Isa::Avx512Vnni) => unsafe { avx512::q4_1_tile(w, acts.unwrap(), t, row0, rows, out) },
        #[cfg(target_arch = "x86_64")]
        (PackedFormat::F32, Isa::Avx512Vnni) => unsafe { avx512::f32_tile(w, x, t, row0, rows, out) },
        (PackedFormat::Q8_0, _) => portable::q8_0_tile(w, acts.unwrap(), t, row0, rows, out),
        (PackedFormat::Q4_1, _) => portable::q4_1_tile(w, acts.unwrap(), t, row0, rows, out),
        (PackedFormat::F32, _) => portable::f32_tile(w, x, t, row0, rows, out),
        #[cfg(target_arch = "x86_64")]
        (PackedFormat::F16, Isa::Avx512Vnni) => unsafe { avx512::f16_tile(w, x, t, row0, rows, out) },
        (PackedFormat::F16, _) => portable::f16_tile(w, x, t, row0, rows, out),
    }
}

fn f16x16(src: &[f16]) -> [f32; TILE] {
    std::array::from_fn(|i| src[i].to_f32())
}

mod portable {
    use super::*;
    use crate::model::kernels::packed::q4_index;

    pub fn q8_0_tile(
        w: &PackedMatrix,
        a: &QuantizedActs,
        t: usize,
        row0: usize,
        rows: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        let kb = w.k_blocks();
        let data = w.data.as_slice();
        for (r, o) in out.iter_mut().enumerate().take(rows) {
            let row = row0 + r;
            let mut acc = [0f32; TILE];
            for b in 0..kb {
                let tb = t * kb + b;
                let q = &data[tb * QBLOCK * TILE..][..QBLOCK * TILE];
                let xa = &a.qs[row * a.k + b * QBLOCK..][..QBLOCK];
                let mut s = [0i32; TILE];
                for g in 0..QBLOCK / 4 {
                    for (lane, sl) in s.iter_mut().enumerate() {
                        for j in 0..4 {
                            *sl += q[(g * TILE + lane) * 4 + j] as i32 * xa[g * 4 + j] as i32;
                        }
                    }
                }
                let corr = 128 * a.sums[row * kb + b];
                let da = a.d[row * kb + b];
                let dw = f16x16(&w.scales[tb * TILE..]);
                for l in 0..TILE {
                    acc[l] += (s[l] - corr) as f32 * (dw[l] * da);
                }
            }
            *o = acc;
        }
    }

    pub fn q4_1_tile(
        w: &PackedMatrix,
        a: &QuantizedActs,
        t: usize,
        row0: usize,
        rows: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        let kb = w.k_blocks();
        let data = w.data.as_slice();
        for r in 0..rows {
            let row = row0 + r;
            let mut acc = [0f32; TILE];
            let mut accm = [0f32; TILE];
            for b in 0..kb {
                let tb = t * kb + b;
                let q = &data[tb * QBLOCK * TILE / 2..][..QBLOCK * TILE / 2];
                let xa = &a.qs[row * a.k + b * QBLOCK..][..QBLOCK];
                let mut s = [0i32; TILE];
                for (i, &xv) in xa.iter().enumerate() {
                    for (lane, sl) in s.iter_mut().enumerate() {
                        let (byte, high) = q4_index(i, lane);
                        let v = if high { q[byte] >> 4 } else { q[byte] & 0x0F };
                        *sl += v as i32 * xv as i32;
                    }
                }
                let da = a.d[row * kb + b];
                let sa = a.dsums[row * kb + b];
                let dw = f16x16(&w.scales[tb * TILE..]);
                let mw = f16x16(&w.mins[tb * TILE..]);
                for l in 0..TILE {
                    acc[l] += s[l] as f32 * (dw[l] * da);
                    accm[l] += mw[l] * sa;
                }
            }
            out[r] = std::array::from_fn(|l| acc[l] + accm[l]);
        }
    }

    pub fn f16_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut [[f32; TILE]; MR]) {
        let k = w.k;
        let data = w.data.as_slice();
        for r in 0..rows {
            let xr = &x[(row0 + r) * k..][..k];
            let mut acc = [0f32; TILE];
            for (i, &xv) in xr.iter().enumerate() {
                let at = (t * k + i) * TILE * 2;
                for l in 0..TILE {
                    acc[l] += f16::from_le_bytes([data[at + 2 * l], data[at + 2 * l + 1]]).to_f32() * xv;
                }
            }
            out[r] = acc;
        }
    }

    pub fn f32_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut [[f32; TILE]; MR]) {
        let k = w.k;
        let data = w.data.as_f32();
        for r in 0..rows {
            let xr = &x[(row0 + r) * k..][..k];
            let mut acc = [0f32; TILE];
            for (i, &xv) in xr.iter().enumerate() {
                let wv = &data[(t * k + i) * TILE..][..TILE];
                for l in 0..TILE {
                    acc[l] += wv[l] * xv;
                }
            }
            out[r] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::quantize_block`] with 16-lane registers; rounding is exactly `f32::round`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr());
            let hi = _mm512_loadu_ps(src.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let exact = amax / 127.0;
            let inv = _mm512_set1_ps(if exact != 0.0 { 1.0 / exact } else { 0.0 });
            let round = |v: __m512| -> __m512i {
                let r = _mm512_mul_ps(v, inv);
                let t = _mm512_roundscale_ps(r, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm512_sub_ps(r, t);
                // Half away from zero: |frac| ≥ 0.5 moves one step in the sign of r.
                let away = _mm512_cmp_ps_mask(_mm512_abs_ps(frac), _mm512_set1_ps(0.5), _CMP_GE_OQ);
                let step = _mm512_or_ps(_mm512_set1_ps(1.0), _mm512_and_ps(r, _mm512_set1_ps(-0.0)));
                _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step))
            };
            let (qa, qb) = (round(lo), round(hi));
            _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128(dst.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            (f16::from_f32(exact).to_f32(), sum)
        }
    }

    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
    }

    #[inline(always)]
    unsafe fn load_f16x16(p: *const f16) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// Runs `body::<R>()` with `R` = the runtime row count as a compile-time constant, so each
    /// row count gets fully unrolled register blocking.
    macro_rules! dispatch_rows {
        ($rows:expr, $f:ident, $($arg:expr),*) => {
            match $rows {
                1 => $f::<1>($($arg),*),
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                _ => $f::<4>($($arg),*),
            }
        };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn q8_0_tile(
        w: &PackedMatrix,
        a: &QuantizedActs,
        t: usize,
        row0: usize,
        rows: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe { dispatch_rows!(rows, q8_0_rows, w, a, t, row0, out) }
    }

    #[inline(always)]
    unsafe fn q8_0_rows<const R: usize>(
        w: &PackedMatrix,
        a: &QuantizedActs,
        t: usize,
        row0: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe {
            let kb = w.k_blocks();
            let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
            let scales = w.scales.as_ptr().add(t * kb * TILE);
            let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
            let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
            let xs: [*const i32; R] = std::array::from_fn(|r| a.sums.as_ptr().add((row0 + r) * kb));
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..kb {
                let qb = q.add(b * QBLOCK * TILE);
                // Two partial sums per row break the vpdpbusd dependency chain.
                let mut s0 = [_mm512_setzero_si512(); R];
                let mut s1 = [_mm512_setzero_si512(); R];
                for g in (0..8).step_by(2) {
                    let w0 = _mm512_load_si512(qb.add(g * 64) as *const __m512i);
                    let w1 = _mm512_load_si512(qb.add(g * 64 + 64) as *const __m512i);
                    for r in 0..R {
                        let xb = xq[r].add(b * QBLOCK + g * 4);
                        s0[r] = _mm512_dpbusd_epi32(s0[r], w0, bcast4(xb));
                        s1[r] = _mm512_dpbusd_epi32(s1[r], w1, bcast4(xb.add(4)));
                    }
                }
                let dw = load_f16x16(scales.add(b * TILE));
                for r in 0..R {
                    let s = _mm512_add_epi32(s0[r], s1[r]);
                    let s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * *xs[r].add(b)));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn q4_1_tile(
        w: &PackedMatrix,
        a: &QuantizedActs,
        t: usize,
        row0: usize,
        rows: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe { dispatch_rows!(rows, q4_1_rows, w, a, t, row0, out) }
    }

    #[inline(always)]
    unsafe fn q4_1_rows<const R: usize>(
        w: &PackedMatrix,
        a: &QuantizedActs,
        t: usize,
        row0: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe {
            let kb = w.k_blocks();
            let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
            let scales = w.scales.as_ptr().add(t * kb * TILE);
            let mins = w.mins.as_ptr().add(t * kb * TILE);
            let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
            let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
            let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
            let nib = _mm512_set1_epi8(0x0F);
            // Block terms (d·s) and min terms (m·s) accumulate separately: two independent
            // FMA chains per row.
            let mut acc = [_mm512_setzero_ps(); R];
            let mut accm = [_mm512_setzero_ps(); R];
            for b in 0..kb {
                let qb = q.add(b * QBLOCK * TILE / 2);
                let mut s = [_mm512_setzero_si512(); R];
                for g in 0..4 {
                    let v = _mm512_load_si512(qb.add(g * 64) as *const __m512i);
                    let lo = _mm512_and_si512(v, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                    for r in 0..R {
                        let xb = xq[r].add(b * QBLOCK + g * 8);
                        s[r] = _mm512_dpbusd_epi32(s[r], lo, bcast4(xb));
                        s[r] = _mm512_dpbusd_epi32(s[r], hi, bcast4(xb.add(4)));
                    }
                }
                let dw = load_f16x16(scales.add(b * TILE));
                let mw = load_f16x16(mins.add(b * TILE));
                for r in 0..R {
                    let sf = _mm512_cvtepi32_ps(s[r]);
                    acc[r] = _mm512_fmadd_ps(sf, _mm512_mul_ps(dw, _mm512_set1_ps(*xd[r].add(b))), acc[r]);
                    accm[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs[r].add(b)), accm[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], accm[r]));
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn f16_tile(
        w: &PackedMatrix,
        x: &[f32],
        t: usize,
        row0: usize,
        rows: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe { dispatch_rows!(rows, f16_rows, w, x, t, row0, out) }
    }

    #[inline(always)]
    unsafe fn f16_rows<const R: usize>(
        w: &PackedMatrix,
        x: &[f32],
        t: usize,
        row0: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe {
            let k = w.k;
            let wt = (w.data.as_slice().as_ptr() as *const f16).add(t * k * TILE);
            let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
            // Four independent accumulator chains per row hide the FMA latency even for one
            // row (LoRA's A factors: one tile, hundreds of inputs).
            let mut acc = [[_mm512_setzero_ps(); R]; 4];
            let mut i = 0;
            while i + 4 <= k {
                // LoRA factors come straight from memory in short tiles that cross pages, where
                // the hardware prefetcher stalls: fetch 1 KiB ahead.
                // (`wrapping_add`: near the end the address lies past the matrix; a prefetch
                // never faults, but an out-of-bounds `add` would be undefined behaviour.)
                _mm_prefetch::<_MM_HINT_T0>(wt.wrapping_add((i + 32) * TILE) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(wt.wrapping_add((i + 34) * TILE) as *const i8);
                for c in 0..4 {
                    let wv = load_f16x16(wt.add((i + c) * TILE));
                    for r in 0..R {
                        acc[c][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*xr[r].add(i + c)), acc[c][r]);
                    }
                }
                i += 4;
            }
            while i < k {
                let wv = load_f16x16(wt.add(i * TILE));
                for r in 0..R {
                    acc[0][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*xr[r].add(i)), acc[0][r]);
                }
                i += 1;
            }
            for r in 0..R {
                let sum = _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
                _mm512_storeu_ps(out[r].as_mut_ptr(), sum);
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn add_f16_tile_rows(
        b: &PackedMatrix,
        tile: usize,
        t: &[f32],
        rows: &[(usize, usize)],
        scale: f32,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe {
            let k = b.k;
            let wt = (b.data.as_slice().as_ptr() as *const f16).add(tile * k * TILE);
            // As in `f16_rows`: fetch a few tiles ahead of the matmul's walk.
            let ahead = wt.wrapping_add(4 * k * TILE) as *const i8;
            for line in (0..k * TILE * 2).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
            }
            let n = rows.len();
            let tp: [*const f32; MR] = std::array::from_fn(|r| t.as_ptr().add(rows[r.min(n - 1)].0 * k));
            // Four chains per row: k is small (the rank), so a single chain would be bound by
            // FMA latency rather than throughput.
            let mut acc = [[_mm512_setzero_ps(); MR]; 4];
            let mut i = 0;
            while i + 4 <= k {
                for c in 0..4 {
                    let wv = load_f16x16(wt.add((i + c) * TILE));
                    for r in 0..MR {
                        if r < n {
                            acc[c][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*tp[r].add(i + c)), acc[c][r]);
                        }
                    }
                }
                i += 4;
            }
            while i < k {
                let wv = load_f16x16(wt.add(i * TILE));
                for r in 0..MR {
                    if r < n {
                        acc[0][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(*tp[r].add(i)), acc[0][r]);
                    }
                }
                i += 1;
            }
            let s = _mm512_set1_ps(scale);
            for (r, &(_, o)) in rows.iter().enumerate() {
                let sum = _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
                let cur = _mm512_loadu_ps(out[o].as_ptr());
                _mm512_storeu_ps(out[o].as_mut_ptr(), _mm512_fmadd_ps(sum, s, cur));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_tile(
        w: &PackedMatrix,
        x: &[f32],
        t: usize,
        row0: usize,
        rows: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe { dispatch_rows!(rows, f32_rows, w, x, t, row0, out) }
    }

    #[inline(always)]
    unsafe fn f32_rows<const R: usize>(
        w: &PackedMatrix,
        x: &[f32],
        t: usize,
        row0: usize,
        out: &mut [[f32; TILE]; MR],
    ) {
        unsafe {
            let k = w.k;
            let wt = w.data.as_f32().as_ptr().add(t * k * TILE);
            let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
            let mut acc0 = [_mm512_setzero_ps(); R];
            let mut acc1 = [_mm512_setzero_ps(); R];
            let mut i = 0;
            while i + 1 < k {
                let w0 = _mm512_load_ps(wt.add(i * TILE));
                let w1 = _mm512_load_ps(wt.add((i + 1) * TILE));
                for r in 0..R {
                    acc0[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*xr[r].add(i)), acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(*xr[r].add(i + 1)), acc1[r]);
                }
                i += 2;
            }
            if i < k {
                let w0 = _mm512_load_ps(wt.add(i * TILE));
                for r in 0..R {
                    acc0[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(*xr[r].add(i)), acc0[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc0[r], acc1[r]));
            }
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

    fn check_all_isas(w: &PackedMatrix, x: &[f32], m: usize, tol: f32) {
        let want = reference(&w.dequantize(), x, m, w.n, w.k);
        let pool = ThreadPool::new(2);
        for isa in [Isa::Portable, Isa::detect()] {
            let mut y = vec![0f32; m * w.n];
            matmul_with(&pool, w, x, m, &mut y, isa, &NoEpilogue);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{:?} {isa:?} m={m} i={i}: {a} vs {b}", w.format);
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
                // Activation quantization error dominates for the 8-bit formats.
                let tol = if matches!(w.format, PackedFormat::F32 | PackedFormat::F16) { 1e-5 } else { 0.05 };
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
        matmul_with(&pool, &w, &x, m, &mut plain, Isa::detect(), &NoEpilogue);
        for pre in [1, 2, 7, 40] {
            for _ in 0..20 {
                let gated = Gated { done: (0..pre).map(|_| AtomicU32::new(0)).collect() };
                let mut y = vec![0f32; m * n];
                matmul_with(&pool, &w, &x, m, &mut y, Isa::detect(), &gated);
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
            let mut a = vec![0f32; 3 * n];
            let mut b = vec![0f32; 3 * n];
            matmul_with(&pool, &w, &x, 3, &mut a, Isa::Portable, &NoEpilogue);
            matmul_with(&pool, &w, &x, 3, &mut b, Isa::detect(), &NoEpilogue);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{p} vs {q}");
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
        for b in x.chunks_exact(32) {
            let (mut p, mut q) = ([0i8; 32], [0i8; 32]);
            let a = quantize_block(b, &mut p);
            #[cfg(target_arch = "x86_64")]
            if Isa::detect() == Isa::Avx512Vnni {
                let c = unsafe { avx512::quantize_block(b, &mut q) };
                assert_eq!((a, p), (c, q));
            }
        }
    }

    #[test]
    fn rows_are_independent() {
        // A row's result must not depend on which other rows share the call (ragged batching
        // relies on this for exact batched == separate).
        let (n, k) = (48, 128);
        let wf = rand_vec(n * k, 11);
        let w = PackedMatrix::quantize_q8_0(&wf, n, k).unwrap();
        let x = rand_vec(6 * k, 12);
        let mut all = vec![0f32; 6 * n];
        matmul(&w, &x, 6, &mut all);
        for r in 0..6 {
            let mut one = vec![0f32; n];
            matmul(&w, &x[r * k..][..k], 1, &mut one);
            assert_eq!(&all[r * n..][..n], &one[..]);
        }
    }
}
