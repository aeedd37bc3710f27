//! The convolution kit against naive loops, exact backward passes of the data-movement ops,
//! finite differences (loss accumulated in f64 on the host) for the arithmetic ones, the
//! cross-entropy contiguity guard, and the parameter store's round trip.

use bb_tasks::convkit::ops;
use bb_tasks::convkit::{
    channel_major_targets, global_avg_pool, sigmoid_batch_major, to_channel_major, BatchNorm,
    Conv2d, Ctx, Geom, GroupNorm, Linear, MaxPool, ParamKind, ParamStore, RowPlan, Upsample,
};
use bb_tasks::io::{safetensors_bytes, TensorFile};
use bb_tasks::model::contiguous_cross_entropy;
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

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

/// Naive 2-D convolution on the channel-major layout, accumulated in f64.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    b: usize,
    (c, h, w): (usize, usize, usize),
    wt: &[f32],
    bias: Option<&[f32]>,
    scale: Option<&[f32]>,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
) -> (Vec<f64>, usize, usize) {
    let ho = (h + 2 * p - k) / s + 1;
    let wo = (w + 2 * p - k) / s + 1;
    let mut y = vec![0f64; o * ho * wo * b];
    for oc in 0..o {
        for oy in 0..ho {
            for ox in 0..wo {
                for bi in 0..b {
                    let mut acc = 0f64;
                    for ic in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - p as isize;
                                let ix = (ox * s + kx) as isize - p as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xi = ((ic * h + iy as usize) * w + ix as usize) * b + bi;
                                let wi = ((oc * c + ic) * k + ky) * k + kx;
                                acc += x[xi] as f64 * wt[wi] as f64;
                            }
                        }
                    }
                    acc *= scale.map_or(1.0, |s| s[oc] as f64);
                    acc += bias.map_or(0.0, |bb| bb[oc] as f64);
                    y[((oc * ho + oy) * wo + ox) * b + bi] = acc;
                }
            }
        }
    }
    (y, ho, wo)
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn conv_forward_matches_naive_loops() {
    let dev = Cpu::default();
    // (c, h, w, o, k, stride, pad, bias, scale)
    let cases = [
        (3, 7, 5, 4, 3, 1, 1, true, false),
        (2, 8, 8, 3, 3, 2, 0, false, false),
        (2, 9, 6, 2, 5, 1, 2, true, true),
        (4, 5, 5, 6, 1, 1, 0, true, true), // pointwise: no gather
        (4, 6, 6, 3, 1, 2, 0, false, false),
        (1, 28, 28, 5, 3, 2, 1, true, false),
    ];
    for (i, &(c, h, w, o, k, s, p, bias, scale)) in cases.iter().enumerate() {
        let mut r = rng(i as u64);
        let b = 3;
        let mut store = ParamStore::new(&dev);
        let conv = Conv2d::new(&mut store, &mut r, "conv", c, o, (h, w), k, s, p, bias).unwrap();
        if let Some(bid) = conv.b {
            let v = randv(&mut r, o);
            store.host_mut(bid).copy_from_slice(&v);
        }
        let sc: Vec<f32> = (0..o).map(|j| 0.5 + j as f32 * 0.25).collect();
        if scale {
            store.set_scale(conv.w, Some(&sc)).unwrap();
        }
        store.sync_all();
        let x = randv(&mut r, c * h * w * b);
        let y = conv.forward(&store, act(&dev, &x, c * h * w, b)).unwrap();
        let (want, ho, wo) = naive_conv(
            &x,
            b,
            (c, h, w),
            store.host(conv.w),
            conv.b.map(|id| store.host(id)),
            scale.then_some(sc.as_slice()),
            o,
            k,
            s,
            p,
        );
        assert_eq!(conv.out_hw(), (ho, wo), "case {i}");
        assert_eq!(*y.shape(), (o * ho * wo, b), "case {i}");
        let d = max_abs_diff(&y.as_vec(), &want);
        assert!(d < 1e-5, "case {i}: max abs diff {d}");
    }
}

