//! The optimizer's masked update against its unmasked one on the same layer, for profiling
//! the masked pass that BB adds to every training step.
//!
//! ```text
//! cargo build --release -p bb-tasks --example optim_profile
//! RAYON_NUM_THREADS=2 target/release/examples/optim_profile [ROWS] [COLS] [DENSITY] [STEPS]
//! ```
//!
//! Adam with the default settings; the two updates alternate step by step (each on its own
//! copy of the weights and state, with the same gradient), the first 20 steps untimed, and the
//! mean time of each is printed.

use anyhow::{Context, Result};
use bb_actuators::BitMask;
use bb_tasks::optim::{Optimizer, OptimizerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str, what: &str| -> Result<f64> {
        args.get(i)
            .map_or(default, String::as_str)
            .parse()
            .with_context(|| format!("{what}: not a number"))
    };
    let (rows, cols) = (
        arg(0, "2048", "ROWS")? as usize,
        arg(1, "2048", "COLS")? as usize,
    );
    let density = arg(2, "0.5", "DENSITY")?;
    let steps = arg(3, "100", "STEPS")? as usize;
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let mut p: Vec<f32> = (0..rows * cols).map(|_| r.gen_range(-0.05..0.05)).collect();
    let grad: Vec<f32> = (0..rows * cols).map(|_| r.gen_range(-0.01..0.01)).collect();
    let mut mask = BitMask::full(rows, cols);
    for i in 0..rows {
        for j in 0..cols {
            mask.set(i, j, r.gen_bool(density));
        }
    }
    let mut plain = Optimizer::new(OptimizerConfig::default(), &[rows * cols]);
    let mut masked = Optimizer::new(OptimizerConfig::default(), &[rows * cols]);
    let mut q = p.clone();
    let (mut tp, mut tm) = (0f64, 0f64);
    for s in 0..steps + 20 {
        let t = Instant::now();
        plain.update(&mut [&mut p[..]], &[&grad[..]], 1e-3);
        let dp = t.elapsed().as_secs_f64();
        let t = Instant::now();
        masked.update_masked(&mut [&mut q[..]], &[&grad[..]], 1e-3, &[Some(&mask)]);
        let dm = t.elapsed().as_secs_f64();
        if s >= 20 {
            (tp, tm) = (tp + dp, tm + dm);
        }
    }
    let n = steps.max(1) as f64;
    println!(
        "{rows}x{cols}, density {density}: unmasked update {:.3} ms, masked update {:.3} ms \
         ({:.2} x)",
        tp * 1e3 / n,
        tm * 1e3 / n,
        tm / tp
    );
    Ok(())
}
