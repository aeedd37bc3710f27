//! `bb run`, `bb presets` and `bb tour`: experiments from TOML configs, into run folders.
//!
//! A run folder holds `config.toml` (the resolved experiment), one folder per arm and seed
//! (`<arm>/seed-<s>/` with `metrics.jsonl`, `refreshes.jsonl`, `checkpoints/`, `final.json`),
//! and, once every run is done, `results.json`, `report.md` and `plots/`.

use crate::config::{preset, ExperimentConfig, Plan, PRESETS};
use crate::data::Split;
use crate::io::write_atomic;
use crate::report::{summarise, write_report, Results};
use crate::trainer::{read_metrics, train, RunOptions, RunOutcome, RunResult};
use anyhow::{anyhow, ensure, Context, Result};
use clap::{Args, ValueEnum};
use dfdx::prelude::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU (needs a `bb` built with the `cuda` feature).
    Cuda,
}

/// Arguments of `bb run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// A preset name (see `bb presets`) or the path of an experiment TOML file.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    pub experiment: Option<String>,
    /// Continue the stopped run in this folder (finished runs are kept, the others resume
    /// from their latest checkpoint).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Run folder (default: `<runs-dir>/<name>-<UTC time>`); must not exist yet.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Parent of new run folders.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Stop every run after this epoch (leaving a checkpoint), to continue later with
    /// `--resume`.
    #[arg(long, value_name = "EPOCH")]
    pub stop_after: Option<usize>,
}

/// Arguments of `bb tour`.
#[derive(Debug, Args, Clone)]
pub struct TourArgs {
    /// Tour folder (default: `<runs-dir>/tour-<UTC time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Parent of new run folders.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

impl Default for TourArgs {
    fn default() -> Self {
        Self {
            out: None,
            runs_dir: PathBuf::from("runs"),
            quiet: false,
            device: DeviceKind::Cpu,
        }
    }
}

/// `bb presets`: one line per preset.
pub fn presets() -> Result<()> {
    for p in PRESETS {
        let c = ExperimentConfig::from_toml(p.toml)?;
        println!("{:<8} {}", p.name, c.description);
    }
    println!("\nRun one with `bb run NAME`; `bb run FILE.toml` runs your own config.");
    Ok(())
}

/// Loads a preset by name or a config file by path.
pub fn load_experiment(name_or_path: &str) -> Result<ExperimentConfig> {
    let path = Path::new(name_or_path);
    if name_or_path.ends_with(".toml") || path.is_file() {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment config {}", path.display()))?;
        ExperimentConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))
    } else {
        ExperimentConfig::from_toml(preset(name_or_path)?.toml)
            .with_context(|| format!("in preset {name_or_path}"))
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (proleptic Gregorian)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn fresh_dir(out: Option<&Path>, runs_dir: &Path, name: &str) -> Result<PathBuf> {
    if let Some(o) = out {
        ensure!(
            !o.exists(),
            "--out {} exists already; pick a new folder or continue it with --resume",
            o.display()
        );
        return Ok(o.to_path_buf());
    }
    let base = runs_dir.join(format!("{name}-{}", utc_stamp()));
    let mut dir = base.clone();
    let mut i = 2;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    Ok(dir)
}

/// Data for every seed of a plan.
fn build_data(plan: &Plan) -> Result<BTreeMap<u64, Split>> {
    plan.config
        .seeds
        .iter()
        .map(|&s| Ok((s, plan.config.data.build(s)?)))
        .collect()
}

/// An experiment, validated and ready: the plan, its data, its folder.
#[derive(Debug)]
pub struct Prepared {
    /// The validated plan.
    pub plan: Plan,
    /// Data per seed.
    pub data: BTreeMap<u64, Split>,
    /// The run folder (created, with `config.toml` in it).
    pub dir: PathBuf,
}

/// Validates `cfg` completely, then creates `dir` and writes the resolved config. Nothing is
/// created when validation fails.
pub fn prepare(cfg: &ExperimentConfig, dir: &Path) -> Result<Prepared> {
    let plan = cfg.plan()?;
    let data = build_data(&plan)?;
    for (s, split) in &data {
        plan.config
            .plan_with(split)
            .with_context(|| format!("seed {s}"))?;
    }
    let toml_text = plan.config.to_toml()?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomic(&dir.join("config.toml"), toml_text.as_bytes())?;
    Ok(Prepared {
        plan,
        data,
        dir: dir.to_path_buf(),
    })
}

/// Loads a run folder written by [`prepare`].
pub fn reopen(dir: &Path) -> Result<Prepared> {
    let p = dir.join("config.toml");
    let text = fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot resume {}: no config.toml there (is it a run folder?)",
            dir.display()
        )
    })?;
    let cfg = ExperimentConfig::from_toml(&text).with_context(|| format!("in {}", p.display()))?;
    let plan = cfg.plan()?;
    let data = build_data(&plan)?;
    Ok(Prepared {
        plan,
        data,
        dir: dir.to_path_buf(),
    })
}

