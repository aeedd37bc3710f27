//! Coding entropy under a traffic budget: the solver, its inverse problems and KKT checks.
//!
//! Problem: given fan-outs `k_i > 0` and a budget `T > 0`,
//!
//! ```text
//! maximize  H(a) = sum_i H_b(a_i)   subject to   sum_i a_i k_i <= T,   0 <= a_i <= 1.
//! ```
//!
//! `H` is strictly concave, so the KKT conditions are sufficient and the optimum is unique:
//! `ln((1 - a_i) / a_i) = beta k_i` with the multiplier `beta >= 0`, i.e.
//! `a_i = 1 / (1 + e^{beta k_i})`. The spent budget `T(beta) = sum_i k_i / (1 + e^{beta k_i})`
//! falls strictly from `sum k / 2` at `beta = 0` towards 0, so a budget `T >= sum k / 2` is slack
//! (`beta = 0`, every `a_i = 1/2`) and a smaller one fixes a unique `beta > 0`.
//!
//! Numerics: every activity is carried as `ln a_i = -softplus(beta k_i)`, and the budget
//! equation is solved as `ln T(beta) = ln T` with `ln T(beta)` a log-sum-exp. Nothing
//! overflows or turns NaN for `beta k_i` anywhere in `[0, 1e300]`, so fan-outs of 1 to 1e6
//! and budgets down to `1e-9 sum k` (and far below) are solved to full precision.

use serde::{Deserialize, Serialize};

use crate::error::{check_positive, check_value, Result, TheoryError};
use crate::numeric::{binary_entropy_from_logs, log1mexp, log_sum_exp, softplus, sum};

/// The KKT residuals of a candidate `(a, beta)`, each scale-free and `0` at the exact optimum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KktResiduals {
    /// `max_i |ln((1 - a_i)/a_i) - beta k_i| / max(1, beta k_i)`.
    pub stationarity: f64,
    /// Budget overrun relative to the budget: `max(0, sum a k - T) / T`.
    pub primal_feasibility: f64,
    /// `|beta (T - sum a k)| / max(1, beta T)`.
    pub complementary_slackness: f64,
    /// `max(0, -beta)`.
    pub dual_feasibility: f64,
}

impl KktResiduals {
    /// The largest of the four residuals.
    pub fn max(&self) -> f64 {
        self.stationarity
            .max(self.primal_feasibility)
            .max(self.complementary_slackness)
            .max(self.dual_feasibility)
    }
}

/// The optimum of the entropy-under-budget problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Solution {
    /// The budget's multiplier (`0` when the budget is slack).
    pub beta: f64,
    /// Optimal activities `a_i = 1 / (1 + e^{beta k_i})` (may underflow to 0 for huge `beta k_i`).
    pub activity: Vec<f64>,
    /// `ln a_i`, exact where `activity` underflows.
    pub log_activity: Vec<f64>,
    /// Coding entropy `sum_i H_b(a_i)` in nats.
    pub entropy: f64,
    /// The same in bits.
    pub entropy_bits: f64,
    /// The budget asked for.
    pub budget: f64,
    /// The budget spent, `sum_i a_i k_i`.
    pub spent: f64,
    /// Whether the budget constraint is inactive (`T >= sum k / 2`).
    pub slack: bool,
    /// Root-finder iterations used (0 when slack).
    pub iterations: usize,
    /// The KKT residuals of the returned point.
    pub kkt: KktResiduals,
}

/// `ln T(beta)` and `d ln T / d beta`, both by log-sum-exp.
fn log_spent_and_slope(log_k: &[f64], k: &[f64], beta: f64) -> (f64, f64) {
    let lt = log_sum_exp(
        log_k
            .iter()
            .zip(k)
            .map(|(&lk, &ki)| lk - softplus(beta * ki)),
    );
    // dT/dbeta = -sum k^2 a (1 - a); a (1 - a) = e^{-softplus(x) - softplus(-x)}.
    let ld = log_sum_exp(log_k.iter().zip(k).map(|(&lk, &ki)| {
        let x = beta * ki;
        2.0 * lk - softplus(x) - softplus(-x)
    }));
    (lt, -(ld - lt).exp())
}

