//! Weight matrices re-laid out for multi-row matrix-vector products.
//!
//! GGUF stores a weight `[n, k]` (n outputs, k inputs) row by row, in blocks of 32 inputs.
//! Computing a few activation rows against it row by row needs a horizontal sum per output and
//! re-reads every activation block per output. We instead pack *tiles* of [`TILE`] = 16 output
//! rows: for each 32-input block, the 16 rows' values are interleaved four inputs at a time, so
//! one 512-bit `vpdpbusd` multiplies 4 inputs of all 16 rows by 4 broadcast activation values and
//! lands 16 independent partial sums, one per output row. Every weight byte is loaded once per
//! step and reused by every activation row in registers, which is what makes a 2-row (CFG pair)
//! step cost barely more than a 1-row step: the step is bound by reading weights, not by math.
//!
//! Formats:
//! - [`PackedFormat::Q8_0`]: 8-bit weights, one f16 scale per 32-block (as GGUF's Q8_0). Stored
//!   offset by +128 as `u8`, because `vpdpbusd` wants one unsigned operand; the offset is removed
//!   with the activation block sums (`Σ(w+128)·a = Σw·a + 128·Σa`).
//! - [`PackedFormat::Q4_1`]: 4-bit unsigned weights with an f16 scale and min per block (GGUF's
//!   Q4_1), two values per byte.
//! - [`PackedFormat::F32`]: plain f32, 16 rows interleaved per input; for float checkpoints and
//!   tiny test models.
//! - [`PackedFormat::F16`]: the same layout in f16 (half the bytes, f32 arithmetic); for LoRA
//!   factors, which are read once per step by every row using the adapter.
//!
//! Rows beyond `n` in the last tile are zero padding.

use half::f16;

/// Asks for the cache lines of the `len` packed bytes that lie `ahead` bytes past `p`: the block
/// the kernel reaches a few blocks from now ([`super::matmul::prefetch_bytes`]; 0 asks for
/// nothing). A tile's blocks are contiguous and tiles follow each other, so "ahead" is simply
/// later in the stream, across tile ends too.
/// (Past the end of the matrix near its last tiles: harmless, see
/// [`crate::simd::x86::prefetch_lines`].)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_ahead(p: *const u8, len: usize, ahead: usize) {
    if ahead != 0 {
        crate::simd::x86::prefetch_lines(p.wrapping_add(ahead), len);
    }
}

/// Output rows per tile (one 512-bit register of i32/f32 lanes).
pub const TILE: usize = 16;
/// Inputs per quantization block (GGUF's QK8_0 / QK4_1).
pub const QBLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedFormat {
    Q8_0,
    Q4_1,
    F32,
    F16,
}

impl PackedFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_1 => "q4_1",
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// A 64-byte aligned byte buffer (cache-line aligned tiles, aligned 512-bit loads).
#[derive(Clone)]
pub struct AlignedBytes {
    buf: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        Self { buf: vec![Line([0; 64]); len.div_ceil(64)], len }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `buf` holds at least `len` initialised bytes, `Line` is plain bytes.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const u8, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut u8, self.len) }
    }
    pub fn as_f32(&self) -> &[f32] {
        debug_assert!(self.len.is_multiple_of(4));
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const f32, self.len / 4) }
    }
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut f32, self.len / 4) }
    }
}

/// A weight matrix `[n, k]` packed in tiles of 16 output rows (see the module docs).
#[derive(Clone)]
pub struct PackedMatrix {
    pub format: PackedFormat,
    /// Output features (rows of the original matrix).
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Quantized values or f32 values, tile-major.
    pub(crate) data: AlignedBytes,
    /// Per tile, per block, 16 row scales (Q8_0, Q4_1).
    pub(crate) scales: Vec<f16>,
    /// Per tile, per block, 16 row minimums (Q4_1 only).
    pub(crate) mins: Vec<f16>,
}

