//! Adding Budgeted Broadcast to an ordinary dfdx training loop, in three calls.
//!
//! The model is a plain const-shaped dfdx MLP trained with dfdx's own Adam; nothing of
//! bb-tasks' trainer is used (only its XOR data generator). BB needs:
//!
//! 1. `pruner.observe(population, activations)` after the forward pass, with the hidden
//!    activations that pass already computed;
//! 2. `pruner.step(weights, None)` after the optimizer update: it counts the step and, on its
//!    schedule, re-selects the connections, editing the weights in place;
//! 3. `pruner.apply_mask(layer, weights)` after every update, so pruned edges stay exactly zero.
//!
//! (Optionally, `pruner.mask_gradients(layer, grads)` before the update keeps Adam's moments
//! of dead edges at rest.)
//!
//! Run with `cargo run --release -p bb-tasks --example dfdx_loop`.

use bb_core::{Activations, Pruner, PrunerConfig, Topology};
use dfdx::optim::{Adam, AdamConfig};
use dfdx::prelude::*;

const IN: usize = 16;
const H: usize = 32;
type Model = (Linear<IN, H>, ReLU, Linear<H, H>, ReLU, Linear<H, 2>);

/// Copies a layer's weights out, lets `f` edit them, and writes them back in place (the
/// tensor keeps its id, so the optimizer state stays attached).
fn edit<const O: usize, const I: usize>(
    w: &mut Tensor<Rank2<O, I>, f32, Cpu>,
    f: impl FnOnce(&mut Vec<f32>),
) {
    let mut v = w.as_vec();
    f(&mut v);
    w.copy_from(&v);
}

fn main() -> anyhow::Result<()> {
    let dev = Cpu::seed_from_u64(0);
    let mut model = dev.build_module::<Model, f32>();
    let mut grads = model.alloc_grads();
    let mut opt = Adam::new(
        &model,
        AdamConfig {
            lr: 3e-3,
            ..Default::default()
        },
    );
    let data = bb_tasks::data::xor(4096, 1024, IN - 2, 0.05, 0.95, 0).train;

    let topo = Topology::chain(&["fc1", "fc2", "fc3"], &[IN, H, H, 2])?;
    let cfg: PrunerConfig = toml::from_str(
        r#"
        [schedule]
        warmup_steps = 200
        refresh_every = 25
        [policy]
        kind = "balance"
        beta = 0.2
        target_density = 0.5
        [actuator]
        kind = "sp_out"
        "#,
    )?;
    let mut pruner = Pruner::new(cfg, topo)?;

    const B: usize = 64;
    for step in 0..1200 {
        let start = step * B % (data.len() - B);
        let x: Tensor<(usize, Const<IN>), f32, Cpu> =
            dev.tensor_from_vec(data.x[start * IN..(start + B) * IN].to_vec(), (B, Const));
        let mut onehot = vec![0f32; B * 2];
        for (r, &y) in data.y[start..start + B].iter().enumerate() {
            onehot[r * 2 + y] = 1.0;
        }
        let y: Tensor<(usize, Const<2>), f32, Cpu> = dev.tensor_from_vec(onehot, (B, Const));

        // forward layer by layer, reading the hidden activations on the way (the tape goes on)
        let h1 = model.1.forward(model.0.forward(x.traced(grads)));
        let a1 = h1.retaped::<NoneTape>().as_vec();
        let h2 = model.3.forward(model.2.forward(h1));
        let a2 = h2.retaped::<NoneTape>().as_vec();
        let logits = model.4.forward(h2);
        // (1) BB observes the activations of this forward pass
        pruner.observe("fc1", Activations::batch_major(&a1, B, H))?;
        pruner.observe("fc2", Activations::batch_major(&a2, B, H))?;

        let loss = cross_entropy_with_logits_loss(logits, y);
        let loss_value = loss.array();
        grads = loss.backward();
        opt.update(&mut model, &grads)?;
        model.zero_grads(&mut grads);

        // (2) BB counts the step and refreshes the masks on schedule, in place
        let (mut w1, mut w2, mut w3) = (
            model.0.weight.as_vec(),
            model.2.weight.as_vec(),
            model.4.weight.as_vec(),
        );
        let report = pruner.step(&mut [&mut w1[..], &mut w2[..], &mut w3[..]], None)?;
        // (3) dead edges stay exactly zero after every update
        edit(&mut model.0.weight, |w| {
            w.copy_from_slice(&w1);
            pruner.apply_mask(0, w).expect("layer 0")
        });
        edit(&mut model.2.weight, |w| {
            w.copy_from_slice(&w2);
            pruner.apply_mask(1, w).expect("layer 1")
        });
        edit(&mut model.4.weight, |w| {
            w.copy_from_slice(&w3);
            pruner.apply_mask(2, w).expect("layer 2")
        });

        if let Some(r) = report.filter(|r| r.step % 250 == 0) {
            println!(
                "step {:4}  loss {loss_value:.4}  density of the pruned layers {:.3}",
                r.step, r.density
            );
        }
    }
    let fan_out = pruner.fan_out("fc1").unwrap_or_default();
    let a = pruner.activity("fc1").unwrap_or_default();
    println!("fc1 units (on-rate -> fan-out into fc2), busiest and quietest:");
    let mut idx: Vec<usize> = (0..H).collect();
    idx.sort_by(|&i, &j| a[j].total_cmp(&a[i]));
    for &j in idx.iter().take(3).chain(idx.iter().rev().take(3)) {
        println!("  a = {:.3}  k = {}", a[j], fan_out[j]);
    }
    Ok(())
}
