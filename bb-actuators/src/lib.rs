//! Selection kernels of Budgeted Broadcast.
//!
//! This crate is the framework-free bottom layer of the engine. It knows the
//! masked-layer model of the method (an `[out, in]` edge matrix, optional kernel dims,
//! a 1-bit-per-edge mask) and turns per-slab degree targets into masks:
//!
//! * **SP-in** keeps the `k_j` strongest entries of row `j` (the fan-in of output unit `j`);
//! * **SP-out** keeps the `k_j` strongest entries of column `j` (the fan-out, into this
//!   layer, of input unit `j`).
//!
//! Scores are kernel-summed magnitudes `S[o,i] = sum |W[o,i,..]|`; dead edges are scored by
//! the value they had when they died (the shadow store), so with regrowth a dead edge
//! returns once the live ones shrink below it. Ties break toward the lower index, so masks
//! are deterministic. Selection is O(n) per slab (a radix select on packed keys, never a
//! sort), runs in parallel over slabs, and reuses caller-owned scratch.
//!
//! Two ways to run a refresh, with identical results: the separate steps
//! ([`edge_scores`] into a score buffer, [`apply_targets`], [`sync_weights`]) for policies
//! that look at the scores themselves, and [`refresh_targets`], which does all three while
//! each row is in cache and never materialises the scores (SP-in reads the weights once).
//!
//! bb-core builds the activity trackers, budget policies and the pruner on top of this.

#![warn(missing_docs)]

mod actuator;
mod error;
mod flat;
mod fused;
mod mask;
mod select;
mod shape;
mod simd;

pub use actuator::{
    apply_targets, rescale_factors, sync_weights, zero_dead, Actuator, ActuatorScratch, Rescale,
    Side, SyncStats,
};
pub use error::ActuatorError;
pub use fused::refresh_targets;
pub use mask::{byte_lanes, BitMask};
pub use select::{
    key_of, select_top_k, threshold_key, threshold_key_bracketed, threshold_key_preserving,
    threshold_key_with, Histogram, NOT_A_CANDIDATE,
};
pub use shape::{edge_scores, EdgeShape};
pub use simd::prefetch_near;
