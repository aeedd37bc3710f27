//! `bb speech build`: synthesizes the corpus of a speech experiment into the data folder.

use super::synth::{self, Source};
use super::SpeechConfig;
use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;

/// `bb speech ...`.
#[derive(Debug, Args)]
pub struct SpeechArgs {
    #[command(subcommand)]
    cmd: SpeechCmd,
}

#[derive(Debug, Subcommand)]
enum SpeechCmd {
    /// Synthesize the corpus of a speech experiment (a preset or a TOML file) with espeak-ng
    /// and flite into `<data dir>/speech/<fingerprint>/`; resumes an interrupted build.
    Build(BuildArgs),
}

/// `bb speech build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Preset name or experiment TOML (its `[data]` table describes the corpus).
    #[arg(default_value = "speech")]
    experiment: String,
    /// Data folder (default: the experiment's `data_dir`, `$BB_DATA_DIR` or `data/`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Parallel synthesizer processes (default: the number of cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `bb speech ...`.
pub fn run(args: &SpeechArgs) -> Result<()> {
    match &args.cmd {
        SpeechCmd::Build(b) => build(b),
    }
}

fn build(args: &BuildArgs) -> Result<()> {
    let text = crate::cli_conv::conv_config_text(&args.experiment)?
        .ok_or_else(|| anyhow!("{} is not a speech preset or config file", args.experiment))?;
    let mut cfg = SpeechConfig::from_toml(&text)?;
    if args.data_dir.is_some() {
        cfg.data_dir.clone_from(&args.data_dir);
    }
    cfg.validate()?;
    if cfg.data.source == Source::Tones {
        println!("the tones source is generated in memory; nothing to build");
        return Ok(());
    }
    let dir = cfg.corpus_dir();
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if args.quiet {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:32} {pos}/{len} clips {per_sec} ETA {eta}",
        )
        .map_err(|e| anyhow!("progress template: {e}"))?,
    );
    pb.set_prefix("speech");
    let rep = synth::build(&cfg.data, &dir, jobs, Some(&pb))?;
    pb.finish_and_clear();
    println!(
        "speech corpus: {} clips in {} ({} synthesized now, {:.1} s with {jobs} jobs)",
        rep.clips,
        rep.dir.display(),
        rep.made,
        rep.secs
    );
    Ok(())
}
