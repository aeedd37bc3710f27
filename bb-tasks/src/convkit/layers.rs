//! Layers over channel-major activations `(C·H·W, B)` (2-D) or `(C·D·H·W, B)` (3-D):
//! convolution, batch- and group-norm, max-pooling, nearest upsampling, global average
//! pooling and a linear head. Each layer holds only ids into a [`ParamStore`] and its row
//! plans; the forward passes are generic over the tape, so the same code runs with gradients
//! (`OwnedTape`) and without (`NoneTape`).

use super::ops::{self, BatchStats};
use super::params::{ParamId, ParamKind, ParamStore};
use super::plan::{Geom, PoolPlan, RowPlan};
use super::Act;
use anyhow::{ensure, Result};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rand::Rng;
use std::sync::Arc;

/// One population's activations, copied from a training forward pass for the pruner:
/// `[units, positions, batch]` row-major (see `bb_core::Activations::unit_major`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tap {
    /// Population name (as in the model's topology).
    pub population: String,
    /// Channels.
    pub units: usize,
    /// Positions per channel.
    pub positions: usize,
    /// Batch size.
    pub batch: usize,
    /// Values.
    pub data: Vec<f32>,
}

#[derive(Debug, Clone)]
struct NormUpdate {
    mean: ParamId,
    var: ParamId,
    momentum: f32,
    stats: BatchStats,
}

/// Per-pass context: training or evaluation mode, the activations tapped for the pruner and
/// the batch-norm statistics to fold into the running averages after the step.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Training mode (batch statistics in batch-norm).
    pub train: bool,
    /// Whether [`Ctx::tap`] records.
    pub record: bool,
    /// Recorded activations.
    pub taps: Vec<Tap>,
    norm: Vec<NormUpdate>,
}

impl Ctx {
    /// Training mode, recording taps.
    pub fn train() -> Self {
        Self {
            train: true,
            record: true,
            taps: Vec::new(),
            norm: Vec::new(),
        }
    }

    /// Evaluation mode (running statistics), recording nothing.
    pub fn eval() -> Self {
        Self {
            train: false,
            record: false,
            taps: Vec::new(),
            norm: Vec::new(),
        }
    }

    /// Runs `pass` in evaluation mode over items `0..n` in chunks of `chunk`: each call gets
    /// the chunk's first item, its items' indices and a fresh evaluation context. With `tap`,
    /// the first chunk holds the first `tap` items (at least one) and records the activations
    /// it taps, which are returned.
    pub fn eval_in_chunks(
        n: usize,
        chunk: usize,
        tap: Option<usize>,
        mut pass: impl FnMut(usize, &[usize], &mut Ctx) -> Result<()>,
    ) -> Result<Vec<Tap>> {
        let mut taps = Vec::new();
        let mut start = 0;
        while start < n {
            let first = start == 0;
            let len = tap.filter(|_| first).unwrap_or(chunk).max(1);
            let idx: Vec<usize> = (start..(start + len).min(n)).collect();
            let mut ctx = Ctx::eval();
            ctx.record = first && tap.is_some();
            pass(start, &idx, &mut ctx)?;
            if ctx.record {
                taps = ctx.taps;
            }
            start += idx.len();
        }
        Ok(taps)
    }

    /// Records the values of `x` (`(units·positions, B)`) as population `population`.
    pub fn tap<T>(&mut self, population: &str, x: &Act<T>, units: usize) -> Result<()> {
        if !self.record {
            return Ok(());
        }
        let (rows, batch) = *x.shape();
        ensure!(
            units > 0 && rows % units == 0,
            "tap {population}: {rows} rows are not a multiple of {units} channels"
        );
        self.taps.push(Tap {
            population: population.to_string(),
            units,
            positions: rows / units,
            batch,
            data: x.as_vec(),
        });
        Ok(())
    }

