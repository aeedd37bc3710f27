//! Budget policies through the pruner: the balance law, exact matched density, the traffic
//! budget, and the baselines against naive sort-based references.
#![allow(clippy::needless_range_loop)]

mod common;

use bb_core::policy::{balance_raw_target, matched_degrees, Gmp};
use bb_core::{log_odds_off, EdgeShape, Pruner, PrunerConfig, Topology};
use common::*;
use proptest::prelude::*;
use rand::Rng;

fn pruner(toml_text: &str, topo: Topology) -> Pruner {
    Pruner::new(PrunerConfig::from_toml_str(toml_text).unwrap(), topo).unwrap()
}

fn chain_weights(r: &mut rand_chacha::ChaCha8Rng, widths: &[usize]) -> Vec<Vec<f32>> {
    widths
        .windows(2)
        .map(|w| random_weights(r, w[0] * w[1], true))
        .collect()
}

fn step_all(p: &mut Pruner, ws: &mut [Vec<f32>]) -> bb_core::RefreshReport {
    let mut refs: Vec<&mut [f32]> = ws.iter_mut().map(|w| w.as_mut_slice()).collect();
    p.refresh(&mut refs, None).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Property 3: before rounding and clipping ln((1-a)/a) = beta (k* - d0) to 1e-9, and
    /// the applied targets are non-increasing in a.
    #[test]
    fn balance_law_and_monotone_targets(
        beta in 0.01f64..5.0, d0 in -20.0f64..60.0, seed in any::<u64>(), units in 2usize..40, d in 2usize..80
    ) {
        let mut r = rng(seed);
        let rates: Vec<f64> = (0..units).map(|_| r.gen_range(0.0..1.0)).collect();
        for &a in &rates {
            let k = balance_raw_target(a, beta, d0);
            prop_assert!((log_odds_off(a) - beta * (k - d0)).abs() <= 1e-9 * (1.0 + log_odds_off(a).abs()));
        }
        let topo = Topology::chain(&["h", "o"], &[d, units, 3]).unwrap();
        let text = format!("{}[policy]\nkind = \"balance\"\nbeta = {beta}\nd0 = {d0}\n", tracker_cfg_fast());
        let mut p = pruner(&text, topo);
        observe_rates(&mut p, "h", &rates, 1000);
        let mut ws = chain_weights(&mut r, &[d, units, 3]);
        step_all(&mut p, &mut ws);
        let a = p.activity("h").unwrap().to_vec();
        let k: Vec<usize> = (0..units).map(|j| p.mask(0).row_count(j)).collect();
        for i in 0..units {
            let want = balance_raw_target(a[i], beta, d0).round().clamp(1.0, d as f64) as usize;
            prop_assert_eq!(k[i], want);
            for j in 0..units {
                if a[i] < a[j] { prop_assert!(k[i] >= k[j]); }
            }
        }
    }

    /// Property 4: with a target density the live-edge count is exactly
    /// round(target * edges), per layer and model-wide, for SP-in and SP-out.
    #[test]
    fn matched_density_is_exact(
        seed in any::<u64>(), w0 in 2usize..30, w1 in 2usize..30, w2 in 2usize..30, w3 in 2usize..10,
        frac in 0.0f64..1.0, beta in 0.05f64..3.0, sp_out in any::<bool>(), model in any::<bool>()
    ) {
        let mut r = rng(seed);
        let widths = [w0, w1, w2, w3];
        let topo = Topology::chain(&["a", "b", "c"], &widths).unwrap();
        // Feasible densities: at least one edge per actuated slab (k_min = 1).
        let min_d = widths.iter().take(3).chain(widths.iter().skip(1)).map(|&x| 1.0 / x as f64).fold(0.0, f64::max);
        let density = (min_d + frac * (1.0 - min_d)).min(1.0);
        let act = if sp_out { "sp_out" } else { "sp_in" };
        let scope = if model { "model" } else { "layer" };
        let text = format!(
            "{}[policy]\nkind = \"balance\"\nbeta = {beta}\ntarget_density = {density}\nscope = \"{scope}\"\n[actuator]\nkind = \"{act}\"\n",
            tracker_cfg_fast()
        );
        let mut p = pruner(&text, topo);
        for (name, n) in [("input", w0), ("a", w1), ("b", w2), ("c", w3)] {
            let rates: Vec<f64> = (0..n).map(|_| r.gen_range(0.0..1.0)).collect();
            observe_rates(&mut p, name, &rates, 200);
        }
        let mut ws = chain_weights(&mut r, &widths);
        let rep = step_all(&mut p, &mut ws);
        let round = |x: f64| x.round() as usize;
        if model {
            let live: usize = rep.layers.iter().map(|l| l.live_edges).sum();
            let all: usize = rep.layers.iter().map(|l| l.edges).sum();
            prop_assert_eq!(live, round(density * all as f64));
        } else {
            for l in &rep.layers {
                prop_assert_eq!(l.live_edges, round(density * l.edges as f64), "layer {}", l.layer);
            }
        }
        // Dead edges are zero in the weights.
        for (l, w) in ws.iter().enumerate() {
            let m = p.mask(l);
            for (e, &x) in w.iter().enumerate() {
                if !m.get(e / m.cols(), e % m.cols()) { prop_assert_eq!(x, 0.0); }
            }
        }
    }

    /// Property 5: after a traffic-threshold refresh every actuated unit has a*k <= tau or sits
    /// at k_min.
    #[test]
    fn traffic_budget_holds(seed in any::<u64>(), tau in 0.0f64..20.0, k_min in 1u32..4, sp_out in any::<bool>()) {
        let mut r = rng(seed);
        let widths = [30, 25, 20];
        let topo = Topology::chain(&["h", "o"], &widths).unwrap();
        let act = if sp_out { "sp_out" } else { "sp_in" };
        let text = format!(
            "{}[policy]\nkind = \"traffic_threshold\"\ntau = {tau}\nrule = \"proportional\"\nk_min = {k_min}\n[actuator]\nkind = \"{act}\"\n",
            tracker_cfg_fast()
        );
        let mut p = pruner(&text, topo);
        let rates: Vec<f64> = (0..25).map(|_| r.gen_range(0.0..1.0)).collect();
        observe_rates(&mut p, "h", &rates, 500);
        let mut ws = chain_weights(&mut r, &widths);
        step_all(&mut p, &mut ws);
        let a = p.activity("h").unwrap();
        let l = if sp_out { 1 } else { 0 };
        for j in 0..25 {
            let k = if sp_out { p.mask(l).col_count(j) } else { p.mask(l).row_count(j) };
            prop_assert!(a[j] * k as f64 <= tau + 1e-12 || k == k_min as usize, "unit {j}: a={} k={k}", a[j]);
        }
    }
}

