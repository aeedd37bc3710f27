//! Experiment configs: what to train, how, and which pruning arms to compare.
//!
//! An experiment is one TOML file (the presets live in `bb-tasks/configs/`):
//!
//! ```toml
//! name = "xor"
//! description = "one line for `bb presets`"
//! seeds = [0]
//! [data]            # kind = "xor" | "dnf" | "digits", with its parameters
//! [model]
//! hidden = [64, 32] # hidden widths; input and output widths come from the data
//! [train]           # epochs, batch_size, lr, lr_schedule, optimizer, checkpoint_every
//! [pruning]         # the engine's config shared by every arm (schedule, tracker, policy, ...)
//! [[arms]]          # one per compared method
//! name = "bb_sp_out"
//! [arms.pruning]    # merged over [pruning], table by table
//! ```
//!
//! [`ExperimentConfig::plan`] validates everything (including building each arm's pruner
//! against the model) before anything is written, so a bad config fails with an error that
//! names the field and leaves no run folder behind.

use crate::data::{DataConfig, Split};
use crate::model::layer_name;
use crate::optim::{LrSchedule, OptimizerConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use bb_core::{Pruner, PrunerConfig, Topology};
use serde::{Deserialize, Serialize};

/// A whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Short name, used for the run folder.
    pub name: String,
    /// One line shown by `bb presets`.
    #[serde(default)]
    pub description: String,
    /// Seeds; every arm runs once per seed (the data split and the initial weights follow the
    /// seed, so arms with the same seed start from the same network).
    pub seeds: Vec<u64>,
    /// The data set.
    pub data: DataConfig,
    /// The network.
    pub model: ModelConfig,
    /// Training.
    pub train: TrainConfig,
    /// Engine config shared by all arms (the `[pruning]` table).
    #[serde(default)]
    pub pruning: toml::Table,
    /// Compared methods.
    pub arms: Vec<ArmConfig>,
    /// What the report emphasises.
    #[serde(default)]
    pub report: ReportConfig,
}

/// The network: an MLP with ReLU hidden layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hidden widths, first to last.
    pub hidden: Vec<usize>,
}

/// Training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per minibatch (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f32,
    /// Learning-rate schedule over all steps.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Optimizer.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Save a checkpoint every this many epochs (0: never).
    #[serde(default)]
    pub checkpoint_every: usize,
}

impl TrainConfig {
    /// Minibatches per epoch for `n` training samples.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }
}

/// One compared method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// Name (letters, digits, `_` and `-`), used for folders and tables.
    pub name: String,
    /// `false` trains the dense network without a pruner.
    #[serde(default = "yes")]
    pub prune: bool,
    /// Engine settings merged over the experiment's `[pruning]` table.
    #[serde(default)]
    pub pruning: toml::Table,
}

fn yes() -> bool {
    true
}

/// Report options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Draw the balance scatter (log-odds of inactivity against fan-out) of every hidden
    /// population, per arm (first seed).
    #[serde(default)]
    pub balance_plots: bool,
}

/// A built-in experiment.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// Name given to `bb run`.
    pub name: &'static str,
    /// The TOML text.
    pub toml: &'static str,
}

/// The presets, in tour order.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "xor",
        toml: include_str!("../configs/xor.toml"),
    },
    Preset {
        name: "dnf",
        toml: include_str!("../configs/dnf.toml"),
    },
    Preset {
        name: "digits",
        toml: include_str!("../configs/digits.toml"),
    },
];

/// The preset called `name`.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        anyhow!(
            "unknown preset {name:?}; known presets: {} (or give the path of a .toml file)",
            PRESETS
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Merges `over` into `base`: tables merge key by key (recursively), anything else replaces.
pub fn merge_tables(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// One training run: an arm with a seed, fully resolved.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Arm name.
    pub arm: String,
    /// Seed.
    pub seed: u64,
    /// `[inputs, hidden..., classes]`.
    pub widths: Vec<usize>,
    /// Training settings.
    pub train: TrainConfig,
    /// Steps in the whole run.
    pub total_steps: u64,
    /// The engine config (None: dense, no pruner), validated against the model.
    pub pruning: Option<toml::Table>,
}

impl RunSpec {
    /// Folder of this run inside the experiment's run folder.
    pub fn rel_dir(&self) -> String {
        format!("{}/seed-{}", self.arm, self.seed)
    }

    /// A fresh pruner for this run, if it prunes.
    pub fn pruner(&self) -> Result<Option<Pruner>> {
        let Some(t) = &self.pruning else {
            return Ok(None);
        };
        let cfg = pruner_config(t).with_context(|| format!("arm {:?}", self.arm))?;
        let p = Pruner::new(cfg, topology(&self.widths)?)
            .map_err(|e| anyhow!("arm {:?}: pruning.{e}", self.arm))?;
        Ok(Some(p))
    }
}

/// The engine's view of an MLP: layers `fc1..fcL`, populations `input`, `fc1`, ... `fcL`.
pub fn topology(widths: &[usize]) -> Result<Topology> {
    let names: Vec<String> = (0..widths.len() - 1).map(layer_name).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    Topology::chain(&refs, widths).map_err(|e| anyhow!("model: {e}"))
}

fn pruner_config(t: &toml::Table) -> Result<PrunerConfig> {
    let cfg: PrunerConfig = toml::Value::Table(t.clone())
        .try_into()
        .map_err(|e| anyhow!("pruning: {e}"))?;
    cfg.validate().map_err(|e| anyhow!("pruning.{e}"))?;
    Ok(cfg)
}

