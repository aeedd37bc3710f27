//! The selectivity-audience law of Budgeted Broadcast, made executable.
//!
//! With independent binary units of on-rates `a_i` and fan-outs `k_i`, the coding entropy is
//! `sum_i H_b(a_i)`. Maximizing it under a traffic budget `sum_i a_i k_i <= T` gives the balance
//! `ln((1 - a_i)/a_i) = beta k_i`. This crate solves that problem and its inverses
//! ([`solver`]), fits the balance line to observed units ([`fit`]), locates the traffic peak
//! with a Lambert-W routine ([`mod@traffic`], [`lambert`]), and checks the paper's other claims
//! numerically: the actuators' linear response ([`response`]), the convergence of the BB
//! dynamics towards balance ([`dynamics`], driven by the engine itself), and the scaling of
//! training steps with width on DNF tasks ([`dnf`]).
//!
//! Architecture invariant: plain `f64` numerics on slices. No tensors and no ML framework; the
//! engine (bb-core, bb-actuators) is used only where a simulation needs its policies and
//! actuators.

pub mod dnf;
pub mod dynamics;
pub mod error;
pub mod fit;
pub mod lambert;
pub mod numeric;
pub mod response;
pub mod solver;
pub mod traffic;

pub use dnf::{dnf_scaling, DnfConfig, DnfScaling};
pub use dynamics::{simulate_dynamics, DynamicsConfig, DynamicsReport};
pub use error::{Result, TheoryError};
pub use fit::{fit_balance, BalanceFit, FitOptions};
pub use lambert::lambert_w0;
pub use response::{linear_response, ResponseConfig, ResponseReport};
pub use solver::{
    beta_for_budget, budget_for_beta, entropy, entropy_from_log_activity, kkt_residuals, solve,
    KktResiduals, Solution,
};
pub use traffic::{traffic, traffic_peak, traffic_peak_point, traffic_slope, TrafficPeak};
