//! The dfdx adapter: forward and gradients of the runtime-shaped MLP, the cross-entropy guard,
//! and how the pruner sees and steers the model during training.

use bb_core::{Pruner, PrunerConfig};
use bb_tasks::config::topology;
use bb_tasks::model::{contiguous_cross_entropy, Mlp};
use bb_tasks::optim::{Optimizer, OptimizerConfig};
use bb_tasks::trainer::train_step;
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_batch(
    rng: &mut ChaCha8Rng,
    batch: usize,
    features: usize,
    classes: usize,
) -> (Vec<f32>, Vec<usize>) {
    let x = (0..batch * features)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let y = (0..batch).map(|_| rng.gen_range(0..classes)).collect();
    (x, y)
}

/// Host reference forward in f64: returns (hidden activations per layer, logits).
fn naive_forward(
    widths: &[usize],
    w: &[Vec<f32>],
    b: &[Vec<f32>],
    scale: &[Option<Vec<f32>>],
    x: &[f32],
    batch: usize,
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut h: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut hidden = Vec::new();
    for l in 0..widths.len() - 1 {
        let (i, o) = (widths[l], widths[l + 1]);
        let mut y = vec![0f64; batch * o];
        for r in 0..batch {
            for u in 0..o {
                let mut acc = 0f64;
                for k in 0..i {
                    acc += w[l][u * i + k] as f64 * h[r * i + k];
                }
                if let Some(s) = &scale[l] {
                    acc *= s[u] as f64;
                }
                acc += b[l][u] as f64;
                y[r * o + u] = if l + 2 < widths.len() {
                    acc.max(0.0)
                } else {
                    acc
                };
            }
        }
        if l + 2 < widths.len() {
            hidden.push(y.clone());
        }
        h = y;
    }
    (hidden, h)
}

fn host_loss(logits: &[f32], y: &[usize], classes: usize) -> f64 {
    let mut loss = 0.0;
    for (r, &t) in y.iter().enumerate() {
        let z = &logits[r * classes..(r + 1) * classes];
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        loss += lse - z[t] as f64;
    }
    loss / y.len() as f64
}

