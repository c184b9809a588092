//! Micro-benchmarks of the hot paths (`cargo bench --bench kernels`): the packed matrix
//! products at 1, 2 and 16 activation rows (the CFG pair is the 2-row case) and paged attention,
//! on SmolLM2-135M's shapes with synthetic weights. A small self-contained harness (median of
//! repeated runs, interleaved) instead of criterion, to keep CI build times down.

use lethe::model::ProjKind;
use lethe::model::RopeStyle;
use lethe::model::kernels::attention::{self, KvDtype, KvGeometry, RopeRows, SeqSpan};
use lethe::model::kernels::{PackedMatrix, matmul};
use lethe::model::lora::{LoraBatch, LoraPair, LoraWeights};
use std::sync::Arc;
use std::time::Instant;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = lethe::sampling::Rng::new(seed);
    (0..n).map(|_| rng.next_f32() - 0.5).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // One layer's projections (fused qkv, o, fused gate|up, down) in Q8_0.
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mats: Vec<PackedMatrix> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| PackedMatrix::quantize_q8_0(&rand(n * k, i as u64), n, k).unwrap())
        .collect();
    let rows = [1usize, 2, 16];
    let x = rand(16 * 1536, 99);
    let mut y = vec![0f32; 16 * 3072];
    let mut times = vec![Vec::new(); rows.len()];
    for _ in 0..30 {
        for (i, &m) in rows.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..10 {
                for w in &mats {
                    matmul(w, &x[..m * w.k], m, &mut y[..m * w.n]);
                }
            }
            times[i].push(t.elapsed().as_secs_f64() / 10.0);
        }
    }
    let base = median(times[0].clone());
    for (i, &m) in rows.iter().enumerate() {
        let t = median(times[i].clone());
        println!("q8_0 layer projections, {m:>2} rows: {:>8.1} µs  ({:.2}x 1 row)", t * 1e6, t / base);
    }

    // Attention of one layer over 200 cached positions, 1 and 2 sequences.
    let geo = KvGeometry { n_layers: 1, n_heads: 9, n_kv_heads: 3, head_dim: 64, dtype: KvDtype::F16 };
    let inv: Vec<f32> = (0..32).map(|i| 1.0 / 100000f32.powf(i as f32 / 32.0)).collect();
    for n_seq in [1usize, 2] {
        let ctx: usize = 200;
        let mut blocks: Vec<Vec<Vec<u64>>> = (0..n_seq)
            .map(|_| (0..(ctx + 1).div_ceil(16)).map(|_| vec![0u64; geo.block_bytes() / 8]).collect())
            .collect();
        let mut spans: Vec<SeqSpan> = blocks
            .iter_mut()
            .enumerate()
            .map(|(i, b)| SeqSpan {
                shared: Vec::new(),
                blocks: b.iter_mut().map(|x| &mut x[..]).collect(),
                start: ctx,
                len: 1,
                row: i,
            })
            .collect();
        let qkv = rand(n_seq * 15 * 64, 7);
        let rope = RopeRows::new(&vec![ctx as u32; n_seq], &inv, RopeStyle::Interleaved);
        let mut out = vec![0f32; n_seq * 9 * 64];
        let mut t = Vec::new();
        for _ in 0..200 {
            let s = Instant::now();
            attention::paged_attention(&geo, 0, &qkv, &mut spans, &rope, &mut out);
            t.push(s.elapsed().as_secs_f64());
        }
        println!("attention, 1 layer, {n_seq} seq x {ctx} positions: {:>6.1} µs", median(t) * 1e6);
    }

    streamed();
    lora();
}

/// The projections of all 30 layers of SmolLM2-135M in Q4_1 at 1 and 2 rows (the CFG pair), for
/// every kernel set this CPU runs, done twice:
/// - *streamed*: 30 layers' weights (~66 MB, more than the private caches hold), as in a real
///   decode step;
/// - *cached*: the same products on one layer's weights (~2.2 MB) reused 30 times, so the time
///   is the kernel's arithmetic;
/// - *beyond L3*: 16 copies of the streamed weights (~1 GB), read in turn, so every byte comes
///   from DRAM even on CPUs whose L3 holds the whole model (this machine kind's VMs report
///   260–300 MB of L3). That is the regime of CPUs whose L3 is smaller than the model: AMD Zen
///   2/3 (16–32 MB per core complex) and Intel client parts, where the AVX2 kernels run.
///
/// The ratios show where the second row's cost comes from: with cached weights it is the
/// arithmetic per row against the arithmetic shared by the rows (unpacking the weights);
/// streamed, how much of that the wait for memory hides. Rounds interleave every case; a ratio
/// is the median of per-round ratios.
fn streamed() {
    use lethe::simd::isa::{self, Isa};
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mats: Vec<PackedMatrix> = (0..30 * shapes.len())
        .map(|i| {
            let (n, k) = shapes[i % shapes.len()];
            let t = candle_core::Tensor::from_vec(rand(n * k, i as u64), (n, k), &candle_core::Device::Cpu).unwrap();
            let q = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q4_1).unwrap();
            PackedMatrix::from_q4_1_blocks(&q.data().unwrap(), n, k).unwrap()
        })
        .collect();
    let mb = |n: usize| mats[..n].iter().map(|m| m.size_in_bytes()).sum::<usize>() as f64 / 1e6;
    let copies = 16;
    let workloads = [
        (format!("streamed ({:.0} MB)", mb(mats.len())), mats.len(), 1),
        (format!("cached ({:.1} MB x30)", mb(shapes.len())), shapes.len(), 1),
        (format!("beyond L3 ({:.0} MB)", copies as f64 * mb(mats.len())), mats.len(), copies),
    ];
    // Each pass of the beyond-L3 workload reads the next copy in turn; the others read copy 0
    // (`mats` itself).
    let mut far: Vec<Vec<PackedMatrix>> = (1..copies).map(|_| mats.clone()).collect();
    far.insert(0, mats);
    let mut next_copy = 0;
    let x = rand(2 * 1536, 98);
    let mut y = vec![0f32; 2 * 3072];
    let isas: Vec<Isa> = Isa::supported().into_iter().filter(|&i| i != Isa::Portable).collect();
    let before = isa::active();
    // [workload][isa][rows - 1] -> seconds per round.
    let mut times = vec![vec![[Vec::new(), Vec::new()]; isas.len()]; workloads.len()];
    for _ in 0..15 {
        for (wi, &(_, distinct, copies)) in workloads.iter().enumerate() {
            for (ii, &set) in isas.iter().enumerate() {
                isa::activate(set).unwrap();
                for m in 1..=2 {
                    let copy = &far[next_copy % copies];
                    next_copy += 1;
                    let t = Instant::now();
                    for i in 0..copy.len() {
                        let w = &copy[i % distinct];
                        matmul(w, &x[..m * w.k], m, &mut y[..m * w.n]);
                    }
                    times[wi][ii][m - 1].push(t.elapsed().as_secs_f64());
                }
            }
        }
    }
    isa::activate(before).unwrap();
    for (wi, (label, _, _)) in workloads.iter().enumerate() {
        for (ii, set) in isas.iter().enumerate() {
            let [one, two] = &times[wi][ii];
            let ratio = median(one.iter().zip(two).map(|(a, b)| b / a).collect());
            println!(
                "q4_1 projections of 30 layers, {label:<21} {:<10}: 1 row {:>5.2} ms, 2 rows {:>5.2} ms ({ratio:.2}x)",
                set.name(),
                median(one.clone()) * 1e3,
                median(two.clone()) * 1e3
            );
        }
    }
}

