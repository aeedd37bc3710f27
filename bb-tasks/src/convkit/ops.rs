//! Differentiable custom ops on channel-major activations `(rows, B)`, registered through
//! dfdx's public tape API: each forward reads its input once, computes its output on the host
//! and pushes one backward closure that writes the input (and parameter) gradients by tensor
//! id.
//!
//! Every op checks its input shape first and returns an error naming the layer, instead of
//! panicking inside dfdx.

use super::plan::{PoolPlan, RowPlan, NO_ROW};
use super::{Act, Param};
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use std::sync::Arc;

/// Host copy of a tensor's values. `x` must have standard (contiguous) strides, as every
/// tensor passed through `contiguous()` has; the ops below make sure of it.
fn contiguous_values<S: Shape, T>(x: &Tensor<S, f32, Cpu, T>) -> Vec<f32> {
    let mut v = vec![0f32; x.shape().num_elements()];
    x.copy_into(&mut v);
    v
}

/// Moves the gradient of a tensor out of the gradient store (allocating a zero one if
/// absent), so it can be read while another gradient is written; `put_grad!` puts it back.
/// (Macros: dfdx's `Tensorlike` and `GhostTensor` cannot be named outside dfdx.)
macro_rules! take_grad {
    ($grads:expr, $t:expr) => {
        std::mem::take(&mut **$grads.get_or_alloc_mut($t)?)
    };
}

macro_rules! put_grad {
    ($grads:expr, $t:expr, $v:expr) => {{
        **$grads.get_or_alloc_mut($t)? = $v;
        Ok(())
    }};
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `out[r] = x[table[r]]`, zero rows where the table has no source (see [`RowPlan`]).
/// The backward pass adds each output row's gradient to its source row.
pub fn row_gather<T: Tape<f32, Cpu>>(x: Act<T>, plan: &Arc<RowPlan>, what: &str) -> Result<Act<T>> {
    let (rows, b) = *x.shape();
    ensure!(
        rows == plan.rows_in(),
        "{what}: input has {rows} rows, the layer expects {} (channels x positions)",
        plan.rows_in()
    );
    let (x, mut tape) = x.contiguous().split_tape();
    let xv = contiguous_values(&x);
    let mut out = vec![0f32; plan.rows_out() * b];
    for r in plan.runs() {
        let (d, s, n) = (r.dst as usize * b, r.src as usize * b, r.len as usize * b);
        out[d..d + n].copy_from_slice(&xv[s..s + n]);
    }
    drop(xv);
    let out = x.device().tensor_from_vec(out, (plan.rows_out(), b));
    if T::OWNS_TAPE {
        let (xg, og, plan) = (x.ghost(), out.ghost(), plan.clone());
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let gx = grads.get_or_alloc_mut(&xg)?;
            for r in plan.runs() {
                let (d, s, n) = (r.dst as usize * b, r.src as usize * b, r.len as usize * b);
                add_into(&mut gx[s..s + n], &go[d..d + n]);
            }
            put_grad!(grads, &og, go)
        });
    }
    Ok(out.put_tape(tape))
}

/// Max over each pooling window (border positions left out). The gradient goes to the
/// first maximal element of each window, exactly once.
pub fn max_pool<T: Tape<f32, Cpu>>(x: Act<T>, plan: &Arc<PoolPlan>, what: &str) -> Result<Act<T>> {
    let (rows, b) = *x.shape();
    ensure!(
        rows == plan.rows_in(),
        "{what}: input has {rows} rows, the pooling expects {} (channels x positions)",
        plan.rows_in()
    );
    let (x, mut tape) = x.contiguous().split_tape();
    let xv = contiguous_values(&x);
    let ro = plan.rows_out();
    let mut out = vec![f32::NEG_INFINITY; ro * b];
    let mut arg = vec![NO_ROW; ro * b];
    for r in 0..ro {
        let (o, a) = (&mut out[r * b..(r + 1) * b], &mut arg[r * b..(r + 1) * b]);
        for &s in plan.sources(r) {
            if s == NO_ROW {
                continue;
            }
            let src = &xv[s as usize * b..(s as usize + 1) * b];
            for j in 0..b {
                // `>` keeps the first maximum; NaN never wins, so a NaN input gives -inf
                if src[j] > o[j] || a[j] == NO_ROW {
                    o[j] = src[j];
                    a[j] = s;
                }
            }
        }
    }
    drop(xv);
    let out = x.device().tensor_from_vec(out, (ro, b));
    if T::OWNS_TAPE {
        let (xg, og) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let gx = grads.get_or_alloc_mut(&xg)?;
            for (i, (&s, &g)) in arg.iter().zip(go.iter()).enumerate() {
                gx[s as usize * b + i % b] += g;
            }
            put_grad!(grads, &og, go)
        });
    }
    Ok(out.put_tape(tape))
}

