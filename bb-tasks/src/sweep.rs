//! Matched-density sweeps: a grid of method x density x seed x dataset, run in shards that
//! may share one output folder, merged into one report.
//!
//! A sweep file (`bb-tasks/sweeps/*.toml`) names the seeds, the densities, the data sets, the
//! methods and a `[base]` experiment (model, training, shared pruning settings). Every grid
//! point becomes an ordinary one-arm, one-seed experiment config that the same runner as
//! `bb run` trains (see `cli_sweep`), so a sweep run and a `bb run` of the same config give the
//! same result.
//!
//! **Matched density.** Each method names the fields of its pruning table that receive the
//! run's density (`density_fields`, default `["policy.target_density"]`); the summary reports
//! the achieved density beside the target and flags any run that misses it.
//!
//! **Output folder.**
//!
//! ```text
//! OUT/sweep.toml                                 the sweep, as given (shards check they agree)
//! OUT/runs/<dataset>/<method>/d0.500/seed-3/     one finished run: the run folder + record.json
//! OUT/runs/.../seed-3.partial-<host>-<pid>-<n>/  a run in progress (or interrupted)
//! OUT/summary/                                   summary.md, summary.json, plots/*.svg
//! ```
//!
//! Constraints: many shards (processes, possibly on different machines sharing a file system)
//! write into one folder at once, may be killed at any time, and must never leave a run that
//! looks finished but is not. Solution: a run is trained in its own `*.partial-*` folder and
//! renamed into place only after `record.json` is written; the rename is atomic, and a run
//! whose final folder exists is complete. Merging only reads final folders, so it needs no
//! lock and can run while shards are still working. An interrupted run's partial folder is
//! taken over (and resumed from its checkpoint) by the next attempt on the same host once its
//! process is gone. Cons: a run killed on one host is restarted from scratch on another.

use crate::config::{ExperimentConfig, ModelConfig, TrainConfig};
use crate::data::DataConfig;
use crate::stats::{mean_ci95, paired_differences, Interval, Paired, Verdict};
use anyhow::{anyhow, bail, ensure, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a method is, for the comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Budgeted Broadcast (any actuator).
    Bb,
    /// A pruning baseline at matched density.
    Baseline,
    /// A method run at its own settings that does not match the density exactly (e.g. the
    /// reference code's two-threshold surrogate): reported, never in the paired comparisons.
    Reference,
    /// The dense network (one run per seed, not per density).
    Dense,
}

/// One compared method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    /// Name (letters, digits, `_`, `-`).
    pub name: String,
    /// `bb`, `baseline`, `reference` or `dense` (default: `dense` when `prune = false`, else
    /// `baseline`).
    #[serde(default)]
    pub family: Option<Family>,
    /// `false`: the dense network, trained once per seed and data set.
    #[serde(default = "yes")]
    pub prune: bool,
    /// Dotted paths inside `pruning` that receive the run's density
    /// (default `["policy.target_density"]`).
    #[serde(default = "default_density_fields")]
    pub density_fields: Vec<String>,
    /// Engine settings merged over `[base.pruning]`.
    #[serde(default)]
    pub pruning: toml::Table,
}

fn yes() -> bool {
    true
}

fn default_density_fields() -> Vec<String> {
    vec!["policy.target_density".to_string()]
}

impl Family {
    /// Lower-case word.
    pub fn word(self) -> &'static str {
        match self {
            Self::Bb => "bb",
            Self::Baseline => "baseline",
            Self::Reference => "reference",
            Self::Dense => "dense",
        }
    }
}

impl MethodConfig {
    /// The method's family.
    pub fn family(&self) -> Family {
        self.family.unwrap_or(if self.prune {
            Family::Baseline
        } else {
            Family::Dense
        })
    }
}

/// One data set of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Name (letters, digits, `_`, `-`), used for folders and headings.
    pub name: String,
    /// One line for the report.
    #[serde(default)]
    pub description: String,
    /// The data (any `[data]` table of an experiment).
    pub data: DataConfig,
}

/// The experiment shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseConfig {
    /// The network.
    pub model: ModelConfig,
    /// Training.
    pub train: TrainConfig,
    /// Engine settings shared by every pruned method.
    #[serde(default)]
    pub pruning: toml::Table,
}

/// A sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Name (letters, digits, `_`, `-`); the default output folder is `runs/sweeps/<name>`.
    pub name: String,
    /// One paragraph for the report.
    #[serde(default)]
    pub description: String,
    /// Seeds (each method and density runs once per seed; the same seed means the same data
    /// subset and the same initial weights for every method).
    pub seeds: Vec<u64>,
    /// Target densities of the pruned methods, in (0, 1].
    pub densities: Vec<f64>,
    /// Metrics of the paired BB-vs-best-baseline comparison (default: accuracy, plus tail
    /// accuracy and rare-class PR-AUC where the data has them).
    #[serde(default)]
    pub compare: Vec<Metric>,
    /// Keep each run's checkpoints (default false: they are deleted once the run's record is
    /// written, which keeps a large sweep small on disk).
    #[serde(default)]
    pub keep_checkpoints: bool,
    /// Model, training and shared pruning settings.
    pub base: BaseConfig,
    /// Data sets.
    pub datasets: Vec<DatasetConfig>,
    /// Methods.
    pub methods: Vec<MethodConfig>,
}