impl PackedMatrix {
    pub fn n_tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }
    pub fn k_blocks(&self) -> usize {
        self.k / QBLOCK
    }
    /// Bytes held in memory.
    pub fn size_in_bytes(&self) -> usize {
        self.data.as_slice().len() + 2 * (self.scales.len() + self.mins.len())
    }
    /// Bytes of quantized data per (tile, block).
    pub(crate) fn tile_block_bytes(format: PackedFormat) -> usize {
        match format {
            PackedFormat::Q8_0 => QBLOCK * TILE,
            PackedFormat::Q4_1 => QBLOCK * TILE / 2,
            PackedFormat::F32 => QBLOCK * TILE * 4,
            PackedFormat::F16 => QBLOCK * TILE * 2,
        }
    }

    /// Packs GGUF Q8_0 blocks (34 bytes: f16 scale, 32 × i8) of an `[n, k]` matrix.
    pub fn from_q8_0_blocks(raw: &[u8], n: usize, k: usize) -> Result<Self, String> {
        const BLOCK_BYTES: usize = 34;
        check_raw_len(raw, n, k, BLOCK_BYTES)?;
        let kb = k / QBLOCK;
        let mut m = Self::zeroed(PackedFormat::Q8_0, n, k);
        let data = m.data.as_mut_slice();
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..kb {
                let blk = &raw[(row * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                m.scales[(t * kb + b) * TILE + r] = f16::from_le_bytes([blk[0], blk[1]]);
                let dst = &mut data[(t * kb + b) * QBLOCK * TILE..][..QBLOCK * TILE];
                for (i, &q) in blk[2..].iter().enumerate() {
                    dst[q8_index(i, r)] = (q as i8 as i16 + 128) as u8;
                }
            }
        }
        Ok(m)
    }

    /// Packs GGUF Q4_1 blocks (20 bytes: f16 scale, f16 min, 16 bytes of nibbles) of `[n, k]`.
    pub fn from_q4_1_blocks(raw: &[u8], n: usize, k: usize) -> Result<Self, String> {
        const BLOCK_BYTES: usize = 20;
        check_raw_len(raw, n, k, BLOCK_BYTES)?;
        let kb = k / QBLOCK;
        let mut m = Self::zeroed(PackedFormat::Q4_1, n, k);
        let data = m.data.as_mut_slice();
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for b in 0..kb {
                let blk = &raw[(row * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                let tb = (t * kb + b) * TILE + r;
                m.scales[tb] = f16::from_le_bytes([blk[0], blk[1]]);
                m.mins[tb] = f16::from_le_bytes([blk[2], blk[3]]);
                // GGUF: value j (< 16) is the low nibble of qs[j], value j + 16 the high nibble.
                let mut vals = [0u8; QBLOCK];
                for j in 0..16 {
                    vals[j] = blk[4 + j] & 0x0F;
                    vals[j + 16] = blk[4 + j] >> 4;
                }
                let dst = &mut data[(t * kb + b) * QBLOCK * TILE / 2..][..QBLOCK * TILE / 2];
                for (i, &v) in vals.iter().enumerate() {
                    let (byte, high) = q4_index(i, r);
                    dst[byte] |= if high { v << 4 } else { v };
                }
            }
        }
        Ok(m)
    }

    /// Quantizes an f32 `[n, k]` row-major matrix to packed Q8_0 (llama.cpp's rounding).
    pub fn quantize_q8_0(w: &[f32], n: usize, k: usize) -> Result<Self, String> {
        if !k.is_multiple_of(QBLOCK) {
            return Err(format!("cannot quantize to q8_0: {k} inputs is not a multiple of 32"));
        }
        if w.len() != n * k {
            return Err(format!("expected {} values, got {}", n * k, w.len()));
        }
        let mut raw = Vec::with_capacity(n * k / QBLOCK * 34);
        for block in w.chunks_exact(QBLOCK) {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            raw.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            raw.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
        }
        Self::from_q8_0_blocks(&raw, n, k)
    }

    /// Packs an f32 `[n, k]` row-major matrix without loss.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Result<Self, String> {
        if w.len() != n * k {
            return Err(format!("expected {} values, got {}", n * k, w.len()));
        }
        let mut m = Self::zeroed(PackedFormat::F32, n, k);
        let data = m.data.as_f32_mut();
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for (i, &x) in w[row * k..][..k].iter().enumerate() {
                data[(t * k + i) * TILE + r] = x;
            }
        }
        Ok(m)
    }

    fn zeroed(format: PackedFormat, n: usize, k: usize) -> Self {
        let tiles = n.div_ceil(TILE);
        let (data_len, n_scales) = match format {
            PackedFormat::F32 => (tiles * TILE * k * 4, 0),
            PackedFormat::F16 => (tiles * TILE * k * 2, 0),
            _ => (tiles * (k / QBLOCK) * Self::tile_block_bytes(format), tiles * TILE * (k / QBLOCK)),
        };
        let n_mins = if format == PackedFormat::Q4_1 { n_scales } else { 0 };
        Self {
            format,
            n,
            k,
            data: AlignedBytes::zeroed(data_len),
            scales: vec![f16::ZERO; n_scales],
            mins: vec![f16::ZERO; n_mins],
        }
    }

    /// Packs an f32 `[n, k]` row-major matrix as f16 (any `k`).
    pub fn from_f32_as_f16(w: &[f32], n: usize, k: usize) -> Result<Self, String> {
        if w.len() != n * k {
            return Err(format!("expected {} values, got {}", n * k, w.len()));
        }
        let mut m = Self::zeroed(PackedFormat::F16, n, k);
        let data = m.data.as_mut_slice();
        for row in 0..n {
            let (t, r) = (row / TILE, row % TILE);
            for (i, &x) in w[row * k..][..k].iter().enumerate() {
                let at = ((t * k + i) * TILE + r) * 2;
                data[at..at + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        Ok(m)
    }

    /// Row `row` of the matrix as f32 (the embedding lookup of a tied output head).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.n && out.len() == self.k);
        let (t, r) = (row / TILE, row % TILE);
        let kb = self.k_blocks();
        match self.format {
            PackedFormat::F32 => {
                let data = self.data.as_f32();
                for (i, o) in out.iter_mut().enumerate() {
                    *o = data[(t * self.k + i) * TILE + r];
                }
            }
            PackedFormat::F16 => {
                let data = self.data.as_slice();
                for (i, o) in out.iter_mut().enumerate() {
                    let at = ((t * self.k + i) * TILE + r) * 2;
                    *o = f16::from_le_bytes([data[at], data[at + 1]]).to_f32();
                }
            }
            PackedFormat::Q8_0 => {
                let data = self.data.as_slice();
                for b in 0..kb {
                    let d = self.scales[(t * kb + b) * TILE + r].to_f32();
                    let src = &data[(t * kb + b) * QBLOCK * TILE..];
                    for i in 0..QBLOCK {
                        out[b * QBLOCK + i] = d * (src[q8_index(i, r)] as i32 - 128) as f32;
                    }
                }
            }
            PackedFormat::Q4_1 => {
                let data = self.data.as_slice();
                for b in 0..kb {
                    let d = self.scales[(t * kb + b) * TILE + r].to_f32();
                    let m = self.mins[(t * kb + b) * TILE + r].to_f32();
                    let src = &data[(t * kb + b) * QBLOCK * TILE / 2..];
                    for i in 0..QBLOCK {
                        let (byte, high) = q4_index(i, r);
                        let q = if high { src[byte] >> 4 } else { src[byte] & 0x0F };
                        out[b * QBLOCK + i] = d * q as f32 + m;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32 `[n, k]`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (row, chunk) in out.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
            self.dequantize_row(row, chunk);
        }
        out
    }

    /// Stacks matrices with the same `k` and format along the output dimension (fused q/k/v or
    /// gate/up projections: one kernel call and one thread hand-off instead of several).
    /// Each part must have a multiple of 16 rows so tiles do not straddle parts.
    pub fn concat_rows(parts: &[&PackedMatrix]) -> Result<Self, String> {
        let first = parts.first().ok_or("nothing to concatenate")?;
        if parts.iter().any(|p| p.k != first.k || p.format != first.format) {
            return Err("concatenated matrices differ in input size or format".into());
        }
        if parts.iter().any(|p| !p.n.is_multiple_of(TILE)) {
            return Err("fused projections need multiples of 16 outputs".into());
        }
        let mut data = Vec::new();
        let mut scales = Vec::new();
        let mut mins = Vec::new();
        for p in parts {
            data.extend_from_slice(p.data.as_slice());
            scales.extend_from_slice(&p.scales);
            mins.extend_from_slice(&p.mins);
        }
        let mut bytes = AlignedBytes::zeroed(data.len());
        bytes.as_mut_slice().copy_from_slice(&data);
        Ok(Self { format: first.format, n: parts.iter().map(|p| p.n).sum(), k: first.k, data: bytes, scales, mins })
    }
}

/// Position within a Q8_0 (tile, block) of input `i` (0..32) of tile row `r`:
/// groups of 4 inputs, each group holding 16 rows × 4 bytes.
#[inline]
pub(crate) fn q8_index(i: usize, r: usize) -> usize {
    (i / 4) * TILE * 4 + r * 4 + i % 4
}

/// Position (byte, high nibble?) within a Q4_1 (tile, block) of input `i` of tile row `r`:
/// groups of 8 inputs; byte `j` of a row's 4 bytes holds input `8g + j` low and `8g + j + 4` high.
#[inline]
pub(crate) fn q4_index(i: usize, r: usize) -> (usize, bool) {
    let (g, j) = (i / 8, i % 8);
    ((g * TILE + r) * 4 + j % 4, j >= 4)
}

fn check_raw_len(raw: &[u8], n: usize, k: usize, block_bytes: usize) -> Result<(), String> {
    if !k.is_multiple_of(QBLOCK) {
        return Err(format!("{k} inputs is not a multiple of the block size 32"));
    }
    let want = n * k / QBLOCK * block_bytes;
    if raw.len() != want {
        return Err(format!("expected {want} bytes of blocks, got {}", raw.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn f32_pack_round_trips() {
        let (n, k) = (37, 64);
        let w = rand_vec(n * k, 1);
        let p = PackedMatrix::from_f32(&w, n, k).unwrap();
        assert_eq!(p.dequantize(), w);
    }

    #[test]
    fn q8_0_quantization_is_close() {
        let (n, k) = (20, 96);
        let w = rand_vec(n * k, 2);
        let p = PackedMatrix::quantize_q8_0(&w, n, k).unwrap();
        for (a, b) in p.dequantize().iter().zip(&w) {
            assert!((a - b).abs() <= 1.0 / 127.0 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_1_unpacks_gguf_layout() {
        // One row, one block: d = 0.5, m = -1, nibbles 0..15 then 15..0.
        let mut raw = Vec::new();
        raw.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        raw.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            raw.push(j | ((15 - j) << 4));
        }
        let p = PackedMatrix::from_q4_1_blocks(&raw, 1, 32).unwrap();
        let mut row = vec![0f32; 32];
        p.dequantize_row(0, &mut row);
        for j in 0..16 {
            assert_eq!(row[j], 0.5 * j as f32 - 1.0);
            assert_eq!(row[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn concat_keeps_rows() {
        let a = PackedMatrix::from_f32(&rand_vec(16 * 32, 3), 16, 32).unwrap();
        let b = PackedMatrix::from_f32(&rand_vec(32 * 32, 4), 32, 32).unwrap();
        let c = PackedMatrix::concat_rows(&[&a, &b]).unwrap();
        let mut want = a.dequantize();
        want.extend(b.dequantize());
        assert_eq!(c.dequantize(), want);
    }
}
