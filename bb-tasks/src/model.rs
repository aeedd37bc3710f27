//! A multilayer perceptron whose depth and widths are chosen at run time, on dfdx.
//!
//! The host `Vec<f32>` copies of the parameters are the master values, which the optimizer and
//! the pruner edit in place. On the CPU the training step and the forward pass read them
//! directly: the products are the same gemm calls dfdx's CPU backend makes and everything
//! around them repeats dfdx's float operations (only the loss goes through dfdx), so values
//! and gradients are bit-identical to the dfdx ops, without a copy of the weights per step.
//! On other devices the parameters also live as dfdx tensors used by dfdx's forward and
//! backward passes: after every host-side edit, [`Mlp::sync_to_device`] copies the host values
//! into the *same* device tensors with `copy_from`, so each parameter keeps its tensor id for
//! the whole run (gradients are looked up by id).
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
use std::any::Any;

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
    /// On the CPU, run the forward and training passes on the host parameters (off only in
    /// tests that compare them with the dfdx ops).
    on_host: bool,
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
            on_host: true,
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

    /// Copies the host parameters into the device tensors in place (tensor ids are kept); a
    /// no-op on the CPU, whose passes read the host parameters.
    pub fn sync_to_device(&mut self) {
        if self.host_cpu().is_some() {
            // the CPU step reads the host values themselves: there is nothing to copy
            return;
        }
        for l in 0..self.num_layers() {
            self.w[l].copy_from(&self.host_w[l]);
            self.b[l].copy_from(&self.host_b[l]);
        }
    }

    /// Reads the device tensors' values (for checks; the host copies are the master values).
    /// (On the CPU the forward and backward passes read the host values, which are returned.)
    pub fn device_weights(&self, l: usize) -> Vec<f32> {
        if self.host_cpu().is_some() {
            return self.host_w[l].clone();
        }
        self.w[l].as_vec()
    }

    /// The host parameters as the CPU step reads them.
    fn params(&self) -> HostParams<'_> {
        HostParams {
            widths: &self.widths,
            w: &self.host_w,
            b: &self.host_b,
            scale: &self.host_scale,
        }
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

    /// One layer as dfdx ops: `x [B, in] -> act(scale ⊙ (x W^T) + b) [B, out]` (a fresh,
    /// contiguous tensor), with `act` the ReLU if `relu`, else the identity. Other devices
    /// train with it; on the CPU it is the reference the host step is tested against.
    fn layer<T>(
        &self,
        l: usize,
        x: Tensor<(usize, usize), f32, D, T>,
        relu: bool,
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
        let z = y + self.b[l].clone().broadcast_like::<_, Axis<0>>(&(batch, o));
        if relu {
            z.relu()
        } else {
            z
        }
    }

    /// The CPU device, when the step runs on the host parameters (see [`host_forward`]).
    fn host_cpu(&self) -> Option<&Cpu> {
        if !self.on_host {
            return None;
        }
        let dev: &dyn Any = &self.dev;
        dev.downcast_ref()
    }

    /// Inference pass (no tape).
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<EvalOutput> {
        self.check_input(x, batch)?;
        if self.host_cpu().is_some() {
            let (hidden, _, logits) = host_forward(self.params(), x, batch, false);
            return Ok(EvalOutput { logits, hidden });
        }
        let mut h = self
            .dev
            .tensor_from_vec(x.to_vec(), (batch, self.widths[0]));
        let mut hidden = Vec::with_capacity(self.num_layers() - 1);
        for l in 0..self.num_layers() {
            let hidden_layer = l + 1 < self.num_layers();
            let y = self.layer(l, h, hidden_layer);
            if hidden_layer {
                hidden.push(to_host(&y));
                h = y;
            } else {
                return Ok(EvalOutput {
                    logits: to_host(&y),
                    hidden,
                });
            }
        }
        unreachable!("an MLP has at least one layer")
    }

    /// Forward + backward on one batch with cross-entropy against integer labels.
    pub fn train_step(&self, x: &[f32], labels: &[usize], batch: usize) -> Result<StepOutput> {
        self.train_step_with(x, labels, batch, true)
    }

    /// [`Mlp::train_step`]; the hidden activations are copied out only if `keep_hidden`
    /// (otherwise [`StepOutput::hidden`] is empty).
    pub fn train_step_with(
        &self,
        x: &[f32],
        labels: &[usize],
        batch: usize,
        keep_hidden: bool,
    ) -> Result<StepOutput> {
        let none = None::<fn(&[Vec<f32>]) -> Result<()>>;
        self.step_inner(x, labels, batch, keep_hidden, none)
    }

    /// [`Mlp::train_step`] that hands the hidden activations (batch-major, one buffer per
    /// hidden layer) to `observe` as soon as the forward pass has made them: `observe` runs on
    /// another thread of the rayon pool while this one runs the backward pass, so that work
    /// such as [`bb_core::Pruner::observe`] costs no time of its own. Its error, if any, is
    /// returned once the backward pass is done (this method changes no parameters).
    pub fn train_step_observed(
        &self,
        x: &[f32],
        labels: &[usize],
        batch: usize,
        observe: impl FnOnce(&[Vec<f32>]) -> Result<()> + Send,
    ) -> Result<StepOutput> {
        self.step_inner(x, labels, batch, true, Some(observe))
    }

    fn step_inner(
        &self,
        x: &[f32],
        labels: &[usize],
        batch: usize,
        keep_hidden: bool,
        observe: Option<impl FnOnce(&[Vec<f32>]) -> Result<()> + Send>,
    ) -> Result<StepOutput> {
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
        if let Some(cpu) = self.host_cpu() {
            return host_step(self.params(), cpu, x, onehot, batch, keep_hidden, observe);
        }
        let x = self
            .dev
            .tensor_from_vec(x.to_vec(), (batch, self.widths[0]))
            .leaky_traced();
        let mut hidden = Vec::with_capacity(self.num_layers() - 1);
        let mut h = x;
        for l in 0..self.num_layers() - 1 {
            let a = self.layer(l, h, true);
            if keep_hidden {
                hidden.push(to_host(&a.retaped::<NoneTape>()));
            }
            h = a;
        }
        let logits = self.layer(self.num_layers() - 1, h, false);
        let target = self.dev.tensor_from_vec(onehot, (batch, classes));
        let loss = contiguous_cross_entropy(logits, target);
        let loss_value = to_host(&loss.retaped::<NoneTape>())[0];
        let (mut grads, observed) = match observe {
            None => (loss.backward(), Ok(())),
            Some(f) => {
                let mut observed = Ok(());
                let hidden = &hidden;
                let slot = &mut observed;
                let grads = rayon::in_place_scope(|s| {
                    s.spawn(move |_| *slot = f(hidden));
                    loss.backward()
                });
                (grads, observed)
            }
        };
        observed?;
        let mut grad_w = Vec::with_capacity(self.num_layers());
        let mut grad_b = Vec::with_capacity(self.num_layers());
        for l in 0..self.num_layers() {
            grad_w.push(take_grad(&mut grads, &self.w[l]));
            grad_b.push(take_grad(&mut grads, &self.b[l]));
        }
        Ok(StepOutput {
            loss: loss_value,
            hidden,
            grad_w,
            grad_b,
        })
    }
}

