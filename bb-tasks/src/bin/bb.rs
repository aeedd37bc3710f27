//! The `bb` program: Budgeted Broadcast from the command line.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bb", version, about = "Budgeted Broadcast: activity-dependent pruning")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One BB refresh on exported tensors: weights + activities -> mask.
    Mask(bb_tasks::cli_mask::MaskArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Mask(args)) => bb_tasks::cli_mask::run(&args),
        None => {
            eprintln!("bb: no command given; try `bb --help`");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("bb: error: {e:#}");
        std::process::exit(1);
    }
}
