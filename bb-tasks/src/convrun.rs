//! Experiments on convolutional networks (the face-identification and change-detection
//! stand-ins): arms x densities x seeds, run folders with checkpoints that resume to the same
//! result, per-run measurements and the shared parts of the report.
//!
//! A conv experiment is a TOML file with a `task` field (`"faceid"` or `"changedet"`); the
//! rest of the file belongs to the task (see [`crate::faceid`] and [`crate::changedet`]) except
//! these shared tables:
//!
//! ```toml
//! seeds = [0, 1, 2]
//! [train]            # epochs, batch_size, lr, lr_schedule, optimizer, checkpoint_every
//! [pruning]          # the engine's config shared by every arm
//! [[arms]]
//! name = "bb_sp_in"
//! densities = [0.7, 0.5, 0.3]   # one run per density: policy.target_density is set
//! [arms.pruning.policy]
//! kind = "balance"
//! beta = 0.1
//! ```
//!
//! The model names the layers a method prunes (the paper's choice: the first 1x1 conv of
//! every ResNet block, the Siamese encoder's convs); every other conv layer gets
//! `layers.<name>.prune = false` unless the config says otherwise. Every method prunes the
//! same layers to the same density, so they are compared at matched sparsity.
//!
//! A run folder holds `config.toml`, one folder per run (`<arm>/seed-<s>/` with
//! `metrics.jsonl`, `refreshes.jsonl`, `checkpoints/` and `final.json`), and once every run
//! is done `results.json` and `report.md`.

use crate::checkpoint::{latest_checkpoint, write_checkpoint};
use crate::config::{merge_tables, TrainConfig};
use crate::convkit::{engine, Ctx, ParamId, ParamStore, Tap};
use crate::io::{write_atomic, write_jsonl, TensorFile};
use crate::measure::{balance_fit, binary_entropy_bits, decorrelation, BalanceFit};
use crate::optim::Optimizer;
use crate::stats::{mean_ci95, Interval, Verdict};
use anyhow::{anyhow, bail, ensure, Context, Result};
use bb_core::{Pruner, PrunerConfig, RefreshReport, Topology};
use dfdx::prelude::Gradients;
use dfdx::tensor::Cpu;
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One compared method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    /// Name (letters, digits, `_`, `-`).
    pub name: String,
    /// `false`: the dense network, no pruner.
    #[serde(default = "yes")]
    pub prune: bool,
    /// Densities to run at (each sets `policy.target_density`); empty: the policy's own.
    #[serde(default)]
    pub densities: Vec<f64>,
    /// Engine settings merged over the experiment's `[pruning]`.
    #[serde(default)]
    pub pruning: toml::Table,
}

fn yes() -> bool {
    true
}

/// One training run: a method at a density with a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvRunSpec {
    /// Method (the arm's name).
    pub method: String,
    /// Target density, if the arm sets one.
    pub density: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Resolved engine config (`None`: dense).
    pub pruning: Option<toml::Table>,
    /// Training settings.
    pub train: TrainConfig,
    /// Optimizer steps in the run.
    pub total_steps: u64,
}

impl ConvRunSpec {
    /// `method` or `method-d<density>`.
    pub fn arm(&self) -> String {
        match self.density {
            Some(d) => format!("{}-d{d}", self.method),
            None => self.method.clone(),
        }
    }

    /// The run's folder inside the experiment folder.
    pub fn rel_dir(&self) -> String {
        format!("{}/seed-{}", self.arm(), self.seed)
    }

    /// A fresh pruner for the model's topology, if the run prunes.
    pub fn pruner(&self, topology: &Topology) -> Result<Option<Pruner>> {
        let Some(t) = &self.pruning else {
            return Ok(None);
        };
        let cfg: PrunerConfig = toml::Value::Table(t.clone())
            .try_into()
            .map_err(|e| anyhow!("arm {}: pruning: {e}", self.arm()))?;
        cfg.validate()
            .map_err(|e| anyhow!("arm {}: pruning.{e}", self.arm()))?;
        let p = Pruner::new(cfg, topology.clone())
            .map_err(|e| anyhow!("arm {}: pruning.{e}", self.arm()))?;
        Ok(Some(p))
    }
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

/// Checks the shared tables of a conv experiment; errors name the field.
pub fn validate_common(
    name: &str,
    seeds: &[u64],
    train: &TrainConfig,
    arms: &[ArmSpec],
) -> Result<()> {
    check_name("name", name)?;
    ensure!(!seeds.is_empty(), "seeds: give at least one seed");
    for (i, s) in seeds.iter().enumerate() {
        ensure!(!seeds[..i].contains(s), "seeds: seed {s} appears twice");
    }
    ensure!(train.epochs > 0, "train.epochs must be >= 1");
    ensure!(
        train.batch_size >= 2,
        "train.batch_size must be >= 2 (batch-norm needs two samples)"
    );
    ensure!(
        train.lr.is_finite() && train.lr > 0.0,
        "train.lr must be > 0, got {}",
        train.lr
    );
    train.optimizer.validate()?;
    ensure!(!arms.is_empty(), "arms: give at least one arm");
    for (i, a) in arms.iter().enumerate() {
        check_name(&format!("arms[{i}].name"), &a.name)?;
        ensure!(
            !arms[..i].iter().any(|b| b.name == a.name),
            "arms[{i}].name {:?} appears twice",
            a.name
        );
        ensure!(
            a.prune || (a.pruning.is_empty() && a.densities.is_empty()),
            "arms[{i}] ({}): prune = false, but pruning settings or densities are given",
            a.name
        );
        for (j, &d) in a.densities.iter().enumerate() {
            ensure!(
                d > 0.0 && d <= 1.0,
                "arms[{i}].densities[{j}] must be in (0, 1], got {d}"
            );
            ensure!(
                !a.densities[..j].contains(&d),
                "arms[{i}].densities: {d} appears twice"
            );
        }
    }
    Ok(())
}

fn table<'a>(t: &'a mut toml::Table, key: &str, what: &str) -> Result<&'a mut toml::Table> {
    match t
        .entry(key)
        .or_insert_with(|| toml::Value::Table(Default::default()))
    {
        toml::Value::Table(x) => Ok(x),
        _ => bail!("{what}.{key} must be a table"),
    }
}

