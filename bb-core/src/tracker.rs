//! Activity trackers: how a unit's long-term on-rate `a_j` is measured.

use crate::BbError;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;

/// Memory order of an activation buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[batch, units, positions]`, row-major (PyTorch / ndarray order).
    BatchMajor,
    /// `[units, positions, batch]`, row-major (channel-major, batch last, as the dfdx
    /// convolution layout `(C·H·W, B)`).
    UnitMajor,
}

/// A borrowed view of one batch of activations of a population.
///
/// `positions` is 1 for dense layers, the number of spatial positions for convolutions, or
/// the number of time steps for sequences; the on-rate averages over batch and positions.
#[derive(Debug, Clone, Copy)]
pub struct Activations<'a> {
    data: &'a [f32],
    batch: usize,
    units: usize,
    positions: usize,
    layout: Layout,
}

impl<'a> Activations<'a> {
    /// `[batch, units]`, row-major.
    pub fn batch_major(data: &'a [f32], batch: usize, units: usize) -> Self {
        Self {
            data,
            batch,
            units,
            positions: 1,
            layout: Layout::BatchMajor,
        }
    }

    /// `[batch, units, positions...]` flattened to `[batch, units, positions]`, row-major.
    pub fn batch_major_positions(
        data: &'a [f32],
        batch: usize,
        units: usize,
        positions: usize,
    ) -> Self {
        Self {
            data,
            batch,
            units,
            positions,
            layout: Layout::BatchMajor,
        }
    }

    /// `[units, positions, batch]`, row-major (dfdx's channel-major conv layout).
    pub fn unit_major(data: &'a [f32], units: usize, positions: usize, batch: usize) -> Self {
        Self {
            data,
            batch,
            units,
            positions,
            layout: Layout::UnitMajor,
        }
    }

    /// A view of a standard-layout ndarray `[batch, units, positions...]` (at least 2 dims).
    pub fn from_array(a: &'a ndarray::ArrayViewD<'a, f32>) -> Result<Self, BbError> {
        let shape = a.shape();
        if shape.len() < 2 {
            return Err(BbError::activations(format!(
                "activations need shape [batch, units, positions...], got {shape:?}"
            )));
        }
        let data = a.as_slice().ok_or_else(|| {
            BbError::activations("activations must be in standard (row-major) layout")
        })?;
        Ok(Self::batch_major_positions(
            data,
            shape[0],
            shape[1],
            shape[2..].iter().product(),
        ))
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of units.
    pub fn units(&self) -> usize {
        self.units
    }

    /// Positions per unit and sample.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Memory order.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The raw values.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Checks the buffer length against the dims.
    pub fn validate(&self) -> Result<(), BbError> {
        let n = self.batch * self.units * self.positions;
        if self.batch == 0 || self.positions == 0 {
            return Err(BbError::activations("batch and positions must be positive"));
        }
        if self.data.len() != n {
            return Err(BbError::activations(format!(
                "buffer has {} values but batch {} x units {} x positions {} = {n}",
                self.data.len(),
                self.batch,
                self.units,
                self.positions
            )));
        }
        Ok(())
    }

    /// Calls `f(unit, run)` for every contiguous run of one unit's values, in memory order;
    /// stops at the first non-finite value with an error naming its position.
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, &[f32])) -> Result<(), BbError> {
        if self.positions == 1 && self.layout == Layout::BatchMajor {
            // Runs of one value: check the whole buffer at once, then hand over single values.
            self.check_finite()?;
            for row in self.data.chunks_exact(self.units) {
                for (u, x) in row.iter().enumerate() {
                    f(u, std::slice::from_ref(x));
                }
            }
            return Ok(());
        }
        let run = match self.layout {
            Layout::BatchMajor => self.positions,
            Layout::UnitMajor => self.positions * self.batch,
        };
        for (r, chunk) in self.data.chunks_exact(run).enumerate() {
            if !all_finite(chunk) {
                let i = chunk.iter().position(|x| !x.is_finite()).unwrap_or(0);
                return Err(BbError::activations(format!(
                    "non-finite activation {} at flat index {}",
                    chunk[i],
                    r * run + i
                )));
            }
            f(r % self.units, chunk);
        }
        Ok(())
    }
}

