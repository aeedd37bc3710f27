//! The pruner as a whole: the activity EMA, schedules, serde round trips of every plugin and
//! of the whole state, the plugin registry, and validation errors that name what is wrong.

mod common;

use bb_core::{
    registered_policies, registered_trackers, Activations, ActivityTracker, BudgetPolicy, Pruner,
    PrunerConfig, Schedule, Topology,
};
use common::*;
use rand::Rng;

/// Property 6: the EMA of a constant on-rate p converges to p at the rate its decay sets:
/// |a_t - p| = decay^t |a_0 - p|.
#[test]
fn ema_converges_at_its_decay_rate() {
    for (decay, p_on) in [(0.95, 0.2), (0.5, 0.9), (0.99, 0.0)] {
        let topo = Topology::chain(&["h", "o"], &[4, 5, 2]).unwrap();
        let text = format!(
            "[tracker]\nkind = \"ema_on_rate\"\ndecay = {decay}\n[policy]\nkind = \"dense\"\n"
        );
        let mut p = Pruner::new(PrunerConfig::from_toml_str(&text).unwrap(), topo).unwrap();
        for t in 1..=60 {
            observe_rates(&mut p, "h", &[p_on; 5], 10);
            let want = p_on + (0.5 - p_on) * f64::powi(decay, t);
            for &a in p.activity("h").unwrap() {
                assert!((a - want).abs() < 1e-12, "t={t} a={a} want={want}");
            }
        }
    }
}

/// The plain `[batch, units]` path (tiles of units with integer counters) agrees with the
/// unit-major path and a hand count, for a population spanning several tiles with a short
/// last one, and finds a non-finite value in the last tile.
#[test]
fn batch_major_counts_agree_across_tiles() {
    let (b, u) = (7, 1100);
    let mut r = rng(4);
    let bm: Vec<f32> = (0..b * u).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    let mut um = vec![0.0; bm.len()];
    for bi in 0..b {
        for ui in 0..u {
            um[ui * b + bi] = bm[bi * u + ui];
        }
    }
    let t = bb_core::tracker::EmaOnRate::default();
    let (mut r1, mut r2, mut s) = (vec![0.5; u], vec![0.5; u], Vec::new());
    t.observe(&mut r1, &Activations::batch_major(&bm, b, u), &mut s)
        .unwrap();
    t.observe(&mut r2, &Activations::unit_major(&um, u, 1, b), &mut s)
        .unwrap();
    assert_eq!(r1, r2);
    for ui in [0, 511, 512, 1023, 1024, 1099] {
        let on = (0..b).filter(|&bi| bm[bi * u + ui] > 0.0).count();
        let want = 0.95 * 0.5 + 0.05 * on as f64 / b as f64;
        assert!((r1[ui] - want).abs() < 1e-15, "unit {ui}");
    }
    let mut bad = bm.clone();
    bad[3 * u + 1090] = f32::NAN;
    assert!(t
        .observe(&mut r1, &Activations::batch_major(&bad, b, u), &mut s)
        .is_err());
}

/// The tracker reads every layout the same way: [batch, units, positions] and the
/// channel-major [units, positions, batch].
#[test]
fn tracker_layouts_agree() {
    let (b, u, pos) = (3, 4, 5);
    let mut r = rng(1);
    let bm: Vec<f32> = (0..b * u * pos)
        .map(|_| r.gen_range(-1.0f32..1.0))
        .collect();
    let mut um = vec![0.0; bm.len()];
    for bi in 0..b {
        for ui in 0..u {
            for pi in 0..pos {
                um[(ui * pos + pi) * b + bi] = bm[(bi * u + ui) * pos + pi];
            }
        }
    }
    let t = bb_core::tracker::EmaOnRate::default();
    let (mut r1, mut r2, mut s) = (vec![0.5; u], vec![0.5; u], Vec::new());
    t.observe(
        &mut r1,
        &Activations::batch_major_positions(&bm, b, u, pos),
        &mut s,
    )
    .unwrap();
    t.observe(&mut r2, &Activations::unit_major(&um, u, pos, b), &mut s)
        .unwrap();
    assert_eq!(r1, r2);
    let arr = ndarray::ArrayD::from_shape_vec(vec![b, u, pos], bm.clone()).unwrap();
    let view = arr.view();
    let mut r3 = vec![0.5; u];
    t.observe(&mut r3, &Activations::from_array(&view).unwrap(), &mut s)
        .unwrap();
    assert_eq!(r1, r3);
    // Hand computation for unit 0.
    let on = (0..b)
        .flat_map(|bi| (0..pos).map(move |pi| (bi, pi)))
        .filter(|&(bi, pi)| bm[(bi * u) * pos + pi] > 0.0)
        .count();
    assert!((r1[0] - (0.95 * 0.5 + 0.05 * on as f64 / (b * pos) as f64)).abs() < 1e-15);
}

