//! `bb run` for the convolutional and sequence experiments (a TOML with `task = "faceid"`,
//! `task = "changedet"`, `task = "em3d"` or `task = "speech"`, or one of their presets).

use crate::changedet::{self, ChangeDetConfig, ChangeDetTask};
use crate::cli_run::{DeviceKind, RunArgs};
use crate::cli_sweep::SweepArgs;
use crate::convrun::{self, task_of, ConvRunResult, ConvRunSpec, ConvTask};
use crate::em::{self, EmConfig, EmTask};
use crate::faceid::{self, FaceIdConfig, FaceIdTask};
use crate::io::write_atomic;
use crate::speech::{self, SpeechConfig, SpeechTask};
use anyhow::{anyhow, bail, ensure, Context, Result};
use dfdx::tensor::Cpu;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs;
use std::path::Path;
use std::time::Instant;

/// A built-in conv experiment.
#[derive(Debug, Clone, Copy)]
pub struct ConvPreset {
    /// Name given to `bb run`.
    pub name: &'static str,
    /// The TOML text.
    pub toml: &'static str,
}

/// The conv presets.
pub const CONV_PRESETS: &[ConvPreset] = &[
    ConvPreset {
        name: "faceid",
        toml: include_str!("../configs/faceid.toml"),
    },
    ConvPreset {
        name: "faceid-mnist",
        toml: include_str!("../configs/faceid-mnist.toml"),
    },
    ConvPreset {
        name: "changedet",
        toml: include_str!("../configs/changedet.toml"),
    },
    ConvPreset {
        name: "em3d",
        toml: include_str!("../configs/em3d.toml"),
    },
    ConvPreset {
        name: "speech",
        toml: include_str!("../configs/speech.toml"),
    },
];

/// The config text of a conv preset or file, if `name_or_path` names one.
pub fn conv_config_text(name_or_path: &str) -> Result<Option<String>> {
    if let Some(p) = CONV_PRESETS.iter().find(|p| p.name == name_or_path) {
        return Ok(Some(p.toml.to_string()));
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment config {}", path.display()))?;
        if task_of(&text).is_some() {
            return Ok(Some(text));
        }
    }
    Ok(None)
}

/// Whether `bb run` arguments name a conv experiment (a preset, a config file with a `task`,
/// or a run folder of one to resume).
pub fn handles(args: &RunArgs) -> bool {
    if let Some(dir) = &args.resume {
        return fs::read_to_string(dir.join("config.toml"))
            .ok()
            .and_then(|t| task_of(&t))
            .is_some();
    }
    args.experiment
        .as_deref()
        .is_some_and(|e| conv_config_text(e).ok().flatten().is_some())
}

/// One line per conv preset, for `bb presets`.
pub fn presets() -> Result<()> {
    for p in CONV_PRESETS {
        let d = toml::from_str::<toml::Table>(p.toml)
            .ok()
            .and_then(|t| {
                t.get("description")
                    .and_then(|d| d.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        println!("{:<13} {d}", p.name);
    }
    Ok(())
}

fn progress(total: u64, quiet: bool, label: &str) -> ProgressBar {
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

/// How an invocation treats the experiment folder and its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new folder (must not exist); every run.
    Fresh,
    /// An existing folder; every unfinished run.
    Resume,
    /// Share `index` of `count` of the runs (by position in the grid); the folder is shared
    /// with the other shards and created by whichever comes first.
    Shard {
        /// This shard, `0..count`.
        index: usize,
        /// Number of shards.
        count: usize,
    },
    /// Train nothing; write the report if every run is finished.
    Merge,
}

/// Prepares the folder for `mode`, trains this invocation's unfinished runs and, once every
/// run of the grid is finished, writes `results.json` and returns all results (in grid
/// order). Returns `None` when runs stopped early or others are still missing.
#[allow(clippy::too_many_arguments)]
fn drive<T: ConvTask>(
    dev: &Cpu,
    text: &str,
    dir: &Path,
    mode: Mode,
    name: &str,
    runs: &[ConvRunSpec],
    first: (u64, T),
    make: impl Fn(u64) -> Result<T>,
    quiet: bool,
    stop_after: Option<usize>,
) -> Result<Option<Vec<ConvRunResult>>> {
    let cfg_path = dir.join("config.toml");
    match mode {
        Mode::Fresh => {
            ensure!(!dir.exists(), "{} exists already", dir.display());
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            write_atomic(&cfg_path, text.as_bytes())?;
        }
        Mode::Shard { .. } => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            match fs::read_to_string(&cfg_path) {
                Ok(t) => ensure!(
                    t == text,
                    "{} holds a different experiment; every shard must run the same config",
                    cfg_path.display()
                ),
                Err(_) => write_atomic(&cfg_path, text.as_bytes())?,
            }
        }
        Mode::Resume | Mode::Merge => ensure!(
            cfg_path.is_file(),
            "{} is not an experiment folder (no config.toml)",
            dir.display()
        ),
    }
    let mine: Vec<ConvRunSpec> = runs
        .iter()
        .enumerate()
        .filter(|(i, _)| match mode {
            Mode::Fresh | Mode::Resume => true,
            Mode::Shard { index, count } => i % count == index,
            Mode::Merge => false,
        })
        .map(|(_, r)| r.clone())
        .collect();
    let done = |r: &ConvRunSpec| dir.join(r.rel_dir()).join("final.json").exists();
    let todo: u64 = mine
        .iter()
        .filter(|r| !done(r))
        .map(|r| r.total_steps)
        .sum();
    if todo > 0 {
        let pb = progress(todo, quiet, name);
        let mut first = Some(first);
        let out = convrun::execute(
            dev,
            dir,
            &mine,
            |seed| match first.take() {
                Some((s, t)) if s == seed => Ok(t),
                _ => make(seed),
            },
            Some(pb.clone()),
            stop_after,
        )?;
        pb.finish_and_clear();
        if out.is_none() {
            println!(
                "stopped after epoch {}; continue with: bb run --resume {}",
                stop_after.unwrap_or(0),
                dir.display()
            );
            return Ok(None);
        }
    }
    let missing = runs.iter().filter(|r| !done(r)).count();
    if missing > 0 {
        println!(
            "{name}: {} of {} runs finished; the report is written when all are \
             (bb sweep CONFIG --out {} --merge)",
            runs.len() - missing,
            runs.len(),
            dir.display()
        );
        return Ok(None);
    }
    let results: Vec<ConvRunResult> = runs
        .iter()
        .map(|r| convrun::read_result(&dir.join(r.rel_dir())))
        .collect::<Result<_>>()?;
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "runs": results,
            "arms": convrun::summarise(&results),
        }))?
        .as_bytes(),
    )?;
    Ok(Some(results))
}

