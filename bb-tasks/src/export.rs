//! Pruned models in a compact sparse file, and the inference that runs from it.
//!
//! A [`SparseMlp`] is the MLP of [`crate::model`] with every layer compacted to a
//! [`CsrLayer`]: only the live edges are kept, and the SP-in factor of each output unit is
//! folded into its weights, so a layer computes `y = (s ⊙ W ⊙ M) x + b` — the same function as
//! the masked dense layer `s ⊙ ((W ⊙ M) x) + b`, up to float rounding. Every hidden layer is
//! followed by a ReLU; the last layer gives the logits.
//!
//! The file is safetensors. Layer `fcN` (`[out, in]`) is stored as four tensors:
//!
//! | tensor | dtype | shape | meaning |
//! |---|---|---|---|
//! | `fcN.row_ptr` | u32 | `[out + 1]` | row `o`'s live edges are `row_ptr[o]..row_ptr[o+1]` |
//! | `fcN.col_idx` | u16 (`in <= 65536`) or u32 | `[nnz]` | input unit of each live edge, ascending per row |
//! | `fcN.values` | f32 | `[nnz]` | weight of each live edge, SP-in factor folded in |
//! | `fcN.bias` | f32 | `[out]` | bias |
//!
//! The metadata holds one key, [`META_KEY`], whose value is the JSON of [`ExportInfo`]: the
//! format name and version, the widths, the activation, per-layer shapes and live-edge counts,
//! and where the model came from (arm, seed, steps). One key keeps the bytes of the file
//! independent of hash-map order, so the same model always gives the same file.

use crate::io::write_atomic;
use crate::model::{layer_name, Mlp};
use anyhow::{anyhow, bail, ensure, Context, Result};
use bb_core::sparse::{CsrLayer, SparseScratch};
use bb_core::{BitMask, Pruner};
use dfdx::prelude::Device;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Value of [`ExportInfo::format`].
pub const FORMAT: &str = "bb-sparse-mlp";
/// The newest format version this build reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;
/// The metadata key that holds the [`ExportInfo`] JSON.
pub const META_KEY: &str = "bb_sparse_mlp";

/// The nonlinearity after every hidden layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
}

/// One layer as described in the metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    /// Name, and the prefix of its tensors (`fc1`, `fc2`, ...).
    pub name: String,
    /// Output units (rows).
    pub out: usize,
    /// Input units (columns).
    #[serde(rename = "in")]
    pub inp: usize,
    /// Live edges.
    pub nnz: usize,
    /// Whether an SP-in factor was folded into the values.
    pub rescale_folded: bool,
}

/// Where an exported model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// Arm of the run.
    pub arm: String,
    /// Seed of the run.
    pub seed: u64,
    /// Optimizer steps the model was trained for.
    pub steps: u64,
    /// Live edges / edges over the pruned layers, as the run reported it.
    pub density: f64,
    /// Test accuracy the run reported.
    pub test_acc: f64,
}

/// The metadata of an exported model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportInfo {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version ([`FORMAT_VERSION`] when written by this build).
    pub version: u32,
    /// `[inputs, hidden..., classes]`.
    pub widths: Vec<usize>,
    /// Applied after every hidden layer (not after the last).
    pub activation: Activation,
    /// One entry per layer, input to output.
    pub layers: Vec<LayerInfo>,
    /// The run the model came from, if known.
    pub source: Option<SourceInfo>,
}

/// A pruned MLP in compressed-sparse-row form, ready for inference.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMlp {
    info: ExportInfo,
    /// Weights only; the bias is added after the product, as the dense model does.
    layers: Vec<CsrLayer>,
    biases: Vec<Vec<f32>>,
}