#[test]
fn matched_degrees_distributes_by_largest_remainder() {
    // Equal offsets: 10 edges over 4 units -> 3,3,2,2 (ties toward the lower index).
    assert_eq!(
        matched_degrees(&[0.0; 4], &[1; 4], &[5; 4], 10).unwrap(),
        vec![3, 3, 2, 2]
    );
    // Clipping at the caps.
    assert_eq!(
        matched_degrees(&[10.0, 0.0, 0.0], &[1; 3], &[4, 9, 9], 10).unwrap(),
        vec![4, 3, 3]
    );
    assert!(matched_degrees(&[0.0; 3], &[2; 3], &[5; 3], 5)
        .unwrap_err()
        .contains("k_min"));
    assert!(matched_degrees(&[0.0; 3], &[1; 3], &[2; 3], 7).is_err());
}

/// Matched degrees of many units (beyond the solver's eight running sums, and not a
/// multiple of eight), some held at their caps: each degree lies within one edge of the
/// real-valued solution `clamp(d0 + offset, lo, hi)`, with `d0` found here by a plain
/// bisection, and the degrees add up to the budget.
#[test]
fn matched_degrees_of_many_units_follow_the_real_solution() {
    let mut r = rng(41);
    for units in [9usize, 37, 1000, 4099] {
        let offsets: Vec<f64> = (0..units).map(|_| r.gen_range(-30.0..30.0)).collect();
        let lo: Vec<u32> = (0..units).map(|_| r.gen_range(1..4)).collect();
        let hi: Vec<u32> = (0..units).map(|_| r.gen_range(40..60)).collect();
        for n in [units * 5, units * 30, units * 45] {
            let k = matched_degrees(&offsets, &lo, &hi, n).unwrap();
            let x = |d0: f64, j: usize| (d0 + offsets[j]).clamp(lo[j] as f64, hi[j] as f64);
            let total = |d0: f64| (0..units).map(|j| x(d0, j)).sum::<f64>();
            let (mut a, mut b) = (-200.0f64, 200.0f64);
            for _ in 0..200 {
                let m = 0.5 * (a + b);
                if total(m) < n as f64 {
                    a = m;
                } else {
                    b = m;
                }
            }
            assert_eq!(
                k.iter().map(|&v| v as usize).sum::<usize>(),
                n,
                "{units} units"
            );
            let capped = (0..units)
                .filter(|&j| k[j] == lo[j] || k[j] == hi[j])
                .count();
            assert!(capped > 0 || n == units * 30, "some units at their caps");
            for j in 0..units {
                let want = x(b, j);
                assert!(
                    (f64::from(k[j]) - want).abs() < 1.0 + 1e-9,
                    "{units} units, budget {n}: unit {j} has {} for {want}",
                    k[j]
                );
            }
        }
    }
}

