//! A small Transformer encoder on runtime-shaped dfdx tensors, with its parameters in a
//! [`ParamStore`]: a token projection of frame patches, fixed sinusoidal positions, pre-norm
//! blocks of multi-head self-attention and a ReLU feed-forward network, a final layer norm,
//! mean pooling over time and a linear head.
//!
//! **Layout.** Activations are token-major `(B·T, D)` (row `b·T + t`), so every linear layer
//! is one matmul with the weight `[out, in]` viewed transposed. Attention reshapes to
//! `(B, H, T, dh)` for the batched matmuls; the scores are a fresh matmul output, so the
//! softmax sees a contiguous tensor (dfdx 0.13's softmax is wrong on permuted views).
//!
//! **Pruning.** The engine sees only the feed-forward linears: `encK.ff1` (population
//! `encK.ln2`, the normalized block input, to `encK.ffn`, the hidden units) and `encK.ff2`
//! (`encK.ffn` to `encK.ffo`, the FFN output before the residual add). SP-in on `ff1` sets a
//! hidden unit's fan-in; SP-out on `ff2` sets its fan-out. All three populations are tapped
//! (unit-major `[units, T, B]`) in training mode when the context records.

use crate::convkit::layers::{he_uniform, norm_affine};
use crate::convkit::{Act, Ctx, ParamId, ParamKind, ParamStore, Tap};
use anyhow::{ensure, Result};
use bb_core::Topology;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

fn d_dmodel() -> usize {
    64
}
fn d_heads() -> usize {
    4
}
fn d_ff() -> usize {
    256
}
fn d_layers() -> usize {
    2
}
fn d_patch() -> usize {
    2
}

/// The `[model]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    /// Model width.
    #[serde(default = "d_dmodel")]
    pub d_model: usize,
    /// Attention heads (divide `d_model`).
    #[serde(default = "d_heads")]
    pub heads: usize,
    /// Hidden units of each feed-forward network.
    #[serde(default = "d_ff")]
    pub d_ff: usize,
    /// Encoder blocks.
    #[serde(default = "d_layers")]
    pub layers: usize,
    /// Feature frames stacked into one token.
    #[serde(default = "d_patch")]
    pub patch: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            d_model: d_dmodel(),
            heads: d_heads(),
            d_ff: d_ff(),
            layers: d_layers(),
            patch: d_patch(),
        }
    }
}

impl EncoderConfig {
    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.d_model >= 2, "model.d_model must be >= 2");
        ensure!(
            self.heads >= 1 && self.d_model.is_multiple_of(self.heads),
            "model.heads ({}) must divide model.d_model ({})",
            self.heads,
            self.d_model
        );
        ensure!(self.d_ff >= 1, "model.d_ff must be >= 1");
        ensure!(self.layers >= 1, "model.layers must be >= 1");
        ensure!(self.patch >= 1, "model.patch must be >= 1");
        Ok(())
    }
}

/// Token-major linear layer `(N, in) -> (N, out)`; weight `[out, in]`, bias `[out]`; an
/// optional per-output factor on the weight (the SP-in rescale) multiplies its rows.
#[derive(Debug, Clone)]
pub struct Dense {
    /// Name (`<name>.weight`, `<name>.bias`).
    pub name: String,
    /// Weight id.
    pub w: ParamId,
    /// Bias id.
    pub b: ParamId,
    /// Inputs.
    pub inp: usize,
    /// Outputs.
    pub out: usize,
}

impl Dense {
    /// Adds the parameters: weights uniform in `±sqrt(6 / in)` when `he`, else `±1/sqrt(in)`;
    /// zero bias.
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        inp: usize,
        out: usize,
        he: bool,
    ) -> Result<Self> {
        ensure!(inp > 0 && out > 0, "{name}: sizes must be > 0");
        let values = if he {
            he_uniform(rng, out * inp, inp)
        } else {
            let bound = 1.0 / (inp as f32).sqrt();
            (0..out * inp)
                .map(|_| rng.gen_range(-bound..bound))
                .collect()
        };
        let w = store.add(
            &format!("{name}.weight"),
            &[out, inp],
            values,
            ParamKind::Trainable,
        )?;
        let b = store.add(
            &format!("{name}.bias"),
            &[out],
            vec![0.0; out],
            ParamKind::Trainable,
        )?;
        Ok(Self {
            name: name.to_string(),
            w,
            b,
            inp,
            out,
        })
    }

    /// `(N, in) -> (N, out)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, st: &ParamStore, x: Act<T>) -> Result<Act<T>> {
        let (n, i) = *x.shape();
        ensure!(
            i == self.inp,
            "{}: input has {i} features, expected {}",
            self.name,
            self.inp
        );
        let w = st
            .tensor(self.w)
            .retaped::<T>()
            .reshape_like(&(self.out, i));
        let w = match st.scale(self.w) {
            Some(s) => {
                w * s
                    .clone()
                    .broadcast_like::<(usize, usize), Axis<1>>(&(self.out, i))
            }
            None => w,
        };
        let y = x.matmul(w.permute::<(usize, usize), Axes2<1, 0>>());
        Ok(y + st
            .tensor(self.b)
            .retaped::<T>()
            .broadcast_like::<(usize, usize), Axis<0>>(&(n, self.out)))
    }
}