impl SparseMlp {
    /// Compacts a trained model under its pruner's masks (every edge is live without a
    /// pruner), folding the model's SP-in factors into the weights.
    ///
    /// Fails if a dead edge holds a nonzero weight: the masked dense model would then differ
    /// from the model itself, and the export could not match both.
    pub fn from_model<D: Device<f32>>(
        model: &Mlp<D>,
        pruner: Option<&Pruner>,
        source: Option<SourceInfo>,
    ) -> Result<Self> {
        let widths = model.widths().to_vec();
        let mut layers = Vec::with_capacity(model.num_layers());
        let mut infos = Vec::with_capacity(model.num_layers());
        let mut biases = Vec::with_capacity(model.num_layers());
        for l in 0..model.num_layers() {
            let name = layer_name(l);
            let (out, inp) = (widths[l + 1], widths[l]);
            let full;
            let mask = match pruner {
                Some(p) => {
                    ensure!(
                        l < p.topology().layers.len(),
                        "export: the pruner has {} layers, the model {}",
                        p.topology().layers.len(),
                        model.num_layers()
                    );
                    p.mask(l)
                }
                None => {
                    full = BitMask::full(out, inp);
                    &full
                }
            };
            ensure!(
                mask.rows() == out && mask.cols() == inp,
                "export: the mask of {name} is [{}, {}], the layer [{out}, {inp}]",
                mask.rows(),
                mask.cols()
            );
            let w = model.weights(l);
            if let Some(i) = dead_nonzero(w, mask) {
                bail!(
                    "export: {name} has weight {} on the dead edge [{}, {}]; the model is not masked",
                    w[i],
                    i / inp,
                    i % inp
                );
            }
            let scale = model.scale(l);
            let csr = CsrLayer::from_masked(w, mask, scale, None)
                .map_err(|e| anyhow!("export: {name}: {e}"))?;
            biases.push(model.bias(l).to_vec());
            infos.push(LayerInfo {
                name,
                out,
                inp,
                nnz: csr.nnz(),
                rescale_folded: scale.is_some(),
            });
            layers.push(csr);
        }
        Ok(Self {
            info: ExportInfo {
                format: FORMAT.to_string(),
                version: FORMAT_VERSION,
                widths,
                activation: Activation::Relu,
                layers: infos,
                source,
            },
            layers,
            biases,
        })
    }

    /// The metadata.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// `[inputs, hidden..., classes]`.
    pub fn widths(&self) -> &[usize] {
        &self.info.widths
    }

    /// The compacted layers (weights without the bias), input to output.
    pub fn layers(&self) -> &[CsrLayer] {
        &self.layers
    }

    /// The bias of layer `l`.
    pub fn bias(&self, l: usize) -> &[f32] {
        &self.biases[l]
    }

    /// Live edges over all layers.
    pub fn nnz(&self) -> usize {
        self.layers.iter().map(CsrLayer::nnz).sum()
    }

    /// The file's bytes (deterministic: the same model gives the same bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for ((info, layer), bias) in self.info.layers.iter().zip(&self.layers).zip(&self.biases) {
            let (row_ptr, cols, vals) = layer.parts();
            let (col_dtype, col_bytes) = if info.inp <= 1 << 16 {
                let b = cols.iter().flat_map(|&c| (c as u16).to_le_bytes());
                (Dtype::U16, b.collect())
            } else {
                let b = cols.iter().flat_map(|&c| c.to_le_bytes());
                (Dtype::U32, b.collect())
            };
            let n = &info.name;
            owned.push((
                format!("{n}.row_ptr"),
                Dtype::U32,
                vec![row_ptr.len()],
                row_ptr.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            owned.push((
                format!("{n}.col_idx"),
                col_dtype,
                vec![cols.len()],
                col_bytes,
            ));
            owned.push((
                format!("{n}.values"),
                Dtype::F32,
                vec![vals.len()],
                vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            owned.push((
                format!("{n}.bias"),
                Dtype::F32,
                vec![bias.len()],
                bias.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
        let mut views = Vec::with_capacity(owned.len());
        for (name, dtype, shape, bytes) in &owned {
            let view = TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| anyhow!("export: tensor {name}: {e:?}"))?;
            views.push((name.clone(), view));
        }
        let meta = HashMap::from([(META_KEY.to_string(), serde_json::to_string(&self.info)?)]);
        safetensors::serialize(views, &Some(meta)).map_err(|e| anyhow!("export: {e:?}"))
    }

    /// Writes the file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Reads an exported model; every error names the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read sparse model {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("sparse model {}", path.display()))
    }

    /// Parses and checks the bytes of an exported model.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not a safetensors file, or a truncated one (header: {e:?})"))?;
        let Some(text) = header.metadata().as_ref().and_then(|m| m.get(META_KEY)) else {
            bail!(
                "no `{META_KEY}` metadata: this is not a model written by `bb export` \
                 (a training checkpoint's model.safetensors is dense; export its run with `bb export RUN_DIR`)"
            );
        };
        let info: ExportInfo = serde_json::from_str(text)
            .with_context(|| format!("metadata `{META_KEY}` is not a valid description"))?;
        ensure!(
            info.format == FORMAT,
            "metadata field format is {:?}, expected {FORMAT:?}",
            info.format
        );
        ensure!(
            (1..=FORMAT_VERSION).contains(&info.version),
            "metadata field version is {}; this build reads versions 1 to {FORMAT_VERSION}",
            info.version
        );
        ensure!(
            info.widths.len() >= 2 && info.widths.iter().all(|&w| w > 0),
            "metadata field widths must list at least two nonzero widths, got {:?}",
            info.widths
        );
        ensure!(
            info.layers.len() == info.widths.len() - 1,
            "metadata lists {} layers for widths {:?}",
            info.layers.len(),
            info.widths
        );
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| anyhow!("corrupt tensor data ({e:?})"))?;
        let mut expected = BTreeSet::new();
        let mut layers = Vec::with_capacity(info.layers.len());
        let mut biases = Vec::with_capacity(info.layers.len());
        for (l, li) in info.layers.iter().enumerate() {
            let (out, inp) = (info.widths[l + 1], info.widths[l]);
            ensure!(
                li.out == out && li.inp == inp,
                "metadata: layer {} is [{}, {}], but widths {:?} make it [{out}, {inp}]",
                li.name,
                li.out,
                li.inp,
                info.widths
            );
            let n = &li.name;
            let names = [
                format!("{n}.row_ptr"),
                format!("{n}.col_idx"),
                format!("{n}.values"),
                format!("{n}.bias"),
            ];
            for name in &names {
                ensure!(
                    expected.insert(name.clone()),
                    "metadata names layer {n} twice"
                );
            }
            let row_ptr = read_u32(&st, &names[0], &[out + 1])?;
            let nnz = li.nnz;
            let cols = if inp <= 1 << 16 {
                read_u16(&st, &names[1], &[nnz])?
            } else {
                read_u32(&st, &names[1], &[nnz])?
            };
            let vals = read_f32(&st, &names[2], &[nnz])?;
            let bias = read_f32(&st, &names[3], &[out])?;
            let csr = CsrLayer::from_parts(out, inp, row_ptr, cols, vals, None)
                .map_err(|e| anyhow!("layer {n}: {e}"))?;
            layers.push(csr);
            biases.push(bias);
        }
        if let Some(extra) = st.names().into_iter().find(|n| !expected.contains(*n)) {
            bail!("unexpected tensor {extra}");
        }
        Ok(Self {
            info,
            layers,
            biases,
        })
    }

    /// Logits `[batch, classes]` of `x` (`[batch, inputs]`, row-major).
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let mut scratch = ForwardScratch::default();
        self.forward_with(x, batch, &mut scratch)?;
        Ok(std::mem::take(&mut scratch.cur))
    }

