//! Benchmark cases shared by the criterion benches and the `bb bench` report.
//!
//! Every engine timing is reported next to a *floor* measured in the same run: the time of
//! one streaming pass (a parallel sum) over the same data — the least any refresh or
//! observation must spend reading it. Sparse inference is reported as the speed-up of the
//! compacted layer over a dense GEMM (the kernels dfdx uses) on the same inputs.

#![warn(missing_docs)]

use bb_core::sparse::{CsrLayer, SparseScratch};
use bb_core::{Activations, BitMask, EdgeShape, Pruner, PrunerConfig, Topology};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Median wall time of `f` over `iters` runs (after one warm-up run).
pub fn median_time(iters: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..iters.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

/// Median wall times of `f` and of `g` over `iters` runs each, the runs alternating
/// (`f`, `g`, `f`, ...) after one warm-up run of each, so that a slow spell of a shared
/// machine falls on both rather than on one of the two. Both get `state`.
pub fn paired_median_times<S>(
    iters: usize,
    state: &mut S,
    mut f: impl FnMut(&mut S),
    mut g: impl FnMut(&mut S),
) -> (Duration, Duration) {
    f(state);
    g(state);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..iters.max(1) {
        let s = Instant::now();
        f(state);
        a.push(s.elapsed());
        let s = Instant::now();
        g(state);
        b.push(s.elapsed());
    }
    a.sort();
    b.sort();
    (a[a.len() / 2], b[b.len() / 2])
}

/// The `q` quantile (0 to 1, nearest rank) of `v`, which must not be empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    t[((t.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

/// The ratios `a[i] / b[i]` of times measured side by side (round `i` of each), and their
/// median and quartiles: the ratio of two arms that slow changes of a shared machine's speed
/// disturb less than the ratio of the arms' medians.
pub fn paired_ratios(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    assert!(
        !a.is_empty() && a.len() == b.len(),
        "paired_ratios: {} and {} rounds",
        a.len(),
        b.len()
    );
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    (quantile(&r, 0.5), quantile(&r, 0.25), quantile(&r, 0.75))
}

/// A distribution-free confidence interval of about 95 % for the median of `v` (not empty):
/// the values of ranks `n/2 -+ 0.98 sqrt(n)` (1-based, rounded outwards, within 1..=n) of the
/// sorted values. The number of values below the true median is Binomial(n, 1/2), so these
/// order statistics enclose it with probability about 0.95 for any distribution; with few
/// values the interval is the whole range.
pub fn median_ci(v: &[f64]) -> (f64, f64) {
    assert!(!v.is_empty(), "median_ci: no values");
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len() as f64;
    let half = 0.98 * n.sqrt();
    let lo = ((n / 2.0 - half).floor() as usize).clamp(1, t.len());
    let hi = ((n / 2.0 + half).ceil() as usize + 1).clamp(1, t.len());
    (t[lo - 1], t[hi - 1])
}

/// One streaming pass over `data` (parallel, several accumulators): the physical floor of
/// any kernel that must read it once.
pub fn stream_sum(data: &[f32]) -> f32 {
    data.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0.0f32; 8];
            let (q, r) = c.split_at(c.len() / 8 * 8);
            for x in q.chunks_exact(8) {
                for l in 0..8 {
                    acc[l] += x[l];
                }
            }
            acc.iter().sum::<f32>() + r.iter().sum::<f32>()
        })
        .sum()
}

/// Seeded uniform values in `[-1, 1)`.
pub fn random_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

/// One row of a report: a measured time, its reference and their ratio.
#[derive(Debug, Clone)]
pub struct Row {
    /// Section (`refresh`, `observe`, `sparse`, ...).
    pub section: &'static str,
    /// What was measured.
    pub case: String,
    /// Time of the measured kernel.
    pub time: Duration,
    /// Time of the reference (the streaming floor, or the dense layer).
    pub reference: Duration,
    /// How the ratio reads (`x floor` or `x faster than dense`).
    pub ratio_label: &'static str,
    /// The ratio where it was measured directly rather than from the two times (training:
    /// the median over rounds of the ratio of two blocks of steps run side by side, which
    /// slow changes of the machine's speed disturb less than the ratio of two medians).
    pub paired_ratio: Option<f64>,
}

