//! The numeric pieces of training, forward and backward, on row-major f32 matrices in host
//! memory.
//!
//! Why not candle's autograd: in candle 0.11.1, `QMatMul`, `ops::rms_norm`, `softmax_last_dim`
//! and the fused rope ops record no gradient (and say nothing), and its matmul backward always
//! computes the gradient of *both* operands — for a frozen base weight that doubles the backward
//! FLOPs and allocates a weight-sized buffer per projection per step. Training a LoRA needs only
//! the input gradient of every frozen projection plus the small factor gradients, so the backward
//! is written out here, stage by stage, and checked against finite differences in the tests.
//!
//! Matrix products go through the `gemm` crate (the one candle uses on the CPU), called with
//! strides so that transposed operands are never copied.

use crate::model::RopeStyle;
use crate::model::kernels::attention::RopeRows;
use rayon::prelude::*;

/// A read-only matrix view: `rows × cols`, element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix of {rows}×{cols} over {} values", data.len());
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// Rows of a wider row-major matrix: `rows × cols` starting at `data[0]`, rows `ld` apart.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(cols <= ld && (rows == 0 || data.len() >= (rows - 1) * ld + cols), "strided view out of bounds");
        Self { data, rows, cols, rs: ld, cs: 1 }
    }

    /// The transpose (a view; nothing is copied).
    pub fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// Whether a product may use every thread of the current pool. Products inside an already
/// parallel loop (per sequence, per head) must not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// `out = scale · a · b` (or `out += scale · a · b` with `accumulate`), `out` row-major with rows
/// `ld` apart.
pub fn matmul(out: &mut [f32], ld: usize, a: Mat, b: Mat, scale: f32, accumulate: bool, threads: Threads) {
    let (m, n) = (a.rows, b.cols);
    assert!(n <= ld && (m == 0 || n == 0 || out.len() >= (m - 1) * ld + n), "output too small for {m}×{n}");
    // SAFETY: the assert bounds every output index; `a` and `b` are bounded by their views.
    unsafe { matmul_ptr(out.as_mut_ptr(), ld, a, b, scale, accumulate, threads) }
}

/// [`matmul`] into a raw output, for parallel tasks that write disjoint columns of the same rows
/// (slices of those rows would alias).
///
/// # Safety
/// `out` must be valid for writes at `i·ld + j` for every `i < a.rows`, `j < b.cols`, and no
/// other thread may access those elements during the call.
unsafe fn matmul_ptr(out: *mut f32, ld: usize, a: Mat, b: Mat, scale: f32, accumulate: bool, threads: Threads) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ: {}×{} · {}×{}", a.rows, a.cols, b.rows, b.cols);
    assert!(n <= ld, "output rows of {n} in a stride of {ld}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: inside the output the caller vouches for.
                unsafe { std::slice::from_raw_parts_mut(out.add(i * ld), n).fill(0.0) };
            }
        }
        return;
    }
    let par = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => match rayon::current_num_threads() {
            1 => gemm::Parallelism::None,
            t => gemm::Parallelism::Rayon(t),
        },
    };
    // SAFETY: `a` and `b` are bounded by their views' constructors (rows, cols and strides
    // inside their slices); the output by the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// `x · wᵀ` for a weight stored `[out, in]` (the PyTorch/HF layout): `[rows, out]`.
pub fn linear(x: &[f32], rows: usize, w: &[f32], out_f: usize, in_f: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out_f];
    matmul(&mut y, out_f, Mat::new(x, rows, in_f), Mat::new(w, out_f, in_f).t(), 1.0, false, Threads::All);
    y
}

/// `dx += dy · w` for a weight stored `[out, in]`: the input gradient of [`linear`].
pub fn linear_backward_input(dx: &mut [f32], dy: &[f32], rows: usize, w: &[f32], out_f: usize, in_f: usize) {
    matmul(dx, in_f, Mat::new(dy, rows, out_f), Mat::new(w, out_f, in_f), 1.0, true, Threads::All);
}

/// RMSNorm of each row of `x: [rows, n]`: returns `x / rms(x) · w` and the `1 / rms` per row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let rows = x.len() / n;
    let mut out = vec![0f32; x.len()];
    let mut inv = vec![0f32; rows];
    out.par_chunks_mut(n).zip(inv.par_iter_mut()).zip(x.par_chunks(n)).for_each(|((o, inv), x)| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
        *inv = 1.0 / (ms + eps).sqrt();
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = x * *inv * w;
        }
    });
    (out, inv)
}

