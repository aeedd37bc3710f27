//! Linear response of the two actuators near balance, by finite differences.
//!
//! The paper argues locally that SP-in (cutting a unit's fan-in) mainly moves its activity and
//! SP-out (cutting its fan-out) mainly moves its audience. This routine measures it on a
//! simulated population instead of assuming it.
//!
//! # The population
//! Three groups of stochastic binary units, simulated for `steps` time steps:
//! - inputs `x_t`, i.i.d. Bernoulli(`p_in`);
//! - the studied units, firing with probability
//!   `p_j = sigmoid(b_j + sum_i W1[j,i] M1[j,i] x_i + g sum_o F[j,o] y_{t-1,o})`;
//! - readout units `y_o`, firing with probability `sigmoid(sum_j W2[o,j] M2[o,j] h_j)`.
//!
//! `M1` holds the fan-ins of the studied units (rows), `M2` their fan-outs (columns of the
//! consuming layer), so a unit's fan-out is `k_j = sum_o M2[o,j]`. `F` is a fixed dense
//! feedback from the readout with gain `g = feedback_gain`; with `g = 0` the network is
//! feedforward. A unit's activity `a_j` is the time mean of `p_j` (the exact conditional rate,
//! which removes the sampling noise of `h_j` from the estimate).
//!
//! # The measurement
//! 1. Draw the population, measure `a`, and put it at balance with one SP-out refresh of the
//!    engine's actuator kernel: `k_j = clip(round(ln((1 - a_j)/a_j) / beta), 1, n_out)`.
//! 2. For each probed unit `j` separately: cut its `cut` weakest live fan-in edges (SP-in, rows
//!    of `M1`) or its `cut` weakest live fan-out edges (SP-out, columns of `M2`), both with
//!    the engine's prune-only selection, and re-simulate with the same random numbers
//!    (common random numbers, so the difference is the response, not resampled noise).
//! 3. Express each change on the balance axes: `|d ln((1-a)/a)|` along the activity axis and
//!    `beta |d k|` along the audience axis. An actuator's *activity share* is
//!    `|d ln((1-a)/a)| / (|d ln((1-a)/a)| + beta |d k|)`: 1 when it moves only activity, 0
//!    when it moves only audience.
//!
//! The claim holds when SP-in's mean activity share exceeds 1/2 and SP-out's is below 1/2.

use bb_actuators::{apply_targets, ActuatorScratch, BitMask, EdgeShape, Side};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{check_value, Result, TheoryError};
use crate::numeric::{inactivity_log_odds, sigmoid};

/// Parameters of the linear-response measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseConfig {
    /// Number of input units.
    pub n_in: usize,
    /// Number of studied units.
    pub n_units: usize,
    /// Number of readout units (the largest possible fan-out).
    pub n_out: usize,
    /// Firing probability of each input.
    pub p_in: f64,
    /// Simulated time steps per measurement.
    pub steps: usize,
    /// The balance multiplier used to place the population and to weigh the audience axis.
    pub beta: f64,
    /// Gain `g` of the readout's feedback onto the studied units (0: feedforward).
    pub feedback_gain: f64,
    /// Edges removed by one cut.
    pub cut: usize,
    /// Number of studied units probed (spread evenly over the population).
    pub probes: usize,
    /// Seed of the population and of the common random numbers.
    pub seed: u64,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            n_in: 32,
            n_units: 32,
            n_out: 48,
            p_in: 0.3,
            steps: 2000,
            beta: 0.1,
            feedback_gain: 0.5,
            cut: 1,
            probes: 8,
            seed: 0,
        }
    }
}

impl ResponseConfig {
    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    /// [`TheoryError::InvalidValue`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let count = |field: &'static str, v: usize, min: usize| {
            check_value(field, v as f64, v >= min, "an integer >= its minimum")
        };
        count("n_in", self.n_in, 2)?;
        count("n_units", self.n_units, 1)?;
        count("n_out", self.n_out, 2)?;
        count("steps", self.steps, 1)?;
        count("cut", self.cut, 1)?;
        count("probes", self.probes, 1)?;
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
            "feedback_gain",
            self.feedback_gain,
            self.feedback_gain.is_finite(),
            "a finite number",
        )?;
        check_value(
            "cut",
            self.cut as f64,
            self.cut < self.n_in.min(self.n_out),
            "fewer edges than n_in and n_out",
        )?;
        check_value(
            "probes",
            self.probes as f64,
            self.probes <= self.n_units,
            "at most n_units",
        )
    }
}