impl Row {
    /// `time / reference` for floors, `reference / time` for speed-ups, or the ratio
    /// measured directly ([`Row::paired_ratio`]) where there is one.
    pub fn ratio(&self) -> f64 {
        if let Some(r) = self.paired_ratio {
            return r;
        }
        let (t, r) = (self.time.as_secs_f64(), self.reference.as_secs_f64());
        if self.section == "sparse" {
            r / t
        } else {
            t / r
        }
    }
}

/// A pruner over one layer of `shape`, pruned with the balance policy.
pub fn refresh_pruner(shape: &EdgeShape, actuator: &str, regrow: bool, matched: bool) -> Pruner {
    let d = shape.slab_len(if actuator == "sp_in" {
        bb_core::Side::Rows
    } else {
        bb_core::Side::Columns
    });
    let policy = if matched {
        "kind = \"balance\"\nbeta = 0.05\ntarget_density = 0.5".to_string()
    } else {
        format!("kind = \"balance\"\nbeta = 0.05\nd0 = {}", d / 2)
    };
    let text = format!(
        "[policy]\n{policy}\n[actuator]\nkind = \"{actuator}\"\nregrow = {regrow}\n[layers.layer]\nprune = true\n"
    );
    let topo = Topology::new()
        .population("in", shape.inp)
        .population("out", shape.out)
        .conv_layer("layer", "in", "out", &shape.kernel);
    let mut p = Pruner::new(
        PrunerConfig::from_toml_str(&text).expect("bench config"),
        topo,
    )
    .expect("bench pruner");
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let units = if actuator == "sp_in" {
        shape.out
    } else {
        shape.inp
    };
    let pop = if actuator == "sp_in" { "out" } else { "in" };
    let rates: Vec<f64> = (0..units).map(|_| r.gen_range(0.01..0.99)).collect();
    p.set_activity(pop, &rates).expect("rates");
    p
}

/// Refresh timings against the streaming floor of the same weights.
pub fn refresh_rows(shapes: &[EdgeShape], iters: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    for shape in shapes {
        for actuator in ["sp_in", "sp_out"] {
            for regrow in [true, false] {
                for matched in [true, false] {
                    // Fresh weights for every case: a refresh zeroes the edges it prunes,
                    // and a later case must not start from an earlier one's zeros.
                    let mut w = random_vec(7, shape.weight_len());
                    let mut p = refresh_pruner(shape, actuator, regrow, matched);
                    let (t, floor) = paired_median_times(
                        iters,
                        &mut w,
                        |w| {
                            black_box(p.refresh(&mut [&mut w[..]], None).expect("refresh"));
                        },
                        |w| {
                            black_box(stream_sum(w));
                        },
                    );
                    let dims: Vec<String> = [shape.out, shape.inp]
                        .iter()
                        .chain(&shape.kernel)
                        .map(|d| d.to_string())
                        .collect();
                    rows.push(Row {
                        section: "refresh",
                        case: format!(
                            "{} {actuator} regrow={regrow} {}",
                            dims.join("x"),
                            if matched { "matched" } else { "d0" }
                        ),
                        time: t,
                        reference: floor,
                        ratio_label: "x floor",
                        paired_ratio: None,
                    });
                }
            }
        }
    }
    rows
}

/// Weights that move between refreshes, as in training: every weight has its own factor in
/// `1 ± drift` (seeded), applied on even calls `i` and undone on odd ones.
#[derive(Debug, Clone)]
pub struct Drift {
    factors: Vec<f32>,
}

impl Drift {
    /// Factors for `n` weights.
    pub fn new(n: usize, drift: f32) -> Self {
        let factors = random_vec(9, n).iter().map(|u| 1.0 + drift * u).collect();
        Drift { factors }
    }

    /// Moves `w` (the `i`-th time).
    pub fn apply(&self, w: &mut [f32], i: usize) {
        for (x, f) in w.iter_mut().zip(&self.factors) {
            *x = if i.is_multiple_of(2) { *x * f } else { *x / f };
        }
    }
}