#[test]
fn im2col_runs_reproduce_the_window_table() {
    let g = Geom::square("g", 2, 5, 4, 3, 2, 1).unwrap();
    let plan = RowPlan::im2col(&g).unwrap();
    let table = plan.table();
    assert_eq!(table.len(), 2 * 9 * g.out_spatial());
    let mut i = 0;
    for ch in 0..2 {
        for k in 0..9 {
            for o in 0..g.out_spatial() {
                assert_eq!(table[i], g.source(ch, k, o), "row {i}");
                i += 1;
            }
        }
    }
    // runs are maximal: two neighbouring runs never continue each other
    for w in plan.runs().windows(2) {
        assert!(!(w[0].dst + w[0].len == w[1].dst && w[0].src + w[0].len == w[1].src));
    }
}

#[test]
fn bad_geometry_and_bad_input_are_errors_naming_the_layer() {
    let e = Geom::square("stem", 1, 2, 2, 5, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stem") && e.contains("larger"), "{e}");
    let e = Geom::square("c", 1, 4, 4, 3, 0, 0).unwrap_err().to_string();
    assert!(e.contains("stride"), "{e}");
    let dev = Cpu::default();
    let mut store = ParamStore::new(&dev);
    let conv = Conv2d::new(
        &mut store,
        &mut rng(0),
        "enc1",
        2,
        3,
        (4, 4),
        3,
        1,
        1,
        false,
    )
    .unwrap();
    let e = conv
        .forward(&store, dev.zeros_like(&(2 * 4 * 5, 2)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("enc1") && e.contains("rows"), "{e}");
    let pool = MaxPool::new("pool1", 2, (4, 4), 2, 2).unwrap();
    assert!(pool
        .forward(dev.zeros_like(&(7, 2)))
        .unwrap_err()
        .to_string()
        .contains("pool1"));
    let e = Conv2d::new(
        &mut store,
        &mut rng(0),
        "enc1",
        2,
        3,
        (4, 4),
        3,
        1,
        1,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("enc1.weight") && e.contains("twice"), "{e}");
}

/// Gradient of `sum(R ⊙ f(x))` w.r.t. `x` through one op, with `R` random.
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
fn max_pool_forward_and_backward_are_exact() {
    let dev = Cpu::default();
    let (c, h, w, b) = (3, 6, 5, 4);
    let mut r = rng(7);
    let mut x = randv(&mut r, c * h * w * b);
    // a tie: two maximal elements in the first window of channel 0, sample 0
    x[0] = 2.0;
    x[b] = 2.0;
    let pool = MaxPool::new("p", c, (h, w), 2, 2).unwrap();
    let (ho, wo) = pool.out_hw();
    assert_eq!((ho, wo), (3, 2));
    let rr = randv(&mut r, c * ho * wo * b);
    let (y, gx) = grad_through(&dev, &x, c * h * w, b, &rr, |t| pool.forward(t).unwrap());
    let mut want_y = vec![0f32; c * ho * wo * b];
    let mut want_g = vec![0f32; x.len()];
    for ch in 0..c {
        for oy in 0..ho {
            for ox in 0..wo {
                for bi in 0..b {
                    let mut best = (f32::NEG_INFINITY, usize::MAX);
                    for ky in 0..2 {
                        for kx in 0..2 {
                            let i = ((ch * h + oy * 2 + ky) * w + ox * 2 + kx) * b + bi;
                            if x[i] > best.0 {
                                best = (x[i], i);
                            }
                        }
                    }
                    let oi = ((ch * ho + oy) * wo + ox) * b + bi;
                    want_y[oi] = best.0;
                    want_g[best.1] += rr[oi];
                }
            }
        }
    }
    assert_eq!(y, want_y);
    assert_eq!(gx, want_g);
    assert_eq!(
        gx[b], 0.0,
        "a tie routes the gradient to the first maximum only"
    );
}

#[test]
fn upsample_forward_and_backward_are_exact() {
    let dev = Cpu::default();
    let (c, h, w, b, f) = (2, 3, 4, 3, 2);
    let mut r = rng(3);
    let x = randv(&mut r, c * h * w * b);
    let up = Upsample::new("up", c, (h, w), f).unwrap();
    assert_eq!(up.out_hw, (6, 8));
    let rr = randv(&mut r, c * 6 * 8 * b);
    let (y, gx) = grad_through(&dev, &x, c * h * w, b, &rr, |t| up.forward(t).unwrap());
    let mut want_g = vec![0f64; x.len()];
    for ch in 0..c {
        for oy in 0..h * f {
            for ox in 0..w * f {
                for bi in 0..b {
                    let oi = ((ch * h * f + oy) * w * f + ox) * b + bi;
                    let ii = ((ch * h + oy / f) * w + ox / f) * b + bi;
                    assert_eq!(y[oi], x[ii]);
                    want_g[ii] += rr[oi] as f64;
                }
            }
        }
    }
    // each input gradient is a sum of four values: exact up to f32 summation order
    assert!(max_abs_diff(&gx, &want_g) < 1e-6);
}

#[test]
fn concat_and_fold_move_values_and_gradients_exactly() {
    let dev = Cpu::default();
    let mut r = rng(11);
    let (a, b) = (randv(&mut r, 6 * 2), randv(&mut r, 4 * 2));
    let (at, bt) = (act(&dev, &a, 6, 2), act(&dev, &b, 4, 2));
    let y = ops::concat_rows(
        vec![at.clone().leaky_traced(), bt.clone().leaky_traced()],
        "cat",
    )
    .unwrap();
    assert_eq!(*y.shape(), (10, 2));
    let yv = y.retaped::<NoneTape>().as_vec();
    assert_eq!(&yv[..12], &a[..]);
    assert_eq!(&yv[12..], &b[..]);
    let rr = randv(&mut r, 20);
    let g = (y * act(&dev, &rr, 10, 2)).sum::<(), _>().backward();
    assert_eq!(g.get(&at).as_vec(), rr[..12].to_vec());
    assert_eq!(g.get(&bt).as_vec(), rr[12..].to_vec());

    // fold: (R, 2B) -> (2R, B)
    let x = randv(&mut r, 3 * 4);
    let rr = randv(&mut r, 12);
    let (y, gx) = grad_through(&dev, &x, 3, 4, &rr, |t| {
        ops::fold_halves(t, "fold").unwrap()
    });
    for row in 0..3 {
        for j in 0..2 {
            assert_eq!(y[row * 2 + j], x[row * 4 + j]);
            assert_eq!(y[(3 + row) * 2 + j], x[row * 4 + 2 + j]);
            assert_eq!(gx[row * 4 + j], rr[row * 2 + j]);
            assert_eq!(gx[row * 4 + 2 + j], rr[(3 + row) * 2 + j]);
        }
    }
    assert!(ops::fold_halves(act(&dev, &x, 4, 3), "fold").is_err());
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
            loss(v); // leaves any state the closure writes at the original values
            (lp - lm) / (2.0 * eps as f64)
        })
        .collect()
}