#[test]
fn schedule_timing() {
    let s = Schedule {
        warmup_steps: Some(100),
        refresh_every: 25,
        freeze_step: Some(175),
        total_steps: None,
    };
    let steps: Vec<u64> = (1..400).filter(|&t| s.is_refresh(t)).collect();
    assert_eq!(steps, vec![100, 125, 150, 175]);
    let s = Schedule {
        warmup_steps: None,
        refresh_every: 10,
        freeze_step: None,
        total_steps: Some(50),
    };
    assert_eq!(s.warmup(), 5);
    assert_eq!(
        (1..40).filter(|&t| s.is_refresh(t)).collect::<Vec<_>>(),
        vec![5, 15, 25, 35]
    );
    let s = Schedule {
        warmup_steps: Some(0),
        refresh_every: 10,
        freeze_step: None,
        total_steps: None,
    };
    assert_eq!(
        (1..31).filter(|&t| s.is_refresh(t)).collect::<Vec<_>>(),
        vec![10, 20, 30]
    );
}

const POLICIES: &[&str] = &[
    "kind = \"balance\"\nbeta = 0.3\nd0 = 4.0",
    "kind = \"balance\"\nbeta = 0.3\ntarget_density = 0.4\nscope = \"model\"",
    "kind = \"traffic_threshold\"\ntau = 3.0\nbeta = 0.5\nd0 = 2.0",
    "kind = \"two_threshold\"\nmin_keep = 2",
    "kind = \"quantile_interpolation\"",
    "kind = \"inverse_rate\"\nd0 = 2.0",
    "kind = \"activity_only\"\ntarget_density = 0.5",
    "kind = \"dense\"",
    "kind = \"random\"\ntarget_density = 0.5",
    "kind = \"magnitude\"\ntarget_density = 0.5\nscope = \"global\"",
    "kind = \"gmp\"\ntarget_density = 0.3",
    "kind = \"rigl\"\ntarget_density = 0.4",
    "kind = \"set\"\ntarget_density = 0.4",
];

fn config_text(policy: &str, tracker: &str, actuator: &str) -> String {
    format!(
        "seed = 3\n[schedule]\nwarmup_steps = 2\nrefresh_every = 3\ntotal_steps = 40\n[tracker]\n{tracker}\n[policy]\n{policy}\n[actuator]\n{actuator}\n"
    )
}

