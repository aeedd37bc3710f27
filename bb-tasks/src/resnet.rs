//! A small ResNet with bottleneck blocks (1x1 -> 3x3 -> 1x1), on the convolution kit.
//!
//! Stem: 3x3 conv (stride `stem_stride`) + batch-norm + ReLU. Block `i` (named `b<i>`, from 1):
//! `c1` 1x1 `in -> mid` + BN + ReLU, `c2` 3x3 `mid -> mid` (stride `s`) + BN + ReLU, `c3` 1x1
//! `mid -> out` + BN, plus the shortcut (identity, or `proj` 1x1 stride `s` + BN when the shape
//! changes), then ReLU. Global average pooling gives the embedding (the penultimate layer);
//! a linear head gives the logits.
//!
//! The engine sees every conv as a layer and every post-ReLU activation as a population:
//! `input`, `stem`, `b<i>.c1`, `b<i>.c2` and `b<i>` (the block output). As in the paper's
//! face-identification networks, BB's SP-in acts on the first 1x1 conv of every block
//! ([`ResNet::prunable`]): it chooses, for each `c1` output channel, which input channels it
//! keeps.

use crate::convkit::{global_avg_pool, Act, BatchNorm, Conv2d, Ctx, Linear, ParamId, ParamStore};
use anyhow::{ensure, Result};
use bb_core::Topology;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One bottleneck block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Channels of the 1x1 reduction and the 3x3 conv.
    pub mid: usize,
    /// Output channels.
    pub out: usize,
    /// Stride of the 3x3 conv (and the projection).
    #[serde(default = "one")]
    pub stride: usize,
}

fn one() -> usize {
    1
}

fn two() -> usize {
    2
}

/// The `[model]` table of a ResNet experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Stem channels.
    pub stem: usize,
    /// Stem stride (default 2).
    #[serde(default = "two")]
    pub stem_stride: usize,
    /// Bottleneck blocks, first to last.
    pub blocks: Vec<BlockConfig>,
}