/// The first-order effect of one actuator's cut on one unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// Change of the unit's activity, per edge cut.
    pub d_activity: f64,
    /// Change of the unit's fan-out, per edge cut.
    pub d_fan_out: f64,
    /// `|d ln((1 - a)/a)|` per edge cut: the move along the activity axis.
    pub activity_move: f64,
    /// `beta |d k|` per edge cut: the move along the audience axis.
    pub audience_move: f64,
    /// `activity_move / (activity_move + audience_move)`; `None` if neither moved.
    pub activity_share: Option<f64>,
}

/// The measurement on one probed unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UnitResponse {
    /// Index of the unit.
    pub unit: usize,
    /// Its activity at balance.
    pub activity: f64,
    /// Its fan-out at balance.
    pub fan_out: usize,
    /// Its fan-in at balance.
    pub fan_in: usize,
    /// Response to an SP-in cut.
    pub sp_in: Effect,
    /// Response to an SP-out cut.
    pub sp_out: Effect,
}

/// Mean responses of one actuator over the probed units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActuatorSummary {
    /// Mean `|d a|` per edge cut.
    pub mean_abs_d_activity: f64,
    /// Mean `|d k|` per edge cut.
    pub mean_abs_d_fan_out: f64,
    /// Mean move along the activity axis.
    pub mean_activity_move: f64,
    /// Mean move along the audience axis.
    pub mean_audience_move: f64,
    /// Mean activity share over the units where something moved (`None` if nothing did).
    pub activity_share: Option<f64>,
}

/// The verdict of the linear-response measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseReport {
    /// The parameters used.
    pub config: ResponseConfig,
    /// Per probed unit.
    pub units: Vec<UnitResponse>,
    /// SP-in over all probed units.
    pub sp_in: ActuatorSummary,
    /// SP-out over all probed units.
    pub sp_out: ActuatorSummary,
    /// SP-in's mean activity share exceeds 1/2.
    pub sp_in_mainly_moves_activity: bool,
    /// SP-out's mean activity share is below 1/2.
    pub sp_out_mainly_moves_audience: bool,
    /// Both of the above.
    pub claim_holds: bool,
}