/// A quantity reported per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Test accuracy.
    Accuracy,
    /// Mean accuracy over the head third of the classes (long-tailed data).
    HeadAccuracy,
    /// Mean accuracy over the middle classes (long-tailed data).
    MidAccuracy,
    /// Mean accuracy over the tail third of the classes (long-tailed data).
    TailAccuracy,
    /// Macro-averaged F1.
    MacroF1,
    /// Recall of the rarest class (two-class rare-event data).
    RareRecall,
    /// Area under the precision-recall curve of the rarest class (two-class data).
    PrAuc,
    /// Coding entropy, bits per hidden unit (mean over hidden layers).
    EntropyBits,
    /// Mean absolute correlation of hidden on-indicators (mean over hidden layers).
    Decorrelation,
    /// Live edges / edges over the pruned layers.
    AchievedDensity,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 10] = [
        Metric::Accuracy,
        Metric::HeadAccuracy,
        Metric::MidAccuracy,
        Metric::TailAccuracy,
        Metric::MacroF1,
        Metric::RareRecall,
        Metric::PrAuc,
        Metric::EntropyBits,
        Metric::Decorrelation,
        Metric::AchievedDensity,
    ];

    /// Snake-case name.
    pub fn key(self) -> &'static str {
        match self {
            Self::Accuracy => "accuracy",
            Self::HeadAccuracy => "head_accuracy",
            Self::MidAccuracy => "mid_accuracy",
            Self::TailAccuracy => "tail_accuracy",
            Self::MacroF1 => "macro_f1",
            Self::RareRecall => "rare_recall",
            Self::PrAuc => "pr_auc",
            Self::EntropyBits => "entropy_bits",
            Self::Decorrelation => "decorrelation",
            Self::AchievedDensity => "achieved_density",
        }
    }

    /// Column heading.
    pub fn title(self) -> &'static str {
        match self {
            Self::Accuracy => "accuracy %",
            Self::HeadAccuracy => "head %",
            Self::MidAccuracy => "mid %",
            Self::TailAccuracy => "tail %",
            Self::MacroF1 => "macro-F1 %",
            Self::RareRecall => "rare recall %",
            Self::PrAuc => "PR-AUC %",
            Self::EntropyBits => "entropy bits",
            Self::Decorrelation => "decorrelation",
            Self::AchievedDensity => "density",
        }
    }

    /// A few words for the verdict.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Accuracy => "Accuracy",
            Self::HeadAccuracy => "Head-class accuracy",
            Self::MidAccuracy => "Mid-class accuracy",
            Self::TailAccuracy => "Tail-class accuracy",
            Self::MacroF1 => "Macro-F1",
            Self::RareRecall => "Rare-class recall",
            Self::PrAuc => "Rare-class PR-AUC",
            Self::EntropyBits => "Coding entropy",
            Self::Decorrelation => "Decorrelation",
            Self::AchievedDensity => "Achieved density",
        }
    }

    /// Shown in percent.
    pub fn percent(self) -> bool {
        !matches!(
            self,
            Self::EntropyBits | Self::Decorrelation | Self::AchievedDensity
        )
    }

    /// The value of a run.
    pub fn of(self, r: &RunRecord) -> Option<f64> {
        match self {
            Self::Accuracy => Some(r.accuracy),
            Self::HeadAccuracy => r.head_accuracy,
            Self::MidAccuracy => r.mid_accuracy,
            Self::TailAccuracy => r.tail_accuracy,
            Self::MacroF1 => Some(r.macro_f1),
            Self::RareRecall => r.rare_recall,
            Self::PrAuc => r.pr_auc,
            Self::EntropyBits => r.entropy_bits,
            Self::Decorrelation => r.decorrelation,
            Self::AchievedDensity => Some(r.achieved_density),
        }
    }
}

/// Target and achieved density of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDensity {
    /// Layer name.
    pub layer: String,
    /// Whether the layer is pruned.
    pub pruned: bool,
    /// The policy's target at the last refresh.
    pub target: Option<f64>,
    /// Live edges / edges at the end.
    pub achieved: f64,
}

/// Final measurements of one sweep run (`record.json`); written last, so its presence in a
/// final run folder means the run is complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Grid point.
    pub key: RunKey,
    /// The method's family.
    pub family: Family,
    /// Test accuracy.
    pub accuracy: f64,
    /// Accuracy per class.
    pub per_class_accuracy: Vec<f64>,
    /// Training samples per class.
    pub train_class_counts: Vec<usize>,
    /// Head-bucket accuracy (imbalanced training data only).
    pub head_accuracy: Option<f64>,
    /// Mid-bucket accuracy (imbalanced training data only).
    pub mid_accuracy: Option<f64>,
    /// Tail-bucket accuracy (imbalanced training data only).
    pub tail_accuracy: Option<f64>,
    /// Macro-F1.
    pub macro_f1: f64,
    /// Recall of the rarest class (two-class data only).
    pub rare_recall: Option<f64>,
    /// PR-AUC of the rarest class (two-class data only).
    pub pr_auc: Option<f64>,
    /// Coding entropy, bits per unit, mean over hidden layers.
    pub entropy_bits: Option<f64>,
    /// Decorrelation, mean over hidden layers that have one.
    pub decorrelation: Option<f64>,
    /// Live edges / edges over the pruned layers (1 for dense).
    pub achieved_density: f64,
    /// Per layer.
    pub layers: Vec<LayerDensity>,
    /// Optimizer steps.
    pub steps: u64,
    /// Training wall time, seconds.
    pub wall_s: f64,
}

/// A point of the grid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunKey {
    /// Data set name.
    pub dataset: String,
    /// Method name.
    pub method: String,
    /// Target density in thousandths (`None` for the dense method).
    pub density_milli: Option<u32>,
    /// Seed.
    pub seed: u64,
}

impl RunKey {
    /// Target density (`None` for dense).
    pub fn density(&self) -> Option<f64> {
        self.density_milli.map(|m| m as f64 / 1000.0)
    }

    /// `d0.500`, or `dense`.
    pub fn density_tag(&self) -> String {
        match self.density() {
            Some(d) => format!("d{d:.3}"),
            None => "dense".to_string(),
        }
    }

    /// Folder of the run inside the sweep's output folder.
    pub fn rel_dir(&self) -> PathBuf {
        Path::new("runs")
            .join(&self.dataset)
            .join(&self.method)
            .join(self.density_tag())
            .join(format!("seed-{}", self.seed))
    }

    /// One-line label.
    pub fn label(&self) -> String {
        format!(
            "{} / {} / {} / seed {}",
            self.dataset,
            self.method,
            self.density_tag(),
            self.seed
        )
    }
}

/// A share of a sweep: runs `i, i + n, i + 2n, ...` of the grid (0-based `i < n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..n`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("--shard {s:?}: expected I/N, e.g. 0/8 (I counts from 0)"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| anyhow!("--shard {s:?}: I is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| anyhow!("--shard {s:?}: N is not a number"))?;
        ensure!(count >= 1, "--shard {s:?}: N must be >= 1");
        ensure!(
            index < count,
            "--shard {s:?}: I must be in 0..{count} (shards count from 0, as SLURM_ARRAY_TASK_ID with --array=0-{})",
            count - 1
        );
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Whether grid position `pos` belongs to this shard.
    pub fn owns(&self, pos: usize) -> bool {
        pos % self.count == self.index
    }
}

/// One run of the grid, resolved.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its grid point.
    pub key: RunKey,
    /// Its method's family.
    pub family: Family,
    /// The one-arm, one-seed experiment to train.
    pub experiment: ExperimentConfig,
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

/// Sets `table.<path>` (a dotted path; missing tables are created) to `v`.
fn set_path(table: &mut toml::Table, path: &str, v: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts
        .pop()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| anyhow!("empty field path {path:?}"))?;
    let mut t = table;
    for p in parts {
        let e = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        t = e
            .as_table_mut()
            .ok_or_else(|| anyhow!("{path}: {p} is not a table"))?;
    }
    t.insert(last.to_string(), v);
    Ok(())
}