/// Largest |analytic - fd| relative to the largest |fd| (at least 1).
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

/// Loss `sum(R ⊙ y²)` over a forward pass, summed in f64 on the host.
fn host_loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter()
        .zip(r)
        .map(|(&a, &w)| w as f64 * a as f64 * a as f64)
        .sum()
}

#[test]
fn conv_gradients_match_finite_differences() {
    let dev = Cpu::default();
    for (case, &(c, h, w, o, k, s, p)) in [
        (2, 6, 5, 3, 3, 1, 1),
        (3, 7, 7, 2, 3, 2, 0),
        (2, 5, 5, 3, 1, 1, 0),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(100 + case as u64);
        let b = 2;
        let mut store = ParamStore::new(&dev);
        let conv = Conv2d::new(&mut store, &mut r, "c", c, o, (h, w), k, s, p, true).unwrap();
        let sc: Vec<f32> = (0..o).map(|j| 0.75 + 0.5 * j as f32).collect();
        store.set_scale(conv.w, Some(&sc)).unwrap();
        let bid = conv.b.unwrap();
        let bv = randv(&mut r, o);
        store.host_mut(bid).copy_from_slice(&bv);
        store.sync_all();
        let rows = c * h * w;
        let mut x = randv(&mut r, rows * b);
        let (ho, wo) = conv.out_hw();
        let rr = randv(&mut r, o * ho * wo * b);
        // analytic
        let xt = act(&dev, &x, rows, b);
        let y = conv.forward(&store, xt.clone().leaky_traced()).unwrap();
        let loss = (y.square() * act(&dev, &rr, o * ho * wo, b)).sum::<(), _>();
        let g = loss.backward();
        let gx = g.get(&xt).as_vec();
        let gw = g.get(store.tensor(conv.w)).as_vec();
        let gb = g.get(store.tensor(bid)).as_vec();
        // numeric, loss in f64
        let eps = 1e-2;
        let xi = sample_idx(&mut r, x.len(), 24);
        let nx = fd(&mut x, &xi, eps, |xv| {
            host_loss(
                &conv
                    .forward(&store, act(&dev, xv, rows, b))
                    .unwrap()
                    .as_vec(),
                &rr,
            )
        });
        let xt = act(&dev, &x, rows, b);
        let mut wv = store.host(conv.w).to_vec();
        let wi = sample_idx(&mut r, wv.len(), 24);
        let nw = fd(&mut wv, &wi, eps, |w| {
            store.host_mut(conv.w).copy_from_slice(w);
            store.sync(conv.w);
            host_loss(&conv.forward(&store, xt.clone()).unwrap().as_vec(), &rr)
        });
        let mut bvv = store.host(bid).to_vec();
        let bi: Vec<usize> = (0..o).collect();
        let nb = fd(&mut bvv, &bi, eps, |bb| {
            store.host_mut(bid).copy_from_slice(bb);
            store.sync(bid);
            host_loss(&conv.forward(&store, xt.clone()).unwrap().as_vec(), &rr)
        });
        for (what, e) in [
            ("x", rel_err(&gx, &xi, &nx)),
            ("w", rel_err(&gw, &wi, &nw)),
            ("b", rel_err(&gb, &bi, &nb)),
        ] {
            assert!(e < 2e-3, "case {case}: grad of {what}: relative error {e}");
        }
    }
}

