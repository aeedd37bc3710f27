//! Aggregated results of an experiment (`results.json`), its `report.md` and SVG plots.

use crate::config::ExperimentConfig;
use crate::io::write_atomic;
use crate::measure::mean_ci95;
use crate::trainer::{EpochMetrics, RunResult};
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// Mean, 95 % interval half-width and the per-seed values of one quantity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean over seeds.
    pub mean: f64,
    /// Half-width of the 95 % t-interval (0 with one seed).
    pub ci95: f64,
    /// One value per seed.
    pub values: Vec<f64>,
}

impl Stat {
    fn of(values: Vec<f64>) -> Self {
        let (mean, ci95) = mean_ci95(&values);
        Self { mean, ci95, values }
    }

    fn pct(&self) -> String {
        if self.values.len() > 1 {
            format!("{:.2} ± {:.2}", 100.0 * self.mean, 100.0 * self.ci95)
        } else {
            format!("{:.2}", 100.0 * self.mean)
        }
    }
}

/// One arm over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    /// Arm name.
    pub arm: String,
    /// Seeds run.
    pub seeds: Vec<u64>,
    /// Final evaluation accuracy.
    pub test_acc: Stat,
    /// Recall on the flagged samples (DNF: rare-decided positives).
    pub flagged_recall: Option<Stat>,
    /// Density over the pruned layers.
    pub density: Stat,
    /// Mean coding entropy (bits per unit) of each hidden population, in order.
    pub entropy_bits: Vec<(String, Stat)>,
    /// Decorrelation of each hidden population.
    pub decorrelation: Vec<(String, Stat)>,
    /// Balance-fit slope and R^2 per population (input and hidden) where defined.
    pub balance: Vec<BalanceSummary>,
    /// Training wall time per run, seconds.
    pub wall_s: Stat,
}

/// Balance fit of one population over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalanceSummary {
    /// Population.
    pub population: String,
    /// Fitted slope (beta hat).
    pub slope: Stat,
    /// R^2.
    pub r2: Stat,
}

/// `results.json`: the summary per arm and every run's final measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Experiment name.
    pub experiment: String,
    /// Per-arm summaries, in config order.
    pub arms: Vec<ArmSummary>,
    /// Every run.
    pub runs: Vec<RunResult>,
}

