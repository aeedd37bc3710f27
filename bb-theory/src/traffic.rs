//! Traffic at balance: `t(k) = k a(k) = k / (1 + e^{beta k})`, and where it peaks.
//!
//! In `x = beta k`, `beta t = x / (1 + e^x)`; its derivative vanishes where
//! `1 + e^x (1 - x) = 0`, i.e. `(x - 1) e^{x - 1} = 1/e`, so `x* = 1 + W(1/e)` with `W` the
//! principal Lambert W. At the peak `e^{-x*} = W(1/e)`, hence `t* = W(1/e) / beta`.

use serde::{Deserialize, Serialize};

use crate::error::{check_value, Result};
use crate::lambert::lambert_w0;
use crate::numeric::softplus;

/// Traffic `k / (1 + e^{beta k})` of a unit with fan-out `k` on the balance line of `beta`.
///
/// # Errors
/// If `k` is not finite and `>= 0`, or `beta` is not finite and `>= 0`.
pub fn traffic(k: f64, beta: f64) -> Result<f64> {
    check_value("k", k, k.is_finite() && k >= 0.0, "a finite number >= 0")?;
    check_value(
        "beta",
        beta,
        beta.is_finite() && beta >= 0.0,
        "a finite number >= 0",
    )?;
    Ok(k * (-softplus(beta * k)).exp())
}

/// `d t / d k` at balance: `a (1 - x (1 - a))` with `x = beta k`, `a = 1/(1 + e^x)`.
///
/// # Errors
/// As [`traffic`].
pub fn traffic_slope(k: f64, beta: f64) -> Result<f64> {
    traffic(k, beta)?;
    let x = beta * k;
    let a = (-softplus(x)).exp();
    let one_minus_a = (-softplus(-x)).exp();
    Ok(a * (1.0 - x * one_minus_a))
}

/// The maximum of the traffic over `k` for a given `beta`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrafficPeak {
    /// The multiplier.
    pub beta: f64,
    /// The dimensionless peak location `beta k* = 1 + W(1/e)`.
    pub x_star: f64,
    /// The fan-out of the busiest unit, `k* = x* / beta`.
    pub k_star: f64,
    /// The peak traffic, `t* = k* / (1 + e^{x*}) = W(1/e) / beta`.
    pub t_star: f64,
    /// The activity at the peak, `1 / (1 + e^{x*})`.
    pub a_star: f64,
}

/// `1 + W(1/e)`, from the Lambert-W routine.
pub fn traffic_peak_point() -> f64 {
    // 1/e is inside W's domain, so this cannot fail.
    1.0 + lambert_w0(1.0 / std::f64::consts::E).unwrap_or(f64::NAN)
}

/// Where the traffic at balance peaks, for `beta > 0`.
///
/// # Errors
/// If `beta` is not finite and `> 0`.
pub fn traffic_peak(beta: f64) -> Result<TrafficPeak> {
    check_value(
        "beta",
        beta,
        beta.is_finite() && beta > 0.0,
        "a finite number > 0",
    )?;
    let x_star = traffic_peak_point();
    let k_star = x_star / beta;
    let a_star = (-softplus(x_star)).exp();
    Ok(TrafficPeak {
        beta,
        x_star,
        k_star,
        t_star: k_star * a_star,
        a_star,
    })
}