    /// [`Self::forward`] with buffers reused between calls; returns the logits.
    pub fn forward_with<'s>(
        &self,
        x: &[f32],
        batch: usize,
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s [f32]> {
        let inputs = self.info.widths[0];
        ensure!(batch > 0, "sparse model: empty batch");
        ensure!(
            x.len() == batch * inputs,
            "sparse model: input has {} values, expected batch {batch} x {inputs} features",
            x.len()
        );
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            scratch.next.clear();
            scratch.next.resize(batch * layer.out(), 0.0);
            let input = if l == 0 { x } else { &scratch.cur[..] };
            layer
                .forward(input, batch, &mut scratch.next, &mut scratch.csr)
                .map_err(|e| anyhow!("sparse model: {}: {e}", self.info.layers[l].name))?;
            let bias = &self.biases[l];
            let relu = l < last && self.info.activation == Activation::Relu;
            for row in scratch.next.chunks_exact_mut(bias.len()) {
                for (v, &b) in row.iter_mut().zip(bias) {
                    let z = *v + b;
                    *v = if relu { z.max(0.0) } else { z };
                }
            }
            std::mem::swap(&mut scratch.cur, &mut scratch.next);
        }
        Ok(&scratch.cur)
    }
}

/// Buffers reused by [`SparseMlp::forward_with`].
#[derive(Debug, Default, Clone)]
pub struct ForwardScratch {
    cur: Vec<f32>,
    next: Vec<f32>,
    csr: SparseScratch,
}

/// Index of the first weight that is nonzero on a dead edge.
fn dead_nonzero(w: &[f32], mask: &BitMask) -> Option<usize> {
    let inp = mask.cols();
    (0..mask.rows()).find_map(|o| {
        let row = &w[o * inp..(o + 1) * inp];
        let words = mask.row_words(o);
        row.iter()
            .enumerate()
            .find(|&(c, &v)| v != 0.0 && words[c / 64] >> (c % 64) & 1 == 0)
            .map(|(c, _)| o * inp + c)
    })
}

fn view<'a>(
    st: &'a SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<TensorView<'a>> {
    let v = st
        .tensor(name)
        .map_err(|_| anyhow!("tensor {name} missing"))?;
    ensure!(
        v.dtype() == dtype,
        "tensor {name} is {:?}, expected {dtype:?}",
        v.dtype()
    );
    ensure!(
        v.shape() == shape,
        "tensor {name} has shape {:?}, expected {shape:?}",
        v.shape()
    );
    Ok(v)
}

fn read_f32(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let v = view(st, name, Dtype::F32, shape)?;
    Ok(v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_u32(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<u32>> {
    let v = view(st, name, Dtype::U32, shape)?;
    Ok(v.data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_u16(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<u32>> {
    let v = view(st, name, Dtype::U16, shape)?;
    Ok(v.data()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect())
}
