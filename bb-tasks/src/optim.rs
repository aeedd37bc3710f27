//! Optimizers over host parameter slices: Adam and SGD with momentum, and learning-rate schedules.
//!
//! dfdx's own optimizers need a `TensorCollection`, which runtime-shaped parameters cannot be;
//! these work on the host master copies of the parameters instead. Their state is a list of
//! `f32` buffers (one or two per parameter) so checkpoints can store it exactly.

use anyhow::{ensure, Result};
use bb_actuators::BitMask;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Which optimizer, with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Adam (Kingma & Ba) with bias correction; `weight_decay` is added to the gradient (L2).
    Adam {
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Denominator guard.
        #[serde(default = "default_eps")]
        eps: f32,
        /// L2 coefficient added to the gradient.
        #[serde(default)]
        weight_decay: f32,
    },
    /// SGD with (heavy-ball) momentum: `v <- mu v + g; p <- p - lr v`.
    Sgd {
        /// Momentum coefficient `mu` in `[0, 1)`.
        #[serde(default = "default_momentum")]
        momentum: f32,
        /// Nesterov momentum.
        #[serde(default)]
        nesterov: bool,
        /// L2 coefficient added to the gradient.
        #[serde(default)]
        weight_decay: f32,
    },
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}
fn default_momentum() -> f32 {
    0.9
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Adam {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Checks the hyperparameters; errors name the field.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                ensure!(
                    (0.0..1.0).contains(&beta1),
                    "train.optimizer.beta1 must be in [0, 1), got {beta1}"
                );
                ensure!(
                    (0.0..1.0).contains(&beta2),
                    "train.optimizer.beta2 must be in [0, 1), got {beta2}"
                );
                ensure!(eps > 0.0, "train.optimizer.eps must be > 0, got {eps}");
                ensure!(
                    weight_decay >= 0.0,
                    "train.optimizer.weight_decay must be >= 0, got {weight_decay}"
                );
            }
            Self::Sgd {
                momentum,
                weight_decay,
                ..
            } => {
                ensure!(
                    (0.0..1.0).contains(&momentum),
                    "train.optimizer.momentum must be in [0, 1), got {momentum}"
                );
                ensure!(
                    weight_decay >= 0.0,
                    "train.optimizer.weight_decay must be >= 0, got {weight_decay}"
                );
            }
        }
        Ok(())
    }
}

/// Learning-rate schedule over the steps of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Cosine decay from the base rate at step 0 to 0 at the last step.
    #[default]
    Cosine,
}

impl LrSchedule {
    /// The rate at `step` (0-based) of `total` steps.
    pub fn rate(self, base: f32, step: u64, total: u64) -> f32 {
        match self {
            Self::Constant => base,
            Self::Cosine => {
                let t = step as f64 / total.max(1) as f64;
                (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())) as f32
            }
        }
    }
}

/// An optimizer with its per-parameter state.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    cfg: OptimizerConfig,
    step: u64,
    /// Adam: first moments; SGD: velocities.
    m: Vec<Vec<f32>>,
    /// Adam: second moments; SGD: unused (empty).
    v: Vec<Vec<f32>>,
}

impl Optimizer {
    /// A fresh optimizer for parameters of the given lengths.
    pub fn new(cfg: OptimizerConfig, sizes: &[usize]) -> Self {
        let zeros = || sizes.iter().map(|&n| vec![0f32; n]).collect::<Vec<_>>();
        let v = match cfg {
            OptimizerConfig::Adam { .. } => zeros(),
            OptimizerConfig::Sgd { .. } => Vec::new(),
        };
        Self {
            cfg,
            step: 0,
            m: zeros(),
            v,
        }
    }

