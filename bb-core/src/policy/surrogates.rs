//! The reference implementation's surrogates of the balance rule (for parity runs) and the
//! activity-only ablation.

use super::{
    check_density, check_k_min, edge_target, BudgetPolicy, LayerDecision, LayerPlan, PolicyContext,
};
use crate::{round_half_away, BbError, EPS};
use bb_actuators::{EdgeShape, Side};
use serde::{Deserialize, Serialize};

fn check_unit(field: &str, x: f64) -> Result<(), BbError> {
    if !(0.0..=1.0).contains(&x) {
        return Err(BbError::config(
            field,
            format!("must be in [0, 1], got {x}"),
        ));
    }
    Ok(())
}

fn degrees(v: &super::LayerView<'_>, targets: Vec<u32>, prune_only: bool) -> LayerDecision {
    LayerDecision {
        plan: LayerPlan::Degrees {
            side: v.side,
            targets,
            prune_only,
        },
        target_density: None,
    }
}

fn d_tau_high() -> f64 {
    0.7
}
fn d_tau_low() -> f64 {
    0.1
}
fn d_half() -> f64 {
    0.5
}
fn d_rare() -> f64 {
    0.9
}
fn d_min_keep() -> u32 {
    8
}
fn d_one() -> u32 {
    1
}
fn d_q_busy() -> f64 {
    0.7
}
fn d_q_rare() -> f64 {
    0.3
}
fn d_true() -> bool {
    true
}

/// Units with `a > tau_high` keep `round(D * dens_frequent)`, units with `a < tau_low` keep
/// `round(D * dens_rare)`, the others keep their degree; never below `min(min_keep, D)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwoThreshold {
    /// Busy threshold (default 0.7).
    #[serde(default = "d_tau_high")]
    pub tau_high: f64,
    /// Rare threshold (default 0.1).
    #[serde(default = "d_tau_low")]
    pub tau_low: f64,
    /// Density kept by busy units (default 0.5).
    #[serde(default = "d_half")]
    pub dens_frequent: f64,
    /// Density kept by rare units (default 0.9).
    #[serde(default = "d_rare")]
    pub dens_rare: f64,
    /// Degree floor (default 8).
    #[serde(default = "d_min_keep")]
    pub min_keep: u32,
}

#[typetag::serde(name = "two_threshold")]
impl BudgetPolicy for TwoThreshold {
    fn validate(&self) -> Result<(), BbError> {
        check_unit("policy.tau_high", self.tau_high)?;
        check_unit("policy.tau_low", self.tau_low)?;
        if self.tau_low > self.tau_high {
            return Err(BbError::config(
                "policy.tau_low",
                "must not exceed tau_high",
            ));
        }
        check_density("policy.dens_frequent", self.dens_frequent)?;
        check_density("policy.dens_rare", self.dens_rare)
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        ctx.layers
            .iter()
            .map(|v| {
                let d = v.slab_len() as f64;
                let floor = self.min_keep.min(v.slab_len() as u32);
                let t = v
                    .activity()?
                    .iter()
                    .zip(v.degrees)
                    .map(|(&a, &k)| {
                        let t = if a > self.tau_high {
                            round_half_away(d * self.dens_frequent) as u32
                        } else if a < self.tau_low {
                            round_half_away(d * self.dens_rare) as u32
                        } else {
                            k
                        };
                        t.max(floor)
                    })
                    .collect();
                Ok(degrees(v, t, false))
            })
            .collect()
    }
}

/// Density interpolated linearly from `busy_density` at the layer's `q_busy` activity
/// quantile (default the 70th percentile) to `rare_density` at its `q_rare` quantile
/// (default the 30th); busier units get the busy density, rarer ones the rare density.
/// Prune-only by default, as the reference runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantileInterpolation {
    /// Density of busy units (default 0.5).
    #[serde(default = "d_half")]
    pub busy_density: f64,
    /// Density of rare units (default 0.9).
    #[serde(default = "d_rare")]
    pub rare_density: f64,
    /// Quantile at and above which a unit counts as busy (default 0.7).
    #[serde(default = "d_q_busy")]
    pub q_busy: f64,
    /// Quantile at and below which a unit counts as rare (default 0.3).
    #[serde(default = "d_q_rare")]
    pub q_rare: f64,
    /// Smallest degree (default 1).
    #[serde(default = "d_one")]
    pub k_min: u32,
    /// Never add edges (default true).
    #[serde(default = "d_true")]
    pub prune_only: bool,
}

/// Linear-interpolation quantile of sorted values (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

#[typetag::serde(name = "quantile_interpolation")]
impl BudgetPolicy for QuantileInterpolation {
    fn validate(&self) -> Result<(), BbError> {
        check_density("policy.busy_density", self.busy_density)?;
        check_density("policy.rare_density", self.rare_density)?;
        check_unit("policy.q_busy", self.q_busy)?;
        check_unit("policy.q_rare", self.q_rare)?;
        if self.q_rare >= self.q_busy {
            return Err(BbError::config("policy.q_rare", "must be below q_busy"));
        }
        if self.k_min == 0 {
            return Err(BbError::config("policy.k_min", "must be >= 1"));
        }
        Ok(())
    }

