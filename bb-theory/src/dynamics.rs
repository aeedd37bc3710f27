//! The BB dynamics simulator: does iterating the rule drive a population onto the balance line?
//!
//! # The population
//! A feedforward chain of stochastic binary units, `input -> fc1 -> fc2 -> fc3`:
//! - `n_in` inputs fire i.i.d. with probability `p_in`;
//! - each unit of `fc1` fires with probability `sigmoid(b_j + sum_i W1[j,i] x_i)`;
//! - each unit of `fc2` fires with probability `sigmoid(c_k + sum_j W2[k,j] h1_j)` over its
//!   kept inputs (dead edges of `W2` are zero);
//! - `fc3` only consumes `fc2`: it gives `fc2` its fan-out and is never simulated.
//!
//! The studied units are `fc1` and `fc2`. Their fan-outs are set by the engine itself: a
//! [`bb_core::Pruner`] with the `balance` policy (`d0 = 0`, so the rule's line passes through
//! the origin like the entropy optimum's) and the SP-out actuator observes the spikes with its
//! EMA tracker and, every `refresh_every` steps, re-selects the columns of `W2` (fan-outs of
//! `fc1`) and `W3` (fan-outs of `fc2`). Pruning `fc1`'s fan-out removes inputs of `fc2`, which
//! moves `fc2`'s activity and therefore its own target: the two populations settle together.
//! Biases spread the units' base log-odds of inactivity over `[0.3, 0.9 beta D]` so that the
//! balanced fan-outs span the range of possible degrees.
//!
//! # What is reported, per refresh
//! Each point is measured one full interval after its refresh, just before the next one: the
//! population has had time to respond to its new fan-outs, and the tracker to follow. Over all
//! studied units, with `a` the engine's tracked on-rates and `k` the fan-outs:
//! - the balance fit of `ln((1 - a)/a)` on `k` (fitted beta, intercept, R^2; `None` while
//!   every fan-out is equal, as in the dense start);
//! - the distance to the entropy optimum for the same fan-outs and the same spent traffic
//!   `T = sum a k`: the root mean square of `ln((1 - a_i)/a_i) - beta* k_i` (the solver's
//!   `beta*`), and the entropy the population leaves on the table, `H(a*) - H(a)` per unit.

use bb_core::{Activations, Pruner, PrunerConfig, Topology};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{check_value, Result, TheoryError};
use crate::fit::{fit_balance, BalanceFit, FitOptions, DEFAULT_CLAMP_EPS};
use crate::numeric::{inactivity_log_odds, sigmoid};
use crate::solver::{entropy, solve};

/// Parameters of the dynamics simulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicsConfig {
    /// Input units.
    pub n_in: usize,
    /// Units of `fc1` (studied).
    pub n_fc1: usize,
    /// Units of `fc2` (studied; also the largest fan-out of `fc1`).
    pub n_fc2: usize,
    /// Units of `fc3` (the largest fan-out of `fc2`).
    pub n_fc3: usize,
    /// Firing probability of each input.
    pub p_in: f64,
    /// The balance policy's `beta`.
    pub beta: f64,
    /// The balance policy's smallest degree.
    pub k_min: u32,
    /// Samples per step.
    pub batch: usize,
    /// Steps between refreshes (the engine's schedule).
    pub refresh_every: u64,
    /// Dense steps before the first refresh.
    pub warmup_steps: u64,
    /// Number of refreshes to run.
    pub refreshes: usize,
    /// EMA decay of the engine's on-rate tracker.
    pub decay: f64,
    /// Whether dead edges may come back (the actuator's `regrow`).
    pub regrow: bool,
    /// Seed of weights and spikes.
    pub seed: u64,
}

impl Default for DynamicsConfig {
    fn default() -> Self {
        Self {
            n_in: 32,
            n_fc1: 48,
            n_fc2: 48,
            n_fc3: 64,
            p_in: 0.3,
            beta: 0.1,
            k_min: 1,
            batch: 32,
            refresh_every: 25,
            warmup_steps: 25,
            refreshes: 20,
            decay: 0.95,
            regrow: true,
            seed: 0,
        }
    }
}