    /// The configuration.
    pub fn config(&self) -> OptimizerConfig {
        self.cfg
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The state buffers, named, for checkpoints.
    pub fn state_buffers(&self) -> Vec<(String, &[f32])> {
        let mut out = Vec::new();
        for (i, m) in self.m.iter().enumerate() {
            out.push((format!("m.{i}"), m.as_slice()));
        }
        for (i, v) in self.v.iter().enumerate() {
            out.push((format!("v.{i}"), v.as_slice()));
        }
        out
    }

    /// Restores the state saved by [`Optimizer::state_buffers`] and [`Optimizer::steps`].
    pub fn restore(
        &mut self,
        steps: u64,
        mut get: impl FnMut(&str) -> Result<Vec<f32>>,
    ) -> Result<()> {
        for (i, m) in self.m.iter_mut().enumerate() {
            let buf = get(&format!("m.{i}"))?;
            ensure!(
                buf.len() == m.len(),
                "optimizer state m.{i} has the wrong length"
            );
            *m = buf;
        }
        for (i, v) in self.v.iter_mut().enumerate() {
            let buf = get(&format!("v.{i}"))?;
            ensure!(
                buf.len() == v.len(),
                "optimizer state v.{i} has the wrong length"
            );
            *v = buf;
        }
        self.step = steps;
        Ok(())
    }

    /// One update of every parameter `params[i] -= lr * direction(grads[i])`.
    ///
    /// Every element is updated independently with the same float operations in the same
    /// order, so the result does not depend on how the work is split: large parameters are
    /// updated in parallel chunks (rayon), and the loops are written so the compiler can
    /// vectorize them (`sqrt` and `/` are exactly rounded in SIMD too); Adam on a CPU with
    /// AVX-512F runs the vector code of [`Optimizer::update_masked`], with every value live.
    pub fn update(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f32) {
        assert_eq!(
            params.len(),
            self.m.len(),
            "optimizer: parameter count changed"
        );
        assert_eq!(
            grads.len(),
            self.m.len(),
            "optimizer: gradient count changed"
        );
        self.step += 1;
        let rule = self.rule(lr);
        let avx512 = has_avx512f();
        for (i, p) in params.iter_mut().enumerate() {
            let g = grads[i];
            check_lengths(i, p, g, &self.m[i]);
            let a = &mut self.m[i];
            let chunk = |p: &mut [f32], a: &mut [f32], b: &mut [f32], g: &[f32]| {
                plain_chunk(&rule, p, a, b, g, avx512)
            };
            match self.v.get_mut(i) {
                Some(b) => for_chunks4(p, a, b, g, chunk),
                None if p.len() < PAR_CHUNK => chunk(p, a, &mut [], g),
                None => p
                    .par_chunks_mut(PAR_CHUNK)
                    .zip(a.par_chunks_mut(PAR_CHUNK))
                    .zip(g.par_chunks(PAR_CHUNK))
                    .for_each(|((p, a), g)| chunk(p, a, &mut [], g)),
            }
        }
    }

    /// One update like [`Optimizer::update`] for parameters some of which are pruned:
    /// `live[i]`, if given, is the mask of parameter `i` seen as an `[out, in]` matrix
    /// (its rows and columns must multiply to the parameter's length). The gradient of every
    /// dead value is taken as zero (`grads` is only read) and every dead value is zero after
    /// the update.
    ///
    /// The result is bit-identical to zeroing the dead gradients, calling
    /// [`Optimizer::update`] and zeroing the dead values, but it is one pass over the memory
    /// instead of three: each mask word's values go through the update with the word's bits
    /// as lane masks (Adam on a CPU with AVX-512F or AVX2), or words with every value live
    /// run the plain loop and the others the same loop with the values ANDed with the lane
    /// masks.
    ///
    /// Panics, like [`Optimizer::update`], if the counts or lengths do not match the
    /// parameters the optimizer was made for.
    pub fn update_masked(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f32,
        live: &[Option<&BitMask>],
    ) {
        assert!(
            params.len() == self.m.len()
                && grads.len() == self.m.len()
                && live.len() == self.m.len(),
            "optimizer: parameter, gradient or mask count changed"
        );
        for (i, mask) in live.iter().enumerate() {
            if let Some(mask) = mask {
                assert_eq!(
                    mask.rows() * mask.cols(),
                    params[i].len(),
                    "optimizer: the mask of parameter {i} does not match its length"
                );
            }
        }
        self.step += 1;
        let rule = self.rule(lr);
        for (i, p) in params.iter_mut().enumerate() {
            let g = grads[i];
            check_lengths(i, p, g, &self.m[i]);
            let m = &mut self.m[i];
            let v = self.v.get_mut(i).map_or(&mut [][..], |v| v.as_mut_slice());
            masked_update(&rule, p, m, v, g, live[i]);
        }
    }

    /// The per-element rule of the next update (after `step` was counted).
    fn rule(&self, lr: f32) -> Rule {
        match self.cfg {
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let bc1 = 1.0 - (beta1 as f64).powi(self.step as i32);
                let bc2 = 1.0 - (beta2 as f64).powi(self.step as i32);
                Rule::Adam(AdamStep {
                    beta1,
                    beta2,
                    one_minus_beta1: 1.0 - beta1,
                    one_minus_beta2: 1.0 - beta2,
                    eps,
                    weight_decay,
                    step_size: (lr as f64 / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                })
            }
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => Rule::Sgd(SgdStep {
                momentum,
                nesterov,
                weight_decay,
                lr,
            }),
        }
    }
}

/// Elements per parallel task of an update (and the size under which one thread does it).
const PAR_CHUNK: usize = 1 << 15;

fn check_lengths(i: usize, p: &[f32], g: &[f32], state: &[f32]) {
    assert!(
        g.len() == p.len() && state.len() == p.len(),
        "optimizer: parameter {i} has {} values, its gradient {} and its state {}",
        p.len(),
        g.len(),
        state.len()
    );
}

/// Runs `f` over matching chunks of four equally long slices, in parallel when they are large.
fn for_chunks4(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    f: impl Fn(&mut [f32], &mut [f32], &mut [f32], &[f32]) + Sync,
) {
    if p.len() < PAR_CHUNK {
        f(p, m, v, g);
    } else {
        p.par_chunks_mut(PAR_CHUNK)
            .zip(m.par_chunks_mut(PAR_CHUNK))
            .zip(v.par_chunks_mut(PAR_CHUNK))
            .zip(g.par_chunks(PAR_CHUNK))
            .for_each(|(((p, m), v), g)| f(p, m, v, g));
    }
}

/// The constants of one Adam step.
#[derive(Debug, Clone, Copy)]
struct AdamStep {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
}

impl AdamStep {
    /// `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
    /// `p <- p - step_size m / (sqrt(v) / sqrt(bc2) + eps)` with `g` including the L2 term.
    #[inline(always)]
    fn one(&self, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        let k = *self;
        let gj = g + k.weight_decay * *p;
        *m = k.beta1 * *m + k.one_minus_beta1 * gj;
        *v = k.beta2 * *v + k.one_minus_beta2 * gj * gj;
        *p -= k.step_size * *m / (v.sqrt() * k.inv_sqrt_bc2 + k.eps);
    }