    /// Folds the batch statistics of this pass into the running averages:
    /// `r <- (1 - m) r + m s`, with the unbiased variance.
    pub fn apply_norm_updates(&mut self, store: &mut ParamStore) -> Result<()> {
        for u in self.norm.drain(..) {
            let m = u.momentum as f64;
            let n = u.stats.count as f64;
            let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            ensure!(
                store.host(u.mean).len() == u.stats.mean.len(),
                "running mean {} does not match its statistics",
                store.name(u.mean)
            );
            for (r, &s) in store.host_mut(u.mean).iter_mut().zip(&u.stats.mean) {
                *r = ((1.0 - m) * *r as f64 + m * s) as f32;
            }
            for (r, &s) in store.host_mut(u.var).iter_mut().zip(&u.stats.var) {
                *r = ((1.0 - m) * *r as f64 + m * s * unbias) as f32;
            }
            store.sync(u.mean);
            store.sync(u.var);
        }
        Ok(())
    }
}

/// He-uniform initial weights: uniform in `±sqrt(6 / fan_in)`.
pub fn he_uniform(rng: &mut impl Rng, n: usize, fan_in: usize) -> Vec<f32> {
    let bound = (6.0 / fan_in.max(1) as f32).sqrt();
    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
}

/// A 2-D or 3-D convolution: weights `[out, in, kh, kw]` or `[out, in, kd, kh, kw]`
/// (PyTorch layout), optional bias, any kernel, stride and zero padding. An optional
/// per-output-channel factor set on the weight in the store (the SP-in rescale) multiplies
/// the weight rows at use.
///
/// Both ranks share one code path: a 2-D convolution is a 3-D one over a grid of depth 1
/// with a kernel of depth 1 ([`Geom`]); the rank only decides the weight's shape and the
/// kernel dims the engine sees.
#[derive(Debug, Clone)]
pub struct Conv {
    /// Layer name (its weight is `<name>.weight`).
    pub name: String,
    /// Weight id.
    pub w: ParamId,
    /// Bias id.
    pub b: Option<ParamId>,
    /// The window.
    pub geom: Geom,
    /// Output channels.
    pub out: usize,
    /// 2 or 3.
    pub rank: usize,
    plan: Option<Arc<RowPlan>>,
}

/// The 2-D name of [`Conv`] (its [`Conv::new`] builds 2-D convolutions).
pub type Conv2d = Conv;

impl Conv {
    /// A 2-D convolution: adds `<name>.weight` `[out, inp, k, k]` (and `<name>.bias`) to
    /// the store, He-initialised from `rng`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        inp: usize,
        out: usize,
        hw: (usize, usize),
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Self> {
        let geom = Geom::square(name, inp, hw.0, hw.1, k, stride, pad)?;
        Self::with_geom(store, rng, name, out, geom, 2, bias)
    }

    /// A 3-D convolution over a `[d, h, w]` grid: cubic kernel `k`, the same stride and
    /// padding in every dimension; weight `[out, inp, k, k, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_3d(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        inp: usize,
        out: usize,
        dhw: [usize; 3],
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Self> {
        let geom = Geom::new(name, inp, dhw, [k; 3], [stride; 3], [pad; 3])?;
        Self::with_geom(store, rng, name, out, geom, 3, bias)
    }

    fn with_geom(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        out: usize,
        geom: Geom,
        rank: usize,
        bias: bool,
    ) -> Result<Self> {
        ensure!(out > 0, "{name}: output channels must be > 0");
        let plan = if geom.is_pointwise() {
            None
        } else {
            Some(Arc::new(RowPlan::im2col(&geom)?))
        };
        let inp = geom.c;
        let fan_in = inp * geom.kernel_len();
        let mut shape = vec![out, inp];
        shape.extend_from_slice(&geom.k[3 - rank..]);
        let w = store.add(
            &format!("{name}.weight"),
            &shape,
            he_uniform(rng, out * fan_in, fan_in),
            ParamKind::Trainable,
        )?;
        let b = if bias {
            Some(store.add(
                &format!("{name}.bias"),
                &[out],
                vec![0.0; out],
                ParamKind::Trainable,
            )?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            w,
            b,
            geom,
            out,
            rank,
            plan,
        })
    }