/// Median time of a refresh (the balance policy at density 0.5, regrowth on) of one plain
/// layer whose weights drift by `drift` before each refresh (untimed), and of the streaming
/// pass over them timed after each refresh; also the mean churn of the refreshes.
pub fn drift_times(
    shape: &EdgeShape,
    actuator: &str,
    drift: f32,
    iters: usize,
) -> (Duration, Duration, f64) {
    let mut w = random_vec(7, shape.weight_len());
    let mut p = refresh_pruner(shape, actuator, true, true);
    let d = Drift::new(w.len(), drift);
    // The first refresh prunes from the dense start; the drift starts from its mask.
    p.refresh(&mut [&mut w[..]], None).expect("refresh");
    let (mut t, mut fl, mut churn) = (Vec::new(), Vec::new(), 0.0);
    for i in 0..iters.max(1) {
        d.apply(&mut w, i);
        let s = Instant::now();
        let r = p.refresh(&mut [&mut w[..]], None).expect("refresh");
        t.push(s.elapsed());
        churn += r.layers[0].churn / iters.max(1) as f64;
        let s = Instant::now();
        black_box(stream_sum(&w));
        fl.push(s.elapsed());
    }
    t.sort();
    fl.sort();
    (t[t.len() / 2], fl[fl.len() / 2], churn)
}

/// [`drift_times`] of SP-in and SP-out as report rows.
pub fn drift_rows(shape: &EdgeShape, drift: f32, iters: usize) -> Vec<Row> {
    ["sp_in", "sp_out"]
        .iter()
        .map(|actuator| {
            let (t, floor, churn) = drift_times(shape, actuator, drift, iters);
            Row {
                section: "refresh",
                case: format!(
                    "{}x{} {actuator} regrow=true matched, weights drifting {}% between refreshes (churn {churn:.1e})",
                    shape.out,
                    shape.inp,
                    drift * 100.0
                ),
                time: t,
                reference: floor,
                ratio_label: "x floor",
                paired_ratio: None,
            }
        })
        .collect()
}

/// Activity observation (EMA update) against the streaming floor of the activations.
pub fn observe_rows(iters: usize, conv: (usize, usize, usize), dense: (usize, usize)) -> Vec<Row> {
    let mut rows = Vec::new();
    let (b, u) = dense;
    let x = random_vec(3, b * u);
    let topo = Topology::new()
        .population("in", 4)
        .population("h", u)
        .population("o", 2)
        .layer("a", "in", "h")
        .layer("b", "h", "o");
    let cfg = PrunerConfig::from_toml_str("[policy]\nkind = \"dense\"\n").expect("config");
    let mut p = Pruner::new(cfg, topo).expect("pruner");
    let (t, f) = paired_median_times(
        iters,
        &mut (),
        |_| {
            p.observe("h", Activations::batch_major(&x, b, u))
                .expect("observe")
        },
        |_| {
            black_box(stream_sum(&x));
        },
    );
    rows.push(Row {
        section: "observe",
        case: format!("{b}x{u} [batch, units]"),
        time: t,
        reference: f,
        ratio_label: "x floor",
        paired_ratio: None,
    });
    let (cb, cu, pos) = conv;
    let x = random_vec(4, cb * cu * pos);
    let topo = Topology::new()
        .population("in", 4)
        .population("h", cu)
        .population("o", 2)
        .layer("a", "in", "h")
        .layer("b", "h", "o");
    let cfg = PrunerConfig::from_toml_str("[policy]\nkind = \"dense\"\n").expect("config");
    let mut p = Pruner::new(cfg, topo).expect("pruner");
    let (t, f) = paired_median_times(
        iters,
        &mut (),
        |_| {
            p.observe("h", Activations::batch_major_positions(&x, cb, cu, pos))
                .expect("observe")
        },
        |_| {
            black_box(stream_sum(&x));
        },
    );
    rows.push(Row {
        section: "observe",
        case: format!("{cb}x{cu}x{pos} [batch, channels, positions]"),
        time: t,
        reference: f,
        ratio_label: "x floor",
        paired_ratio: None,
    });
    rows
}

/// A mask keeping `round(density * inp)` random entries of every row.
pub fn random_row_mask(out: usize, inp: usize, density: f64, seed: u64) -> BitMask {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let k = (density * inp as f64).round() as usize;
    let mut m = BitMask::empty(out, inp);
    for o in 0..out {
        for c in rand::seq::index::sample(&mut r, inp, k).iter() {
            m.set(o, c, true);
        }
    }
    m
}