/// The grid of an experiment, checked: builds one model (with `seed`) to learn its layers,
/// checks the batch size against the task's training set (`unit` names its samples in the
/// error), expands the arms into runs and builds every run's pruner once against the
/// topology, so a bad arm fails before any training.
#[allow(clippy::too_many_arguments)]
pub fn plan_runs<T: ConvTask>(
    task: &T,
    dev: &Cpu,
    seed: u64,
    pruning: &toml::Table,
    arms: &[ArmSpec],
    seeds: &[u64],
    train: &TrainConfig,
    unit: &str,
    prunable: impl FnOnce(&T::Model) -> Vec<String>,
) -> Result<Vec<ConvRunSpec>> {
    let n = task.n_train();
    crate::config::check_batch_size(train.batch_size, n, unit)?;
    let mut store = ParamStore::new(dev);
    let model = task.build(&mut store, seed)?;
    let topo = task.topology(&model);
    let layers: Vec<String> = topo.layers.iter().map(|l| l.name.clone()).collect();
    let total = (train.epochs * (n / train.batch_size)) as u64;
    let runs = expand_runs(
        pruning,
        arms,
        seeds,
        train,
        total,
        &layers,
        &prunable(&model),
    )?;
    for r in &runs {
        r.pruner(&topo)?;
    }
    Ok(runs)
}

/// Expands arms x densities x seeds into runs (arms outer, then densities, then seeds), with
/// each run's engine config resolved: the arm's settings over `[pruning]`, the density, the
/// seed, `schedule.total_steps`, and `prune = true` for exactly the model's `prunable`
/// layers among `layers` (all conv layers of the topology) unless the config sets it.
pub fn expand_runs(
    pruning: &toml::Table,
    arms: &[ArmSpec],
    seeds: &[u64],
    train: &TrainConfig,
    total_steps: u64,
    layers: &[String],
    prunable: &[String],
) -> Result<Vec<ConvRunSpec>> {
    let mut runs = Vec::new();
    for (i, a) in arms.iter().enumerate() {
        let what = format!("arms[{i}] ({})", a.name);
        let densities: Vec<Option<f64>> = if a.densities.is_empty() {
            vec![None]
        } else {
            a.densities.iter().map(|&d| Some(d)).collect()
        };
        for d in densities {
            let base = if a.prune {
                let mut t = pruning.clone();
                merge_tables(&mut t, &a.pruning);
                if let Some(d) = d {
                    let pol = table(&mut t, "policy", &what)?;
                    ensure!(
                        pol.contains_key("kind"),
                        "{what}: densities are given but pruning.policy has no kind"
                    );
                    pol.insert("target_density".into(), toml::Value::Float(d));
                }
                let sched = table(&mut t, "schedule", &what)?;
                match sched.get("total_steps").and_then(toml::Value::as_integer) {
                    None => {
                        sched.insert("total_steps".into(), toml::Value::Integer(total_steps as i64));
                    }
                    Some(n) if n as u64 != total_steps => bail!(
                        "{what}: pruning.schedule.total_steps is {n}, but training runs {total_steps} steps; \
                         leave it out and it is filled in"
                    ),
                    Some(_) => {}
                }
                let lt = table(&mut t, "layers", &what)?;
                for name in lt.keys() {
                    ensure!(
                        layers.contains(name),
                        "{what}: pruning.layers.{name}: the model has no layer of that name (layers: {})",
                        layers.join(", ")
                    );
                }
                for name in layers {
                    let l = table(lt, name, &format!("{what}: pruning.layers"))?;
                    l.entry("prune")
                        .or_insert(toml::Value::Boolean(prunable.contains(name)));
                }
                Some(t)
            } else {
                None
            };
            for &seed in seeds {
                let mut p = base.clone();
                if let Some(t) = &mut p {
                    t.insert("seed".into(), toml::Value::Integer(seed as i64));
                }
                runs.push(ConvRunSpec {
                    method: a.name.clone(),
                    density: d,
                    seed,
                    pruning: p,
                    train: train.clone(),
                    total_steps,
                });
            }
        }
    }
    Ok(runs)
}

/// A conv experiment's task: its data (for one seed), model, loss and measurements.
pub trait ConvTask {
    /// The network.
    type Model;

    /// Training samples.
    fn n_train(&self) -> usize;

    /// Builds the model, adding its parameters to `store`.
    fn build(&self, store: &mut ParamStore, seed: u64) -> Result<Self::Model>;

    /// The engine's view of the model.
    fn topology(&self, m: &Self::Model) -> Topology;

    /// The conv weights of the topology's layers, in order.
    fn layer_weights(&self, m: &Self::Model) -> Vec<ParamId>;

    /// Forward, loss and backward on the training samples `idx`; returns the gradients and
    /// the loss.
    fn train_batch(
        &self,
        m: &Self::Model,
        st: &ParamStore,
        idx: &[usize],
        ctx: &mut Ctx,
    ) -> Result<(Gradients<f32, Cpu>, f64)>;

    /// Validation metrics after an epoch (a line of `metrics.jsonl`).
    fn epoch_metrics(&self, m: &Self::Model, st: &ParamStore) -> Result<BTreeMap<String, f64>>;

