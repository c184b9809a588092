//! CPU kernels that candle lacks: multi-row quantized matrix products over tile-packed weights,
//! paged attention over per-sequence KV blocks, the decoder's row-wise operations, and the
//! spinning thread pool they run on.
//!
//! ## One interface, one implementation per instruction set
//! The drivers ([`matmul`](mod@matmul), [`attention`], [`elementwise`]) split work over the pool and call
//! the innermost loops through a [`KernelSet`]: a table of functions with one instance per
//! [`Isa`] (`avx512.rs`, `avx2.rs` for AVX2 with and without AVX-VNNI, `neon.rs` for NEON with
//! and without `dotprod`, and `portable.rs`, the reference). The set is chosen once per process
//! ([`crate::simd::init_from_env`]: the best the CPU has, or `LETHE_KERNELS`), and a set the CPU
//! cannot run is never handed out. Adding an instruction set means one module that fills the
//! table, one [`Isa`] variant and its detection; the drivers do not change.

// Register-blocked kernels index several fixed-size arrays (accumulators, row pointers) with the
// same loop counter; iterator chains would obscure which register holds what.
#![allow(clippy::needless_range_loop)]

pub mod attention;
pub mod elementwise;
pub mod matmul;
pub mod packed;
pub mod pool;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;

pub use crate::simd::Isa;
pub use matmul::{MR, matmul};
pub use packed::{PackedFormat, PackedMatrix, TILE};

use attention::QueryArgs;
use matmul::QuantizedActs;

/// Outputs of one tile (16 columns) for up to [`MR`] activation rows.
pub type Tile = [[f32; TILE]; MR];

/// `out[r] = tile t of (row row0 + r) · Wᵀ` for `r < rows`, from quantized activations.
pub(crate) type QuantTileFn =
    unsafe fn(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile);
/// `out[o] += scale · t[tr] · Bᵀ` for each `(tr, o)` in `rows` (see `KernelSet::add_f16_tile_rows`).
pub(crate) type AddTileRowsFn =
    unsafe fn(b: &PackedMatrix, tile: usize, t: &[f32], rows: &[(usize, usize)], scale: f32, out: &mut Tile);
/// The same from f32 activations `x: [m, k]`.
pub(crate) type FloatTileFn =
    unsafe fn(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile);

/// The innermost loops of every hot path, for one instruction set.
///
/// Entries are `unsafe fn`s: they index with raw pointers for speed, so callers (the drivers in
/// this module) guarantee the bounds stated on each entry. The instruction-set requirement is
/// met by construction: a set is only reachable through [`kernel_set`], which refuses sets the
/// CPU lacks.
pub struct KernelSet {
    pub isa: Isa,
    /// One block of 32 activations → (scale, Σq), llama.cpp's Q8_1 rounding; every set returns
    /// bit-identical results. Needs `src.len() == dst.len() == 32`.
    pub(crate) quantize_block: unsafe fn(src: &[f32], dst: &mut [i8]) -> (f32, i32),
    /// One block of 32 activations → (scale, Σq) at 16 bits (`d = amax / 32767`, not rounded
    /// through f16), in input order; every set returns bit-identical results. Needs
    /// `src.len() == dst.len() == 32`.
    pub(crate) quantize_block16: unsafe fn(src: &[f32], dst: &mut [i16]) -> (f32, i32),
    /// Which layout of 16-bit activations the `*_tile16` entries read: split into bytes
    /// ([`matmul::QuantizedActs::hi`], `lo`, `hi_sums`) when true, paired
    /// ([`matmul::QuantizedActs::qs16`]) when false. Only that one is written.
    pub(crate) split16: bool,
    /// Q8_0 and Q4_1 tiles with 8-bit activations. Needs `w` of that format, `t < w.n_tiles()`,
    /// `1 ≤ rows ≤ MR`, `a` quantized (at that precision) from `row0 + rows` rows or more of
    /// `w.k` inputs.
    pub(crate) q8_0_tile: QuantTileFn,
    pub(crate) q4_1_tile: QuantTileFn,
    /// The same with 16-bit activations ([`matmul::ActPrecision::Int16`]).
    pub(crate) q8_0_tile16: QuantTileFn,
    pub(crate) q4_1_tile16: QuantTileFn,
    /// F32 and F16 tiles. Needs `w` of that format, `t < w.n_tiles()`, `1 ≤ rows ≤ MR`,
    /// `x.len() ≥ (row0 + rows) · w.k`.
    pub(crate) f32_tile: FloatTileFn,
    pub(crate) f16_tile: FloatTileFn,
    /// `out[o] += scale · t[tr] · Bᵀ` (tile `tile` of F16 `b`) for each `(tr, o)` in `rows`. Needs
    /// `tile < b.n_tiles()`, `rows.len() ≤ MR`, every `(tr + 1)·b.k ≤ t.len()` and `o < MR`.
    pub(crate) add_f16_tile_rows: AddTileRowsFn,
    /// Attention of one query position over one kv head's cache, per cached element type.
    /// Needs `args` whose blocks hold `n_keys` positions of the geometry's element type,
    /// `scores.len() ≥ n_heads · ⌈n_keys/16⌉·16` and `out.len() == n_heads · head_dim`.
    pub(crate) attend_f32: unsafe fn(args: &QueryArgs, scores: &mut [f32], out: &mut [f32]),
    pub(crate) attend_f16: unsafe fn(args: &QueryArgs, scores: &mut [f32], out: &mut [f32]),
    pub(crate) attend_q8: unsafe fn(args: &QueryArgs, scores: &mut [f32], out: &mut [f32]),
    /// `out = x / rms(x) · w`. Needs equal lengths.
    pub(crate) rms_norm_row: unsafe fn(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]),
    /// `out = silu(g) · u`. Needs equal lengths.
    pub(crate) swiglu_row: unsafe fn(g: &[f32], u: &[f32], out: &mut [f32]),
    /// `x += y`. Needs equal lengths.
    pub(crate) add_assign: unsafe fn(x: &mut [f32], y: &[f32]),
}

/// The kernels of `isa`. Panics if the CPU cannot run them (use [`Isa::is_supported`] or
/// [`Isa::supported`] to choose); the process-wide choice is [`active`].
pub fn kernel_set(isa: Isa) -> &'static KernelSet {
    assert!(isa.is_supported(), "the {isa} kernels cannot run on this CPU (it supports: {:?})", Isa::supported());
    match isa {
        // SAFETY (every arm): the CPU supports the set, asserted above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::kernel_set() },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Vnni => unsafe { avx2::kernel_set(true) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::kernel_set(false) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { neon::kernel_set(true) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::kernel_set(false) },
        _ => &portable::KERNELS,
    }
}

/// The process-wide kernels ([`crate::simd::active`]).
pub fn active() -> &'static KernelSet {
    kernel_set(crate::simd::active())
}