/// Summarises finished runs (`runs` in config order, arms outer).
pub fn summarise(cfg: &ExperimentConfig, runs: Vec<RunResult>) -> Results {
    let arms = cfg
        .arms
        .iter()
        .map(|a| {
            let rs: Vec<&RunResult> = runs.iter().filter(|r| r.arm == a.name).collect();
            let stat = |f: &dyn Fn(&RunResult) -> f64| Stat::of(rs.iter().map(|r| f(r)).collect());
            let pops: Vec<String> = rs
                .first()
                .map(|r| r.populations.iter().map(|p| p.population.clone()).collect())
                .unwrap_or_default();
            let per_pop = |f: &dyn Fn(&crate::measure::PopulationStats) -> Option<f64>| {
                pops.iter()
                    .enumerate()
                    .skip(1)
                    .filter_map(|(i, name)| {
                        let v: Option<Vec<f64>> = rs.iter().map(|r| f(&r.populations[i])).collect();
                        v.map(|v| (name.clone(), Stat::of(v)))
                    })
                    .collect::<Vec<_>>()
            };
            let balance = pops
                .iter()
                .enumerate()
                .filter_map(|(i, name)| {
                    let fits: Option<Vec<_>> = rs
                        .iter()
                        .map(|r| r.populations[i].balance.clone())
                        .collect();
                    fits.map(|f| BalanceSummary {
                        population: name.clone(),
                        slope: Stat::of(f.iter().map(|b| b.slope).collect()),
                        r2: Stat::of(f.iter().map(|b| b.r2).collect()),
                    })
                })
                .collect();
            let flagged: Option<Vec<f64>> = rs.iter().map(|r| r.flagged_recall).collect();
            ArmSummary {
                arm: a.name.clone(),
                seeds: rs.iter().map(|r| r.seed).collect(),
                test_acc: stat(&|r| r.test_acc),
                flagged_recall: flagged.filter(|v| !v.is_empty()).map(Stat::of),
                density: stat(&|r| r.density),
                entropy_bits: per_pop(&|p| Some(p.entropy_bits)),
                decorrelation: per_pop(&|p| p.decorrelation),
                balance,
                wall_s: stat(&|r| r.wall_s),
            }
        })
        .collect();
    Results {
        experiment: cfg.name.clone(),
        arms,
        runs,
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

/// Writes `results.json`, `report.md` and the plots into `dir`.
/// `curves[i]` are the epoch metrics of `results.runs[i]`.
pub fn write_report(
    dir: &Path,
    cfg: &ExperimentConfig,
    results: &Results,
    curves: &[Vec<EpochMetrics>],
) -> Result<()> {
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)?;
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# {}: {}\n", cfg.name, cfg.description)?;
    writeln!(
        w,
        "Data: `{}`. Model: MLP {:?}. {} epochs, batch {}, lr {} ({:?}), optimizer {:?}. Seeds {:?}.\n",
        cfg.data.kind(),
        results.runs.first().map(|r| r.widths.clone()).unwrap_or_default(),
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.train.lr_schedule,
        cfg.train.optimizer,
        cfg.seeds
    )?;
    writeln!(
        w,
        "The resolved config is `config.toml`; per-run curves are in `<arm>/seed-<s>/metrics.jsonl`, \
         refresh reports in `refreshes.jsonl`, final measurements in `final.json`, all of it in `results.json`. \
         Intervals are 95 % t-intervals over seeds (none with one seed). Activities, entropy and \
         decorrelation are measured on the evaluation set; a unit is on when its activation is > 0.\n"
    )?;

    // main table
    let has_flag = results.arms.iter().any(|a| a.flagged_recall.is_some());
    writeln!(w, "## Accuracy\n")?;
    write!(w, "| arm | test accuracy % |")?;
    if has_flag {
        write!(w, " rare-decided recall % |")?;
    }
    writeln!(w, " density | wall s/run |")?;
    write!(w, "|---|---|")?;
    if has_flag {
        write!(w, "---|")?;
    }
    writeln!(w, "---|---|")?;
    for a in &results.arms {
        write!(w, "| {} | {} |", a.arm, a.test_acc.pct())?;
        if has_flag {
            write!(
                w,
                " {} |",
                a.flagged_recall.as_ref().map_or("–".into(), Stat::pct)
            )?;
        }
        writeln!(w, " {:.3} | {:.1} |", a.density.mean, a.wall_s.mean)?;
    }
    writeln!(w)?;
    write_verdict(w, results)?;

    // curves
    let acc_svg = plots.join("accuracy.svg");
    accuracy_plot(&acc_svg, cfg, results, curves)?;
    writeln!(w, "![test accuracy per epoch](plots/accuracy.svg)\n")?;

    // sparsity
    writeln!(w, "## Sparsity per layer (seed {})\n", cfg.seeds[0])?;
    writeln!(
        w,
        "| arm | layer | pruned | target density | achieved density | live / edges | fan-in min/mean/max (of {{in}}) | fan-out min/mean/max (of {{out}}) |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|")?;
    for r in results.runs.iter().filter(|r| r.seed == cfg.seeds[0]) {
        for l in &r.layers {
            writeln!(
                w,
                "| {} | {} | {} | {} | {:.4} | {} / {} | {}/{:.1}/{} (of {}) | {}/{:.1}/{} (of {}) |",
                r.arm,
                l.layer,
                if l.pruned { "yes" } else { "no" },
                fmt_opt(l.target_density, 4),
                l.achieved_density,
                l.live_edges,
                l.edges,
                l.row_degrees.min,
                l.row_degrees.mean,
                l.row_degrees.max,
                l.row_degrees.full,
                l.col_degrees.min,
                l.col_degrees.mean,
                l.col_degrees.max,
                l.col_degrees.full
            )?;
        }
    }
    writeln!(w)?;

    // populations
    writeln!(w, "## Activity, entropy, decorrelation and balance fit\n")?;
    writeln!(
        w,
        "Balance fit: least squares of ln((1 - a)/a) on the unit's fan-out k, over the units with \
         0 < a < 1 (units never or always on are left out and counted). Slope = beta hat.\n"
    )?;
    writeln!(
        w,
        "| arm | population | units | entropy bits/unit | decorrelation | silent | always on | slope (beta hat) | intercept | R^2 | fit n (left out) |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for a in &results.arms {
        for (pi, _) in results
            .runs
            .iter()
            .find(|r| r.arm == a.arm)
            .map(|r| r.populations.clone())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let rs: Vec<&RunResult> = results.runs.iter().filter(|r| r.arm == a.arm).collect();
            let p0 = &rs[0].populations[pi];
            let mean = |f: &dyn Fn(&crate::measure::PopulationStats) -> Option<f64>| {
                let v: Option<Vec<f64>> = rs.iter().map(|r| f(&r.populations[pi])).collect();
                v.map(|v| v.iter().sum::<f64>() / v.len() as f64)
            };
            let fit = |f: &dyn Fn(&crate::measure::BalanceFit) -> f64| {
                mean(&|p| p.balance.as_ref().map(f))
            };
            writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                a.arm,
                p0.population,
                p0.units,
                fmt_opt(mean(&|p| Some(p.entropy_bits)), 3),
                fmt_opt(mean(&|p| p.decorrelation), 3),
                fmt_opt(mean(&|p| Some(p.silent as f64)), 1),
                fmt_opt(mean(&|p| Some(p.saturated as f64)), 1),
                fmt_opt(fit(&|b| b.slope), 4),
                fmt_opt(fit(&|b| b.intercept), 3),
                fmt_opt(fit(&|b| b.r2), 3),
                p0.balance
                    .as_ref()
                    .map_or("–".into(), |b| format!("{} ({})", b.n, b.excluded)),
            )?;
        }
    }
    writeln!(
        w,
        "\nValues are means over seeds. A dense layer has equal fan-outs, so it has no balance fit. \
         With the balance policy and SP-out, each refresh sets a unit's fan-out to \
         d0 + ln((1 - a)/a) / beta from its training-time on-rate, so a fit near the configured \
         beta with R^2 near 1 says the units kept the rule's line through training (clipping at \
         k_min and D, regrowth, and the gap between training and evaluation on-rates pull it \
         off); with SP-in or magnitude pruning the fan-out is not set by the rule, and the fit \
         says whether a balance emerges anyway.\n"
    )?;

    // traffic of input feature groups
    let groups_differ = results
        .runs
        .first()
        .is_some_and(|r| r.input_traffic.len() > 1);
    if groups_differ {
        writeln!(
            w,
            "## Traffic of the input features (seed {})\n",
            cfg.seeds[0]
        )?;
        writeln!(
            w,
            "Traffic of a feature = its on-rate a times its fan-out k into fc1; the budget is the \
             total traffic of the input population. `relative` = the group's mean traffic per \
             feature over the population's mean.\n"
        )?;
        writeln!(
            w,
            "| arm | group | features | mean a | mean fan-out | mean traffic | share of budget | relative |"
        )?;
        writeln!(w, "|---|---|---|---|---|---|---|---|")?;
        for r in results.runs.iter().filter(|r| r.seed == cfg.seeds[0]) {
            for g in &r.input_traffic {
                writeln!(
                    w,
                    "| {} | {} | {} | {:.3} | {:.1} | {:.2} | {:.3} | {:.2} |",
                    r.arm,
                    g.group,
                    g.units,
                    g.mean_activity,
                    g.mean_fan_out,
                    g.mean_traffic,
                    g.share,
                    g.relative_to_mean
                )?;
            }
        }
        writeln!(w)?;
    }

    // balance scatter plots
    if cfg.report.balance_plots {
        writeln!(w, "## Balance scatter (seed {})\n", cfg.seeds[0])?;
        for r in results.runs.iter().filter(|r| r.seed == cfg.seeds[0]) {
            for p in r.populations.iter().filter(|p| p.balance.is_some()) {
                let name = format!("balance-{}-{}.svg", r.arm, p.population);
                balance_plot(&plots.join(&name), r, p)?;
                writeln!(w, "![{} {}](plots/{name})\n", r.arm, p.population)?;
            }
        }
    }
    write_atomic(&dir.join("report.md"), md.as_bytes())
}