    /// Output grid `(h, w)`.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.geom.out[1], self.geom.out[2])
    }

    /// Output grid `[d, h, w]` (`d = 1` in 2-D).
    pub fn out_dhw(&self) -> [usize; 3] {
        self.geom.out
    }

    /// Kernel dims for the engine's topology: `[kh, kw]` in 2-D, `[kd, kh, kw]` in 3-D.
    pub fn kernel(&self) -> Vec<usize> {
        self.geom.k[3 - self.rank..].to_vec()
    }

    /// `(in·D·H·W, B) -> (out·Do·Ho·Wo, B)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, store: &ParamStore, x: Act<T>) -> Result<Act<T>> {
        let (rows, b) = *x.shape();
        let g = &self.geom;
        ensure!(
            rows == g.rows_in(),
            "{}: input has {rows} rows, expected {} channels x {} = {}",
            self.name,
            g.c,
            grid(&g.inp[3 - self.rank..]),
            g.rows_in()
        );
        let (ck, osp) = (g.c * g.kernel_len(), g.out_spatial());
        let cols = match &self.plan {
            Some(p) => ops::row_gather(x, p, &self.name)?,
            None => x,
        };
        let cols = cols.reshape_like(&(ck, osp * b));
        let w = store
            .tensor(self.w)
            .retaped::<T>()
            .reshape_like(&(self.out, ck));
        let w = match store.scale(self.w) {
            Some(s) => {
                w * s
                    .clone()
                    .broadcast_like::<(usize, usize), Axis<1>>(&(self.out, ck))
            }
            None => w,
        };
        let y = w.matmul(cols);
        let y = match self.b {
            Some(bid) => {
                y + store
                    .tensor(bid)
                    .retaped::<T>()
                    .broadcast_like::<(usize, usize), Axis<1>>(&(self.out, osp * b))
            }
            None => y,
        };
        Ok(y.reshape_like(&(self.out * osp, b)))
    }
}

/// `"4x5"` or `"3x4x5"`.
fn grid(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// Adds the per-feature affine parameters of a normalization layer (batch-, group- or
/// layer-norm): `<name>.weight` (ones) then `<name>.bias` (zeros), both of shape `[n]` and
/// trainable. Returns their ids in that order.
pub fn norm_affine(store: &mut ParamStore, name: &str, n: usize) -> Result<(ParamId, ParamId)> {
    let weight = store.add(
        &format!("{name}.weight"),
        &[n],
        vec![1.0; n],
        ParamKind::Trainable,
    )?;
    let bias = store.add(
        &format!("{name}.bias"),
        &[n],
        vec![0.0; n],
        ParamKind::Trainable,
    )?;
    Ok((weight, bias))
}

/// Batch-norm over channels: batch statistics in training mode (folded into running
/// averages by [`Ctx::apply_norm_updates`]), running statistics in evaluation mode.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Layer name.
    pub name: String,
    /// Channels.
    pub channels: usize,
    gamma: ParamId,
    beta: ParamId,
    mean: ParamId,
    var: ParamId,
    /// Denominator guard.
    pub eps: f64,
    /// Weight of a new batch in the running averages.
    pub momentum: f32,
}