/// Per-channel batch statistics of one training-mode batch-norm call (biased variance).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Mean per channel.
    pub mean: Vec<f64>,
    /// Variance per channel (over batch and positions, divided by their count).
    pub var: Vec<f64>,
    /// Values per channel (batch x positions).
    pub count: usize,
}

fn check_affine(what: &str, channels: usize, gamma: &Param, beta: &Param) -> Result<()> {
    ensure!(
        gamma.shape().0 == channels && beta.shape().0 == channels,
        "{what}: scale and shift need {channels} values, got {} and {}",
        gamma.shape().0,
        beta.shape().0
    );
    Ok(())
}

/// Training-mode batch-norm, fused: per channel, normalize over batch and positions with the
/// batch statistics (computed in f64), then `gamma * xhat + beta`. Gradients go to `x`,
/// `gamma` and `beta`.
pub fn batch_norm_train<T: Tape<f32, Cpu>>(
    x: Act<T>,
    gamma: &Param,
    beta: &Param,
    channels: usize,
    eps: f64,
    what: &str,
) -> Result<(Act<T>, BatchStats)> {
    let (rows, b) = *x.shape();
    ensure!(
        channels > 0 && rows % channels == 0,
        "{what}: input has {rows} rows, not a multiple of its {channels} channels"
    );
    check_affine(what, channels, gamma, beta)?;
    let n = rows / channels * b;
    let (x, mut tape) = x.contiguous().split_tape();
    let mut v = contiguous_values(&x);
    let (g, be) = (gamma.as_vec(), beta.as_vec());
    let mut stats = BatchStats {
        mean: vec![0.0; channels],
        var: vec![0.0; channels],
        count: n,
    };
    let mut inv = vec![0f32; channels];
    for c in 0..channels {
        let blk = &mut v[c * n..(c + 1) * n];
        let mean = blk.iter().map(|&t| t as f64).sum::<f64>() / n as f64;
        let var = blk
            .iter()
            .map(|&t| (t as f64 - mean) * (t as f64 - mean))
            .sum::<f64>()
            / n as f64;
        let s = 1.0 / (var + eps).sqrt();
        for t in blk.iter_mut() {
            *t = ((*t as f64 - mean) * s) as f32; // xhat, in place
        }
        stats.mean[c] = mean;
        stats.var[c] = var;
        inv[c] = s as f32;
    }
    let mut out = v.clone();
    for c in 0..channels {
        let (gc, bc) = (g[c], be[c]);
        for t in &mut out[c * n..(c + 1) * n] {
            *t = gc * *t + bc;
        }
    }
    let out = x.device().tensor_from_vec(out, (rows, b));
    if T::OWNS_TAPE {
        let (xg, og, gg, bg) = (x.ghost(), out.ghost(), gamma.ghost(), beta.ghost());
        let xhat = v;
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let mut dg = vec![0f32; channels];
            let mut db = vec![0f32; channels];
            {
                let gx = grads.get_or_alloc_mut(&xg)?;
                for c in 0..channels {
                    let r = c * n..(c + 1) * n;
                    let (dy, xh) = (&go[r.clone()], &xhat[r.clone()]);
                    let sdy: f64 = dy.iter().map(|&t| t as f64).sum();
                    let sdyx: f64 = dy.iter().zip(xh).map(|(&a, &h)| a as f64 * h as f64).sum();
                    dg[c] = sdyx as f32;
                    db[c] = sdy as f32;
                    let k = g[c] as f64 * inv[c] as f64 / n as f64;
                    let (m1, m2) = (sdy / n as f64, sdyx / n as f64);
                    for ((d, &a), &h) in gx[r].iter_mut().zip(dy).zip(xh) {
                        *d += (k * n as f64 * (a as f64 - m1 - h as f64 * m2)) as f32;
                    }
                }
            }
            add_into(grads.get_or_alloc_mut(&gg)?, &dg);
            add_into(grads.get_or_alloc_mut(&bg)?, &db);
            put_grad!(grads, &og, go)
        });
    }
    Ok((out.put_tape(tape), stats))
}