    /// Final measurements: the task metrics, and the eval-mode taps of the populations to
    /// report. `dir` is the run folder (for extra files such as predictions).
    fn finish(
        &self,
        m: &Self::Model,
        st: &ParamStore,
        dir: &Path,
    ) -> Result<(BTreeMap<String, f64>, Vec<Tap>)>;
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLine {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Optimizer steps so far.
    pub step: u64,
    /// Learning rate of the epoch's last step.
    pub lr: f32,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Live / all edges over the pruned layers (1 without a pruner).
    pub density: f64,
    /// Refreshes so far.
    pub refreshes: usize,
    /// Task validation metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Seconds since the run started (not reproducible).
    pub wall_s: f64,
}

/// Sparsity of one conv layer at the end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvLayerStats {
    /// Layer name.
    pub layer: String,
    /// Whether the pruner edits it.
    pub pruned: bool,
    /// Target density of the last refresh.
    pub target_density: Option<f64>,
    /// Live edges / edges (an edge is an (out, in) channel pair).
    pub achieved_density: f64,
    /// Edges.
    pub edges: usize,
}

/// Activity measurements of one population on evaluation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvPopStats {
    /// Population.
    pub population: String,
    /// Channels.
    pub units: usize,
    /// On-rate of each channel over samples and positions.
    pub activity: Vec<f64>,
    /// Mean binary entropy of the on-rates, bits per channel.
    pub entropy_bits: f64,
    /// Mean absolute correlation of the channels' on-indicators over (sample, position).
    pub decorrelation: Option<f64>,
    /// Live fan-in of each channel (its row in the producing layers).
    pub fan_in: Vec<u32>,
    /// Live fan-out of each channel (its column in the consuming layers).
    pub fan_out: Vec<u32>,
    /// `ln((1-a)/a)` on fan-in (the degree SP-in sets), where defined.
    pub balance_fan_in: Option<BalanceFit>,
    /// `ln((1-a)/a)` on fan-out (the degree SP-out sets; the budget's degree), where defined.
    pub balance_fan_out: Option<BalanceFit>,
}

/// Final measurements of one run (`final.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvRunResult {
    /// Arm (method and density).
    pub arm: String,
    /// Method.
    pub method: String,
    /// Target density.
    pub density: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Task metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Live / all edges over the pruned layers (1 for the dense arm).
    pub achieved_density: f64,
    /// Per conv layer.
    pub layers: Vec<ConvLayerStats>,
    /// Per reported population.
    pub populations: Vec<ConvPopStats>,
    /// Refreshes run.
    pub refreshes: usize,
    /// Training wall time, seconds (not reproducible).
    pub wall_s: f64,
    /// CPU time of the process (all threads) while training, seconds, where the platform
    /// reports it (Linux); not reproducible. On a shared machine it is the better measure of
    /// the work done.
    #[serde(default)]
    pub cpu_s: Option<f64>,
}

/// CPU time (user + system, all threads) of this process so far, from `/proc/self/stat`
/// (Linux; clock ticks of 1/100 s). `None` elsewhere.
pub fn process_cpu_seconds() -> Option<f64> {
    let s = fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the command name (which is in parentheses and may hold spaces)
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    arm: String,
    seed: u64,
    epoch: usize,
    step: u64,
    optimizer_steps: u64,
    shuffle_rng: ChaCha8Rng,
    metrics: Vec<EpochLine>,
    refreshes: Vec<RefreshReport>,
    wall_s: f64,
    #[serde(default)]
    cpu_s: Option<f64>,
}

fn save_checkpoint(
    dir: &Path,
    store: &ParamStore,
    opt: &Optimizer,
    pruner: Option<&Pruner>,
    state: &RunState,
) -> Result<()> {
    let meta = HashMap::from([(
        "checkpoint".to_string(),
        serde_json::json!({ "epoch": state.epoch, "step": state.step }).to_string(),
    )]);
    write_checkpoint(
        dir,
        state.epoch,
        &store.to_named(),
        &meta,
        opt,
        pruner,
        state,
    )
}

/// How a run is driven.
#[derive(Debug, Default, Clone)]
pub struct ConvRunOptions {
    /// Stop after this epoch (a checkpoint is written there), to resume later.
    pub stop_after_epoch: Option<usize>,
    /// Advanced by one per training step.
    pub progress: Option<ProgressBar>,
}

