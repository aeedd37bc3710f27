//! The Budgeted Broadcast engine.
//!
//! Every unit keeps a long-term on-rate `a_j` (an EMA of how often it fires). Every few steps
//! a [`BudgetPolicy`] turns the on-rates into per-unit degree targets — BB's balance rule is
//! `k*_j = clip(round(d0 + ln((1 - a_j) / a_j) / beta), k_min, D)` — and an [`Actuator`] keeps
//! only the `k*_j` strongest connections of each unit: SP-in over its fan-in (a row of the
//! layer that produces it), SP-out over its fan-out (a column of the layer that consumes it).
//!
//! The engine works on plain `f32` slices (or ndarray views) and knows no ML framework. A
//! training loop adds BB in three calls:
//!
//! ```
//! use bb_core::{Activations, Pruner, PrunerConfig, Topology};
//!
//! let topo = Topology::chain(&["fc1", "fc2"], &[8, 6, 3]).unwrap();
//! let cfg: PrunerConfig = toml::from_str(r#"
//!     [schedule]
//!     warmup_steps = 2
//!     refresh_every = 2
//!     [policy]
//!     kind = "balance"
//!     beta = 0.5
//!     target_density = 0.5
//!     [actuator]
//!     kind = "sp_in"
//! "#).unwrap();
//! let mut pruner = Pruner::new(cfg, topo).unwrap();
//! let (mut w1, mut w2) = (vec![0.3f32; 6 * 8], vec![0.2f32; 3 * 6]);
//! for step in 0..4 {
//!     let hidden = vec![step as f32 - 1.0; 4 * 6]; // [batch 4, units 6], from your forward pass
//!     pruner.observe("fc1", Activations::batch_major(&hidden, 4, 6)).unwrap(); // 1. observe
//!     // ... backward, optimizer update ...
//!     pruner.step(&mut [&mut w1[..], &mut w2[..]], None).unwrap();          // 2. refresh on schedule
//!     pruner.apply_mask(0, &mut w1).unwrap();                               // 3. keep dead edges at zero
//! }
//! assert_eq!(pruner.mask(0).count(), 24); // fc1 (it produces the hidden units) at density 0.5
//! ```
//!
//! Conventions (METHOD.md §1): weights are `[out, in, kernel...]`, rows are output units. The
//! fan-in of a unit is its row in the layer that produces it; its fan-out is its column in the
//! layer that consumes it. Units are grouped in named *populations*; a [`Topology`] says which
//! population each layer reads and writes.

#![warn(missing_docs)]

mod error;
pub mod policy;
mod pruner;
mod registry;
mod schedule;
pub mod sparse;
mod topology;
pub mod tracker;

pub use bb_actuators::{Actuator, BitMask, EdgeShape, Rescale, Side};
pub use error::BbError;
pub use policy::{BudgetPolicy, LayerDecision, LayerPlan, LayerView, PolicyContext};
pub use pruner::{
    DegreeStats, LayerOverride, LayerReport, Pruner, PrunerConfig, RefreshReport, TrafficStats,
};
pub use registry::{registered_policies, registered_trackers};
pub use schedule::Schedule;
pub use topology::{LayerSpec, Population, Topology};
pub use tracker::{Activations, ActivityTracker, Layout};

/// Activities are clamped to `[EPS, 1 - EPS]` before `ln((1 - a) / a)` is taken.
pub const EPS: f64 = 1e-4;

/// `ln((1 - a) / a)` with `a` clamped to `[EPS, 1 - EPS]`: the selectivity of a unit.
pub fn log_odds_off(a: f64) -> f64 {
    let a = a.clamp(EPS, 1.0 - EPS);
    ((1.0 - a) / a).ln()
}

/// Round half away from zero (the rounding used everywhere in the engine).
pub fn round_half_away(x: f64) -> f64 {
    x.round()
}
