//! The 3-D path of the convolution kit (convolution against naive loops, finite-difference
//! gradients of a 3-D convolution and of group-norm, exact pooling and upsampling backward
//! passes), the EM volume generator, the synapse metrics, and the EM experiment end to end.

mod common;

use bb_tasks::cli_conv::{run_in, CONV_PRESETS};
use bb_tasks::convkit::{Conv, GroupNorm, MaxPool, ParamStore, Upsample};
use bb_tasks::em::{best_threshold, generate, synapse_metrics, EmConfig, VoxelCounts, CLEFT_LEVEL};
use common::TempDir;
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type A<T = NoneTape> = Tensor<(usize, usize), f32, Cpu, T>;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randv(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

fn act(dev: &Cpu, v: &[f32], rows: usize, b: usize) -> A {
    dev.tensor_from_vec(v.to_vec(), (rows, b))
}

/// Naive 3-D convolution on the channel-major layout `(c·d·h·w, b)`, accumulated in f64.
#[allow(clippy::too_many_arguments)]
fn naive_conv3d(
    x: &[f32],
    b: usize,
    c: usize,
    [d, h, w]: [usize; 3],
    wt: &[f32],
    bias: Option<&[f32]>,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
) -> (Vec<f64>, [usize; 3]) {
    let out = |n: usize| (n + 2 * p - k) / s + 1;
    let (od, oh, ow) = (out(d), out(h), out(w));
    let mut y = vec![0f64; o * od * oh * ow * b];
    for oc in 0..o {
        for oz in 0..od {
            for oy in 0..oh {
                for ox in 0..ow {
                    for bi in 0..b {
                        let mut acc = bias.map_or(0.0, |bb| bb[oc] as f64);
                        for ic in 0..c {
                            for kz in 0..k {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iz = (oz * s + kz) as isize - p as isize;
                                        let iy = (oy * s + ky) as isize - p as isize;
                                        let ix = (ox * s + kx) as isize - p as isize;
                                        if iz < 0
                                            || iy < 0
                                            || ix < 0
                                            || iz >= d as isize
                                            || iy >= h as isize
                                            || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        let xi = (((ic * d + iz as usize) * h + iy as usize) * w
                                            + ix as usize)
                                            * b
                                            + bi;
                                        let wi = (((oc * c + ic) * k + kz) * k + ky) * k + kx;
                                        acc += x[xi] as f64 * wt[wi] as f64;
                                    }
                                }
                            }
                        }
                        y[(((oc * od + oz) * oh + oy) * ow + ox) * b + bi] = acc;
                    }
                }
            }
        }
    }
    (y, [od, oh, ow])
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn conv3d_forward_matches_naive_loops() {
    let dev = Cpu::default();
    // (c, [d, h, w], o, k, stride, pad, bias)
    let cases = [
        (2, [5, 4, 6], 3, 3, 1, 1, true),
        (3, [6, 6, 6], 2, 3, 2, 0, false),
        (2, [4, 5, 3], 4, 1, 1, 0, true), // pointwise: no gather
        (1, [7, 6, 5], 3, 3, 2, 1, true),
    ];
    for (i, &(c, dhw, o, k, s, p, bias)) in cases.iter().enumerate() {
        let mut r = rng(i as u64);
        let b = 2;
        let mut store = ParamStore::new(&dev);
        let conv = Conv::new_3d(&mut store, &mut r, "conv", c, o, dhw, k, s, p, bias).unwrap();
        assert_eq!(store.shape(conv.w), &[o, c, k, k, k]);
        assert_eq!(conv.kernel(), vec![k; 3]);
        if let Some(bid) = conv.b {
            let v = randv(&mut r, o);
            store.host_mut(bid).copy_from_slice(&v);
        }
        store.sync_all();
        let rows = c * dhw.iter().product::<usize>();
        let x = randv(&mut r, rows * b);
        let y = conv.forward(&store, act(&dev, &x, rows, b)).unwrap();
        let (want, out) = naive_conv3d(
            &x,
            b,
            c,
            dhw,
            store.host(conv.w),
            conv.b.map(|id| store.host(id)),
            o,
            k,
            s,
            p,
        );
        assert_eq!(conv.out_dhw(), out, "case {i}");
        let d = max_abs_diff(&y.as_vec(), &want);
        assert!(d < 1e-5, "case {i}: max abs diff {d}");
    }
    // a wrong input is an error naming the layer, not a panic
    let mut store = ParamStore::new(&dev);
    let conv = Conv::new_3d(&mut store, &mut rng(0), "e1b", 2, 3, [4; 3], 3, 1, 1, false).unwrap();
    let e = conv
        .forward(&store, dev.zeros_like(&(2 * 4 * 4 * 5, 2)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("e1b") && e.contains("4x4x4"), "{e}");
}

/// Central finite differences of `loss` over the listed coordinates of a host vector.
fn fd(v: &mut [f32], idx: &[usize], eps: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    idx.iter()
        .map(|&i| {
            let orig = v[i];
            v[i] = orig + eps;
            let lp = loss(v);
            v[i] = orig - eps;
            let lm = loss(v);
            v[i] = orig;
            (lp - lm) / (2.0 * eps as f64)
        })
        .collect()
}

/// Largest |analytic - numeric| relative to the largest |numeric|.
fn rel_err(an: &[f32], idx: &[usize], num: &[f64]) -> f64 {
    let scale = num.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    idx.iter()
        .zip(num)
        .map(|(&i, &n)| (an[i] as f64 - n).abs())
        .fold(0.0, f64::max)
        / scale
}

fn sample_idx(r: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<usize> {
    (0..k.min(n)).map(|_| r.gen_range(0..n)).collect()
}

/// `sum(R ⊙ y²)` summed in f64 on the host.
fn host_loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter()
        .zip(r)
        .map(|(&a, &w)| w as f64 * a as f64 * a as f64)
        .sum()
}

#[test]
fn conv3d_and_group_norm_gradients_match_finite_differences() {
    let dev = Cpu::default();
    let mut r = rng(42);
    let (c, o, dhw, b) = (2, 4, [4, 5, 4], 2);
    let mut store = ParamStore::new(&dev);
    let conv = Conv::new_3d(&mut store, &mut r, "c", c, o, dhw, 3, 1, 1, true).unwrap();
    let gn = GroupNorm::new(&mut store, "gn", o, 2).unwrap();
    // non-trivial bias, scale and shift
    let bid = conv.b.unwrap();
    let bv = randv(&mut r, o);
    store.host_mut(bid).copy_from_slice(&bv);
    let gamma = store.find("gn.weight").unwrap();
    let beta = store.find("gn.bias").unwrap();
    let gv: Vec<f32> = (0..o).map(|j| 0.5 + 0.3 * j as f32).collect();
    store.host_mut(gamma).copy_from_slice(&gv);
    let bev = randv(&mut r, o);
    store.host_mut(beta).copy_from_slice(&bev);
    store.sync_all();
    let rows = c * dhw.iter().product::<usize>();
    let orows = o * dhw.iter().product::<usize>();
    let mut x = randv(&mut r, rows * b);
    let rr = randv(&mut r, orows * b);
    let fwd = |st: &ParamStore, xt: A| -> Vec<f32> {
        let y = conv.forward(st, xt).unwrap();
        gn.forward(st, y).unwrap().as_vec()
    };
    // analytic
    let xt = act(&dev, &x, rows, b);
    let y = conv.forward(&store, xt.clone().leaky_traced()).unwrap();
    let y = gn.forward(&store, y).unwrap();
    let g = (y.square() * act(&dev, &rr, orows, b))
        .sum::<(), _>()
        .backward();
    let gx = g.get(&xt).as_vec();
    let eps = 1e-2;
    let xi = sample_idx(&mut r, x.len(), 16);
    let nx = fd(&mut x, &xi, eps, |xv| {
        host_loss(&fwd(&store, act(&dev, xv, rows, b)), &rr)
    });
    let e = rel_err(&gx, &xi, &nx);
    assert!(e < 5e-3, "x: relative error {e}");
    let xt = act(&dev, &x, rows, b);
    for (id, name) in [
        (conv.w, "conv weight"),
        (bid, "conv bias"),
        (gamma, "gn scale"),
        (beta, "gn shift"),
    ] {
        let an = g.get(store.tensor(id)).as_vec();
        let mut v = store.host(id).to_vec();
        let idx = sample_idx(&mut r, v.len(), 12);
        let num = fd(&mut v, &idx, eps, |p| {
            store.host_mut(id).copy_from_slice(p);
            store.sync(id);
            host_loss(&fwd(&store, xt.clone()), &rr)
        });
        store.host_mut(id).copy_from_slice(&v);
        store.sync(id);
        let e = rel_err(&an, &idx, &num);
        // the conv bias is normalized away by the group-norm: its gradient is ~0 both ways
        assert!(e < 5e-3, "{name}: relative error {e}");
    }
}

/// Gradient of `sum(R ⊙ f(x))` w.r.t. `x` through one op.
fn grad_through(
    dev: &Cpu,
    x: &[f32],
    rows: usize,
    b: usize,
    r: &[f32],
    f: impl Fn(A<OwnedTape<f32, Cpu>>) -> A<OwnedTape<f32, Cpu>>,
) -> (Vec<f32>, Vec<f32>) {
    let xt = act(dev, x, rows, b);
    let y = f(xt.clone().leaky_traced());
    let (ro, bo) = *y.shape();
    let rt = act(dev, r, ro, bo);
    let yv = y.retaped::<NoneTape>().as_vec();
    let g = (y * rt).sum::<(), _>().backward();
    (yv, g.get(&xt).as_vec())
}

#[test]
fn maxpool3d_and_upsample3d_backward_are_exact() {
    let dev = Cpu::default();
    let (c, [d, h, w], b) = (2, [4, 6, 4], 3);
    let mut r = rng(9);
    let x = randv(&mut r, c * d * h * w * b);
    let pool = MaxPool::new_3d("p", c, [d, h, w], 2, 2).unwrap();
    let [od, oh, ow] = pool.out_dhw();
    assert_eq!([od, oh, ow], [2, 3, 2]);
    let rr = randv(&mut r, c * od * oh * ow * b);
    let (y, gx) = grad_through(&dev, &x, c * d * h * w, b, &rr, |t| {
        pool.forward(t).unwrap()
    });
    let mut want_y = vec![0f32; y.len()];
    let mut want_g = vec![0f32; x.len()];
    for ch in 0..c {
        for oz in 0..od {
            for oy in 0..oh {
                for ox in 0..ow {
                    for bi in 0..b {
                        let mut best = (f32::NEG_INFINITY, usize::MAX);
                        for kz in 0..2 {
                            for ky in 0..2 {
                                for kx in 0..2 {
                                    let i = (((ch * d + oz * 2 + kz) * h + oy * 2 + ky) * w
                                        + ox * 2
                                        + kx)
                                        * b
                                        + bi;
                                    if x[i] > best.0 {
                                        best = (x[i], i);
                                    }
                                }
                            }
                        }
                        let oi = (((ch * od + oz) * oh + oy) * ow + ox) * b + bi;
                        want_y[oi] = best.0;
                        want_g[best.1] += rr[oi];
                    }
                }
            }
        }
    }
    assert_eq!(y, want_y);
    assert_eq!(gx, want_g);

    let up = Upsample::new_3d("up", c, [od, oh, ow], 2).unwrap();
    assert_eq!(up.out_dhw, [d, h, w]);
    let xs = randv(&mut r, c * od * oh * ow * b);
    let rr = randv(&mut r, c * d * h * w * b);
    let (y, gx) = grad_through(&dev, &xs, c * od * oh * ow, b, &rr, |t| {
        up.forward(t).unwrap()
    });
    let mut want_g = vec![0f32; xs.len()];
    for ch in 0..c {
        for z in 0..d {
            for yy in 0..h {
                for xx in 0..w {
                    for bi in 0..b {
                        let oi = (((ch * d + z) * h + yy) * w + xx) * b + bi;
                        let ii = (((ch * od + z / 2) * oh + yy / 2) * ow + xx / 2) * b + bi;
                        assert_eq!(y[oi], xs[ii]);
                        want_g[ii] += rr[oi];
                    }
                }
            }
        }
    }
    // the same additions in the same order (children in output order): bit-identical
    assert_eq!(gx, want_g);
}

/// The preset shrunk to 16^3 volumes, one seed and a few steps.
fn tiny(extra_data: &str) -> String {
    let preset = CONV_PRESETS.iter().find(|p| p.name == "em3d").unwrap();
    let mut t: toml::Table = toml::from_str(preset.toml).unwrap();
    t.insert("name".into(), "em3d-tiny".into());
    t.insert("seeds".into(), toml::Value::Array(vec![0.into()]));
    let mut data: toml::Table = toml::from_str(
        "size = 16\nn_train = 8\nn_val = 2\nn_test = 2\neval_volumes = 1\neval_subset = 1\n",
    )
    .unwrap();
    let extra: toml::Table = toml::from_str(extra_data).unwrap();
    data.extend(extra);
    t.insert("data".into(), data.into());
    let model: toml::Table = toml::from_str("channels = [4, 8]\ngroups = 2").unwrap();
    t.insert("model".into(), model.into());
    let train: toml::Table = toml::from_str("epochs = 2\nbatch_size = 2\nlr = 0.01\n").unwrap();
    t.insert("train".into(), train.into());
    let pr: toml::Table =
        toml::from_str("[schedule]\nwarmup_steps = 2\nrefresh_every = 2\n").unwrap();
    t.insert("pruning".into(), pr.into());
    toml::to_string(&t).unwrap()
}

fn cfg(extra: &str) -> EmConfig {
    let c = EmConfig::from_toml(&tiny(extra)).unwrap();
    c.validate().unwrap();
    c
}

#[test]
fn volumes_are_seeded_with_about_one_percent_positives() {
    let c = cfg("size = 24\n");
    let a = generate(&c.data, 12, 1);
    assert_eq!(a, generate(&c.data, 12, 1));
    assert_ne!(a.x, generate(&c.data, 12, 2).x);
    assert_eq!(a.len(), 12);
    assert_eq!(a.x.len(), 12 * 24 * 24 * 24);
    let f = a.positive_fraction();
    assert!((0.006..0.016).contains(&f), "positive fraction {f}");
    assert!(a.synapses.iter().all(|&k| k >= 1), "{:?}", a.synapses);
    assert!(a.x.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn labels_are_exactly_the_cleft_voxels() {
    // without texture and noise, the cleft level marks exactly the labelled voxels
    let c = cfg("texture = 0.0\nnoise = 0.0\n");
    let v = generate(&c.data, 6, 3);
    let pos = v.label.iter().filter(|&&l| l == 1).count();
    assert!(pos > 0);
    for (i, (&x, &l)) in v.x.iter().zip(&v.label).enumerate() {
        assert_eq!(x == CLEFT_LEVEL, l == 1, "voxel {i}: value {x}, label {l}");
    }
    // each cleft is a dark disc next to lighter cytoplasm and vesicles: no volume is all dark
    let n = v.voxels();
    for k in 0..v.len() {
        let mean = v.x[k * n..(k + 1) * n].iter().sum::<f32>() / n as f32;
        assert!(mean > 0.4, "volume {k}: mean {mean}");
    }
}

#[test]
fn threshold_and_metrics_match_hand_counts() {
    let prob = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2];
    let truth = [1, 0, 1, 1, 0, 0];
    // thresholds: 0.9 -> F1 2/4; 0.8 -> 2/5; 0.7 -> 4/6; 0.4 -> 6/7; 0.3 -> 6/8
    let (t, f1) = best_threshold(&prob, &truth).unwrap().unwrap();
    assert_eq!(t, 0.4);
    assert!((f1 - 6.0 / 7.0).abs() < 1e-12);
    assert!(best_threshold(&prob, &[0; 6]).unwrap().is_none());
    assert!(best_threshold(&prob, &truth[..3]).is_err());
    let c = VoxelCounts::at(&prob, &truth, 0.5).unwrap();
    assert_eq!(
        c,
        VoxelCounts {
            tp: 2,
            fp: 1,
            fn_: 1
        }
    );
    let m = synapse_metrics(&prob, &truth, 0.4).unwrap();
    assert!((m["f1"] - 6.0 / 7.0).abs() < 1e-12);
    assert!((m["precision"] - 0.75).abs() < 1e-12);
    assert_eq!(m["recall"], 1.0);
    assert!((m["f1_at_half"] - 2.0 / 3.0).abs() < 1e-12);
    // AP: ranks 1 (P 1), 3 (P 2/3), 4 (P 3/4), each adding 1/3 recall
    assert!((m["pr_auc"] - (1.0 + 2.0 / 3.0 + 0.75) / 3.0).abs() < 1e-12);
    assert!(synapse_metrics(&prob, &truth[..2], 0.5).is_err());
}

#[test]
fn the_experiment_runs_end_to_end_on_16_cubed_volumes() {
    let d = TempDir::unmade("em-e2e");
    run_in(&tiny(""), &d.0, true, true, None).unwrap();
    let rep = std::fs::read_to_string(d.0.join("report.md")).unwrap();
    for s in [
        "stand-in",
        "bb_sp_in-d0.7",
        "magnitude-d0.5",
        "PR-AUC",
        "entropy (bits)",
        "fit on fan-in: slope",
        "fit on fan-out: R^2",
        "±",
    ] {
        assert!(rep.contains(s), "{s} in the report");
    }
    for arm in ["bb_sp_in-d0.7", "bb_sp_in-d0.5", "magnitude-d0.7"] {
        let r = bb_tasks::convrun::read_result(&d.0.join(format!("{arm}/seed-0"))).unwrap();
        let target = r.density.unwrap();
        let pruned: Vec<&str> = r
            .layers
            .iter()
            .filter(|l| l.pruned)
            .map(|l| l.layer.as_str())
            .collect();
        assert_eq!(pruned, ["e1b", "e2a", "e2b"], "{arm}");
        for l in r.layers.iter().filter(|l| l.pruned) {
            assert!(
                (l.achieved_density - target).abs() < 0.07,
                "{arm} {}: {}",
                l.layer,
                l.achieved_density
            );
        }
        for k in ["f1", "pr_auc", "precision", "recall", "val_f1", "threshold"] {
            let v = r.metrics[k];
            assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{arm} {k}: {v}");
        }
        assert_eq!(r.populations.len(), 3);
        for p in &r.populations {
            assert!(p.entropy_bits.is_finite(), "{arm} {}", p.population);
        }
    }
    assert!(d.0.join("dense/seed-0/test_prob.npy").exists());
}

#[test]
fn bad_configs_fail_before_any_folder_is_made() {
    for (extra, field) in [
        ("size = 15\n", "data.size"),
        ("positive_fraction = 0.5\n", "data.positive_fraction"),
        ("mito = 1.5\n", "data.mito"),
        ("cleft_radius = 0.5\n", "data.cleft_radius"),
        ("colour = true\n", "colour"),
    ] {
        let d = TempDir::unmade("em-bad");
        let e = format!(
            "{:#}",
            run_in(&tiny(extra), &d.0, true, true, None).unwrap_err()
        );
        assert!(e.contains(field), "{field}: {e}");
        assert!(!d.0.exists());
    }
    let mut t: toml::Table = toml::from_str(&tiny("")).unwrap();
    t.insert(
        "model".into(),
        toml::from_str::<toml::Table>("channels = [4, 6]\ngroups = 4")
            .unwrap()
            .into(),
    );
    let d = TempDir::unmade("em-bad-groups");
    let e = format!(
        "{:#}",
        run_in(&toml::to_string(&t).unwrap(), &d.0, true, true, None).unwrap_err()
    );
    assert!(e.contains("model.groups"), "{e}");
}

#[test]
fn preset_parses_and_validates() {
    let p = CONV_PRESETS.iter().find(|p| p.name == "em3d").unwrap();
    let c = EmConfig::from_toml(p.toml).unwrap();
    c.validate().unwrap();
    assert!(c.description.contains("stand-in"));
    assert!(c.seeds.len() >= 3);
    assert_eq!(c.data.positive_fraction, 0.01);
    let names: Vec<&str> = c.arms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["dense", "bb_sp_in", "magnitude"]);
    for a in &c.arms[1..] {
        assert_eq!(a.densities, [0.7, 0.5]);
    }
}
