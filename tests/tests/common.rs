//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code, unreachable_pub)]

use bb_core::{BitMask, EdgeShape, Pruner, PrunerConfig, Topology};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Indices (ascending) of the k largest values, ties toward the lower index, by full sort.
pub fn naive_top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut top: Vec<usize> = idx.into_iter().take(k).collect();
    top.sort_unstable();
    top
}

/// Random weights with deliberate ties (values drawn from a small set when `ties`).
pub fn random_weights(rng: &mut ChaCha8Rng, n: usize, ties: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if ties {
                rng.gen_range(-3i32..=3) as f32 * 0.5
            } else {
                rng.gen_range(-1.0f32..1.0)
            }
        })
        .collect()
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn row(mask: &BitMask, r: usize) -> Vec<usize> {
    (0..mask.cols()).filter(|&c| mask.get(r, c)).collect()
}

pub fn col(mask: &BitMask, c: usize) -> Vec<usize> {
    (0..mask.rows()).filter(|&r| mask.get(r, c)).collect()
}

/// A one-layer pruner over `shape` (the layer is forced to be pruned).
pub fn single_layer(policy_toml: &str, actuator_toml: &str, shape: &EdgeShape) -> Pruner {
    let topo = Topology::new()
        .population("in", shape.inp)
        .population("out", shape.out)
        .conv_layer("layer", "in", "out", &shape.kernel);
    let text = format!(
        "[policy]\n{policy_toml}\n[actuator]\n{actuator_toml}\n[layers.layer]\nprune = true\n"
    );
    let cfg = PrunerConfig::from_toml_str(&text).expect("test config parses");
    Pruner::new(cfg, topo).expect("test pruner builds")
}

/// Feeds `population` one batch whose on-fractions are `rates` (rounded to 1/`batch`).
pub fn observe_rates(p: &mut Pruner, population: &str, rates: &[f64], batch: usize) {
    let units = rates.len();
    let mut acts = vec![-1.0f32; batch * units];
    for (j, &a) in rates.iter().enumerate() {
        let on = (a * batch as f64).round() as usize;
        for b in 0..on {
            acts[b * units + j] = 1.0;
        }
    }
    p.observe(
        population,
        bb_core::Activations::batch_major(&acts, batch, units),
    )
    .unwrap();
}

/// `[batch, units]` activations with on-fraction `rates[j]` for unit j, exactly.
pub fn tracker_cfg_fast() -> &'static str {
    "[tracker]\nkind = \"ema_on_rate\"\ndecay = 0.000000001\n"
}
