//! `bb theory`: the selectivity-audience law from the command line.
//!
//! - `bb theory solve --fan-out K.npy|K.json --budget T [--json]`: the entropy-under-budget
//!   optimum with its KKT residuals;
//! - `bb theory fit --fan-out K.npy --activity A.npy [--json]`: the balance fit;
//! - `bb theory simulate [--svg docs/theory-balance.svg] [--json]`: the BB dynamics on the
//!   engine, with the plot of `ln((1 - a)/a)` versus `k` and the fitted line;
//! - `bb theory response [--json]`: the linear response of SP-in versus SP-out;
//! - `bb theory scaling [--widths 2,4,8] [--json]`: DNF convergence steps versus width.
//!
//! A `.json` array file is a plain JSON array of numbers; a `.npy` file is a 1-D array of
//! floats or integers.

use anyhow::{anyhow, bail, Context, Result};
use bb_theory::{
    dnf_scaling, fit_balance, linear_response, simulate_dynamics, solve, traffic_peak, DnfConfig,
    DynamicsConfig, DynamicsReport, FitOptions, ResponseConfig,
};
use clap::{Args, Subcommand};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Arguments of `bb theory`.
#[derive(Debug, Args)]
pub struct TheoryArgs {
    /// What to compute.
    #[command(subcommand)]
    pub cmd: TheoryCmd,
}

/// The subcommands of `bb theory`.
#[derive(Debug, Subcommand)]
pub enum TheoryCmd {
    /// Maximize coding entropy under a traffic budget: beta, activities, entropy, KKT residuals.
    Solve(SolveArgs),
    /// Fit ln((1 - a)/a) = slope k + intercept to observed units.
    Fit(FitArgs),
    /// Simulate the BB dynamics on the engine and plot the balance line.
    Simulate(SimulateArgs),
    /// Measure the linear response of SP-in versus SP-out near balance.
    Response(ResponseArgs),
    /// Steps to a fixed accuracy on DNF tasks versus width, fitted against W ln W.
    Scaling(ScalingArgs),
}

