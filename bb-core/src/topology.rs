use crate::BbError;
use bb_actuators::EdgeShape;
use serde::{Deserialize, Serialize};

/// A named group of units (the outputs of one layer, or the model input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Population {
    /// Name used in [`crate::Pruner::observe`].
    pub name: String,
    /// Number of units (channels, for convolutions).
    pub units: usize,
}

/// One masked layer: it reads population `input` and writes population `output`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Layer name (unique).
    pub name: String,
    /// Population whose units are this layer's columns.
    pub input: String,
    /// Population whose units are this layer's rows.
    pub output: String,
    /// Kernel dims (`[]` for a dense layer).
    #[serde(default)]
    pub kernel: Vec<usize>,
}

/// The wiring of a model as the engine sees it: populations of units and the layers between
/// them.
///
/// A unit's fan-in lives in the layer that produces it (its row) and its fan-out in the layer
/// that consumes it (its column). A population that some layer produces and some layer
/// consumes is *hidden*; by default BB prunes a layer when its actuator acts on hidden units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Unit populations.
    pub populations: Vec<Population>,
    /// Layers, in the order their weights are passed to [`crate::Pruner::step`].
    pub layers: Vec<LayerSpec>,
}

impl Topology {
    /// An empty topology (add populations and layers with the builder methods).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a population.
    pub fn population(mut self, name: &str, units: usize) -> Self {
        self.populations.push(Population {
            name: name.into(),
            units,
        });
        self
    }

    /// Adds a dense layer from population `input` to population `output`.
    pub fn layer(self, name: &str, input: &str, output: &str) -> Self {
        self.conv_layer(name, input, output, &[])
    }

    /// Adds a convolution (kernel dims `kernel`) from `input` channels to `output` channels.
    pub fn conv_layer(mut self, name: &str, input: &str, output: &str, kernel: &[usize]) -> Self {
        self.layers.push(LayerSpec {
            name: name.into(),
            input: input.into(),
            output: output.into(),
            kernel: kernel.to_vec(),
        });
        self
    }

    /// A chain (MLP): `widths[0]` inputs, then one layer per name with `widths[i + 1]`
    /// outputs. The input population is called `"input"`; every other population has the
    /// name of the layer that produces it.
    pub fn chain(names: &[&str], widths: &[usize]) -> Result<Self, BbError> {
        if widths.len() != names.len() + 1 {
            return Err(BbError::config(
                "topology.widths",
                format!(
                    "{} layers need {} widths, got {}",
                    names.len(),
                    names.len() + 1,
                    widths.len()
                ),
            ));
        }
        let mut t = Topology::new().population("input", widths[0]);
        let mut prev = "input".to_string();
        for (i, name) in names.iter().enumerate() {
            t = t.population(name, widths[i + 1]).layer(name, &prev, name);
            prev = name.to_string();
        }
        t.validate()?;
        Ok(t)
    }

    /// Checks names are unique, references resolve and sizes are positive.
    pub fn validate(&self) -> Result<(), BbError> {
        for (i, p) in self.populations.iter().enumerate() {
            if p.units == 0 {
                return Err(BbError::config(
                    format!("topology.populations.{}", p.name),
                    "units must be > 0",
                ));
            }
            if self.populations[..i].iter().any(|q| q.name == p.name) {
                return Err(BbError::config(
                    "topology.populations",
                    format!("duplicate name `{}`", p.name),
                ));
            }
        }
        if self.layers.is_empty() {
            return Err(BbError::config(
                "topology.layers",
                "at least one layer is needed",
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if self.layers[..i].iter().any(|m| m.name == l.name) {
                return Err(BbError::config(
                    "topology.layers",
                    format!("duplicate layer name `{}`", l.name),
                ));
            }
            for (what, p) in [("input", &l.input), ("output", &l.output)] {
                if self.pop_index(p).is_none() {
                    return Err(BbError::layer(
                        &l.name,
                        format!("{what} population `{p}` is not declared"),
                    ));
                }
            }
            if l.kernel.contains(&0) {
                return Err(BbError::layer(
                    &l.name,
                    format!("kernel dims must be positive, got {:?}", l.kernel),
                ));
            }
        }
        Ok(())
    }

    /// Index of a population by name.
    pub fn pop_index(&self, name: &str) -> Option<usize> {
        self.populations.iter().position(|p| p.name == name)
    }

    /// Index of a layer by name.
    pub fn layer_index(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.name == name)
    }

    /// The edge shape of layer `l`.
    pub fn shape(&self, l: usize) -> EdgeShape {
        let spec = &self.layers[l];
        let units = |n: &str| self.populations[self.pop_index(n).expect("validated")].units;
        EdgeShape::conv(units(&spec.output), units(&spec.input), &spec.kernel)
    }

    /// Whether population `name` is produced by one layer and consumed by another.
    pub fn is_hidden(&self, name: &str) -> bool {
        self.layers.iter().any(|l| l.output == name) && self.layers.iter().any(|l| l.input == name)
    }
}