/// Naive batch-norm over channel blocks (f64).
fn naive_bn(x: &[f32], c: usize, g: &[f32], be: &[f32], eps: f64) -> Vec<f64> {
    let n = x.len() / c;
    let mut y = vec![0f64; x.len()];
    for ch in 0..c {
        let blk = &x[ch * n..(ch + 1) * n];
        let m = blk.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = blk.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
        for i in 0..n {
            y[ch * n + i] = g[ch] as f64 * (blk[i] as f64 - m) / (var + eps).sqrt() + be[ch] as f64;
        }
    }
    y
}

#[test]
fn norms_match_naive_references_and_finite_differences() {
    let dev = Cpu::default();
    let (c, s, b) = (4, 6, 3);
    let rows = c * s;
    let mut r = rng(21);
    let mut store = ParamStore::new(&dev);
    let bn = BatchNorm::new(&mut store, "bn", c).unwrap();
    let gn = GroupNorm::new(&mut store, "gn", c, 2).unwrap();
    for name in ["bn.weight", "bn.bias", "gn.weight", "gn.bias"] {
        let id = store.find(name).unwrap();
        let v: Vec<f32> = randv(&mut r, c).iter().map(|v| v + 1.5).collect();
        store.host_mut(id).copy_from_slice(&v);
    }
    store.sync_all();
    let mut x: Vec<f32> = randv(&mut r, rows * b)
        .iter()
        .map(|v| 2.0 * v + 0.3)
        .collect();
    let rr = randv(&mut r, rows * b);

    // forward: batch-norm vs naive, group-norm vs naive (group = 2 channels x s x one sample)
    let gam = |n: &str| store.host(store.find(n).unwrap()).to_vec();
    let y = bn
        .forward(&store, act(&dev, &x, rows, b), &mut Ctx::train())
        .unwrap();
    let want = naive_bn(&x, c, &gam("bn.weight"), &gam("bn.bias"), 1e-5);
    assert!(max_abs_diff(&y.as_vec(), &want) < 1e-5);
    let y = gn.forward(&store, act(&dev, &x, rows, b)).unwrap().as_vec();
    let (gg, gb) = (gam("gn.weight"), gam("gn.bias"));
    for grp in 0..2 {
        for bi in 0..b {
            let idx: Vec<usize> = (grp * 2 * s..(grp + 1) * 2 * s)
                .map(|row| row * b + bi)
                .collect();
            let m = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / idx.len() as f64;
            let var =
                idx.iter().map(|&i| (x[i] as f64 - m).powi(2)).sum::<f64>() / idx.len() as f64;
            for &i in &idx {
                let ch = i / b / s;
                let want = gg[ch] as f64 * (x[i] as f64 - m) / (var + 1e-5).sqrt() + gb[ch] as f64;
                assert!((y[i] as f64 - want).abs() < 1e-5);
            }
        }
    }

    // gradients vs finite differences, for x and both affine parameters
    type Fwd<'a> = Box<dyn Fn(&ParamStore, A<OwnedTape<f32, Cpu>>) -> A<OwnedTape<f32, Cpu>> + 'a>;
    type FwdN<'a> = Box<dyn Fn(&ParamStore, A) -> A + 'a>;
    let layers: [(&str, Fwd, FwdN); 2] = [
        (
            "bn",
            Box::new(|st, t| bn.forward(st, t, &mut Ctx::train()).unwrap()),
            Box::new(|st, t| bn.forward(st, t, &mut Ctx::train()).unwrap()),
        ),
        (
            "gn",
            Box::new(|st, t| gn.forward(st, t).unwrap()),
            Box::new(|st, t| gn.forward(st, t).unwrap()),
        ),
    ];
    for (name, f, fnone) in layers {
        let xt = act(&dev, &x, rows, b);
        let y = f(&store, xt.clone().leaky_traced());
        let g = (y.square() * act(&dev, &rr, rows, b))
            .sum::<(), _>()
            .backward();
        let gx = g.get(&xt).as_vec();
        let xi: Vec<usize> = (0..x.len()).step_by(3).collect();
        let nx = fd(&mut x, &xi, 1e-2, |xv| {
            host_loss(&fnone(&store, act(&dev, xv, rows, b)).as_vec(), &rr)
        });
        let e = rel_err(&gx, &xi, &nx);
        assert!(e < 5e-3, "{name}: grad of x: relative error {e}");
        for p in ["weight", "bias"] {
            let id = store.find(&format!("{name}.{p}")).unwrap();
            let ga = g.get(store.tensor(id)).as_vec();
            let mut v = store.host(id).to_vec();
            let pi: Vec<usize> = (0..c).collect();
            let xt2 = act(&dev, &x, rows, b);
            let np = fd(&mut v, &pi, 1e-2, |pv| {
                store.host_mut(id).copy_from_slice(pv);
                store.sync(id);
                host_loss(&fnone(&store, xt2.clone()).as_vec(), &rr)
            });
            let e = rel_err(&ga, &pi, &np);
            assert!(e < 5e-3, "{name}.{p}: relative error {e}");
        }
    }
}