/// `x / rms(x) · w` again from the saved `1 / rms` (cheaper to recompute than to keep).
pub fn rms_norm_apply(x: &[f32], inv: &[f32], w: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).zip(inv.par_iter()).for_each(|((o, x), &inv)| {
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = x * inv * w;
        }
    });
    out
}

/// Backward of [`rms_norm`]: `dx += ∂(x / rms(x) · w)/∂x · dy`. With `g = dy ⊙ w` and
/// `r = 1 / rms(x)`: `dx = r·g − x · r³ · (g·x) / n`.
pub fn rms_norm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], inv: &[f32], w: &[f32]) {
    let n = w.len();
    dx.par_chunks_mut(n).zip(dy.par_chunks(n)).zip(x.par_chunks(n)).zip(inv.par_iter()).for_each(
        |(((dx, dy), x), &r)| {
            let gx: f32 = dy.iter().zip(w).zip(x).map(|((d, w), x)| d * w * x).sum();
            let c = r * r * r * gx / n as f32;
            for (((dx, &d), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += r * d * w - c * x;
            }
        },
    );
}

/// `silu(g) · u` for `gu: [rows, 2f]` (gate then up, as the fused projection lays them out),
/// and `σ(g)`, which the backward needs (kept rather than recomputed: the exponential is the
/// expensive part, and it runs vectorised here).
pub fn swiglu(gu: &[f32], f: usize) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; gu.len() / 2];
    let mut sig = vec![0f32; gu.len() / 2];
    out.par_chunks_mut(f).zip(sig.par_chunks_mut(f)).zip(gu.par_chunks(2 * f)).for_each(|((o, sg), gu)| {
        let (g, u) = gu.split_at(f);
        for (s, &g) in sg.iter_mut().zip(g) {
            *s = -g;
        }
        let neg = sg.to_vec();
        crate::simd::exp_shifted(&neg, 0.0, sg);
        for (((o, s), &g), &u) in o.iter_mut().zip(sg.iter_mut()).zip(g).zip(u) {
            *s = 1.0 / (1.0 + *s);
            *o = g * *s * u;
        }
    });
    (out, sig)
}

/// `silu(g) · u` from the saved `σ(g)`.
pub fn swiglu_apply(gu: &[f32], sig: &[f32], f: usize) -> Vec<f32> {
    let mut out = vec![0f32; sig.len()];
    out.par_chunks_mut(f).zip(sig.par_chunks(f)).zip(gu.par_chunks(2 * f)).for_each(|((o, s), gu)| {
        let (g, u) = gu.split_at(f);
        for (((o, &s), &g), &u) in o.iter_mut().zip(s).zip(g).zip(u) {
            *o = g * s * u;
        }
    });
    out
}

/// Backward of [`swiglu`]: `d(gu)` from `d(out)`. With `σ = sigmoid(g)`:
/// `∂/∂u = silu(g)`, `∂/∂g = u · σ · (1 + g · (1 − σ))`.
pub fn swiglu_backward(dout: &[f32], gu: &[f32], sig: &[f32], f: usize) -> Vec<f32> {
    let mut dgu = vec![0f32; gu.len()];
    dgu.par_chunks_mut(2 * f).zip(gu.par_chunks(2 * f)).zip(dout.par_chunks(f)).zip(sig.par_chunks(f)).for_each(
        |(((dgu, gu), d), s)| {
            let (g, u) = gu.split_at(f);
            let (dg, du) = dgu.split_at_mut(f);
            for i in 0..f {
                du[i] = d[i] * g[i] * s[i];
                dg[i] = d[i] * u[i] * s[i] * (1.0 + g[i] * (1.0 - s[i]));
            }
        },
    );
    dgu
}

/// Rotates every head of every row of `x: [rows, heads · head_dim]` by its row's angles
/// (`inverse`: by the opposite angles — the backward of the rotation is its transpose).
pub fn rope(x: &mut [f32], heads: usize, rope: &RopeRows, inverse: bool) {
    let d = 2 * rope.half;
    x.par_chunks_mut(heads * d).enumerate().for_each(|(row, xr)| {
        for head in xr.chunks_exact_mut(d) {
            if inverse {
                rotate_inverse(head, rope, row);
            } else {
                rope.apply(head, row);
            }
        }
    });
}