/// Runs `p` for `steps` steps on a deterministic stream; returns the masks as bytes.
fn drive(p: &mut Pruner, ws: &mut [Vec<f32>], seed: u64, steps: usize) -> Vec<Vec<u8>> {
    let mut r = rng(seed);
    for _ in 0..steps {
        for (name, n) in [("input", 12), ("a", 10), ("b", 8)] {
            let x: Vec<f32> = (0..6 * n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
            p.observe(name, Activations::batch_major(&x, 6, n)).unwrap();
        }
        let grads: Vec<Vec<f32>> = ws
            .iter()
            .map(|w| (0..w.len()).map(|_| r.gen_range(-1.0f32..1.0)).collect())
            .collect();
        for w in ws.iter_mut() {
            for x in w.iter_mut() {
                *x += 0.05 * r.gen_range(-1.0f32..1.0);
            }
        }
        for (l, w) in ws.iter_mut().enumerate() {
            p.apply_mask(l, w).unwrap();
        }
        let g: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut refs: Vec<&mut [f32]> = ws.iter_mut().map(|w| w.as_mut_slice()).collect();
        p.step(&mut refs, Some(&g)).unwrap();
    }
    (0..3).map(|l| p.mask(l).to_bytes()).collect()
}

/// Property 7: every plugin round-trips through TOML and JSON, and a pruner saved mid-run
/// and loaded back produces identical masks on identical inputs.
#[test]
fn every_plugin_round_trips_and_resumes_identically() {
    let widths = [12, 10, 8, 4];
    for policy in POLICIES {
        for (tracker, actuator) in [
            (
                "kind = \"ema_on_rate\"\nthreshold = 0.1",
                "kind = \"sp_in\"",
            ),
            (
                "kind = \"ema_abs_zscore\"\ntemperature = 0.7",
                "kind = \"sp_out\"\nregrow = false",
            ),
        ] {
            let text = config_text(policy, tracker, actuator);
            let cfg = PrunerConfig::from_toml_str(&text).unwrap();
            // TOML and JSON round trips of the config.
            let toml_again = PrunerConfig::from_toml_str(&cfg.to_toml_string().unwrap()).unwrap();
            let json_again =
                PrunerConfig::from_json_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
            let v = serde_json::to_value(&cfg).unwrap();
            assert_eq!(serde_json::to_value(&toml_again).unwrap(), v, "{policy}");
            assert_eq!(serde_json::to_value(&json_again).unwrap(), v, "{policy}");
            // Whole-state round trip mid-run.
            let topo = Topology::chain(&["a", "b", "c"], &widths).unwrap();
            let mut ws: Vec<Vec<f32>> = widths
                .windows(2)
                .map(|w| random_weights(&mut rng(8), w[0] * w[1], false))
                .collect();
            let mut p = Pruner::new(cfg, topo).unwrap();
            drive(&mut p, &mut ws, 1, 13);
            let saved = p.to_json().unwrap();
            let mut q = Pruner::from_json(&saved).unwrap();
            let mut ws2 = ws.clone();
            let a = drive(&mut p, &mut ws, 2, 20);
            let b = drive(&mut q, &mut ws2, 2, 20);
            assert_eq!(a, b, "{policy} / {actuator}: resumed pruner diverged");
            assert_eq!(ws, ws2, "{policy}: weights diverged");
            assert_eq!(p.to_json().unwrap(), q.to_json().unwrap());
        }
    }
}

/// Property 8: every built-in kind is registered (a plugin that fails to link is caught), and
/// an unknown kind names the known ones.
#[test]
fn registry_lists_every_kind() {
    let want = [
        "activity_only",
        "balance",
        "dense",
        "gmp",
        "inverse_rate",
        "magnitude",
        "quantile_interpolation",
        "random",
        "rigl",
        "set",
        "traffic_threshold",
        "two_threshold",
    ];
    assert_eq!(registered_policies(), want);
    assert_eq!(registered_trackers(), ["ema_abs_zscore", "ema_on_rate"]);
    let err = PrunerConfig::from_toml_str("[policy]\nkind = \"balanse\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("balanse") && err.contains("balance") && err.contains("rigl"),
        "{err}"
    );
    let _: Option<Box<dyn BudgetPolicy>> = None;
    let _: Option<Box<dyn ActivityTracker>> = None;
}

fn config_err(text: &str) -> String {
    PrunerConfig::from_toml_str(text).unwrap_err().to_string()
}

/// Property 9: each invalid input gives an error naming the field, layer or population.
#[test]
fn invalid_inputs_name_what_is_wrong() {
    let cases = [
        (
            "[policy]\nkind = \"balance\"\nbeta = -1.0\nd0 = 1.0",
            "policy.beta",
        ),
        (
            "[policy]\nkind = \"balance\"\nbeta = 0.0\nd0 = 1.0",
            "policy.beta",
        ),
        (
            "[tracker]\nkind = \"ema_on_rate\"\ndecay = 1.0\n[policy]\nkind = \"dense\"",
            "tracker.decay",
        ),
        (
            "[tracker]\nkind = \"ema_on_rate\"\ndecay = 0.0\n[policy]\nkind = \"dense\"",
            "tracker.decay",
        ),
        (
            "[policy]\nkind = \"balance\"\nbeta = 1.0\ntarget_density = 1.5",
            "policy.target_density",
        ),
        (
            "[policy]\nkind = \"balance\"\nbeta = 1.0\ntarget_density = 0.0",
            "policy.target_density",
        ),
        (
            "[policy]\nkind = \"magnitude\"\ntarget_density = -0.1",
            "policy.target_density",
        ),
        (
            "[policy]\nkind = \"traffic_threshold\"\ntau = -2.0\nrule = \"proportional\"",
            "policy.tau",
        ),
        ("[policy]\nkind = \"balance\"\nbeta = 1.0", "policy.d0"),
        (
            "[policy]\nkind = \"balance\"\nbeta = 1.0\nd0 = 1.0\nbta = 2.0",
            "bta",
        ),
        (
            "[schedule]\nrefresh_every = 0\n[policy]\nkind = \"dense\"",
            "schedule.refresh_every",
        ),
    ];
    for (text, field) in cases {
        let e = config_err(text);
        assert!(e.contains(field), "expected `{field}` in: {e}");
    }
    // k_min > D names the layer.
    let topo = Topology::chain(&["h", "o"], &[4, 6, 2]).unwrap();
    let cfg = PrunerConfig::from_toml_str(
        "[policy]\nkind = \"balance\"\nbeta = 1.0\nd0 = 1.0\nk_min = 5",
    )
    .unwrap();
    let e = Pruner::new(cfg, topo).unwrap_err().to_string();
    assert!(e.contains("`h`") && e.contains("k_min"), "{e}");
    // Unknown layer override.
    let topo = Topology::chain(&["h", "o"], &[4, 6, 2]).unwrap();
    let cfg = PrunerConfig::from_toml_str("[policy]\nkind = \"dense\"\n[layers.fc9]\nprune = true")
        .unwrap();
    assert!(Pruner::new(cfg, topo)
        .unwrap_err()
        .to_string()
        .contains("layers.fc9"));
    // Mismatched shapes and non-finite values.
    let topo = Topology::chain(&["h", "o"], &[4, 6, 2]).unwrap();
    let cfg =
        PrunerConfig::from_toml_str("[policy]\nkind = \"balance\"\nbeta = 1.0\nd0 = 2.0").unwrap();
    let mut p = Pruner::new(cfg, topo).unwrap();
    let e = p
        .observe("h", Activations::batch_major(&[0.0; 10], 2, 5))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`h`") && e.contains("6 units"), "{e}");
    let e = p
        .observe("h", Activations::batch_major(&[0.0; 11], 2, 6))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`h`"), "{e}");
    let mut x = vec![0.0f32; 12];
    x[7] = f32::NAN;
    let e = p
        .observe("h", Activations::batch_major(&x, 2, 6))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`h`") && e.contains("index 7"), "{e}");
    x[7] = f32::INFINITY;
    assert!(p.observe("h", Activations::batch_major(&x, 2, 6)).is_err());
    // Positions (a conv layer's activations, both layouts): the bad value is named too, and
    // the rates are left as they were.
    let before = p.activity("h").unwrap().to_vec();
    let mut xc = vec![1.0f32; 2 * 6 * 40];
    xc[333] = f32::NEG_INFINITY;
    for acts in [
        Activations::batch_major_positions(&xc, 2, 6, 40),
        Activations::unit_major(&xc, 6, 40, 2),
    ] {
        let e = p.observe("h", acts).unwrap_err().to_string();
        assert!(e.contains("`h`") && e.contains("index 333"), "{e}");
    }
    assert_eq!(p.activity("h").unwrap(), &before[..]);
    let e = p
        .observe("nope", Activations::batch_major(&x, 2, 6))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope") && e.contains("known"), "{e}");
    p.observe("h", Activations::batch_major(&[1.0; 12], 2, 6))
        .unwrap();
    let (mut w1, mut w2) = (vec![0.1f32; 24], vec![0.1f32; 12]);
    w1[3] = f32::INFINITY;
    let e = p
        .refresh(&mut [&mut w1[..], &mut w2[..]], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`h`") && e.contains("non-finite"), "{e}");
    let mut short = [0.1f32; 23];
    let e = p
        .refresh(&mut [&mut short[..], &mut w2[..]], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`h`") && e.contains("23"), "{e}");
    let e = p.refresh(&mut [&mut w2[..]], None).unwrap_err().to_string();
    assert!(e.contains("weights"), "{e}");
    // A policy that needs an unobserved population says which.
    let topo = Topology::chain(&["h", "o"], &[4, 6, 2]).unwrap();
    let cfg =
        PrunerConfig::from_toml_str("[policy]\nkind = \"balance\"\nbeta = 1.0\nd0 = 2.0").unwrap();
    let mut p = Pruner::new(cfg, topo).unwrap();
    let (mut w1, mut w2) = (vec![0.1f32; 24], vec![0.1f32; 12]);
    let e = p
        .refresh(&mut [&mut w1[..], &mut w2[..]], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`h`") && e.contains("never observed"), "{e}");
    // Zero widths and a corrupt state.
    assert!(Topology::chain(&["h"], &[0, 3])
        .unwrap_err()
        .to_string()
        .contains("input"));
    assert!(Pruner::from_json("{").is_err());
}

/// A mask set between refreshes is counted again: without regrowth the policy caps every
/// unit at its current degree, so a refresh after `set_mask` must see the new degrees (the
/// same plan as a pruner restored from that state, whose scratch is fresh).
#[test]
fn a_mask_set_between_refreshes_is_counted_again() {
    for actuator in ["sp_in", "sp_out"] {
        let text = format!(
            "[policy]\nkind = \"balance\"\nbeta = 0.05\ntarget_density = 0.1\n\
             [actuator]\nkind = \"{actuator}\"\nregrow = false\n[layers.layer]\nprune = true\n"
        );
        let topo = Topology::new()
            .population("in", 200)
            .population("out", 64)
            .conv_layer("layer", "in", "out", &[]);
        let mut p = Pruner::new(PrunerConfig::from_toml_str(&text).unwrap(), topo).unwrap();
        let mut r = rng(21);
        let pop = if actuator == "sp_in" { "out" } else { "in" };
        let n = if actuator == "sp_in" { 64 } else { 200 };
        let rates: Vec<f64> = (0..n).map(|_| r.gen_range(0.01..0.99)).collect();
        p.set_activity(pop, &rates).unwrap();
        let mut w = random_weights(&mut r, 64 * 200, false);
        p.refresh(&mut [&mut w[..]], None).unwrap();
        // A denser mask than the refresh left (a third to a half of each row), so that the
        // next refresh can meet its target from the new degrees.
        let mut m = p.mask(0).clone();
        for o in 0..64 {
            for i in 0..200 {
                m.set(o, i, (o * 7 + i) % (2 + o % 2) == 0);
            }
        }
        p.set_mask(0, m, &mut w).unwrap();
        let mut q = Pruner::from_json(&p.to_json().unwrap()).unwrap();
        let mut w2 = w.clone();
        let a = p.refresh(&mut [&mut w[..]], None).unwrap();
        let b = q.refresh(&mut [&mut w2[..]], None).unwrap();
        assert_eq!(a, b, "{actuator}");
        assert!(p.mask(0) == q.mask(0), "{actuator}");
        assert_eq!(w, w2, "{actuator}");
    }
}
