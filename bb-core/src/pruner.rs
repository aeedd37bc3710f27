//! The pruning controller: per-layer state and the observe -> policy -> actuator loop.

use crate::policy::{LayerDecision, LayerPlan, LayerView, PolicyContext};
use crate::tracker::EmaOnRate;
use crate::{Activations, ActivityTracker, BbError, BudgetPolicy, Schedule, Topology};
use bb_actuators::{
    edge_scores, refresh_targets, rescale_factors, sync_weights, zero_dead, Actuator,
    ActuatorScratch, BitMask, EdgeShape, Rescale, Side, SyncStats,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn default_tracker() -> Box<dyn ActivityTracker> {
    Box::new(EmaOnRate::default())
}

/// Per-layer settings that differ from the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    /// Prune this layer or not (default: pruned when its actuator acts on hidden units).
    #[serde(default)]
    pub prune: Option<bool>,
    /// This layer's actuator (default: the config's `actuator`).
    #[serde(default)]
    pub actuator: Option<Actuator>,
}

/// The pruning section of an experiment config (TOML or JSON).
///
/// ```toml
/// seed = 0
/// [schedule]
/// warmup_steps = 100
/// refresh_every = 25
/// [tracker]
/// kind = "ema_on_rate"      # threshold = 0, decay = 0.95, init = 0.5
/// [policy]
/// kind = "balance"
/// beta = 0.05
/// target_density = 0.5
/// [actuator]
/// kind = "sp_in"            # regrow = true, rescale = "sqrt"
/// [layers.fc3]
/// prune = false
/// ```
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrunerConfig {
    /// Seed of the pruner's generator (random masks, SET).
    #[serde(default)]
    pub seed: u64,
    /// When refreshes run.
    #[serde(default)]
    pub schedule: Schedule,
    /// How on-rates are measured (default `ema_on_rate`).
    #[serde(default = "default_tracker")]
    pub tracker: Box<dyn ActivityTracker>,
    /// How connectivity is decided.
    pub policy: Box<dyn BudgetPolicy>,
    /// Default actuator of every layer (default `sp_in`).
    #[serde(default)]
    pub actuator: Actuator,
    /// Per-layer overrides, by layer name.
    #[serde(default)]
    pub layers: BTreeMap<String, LayerOverride>,
}

impl Clone for PrunerConfig {
    fn clone(&self) -> Self {
        let v = serde_json::to_value(self).expect("configs serialize");
        serde_json::from_value(v).expect("a serialized config deserializes")
    }
}