impl SweepConfig {
    /// Parses a sweep file's text (unknown or missing fields are errors naming the field).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow!("sweep config: {e}"))
    }

    /// Reads a sweep file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read sweep file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The sweep as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("sweep config: cannot write TOML")
    }

    /// Checks the grid's own fields (names, seeds, densities, methods); the experiments
    /// themselves are checked by [`Self::validate_experiments`].
    pub fn validate(&self) -> Result<()> {
        check_name("name", &self.name)?;
        ensure!(!self.seeds.is_empty(), "seeds: give at least one seed");
        let mut seen = BTreeSet::new();
        for s in &self.seeds {
            ensure!(seen.insert(*s), "seeds: seed {s} appears twice");
        }
        ensure!(
            !self.densities.is_empty(),
            "densities: give at least one density"
        );
        let mut seen = BTreeSet::new();
        for (i, &d) in self.densities.iter().enumerate() {
            ensure!(
                d.is_finite() && d > 0.0 && d <= 1.0,
                "densities[{i}] must be in (0, 1], got {d}"
            );
            let m = (d * 1000.0).round() as u32;
            ensure!(
                ((m as f64) / 1000.0 - d).abs() < 1e-9,
                "densities[{i}] = {d}: give at most three decimals"
            );
            ensure!(seen.insert(m), "densities: {d} appears twice");
        }
        ensure!(
            !self.datasets.is_empty(),
            "datasets: give at least one data set"
        );
        let mut names = BTreeSet::new();
        for (i, d) in self.datasets.iter().enumerate() {
            check_name(&format!("datasets[{i}].name"), &d.name)?;
            ensure!(
                names.insert(&d.name),
                "datasets[{i}].name {:?} appears twice",
                d.name
            );
            d.data
                .validate()
                .with_context(|| format!("datasets[{i}] ({})", d.name))?;
        }
        ensure!(
            !self.methods.is_empty(),
            "methods: give at least one method"
        );
        let mut names = BTreeSet::new();
        for (i, m) in self.methods.iter().enumerate() {
            check_name(&format!("methods[{i}].name"), &m.name)?;
            ensure!(
                names.insert(&m.name),
                "methods[{i}].name {:?} appears twice",
                m.name
            );
            match (m.prune, m.family()) {
                (false, Family::Dense) => ensure!(
                    m.pruning.is_empty(),
                    "methods[{i}] ({}): prune = false but a pruning table is given",
                    m.name
                ),
                (false, f) => bail!(
                    "methods[{i}] ({}): prune = false makes it dense, but family is {f:?}",
                    m.name
                ),
                (true, Family::Dense) => bail!(
                    "methods[{i}] ({}): family = \"dense\" needs prune = false",
                    m.name
                ),
                (true, _) => ensure!(
                    !m.density_fields.is_empty(),
                    "methods[{i}] ({}): density_fields is empty, so the run's density would not reach the policy",
                    m.name
                ),
            }
        }
        Ok(())
    }

    /// Every grid point in canonical order: data sets, methods, densities (dense: once), seeds.
    pub fn keys(&self) -> Vec<(RunKey, Family)> {
        let mut out = Vec::new();
        for d in &self.datasets {
            for m in &self.methods {
                let dens: Vec<Option<u32>> = if m.prune {
                    self.densities
                        .iter()
                        .map(|&x| Some((x * 1000.0).round() as u32))
                        .collect()
                } else {
                    vec![None]
                };
                for dm in dens {
                    for &seed in &self.seeds {
                        out.push((
                            RunKey {
                                dataset: d.name.clone(),
                                method: m.name.clone(),
                                density_milli: dm,
                                seed,
                            },
                            m.family(),
                        ));
                    }
                }
            }
        }
        out
    }

    /// The experiment of one grid point.
    pub fn experiment(&self, key: &RunKey) -> Result<ExperimentConfig> {
        let d = self
            .datasets
            .iter()
            .find(|d| d.name == key.dataset)
            .ok_or_else(|| anyhow!("no data set {:?} in the sweep", key.dataset))?;
        let (mi, m) = self
            .methods
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == key.method)
            .ok_or_else(|| anyhow!("no method {:?} in the sweep", key.method))?;
        let mut pruning = m.pruning.clone();
        if let Some(dens) = key.density() {
            for f in &m.density_fields {
                set_path(&mut pruning, f, toml::Value::Float(dens))
                    .with_context(|| format!("methods[{mi}] ({}).density_fields", m.name))?;
            }
        }
        let mut base_pruning = self.base.pruning.clone();
        if !m.prune {
            base_pruning.clear();
        }
        Ok(ExperimentConfig {
            name: format!(
                "{}-{}-{}",
                key.dataset,
                key.method,
                key.density_tag().replace('.', "p")
            ),
            description: format!("sweep {}: {}", self.name, key.label()),
            seeds: vec![key.seed],
            data: d.data.clone(),
            model: self.base.model.clone(),
            train: self.base.train.clone(),
            pruning: base_pruning,
            arms: vec![crate::config::ArmConfig {
                name: key.method.clone(),
                prune: m.prune,
                pruning,
            }],
            report: Default::default(),
        })
    }

    /// Every grid point, resolved into its experiment.
    pub fn jobs(&self) -> Result<Vec<Job>> {
        self.validate()?;
        self.keys()
            .into_iter()
            .map(|(key, family)| {
                let experiment = self.experiment(&key)?;
                Ok(Job {
                    key,
                    family,
                    experiment,
                })
            })
            .collect()
    }

    /// Checks every method at every density against every data set (building each data
    /// set once, for the first seed), so a bad method fails before any training.
    pub fn validate_experiments(&self) -> Result<()> {
        self.validate()?;
        let seed = self.seeds[0];
        for d in &self.datasets {
            let split = d
                .data
                .build(seed)
                .with_context(|| format!("data set {}", d.name))?;
            for m in &self.methods {
                let dens: Vec<Option<u32>> = if m.prune {
                    self.densities
                        .iter()
                        .map(|&x| Some((x * 1000.0).round() as u32))
                        .collect()
                } else {
                    vec![None]
                };
                for dm in dens {
                    let key = RunKey {
                        dataset: d.name.clone(),
                        method: m.name.clone(),
                        density_milli: dm,
                        seed,
                    };
                    self.experiment(&key)?
                        .plan_with(&split)
                        .with_context(|| format!("method {} at {}", m.name, key.density_tag()))?;
                }
            }
        }
        Ok(())
    }
}

/// Trains one grid point and measures it. The real one (`cli_sweep::TrainerExecutor`)
/// trains with the `bb run` runner; tests plug in fakes.
pub trait Executor: Sync {
    /// Trains `job` in the folder `dir` (it may hold an interrupted attempt to resume) and
    /// returns its record.
    fn execute(&self, job: &Job, dir: &Path) -> Result<RunRecord>;
}