#[test]
fn forward_matches_a_naive_reference_and_gradients_match_finite_differences() {
    let dev = Cpu::default();
    let widths = [5, 7, 6, 3];
    let mut model = Mlp::new(&dev, &widths, 11).unwrap();
    let scale: Vec<f32> = (0..7).map(|u| 0.5 + 0.25 * u as f32).collect();
    model.set_scale(0, Some(&scale)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (x, y) = random_batch(&mut rng, 9, 5, 3);
    let w: Vec<Vec<f32>> = (0..3).map(|l| model.weights(l).to_vec()).collect();
    let b: Vec<Vec<f32>> = (0..3).map(|l| model.bias(l).to_vec()).collect();
    let scales = vec![Some(scale.clone()), None, None];
    let (hid_ref, logit_ref) = naive_forward(&widths, &w, &b, &scales, &x, 9);
    let out = model.forward(&x, 9).unwrap();
    for (a, r) in out.logits.iter().zip(&logit_ref) {
        assert!((*a as f64 - r).abs() < 1e-5, "{a} vs {r}");
    }
    for (h, hr) in out.hidden.iter().zip(&hid_ref) {
        for (a, r) in h.iter().zip(hr) {
            assert!((*a as f64 - r).abs() < 1e-5);
        }
    }
    // gradients of the training pass against central differences of the host loss
    let step = model.train_step(&x, &y, 9).unwrap();
    assert!((step.loss as f64 - host_loss(&out.logits, &y, 3)).abs() < 1e-5);
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for l in 0..3 {
        for idx in [0usize, 3, 7, widths[l] * widths[l + 1] - 1] {
            let mut lossf = |delta: f32| {
                let (hw, _) = model.host_params_mut();
                hw[l][idx] += delta;
                model.sync_to_device();
                let z = model.forward(&x, 9).unwrap().logits;
                let (hw, _) = model.host_params_mut();
                hw[l][idx] -= delta;
                model.sync_to_device();
                host_loss(&z, &y, 3)
            };
            let fd = (lossf(eps) - lossf(-eps)) / (2.0 * eps as f64);
            let g = step.grad_w[l][idx] as f64;
            worst = worst.max((fd - g).abs() / (fd.abs() + g.abs()).max(1e-2));
        }
    }
    assert!(worst < 2e-2, "worst relative gradient error {worst}");
}

#[test]
fn cross_entropy_guard_gives_the_contiguous_gradient_for_a_permuted_view() {
    // dfdx 0.13's log-softmax computes wrong gradients for non-contiguous inputs; the guard
    // makes the logits contiguous first. This test shows both the trap and the fix.
    let dev = Cpu::default();
    let (b, k) = (4usize, 3usize);
    let raw: Vec<f32> = (0..b * k)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let target: Vec<f32> = (0..b * k)
        .map(|i| (i % k == i / k % k) as u8 as f32)
        .collect();
    let grad_of = |permuted: bool, guarded: bool| -> Vec<f32> {
        // the same logical (b, k) logits, stored either row-major or as a permuted (k, b)
        let a: Tensor<(usize, usize), f32, Cpu> = if permuted {
            let mut t = vec![0f32; b * k];
            for r in 0..b {
                for c in 0..k {
                    t[c * b + r] = raw[r * k + c];
                }
            }
            dev.tensor_from_vec(t, (k, b))
        } else {
            dev.tensor_from_vec(raw.clone(), (b, k))
        };
        let traced = a.clone().leaky_traced();
        let logits = if permuted {
            traced.permute::<(usize, usize), Axes2<1, 0>>()
        } else {
            traced
        };
        let tgt = dev.tensor_from_vec(target.clone(), (b, k));
        let loss = if guarded {
            contiguous_cross_entropy(logits, tgt)
        } else {
            cross_entropy_with_logits_loss(logits, tgt)
        };
        let g = loss.backward().get(&a).as_vec();
        if permuted {
            // back to (b, k) order
            let mut t = vec![0f32; b * k];
            for r in 0..b {
                for c in 0..k {
                    t[r * k + c] = g[c * b + r];
                }
            }
            t
        } else {
            g
        }
    };
    let reference = grad_of(false, false);
    let guarded = grad_of(true, true);
    let unguarded = grad_of(true, false);
    let diff = |u: &[f32], v: &[f32]| {
        u.iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        diff(&guarded, &reference) < 1e-6,
        "guarded {guarded:?} vs {reference:?}"
    );
    assert!(
        diff(&unguarded, &reference) > 1e-3,
        "the unguarded permuted gradient was expected to be wrong in dfdx 0.13"
    );
}

fn pruner(widths: &[usize], text: &str) -> Pruner {
    let cfg: PrunerConfig = toml::from_str(text).unwrap();
    Pruner::new(cfg, topology(widths).unwrap()).unwrap()
}

const SP_IN: &str = r#"
[schedule]
warmup_steps = 2
refresh_every = 2
[policy]
kind = "balance"
beta = 0.5
target_density = 0.5
[actuator]
kind = "sp_in"
"#;

#[test]
fn dead_edges_are_zero_in_the_forward_pass_and_get_no_gradient() {
    let dev = Cpu::default();
    let widths = [6, 10, 8, 3];
    let mut model = Mlp::new(&dev, &widths, 3).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::default(), &[60, 10, 80, 8, 24, 3]);
    let mut pr = pruner(&widths, SP_IN);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut refreshed = false;
    for _ in 0..4 {
        let (x, y) = random_batch(&mut rng, 16, 6, 3);
        refreshed |= train_step(&mut model, &mut opt, Some(&mut pr), &x, &y, 16, 1e-2)
            .unwrap()
            .refresh
            .is_some();
    }
    assert!(refreshed);
    let pruned: Vec<usize> = (0..3).filter(|&l| pr.is_pruned(l)).collect();
    assert_eq!(
        pruned,
        vec![0, 1],
        "SP-in prunes the layers producing hidden units"
    );
    let (x, y) = random_batch(&mut rng, 16, 6, 3);
    // raw gradients of the current model: nonzero at some dead edges
    let raw = model.train_step(&x, &y, 16).unwrap();
    let mut dead_with_raw_grad = 0;
    for &l in &pruned {
        let m = pr.mask(l);
        let dev_w = model.device_weights(l);
        let (o, i) = (widths[l + 1], widths[l]);
        let mut dead = 0;
        for r in 0..o {
            for c in 0..i {
                if !m.get(r, c) {
                    dead += 1;
                    assert_eq!(model.weights(l)[r * i + c], 0.0);
                    assert_eq!(dev_w[r * i + c], 0.0, "device weight of a dead edge");
                    dead_with_raw_grad += (raw.grad_w[l][r * i + c] != 0.0) as usize;
                }
            }
        }
        assert_eq!(dead, o * i - m.count());
        assert!(dead > 0);
    }
    assert!(dead_with_raw_grad > 0, "the check below would be vacuous");
    // the forward pass equals the naive masked forward (with the SP-in factors)
    let w: Vec<Vec<f32>> = (0..3)
        .map(|l| {
            let m = pr.mask(l);
            let i = widths[l];
            model
                .weights(l)
                .iter()
                .enumerate()
                .map(|(e, &v)| if m.get(e / i, e % i) { v } else { 0.0 })
                .collect()
        })
        .collect();
    let b: Vec<Vec<f32>> = (0..3).map(|l| model.bias(l).to_vec()).collect();
    let scales: Vec<Option<Vec<f32>>> = (0..3).map(|l| pr.scale(l).map(<[f32]>::to_vec)).collect();
    assert!(scales[0].is_some(), "SP-in rescales by default");
    let (_, logit_ref) = naive_forward(&widths, &w, &b, &scales, &x, 16);
    let out = model.forward(&x, 16).unwrap();
    for (a, r) in out.logits.iter().zip(&logit_ref) {
        assert!((*a as f64 - r).abs() < 1e-5);
    }
    // dead edges have gradients (reported dense), yet the update leaves them at zero
    let rep = train_step(&mut model, &mut opt, Some(&mut pr), &x, &y, 16, 1e-2).unwrap();
    assert!(rep.refresh.is_none(), "step 5 is not a refresh step");
    for &l in &pruned {
        let m = pr.mask(l);
        let i = widths[l];
        let mut moved = 0;
        for (e, g) in rep.grad_w[l].iter().enumerate() {
            if !m.get(e / i, e % i) {
                moved += usize::from(*g != 0.0);
                assert_eq!(
                    model.weights(l)[e],
                    0.0,
                    "weight re-masked after the update"
                );
            }
        }
        assert!(moved > 0, "layer {l}: no dead edge has a gradient");
    }
}

