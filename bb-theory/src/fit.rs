//! The balance fit: least squares of the inactivity log-odds `ln((1 - a)/a)` on the fan-out.

use serde::{Deserialize, Serialize};

use crate::error::{check_value, Result, TheoryError};
use crate::numeric::inactivity_log_odds;

/// Default clamp of activities before taking log-odds: the `eps` of the balance policy.
pub const DEFAULT_CLAMP_EPS: f64 = 1e-4;

/// How observed activities are turned into log-odds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitOptions {
    /// Activities are clamped to `[eps, 1 - eps]` before `ln((1 - a)/a)`, so `a = 0` maps to
    /// `ln((1 - eps)/eps)` (about 9.21 for the default `1e-4`) and `a = 1` to its negative.
    /// Must lie in `(0, 0.5)`.
    pub eps: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            eps: DEFAULT_CLAMP_EPS,
        }
    }
}

/// Ordinary least squares of `y = ln((1 - a)/a)` on `k`: `y = slope k + intercept`.
///
/// Standard errors are the textbook OLS ones (homoscedastic errors, `n - 2` degrees of freedom).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BalanceFit {
    /// Estimated `beta`.
    pub slope: f64,
    /// Estimated intercept (`0` on the exact balance line; `-beta d0` for a policy offset `d0`).
    pub intercept: f64,
    /// Coefficient of determination (`1` when every log-odds is equal and fitted exactly).
    pub r2: f64,
    /// Standard error of the slope.
    pub slope_se: f64,
    /// Standard error of the intercept.
    pub intercept_se: f64,
    /// Residual standard deviation `sqrt(SSR / (n - 2))`.
    pub residual_sd: f64,
    /// Number of points.
    pub n: usize,
    /// Number of activities that were clamped (outside `[eps, 1 - eps]`).
    pub clamped: usize,
    /// The clamp used.
    pub eps: f64,
}

/// Fits the balance line to observed `(k_i, a_i)`.
///
/// # Errors
/// Naming the field: `fan_out` or `activity` empty, of different lengths, with fewer than 3
/// points, with a non-finite fan-out, an activity outside `[0, 1]`, or all fan-outs equal
/// (slope undetermined); `eps` outside `(0, 0.5)`.
pub fn fit_balance(fan_out: &[f64], activity: &[f64], options: FitOptions) -> Result<BalanceFit> {
    let eps = options.eps;
    check_value("eps", eps, eps > 0.0 && eps < 0.5, "a number in (0, 0.5)")?;
    if fan_out.is_empty() {
        return Err(TheoryError::Empty { field: "fan_out" });
    }
    crate::solver::check_activity("activity", activity)?;
    if fan_out.len() != activity.len() {
        return Err(TheoryError::LengthMismatch {
            left: "fan_out",
            left_len: fan_out.len(),
            right: "activity",
            right_len: activity.len(),
        });
    }
    for (index, &value) in fan_out.iter().enumerate() {
        if !value.is_finite() {
            return Err(TheoryError::InvalidElement {
                field: "fan_out",
                index,
                value,
                expected: "a finite number",
            });
        }
    }
    let n = fan_out.len();
    if n < 3 {
        return Err(TheoryError::Degenerate {
            field: "fan_out",
            reason: format!("{n} points; the fit and its standard errors need at least 3"),
        });
    }
    let mut clamped = 0;
    let y: Vec<f64> = activity
        .iter()
        .map(|&a| {
            if a < eps || a > 1.0 - eps {
                clamped += 1;
            }
            inactivity_log_odds(a.clamp(eps, 1.0 - eps))
        })
        .collect();
    let nf = n as f64;
    let x_mean = crate::numeric::sum(fan_out.iter().copied()) / nf;
    let y_mean = crate::numeric::sum(y.iter().copied()) / nf;
    let sxx = crate::numeric::sum(fan_out.iter().map(|x| (x - x_mean).powi(2)));
    if sxx <= 0.0 || sxx <= (x_mean * x_mean) * nf * 1e-28 {
        return Err(TheoryError::Degenerate {
            field: "fan_out",
            reason: "all fan-outs are equal, so the slope is undetermined".into(),
        });
    }
    let sxy = crate::numeric::sum(
        fan_out
            .iter()
            .zip(&y)
            .map(|(x, yy)| (x - x_mean) * (yy - y_mean)),
    );
    let syy = crate::numeric::sum(y.iter().map(|yy| (yy - y_mean).powi(2)));
    let slope = sxy / sxx;
    let intercept = y_mean - slope * x_mean;
    let ssr = crate::numeric::sum(
        fan_out
            .iter()
            .zip(&y)
            .map(|(x, yy)| (yy - intercept - slope * x).powi(2)),
    );
    let r2 = if syy > 0.0 {
        (1.0 - ssr / syy).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let s2 = ssr / (nf - 2.0);
    Ok(BalanceFit {
        slope,
        intercept,
        r2,
        slope_se: (s2 / sxx).sqrt(),
        intercept_se: (s2 * (1.0 / nf + x_mean * x_mean / sxx)).sqrt(),
        residual_sd: s2.sqrt(),
        n,
        clamped,
        eps,
    })
}