#[test]
fn batch_norm_running_statistics_and_evaluation_mode() {
    let dev = Cpu::default();
    let (c, s, b) = (2, 4, 5);
    let mut r = rng(5);
    let mut store = ParamStore::new(&dev);
    let bn = BatchNorm::new(&mut store, "bn", c).unwrap();
    let x: Vec<f32> = randv(&mut r, c * s * b)
        .iter()
        .map(|v| 3.0 * v + 1.0)
        .collect();
    let mut ctx = Ctx::train();
    bn.forward(&store, act(&dev, &x, c * s, b), &mut ctx)
        .unwrap();
    ctx.apply_norm_updates(&mut store).unwrap();
    let n = s * b;
    for ch in 0..c {
        let blk = &x[ch * n..(ch + 1) * n];
        let m = blk.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = blk.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (n - 1) as f64;
        let rm = store.host(store.find("bn.running_mean").unwrap())[ch] as f64;
        let rv = store.host(store.find("bn.running_var").unwrap())[ch] as f64;
        assert!((rm - 0.1 * m).abs() < 1e-6, "{rm} vs {m}");
        assert!((rv - (0.9 + 0.1 * var)).abs() < 1e-5, "{rv} vs {var}");
    }
    // evaluation mode uses the running statistics
    let y = bn
        .forward(&store, act(&dev, &x, c * s, b), &mut Ctx::eval())
        .unwrap()
        .as_vec();
    let rm = store.host(store.find("bn.running_mean").unwrap()).to_vec();
    let rv = store.host(store.find("bn.running_var").unwrap()).to_vec();
    for (i, &v) in y.iter().enumerate() {
        let ch = i / n;
        let want = (x[i] as f64 - rm[ch] as f64) / (rv[ch] as f64 + 1e-5).sqrt();
        assert!((v as f64 - want).abs() < 1e-5);
    }
}