impl Activations<'_> {
    fn check_finite(&self) -> Result<(), BbError> {
        if self.data.iter().all(|x| x.is_finite()) {
            return Ok(());
        }
        let i = self.data.iter().position(|x| !x.is_finite()).unwrap_or(0);
        Err(BbError::activations(format!(
            "non-finite activation {} at flat index {i}",
            self.data[i]
        )))
    }
}

/// How a population's long-term on-rates are updated from a batch of activations.
///
/// A plugin: `#[typetag::serde(tag = "kind")]`, so configs name it with `kind = "..."`.
/// Implementations keep no per-unit state of their own: the rates live in the pruner, so a
/// tracker is pure configuration and round-trips through TOML and JSON.
#[typetag::serde(tag = "kind")]
pub trait ActivityTracker: Debug + Send + Sync {
    /// Checks the parameters; errors name the field (`tracker.decay`, ...).
    fn validate(&self) -> Result<(), BbError>;
    /// The on-rate every unit starts from.
    fn init_rate(&self) -> f64;
    /// Updates `rate` (one entry per unit) from one batch. `scratch` is reused between calls.
    fn observe(
        &self,
        rate: &mut [f64],
        acts: &Activations<'_>,
        scratch: &mut Vec<f64>,
    ) -> Result<(), BbError>;
}

fn default_decay() -> f64 {
    0.95
}
fn default_init() -> f64 {
    0.5
}
fn default_one() -> f64 {
    1.0
}

fn check_decay(decay: f64, init: f64) -> Result<(), BbError> {
    if !(decay > 0.0 && decay < 1.0) {
        return Err(BbError::config(
            "tracker.decay",
            format!("must be in (0, 1), got {decay}"),
        ));
    }
    if !(0.0..=1.0).contains(&init) {
        return Err(BbError::config(
            "tracker.init",
            format!("must be in [0, 1], got {init}"),
        ));
    }
    Ok(())
}

fn prepare(rate: &[f64], acts: &Activations<'_>, scratch: &mut Vec<f64>) -> Result<(), BbError> {
    acts.validate()?;
    if rate.len() != acts.units {
        return Err(BbError::activations(format!(
            "population has {} units but the activations have {}",
            rate.len(),
            acts.units
        )));
    }
    scratch.clear();
    scratch.resize(acts.units, 0.0);
    Ok(())
}

bb_actuators::multiversion! {
    /// Adds, per unit, how many rows of the batch-major `[batch, units]` buffer exceed `theta`;
    /// returns whether every value is finite (one pass, no early exit, so it vectorizes).
    fn count_rows(data: &[f32], units: usize, theta: f32, counts: &mut [f64]) -> bool {
        // Integer lane counters for a tile of units, added to `counts` once per tile (exact:
        // the counts are integers far below 2^32); the per-value work stays in 32-bit lanes.
        // A value is finite unless its exponent bits are all ones, so the largest exponent
        // field seen (one AND and one unsigned max per vector) tells whether all were.
        const TILE: usize = 512;
        let mut top = 0u32;
        let mut tile = [0u32; TILE];
        for t0 in (0..units).step_by(TILE) {
            let t1 = (t0 + TILE).min(units);
            let acc = &mut tile[..t1 - t0];
            acc.fill(0);
            for row in data.chunks_exact(units) {
                for (c, &x) in acc.iter_mut().zip(&row[t0..t1]) {
                    *c += u32::from(x > theta);
                    top = top.max(x.to_bits() & EXPONENT);
                }
            }
            for (c, &n) in counts[t0..t1].iter_mut().zip(acc.iter()) {
                *c += f64::from(n);
            }
        }
        top != EXPONENT
    }
}

/// The exponent bits of an `f32`: all ones for infinities and NaN.
const EXPONENT: u32 = 0x7f80_0000;

bb_actuators::multiversion! {
    /// Whether every value of `run` is finite (one branch-free pass, so it vectorizes).
    fn all_finite(run: &[f32]) -> bool {
        run.iter().fold(0, |top: u32, &x| top.max(x.to_bits() & EXPONENT)) != EXPONENT
    }
}