    #[inline(always)]
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            self.one(p, m, v, g);
        }
    }

    /// [`Self::apply`] on up to 32 values with the gradients and the updated values ANDed
    /// with the lane masks of `bits` (lane `b` all ones where bit `b` is set).
    #[inline(always)]
    fn apply_lanes(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], bits: u32) {
        for (b, (((p, m), v), &g)) in p
            .iter_mut()
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .zip(g)
            .enumerate()
        {
            let k = ((bits >> b) & 1).wrapping_neg();
            self.one(p, m, v, f32::from_bits(g.to_bits() & k));
            *p = f32::from_bits(p.to_bits() & k);
        }
    }

    /// [`Self::apply_lanes`] on the first `n` (at most 64) values of the slices with the lane
    /// masks of `word`, in 512-bit vectors of 16 values whose lane masks are the word's 16-bit
    /// quarters (the last quarter loaded and stored under a mask when `n` is not a multiple of
    /// 16). The same IEEE operations in the same order as [`Self::one`] (separate multiplies
    /// and adds, exact square root and division), so the same bits; written out because the
    /// compiler's version of the lane loop costs more than the unmasked update, and used for
    /// the unmasked update too (`word` all ones) so both run the same code.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; every slice must hold at least `n` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn apply_avx512(
        &self,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        n: usize,
        word: u64,
    ) {
        use std::arch::x86_64::*;
        debug_assert!(n <= 64 && p.len() >= n && m.len() >= n && v.len() >= n && g.len() >= n);
        let k = *self;
        let (b1, b2) = (_mm512_set1_ps(k.beta1), _mm512_set1_ps(k.beta2));
        let (ob1, ob2) = (
            _mm512_set1_ps(k.one_minus_beta1),
            _mm512_set1_ps(k.one_minus_beta2),
        );
        let (wd, step) = (_mm512_set1_ps(k.weight_decay), _mm512_set1_ps(k.step_size));
        let (c, eps) = (_mm512_set1_ps(k.inv_sqrt_bc2), _mm512_set1_ps(k.eps));
        let new = |pq: __m512, mq: __m512, vq: __m512, gq: __m512| {
            let gj = _mm512_add_ps(gq, _mm512_mul_ps(wd, pq));
            let mq = _mm512_add_ps(_mm512_mul_ps(b1, mq), _mm512_mul_ps(ob1, gj));
            let vq = _mm512_add_ps(
                _mm512_mul_ps(b2, vq),
                _mm512_mul_ps(_mm512_mul_ps(ob2, gj), gj),
            );
            let d = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vq), c), eps);
            (
                _mm512_sub_ps(pq, _mm512_div_ps(_mm512_mul_ps(step, mq), d)),
                mq,
                vq,
            )
        };
        for q in 0..n.div_ceil(16) {
            let live = (word >> (16 * q)) as u16;
            // SAFETY: the values 16 * q .. min(16 * q + 16, n) lie inside each slice (the
            // caller's contract); a partial quarter is loaded and stored under its mask.
            unsafe {
                let (pp, mp) = (p.as_mut_ptr().add(16 * q), m.as_mut_ptr().add(16 * q));
                let (vp, gp) = (v.as_mut_ptr().add(16 * q), g.as_ptr().add(16 * q));
                if n - 16 * q >= 16 {
                    let gq = _mm512_maskz_loadu_ps(live, gp);
                    let (pq, mq, vq) = (
                        _mm512_loadu_ps(pp),
                        _mm512_loadu_ps(mp),
                        _mm512_loadu_ps(vp),
                    );
                    let (pn, mq, vq) = new(pq, mq, vq, gq);
                    _mm512_storeu_ps(mp, mq);
                    _mm512_storeu_ps(vp, vq);
                    _mm512_storeu_ps(pp, _mm512_maskz_mov_ps(live, pn));
                } else {
                    let inside = ((1u32 << (n - 16 * q)) - 1) as u16;
                    let gq = _mm512_maskz_loadu_ps(live & inside, gp);
                    let (pq, mq, vq) = (
                        _mm512_maskz_loadu_ps(inside, pp),
                        _mm512_maskz_loadu_ps(inside, mp),
                        _mm512_maskz_loadu_ps(inside, vp),
                    );
                    let (pn, mq, vq) = new(pq, mq, vq, gq);
                    _mm512_mask_storeu_ps(mp, inside, mq);
                    _mm512_mask_storeu_ps(vp, inside, vq);
                    _mm512_mask_storeu_ps(pp, inside, _mm512_maskz_mov_ps(live, pn));
                }
            }
        }
    }

    /// [`Self::apply_lanes`] on the whole rows `row0..` of `mask` held in the slices (`p.len()`
    /// a multiple of the mask's columns), in 256-bit vectors of 8 values whose lane masks are
    /// the mask words' bytes (a row's last values, fewer than 8, through
    /// [`Self::apply_lanes`]). The same IEEE operations in the same order as [`Self::one`], so
    /// the same bits; written out because the compiler's version of the lane loop builds
    /// every lane's mask on its own, and over whole rows so that the constants are set up
    /// once per call, not once per word.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_avx2(
        &self,
        mask: &BitMask,
        row0: usize,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
    ) {
        use std::arch::x86_64::*;
        let cols = mask.cols();
        assert!(
            cols > 0
                && p.len().is_multiple_of(cols)
                && m.len() == p.len()
                && v.len() == p.len()
                && g.len() == p.len()
                && row0 + p.len() / cols <= mask.rows(),
            "whole rows of the mask, with all their state"
        );
        let k = *self;
        let (b1, b2) = (_mm256_set1_ps(k.beta1), _mm256_set1_ps(k.beta2));
        let (ob1, ob2) = (
            _mm256_set1_ps(k.one_minus_beta1),
            _mm256_set1_ps(k.one_minus_beta2),
        );
        let (wd, step) = (_mm256_set1_ps(k.weight_decay), _mm256_set1_ps(k.step_size));
        let (c, eps) = (_mm256_set1_ps(k.inv_sqrt_bc2), _mm256_set1_ps(k.eps));
        // Vector `j` of a 32-value group gets the group's bit `8 j + b` in the sign bit of its
        // lane `b` (then across the lane): the group's 32 bits are broadcast once, and each
        // vector's lane masks are one shift and one arithmetic shift.
        let shifts = [
            _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
            _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
            _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
            _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0),
        ];
        let full = cols / 8; // whole vectors per row
        for r in 0..p.len() / cols {
            let start = r * cols;
            let words = mask.row_words(row0 + r);
            for q in 0..full.div_ceil(4) {
                let group = _mm256_set1_epi32((words[q / 2] >> (32 * (q % 2))) as i32);
                for (j, shift) in shifts.iter().enumerate().take(full - 4 * q) {
                    let live = _mm256_castsi256_ps(_mm256_srai_epi32::<31>(_mm256_sllv_epi32(
                        group, *shift,
                    )));
                    // SAFETY: the values start + o .. start + o + 8 (o = 32 q + 8 j, the
                    // vector 4 q + j < full) lie inside the row (o + 8 <= cols), so inside
                    // each slice (checked above).
                    unsafe {
                        let o = start + 32 * q + 8 * j;
                        let (pp, mp) = (p.as_mut_ptr().add(o), m.as_mut_ptr().add(o));
                        let (vp, gp) = (v.as_mut_ptr().add(o), g.as_ptr().add(o));
                        let gq = _mm256_and_ps(_mm256_loadu_ps(gp), live);
                        let (pq, mq, vq) = (
                            _mm256_loadu_ps(pp),
                            _mm256_loadu_ps(mp),
                            _mm256_loadu_ps(vp),
                        );
                        let gj = _mm256_add_ps(gq, _mm256_mul_ps(wd, pq));
                        let mq = _mm256_add_ps(_mm256_mul_ps(b1, mq), _mm256_mul_ps(ob1, gj));
                        let vq = _mm256_add_ps(
                            _mm256_mul_ps(b2, vq),
                            _mm256_mul_ps(_mm256_mul_ps(ob2, gj), gj),
                        );
                        let d = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vq), c), eps);
                        let pn = _mm256_sub_ps(pq, _mm256_div_ps(_mm256_mul_ps(step, mq), d));
                        _mm256_storeu_ps(mp, mq);
                        _mm256_storeu_ps(vp, vq);
                        _mm256_storeu_ps(pp, _mm256_and_ps(pn, live));
                    }
                }
            }
            if 8 * full < cols {
                let t = start + 8 * full..start + cols;
                let bits = (words[full / 8] >> (8 * (full % 8))) as u32;
                self.apply_lanes(
                    &mut p[t.clone()],
                    &mut m[t.clone()],
                    &mut v[t.clone()],
                    &g[t],
                    bits,
                );
            }
        }
    }

    /// [`Self::apply_avx512`] on `range` (at most 64 values) of the slices.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn word_avx512(
        &self,
        range: Range<usize>,
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        word: u64,
    ) {
        let n = range.len();
        assert!(n <= 64, "a word holds at most 64 values");
        // SAFETY: the CPU has AVX-512F (the caller's contract); the ranges' bounds are
        // checked by the slicing.
        unsafe {
            self.apply_avx512(
                &mut p[range.clone()],
                &mut m[range.clone()],
                &mut v[range.clone()],
                &g[range],
                n,
                word,
            )
        }
    }
}