#[test]
fn global_average_pool_and_weighted_bce() {
    let dev = Cpu::default();
    let mut r = rng(9);
    let (c, s, b) = (3, 4, 2);
    let x = randv(&mut r, c * s * b);
    let rr = randv(&mut r, c * b);
    let (y, gx) = grad_through(&dev, &x, c * s, b, &rr, |t| global_avg_pool(t, c).unwrap());
    for ch in 0..c {
        for bi in 0..b {
            let m = (0..s).map(|p| x[(ch * s + p) * b + bi] as f64).sum::<f64>() / s as f64;
            assert!((y[ch * b + bi] as f64 - m).abs() < 1e-6);
            for p in 0..s {
                assert!((gx[(ch * s + p) * b + bi] - rr[ch * b + bi] / s as f32).abs() < 1e-7);
            }
        }
    }

    let n = 12;
    let mut z: Vec<f32> = randv(&mut r, n).iter().map(|v| 3.0 * v).collect();
    let t: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let pw = 4.0;
    let host = |z: &[f32]| -> f64 {
        z.iter()
            .zip(&t)
            .map(|(&zi, &y)| {
                let (zi, y) = (zi as f64, y as f64);
                let p = 1.0 / (1.0 + (-zi).exp());
                let w = if y > 0.5 { pw } else { 1.0 };
                -w * (y * p.ln() + (1.0 - y) * (1.0 - p).ln())
            })
            .sum::<f64>()
            / n as f64
    };
    let zt = act(&dev, &z, n / 2, 2);
    let (loss, v) =
        ops::weighted_bce_with_logits(zt.clone().leaky_traced(), &t, pw as f32, "bce").unwrap();
    assert!((v - host(&z)).abs() < 1e-9, "{v} vs {}", host(&z));
    let g = loss.backward().get(&zt).as_vec();
    let zi: Vec<usize> = (0..n).collect();
    let num = fd(&mut z, &zi, 1e-3, host);
    assert!(rel_err(&g, &zi, &num) < 1e-3);
    assert!(
        ops::weighted_bce_with_logits(act(&dev, &z, n, 1), &t[..3], 1.0, "seg")
            .unwrap_err()
            .to_string()
            .contains("seg")
    );
}

/// Softmax cross-entropy gradient on the host: `(softmax(z) - onehot) / B`, `z` batch-major.
fn host_ce_grad(z: &[f32], labels: &[usize], k: usize) -> Vec<f64> {
    let b = labels.len();
    let mut g = vec![0f64; z.len()];
    for (i, &y) in labels.iter().enumerate() {
        let row = &z[i * k..(i + 1) * k];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        for j in 0..k {
            let p = (row[j] as f64 - m).exp() / s;
            g[i * k + j] = (p - (j == y) as u8 as f64) / b as f64;
        }
    }
    g
}

fn onehot(dev: &Cpu, labels: &[usize], k: usize) -> Tensor<(usize, usize), f32, Cpu> {
    let mut v = vec![0f32; labels.len() * k];
    for (i, &y) in labels.iter().enumerate() {
        v[i * k + y] = 1.0;
    }
    dev.tensor_from_vec(v, (labels.len(), k))
}

#[test]
fn cross_entropy_guard_gives_correct_gradients_on_permuted_logits() {
    // Logits computed as (K, B) and permuted to (B, K) are a non-contiguous view: the case
    // where dfdx 0.13's cross-entropy gradient is wrong. The guarded loss must be right.
    let dev = Cpu::default();
    let (k, b) = (4, 5);
    let mut r = rng(13);
    let zk = randv(&mut r, k * b); // (K, B)
    let labels: Vec<usize> = (0..b).map(|i| i % k).collect();
    let zb: Vec<f32> = (0..b * k).map(|i| zk[(i % k) * b + i / k]).collect(); // (B, K)
    let want = host_ce_grad(&zb, &labels, k);
    let t = act(&dev, &zk, k, b);
    let view = t
        .clone()
        .leaky_traced()
        .permute::<(usize, usize), Axes2<1, 0>>();
    let g = contiguous_cross_entropy(view, onehot(&dev, &labels, k)).backward();
    let got = g.get(&t).as_vec(); // (K, B) layout
    let got_b: Vec<f32> = (0..b * k).map(|i| got[(i % k) * b + i / k]).collect();
    assert!(
        max_abs_diff(&got_b, &want) < 1e-6,
        "guarded loss: {got_b:?} vs {want:?}"
    );

    // and the linear head's logits feed it directly: gradient w.r.t. the head input
    let mut store = ParamStore::new(&dev);
    let head = Linear::new(&mut store, &mut r, "head", 3, k).unwrap();
    let h = randv(&mut r, 3 * b);
    let ht = act(&dev, &h, 3, b);
    let logits = head.forward(&store, ht.clone().leaky_traced()).unwrap();
    assert_eq!(*logits.shape(), (b, k));
    let zv = logits.retaped::<NoneTape>().as_vec();
    let g = contiguous_cross_entropy(logits, onehot(&dev, &labels, k)).backward();
    let dz = host_ce_grad(&zv, &labels, k);
    let w = store.host(head.w);
    let gh = g.get(&ht).as_vec();
    for i in 0..3 {
        for j in 0..b {
            let want: f64 = (0..k).map(|o| dz[j * k + o] * w[o * 3 + i] as f64).sum();
            assert!((gh[i * b + j] as f64 - want).abs() < 1e-6);
        }
    }
}