/// Says plainly how the pruned arms compare with the dense one and with each other.
fn write_verdict(w: &mut String, results: &Results) -> Result<()> {
    let find = |n: &str| results.arms.iter().find(|a| a.arm == n);
    let bb: Vec<&ArmSummary> = results
        .arms
        .iter()
        .filter(|a| a.arm.starts_with("bb"))
        .collect();
    let Some(best) = bb
        .iter()
        .max_by(|a, b| a.test_acc.mean.total_cmp(&b.test_acc.mean))
    else {
        return Ok(());
    };
    let compare = |a: &Stat, b: &Stat| {
        let d = a.mean - b.mean;
        let verdict = if a.values.len() < 2 {
            "one seed, no interval"
        } else if d.abs() <= a.ci95 + b.ci95 {
            "the 95 % intervals overlap: no clear difference"
        } else if d > 0.0 {
            "the intervals do not overlap: BB is better here"
        } else {
            "the intervals do not overlap: BB is worse here"
        };
        (100.0 * d, verdict)
    };
    for other in ["magnitude", "dense"] {
        if let Some(o) = find(other) {
            let (d, verdict) = compare(&best.test_acc, &o.test_acc);
            writeln!(
                w,
                "- Best BB arm `{}` vs `{other}`: {d:+.2} accuracy points ({verdict}).",
                best.arm
            )?;
        }
    }
    for a in &bb {
        for other in ["magnitude", "dense"] {
            if let (Some(fa), Some(fo)) = (
                a.flagged_recall.as_ref(),
                find(other).and_then(|o| o.flagged_recall.as_ref()),
            ) {
                let (d, verdict) = compare(fa, fo);
                writeln!(
                    w,
                    "- `{}` vs `{other}` on the rare-decided positives: {d:+.2} recall points ({verdict}).",
                    a.arm
                )?;
            }
        }
    }
    writeln!(w)?;
    Ok(())
}