/// The budget spent at multiplier `beta`: `T(beta) = sum_i k_i / (1 + e^{beta k_i})`.
///
/// # Errors
/// If `fan_out` is empty or holds a value that is not finite and `> 0`, or `beta` is not
/// finite and `>= 0`.
pub fn budget_for_beta(fan_out: &[f64], beta: f64) -> Result<f64> {
    check_positive("fan_out", fan_out)?;
    check_value(
        "beta",
        beta,
        beta.is_finite() && beta >= 0.0,
        "a finite number >= 0",
    )?;
    Ok(sum(fan_out
        .iter()
        .map(|&k| k * (-softplus(beta * k)).exp())))
}

/// The multiplier that spends exactly `budget` (`0` if the budget is slack).
///
/// # Errors
/// As [`solve`].
pub fn beta_for_budget(fan_out: &[f64], budget: f64) -> Result<f64> {
    check_positive("fan_out", fan_out)?;
    check_budget(budget)?;
    Ok(find_beta(fan_out, budget).0)
}

fn check_budget(budget: f64) -> Result<()> {
    check_value(
        "budget",
        budget,
        budget.is_finite() && budget > 0.0,
        "a finite number > 0",
    )
}

/// Returns `(beta, iterations)` for a validated input.
fn find_beta(k: &[f64], budget: f64) -> (f64, usize) {
    let total = sum(k.iter().copied());
    if budget >= 0.5 * total {
        return (0.0, 0);
    }
    let log_k: Vec<f64> = k.iter().map(|x| x.ln()).collect();
    let target = budget.ln();
    let g = |beta: f64| log_spent_and_slope(&log_k, k, beta);
    let k_min = k.iter().copied().fold(f64::INFINITY, f64::min);

    // Bracket: g(0) = ln(sum k / 2) - ln T > 0. Since 1/(1+e^x) < e^{-x},
    // T(beta) < sum k e^{-beta k_min}, which equals T at hi = ln(sum k / T) / k_min.
    let mut lo = 0.0;
    let mut hi = (total.ln() - target) / k_min;
    let mut iterations = 0;
    let (mut g_hi, _) = g(hi);
    // Rounding can leave g(hi) a hair above 0; widen until the sign is certain.
    while g_hi - target >= 0.0 && iterations < 64 {
        hi *= 2.0;
        g_hi = g(hi).0;
        iterations += 1;
    }
    if g_hi - target >= 0.0 {
        return (hi, iterations);
    }

    // Safeguarded Newton on f(beta) = ln T(beta) - ln T (decreasing): a Newton step is taken
    // when it lands inside the sign bracket and the bracket keeps shrinking, bisection
    // otherwise, so convergence is guaranteed and quadratic near the root.
    let mut beta = 0.5 * (lo + hi);
    let mut step_two_ago = hi - lo;
    let mut step_one_ago = hi - lo;
    let mut best = (beta, f64::INFINITY);
    for _ in 0..400 {
        iterations += 1;
        let (lt, slope) = g(beta);
        let f = lt - target;
        if f.abs() < best.1 {
            best = (beta, f.abs());
        }
        if f == 0.0 {
            return (beta, iterations);
        }
        if f > 0.0 {
            lo = beta;
        } else {
            hi = beta;
        }
        let width = hi - lo;
        if width <= 2.0 * f64::EPSILON * hi {
            break;
        }
        let newton = beta - f / slope;
        // Newton must land inside the bracket and at least halve the step of two rounds ago.
        let step_ok =
            slope < 0.0 && newton > lo && newton < hi && (newton - beta).abs() < 0.5 * step_two_ago;
        let next = if step_ok { newton } else { 0.5 * (lo + hi) };
        if step_ok && (next - beta).abs() <= 2.0 * f64::EPSILON * beta {
            let (lt_next, _) = g(next);
            if (lt_next - target).abs() < best.1 {
                best = (next, (lt_next - target).abs());
            }
            break;
        }
        step_two_ago = step_one_ago;
        step_one_ago = (next - beta).abs();
        beta = next;
    }
    (best.0, iterations)
}

