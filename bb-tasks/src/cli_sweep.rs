//! `bb sweep` and `bb merge`: matched-density sweeps (see [`crate::sweep`]) trained with the
//! same runner as `bb run`, then measured once more from the final checkpoint for the
//! metrics a run folder does not hold (macro-F1, PR-AUC, head / mid / tail buckets).

use crate::cli_run::{execute, prepare, ExperimentOutcome};
use crate::io::TensorFile;
use crate::model::{layer_name, Mlp};
use crate::report::Results;
use crate::stats::{average_precision, Buckets, Confusion};
use crate::sweep::{
    self, Executor, Job, LayerDensity, RunKey, RunOptions, RunRecord, Shard, SweepConfig,
};
use crate::trainer::{latest_checkpoint, load_pruner, RunResult};
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `bb sweep`.
#[derive(Debug, Args, Clone)]
pub struct SweepArgs {
    /// The sweep file (e.g. `bb-tasks/sweeps/ci-tiny.toml`).
    pub sweep: PathBuf,
    /// Output folder shared by all shards (default `runs/sweeps/<name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only share I of N (I counts from 0): `--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<Shard>,
    /// Train nothing: gather the finished runs of all shards into the summary.
    #[arg(long, conflicts_with = "shard")]
    pub merge: bool,
    /// Where the summary goes (default `<out>/summary`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Folder with the data files (default `$BB_DATA_DIR`, else `data/` at the repository root).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the runs of this shard (`done` or `todo`) and exit.
    #[arg(long)]
    pub list: bool,
    /// Stop after training this many runs (the rest stay for a later call).
    #[arg(long)]
    pub max_runs: Option<usize>,
    /// No per-run lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `bb merge`.
#[derive(Debug, Args, Clone)]
pub struct MergeArgs {
    /// A sweep output folder (holding `sweep.toml` and `runs/`).
    pub out: PathBuf,
    /// Where the summary goes (default `<out>/summary`).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Trains a grid point with the `bb run` runner on the CPU and measures it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainerExecutor;

impl Executor for TrainerExecutor {
    fn execute(&self, job: &Job, dir: &Path) -> Result<RunRecord> {
        let dev = dfdx::tensor::Cpu::default();
        let prep = prepare(&job.experiment, dir)?;
        match execute(&dev, &prep, true, None)? {
            ExperimentOutcome::Done(_) => {}
            ExperimentOutcome::Stopped => bail!("the run stopped before its last epoch"),
        }
        measure_run(&job.key, job.family, &job.experiment, dir)
    }
}

/// Builds the record of a finished one-run experiment folder: `results.json` plus an
/// evaluation of the final checkpoint (which must reproduce the recorded accuracy).
pub fn measure_run(
    key: &RunKey,
    family: sweep::Family,
    cfg: &crate::config::ExperimentConfig,
    dir: &Path,
) -> Result<RunRecord> {
    let p = dir.join("results.json");
    let results: Results = serde_json::from_str(
        &fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
    )
    .with_context(|| format!("bad {}", p.display()))?;
    let run: &RunResult = results
        .runs
        .iter()
        .find(|r| r.arm == key.method && r.seed == key.seed)
        .ok_or_else(|| {
            anyhow!(
                "{} has no run {} seed {}",
                p.display(),
                key.method,
                key.seed
            )
        })?;
    let split = cfg.data.build(key.seed)?;
    let run_dir = dir.join(&key.method).join(format!("seed-{}", key.seed));
    let ck = latest_checkpoint(&run_dir)?
        .ok_or_else(|| anyhow!("{} has no final checkpoint", run_dir.display()))?;
    let widths = run.widths.clone();
    let n_layers = widths.len() - 1;
    let mut tf = TensorFile::read(&ck.join("model.safetensors"))?;
    let (mut ws, mut bs) = (Vec::new(), Vec::new());
    for l in 0..n_layers {
        ws.push(tf.take(&format!("{}.weight", layer_name(l)))?);
        bs.push(tf.take(&format!("{}.bias", layer_name(l)))?);
    }
    let dev = dfdx::tensor::Cpu::default();
    let mut model = Mlp::from_host(&dev, &widths, ws, bs)?;
    if let Some(pr) = load_pruner(&ck)? {
        for l in 0..n_layers {
            model.set_scale(l, pr.scale(l))?;
        }
    }
    let test = &split.test;
    let k = test.classes;
    let mut pred = Vec::with_capacity(test.len());
    let mut logits = Vec::with_capacity(test.len() * k);
    let chunk = 1024;
    let mut s = 0;
    while s < test.len() {
        let e = (s + chunk).min(test.len());
        let out = model.forward(&test.x[s * test.features..e * test.features], e - s)?;
        for z in out.logits.chunks_exact(k) {
            pred.push(crate::stats::argmax(z));
        }
        logits.extend_from_slice(&out.logits);
        s = e;
    }
    let conf = Confusion::from_labels(k, &test.y, &pred);
    ensure!(
        (conf.accuracy() - run.test_acc).abs() < 1e-9,
        "re-evaluating the final checkpoint of {} gives accuracy {} but the run recorded {}",
        key.label(),
        conf.accuracy(),
        run.test_acc
    );
    let counts = split.train.class_counts();
    let per_class: Vec<f64> = (0..k).map(|c| conf.recall(c).unwrap_or(0.0)).collect();
    let (head, mid, tail) = if Buckets::is_imbalanced(&counts) && k >= 3 {
        Buckets::from_counts(&counts).accuracy(&per_class)
    } else {
        (None, None, None)
    };
    let (rare_recall, pr_auc) = if k == 2 {
        let rare = if counts[1] <= counts[0] { 1 } else { 0 };
        let other = 1 - rare;
        let scores: Vec<f64> = logits
            .chunks_exact(2)
            .map(|z| (z[rare] - z[other]) as f64)
            .collect();
        let pos: Vec<bool> = test.y.iter().map(|&y| y == rare).collect();
        (conf.recall(rare), average_precision(&scores, &pos))
    } else {
        (None, None)
    };
    let hidden: Vec<&crate::measure::PopulationStats> = run.populations.iter().skip(1).collect();
    let entropy_bits = (!hidden.is_empty())
        .then(|| hidden.iter().map(|p| p.entropy_bits).sum::<f64>() / hidden.len() as f64);
    let dec: Vec<f64> = hidden.iter().filter_map(|p| p.decorrelation).collect();
    let decorrelation = (!dec.is_empty()).then(|| dec.iter().sum::<f64>() / dec.len() as f64);
    Ok(RunRecord {
        key: key.clone(),
        family,
        accuracy: run.test_acc,
        per_class_accuracy: per_class,
        train_class_counts: counts,
        head_accuracy: head,
        mid_accuracy: mid,
        tail_accuracy: tail,
        macro_f1: conf.macro_f1(),
        rare_recall,
        pr_auc,
        entropy_bits,
        decorrelation,
        achieved_density: run.density,
        layers: run
            .layers
            .iter()
            .map(|l| LayerDensity {
                layer: l.layer.clone(),
                pruned: l.pruned,
                target: l.target_density,
                achieved: l.achieved_density,
            })
            .collect(),
        steps: run.steps,
        wall_s: run.wall_s,
    })
}

fn out_dir(args_out: Option<&Path>, cfg: &SweepConfig) -> PathBuf {
    args_out.map_or_else(
        || Path::new("runs").join("sweeps").join(&cfg.name),
        Path::to_path_buf,
    )
}

fn print_merge(m: &sweep::MergeOutcome) {
    let s = &m.summary;
    println!(
        "summary: {} of {} runs complete{}; {}",
        s.complete,
        s.planned,
        if m.partial > 0 {
            format!(", {} in progress or interrupted", m.partial)
        } else {
            String::new()
        },
        m.markdown.display()
    );
    for d in &s.datasets {
        for c in &d.comparisons {
            println!(
                "  {:<16} density {:<5} {:<14} {} vs {}: {}",
                d.name,
                c.density,
                c.metric.key(),
                c.bb,
                c.baseline,
                c.verdict.word()
            );
        }
    }
}

/// Runs `bb sweep` with a given executor.
pub fn sweep_with(args: &SweepArgs, exec: &dyn Executor) -> Result<()> {
    if let Some(d) = &args.data_dir {
        crate::realdata::set_data_dir(Some(d.clone()));
    }
    let cfg = SweepConfig::load(&args.sweep)?;
    cfg.validate()
        .with_context(|| format!("in {}", args.sweep.display()))?;
    let out = out_dir(args.out.as_deref(), &cfg);
    if args.merge {
        sweep::init_out_dir(&cfg, &out)?;
        let m = sweep::merge(&cfg, &out, args.report.as_deref())?;
        print_merge(&m);
        return Ok(());
    }
    let keys = cfg.keys();
    if args.list {
        for (i, (k, _)) in keys.iter().enumerate() {
            if args.shard.is_none_or(|s| s.owns(i)) {
                let done = if sweep::is_complete(&out, k) {
                    "done"
                } else {
                    "todo"
                };
                println!("{done} {}", k.rel_dir().display());
            }
        }
        return Ok(());
    }
    cfg.validate_experiments()
        .with_context(|| format!("in {}", args.sweep.display()))?;
    let t0 = Instant::now();
    let opts = RunOptions {
        shard: args.shard,
        max_runs: args.max_runs,
        quiet: args.quiet,
    };
    let sum = sweep::run_sweep(&cfg, &out, &opts, exec)?;
    println!(
        "sweep {}{}: {} runs assigned, {} trained, {} already complete, {} failed{} in {:.1} s; output {}",
        cfg.name,
        args.shard
            .map_or_else(String::new, |s| format!(" shard {}/{}", s.index, s.count)),
        sum.assigned,
        sum.trained,
        sum.skipped,
        sum.failed.len(),
        if sum.not_started > 0 {
            format!(", {} left for later (--max-runs)", sum.not_started)
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    if args.shard.is_none() && sum.not_started == 0 {
        let m = sweep::merge(&cfg, &out, args.report.as_deref())?;
        print_merge(&m);
    } else if args.shard.is_some() {
        println!(
            "merge the shards with: bb sweep {} --out {} --merge",
            args.sweep.display(),
            out.display()
        );
    }
    if !sum.failed.is_empty() {
        for (k, e) in &sum.failed {
            eprintln!("failed: {}: {e}", k.label());
        }
        bail!(
            "{} runs failed (their partial folders hold error.txt); run the same command again to retry them",
            sum.failed.len()
        );
    }
    Ok(())
}

/// Runs `bb sweep`.
pub fn sweep(args: &SweepArgs) -> Result<()> {
    sweep_with(args, &TrainerExecutor)
}

/// Runs `bb merge`.
pub fn merge(args: &MergeArgs) -> Result<()> {
    let cfg = sweep::load_from_out_dir(&args.out)?;
    let m = sweep::merge(&cfg, &args.out, args.report.as_deref())?;
    print_merge(&m);
    Ok(())
}