impl BatchNorm {
    /// Adds `<name>.{weight,bias}` (1, 0) and `<name>.running_{mean,var}` (0, 1).
    pub fn new(store: &mut ParamStore, name: &str, channels: usize) -> Result<Self> {
        ensure!(channels > 0, "{name}: channels must be > 0");
        let (gamma, beta) = norm_affine(store, name, channels)?;
        let buffer = |s: &mut ParamStore, what: &str, v: f32| {
            s.add(
                &format!("{name}.{what}"),
                &[channels],
                vec![v; channels],
                ParamKind::Buffer,
            )
        };
        Ok(Self {
            name: name.to_string(),
            channels,
            gamma,
            beta,
            mean: buffer(store, "running_mean", 0.0)?,
            var: buffer(store, "running_var", 1.0)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Normalizes `(channels·S, B)`.
    pub fn forward<T: Tape<f32, Cpu>>(
        &self,
        store: &ParamStore,
        x: Act<T>,
        ctx: &mut Ctx,
    ) -> Result<Act<T>> {
        let (g, b) = (store.tensor(self.gamma), store.tensor(self.beta));
        if ctx.train {
            let (y, stats) = ops::batch_norm_train(x, g, b, self.channels, self.eps, &self.name)?;
            ctx.norm.push(NormUpdate {
                mean: self.mean,
                var: self.var,
                momentum: self.momentum,
                stats,
            });
            Ok(y)
        } else {
            ops::batch_norm_eval(
                x,
                g,
                b,
                store.host(self.mean),
                store.host(self.var),
                self.channels,
                self.eps,
                &self.name,
            )
        }
    }
}

/// Group-norm over channel groups (the same in training and evaluation).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// Layer name.
    pub name: String,
    /// Channels.
    pub channels: usize,
    /// Groups.
    pub groups: usize,
    gamma: ParamId,
    beta: ParamId,
    /// Denominator guard.
    pub eps: f64,
}

impl GroupNorm {
    /// Adds `<name>.{weight,bias}` (1, 0).
    pub fn new(store: &mut ParamStore, name: &str, channels: usize, groups: usize) -> Result<Self> {
        ensure!(
            groups > 0 && channels > 0 && channels.is_multiple_of(groups),
            "{name}: {channels} channels cannot be split into {groups} groups"
        );
        let (gamma, beta) = norm_affine(store, name, channels)?;
        Ok(Self {
            name: name.to_string(),
            channels,
            groups,
            gamma,
            beta,
            eps: 1e-5,
        })
    }

    /// Normalizes `(channels·S, B)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, store: &ParamStore, x: Act<T>) -> Result<Act<T>> {
        ops::group_norm(
            x,
            store.tensor(self.gamma),
            store.tensor(self.beta),
            self.channels,
            self.groups,
            self.eps,
            &self.name,
        )
    }
}

/// Max-pooling with a square (2-D) or cubic (3-D) window.
#[derive(Debug, Clone)]
pub struct MaxPool {
    /// Layer name.
    pub name: String,
    /// The window.
    pub geom: Geom,
    plan: Arc<PoolPlan>,
}

impl MaxPool {
    /// `k x k` windows with stride `stride`, no padding, over `c` channels of `h x w`.
    pub fn new(name: &str, c: usize, hw: (usize, usize), k: usize, stride: usize) -> Result<Self> {
        Self::with_geom(name, Geom::square(name, c, hw.0, hw.1, k, stride, 0)?)
    }

    /// `k x k x k` windows with stride `stride`, no padding, over `c` channels of `d x h x w`.
    pub fn new_3d(name: &str, c: usize, dhw: [usize; 3], k: usize, stride: usize) -> Result<Self> {
        Self::with_geom(name, Geom::new(name, c, dhw, [k; 3], [stride; 3], [0; 3])?)
    }

    fn with_geom(name: &str, geom: Geom) -> Result<Self> {
        let plan = Arc::new(PoolPlan::new(name, &geom)?);
        Ok(Self {
            name: name.to_string(),
            geom,
            plan,
        })
    }

    /// Output grid `(h, w)`.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.geom.out[1], self.geom.out[2])
    }

    /// Output grid `[d, h, w]`.
    pub fn out_dhw(&self) -> [usize; 3] {
        self.geom.out
    }

    /// `(c·D·H·W, B) -> (c·Do·Ho·Wo, B)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, x: Act<T>) -> Result<Act<T>> {
        ops::max_pool(x, &self.plan, &self.name)
    }
}

/// Nearest upsampling by an integer factor (in 2-D: height and width; in 3-D: every
/// dimension).
#[derive(Debug, Clone)]
pub struct Upsample {
    /// Layer name.
    pub name: String,
    /// Output grid `(h, w)`.
    pub out_hw: (usize, usize),
    /// Output grid `[d, h, w]`.
    pub out_dhw: [usize; 3],
    plan: Arc<RowPlan>,
}

