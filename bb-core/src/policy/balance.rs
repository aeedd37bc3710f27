//! BB's own policies: the balance rule and its traffic-threshold ("budget") form.

use super::{
    check_density, check_k_min, edge_target, BudgetPolicy, LayerDecision, LayerPlan, PolicyContext,
};
use crate::{log_odds_off, round_half_away, BbError};
use bb_actuators::{EdgeShape, Side};
use serde::{Deserialize, Serialize};

fn default_k_min() -> u32 {
    1
}

/// The balance target before rounding and clipping: `d0 + ln((1 - a) / a) / beta`, with `a`
/// clamped to `[EPS, 1 - EPS]`.
pub fn balance_raw_target(a: f64, beta: f64, d0: f64) -> f64 {
    d0 + log_odds_off(a) / beta
}

/// Where a matched density is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DensityScope {
    /// Every layer separately (one `d0` per layer).
    #[default]
    Layer,
    /// All pruned layers together (one `d0` for the model).
    Model,
}

/// The paper's rule: `k*_j = clip(round(d0 + ln((1 - a_j) / a_j) / beta), k_min, D)`.
///
/// With `target_density`, `d0` is solved for (bisection: the total is monotone in `d0`) so
/// that the live-edge count is exactly `round(target_density * edges)`, the last edges going
/// to the largest fractional parts (ties toward the lower index) — per layer or model-wide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balance {
    /// Budget multiplier `beta > 0`.
    pub beta: f64,
    /// Degree offset (ignored when `target_density` is set, since it is solved for).
    #[serde(default)]
    pub d0: Option<f64>,
    /// Smallest degree (default 1).
    #[serde(default = "default_k_min")]
    pub k_min: u32,
    /// Density to match exactly, in (0, 1].
    #[serde(default)]
    pub target_density: Option<f64>,
    /// Per layer (default) or model-wide matching.
    #[serde(default)]
    pub scope: DensityScope,
}

impl Balance {
    fn check(&self) -> Result<(), BbError> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(BbError::config(
                "policy.beta",
                format!("must be > 0, got {}", self.beta),
            ));
        }
        if self.k_min == 0 {
            return Err(BbError::config("policy.k_min", "must be >= 1"));
        }
        match (self.d0, self.target_density) {
            (_, Some(t)) => check_density("policy.target_density", t),
            (Some(d0), None) if d0.is_finite() => Ok(()),
            (Some(d0), None) => Err(BbError::config(
                "policy.d0",
                format!("must be finite, got {d0}"),
            )),
            (None, None) => Err(BbError::config("policy.d0", "give d0 or target_density")),
        }
    }
}

#[typetag::serde(name = "balance")]
impl BudgetPolicy for Balance {
    fn validate(&self) -> Result<(), BbError> {
        self.check()
    }

