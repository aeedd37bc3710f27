//! A multilayer perceptron whose depth and widths are chosen at run time, on dfdx.
//!
//! Parameters live twice: as dfdx tensors on the device (used by the forward and backward
//! passes) and as host `Vec<f32>` master copies that the optimizer and the pruner edit in
//! place. After every host-side edit, [`Mlp::sync_to_device`] copies the host values into the
//! *same* device tensors with `copy_from`, so each parameter keeps its tensor id for the whole
//! run (gradients are looked up by id).
//!
//! Layout: layer `l` (named `fc{l+1}`) has weights `[out, in]` (row-major, dfdx layout: rows are
//! output units) and a bias `[out]`. Activations are batch-major `[batch, units]`. Every hidden
//! layer is followed by a ReLU; the last layer produces the logits. The per-unit activations of
//! the hidden layers are read from the same forward pass that computes the loss (no extra
//! forward pass), after the nonlinearity.
//!
//! Pruned edges are stored as exact zeros in the weights (the trainer re-applies the mask after
//! every update), so the forward pass computes `(W ⊙ M) x`. An optional per-unit factor
//! multiplies each layer's `W x` before the bias is added (the SP-in rescale).

use anyhow::{bail, ensure, Result};
use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The result of one training forward + backward pass.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Mean cross-entropy of the batch.
    pub loss: f32,
    /// Post-ReLU activations of each hidden layer, batch-major `[batch, units]`.
    pub hidden: Vec<Vec<f32>>,
    /// Dense gradient of each layer's weights, `[out, in]` row-major.
    pub grad_w: Vec<Vec<f32>>,
    /// Gradient of each layer's bias.
    pub grad_b: Vec<Vec<f32>>,
}

/// The result of an inference pass.
#[derive(Debug, Clone)]
pub struct EvalOutput {
    /// Logits, batch-major `[batch, classes]`.
    pub logits: Vec<f32>,
    /// Post-ReLU activations of each hidden layer, batch-major `[batch, units]`.
    pub hidden: Vec<Vec<f32>>,
}

/// Runtime-shaped MLP: `widths = [inputs, hidden..., classes]`.
#[derive(Debug)]
pub struct Mlp<D: Device<f32>> {
    dev: D,
    widths: Vec<usize>,
    w: Vec<Tensor<(usize, usize), f32, D>>,
    b: Vec<Tensor<(usize,), f32, D>>,
    scale: Vec<Option<Tensor<(usize,), f32, D>>>,
    host_w: Vec<Vec<f32>>,
    host_b: Vec<Vec<f32>>,
    host_scale: Vec<Option<Vec<f32>>>,
}

/// Name of layer `l` (0-based): `fc1`, `fc2`, ...
pub fn layer_name(l: usize) -> String {
    format!("fc{}", l + 1)
}