/// Arguments of `bb theory solve`.
#[derive(Debug, Args)]
pub struct SolveArgs {
    /// Fan-outs `k_i > 0`: a 1-D `.npy` file or a `.json` array.
    #[arg(long)]
    pub fan_out: PathBuf,
    /// The traffic budget `T > 0`.
    #[arg(long)]
    pub budget: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bb theory fit`.
#[derive(Debug, Args)]
pub struct FitArgs {
    /// Fan-outs: a 1-D `.npy` file or a `.json` array.
    #[arg(long)]
    pub fan_out: PathBuf,
    /// Activities in [0, 1], same length: a 1-D `.npy` file or a `.json` array.
    #[arg(long)]
    pub activity: PathBuf,
    /// Activities are clamped to [eps, 1 - eps] before taking log-odds.
    #[arg(long, default_value_t = bb_theory::fit::DEFAULT_CLAMP_EPS)]
    pub eps: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bb theory simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Write the plot of ln((1 - a)/a) versus k with the fitted line here (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// The balance policy's beta.
    #[arg(long, default_value_t = DynamicsConfig::default().beta)]
    pub beta: f64,
    /// Number of refreshes.
    #[arg(long, default_value_t = DynamicsConfig::default().refreshes)]
    pub refreshes: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bb theory response`.
#[derive(Debug, Args)]
pub struct ResponseArgs {
    /// Gain of the readout's feedback onto the studied units (0: feedforward).
    #[arg(long, default_value_t = ResponseConfig::default().feedback_gain)]
    pub feedback_gain: f64,
    /// The balance multiplier.
    #[arg(long, default_value_t = ResponseConfig::default().beta)]
    pub beta: f64,
    /// Simulated steps per measurement.
    #[arg(long, default_value_t = ResponseConfig::default().steps)]
    pub steps: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bb theory scaling`.
#[derive(Debug, Args)]
pub struct ScalingArgs {
    /// Widths W (number of DNF terms), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = DnfConfig::default().widths)]
    pub widths: Vec<usize>,
    /// Runs per width.
    #[arg(long, default_value_t = DnfConfig::default().seeds)]
    pub seeds: usize,
    /// Accuracy that counts as converged.
    #[arg(long, default_value_t = DnfConfig::default().target_accuracy)]
    pub target_accuracy: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bb theory`.
pub fn run(args: &TheoryArgs) -> Result<()> {
    match &args.cmd {
        TheoryCmd::Solve(a) => run_solve(a),
        TheoryCmd::Fit(a) => run_fit(a),
        TheoryCmd::Simulate(a) => run_simulate(a),
        TheoryCmd::Response(a) => run_response(a),
        TheoryCmd::Scaling(a) => run_scaling(a),
    }
}

/// Reads a 1-D array of numbers from a `.json` array or a `.npy` file (floats or integers).
pub fn read_vector(path: &Path) -> Result<Vec<f64>> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let v: Vec<f64> = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON array of numbers", path.display()))?;
        return Ok(v);
    }
    match crate::npy::read_f64_1d(path) {
        Ok(v) => Ok(v),
        Err(float_err) => {
            use ndarray::Array1;
            use ndarray_npy::read_npy;
            if let Ok(a) = read_npy::<_, Array1<i64>>(path) {
                return Ok(a.iter().map(|&x| x as f64).collect());
            }
            if let Ok(a) = read_npy::<_, Array1<i32>>(path) {
                return Ok(a.iter().map(|&x| f64::from(x)).collect());
            }
            if let Ok(a) = read_npy::<_, Array1<u32>>(path) {
                return Ok(a.iter().map(|&x| f64::from(x)).collect());
            }
            Err(float_err)
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn run_solve(a: &SolveArgs) -> Result<()> {
    let k = read_vector(&a.fan_out)?;
    let sol = solve(&k, a.budget)?;
    if a.json {
        return print_json(&sol);
    }
    let total: f64 = k.iter().sum();
    println!("units           {}", k.len());
    println!(
        "budget T        {:.6e}  ({:.3e} of sum k / 2)",
        a.budget,
        a.budget / (0.5 * total)
    );
    println!(
        "beta            {:.12e}{}",
        sol.beta,
        if sol.slack { "  (slack budget)" } else { "" }
    );
    println!("spent           {:.12e}", sol.spent);
    println!(
        "entropy         {:.9} nats = {:.9} bits",
        sol.entropy, sol.entropy_bits
    );
    println!("iterations      {}", sol.iterations);
    println!(
        "KKT residuals   stationarity {:.2e}, primal {:.2e}, slackness {:.2e}, dual {:.2e}",
        sol.kkt.stationarity,
        sol.kkt.primal_feasibility,
        sol.kkt.complementary_slackness,
        sol.kkt.dual_feasibility
    );
    if sol.beta > 0.0 {
        let peak = traffic_peak(sol.beta)?;
        println!(
            "traffic peak    k* = {:.6} (beta k* = 1 + W(1/e) = {:.12}), t* = {:.6}",
            peak.k_star, peak.x_star, peak.t_star
        );
    }
    println!();
    println!("{:>8} {:>14} {:>14} {:>14}", "unit", "k", "a", "a k");
    let shown = k.len().min(20);
    for (i, (&ki, &ai)) in k.iter().zip(&sol.activity).take(shown).enumerate() {
        println!("{i:>8} {ki:>14.6} {ai:>14.6e} {:>14.6e}", ki * ai);
    }
    if k.len() > shown {
        println!("     ... {} more (use --json for all)", k.len() - shown);
    }
    Ok(())
}

fn run_fit(a: &FitArgs) -> Result<()> {
    let k = read_vector(&a.fan_out)?;
    let act = read_vector(&a.activity)?;
    let fit = fit_balance(&k, &act, FitOptions { eps: a.eps })?;
    if a.json {
        return print_json(&fit);
    }
    println!(
        "points          {} ({} activities clamped to [{}, 1 - {}])",
        fit.n, fit.clamped, fit.eps, fit.eps
    );
    println!("slope (beta)    {:.6} +- {:.6}", fit.slope, fit.slope_se);
    println!(
        "intercept       {:.6} +- {:.6}",
        fit.intercept, fit.intercept_se
    );
    println!("R^2             {:.6}", fit.r2);
    println!("residual sd     {:.6}", fit.residual_sd);
    Ok(())
}

fn run_simulate(a: &SimulateArgs) -> Result<()> {
    let cfg = DynamicsConfig {
        beta: a.beta,
        refreshes: a.refreshes,
        seed: a.seed,
        ..DynamicsConfig::default()
    };
    let report = simulate_dynamics(&cfg)?;
    if let Some(path) = &a.svg {
        plot_balance(&report, path)?;
    }
    if a.json {
        return print_json(&report);
    }
    println!(
        "{:>7} {:>6} {:>10} {:>10} {:>8} {:>10} {:>12} {:>8}",
        "refresh", "step", "beta hat", "intercept", "R^2", "distance", "entropy gap", "density"
    );
    for p in &report.trajectory {
        let (s, i, r) = p.fit.map_or((f64::NAN, f64::NAN, f64::NAN), |f| {
            (f.slope, f.intercept, f.r2)
        });
        println!(
            "{:>7} {:>6} {:>10.5} {:>10.4} {:>8.4} {:>10.4} {:>12.2e} {:>8.3}",
            p.refresh, p.step, s, i, r, p.log_odds_distance, p.entropy_gap, p.density
        );
    }
    for (name, f) in [("fc1", report.fit_fc1), ("fc2", report.fit_fc2)] {
        if let Some(f) = f {
            println!(
                "final {name}: beta hat {:.5} +- {:.5}, intercept {:.4} +- {:.4}, R^2 {:.4}",
                f.slope, f.slope_se, f.intercept, f.intercept_se, f.r2
            );
        }
    }
    println!(
        "units at k_min or the largest degree: {} of {}",
        report.clipped_units,
        report.units.len()
    );
    if let Some(path) = &a.svg {
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// Scatter of the final `ln((1 - a)/a)` versus `k`, one colour per population, with the fitted
/// line over all studied units and the rule's line `beta k`.
fn plot_balance(report: &DynamicsReport, path: &Path) -> Result<()> {
    let last = report
        .trajectory
        .last()
        .and_then(|p| p.fit)
        .ok_or_else(|| anyhow!("the simulation ended without a balance fit"))?;
    let beta = report.config.beta;
    let kmax = report.units.iter().map(|u| u.fan_out).max().unwrap_or(1) as f64 * 1.05;
    let (ylo, yhi) = report
        .units
        .iter()
        .fold((0.0f64, f64::NEG_INFINITY), |(l, h), u| {
            (l.min(u.log_odds), h.max(u.log_odds))
        });
    let pad = ((yhi - ylo) * 0.08).max(0.2);
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "BB dynamics after {} refreshes: beta hat {:.4} (rule {}), R² {:.4}",
                    report.config.refreshes, last.slope, beta, last.r2
                ),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..kmax, (ylo - pad)..(yhi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("fan-out k")
            .y_desc("ln((1 - a) / a)")
            .draw()
            .map_err(|e| err(&e))?;
        for (pop, color) in [("fc1", BLUE), ("fc2", GREEN)] {
            chart
                .draw_series(
                    report
                        .units
                        .iter()
                        .filter(|u| u.population == pop)
                        .map(|u| {
                            Circle::new(
                                (f64::from(u.fan_out), u.log_odds),
                                3,
                                color.mix(0.7).filled(),
                            )
                        }),
                )
                .map_err(|e| err(&e))?
                .label(format!("{pop} units"))
                .legend(move |(x, y)| Circle::new((x, y), 3, color.filled()));
        }
        chart
            .draw_series(LineSeries::new(
                vec![
                    (0.0, last.intercept),
                    (kmax, last.intercept + last.slope * kmax),
                ],
                RED.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(format!("fit: {:.4} k {:+.3}", last.slope, last.intercept))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, 0.0), (kmax, beta * kmax)],
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!("rule: {beta} k"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.5)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("{}", path.display()))
}

fn run_response(a: &ResponseArgs) -> Result<()> {
    let cfg = ResponseConfig {
        feedback_gain: a.feedback_gain,
        beta: a.beta,
        steps: a.steps,
        seed: a.seed,
        ..ResponseConfig::default()
    };
    let r = linear_response(&cfg)?;
    if a.json {
        return print_json(&r);
    }
    println!(
        "per edge cut, near balance (beta {}, feedback gain {}):",
        cfg.beta, cfg.feedback_gain
    );
    println!(
        "{:>8} {:>12} {:>10} {:>15} {:>15} {:>15}",
        "actuator", "mean |da|", "mean |dk|", "activity move", "audience move", "activity share"
    );
    for (name, s) in [("SP-in", r.sp_in), ("SP-out", r.sp_out)] {
        let share = s
            .activity_share
            .map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "{:>8} {:>12.3e} {:>10.3} {:>15.3e} {:>15.3e} {:>15}",
            name,
            s.mean_abs_d_activity,
            s.mean_abs_d_fan_out,
            s.mean_activity_move,
            s.mean_audience_move,
            share
        );
    }
    println!(
        "SP-in mainly moves activity: {}",
        r.sp_in_mainly_moves_activity
    );
    println!(
        "SP-out mainly moves audience: {}",
        r.sp_out_mainly_moves_audience
    );
    println!("claim holds: {}", r.claim_holds);
    Ok(())
}

fn run_scaling(a: &ScalingArgs) -> Result<()> {
    let cfg = DnfConfig {
        widths: a.widths.clone(),
        seeds: a.seeds,
        target_accuracy: a.target_accuracy,
        seed: a.seed,
        ..DnfConfig::default()
    };
    let r = dnf_scaling(&cfg)?;
    if a.json {
        return print_json(&r);
    }
    println!(
        "{:>6} {:>7} {:>7} {:>7} {:>14}  per seed",
        "W", "inputs", "hidden", "p", "median steps"
    );
    for w in &r.widths {
        let per: Vec<String> = w
            .steps
            .iter()
            .map(|s| s.map_or("-".into(), |s| s.to_string()))
            .collect();
        let med = w.median_steps.map_or("-".into(), |m| format!("{m:.0}"));
        println!(
            "{:>6} {:>7} {:>7} {:>7.3} {:>14}  {}",
            w.width,
            w.inputs,
            w.hidden,
            w.p,
            med,
            per.join(" ")
        );
    }
    for f in &r.fits {
        println!(
            "steps = {:>10.3} * {:<7} {:+10.1}   R^2 {:.4}",
            f.slope, f.model, f.intercept, f.r2
        );
    }
    if let Some(p) = r.power {
        println!(
            "power law: steps ~ W^{:.3} +- {:.3} (R^2 on log scale {:.4})",
            p.alpha, p.alpha_se, p.r2
        );
    }
    if let Some(best) = r.best_model {
        println!("best regressor by R^2: {best}");
    }
    if !r.all_converged {
        bail!("some runs did not reach the target accuracy within max_steps (see the table)");
    }
    Ok(())
}