fn naive_mask_top(scores: &[f32], cand: impl Fn(usize) -> bool, n: usize) -> Vec<bool> {
    let c: Vec<usize> = (0..scores.len()).filter(|&e| cand(e)).collect();
    let s: Vec<f32> = c.iter().map(|&e| scores[e]).collect();
    let mut keep = vec![false; scores.len()];
    for t in naive_top_k(&s, n) {
        keep[c[t]] = true;
    }
    keep
}

fn mask_vec(p: &Pruner, l: usize) -> Vec<bool> {
    let m = p.mask(l);
    (0..m.rows() * m.cols())
        .map(|e| m.get(e / m.cols(), e % m.cols()))
        .collect()
}

/// Property 10: magnitude (rowwise, layer, global) agrees with a naive sort and keeps the
/// requested density.
#[test]
fn magnitude_matches_naive_reference() {
    let widths = [17, 23, 11, 5];
    for scope in ["rowwise", "layer", "global"] {
        for seed in 0..5 {
            let mut r = rng(seed);
            let topo = Topology::chain(&["a", "b", "c"], &widths).unwrap();
            let text = format!("[policy]\nkind = \"magnitude\"\ntarget_density = 0.37\nscope = \"{scope}\"\n[layers.c]\nprune = true\n");
            let mut p = pruner(&text, topo);
            let mut ws = chain_weights(&mut r, &widths);
            let abs: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| w.iter().map(|x| x.abs()).collect())
                .collect();
            let rep = step_all(&mut p, &mut ws);
            match scope {
                "rowwise" => {
                    for (l, a) in abs.iter().enumerate() {
                        let (rows, cols) = (widths[l + 1], widths[l]);
                        let n = (0.37 * (rows * cols) as f64).round() as usize;
                        for o in 0..rows {
                            let k = n / rows + usize::from(o < n % rows);
                            assert_eq!(
                                row(p.mask(l), o),
                                naive_top_k(&a[o * cols..(o + 1) * cols], k)
                            );
                        }
                        assert_eq!(rep.layers[l].live_edges, n);
                    }
                }
                "layer" => {
                    for (l, a) in abs.iter().enumerate() {
                        let n = (0.37 * a.len() as f64).round() as usize;
                        assert_eq!(mask_vec(&p, l), naive_mask_top(a, |_| true, n));
                    }
                }
                _ => {
                    let all: Vec<f32> = abs.concat();
                    let keep =
                        naive_mask_top(&all, |_| true, (0.37 * all.len() as f64).round() as usize);
                    assert_eq!(
                        [mask_vec(&p, 0), mask_vec(&p, 1), mask_vec(&p, 2)].concat(),
                        keep
                    );
                }
            }
        }
    }
}

