//! The principal branch `W_0` of the Lambert W function, by Halley iteration.
//!
//! `W_0(x)` is the solution `w >= -1` of `w e^w = x`, defined for `x >= -1/e`.

use crate::error::{check_value, Result};

const INV_E: f64 = 1.0 / std::f64::consts::E;

/// Principal branch of the Lambert W function.
///
/// Accurate to a few ulps of `w` away from the branch point `x = -1/e`, where the function has a
/// square-root singularity and any method loses about half the digits of `x + 1/e`.
///
/// # Errors
/// [`TheoryError::InvalidValue`](crate::TheoryError::InvalidValue) naming `x` if `x` is NaN,
/// infinite or below `-1/e`.
pub fn lambert_w0(x: f64) -> Result<f64> {
    check_value(
        "x",
        x,
        x.is_finite() && x >= -INV_E,
        "a finite number >= -1/e",
    )?;
    if x == 0.0 {
        return Ok(0.0);
    }
    // Distance to the branch point. `INV_E` exceeds 1/e by 1.2428753672788363e-17; subtracting
    // that keeps the distance accurate for `x` just above the branch point.
    let q = (x + INV_E) - 1.242_875_367_278_836_3e-17;
    if q <= 0.0 {
        // Only `x = -INV_E` itself lands here: it lies below the branch point by less than
        // the rounding of 1/e.
        return Ok(-1.0);
    }
    if x > std::f64::consts::E {
        return Ok(halley_log_form(x));
    }
    let mut w = if q < 0.05 {
        // Series about the branch point in p = sqrt(2 (e x + 1)).
        let p = (2.0 * std::f64::consts::E * q).sqrt();
        -1.0 + p * (1.0 + p * (-1.0 / 3.0 + p * (11.0 / 72.0)))
    } else {
        // ln(1 + x) is within a few tenths of W on [-1/e + 0.05, e].
        x.ln_1p()
    };
    for _ in 0..64 {
        let ew = w.exp();
        let f = w * ew - x;
        let wp1 = w + 1.0;
        if wp1.abs() < 1e-300 {
            break;
        }
        let denom = ew * wp1 - (w + 2.0) * f / (2.0 * wp1);
        if denom == 0.0 || !denom.is_finite() {
            break;
        }
        let step = f / denom;
        w -= step;
        if step.abs() <= 4.0 * f64::EPSILON * w.abs().max(f64::MIN_POSITIVE) {
            break;
        }
    }
    Ok(w)
}

/// For large `x`: solve `h(w) = w + ln w - ln x = 0` by Halley's method; no `e^w` is formed,
/// so nothing overflows up to `f64::MAX`.
fn halley_log_form(x: f64) -> f64 {
    let lx = x.ln();
    let llx = lx.ln();
    let mut w = lx - llx + llx / lx;
    for _ in 0..64 {
        let h = w + w.ln() - lx;
        let h1 = 1.0 + 1.0 / w;
        let h2 = -1.0 / (w * w);
        let step = h / (h1 - h * h2 / (2.0 * h1));
        w -= step;
        if step.abs() <= 4.0 * f64::EPSILON * w.abs() {
            break;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `w e^w = x` to `tol` relative, scaled by the condition `1 + |w|` of `x` in `w`;
    /// in log form (`w + ln w = ln x`) where `w e^w` would overflow.
    fn check(x: f64, tol: f64) {
        let w = lambert_w0(x).unwrap();
        let err = if x > 1e300 {
            (w + w.ln() - x.ln()).abs()
        } else {
            ((w * w.exp() - x) / x.abs()).abs()
        };
        assert!(
            err <= tol * (1.0 + w.abs()),
            "x = {x}: w = {w}, error {err}"
        );
        assert!(w >= -1.0);
    }

    #[test]
    fn inverts_w_exp_w_over_the_range() {
        for i in -300..=300 {
            let x = 10f64.powf(i as f64);
            check(x, 1e-14);
            if x < INV_E {
                check(-x, 1e-14);
            }
        }
        for i in 1..100 {
            check(-INV_E + (i as f64) * 1e-3, 1e-12);
        }
        check(f64::MAX, 1e-14);
    }

    #[test]
    fn branch_point_and_errors() {
        assert_eq!(lambert_w0(-INV_E).unwrap(), -1.0);
        assert!(lambert_w0(-0.4).is_err());
        assert!(lambert_w0(f64::NAN).is_err());
        assert!(lambert_w0(f64::INFINITY).is_err());
    }
}