/// Layer norm over the features of each token, with a learned gain and bias.
#[derive(Debug, Clone)]
pub struct Norm {
    /// Name.
    pub name: String,
    gamma: ParamId,
    beta: ParamId,
    dim: usize,
}

impl Norm {
    /// Adds `<name>.weight` (1) and `<name>.bias` (0).
    pub fn new(store: &mut ParamStore, name: &str, dim: usize) -> Result<Self> {
        let (gamma, beta) = norm_affine(store, name, dim)?;
        Ok(Self {
            name: name.to_string(),
            gamma,
            beta,
            dim,
        })
    }

    /// `(N, D) -> (N, D)`.
    pub fn forward<T: Tape<f32, Cpu>>(&self, st: &ParamStore, x: Act<T>) -> Result<Act<T>> {
        let (n, d) = *x.shape();
        ensure!(
            d == self.dim,
            "{}: {d} features, expected {}",
            self.name,
            self.dim
        );
        let y = x.normalize::<Axis<1>>(1e-5);
        let g = st
            .tensor(self.gamma)
            .retaped::<T>()
            .broadcast_like::<(usize, usize), Axis<0>>(&(n, d));
        let b = st
            .tensor(self.beta)
            .retaped::<T>()
            .broadcast_like::<(usize, usize), Axis<0>>(&(n, d));
        Ok(y * g + b)
    }
}

/// One pre-norm encoder block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Name (`encK`).
    pub name: String,
    ln1: Norm,
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    ln2: Norm,
    /// First FFN projection (`d_model -> d_ff`).
    pub ff1: Dense,
    /// Second FFN projection (`d_ff -> d_model`).
    pub ff2: Dense,
}

/// Multi-head self-attention over `(B·T, D)` inputs `q`, `k`, `v` (already projected):
/// `softmax(q k^T / sqrt(dh)) v` per head, back in `(B·T, D)`.
pub fn attention<T: Tape<f32, Cpu>>(
    q: Act<T>,
    k: Act<T>,
    v: Act<T>,
    batch: usize,
    heads: usize,
) -> Result<Act<T>> {
    let (n, d) = *q.shape();
    ensure!(
        batch > 0 && n % batch == 0 && heads > 0 && d % heads == 0,
        "attention: {n} tokens x {d} features do not split into batch {batch} x {heads} heads"
    );
    let (t, dh) = (n / batch, d / heads);
    let q = q
        .reshape_like(&(batch, t, heads, dh))
        .permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>();
    let k = k
        .reshape_like(&(batch, t, heads, dh))
        .permute::<(usize, usize, usize, usize), Axes4<0, 2, 3, 1>>();
    let v = v
        .reshape_like(&(batch, t, heads, dh))
        .permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>();
    let w = (q.matmul(k) * (1.0 / (dh as f32).sqrt())).softmax::<Axis<3>>();
    let y = w
        .matmul(v)
        .permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>();
    Ok(y.reshape_like(&(n, d)))
}

/// Sinusoidal positions `[t, d]` (sin on even features, cos on odd ones).
pub fn positions(t: usize, d: usize) -> Vec<f32> {
    let mut p = vec![0f32; t * d];
    for pos in 0..t {
        for i in 0..d {
            let f = 1.0 / 10000f64.powf((2 * (i / 2)) as f64 / d as f64);
            let a = pos as f64 * f;
            p[pos * d + i] = if i % 2 == 0 { a.sin() } else { a.cos() } as f32;
        }
    }
    p
}

/// The encoder.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// Settings.
    pub cfg: EncoderConfig,
    /// Tokens per sample.
    pub tokens: usize,
    /// Features per token.
    pub token_dim: usize,
    /// Classes.
    pub classes: usize,
    inp: Dense,
    pos: Vec<f32>,
    /// Blocks.
    pub blocks: Vec<Block>,
    ln_f: Norm,
    head: Dense,
}

/// Copies a token-major `(B·T, U)` tensor's values into a unit-major tap `[U, T, B]`.
fn tap_tokens<T>(
    ctx: &mut Ctx,
    population: &str,
    x: &Act<T>,
    batch: usize,
    t: usize,
) -> Result<()> {
    if !ctx.record {
        return Ok(());
    }
    let (n, u) = *x.shape();
    ensure!(
        n == batch * t,
        "tap {population}: {n} rows for {batch} x {t}"
    );
    let v = x.as_vec();
    let mut data = vec![0f32; n * u];
    for b in 0..batch {
        for p in 0..t {
            let row = &v[(b * t + p) * u..(b * t + p + 1) * u];
            for (j, &val) in row.iter().enumerate() {
                data[j * t * batch + p * batch + b] = val;
            }
        }
    }
    ctx.taps.push(Tap {
        population: population.to_string(),
        units: u,
        positions: t,
        batch,
        data,
    });
    Ok(())
}

