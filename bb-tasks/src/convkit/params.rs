//! The parameter store: every trainable tensor and buffer of a model, by name.
//!
//! dfdx's `TensorCollection` (and with it its optimizers and safetensors support) cannot hold
//! runtime-shaped tensors, so the store keeps each parameter twice: a host `Vec<f32>` master
//! copy that the optimizer and the pruner edit, and a flat device tensor that the forward pass
//! reshapes at use. [`ParamStore::sync`] copies the host values into the *same* device tensor
//! (`copy_from`), so a parameter keeps its tensor id — and with it its gradients — for the
//! whole run. The store saves and loads as safetensors with each entry's full shape.

use super::Param;
use crate::io::{NamedTensor, TensorFile};
use anyhow::{anyhow, bail, ensure, Result};
use dfdx::prelude::*;
use dfdx::tensor::Cpu;

/// Handle of one entry of a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub(crate) usize);

impl ParamId {
    /// Position in the store.
    pub fn index(self) -> usize {
        self.0
    }
}

/// What an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Updated by the optimizer.
    Trainable,
    /// Updated by the model itself (e.g. batch-norm running statistics); saved, not trained.
    Buffer,
}

#[derive(Debug)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    kind: ParamKind,
    host: Vec<f32>,
    dev: Param,
    /// Per-output-unit factor multiplying this weight's rows at use (SP-in rescale).
    scale: Option<(Vec<f32>, Param)>,
}

/// Named parameters and buffers with host master copies; see the module docs.
#[derive(Debug)]
pub struct ParamStore {
    dev: Cpu,
    entries: Vec<Entry>,
}

impl ParamStore {
    /// An empty store on `dev`.
    pub fn new(dev: &Cpu) -> Self {
        Self {
            dev: dev.clone(),
            entries: Vec::new(),
        }
    }

    /// The device.
    pub fn device(&self) -> &Cpu {
        &self.dev
    }

    /// Adds an entry. Errors on a duplicate name, an empty shape or a value count that does
    /// not match the shape.
    pub fn add(
        &mut self,
        name: &str,
        shape: &[usize],
        values: Vec<f32>,
        kind: ParamKind,
    ) -> Result<ParamId> {
        ensure!(!name.is_empty(), "parameter names must not be empty");
        ensure!(
            self.find(name).is_none(),
            "parameter {name} is defined twice"
        );
        let n: usize = shape.iter().product();
        ensure!(
            !shape.is_empty() && n > 0,
            "parameter {name}: shape {shape:?} is empty"
        );
        ensure!(
            values.len() == n,
            "parameter {name}: {} values for shape {shape:?}",
            values.len()
        );
        let dev = self.dev.tensor_from_vec(values.clone(), (n,));
        self.entries.push(Entry {
            name: name.to_string(),
            shape: shape.to_vec(),
            kind,
            host: values,
            dev,
            scale: None,
        });
        Ok(ParamId(self.entries.len() - 1))
    }

