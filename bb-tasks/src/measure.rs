//! Measurements of a trained network (METHOD.md §5): accuracy, coding entropy,
//! decorrelation, balance fit, sparsity and traffic.

use bb_core::Pruner;
use serde::{Deserialize, Serialize};

/// Binary entropy in bits.
pub fn binary_entropy_bits(a: f64) -> f64 {
    if a <= 0.0 || a >= 1.0 {
        return 0.0;
    }
    -(a * a.log2() + (1.0 - a) * (1.0 - a).log2())
}

/// On-rate of each unit: the fraction of samples where its activation exceeds `theta`.
/// `acts` is batch-major `[n, units]`.
pub fn on_rates(acts: &[f32], units: usize, theta: f32) -> Vec<f64> {
    let n = acts.len() / units.max(1);
    let mut on = vec![0usize; units];
    for row in acts.chunks_exact(units) {
        for (c, &v) in on.iter_mut().zip(row) {
            *c += (v > theta) as usize;
        }
    }
    on.into_iter().map(|c| c as f64 / n.max(1) as f64).collect()
}

/// Mean absolute Pearson correlation between the on-indicators of distinct units, over the
/// pairs where both units vary (a unit that is always or never on has no correlation).
/// Returns `None` when fewer than two units vary.
pub fn decorrelation(acts: &[f32], units: usize, theta: f32) -> Option<f64> {
    let n = acts.len() / units.max(1);
    if n == 0 {
        return None;
    }
    let rates = on_rates(acts, units, theta);
    let varying: Vec<usize> = (0..units)
        .filter(|&j| rates[j] > 0.0 && rates[j] < 1.0)
        .collect();
    let m = varying.len();
    if m < 2 {
        return None;
    }
    // co-occurrence counts of the varying units
    let mut both = vec![0u32; m * m];
    let mut on = Vec::with_capacity(m);
    for row in acts.chunks_exact(units) {
        on.clear();
        on.extend((0..m).filter(|&i| row[varying[i]] > theta));
        for (x, &i) in on.iter().enumerate() {
            for &k in &on[x + 1..] {
                both[i * m + k] += 1;
            }
        }
    }
    let mut sum = 0.0;
    for i in 0..m {
        for k in i + 1..m {
            let (ai, ak) = (rates[varying[i]], rates[varying[k]]);
            let cov = both[i * m + k] as f64 / n as f64 - ai * ak;
            sum += (cov / (ai * (1.0 - ai) * ak * (1.0 - ak)).sqrt()).abs();
        }
    }
    Some(sum / (m * (m - 1) / 2) as f64)
}

/// Min, mean and max of a degree list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Degrees {
    /// Smallest.
    pub min: u32,
    /// Mean.
    pub mean: f64,
    /// Largest.
    pub max: u32,
    /// The dense degree.
    pub full: usize,
}

impl Degrees {
    fn of(k: &[u32], full: usize) -> Self {
        Self {
            min: k.iter().copied().min().unwrap_or(0),
            mean: k.iter().map(|&v| v as f64).sum::<f64>() / k.len().max(1) as f64,
            max: k.iter().copied().max().unwrap_or(0),
            full,
        }
    }
}

/// Sparsity of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Layer name.
    pub layer: String,
    /// Whether the pruner edits it.
    pub pruned: bool,
    /// Density the policy aimed at in the last refresh.
    pub target_density: Option<f64>,
    /// Live edges / edges.
    pub achieved_density: f64,
    /// Live edges.
    pub live_edges: usize,
    /// Edges.
    pub edges: usize,
    /// Live entries per row (the fan-in of the layer's output units).
    pub row_degrees: Degrees,
    /// Live entries per column (the fan-out of the layer's input units).
    pub col_degrees: Degrees,
}

/// Least squares of `ln((1 - a)/a)` on the fan-out `k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalanceFit {
    /// Fitted slope (beta hat).
    pub slope: f64,
    /// Intercept.
    pub intercept: f64,
    /// Coefficient of determination.
    pub r2: f64,
    /// Standard error of the slope.
    pub slope_se: f64,
    /// Units in the fit.
    pub n: usize,
    /// Units left out because they were never or always on over the evaluation set (their
    /// log-odds are infinite).
    pub excluded: usize,
}

/// Fits the balance line over the units with `0 < a < 1`; `None` when fewer than three such
/// units or all their fan-outs are equal.
pub fn balance_fit(activity: &[f64], fan_out: &[u32]) -> Option<BalanceFit> {
    let keep: Vec<usize> = (0..activity.len())
        .filter(|&j| activity[j] > 0.0 && activity[j] < 1.0)
        .collect();
    let k: Vec<f64> = keep.iter().map(|&j| fan_out[j] as f64).collect();
    let a: Vec<f64> = keep.iter().map(|&j| activity[j]).collect();
    let f = bb_theory::fit_balance(&k, &a, bb_theory::FitOptions::default()).ok()?;
    Some(BalanceFit {
        slope: f.slope,
        intercept: f.intercept,
        r2: f.r2,
        slope_se: f.slope_se,
        n: f.n,
        excluded: activity.len() - keep.len(),
    })
}