bb_actuators::multiversion! {
    /// Bit `i` of `bits` (64 per word) set where `v[i] > 0`.
    fn positive_bits(v: &[f32], bits: &mut [u64]) {
        for (chunk, word) in v.chunks(64).zip(bits.iter_mut()) {
            let mut m = 0u64;
            for (half, part) in chunk.chunks(32).enumerate() {
                let mut h = 0u32;
                for (j, &z) in part.iter().enumerate() {
                    h |= u32::from(z > 0.0) << j;
                }
                m |= u64::from(h) << (32 * half);
            }
            *word = m;
        }
    }
}

bb_actuators::multiversion! {
    /// The ReLU's backward pass on `g` in place: `0 + g` where the bit of `active` is set,
    /// `+0` elsewhere (bit for bit the dfdx op's `0 + [z > 0] * g`), without a branch per value
    /// (the active bits of a layer follow no pattern a branch predictor could learn).
    fn relu_backward(g: &mut [f32], active: &[u64]) {
        for (chunk, &word) in g.chunks_mut(64).zip(active) {
            for (half, part) in chunk.chunks_mut(32).enumerate() {
                let bits = (word >> (32 * half)) as u32;
                for (j, g) in part.iter_mut().enumerate() {
                    let keep = ((bits >> j) & 1).wrapping_neg();
                    *g = f32::from_bits((0.0 + *g).to_bits() & keep);
                }
            }
        }
    }
}

/// The host parameters of an [`Mlp`], as its CPU step reads them.
#[derive(Clone, Copy)]
struct HostParams<'a> {
    widths: &'a [usize],
    w: &'a [Vec<f32>],
    b: &'a [Vec<f32>],
    scale: &'a [Option<Vec<f32>>],
}