fn print_summary(
    name: &str,
    dir: &Path,
    secs: f64,
    results: &[ConvRunResult],
    metrics: [(&str, &str); 2],
) {
    println!(
        "{name}: finished in {secs:.1} s; report: {}",
        dir.join("report.md").display()
    );
    for a in convrun::summarise(results) {
        let mut line = format!("  {:<20}", a.arm);
        for (k, title) in metrics {
            line.push_str(&format!(
                " {title} {:>14} %",
                convrun::fmt_metric(a.metrics.get(k), 100.0, 2)
            ));
        }
        println!("{line}");
    }
}

/// Runs (or resumes) the experiment of `text` in `dir` (created after validation when
/// `fresh`).
pub fn run_in(
    text: &str,
    dir: &Path,
    fresh: bool,
    quiet: bool,
    stop_after: Option<usize>,
) -> Result<()> {
    let mode = if fresh { Mode::Fresh } else { Mode::Resume };
    run_mode(text, dir, mode, quiet, stop_after)
}

/// Runs the experiment of `text` in `dir` as `mode` says; writes the report once every run is
/// finished.
pub fn run_mode(
    text: &str,
    dir: &Path,
    mode: Mode,
    quiet: bool,
    stop_after: Option<usize>,
) -> Result<()> {
    if let Mode::Shard { index, count } = mode {
        ensure!(
            count > 0 && index < count,
            "--shard {index}/{count}: I must be below N"
        );
    }
    let dev = Cpu::default();
    let t0 = Instant::now();
    match task_of(text).as_deref() {
        Some("faceid") => {
            let cfg = FaceIdConfig::from_toml(text)?;
            let (runs, first) = faceid::plan(&cfg, &dev)?;
            let data = first.data().clone();
            let make = |seed| FaceIdTask::new(&cfg, seed, &dev);
            let first = (cfg.seeds[0], first);
            let Some(results) = drive(
                &dev, text, dir, mode, &cfg.name, &runs, first, make, quiet, stop_after,
            )?
            else {
                return Ok(());
            };
            let rep = faceid::report(&cfg, &data, &results)?;
            write_atomic(&dir.join("report.md"), rep.as_bytes())?;
            let m = [("top1", "top-1"), ("verify_auc", "verification AUC")];
            print_summary(&cfg.name, dir, t0.elapsed().as_secs_f64(), &results, m);
            Ok(())
        }
        Some("changedet") => {
            let cfg = ChangeDetConfig::from_toml(text)?;
            let (runs, first) = changedet::plan(&cfg, &dev)?;
            let (test, train) = (first.test().clone(), first.train().clone());
            let make = |seed| ChangeDetTask::new(&cfg, seed, &dev);
            let first = (cfg.seeds[0], first);
            let Some(results) = drive(
                &dev, text, dir, mode, &cfg.name, &runs, first, make, quiet, stop_after,
            )?
            else {
                return Ok(());
            };
            let rep = changedet::report(&cfg, &test, &train, &results, dir)?;
            write_atomic(&dir.join("report.md"), rep.as_bytes())?;
            let m = [("f1_pooled", "F1"), ("pr_auc", "PR-AUC")];
            print_summary(&cfg.name, dir, t0.elapsed().as_secs_f64(), &results, m);
            Ok(())
        }
        Some("em3d") => {
            let cfg = EmConfig::from_toml(text)?;
            let (runs, first) = em::plan(&cfg, &dev)?;
            let (train, test) = (first.train().clone(), first.test().clone());
            let make = |seed| EmTask::new(&cfg, seed, &dev);
            let first = (cfg.seeds[0], first);
            let Some(results) = drive(
                &dev, text, dir, mode, &cfg.name, &runs, first, make, quiet, stop_after,
            )?
            else {
                return Ok(());
            };
            let rep = em::report(&cfg, &train, &test, &results)?;
            write_atomic(&dir.join("report.md"), rep.as_bytes())?;
            let m = [("f1", "F1"), ("pr_auc", "PR-AUC")];
            print_summary(&cfg.name, dir, t0.elapsed().as_secs_f64(), &results, m);
            Ok(())
        }
        Some("speech") => {
            let cfg = SpeechConfig::from_toml(text)?;
            let (runs, corpus, first) = speech::plan(&cfg, &dev)?;
            let data = first.data().meta();
            let make = |seed| SpeechTask::new(&cfg, &corpus, seed, &dev);
            let first = (cfg.seeds[0], first);
            let Some(results) = drive(
                &dev, text, dir, mode, &cfg.name, &runs, first, make, quiet, stop_after,
            )?
            else {
                return Ok(());
            };
            let rep = speech::report(&cfg, &data, &results)?;
            write_atomic(&dir.join("report.md"), rep.as_bytes())?;
            let m = [("accuracy", "accuracy"), ("acc_tail", "tail accuracy")];
            print_summary(&cfg.name, dir, t0.elapsed().as_secs_f64(), &results, m);
            Ok(())
        }
        Some(other) => bail!(
            "task {other:?} is not a known conv task (known: faceid, changedet, em3d, speech)"
        ),
        None => Err(anyhow!("the config has no `task` field")),
    }
}

