//! Times one compacted-inference case against the dense layer, for profiling (`perf record`):
//! `sparse_profile [N] [DENSITY] [BATCH] [ITERS]` (a random N x N layer, rows of equal degree).

use bb_bench::{dense_forward, paired_median_times, random_row_mask, random_vec};
use bb_core::sparse::{CsrLayer, SparseScratch};
use bb_core::EdgeShape;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a.get(1).map_or(1024, |s| s.parse().expect("N"));
    let d: f64 = a.get(2).map_or(0.5, |s| s.parse().expect("DENSITY"));
    let b: usize = a.get(3).map_or(128, |s| s.parse().expect("BATCH"));
    let iters: usize = a.get(4).map_or(50, |s| s.parse().expect("ITERS"));
    let w = random_vec(5, n * n);
    let mask = random_row_mask(n, n, d, 9);
    let mut masked = w.clone();
    bb_actuators::zero_dead(&EdgeShape::dense(n, n), &mask, &mut masked).expect("mask");
    let csr = CsrLayer::from_masked(&masked, &mask, None, None).expect("csr");
    let x = random_vec(6, b * n);
    let (mut y, mut yd) = (vec![0.0f32; b * n], vec![0.0f32; b * n]);
    let mut scratch = SparseScratch::default();
    let (ts, td) = paired_median_times(
        iters,
        &mut (),
        |_| csr.forward(&x, b, &mut y, &mut scratch).expect("forward"),
        |_| dense_forward(&masked, n, n, &x, b, &mut yd),
    );
    let err = y
        .iter()
        .zip(&yd)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    println!(
        "{n}x{n} density {d} batch {b}: sparse {:.3} ms, dense {:.3} ms, {:.2}x faster (max |diff| {err:.2e})",
        ts.as_secs_f64() * 1e3,
        td.as_secs_f64() * 1e3,
        td.as_secs_f64() / ts.as_secs_f64()
    );
}
