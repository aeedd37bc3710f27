//! Property and numerical tests of bb-theory: the entropy-under-budget solver, its inverses,
//! the balance fit, the traffic peak, the linear response of the actuators, the BB dynamics
//! and the DNF scaling routine.

use bb_theory::numeric::{binary_entropy, inactivity_log_odds};
use bb_theory::{
    beta_for_budget, budget_for_beta, entropy, fit_balance, kkt_residuals, lambert_w0, solve,
    traffic, traffic_peak, traffic_peak_point, FitOptions, TheoryError,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inactivity log-odds of a solution's unit `i`, computed here from the reported activity when
/// it is a normal float, and from the reported log-activity where the activity underflowed.
fn log_odds(sol: &bb_theory::Solution, i: usize) -> f64 {
    let a = sol.activity[i];
    if a >= f64::MIN_POSITIVE {
        inactivity_log_odds(a)
    } else {
        // a < 1e-308: ln(1 - a) is 0 to double precision.
        -sol.log_activity[i]
    }
}

/// Fan-outs: 1 to 1000 units with degrees 1 to 10^4, log-uniform so that small and large
/// degrees both occur.
fn fan_outs() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(0.0f64..4.0, 1..=1000).prop_map(|e| {
        e.into_iter()
            .map(|x| 10f64.powf(x).round().max(1.0))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Stationarity to 1e-9 relative, the budget met to 1e-9 relative, and no feasible
    /// perturbation along the budget surface raises the entropy.
    #[test]
    fn solver_meets_kkt_and_is_a_maximum(
        k in fan_outs(),
        frac in 1e-6f64..1.0,
        seed in any::<u64>(),
    ) {
        let total: f64 = k.iter().sum();
        let budget = frac * 0.5 * total;
        let sol = solve(&k, budget).unwrap();
        prop_assert!(sol.beta > 0.0);
        for (i, &ki) in k.iter().enumerate() {
            let x = sol.beta * ki;
            let r = (log_odds(&sol, i) - x).abs() / x.max(1.0);
            prop_assert!(r <= 1e-9, "unit {i}: log-odds {} vs beta k {x}", log_odds(&sol, i));
        }
        let spent: f64 = k.iter().zip(&sol.activity).map(|(k, a)| k * a).sum();
        prop_assert!(((spent - budget) / budget).abs() <= 1e-9, "spent {spent} vs budget {budget}");
        prop_assert!(sol.kkt.max() <= 1e-9, "{:?}", sol.kkt);

        // Perturb along the budget surface: d_i = a_i (1 - a_i) z_i projected so that
        // sum k_i d_i = 0 (with the same weights, which keeps a + eps d inside (0, 1)).
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f64> = sol.activity.iter().map(|a| a * (1.0 - a)).collect();
        let wk: f64 = w.iter().zip(&k).map(|(w, k)| w * k).sum();
        if k.len() >= 2 && wk > 0.0 {
            for _ in 0..4 {
                let z: Vec<f64> = (0..k.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let zk: f64 = z.iter().zip(&w).zip(&k).map(|((z, w), k)| z * w * k).sum();
                let d: Vec<f64> = z.iter().zip(&w).map(|(z, w)| w * (z - zk / wk)).collect();
                for eps in [1e-2, 1e-4] {
                    let moved: Vec<f64> = sol.activity.iter().zip(&d).map(|(a, d)| a + eps * d).collect();
                    if moved.iter().any(|&a| !(a > 0.0 && a < 1.0)) {
                        continue;
                    }
                    // Entropy change, summed per unit so that the large common part cancels.
                    let dh: f64 = sol.activity.iter().zip(&moved)
                        .map(|(&a, &b)| binary_entropy(b) - binary_entropy(a)).sum();
                    let scale: f64 = sol.activity.iter().map(|&a| binary_entropy(a)).sum::<f64>().max(1.0);
                    prop_assert!(dh <= 1e-13 * scale, "entropy rose by {dh} (eps {eps})");
                }
            }
        }
    }

    /// The spent budget falls strictly with beta, and the inverse problems undo each other.
    #[test]
    fn spent_budget_is_monotone_and_inverses_agree(
        k in fan_outs(),
        b1 in 1e-4f64..10.0,
        b2 in 1e-4f64..10.0,
    ) {
        let kmax = k.iter().copied().fold(0.0, f64::max);
        let (lo, hi) = if b1 < b2 { (b1, b2) } else { (b2, b1) };
        prop_assume!(hi > lo * (1.0 + 1e-9));
        // Scale beta so beta k is O(1) for the largest unit.
        let (lo, hi) = (lo / kmax, hi / kmax);
        let t_lo = budget_for_beta(&k, lo).unwrap();
        let t_hi = budget_for_beta(&k, hi).unwrap();
        prop_assert!(t_hi < t_lo, "T({hi}) = {t_hi} >= T({lo}) = {t_lo}");
        let total: f64 = k.iter().sum();
        prop_assert!(t_lo < 0.5 * total);
        let back = beta_for_budget(&k, t_hi).unwrap();
        prop_assert!(((back - hi) / hi).abs() <= 1e-8, "beta {hi} -> T {t_hi} -> beta {back}");
    }
}

#[test]
fn slack_budget_gives_beta_zero_and_half_activity() {
    let k = [1.0, 5.0, 30.0, 1e4];
    let total: f64 = k.iter().sum();
    for budget in [0.5 * total, 0.7 * total, 10.0 * total] {
        let sol = solve(&k, budget).unwrap();
        assert_eq!(sol.beta, 0.0);
        assert!(sol.slack);
        assert!(sol.activity.iter().all(|&a| a == 0.5));
        assert!((sol.entropy - 4.0 * std::f64::consts::LN_2).abs() < 1e-14);
        assert!(sol.kkt.max() <= 1e-15, "{:?}", sol.kkt);
    }
    // Just below the slack threshold the constraint binds with a small positive beta.
    let sol = solve(&k, 0.5 * total * (1.0 - 1e-6)).unwrap();
    assert!(sol.beta > 0.0 && !sol.slack);
    assert!(sol.kkt.max() <= 1e-9, "{:?}", sol.kkt);
}

#[test]
fn solver_is_robust_at_extreme_scales() {
    // Degrees 1 to 1e6 and budgets down to 1e-9 of sum k, and one far below that.
    let mut k: Vec<f64> = (0..=60)
        .map(|i| 10f64.powf(i as f64 / 10.0).round())
        .collect();
    k.extend([1e6; 5]);
    let total: f64 = k.iter().sum();
    for frac in [0.49, 1e-1, 1e-3, 1e-6, 1e-9, 1e-30] {
        let sol = solve(&k, frac * total).unwrap();
        assert!(sol.beta.is_finite() && sol.beta > 0.0);
        assert!(sol
            .activity
            .iter()
            .all(|a| a.is_finite() && (0.0..=0.5).contains(a)));
        assert!(sol.log_activity.iter().all(|l| l.is_finite()));
        assert!(sol.entropy.is_finite() && sol.entropy >= 0.0);
        assert!(sol.kkt.max() <= 1e-9, "frac {frac}: {:?}", sol.kkt);
        assert!(((sol.spent - sol.budget) / sol.budget).abs() <= 1e-9);
    }
    // All units at 1e6 with a budget of 1e-9 of the total: a = 1e-9 each, beta tiny.
    let k = vec![1e6; 1000];
    let sol = solve(&k, 1e-9 * 1e9).unwrap();
    let expected_beta = ((1.0 - 1e-9f64) / 1e-9).ln() / 1e6;
    assert!(((sol.beta - expected_beta) / expected_beta).abs() < 1e-12);
}

#[test]
fn entropy_marginal_value_of_budget_is_beta() {
    // Envelope theorem: dH*/dT = beta. Central difference with h = 1e-4 T.
    let k: Vec<f64> = (1..=50).map(|i| (i * i) as f64).collect();
    let total: f64 = k.iter().sum();
    for frac in [0.02, 0.1, 0.3] {
        let t = frac * total;
        let h = 1e-4 * t;
        let up = solve(&k, t + h).unwrap().entropy;
        let down = solve(&k, t - h).unwrap().entropy;
        let beta = solve(&k, t).unwrap().beta;
        let slope = (up - down) / (2.0 * h);
        assert!(
            ((slope - beta) / beta).abs() < 1e-6,
            "dH/dT {slope} vs beta {beta}"
        );
    }
}

#[test]
fn kkt_check_rejects_a_wrong_candidate() {
    let k = [1.0, 2.0, 4.0, 8.0];
    let sol = solve(&k, 2.0).unwrap();
    let good = kkt_residuals(&k, 2.0, sol.beta, &sol.log_activity).unwrap();
    assert!(good.max() < 1e-12);
    let bad = kkt_residuals(&k, 2.0, 1.1 * sol.beta, &sol.log_activity).unwrap();
    assert!(bad.stationarity > 1e-3);
    let over: Vec<f64> = sol.log_activity.iter().map(|l| l + 0.1).collect();
    let bad = kkt_residuals(&k, 2.0, sol.beta, &over).unwrap();
    assert!(bad.primal_feasibility > 1e-3);
    assert!(bad.complementary_slackness > 1e-3);
    let bad = kkt_residuals(&k, 2.0, -0.5, &sol.log_activity).unwrap();
    assert_eq!(bad.dual_feasibility, 0.5);
}

#[test]
fn bad_inputs_are_errors_that_name_the_field() {
    let field = |e: TheoryError| match e {
        TheoryError::Empty { field }
        | TheoryError::InvalidElement { field, .. }
        | TheoryError::InvalidValue { field, .. }
        | TheoryError::Degenerate { field, .. } => field,
        TheoryError::LengthMismatch { right, .. } => right,
        TheoryError::Engine(_) => "engine",
    };
    assert_eq!(field(solve(&[], 1.0).unwrap_err()), "fan_out");
    assert_eq!(field(solve(&[1.0, 0.0], 1.0).unwrap_err()), "fan_out");
    assert_eq!(field(solve(&[1.0, f64::NAN], 1.0).unwrap_err()), "fan_out");
    assert_eq!(field(solve(&[1.0], 0.0).unwrap_err()), "budget");
    assert_eq!(field(solve(&[1.0], f64::INFINITY).unwrap_err()), "budget");
    assert_eq!(field(budget_for_beta(&[1.0], -1.0).unwrap_err()), "beta");
    assert_eq!(field(entropy(&[0.5, 1.5]).unwrap_err()), "activity");
    assert_eq!(field(lambert_w0(-1.0).unwrap_err()), "x");
    assert_eq!(field(traffic_peak(0.0).unwrap_err()), "beta");
    let opts = FitOptions::default();
    assert_eq!(
        field(fit_balance(&[1.0, 2.0], &[0.1, 0.2], opts).unwrap_err()),
        "fan_out"
    );
    assert_eq!(
        field(fit_balance(&[1.0, 2.0, 3.0], &[0.1, 0.2], opts).unwrap_err()),
        "activity"
    );
    assert_eq!(
        field(fit_balance(&[2.0; 4], &[0.1, 0.2, 0.3, 0.4], opts).unwrap_err()),
        "fan_out"
    );
    assert_eq!(
        field(fit_balance(&[1.0, 2.0, 3.0], &[0.1, -0.2, 0.3], opts).unwrap_err()),
        "activity"
    );
    let bad_eps = FitOptions { eps: 0.7 };
    assert_eq!(
        field(fit_balance(&[1.0, 2.0, 3.0], &[0.1, 0.2, 0.3], bad_eps).unwrap_err()),
        "eps"
    );
    let msg = solve(&[1.0, -3.0], 1.0).unwrap_err().to_string();
    assert!(msg.contains("fan_out[1]"), "{msg}");
}

#[test]
fn traffic_peak_sits_at_one_plus_lambert_w_of_inverse_e() {
    let x = traffic_peak_point();
    // First-order condition of x / (1 + e^x): 1 + e^x (1 - x) = 0.
    let foc = 1.0 + x.exp() * (1.0 - x);
    assert!(foc.abs() <= 1e-12, "first-order residual {foc}");
    // W(1/e) itself: w e^w = 1/e.
    let w = x - 1.0;
    assert!((w * w.exp() - (-1.0f64).exp()).abs() <= 4.0 * f64::EPSILON * (-1.0f64).exp());
    for beta in [1e-3, 0.1, 1.0, 7.0] {
        let peak = traffic_peak(beta).unwrap();
        // Closed form of the height: t* = W(1/e) / beta.
        assert!(((peak.t_star - w / beta) / peak.t_star).abs() <= 1e-12);
        assert!((peak.t_star - traffic(peak.k_star, beta).unwrap()).abs() <= 1e-12 * peak.t_star);
        // It is a maximum: a grid of k around it never exceeds it.
        for i in 1..200 {
            let k = peak.k_star * (i as f64) / 100.0;
            assert!(traffic(k, beta).unwrap() <= peak.t_star * (1.0 + 1e-15));
        }
    }
}

#[test]
fn fit_recovers_a_noiseless_line_exactly() {
    for &(beta, c) in &[(0.05, 0.0), (0.3, -1.2), (1.5, 0.4)] {
        // beta k + c stays within +-8, inside the default clamp.
        let k: Vec<f64> = (1..=40).map(|i| i as f64 * 6.0 / (40.0 * beta)).collect();
        let a: Vec<f64> = k
            .iter()
            .map(|&k| 1.0 / (1.0 + f64::exp(beta * k + c)))
            .collect();
        let fit = fit_balance(&k, &a, FitOptions::default()).unwrap();
        assert!((fit.slope - beta).abs() <= 1e-9 * beta.max(1.0), "{fit:?}");
        assert!((fit.intercept - c).abs() <= 1e-9, "{fit:?}");
        assert!(fit.r2 > 1.0 - 1e-12);
        assert!(fit.slope_se < 1e-9);
        assert_eq!(fit.clamped, 0);
    }
}

#[test]
fn fit_clamps_saturated_activities() {
    let k = [1.0, 2.0, 3.0, 4.0];
    let a = [1.0, 0.5, 0.2, 0.0];
    let fit = fit_balance(&k, &a, FitOptions { eps: 1e-3 }).unwrap();
    assert_eq!(fit.clamped, 2);
    assert!(fit.slope.is_finite() && fit.slope > 0.0);
    // The clamped ends map to -+ln((1 - eps)/eps).
    let end = (0.999f64 / 0.001).ln();
    let y = [-end, 0.0, (0.8f64 / 0.2).ln(), end];
    let expected = {
        let xm = 2.5;
        let ym: f64 = y.iter().sum::<f64>() / 4.0;
        let sxy: f64 = k.iter().zip(&y).map(|(x, y)| (x - xm) * (y - ym)).sum();
        sxy / 5.0
    };
    assert!((fit.slope - expected).abs() < 1e-12);
}

/// Statistical design: the data follow the model the standard errors assume,
/// `y_i = beta k_i + c + e_i` with i.i.d. `e_i ~ N(0, 0.3^2)`, n = 100 points with
/// `k` on a fixed grid in [1, 20] (no activity is clamped: |y| < 5 throughout). Over 200 seeded
/// replicates the interval `slope +- 2 se` (Student t with 98 d.o.f. gives 2.0 about 95.2 %
/// coverage) should miss the true slope about 10 times. The test accepts 2 to 24 misses: under
/// the correct standard errors the miss count is Binomial(200, 0.048), for which
/// P(misses <= 1) < 1e-3 and P(misses >= 25) < 1e-4. Standard errors too small by a factor 1.5
/// would give about 50 misses and fail; too large by 1.5, about 1 miss, and fail. The same is
/// checked for the intercept. The seeds are fixed, so the test is deterministic.
#[test]
fn fit_recovers_a_noisy_line_within_its_standard_errors() {
    let (beta, c, sigma) = (0.2, -1.0, 0.3);
    let k: Vec<f64> = (0..100).map(|i| 1.0 + 19.0 * i as f64 / 99.0).collect();
    let mut slope_misses = 0;
    let mut intercept_misses = 0;
    for seed in 0..200u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(0xB0B0 + seed);
        let a: Vec<f64> = k
            .iter()
            .map(|&k| {
                // Box-Muller normal.
                let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
                let e = sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                1.0 / (1.0 + f64::exp(beta * k + c + e))
            })
            .collect();
        let fit = fit_balance(&k, &a, FitOptions::default()).unwrap();
        assert_eq!(fit.clamped, 0);
        if (fit.slope - beta).abs() > 2.0 * fit.slope_se {
            slope_misses += 1;
        }
        if (fit.intercept - c).abs() > 2.0 * fit.intercept_se {
            intercept_misses += 1;
        }
    }
    assert!(
        (2..=24).contains(&slope_misses),
        "slope missed {slope_misses}/200"
    );
    assert!(
        (2..=24).contains(&intercept_misses),
        "intercept missed {intercept_misses}/200"
    );
}

mod response {
    use bb_theory::{linear_response, ResponseConfig, TheoryError};

    fn small(feedback_gain: f64, beta: f64) -> ResponseConfig {
        ResponseConfig {
            feedback_gain,
            beta,
            steps: 600,
            probes: 6,
            ..ResponseConfig::default()
        }
    }

    /// Without feedback the answer is known by construction: a unit's activity depends only on
    /// its fan-in, so an SP-out cut cannot move it, and an SP-in cut cannot move its fan-out.
    #[test]
    fn feedforward_population_gives_the_constructed_verdict() {
        let r = linear_response(&small(0.0, 0.1)).unwrap();
        for u in &r.units {
            assert_eq!(u.sp_out.d_activity, 0.0, "unit {}", u.unit);
            assert_eq!(u.sp_out.d_fan_out, -1.0, "unit {}", u.unit);
            assert_eq!(u.sp_in.d_fan_out, 0.0, "unit {}", u.unit);
            assert!(u.sp_in.d_activity != 0.0, "unit {}", u.unit);
            assert_eq!(u.sp_in.activity_share, Some(1.0));
            assert_eq!(u.sp_out.activity_share, Some(0.0));
        }
        assert!(r.sp_in_mainly_moves_activity && r.sp_out_mainly_moves_audience && r.claim_holds);
    }

    /// With strong feedback and a vanishing beta the audience axis carries no weight
    /// (`beta |dk| -> 0`) while SP-out still moves activity through the feedback loop, so the
    /// routine must report that SP-out no longer mainly moves audience.
    #[test]
    fn strong_feedback_and_tiny_beta_overturn_the_sp_out_claim() {
        let r = linear_response(&small(8.0, 1e-4)).unwrap();
        assert!(r.sp_out.mean_abs_d_activity > 0.0);
        assert!(!r.sp_out_mainly_moves_audience, "{:?}", r.sp_out);
        assert!(!r.claim_holds);
        // SP-in is unaffected: its effect is still all on activity.
        assert!(r.sp_in_mainly_moves_activity);
    }

    #[test]
    fn bad_config_names_the_field() {
        let bad = ResponseConfig {
            p_in: 1.5,
            ..ResponseConfig::default()
        };
        match linear_response(&bad) {
            Err(TheoryError::InvalidValue { field, .. }) => assert_eq!(field, "p_in"),
            other => panic!("expected an error naming p_in, got {other:?}"),
        }
        let bad = ResponseConfig {
            probes: 100,
            ..ResponseConfig::default()
        };
        assert!(matches!(
            linear_response(&bad),
            Err(TheoryError::InvalidValue {
                field: "probes",
                ..
            })
        ));
    }
}

mod dynamics {
    use bb_theory::{simulate_dynamics, DynamicsConfig, TheoryError};

    /// The engine's balance rule (SP-out, d0 = 0, beta = 0.1) on 96 stochastic units, seeded.
    /// From the dense start (all fan-outs equal, so no balance) the population must reach the
    /// balance line within 5 refreshes and stay there: R^2 above 0.95, the fitted slope within
    /// 10 % of the rule's beta, and the log-odds distance to the solver's optimum below half
    /// its starting value.
    #[test]
    fn bb_dynamics_converge_to_the_balance_line() {
        let cfg = DynamicsConfig {
            refreshes: 12,
            ..DynamicsConfig::default()
        };
        let r = simulate_dynamics(&cfg).unwrap();
        assert_eq!(r.trajectory.len(), 13);
        let start = &r.trajectory[0];
        assert!(start.fit.is_none_or(|f| f.r2 < 0.5), "{start:?}");
        assert_eq!(start.density, 1.0);
        let first_good = r
            .trajectory
            .iter()
            .position(|p| {
                p.fit
                    .is_some_and(|f| f.r2 > 0.95 && (f.slope - cfg.beta).abs() < 0.1 * cfg.beta)
            })
            .expect("never reached the balance line");
        assert!(
            first_good <= 5,
            "balance reached only at refresh {first_good}"
        );
        for p in &r.trajectory[first_good..] {
            let f = p.fit.unwrap();
            assert!(f.r2 > 0.95, "refresh {}: {f:?}", p.refresh);
            assert!(
                (f.slope - cfg.beta).abs() < 0.1 * cfg.beta,
                "refresh {}: {f:?}",
                p.refresh
            );
            assert!(
                p.log_odds_distance < 0.5 * start.log_odds_distance,
                "refresh {}: distance {} vs start {}",
                p.refresh,
                p.log_odds_distance,
                start.log_odds_distance
            );
            assert!(p.entropy_gap < start.entropy_gap);
            assert!(p.density < 1.0);
        }
        assert!(r.fit_fc1.is_some() && r.fit_fc2.is_some());
        assert_eq!(r.units.len(), cfg.n_fc1 + cfg.n_fc2);
    }

    #[test]
    fn bad_config_names_the_field() {
        let bad = DynamicsConfig {
            beta: -1.0,
            ..DynamicsConfig::default()
        };
        assert!(matches!(
            simulate_dynamics(&bad),
            Err(TheoryError::InvalidValue { field: "beta", .. })
        ));
    }
}

mod dnf {
    use bb_theory::{dnf_scaling, DnfConfig, TheoryError};

    /// Small widths only (the full sweep is `bb theory scaling`): every run converges, the
    /// median steps grow with the width, the fits are reported and the best model is the one
    /// with the highest R^2, and a rerun with the same seed is identical.
    #[test]
    fn dnf_scaling_runs_and_reports_its_fits() {
        let cfg = DnfConfig {
            widths: vec![2, 3, 4],
            seeds: 3,
            ..DnfConfig::default()
        };
        let r = dnf_scaling(&cfg).unwrap();
        assert!(r.all_converged, "{:?}", r.widths);
        let medians: Vec<f64> = r.widths.iter().map(|w| w.median_steps.unwrap()).collect();
        assert!(medians.windows(2).all(|m| m[0] < m[1]), "{medians:?}");
        assert_eq!(r.fits.len(), 3);
        assert_eq!(r.fits[0].model, "W ln W");
        let best = r.fits.iter().max_by(|a, b| a.r2.total_cmp(&b.r2)).unwrap();
        assert_eq!(r.best_model.as_deref(), Some(best.model.as_str()));
        assert!(r.fits.iter().all(|f| f.r2 <= 1.0 + 1e-12));
        assert!(r.power.is_some_and(|p| p.alpha > 0.0));
        assert_eq!(dnf_scaling(&cfg).unwrap(), r);
    }

    #[test]
    fn bad_config_names_the_field() {
        let bad = DnfConfig {
            widths: vec![2, 1, 4],
            ..DnfConfig::default()
        };
        assert!(matches!(
            dnf_scaling(&bad),
            Err(TheoryError::InvalidElement {
                field: "widths",
                index: 1,
                ..
            })
        ));
        let bad = DnfConfig {
            target_accuracy: 0.3,
            ..DnfConfig::default()
        };
        assert!(matches!(
            dnf_scaling(&bad),
            Err(TheoryError::InvalidValue {
                field: "target_accuracy",
                ..
            })
        ));
    }
}