/// Whether `bb sweep` arguments name a conv experiment (a conv preset or a config file with a
/// `task`).
pub fn handles_sweep(args: &SweepArgs) -> bool {
    args.sweep
        .to_str()
        .is_some_and(|s| conv_config_text(s).ok().flatten().is_some())
}

/// `bb sweep` for conv experiments: the experiment's grid (methods x densities x seeds), or
/// one shard of it (`--shard I/N`, runs `I, I+N, ...`), into a folder shared by all shards;
/// the shard that finishes the grid (or `--merge`) writes the report.
pub fn sweep(args: &SweepArgs) -> Result<()> {
    let name = args.sweep.to_string_lossy().to_string();
    let text =
        conv_config_text(&name)?.ok_or_else(|| anyhow!("{name} is not a conv experiment"))?;
    ensure!(
        args.report.is_none() && !args.list && args.max_runs.is_none(),
        "--report, --list and --max-runs apply to MLP sweeps only"
    );
    if let Some(d) = &args.data_dir {
        crate::realdata::set_data_dir(Some(d.clone()));
    }
    let cfg_name = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .ok_or_else(|| anyhow!("experiment config: missing field `name`"))?;
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join("sweeps").join(&cfg_name));
    let mode = match (&args.shard, args.merge) {
        (_, true) => Mode::Merge,
        (Some(s), false) => Mode::Shard {
            index: s.index,
            count: s.count,
        },
        (None, false) => Mode::Shard { index: 0, count: 1 },
    };
    run_mode(&text, &dir, mode, args.quiet, None)
}

/// `bb run` for conv experiments.
pub fn run(args: &RunArgs) -> Result<()> {
    ensure!(
        args.device == DeviceKind::Cpu,
        "--device: the convolutional experiments run on the CPU only"
    );
    if let Some(dir) = &args.resume {
        let p = dir.join("config.toml");
        let text =
            fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        return run_in(&text, dir, false, args.quiet, args.stop_after);
    }
    let name = args
        .experiment
        .as_deref()
        .ok_or_else(|| anyhow!("give a preset name or a config file (see `bb presets`)"))?;
    let text = conv_config_text(name)?.ok_or_else(|| anyhow!("{name} is not a conv experiment"))?;
    let cfg_name = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .ok_or_else(|| anyhow!("experiment config: missing field `name`"))?;
    let dir = convrun::fresh_dir(args.out.as_deref(), &args.runs_dir, &cfg_name)?;
    run_in(&text, &dir, true, args.quiet, args.stop_after)
}