/// Evaluation-mode batch-norm: the per-channel affine map with the given running mean and
/// variance, `gamma * (x - mean) / sqrt(var + eps) + beta`. Differentiable in `x`, `gamma`
/// and `beta`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval<T: Tape<f32, Cpu>>(
    x: Act<T>,
    gamma: &Param,
    beta: &Param,
    mean: &[f32],
    var: &[f32],
    channels: usize,
    eps: f64,
    what: &str,
) -> Result<Act<T>> {
    let (rows, b) = *x.shape();
    ensure!(
        channels > 0 && rows % channels == 0,
        "{what}: input has {rows} rows, not a multiple of its {channels} channels"
    );
    check_affine(what, channels, gamma, beta)?;
    ensure!(
        mean.len() == channels && var.len() == channels,
        "{what}: running statistics need {channels} values"
    );
    let n = rows / channels * b;
    let (x, mut tape) = x.contiguous().split_tape();
    let mut v = contiguous_values(&x);
    let (g, be) = (gamma.as_vec(), beta.as_vec());
    let inv: Vec<f32> = var
        .iter()
        .map(|&s| (1.0 / (s as f64 + eps).sqrt()) as f32)
        .collect();
    let mut out = v.clone();
    for c in 0..channels {
        let (m, s) = (mean[c], inv[c]);
        for (o, t) in out[c * n..(c + 1) * n]
            .iter_mut()
            .zip(&mut v[c * n..(c + 1) * n])
        {
            *t = (*t - m) * s; // xhat
            *o = g[c] * *t + be[c];
        }
    }
    let out = x.device().tensor_from_vec(out, (rows, b));
    if T::OWNS_TAPE {
        let (xg, og, gg, bg) = (x.ghost(), out.ghost(), gamma.ghost(), beta.ghost());
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let mut dg = vec![0f32; channels];
            let mut db = vec![0f32; channels];
            {
                let gx = grads.get_or_alloc_mut(&xg)?;
                for c in 0..channels {
                    let r = c * n..(c + 1) * n;
                    let k = g[c] * inv[c];
                    for ((d, &a), &h) in gx[r.clone()].iter_mut().zip(&go[r.clone()]).zip(&v[r]) {
                        *d += k * a;
                        dg[c] += a * h;
                        db[c] += a;
                    }
                }
            }
            add_into(grads.get_or_alloc_mut(&gg)?, &dg);
            add_into(grads.get_or_alloc_mut(&bg)?, &db);
            put_grad!(grads, &og, go)
        });
    }
    Ok(out.put_tape(tape))
}

