//! `bb bench`: the benchmark report — every number a ratio measured in one run.
//!
//! * refresh (of still weights, and of weights drifting between refreshes as in training) and
//!   activity observation against one streaming pass over the same data;
//! * compacted (sparse) inference against the dense layer;
//! * training-step overhead of BB against dense training of the same model.

use crate::model::Mlp;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::trainer::train_step;
use anyhow::{Context, Result};
use bb_bench::{
    drift_rows, markdown, median_ci, observe_rows, paired_ratios, quantile, random_vec,
    refresh_rows, sparse_rows, Row,
};
use bb_core::{EdgeShape, Pruner, PrunerConfig};
use clap::Args;
use dfdx::prelude::Cpu;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `bb bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Small sizes and few repetitions (a smoke test of the report, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Where to write the Markdown report (`results/bench.md` keeps the notes on earlier
    /// runs, so the report has a file of its own).
    #[arg(long, default_value = "results/bench-latest.md")]
    pub out: PathBuf,
    /// Sections to run (refresh, observe, sparse, training); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

fn wanted(args: &BenchArgs, section: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|s| s == section)
}

/// Steps per second of dense training and of BB training (SP-in and SP-out, refresh every 25
/// steps) of an MLP, same process, same data.
///
/// The three arms live side by side and take turns in blocks of 25 steps (one refresh period,
/// so every BB block holds exactly one refresh), in rotating order, for `blocks` rounds after a
/// warm-up past the first refresh; each arm's step time is the median over its blocks, and its
/// ratio the median over rounds of its block's time over the dense block's time in the same
/// round (with the quartiles of those ratios and a 95 % confidence interval of their median,
/// see [`median_ci`], in the row's text). Taking turns that often, and
/// comparing blocks run seconds apart, keeps slow drifts of the machine's speed out of the
/// ratios.
pub fn training_rows(widths: &[usize], batch: usize, blocks: usize) -> Result<Vec<Row>> {
    const BLOCK: usize = 25;
    let dev = Cpu::default();
    let x: Vec<f32> = random_vec(1, batch * widths[0])
        .iter()
        .map(|v| v.abs())
        .collect();
    let classes = *widths.last().context("widths")?;
    let y: Vec<usize> = (0..batch).map(|i| (i * 7) % classes).collect();
    let sizes: Vec<usize> = widths
        .windows(2)
        .flat_map(|w| [w[0] * w[1], w[1]])
        .collect();
    let names: Vec<String> = (0..widths.len() - 1)
        .map(crate::model::layer_name)
        .collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pruner = |actuator: &str| -> Result<Pruner> {
        let cfg = PrunerConfig::from_toml_str(&format!(
            "[schedule]\nwarmup_steps = {BLOCK}\nrefresh_every = {BLOCK}\n[policy]\nkind = \"balance\"\nbeta = 0.05\ntarget_density = 0.5\n[actuator]\nkind = \"{actuator}\"\n"
        ))?;
        Ok(Pruner::new(
            cfg,
            bb_core::Topology::chain(&name_refs, widths)?,
        )?)
    };
    let labels = [None, Some("sp_in"), Some("sp_out")];
    let mut arms = Vec::new();
    for arm in labels {
        let model = Mlp::new(&dev, widths, 0)?;
        let opt = Optimizer::new(OptimizerConfig::default(), &sizes);
        arms.push((model, opt, arm.map(pruner).transpose()?));
    }
    let mut run = |i: usize, steps: usize| -> Result<f64> {
        let (model, opt, p) = &mut arms[i];
        let t = Instant::now();
        for _ in 0..steps {
            train_step(model, opt, p.as_mut(), &x, &y, batch, 1e-3)?;
        }
        Ok(t.elapsed().as_secs_f64() / steps as f64)
    };
    // warm-up: past the first refresh (steps 1..=30), so every later block of 25 steps
    // holds exactly one refresh
    for i in 0..labels.len() {
        run(i, BLOCK + 5)?;
    }
    let mut times = vec![Vec::with_capacity(blocks); labels.len()];
    for b in 0..blocks.max(1) {
        for j in 0..labels.len() {
            let i = (b + j) % labels.len();
            times[i].push(run(i, BLOCK)?);
        }
    }
    let med: Vec<f64> = times.iter().map(|t| quantile(t, 0.5)).collect();
    let paired: Vec<(f64, f64, f64)> = times.iter().map(|t| paired_ratios(t, &times[0])).collect();
    let ci: Vec<(f64, f64)> = times
        .iter()
        .map(|t| {
            let r: Vec<f64> = t.iter().zip(&times[0]).map(|(a, d)| a / d).collect();
            median_ci(&r)
        })
        .collect();
    let w = widths
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join("-");
    Ok(labels[1..]
        .iter()
        .enumerate()
        .map(|(i, arm)| Row {
            section: "training",
            case: format!(
                "MLP {w}, batch {batch}, Adam, BB {} refresh/{BLOCK}: {:.0} vs dense {:.0} \
                 steps/s; ratio over {} rounds, quartiles {:.3}-{:.3}, 95 % interval of the \
                 median {:.3}-{:.3}",
                arm.unwrap_or("dense"),
                1.0 / med[i + 1],
                1.0 / med[0],
                times[0].len(),
                paired[i + 1].1,
                paired[i + 1].2,
                ci[i + 1].0,
                ci[i + 1].1,
            ),
            time: std::time::Duration::from_secs_f64(med[i + 1]),
            reference: std::time::Duration::from_secs_f64(med[0]),
            ratio_label: "x dense step time",
            paired_ratio: Some(paired[i + 1].0),
        })
        .collect())
}

fn commit() -> String {
    if let Ok(c) = std::env::var("BB_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Runs `bb bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let q = args.quick;
    let mut rows = Vec::new();
    if wanted(args, "refresh") {
        let shapes = if q {
            vec![EdgeShape::dense(256, 256), EdgeShape::conv(32, 32, &[3, 3])]
        } else {
            vec![
                EdgeShape::dense(1024, 1024),
                EdgeShape::dense(4096, 4096),
                EdgeShape::dense(4096, 16384),
                EdgeShape::conv(256, 256, &[3, 3]),
            ]
        };
        eprintln!("bb bench: refresh ...");
        rows.extend(refresh_rows(&shapes, if q { 2 } else { 7 }));
        // Weights that move between refreshes, as in training.
        rows.extend(if q {
            drift_rows(&EdgeShape::dense(256, 256), 0.05, 2)
        } else {
            drift_rows(&EdgeShape::dense(2048, 2048), 0.05, 15)
        });
    }
    if wanted(args, "observe") {
        eprintln!("bb bench: observe ...");
        rows.extend(if q {
            observe_rows(2, (4, 16, 64), (16, 256))
        } else {
            observe_rows(20, (64, 256, 1024), (128, 4096))
        });
    }
    if wanted(args, "sparse") {
        eprintln!("bb bench: sparse inference ...");
        rows.extend(if q {
            sparse_rows(&[256], &[0.5, 0.1], &[1, 16], 2)
        } else {
            sparse_rows(&[1024, 4096], &[0.5, 0.3, 0.1, 0.05], &[1, 16, 128], 11)
        });
    }
    if wanted(args, "training") {
        eprintln!("bb bench: training ...");
        if q {
            rows.extend(training_rows(&[32, 16, 8, 4], 8, 2)?);
        } else {
            rows.extend(training_rows(&[784, 300, 100, 10], 128, 301)?);
            rows.extend(training_rows(&[784, 2048, 2048, 10], 128, 121)?);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut text = format!(
        "# bb bench\n\ncommit `{}`, {cores} cores, {} rayon threads{}. Command: `bb bench{}`.\n\n\
         Refresh and observation: ratio to one streaming pass over the same data (lower is better). \
         Sparse: speed-up of the compacted layer over the dense layer (higher is better). Training: \
         BB step time over dense step time, the median over rounds of blocks run side by side \
         (lower is better).\n",
        commit(),
        rayon::current_num_threads(),
        if q { ", quick mode (not a measurement)" } else { "" },
        if q { " --quick" } else { "" },
    );
    text.push_str(&markdown(&rows));
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let tmp = args.out.with_extension("md.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("{}: cannot write", args.out.display()))?;
    println!("{text}");
    eprintln!("bb bench: report written to {}", args.out.display());
    Ok(())
}