impl ResNetConfig {
    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.stem > 0, "model.stem must be > 0");
        ensure!(self.stem_stride > 0, "model.stem_stride must be > 0");
        ensure!(
            !self.blocks.is_empty(),
            "model.blocks: give at least one block"
        );
        for (i, b) in self.blocks.iter().enumerate() {
            ensure!(b.mid > 0, "model.blocks[{i}].mid must be > 0");
            ensure!(b.out > 0, "model.blocks[{i}].out must be > 0");
            ensure!(b.stride > 0, "model.blocks[{i}].stride must be > 0");
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Block {
    name: String,
    c1: Conv2d,
    n1: BatchNorm,
    c2: Conv2d,
    n2: BatchNorm,
    c3: Conv2d,
    n3: BatchNorm,
    proj: Option<(Conv2d, BatchNorm)>,
    mid: usize,
    out: usize,
}

/// The network; its parameters live in a [`ParamStore`].
#[derive(Debug, Clone)]
pub struct ResNet {
    in_ch: usize,
    stem: Conv2d,
    stem_bn: BatchNorm,
    blocks: Vec<Block>,
    head: Linear,
    embed: usize,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ResNetOutput<T> {
    /// The embedding `(channels, B)` (global average pool of the last block); its tape is
    /// empty (the logits carry the pass's tape).
    pub embedding: Act<T>,
    /// Logits `(B, classes)`, contiguous.
    pub logits: Act<T>,
}

impl ResNet {
    /// Builds the network for `in_ch x hw` images and `classes` outputs, adding its parameters
    /// to `store` (initialised from `seed`).
    pub fn new(
        cfg: &ResNetConfig,
        store: &mut ParamStore,
        in_ch: usize,
        hw: (usize, usize),
        classes: usize,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        ensure!(classes > 0, "model: at least one class is needed");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let stem = Conv2d::new(
            store,
            &mut rng,
            "stem",
            in_ch,
            cfg.stem,
            hw,
            3,
            cfg.stem_stride,
            1,
            false,
        )?;
        let stem_bn = BatchNorm::new(store, "stem.bn", cfg.stem)?;
        let mut hw = stem.out_hw();
        let mut ch = cfg.stem;
        let mut blocks = Vec::new();
        for (i, bc) in cfg.blocks.iter().enumerate() {
            let name = format!("b{}", i + 1);
            let n = |s: &str| format!("{name}.{s}");
            let c1 = Conv2d::new(store, &mut rng, &n("c1"), ch, bc.mid, hw, 1, 1, 0, false)?;
            let n1 = BatchNorm::new(store, &n("c1.bn"), bc.mid)?;
            let c2 = Conv2d::new(
                store,
                &mut rng,
                &n("c2"),
                bc.mid,
                bc.mid,
                hw,
                3,
                bc.stride,
                1,
                false,
            )?;
            let n2 = BatchNorm::new(store, &n("c2.bn"), bc.mid)?;
            let hw2 = c2.out_hw();
            let c3 = Conv2d::new(
                store,
                &mut rng,
                &n("c3"),
                bc.mid,
                bc.out,
                hw2,
                1,
                1,
                0,
                false,
            )?;
            let n3 = BatchNorm::new(store, &n("c3.bn"), bc.out)?;
            let proj = if bc.stride != 1 || ch != bc.out {
                let p = Conv2d::new(
                    store,
                    &mut rng,
                    &n("proj"),
                    ch,
                    bc.out,
                    hw,
                    1,
                    bc.stride,
                    0,
                    false,
                )?;
                ensure!(
                    p.out_hw() == hw2,
                    "model.blocks[{i}]: the shortcut's grid {:?} differs from the block's {hw2:?}",
                    p.out_hw()
                );
                Some((p, BatchNorm::new(store, &n("proj.bn"), bc.out)?))
            } else {
                None
            };
            blocks.push(Block {
                name,
                c1,
                n1,
                c2,
                n2,
                c3,
                n3,
                proj,
                mid: bc.mid,
                out: bc.out,
            });
            hw = hw2;
            ch = bc.out;
        }
        let head = Linear::new(store, &mut rng, "head", ch, classes)?;
        Ok(Self {
            in_ch,
            stem,
            stem_bn,
            blocks,
            head,
            embed: ch,
        })
    }

    /// Size of the embedding.
    pub fn embedding_dim(&self) -> usize {
        self.embed
    }

    /// The layers the paper prunes: the first 1x1 conv of every block.
    pub fn prunable(&self) -> Vec<String> {
        self.blocks.iter().map(|b| b.c1.name.clone()).collect()
    }

    /// The `c1` populations (the units SP-in acts on), one per block.
    pub fn block_populations(&self) -> Vec<String> {
        self.blocks.iter().map(|b| b.c1.name.clone()).collect()
    }

    fn convs(&self) -> Vec<(&Conv2d, String, String)> {
        let mut v = vec![(&self.stem, "input".to_string(), "stem".to_string())];
        let mut prev = "stem".to_string();
        for b in &self.blocks {
            let n = |s: &str| format!("{}.{s}", b.name);
            v.push((&b.c1, prev.clone(), n("c1")));
            v.push((&b.c2, n("c1"), n("c2")));
            v.push((&b.c3, n("c2"), b.name.clone()));
            if let Some((p, _)) = &b.proj {
                v.push((p, prev.clone(), b.name.clone()));
            }
            prev = b.name.clone();
        }
        v
    }

    /// The engine's view: every conv is a layer (named like the conv), every post-ReLU
    /// activation a population.
    pub fn topology(&self) -> Topology {
        let mut t = Topology::new()
            .population("input", self.in_ch)
            .population("stem", self.stem.out);
        for b in &self.blocks {
            t = t
                .population(&format!("{}.c1", b.name), b.mid)
                .population(&format!("{}.c2", b.name), b.mid)
                .population(&b.name, b.out);
        }
        for (c, i, o) in self.convs() {
            t = t.conv_layer(&c.name, &i, &o, &c.kernel());
        }
        t
    }

    /// The conv weights, in the order of [`Self::topology`]'s layers.
    pub fn layer_weights(&self) -> Vec<ParamId> {
        self.convs().iter().map(|(c, _, _)| c.w).collect()
    }

    /// Forward pass over `(in_ch·H·W, B)`; taps every population into `ctx`.
    pub fn forward<T: Tape<f32, Cpu>>(
        &self,
        st: &ParamStore,
        x: Act<T>,
        ctx: &mut Ctx,
    ) -> Result<ResNetOutput<T>> {
        let h = self.stem.forward(st, x)?;
        let mut h = self.stem_bn.forward(st, h, ctx)?.relu();
        ctx.tap("stem", &h, self.stem.out)?;
        for b in &self.blocks {
            let short = match &b.proj {
                Some((p, bn)) => {
                    let s = p.forward(st, h.with_empty_tape())?;
                    Some(bn.forward(st, s, ctx)?)
                }
                None => None,
            };
            let skip = h.with_empty_tape();
            let y = b.c1.forward(st, h)?;
            let y = b.n1.forward(st, y, ctx)?.relu();
            ctx.tap(&b.c1.name, &y, b.mid)?;
            let y = b.c2.forward(st, y)?;
            let y = b.n2.forward(st, y, ctx)?.relu();
            ctx.tap(&b.c2.name, &y, b.mid)?;
            let y = b.c3.forward(st, y)?;
            let y = b.n3.forward(st, y, ctx)?;
            let y = match short {
                Some(s) => y + s,
                None => y + skip,
            }
            .relu();
            ctx.tap(&b.name, &y, b.out)?;
            h = y;
        }
        let embedding = global_avg_pool(h, self.embed)?;
        let values = embedding.with_empty_tape();
        let logits = self.head.forward(st, embedding)?;
        Ok(ResNetOutput {
            embedding: values,
            logits,
        })
    }
}