    fn validate_layer(&self, name: &str, shape: &EdgeShape, side: Side) -> Result<(), BbError> {
        check_k_min(self.k_min, name, shape, side)
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        ctx.layers
            .iter()
            .map(|v| {
                let acts = v.activity()?;
                let mut sorted = acts.to_vec();
                sorted.sort_by(f64::total_cmp);
                let (hi, lo) = (
                    quantile(&sorted, self.q_busy),
                    quantile(&sorted, self.q_rare),
                );
                let d = v.slab_len() as f64;
                let t = acts
                    .iter()
                    .map(|&a| {
                        let dens = if a >= hi {
                            self.busy_density
                        } else if a <= lo {
                            self.rare_density
                        } else {
                            let s = (hi - a) / (hi - lo);
                            self.busy_density + s * (self.rare_density - self.busy_density)
                        };
                        (round_half_away(d * dens) as u32).max(self.k_min)
                    })
                    .collect();
                Ok(degrees(v, t, self.prune_only))
            })
            .collect()
    }
}

/// `k = clamp(round(d0 / a), k_min, D)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InverseRate {
    /// Numerator (`k = d0 / a`), > 0.
    pub d0: f64,
    /// Smallest degree (default 1).
    #[serde(default = "d_one")]
    pub k_min: u32,
}

#[typetag::serde(name = "inverse_rate")]
impl BudgetPolicy for InverseRate {
    fn validate(&self) -> Result<(), BbError> {
        if !(self.d0 > 0.0 && self.d0.is_finite()) {
            return Err(BbError::config(
                "policy.d0",
                format!("must be > 0, got {}", self.d0),
            ));
        }
        if self.k_min == 0 {
            return Err(BbError::config("policy.k_min", "must be >= 1"));
        }
        Ok(())
    }

    fn validate_layer(&self, name: &str, shape: &EdgeShape, side: Side) -> Result<(), BbError> {
        check_k_min(self.k_min, name, shape, side)
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        ctx.layers
            .iter()
            .map(|v| {
                let d = v.slab_len() as f64;
                let t = v
                    .activity()?
                    .iter()
                    .map(|&a| {
                        round_half_away(self.d0 / a.max(EPS)).clamp(self.k_min as f64, d) as u32
                    })
                    .collect();
                Ok(degrees(v, t, false))
            })
            .collect()
    }
}

fn d_cut_fraction() -> f64 {
    0.5
}

/// The ablation without the balance formula: units are ranked by activity alone, and the
/// busiest `cut_fraction` of them share the cut that brings the layer to `target_density`
/// (equal degrees, the last edges to the lower indices); the others keep every edge. If the
/// cut would push those units below `k_min`, the fraction grows until it fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivityOnly {
    /// Density to match exactly.
    pub target_density: f64,
    /// Fraction of units (busiest first) that are cut (default 0.5).
    #[serde(default = "d_cut_fraction")]
    pub cut_fraction: f64,
    /// Smallest degree (default 1).
    #[serde(default = "d_one")]
    pub k_min: u32,
}

#[typetag::serde(name = "activity_only")]
impl BudgetPolicy for ActivityOnly {
    fn validate(&self) -> Result<(), BbError> {
        check_density("policy.target_density", self.target_density)?;
        check_density("policy.cut_fraction", self.cut_fraction)?;
        if self.k_min == 0 {
            return Err(BbError::config("policy.k_min", "must be >= 1"));
        }
        Ok(())
    }

    fn validate_layer(&self, name: &str, shape: &EdgeShape, side: Side) -> Result<(), BbError> {
        check_k_min(self.k_min, name, shape, side)
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        ctx.layers
            .iter()
            .map(|v| {
                let acts = v.activity()?;
                let (units, d) = (v.slabs(), v.slab_len());
                let n = edge_target(self.target_density, v.edges());
                let mut order: Vec<usize> = (0..units).collect();
                order.sort_by(|&i, &j| acts[j].total_cmp(&acts[i]).then(i.cmp(&j)));
                let mut cut = ((self.cut_fraction * units as f64).ceil() as usize).clamp(1, units);
                // Grow the cut set until the kept units' share fits above k_min.
                let kmin = self.k_min as usize;
                let share = loop {
                    let kept = (units - cut) * d;
                    let budget = n.saturating_sub(kept);
                    if n >= kept && budget >= cut * kmin.min(d) {
                        break Some(budget);
                    }
                    if cut == units {
                        break None;
                    }
                    cut += 1;
                };
                let budget = share.ok_or_else(|| {
                    BbError::layer(
                        v.name,
                        format!(
                            "policy.target_density = {}: k_min keeps more than {n} edges",
                            self.target_density
                        ),
                    )
                })?;
                let mut t = vec![d as u32; units];
                let (base, extra) = (budget / cut, budget % cut);
                let mut by_index: Vec<usize> = order[..cut].to_vec();
                by_index.sort_unstable();
                for (r, &j) in by_index.iter().enumerate() {
                    t[j] = (base + usize::from(r < extra)).min(d) as u32;
                }
                Ok(LayerDecision {
                    plan: LayerPlan::Degrees {
                        side: v.side,
                        targets: t,
                        prune_only: false,
                    },
                    target_density: Some(self.target_density),
                })
            })
            .collect()
    }
}
