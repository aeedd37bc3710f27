//! `bb mask`: one BB refresh on tensors exported from any framework.

use crate::npy;
use anyhow::{bail, Context, Result};
use bb_core::{BitMask, EdgeShape, LayerOverride, Pruner, PrunerConfig, Side, Topology};
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `bb mask`.
#[derive(Debug, Args)]
pub struct MaskArgs {
    /// Weights, f32 or f64 `.npy`, `[out, in]` or `[out, in, k...]` (convolutions).
    #[arg(long)]
    pub weights: PathBuf,
    /// 1-D on-rates of the actuated units: `out` of them for `sp_in`, `in` for `sp_out`.
    #[arg(long)]
    pub activity: PathBuf,
    /// TOML with a `[policy]` and an `[actuator]` table (the pruning section's schema).
    #[arg(long)]
    pub config: PathBuf,
    /// Where to write the new mask (u8 0/1, `[out, in]`).
    #[arg(long)]
    pub out: PathBuf,
    /// The current mask (`[out, in]`, 0/1); default all ones.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Where to write the per-unit rescale factors (f32, length `out`).
    #[arg(long)]
    pub scale_out: Option<PathBuf>,
}

/// The result of one refresh on exported tensors.
#[derive(Debug)]
pub struct MaskResult {
    /// The new mask.
    pub mask: BitMask,
    /// Rescale factor per output unit (1 where the actuator does not rescale).
    pub scale: Vec<f32>,
    /// Live edges / edges.
    pub density: f64,
}

/// Computes the new mask of one layer (no files written).
pub fn compute(
    weights: &Path,
    activity: &Path,
    config: &Path,
    mask: Option<&Path>,
) -> Result<MaskResult> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read", config.display()))?;
    let mut cfg =
        PrunerConfig::from_toml_str(&text).with_context(|| format!("{}", config.display()))?;
    let w = npy::read_f32(weights)?;
    let shape =
        EdgeShape::from_weight_dims(w.shape()).with_context(|| format!("{}", weights.display()))?;
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        bail!("{}: non-finite weight at flat index {i}", weights.display());
    }
    let acts = npy::read_f64_1d(activity)?;
    let side = cfg.actuator.side();
    let (units, what) = match side {
        Side::Rows => (shape.out, "out (sp_in acts on output units)"),
        Side::Columns => (shape.inp, "in (sp_out acts on input units)"),
    };
    if acts.len() != units {
        bail!(
            "{}: {} activities, but the weights' {what} is {units}",
            activity.display(),
            acts.len()
        );
    }
    if cfg.layers.keys().any(|k| k != "layer") {
        bail!(
            "{}: [layers] may only name `layer` in bb mask",
            config.display()
        );
    }
    cfg.layers.insert(
        "layer".into(),
        LayerOverride {
            prune: Some(true),
            actuator: None,
        },
    );
    let topo = Topology::new()
        .population("in", shape.inp)
        .population("out", shape.out)
        .conv_layer("layer", "in", "out", &shape.kernel);
    let mut pruner = Pruner::new(cfg, topo).with_context(|| format!("{}", config.display()))?;
    let acted = if side == Side::Rows { "out" } else { "in" };
    pruner
        .set_activity(acted, &acts)
        .with_context(|| format!("{}", activity.display()))?;
    let mut wv: Vec<f32> = w.iter().copied().collect();
    if let Some(m) = mask {
        let m0 = npy::read_mask(m)?;
        if m0.shape() != [shape.out, shape.inp] {
            bail!(
                "{}: mask shape {:?}, expected [{}, {}]",
                m.display(),
                m0.shape(),
                shape.out,
                shape.inp
            );
        }
        let bits = BitMask::from_bytes(shape.out, shape.inp, m0.as_slice().context("mask layout")?)
            .context("mask size")?;
        pruner.set_mask(0, bits, &mut wv)?;
    }
    pruner.refresh(&mut [&mut wv[..]], None)?;
    let scale = pruner
        .scale(0)
        .map(<[f32]>::to_vec)
        .unwrap_or_else(|| vec![1.0; shape.out]);
    Ok(MaskResult {
        mask: pruner.mask(0).clone(),
        scale,
        density: pruner.density(),
    })
}

/// Runs `bb mask`: computes everything first, then writes the outputs (nothing is written
/// on error).
pub fn run(args: &MaskArgs) -> Result<()> {
    let r = compute(
        &args.weights,
        &args.activity,
        &args.config,
        args.mask.as_deref(),
    )?;
    let (rows, cols) = (r.mask.rows(), r.mask.cols());
    let m = npy::array(&[rows, cols], r.mask.to_bytes())?;
    let s = npy::array(&[rows], r.scale)?;
    npy::write_atomic(&args.out, &m)?;
    if let Some(p) = &args.scale_out {
        npy::write_atomic(p, &s)?;
    }
    eprintln!(
        "bb mask: [{rows}, {cols}] -> {} live edges (density {:.4}), written to {}",
        r.mask.count(),
        r.density,
        args.out.display()
    );
    Ok(())
}