/// Options of [`run_sweep`].
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only this share.
    pub shard: Option<Shard>,
    /// Stop after this many runs trained in this call (finished ones skipped do not count).
    pub max_runs: Option<usize>,
    /// No per-run lines.
    pub quiet: bool,
}

/// What [`run_sweep`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Runs in this shard.
    pub assigned: usize,
    /// Found complete and skipped.
    pub skipped: usize,
    /// Trained now.
    pub trained: usize,
    /// Completed by another process while this one trained them too (its copy was dropped).
    pub lost_races: usize,
    /// Failed runs with their errors.
    pub failed: Vec<(RunKey, String)>,
    /// Left untouched because `max_runs` was reached.
    pub not_started: usize,
}

const RECORD: &str = "record.json";
const SWEEP_FILE: &str = "sweep.toml";

/// Writes `bytes` to `path` atomically through a temporary name unique to this process *and*
/// call, so that threads of one process (not only separate processes) may write the same
/// file at once: readers see one complete version or another.
fn write_shared(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    static N: AtomicU64 = AtomicU64::new(0);
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(name);
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `OUT/sweep.toml`, or checks that the one there describes the same sweep.
pub fn init_out_dir(cfg: &SweepConfig, out: &Path) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let p = out.join(SWEEP_FILE);
    let text = cfg.to_toml()?;
    if p.exists() {
        let there = SweepConfig::load(&p)?;
        if &there == cfg {
            return Ok(());
        }
        if let Err(why) = cfg.extends(&there) {
            bail!(
                "{} holds a different sweep ({why}); use another --out folder, or delete it to start over",
                p.display()
            );
        }
        // a grown grid: the runs already there stay valid
    }
    write_shared(&p, text.as_bytes())
}

impl SweepConfig {
    /// `Ok` when every run of `old` is also a run of `self` with the same experiment: the same
    /// name, `base` and `keep_checkpoints`, and every data set, method, seed and density of
    /// `old` still there unchanged (new ones may be added; descriptions and `compare` may
    /// change). Otherwise says what differs.
    pub fn extends(&self, old: &SweepConfig) -> std::result::Result<(), String> {
        if self.name != old.name {
            return Err(format!("it is named {:?}", old.name));
        }
        if self.base != old.base {
            return Err("its [base] differs".to_string());
        }
        if self.keep_checkpoints != old.keep_checkpoints {
            return Err("its keep_checkpoints differs".to_string());
        }
        for s in &old.seeds {
            if !self.seeds.contains(s) {
                return Err(format!("it has seed {s}"));
            }
        }
        for d in &old.densities {
            if !self.densities.iter().any(|x| (x - d).abs() < 1e-12) {
                return Err(format!("it has density {d}"));
            }
        }
        for d in &old.datasets {
            match self.datasets.iter().find(|x| x.name == d.name) {
                Some(x) if x.data == d.data => {}
                Some(_) => return Err(format!("its data set {:?} differs", d.name)),
                None => return Err(format!("it has data set {:?}", d.name)),
            }
        }
        for m in &old.methods {
            match self.methods.iter().find(|x| x.name == m.name) {
                Some(x) if x == m => {}
                Some(_) => return Err(format!("its method {:?} differs", m.name)),
                None => return Err(format!("it has method {:?}", m.name)),
            }
        }
        Ok(())
    }
}

/// This host's name with every character but ASCII letters and digits replaced by `_`, so
/// that `<host>-<pid>-<n>` in a partial folder's name splits unambiguously (no host name is
/// a `-`-prefix of another's).
fn host_name() -> String {
    let h = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".to_string());
    let h: String = h
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if h.is_empty() {
        "host".to_string()
    } else {
        h
    }
}

fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true // cannot tell: never take over
    }
}

/// A fresh partial-folder name for `final_dir`, unique across processes and threads.
fn partial_name(final_dir: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let base = final_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_dir.with_file_name(format!(
        "{base}.partial-{}-{}-{n}",
        host_name(),
        std::process::id()
    ))
}

/// An interrupted attempt at `final_dir` left by a process of this host that is gone; it is
/// renamed to `ours` (only one claimant can win the rename).
fn adopt_orphan(final_dir: &Path, ours: &Path) -> Option<()> {
    let parent = final_dir.parent()?;
    let base = final_dir.file_name()?.to_string_lossy().into_owned();
    let prefix = format!("{base}.partial-{}-", host_name());
    for e in fs::read_dir(parent).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        if fs::rename(e.path(), ours).is_ok() {
            return Some(());
        }
    }
    None
}

/// Whether the run of `key` is complete in `out`.
pub fn is_complete(out: &Path, key: &RunKey) -> bool {
    out.join(key.rel_dir()).join(RECORD).is_file()
}

/// Trains the runs of the grid (or of one shard) that are not complete yet.
pub fn run_sweep(
    cfg: &SweepConfig,
    out: &Path,
    opts: &RunOptions,
    exec: &dyn Executor,
) -> Result<RunSummary> {
    let jobs = cfg.jobs()?;
    init_out_dir(cfg, out)?;
    let mut sum = RunSummary::default();
    let mine: Vec<&Job> = jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| opts.shard.is_none_or(|s| s.owns(*i)))
        .map(|(_, j)| j)
        .collect();
    sum.assigned = mine.len();
    for (n, job) in mine.iter().enumerate() {
        let final_dir = out.join(job.key.rel_dir());
        if final_dir.join(RECORD).is_file() {
            sum.skipped += 1;
            continue;
        }
        if opts
            .max_runs
            .is_some_and(|m| sum.trained + sum.failed.len() >= m)
        {
            sum.not_started += 1;
            continue;
        }
        let parent = final_dir.parent().expect("run folders have a parent");
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = partial_name(&final_dir);
        let resumed = adopt_orphan(&final_dir, &tmp).is_some();
        if !opts.quiet {
            eprintln!(
                "[{}/{}] {}{}",
                n + 1,
                mine.len(),
                job.key.label(),
                if resumed {
                    " (resuming an interrupted attempt)"
                } else {
                    ""
                }
            );
        }
        let res = exec.execute(job, &tmp).and_then(|rec| {
            ensure!(
                rec.key == job.key,
                "the executor returned the record of {} for {}",
                rec.key.label(),
                job.key.label()
            );
            if !cfg.keep_checkpoints {
                remove_checkpoints(&tmp)?;
            }
            write_shared(
                &tmp.join(RECORD),
                serde_json::to_string_pretty(&rec)?.as_bytes(),
            )
        });
        match res {
            Ok(()) => match fs::rename(&tmp, &final_dir) {
                Ok(()) => sum.trained += 1,
                Err(_) if final_dir.join(RECORD).is_file() => {
                    // another shard finished it first; keep theirs
                    fs::remove_dir_all(&tmp).ok();
                    sum.lost_races += 1;
                }
                Err(e) => {
                    return Err(anyhow!(
                        "cannot move {} to {}: {e}",
                        tmp.display(),
                        final_dir.display()
                    ))
                }
            },
            Err(e) => {
                let msg = format!("{e:#}");
                if !opts.quiet {
                    eprintln!("  failed: {msg}");
                }
                write_shared(&tmp.join("error.txt"), msg.as_bytes()).ok();
                sum.failed.push((job.key.clone(), msg));
            }
        }
    }
    Ok(sum)
}