#[test]
fn stock_cross_entropy_on_a_permuted_view_is_still_wrong_in_this_dfdx() {
    // Documents the trap the guard exists for. If a dfdx upgrade fixes it, this test fails:
    // the guard can then be dropped.
    let dev = Cpu::default();
    let (k, b) = (4, 5);
    let mut r = rng(13);
    let zk = randv(&mut r, k * b);
    let labels: Vec<usize> = (0..b).map(|i| i % k).collect();
    let zb: Vec<f32> = (0..b * k).map(|i| zk[(i % k) * b + i / k]).collect();
    let want = host_ce_grad(&zb, &labels, k);
    let t = act(&dev, &zk, k, b);
    let view = t
        .clone()
        .leaky_traced()
        .permute::<(usize, usize), Axes2<1, 0>>();
    let g = cross_entropy_with_logits_loss(view, onehot(&dev, &labels, k)).backward();
    let got = g.get(&t).as_vec();
    let got_b: Vec<f32> = (0..b * k).map(|i| got[(i % k) * b + i / k]).collect();
    assert!(max_abs_diff(&got_b, &want) > 1e-2);
}

#[test]
fn parameter_store_round_trips_and_rejects_mismatches() {
    let dev = Cpu::default();
    let mut r = rng(1);
    let mut store = ParamStore::new(&dev);
    Conv2d::new(&mut store, &mut r, "c1", 2, 3, (5, 5), 3, 1, 1, true).unwrap();
    BatchNorm::new(&mut store, "bn1", 3).unwrap();
    assert_eq!(store.len(), 6);
    assert_eq!(store.trainable().len(), 4);
    let c1 = store.find("c1.weight").unwrap();
    assert_eq!(store.shape(c1), &[3, 2, 3, 3]);
    assert_eq!(
        store.kind(store.find("bn1.running_var").unwrap()),
        ParamKind::Buffer
    );
    let bytes = safetensors_bytes(&store.to_named(), &HashMap::new()).unwrap();
    let file = TensorFile::parse(&bytes).unwrap();

    let mut other = ParamStore::new(&dev);
    Conv2d::new(&mut other, &mut rng(99), "c1", 2, 3, (5, 5), 3, 1, 1, true).unwrap();
    BatchNorm::new(&mut other, "bn1", 3).unwrap();
    assert_ne!(other.host(c1), store.host(c1));
    other.load(&file).unwrap();
    for id in store.ids() {
        let (a, b) = (store.host(id), other.host(id));
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(other.tensor(id).as_vec(), b, "device copy synced");
    }
    // a different shape, a missing and an extra entry are errors naming the parameter
    let mut wrong = ParamStore::new(&dev);
    Conv2d::new(&mut wrong, &mut r, "c1", 2, 4, (5, 5), 3, 1, 1, true).unwrap();
    BatchNorm::new(&mut wrong, "bn1", 3).unwrap();
    let e = wrong.load(&file).unwrap_err().to_string();
    assert!(e.contains("c1.weight"), "{e}");
    let mut more = ParamStore::new(&dev);
    Conv2d::new(&mut more, &mut r, "c1", 2, 3, (5, 5), 3, 1, 1, true).unwrap();
    BatchNorm::new(&mut more, "bn1", 3).unwrap();
    more.add("extra", &[2], vec![0.0; 2], ParamKind::Trainable)
        .unwrap();
    assert!(more.load(&file).unwrap_err().to_string().contains("extra"));
    let mut less = ParamStore::new(&dev);
    Conv2d::new(&mut less, &mut r, "c1", 2, 3, (5, 5), 3, 1, 1, true).unwrap();
    assert!(less.load(&file).unwrap_err().to_string().contains("bn1"));
}

