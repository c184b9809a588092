//! aarch64 NEON kernels, with and without the dot-product extension: 4 lanes, so a 16-row tile
//! is four registers; tiles are run in halves of 8 output rows (two registers) to keep every
//! accumulator in the 32 vector registers. The packed layout is the x86 one: a 16-byte
//! register of a 64-byte group holds 4 inputs of 4 output rows, exactly what `sdot` multiplies
//! by 4 activations taken from one 32-bit lane of another register.
//!
//! - With `dotprod` (Armv8.2+): `sdot v.4s, w.16b, x.4b[lane]`, i8 × i8 → i32, through inline
//!   assembly (the intrinsic is not stable in Rust yet). Q8_0 weights are stored +128 (for x86's
//!   unsigned operand); flipping the top bit gives back the signed weight.
//! - Without: `smull`/`smull2` (i8 × i8 → i16), pairwise adds into i32. A pair of products is at
//!   most 2·128·127 = 32,512, inside i16.
//! - f16 → f32 with `fcvtl`/`fcvtl2` (base Armv8 NEON), also through inline assembly.
//!
//! qemu runs these for the tests; it says nothing about speed.
//!
//! Every function here needs an aarch64 CPU (and `dotprod` for the `dot` table); [`kernel_set`]
//! is the only way out of this module, and the dispatcher calls it only after checking.

use super::attention::{BLOCK_TOKENS, KvElem, MAX_GROUP, QueryArgs, region};
use super::matmul::QuantizedActs;
use super::packed::{PackedMatrix, QBLOCK, TILE};
use super::{Isa, KernelSet, MR, Tile, portable};
use crate::simd::arm::exp4;
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;

/// Output rows per pass over a tile's blocks (two registers).
const HALF: usize = 8;

const BASE: KernelSet = KernelSet {
    isa: Isa::Neon,
    quantize_block,
    quantize_block16,
    split16: false,
    q8_0_tile: q8_0_tile::<false>,
    q4_1_tile: q4_1_tile::<false>,
    q8_0_tile16,
    q4_1_tile16,
    f32_tile,
    f16_tile,
    add_f16_tile_rows,
    attend_f32: attend::<f32>,
    attend_f16: attend::<f16>,
    attend_q8: attend::<i8>,
    rms_norm_row,
    swiglu_row,
    add_assign,
};

static KERNELS: KernelSet = BASE;
static KERNELS_DOT: KernelSet =
    KernelSet { isa: Isa::NeonDot, q8_0_tile: q8_0_tile_dot, q4_1_tile: q4_1_tile_dot, ..BASE };

/// # Safety
/// The CPU must support [`Isa::Neon`], and [`Isa::NeonDot`] if `dot`.
pub(super) unsafe fn kernel_set(dot: bool) -> &'static KernelSet {
    if dot { &KERNELS_DOT } else { &KERNELS }
}

#[target_feature(enable = "neon")]
unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    portable::rms_norm_row(x, w, eps, out)
}

#[target_feature(enable = "neon")]
unsafe fn add_assign(x: &mut [f32], y: &[f32]) {
    portable::add_assign(x, y)
}