fn progress_bar(total: u64, quiet: bool, label: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if quiet {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {bar:32} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}",
        )
        .expect("a valid progress template"),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// What [`execute`] ended with.
#[derive(Debug)]
pub enum ExperimentOutcome {
    /// Every run finished; the report is written.
    Done(Box<Results>),
    /// Some runs stopped early (`--stop-after`); resume the folder later.
    Stopped,
}

/// Trains every run of a prepared experiment that is not finished yet (resuming from
/// checkpoints), then writes the report.
pub fn execute<D: Device<f32>>(
    dev: &D,
    prep: &Prepared,
    quiet: bool,
    stop_after: Option<usize>,
) -> Result<ExperimentOutcome> {
    let plan = &prep.plan;
    let mut todo = 0u64;
    for r in &plan.runs {
        if !prep.dir.join(r.rel_dir()).join("final.json").exists() {
            todo += r.total_steps;
        }
    }
    let pb = progress_bar(todo, quiet, &plan.config.name);
    let mut results = Vec::new();
    let mut curves = Vec::new();
    let mut stopped = false;
    for r in &plan.runs {
        let dir = prep.dir.join(r.rel_dir());
        let fin = dir.join("final.json");
        pb.set_message(format!("{} seed {}", r.arm, r.seed));
        let res: RunResult = if fin.exists() {
            serde_json::from_str(&fs::read_to_string(&fin)?)
                .with_context(|| format!("in {}", fin.display()))?
        } else {
            let split = prep
                .data
                .get(&r.seed)
                .ok_or_else(|| anyhow!("no data for seed {}", r.seed))?;
            let opts = RunOptions {
                stop_after_epoch: stop_after,
                progress: Some(pb.clone()),
            };
            match train(dev, r, split, &dir, &opts)
                .with_context(|| format!("run {} seed {}", r.arm, r.seed))?
            {
                RunOutcome::Finished(res) => *res,
                RunOutcome::Stopped(_) => {
                    stopped = true;
                    continue;
                }
            }
        };
        curves.push(read_metrics(&dir)?);
        results.push(res);
    }
    pb.finish_and_clear();
    if stopped {
        return Ok(ExperimentOutcome::Stopped);
    }
    let summary = summarise(&plan.config, results);
    write_report(&prep.dir, &plan.config, &summary, &curves)?;
    Ok(ExperimentOutcome::Done(Box::new(summary)))
}

fn print_summary(res: &Results, dir: &Path, secs: f64) {
    println!("{}: finished in {secs:.1} s", res.experiment);
    for a in &res.arms {
        let ci = if a.test_acc.values.len() > 1 {
            format!(" ± {:.2}", 100.0 * a.test_acc.ci95)
        } else {
            String::new()
        };
        let mut line = format!(
            "  {:<10} accuracy {:6.2}{ci} %   density {:.3}",
            a.arm,
            100.0 * a.test_acc.mean,
            a.density.mean
        );
        if let Some(f) = &a.flagged_recall {
            line.push_str(&format!("   rare-decided recall {:6.2} %", 100.0 * f.mean));
        }
        for b in &a.balance {
            line.push_str(&format!(
                "   balance[{}] slope {:.3} R^2 {:.2}",
                b.population, b.slope.mean, b.r2.mean
            ));
        }
        println!("{line}");
    }
    println!("  report: {}", dir.join("report.md").display());
}