/// A validated experiment: its runs and the data of each seed.
#[derive(Debug)]
pub struct Plan {
    /// The config as loaded (with defaults filled in).
    pub config: ExperimentConfig,
    /// Every (arm, seed) run, arms outer, seeds inner.
    pub runs: Vec<RunSpec>,
}

fn check_name(what: &str, s: &str) -> Result<()> {
    ensure!(
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "{what} must be a non-empty name of letters, digits, '_' or '-', got {s:?}"
    );
    Ok(())
}

impl ExperimentConfig {
    /// Parses a TOML experiment (unknown or missing fields are errors that name the field).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow!("experiment config: {e}"))
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("experiment config: cannot write TOML")
    }

    /// Validates everything and resolves the runs. `split` is the data of the first seed (its
    /// sizes are checked against the batch size).
    pub fn plan_with(&self, split: &Split) -> Result<Plan> {
        check_name("name", &self.name)?;
        ensure!(!self.seeds.is_empty(), "seeds: give at least one seed");
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.seeds {
            ensure!(seen.insert(*s), "seeds: seed {s} appears twice");
        }
        ensure!(
            !self.model.hidden.is_empty(),
            "model.hidden: give at least one hidden layer"
        );
        for (i, &w) in self.model.hidden.iter().enumerate() {
            ensure!(
                w > 0,
                "model.hidden[{i}] is 0; every layer needs at least one unit"
            );
        }
        let t = &self.train;
        ensure!(t.epochs > 0, "train.epochs must be >= 1");
        ensure!(t.batch_size > 0, "train.batch_size must be >= 1");
        ensure!(
            t.lr.is_finite() && t.lr > 0.0,
            "train.lr must be > 0, got {}",
            t.lr
        );
        t.optimizer.validate()?;
        let n_train = split.train.len();
        check_batch_size(t.batch_size, n_train, "samples")?;
        ensure!(!self.arms.is_empty(), "arms: give at least one arm");
        let mut names = std::collections::BTreeSet::new();
        for (i, a) in self.arms.iter().enumerate() {
            check_name(&format!("arms[{i}].name"), &a.name)?;
            ensure!(
                names.insert(a.name.clone()),
                "arms[{i}].name {:?} appears twice",
                a.name
            );
            ensure!(
                a.prune || a.pruning.is_empty(),
                "arms[{i}] ({}): prune = false but a [arms.pruning] table is given",
                a.name
            );
        }
        let mut widths = vec![split.train.features];
        widths.extend_from_slice(&self.model.hidden);
        widths.push(split.train.classes);
        let total_steps = (t.epochs * t.steps_per_epoch(n_train)) as u64;
        let mut runs = Vec::new();
        for (i, a) in self.arms.iter().enumerate() {
            let pruning = if a.prune {
                let mut table = self.pruning.clone();
                merge_tables(&mut table, &a.pruning);
                let sched = table
                    .entry("schedule")
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                let toml::Value::Table(sched) = sched else {
                    bail!("arms[{i}] ({}): pruning.schedule must be a table", a.name);
                };
                match sched.get("total_steps").and_then(toml::Value::as_integer) {
                    None => {
                        sched.insert("total_steps".into(), toml::Value::Integer(total_steps as i64));
                    }
                    Some(n) if n as u64 != total_steps => bail!(
                        "arms[{i}] ({}): pruning.schedule.total_steps is {n}, but training runs {total_steps} steps \
                         ({} epochs x {} batches); leave it out and it is filled in",
                        a.name,
                        t.epochs,
                        t.steps_per_epoch(n_train)
                    ),
                    Some(_) => {}
                }
                Some(table)
            } else {
                None
            };
            for &seed in &self.seeds {
                let mut pruning = pruning.clone();
                if let Some(p) = &mut pruning {
                    p.insert("seed".into(), toml::Value::Integer(seed as i64));
                }
                let spec = RunSpec {
                    arm: a.name.clone(),
                    seed,
                    widths: widths.clone(),
                    train: t.clone(),
                    total_steps,
                    pruning,
                };
                spec.pruner().with_context(|| format!("arms[{i}]"))?;
                runs.push(spec);
            }
        }
        Ok(Plan {
            config: self.clone(),
            runs,
        })
    }

    /// Validates and resolves: builds the first seed's data, then [`Self::plan_with`].
    pub fn plan(&self) -> Result<Plan> {
        self.data.validate()?;
        let seed = *self
            .seeds
            .first()
            .ok_or_else(|| anyhow!("seeds: give at least one seed"))?;
        let split = self.data.build(seed)?;
        self.plan_with(&split)
    }
}

/// Fails unless a batch of `batch` fits in a training set of `n` (counted in `unit`).
pub fn check_batch_size(batch: usize, n: usize, unit: &str) -> Result<()> {
    ensure!(
        batch <= n,
        "train.batch_size ({batch}) is larger than the training set ({n} {unit})"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_plan() {
        for p in PRESETS {
            let c = ExperimentConfig::from_toml(p.toml).unwrap();
            assert_eq!(c.name, p.name);
            assert!(!c.description.is_empty());
            let plan = c.plan().unwrap();
            assert_eq!(plan.runs.len(), c.arms.len() * c.seeds.len());
            // the resolved config round-trips through TOML
            let back = ExperimentConfig::from_toml(&c.to_toml().unwrap()).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn merge_is_recursive_and_overrides_leaves() {
        let mut a: toml::Table = toml::from_str("[p]\nx = 1\ny = 2\n[q]\nz = 3").unwrap();
        let b: toml::Table = toml::from_str("[p]\ny = 5\nw = 6").unwrap();
        merge_tables(&mut a, &b);
        let want: toml::Table = toml::from_str("[p]\nx = 1\ny = 5\nw = 6\n[q]\nz = 3").unwrap();
        assert_eq!(a, want);
    }
}