/// `c = a b` (`accum` false) or `c += a b` (`accum` true) for an `[m, k]` matrix `a` and a
/// `[k, n]` matrix `b` given by (row, column) strides, into `c` `[m, n]` (strides `cs`): the
/// very call dfdx 0.13's CPU matmul makes (same crate, arguments and thread count), so the
/// results are its results bit for bit.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, k, n): (usize, usize, usize),
    accum: bool,
    a: &[f32],
    as_: [usize; 2],
    b: &[f32],
    bs: [usize; 2],
    c: &mut [f32],
    cs: [usize; 2],
) {
    // batches and widths are never empty (checked where they are made)
    assert!(m > 0 && k > 0 && n > 0, "matmul: empty product");
    let last = |rows: usize, cols: usize, s: [usize; 2]| (rows - 1) * s[0] + (cols - 1) * s[1];
    assert!(
        last(m, k, as_) < a.len() && last(k, n, bs) < b.len() && last(m, n, cs) < c.len(),
        "matmul: operand too short for its shape"
    );
    // SAFETY: every element the strides reach lies inside its slice (checked just above), `c`
    // is borrowed mutably and so overlaps neither operand, and gemm reads and writes nothing
    // else.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            cs[1] as isize,
            cs[0] as isize,
            accum,
            a.as_ptr(),
            as_[1] as isize,
            as_[0] as isize,
            b.as_ptr(),
            bs[1] as isize,
            bs[0] as isize,
            if accum { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// The forward pass on the host parameters: the hidden activations (post-ReLU,
/// batch-major), the ReLU's active bits of each hidden layer (if `bits`) and the logits.
///
/// Per layer the same float operations in the same order as the dfdx ops of [`Mlp::layer`]
/// (the product as dfdx computes it, then `t = y * s` if there is a factor, `z = t + b`,
/// `max(z, 0)`), so the values are bit-identical to them.
fn host_forward(
    p: HostParams<'_>,
    x: &[f32],
    batch: usize,
    bits: bool,
) -> (Vec<Vec<f32>>, Vec<Vec<u64>>, Vec<f32>) {
    let n = p.w.len();
    let mut hidden: Vec<Vec<f32>> = Vec::with_capacity(n - 1);
    let mut active = Vec::with_capacity(if bits { n - 1 } else { 0 });
    for l in 0..n {
        let (i, o) = (p.widths[l], p.widths[l + 1]);
        let input = if l == 0 { x } else { &hidden[l - 1] };
        let mut v = vec![0f32; batch * o];
        // x [B, i] (strides [i, 1]) times W^T [i, o] (W is [o, i]: strides [1, i])
        matmul(
            (batch, i, o),
            false,
            input,
            [i, 1],
            &p.w[l],
            [1, i],
            &mut v,
            [o, 1],
        );
        let relu = l + 1 < n;
        for row in v.chunks_exact_mut(o) {
            match p.scale[l].as_deref() {
                Some(s) => row
                    .iter_mut()
                    .zip(s)
                    .zip(&p.b[l])
                    .for_each(|((z, &s), &b)| *z = *z * s + b),
                None => row.iter_mut().zip(&p.b[l]).for_each(|(z, &b)| *z += b),
            }
            if relu {
                row.iter_mut().for_each(|z| *z = z.max(0.0));
            }
        }
        if !relu {
            return (hidden, active, v);
        }
        if bits {
            // the ReLU's derivative: out > 0 exactly where z > 0
            let mut a = vec![0u64; v.len().div_ceil(64)];
            positive_bits(&v, &mut a);
            active.push(a);
        }
        hidden.push(v);
    }
    unreachable!("an MLP has at least one layer")
}

/// One training step on the host parameters: [`host_forward`], the loss and its gradient
/// with respect to the logits by dfdx (as in the composed step), then the backward pass by
/// hand. `observe` (if any) gets the hidden activations on another thread of the rayon pool
/// while the backward pass runs.
///
/// The backward pass repeats, value by value, what dfdx's ops of [`Mlp::layer`] do: the
/// ReLU's `0 + [z > 0] g`, the bias gradient summed row by row into zeros, the product's
/// gradient `0 + s (0 + g)` (or `0 + g`) into zeros, and the matmul's two gradient products
/// accumulated into zeroed buffers with dfdx's own calls. So loss and gradients are
/// bit-identical to the composed step's, without the copy of every weight into a device
/// tensor and without the gradient of the input batch, which dfdx computes and nobody reads.
fn host_step(
    p: HostParams<'_>,
    dev: &Cpu,
    x: &[f32],
    onehot: Vec<f32>,
    batch: usize,
    keep_hidden: bool,
    observe: Option<impl FnOnce(&[Vec<f32>]) -> Result<()> + Send>,
) -> Result<StepOutput> {
    let n = p.w.len();
    let classes = p.widths[n];
    let (hidden, active, logits) = host_forward(p, x, batch, true);
    let leaf = dev.tensor_from_vec(logits, (batch, classes));
    let target = dev.tensor_from_vec(onehot, (batch, classes));
    let loss = contiguous_cross_entropy(leaf.clone().leaky_traced(), target);
    let loss_value = to_host(&loss.retaped::<NoneTape>())[0];
    let mut grads = loss.backward();
    let mut g = take_grad(&mut grads, &leaf);
    let backward = |mut g: Vec<f32>| {
        let mut grad_w = vec![Vec::new(); n];
        let mut grad_b = vec![Vec::new(); n];
        for l in (0..n).rev() {
            let (i, o) = (p.widths[l], p.widths[l + 1]);
            if l + 1 < n {
                relu_backward(&mut g, &active[l]);
            }
            let mut gb = vec![0f32; o];
            for row in g.chunks_exact(o) {
                gb.iter_mut().zip(row).for_each(|(b, &g)| *b += g);
            }
            let mut gy = vec![0f32; g.len()];
            match p.scale[l].as_deref() {
                Some(s) => {
                    for (grow, row) in gy.chunks_exact_mut(o).zip(g.chunks_exact(o)) {
                        grow.iter_mut()
                            .zip(row)
                            .zip(s)
                            .for_each(|((d, &g), &s)| *d += s * (0.0 + g));
                    }
                }
                None => gy.iter_mut().zip(&g).for_each(|(d, &g)| *d += g),
            }
            let input = if l == 0 { x } else { &hidden[l - 1] };
            // dW^T [i, o] += x^T [i, B] gy [B, o], written into W's [o, i] layout
            let mut gw = vec![0f32; o * i];
            matmul(
                (i, batch, o),
                true,
                input,
                [1, i],
                &gy,
                [o, 1],
                &mut gw,
                [1, i],
            );
            if l > 0 {
                // dx [B, i] += gy [B, o] W [o, i]
                let mut gx = vec![0f32; batch * i];
                matmul(
                    (batch, o, i),
                    true,
                    &gy,
                    [o, 1],
                    &p.w[l],
                    [i, 1],
                    &mut gx,
                    [i, 1],
                );
                g = gx;
            }
            grad_w[l] = gw;
            grad_b[l] = gb;
        }
        (grad_w, grad_b)
    };
    let ((grad_w, grad_b), observed) = match observe {
        None => (backward(std::mem::take(&mut g)), Ok(())),
        Some(f) => {
            let mut observed = Ok(());
            let slot = &mut observed;
            let hidden = &hidden;
            let out = rayon::in_place_scope(|s| {
                s.spawn(move |_| *slot = f(hidden));
                backward(std::mem::take(&mut g))
            });
            (out, observed)
        }
    };
    observed?;
    Ok(StepOutput {
        loss: loss_value,
        hidden: if keep_hidden { hidden } else { Vec::new() },
        grad_w,
        grad_b,
    })
}

/// A tensor's values in logical (row-major) order: one copy of the physical buffer (made
/// contiguous first, which is free for the fresh outputs this module reads).
fn to_host<S: Shape, D: Device<f32>>(t: &Tensor<S, f32, D>) -> Vec<f32> {
    let t = t.clone().contiguous();
    let mut out = vec![0f32; t.shape().num_elements()];
    t.copy_into(&mut out);
    out
}

/// The gradient of parameter `t` (a contiguous tensor, so the gradient's physical order is its
/// logical order), taken out of `grads`.
///
/// On the CPU the gradient buffer is host memory and is moved out without a copy. dfdx does
/// not name its CPU buffer type publicly, so the CPU is recognised by a type check on the
/// gradient store; on other devices the gradient is copied to the host.
fn take_grad<S: Shape, D: Device<f32>>(
    grads: &mut Gradients<f32, D>,
    t: &Tensor<S, f32, D>,
) -> Vec<f32> {
    let any_grads: &mut dyn Any = grads;
    let any_t: &dyn Any = t;
    if let (Some(g), Some(t)) = (
        any_grads.downcast_mut::<Gradients<f32, Cpu>>(),
        any_t.downcast_ref::<Tensor<S, f32, Cpu>>(),
    ) {
        let buf = g
            .get_or_alloc_mut(t)
            .expect("the CPU allocates gradients infallibly");
        return std::mem::take(&mut **buf);
    }
    let mut out = vec![0f32; t.shape().num_elements()];
    grads.get(t).copy_into(&mut out);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The host step and forward pass on the CPU and the dfdx ops give the same bits: loss,
    /// activations, logits and every gradient, with and without SP-in factors, for one, two
    /// and three layers. The wider layers hold many words of ReLU bits and a partial last one.
    #[test]
    fn cpu_host_step_is_bit_identical_to_the_dfdx_ops() {
        let dev = Cpu::default();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (case, batch, widths) in [
            (0, 5, vec![7, 9, 6, 3]),
            (1, 1, vec![7, 9, 6, 3]),
            (2, 13, vec![7, 9, 6, 3]),
            (3, 11, vec![7, 70, 45, 3]),
            (4, 6, vec![7, 3]),
            (5, 4, vec![7, 16, 3]),
        ] {
            let n = widths.len() - 1;
            let mut models: Vec<Mlp<Cpu>> = (0..2)
                .map(|_| Mlp::new(&dev, &widths, case).unwrap())
                .collect();
            models[1].on_host = false;
            let scales: Vec<Option<Vec<f32>>> = (0..n)
                .map(|l| {
                    (case + l as u64 % 2 > 0).then(|| {
                        (0..widths[l + 1])
                            .map(|_| rng.gen_range(0.5..2.0))
                            .collect()
                    })
                })
                .collect();
            assert!(scales.iter().any(Option::is_some));
            for m in &mut models {
                for (l, s) in scales.iter().enumerate() {
                    m.set_scale(l, s.as_deref()).unwrap();
                }
            }
            let x: Vec<f32> = (0..batch * 7).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let y: Vec<usize> = (0..batch).map(|i| i % 3).collect();
            let [a, b] = [&models[0], &models[1]].map(|m| m.train_step(&x, &y, batch).unwrap());
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "case {case}");
            assert_eq!((a.hidden.len(), b.hidden.len()), (n - 1, n - 1));
            for l in 0..n {
                assert_eq!(bits(&a.grad_w[l]), bits(&b.grad_w[l]), "case {case} w{l}");
                assert_eq!(bits(&a.grad_b[l]), bits(&b.grad_b[l]), "case {case} b{l}");
                assert!(a.grad_w[l].iter().any(|&g| g != 0.0));
            }
            for (ha, hb) in a.hidden.iter().zip(&b.hidden) {
                assert_eq!(bits(ha), bits(hb), "case {case}");
                assert!(ha.contains(&0.0) && ha.iter().any(|&v| v > 0.0));
            }
            let [ea, eb] = [&models[0], &models[1]].map(|m| m.forward(&x, batch).unwrap());
            assert_eq!(bits(&ea.logits), bits(&eb.logits), "case {case}");
            assert_eq!((ea.hidden.len(), eb.hidden.len()), (n - 1, n - 1));
            for (ha, hb) in ea.hidden.iter().zip(&eb.hidden) {
                assert_eq!(bits(ha), bits(hb));
            }
            // Host edits (as the pruner makes them) reach both: the host passes read them,
            // the dfdx ops after `sync_to_device`.
            for m in &mut models {
                let (hw, hb) = m.host_params_mut();
                hw[0].iter_mut().step_by(3).for_each(|w| *w = 0.0);
                hb[n - 1].iter_mut().for_each(|b| *b += 0.5);
                m.sync_to_device();
            }
            let [fa, fb] = [&models[0], &models[1]].map(|m| m.forward(&x, batch).unwrap());
            assert_eq!(bits(&fa.logits), bits(&fb.logits), "case {case}, edited");
            assert_ne!(
                bits(&fa.logits),
                bits(&ea.logits),
                "case {case}: the edits count"
            );
            let [a, b] = [&models[0], &models[1]].map(|m| m.train_step(&x, &y, batch).unwrap());
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "case {case}, edited");
            for l in 0..n {
                assert_eq!(
                    bits(&a.grad_w[l]),
                    bits(&b.grad_w[l]),
                    "case {case} w{l}, edited"
                );
            }
        }
    }
}