impl Upsample {
    /// Upsamples `c` channels of `h x w` by `factor` in both dimensions.
    pub fn new(name: &str, c: usize, hw: (usize, usize), factor: usize) -> Result<Self> {
        Self::with_factors(name, c, [1, hw.0, hw.1], [1, factor, factor])
    }

    /// Upsamples `c` channels of `d x h x w` by `factor` in every dimension.
    pub fn new_3d(name: &str, c: usize, dhw: [usize; 3], factor: usize) -> Result<Self> {
        Self::with_factors(name, c, dhw, [factor; 3])
    }

    fn with_factors(name: &str, c: usize, inp: [usize; 3], f: [usize; 3]) -> Result<Self> {
        let plan = Arc::new(RowPlan::upsample(name, c, inp, f)?);
        let out = [inp[0] * f[0], inp[1] * f[1], inp[2] * f[2]];
        Ok(Self {
            name: name.to_string(),
            out_hw: (out[1], out[2]),
            out_dhw: out,
            plan,
        })
    }

    /// `(c·D·H·W, B) -> (c·fD·fH·fW, B)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, x: Act<T>) -> Result<Act<T>> {
        ops::row_gather(x, &self.plan, &self.name)
    }
}

/// Global average pooling: `(c·S, B) -> (c, B)`.
pub fn global_avg_pool<T: Tape<f32, Cpu>>(x: Act<T>, channels: usize) -> Result<Act<T>> {
    let (rows, b) = *x.shape();
    ensure!(
        channels > 0 && rows % channels == 0,
        "global average pool: {rows} rows are not a multiple of {channels} channels"
    );
    Ok(x.reshape_like(&(channels, rows / channels, b))
        .mean::<(usize, usize), Axis<1>>())
}

/// A dense head producing contiguous, batch-major logits `(B, out)` from features
/// `(in, B)`: weights `[out, in]`, bias `[out]`.
///
/// The logits are a fresh matmul output, never a permuted view: dfdx 0.13's softmax,
/// log-softmax and cross-entropy give wrong gradients on non-contiguous inputs.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Layer name.
    pub name: String,
    /// Weight id.
    pub w: ParamId,
    /// Bias id.
    pub b: ParamId,
    /// Input features.
    pub inp: usize,
    /// Outputs.
    pub out: usize,
}

impl Linear {
    /// Adds `<name>.{weight,bias}`, uniform in `±1/sqrt(in)`.
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        inp: usize,
        out: usize,
    ) -> Result<Self> {
        ensure!(
            inp > 0 && out > 0,
            "{name}: input and output sizes must be > 0"
        );
        let bound = 1.0 / (inp as f32).sqrt();
        let w = store.add(
            &format!("{name}.weight"),
            &[out, inp],
            (0..out * inp)
                .map(|_| rng.gen_range(-bound..bound))
                .collect(),
            ParamKind::Trainable,
        )?;
        let b = store.add(
            &format!("{name}.bias"),
            &[out],
            (0..out).map(|_| rng.gen_range(-bound..bound)).collect(),
            ParamKind::Trainable,
        )?;
        Ok(Self {
            name: name.to_string(),
            w,
            b,
            inp,
            out,
        })
    }

    /// `(in, B) -> (B, out)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, store: &ParamStore, h: Act<T>) -> Result<Act<T>> {
        let (i, b) = *h.shape();
        ensure!(
            i == self.inp,
            "{}: input has {i} features, expected {}",
            self.name,
            self.inp
        );
        let ht = h.permute::<(usize, usize), Axes2<1, 0>>();
        let w = store
            .tensor(self.w)
            .retaped::<T>()
            .reshape_like(&(self.out, i))
            .permute::<(usize, usize), Axes2<1, 0>>();
        let y = ht.matmul(w);
        Ok(y + store
            .tensor(self.b)
            .retaped::<T>()
            .broadcast_like::<(usize, usize), Axis<0>>(&(b, self.out)))
    }
}