/// Group-norm, fused: channels split into `groups` consecutive groups; each (group, sample)
/// is normalized over its channels and positions (statistics in f64), then the per-channel
/// affine `gamma * xhat + beta`. The same in training and evaluation.
pub fn group_norm<T: Tape<f32, Cpu>>(
    x: Act<T>,
    gamma: &Param,
    beta: &Param,
    channels: usize,
    groups: usize,
    eps: f64,
    what: &str,
) -> Result<Act<T>> {
    let (rows, b) = *x.shape();
    ensure!(
        groups > 0 && channels.is_multiple_of(groups),
        "{what}: {channels} channels cannot be split into {groups} groups"
    );
    ensure!(
        rows % channels == 0,
        "{what}: input has {rows} rows, not a multiple of its {channels} channels"
    );
    check_affine(what, channels, gamma, beta)?;
    let s = rows / channels;
    let grows = channels / groups * s; // rows per group
    let n = grows as f64;
    let (x, mut tape) = x.contiguous().split_tape();
    let mut v = contiguous_values(&x);
    let (g, be) = (gamma.as_vec(), beta.as_vec());
    let mut inv = vec![0f32; groups * b];
    let mut acc = vec![0f64; b];
    for gi in 0..groups {
        let blk = &mut v[gi * grows * b..(gi + 1) * grows * b];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for row in blk.chunks_exact(b) {
            for (a, &t) in acc.iter_mut().zip(row) {
                *a += t as f64;
            }
        }
        let mean: Vec<f64> = acc.iter().map(|a| a / n).collect();
        acc.iter_mut().for_each(|a| *a = 0.0);
        for row in blk.chunks_exact(b) {
            for ((a, &t), &m) in acc.iter_mut().zip(row).zip(&mean) {
                *a += (t as f64 - m) * (t as f64 - m);
            }
        }
        let is: Vec<f64> = acc.iter().map(|a| 1.0 / (a / n + eps).sqrt()).collect();
        for row in blk.chunks_exact_mut(b) {
            for ((t, &m), &k) in row.iter_mut().zip(&mean).zip(&is) {
                *t = ((*t as f64 - m) * k) as f32;
            }
        }
        for (j, k) in is.iter().enumerate() {
            inv[gi * b + j] = *k as f32;
        }
    }
    let mut out = v.clone();
    for (r, row) in out.chunks_exact_mut(b).enumerate() {
        let c = r / s;
        for t in row {
            *t = g[c] * *t + be[c];
        }
    }
    let out = x.device().tensor_from_vec(out, (rows, b));
    if T::OWNS_TAPE {
        let (xg, og, gg, bg) = (x.ghost(), out.ghost(), gamma.ghost(), beta.ghost());
        let xhat = v;
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let mut dg = vec![0f64; channels];
            let mut db = vec![0f64; channels];
            {
                let gx = grads.get_or_alloc_mut(&xg)?;
                let mut s1 = vec![0f64; b];
                let mut s2 = vec![0f64; b];
                for gi in 0..groups {
                    let r0 = gi * grows;
                    s1.iter_mut().for_each(|a| *a = 0.0);
                    s2.iter_mut().for_each(|a| *a = 0.0);
                    for r in r0..r0 + grows {
                        let gc = g[r / s] as f64;
                        let (dy, xh) = (&go[r * b..(r + 1) * b], &xhat[r * b..(r + 1) * b]);
                        let (mut sg, mut sb) = (0f64, 0f64);
                        for j in 0..b {
                            let (a, h) = (dy[j] as f64, xh[j] as f64);
                            s1[j] += a * gc;
                            s2[j] += a * gc * h;
                            sg += a * h;
                            sb += a;
                        }
                        dg[r / s] += sg;
                        db[r / s] += sb;
                    }
                    for r in r0..r0 + grows {
                        let gc = g[r / s] as f64;
                        for j in 0..b {
                            let (a, h) = (go[r * b + j] as f64, xhat[r * b + j] as f64);
                            let k = inv[gi * b + j] as f64 / n;
                            gx[r * b + j] += (k * (n * a * gc - s1[j] - h * s2[j])) as f32;
                        }
                    }
                }
            }
            let f = |v: Vec<f64>| v.into_iter().map(|t| t as f32).collect::<Vec<_>>();
            add_into(grads.get_or_alloc_mut(&gg)?, &f(dg));
            add_into(grads.get_or_alloc_mut(&bg)?, &f(db));
            put_grad!(grads, &og, go)
        });
    }
    Ok(out.put_tape(tape))
}

/// Stacks activations with the same batch size along the rows (for channel-major
/// activations over the same grid: a channel concatenation).
pub fn concat_rows<T: Tape<f32, Cpu>>(parts: Vec<Act<T>>, what: &str) -> Result<Act<T>> {
    ensure!(!parts.is_empty(), "{what}: nothing to concatenate");
    let b = parts[0].shape().1;
    for (i, p) in parts.iter().enumerate() {
        ensure!(
            p.shape().1 == b,
            "{what}: part {i} has batch {}, part 0 has {b}",
            p.shape().1
        );
    }
    let rows: Vec<usize> = parts.iter().map(|p| p.shape().0).collect();
    let total: usize = rows.iter().sum();
    let mut out = Vec::with_capacity(total * b);
    let mut tape = T::default();
    let mut ghosts = Vec::with_capacity(parts.len());
    let mut dev = None;
    for p in parts {
        let (p, t) = p.contiguous().split_tape();
        tape = tape.merge(t);
        out.extend_from_slice(&contiguous_values(&p));
        ghosts.push(p.ghost());
        dev.get_or_insert_with(|| p.device().clone());
    }
    let dev = dev.expect("at least one part");
    let out = dev.tensor_from_vec(out, (total, b));
    if T::OWNS_TAPE {
        let og = out.ghost();
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let mut off = 0;
            for (g, r) in ghosts.iter().zip(&rows) {
                add_into(grads.get_or_alloc_mut(g)?, &go[off..off + r * b]);
                off += r * b;
            }
            put_grad!(grads, &og, go)
        });
    }
    Ok(out.put_tape(tape))
}