#[test]
fn channel_major_conversion_round_trips() {
    let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let cm = to_channel_major(&x, 3, 4).unwrap();
    assert_eq!(cm[1], 4.0); // feature 0 of sample 1
    assert_eq!(bb_tasks::convkit::to_batch_major(&cm, 4, 3).unwrap(), x);
    assert!(to_channel_major(&x, 5, 4).is_err());
}

#[test]
fn evaluation_in_chunks_covers_every_item_once_and_taps_the_first_chunk() {
    for (n, chunk, tap) in [
        (10, 4, None),
        (10, 4, Some(3)),
        (3, 4, Some(7)),
        (9, 3, Some(0)),
    ] {
        let mut seen = Vec::new();
        let taps = Ctx::eval_in_chunks(n, chunk, tap, |start, idx, ctx| {
            assert!(!ctx.train, "evaluation mode");
            assert_eq!(idx[0], start);
            let first = start == 0;
            let want = if first {
                tap.unwrap_or(chunk).max(1)
            } else {
                chunk
            };
            assert_eq!(idx.len(), want.min(n - start), "chunk at {start}");
            assert_eq!(ctx.record, first && tap.is_some(), "recording at {start}");
            let dev: Cpu = Default::default();
            let x = dev.tensor_from_vec(vec![start as f32; 2 * idx.len()], (2, idx.len()));
            ctx.tap("p", &x, 2)?;
            seen.extend_from_slice(idx);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            (0..n).collect::<Vec<_>>(),
            "n {n} chunk {chunk} tap {tap:?}"
        );
        match tap {
            Some(t) => {
                assert_eq!(taps.len(), 1);
                assert_eq!(taps[0].batch, t.clamp(1, n));
                assert!(
                    taps[0].data.iter().all(|&v| v == 0.0),
                    "taps of the first chunk"
                );
            }
            None => assert!(taps.is_empty()),
        }
    }
    // An error stops the pass and comes back.
    let r = Ctx::eval_in_chunks(10, 4, None, |start, _, _| {
        anyhow::ensure!(start < 4, "chunk at {start}");
        Ok(())
    });
    assert_eq!(r.unwrap_err().to_string(), "chunk at 4");
}

#[test]
fn sigmoid_batch_major_transposes_and_squashes() {
    // [F = 2, B = 3] channel-major
    let z = [0.0f32, 1.0, -1.0, 2.0, -2.0, 30.0];
    let mut out = vec![9.0f32; 7];
    sigmoid_batch_major(&z, 2, 3, &mut out).unwrap();
    let s = |v: f32| 1.0 / (1.0 + (-v).exp());
    assert_eq!(
        &out[..6],
        &[s(0.0), s(2.0), s(1.0), s(-2.0), s(-1.0), s(30.0)]
    );
    assert_eq!(out[6], 9.0, "values past B * F untouched");
    // logits that do not match the shape, or no room for them: errors
    assert!(sigmoid_batch_major(&z, 4, 3, &mut out).is_err());
    assert!(sigmoid_batch_major(&z, 2, 3, &mut out[..5]).is_err());
    assert!(sigmoid_batch_major(&[], 0, 0, &mut out).is_err());
}

#[test]
fn targets_of_chosen_items_are_their_labels_channel_major() {
    // 4 items of 3 labels each
    let labels: Vec<u8> = vec![1, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1];
    let idx = [2, 0, 3];
    let picked: Vec<f32> = idx
        .iter()
        .flat_map(|&k| labels[3 * k..3 * k + 3].iter().map(|&l| l as f32))
        .collect();
    let want = to_channel_major(&picked, 3, 3).unwrap();
    assert_eq!(channel_major_targets(&labels, 3, &idx), want);
    assert_eq!(want[..3], [1.0, 1.0, 0.0], "first label of items 2, 0, 3");
}