/// Trains one run in `dir` (resuming from its latest checkpoint if there is one). Returns
/// `None` when stopped early on request.
pub fn train_run<T: ConvTask>(
    dev: &Cpu,
    task: &T,
    spec: &ConvRunSpec,
    dir: &Path,
    opts: &ConvRunOptions,
) -> Result<Option<ConvRunResult>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let t = &spec.train;
    let n = task.n_train();
    crate::config::check_batch_size(t.batch_size, n, "samples")?;
    let mut store = ParamStore::new(dev);
    let model = task.build(&mut store, spec.seed)?;
    let topo = task.topology(&model);
    let layers = task.layer_weights(&model);
    let mut pruner = spec.pruner(&topo)?;
    let mut opt = engine::optimizer(&store, t.optimizer);
    let mut state = RunState {
        arm: spec.arm(),
        seed: spec.seed,
        epoch: 0,
        step: 0,
        optimizer_steps: 0,
        shuffle_rng: ChaCha8Rng::seed_from_u64(spec.seed ^ 0x434f_4e56),
        metrics: Vec::new(),
        refreshes: Vec::new(),
        wall_s: 0.0,
        cpu_s: Some(0.0),
    };
    if let Some(ck) = latest_checkpoint(dir)? {
        let st: RunState = serde_json::from_str(
            &fs::read_to_string(ck.join("state.json")).context("checkpoint: state.json")?,
        )
        .context("checkpoint: state.json")?;
        ensure!(
            st.arm == spec.arm() && st.seed == spec.seed,
            "checkpoint {} belongs to {} seed {}, not {} seed {}",
            ck.display(),
            st.arm,
            st.seed,
            spec.arm(),
            spec.seed
        );
        store.load(&TensorFile::read(&ck.join("model.safetensors"))?)?;
        let mut of = TensorFile::read(&ck.join("optimizer.safetensors"))?;
        opt.restore(st.optimizer_steps, |name| of.take(name))?;
        if pruner.is_some() {
            let p = ck.join("pruner.json");
            let text =
                fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let p = Pruner::from_json(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
            ensure!(
                p.step_count() == st.step,
                "checkpoint {}: pruner at step {}, trainer at step {}",
                ck.display(),
                p.step_count(),
                st.step
            );
            pruner = Some(p);
        }
        state = st;
    }
    if let Some(p) = &pruner {
        engine::bind(p, &mut store, &layers)?;
    }
    let steps_per_epoch = n / t.batch_size;
    let start = Instant::now();
    let wall0 = state.wall_s;
    let cpu_start = process_cpu_seconds();
    let cpu0 = state.cpu_s;
    let mut order: Vec<usize> = (0..n).collect();
    while state.epoch < t.epochs {
        if opts.stop_after_epoch.is_some_and(|s| state.epoch >= s) {
            return Ok(None);
        }
        let epoch = state.epoch + 1;
        order.sort_unstable();
        order.shuffle(&mut state.shuffle_rng);
        let mut loss_sum = 0.0;
        let mut lr = t.lr;
        for chunk in order.chunks_exact(t.batch_size) {
            let mut ctx = Ctx::train();
            ctx.record = pruner.is_some();
            let (mut grads, loss) = task.train_batch(&model, &store, chunk, &mut ctx)?;
            ensure!(
                loss.is_finite(),
                "training diverged at step {} (loss {loss})",
                state.step + 1
            );
            lr = t.lr_schedule.rate(t.lr, state.step, spec.total_steps);
            let rep = engine::update(
                &mut store,
                &mut opt,
                pruner.as_mut(),
                &layers,
                &mut grads,
                &mut ctx,
                lr,
            )?;
            state.step += 1;
            loss_sum += loss;
            if let Some(r) = rep.refresh {
                state.refreshes.push(r);
            }
            if let Some(pb) = &opts.progress {
                pb.inc(1);
            }
        }
        state.optimizer_steps = opt.steps();
        let metrics = task.epoch_metrics(&model, &store)?;
        state.epoch = epoch;
        state.wall_s = wall0 + start.elapsed().as_secs_f64();
        state.cpu_s = match (cpu0, cpu_start, process_cpu_seconds()) {
            (Some(c0), Some(a), Some(b)) => Some(c0 + (b - a).max(0.0)),
            _ => None,
        };
        state.metrics.push(EpochLine {
            epoch,
            step: state.step,
            lr,
            train_loss: loss_sum / steps_per_epoch.max(1) as f64,
            density: pruner.as_ref().map_or(1.0, |p| p.density()),
            refreshes: state.refreshes.len(),
            metrics,
            wall_s: state.wall_s,
        });
        write_jsonl(&dir.join("metrics.jsonl"), &state.metrics)?;
        write_jsonl(&dir.join("refreshes.jsonl"), &state.refreshes)?;
        let stop_here = opts.stop_after_epoch == Some(epoch);
        let periodic = t.checkpoint_every > 0 && epoch.is_multiple_of(t.checkpoint_every);
        if periodic || stop_here || epoch == t.epochs {
            save_checkpoint(dir, &store, &opt, pruner.as_ref(), &state)?;
        }
        if stop_here && epoch < t.epochs {
            return Ok(None);
        }
    }
    let (metrics, taps) = task.finish(&model, &store, dir)?;
    let result = ConvRunResult {
        arm: spec.arm(),
        method: spec.method.clone(),
        density: spec.density,
        seed: spec.seed,
        steps: state.step,
        metrics,
        achieved_density: pruner.as_ref().map_or(1.0, |p| p.density()),
        layers: layer_stats(&topo, pruner.as_ref(), &state.refreshes),
        populations: taps
            .iter()
            .map(|tap| population_stats(&topo, pruner.as_ref(), tap))
            .collect::<Result<_>>()?,
        refreshes: state.refreshes.len(),
        wall_s: state.wall_s,
        cpu_s: state.cpu_s,
    };
    write_atomic(
        &dir.join("final.json"),
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    Ok(Some(result))
}

fn layer_stats(
    topo: &Topology,
    pruner: Option<&Pruner>,
    refreshes: &[RefreshReport],
) -> Vec<ConvLayerStats> {
    topo.layers
        .iter()
        .enumerate()
        .map(|(l, spec)| {
            let edges = topo.shape(l).edges();
            let pruned = pruner.is_some_and(|p| p.is_pruned(l));
            let live = pruner.map_or(edges, |p| p.mask(l).count());
            let target = refreshes
                .iter()
                .rev()
                .find_map(|r| r.layers.iter().find(|x| x.layer == spec.name))
                .and_then(|x| x.target_density);
            ConvLayerStats {
                layer: spec.name.clone(),
                pruned,
                target_density: target,
                achieved_density: live as f64 / edges as f64,
                edges,
            }
        })
        .collect()
}

/// Degrees of every unit of a population in the layers that produce (`rows`) or consume it.
fn degrees(
    topo: &Topology,
    pruner: Option<&Pruner>,
    pop: &str,
    units: usize,
    produce: bool,
) -> Vec<u32> {
    let mut k = vec![0u32; units];
    let mut buf = vec![0u32; units];
    for (l, spec) in topo.layers.iter().enumerate() {
        let hit = if produce {
            spec.output == pop
        } else {
            spec.input == pop
        };
        if !hit {
            continue;
        }
        let shape = topo.shape(l);
        match pruner {
            Some(p) if produce => p.mask(l).row_counts_into(&mut buf),
            Some(p) => p.mask(l).col_counts_into(&mut buf),
            None => buf.fill(if produce { shape.inp } else { shape.out } as u32),
        }
        k.iter_mut().zip(&buf).for_each(|(a, b)| *a += b);
    }
    k
}

/// Rows of a unit-major tap (at most this many) used for decorrelation.
const DECORRELATION_ROWS: usize = 200_000;

/// Measures one tapped population on evaluation data.
pub fn population_stats(
    topo: &Topology,
    pruner: Option<&Pruner>,
    tap: &Tap,
) -> Result<ConvPopStats> {
    let (u, s, b) = (tap.units, tap.positions, tap.batch);
    ensure!(
        tap.data.len() == u * s * b && u > 0,
        "tap {}: {} values for {u} x {s} x {b}",
        tap.population,
        tap.data.len()
    );
    let per = s * b;
    let activity: Vec<f64> = tap
        .data
        .chunks_exact(per)
        .map(|c| c.iter().filter(|&&v| v > 0.0).count() as f64 / per as f64)
        .collect();
    // [observations, units], observations = (position, sample) pairs, at most a fixed number
    let rows = per.min(DECORRELATION_ROWS);
    let mut bm = vec![0f32; rows * u];
    for j in 0..u {
        for r in 0..rows {
            bm[r * u + j] = tap.data[j * per + r];
        }
    }
    let fan_in = degrees(topo, pruner, &tap.population, u, true);
    let fan_out = degrees(topo, pruner, &tap.population, u, false);
    Ok(ConvPopStats {
        population: tap.population.clone(),
        units: u,
        entropy_bits: activity
            .iter()
            .map(|&a| binary_entropy_bits(a))
            .sum::<f64>()
            / u as f64,
        decorrelation: decorrelation(&bm, u, 0.0),
        balance_fan_in: balance_fit(&activity, &fan_in),
        balance_fan_out: balance_fit(&activity, &fan_out),
        activity,
        fan_in,
        fan_out,
    })
}

/// Reads the `task` field of an experiment TOML.
pub fn task_of(text: &str) -> Option<String> {
    let t: toml::Table = toml::from_str(text).ok()?;
    t.get("task")?.as_str().map(str::to_string)
}

/// Loads a finished run's result.
pub fn read_result(dir: &Path) -> Result<ConvRunResult> {
    let p = dir.join("final.json");
    serde_json::from_str(
        &fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
    )
    .with_context(|| format!("in {}", p.display()))
}

/// Parses a config strictly, naming the file in errors.
pub fn parse<C: DeserializeOwned>(text: &str, what: &str) -> Result<C> {
    toml::from_str(text).map_err(|e| anyhow!("{what}: {e}"))
}

/// One metric of an arm over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    /// Mean and 95 % interval (`None` if a value was not finite).
    pub interval: Option<Interval>,
    /// (seed, value) pairs.
    pub values: Vec<(u64, f64)>,
}

