//! Baselines at the same schedule and matched density: dense, random, magnitude, GMP,
//! RigL and SET.

use super::{
    check_density, edge_target, BudgetPolicy, LayerDecision, LayerPlan, LayerView, PolicyContext,
};
use crate::BbError;
use bb_actuators::{key_of, threshold_key, BitMask, Side, NOT_A_CANDIDATE};
use rand::seq::index::sample;
use serde::{Deserialize, Serialize};

fn keep(target: Option<f64>) -> LayerDecision {
    LayerDecision {
        plan: LayerPlan::Keep,
        target_density: target,
    }
}

fn new_mask(mask: BitMask, grow_from_zero: bool, target: f64) -> LayerDecision {
    LayerDecision {
        plan: LayerPlan::Mask {
            mask,
            grow_from_zero,
        },
        target_density: Some(target),
    }
}

/// The mask holding the `n` best edges of `v` by `key(edge)` (0 = never), ties toward the
/// lower edge index.
fn top_edges(v: &LayerView<'_>, n: usize, key: impl Fn(usize) -> u64) -> BitMask {
    let mut keys: Vec<u64> = (0..v.edges()).map(&key).collect();
    let thr = threshold_key(&mut keys, n);
    mask_where(v, |e| key(e) >= thr)
}

fn mask_where(v: &LayerView<'_>, pred: impl Fn(usize) -> bool) -> BitMask {
    let (rows, cols) = (v.shape.out, v.shape.inp);
    let mut m = BitMask::empty(rows, cols);
    for r in 0..rows {
        for c in 0..cols {
            if pred(r * cols + c) {
                m.set(r, c, true);
            }
        }
    }
    m
}

fn is_live(v: &LayerView<'_>, e: usize) -> bool {
    v.mask.get(e / v.shape.inp, e % v.shape.inp)
}

/// Keeps every edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dense {}

#[typetag::serde(name = "dense")]
impl BudgetPolicy for Dense {
    fn validate(&self) -> Result<(), BbError> {
        Ok(())
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        Ok(ctx.layers.iter().map(|_| keep(Some(1.0))).collect())
    }
}

/// A random mask with exactly `round(target_density * edges)` live edges per layer, drawn
/// once (at the first refresh, from the pruner's seeded generator) and then kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomMask {
    /// Density of the mask.
    pub target_density: f64,
    /// Set once the mask has been drawn (saved with the pruner state).
    #[serde(default)]
    pub drawn: bool,
}

#[typetag::serde(name = "random")]
impl BudgetPolicy for RandomMask {
    fn validate(&self) -> Result<(), BbError> {
        check_density("policy.target_density", self.target_density)
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        if self.drawn {
            return Ok(ctx
                .layers
                .iter()
                .map(|_| keep(Some(self.target_density)))
                .collect());
        }
        self.drawn = true;
        let mut out = Vec::with_capacity(ctx.layers.len());
        for v in &ctx.layers {
            let n = edge_target(self.target_density, v.edges());
            let picked = sample(&mut *ctx.rng, v.edges(), n);
            let mut m = BitMask::empty(v.shape.out, v.shape.inp);
            for e in picked.iter() {
                m.set(e / v.shape.inp, e % v.shape.inp, true);
            }
            out.push(new_mask(m, false, self.target_density));
        }
        Ok(out)
    }
}

/// Where magnitude pruning ranks weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MagnitudeScope {
    /// Per row (the reference baseline): the layer's edge count is split over rows, the last
    /// edges to the lower rows.
    #[default]
    Rowwise,
    /// Over the whole layer.
    Layer,
    /// Over all pruned layers together.
    Global,
}

