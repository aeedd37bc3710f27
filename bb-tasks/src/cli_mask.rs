//! `bb mask`: one BB refresh on exported tensors.

use clap::Args;
use std::path::PathBuf;

/// Arguments of `bb mask`.
#[derive(Debug, Args)]
pub struct MaskArgs {
    /// Weights, f32 or f64 `.npy`, `[out, in]` or `[out, in, k...]`.
    #[arg(long)]
    pub weights: PathBuf,
}

/// Runs `bb mask`.
pub fn run(_args: &MaskArgs) -> anyhow::Result<()> {
    anyhow::bail!("bb mask is not available yet")
}
