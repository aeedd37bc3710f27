//! Training steps of the `bb bench` MLPs, for profiling the step.
//!
//! Same set-up as the training rows of `bb bench` (fixed random batch, Adam, lr 1e-3, BB with
//! the balance policy at density 0.5, refresh every 25 steps after 25 warm-up steps). It runs
//! `WARMUP` untimed steps, then `STEPS` steps inside `timed_steps`, and prints the time per
//! step (wall and CPU time), a hash of the parameters' bits (equal hashes: bit-identical
//! results) and the share of subnormal numbers in the optimizer state. The steps run on a
//! worker of rayon's pool as in the `bb` program (`pool`, the default; see
//! `bb_tasks::threads`) or on the main thread (`main`).
//!
//! ```text
//! cargo build --release -p bb-tasks --example step_profile
//! target/release/examples/step_profile small|wide dense|sp_in|sp_out [STEPS] [WARMUP] [keep|flush] [pool|main]
//! # instructions of the timed steps only, one thread:
//! RAYON_NUM_THREADS=1 valgrind --tool=callgrind --toggle-collect='*timed_steps*' \
//!     target/release/examples/step_profile small dense 50 26
//! ```

use anyhow::{bail, Context, Result};
use bb_core::{Pruner, PrunerConfig, Topology};
use bb_tasks::model::{layer_name, Mlp};
use bb_tasks::optim::{Optimizer, OptimizerConfig};
use bb_tasks::trainer::train_step;
use dfdx::prelude::Cpu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Setup {
    widths: Vec<usize>,
    batch: usize,
    x: Vec<f32>,
    y: Vec<usize>,
}

fn pruner(widths: &[usize], actuator: &str) -> Result<Pruner> {
    let cfg = PrunerConfig::from_toml_str(&format!(
        "[schedule]\nwarmup_steps = 25\nrefresh_every = 25\n[policy]\nkind = \"balance\"\n\
         beta = 0.05\ntarget_density = 0.5\n[actuator]\nkind = \"{actuator}\"\n"
    ))?;
    let names: Vec<String> = (0..widths.len() - 1).map(layer_name).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    Ok(Pruner::new(cfg, Topology::chain(&refs, widths)?)?)
}

/// CPU time of the whole process (user + system, all threads), in seconds: less disturbed
/// than wall time by other programs on a shared machine. Linux only (0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // clock ticks of 1/100 s (USER_HZ on Linux)
    f.iter().sum::<f64>() / 100.0
}

fn run_steps(
    s: &Setup,
    model: &mut Mlp<Cpu>,
    opt: &mut Optimizer,
    mut p: Option<&mut Pruner>,
    steps: usize,
) -> Result<()> {
    for _ in 0..steps {
        train_step(model, opt, p.as_deref_mut(), &s.x, &s.y, s.batch, 1e-3)?;
    }
    Ok(())
}

/// The measured steps (callgrind: `--toggle-collect='*timed_steps*'`).
#[inline(never)]
fn timed_steps(
    s: &Setup,
    model: &mut Mlp<Cpu>,
    opt: &mut Optimizer,
    p: Option<&mut Pruner>,
    steps: usize,
) -> Result<()> {
    run_steps(s, model, opt, p, steps)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let widths = match args.first().map(String::as_str) {
        Some("small") | None => vec![784, 300, 100, 10],
        Some("wide") => vec![784, 2048, 2048, 10],
        Some(o) => bail!("model {o:?}: use small or wide"),
    };
    let arm = args.get(1).map_or("dense", String::as_str);
    let number = |i: usize, default: usize, what: &str| -> Result<usize> {
        args.get(i)
            .map_or(Ok(default), |s| s.parse())
            .with_context(|| format!("{what}: not a number"))
    };
    let steps = number(2, 50, "STEPS")?;
    let warmup = number(3, 30, "WARMUP")?;
    let flush = match args.get(4).map(String::as_str) {
        None | Some("keep") => false,
        Some("flush") => true,
        Some(o) => bail!("{o:?}: the fifth argument is keep or flush (subnormals)"),
    };
    let on_pool = match args.get(5).map(String::as_str) {
        None | Some("pool") => true,
        Some("main") => false,
        Some(o) => bail!("{o:?}: the sixth argument is pool or main (where the steps run)"),
    };
    let arm = arm.to_string();
    let work = move || run(widths, &arm, steps, warmup, flush);
    if on_pool {
        bb_tasks::threads::on_pool(work)
    } else {
        work()
    }
}

fn run(widths: Vec<usize>, arm: &str, steps: usize, warmup: usize, flush: bool) -> Result<()> {
    let batch = 128;
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let classes = widths[widths.len() - 1];
    let s = Setup {
        x: (0..batch * widths[0])
            .map(|_| r.gen_range(0.0..1.0))
            .collect(),
        y: (0..batch).map(|i| (i * 7) % classes).collect(),
        widths,
        batch,
    };
    let dev = Cpu::default();
    let mut model = Mlp::new(&dev, &s.widths, 0)?;
    let sizes: Vec<usize> = s
        .widths
        .windows(2)
        .flat_map(|w| [w[0] * w[1], w[1]])
        .collect();
    let mut opt = Optimizer::new(OptimizerConfig::default(), &sizes);
    let mut p = match arm {
        "dense" => None,
        "sp_in" | "sp_out" => Some(pruner(&s.widths, arm)?),
        o => bail!("arm {o:?}: use dense, sp_in or sp_out"),
    };
    run_steps(&s, &mut model, &mut opt, p.as_mut(), warmup)?;
    // the `bb` program flushes subnormals; here it is a choice, made after the warm-up
    if flush {
        bb_tasks::fpenv::flush_subnormals_everywhere();
    }
    let (t, c) = (Instant::now(), cpu_seconds());
    timed_steps(&s, &mut model, &mut opt, p.as_mut(), steps)?;
    let dt = t.elapsed().as_secs_f64() / steps.max(1) as f64;
    let dc = (cpu_seconds() - c) / steps.max(1) as f64;
    // FNV-1a over the bits of every weight and bias: equal hashes, equal models
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for l in 0..model.num_layers() {
        for v in model.weights(l).iter().chain(model.bias(l)) {
            hash = (hash ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    let (mut sub, mut all) = (0usize, 0usize);
    for (_, buf) in opt.state_buffers() {
        sub += buf.iter().filter(|v| v.is_subnormal()).count();
        all += buf.len();
    }
    println!(
        "{arm} {:?}: {:.3} ms/step ({:.1} steps/s), CPU {:.3} ms/step, parameter hash \
         {hash:016x}, {:.1} % of the optimizer state subnormal",
        s.widths,
        dt * 1e3,
        1.0 / dt,
        dc * 1e3,
        100.0 * sub as f64 / all.max(1) as f64
    );
    Ok(())
}