/// Deletes every `checkpoints/` folder under `dir`.
fn remove_checkpoints(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            if e.file_name() == "checkpoints" {
                fs::remove_dir_all(e.path())
                    .with_context(|| format!("cannot delete {}", e.path().display()))?;
            } else {
                remove_checkpoints(&e.path())?;
            }
        }
    }
    Ok(())
}

/// The records found in `out` for the grid of `cfg`, and the grid points still missing.
#[derive(Debug, Clone)]
pub struct Collected {
    /// Complete runs, in grid order.
    pub records: Vec<RunRecord>,
    /// Grid points without a complete run.
    pub missing: Vec<RunKey>,
    /// Runs left in progress or interrupted (`*.partial-*` folders).
    pub partial: usize,
}

/// Reads every complete run of the grid from `out` (no locks: only final folders are read).
pub fn collect(cfg: &SweepConfig, out: &Path) -> Result<Collected> {
    let mut records = Vec::new();
    let mut missing = Vec::new();
    let mut partial = 0;
    let mut parents = BTreeSet::new();
    for (key, _) in cfg.keys() {
        let dir = out.join(key.rel_dir());
        if let Some(p) = dir.parent() {
            parents.insert(p.to_path_buf());
        }
        let p = dir.join(RECORD);
        if !p.is_file() {
            missing.push(key);
            continue;
        }
        let text =
            fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let rec: RunRecord =
            serde_json::from_str(&text).with_context(|| format!("bad record {}", p.display()))?;
        ensure!(
            rec.key == key,
            "{} holds the record of {}, not {}",
            p.display(),
            rec.key.label(),
            key.label()
        );
        records.push(rec);
    }
    for p in parents {
        if let Ok(rd) = fs::read_dir(&p) {
            partial += rd
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
                .count();
        }
    }
    Ok(Collected {
        records,
        missing,
        partial,
    })
}

/// Mean and interval of one metric for one method at one density.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Method.
    pub method: String,
    /// Its family.
    pub family: Family,
    /// Target density (`None`: dense).
    pub density: Option<f64>,
    /// Metric.
    pub metric: Metric,
    /// Over seeds.
    pub interval: Interval,
    /// `(seed, value)` pairs.
    pub values: Vec<(u64, f64)>,
}

/// The paired comparison at one density.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Target density.
    pub density: f64,
    /// Metric.
    pub metric: Metric,
    /// BB variant with the best mean.
    pub bb: String,
    /// Its mean.
    pub bb_mean: f64,
    /// Baseline with the best mean.
    pub baseline: String,
    /// Its mean.
    pub baseline_mean: f64,
    /// `bb - baseline` per common seed.
    pub paired: Paired,
    /// From the interval of the differences.
    pub verdict: Verdict,
}

/// The summary of one data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Training samples per class (first record).
    pub train_class_counts: Vec<usize>,
    /// Metrics that have values on this data set.
    pub metrics: Vec<Metric>,
    /// Every (method, density, metric) cell.
    pub cells: Vec<Cell>,
    /// BB vs best baseline per density and compared metric.
    pub comparisons: Vec<Comparison>,
    /// Every BB variant (not only the best) vs the best baseline, per density and metric.
    pub variants: Vec<Comparison>,
    /// Runs whose achieved density differs from the target by more than 0.005.
    pub off_target: Vec<(RunKey, f64)>,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    /// Sweep name.
    pub sweep: String,
    /// Grid points.
    pub planned: usize,
    /// Complete runs.
    pub complete: usize,
    /// Grid points without a complete run.
    pub missing: Vec<RunKey>,
    /// Sum of the runs' training wall times, seconds.
    pub train_seconds: f64,
    /// Per data set.
    pub datasets: Vec<DatasetSummary>,
}

/// Tolerance on achieved vs target density before a run is flagged.
pub const DENSITY_TOLERANCE: f64 = 0.005;

fn default_compare(metrics: &[Metric]) -> Vec<Metric> {
    [Metric::Accuracy, Metric::TailAccuracy, Metric::PrAuc]
        .into_iter()
        .filter(|m| metrics.contains(m))
        .collect()
}

/// Builds the summary from collected records.
pub fn summarise(cfg: &SweepConfig, col: &Collected) -> Result<SweepSummary> {
    let mut datasets = Vec::new();
    for d in &cfg.datasets {
        let recs: Vec<&RunRecord> = col
            .records
            .iter()
            .filter(|r| r.key.dataset == d.name)
            .collect();
        let metrics: Vec<Metric> = Metric::ALL
            .into_iter()
            .filter(|m| recs.iter().any(|r| m.of(r).is_some()))
            .collect();
        let mut cells = Vec::new();
        for m in &cfg.methods {
            let dens: Vec<Option<u32>> = if m.prune {
                cfg.densities
                    .iter()
                    .map(|&x| Some((x * 1000.0).round() as u32))
                    .collect()
            } else {
                vec![None]
            };
            for dm in dens {
                let rs: Vec<&&RunRecord> = recs
                    .iter()
                    .filter(|r| r.key.method == m.name && r.key.density_milli == dm)
                    .collect();
                for &metric in &metrics {
                    let values: Vec<(u64, f64)> = rs
                        .iter()
                        .filter_map(|r| metric.of(r).map(|v| (r.key.seed, v)))
                        .collect();
                    let xs: Vec<f64> = values.iter().map(|v| v.1).collect();
                    if let Some(interval) = mean_ci95(&xs) {
                        cells.push(Cell {
                            method: m.name.clone(),
                            family: m.family(),
                            density: dm.map(|x| x as f64 / 1000.0),
                            metric,
                            interval,
                            values,
                        });
                    }
                }
            }
        }
        let compare = if cfg.compare.is_empty() {
            default_compare(&metrics)
        } else {
            cfg.compare
                .iter()
                .copied()
                .filter(|m| metrics.contains(m))
                .collect()
        };
        let mut comparisons = Vec::new();
        let mut variants = Vec::new();
        for &dens in &cfg.densities {
            for &metric in &compare {
                let at = |fam: Family| {
                    cells
                        .iter()
                        .filter(|c| {
                            c.family == fam
                                && c.metric == metric
                                && c.density.is_some_and(|x| (x - dens).abs() < 1e-9)
                        })
                        .max_by(|a, b| a.interval.mean.total_cmp(&b.interval.mean))
                };
                let (Some(bb), Some(base)) = (at(Family::Bb), at(Family::Baseline)) else {
                    continue;
                };
                let compare_to = |bb: &Cell| -> Result<Comparison> {
                    let paired =
                        paired_differences(&bb.values, &base.values).map_err(|e| anyhow!(e))?;
                    let verdict = Verdict::of(paired.interval.as_ref());
                    Ok(Comparison {
                        density: dens,
                        metric,
                        bb: bb.method.clone(),
                        bb_mean: bb.interval.mean,
                        baseline: base.method.clone(),
                        baseline_mean: base.interval.mean,
                        paired,
                        verdict,
                    })
                };
                comparisons.push(compare_to(bb)?);
                for c in cells.iter().filter(|c| {
                    c.family == Family::Bb
                        && c.metric == metric
                        && c.density.is_some_and(|x| (x - dens).abs() < 1e-9)
                }) {
                    variants.push(compare_to(c)?);
                }
            }
        }
        let off_target = recs
            .iter()
            .filter_map(|r| {
                let t = r.key.density()?;
                ((r.achieved_density - t).abs() > DENSITY_TOLERANCE)
                    .then(|| (r.key.clone(), r.achieved_density))
            })
            .collect();
        datasets.push(DatasetSummary {
            name: d.name.clone(),
            description: d.description.clone(),
            train_class_counts: recs
                .first()
                .map(|r| r.train_class_counts.clone())
                .unwrap_or_default(),
            metrics,
            cells,
            comparisons,
            variants,
            off_target,
        });
    }
    Ok(SweepSummary {
        sweep: cfg.name.clone(),
        planned: cfg.keys().len(),
        complete: col.records.len(),
        missing: col.missing.clone(),
        train_seconds: col.records.iter().map(|r| r.wall_s).sum(),
        datasets,
    })
}