fn magnitude_plans(
    ctx: &PolicyContext<'_>,
    density: f64,
    scope: MagnitudeScope,
    prune_only: bool,
) -> Vec<LayerDecision> {
    let cand = |v: &LayerView<'_>, e: usize| !prune_only || is_live(v, e);
    match scope {
        MagnitudeScope::Rowwise => ctx
            .layers
            .iter()
            .map(|v| {
                let n = edge_target(density, v.edges());
                let (rows, base, extra) = (v.shape.out, n / v.shape.out, n % v.shape.out);
                let targets = (0..rows)
                    .map(|r| (base + usize::from(r < extra)) as u32)
                    .collect();
                LayerDecision {
                    plan: LayerPlan::Degrees {
                        side: Side::Rows,
                        targets,
                        prune_only,
                    },
                    target_density: Some(density),
                }
            })
            .collect(),
        MagnitudeScope::Layer => ctx
            .layers
            .iter()
            .map(|v| {
                let n = edge_target(density, v.edges());
                let m = top_edges(v, n, |e| {
                    if cand(v, e) {
                        key_of(v.scores[e], e)
                    } else {
                        NOT_A_CANDIDATE
                    }
                });
                new_mask(m, false, density)
            })
            .collect(),
        MagnitudeScope::Global => {
            let offsets: Vec<usize> = ctx
                .layers
                .iter()
                .scan(0, |acc, v| {
                    let o = *acc;
                    *acc += v.edges();
                    Some(o)
                })
                .collect();
            let total: usize = ctx.layers.iter().map(|v| v.edges()).sum();
            let mut keys = Vec::with_capacity(total);
            for (v, &o) in ctx.layers.iter().zip(&offsets) {
                keys.extend((0..v.edges()).map(|e| {
                    if cand(v, e) {
                        key_of(v.scores[e], o + e)
                    } else {
                        NOT_A_CANDIDATE
                    }
                }));
            }
            let thr = threshold_key(&mut keys, edge_target(density, total));
            ctx.layers
                .iter()
                .zip(&offsets)
                .map(|(v, &o)| {
                    let m = mask_where(v, |e| cand(v, e) && key_of(v.scores[e], o + e) >= thr);
                    new_mask(m, false, density)
                })
                .collect()
        }
    }
}

fn d_true() -> bool {
    true
}

/// Magnitude pruning: keep the largest `|W|` (kernel-summed) at `target_density`, per row,
/// per layer or globally. Prune-only by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Magnitude {
    /// Density to keep.
    pub target_density: f64,
    /// Ranking scope (default `rowwise`).
    #[serde(default)]
    pub scope: MagnitudeScope,
    /// Never bring back a pruned edge (default true).
    #[serde(default = "d_true")]
    pub prune_only: bool,
}

#[typetag::serde(name = "magnitude")]
impl BudgetPolicy for Magnitude {
    fn validate(&self) -> Result<(), BbError> {
        check_density("policy.target_density", self.target_density)
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        Ok(magnitude_plans(
            ctx,
            self.target_density,
            self.scope,
            self.prune_only,
        ))
    }
}

fn d_initial_density() -> f64 {
    1.0
}

fn resolve_end(end: Option<u64>, total: Option<u64>, field: &str) -> Result<u64, BbError> {
    end.or_else(|| total.map(|t| t * 3 / 4))
        .ok_or_else(|| BbError::config(field, "not set and schedule.total_steps is unknown"))
}

/// Gradual magnitude pruning (Zhu & Gupta): sparsity
/// `s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3` between `start_step` and
/// `end_step`, magnitude selection (prune-only) at every refresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gmp {
    /// Final density `1 - s_f`.
    pub target_density: f64,
    /// Density at `start_step`, `1 - s_i` (default 1).
    #[serde(default = "d_initial_density")]
    pub initial_density: f64,
    /// `t0` (default: the end of the warm-up).
    #[serde(default)]
    pub start_step: Option<u64>,
    /// `t1` (default: 75 % of `schedule.total_steps`).
    #[serde(default)]
    pub end_step: Option<u64>,
    /// Ranking scope (default `layer`).
    #[serde(default = "layer_scope")]
    pub scope: MagnitudeScope,
}

fn layer_scope() -> MagnitudeScope {
    MagnitudeScope::Layer
}

impl Gmp {
    /// Density at step `t`.
    pub fn density_at(&self, t: u64, t0: u64, t1: u64) -> f64 {
        let (di, df) = (self.initial_density, self.target_density);
        if t <= t0 {
            return di;
        }
        if t >= t1 {
            return df;
        }
        // 1 - s_t with s = 1 - density: d_f + (d_i - d_f) (1 - p)^3.
        let p = (t - t0) as f64 / (t1 - t0) as f64;
        df + (di - df) * (1.0 - p).powi(3)
    }
}

#[typetag::serde(name = "gmp")]
impl BudgetPolicy for Gmp {
    fn validate(&self) -> Result<(), BbError> {
        check_density("policy.target_density", self.target_density)?;
        check_density("policy.initial_density", self.initial_density)?;
        if let (Some(a), Some(b)) = (self.start_step, self.end_step) {
            if b <= a {
                return Err(BbError::config(
                    "policy.end_step",
                    format!("must exceed start_step {a}, got {b}"),
                ));
            }
        }
        Ok(())
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        let t0 = self.start_step.unwrap_or(ctx.warmup);
        let t1 = resolve_end(self.end_step, ctx.total_steps, "policy.end_step")?.max(t0 + 1);
        let d = self.density_at(ctx.step, t0, t1);
        Ok(magnitude_plans(ctx, d, self.scope, true))
    }
}

