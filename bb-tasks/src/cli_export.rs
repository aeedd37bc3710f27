//! `bb export`: the pruned model of a finished run as a compact sparse file
//! ([`crate::export`]), optionally checked against the masked dense model on the run's test set.

use crate::config::ExperimentConfig;
use crate::data::Dataset;
use crate::export::{SourceInfo, SparseMlp};
use crate::model::Mlp;
use crate::trainer::{latest_checkpoint, load_model, load_pruner, RunResult};
use anyhow::{anyhow, bail, ensure, Context, Result};
use bb_core::Pruner;
use clap::Args;
use dfdx::prelude::{Cpu, Device};
use std::fs;
use std::path::{Path, PathBuf};

/// Arguments of `bb export`.
#[derive(Debug, Args, Clone)]
pub struct ExportArgs {
    /// A run folder of `bb run` (with `config.toml`), or one `<arm>/seed-<s>` folder in it.
    pub run_dir: PathBuf,
    /// The file to write.
    #[arg(long, value_name = "MODEL.safetensors")]
    pub out: PathBuf,
    /// Arm to export (needed when the folder holds several).
    #[arg(long)]
    pub arm: Option<String>,
    /// Seed to export (needed when the folder holds several).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Reload the written file and compare its logits with the masked dense model's on the
    /// run's test set (reports the largest absolute difference).
    #[arg(long)]
    pub verify: bool,
}

/// The exported model checked against the dense one.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// Test samples compared.
    pub samples: usize,
    /// Largest absolute difference between the two models' logits.
    pub max_abs_diff: f32,
    /// Samples whose predicted class (argmax) differs.
    pub disagreements: usize,
}

/// What `bb export` did.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The run folder (`<arm>/seed-<s>`) exported.
    pub run: PathBuf,
    /// The file written.
    pub out: PathBuf,
    /// Live edges written.
    pub nnz: usize,
    /// Edges of the dense model.
    pub edges: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// The check against the dense model, if asked for.
    pub verification: Option<Verification>,
}

/// A finished run, loaded: the model (SP-in factors set), its pruner and its results.
#[derive(Debug)]
pub struct LoadedRun<D: Device<f32>> {
    /// The trained, masked model.
    pub model: Mlp<D>,
    /// The pruner at the end of training (`None` for dense arms).
    pub pruner: Option<Pruner>,
    /// `final.json`.
    pub result: RunResult,
}