/// An arm over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmResults {
    /// Arm (method and density).
    pub arm: String,
    /// Method.
    pub method: String,
    /// Target density.
    pub density: Option<f64>,
    /// Achieved density over the pruned layers.
    pub achieved_density: MetricSummary,
    /// Task metrics.
    pub metrics: BTreeMap<String, MetricSummary>,
    /// Mean coding entropy per reported population.
    pub entropy_bits: BTreeMap<String, MetricSummary>,
    /// Decorrelation per reported population.
    pub decorrelation: BTreeMap<String, MetricSummary>,
    /// Balance-fit slope on fan-in (the degree SP-in sets) per population, where defined.
    pub balance_slope: BTreeMap<String, MetricSummary>,
    /// Balance-fit R^2 on fan-in per population, where defined.
    pub balance_r2: BTreeMap<String, MetricSummary>,
    /// Balance-fit slope on fan-out (the degree SP-out sets; the budget's degree) per
    /// population, where defined. Absent from results written before it was kept.
    #[serde(default)]
    pub balance_slope_out: BTreeMap<String, MetricSummary>,
    /// Balance-fit R^2 on fan-out per population, where defined.
    #[serde(default)]
    pub balance_r2_out: BTreeMap<String, MetricSummary>,
    /// Training wall time per run, seconds.
    pub wall_s: MetricSummary,
}

fn summary(values: Vec<(u64, f64)>) -> MetricSummary {
    let v: Vec<f64> = values.iter().map(|x| x.1).collect();
    MetricSummary {
        interval: mean_ci95(&v),
        values,
    }
}

fn per_pop(
    runs: &[&ConvRunResult],
    f: impl Fn(&ConvPopStats) -> Option<f64>,
) -> BTreeMap<String, MetricSummary> {
    let mut m: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for r in runs {
        for p in &r.populations {
            if let Some(v) = f(p) {
                m.entry(p.population.clone()).or_default().push((r.seed, v));
            }
        }
    }
    m.into_iter().map(|(k, v)| (k, summary(v))).collect()
}

/// Groups finished runs by arm (in the order first seen) and summarises each over seeds.
pub fn summarise(runs: &[ConvRunResult]) -> Vec<ArmResults> {
    let mut order: Vec<String> = Vec::new();
    for r in runs {
        if !order.contains(&r.arm) {
            order.push(r.arm.clone());
        }
    }
    order
        .iter()
        .map(|arm| {
            let rs: Vec<&ConvRunResult> = runs.iter().filter(|r| &r.arm == arm).collect();
            let mut metrics: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
            for r in &rs {
                for (k, &v) in &r.metrics {
                    metrics.entry(k.clone()).or_default().push((r.seed, v));
                }
            }
            ArmResults {
                arm: arm.clone(),
                method: rs[0].method.clone(),
                density: rs[0].density,
                achieved_density: summary(
                    rs.iter().map(|r| (r.seed, r.achieved_density)).collect(),
                ),
                metrics: metrics.into_iter().map(|(k, v)| (k, summary(v))).collect(),
                entropy_bits: per_pop(&rs, |p| Some(p.entropy_bits)),
                decorrelation: per_pop(&rs, |p| p.decorrelation),
                balance_slope: per_pop(&rs, |p| p.balance_fan_in.as_ref().map(|b| b.slope)),
                balance_r2: per_pop(&rs, |p| p.balance_fan_in.as_ref().map(|b| b.r2)),
                balance_slope_out: per_pop(&rs, |p| p.balance_fan_out.as_ref().map(|b| b.slope)),
                balance_r2_out: per_pop(&rs, |p| p.balance_fan_out.as_ref().map(|b| b.r2)),
                wall_s: summary(rs.iter().map(|r| (r.seed, r.wall_s)).collect()),
            }
        })
        .collect()
}