    fn validate_layer(&self, name: &str, shape: &EdgeShape, side: Side) -> Result<(), BbError> {
        check_k_min(self.k_min, name, shape, side)
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError> {
        let Some(density) = self.target_density else {
            let d0 = self.d0.unwrap_or(0.0);
            return ctx
                .layers
                .iter()
                .map(|v| {
                    let d = v.slab_len() as f64;
                    let targets = v
                        .activity()?
                        .iter()
                        .map(|&a| {
                            round_half_away(balance_raw_target(a, self.beta, d0))
                                .clamp(self.k_min as f64, d) as u32
                        })
                        .collect();
                    Ok(LayerDecision {
                        plan: LayerPlan::Degrees {
                            side: v.side,
                            targets,
                            prune_only: false,
                        },
                        target_density: None,
                    })
                })
                .collect();
        };
        // Matched density: one problem per layer, or one for the whole model.
        let groups: Vec<Vec<usize>> = match self.scope {
            DensityScope::Layer => (0..ctx.layers.len()).map(|l| vec![l]).collect(),
            DensityScope::Model => vec![(0..ctx.layers.len()).collect()],
        };
        let mut out: Vec<Option<LayerDecision>> = vec![None; ctx.layers.len()];
        for group in groups {
            let (mut offs, mut lo, mut hi) = (Vec::new(), Vec::new(), Vec::new());
            let mut edges = 0;
            for &l in &group {
                let v = &ctx.layers[l];
                edges += v.edges();
                for (j, &a) in v.activity()?.iter().enumerate() {
                    let cap = v.cap(j, false);
                    offs.push(log_odds_off(a) / self.beta);
                    lo.push(self.k_min.min(cap));
                    hi.push(cap);
                }
            }
            let n = edge_target(density, edges);
            let names: Vec<&str> = group.iter().map(|&l| ctx.layers[l].name).collect();
            let k = matched_degrees(&offs, &lo, &hi, n).map_err(|msg| {
                BbError::layer(
                    names.join("+"),
                    format!("policy.target_density = {density}: {msg}"),
                )
            })?;
            let mut at = 0;
            for &l in &group {
                let v = &ctx.layers[l];
                let targets = k[at..at + v.slabs()].to_vec();
                at += v.slabs();
                out[l] = Some(LayerDecision {
                    plan: LayerPlan::Degrees {
                        side: v.side,
                        targets,
                        prune_only: false,
                    },
                    target_density: Some(density),
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|d| d.expect("every layer is in one group"))
            .collect())
    }
}

/// Integer degrees `k_j in [lo_j, hi_j]` summing to exactly `n`, following
/// `x_j = clamp(d0 + offsets_j, lo_j, hi_j)` for the `d0` that makes `sum x_j = n`: each unit
/// gets `floor(x_j)`, and the remaining edges go to the largest fractional parts (ties toward
/// the lower index).
///
/// Fails (with a message) when `n` lies outside `[sum lo, sum hi]`.
pub fn matched_degrees(
    offsets: &[f64],
    lo: &[u32],
    hi: &[u32],
    n: usize,
) -> Result<Vec<u32>, String> {
    let sum_lo: usize = lo.iter().map(|&x| x as usize).sum();
    let sum_hi: usize = hi.iter().map(|&x| x as usize).sum();
    if n < sum_lo {
        return Err(format!(
            "needs {n} live edges but k_min keeps at least {sum_lo}"
        ));
    }
    if n > sum_hi {
        return Err(format!(
            "needs {n} live edges but only {sum_hi} can be kept (prune-only: too few live edges)"
        ));
    }
    if offsets.is_empty() {
        return Ok(Vec::new());
    }
    let d0 = solve_d0(offsets, lo, hi, n as f64);
    let x: Vec<f64> = (0..offsets.len())
        .map(|j| (d0 + offsets[j]).clamp(lo[j] as f64, hi[j] as f64))
        .collect();
    let mut k: Vec<u32> = x
        .iter()
        .enumerate()
        .map(|(j, &v)| (v.floor() as u32).clamp(lo[j], hi[j]))
        .collect();
    let mut rest = n as i64 - k.iter().map(|&v| v as i64).sum::<i64>();
    if rest == 0 {
        return Ok(k);
    }
    let frac: Vec<f64> = x.iter().map(|v| v - v.floor()).collect();
    // Largest remainder first, ties toward the lower index.
    let first = |&i: &usize, &j: &usize| frac[j].total_cmp(&frac[i]).then(i.cmp(&j));
    // One edge more (or less) for each of the first (last) `|rest|` units in that order that
    // can take it: a selection rather than a sort when they suffice.
    let room: Vec<usize> = (0..k.len())
        .filter(|&j| if rest > 0 { k[j] < hi[j] } else { k[j] > lo[j] })
        .collect();
    let m = rest.unsigned_abs() as usize;
    if m <= room.len() {
        let mut room = room;
        if m < room.len() {
            if rest > 0 {
                room.select_nth_unstable_by(m, first);
            } else {
                room.select_nth_unstable_by(m, |i, j| first(j, i));
            }
        }
        for &j in &room[..m] {
            if rest > 0 {
                k[j] += 1;
            } else {
                k[j] -= 1;
            }
        }
        return Ok(k);
    }
    // More than one edge per unit to place (the real solution was far off): repeated passes
    // over the whole order (it cannot loop: n is feasible).
    let mut order: Vec<usize> = (0..k.len()).collect();
    order.sort_by(first);
    while rest > 0 {
        for &j in &order {
            if rest > 0 && k[j] < hi[j] {
                k[j] += 1;
                rest -= 1;
            }
        }
    }
    while rest < 0 {
        for &j in order.iter().rev() {
            if rest < 0 && k[j] > lo[j] {
                k[j] -= 1;
                rest += 1;
            }
        }
    }
    Ok(k)
}

/// The `d0` at which `sum_j clamp(d0 + offsets_j, lo_j, hi_j)` reaches `target` (which lies
/// in `[sum lo, sum hi]`). The sum is piecewise linear in `d0`, its slope the number of
/// units strictly inside their caps, so Newton steps land on the answer as soon as they
/// reach its piece; a step that would leave the bracket known to hold the answer is
/// replaced by bisection.
fn solve_d0(offsets: &[f64], lo: &[u32], hi: &[u32], target: f64) -> f64 {
    // The sum and the slope at `d0`, in eight lanes (a single chain of dependent additions
    // would take most of a refresh of a wide layer).
    let eval = |d0: f64| {
        let (mut acc, mut inside) = ([0.0f64; 8], [0u32; 8]);
        let whole = offsets.len() / 8 * 8;
        for ((o, l), h) in offsets[..whole]
            .chunks_exact(8)
            .zip(lo[..whole].chunks_exact(8))
            .zip(hi[..whole].chunks_exact(8))
        {
            for i in 0..8 {
                let (v, l, h) = (d0 + o[i], l[i] as f64, h[i] as f64);
                // `clamp` without its check (`lo <= hi` holds for every unit).
                acc[i] += v.max(l).min(h);
                inside[i] += u32::from((v > l) & (v < h));
            }
        }
        let mut sum = acc.iter().sum::<f64>();
        let mut slope = inside.iter().map(|&c| c as usize).sum::<usize>();
        for j in whole..offsets.len() {
            let (v, l, h) = (d0 + offsets[j], lo[j] as f64, hi[j] as f64);
            sum += v.clamp(l, h);
            slope += usize::from(v > l && v < h);
        }
        (sum, slope)
    };
    // Every unit at its lower cap at `a`, at its upper cap at `b`.
    let (mut a, mut b) = (f64::INFINITY, f64::NEG_INFINITY);
    for j in 0..offsets.len() {
        a = a.min(lo[j] as f64 - offsets[j] - 1.0);
        b = b.max(hi[j] as f64 - offsets[j] + 1.0);
    }
    let tol = 1e-9 * target.max(1.0);
    let mut d = 0.5 * (a + b);
    for _ in 0..200 {
        let (t, slope) = eval(d);
        if (t - target).abs() <= tol {
            return d;
        }
        if t < target {
            a = d;
        } else {
            b = d;
        }
        let newton = d + (target - t) / slope as f64;
        let mid = 0.5 * (a + b);
        d = if slope > 0 && newton > a && newton < b {
            newton
        } else {
            mid
        };
        if mid <= a || mid >= b {
            break;
        }
    }
    b
}

/// How an over-budget unit's new degree is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficRule {
    /// The balance target `round(d0 + ln((1 - a) / a) / beta)`.
    #[default]
    Balance,
    /// `floor(tau / a)`: the largest degree within budget.
    Proportional,
}

/// The budget form of BB: only units whose traffic `t_j = a_j * k_j` (`k_j` the actuated
/// degree) exceeds `tau` are cut, to the rule's target but never below `k_min` and never
/// above their current degree; units within budget keep their degree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficThreshold {
    /// Traffic budget per unit, `tau >= 0`.
    pub tau: f64,
    /// Target of an over-budget unit (default `balance`).
    #[serde(default)]
    pub rule: TrafficRule,
    /// `beta` of the balance rule (needed with `rule = "balance"`).
    #[serde(default)]
    pub beta: Option<f64>,
    /// `d0` of the balance rule (needed with `rule = "balance"`).
    #[serde(default)]
    pub d0: Option<f64>,
    /// Smallest degree (default 1).
    #[serde(default = "default_k_min")]
    pub k_min: u32,
}

#[typetag::serde(name = "traffic_threshold")]
impl BudgetPolicy for TrafficThreshold {
    fn validate(&self) -> Result<(), BbError> {
        if !(self.tau >= 0.0 && self.tau.is_finite()) {
            return Err(BbError::config(
                "policy.tau",
                format!("must be >= 0, got {}", self.tau),
            ));
        }
        if self.k_min == 0 {
            return Err(BbError::config("policy.k_min", "must be >= 1"));
        }
        if self.rule == TrafficRule::Balance {
            match self.beta {
                Some(b) if b > 0.0 && b.is_finite() => {}
                Some(b) => {
                    return Err(BbError::config(
                        "policy.beta",
                        format!("must be > 0, got {b}"),
                    ))
                }
                None => {
                    return Err(BbError::config(
                        "policy.beta",
                        "rule = \"balance\" needs beta",
                    ))
                }
            }
            if !self.d0.is_some_and(f64::is_finite) {
                return Err(BbError::config(
                    "policy.d0",
                    "rule = \"balance\" needs a finite d0",
                ));
            }
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
                let targets = acts
                    .iter()
                    .zip(v.degrees)
                    .map(|(&a, &k)| {
                        if a * k as f64 <= self.tau {
                            return k;
                        }
                        let t = match self.rule {
                            TrafficRule::Proportional => (self.tau / a.max(crate::EPS)).floor(),
                            TrafficRule::Balance => round_half_away(balance_raw_target(
                                a,
                                self.beta.unwrap_or(1.0),
                                self.d0.unwrap_or(0.0),
                            )),
                        };
                        (t.max(self.k_min as f64) as u32).min(k)
                    })
                    .collect();
                Ok(LayerDecision {
                    plan: LayerPlan::Degrees {
                        side: v.side,
                        targets,
                        prune_only: false,
                    },
                    target_density: None,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::solve_d0;

    /// The solver's `d0` puts the clamped sum within a billionth of the target, for layers
    /// of one to a few thousand units, caps that bind and budgets across the whole range
    /// (both ends included).
    #[test]
    fn solve_d0_reaches_the_target() {
        let mut s = 5u64;
        let mut rnd = move || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        for units in [1usize, 7, 8, 300, 4099] {
            let offsets: Vec<f64> = (0..units).map(|_| 80.0 * rnd() - 40.0).collect();
            let lo: Vec<u32> = (0..units).map(|_| (3.0 * rnd()) as u32).collect();
            let hi: Vec<u32> = lo.iter().map(|&l| l + 20 + (50.0 * rnd()) as u32).collect();
            let (slo, shi) = (
                lo.iter().map(|&x| f64::from(x)).sum::<f64>(),
                hi.iter().map(|&x| f64::from(x)).sum::<f64>(),
            );
            for f in [0.0, 0.01, 0.3, 0.5, 0.77, 0.999] {
                let target = (slo + f * (shi - slo)).round();
                let d = solve_d0(&offsets, &lo, &hi, target);
                let sum: f64 = (0..units)
                    .map(|j| (d + offsets[j]).clamp(f64::from(lo[j]), f64::from(hi[j])))
                    .sum();
                assert!(
                    (sum - target).abs() <= 1e-9 * target.max(1.0),
                    "{units} units, target {target}: d0 {d} gives {sum}"
                );
            }
        }
    }
}