/// The constants of one SGD step.
#[derive(Debug, Clone, Copy)]
struct SgdStep {
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
    lr: f32,
}

impl SgdStep {
    /// `vel <- momentum vel + g`, `p <- p - lr (g + momentum vel)` (Nesterov) or
    /// `p <- p - lr vel`, with `g` including the L2 term.
    #[inline(always)]
    fn one(&self, p: &mut f32, vel: &mut f32, g: f32) {
        let gj = g + self.weight_decay * *p;
        *vel = self.momentum * *vel + gj;
        let d = if self.nesterov {
            gj + self.momentum * *vel
        } else {
            *vel
        };
        *p -= self.lr * d;
    }

    #[inline(always)]
    fn apply(&self, p: &mut [f32], vel: &mut [f32], g: &[f32]) {
        for ((p, vel), &g) in p.iter_mut().zip(vel.iter_mut()).zip(g) {
            self.one(p, vel, g);
        }
    }

    /// [`Self::apply`] on up to 32 values with the gradients and the updated values ANDed
    /// with the lane masks of `bits`.
    #[inline(always)]
    fn apply_lanes(&self, p: &mut [f32], vel: &mut [f32], g: &[f32], bits: u32) {
        for (b, ((p, vel), &g)) in p.iter_mut().zip(vel.iter_mut()).zip(g).enumerate() {
            let k = ((bits >> b) & 1).wrapping_neg();
            self.one(p, vel, f32::from_bits(g.to_bits() & k));
            *p = f32::from_bits(p.to_bits() & k);
        }
    }
}