/// `mean ± half` (scaled), or `-`.
pub fn fmt_metric(m: Option<&MetricSummary>, scale: f64, digits: usize) -> String {
    match m.and_then(|m| m.interval.as_ref()) {
        Some(iv) => iv.fmt(scale, digits),
        None => "-".to_string(),
    }
}

/// The paired comparison of a method against another at the same density, over the seeds
/// both have: mean difference with its 95 % interval and the verdict word.
pub fn paired_line(
    arms: &[ArmResults],
    metric: &str,
    a: &str,
    b: &str,
    density: Option<f64>,
    scale: f64,
) -> Option<String> {
    paired(arms, metric, a, b, density, scale).map(|(line, _)| line)
}

/// [`paired_line`] with its verdict.
fn paired(
    arms: &[ArmResults],
    metric: &str,
    a: &str,
    b: &str,
    density: Option<f64>,
    scale: f64,
) -> Option<(String, Verdict)> {
    let find = |m: &str| {
        arms.iter()
            .find(|x| x.method == m && (x.density == density || x.density.is_none()))
    };
    let (x, y) = (find(a)?, find(b)?);
    let (vx, vy) = (x.metrics.get(metric)?, y.metrics.get(metric)?);
    let d = crate::stats::paired_differences(&vx.values, &vy.values).ok()?;
    let iv = mean_ci95(&d.diffs);
    let verdict = Verdict::of(iv.as_ref());
    let line = format!(
        "{} {} - {} = {} ({}, {} seeds)",
        metric,
        x.arm,
        y.arm,
        iv.map_or("-".into(), |iv| iv.fmt(scale, 2)),
        verdict.word(),
        d.keys.len()
    );
    Some((line, verdict))
}

/// The section of a report that pairs every BB arm (method starting with `bb`) with every
/// baseline (the other methods, in the order first seen) at the arm's density, by seed, on
/// each of `metrics`; an arm without a density (dense) is paired with every BB arm, and the
/// heading names it when there is one. Ends with the verdict counts; `scope` (e.g. `"F1 and
/// PR-AUC"`) says which metrics they cover when `metrics` is not every metric of the report.
pub fn write_paired_section(
    w: &mut String,
    arms: &[ArmResults],
    metrics: &[(&str, &str, f64)],
    scope: Option<&str>,
) -> Result<()> {
    let mut baselines: Vec<&ArmResults> = Vec::new();
    for a in arms.iter().filter(|a| !a.method.starts_with("bb")) {
        if !baselines.iter().any(|b| b.method == a.method) {
            baselines.push(a);
        }
    }
    let dense = baselines.iter().any(|b| b.density.is_none());
    writeln!(
        w,
        "## BB against each baseline at the same density{} (paired by seed)\n",
        if dense { ", and against dense" } else { "" }
    )?;
    let mut verdicts = Vec::new();
    for a in arms.iter().filter(|a| a.method.starts_with("bb")) {
        for b in &baselines {
            for (k, _, scale) in metrics {
                if let Some((line, v)) = paired(arms, k, &a.method, &b.method, a.density, *scale) {
                    writeln!(w, "- {line}")?;
                    verdicts.push(v);
                }
            }
        }
    }
    let count = |v: Verdict| verdicts.iter().filter(|&&x| x == v).count();
    writeln!(
        w,
        "\nVerdict{}: over {} paired comparisons BB wins {}, ties {} and loses {} (a win or loss \
         needs the whole 95 % interval of the difference on one side of zero).\n",
        scope.map_or(String::new(), |s| format!(" ({s})")),
        verdicts.len(),
        count(Verdict::Win),
        count(Verdict::Tie),
        count(Verdict::Loss)
    )?;
    Ok(())
}

/// The shared tables of a report: task metrics, sparsity and activity per arm.
pub fn write_common_tables(
    w: &mut String,
    arms: &[ArmResults],
    metrics: &[(&str, &str, f64)],
) -> Result<()> {
    writeln!(
        w,
        "| arm | target density | achieved density |{}",
        metrics
            .iter()
            .map(|(_, t, _)| format!(" {t} |"))
            .collect::<String>()
    )?;
    writeln!(w, "|---|---|---|{}", "---|".repeat(metrics.len()))?;
    for a in arms {
        write!(
            w,
            "| {} | {} | {} |",
            a.arm,
            a.density.map_or("-".into(), |d| format!("{d}")),
            fmt_metric(Some(&a.achieved_density), 1.0, 3)
        )?;
        for (k, _, scale) in metrics {
            write!(w, " {} |", fmt_metric(a.metrics.get(*k), *scale, 2))?;
        }
        writeln!(w)?;
    }
    writeln!(w)?;
    let pops: Vec<String> = arms
        .iter()
        .flat_map(|a| a.entropy_bits.keys().cloned())
        .fold(Vec::new(), |mut v, p| {
            if !v.contains(&p) {
                v.push(p);
            }
            v
        });
    if !pops.is_empty() {
        writeln!(
            w,
            "Activity of the populations BB acts on, measured on evaluation data: coding entropy \
             (mean binary entropy of the channels' on-rates, bits), decorrelation (mean |Pearson r| \
             of the channels' on-indicators over samples and positions; lower is more \
             decorrelated) and the balance fit of `ln((1-a)/a)` on each channel's live degree \
             (slope, R^2), once on fan-in (the degree SP-in sets) and once on fan-out (the \
             degree SP-out sets, and the degree the traffic budget counts); the fit that speaks \
             to an arm is the one on the degree its actuator sets. `-` where the fit is \
             undefined (the degrees are all equal, as in the dense network).\n"
        )?;
        writeln!(
            w,
            "| arm | population | entropy (bits) | decorrelation | fit on fan-in: slope | \
             fit on fan-in: R^2 | fit on fan-out: slope | fit on fan-out: R^2 |"
        )?;
        writeln!(w, "|---|---|---|---|---|---|---|---|")?;
        for a in arms {
            for p in &pops {
                writeln!(
                    w,
                    "| {} | {p} | {} | {} | {} | {} | {} | {} |",
                    a.arm,
                    fmt_metric(a.entropy_bits.get(p), 1.0, 3),
                    fmt_metric(a.decorrelation.get(p), 1.0, 3),
                    fmt_metric(a.balance_slope.get(p), 1.0, 3),
                    fmt_metric(a.balance_r2.get(p), 1.0, 2),
                    fmt_metric(a.balance_slope_out.get(p), 1.0, 3),
                    fmt_metric(a.balance_r2_out.get(p), 1.0, 2),
                )?;
            }
        }
        writeln!(w)?;
    }
    Ok(())
}

