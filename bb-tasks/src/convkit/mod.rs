//! Convolutional building blocks on stable dfdx 0.13, CPU.
//!
//! dfdx's own convolution and pooling need its `nightly` feature; this kit builds them from
//! one differentiable *row gather* registered through dfdx's public tape API.
//!
//! **Layout.** Every activation is a 2-D tensor `(C·H·W, B)`: channel-major, one row per
//! (channel, position), the batch last and contiguous. A convolution gathers its im2col
//! matrix `(C·kh·kw·Ho·Wo, B)` with precomputed runs of rows ([`RowPlan`]), views it as
//! `(C·kh·kw, Ho·Wo·B)` and multiplies the weights `[O, C, kh, kw]` viewed as `(O, C·kh·kw)`;
//! the product `(O, Ho·Wo·B)` *is* the next layer's `(O·Ho·Wo, B)`, so no transpose is
//! needed between layers. Volumes are the same with a depth: `(C·D·H·W, B)`, windows
//! `[kd, kh, kw]`, weights `[O, C, kd, kh, kw]`; the plans and ops are rank-agnostic (a 2-D
//! grid is a 3-D one of depth 1), and the layers' `new_3d` constructors build the 3-D
//! geometry. The same layout is the engine's unit-major activation
//! `[units, positions, batch]`, so a population's on-rates are read straight from it.
//!
//! **Parts.** [`plan`] (window geometry and row tables), [`ops`] (the custom differentiable
//! ops: row gather, max-pool, fused batch-/group-norm, row concatenation, Siamese batch
//! folding, weighted BCE), [`layers`] (convolution, norms, pooling, upsampling, global
//! average pooling, a contiguous linear head), [`params`] (the parameter store with host
//! master copies, saved in checkpoints) and [`engine`] (the training step that drives the
//! pruner on conv layers).
//!
//! **Trap.** dfdx 0.13's softmax, log-softmax, logsumexp and cross-entropy compute wrong
//! gradients on non-contiguous inputs (a permuted view). [`layers::Linear`] produces fresh,
//! batch-major logits, and the losses here use [`crate::model::contiguous_cross_entropy`].

pub mod engine;
pub mod layers;
pub mod ops;
pub mod params;
pub mod plan;

pub use layers::{
    global_avg_pool, BatchNorm, Conv, Conv2d, Ctx, GroupNorm, Linear, MaxPool, Tap, Upsample,
};
pub use params::{ParamId, ParamKind, ParamStore};
pub use plan::{Geom, PoolPlan, RowPlan, Run};

use anyhow::{ensure, Result};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;

/// A channel-major activation `(C·H·W, B)` on the CPU with tape `T`.
pub type Act<T> = Tensor<(usize, usize), f32, Cpu, T>;

/// A flat parameter tensor.
pub type Param = Tensor<(usize,), f32, Cpu>;

/// Converts a batch of samples stored one after the other (`[B, F]`, e.g. images `[B, C, H,
/// W]`) to the channel-major layout `[F, B]`.
pub fn to_channel_major(x: &[f32], batch: usize, features: usize) -> Result<Vec<f32>> {
    ensure!(
        batch > 0 && x.len() == batch * features,
        "input has {} values, expected batch {batch} x {features} features",
        x.len()
    );
    let mut out = vec![0f32; x.len()];
    for (b, sample) in x.chunks_exact(features).enumerate() {
        for (f, &v) in sample.iter().enumerate() {
            out[f * batch + b] = v;
        }
    }
    Ok(out)
}

/// Converts `[F, B]` back to `[B, F]`.
pub fn to_batch_major(x: &[f32], features: usize, batch: usize) -> Result<Vec<f32>> {
    to_channel_major(x, features, batch)
}

/// The 0/1 labels of items `idx` (each `per_item` values in `labels`, item after item) as a
/// channel-major `[per_item, idx.len()]` target.
pub fn channel_major_targets(labels: &[u8], per_item: usize, idx: &[usize]) -> Vec<f32> {
    let b = idx.len();
    let mut target = vec![0f32; per_item * b];
    for (i, &k) in idx.iter().enumerate() {
        for (j, &l) in labels[k * per_item..(k + 1) * per_item].iter().enumerate() {
            target[j * b + i] = l as f32;
        }
    }
    target
}

/// The logistic sigmoid of channel-major logits `z` (`[F, B]`), written batch-major into the
/// first `B * F` values of `out` (`out[b * F + f]`).
pub fn sigmoid_batch_major(
    z: &[f32],
    features: usize,
    batch: usize,
    out: &mut [f32],
) -> Result<()> {
    ensure!(
        batch > 0 && z.len() == features * batch && out.len() >= z.len(),
        "logits have {} values, expected {features} x batch {batch}, into room for {}",
        z.len(),
        out.len()
    );
    for (f, row) in z.chunks_exact(batch).enumerate() {
        for (b, &v) in row.iter().enumerate() {
            out[b * features + f] = 1.0 / (1.0 + (-v).exp());
        }
    }
    Ok(())
}

/// A channel-major input tensor from samples stored one after the other (`[B, F]`).
pub fn input(dev: &Cpu, x: &[f32], batch: usize, features: usize) -> Result<Act<NoneTape>> {
    Ok(dev.tensor_from_vec(to_channel_major(x, batch, features)?, (features, batch)))
}