/// The per-element rule of one update.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Adam(AdamStep),
    Sgd(SgdStep),
}

impl Rule {
    /// The update of `p[range]` with its state (`b` is empty for SGD), every value live
    /// (Adam's in runs of up to 64 values through the AVX-512 code of the masked update if
    /// `avx512`, which says the CPU has it, so that masked and unmasked updates run the same
    /// code).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn plain(
        &self,
        r: Range<usize>,
        p: &mut [f32],
        a: &mut [f32],
        b: &mut [f32],
        g: &[f32],
        avx512: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if let (Rule::Adam(k), true) = (self, avx512) {
            for lo in r.clone().step_by(64) {
                // SAFETY: `avx512` says the CPU has AVX-512F.
                unsafe { k.word_avx512(lo..(lo + 64).min(r.end), p, a, b, g, u64::MAX) };
            }
            return;
        }
        let _ = avx512;
        match self {
            Rule::Adam(k) => k.apply(
                &mut p[r.clone()],
                &mut a[r.clone()],
                &mut b[r.clone()],
                &g[r],
            ),
            Rule::Sgd(k) => k.apply(&mut p[r.clone()], &mut a[r.clone()], &g[r]),
        }
    }

    /// The update of `p[range]` (at most 64 values) with the gradients and values ANDed with
    /// the lane masks of the mask word `word`, in halves of 32 lanes (each lane's mask
    /// computed from its bit in the vector loop). Adam on AVX-512 CPUs takes
    /// [`AdamStep::apply_avx512`] instead, on AVX2 CPUs [`AdamStep::rows_avx2`] (see
    /// `masked_rows`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn lanes(
        &self,
        range: Range<usize>,
        p: &mut [f32],
        a: &mut [f32],
        b: &mut [f32],
        g: &[f32],
        word: u64,
    ) {
        let (start, n) = (range.start, range.len());
        for h in 0..n.div_ceil(32) {
            let r = start + 32 * h..start + (32 * h + 32).min(n);
            let bits = (word >> (32 * h)) as u32;
            match self {
                Rule::Adam(k) => k.apply_lanes(
                    &mut p[r.clone()],
                    &mut a[r.clone()],
                    &mut b[r.clone()],
                    &g[r],
                    bits,
                ),
                Rule::Sgd(k) => k.apply_lanes(&mut p[r.clone()], &mut a[r.clone()], &g[r], bits),
            }
        }
    }
}