/// One population of units (`input` or a hidden layer's outputs), measured on evaluation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopulationStats {
    /// Population name.
    pub population: String,
    /// Units.
    pub units: usize,
    /// Mean binary entropy of the on-rates, bits per unit.
    pub entropy_bits: f64,
    /// Mean absolute correlation of the on-indicators (lower: more decorrelated).
    pub decorrelation: Option<f64>,
    /// Units never on.
    pub silent: usize,
    /// Units always on.
    pub saturated: usize,
    /// Fan-out of each unit into the layer that consumes it (None for the output layer).
    pub fan_out: Option<Degrees>,
    /// Fan-in of each unit (None for the inputs).
    pub fan_in: Option<Degrees>,
    /// Balance fit of `ln((1 - a)/a)` on fan-out.
    pub balance: Option<BalanceFit>,
    /// Per-unit on-rates over the evaluation set.
    pub activity: Vec<f64>,
    /// Per-unit fan-outs.
    pub fan_out_units: Vec<u32>,
}

/// Traffic of a group of input features (e.g. the rare ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupTraffic {
    /// Group name.
    pub group: String,
    /// Features in the group.
    pub units: usize,
    /// Mean on-rate over the evaluation set.
    pub mean_activity: f64,
    /// Mean fan-out.
    pub mean_fan_out: f64,
    /// Mean traffic `a k` per feature.
    pub mean_traffic: f64,
    /// The group's share of the population's total traffic.
    pub share: f64,
    /// Mean traffic per feature divided by the population's mean (1 = on budget average).
    pub relative_to_mean: f64,
}

/// Per-unit fan-out of population `p` (index in `[input, fc1, ...]`) under the pruner's
/// masks, or the dense degree without one. `widths` are the MLP's widths.
pub fn fan_out_of(pruner: Option<&Pruner>, p: usize, widths: &[usize]) -> Option<Vec<u32>> {
    if p + 1 >= widths.len() {
        return None;
    }
    match pruner {
        Some(pr) => pr.fan_out(&population_name(p)),
        None => Some(vec![widths[p + 1] as u32; widths[p]]),
    }
}

/// Per-unit fan-in of population `p` (None for the inputs).
pub fn fan_in_of(pruner: Option<&Pruner>, p: usize, widths: &[usize]) -> Option<Vec<u32>> {
    if p == 0 {
        return None;
    }
    match pruner {
        Some(pr) => pr.fan_in(&population_name(p)),
        None => Some(vec![widths[p - 1] as u32; widths[p]]),
    }
}

/// `input` for 0, else the name of the layer that produces the population.
pub fn population_name(p: usize) -> String {
    if p == 0 {
        "input".to_string()
    } else {
        crate::model::layer_name(p - 1)
    }
}

/// Measures population `p` from its evaluation activations `acts` (`[n, units]`).
pub fn population_stats(
    pruner: Option<&Pruner>,
    p: usize,
    widths: &[usize],
    acts: &[f32],
) -> PopulationStats {
    let units = widths[p];
    let activity = on_rates(acts, units, 0.0);
    let fan_out = fan_out_of(pruner, p, widths);
    let fan_in = fan_in_of(pruner, p, widths);
    let balance = fan_out.as_ref().and_then(|k| balance_fit(&activity, k));
    PopulationStats {
        population: population_name(p),
        units,
        entropy_bits: activity
            .iter()
            .map(|&a| binary_entropy_bits(a))
            .sum::<f64>()
            / units as f64,
        decorrelation: decorrelation(acts, units, 0.0),
        silent: activity.iter().filter(|&&a| a == 0.0).count(),
        saturated: activity.iter().filter(|&&a| a == 1.0).count(),
        fan_out: fan_out
            .as_ref()
            .map(|k| Degrees::of(k, widths.get(p + 1).copied().unwrap_or(0))),
        fan_in: fan_in.as_ref().map(|k| Degrees::of(k, widths[p - 1])),
        balance,
        activity,
        fan_out_units: fan_out.unwrap_or_default(),
    }
}