impl DynamicsConfig {
    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    /// [`TheoryError`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let count = |field: &'static str, v: usize| {
            check_value(
                field,
                v as f64,
                (2..=1 << 16).contains(&v),
                "an integer in [2, 65536]",
            )
        };
        count("n_in", self.n_in)?;
        count("n_fc1", self.n_fc1)?;
        count("n_fc2", self.n_fc2)?;
        count("n_fc3", self.n_fc3)?;
        count("batch", self.batch)?;
        check_value(
            "refreshes",
            self.refreshes as f64,
            self.refreshes >= 1,
            "at least 1",
        )?;
        check_value(
            "refresh_every",
            self.refresh_every as f64,
            self.refresh_every >= 1,
            "at least 1",
        )?;
        check_value(
            "p_in",
            self.p_in,
            self.p_in > 0.0 && self.p_in < 1.0,
            "a number in (0, 1)",
        )?;
        check_value(
            "beta",
            self.beta,
            self.beta.is_finite() && self.beta > 0.0,
            "a finite number > 0",
        )?;
        check_value(
            "k_min",
            f64::from(self.k_min),
            self.k_min >= 1 && (self.k_min as usize) < self.n_fc2.min(self.n_fc3),
            "an integer >= 1 below the largest fan-out",
        )?;
        check_value(
            "decay",
            self.decay,
            (0.0..1.0).contains(&self.decay),
            "a number in [0, 1)",
        )
    }

    fn pruner_toml(&self) -> String {
        format!(
            "seed = {seed}\n\
             [schedule]\nwarmup_steps = {w}\nrefresh_every = {r}\n\
             [tracker]\nkind = \"ema_on_rate\"\ndecay = {decay:?}\ninit = 0.5\n\
             [policy]\nkind = \"balance\"\nbeta = {beta:?}\nd0 = 0.0\nk_min = {kmin}\n\
             [actuator]\nkind = \"sp_out\"\nregrow = {regrow}\nrescale = \"none\"\n",
            seed = self.seed,
            w = self.warmup_steps,
            r = self.refresh_every,
            decay = self.decay,
            beta = self.beta,
            kmin = self.k_min,
            regrow = self.regrow,
        )
    }
}

/// The state of the population one interval after a refresh (refresh 0: the dense start),
/// measured just before the next refresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicsPoint {
    /// Refreshes run so far.
    pub refresh: usize,
    /// Engine steps so far.
    pub step: u64,
    /// The balance fit over all studied units (`None` while all fan-outs are equal).
    pub fit: Option<BalanceFit>,
    /// The solver's multiplier for the current fan-outs and spent traffic.
    pub optimum_beta: f64,
    /// Root mean square of `ln((1 - a_i)/a_i) - beta* k_i` over the studied units.
    pub log_odds_distance: f64,
    /// `(H(a*) - H(a)) / n` in nats: the entropy per unit left on the table.
    pub entropy_gap: f64,
    /// Live fraction of the pruned layers' edges.
    pub density: f64,
}

/// One studied unit at the end of the simulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitState {
    /// `"fc1"` or `"fc2"`.
    pub population: String,
    /// Index within the population.
    pub unit: usize,
    /// Fan-out.
    pub fan_out: u32,
    /// Tracked on-rate.
    pub activity: f64,
    /// `ln((1 - a)/a)` with the fit's clamp.
    pub log_odds: f64,
}

/// The outcome of a dynamics simulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicsReport {
    /// The parameters used.
    pub config: DynamicsConfig,
    /// Refresh 0 (dense) and every refresh after, each measured one interval later.
    pub trajectory: Vec<DynamicsPoint>,
    /// Every studied unit at the end.
    pub units: Vec<UnitState>,
    /// The final balance fit over `fc1` alone.
    pub fit_fc1: Option<BalanceFit>,
    /// The final balance fit over `fc2` alone.
    pub fit_fc2: Option<BalanceFit>,
    /// Units whose fan-out sits at `k_min` or at the largest possible degree at the end.
    pub clipped_units: usize,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn engine(e: bb_core::BbError) -> TheoryError {
    TheoryError::Engine(e.to_string())
}

