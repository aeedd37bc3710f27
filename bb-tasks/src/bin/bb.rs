//! The `bb` program: Budgeted Broadcast from the command line.

use clap::{Parser, Subcommand};

// glibc malloc's page-fault churn on the per-step tensor buffers halves training speed.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "bb",
    version,
    about = "Budgeted Broadcast: activity-dependent pruning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One BB refresh on exported tensors: weights + activities -> mask.
    Mask(bb_tasks::cli_mask::MaskArgs),
    /// Benchmark report: refresh, observation, sparse inference and training overhead, as ratios.
    Bench(bb_tasks::cli_bench::BenchArgs),
    /// Write the pruned model of a finished run as a compact sparse file (CSR per layer).
    Export(bb_tasks::cli_export::ExportArgs),
    /// Train an experiment (a preset or a TOML file) into a run folder with a report.
    Run(bb_tasks::cli_run::RunArgs),
    /// List the built-in experiments.
    Presets,
    /// Run the built-in experiments (xor, dnf, digits) and write their reports (the default).
    Tour(bb_tasks::cli_run::TourArgs),
    /// Run a matched-density sweep (method x density x seed x data set), or one shard of it.
    Sweep(bb_tasks::cli_sweep::SweepArgs),
    /// Gather the finished runs of a sweep folder into its summary.
    Merge(bb_tasks::cli_sweep::MergeArgs),
    /// The speech stand-in's corpus: `bb speech build [PRESET|CONFIG]`.
    Speech(bb_tasks::speech::cli::SpeechArgs),
    /// The selectivity-audience law: solve, fit, simulate, linear response, DNF scaling.
    Theory(bb_tasks::cli_theory::TheoryArgs),
}

fn main() {
    // Subnormal numbers flushed to zero on every thread (see `bb_tasks::fpenv` for why).
    bb_tasks::fpenv::flush_subnormals_everywhere();
    let cli = Cli::parse();
    // On a worker of the pool, so the parallel calls of the work need no hand-over (see
    // `bb_tasks::threads`).
    let result = bb_tasks::threads::on_pool(move || match cli.cmd {
        Some(Cmd::Mask(args)) => bb_tasks::cli_mask::run(&args),
        Some(Cmd::Bench(args)) => bb_tasks::cli_bench::run(&args),
        Some(Cmd::Export(args)) => bb_tasks::cli_export::run(&args),
        Some(Cmd::Run(args)) if bb_tasks::cli_conv::handles(&args) => {
            bb_tasks::cli_conv::run(&args)
        }
        Some(Cmd::Run(args)) => bb_tasks::cli_run::run(&args),
        Some(Cmd::Presets) => {
            bb_tasks::cli_run::presets().and_then(|()| bb_tasks::cli_conv::presets())
        }
        Some(Cmd::Tour(args)) => bb_tasks::cli_run::tour(&args),
        Some(Cmd::Sweep(args)) if bb_tasks::cli_conv::handles_sweep(&args) => {
            bb_tasks::cli_conv::sweep(&args)
        }
        Some(Cmd::Sweep(args)) => bb_tasks::cli_sweep::sweep(&args),
        Some(Cmd::Merge(args)) => bb_tasks::cli_sweep::merge(&args),
        Some(Cmd::Theory(args)) => bb_tasks::cli_theory::run(&args),
        Some(Cmd::Speech(args)) => bb_tasks::speech::cli::run(&args),
        None => bb_tasks::cli_run::tour(&Default::default()),
    });
    if let Err(e) = result {
        eprintln!("bb: error: {e:#}");
        std::process::exit(1);
    }
}