bb_actuators::multiversion! {
    /// How many values of `run` exceed `theta` (exact; vectorized lane counters).
    fn count_above(run: &[f32], theta: f32) -> u32 {
        run.iter().map(|&x| u32::from(x > theta)).sum()
    }
}

/// The method's tracker: unit `j` is "on" where its activation exceeds `threshold`;
/// `a_j <- decay * a_j + (1 - decay) * on_j`, with `on_j` the on-fraction over batch and
/// positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaOnRate {
    /// Activation threshold `theta` (default 0: measured after the nonlinearity).
    #[serde(default)]
    pub threshold: f32,
    /// EMA decay `rho` (default 0.95).
    #[serde(default = "default_decay")]
    pub decay: f64,
    /// Initial on-rate (default 0.5).
    #[serde(default = "default_init")]
    pub init: f64,
}

impl Default for EmaOnRate {
    fn default() -> Self {
        Self {
            threshold: 0.0,
            decay: default_decay(),
            init: default_init(),
        }
    }
}

#[typetag::serde(name = "ema_on_rate")]
impl ActivityTracker for EmaOnRate {
    fn validate(&self) -> Result<(), BbError> {
        if !self.threshold.is_finite() {
            return Err(BbError::config("tracker.threshold", "must be finite"));
        }
        check_decay(self.decay, self.init)
    }

    fn init_rate(&self) -> f64 {
        self.init
    }

    fn observe(
        &self,
        rate: &mut [f64],
        acts: &Activations<'_>,
        scratch: &mut Vec<f64>,
    ) -> Result<(), BbError> {
        prepare(rate, acts, scratch)?;
        let theta = self.threshold;
        if acts.positions == 1 && acts.layout == Layout::BatchMajor {
            if !count_rows(acts.data, acts.units, theta, scratch) {
                acts.check_finite()?;
            }
        } else {
            acts.for_each_run(|u, run| scratch[u] += f64::from(count_above(run, theta)))?;
        }
        let n = (acts.batch * acts.positions) as f64;
        for (a, &c) in rate.iter_mut().zip(scratch.iter()) {
            *a = self.decay * *a + (1.0 - self.decay) * (c / n);
        }
        Ok(())
    }
}

/// A graded variant for normalised networks (the reference face-identification runs): per
/// batch, the mean `|activation|` of every unit is z-scored across the population, squashed
/// with a logistic `1 / (1 + exp(-z / temperature))`, and fed to the same EMA. Units that are
/// louder than their peers count as busier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaAbsZscore {
    /// EMA decay (default 0.95).
    #[serde(default = "default_decay")]
    pub decay: f64,
    /// Initial rate (default 0.5).
    #[serde(default = "default_init")]
    pub init: f64,
    /// Logistic temperature (default 1).
    #[serde(default = "default_one")]
    pub temperature: f64,
}

#[typetag::serde(name = "ema_abs_zscore")]
impl ActivityTracker for EmaAbsZscore {
    fn validate(&self) -> Result<(), BbError> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(BbError::config(
                "tracker.temperature",
                format!("must be > 0, got {}", self.temperature),
            ));
        }
        check_decay(self.decay, self.init)
    }

    fn init_rate(&self) -> f64 {
        self.init
    }

    fn observe(
        &self,
        rate: &mut [f64],
        acts: &Activations<'_>,
        scratch: &mut Vec<f64>,
    ) -> Result<(), BbError> {
        prepare(rate, acts, scratch)?;
        acts.for_each_run(|u, run| scratch[u] += run.iter().map(|x| x.abs() as f64).sum::<f64>())?;
        let n = scratch.len() as f64;
        let mean = scratch.iter().sum::<f64>() / n;
        let var = scratch.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / n;
        let sd = var.sqrt();
        for (a, &m) in rate.iter_mut().zip(scratch.iter()) {
            let z = if sd > 0.0 { (m - mean) / sd } else { 0.0 };
            let on = 1.0 / (1.0 + (-z / self.temperature).exp());
            *a = self.decay * *a + (1.0 - self.decay) * on;
        }
        Ok(())
    }
}