/// The simulated population: weights, masks and parameters.
struct Population {
    w1: Vec<f64>,
    w2: Vec<f64>,
    feedback: Vec<f64>,
    bias: Vec<f64>,
    m1: BitMask,
    m2: BitMask,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Population {
    fn draw(cfg: &ResponseConfig, rng: &mut ChaCha8Rng) -> Self {
        let (n_in, n, n_out) = (cfg.n_in, cfg.n_units, cfg.n_out);
        let s1 = 1.0 / (n_in as f64 * cfg.p_in).sqrt();
        let w1: Vec<f64> = (0..n * n_in).map(|_| s1 * normal(rng)).collect();
        let s2 = 2.0 / (n as f64).sqrt();
        let w2: Vec<f64> = (0..n_out * n).map(|_| s2 * normal(rng)).collect();
        let sf = 1.0 / (n_out as f64).sqrt();
        let feedback: Vec<f64> = (0..n * n_out).map(|_| sf * normal(rng)).collect();
        // Spread the base log-odds of inactivity over [0.5, 4] so that the balanced fan-outs
        // ln((1-a)/a)/beta span a range of degrees.
        let bias: Vec<f64> = (0..n)
            .map(|j| {
                let y = 0.5 + 3.5 * (j as f64 + 0.5) / n as f64;
                let mean_drive: f64 = w1[j * n_in..(j + 1) * n_in].iter().sum::<f64>() * cfg.p_in;
                -y - mean_drive
            })
            .collect();
        Self {
            w1,
            w2,
            feedback,
            bias,
            m1: BitMask::full(n, n_in),
            m2: BitMask::full(n_out, n),
        }
    }

    /// Mean firing probability of every studied unit over `steps`, with the random stream
    /// reseeded from `seed` (common random numbers across calls).
    fn activity(&self, cfg: &ResponseConfig, seed: u64) -> Vec<f64> {
        let (n_in, n, n_out) = (cfg.n_in, cfg.n_units, cfg.n_out);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = vec![0.0; n_in];
        let mut h = vec![0.0; n];
        let mut y = vec![0.0; n_out];
        let mut acc = vec![0.0; n];
        let w1: Vec<f64> = (0..n * n_in)
            .map(|e| {
                if self.m1.get(e / n_in, e % n_in) {
                    self.w1[e]
                } else {
                    0.0
                }
            })
            .collect();
        let w2: Vec<f64> = (0..n_out * n)
            .map(|e| {
                if self.m2.get(e / n, e % n) {
                    self.w2[e]
                } else {
                    0.0
                }
            })
            .collect();
        for _ in 0..cfg.steps {
            for xi in x.iter_mut() {
                *xi = f64::from(u8::from(rng.gen::<f64>() < cfg.p_in));
            }
            for j in 0..n {
                let mut u = self.bias[j];
                for (w, xi) in w1[j * n_in..(j + 1) * n_in].iter().zip(&x) {
                    u += w * xi;
                }
                if cfg.feedback_gain != 0.0 {
                    let mut fb = 0.0;
                    for (f, yo) in self.feedback[j * n_out..(j + 1) * n_out].iter().zip(&y) {
                        fb += f * yo;
                    }
                    u += cfg.feedback_gain * fb;
                }
                let p = sigmoid(u);
                acc[j] += p;
                h[j] = f64::from(u8::from(rng.gen::<f64>() < p));
            }
            for (o, yo) in y.iter_mut().enumerate() {
                let mut v = 0.0;
                for (w, hj) in w2[o * n..(o + 1) * n].iter().zip(&h) {
                    v += w * hj;
                }
                *yo = f64::from(u8::from(rng.gen::<f64>() < sigmoid(v)));
            }
        }
        acc.iter().map(|s| s / cfg.steps as f64).collect()
    }
}

fn engine_error(e: bb_actuators::ActuatorError) -> TheoryError {
    TheoryError::Engine(e.to_string())
}

/// Re-selects `mask` on `side` with prune-only top-|w| targets (the engine's kernel).
fn reselect(
    side: Side,
    weights: &[f64],
    mask: &mut BitMask,
    targets: &[u32],
    scratch: &mut ActuatorScratch,
) -> Result<()> {
    let shape = EdgeShape::dense(mask.rows(), mask.cols());
    let scores: Vec<f32> = weights.iter().map(|w| w.abs() as f32).collect();
    apply_targets(side, &shape, &scores, targets, false, mask, scratch).map_err(engine_error)
}

fn effect(beta: f64, cut: usize, a0: f64, a1: f64, k0: usize, k1: usize) -> Effect {
    let c = cut as f64;
    let d_activity = (a1 - a0) / c;
    let d_fan_out = (k1 as f64 - k0 as f64) / c;
    let activity_move = (inactivity_log_odds(a1) - inactivity_log_odds(a0)).abs() / c;
    let audience_move = beta * d_fan_out.abs();
    let total = activity_move + audience_move;
    Effect {
        d_activity,
        d_fan_out,
        activity_move,
        audience_move,
        activity_share: (total > 0.0).then(|| activity_move / total),
    }
}

fn summarize(effects: impl Iterator<Item = Effect> + Clone) -> ActuatorSummary {
    let n = effects.clone().count().max(1) as f64;
    let shares: Vec<f64> = effects.clone().filter_map(|e| e.activity_share).collect();
    ActuatorSummary {
        mean_abs_d_activity: effects.clone().map(|e| e.d_activity.abs()).sum::<f64>() / n,
        mean_abs_d_fan_out: effects.clone().map(|e| e.d_fan_out.abs()).sum::<f64>() / n,
        mean_activity_move: effects.clone().map(|e| e.activity_move).sum::<f64>() / n,
        mean_audience_move: effects.map(|e| e.audience_move).sum::<f64>() / n,
        activity_share: (!shares.is_empty())
            .then(|| shares.iter().sum::<f64>() / shares.len() as f64),
    }
}

/// Runs the linear-response measurement described in the [module docs](self).
///
/// # Errors
/// A [`TheoryError`] naming the first invalid field of `cfg`, or an engine error.
pub fn linear_response(cfg: &ResponseConfig) -> Result<ResponseReport> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut pop = Population::draw(cfg, &mut rng);
    let sim_seed = cfg.seed ^ 0x5EED_CAFE_F00D_0001;
    let mut scratch = ActuatorScratch::default();

