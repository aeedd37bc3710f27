//! Numerically stable scalar kernels shared by the solvers: everything in log space.

/// `ln(1 + e^x)` without overflow or loss of precision at either tail.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `ln(1 - e^l)` for `l <= 0`, accurate near both ends (`-inf` at `l = 0`).
pub fn log1mexp(l: f64) -> f64 {
    if l > -std::f64::consts::LN_2 {
        (-l.exp_m1()).ln()
    } else {
        (-l.exp()).ln_1p()
    }
}

/// The logistic function `1 / (1 + e^-x)`, exact at both tails.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The log-odds of inactivity `ln((1 - a) / a)` for `a` in `(0, 1)`.
pub fn inactivity_log_odds(a: f64) -> f64 {
    (-a).ln_1p() - a.ln()
}

/// Binary entropy in nats from `ln a` and `ln(1 - a)`, finite for every `a` including
/// values that underflow in linear space.
pub fn binary_entropy_from_logs(log_a: f64, log_1ma: f64) -> f64 {
    let a = log_a.exp();
    let b = log_1ma.exp();
    let mut h = 0.0;
    if a > 0.0 {
        h -= a * log_a;
    }
    if b > 0.0 {
        h -= b * log_1ma;
    }
    h
}

/// Binary entropy `H_b(a)` in nats; `0` at `a = 0` and `a = 1`.
pub fn binary_entropy(a: f64) -> f64 {
    if a <= 0.0 || a >= 1.0 {
        return 0.0;
    }
    binary_entropy_from_logs(a.ln(), (-a).ln_1p())
}

/// Neumaier-compensated sum: the error does not grow with the number of terms.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KahanSum {
    sum: f64,
    carry: f64,
}

impl KahanSum {
    pub(crate) fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.carry += (self.sum - t) + x;
        } else {
            self.carry += (x - t) + self.sum;
        }
        self.sum = t;
    }

    pub(crate) fn value(&self) -> f64 {
        self.sum + self.carry
    }
}

/// Compensated sum of a sequence.
pub(crate) fn sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut s = KahanSum::default();
    for x in xs {
        s.add(x);
    }
    s.value()
}

/// `ln(sum_i e^{l_i})` by the max-shift, in two passes; `-inf` for an empty or all `-inf` input.
pub(crate) fn log_sum_exp(ls: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = ls.clone().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + sum(ls.map(|l| (l - m).exp())).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_tails_are_exact() {
        assert_eq!(softplus(800.0), 800.0);
        assert_eq!(softplus(-800.0), 0.0);
        assert!((softplus(0.0) - std::f64::consts::LN_2).abs() < 1e-16);
        assert!((softplus(-40.0) - (-40.0f64).exp()).abs() < 1e-30);
    }

    #[test]
    fn log1mexp_matches_direct_form_in_the_middle() {
        for &l in &[-1e-12, -1e-3, -0.5, -1.0, -5.0] {
            let direct = (1.0 - f64::exp(l)).ln();
            let tol = if l > -1e-6 { 1e-6 } else { 1e-12 };
            assert!(
                ((log1mexp(l) - direct) / direct).abs() < tol,
                "l = {l}: {} vs {direct}",
                log1mexp(l)
            );
        }
        assert!((log1mexp(-1e-300) - (1e-300f64).ln()).abs() < 1e-9);
        // Far tail: ln(1 - e^l) = -e^l - e^{2l}/2 - ...
        let l = -50.0f64;
        assert!(((log1mexp(l) + l.exp()) / l.exp()).abs() < 1e-15);
    }

    #[test]
    fn log_sum_exp_handles_huge_spreads() {
        let v = [-1e6, -1e6 + 2.0f64.ln(), -2e6];
        let l = log_sum_exp(v.iter().copied());
        assert!((l - (-1e6 + 3.0f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn compensated_sum_beats_naive() {
        let mut xs = vec![1.0];
        xs.extend(std::iter::repeat_n(1e-16, 10_000));
        assert!((sum(xs.iter().copied()) - (1.0 + 1e-12)).abs() < 1e-16);
    }
}