#[test]
fn achieved_density_equals_the_target_after_every_refresh() {
    let dev = Cpu::default();
    let widths = [7, 12, 9, 3];
    for (actuator, density) in [("sp_in", 0.5), ("sp_out", 0.4), ("sp_out", 0.77)] {
        let text = SP_IN
            .replace("kind = \"sp_in\"", &format!("kind = \"{actuator}\""))
            .replace(
                "target_density = 0.5",
                &format!("target_density = {density}"),
            );
        let mut pr = pruner(&widths, &text);
        let mut model = Mlp::new(&dev, &widths, 5).unwrap();
        let mut opt = Optimizer::new(OptimizerConfig::default(), &[84, 12, 108, 9, 27, 3]);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut refreshes = 0;
        for _ in 0..12 {
            let (x, y) = random_batch(&mut rng, 8, 7, 3);
            let rep = train_step(&mut model, &mut opt, Some(&mut pr), &x, &y, 8, 1e-2).unwrap();
            if let Some(r) = rep.refresh {
                refreshes += 1;
                assert!(!r.layers.is_empty());
                for lr in &r.layers {
                    let want = (density * lr.edges as f64).round() as usize;
                    assert_eq!(lr.live_edges, want, "{actuator} {} at {density}", lr.layer);
                    assert_eq!(lr.target_density, Some(density));
                    let l = (0..3)
                        .find(|&l| format!("fc{}", l + 1) == lr.layer)
                        .unwrap();
                    assert_eq!(pr.mask(l).count(), want);
                    let zeros = model.weights(l).iter().filter(|&&v| v == 0.0).count();
                    assert!(
                        zeros >= lr.edges - want,
                        "dead edges are zero in the weights"
                    );
                }
            }
        }
        assert_eq!(refreshes, 6, "refreshes at steps 2, 4, ..., 12");
    }
}