/// Finds the `<arm>/seed-<s>` folder of a run. `run_dir` is either that folder or the
/// experiment folder holding it (then `arm`/`seed` choose among its finished runs).
pub fn locate_run(run_dir: &Path, arm: Option<&str>, seed: Option<u64>) -> Result<PathBuf> {
    ensure!(
        run_dir.is_dir(),
        "{}: no such run folder",
        run_dir.display()
    );
    if run_dir.join("final.json").is_file() || run_dir.join("checkpoints").is_dir() {
        let fin = run_dir.join("final.json");
        let res = read_result(&fin)?;
        ensure!(
            arm.is_none_or(|a| a == res.arm) && seed.is_none_or(|s| s == res.seed),
            "{} is the run of arm {:?} seed {}, not the one asked for",
            run_dir.display(),
            res.arm,
            res.seed
        );
        return Ok(run_dir.to_path_buf());
    }
    let cfg_path = run_dir.join("config.toml");
    ensure!(
        cfg_path.is_file(),
        "{}: not a run folder (neither config.toml nor final.json there)",
        run_dir.display()
    );
    let cfg = read_config(&cfg_path)?;
    if let Some(a) = arm {
        ensure!(
            cfg.arms.iter().any(|x| x.name == a),
            "{}: no arm {a:?} (arms: {})",
            cfg_path.display(),
            cfg.arms
                .iter()
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(s) = seed {
        ensure!(
            cfg.seeds.contains(&s),
            "{}: no seed {s} (seeds: {:?})",
            cfg_path.display(),
            cfg.seeds
        );
    }
    let chosen: Vec<PathBuf> = cfg
        .arms
        .iter()
        .filter(|a| arm.is_none_or(|x| x == a.name))
        .flat_map(|a| {
            cfg.seeds
                .iter()
                .filter(|&&s| seed.is_none_or(|x| x == s))
                .map(move |s| run_dir.join(&a.name).join(format!("seed-{s}")))
        })
        .collect();
    match chosen.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "{} holds {} runs ({}); choose one with --arm and --seed",
            run_dir.display(),
            chosen.len(),
            chosen
                .iter()
                .filter_map(|p| p.strip_prefix(run_dir).ok())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn read_config(path: &Path) -> Result<ExperimentConfig> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    ExperimentConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

fn read_result(fin: &Path) -> Result<RunResult> {
    let text = fs::read_to_string(fin).with_context(|| {
        format!(
            "cannot read {}; is the run finished? (continue it with `bb run --resume`)",
            fin.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("in {}", fin.display()))
}

/// Loads the final model of a finished run folder (`<arm>/seed-<s>`): its last checkpoint,
/// which must be the one `final.json` was computed from.
pub fn load_run<D: Device<f32>>(dev: &D, run: &Path) -> Result<LoadedRun<D>> {
    let result = read_result(&run.join("final.json"))?;
    let ck = latest_checkpoint(run)?.ok_or_else(|| {
        anyhow!(
            "{} has no checkpoint to export (a sweep deletes them unless keep_checkpoints = true)",
            run.display()
        )
    })?;
    let state_path = ck.join("state.json");
    let state: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("in {}", state_path.display()))?;
    let step = state["step"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: no field step", state_path.display()))?;
    ensure!(
        step == result.steps,
        "{} is at step {step}, but {} reports {} steps",
        ck.display(),
        run.join("final.json").display(),
        result.steps
    );
    let mut model = load_model(dev, &ck, &result.widths)?;
    let pruner = load_pruner(&ck)?;
    if let Some(p) = &pruner {
        for l in 0..model.num_layers() {
            model.set_scale(l, p.scale(l))?;
        }
    }
    Ok(LoadedRun {
        model,
        pruner,
        result,
    })
}

/// The test set of a run folder `<exp>/<arm>/seed-<s>`, rebuilt from `<exp>/config.toml`.
pub fn run_test_set(run: &Path, seed: u64) -> Result<Dataset> {
    let exp = run
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("{}: cannot find its experiment folder", run.display()))?;
    let cfg_path = exp.join("config.toml");
    ensure!(
        cfg_path.is_file(),
        "the run's test set is rebuilt from {}, which does not exist",
        cfg_path.display()
    );
    let cfg = read_config(&cfg_path)?;
    let split = cfg
        .data
        .build(seed)
        .with_context(|| format!("data of {} seed {seed}", cfg_path.display()))?;
    Ok(split.test)
}

/// Compares the exported model with the masked dense model on `data`.
pub fn compare<D: Device<f32>>(
    sparse: &SparseMlp,
    dense: &Mlp<D>,
    data: &Dataset,
) -> Result<Verification> {
    const CHUNK: usize = 1024;
    ensure!(
        data.features == sparse.widths()[0] && dense.widths() == sparse.widths(),
        "verify: models of widths {:?} and {:?} on data of {} features",
        sparse.widths(),
        dense.widths(),
        data.features
    );
    let k = *sparse.widths().last().expect("at least two widths");
    let mut v = Verification {
        samples: data.len(),
        max_abs_diff: 0.0,
        disagreements: 0,
    };
    let mut scratch = Default::default();
    for start in (0..data.len()).step_by(CHUNK) {
        let b = CHUNK.min(data.len() - start);
        let x = &data.x[start * data.features..(start + b) * data.features];
        let want = dense.forward(x, b)?.logits;
        let got = sparse.forward_with(x, b, &mut scratch)?;
        for (zw, zg) in want.chunks_exact(k).zip(got.chunks_exact(k)) {
            for (a, g) in zw.iter().zip(zg) {
                let d = (a - g).abs();
                // NaN counts as an infinite difference
                v.max_abs_diff = if d.is_nan() {
                    f32::INFINITY
                } else {
                    v.max_abs_diff.max(d)
                };
            }
            v.disagreements += (crate::stats::argmax(zw) != crate::stats::argmax(zg)) as usize;
        }
    }
    Ok(v)
}

/// Exports a run (and verifies it when asked), without printing.
pub fn export(args: &ExportArgs) -> Result<ExportSummary> {
    let run = locate_run(&args.run_dir, args.arm.as_deref(), args.seed)?;
    let dev = Cpu::default();
    let loaded = load_run(&dev, &run)?;
    let r = &loaded.result;
    let source = SourceInfo {
        arm: r.arm.clone(),
        seed: r.seed,
        steps: r.steps,
        density: r.density,
        test_acc: r.test_acc,
    };
    let sparse = SparseMlp::from_model(&loaded.model, loaded.pruner.as_ref(), Some(source))
        .with_context(|| format!("run {}", run.display()))?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    sparse.save(&args.out)?;
    let bytes = fs::metadata(&args.out)
        .with_context(|| format!("cannot read {}", args.out.display()))?
        .len();
    let verification = if args.verify {
        let back = SparseMlp::load(&args.out)?;
        ensure!(
            back == sparse,
            "{}: the file does not read back as the model written",
            args.out.display()
        );
        let test = run_test_set(&run, r.seed)?;
        Some(compare(&back, &loaded.model, &test)?)
    } else {
        None
    };
    let w = &r.widths;
    Ok(ExportSummary {
        run,
        out: args.out.clone(),
        nnz: sparse.nnz(),
        edges: w.windows(2).map(|p| p[0] * p[1]).sum(),
        bytes,
        verification,
    })
}

/// Runs `bb export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let s = export(args)?;
    println!(
        "bb export: {} -> {} ({} of {} edges live, {:.1} KiB)",
        s.run.display(),
        s.out.display(),
        s.nnz,
        s.edges,
        s.bytes as f64 / 1024.0
    );
    if let Some(v) = &s.verification {
        println!(
            "  verify: {} test samples, max |logit difference| {:.3e} against the masked dense model, {} predictions differ",
            v.samples, v.max_abs_diff, v.disagreements
        );
    }
    Ok(())
}