fn fmt_iv(iv: &Interval, metric: Metric) -> String {
    if metric.percent() {
        iv.fmt(100.0, 2)
    } else {
        iv.fmt(1.0, 3)
    }
}

fn fmt_density(d: Option<f64>) -> String {
    d.map_or_else(|| "1 (dense)".to_string(), |d| format!("{d}"))
}

impl DatasetSummary {
    fn cell(&self, method: &str, density: Option<f64>, metric: Metric) -> Option<&Cell> {
        self.cells.iter().find(|c| {
            c.method == method
                && c.metric == metric
                && match (c.density, density) {
                    (None, None) => true,
                    (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                    _ => false,
                }
        })
    }
}

/// The verdict paragraph of one data set.
fn verdict_text(d: &DatasetSummary) -> String {
    let mut s = String::new();
    let mut metrics: Vec<Metric> = Vec::new();
    for c in &d.comparisons {
        if !metrics.contains(&c.metric) {
            metrics.push(c.metric);
        }
    }
    if metrics.is_empty() {
        return "No comparison: the sweep needs at least one BB method and one baseline with complete runs.\n".to_string();
    }
    for m in metrics {
        let cs: Vec<&Comparison> = d.comparisons.iter().filter(|c| c.metric == m).collect();
        let list = |v: Verdict| {
            let ds: Vec<String> = cs
                .iter()
                .filter(|c| c.verdict == v)
                .map(|c| format!("{}", c.density))
                .collect();
            ds
        };
        let (w, t, l) = (list(Verdict::Win), list(Verdict::Tie), list(Verdict::Loss));
        let part = |what: &str, ds: &[String]| {
            if ds.is_empty() {
                None
            } else {
                Some(format!("{what} at density {}", ds.join(", ")))
            }
        };
        let parts: Vec<String> = [
            part("**wins**", &w),
            part("**ties**", &t),
            part("**loses**", &l),
        ]
        .into_iter()
        .flatten()
        .collect();
        let _ = writeln!(
            s,
            "- {}: the best BB variant {} against the best baseline ({} of {} densities won, {} tied, {} lost; \"tie\" = the 95 % interval of the paired difference contains 0).",
            m.describe(),
            parts.join(", "),
            w.len(),
            cs.len(),
            t.len(),
            l.len()
        );
    }
    s
}

/// Renders `summary.md`.
pub fn render_markdown(cfg: &SweepConfig, s: &SweepSummary, plots: &[(String, String)]) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "# Sweep `{}`\n", s.sweep);
    if !cfg.description.is_empty() {
        let _ = writeln!(w, "{}\n", cfg.description.trim());
    }
    let _ = writeln!(
        w,
        "Runs complete: **{} of {}**{}. Training time summed over runs: {}. \
         Seeds: {:?}. Intervals are 95 % Student-t intervals over seeds (mean ± half-width).\n",
        s.complete,
        s.planned,
        if s.missing.is_empty() {
            String::new()
        } else {
            format!(
                " ({} missing: this summary covers what exists)",
                s.missing.len()
            )
        },
        if s.train_seconds < 120.0 {
            format!("{:.1} s", s.train_seconds)
        } else {
            format!("{:.1} min", s.train_seconds / 60.0)
        },
        cfg.seeds
    );
    let _ = writeln!(w, "## Verdict\n");
    for d in &s.datasets {
        let _ = writeln!(w, "**{}**\n\n{}", d.name, verdict_text(d));
    }
    for d in &s.datasets {
        let _ = writeln!(w, "## {}\n", d.name);
        if !d.description.is_empty() {
            let _ = writeln!(w, "{}\n", d.description);
        }
        if !d.train_class_counts.is_empty() {
            let _ = writeln!(
                w,
                "Training samples per class: {:?} ({} in all).\n",
                d.train_class_counts,
                d.train_class_counts.iter().sum::<usize>()
            );
        }
        for (ds, file) in plots {
            if ds == &d.name {
                let _ = writeln!(w, "![{}](plots/{file})\n", d.name);
            }
        }
        // accuracy matrix
        let _ = writeln!(w, "### Accuracy % by method and target density\n");
        let _ = write!(w, "| method | family |");
        for dn in &cfg.densities {
            let _ = write!(w, " {dn} |");
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "|---|---|{}", "---|".repeat(cfg.densities.len()));
        for m in &cfg.methods {
            let _ = write!(w, "| {} | {} |", m.name, m.family().word());
            for &dn in &cfg.densities {
                let c = if m.prune {
                    d.cell(&m.name, Some(dn), Metric::Accuracy)
                } else {
                    d.cell(&m.name, None, Metric::Accuracy)
                };
                let _ = write!(
                    w,
                    " {} |",
                    c.map_or_else(
                        || "–".to_string(),
                        |c| fmt_iv(&c.interval, Metric::Accuracy)
                    )
                );
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(
            w,
            "\nDense methods are trained once per seed; their value is repeated in every column.\n"
        );
        // paired comparisons
        if !d.comparisons.is_empty() {
            let _ = writeln!(w, "### BB vs the best baseline (paired by seed)\n");
            let _ = writeln!(
                w,
                "| density | metric | best BB | mean | best baseline | mean | BB − baseline (points) | pairs | verdict |"
            );
            let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
            for c in &d.comparisons {
                let scale = if c.metric.percent() { 100.0 } else { 1.0 };
                let diff = c.paired.interval.as_ref().map_or_else(
                    || "–".to_string(),
                    |iv| match iv.half_width {
                        Some(h) => format!(
                            "{:+.2} [{:+.2}, {:+.2}]",
                            iv.mean * scale,
                            (iv.mean - h) * scale,
                            (iv.mean + h) * scale
                        ),
                        None => format!("{:+.2} (one pair)", iv.mean * scale),
                    },
                );
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {:.2} | {} | {:.2} | {} | {} | {} |",
                    c.density,
                    c.metric.key(),
                    c.bb,
                    c.bb_mean * scale,
                    c.baseline,
                    c.baseline_mean * scale,
                    diff,
                    c.paired.keys.len(),
                    c.verdict.word()
                );
            }
            let _ = writeln!(
                w,
                "\nThe best BB variant and the best baseline are each chosen by their mean over the same seeds; the interval is that of the per-seed differences.\n"
            );
            // every BB variant against the best baseline, one table per compared metric
            let mut metrics: Vec<Metric> = Vec::new();
            for c in &d.variants {
                if !metrics.contains(&c.metric) {
                    metrics.push(c.metric);
                }
            }
            for metric in metrics {
                let scale = if metric.percent() { 100.0 } else { 1.0 };
                let _ = writeln!(
                    w,
                    "**Each BB variant − the best baseline, {} (points, 95 % interval, verdict)**\n",
                    metric.key()
                );
                let _ = write!(w, "| BB variant |");
                for dn in &cfg.densities {
                    let _ = write!(w, " {dn} |");
                }
                let _ = writeln!(w);
                let _ = writeln!(w, "|---|{}", "---|".repeat(cfg.densities.len()));
                for m in cfg.methods.iter().filter(|m| m.family() == Family::Bb) {
                    let _ = write!(w, "| {} |", m.name);
                    for &dn in &cfg.densities {
                        let c = d.variants.iter().find(|c| {
                            c.bb == m.name && c.metric == metric && (c.density - dn).abs() < 1e-9
                        });
                        let cell = c
                            .and_then(|c| {
                                let iv = c.paired.interval.as_ref()?;
                                let h = iv.half_width.unwrap_or(0.0);
                                Some(format!(
                                    "{:+.2} [{:+.2}, {:+.2}] {}",
                                    iv.mean * scale,
                                    (iv.mean - h) * scale,
                                    (iv.mean + h) * scale,
                                    c.verdict.word()
                                ))
                            })
                            .unwrap_or_else(|| "–".to_string());
                        let _ = write!(w, " {cell} |");
                    }
                    let _ = writeln!(w);
                }
                let _ = writeln!(w);
            }
        }
        // per-density detail
        let _ = writeln!(w, "### All metrics per density\n");
        let mut dens_list: Vec<Option<f64>> = vec![None];
        dens_list.extend(cfg.densities.iter().map(|&x| Some(x)));
        for dn in dens_list {
            let methods: Vec<&MethodConfig> = cfg
                .methods
                .iter()
                .filter(|m| m.prune == dn.is_some())
                .collect();
            if methods.is_empty() {
                continue;
            }
            let _ = writeln!(w, "**target density {}**\n", fmt_density(dn));
            let _ = write!(w, "| method |");
            for m in &d.metrics {
                let _ = write!(w, " {} |", m.title());
            }
            let _ = writeln!(w, " seeds |");
            let _ = writeln!(w, "|---|{}---|", "---|".repeat(d.metrics.len()));
            for m in methods {
                let _ = write!(w, "| {} |", m.name);
                let mut n = 0;
                for &metric in &d.metrics {
                    let c = d.cell(&m.name, dn, metric);
                    if let Some(c) = c {
                        n = n.max(c.interval.n);
                    }
                    let _ = write!(
                        w,
                        " {} |",
                        c.map_or_else(|| "–".to_string(), |c| fmt_iv(&c.interval, metric))
                    );
                }
                let _ = writeln!(w, " {n} |");
            }
            let _ = writeln!(w);
        }
        if d.off_target.is_empty() {
            let _ = writeln!(
                w,
                "Every pruned run ended within {DENSITY_TOLERANCE} of its target density.\n"
            );
        } else {
            let _ = writeln!(
                w,
                "**{} runs missed their target density by more than {DENSITY_TOLERANCE}** (methods without exact matching, e.g. the two-threshold surrogate); the `density` column gives what they reached:\n",
                d.off_target.len()
            );
            let mut by: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
            for (k, a) in &d.off_target {
                by.entry((k.method.clone(), k.density_tag()))
                    .or_default()
                    .push(*a);
            }
            for ((m, t), v) in by {
                let mean = v.iter().sum::<f64>() / v.len() as f64;
                let _ = writeln!(
                    w,
                    "- {m} at {t}: achieved {mean:.3} (mean of {} runs)",
                    v.len()
                );
            }
            let _ = writeln!(w);
        }
    }
    if !s.missing.is_empty() {
        let _ = writeln!(w, "## Missing runs\n");
        for k in s.missing.iter().take(50) {
            let _ = writeln!(w, "- {}", k.label());
        }
        if s.missing.len() > 50 {
            let _ = writeln!(w, "- ... and {} more", s.missing.len() - 50);
        }
        let _ = writeln!(w);
    }
    w
}