#[test]
fn regrowth_brings_back_a_dead_edge_whose_stored_value_beats_a_live_one() {
    let dev = Cpu::default();
    let widths = [6, 8, 5, 2];
    let mut model = Mlp::new(&dev, &widths, 8).unwrap();
    let mut pr = pruner(&widths, SP_IN);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (x, _) = random_batch(&mut rng, 32, 6, 2);
    let hid = model.forward(&x, 32).unwrap().hidden;
    pr.observe("fc1", bb_core::Activations::batch_major(&hid[0], 32, 8))
        .unwrap();
    pr.observe("fc2", bb_core::Activations::batch_major(&hid[1], 32, 5))
        .unwrap();
    let before: Vec<f32> = model.weights(0).to_vec();
    {
        let (hw, _) = model.host_params_mut();
        let mut ws: Vec<&mut [f32]> = hw.iter_mut().map(|w| w.as_mut_slice()).collect();
        pr.refresh(&mut ws, None).unwrap();
    }
    model.sync_to_device();
    let m1 = pr.mask(0).clone();
    // a row with a dead edge
    let i = widths[0];
    let r = (0..8)
        .find(|&r| (0..i).any(|c| !m1.get(r, c)) && (0..i).any(|c| m1.get(r, c)))
        .expect("some row is partly pruned");
    let dead: Vec<usize> = (0..i).filter(|&c| !m1.get(r, c)).collect();
    let live: Vec<usize> = (0..i).filter(|&c| m1.get(r, c)).collect();
    for &c in &dead {
        assert_eq!(model.device_weights(0)[r * i + c], 0.0);
    }
    // live weights of that row shrink below every stored dead value
    let smallest_dead = dead
        .iter()
        .map(|&c| before[r * i + c].abs())
        .fold(f32::INFINITY, f32::min);
    assert!(smallest_dead > 0.0);
    {
        let (hw, _) = model.host_params_mut();
        for &c in &live {
            hw[0][r * i + c] = smallest_dead * 1e-3;
        }
    }
    {
        let (hw, _) = model.host_params_mut();
        let mut ws: Vec<&mut [f32]> = hw.iter_mut().map(|w| w.as_mut_slice()).collect();
        pr.refresh(&mut ws, None).unwrap();
    }
    model.sync_to_device();
    let m2 = pr.mask(0);
    let dev_w = model.device_weights(0);
    let regrown: Vec<usize> = dead.iter().copied().filter(|&c| m2.get(r, c)).collect();
    assert!(!regrown.is_empty(), "a stronger stored edge must come back");
    for &c in &regrown {
        assert_eq!(
            dev_w[r * i + c],
            before[r * i + c],
            "regrown with its stored value"
        );
    }
    // without regrowth the same situation brings nothing back
    let no_regrow = SP_IN.replace("kind = \"sp_in\"", "kind = \"sp_in\"\nregrow = false");
    let mut pr2 = pruner(&widths, &no_regrow);
    let mut model2 = Mlp::new(&dev, &widths, 8).unwrap();
    pr2.observe("fc1", bb_core::Activations::batch_major(&hid[0], 32, 8))
        .unwrap();
    pr2.observe("fc2", bb_core::Activations::batch_major(&hid[1], 32, 5))
        .unwrap();
    for shrink in [false, true] {
        let (hw, _) = model2.host_params_mut();
        if shrink {
            for &c in &live {
                hw[0][r * i + c] = smallest_dead * 1e-3;
            }
        }
        let mut ws: Vec<&mut [f32]> = hw.iter_mut().map(|w| w.as_mut_slice()).collect();
        pr2.refresh(&mut ws, None).unwrap();
        if !shrink {
            assert_eq!(pr2.mask(0), &m1, "same start, same first mask");
        }
    }
    for &c in &dead {
        assert!(!pr2.mask(0).get(r, c), "regrow = false never adds an edge");
    }
}

