//! Budget policies: how a refresh decides the new connectivity.
//!
//! A policy sees every pruned layer at once ([`PolicyContext`]) — scores, current masks and
//! degrees, the activities of the units its actuator acts on, gradients if it asked for them
//! — and answers one [`LayerPlan`] per layer: degree targets for the actuator (BB and the
//! reference surrogates), a complete mask (magnitude, GMP, RigL, SET, random), or no change.

mod balance;
mod baselines;
mod surrogates;

pub use balance::{
    balance_raw_target, matched_degrees, Balance, DensityScope, TrafficRule, TrafficThreshold,
};
pub use baselines::{
    Dense, DropGrow, Gmp, Magnitude, MagnitudeScope, RandomMask, Rigl, RiglInit, Set,
};
pub use surrogates::{ActivityOnly, InverseRate, QuantileInterpolation, TwoThreshold};

use crate::BbError;
use bb_actuators::{BitMask, EdgeShape, Side};
use rand_chacha::ChaCha8Rng;
use std::fmt::Debug;

/// One pruned layer as a policy sees it during a refresh.
#[derive(Debug)]
pub struct LayerView<'a> {
    /// Layer name.
    pub name: &'a str,
    /// Edge shape.
    pub shape: &'a EdgeShape,
    /// The side the layer's actuator selects over.
    pub side: Side,
    /// Whether the actuator may regrow dead edges.
    pub regrow: bool,
    /// Name of the population the actuator acts on.
    pub population: &'a str,
    /// On-rates of the actuated units (`None` if that population was never observed).
    pub activity: Option<&'a [f64]>,
    /// Edge scores `[out * in]`: kernel-summed `|W|` (dead edges: their stored value); empty
    /// when the policy's [`BudgetPolicy::needs_scores`] is `false`.
    pub scores: &'a [f32],
    /// Current mask.
    pub mask: &'a BitMask,
    /// Current live count of every actuated slab.
    pub degrees: &'a [u32],
    /// Kernel-summed `|dL/dW|` per edge, dense (only for policies that ask for gradients).
    pub grads: Option<&'a [f32]>,
}

impl LayerView<'_> {
    /// Number of actuated slabs (units).
    pub fn slabs(&self) -> usize {
        self.shape.slabs(self.side)
    }

    /// Full degree `D` of an actuated slab.
    pub fn slab_len(&self) -> usize {
        self.shape.slab_len(self.side)
    }

    /// Edges of the layer.
    pub fn edges(&self) -> usize {
        self.shape.edges()
    }

    /// The most a slab can keep: `D` with regrowth, its live count without.
    pub fn cap(&self, j: usize, prune_only: bool) -> u32 {
        if self.regrow && !prune_only {
            self.slab_len() as u32
        } else {
            self.degrees[j]
        }
    }

    /// The actuated units' activities, or an error saying which population to observe.
    pub fn activity(&self) -> Result<&[f64], BbError> {
        self.activity.ok_or_else(|| {
            BbError::layer(
                self.name,
                format!(
                    "its actuator needs the activity of population `{}`, which was never observed \
                     (call Pruner::observe with that population's activations)",
                    self.population
                ),
            )
        })
    }
}

/// Everything a policy may use during one refresh.
#[derive(Debug)]
pub struct PolicyContext<'a> {
    /// The step after which this refresh runs.
    pub step: u64,
    /// First refresh step (the end of the dense warm-up).
    pub warmup: u64,
    /// Length of training, if configured.
    pub total_steps: Option<u64>,
    /// The pruner's seeded generator (saved with its state).
    pub rng: &'a mut ChaCha8Rng,
    /// The pruned layers.
    pub layers: Vec<LayerView<'a>>,
}

/// What a policy wants done to one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerPlan {
    /// Keep the mask as it is.
    Keep,
    /// Slab `j` on `side` keeps its `targets[j]` strongest candidates; with `prune_only` no
    /// dead edge may return even if the actuator regrows.
    Degrees {
        /// Rows or columns.
        side: Side,
        /// One target per slab.
        targets: Vec<u32>,
        /// Restrict candidates to live edges.
        prune_only: bool,
    },
    /// Replace the mask.
    Mask {
        /// The new mask.
        mask: BitMask,
        /// Edges that come back start at zero (RigL, SET) instead of their stored value.
        grow_from_zero: bool,
    },
}

/// A plan plus the density the policy aimed at (for the refresh report).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDecision {
    /// What to do.
    pub plan: LayerPlan,
    /// Target density, if the policy has one.
    pub target_density: Option<f64>,
}

/// A budget policy plugin: `#[typetag::serde(tag = "kind")]`, named in configs with
/// `[policy] kind = "..."`. Policies may keep state between refreshes (it is saved with the
/// pruner).
#[typetag::serde(tag = "kind")]
pub trait BudgetPolicy: Debug + Send + Sync {
    /// Checks the parameters; errors name the field (`policy.beta`, ...).
    fn validate(&self) -> Result<(), BbError>;

    /// Checks the parameters against the layers they will run on (e.g. `k_min <= D`).
    fn validate_layer(&self, _name: &str, _shape: &EdgeShape, _side: Side) -> Result<(), BbError> {
        Ok(())
    }

    /// Whether refreshes need dense gradients ([`crate::Pruner::needs_gradients`]).
    fn needs_gradients(&self) -> bool {
        false
    }

    /// Whether [`LayerView::scores`] is read. A policy that plans from activity and degrees
    /// alone answers `false`, and its refreshes skip the score pass: the actuator then
    /// scores each slab as it selects it, and `scores` is empty.
    fn needs_scores(&self) -> bool {
        true
    }

    /// Decides one plan per layer of `ctx.layers`, in order.
    fn plan(&mut self, ctx: &mut PolicyContext<'_>) -> Result<Vec<LayerDecision>, BbError>;
}

pub(crate) fn check_density(field: &str, d: f64) -> Result<(), BbError> {
    if !(d > 0.0 && d <= 1.0) {
        return Err(BbError::config(
            field,
            format!("must be in (0, 1], got {d}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_k_min(
    k_min: u32,
    name: &str,
    shape: &EdgeShape,
    side: Side,
) -> Result<(), BbError> {
    let d = shape.slab_len(side);
    if k_min as usize > d {
        return Err(BbError::layer(
            name,
            format!("policy.k_min = {k_min} exceeds the full degree D = {d} of its {side:?} slabs"),
        ));
    }
    Ok(())
}

/// `round(density * n)` as an edge count.
pub(crate) fn edge_target(density: f64, n: usize) -> usize {
    crate::round_half_away(density * n as f64) as usize
}