    /// The entry called `name`.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.entries
            .iter()
            .position(|e| e.name == name)
            .map(ParamId)
    }

    fn entry(&self, id: ParamId) -> &Entry {
        &self.entries[id.0]
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in the order added.
    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.entries.len()).map(ParamId)
    }

    /// The trainable entries, in the order added.
    pub fn trainable(&self) -> Vec<ParamId> {
        self.ids()
            .filter(|&i| self.entry(i).kind == ParamKind::Trainable)
            .collect()
    }

    /// Name of an entry.
    pub fn name(&self, id: ParamId) -> &str {
        &self.entry(id).name
    }

    /// Full shape of an entry (e.g. `[out, in, kh, kw]`).
    pub fn shape(&self, id: ParamId) -> &[usize] {
        &self.entry(id).shape
    }

    /// Kind of an entry.
    pub fn kind(&self, id: ParamId) -> ParamKind {
        self.entry(id).kind
    }

    /// The device tensor (flat). Reshape it at use; its id stays fixed for the whole run.
    pub fn tensor(&self, id: ParamId) -> &Param {
        &self.entry(id).dev
    }

    /// The host master values.
    pub fn host(&self, id: ParamId) -> &[f32] {
        &self.entry(id).host
    }

    /// Mutable host values; call [`Self::sync`] (or [`Self::sync_all`]) afterwards.
    pub fn host_mut(&mut self, id: ParamId) -> &mut [f32] {
        &mut self.entries[id.0].host
    }

    /// Mutable host values of several distinct entries at once, in the order asked.
    pub fn hosts_mut(&mut self, ids: &[ParamId]) -> Result<Vec<&mut [f32]>> {
        let mut slots: Vec<Option<&mut [f32]>> = self
            .entries
            .iter_mut()
            .map(|e| Some(e.host.as_mut_slice()))
            .collect();
        ids.iter()
            .map(|id| {
                slots
                    .get_mut(id.0)
                    .and_then(Option::take)
                    .ok_or_else(|| anyhow!("parameter {} asked for twice or unknown", id.0))
            })
            .collect()
    }

    /// Copies the host values of one entry into its device tensor, in place.
    pub fn sync(&mut self, id: ParamId) {
        let e = &mut self.entries[id.0];
        e.dev.copy_from(&e.host);
    }

    /// [`Self::sync`] for every entry.
    pub fn sync_all(&mut self) {
        for e in &mut self.entries {
            e.dev.copy_from(&e.host);
        }
    }

    /// Sets (or clears) the per-output-unit factor of a weight `[out, ...]`.
    pub fn set_scale(&mut self, id: ParamId, scale: Option<&[f32]>) -> Result<()> {
        let dev = self.dev.clone();
        let e = &mut self.entries[id.0];
        match scale {
            None => e.scale = None,
            Some(s) => {
                ensure!(
                    s.len() == e.shape[0],
                    "parameter {}: scale has {} values for {} output units",
                    e.name,
                    s.len(),
                    e.shape[0]
                );
                match &mut e.scale {
                    Some((h, _)) if h.as_slice() == s => {}
                    Some((h, t)) => {
                        h.copy_from_slice(s);
                        t.copy_from(s);
                    }
                    slot => *slot = Some((s.to_vec(), dev.tensor_from_vec(s.to_vec(), (s.len(),)))),
                }
            }
        }
        Ok(())
    }

    /// The per-output-unit factor of a weight, if set.
    pub fn scale(&self, id: ParamId) -> Option<&Param> {
        self.entry(id).scale.as_ref().map(|(_, t)| t)
    }

    /// Host values of a weight's factor, if set.
    pub fn scale_host(&self, id: ParamId) -> Option<&[f32]> {
        self.entry(id).scale.as_ref().map(|(h, _)| h.as_slice())
    }

    /// The gradient of every trainable entry (zeros where the backward pass wrote none), in
    /// the order of [`Self::trainable`].
    pub fn gradients(&self, grads: &mut Gradients<f32, Cpu>) -> Result<Vec<Vec<f32>>> {
        self.trainable()
            .into_iter()
            .map(|id| {
                let e = self.entry(id);
                let g = grads
                    .get_or_alloc_mut(&e.dev)
                    .map_err(|err| anyhow!("gradient of {}: {err:?}", e.name))?;
                ensure!(
                    g.len() == e.host.len(),
                    "gradient of {} has {} values, expected {}",
                    e.name,
                    g.len(),
                    e.host.len()
                );
                Ok(g.to_vec())
            })
            .collect()
    }

    /// Every entry as a named tensor with its full shape (for a safetensors file).
    pub fn to_named(&self) -> Vec<NamedTensor> {
        self.entries
            .iter()
            .map(|e| NamedTensor {
                name: e.name.clone(),
                shape: e.shape.clone(),
                data: e.host.clone(),
            })
            .collect()
    }

    /// Loads every entry from a tensor file (names and shapes must match exactly, and the file
    /// must hold nothing else), then syncs the device tensors.
    pub fn load(&mut self, file: &TensorFile) -> Result<()> {
        for e in &self.entries {
            let t = file
                .tensors
                .get(&e.name)
                .ok_or_else(|| anyhow!("parameter {} missing from the file", e.name))?;
            ensure!(
                t.shape == e.shape,
                "parameter {}: file has shape {:?}, the model {:?}",
                e.name,
                t.shape,
                e.shape
            );
        }
        if let Some(extra) = file.tensors.keys().find(|k| self.find(k).is_none()) {
            bail!("the file holds {extra}, which the model does not have");
        }
        for e in &mut self.entries {
            e.host.copy_from_slice(&file.tensors[&e.name].data);
        }
        self.sync_all();
        Ok(())
    }
}