fn rotate_inverse(x: &mut [f32], rope: &RopeRows, row: usize) {
    let h = rope.half;
    let (c, s) = (&rope.cos[row * h..][..h], &rope.sin[row * h..][..h]);
    let (stride, step) = match rope.style {
        RopeStyle::Interleaved => (1, 2),
        RopeStyle::Half => (h, 1),
    };
    for i in 0..h {
        let (ia, ib) = (i * step, i * step + stride);
        let (a, b) = (x[ia], x[ib]);
        x[ia] = a * c[i] + b * s[i];
        x[ib] = -a * s[i] + b * c[i];
    }
}

/// Where one sequence sits in a packed batch: rows `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// Shapes of grouped-query attention.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// A raw pointer that parallel tasks may share because each writes its own disjoint part.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Causal attention of each sequence over itself: `q: [T, heads·d]`, `k, v: [T, kv_heads·d]`
/// (rotated already). Returns the output `[T, heads·d]` and the log-sum-exp of every
/// (row, head) softmax, `[T, heads]` — all the backward needs to recompute the probabilities
/// instead of keeping `heads · len²` of them per sequence (FlashAttention's trick).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], spans: &[Span], shape: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let rows = q.len() / shape.q_dim();
    let mut out = vec![0f32; rows * shape.q_dim()];
    let mut lse = vec![0f32; rows * shape.heads];
    let (out_p, lse_p) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let tasks: Vec<(Span, usize)> = spans.iter().flat_map(|&s| (0..shape.heads).map(move |h| (s, h))).collect();
    tasks.par_iter().for_each(|&(span, head)| {
        let (out_p, lse_p) = (out_p, lse_p);
        let n = span.len;
        let d = shape.head_dim;
        let (qd, kvd) = (shape.q_dim(), shape.kv_dim());
        let kvh = head / shape.group();
        let qs = Mat::strided(&q[span.start * qd + head * d..], n, d, qd);
        let ks = Mat::strided(&k[span.start * kvd + kvh * d..], n, d, kvd);
        let vs = Mat::strided(&v[span.start * kvd + kvh * d..], n, d, kvd);
        let mut p = vec![0f32; n * n];
        matmul(&mut p, n, qs, ks.t(), 1.0 / (d as f32).sqrt(), false, Threads::One);
        let mut row_lse = vec![0f32; n];
        for (i, (row, l)) in p.chunks_exact_mut(n).zip(row_lse.iter_mut()).enumerate() {
            *l = softmax_causal(row, i);
        }
        // SAFETY: this task alone writes head `head`'s columns of the span's rows of `out`,
        // and its (row, head) entries of `lse`; both buffers outlive the parallel loop.
        unsafe {
            let o = out_p.0.add(span.start * qd + head * d);
            matmul_ptr(o, qd, Mat::new(&p, n, n), vs, 1.0, false, Threads::One);
            for (i, l) in row_lse.into_iter().enumerate() {
                *lse_p.0.add((span.start + i) * shape.heads + head) = l;
            }
        }
    });
    (out, lse)
}

/// Softmax of `row[..=last]` in place (entries after `last` are masked to 0); returns the
/// log-sum-exp of the unmasked scores.
fn softmax_causal(row: &mut [f32], last: usize) -> f32 {
    let (live, masked) = row.split_at_mut(last + 1);
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in live.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    masked.fill(0.0);
    max + sum.ln()
}