fn with_device<T>(
    kind: DeviceKind,
    f_cpu: impl FnOnce(&dfdx::tensor::Cpu) -> Result<T>,
    #[allow(unused_variables)] f_cuda: impl FnOnce(&CudaDevice) -> Result<T>,
) -> Result<T> {
    match kind {
        DeviceKind::Cpu => f_cpu(&dfdx::tensor::Cpu::default()),
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let dev = dfdx::tensor::Cuda::try_seed_from_u64(0)
                    .map_err(|e| anyhow!("--device cuda: cannot open GPU 0: {e:?}"))?;
                f_cuda(&dev)
            }
            #[cfg(not(feature = "cuda"))]
            anyhow::bail!("--device cuda: this bb was built without the `cuda` feature (cargo build --features cuda)")
        }
    }
}

/// The GPU device type (the CPU one when built without `cuda`, never used then).
#[cfg(feature = "cuda")]
pub type CudaDevice = dfdx::tensor::Cuda;
/// The GPU device type (the CPU one when built without `cuda`, never used then).
#[cfg(not(feature = "cuda"))]
pub type CudaDevice = dfdx::tensor::Cpu;

fn run_prepared(
    prep: &Prepared,
    args_device: DeviceKind,
    quiet: bool,
    stop_after: Option<usize>,
) -> Result<()> {
    let t0 = Instant::now();
    let out = with_device(
        args_device,
        |d| execute(d, prep, quiet, stop_after),
        |d| execute(d, prep, quiet, stop_after),
    )?;
    match out {
        ExperimentOutcome::Done(res) => {
            print_summary(&res, &prep.dir, t0.elapsed().as_secs_f64());
        }
        ExperimentOutcome::Stopped => {
            println!(
                "stopped after epoch {}; continue with: bb run --resume {}",
                stop_after.unwrap_or(0),
                prep.dir.display()
            );
        }
    }
    Ok(())
}

/// Fails early (before any folder is made) when the device cannot be used.
fn check_device(kind: DeviceKind) -> Result<()> {
    with_device(kind, |_| Ok(()), |_| Ok(()))
}

/// Runs `bb run`.
pub fn run(args: &RunArgs) -> Result<()> {
    check_device(args.device)?;
    if let Some(dir) = &args.resume {
        let prep = reopen(dir)?;
        return run_prepared(&prep, args.device, args.quiet, args.stop_after);
    }
    let name = args
        .experiment
        .as_deref()
        .ok_or_else(|| anyhow!("give a preset name or a config file (see `bb presets`)"))?;
    let cfg = load_experiment(name)?;
    // validate fully before choosing or creating any folder
    cfg.plan()?;
    let dir = fresh_dir(args.out.as_deref(), &args.runs_dir, &cfg.name)?;
    let prep = prepare(&cfg, &dir)?;
    run_prepared(&prep, args.device, args.quiet, args.stop_after)
}

/// Runs `bb tour` (and `bb` without arguments): every preset, one after the other.
pub fn tour(args: &TourArgs) -> Result<()> {
    check_device(args.device)?;
    let t0 = Instant::now();
    let cfgs: Vec<ExperimentConfig> = PRESETS
        .iter()
        .map(|p| load_experiment(p.name))
        .collect::<Result<_>>()?;
    for c in &cfgs {
        c.plan().with_context(|| format!("preset {}", c.name))?;
    }
    let root = fresh_dir(args.out.as_deref(), &args.runs_dir, "tour")?;
    println!(
        "bb tour: the built-in experiments ({}), into {}",
        cfgs.iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        root.display()
    );
    let mut index = String::from("# bb tour\n\n| experiment | report | wall s |\n|---|---|---|\n");
    for c in &cfgs {
        let t = Instant::now();
        let prep = prepare(c, &root.join(&c.name))?;
        run_prepared(&prep, args.device, args.quiet, None)?;
        index.push_str(&format!(
            "| {} | [{}/report.md]({}/report.md) | {:.1} |\n",
            c.name,
            c.name,
            c.name,
            t.elapsed().as_secs_f64()
        ));
        write_atomic(&root.join("README.md"), index.as_bytes())?;
    }
    println!(
        "bb tour: done in {:.1} s; index {}",
        t0.elapsed().as_secs_f64(),
        root.join("README.md").display()
    );
    Ok(())
}