/// Per-layer target vs achieved density of one run per arm (the first seed).
pub fn write_layer_table(w: &mut String, runs: &[ConvRunResult]) -> Result<()> {
    let mut seen = Vec::new();
    writeln!(w, "| arm | layer | target | achieved | edges |")?;
    writeln!(w, "|---|---|---|---|---|")?;
    for r in runs {
        if seen.contains(&r.arm) || r.density.is_none() && r.achieved_density == 1.0 {
            continue;
        }
        seen.push(r.arm.clone());
        for l in r.layers.iter().filter(|l| l.pruned) {
            writeln!(
                w,
                "| {} | {} | {} | {:.3} | {} |",
                r.arm,
                l.layer,
                l.target_density.map_or("-".into(), |d| format!("{d:.3}")),
                l.achieved_density,
                l.edges
            )?;
        }
    }
    writeln!(w)?;
    Ok(())
}

/// The time section of a report: wall and CPU time summed over runs, with the machine's
/// core count and load (other jobs may share the cores).
pub fn write_time(w: &mut String, runs: &[ConvRunResult]) -> Result<()> {
    let n = runs.len().max(1) as f64;
    let wall: f64 = runs.iter().map(|r| r.wall_s).sum();
    let cpus: Vec<f64> = runs.iter().filter_map(|r| r.cpu_s).collect();
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    writeln!(w, "## Time\n")?;
    writeln!(
        w,
        "Training time summed over the {} runs: {:.0} s wall ({:.1} min; {:.0} s per run), \
         measured on {cores} cores with a 1-minute load average of {load} when the report was \
         written (other jobs shared the cores, so wall time overstates the cost).",
        runs.len(),
        wall,
        wall / 60.0,
        wall / n
    )?;
    if cpus.len() == runs.len() && !cpus.is_empty() {
        let cpu: f64 = cpus.iter().sum();
        writeln!(
            w,
            "CPU time (all threads): {:.0} s ({:.0} s per run); on two otherwise idle cores the \
             wall time is roughly CPU time / 1.5 to CPU time / 2.",
            cpu,
            cpu / n
        )?;
    }
    writeln!(
        w,
        "Evaluation adds a little; per-run times are in `results.json`.\n"
    )?;
    Ok(())
}