/// GMP follows the cubic schedule with prune-only magnitude selection.
#[test]
fn gmp_follows_its_schedule() {
    let g = Gmp {
        target_density: 0.2,
        initial_density: 1.0,
        start_step: Some(10),
        end_step: Some(110),
        scope: bb_core::policy::MagnitudeScope::Layer,
    };
    assert_eq!(g.density_at(5, 10, 110), 1.0);
    assert!((g.density_at(60, 10, 110) - (1.0 - (0.8 - 0.8 * 0.125))).abs() < 1e-12);
    assert_eq!(g.density_at(200, 10, 110), 0.2);
    let topo = Topology::chain(&["h", "o"], &[20, 30, 4]).unwrap();
    let text = "[schedule]\nwarmup_steps = 10\nrefresh_every = 10\ntotal_steps = 200\n[policy]\nkind = \"gmp\"\ntarget_density = 0.2\nstart_step = 10\nend_step = 110\n";
    let mut p = pruner(text, topo);
    let mut r = rng(1);
    let mut ws = chain_weights(&mut r, &[20, 30, 4]);
    let mut prev = mask_vec(&p, 0);
    for step in 1..=150u64 {
        let before: Vec<f32> = ws[0].iter().map(|x| x.abs()).collect();
        let mut refs: Vec<&mut [f32]> = ws.iter_mut().map(|w| w.as_mut_slice()).collect();
        if let Some(rep) = p.step(&mut refs, None).unwrap() {
            let d = g.density_at(step, 10, 110);
            let n = (d * 600.0).round() as usize;
            assert_eq!(rep.layers[0].live_edges, n, "step {step}");
            let now = mask_vec(&p, 0);
            assert_eq!(now, naive_mask_top(&before, |e| prev[e], n), "step {step}");
            prev = now;
        }
        // Training moves live weights a little.
        for w in ws[0].iter_mut().filter(|w| **w != 0.0) {
            *w *= 1.0 + 0.01 * r.gen_range(-1.0f32..1.0);
        }
    }
    assert_eq!(p.mask(0).count(), 120);
}

/// RigL drops the weakest live edges and grows the dead edges with the largest gradient
/// (starting at zero); SET grows at random; both keep the density.
#[test]
fn rigl_and_set_drop_and_grow() {
    for kind in ["rigl", "set"] {
        let topo = Topology::chain(&["h", "o"], &[24, 16, 3]).unwrap();
        let text = format!("seed = 5\n[schedule]\nwarmup_steps = 1\nrefresh_every = 1\ntotal_steps = 40\n[policy]\nkind = \"{kind}\"\ntarget_density = 0.25\nalpha = 0.3\nend_step = 30\n");
        let mut p = pruner(&text, topo);
        let mut r = rng(2);
        let mut ws = chain_weights(&mut r, &[24, 16, 3]);
        for step in 1..=35u64 {
            let grads: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| (0..w.len()).map(|_| r.gen_range(-1.0f32..1.0)).collect())
                .collect();
            let before_mask = mask_vec(&p, 0);
            let before_w: Vec<f32> = ws[0].iter().map(|x| x.abs()).collect();
            assert_eq!(p.needs_gradients(), kind == "rigl");
            let g: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let mut refs: Vec<&mut [f32]> = ws.iter_mut().map(|w| w.as_mut_slice()).collect();
            let rep = p
                .step(&mut refs, Some(&g))
                .unwrap()
                .expect("refresh every step");
            assert_eq!(rep.layers[0].live_edges, 96, "{kind} step {step}");
            let now = mask_vec(&p, 0);
            if step > 1 && step < 30 {
                let live = 96usize;
                let frac = 0.3 / 2.0 * (1.0 + (std::f64::consts::PI * step as f64 / 30.0).cos());
                let n_drop = (frac * live as f64).round() as usize;
                let kept = naive_mask_top(&before_w, |e| before_mask[e], live - n_drop);
                for e in 0..now.len() {
                    if kept[e] {
                        assert!(now[e], "{kind}: strong live edge {e} dropped");
                    }
                }
                let grown: Vec<usize> = (0..now.len()).filter(|&e| now[e] && !kept[e]).collect();
                assert_eq!(grown.len(), n_drop);
                assert!(
                    grown.iter().all(|&e| !before_mask[e]),
                    "{kind}: grown edges were dead"
                );
                assert!(
                    grown.iter().all(|&e| ws[0][e] == 0.0),
                    "{kind}: grown weights start at zero"
                );
                if kind == "rigl" {
                    let ga: Vec<f32> = grads[0].iter().map(|x| x.abs()).collect();
                    let want = naive_mask_top(&ga, |e| !before_mask[e], n_drop);
                    let want: Vec<usize> = (0..want.len()).filter(|&e| want[e]).collect();
                    assert_eq!(grown, want, "rigl grows by gradient magnitude");
                }
            }
            if step >= 30 {
                assert_eq!(now, before_mask, "{kind}: no updates after end_step");
            }
            for w in ws[0].iter_mut().filter(|w| **w != 0.0) {
                *w *= 1.0 + 0.05 * r.gen_range(-1.0f32..1.0);
            }
        }
    }
}