#[target_feature(enable = "neon")]
unsafe fn swiglu_row(g: &[f32], u: &[f32], out: &mut [f32]) {
    unsafe {
        let n = out.len();
        let one = vdupq_n_f32(1.0);
        let mut i = 0;
        while i + 4 <= n {
            let gv = vld1q_f32(g.as_ptr().add(i));
            let uv = vld1q_f32(u.as_ptr().add(i));
            let e = exp4(vnegq_f32(gv));
            vst1q_f32(out.as_mut_ptr().add(i), vmulq_f32(vdivq_f32(gv, vaddq_f32(one, e)), uv));
            i += 4;
        }
        for j in i..n {
            out[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }
}

/// The block's 32 values and `amax / levels` (the unrounded scale).
#[inline(always)]
unsafe fn load_block(src: &[f32], levels: f32) -> ([float32x4_t; 8], f32) {
    unsafe {
        let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(src.as_ptr().add(4 * i)));
        let mut m = vabsq_f32(v[0]);
        for x in &v[1..] {
            m = vmaxq_f32(m, vabsq_f32(*x));
        }
        (v, vmaxvq_f32(m) / levels)
    }
}

/// `round(v · inv)` of every value, half away from zero (`fcvtas`: exactly `f32::round`).
#[inline(always)]
unsafe fn round_away(v: &[float32x4_t; 8], scale: f32) -> [int32x4_t; 8] {
    unsafe {
        let inv = vdupq_n_f32(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        std::array::from_fn(|i| vcvtaq_s32_f32(vmulq_f32(v[i], inv)))
    }
}

/// [`portable::quantize_block`] on 4-lane registers, rounding exactly like `f32::round`.
#[target_feature(enable = "neon")]
unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    unsafe {
        let (v, exact) = load_block(src, 127.0);
        let q = round_away(&v, exact);
        let mut sum = 0;
        for i in 0..4 {
            let h = vcombine_s16(vqmovn_s32(q[2 * i]), vqmovn_s32(q[2 * i + 1]));
            vst1_s8(dst.as_mut_ptr().add(8 * i), vqmovn_s16(h));
            sum += vaddvq_s32(q[2 * i]) + vaddvq_s32(q[2 * i + 1]);
        }
        (f16::from_f32(exact).to_f32(), sum)
    }
}

/// [`portable::quantize_block16`] on 4-lane registers, rounding exactly like `f32::round`
/// (the scalar loop was most of a 16-bit decode step's extra cost on x86).
#[target_feature(enable = "neon")]
unsafe fn quantize_block16(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    unsafe {
        let (v, d) = load_block(src, 32767.0);
        let q = round_away(&v, d);
        let mut sum = 0;
        for (i, qi) in q.iter().enumerate() {
            vst1_s16(dst.as_mut_ptr().add(4 * i), vqmovn_s32(*qi));
            sum += vaddvq_s32(*qi);
        }
        (d, sum)
    }
}

/// `acc += Σ_{j<4} w[4l + j] · x[4·LANE + j]` for each 32-bit lane `l` (`sdot` by element).
#[inline(always)]
unsafe fn sdot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            lane = const LANE,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// [`sdot`] without the extension: widening multiplies and pairwise adds.
#[inline(always)]
unsafe fn sdot_emulated<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    unsafe {
        let xb = vreinterpretq_s8_s32(vdupq_laneq_s32::<LANE>(vreinterpretq_s32_s8(x)));
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(xb));
        let hi = vmull_high_s8(w, xb);
        vpadalq_s16(acc, vpaddq_s16(lo, hi))
    }
}

/// The 4-input dot product of lane `LANE` of `x` with either instruction.
#[inline(always)]
unsafe fn dot4<const DOT: bool, const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    unsafe { if DOT { sdot::<LANE>(acc, w, x) } else { sdot_emulated::<LANE>(acc, w, x) } }
}

/// Eight f16 values → two f32 registers (`fcvtl`, `fcvtl2`).
#[inline(always)]
unsafe fn load_f16x8(p: *const f16) -> [float32x4_t; 2] {
    unsafe {
        let h = vld1q_u16(p as *const u16);
        let (lo, hi): (float32x4_t, float32x4_t);
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags)
        );
        [lo, hi]
    }
}

/// Four f16 values → one f32 register.
#[inline(always)]
unsafe fn load_f16x4(p: *const f16) -> float32x4_t {
    unsafe {
        let h = vld1_u16(p as *const u16);
        let out: float32x4_t;
        asm!("fcvtl {o:v}.4s, {h:v}.4h", h = in(vreg) h, o = out(vreg) out, options(pure, nomem, nostack, preserves_flags));
        out
    }
}

/// Runs `body::<R>()` with `R` = the runtime row count as a compile-time constant.
macro_rules! dispatch_rows {
    ($rows:expr, $f:ident $(::<$($g:tt),*>)?, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1 $($(, $g)*)?>($($arg),*),
            2 => $f::<2 $($(, $g)*)?>($($arg),*),
            3 => $f::<3 $($(, $g)*)?>($($arg),*),
            _ => $f::<4 $($(, $g)*)?>($($arg),*),
        }
    };
}