impl<D: Device<f32>> Mlp<D> {
    /// A new MLP with PyTorch's default initialisation: weights and biases uniform in
    /// `±1/sqrt(fan_in)`, drawn from a ChaCha8 stream seeded with `seed`.
    pub fn new(dev: &D, widths: &[usize], seed: u64) -> Result<Self> {
        ensure!(
            widths.len() >= 2,
            "model: need at least an input and an output width, got {widths:?}"
        );
        if let Some(i) = widths.iter().position(|&w| w == 0) {
            bail!("model: width {i} is 0 (widths {widths:?}); every layer needs at least one unit");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut host_w = Vec::new();
        let mut host_b = Vec::new();
        for l in 0..widths.len() - 1 {
            let (fan_in, fan_out) = (widths[l], widths[l + 1]);
            let bound = 1.0 / (fan_in as f32).sqrt();
            host_w.push(
                (0..fan_out * fan_in)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect(),
            );
            host_b.push((0..fan_out).map(|_| rng.gen_range(-bound..bound)).collect());
        }
        Self::from_host(dev, widths, host_w, host_b)
    }

    /// An MLP with the given host parameters (`w[l]` is `[out, in]` row-major).
    pub fn from_host(
        dev: &D,
        widths: &[usize],
        host_w: Vec<Vec<f32>>,
        host_b: Vec<Vec<f32>>,
    ) -> Result<Self> {
        let n = widths.len().saturating_sub(1);
        ensure!(
            host_w.len() == n && host_b.len() == n,
            "model: expected {n} layers of parameters, got {} weights and {} biases",
            host_w.len(),
            host_b.len()
        );
        let mut w = Vec::with_capacity(n);
        let mut b = Vec::with_capacity(n);
        for l in 0..n {
            let (i, o) = (widths[l], widths[l + 1]);
            ensure!(
                host_w[l].len() == o * i && host_b[l].len() == o,
                "model: layer {} expects weights [{o}, {i}] and bias [{o}]",
                layer_name(l)
            );
            w.push(dev.tensor_from_vec(host_w[l].clone(), (o, i)));
            b.push(dev.tensor_from_vec(host_b[l].clone(), (o,)));
        }
        Ok(Self {
            dev: dev.clone(),
            widths: widths.to_vec(),
            w,
            b,
            scale: vec![None; n],
            host_w,
            host_b,
            host_scale: vec![None; n],
        })
    }

    /// `[inputs, hidden..., classes]`.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// Number of linear layers.
    pub fn num_layers(&self) -> usize {
        self.widths.len() - 1
    }

    /// Host copy of layer `l`'s weights, `[out, in]` row-major.
    pub fn weights(&self, l: usize) -> &[f32] {
        &self.host_w[l]
    }

    /// Host copy of layer `l`'s bias.
    pub fn bias(&self, l: usize) -> &[f32] {
        &self.host_b[l]
    }

    /// Mutable host copies of all weights and biases. Call [`Mlp::sync_to_device`] after editing.
    pub fn host_params_mut(&mut self) -> (&mut [Vec<f32>], &mut [Vec<f32>]) {
        (&mut self.host_w, &mut self.host_b)
    }

    /// The SP-in factor of layer `l`, if set.
    pub fn scale(&self, l: usize) -> Option<&[f32]> {
        self.host_scale[l].as_deref()
    }

    /// Sets (or clears) the per-unit factor that multiplies layer `l`'s `W x` (before the bias).
    pub fn set_scale(&mut self, l: usize, scale: Option<&[f32]>) -> Result<()> {
        match scale {
            None => {
                self.scale[l] = None;
                self.host_scale[l] = None;
            }
            Some(s) => {
                let o = self.widths[l + 1];
                ensure!(
                    s.len() == o,
                    "model: scale of {} has {} entries, layer has {o} units",
                    layer_name(l),
                    s.len()
                );
                if self.host_scale[l].as_deref() == Some(s) {
                    return Ok(());
                }
                match &mut self.scale[l] {
                    Some(t) => t.copy_from(s),
                    slot => *slot = Some(self.dev.tensor_from_vec(s.to_vec(), (o,))),
                }
                self.host_scale[l] = Some(s.to_vec());
            }
        }
        Ok(())
    }

    /// Copies the host parameters into the device tensors in place (tensor ids are kept).
    pub fn sync_to_device(&mut self) {
        for l in 0..self.num_layers() {
            self.w[l].copy_from(&self.host_w[l]);
            self.b[l].copy_from(&self.host_b[l]);
        }
    }

    /// Reads the device tensors' values (for checks; the host copies are the master values).
    pub fn device_weights(&self, l: usize) -> Vec<f32> {
        self.w[l].as_vec()
    }

    fn check_input(&self, x: &[f32], batch: usize) -> Result<()> {
        ensure!(batch > 0, "model: empty batch");
        ensure!(
            x.len() == batch * self.widths[0],
            "model: input has {} values, expected batch {batch} x {} features",
            x.len(),
            self.widths[0]
        );
        Ok(())
    }

    /// One layer: `x [B, in] -> scale ⊙ (x W^T) + b [B, out]` (a fresh, contiguous tensor).
    fn linear<T>(
        &self,
        l: usize,
        x: Tensor<(usize, usize), f32, D, T>,
    ) -> Tensor<(usize, usize), f32, D, T>
    where
        T: Tape<f32, D> + Merge<NoneTape>,
    {
        let batch = x.shape().0;
        let o = self.widths[l + 1];
        let wt = self.w[l].clone().permute::<(usize, usize), Axes2<1, 0>>();
        let y = x.matmul(wt);
        let y = match &self.scale[l] {
            Some(s) => y * s.clone().broadcast_like::<_, Axis<0>>(&(batch, o)),
            None => y,
        };
        y + self.b[l].clone().broadcast_like::<_, Axis<0>>(&(batch, o))
    }

    /// Inference pass (no tape).
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<EvalOutput> {
        self.check_input(x, batch)?;
        let mut h = self
            .dev
            .tensor_from_vec(x.to_vec(), (batch, self.widths[0]));
        let mut hidden = Vec::with_capacity(self.num_layers() - 1);
        for l in 0..self.num_layers() {
            let y = self.linear(l, h);
            if l + 1 < self.num_layers() {
                let a = y.relu();
                hidden.push(a.as_vec());
                h = a;
            } else {
                return Ok(EvalOutput {
                    logits: y.as_vec(),
                    hidden,
                });
            }
        }
        unreachable!("an MLP has at least one layer")
    }

    /// Forward + backward on one batch with cross-entropy against integer labels.
    pub fn train_step(&self, x: &[f32], labels: &[usize], batch: usize) -> Result<StepOutput> {
        self.check_input(x, batch)?;
        ensure!(
            labels.len() == batch,
            "model: {} labels for a batch of {batch}",
            labels.len()
        );
        let classes = *self.widths.last().expect("widths checked non-empty");
        let mut onehot = vec![0f32; batch * classes];
        for (r, &y) in labels.iter().enumerate() {
            ensure!(
                y < classes,
                "model: label {y} out of range for {classes} classes"
            );
            onehot[r * classes + y] = 1.0;
        }
        let x = self
            .dev
            .tensor_from_vec(x.to_vec(), (batch, self.widths[0]))
            .leaky_traced();
        let mut hidden = Vec::with_capacity(self.num_layers() - 1);
        let mut h = x;
        for l in 0..self.num_layers() - 1 {
            let a = self.linear(l, h).relu();
            hidden.push(a.retaped::<NoneTape>().as_vec());
            h = a;
        }
        let logits = self.linear(self.num_layers() - 1, h);
        let target = self.dev.tensor_from_vec(onehot, (batch, classes));
        let loss = contiguous_cross_entropy(logits, target);
        let loss_value = loss.retaped::<NoneTape>().as_vec()[0];
        let grads = loss.backward();
        let mut grad_w = Vec::with_capacity(self.num_layers());
        let mut grad_b = Vec::with_capacity(self.num_layers());
        for l in 0..self.num_layers() {
            grad_w.push(grads.get(&self.w[l]).as_vec());
            grad_b.push(grads.get(&self.b[l]).as_vec());
        }
        Ok(StepOutput {
            loss: loss_value,
            hidden,
            grad_w,
            grad_b,
        })
    }
}

/// Cross-entropy with logits that are guaranteed contiguous.
///
/// dfdx 0.13's log-softmax (and so its cross-entropy) computes wrong gradients when its input
/// is a non-contiguous view (for example a permuted tensor): the gradient buffer is indexed
/// with the wrong strides. Logits made by this module are fresh matmul outputs and are already
/// contiguous; `contiguous()` is free for them (it checks the strides and keeps the tensor) and a
/// copy for anything else.
pub fn contiguous_cross_entropy<D: Device<f32>, T: Tape<f32, D>>(
    logits: Tensor<(usize, usize), f32, D, T>,
    target: Tensor<(usize, usize), f32, D>,
) -> Tensor<(), f32, D, T> {
    cross_entropy_with_logits_loss(logits.contiguous(), target)
}
