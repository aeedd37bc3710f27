//! The engine on conv layers: one training step that feeds the pruner and keeps the masks.
//!
//! The engine sees a convolution `[out, in, kh, kw]` as an `[out, in]` edge matrix, each edge
//! scored by the kernel-summed magnitude and masked over its whole kernel (METHOD.md §1).
//! A population's on-rate is the fraction of (sample, position) pairs where a channel is on:
//! the taps are channel-major `(C·S, B)`, which is the engine's unit-major layout. SP-in
//! keeps the strongest input-channel slabs of a conv's output channel; SP-out keeps the
//! strongest output channels that read an input channel (the consuming conv's input-channel
//! slabs).
//!
//! One step, in order: backward (by the caller) -> [`Ctx::apply_norm_updates`] ->
//! `pruner.observe` (the taps of that same forward pass) -> gradients from the store ->
//! `pruner.mask_gradients` -> optimizer update of the host copies -> `pruner.step` (refresh on
//! schedule, edits weights in place) -> `pruner.apply_mask` -> SP-in factors -> device sync.

use super::{Ctx, ParamId, ParamStore};
use crate::optim::{Optimizer, OptimizerConfig};
use anyhow::{anyhow, ensure, Result};
use bb_core::{Activations, Pruner, RefreshReport};
use dfdx::prelude::Gradients;
use dfdx::tensor::Cpu;

/// A fresh optimizer for the store's trainable entries.
pub fn optimizer(store: &ParamStore, cfg: OptimizerConfig) -> Optimizer {
    let sizes: Vec<usize> = store
        .trainable()
        .iter()
        .map(|&id| store.host(id).len())
        .collect();
    Optimizer::new(cfg, &sizes)
}

/// Checks that `layers` (store weights in the order of the pruner's topology layers) match
/// the topology's edge shapes, then puts the pruner's masks and SP-in factors on the
/// weights (after a resume the masks are already in the weights; this is then a no-op).
pub fn bind(pruner: &Pruner, store: &mut ParamStore, layers: &[ParamId]) -> Result<()> {
    let topo = pruner.topology();
    ensure!(
        layers.len() == topo.layers.len(),
        "the model binds {} weights to the pruner's {} layers",
        layers.len(),
        topo.layers.len()
    );
    for (l, &id) in layers.iter().enumerate() {
        let spec = &topo.layers[l];
        let shape = topo.shape(l);
        let dims = store.shape(id);
        let want: Vec<usize> = [shape.out, shape.inp]
            .into_iter()
            .chain(shape.kernel.iter().copied())
            .collect();
        ensure!(
            dims == want.as_slice(),
            "layer {}: the model's weight {} is {dims:?}, the topology says {want:?}",
            spec.name,
            store.name(id)
        );
        pruner
            .apply_mask(l, store.host_mut(id))
            .map_err(|e| anyhow!("layer {}: {e}", spec.name))?;
        store.set_scale(id, pruner.scale(l))?;
        store.sync(id);
    }
    Ok(())
}

/// What one update did.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// The gradients the optimizer applied (dead edges zeroed), per trainable entry.
    pub applied: Vec<Vec<f32>>,
    /// The refresh that ran after this step, if any.
    pub refresh: Option<RefreshReport>,
}

/// Everything after the backward pass of one training step (see the module docs). `layers`
/// are the store weights of the pruner's topology layers, in order.
pub fn update(
    store: &mut ParamStore,
    opt: &mut Optimizer,
    mut pruner: Option<&mut Pruner>,
    layers: &[ParamId],
    grads: &mut Gradients<f32, Cpu>,
    ctx: &mut Ctx,
    lr: f32,
) -> Result<UpdateReport> {
    ctx.apply_norm_updates(store)?;
    let trainable = store.trainable();
    let mut g = store.gradients(grads)?;
    if let Some((i, _)) = g
        .iter()
        .enumerate()
        .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
    {
        return Err(anyhow!(
            "non-finite gradient in {}",
            store.name(trainable[i])
        ));
    }
    let pos: Vec<usize> = layers
        .iter()
        .map(|id| {
            trainable.iter().position(|t| t == id).ok_or_else(|| {
                anyhow!(
                    "{} is bound to the pruner but not trainable",
                    store.name(*id)
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut dense = None;
    if let Some(p) = pruner.as_deref_mut() {
        for t in &ctx.taps {
            if p.topology().pop_index(&t.population).is_some() {
                p.observe(
                    &t.population,
                    Activations::unit_major(&t.data, t.units, t.positions, t.batch),
                )
                .map_err(|e| anyhow!("observe {}: {e}", t.population))?;
            }
        }
        if p.needs_gradients() {
            dense = Some(pos.iter().map(|&i| g[i].clone()).collect::<Vec<_>>());
        }
        for (l, &i) in pos.iter().enumerate() {
            p.mask_gradients(l, &mut g[i]).map_err(|e| anyhow!("{e}"))?;
        }
    }
    {
        let mut params = store.hosts_mut(&trainable)?;
        let refs: Vec<&[f32]> = g.iter().map(Vec::as_slice).collect();
        opt.update(&mut params, &refs, lr);
    }
    let mut refresh = None;
    if let Some(p) = pruner {
        {
            let mut ws = store.hosts_mut(layers)?;
            let gs: Option<Vec<&[f32]>> = dense
                .as_ref()
                .map(|d| d.iter().map(Vec::as_slice).collect());
            refresh = p.step(&mut ws, gs.as_deref()).map_err(|e| anyhow!("{e}"))?;
            for (l, w) in ws.iter_mut().enumerate() {
                p.apply_mask(l, w).map_err(|e| anyhow!("{e}"))?;
            }
        }
        for (l, &id) in layers.iter().enumerate() {
            store.set_scale(id, p.scale(l))?;
        }
    }
    store.sync_all();
    Ok(UpdateReport {
        applied: g,
        refresh,
    })
}