/// Backward of [`attention`]: from `dout: [T, heads·d]`, the gradients of `q`, `k` and `v`.
/// Probabilities are recomputed from `lse`; tasks run per (sequence, kv head) so the heads of a
/// group that share `k`/`v` accumulate into them without races.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    spans: &[Span],
    shape: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qd, kvd, d) = (shape.q_dim(), shape.kv_dim(), shape.head_dim);
    let rows = q.len() / qd;
    let mut dq = vec![0f32; rows * qd];
    let mut dk = vec![0f32; rows * kvd];
    let mut dv = vec![0f32; rows * kvd];
    let (dq_p, dk_p, dv_p) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
    let scale = 1.0 / (d as f32).sqrt();
    let tasks: Vec<(Span, usize)> = spans.iter().flat_map(|&s| (0..shape.kv_heads).map(move |g| (s, g))).collect();
    tasks.par_iter().for_each(|&(span, kvh)| {
        let (dq_p, dk_p, dv_p) = (dq_p, dk_p, dv_p);
        let n = span.len;
        // SAFETY (for every `matmul_ptr` below): a task owns the columns of kv head `kvh` in
        // dk/dv, and the columns of the query heads of its group in dq, over its span's rows;
        // tasks never overlap, and the buffers outlive the parallel loop.
        let dk_out = unsafe { dk_p.0.add(span.start * kvd + kvh * d) };
        let dv_out = unsafe { dv_p.0.add(span.start * kvd + kvh * d) };
        let ks = Mat::strided(&k[span.start * kvd + kvh * d..], n, d, kvd);
        let vs = Mat::strided(&v[span.start * kvd + kvh * d..], n, d, kvd);
        let mut p = vec![0f32; n * n];
        let mut dp = vec![0f32; n * n];
        for head in kvh * shape.group()..(kvh + 1) * shape.group() {
            let qs = Mat::strided(&q[span.start * qd + head * d..], n, d, qd);
            let dos = Mat::strided(&dout[span.start * qd + head * d..], n, d, qd);
            // P again, from the scores and the saved log-sum-exp.
            matmul(&mut p, n, qs, ks.t(), scale, false, Threads::One);
            for (i, row) in p.chunks_exact_mut(n).enumerate() {
                let l = lse[(span.start + i) * shape.heads + head];
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j <= i { (*x - l).exp() } else { 0.0 };
                }
            }
            // dV += Pᵀ dO;  dP = dO Vᵀ
            unsafe { matmul_ptr(dv_out, kvd, Mat::new(&p, n, n).t(), dos, 1.0, true, Threads::One) };
            matmul(&mut dp, n, dos, vs.t(), 1.0, false, Threads::One);
            // dS = P ⊙ (dP − rowsum(dO ⊙ O)), the softmax backward.
            for i in 0..n {
                let o = &out[(span.start + i) * qd + head * d..][..d];
                let g = &dout[(span.start + i) * qd + head * d..][..d];
                let delta: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                let (pr, dpr) = (&p[i * n..][..=i], &mut dp[i * n..(i + 1) * n]);
                for j in 0..=i {
                    dpr[j] = pr[j] * (dpr[j] - delta);
                }
                dpr[i + 1..].fill(0.0);
            }
            // dQ = dS K · scale;  dK += dSᵀ Q · scale
            unsafe {
                let dq_out = dq_p.0.add(span.start * qd + head * d);
                matmul_ptr(dq_out, qd, Mat::new(&dp, n, n), ks, scale, false, Threads::One);
                matmul_ptr(dk_out, kvd, Mat::new(&dp, n, n).t(), qs, scale, true, Threads::One);
            }
        }
    });
    (dq, dk, dv)
}

/// `log(1 − eˣ)` for `x < 0`, without the cancellation of the naive form near 0 (Mächler's
/// log1mexp): `log(−expm1(x))` above `−ln 2`, `log1p(−eˣ)` below.
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 { (-x.exp()).ln_1p() } else { (-x.exp_m1()).ln() }
}

/// `log σ(x)`, stable for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 { -(-x).exp().ln_1p() } else { x - x.exp().ln_1p() }
}

/// `σ(x)`.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_views_agree_with_the_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut got = vec![1f32; m * n];
        matmul(&mut got, n, Mat::new(&a, m, k), Mat::new(&b, k, n), 1.0, false, Threads::All);
        assert!(got.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));
        // Transposed storage of b, accumulate with a scale.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(&mut got, n, Mat::new(&a, m, k), Mat::new(&bt, n, k).t(), 2.0, true, Threads::One);
        assert!(got.iter().zip(&want).all(|(x, y)| (x - 3.0 * y).abs() < 1e-4));
    }

    #[test]
    fn log1mexp_is_stable_near_zero_and_far_below() {
        for &x in &[-1e-12f64, -1e-6, -0.1, -0.69, -0.7, -5.0, -50.0] {
            let naive = (1.0 - x.exp()).ln();
            let got = log1mexp(x);
            assert!(got.is_finite(), "{x}");
            if x < -1e-6 {
                assert!((got - naive).abs() < 1e-9 * naive.abs().max(1.0), "{x}: {got} vs {naive}");
            }
        }
        // The naive form loses everything at -1e-17 (1 − e^x rounds to 0 → −inf).
        assert!((log1mexp(-1e-17) - (1e-17f64).ln()).abs() < 1e-6);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9 && log_sigmoid(800.0).abs() < 1e-300);
    }

    #[test]
    fn inverse_rope_undoes_rope() {
        for style in [RopeStyle::Interleaved, RopeStyle::Half] {
            let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0)).collect();
            let rope_rows = RopeRows::new(&[0, 3, 17], &inv, style);
            let x: Vec<f32> = (0..3 * 2 * 8).map(|i| (i as f32).sin()).collect();
            let mut y = x.clone();
            rope(&mut y, 2, &rope_rows, false);
            assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3));
            rope(&mut y, 2, &rope_rows, true);
            assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
        }
    }
}