/// A qualitative palette of twelve distinguishable colours (methods beyond twelve wrap).
fn method_color(i: usize) -> RGBAColor {
    const C: [(u8, u8, u8); 12] = [
        (31, 119, 180),
        (44, 160, 44),
        (23, 190, 207),
        (214, 39, 40),
        (255, 127, 14),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (102, 51, 0),
        (0, 0, 128),
    ];
    let (r, g, b) = C[(i + C.len() - 1) % C.len()];
    RGBColor(r, g, b).to_rgba()
}

/// Accuracy-vs-density plot (mean and 95 % interval per method; dense as a dashed line).
fn density_plot(path: &Path, cfg: &SweepConfig, d: &DatasetSummary, metric: Metric) -> Result<()> {
    let scale = if metric.percent() { 100.0 } else { 1.0 };
    let pts = |m: &MethodConfig| -> Vec<(f64, f64, f64)> {
        cfg.densities
            .iter()
            .filter_map(|&x| {
                let c = d.cell(&m.name, Some(x), metric)?;
                // a method that does not match the density is drawn where it ended up
                let at = if m.family() == Family::Reference {
                    d.cell(&m.name, Some(x), Metric::AchievedDensity)
                        .map_or(x, |a| a.interval.mean)
                } else {
                    x
                };
                Some((
                    at,
                    c.interval.mean * scale,
                    c.interval.half_width.unwrap_or(0.0) * scale,
                ))
            })
            .collect()
    };
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for m in &cfg.methods {
        if m.prune {
            for (_, y, h) in pts(m) {
                lo = lo.min(y - h);
                hi = hi.max(y + h);
            }
        } else if let Some(c) = d.cell(&m.name, None, metric) {
            lo = lo.min(c.interval.lo() * scale);
            hi = hi.max(c.interval.hi() * scale);
        }
    }
    if !lo.is_finite() {
        return Ok(());
    }
    let pad = ((hi - lo) * 0.08).max(0.5 * scale / 100.0);
    let (y0, y1) = (lo - pad, hi + pad);
    let xs: Vec<f64> = cfg
        .methods
        .iter()
        .filter(|m| m.prune)
        .flat_map(|m| pts(m).into_iter().map(|p| p.0))
        .chain(cfg.densities.iter().copied())
        .collect();
    let xmax = xs.iter().fold(0.0f64, |a, &b| a.max(b));
    let xmin = xs.iter().fold(1.0f64, |a, &b| a.min(b));
    let xpad = ((xmax - xmin) * 0.05).max(0.02);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (980, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let (plot_area, legend_area) = root.split_horizontally(790);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(
                format!(
                    "{}: {} vs density (mean ± 95 % CI over seeds)",
                    d.name,
                    metric.describe().to_lowercase()
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((xmin - xpad)..(xmax + xpad), y0..y1)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("density (kept fraction of the pruned layers' edges; reference methods at their achieved density)")
            .y_desc(metric.title())
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        let n_m = cfg.methods.len().max(1) as f64;
        for (i, m) in cfg.methods.iter().enumerate() {
            let color = if m.prune {
                method_color(i)
            } else {
                BLACK.to_rgba()
            };
            let width = if m.family() == Family::Bb { 3 } else { 1 };
            let label = match m.family() {
                Family::Dense => format!("{} (dense)", m.name),
                Family::Reference => format!("{} (reference)", m.name),
                Family::Bb => format!("{} (BB)", m.name),
                Family::Baseline => m.name.clone(),
            };
            let ly = 40 + 22 * i as i32;
            legend_area
                .draw(&PathElement::new(
                    vec![(4, ly), (30, ly)],
                    color.stroke_width(width.max(2)),
                ))
                .map_err(|e| anyhow!("plot: {e}"))?;
            legend_area
                .draw(&Text::new(label, (36, ly - 7), ("sans-serif", 13)))
                .map_err(|e| anyhow!("plot: {e}"))?;
            if !m.prune {
                let Some(c) = d.cell(&m.name, None, metric) else {
                    continue;
                };
                let y = c.interval.mean * scale;
                let (a, b) = (xmin - xpad, xmax + xpad);
                let n = 40;
                let dashes: Vec<_> = (0..n)
                    .step_by(2)
                    .map(|k| {
                        let x0 = a + (b - a) * k as f64 / n as f64;
                        let x1 = a + (b - a) * (k + 1) as f64 / n as f64;
                        PathElement::new(vec![(x0, y), (x1, y)], color.stroke_width(2))
                    })
                    .collect();
                chart
                    .draw_series(dashes)
                    .map_err(|e| anyhow!("plot: {e}"))?;
                continue;
            }
            // small horizontal offsets keep the error bars apart
            let off = (i as f64 - (n_m - 1.0) / 2.0) * xpad * 0.08;
            let p = pts(m);
            chart
                .draw_series(LineSeries::new(
                    p.iter().map(|&(x, y, _)| (x + off, y)),
                    color.stroke_width(width),
                ))
                .map_err(|e| anyhow!("plot: {e}"))?;
            chart
                .draw_series(p.iter().map(|&(x, y, h)| {
                    PathElement::new(
                        vec![(x + off, y - h), (x + off, y + h)],
                        color.stroke_width(1),
                    )
                }))
                .map_err(|e| anyhow!("plot: {e}"))?;
            chart
                .draw_series(
                    p.iter()
                        .map(|&(x, y, _)| Circle::new((x + off, y), 3, color.filled())),
                )
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    write_shared(path, svg.as_bytes()).context("plot")
}

/// What [`merge`] wrote.
#[derive(Debug, Clone)]
pub struct MergeOutcome {
    /// The summary.
    pub summary: SweepSummary,
    /// `summary.md`.
    pub markdown: PathBuf,
    /// Runs in progress or interrupted when the merge ran.
    pub partial: usize,
}

/// Gathers every complete run of `out` and writes `summary.md`, `summary.json` and
/// `plots/*.svg` into `report_dir` (default `OUT/summary`). Safe to run while shards work.
pub fn merge(cfg: &SweepConfig, out: &Path, report_dir: Option<&Path>) -> Result<MergeOutcome> {
    cfg.validate()?;
    let col = collect(cfg, out)?;
    let summary = summarise(cfg, &col)?;
    let report = report_dir.map_or_else(|| out.join("summary"), Path::to_path_buf);
    let plots_dir = report.join("plots");
    fs::create_dir_all(&plots_dir)
        .with_context(|| format!("cannot create {}", plots_dir.display()))?;
    let mut plots = Vec::new();
    for d in &summary.datasets {
        for metric in [Metric::Accuracy, Metric::TailAccuracy, Metric::PrAuc] {
            if !d.metrics.contains(&metric) {
                continue;
            }
            let file = format!("{}-{}.svg", d.name, metric.key());
            density_plot(&plots_dir.join(&file), cfg, d, metric)?;
            plots.push((d.name.clone(), file));
        }
    }
    let md = render_markdown(cfg, &summary, &plots);
    let markdown = report.join("summary.md");
    write_shared(&markdown, md.as_bytes())?;
    write_shared(
        &report.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(MergeOutcome {
        summary,
        markdown,
        partial: col.partial,
    })
}

/// Reads the sweep stored in an output folder (`OUT/sweep.toml`).
pub fn load_from_out_dir(out: &Path) -> Result<SweepConfig> {
    let p = out.join(SWEEP_FILE);
    ensure!(
        p.is_file(),
        "{} not found: {} is not a sweep output folder (bb sweep writes it on start)",
        p.display(),
        out.display()
    );
    SweepConfig::load(&p)
}