fn accuracy_plot(
    path: &Path,
    cfg: &ExperimentConfig,
    results: &Results,
    curves: &[Vec<EpochMetrics>],
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let series: Vec<(String, Vec<(f64, f64)>)> = cfg
            .arms
            .iter()
            .map(|a| {
                let idx: Vec<usize> = (0..results.runs.len())
                    .filter(|&i| results.runs[i].arm == a.name)
                    .collect();
                let n_ep = idx.iter().map(|&i| curves[i].len()).min().unwrap_or(0);
                let pts = (0..n_ep)
                    .map(|e| {
                        let m = idx.iter().map(|&i| curves[i][e].test_acc).sum::<f64>()
                            / idx.len() as f64;
                        ((e + 1) as f64, 100.0 * m)
                    })
                    .collect();
                (a.name.clone(), pts)
            })
            .collect();
        let lo = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(100.0f64, f64::min);
        let y0 = (lo - 2.0).clamp(0.0, 99.0).floor();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: test accuracy (mean over seeds)", cfg.name),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(1f64..cfg.train.epochs.max(2) as f64, y0..100.0)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("accuracy %")
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    write_atomic(path, svg.as_bytes()).context("plot")
}

fn balance_plot(path: &Path, run: &RunResult, p: &crate::measure::PopulationStats) -> Result<()> {
    let Some(fit) = &p.balance else {
        return Ok(());
    };
    let pts: Vec<(f64, f64)> = p
        .activity
        .iter()
        .zip(&p.fan_out_units)
        .filter(|(a, _)| **a > 0.0 && **a < 1.0)
        .map(|(&a, &k)| (k as f64, ((1.0 - a) / a).ln()))
        .collect();
    let kmax = p.fan_out.as_ref().map_or(1, |d| d.full).max(1) as f64;
    let (ylo, yhi) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), q| {
            (l.min(q.1), h.max(q.1))
        });
    let pad = ((yhi - ylo) * 0.1).max(0.2);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{} / {}: slope {:.3}, R² {:.3} (n = {})",
                    run.arm, p.population, fit.slope, fit.r2, fit.n
                ),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..kmax, (ylo - pad)..(yhi + pad))
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("fan-out k")
            .y_desc("ln((1 - a) / a)")
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .draw_series(
                pts.iter()
                    .map(|&q| Circle::new(q, 3, BLUE.mix(0.6).filled())),
            )
            .map_err(|e| anyhow!("plot: {e}"))?;
        let line = vec![
            (0.0, fit.intercept),
            (kmax, fit.intercept + fit.slope * kmax),
        ];
        chart
            .draw_series(LineSeries::new(line, RED.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    write_atomic(path, svg.as_bytes()).context("plot")
}