/// Maximizes the coding entropy `sum_i H_b(a_i)` subject to `sum_i a_i k_i <= budget`.
///
/// # Errors
/// [`TheoryError`] naming `fan_out` if it is empty or holds a value that is not finite and
/// `> 0`, or naming `budget` if it is not finite and `> 0`.
pub fn solve(fan_out: &[f64], budget: f64) -> Result<Solution> {
    check_positive("fan_out", fan_out)?;
    check_budget(budget)?;
    let (beta, iterations) = find_beta(fan_out, budget);
    let log_activity: Vec<f64> = fan_out.iter().map(|&k| -softplus(beta * k)).collect();
    let activity: Vec<f64> = log_activity.iter().map(|l| l.exp()).collect();
    let entropy = entropy_from_log_activity(&log_activity);
    let spent = sum(fan_out.iter().zip(&activity).map(|(k, a)| k * a));
    let kkt = kkt_residuals(fan_out, budget, beta, &log_activity)?;
    Ok(Solution {
        beta,
        activity,
        log_activity,
        entropy,
        entropy_bits: entropy / std::f64::consts::LN_2,
        budget,
        spent,
        slack: beta == 0.0,
        iterations,
        kkt,
    })
}

/// Coding entropy in nats of activities given as `ln a_i` (each `<= 0`).
pub fn entropy_from_log_activity(log_activity: &[f64]) -> f64 {
    sum(log_activity
        .iter()
        .map(|&l| binary_entropy_from_logs(l, log1mexp(l))))
}

/// Coding entropy in nats, `sum_i H_b(a_i)`.
///
/// # Errors
/// If `activity` is empty or holds a value outside `[0, 1]`.
pub fn entropy(activity: &[f64]) -> Result<f64> {
    check_activity("activity", activity)?;
    Ok(sum(activity
        .iter()
        .map(|&a| crate::numeric::binary_entropy(a))))
}

pub(crate) fn check_activity(field: &'static str, a: &[f64]) -> Result<()> {
    if a.is_empty() {
        return Err(TheoryError::Empty { field });
    }
    for (index, &value) in a.iter().enumerate() {
        if !(0.0..=1.0).contains(&value) {
            return Err(TheoryError::InvalidElement {
                field,
                index,
                value,
                expected: "a number in [0, 1]",
            });
        }
    }
    Ok(())
}

/// KKT residuals of any candidate point, given as multiplier `beta` and log-activities
/// `ln a_i` (log space keeps the check exact where `a_i` underflows).
///
/// `ln(1 - a_i)` is formed independently of how the candidate was computed (by `log1mexp`),
/// so this checks a solver rather than restating it.
///
/// # Errors
/// If the lengths differ, `fan_out` or `budget` are invalid, or a log-activity is not in
/// `(-inf, 0)`.
pub fn kkt_residuals(
    fan_out: &[f64],
    budget: f64,
    beta: f64,
    log_activity: &[f64],
) -> Result<KktResiduals> {
    check_positive("fan_out", fan_out)?;
    check_budget(budget)?;
    check_value("beta", beta, beta.is_finite(), "a finite number")?;
    if fan_out.len() != log_activity.len() {
        return Err(TheoryError::LengthMismatch {
            left: "fan_out",
            left_len: fan_out.len(),
            right: "log_activity",
            right_len: log_activity.len(),
        });
    }
    for (index, &value) in log_activity.iter().enumerate() {
        if !(value.is_finite() && value < 0.0) {
            return Err(TheoryError::InvalidElement {
                field: "log_activity",
                index,
                value,
                expected: "a finite number < 0 (activity in (0, 1))",
            });
        }
    }
    let stationarity = fan_out
        .iter()
        .zip(log_activity)
        .map(|(&k, &l)| {
            let x = beta * k;
            ((log1mexp(l) - l) - x).abs() / x.abs().max(1.0)
        })
        .fold(0.0, f64::max);
    let spent = sum(fan_out.iter().zip(log_activity).map(|(&k, &l)| k * l.exp()));
    Ok(KktResiduals {
        stationarity,
        primal_feasibility: ((spent - budget) / budget).max(0.0),
        complementary_slackness: (beta * (budget - spent)).abs() / (beta * budget).abs().max(1.0),
        dual_feasibility: (-beta).max(0.0),
    })
}