#[test]
fn random_mask_is_fixed_after_the_first_refresh() {
    let topo = Topology::chain(&["h", "o"], &[30, 20, 3]).unwrap();
    let mut p = pruner("seed = 9\n[schedule]\nwarmup_steps = 1\nrefresh_every = 1\n[policy]\nkind = \"random\"\ntarget_density = 0.3\n", topo);
    let mut ws = chain_weights(&mut rng(0), &[30, 20, 3]);
    step_all(&mut p, &mut ws);
    let first = mask_vec(&p, 0);
    assert_eq!(p.mask(0).count(), 180);
    step_all(&mut p, &mut ws);
    assert_eq!(mask_vec(&p, 0), first);
}

#[test]
fn surrogates_follow_their_rules() {
    let shape = EdgeShape::dense(10, 40);
    // two_threshold: busy units keep D*0.5, rare ones D*0.9, others untouched.
    let mut p = single_layer("kind = \"two_threshold\"", "kind = \"sp_in\"", &shape);
    let rates = [0.9, 0.05, 0.5, 0.8, 0.0, 0.3, 0.71, 0.09, 0.1, 0.7];
    observe_rates(&mut p, "out", &rates, 1000);
    let mut w = random_weights(&mut rng(4), 400, false);
    p.refresh(&mut [&mut w[..]], None).unwrap();
    let a = p.activity("out").unwrap().to_vec();
    for j in 0..10 {
        let want = if a[j] > 0.7 {
            20
        } else if a[j] < 0.1 {
            36
        } else {
            40
        };
        assert_eq!(p.mask(0).row_count(j), want, "unit {j} a={}", a[j]);
    }
    // inverse_rate: k = clamp(round(d0 / a), k_min, D).
    let mut p = single_layer(
        "kind = \"inverse_rate\"\nd0 = 4.0\nk_min = 2",
        "kind = \"sp_in\"",
        &shape,
    );
    observe_rates(&mut p, "out", &rates, 1000);
    let mut w = random_weights(&mut rng(4), 400, false);
    p.refresh(&mut [&mut w[..]], None).unwrap();
    let a = p.activity("out").unwrap().to_vec();
    for j in 0..10 {
        let want = (4.0 / a[j].max(1e-4)).round().clamp(2.0, 40.0) as usize;
        assert_eq!(p.mask(0).row_count(j), want);
    }
    // quantile_interpolation: busiest 30 % at 0.5 D, rarest 30 % at 0.9 D, prune-only.
    let mut p = single_layer(
        "kind = \"quantile_interpolation\"",
        "kind = \"sp_in\"",
        &shape,
    );
    let lin: Vec<f64> = (0..10).map(|j| j as f64 / 10.0).collect();
    observe_rates(&mut p, "out", &lin, 1000);
    let mut w = random_weights(&mut rng(4), 400, false);
    p.refresh(&mut [&mut w[..]], None).unwrap();
    let k: Vec<usize> = (0..10).map(|j| p.mask(0).row_count(j)).collect();
    assert_eq!(k[9], 20);
    assert_eq!(k[0], 36);
    assert!(k.windows(2).all(|w| w[0] >= w[1]), "{k:?}");
    // activity_only: matched density, busiest units cut.
    let mut p = single_layer(
        "kind = \"activity_only\"\ntarget_density = 0.6",
        "kind = \"sp_in\"",
        &shape,
    );
    observe_rates(&mut p, "out", &lin, 1000);
    let mut w = random_weights(&mut rng(4), 400, false);
    p.refresh(&mut [&mut w[..]], None).unwrap();
    assert_eq!(p.mask(0).count(), 240);
    let k: Vec<usize> = (0..10).map(|j| p.mask(0).row_count(j)).collect();
    assert_eq!(&k[..5], &[40; 5]);
    assert!(k[5..].iter().all(|&x| x == 8), "{k:?}");
}