/// One masked update of a parameter (`mask` over its `[rows, cols]` layout; none: every
/// value live): row-aligned chunks of about [`PAR_CHUNK`] values in
/// parallel when the parameter is large.
fn masked_update(
    rule: &Rule,
    p: &mut [f32],
    a: &mut [f32],
    b: &mut [f32],
    g: &[f32],
    mask: Option<&BitMask>,
) {
    let cols = mask.map_or(1, |m| m.cols().max(1));
    let rows_per_task = (PAR_CHUNK / cols).max(1);
    let (avx512, avx2) = (has_avx512f(), has_avx2());
    if p.len() <= rows_per_task * cols {
        return masked_rows(rule, mask, 0, p, a, b, g, avx512, avx2);
    }
    let len = rows_per_task * cols;
    let mut tasks = Vec::with_capacity(p.len().div_ceil(len));
    let (mut p, mut a, mut b, mut g) = (p, a, b, g);
    let mut row0 = 0;
    while !p.is_empty() {
        let n = len.min(p.len());
        let (p0, p1) = p.split_at_mut(n);
        let (a0, a1) = a.split_at_mut(n);
        let (b0, b1) = if b.is_empty() {
            (&mut [][..], b)
        } else {
            b.split_at_mut(n)
        };
        let (g0, g1) = g.split_at(n);
        tasks.push((row0, p0, a0, b0, g0));
        (p, a, b, g) = (p1, a1, b1, g1);
        row0 += rows_per_task;
    }
    tasks
        .into_par_iter()
        .for_each(|(row0, p, a, b, g)| masked_rows(rule, mask, row0, p, a, b, g, avx512, avx2));
}

/// Whether the CPU has AVX2 (for [`AdamStep::rows_avx2`]).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F (for [`AdamStep::apply_avx512`]).
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