/// Traffic of each feature group of a population.
pub fn group_traffic(stats: &PopulationStats, groups: &[String]) -> Vec<GroupTraffic> {
    let k = &stats.fan_out_units;
    if k.len() != stats.units || groups.len() != stats.units {
        return Vec::new();
    }
    let traffic: Vec<f64> = (0..stats.units)
        .map(|j| stats.activity[j] * k[j] as f64)
        .collect();
    let total: f64 = traffic.iter().sum();
    let mean = total / stats.units as f64;
    let mut names: Vec<&String> = Vec::new();
    for g in groups {
        if !names.contains(&g) {
            names.push(g);
        }
    }
    names
        .into_iter()
        .map(|g| {
            let idx: Vec<usize> = (0..stats.units).filter(|&j| &groups[j] == g).collect();
            let n = idx.len() as f64;
            let t: f64 = idx.iter().map(|&j| traffic[j]).sum();
            GroupTraffic {
                group: g.clone(),
                units: idx.len(),
                mean_activity: idx.iter().map(|&j| stats.activity[j]).sum::<f64>() / n,
                mean_fan_out: idx.iter().map(|&j| k[j] as f64).sum::<f64>() / n,
                mean_traffic: t / n,
                share: if total > 0.0 { t / total } else { 0.0 },
                relative_to_mean: if mean > 0.0 { t / n / mean } else { 0.0 },
            }
        })
        .collect()
}

/// Sparsity of every layer.
pub fn layer_stats(
    pruner: Option<&Pruner>,
    widths: &[usize],
    last_targets: &[Option<f64>],
) -> Vec<LayerStats> {
    (0..widths.len() - 1)
        .map(|l| {
            let (o, i) = (widths[l + 1], widths[l]);
            let (rows, cols, pruned) = match pruner {
                Some(pr) => {
                    let m = pr.mask(l);
                    let mut r = vec![0u32; o];
                    let mut c = vec![0u32; i];
                    m.row_counts_into(&mut r);
                    m.col_counts_into(&mut c);
                    (r, c, pr.is_pruned(l))
                }
                None => (vec![i as u32; o], vec![o as u32; i], false),
            };
            let live: usize = rows.iter().map(|&v| v as usize).sum();
            LayerStats {
                layer: crate::model::layer_name(l),
                pruned,
                target_density: last_targets.get(l).copied().flatten(),
                achieved_density: live as f64 / (o * i) as f64,
                live_edges: live,
                edges: o * i,
                row_degrees: Degrees::of(&rows, i),
                col_degrees: Degrees::of(&cols, o),
            }
        })
        .collect()
}

/// Mean and half-width of the 95 % t-interval of `xs` (half-width 0 for one value).
pub fn mean_ci95(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t975(n - 1) * (var / n as f64).sqrt())
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        f64::NAN
    } else if df <= 30 {
        T[df - 1]
    } else {
        1.96 + 2.4 / df as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_fair_and_certain_units() {
        assert!((binary_entropy_bits(0.5) - 1.0).abs() < 1e-12);
        assert_eq!(binary_entropy_bits(0.0), 0.0);
        assert!((binary_entropy_bits(0.11) - 0.4999).abs() < 1e-3);
    }

    #[test]
    fn decorrelation_of_copies_is_one_and_of_independent_units_small() {
        // unit 1 copies unit 0; unit 2 is the complement of unit 0 (|corr| = 1 too)
        let mut acts = Vec::new();
        for s in 0..100 {
            let v = (s % 3 == 0) as i32 as f32;
            acts.extend_from_slice(&[v, v, 1.0 - v]);
        }
        assert!((decorrelation(&acts, 3, 0.0).unwrap() - 1.0).abs() < 1e-9);
        // two units on a full 2x2 design are uncorrelated
        let acts = [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        assert!(decorrelation(&acts, 2, 0.0).unwrap().abs() < 1e-12);
        // a constant unit has no correlation
        assert_eq!(decorrelation(&[1.0, 0.0, 1.0, 1.0], 2, 0.0), None);
    }

    #[test]
    fn balance_fit_recovers_a_planted_line_and_skips_dead_units() {
        let beta = 0.2;
        let k: Vec<u32> = (1..=20).collect();
        let mut a: Vec<f64> = k
            .iter()
            .map(|&k| 1.0 / (1.0 + (beta * k as f64 - 1.0).exp()))
            .collect();
        a[3] = 0.0; // silent unit
        let f = balance_fit(&a, &k).unwrap();
        assert!((f.slope - beta).abs() < 1e-9, "{f:?}");
        assert!((f.intercept + 1.0).abs() < 1e-9, "{f:?}");
        assert!(f.r2 > 0.999_999);
        assert_eq!((f.n, f.excluded), (19, 1));
        // equal fan-outs: no fit
        assert_eq!(balance_fit(&[0.2, 0.3, 0.4], &[5, 5, 5]), None);
    }

    #[test]
    fn ci95_uses_the_t_quantile() {
        let (m, h) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((h - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(mean_ci95(&[5.0]), (5.0, 0.0));
    }
}