/// A fresh run folder: `out` if given (must not exist), else `<runs_dir>/<name>-<unix time>`.
pub fn fresh_dir(out: Option<&Path>, runs_dir: &Path, name: &str) -> Result<PathBuf> {
    if let Some(o) = out {
        ensure!(
            !o.exists(),
            "--out {} exists already; pick a new folder or continue it with --resume",
            o.display()
        );
        return Ok(o.to_path_buf());
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = runs_dir.join(format!("{name}-{secs}"));
    let mut dir = base.clone();
    let mut i = 2;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    Ok(dir)
}

/// Trains every unfinished run (seed by seed, so one seed's data is in memory at a time) and
/// returns all results in the order of `runs`, or `None` when runs stopped early.
pub fn execute<T: ConvTask>(
    dev: &Cpu,
    dir: &Path,
    runs: &[ConvRunSpec],
    mut task_for: impl FnMut(u64) -> Result<T>,
    progress: Option<ProgressBar>,
    stop_after: Option<usize>,
) -> Result<Option<Vec<ConvRunResult>>> {
    let mut results: Vec<Option<ConvRunResult>> = vec![None; runs.len()];
    let mut seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let mut stopped = false;
    for seed in seeds {
        let mut task = None;
        for (i, r) in runs.iter().enumerate().filter(|(_, r)| r.seed == seed) {
            let rd = dir.join(r.rel_dir());
            if rd.join("final.json").exists() {
                results[i] = Some(read_result(&rd)?);
                continue;
            }
            if task.is_none() {
                task = Some(task_for(seed)?);
            }
            let t = task.as_ref().expect("built above");
            let opts = ConvRunOptions {
                stop_after_epoch: stop_after,
                progress: progress.clone(),
            };
            if let Some(p) = &progress {
                p.set_message(format!("{} seed {}", r.arm(), r.seed));
            }
            match train_run(dev, t, r, &rd, &opts)
                .with_context(|| format!("run {}", r.rel_dir()))?
            {
                Some(res) => results[i] = Some(res),
                None => stopped = true,
            }
        }
    }
    if stopped {
        return Ok(None);
    }
    Ok(Some(
        results
            .into_iter()
            .map(|r| r.expect("every run finished"))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(slope: f64, r2: f64) -> BalanceFit {
        BalanceFit {
            slope,
            intercept: 0.0,
            r2,
            slope_se: 0.0,
            n: 3,
            excluded: 0,
        }
    }

    fn run(method: &str, density: Option<f64>, seed: u64, metric: f64) -> ConvRunResult {
        ConvRunResult {
            arm: density.map_or(method.to_string(), |d| format!("{method}-d{d}")),
            method: method.to_string(),
            density,
            seed,
            steps: 1,
            metrics: [("acc".to_string(), metric)].into(),
            achieved_density: density.unwrap_or(1.0),
            layers: Vec::new(),
            populations: vec![ConvPopStats {
                population: "h".into(),
                units: 3,
                activity: vec![0.2, 0.5, 0.8],
                entropy_bits: 0.8,
                decorrelation: Some(0.1),
                fan_in: vec![1, 2, 3],
                fan_out: vec![3, 2, 1],
                balance_fan_in: Some(fit(0.25, 0.5)),
                balance_fan_out: Some(fit(-1.5, 0.75)),
            }],
            refreshes: 0,
            wall_s: 1.0,
            cpu_s: None,
        }
    }

    /// Both balance fits reach the activity table, each under its own degree.
    #[test]
    fn the_activity_table_shows_the_fit_on_fan_in_and_on_fan_out() {
        let runs: Vec<ConvRunResult> = (0..2)
            .map(|s| run("bb_sp_out", Some(0.5), s, 0.9))
            .collect();
        let arms = summarise(&runs);
        let mut w = String::new();
        write_common_tables(&mut w, &arms, &[("acc", "accuracy (%)", 100.0)]).unwrap();
        assert!(
            w.contains(
                "| fit on fan-in: slope | fit on fan-in: R^2 | fit on fan-out: slope | \
                 fit on fan-out: R^2 |"
            ),
            "{w}"
        );
        assert!(
            w.contains(
                "| bb_sp_out-d0.5 | h | 0.800 ± 0.000 | 0.100 ± 0.000 | 0.250 ± 0.000 | \
                 0.50 ± 0.00 | -1.500 ± 0.000 | 0.75 ± 0.00 |"
            ),
            "{w}"
        );
        // results written before the fan-out fit was kept still load
        let mut v = serde_json::to_value(&arms[0]).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("balance_slope_out");
        o.remove("balance_r2_out");
        let old: ArmResults = serde_json::from_value(v).unwrap();
        assert!(old.balance_slope_out.is_empty() && old.balance_r2_out.is_empty());
    }

    fn arm(method: &str, density: Option<f64>, acc: [f64; 3], auc: [f64; 3]) -> ArmResults {
        let series = |v: [f64; 3]| summary((0..3).map(|s| (s as u64, v[s])).collect());
        ArmResults {
            arm: density.map_or(method.to_string(), |d| format!("{method}-d{d}")),
            method: method.to_string(),
            density,
            achieved_density: series([density.unwrap_or(1.0); 3]),
            metrics: [("acc".into(), series(acc)), ("auc".into(), series(auc))].into(),
            entropy_bits: BTreeMap::new(),
            decorrelation: BTreeMap::new(),
            balance_slope: BTreeMap::new(),
            balance_r2: BTreeMap::new(),
            balance_slope_out: BTreeMap::new(),
            balance_r2_out: BTreeMap::new(),
            wall_s: series([1.0; 3]),
        }
    }

    /// The verdict sentence counts exactly the comparison lines above it, by verdict word.
    #[test]
    fn the_paired_verdict_counts_the_lines_it_follows() {
        let dense_acc = [0.80, 0.81, 0.82];
        let dense_auc = [0.90, 0.90, 0.90];
        let arms = [
            arm("dense", None, dense_acc, dense_auc),
            // vs dense: acc win, auc tie; vs magnitude: acc tie, auc loss
            arm(
                "bb_sp_in",
                Some(0.5),
                [0.85, 0.87, 0.86],
                [0.90, 0.91, 0.89],
            ),
            arm(
                "magnitude",
                Some(0.5),
                [0.84, 0.87, 0.85],
                [0.95, 0.97, 0.94],
            ),
            // vs dense only (no magnitude arm at 0.7): acc loss, auc tie
            arm("bb_sp_in", Some(0.7), dense_acc.map(|x| x - 0.1), dense_auc),
        ];
        let metrics = [("acc", "accuracy (%)", 100.0), ("auc", "AUC (%)", 100.0)];
        let mut w = String::new();
        write_paired_section(&mut w, &arms, &metrics, Some("both metrics")).unwrap();
        assert!(
            w.starts_with(
                "## BB against each baseline at the same density, and against dense (paired by \
                 seed)\n\n"
            ),
            "{w}"
        );
        let lines: Vec<&str> = w.lines().filter(|l| l.starts_with("- ")).collect();
        let words: Vec<&str> = lines
            .iter()
            .map(|l| l.split(" (").last().unwrap().split(',').next().unwrap())
            .collect();
        assert_eq!(
            words,
            ["win", "tie", "tie", "loss", "loss", "tie"],
            "lines in arm, baseline, metric order:\n{w}"
        );
        let n = |word: &str| words.iter().filter(|&&x| x == word).count();
        let sentence = format!(
            "Verdict (both metrics): over {} paired comparisons BB wins {}, ties {} and loses {} ",
            lines.len(),
            n("win"),
            n("tie"),
            n("loss")
        );
        assert!(w.contains(&sentence), "{sentence}\nnot in\n{w}");

        // without a dense arm the heading does not name one, and no scope is written
        let mut w = String::new();
        write_paired_section(&mut w, &arms[1..3], &metrics, None).unwrap();
        assert!(w.starts_with("## BB against each baseline at the same density (paired by seed)\n"));
        assert!(w.contains("\nVerdict: over 2 paired comparisons BB wins 0, ties 1 and loses 1 "));
    }
}
