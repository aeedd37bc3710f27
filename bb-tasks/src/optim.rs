//! Optimizers over host parameter slices: Adam and SGD with momentum, and learning-rate schedules.
//!
//! dfdx's own optimizers need a `TensorCollection`, which runtime-shaped parameters cannot be;
//! these work on the host master copies of the parameters instead. Their state is a list of
//! `f32` buffers (one or two per parameter) so checkpoints can store it exactly.

use anyhow::{ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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
    /// vectorize them (`sqrt` and `/` are exactly rounded in SIMD too).
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
        match self.cfg {
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let bc1 = 1.0 - (beta1 as f64).powi(self.step as i32);
                let bc2 = 1.0 - (beta2 as f64).powi(self.step as i32);
                let k = AdamStep {
                    beta1,
                    beta2,
                    one_minus_beta1: 1.0 - beta1,
                    one_minus_beta2: 1.0 - beta2,
                    eps,
                    weight_decay,
                    step_size: (lr as f64 / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                };
                for (i, p) in params.iter_mut().enumerate() {
                    let (m, v, g) = (&mut self.m[i], &mut self.v[i], grads[i]);
                    check_lengths(i, p, g, m);
                    for_chunks4(p, m, v, g, |p, m, v, g| k.apply(p, m, v, g));
                }
            }
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                for (i, p) in params.iter_mut().enumerate() {
                    let (vel, g) = (&mut self.m[i], grads[i]);
                    check_lengths(i, p, g, vel);
                    let apply = |p: &mut [f32], vel: &mut [f32], g: &[f32]| {
                        for ((p, vel), &g) in p.iter_mut().zip(vel.iter_mut()).zip(g) {
                            let gj = g + weight_decay * *p;
                            *vel = momentum * *vel + gj;
                            let d = if nesterov { gj + momentum * *vel } else { *vel };
                            *p -= lr * d;
                        }
                    };
                    if p.len() < PAR_CHUNK {
                        apply(p, vel, g);
                    } else {
                        p.par_chunks_mut(PAR_CHUNK)
                            .zip(vel.par_chunks_mut(PAR_CHUNK))
                            .zip(g.par_chunks(PAR_CHUNK))
                            .for_each(|((p, vel), g)| apply(p, vel, g));
                    }
                }
            }
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
    #[inline]
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let k = *self;
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let gj = g + k.weight_decay * *p;
            *m = k.beta1 * *m + k.one_minus_beta1 * gj;
            *v = k.beta2 * *v + k.one_minus_beta2 * gj * gj;
            *p -= k.step_size * *m / (v.sqrt() * k.inv_sqrt_bc2 + k.eps);
        }
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
}