/// `y[batch, out] = x[batch, in] W^T` with the dense GEMM kernels.
pub fn dense_forward(w: &[f32], out: usize, inp: usize, x: &[f32], batch: usize, y: &mut [f32]) {
    assert_eq!(w.len(), out * inp);
    assert_eq!(x.len(), batch * inp);
    assert_eq!(y.len(), batch * out);
    let threads = rayon::current_num_threads();
    // SAFETY: the asserts above bound every access gemm makes through these strides.
    unsafe {
        gemm::gemm(
            batch,
            out,
            inp,
            y.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            1,
            inp as isize,
            w.as_ptr(),
            inp as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// Compacted inference against the dense layer, same inputs, same run.
pub fn sparse_rows(
    sizes: &[usize],
    densities: &[f64],
    batches: &[usize],
    iters: usize,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &n in sizes {
        let w = random_vec(5, n * n);
        for &d in densities {
            let mask = random_row_mask(n, n, d, 9);
            let mut masked = w.clone();
            bb_actuators::zero_dead(&EdgeShape::dense(n, n), &mask, &mut masked).expect("mask");
            let csr = CsrLayer::from_masked(&masked, &mask, None, None).expect("csr");
            for &b in batches {
                let x = random_vec(6, b * n);
                let mut y = vec![0.0f32; b * n];
                let mut scratch = SparseScratch::default();
                let mut yd = vec![0.0f32; b * n];
                let (ts, td) = paired_median_times(
                    iters,
                    &mut (),
                    |_| csr.forward(&x, b, &mut y, &mut scratch).expect("forward"),
                    |_| dense_forward(&masked, n, n, &x, b, &mut yd),
                );
                rows.push(Row {
                    section: "sparse",
                    case: format!("{n}x{n} density {d} batch {b}"),
                    time: ts,
                    reference: td,
                    ratio_label: "x faster than dense",
                    paired_ratio: None,
                });
            }
        }
    }
    rows
}

/// Renders rows as Markdown tables, one per section.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut section = "";
    for r in rows {
        if r.section != section {
            section = r.section;
            let reference = match section {
                "sparse" => "dense",
                "training" => "dense step",
                _ => "floor",
            };
            out.push_str(&format!(
                "\n### {section}\n\n| case | time (ms) | {reference} (ms) | ratio |\n|---|---:|---:|---:|\n"
            ));
        }
        // a ratio measured directly (training) is read against goals of a few percent
        let digits = if r.paired_ratio.is_some() { 3 } else { 2 };
        out.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.digits$} {} |\n",
            r.case,
            r.time.as_secs_f64() * 1e3,
            r.reference.as_secs_f64() * 1e3,
            r.ratio(),
            r.ratio_label
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interval holds the median; it narrows as the rounds grow; and over many samples
    /// of a known distribution it misses the true median about 5 % of the time.
    #[test]
    fn median_ci_encloses_the_median_about_95_percent_of_the_time() {
        let (lo, hi) = median_ci(&[3.0, 1.0, 2.0]);
        assert_eq!((lo, hi), (1.0, 3.0));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut missed, trials) = (0, 2000);
        let mut widths = [0.0f64; 2];
        for t in 0..trials {
            let n = if t % 2 == 0 { 101 } else { 401 };
            // uniform on [0, 2): true median 1
            let v: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..2.0)).collect();
            let (lo, hi) = median_ci(&v);
            assert!(lo <= quantile(&v, 0.5) && quantile(&v, 0.5) <= hi);
            missed += usize::from(!(lo <= 1.0 && 1.0 <= hi));
            widths[t % 2] += hi - lo;
        }
        let rate = missed as f64 / trials as f64;
        assert!((0.02..=0.08).contains(&rate), "missed {rate}");
        // four times the rounds: about half the width
        let ratio = widths[1] / widths[0];
        assert!((0.4..0.6).contains(&ratio), "width ratio {ratio}");
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
    }

    /// An arm 2 % slower than the other in every round, on a machine whose speed changes by
    /// 3x between rounds (and a slow round of its own): the paired ratio is 1.02, while the
    /// ratio of the medians is thrown off by the single slow round.
    #[test]
    fn paired_ratios_cancel_the_machine_speed() {
        let dense = [1.0, 1.0, 1.0, 3.0, 3.0];
        let mut bb: Vec<f64> = dense.iter().map(|d| d * 1.02).collect();
        bb[2] = 2.9;
        let (med, q1, q3) = paired_ratios(&bb, &dense);
        assert!(
            (med - 1.02).abs() < 1e-12 && (q1 - 1.02).abs() < 1e-12,
            "{med} {q1}"
        );
        assert!(q3 >= med);
        assert!((quantile(&bb, 0.5) / quantile(&dense, 0.5) - 1.02).abs() > 0.01);
    }
}