/// Biases that put unit `j` of `n` at base inactivity log-odds spread over `[0.3, hi]`,
/// given its mean input drive.
fn spread_biases(n: usize, hi: f64, mean_drive: impl Fn(usize) -> f64) -> Vec<f64> {
    (0..n)
        .map(|j| {
            let y = 0.3 + (hi - 0.3) * (j as f64 + 0.5) / n as f64;
            -y - mean_drive(j)
        })
        .collect()
}

/// Snapshot of the studied units: `(fan-outs, activities)` over fc1 then fc2.
fn snapshot(pruner: &Pruner) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut k = Vec::new();
    let mut a = Vec::new();
    for pop in ["fc1", "fc2"] {
        let fo = pruner
            .fan_out(pop)
            .ok_or_else(|| TheoryError::Engine(format!("no population {pop}")))?;
        let act = pruner
            .activity(pop)
            .ok_or_else(|| TheoryError::Engine(format!("no population {pop}")))?;
        k.extend(fo.iter().map(|&x| f64::from(x)));
        a.extend_from_slice(act);
    }
    Ok((k, a))
}

fn measure(pruner: &Pruner, refresh: usize) -> Result<DynamicsPoint> {
    let (k, a) = snapshot(pruner)?;
    let eps = DEFAULT_CLAMP_EPS;
    let a: Vec<f64> = a.iter().map(|x| x.clamp(eps, 1.0 - eps)).collect();
    let fit = match fit_balance(&k, &a, FitOptions::default()) {
        Ok(f) => Some(f),
        Err(TheoryError::Degenerate { .. }) => None,
        Err(e) => return Err(e),
    };
    let spent: f64 = k.iter().zip(&a).map(|(k, a)| k * a).sum();
    let opt = solve(&k, spent)?;
    let n = k.len() as f64;
    let distance = (k
        .iter()
        .zip(&a)
        .map(|(&k, &a)| (inactivity_log_odds(a) - opt.beta * k).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    Ok(DynamicsPoint {
        refresh,
        step: pruner.step_count(),
        fit,
        optimum_beta: opt.beta,
        log_odds_distance: distance,
        entropy_gap: (opt.entropy - entropy(&a)?) / n,
        density: pruner.density(),
    })
}

/// Runs the simulation described in the [module docs](self).
///
/// # Errors
/// A [`TheoryError`] naming the first invalid field of `cfg`, or an engine error.
pub fn simulate_dynamics(cfg: &DynamicsConfig) -> Result<DynamicsReport> {
    cfg.validate()?;
    let (n_in, n1, n2, n3, b) = (cfg.n_in, cfg.n_fc1, cfg.n_fc2, cfg.n_fc3, cfg.batch);
    let topo = Topology::chain(&["fc1", "fc2", "fc3"], &[n_in, n1, n2, n3]).map_err(engine)?;
    let pcfg = PrunerConfig::from_toml_str(&cfg.pruner_toml()).map_err(engine)?;
    let mut pruner = Pruner::new(pcfg, topo).map_err(engine)?;

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let s1 = 1.0 / (n_in as f64 * cfg.p_in).sqrt();
    let mut w1: Vec<f32> = (0..n1 * n_in)
        .map(|_| (s1 * normal(&mut rng)) as f32)
        .collect();
    let b1 = spread_biases(n1, 0.9 * cfg.beta * n2 as f64, |j| {
        cfg.p_in
            * w1[j * n_in..(j + 1) * n_in]
                .iter()
                .map(|&w| f64::from(w))
                .sum::<f64>()
    });
    // fc2's drive: weights of scale 2 / sqrt(n1 * mean fc1 rate), so that losing inputs moves
    // its activity visibly. fc1's mean rate is about sigmoid(-mid log-odds).
    let mean_a1 = sigmoid(-(0.3 + 0.9 * cfg.beta * n2 as f64) / 2.0);
    let s2 = 2.0 / (n1 as f64 * mean_a1).sqrt();
    let mut w2: Vec<f32> = (0..n2 * n1)
        .map(|_| (s2 * normal(&mut rng)) as f32)
        .collect();
    let b2 = spread_biases(n2, 0.9 * cfg.beta * n3 as f64, |k| {
        mean_a1
            * w2[k * n1..(k + 1) * n1]
                .iter()
                .map(|&w| f64::from(w))
                .sum::<f64>()
    });
    let mut w3: Vec<f32> = (0..n3 * n2).map(|_| normal(&mut rng) as f32).collect();

    let mut x = vec![0.0f64; n_in];
    let mut h1 = vec![0.0f32; b * n1];
    let mut h2 = vec![0.0f32; b * n2];
    let mut trajectory: Vec<DynamicsPoint> = Vec::with_capacity(cfg.refreshes + 1);
    let mut refreshes = 0;
    loop {
        for s in 0..b {
            for xi in x.iter_mut() {
                *xi = f64::from(u8::from(rng.gen::<f64>() < cfg.p_in));
            }
            for j in 0..n1 {
                let mut u = b1[j];
                for (w, xi) in w1[j * n_in..(j + 1) * n_in].iter().zip(&x) {
                    u += f64::from(*w) * xi;
                }
                h1[s * n1 + j] = f32::from(u8::from(rng.gen::<f64>() < sigmoid(u)));
            }
            let row1 = &h1[s * n1..(s + 1) * n1];
            for k in 0..n2 {
                let mut u = b2[k];
                for (w, h) in w2[k * n1..(k + 1) * n1].iter().zip(row1) {
                    u += f64::from(*w) * f64::from(*h);
                }
                h2[s * n2 + k] = f32::from(u8::from(rng.gen::<f64>() < sigmoid(u)));
            }
        }
        pruner
            .observe("fc1", Activations::batch_major(&h1, b, n1))
            .map_err(engine)?;
        pruner
            .observe("fc2", Activations::batch_major(&h2, b, n2))
            .map_err(engine)?;
        // Measure just before each refresh: the population has then lived for a whole
        // interval with the fan-outs of the previous refresh (the dense ones for point 0).
        if pruner.config().schedule.is_refresh(pruner.step_count() + 1) {
            trajectory.push(measure(&pruner, refreshes)?);
            if refreshes == cfg.refreshes {
                break;
            }
        }
        if pruner
            .step(&mut [&mut w1[..], &mut w2[..], &mut w3[..]], None)
            .map_err(engine)?
            .is_some()
        {
            refreshes += 1;
        }
    }

    let (k, a) = snapshot(&pruner)?;
    let eps = DEFAULT_CLAMP_EPS;
    let units: Vec<UnitState> = k
        .iter()
        .zip(&a)
        .enumerate()
        .map(|(i, (&k, &a))| UnitState {
            population: if i < n1 { "fc1" } else { "fc2" }.to_string(),
            unit: if i < n1 { i } else { i - n1 },
            fan_out: k as u32,
            activity: a,
            log_odds: inactivity_log_odds(a.clamp(eps, 1.0 - eps)),
        })
        .collect();
    let clipped_units = units
        .iter()
        .filter(|u| {
            let d = if u.population == "fc1" { n2 } else { n3 } as u32;
            u.fan_out <= cfg.k_min || u.fan_out >= d
        })
        .count();
    let fit_of =
        |lo: usize, hi: usize| fit_balance(&k[lo..hi], &a[lo..hi], FitOptions::default()).ok();
    Ok(DynamicsReport {
        config: cfg.clone(),
        trajectory,
        fit_fc1: fit_of(0, n1),
        fit_fc2: fit_of(n1, n1 + n2),
        units,
        clipped_units,
    })
}