#[test]
fn activity_ema_equals_a_hand_computation_on_the_same_batches() {
    let dev = Cpu::default();
    let widths = [4, 6, 5, 2];
    let mut model = Mlp::new(&dev, &widths, 21).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::default(), &[24, 6, 30, 5, 10, 2]);
    let text = r#"
[schedule]
warmup_steps = 100
[tracker]
kind = "ema_on_rate"
decay = 0.9
init = 0.5
[policy]
kind = "balance"
beta = 0.5
target_density = 0.5
[actuator]
kind = "sp_in"
"#;
    let mut pr = pruner(&widths, text);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut hand = [vec![0.5f64; 6], vec![0.5f64; 5]];
    for _ in 0..3 {
        let (x, y) = random_batch(&mut rng, 10, 4, 2);
        // on-rates of this batch from a host forward pass with the current weights
        let w: Vec<Vec<f32>> = (0..3).map(|l| model.weights(l).to_vec()).collect();
        let b: Vec<Vec<f32>> = (0..3).map(|l| model.bias(l).to_vec()).collect();
        let (hid, _) = naive_forward(&widths, &w, &b, &[None, None, None], &x, 10);
        for (p, h) in hid.iter().enumerate() {
            let units = widths[p + 1];
            for (j, a) in hand[p].iter_mut().enumerate() {
                let on = (0..10).filter(|&r| h[r * units + j] > 0.0).count() as f64 / 10.0;
                *a = 0.9 * *a + 0.1 * on;
            }
        }
        train_step(&mut model, &mut opt, Some(&mut pr), &x, &y, 10, 1e-2).unwrap();
    }
    for (p, name) in ["fc1", "fc2"].iter().enumerate() {
        let got = pr.activity(name).unwrap();
        for (g, h) in got.iter().zip(&hand[p]) {
            assert!((g - h).abs() < 1e-12, "{name}: {got:?} vs {:?}", hand[p]);
        }
        assert!(hand[p].iter().any(|&a| a != 0.5), "the hand EMA moved");
    }
}

/// The pruner observes while the backward pass runs; an activation it rejects is still an
/// error of the step, naming the population, and the step changes no parameter.
#[test]
fn an_observation_error_fails_the_step_and_changes_nothing() {
    let dev = Cpu::default();
    let widths = [4, 6, 5, 2];
    let mut model = Mlp::new(&dev, &widths, 4).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::default(), &[24, 6, 30, 5, 10, 2]);
    let mut pr = pruner(&widths, SP_IN);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (mut x, y) = random_batch(&mut rng, 8, 4, 2);
    x[5] = f32::INFINITY;
    let before: Vec<Vec<u32>> = (0..3)
        .map(|l| model.weights(l).iter().map(|v| v.to_bits()).collect())
        .collect();
    let err = train_step(&mut model, &mut opt, Some(&mut pr), &x, &y, 8, 1e-2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("input") && err.contains("non-finite"), "{err}");
    for (l, b) in before.iter().enumerate() {
        let now: Vec<u32> = model.weights(l).iter().map(|v| v.to_bits()).collect();
        assert_eq!(&now, b, "layer {l} changed");
    }
    assert!(!pr.observed("fc1"), "the step was not counted");
    assert_eq!(pr.step_count(), 0);
}