/// `(R, 2B) -> (2R, B)`: the first half of the batch becomes the first `R` rows, the second
/// half the next `R` rows. A Siamese encoder run once on `[x1 | x2]` gives, after this, the
/// channel concatenation of its two branches' features.
pub fn fold_halves<T: Tape<f32, Cpu>>(x: Act<T>, what: &str) -> Result<Act<T>> {
    let (rows, b2) = *x.shape();
    ensure!(
        b2 % 2 == 0 && b2 > 0,
        "{what}: batch {b2} is not two equal halves"
    );
    let b = b2 / 2;
    let (x, mut tape) = x.contiguous().split_tape();
    let xv = contiguous_values(&x);
    let mut out = vec![0f32; rows * b2];
    for r in 0..rows {
        out[r * b..(r + 1) * b].copy_from_slice(&xv[r * b2..r * b2 + b]);
        out[(rows + r) * b..(rows + r + 1) * b].copy_from_slice(&xv[r * b2 + b..(r + 1) * b2]);
    }
    drop(xv);
    let out = x.device().tensor_from_vec(out, (2 * rows, b));
    if T::OWNS_TAPE {
        let (xg, og) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let gx = grads.get_or_alloc_mut(&xg)?;
            for r in 0..rows {
                add_into(&mut gx[r * b2..r * b2 + b], &go[r * b..(r + 1) * b]);
                add_into(
                    &mut gx[r * b2 + b..(r + 1) * b2],
                    &go[(rows + r) * b..(rows + r + 1) * b],
                );
            }
            put_grad!(grads, &og, go)
        });
    }
    Ok(out.put_tape(tape))
}

/// Mean binary cross-entropy with logits over every element of `logits`, positives weighted
/// by `pos_weight`: `mean_i w_i (softplus(z_i) - y_i z_i)` with `w_i = pos_weight` where
/// `y_i >= 0.5`. `target` is in the same (row-major) order as `logits`. Returns the loss tensor
/// and its value (summed in f64).
pub fn weighted_bce_with_logits<T: Tape<f32, Cpu>>(
    logits: Act<T>,
    target: &[f32],
    pos_weight: f32,
    what: &str,
) -> Result<(Tensor<(), f32, Cpu, T>, f64)> {
    let (rows, b) = *logits.shape();
    ensure!(
        target.len() == rows * b,
        "{what}: {} targets for {} logits",
        target.len(),
        rows * b
    );
    ensure!(
        pos_weight.is_finite() && pos_weight > 0.0,
        "{what}: pos_weight must be > 0, got {pos_weight}"
    );
    ensure!(
        target.iter().all(|&y| (0.0..=1.0).contains(&y)),
        "{what}: targets must lie in [0, 1]"
    );
    let (z, mut tape) = logits.contiguous().split_tape();
    let zv = contiguous_values(&z);
    let n = zv.len() as f64;
    let mut sum = 0f64;
    let mut dz = vec![0f32; zv.len()];
    for ((d, &zi), &y) in dz.iter_mut().zip(&zv).zip(target) {
        let (zi, y) = (zi as f64, y as f64);
        let w = if y >= 0.5 { pos_weight as f64 } else { 1.0 };
        let softplus = zi.max(0.0) + (-zi.abs()).exp().ln_1p();
        sum += w * (softplus - y * zi);
        let sig = 1.0 / (1.0 + (-zi).exp());
        *d = (w * (sig - y) / n) as f32;
    }
    let loss = sum / n;
    let out = z.device().tensor_from_vec(vec![loss as f32], ());
    if T::OWNS_TAPE {
        let (zg, og) = (z.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let go = take_grad!(grads, &og);
            let s = go[0];
            let gz = grads.get_or_alloc_mut(&zg)?;
            for (g, d) in gz.iter_mut().zip(&dz) {
                *g += s * d;
            }
            put_grad!(grads, &og, go)
        });
    }
    Ok((out.put_tape(tape), loss))
}