    // Place the population at balance: one SP-out refresh with the balance targets.
    let a = pop.activity(cfg, sim_seed);
    let targets: Vec<u32> = a
        .iter()
        .map(|&a| {
            let k = (inactivity_log_odds(a.clamp(1e-4, 1.0 - 1e-4)) / cfg.beta).round();
            k.clamp((cfg.cut + 1) as f64, cfg.n_out as f64) as u32
        })
        .collect();
    reselect(Side::Columns, &pop.w2, &mut pop.m2, &targets, &mut scratch)?;
    let a0 = pop.activity(cfg, sim_seed);
    let fan_out: Vec<usize> = (0..cfg.n_units).map(|j| pop.m2.col_count(j)).collect();
    let fan_in: Vec<usize> = (0..cfg.n_units).map(|j| pop.m1.row_count(j)).collect();

    let mut units = Vec::with_capacity(cfg.probes);
    for p in 0..cfg.probes {
        let j = (p * cfg.n_units + cfg.n_units / 2) / cfg.probes;
        // SP-in: the unit's row of M1 loses `cut` edges; every other row keeps its count.
        let saved_m1 = pop.m1.clone();
        let mut rows: Vec<u32> = (0..cfg.n_units)
            .map(|r| pop.m1.row_count(r) as u32)
            .collect();
        rows[j] -= cfg.cut as u32;
        reselect(Side::Rows, &pop.w1, &mut pop.m1, &rows, &mut scratch)?;
        let a_in = pop.activity(cfg, sim_seed);
        let k_in = pop.m2.col_count(j);
        pop.m1 = saved_m1;

        // SP-out: the unit's column of M2 loses `cut` edges.
        let saved_m2 = pop.m2.clone();
        let mut cols: Vec<u32> = (0..cfg.n_units)
            .map(|c| pop.m2.col_count(c) as u32)
            .collect();
        cols[j] -= cfg.cut as u32;
        reselect(Side::Columns, &pop.w2, &mut pop.m2, &cols, &mut scratch)?;
        let a_out = pop.activity(cfg, sim_seed);
        let k_out = pop.m2.col_count(j);
        pop.m2 = saved_m2;

        units.push(UnitResponse {
            unit: j,
            activity: a0[j],
            fan_out: fan_out[j],
            fan_in: fan_in[j],
            sp_in: effect(cfg.beta, cfg.cut, a0[j], a_in[j], fan_out[j], k_in),
            sp_out: effect(cfg.beta, cfg.cut, a0[j], a_out[j], fan_out[j], k_out),
        });
    }
    let sp_in = summarize(units.iter().map(|u| u.sp_in));
    let sp_out = summarize(units.iter().map(|u| u.sp_out));
    let sp_in_mainly_moves_activity = sp_in.activity_share.is_some_and(|s| s > 0.5);
    let sp_out_mainly_moves_audience = sp_out.activity_share.is_some_and(|s| s < 0.5);
    Ok(ResponseReport {
        config: cfg.clone(),
        units,
        sp_in,
        sp_out,
        sp_in_mainly_moves_activity,
        sp_out_mainly_moves_audience,
        claim_holds: sp_in_mainly_moves_activity && sp_out_mainly_moves_audience,
    })
}