/// One layer's projections with a rank-16 LoRA on every one of them (SmolLM2 shapes), against
/// the same projections without: the per-layer cost of a forget-adapter, 1 and 8 rows, and 8
/// rows spread over 4 adapters.
fn lora() {
    let groups: [Vec<(ProjKind, usize)>; 4] = [
        vec![(ProjKind::Q, 576), (ProjKind::K, 192), (ProjKind::V, 192)],
        vec![(ProjKind::O, 576)],
        vec![(ProjKind::Gate, 1536), (ProjKind::Up, 1536)],
        vec![(ProjKind::Down, 576)],
    ];
    let ins = [576usize, 576, 576, 1536];
    let rank = 16;
    let adapter = |seed: u64| {
        let mut slots: [Option<LoraPair>; 7] = std::array::from_fn(|_| None);
        for (g, &k) in groups.iter().zip(&ins) {
            for &(kind, out) in g {
                let a = rand(rank * k, seed + kind as u64);
                let b = rand(out * rank, seed + 10 + kind as u64);
                slots[kind as usize] =
                    Some(LoraPair::new(&a, &b, rank, 2.0, (k, out), true, &candle_core::Device::Cpu).unwrap());
            }
        }
        Arc::new(LoraWeights { layers: vec![slots], bytes: 0 })
    };
    let adapters: Vec<_> = (0..4).map(|i| adapter(100 * i)).collect();
    type Parts = Vec<(ProjKind, std::ops::Range<usize>)>;
    let mats: Vec<(PackedMatrix, Parts)> = groups
        .iter()
        .zip(&ins)
        .enumerate()
        .map(|(i, (g, &k))| {
            let n: usize = g.iter().map(|p| p.1).sum();
            let mut parts = Vec::new();
            let mut at = 0;
            for &(kind, out) in g {
                parts.push((kind, at..at + out));
                at += out;
            }
            let t = candle_core::Tensor::from_vec(rand(n * k, i as u64), (n, k), &candle_core::Device::Cpu).unwrap();
            let q = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q4_1).unwrap();
            (PackedMatrix::from_q4_1_blocks(&q.data().unwrap(), n, k).unwrap(), parts)
        })
        .collect();
    let x = rand(8 * 1536, 5);
    let cases: Vec<(&str, usize, Option<LoraBatch>)> = vec![
        ("1 row, base", 1, None),
        ("1 row, 1 adapter", 1, Some(LoraBatch { uses: vec![(adapters[0].clone(), std::iter::once(0..1).collect())] })),
        ("8 rows, base", 8, None),
        (
            "8 rows, 1 adapter",
            8,
            Some(LoraBatch { uses: vec![(adapters[0].clone(), std::iter::once(0..8).collect())] }),
        ),
        (
            "8 rows, 4 adapters",
            8,
            Some(LoraBatch {
                uses: (0..4).map(|i| (adapters[i].clone(), std::iter::once(2 * i..2 * i + 2).collect())).collect(),
            }),
        ),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    for _ in 0..50 {
        for (ci, (_, m, lora)) in cases.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..10 {
                for (w, parts) in &mats {
                    let xs = &x[..m * w.k];
                    let y = match lora.as_ref().and_then(|l| l.shrink_host(0, parts, xs, w.k)) {
                        Some(d) => matmul::matmul_new_then(w, xs, *m, &d),
                        None => matmul::matmul_new(w, xs, *m),
                    };
                    std::hint::black_box(y);
                }
            }
            times[ci].push(t.elapsed().as_secs_f64() / 10.0);
        }
    }
    for (ci, (label, _, _)) in cases.iter().enumerate() {
        let t = median(times[ci].clone());
        println!("q4_1 layer + rank-16 LoRA, {label:<20}: {:>7.1} µs", t * 1e6);
    }
}