fn d_alpha() -> f64 {
    0.3
}

/// How RigL and SET reach their density at the first refresh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiglInit {
    /// Keep the largest weights of each layer.
    #[default]
    Magnitude,
    /// A random mask.
    Random,
}

/// Shared drop-and-grow machinery of RigL and SET.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropGrow {
    /// Density kept throughout.
    pub target_density: f64,
    /// Initial drop fraction `alpha` (default 0.3).
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// `T_end`: no more updates after it (default 75 % of `schedule.total_steps`).
    #[serde(default)]
    pub end_step: Option<u64>,
    /// First-refresh mask (default `magnitude`).
    #[serde(default)]
    pub init: RiglInit,
    /// Set once the initial mask is in place.
    #[serde(default)]
    pub initialized: bool,
}

impl DropGrow {
    fn check(&self) -> Result<(), BbError> {
        check_density("policy.target_density", self.target_density)?;
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(BbError::config(
                "policy.alpha",
                format!("must be in (0, 1], got {}", self.alpha),
            ));
        }
        Ok(())
    }

    /// `alpha_t = alpha / 2 * (1 + cos(pi t / T_end))`.
    pub fn drop_fraction(&self, t: u64, t_end: u64) -> f64 {
        self.alpha / 2.0 * (1.0 + (std::f64::consts::PI * t as f64 / t_end as f64).cos())
    }

    fn run(
        &mut self,
        ctx: &mut PolicyContext<'_>,
        by_gradient: bool,
    ) -> Result<Vec<LayerDecision>, BbError> {
        let dens = self.target_density;
        if !self.initialized {
            self.initialized = true;
            return match self.init {
                RiglInit::Magnitude => Ok(magnitude_plans(ctx, dens, MagnitudeScope::Layer, false)),
                RiglInit::Random => RandomMask {
                    target_density: dens,
                    drawn: false,
                }
                .plan(ctx),
            };
        }
        let t_end = resolve_end(self.end_step, ctx.total_steps, "policy.end_step")?;
        if ctx.step >= t_end {
            return Ok(ctx.layers.iter().map(|_| keep(Some(dens))).collect());
        }
        let frac = self.drop_fraction(ctx.step, t_end);
        let mut out = Vec::with_capacity(ctx.layers.len());
        for v in &ctx.layers {
            let live = v.mask.count();
            let dead = v.edges() - live;
            let n_drop = (crate::round_half_away(frac * live as f64) as usize).min(dead);
            // Keep the strongest (live - n_drop) live edges.
            let mut m = top_edges(v, live - n_drop, |e| {
                if is_live(v, e) {
                    key_of(v.scores[e], e)
                } else {
                    NOT_A_CANDIDATE
                }
            });
            // Grow n_drop edges among those dead before this refresh.
            if by_gradient {
                let g = v.grads.ok_or_else(|| {
                    BbError::layer(v.name, "policy rigl needs gradients: pass them to Pruner::step when Pruner::needs_gradients() is true")
                })?;
                let grow = top_edges(v, n_drop, |e| {
                    if is_live(v, e) {
                        NOT_A_CANDIDATE
                    } else {
                        key_of(g[e], e)
                    }
                });
                for r in 0..v.shape.out {
                    for (a, b) in m.row_words_mut(r).iter_mut().zip(grow.row_words(r)) {
                        *a |= b;
                    }
                }
            } else {
                let dead_edges: Vec<usize> = (0..v.edges()).filter(|&e| !is_live(v, e)).collect();
                for i in sample(&mut *ctx.rng, dead_edges.len(), n_drop).iter() {
                    let e = dead_edges[i];
                    m.set(e / v.shape.inp, e % v.shape.inp, true);
                }
            }
            out.push(new_mask(m, true, dens));
        }
        Ok(out)
    }
}

/// RigL: at each refresh drop the fraction `alpha_t` of live weights with the smallest
/// `|W|` and grow as many dead edges with the largest dense gradient `|dL/dW|`; grown
/// weights start at zero. The first refresh brings each layer to `target_density`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rigl(pub DropGrow);

#[typetag::serde(name = "rigl")]
impl BudgetPolicy for Rigl {
    fn validate(&self) -> Result<(), BbError> {
        self.0.check()
    }

    fn needs_gradients(&self) -> bool {
        true
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        self.0.run(ctx, true)
    }
}

/// SET: as RigL, but the grown edges are drawn at random among the dead ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Set(pub DropGrow);

#[typetag::serde(name = "set")]
impl BudgetPolicy for Set {
    fn validate(&self) -> Result<(), BbError> {
        self.0.check()
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        self.0.run(ctx, false)
    }
}