impl Encoder {
    /// Builds the encoder for samples of `tokens x token_dim` and `classes` outputs,
    /// initialised from `seed`.
    pub fn new(
        cfg: &EncoderConfig,
        store: &mut ParamStore,
        tokens: usize,
        token_dim: usize,
        classes: usize,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        ensure!(tokens >= 1, "the clips are too short for one token");
        ensure!(classes >= 2, "the encoder needs two classes at least");
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5452_4e53);
        let d = cfg.d_model;
        let inp = Dense::new(store, &mut rng, "input", token_dim, d, false)?;
        let mut blocks = Vec::new();
        for l in 0..cfg.layers {
            let name = format!("enc{l}");
            let n = |s: &str| format!("{name}.{s}");
            blocks.push(Block {
                ln1: Norm::new(store, &n("ln1"), d)?,
                q: Dense::new(store, &mut rng, &n("q"), d, d, false)?,
                k: Dense::new(store, &mut rng, &n("k"), d, d, false)?,
                v: Dense::new(store, &mut rng, &n("v"), d, d, false)?,
                o: Dense::new(store, &mut rng, &n("o"), d, d, false)?,
                ln2: Norm::new(store, &n("ln2"), d)?,
                ff1: Dense::new(store, &mut rng, &n("ff1"), d, cfg.d_ff, true)?,
                ff2: Dense::new(store, &mut rng, &n("ff2"), cfg.d_ff, d, false)?,
                name,
            });
        }
        let ln_f = Norm::new(store, "ln_f", d)?;
        let head = Dense::new(store, &mut rng, "head", d, classes, false)?;
        Ok(Self {
            cfg: cfg.clone(),
            tokens,
            token_dim,
            classes,
            inp,
            pos: positions(tokens, d),
            blocks,
            ln_f,
            head,
        })
    }

    /// The engine's view: the FFN linears and their populations (see the module docs).
    pub fn topology(&self) -> Topology {
        let (d, f) = (self.cfg.d_model, self.cfg.d_ff);
        let mut t = Topology::new();
        for b in &self.blocks {
            let n = &b.name;
            t = t
                .population(&format!("{n}.ln2"), d)
                .population(&format!("{n}.ffn"), f)
                .population(&format!("{n}.ffo"), d);
        }
        for b in &self.blocks {
            let n = &b.name;
            t = t
                .layer(&b.ff1.name, &format!("{n}.ln2"), &format!("{n}.ffn"))
                .layer(&b.ff2.name, &format!("{n}.ffn"), &format!("{n}.ffo"));
        }
        t
    }

    /// The FFN weights in the order of [`Self::topology`]'s layers.
    pub fn layer_weights(&self) -> Vec<ParamId> {
        self.blocks
            .iter()
            .flat_map(|b| [b.ff1.w, b.ff2.w])
            .collect()
    }

    /// Names of the FFN layers (every method prunes these).
    pub fn prunable(&self) -> Vec<String> {
        self.blocks
            .iter()
            .flat_map(|b| [b.ff1.name.clone(), b.ff2.name.clone()])
            .collect()
    }

    /// The FFN hidden populations (reported).
    pub fn hidden_populations(&self) -> Vec<String> {
        self.blocks
            .iter()
            .map(|b| format!("{}.ffn", b.name))
            .collect()
    }

    /// Logits `(B, classes)` (fresh, contiguous) of `x`: `(B·T, token_dim)` token-major.
    pub fn forward<T: Tape<f32, Cpu>>(
        &self,
        st: &ParamStore,
        x: Act<T>,
        batch: usize,
        ctx: &mut Ctx,
    ) -> Result<Act<T>> {
        let (n, p) = *x.shape();
        let (t, d) = (self.tokens, self.cfg.d_model);
        ensure!(
            n == batch * t && p == self.token_dim,
            "encoder input is {n} x {p}, expected {batch} x {t} tokens of {} features",
            self.token_dim
        );
        let pos = st
            .device()
            .tensor_from_vec(self.pos.clone(), (t, d))
            .broadcast_like::<(usize, usize, usize), Axis<0>>(&(batch, t, d))
            .reshape_like(&(n, d));
        let mut h = self.inp.forward(st, x)? + pos;
        for b in &self.blocks {
            let a = b.ln1.forward(st, h.with_empty_tape())?;
            let q = b.q.forward(st, a.with_empty_tape())?;
            let k = b.k.forward(st, a.with_empty_tape())?;
            let v = b.v.forward(st, a)?;
            let y = attention(q, k, v, batch, self.cfg.heads)?;
            h = h + b.o.forward(st, y)?;
            let a = b.ln2.forward(st, h.with_empty_tape())?;
            tap_tokens(ctx, &format!("{}.ln2", b.name), &a, batch, t)?;
            let f = b.ff1.forward(st, a)?.relu();
            tap_tokens(ctx, &format!("{}.ffn", b.name), &f, batch, t)?;
            let y = b.ff2.forward(st, f)?;
            tap_tokens(ctx, &format!("{}.ffo", b.name), &y, batch, t)?;
            h = h + y;
        }
        let h = self.ln_f.forward(st, h)?;
        let pooled = h
            .reshape_like(&(batch, t, d))
            .mean::<(usize, usize), Axis<1>>();
        self.head.forward(st, pooled)
    }
}