#[target_feature(enable = "neon")]
unsafe fn q8_0_tile<const DOT: bool>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    rows: usize,
    out: &mut Tile,
) {
    unsafe { dispatch_rows!(rows, q8_0_rows::<DOT>, w, a, t, row0, out) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_0_tile_dot(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q8_0_rows::<true>, w, a, t, row0, out) }
}

/// Group `g` (inputs `4g..4g + 4` of a block) of one half-tile for every row.
macro_rules! q8_group {
    ($dot:ident, $g:literal, $qb:ident, $xv:ident, $s:ident, $R:ident) => {{
        let flip = vdupq_n_u8(0x80);
        for j in 0..2 {
            let w = vreinterpretq_s8_u8(veorq_u8(vld1q_u8($qb.add($g * 64 + j * 16)), flip));
            for r in 0..$R {
                $s[r][j] = dot4::<$dot, { $g % 4 }>($s[r][j], w, $xv[r][$g / 4]);
            }
        }
    }};
}

#[inline(always)]
unsafe fn q8_0_rows<const R: usize, const DOT: bool>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    out: &mut Tile,
) {
    unsafe {
        let kb = w.k_blocks();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        for half in 0..2 {
            let mut acc = [[vdupq_n_f32(0.0); 2]; R];
            for b in 0..kb {
                let qb = q.add(b * QBLOCK * TILE + half * 32);
                let xv: [[int8x16_t; 2]; R] =
                    std::array::from_fn(|r| [vld1q_s8(xq[r].add(b * QBLOCK)), vld1q_s8(xq[r].add(b * QBLOCK + 16))]);
                let mut s = [[vdupq_n_s32(0); 2]; R];
                q8_group!(DOT, 0, qb, xv, s, R);
                q8_group!(DOT, 1, qb, xv, s, R);
                q8_group!(DOT, 2, qb, xv, s, R);
                q8_group!(DOT, 3, qb, xv, s, R);
                q8_group!(DOT, 4, qb, xv, s, R);
                q8_group!(DOT, 5, qb, xv, s, R);
                q8_group!(DOT, 6, qb, xv, s, R);
                q8_group!(DOT, 7, qb, xv, s, R);
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                for r in 0..R {
                    let xs = vdupq_n_f32(*xd[r].add(b));
                    for j in 0..2 {
                        acc[r][j] = vfmaq_f32(acc[r][j], vcvtq_f32_s32(s[r][j]), vmulq_f32(dw[j], xs));
                    }
                }
            }
            for r in 0..R {
                for j in 0..2 {
                    vst1q_f32(out[r].as_mut_ptr().add(half * HALF + 4 * j), acc[r][j]);
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn q4_1_tile<const DOT: bool>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    rows: usize,
    out: &mut Tile,
) {
    unsafe { dispatch_rows!(rows, q4_1_rows::<DOT>, w, a, t, row0, out) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn q4_1_tile_dot(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q4_1_rows::<true>, w, a, t, row0, out) }
}

/// Group `g` (inputs `8g..8g + 8`: low nibbles `8g..8g+4`, high `8g+4..8g+8`) of one half-tile.
macro_rules! q4_group {
    ($dot:ident, $g:literal, $qb:ident, $xv:ident, $s:ident, $R:ident) => {{
        let nib = vdupq_n_u8(0x0F);
        for j in 0..2 {
            let v = vld1q_u8($qb.add($g * 64 + j * 16));
            let lo = vreinterpretq_s8_u8(vandq_u8(v, nib));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
            for r in 0..$R {
                $s[r][j] = dot4::<$dot, { (2 * $g) % 4 }>($s[r][j], lo, $xv[r][$g / 2]);
                $s[r][j] = dot4::<$dot, { (2 * $g + 1) % 4 }>($s[r][j], hi, $xv[r][$g / 2]);
            }
        }
    }};
}

#[inline(always)]
unsafe fn q4_1_rows<const R: usize, const DOT: bool>(
    w: &PackedMatrix,
    a: &QuantizedActs,
    t: usize,
    row0: usize,
    out: &mut Tile,
) {
    unsafe {
        let kb = w.k_blocks();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let mins = w.mins.as_ptr().add(t * kb * TILE);
        let xq: [*const i8; R] = std::array::from_fn(|r| a.qs.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
        for half in 0..2 {
            let mut acc = [[vdupq_n_f32(0.0); 2]; R];
            let mut accm = [[vdupq_n_f32(0.0); 2]; R];
            for b in 0..kb {
                let qb = q.add(b * QBLOCK * TILE / 2 + half * 32);
                let xv: [[int8x16_t; 2]; R] =
                    std::array::from_fn(|r| [vld1q_s8(xq[r].add(b * QBLOCK)), vld1q_s8(xq[r].add(b * QBLOCK + 16))]);
                let mut s = [[vdupq_n_s32(0); 2]; R];
                q4_group!(DOT, 0, qb, xv, s, R);
                q4_group!(DOT, 1, qb, xv, s, R);
                q4_group!(DOT, 2, qb, xv, s, R);
                q4_group!(DOT, 3, qb, xv, s, R);
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                let mw = load_f16x8(mins.add(b * TILE + half * HALF));
                for r in 0..R {
                    let (xd, xs) = (vdupq_n_f32(*xd[r].add(b)), vdupq_n_f32(*xs[r].add(b)));
                    for j in 0..2 {
                        acc[r][j] = vfmaq_f32(acc[r][j], vcvtq_f32_s32(s[r][j]), vmulq_f32(dw[j], xd));
                        accm[r][j] = vfmaq_f32(accm[r][j], mw[j], xs);
                    }
                }
            }
            for r in 0..R {
                for j in 0..2 {
                    vst1q_f32(out[r].as_mut_ptr().add(half * HALF + 4 * j), vaddq_f32(acc[r][j], accm[r][j]));
                }
            }
        }
    }
}

/// `s += Σ pairs of i16 products` per 32-bit lane (widening multiplies, pairwise add).
#[inline(always)]
unsafe fn dot_pairs(s: int32x4_t, w: int16x8_t, x: int16x8_t) -> int32x4_t {
    unsafe { vaddq_s32(s, vpaddq_s32(vmull_s16(vget_low_s16(w), vget_low_s16(x)), vmull_high_s16(w, x))) }
}

/// Two 16-bit activations in every 32-bit lane.
#[inline(always)]
unsafe fn bcast_pair(p: *const i16) -> int16x8_t {
    unsafe { vreinterpretq_s16_s32(vdupq_n_s32((p as *const i32).read_unaligned())) }
}

#[target_feature(enable = "neon")]
unsafe fn q8_0_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q8_0_rows16, w, a, t, row0, out) }
}

/// Q8_0 × 16-bit activations: a lane's 4 weight bytes, flipped back to signed and split into
/// even and odd bytes, pair with the activations' `[0, 2, 1, 3]` order
/// ([`QuantizedActs::qs16`]), as avx2.rs's `q8_0_rows16` does with `vpmaddwd`.
#[inline(always)]
unsafe fn q8_0_rows16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let xq: [*const i16; R] = std::array::from_fn(|r| a.qs16.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let flip = vdupq_n_u8(0x80);
        for half in 0..2 {
            let mut acc = [[vdupq_n_f32(0.0); 2]; R];
            for b in 0..kb {
                let qb = q.add(b * QBLOCK * TILE + half * 32);
                let mut s = [[vdupq_n_s32(0); 2]; R];
                for g in 0..8 {
                    for j in 0..2 {
                        let ws = vreinterpretq_s16_u8(veorq_u8(vld1q_u8(qb.add(g * 64 + j * 16)), flip));
                        let even = vshrq_n_s16::<8>(vshlq_n_s16::<8>(ws));
                        let odd = vshrq_n_s16::<8>(ws);
                        for r in 0..R {
                            let xp = xq[r].add(b * QBLOCK + g * 4);
                            s[r][j] = dot_pairs(s[r][j], even, bcast_pair(xp));
                            s[r][j] = dot_pairs(s[r][j], odd, bcast_pair(xp.add(2)));
                        }
                    }
                }
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                for r in 0..R {
                    let xs = vdupq_n_f32(*xd[r].add(b));
                    for j in 0..2 {
                        acc[r][j] = vfmaq_f32(acc[r][j], vcvtq_f32_s32(s[r][j]), vmulq_f32(dw[j], xs));
                    }
                }
            }
            for r in 0..R {
                for j in 0..2 {
                    vst1q_f32(out[r].as_mut_ptr().add(half * HALF + 4 * j), acc[r][j]);
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn q4_1_tile16(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, q4_1_rows16, w, a, t, row0, out) }
}

/// Q4_1 × 16-bit activations: nibble pairs (0, 2), (1, 3), (4, 6), (5, 7) of a lane's 8 inputs
/// match the activations' order ([`QuantizedActs::qs16`]), as avx2.rs's `q4_1_rows16` does.
#[inline(always)]
unsafe fn q4_1_rows16<const R: usize>(w: &PackedMatrix, a: &QuantizedActs, t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let kb = w.k_blocks();
        let q = w.data.as_slice().as_ptr().add(t * kb * QBLOCK * TILE / 2);
        let scales = w.scales.as_ptr().add(t * kb * TILE);
        let mins = w.mins.as_ptr().add(t * kb * TILE);
        let xq: [*const i16; R] = std::array::from_fn(|r| a.qs16.as_ptr().add((row0 + r) * a.k));
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d.as_ptr().add((row0 + r) * kb));
        let xs: [*const f32; R] = std::array::from_fn(|r| a.dsums.as_ptr().add((row0 + r) * kb));
        let m = vdupq_n_u32(0x000F_000F);
        for half in 0..2 {
            let mut acc = [[vdupq_n_f32(0.0); 2]; R];
            let mut accm = [[vdupq_n_f32(0.0); 2]; R];
            for b in 0..kb {
                let qb = q.add(b * QBLOCK * TILE / 2 + half * 32);
                let mut s = [[vdupq_n_s32(0); 2]; R];
                for g in 0..4 {
                    for j in 0..2 {
                        let v = vreinterpretq_u32_u8(vld1q_u8(qb.add(g * 64 + j * 16)));
                        let pairs = [
                            vreinterpretq_s16_u32(vandq_u32(v, m)),
                            vreinterpretq_s16_u32(vandq_u32(vshrq_n_u32::<8>(v), m)),
                            vreinterpretq_s16_u32(vandq_u32(vshrq_n_u32::<4>(v), m)),
                            vreinterpretq_s16_u32(vandq_u32(vshrq_n_u32::<12>(v), m)),
                        ];
                        for r in 0..R {
                            let xp = xq[r].add(b * QBLOCK + g * 8);
                            for (p, w) in pairs.iter().enumerate() {
                                s[r][j] = dot_pairs(s[r][j], *w, bcast_pair(xp.add(2 * p)));
                            }
                        }
                    }
                }
                let dw = load_f16x8(scales.add(b * TILE + half * HALF));
                let mw = load_f16x8(mins.add(b * TILE + half * HALF));
                for r in 0..R {
                    let (xd, xs) = (vdupq_n_f32(*xd[r].add(b)), vdupq_n_f32(*xs[r].add(b)));
                    for j in 0..2 {
                        acc[r][j] = vfmaq_f32(acc[r][j], vcvtq_f32_s32(s[r][j]), vmulq_f32(dw[j], xd));
                        accm[r][j] = vfmaq_f32(accm[r][j], mw[j], xs);
                    }
                }
            }
            for r in 0..R {
                for j in 0..2 {
                    vst1q_f32(out[r].as_mut_ptr().add(half * HALF + 4 * j), vaddq_f32(acc[r][j], accm[r][j]));
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn f32_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, f32_rows, w, x, t, row0, out) }
}

/// Two accumulator chains per row, the same for any row count.
#[inline(always)]
unsafe fn f32_rows<const R: usize>(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let k = w.k;
        let wt = w.data.as_f32().as_ptr().add(t * k * TILE);
        let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
        for half in 0..2 {
            let wh = wt.add(half * HALF);
            let mut acc = [[[vdupq_n_f32(0.0); 2]; R]; 2];
            let mut i = 0;
            while i + 2 <= k {
                for c in 0..2 {
                    let wv = [vld1q_f32(wh.add((i + c) * TILE)), vld1q_f32(wh.add((i + c) * TILE + 4))];
                    for r in 0..R {
                        let xv = vdupq_n_f32(*xr[r].add(i + c));
                        for j in 0..2 {
                            acc[c][r][j] = vfmaq_f32(acc[c][r][j], wv[j], xv);
                        }
                    }
                }
                i += 2;
            }
            if i < k {
                let wv = [vld1q_f32(wh.add(i * TILE)), vld1q_f32(wh.add(i * TILE + 4))];
                for r in 0..R {
                    let xv = vdupq_n_f32(*xr[r].add(i));
                    for j in 0..2 {
                        acc[0][r][j] = vfmaq_f32(acc[0][r][j], wv[j], xv);
                    }
                }
            }
            for r in 0..R {
                for j in 0..2 {
                    vst1q_f32(out[r].as_mut_ptr().add(half * HALF + 4 * j), vaddq_f32(acc[0][r][j], acc[1][r][j]));
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn f16_tile(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, rows: usize, out: &mut Tile) {
    unsafe { dispatch_rows!(rows, f16_rows, w, x, t, row0, out) }
}

/// Four chains per row (LoRA's A factors: one tile, hundreds of inputs), the same for any row
/// count.
#[inline(always)]
unsafe fn f16_rows<const R: usize>(w: &PackedMatrix, x: &[f32], t: usize, row0: usize, out: &mut Tile) {
    unsafe {
        let k = w.k;
        let wt = (w.data.as_slice().as_ptr() as *const f16).add(t * k * TILE);
        let xr: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().add((row0 + r) * k));
        for half in 0..2 {
            let wh = wt.add(half * HALF);
            let mut acc = [[[vdupq_n_f32(0.0); 2]; R]; 4];
            let mut i = 0;
            while i + 4 <= k {
                for c in 0..4 {
                    let wv = load_f16x8(wh.add((i + c) * TILE));
                    for r in 0..R {
                        let xv = vdupq_n_f32(*xr[r].add(i + c));
                        for j in 0..2 {
                            acc[c][r][j] = vfmaq_f32(acc[c][r][j], wv[j], xv);
                        }
                    }
                }
                i += 4;
            }
            while i < k {
                let wv = load_f16x8(wh.add(i * TILE));
                for r in 0..R {
                    let xv = vdupq_n_f32(*xr[r].add(i));
                    for j in 0..2 {
                        acc[0][r][j] = vfmaq_f32(acc[0][r][j], wv[j], xv);
                    }
                }
                i += 1;
            }
            for r in 0..R {
                for j in 0..2 {
                    let s = vaddq_f32(vaddq_f32(acc[0][r][j], acc[1][r][j]), vaddq_f32(acc[2][r][j], acc[3][r][j]));
                    vst1q_f32(out[r].as_mut_ptr().add(half * HALF + 4 * j), s);
                }
            }
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn add_f16_tile_rows(
    b: &PackedMatrix,
    tile: usize,
    t: &[f32],
    rows: &[(usize, usize)],
    scale: f32,
    out: &mut Tile,
) {
    unsafe {
        let k = b.k;
        let n = rows.len();
        if n == 0 {
            return;
        }
        let wt = (b.data.as_slice().as_ptr() as *const f16).add(tile * k * TILE);
        let tp: [*const f32; MR] = std::array::from_fn(|r| t.as_ptr().add(rows[r.min(n - 1)].0 * k));
        let s = vdupq_n_f32(scale);
        for half in 0..2 {
            let wh = wt.add(half * HALF);
            let mut acc = [[[vdupq_n_f32(0.0); 2]; MR]; 2];
            let mut i = 0;
            while i < k {
                // Two chains: inputs alternate between them (the last odd one goes to chain 0).
                for c in 0..2 {
                    if i + c < k {
                        let wv = load_f16x8(wh.add((i + c) * TILE));
                        for r in 0..MR {
                            if r < n {
                                let xv = vdupq_n_f32(*tp[r].add(i + c));
                                for j in 0..2 {
                                    acc[c][r][j] = vfmaq_f32(acc[c][r][j], wv[j], xv);
                                }
                            }
                        }
                    }
                }
                i += 2;
            }
            for (r, &(_, o)) in rows.iter().enumerate() {
                for j in 0..2 {
                    let p = out[o].as_mut_ptr().add(half * HALF + 4 * j);
                    vst1q_f32(p, vfmaq_f32(vld1q_f32(p), vaddq_f32(acc[0][r][j], acc[1][r][j]), s));
                }
            }
        }
    }
}

/// Cached elements loaded as 4 f32 lanes.
trait Load4: KvElem {
    /// # Safety
    /// `p` points to 4 readable elements.
    unsafe fn load4(p: *const Self) -> float32x4_t;
}

impl Load4 for f32 {
    #[inline(always)]
    unsafe fn load4(p: *const Self) -> float32x4_t {
        unsafe { vld1q_f32(p) }
    }
}

impl Load4 for f16 {
    #[inline(always)]
    unsafe fn load4(p: *const Self) -> float32x4_t {
        unsafe { load_f16x4(p) }
    }
}

impl Load4 for i8 {
    #[inline(always)]
    unsafe fn load4(p: *const Self) -> float32x4_t {
        unsafe {
            let b = vld1_lane_s32::<0>(p as *const i32, vdup_n_s32(0));
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(b)))))
        }
    }
}

/// Head sizes that are whole numbers of 16-dimension slices take the vector path.
#[target_feature(enable = "neon")]
unsafe fn attend<E: Load4>(a: &QueryArgs, scores: &mut [f32], out: &mut [f32]) {
    unsafe {
        let hd = a.geo.head_dim;
        if hd == 0 || !hd.is_multiple_of(16) {
            return portable::attend::<E>(a, scores, out);
        }
        let (stride, inv) = softmax_scores::<E>(a, scores);
        let sp = scores.as_ptr();
        let mut h = 0;
        while h < a.n_heads {
            let nh = (a.n_heads - h).min(3);
            for d0 in (0..hd).step_by(16) {
                match nh {
                    1 => weighted_values::<E, 1>(a, sp, stride, &inv, out, h, d0),
                    2 => weighted_values::<E, 2>(a, sp, stride, &inv, out, h, d0),
                    _ => weighted_values::<E, 3>(a, sp, stride, &inv, out, h, d0),
                }
            }
            h += nh;
        }
    }
}

/// Scores of 8 keys at a time (two registers per head), then `exp(s − max)` in place.
#[inline(always)]
unsafe fn softmax_scores<E: Load4>(a: &QueryArgs, scores: &mut [f32]) -> (usize, [f32; MAX_GROUP]) {
    unsafe {
        let hd = a.geo.head_dim;
        let nh = a.n_heads;
        let n = a.n_keys;
        let stride = n.div_ceil(16) * 16;
        let scale = vdupq_n_f32(1.0 / (hd as f32).sqrt());
        let k_off = a.geo.k_region(a.layer, a.kv_head);
        let q = a.q.as_ptr();
        let sp = scores.as_mut_ptr();
        let ninf = vdupq_n_f32(f32::NEG_INFINITY);
        let lanes: [u32; 4] = [0, 1, 2, 3];
        let lane = vld1q_u32(lanes.as_ptr());
        let mut maxv = [ninf; MAX_GROUP];
        for c in 0..n.div_ceil(HALF) {
            let (b, sub) = (c * HALF / BLOCK_TOKENS, c * HALF % BLOCK_TOKENS);
            let (kt, k_scales) = region::<E>(a.blocks[b], k_off, a.geo);
            let kt = kt.add(sub);
            let mut acc = [[vdupq_n_f32(0.0); 2]; MAX_GROUP];
            for d in 0..hd {
                let k = [E::load4(kt.add(d * BLOCK_TOKENS)), E::load4(kt.add(d * BLOCK_TOKENS + 4))];
                for h in 0..nh {
                    let qv = vdupq_n_f32(*q.add(h * hd + d));
                    acc[h][0] = vfmaq_f32(acc[h][0], qv, k[0]);
                    acc[h][1] = vfmaq_f32(acc[h][1], qv, k[1]);
                }
            }
            let ks = if E::SCALED {
                [vmulq_f32(scale, vld1q_f32(k_scales.add(sub))), vmulq_f32(scale, vld1q_f32(k_scales.add(sub + 4)))]
            } else {
                [scale, scale]
            };
            let valid = (n - c * HALF).min(HALF) as u32;
            for h in 0..nh {
                for j in 0..2 {
                    let keep = vcltq_u32(vaddq_u32(lane, vdupq_n_u32(4 * j as u32)), vdupq_n_u32(valid));
                    let s = vbslq_f32(keep, vmulq_f32(acc[h][j], ks[j]), ninf);
                    vst1q_f32(sp.add(h * stride + c * HALF + 4 * j), s);
                    maxv[h] = vmaxq_f32(maxv[h], s);
                }
            }
        }
        let mut inv = [0f32; MAX_GROUP];
        for h in 0..nh {
            let m = vdupq_n_f32(vmaxvq_f32(maxv[h]));
            let mut sum = vdupq_n_f32(0.0);
            for c in 0..n.div_ceil(HALF) * 2 {
                let p = sp.add(h * stride + c * 4);
                let e = exp4(vsubq_f32(vld1q_f32(p), m));
                vst1q_f32(p, e);
                sum = vaddq_f32(sum, e);
            }
            inv[h] = 1.0 / vaddvq_f32(sum);
        }
        (stride, inv)
    }
}

/// `out[h] = Σ_t w[h][t]·v[t] / Σ_t w[h][t]` for dimensions `d0..d0 + 16` of `NH` heads.
#[inline(always)]
unsafe fn weighted_values<E: Load4, const NH: usize>(
    a: &QueryArgs,
    sp: *const f32,
    stride: usize,
    inv: &[f32; MAX_GROUP],
    out: &mut [f32],
    h0: usize,
    d0: usize,
) {
    unsafe {
        let hd = a.geo.head_dim;
        let n = a.n_keys;
        let v_off = a.geo.v_region(a.layer, a.kv_head);
        let mut acc = [[vdupq_n_f32(0.0); 4]; NH];
        for b in 0..n.div_ceil(BLOCK_TOKENS) {
            let (vb, v_scales) = region::<E>(a.blocks[b], v_off, a.geo);
            for s in 0..(n - b * BLOCK_TOKENS).min(BLOCK_TOKENS) {
                let t = b * BLOCK_TOKENS + s;
                let vs = if E::SCALED { *v_scales.add(s) } else { 1.0 };
                let vp = vb.add(s * hd + d0);
                let v: [float32x4_t; 4] = std::array::from_fn(|c| E::load4(vp.add(4 * c)));
                for h in 0..NH {
                    let w = vdupq_n_f32(*sp.add((h0 + h) * stride + t) * vs);
                    for c in 0..4 {
                        acc[h][c] = vfmaq_f32(acc[h][c], w, v[c]);
                    }
                }
            }
        }
        for h in 0..NH {
            let iv = vdupq_n_f32(inv[h0 + h]);
            for c in 0..4 {
                vst1q_f32(out.as_mut_ptr().add((h0 + h) * hd + d0 + 4 * c), vmulq_f32(acc[h][c], iv));
            }
        }
    }
}