bb_actuators::multiversion! {
    /// The masked update of whole rows `row0..` held in `p` (and the matching state): Adam on
    /// a CPU with AVX-512F (`avx512`) takes every word through [`AdamStep::apply_avx512`],
    /// on one with AVX2 (`avx2`) every row through [`AdamStep::rows_avx2`]; otherwise runs of
    /// mask words with every value live take the plain loop and the other words the lane
    /// loop.
    #[allow(clippy::too_many_arguments)]
    fn masked_rows(
        rule: &Rule,
        mask: Option<&BitMask>,
        row0: usize,
        p: &mut [f32],
        a: &mut [f32],
        b: &mut [f32],
        g: &[f32],
        avx512: bool,
        avx2: bool,
    ) {
        let Some(mask) = mask else {
            return rule.plain(0..p.len(), p, a, b, g, avx512);
        };
        let cols = mask.cols();
        if cols == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Rule::Adam(k), true) = (rule, avx512) {
            // Every word through the vector update, live or not: a word's lane masks cost
            // nothing there, and one loop without a branch per word is faster than switching
            // between it and the plain loop.
            for r in 0..p.len() / cols {
                let start = r * cols;
                for (wi, &w) in mask.row_words(row0 + r).iter().enumerate() {
                    let lo = start + wi * 64;
                    // SAFETY: `avx512` says the CPU has AVX-512F.
                    unsafe { k.word_avx512(lo..(lo + 64).min(start + cols), p, a, b, g, w) };
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Rule::Adam(k), true) = (rule, avx2) {
            // Every word through the vector update here too, in one call per task.
            // SAFETY: `avx2` says the CPU has AVX2.
            return unsafe { k.rows_avx2(mask, row0, p, a, b, g) };
        }
        let _ = avx2;
        let mut run = 0; // start of the pending run of live values
        for r in 0..p.len() / cols {
            let start = r * cols;
            for (wi, &w) in mask.row_words(row0 + r).iter().enumerate() {
                let n = (cols - wi * 64).min(64);
                let valid = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                if w == valid {
                    continue;
                }
                let lo = start + wi * 64;
                if run < lo {
                    rule.plain(run..lo, p, a, b, g, avx512);
                }
                run = lo + n;
                rule.lanes(lo..lo + n, p, a, b, g, w);
            }
        }
        if run < p.len() {
            rule.plain(run..p.len(), p, a, b, g, avx512);
        }
    }
}

bb_actuators::multiversion! {
    /// [`Rule::plain`] over whole slices (`b` empty for SGD).
    fn plain_chunk(
        rule: &Rule,
        p: &mut [f32],
        a: &mut [f32],
        b: &mut [f32],
        g: &[f32],
        avx512: bool,
    ) {
        rule.plain(0..p.len(), p, a, b, g, avx512);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, Adam's first step is lr * g / (|g| + eps') = lr * sign(g).
        let mut opt = Optimizer::new(OptimizerConfig::default(), &[3]);
        let mut p = vec![1.0f32, 1.0, 1.0];
        opt.update(&mut [&mut p], &[&[0.5, -2.0, 0.0]], 0.1);
        assert!((p[0] - 0.9).abs() < 1e-6, "{p:?}");
        assert!((p[1] - 1.1).abs() < 1e-6, "{p:?}");
        assert_eq!(p[2], 1.0);
    }

    #[test]
    fn sgd_momentum_accumulates_velocity() {
        let cfg = OptimizerConfig::Sgd {
            momentum: 0.5,
            nesterov: false,
            weight_decay: 0.0,
        };
        let mut opt = Optimizer::new(cfg, &[1]);
        let mut p = vec![0.0f32];
        opt.update(&mut [&mut p], &[&[1.0]], 1.0); // v = 1, p = -1
        opt.update(&mut [&mut p], &[&[1.0]], 1.0); // v = 1.5, p = -2.5
        assert_eq!(p[0], -2.5);
    }

    #[test]
    fn cosine_schedule_runs_from_base_to_zero() {
        let s = LrSchedule::Cosine;
        assert_eq!(s.rate(0.1, 0, 100), 0.1);
        assert!((s.rate(0.1, 50, 100) - 0.05).abs() < 1e-7);
        assert!(s.rate(0.1, 100, 100).abs() < 1e-9);
        assert_eq!(LrSchedule::Constant.rate(0.1, 77, 100), 0.1);
    }

    #[test]
    fn bad_hyperparameters_name_the_field() {
        let cfg = OptimizerConfig::Sgd {
            momentum: 1.5,
            nesterov: false,
            weight_decay: 0.0,
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("momentum"), "{e}");
    }

    /// The vector code of `update` and `update_masked` gives, bit for bit, the scalar rule of
    /// one value at a time: lengths with whole words, partial 16-value quarters, a lone value
    /// and parallel chunks; masks with dead values and every value live. The portable masked
    /// loop (CPUs without AVX2 or AVX-512F) and, where the CPU has AVX2, the AVX2 rows are
    /// run too and give the same.
    #[test]
    fn vector_updates_equal_the_scalar_rule() {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let cfg = OptimizerConfig::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-3,
        };
        let shapes = [(1, 1), (3, 7), (5, 64), (4, 100), (2, 199), (40, 2000)];
        let sizes: Vec<usize> = shapes.iter().map(|&(a, b)| a * b).collect();
        let masks: Vec<BitMask> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(rows, cols))| {
                let mut m = BitMask::full(rows, cols);
                for row in 0..rows {
                    for c in 0..cols {
                        m.set(row, c, i % 2 == 0 || r.gen_bool(0.6));
                    }
                }
                m
            })
            .collect();
        let mut opt = Optimizer::new(cfg, &sizes);
        let mut masked = Optimizer::new(cfg, &sizes);
        let mut scalar = Optimizer::new(cfg, &sizes);
        let mut scalar_masked = Optimizer::new(cfg, &sizes);
        let mut p: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| (0..n).map(|_| r.gen_range(-1.0..1.0)).collect())
            .collect();
        let (mut pm, mut ps, mut psm) = (p.clone(), p.clone(), p.clone());
        // the portable loops, and the AVX2 loop where the CPU has it (whatever
        // `update_masked` picks on this CPU)
        let sets: Vec<(bool, bool)> = [(false, false), (false, true)]
            .into_iter()
            .filter(|&(_, avx2)| !avx2 || has_avx2())
            .collect();
        let mut pq = vec![p.clone(); sets.len()];
        let mut portable = vec![Optimizer::new(cfg, &sizes); sets.len()];
        for step in 0..3 {
            let grads: Vec<Vec<f32>> = sizes
                .iter()
                .map(|&n| (0..n).map(|_| r.gen_range(-1.0..1.0)).collect())
                .collect();
            let gs: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
            let mut refs: Vec<&mut [f32]> = p.iter_mut().map(|v| v.as_mut_slice()).collect();
            opt.update(&mut refs, &gs, 0.01);
            let live: Vec<Option<&BitMask>> = masks.iter().map(Some).collect();
            let mut refs: Vec<&mut [f32]> = pm.iter_mut().map(|v| v.as_mut_slice()).collect();
            masked.update_masked(&mut refs, &gs, 0.01, &live);
            for ((opt, pq), &(avx512, avx2)) in portable.iter_mut().zip(&mut pq).zip(&sets) {
                opt.step += 1;
                let rule = opt.rule(0.01);
                for l in 0..sizes.len() {
                    let (m, v) = (&mut opt.m[l], &mut opt.v[l]);
                    let (p, g) = (&mut pq[l], &grads[l]);
                    masked_rows(&rule, Some(&masks[l]), 0, p, m, v, g, avx512, avx2);
                }
            }
            // the scalar rule, and the scalar rule with dead gradients and values zeroed
            scalar.step += 1;
            scalar_masked.step += 1;
            let Rule::Adam(k) = scalar.rule(0.01) else {
                unreachable!("Adam")
            };
            for l in 0..sizes.len() {
                let cols = masks[l].cols();
                for j in 0..sizes[l] {
                    let (m, v) = (&mut scalar.m[l][j], &mut scalar.v[l][j]);
                    k.one(&mut ps[l][j], m, v, grads[l][j]);
                    let live = masks[l].get(j / cols, j % cols);
                    let (m, v) = (&mut scalar_masked.m[l][j], &mut scalar_masked.v[l][j]);
                    k.one(&mut psm[l][j], m, v, if live { grads[l][j] } else { 0.0 });
                    if !live {
                        psm[l][j] = 0.0;
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p[l]), bits(&ps[l]), "step {step} parameter {l}");
                assert_eq!(
                    bits(&pm[l]),
                    bits(&psm[l]),
                    "masked: step {step} parameter {l}"
                );
                for (pq, set) in pq.iter().zip(&sets) {
                    assert_eq!(
                        bits(&pq[l]),
                        bits(&psm[l]),
                        "{set:?}: step {step} parameter {l}"
                    );
                }
            }
            assert_eq!(opt.state_buffers(), scalar.state_buffers(), "step {step}");
            assert_eq!(
                masked.state_buffers(),
                scalar_masked.state_buffers(),
                "masked: step {step}"
            );
            for (opt, set) in portable.iter().zip(&sets) {
                assert_eq!(
                    opt.state_buffers(),
                    scalar_masked.state_buffers(),
                    "{set:?}: step {step}"
                );
            }
        }
    }

    /// `update_masked` gives bit for bit what zeroing the dead gradients, `update` and
    /// zeroing the dead values give, for Adam (with weight decay) and SGD (with Nesterov),
    /// on a parameter large enough to be split over tasks, one whose rows end inside a mask
    /// word, and an unmasked bias.
    #[test]
    fn masked_update_matches_mask_update_mask() {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let configs = [
            OptimizerConfig::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-3,
            },
            OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-3,
            },
        ];
        let shapes = [(300, 300), (7, 77), (1, 13)];
        for cfg in configs {
            let masks: Vec<BitMask> = shapes
                .iter()
                .map(|&(rows, cols)| {
                    let mut m = BitMask::full(rows, cols);
                    for row in 0..rows {
                        // whole live words, whole dead words and mixed ones
                        let p = [1.0, 0.0, 0.5][row % 3];
                        for c in 0..cols {
                            m.set(row, c, r.gen_bool(p));
                        }
                    }
                    m
                })
                .collect();
            let sizes: Vec<usize> = shapes.iter().map(|&(a, b)| a * b).collect();
            let mut fused = Optimizer::new(cfg, &sizes);
            let mut plain = Optimizer::new(cfg, &sizes);
            let mut pf: Vec<Vec<f32>> = sizes
                .iter()
                .map(|&n| (0..n).map(|_| r.gen_range(-1.0..1.0)).collect())
                .collect();
            let mut pp = pf.clone();
            for step in 0..4 {
                let grads: Vec<Vec<f32>> = sizes
                    .iter()
                    .map(|&n| (0..n).map(|_| r.gen_range(-1.0..1.0)).collect())
                    .collect();
                // the last parameter stays unmasked
                let live: Vec<Option<&BitMask>> = vec![Some(&masks[0]), Some(&masks[1]), None];
                {
                    let mut ps: Vec<&mut [f32]> = pf.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let gs: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
                    fused.update_masked(&mut ps, &gs, 0.01, &live);
                }
                let mut gp = grads.clone();
                let zero = |buf: &mut [f32], m: &BitMask| {
                    for (j, x) in buf.iter_mut().enumerate() {
                        if !m.get(j / m.cols(), j % m.cols()) {
                            *x = 0.0;
                        }
                    }
                };
                for l in 0..2 {
                    zero(&mut gp[l], &masks[l]);
                }
                {
                    let mut ps: Vec<&mut [f32]> = pp.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let gs: Vec<&[f32]> = gp.iter().map(|v| v.as_slice()).collect();
                    plain.update(&mut ps, &gs, 0.01);
                }
                for l in 0..2 {
                    zero(&mut pp[l], &masks[l]);
                }
                for l in 0..3 {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&pf[l]),
                        bits(&pp[l]),
                        "{cfg:?} step {step} parameter {l}"
                    );
                }
            }
            assert_eq!(fused.state_buffers(), plain.state_buffers(), "{cfg:?}");
        }
    }
}