impl PrunerConfig {
    /// Parses and validates a TOML config.
    pub fn from_toml_str(s: &str) -> Result<Self, BbError> {
        let c: Self =
            toml::from_str(s).map_err(|e| BbError::Parse(format!("pruning config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Parses and validates a JSON config.
    pub fn from_json_str(s: &str) -> Result<Self, BbError> {
        let c: Self =
            serde_json::from_str(s).map_err(|e| BbError::Parse(format!("pruning config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// The config as TOML.
    pub fn to_toml_string(&self) -> Result<String, BbError> {
        toml::to_string(self).map_err(|e| BbError::Parse(e.to_string()))
    }

    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<(), BbError> {
        self.schedule.validate()?;
        self.tracker.validate()?;
        self.policy.validate()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PopState {
    rate: Vec<f64>,
    observations: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerState {
    shape: EdgeShape,
    prune: bool,
    actuator: Actuator,
    mask: BitMask,
    /// Last live values of dead weights (`[out, in, kernel...]`, meaningful at dead edges).
    shadow: Vec<f32>,
    /// Rescale factor per output unit (when the actuator rescales).
    scale: Option<Vec<f32>>,
}

#[derive(Debug, Default)]
struct Scratch {
    tracker: Vec<f64>,
    scores: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    degrees: Vec<Vec<u32>>,
    old: Vec<BitMask>,
    actuator: ActuatorScratch,
    /// Per layer: where each slab's last threshold fell (speeds up the next selection only).
    hints: Vec<Vec<u64>>,
    /// Per layer: whether `degrees` holds the current mask's degrees (counted at the end of
    /// the last refresh, the mask unchanged since).
    counted: Vec<bool>,
}

/// Minimum, mean and maximum live degree of a layer's actuated slabs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DegreeStats {
    /// Rows (fan-in, SP-in) or columns (fan-out, SP-out).
    pub side: Side,
    /// Smallest degree.
    pub min: u32,
    /// Mean degree.
    pub mean: f64,
    /// Largest degree.
    pub max: u32,
}

/// Traffic `t_j = a_j * k_j` of a layer's input units, `k_j` their fan-out into the layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficStats {
    /// The input population.
    pub population: String,
    /// Mean over units.
    pub mean: f64,
    /// Largest.
    pub max: f64,
    /// Sum over units.
    pub total: f64,
}

/// What one refresh did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Layer name.
    pub layer: String,
    /// Density the policy aimed at, if it has one.
    pub target_density: Option<f64>,
    /// Live edges / edges after the refresh.
    pub achieved_density: f64,
    /// Live edges.
    pub live_edges: usize,
    /// Edges.
    pub edges: usize,
    /// Degrees of the actuated slabs.
    pub degrees: DegreeStats,
    /// Traffic of the input units (when their activity has been observed).
    pub traffic: Option<TrafficStats>,
    /// Fraction of edges whose state changed.
    pub churn: f64,
    /// Edges that died.
    pub died: usize,
    /// Edges that came back.
    pub born: usize,
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshReport {
    /// The step after which it ran.
    pub step: u64,
    /// One entry per pruned layer.
    pub layers: Vec<LayerReport>,
    /// Live edges / edges over the pruned layers.
    pub density: f64,
}

/// The pruning controller. It owns every layer's mask, the shadow values of dead weights,
/// the populations' on-rates and the rescale factors, and runs
/// observe -> policy -> actuator on its schedule.
///
/// The whole state serializes (serde, e.g. JSON) and loads back to identical behaviour.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pruner {
    config: PrunerConfig,
    topology: Topology,
    step: u64,
    rng: ChaCha8Rng,
    populations: Vec<PopState>,
    layers: Vec<LayerState>,
    #[serde(skip)]
    scratch: Scratch,
}

impl Pruner {
    /// Validates `config` against `topology` and builds a pruner with every edge live.
    pub fn new(config: PrunerConfig, topology: Topology) -> Result<Self, BbError> {
        config.validate()?;
        topology.validate()?;
        for name in config.layers.keys() {
            if topology.layer_index(name).is_none() {
                return Err(BbError::config(
                    format!("layers.{name}"),
                    "no layer of that name in the model",
                ));
            }
        }
        let mut layers = Vec::with_capacity(topology.layers.len());
        for (l, spec) in topology.layers.iter().enumerate() {
            let shape = topology.shape(l);
            let ov = config.layers.get(&spec.name).cloned().unwrap_or_default();
            let actuator = ov.actuator.unwrap_or_else(|| config.actuator.clone());
            let acted_on = match actuator.side() {
                Side::Rows => &spec.output,
                Side::Columns => &spec.input,
            };
            let prune = ov.prune.unwrap_or_else(|| topology.is_hidden(acted_on));
            if prune {
                config
                    .policy
                    .validate_layer(&spec.name, &shape, actuator.side())?;
            }
            let scale =
                (prune && actuator.rescale() != Rescale::None).then(|| vec![1.0; shape.out]);
            layers.push(LayerState {
                mask: BitMask::full(shape.out, shape.inp),
                shadow: if prune {
                    vec![0.0; shape.weight_len()]
                } else {
                    Vec::new()
                },
                shape,
                prune,
                actuator,
                scale,
            });
        }
        if !layers.iter().any(|l| l.prune) {
            return Err(BbError::config(
                "layers",
                "no layer is pruned: by default a layer is pruned when its actuator acts on hidden units \
                 (produced by one layer and consumed by another); set layers.<name>.prune = true",
            ));
        }
        let init = config.tracker.init_rate();
        let populations = topology
            .populations
            .iter()
            .map(|p| PopState {
                rate: vec![init; p.units],
                observations: 0,
            })
            .collect();
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            topology,
            step: 0,
            populations,
            layers,
            scratch: Scratch::default(),
        })
    }

    /// Loads a saved state (JSON) and checks it is consistent.
    pub fn from_json(s: &str) -> Result<Self, BbError> {
        let p: Self =
            serde_json::from_str(s).map_err(|e| BbError::Parse(format!("pruner state: {e}")))?;
        p.config.validate()?;
        p.topology.validate()?;
        if p.layers.len() != p.topology.layers.len()
            || p.populations.len() != p.topology.populations.len()
        {
            return Err(BbError::Parse(
                "pruner state: layer or population count does not match its topology".into(),
            ));
        }
        for (l, st) in p.layers.iter().enumerate() {
            let name = &p.topology.layers[l].name;
            let ok = st.shape == p.topology.shape(l)
                && st.mask.rows() == st.shape.out
                && st.mask.cols() == st.shape.inp
                && (!st.prune || st.shadow.len() == st.shape.weight_len());
            if !ok {
                return Err(BbError::layer(
                    name,
                    "saved state does not match the layer's shape",
                ));
            }
        }
        Ok(p)
    }

    /// The state as JSON.
    pub fn to_json(&self) -> Result<String, BbError> {
        serde_json::to_string(self).map_err(|e| BbError::Parse(e.to_string()))
    }

    /// The config.
    pub fn config(&self) -> &PrunerConfig {
        &self.config
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Completed steps.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Whether the refresh after the next step needs gradients (pass them to [`Self::step`]).
    pub fn needs_gradients(&self) -> bool {
        self.config.policy.needs_gradients() && self.config.schedule.is_refresh(self.step + 1)
    }

    /// Updates the on-rates of `population` from one batch of its activations.
    /// Call it in training mode only, once per step and population.
    pub fn observe(&mut self, population: &str, acts: Activations<'_>) -> Result<(), BbError> {
        let p = self
            .topology
            .pop_index(population)
            .ok_or_else(|| BbError::Population {
                population: population.into(),
                msg: format!(
                    "no such population (known: {})",
                    self.topology
                        .populations
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        let st = &mut self.populations[p];
        self.config
            .tracker
            .observe(&mut st.rate, &acts, &mut self.scratch.tracker)
            .map_err(|e| e.in_population(population))?;
        st.observations += 1;
        Ok(())
    }

    /// Sets the on-rates of a population directly (from a tracker outside the engine, or an
    /// exported activity vector). Values must be finite and in `[0, 1]`.
    pub fn set_activity(&mut self, population: &str, rates: &[f64]) -> Result<(), BbError> {
        let err = |msg: String| BbError::Population {
            population: population.into(),
            msg,
        };
        let p = self
            .topology
            .pop_index(population)
            .ok_or_else(|| err("no such population".into()))?;
        let st = &mut self.populations[p];
        if rates.len() != st.rate.len() {
            return Err(err(format!(
                "{} activities given for {} units",
                rates.len(),
                st.rate.len()
            )));
        }
        if let Some(i) = rates.iter().position(|a| !(0.0..=1.0).contains(a)) {
            return Err(err(format!(
                "activity {} at index {i} is not in [0, 1]",
                rates[i]
            )));
        }
        st.rate.copy_from_slice(rates);
        st.observations = st.observations.max(1);
        Ok(())
    }

    /// Replaces the mask of layer `l` (e.g. one loaded from a file). The weights of edges that
    /// die move to the shadow store and are zeroed in `weights`; edges that come back get their
    /// stored values.
    pub fn set_mask(
        &mut self,
        l: usize,
        mask: BitMask,
        weights: &mut [f32],
    ) -> Result<(), BbError> {
        let name = self
            .topology
            .layers
            .get(l)
            .map(|s| s.name.clone())
            .ok_or_else(|| BbError::layer(l.to_string(), "no such layer index"))?;
        let st = &mut self.layers[l];
        if mask.rows() != st.shape.out || mask.cols() != st.shape.inp {
            return Err(BbError::layer(
                &name,
                format!(
                    "mask is [{}, {}], the layer is [{}, {}]",
                    mask.rows(),
                    mask.cols(),
                    st.shape.out,
                    st.shape.inp
                ),
            ));
        }
        if !st.prune {
            return Err(BbError::layer(&name, "the layer is not pruned"));
        }
        sync_weights(&st.shape, &st.mask, &mask, weights, &mut st.shadow, false)
            .map_err(|e| BbError::from_actuator(&name, e))?;
        st.mask = mask;
        if let Some(scale) = st.scale.as_mut() {
            rescale_factors(st.actuator.rescale(), &st.mask, scale);
        }
        // The layer's refresh hints and counted degrees describe the old mask and shadow.
        if let Some(h) = self.scratch.hints.get_mut(l) {
            h.clear();
        }
        if let Some(c) = self.scratch.counted.get_mut(l) {
            *c = false;
        }
        Ok(())
    }

    /// The on-rates of a population (the initial rate until it has been observed).
    pub fn activity(&self, population: &str) -> Option<&[f64]> {
        self.topology
            .pop_index(population)
            .map(|p| self.populations[p].rate.as_slice())
    }

    /// Whether a population has been observed at least once.
    pub fn observed(&self, population: &str) -> bool {
        self.topology
            .pop_index(population)
            .is_some_and(|p| self.populations[p].observations > 0)
    }

    /// The mask of layer `l`.
    pub fn mask(&self, l: usize) -> &BitMask {
        &self.layers[l].mask
    }

    /// Whether layer `l` is pruned.
    pub fn is_pruned(&self, l: usize) -> bool {
        self.layers[l].prune
    }

    /// The actuator of layer `l`.
    pub fn actuator(&self, l: usize) -> &Actuator {
        &self.layers[l].actuator
    }

    /// Rescale factors of layer `l`'s output units, if its actuator rescales: multiply unit
    /// `j`'s pre-activation `W_j . x` (before the bias) by `scale[j]`.
    pub fn scale(&self, l: usize) -> Option<&[f32]> {
        self.layers[l].scale.as_deref()
    }

    /// Fan-in of every unit of `population`: live inputs in the layers that produce it.
    pub fn fan_in(&self, population: &str) -> Option<Vec<u32>> {
        let p = self.topology.pop_index(population)?;
        let mut out = vec![0u32; self.topology.populations[p].units];
        let mut buf = out.clone();
        for (l, spec) in self.topology.layers.iter().enumerate() {
            if spec.output == population {
                self.layers[l].mask.row_counts_into(&mut buf);
                out.iter_mut().zip(&buf).for_each(|(o, b)| *o += b);
            }
        }
        Some(out)
    }

    /// Fan-out of every unit of `population`: live outputs in the layers that consume it.
    pub fn fan_out(&self, population: &str) -> Option<Vec<u32>> {
        let p = self.topology.pop_index(population)?;
        let mut out = vec![0u32; self.topology.populations[p].units];
        let mut buf = out.clone();
        for (l, spec) in self.topology.layers.iter().enumerate() {
            if spec.input == population {
                self.layers[l].mask.col_counts_into(&mut buf);
                out.iter_mut().zip(&buf).for_each(|(o, b)| *o += b);
            }
        }
        Some(out)
    }

    /// Live edges / edges over the pruned layers.
    pub fn density(&self) -> f64 {
        let (live, all) = self
            .layers
            .iter()
            .filter(|l| l.prune)
            .fold((0, 0), |(a, b), l| {
                (a + l.mask.count(), b + l.shape.edges())
            });
        live as f64 / all.max(1) as f64
    }

    /// Zeroes the dead edges of layer `l` in `buf` (its weights after an optimizer update, or
    /// its gradients before one). Allocation-free.
    pub fn apply_mask(&self, l: usize, buf: &mut [f32]) -> Result<(), BbError> {
        let st = self
            .layers
            .get(l)
            .ok_or_else(|| BbError::layer(l.to_string(), "no such layer index"))?;
        zero_dead(&st.shape, &st.mask, buf)
            .map_err(|e| BbError::from_actuator(&self.topology.layers[l].name, e))
    }

    /// Zeroes the gradients of dead edges (same as [`Self::apply_mask`]).
    pub fn mask_gradients(&self, l: usize, grads: &mut [f32]) -> Result<(), BbError> {
        self.apply_mask(l, grads)
    }

    /// Counts one completed optimizer step and refreshes if the schedule says so.
    ///
    /// `weights` holds every layer's weights (`[out, in, kernel...]`), in topology order; a
    /// refresh edits them in place: edges that die are zeroed (their values go to the shadow
    /// store), edges that come back get their stored values. `grads` (same layout) is needed
    /// only when [`Self::needs_gradients`] said so before the step.
    pub fn step(
        &mut self,
        weights: &mut [&mut [f32]],
        grads: Option<&[&[f32]]>,
    ) -> Result<Option<RefreshReport>, BbError> {
        self.step += 1;
        if !self.config.schedule.is_refresh(self.step) {
            return Ok(None);
        }
        self.refresh(weights, grads).map(Some)
    }

    /// Runs one refresh now, whatever the schedule (the step count is unchanged).
    ///
    /// Shape and length errors are found before anything changes. A non-finite weight is an
    /// error naming its layer and index; under a policy that reads scores it is found before
    /// anything changes too, but under one that plans degree targets (BB) each layer is scored
    /// as it is refreshed, so earlier layers, and the rows of the bad layer that hold no bad
    /// value, may already be refreshed when it is reported (every row's mask and weights stay
    /// consistent; that layer's rescale factors are not updated). Training should stop there.
    pub fn refresh(
        &mut self,
        weights: &mut [&mut [f32]],
        grads: Option<&[&[f32]]>,
    ) -> Result<RefreshReport, BbError> {
        let Pruner {
            config,
            topology,
            step,
            rng,
            populations,
            layers,
            scratch,
        } = self;
        let names: Vec<&str> = topology.layers.iter().map(|l| l.name.as_str()).collect();
        if weights.len() != layers.len() {
            return Err(BbError::config(
                "weights",
                format!(
                    "expected {} layers of weights, got {}",
                    layers.len(),
                    weights.len()
                ),
            ));
        }
        if let Some(g) = grads {
            if g.len() != layers.len() {
                return Err(BbError::config(
                    "grads",
                    format!(
                        "expected {} layers of gradients, got {}",
                        layers.len(),
                        g.len()
                    ),
                ));
            }
        }
        let n = layers.len();
        scratch.scores.resize_with(n, Vec::new);
        scratch.grads.resize_with(n, Vec::new);
        scratch.degrees.resize_with(n, Vec::new);
        scratch.counted.resize(n, false);
        scratch.old.resize_with(n, || BitMask::empty(0, 0));
        scratch.hints.resize_with(n, Vec::new);
        let pruned: Vec<usize> = (0..n).filter(|&l| layers[l].prune).collect();
        let want_grads = config.policy.needs_gradients();
        let want_scores = config.policy.needs_scores();
        for &l in &pruned {
            let st = &layers[l];
            let name = names[l];
            if weights[l].len() != st.shape.weight_len() {
                return Err(BbError::layer(
                    name,
                    format!(
                        "weights have {} values, expected {} ({:?})",
                        weights[l].len(),
                        st.shape.weight_len(),
                        st.shape
                    ),
                ));
            }
            if want_scores {
                let scores = &mut scratch.scores[l];
                scores.resize(st.shape.edges(), 0.0);
                edge_scores(&st.shape, weights[l], &st.shadow, &st.mask, scores)
                    .map_err(|e| BbError::from_actuator(name, e))?;
            }
            let side = st.actuator.side();
            let deg = &mut scratch.degrees[l];
            if !scratch.counted[l] || deg.len() != st.shape.slabs(side) {
                deg.resize(st.shape.slabs(side), 0);
                slab_degrees(&st.mask, side, deg);
            }
            if let (true, Some(g)) = (want_grads, grads) {
                let g = g[l];
                if g.len() != st.shape.weight_len() {
                    return Err(BbError::layer(
                        name,
                        format!(
                            "gradients have {} values, expected {}",
                            g.len(),
                            st.shape.weight_len()
                        ),
                    ));
                }
                if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                    return Err(BbError::layer(
                        name,
                        format!("non-finite gradient at flat index {i}"),
                    ));
                }
                let kl = st.shape.kernel_len();
                let gs = &mut scratch.grads[l];
                gs.clear();
                gs.extend(g.chunks(kl).map(|c| c.iter().map(|x| x.abs()).sum::<f32>()));
            }
        }
        let views: Vec<LayerView<'_>> = pruned
            .iter()
            .map(|&l| {
                let st = &layers[l];
                let spec = &topology.layers[l];
                let pop_name = match st.actuator.side() {
                    Side::Rows => &spec.output,
                    Side::Columns => &spec.input,
                };
                let p = topology.pop_index(pop_name).expect("validated");
                LayerView {
                    name: names[l],
                    shape: &st.shape,
                    side: st.actuator.side(),
                    regrow: st.actuator.regrow(),
                    population: pop_name,
                    activity: (populations[p].observations > 0)
                        .then_some(populations[p].rate.as_slice()),
                    scores: if want_scores { &scratch.scores[l] } else { &[] },
                    mask: &st.mask,
                    degrees: &scratch.degrees[l],
                    grads: (want_grads && grads.is_some()).then_some(scratch.grads[l].as_slice()),
                }
            })
            .collect();
        let mut ctx = PolicyContext {
            step: *step,
            warmup: config.schedule.warmup(),
            total_steps: config.schedule.total_steps,
            rng,
            layers: views,
        };
        let decisions = config.policy.plan(&mut ctx)?;
        drop(ctx);
        if decisions.len() != pruned.len() {
            return Err(BbError::Parse(format!(
                "policy returned {} plans for {} layers",
                decisions.len(),
                pruned.len()
            )));
        }
        let mut reports = Vec::with_capacity(pruned.len());
        for (
            &l,
            LayerDecision {
                plan,
                target_density,
            },
        ) in pruned.iter().zip(decisions)
        {
            let name = names[l];
            let st = &mut layers[l];
            // Valid again below, once the layer's mask is final.
            scratch.counted[l] = false;
            // Whether the degrees below (counted before the plan, see above) already are
            // those of the final mask, so that it need not be counted again.
            let mut derived = false;
            let stats = match plan {
                LayerPlan::Keep => {
                    derived = true;
                    SyncStats::default()
                }
                // Selection and weight moves in one pass per slab, scoring as it goes.
                LayerPlan::Degrees {
                    side,
                    targets,
                    prune_only,
                } => {
                    let regrow = st.actuator.regrow() && !prune_only;
                    let stats = refresh_targets(
                        side,
                        &st.shape,
                        weights[l],
                        &mut st.shadow,
                        &targets,
                        regrow,
                        &mut st.mask,
                        &mut scratch.actuator,
                        &mut scratch.hints[l],
                    )
                    .map_err(|e| BbError::from_actuator(name, e))?;
                    // Slab `j` now keeps `min(targets[j], its candidates)`: all of its
                    // entries with regrowth, its live ones (counted before) without.
                    let deg = &mut scratch.degrees[l];
                    if side == st.actuator.side() && deg.len() == targets.len() {
                        let all = st.shape.slab_len(side) as u32;
                        for (d, &t) in deg.iter_mut().zip(&targets) {
                            *d = t.min(if regrow { all } else { *d });
                        }
                        derived = true;
                    }
                    stats
                }
                LayerPlan::Mask {
                    mask,
                    grow_from_zero,
                } => {
                    if mask.rows() != st.shape.out || mask.cols() != st.shape.inp {
                        return Err(BbError::layer(
                            name,
                            "policy returned a mask of the wrong shape",
                        ));
                    }
                    let old = &mut scratch.old[l];
                    old.clone_from(&st.mask);
                    st.mask = mask;
                    // Hints are kept only between degree-target refreshes.
                    scratch.hints[l].clear();
                    sync_weights(
                        &st.shape,
                        old,
                        &st.mask,
                        weights[l],
                        &mut st.shadow,
                        grow_from_zero,
                    )
                    .map_err(|e| BbError::from_actuator(name, e))?
                }
            };
            if let Some(scale) = st.scale.as_mut() {
                rescale_factors(st.actuator.rescale(), &st.mask, scale);
            }
            let side = st.actuator.side();
            let deg = &mut scratch.degrees[l];
            if !derived {
                slab_degrees(&st.mask, side, deg);
            }
            debug_assert!(
                {
                    let mut counted = vec![0; deg.len()];
                    slab_degrees(&st.mask, side, &mut counted);
                    counted == *deg
                },
                "layer `{name}`: degrees after the refresh differ from the mask's counts"
            );
            scratch.counted[l] = true;
            let degrees = DegreeStats {
                side,
                min: deg.iter().copied().min().unwrap_or(0),
                max: deg.iter().copied().max().unwrap_or(0),
                mean: deg.iter().map(|&d| d as f64).sum::<f64>() / deg.len().max(1) as f64,
            };
            let spec = &topology.layers[l];
            let p = topology.pop_index(&spec.input).expect("validated");
            let traffic = (populations[p].observations > 0).then(|| {
                // Fan-outs: SP-out's degrees are the column counts already.
                let mut fan_out = Vec::new();
                let k: &[u32] = if side == Side::Columns {
                    deg
                } else {
                    fan_out.resize(st.shape.inp, 0);
                    st.mask.col_counts_into(&mut fan_out);
                    &fan_out
                };
                let t: Vec<f64> = populations[p]
                    .rate
                    .iter()
                    .zip(k)
                    .map(|(&a, &k)| a * k as f64)
                    .collect();
                TrafficStats {
                    population: spec.input.clone(),
                    mean: t.iter().sum::<f64>() / t.len() as f64,
                    max: t.iter().copied().fold(0.0, f64::max),
                    total: t.iter().sum(),
                }
            });
            // The degrees on either side add up to the live edges.
            let live = deg.iter().map(|&d| d as usize).sum::<usize>();
            reports.push(LayerReport {
                layer: name.to_string(),
                target_density,
                achieved_density: live as f64 / st.shape.edges() as f64,
                live_edges: live,
                edges: st.shape.edges(),
                degrees,
                traffic,
                churn: (stats.died + stats.born) as f64 / st.shape.edges() as f64,
                died: stats.died,
                born: stats.born,
            });
        }
        let (live, all) = reports
            .iter()
            .fold((0, 0), |(a, b), r| (a + r.live_edges, b + r.edges));
        Ok(RefreshReport {
            step: *step,
            layers: reports,
            density: live as f64 / all.max(1) as f64,
        })
    }
}

/// The live count of every slab of `mask` on `side` (rows or columns) into `out`.
fn slab_degrees(mask: &BitMask, side: Side, out: &mut [u32]) {
    match side {
        Side::Rows => mask.row_counts_into(out),
        Side::Columns => mask.col_counts_into(out),
    }
}
