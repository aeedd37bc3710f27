//! Convergence scaling on DNF tasks: training steps to a fixed accuracy versus width.
//!
//! # The task
//! A width-`W` task is a monotone DNF of `W` terms, each the AND of `literals` variables, over
//! `n = W * literals` Boolean inputs partitioned into disjoint blocks (one per term). Inputs are
//! i.i.d. Bernoulli(`p`) with `p = (1 - 2^{-1/W})^{1/literals}`, so the label is 1 with
//! probability exactly 1/2 at every width and each term is a rare feature (it fires with
//! probability about `ln 2 / W`).
//!
//! # The learner
//! A one-hidden-layer ReLU network with `hidden_per_term * W` hidden units and a logistic
//! output, trained by Adam on the cross-entropy with minibatches drawn afresh each step. It is
//! a small hand-written `f64` network (this crate holds no tensors); inputs are sparse, so the
//! forward and backward passes visit only active inputs.
//!
//! # The measurement
//! For each width, each seed trains until the accuracy on a fixed held-out sample reaches
//! `target_accuracy` (checked every `eval_every` steps) or `max_steps` pass. The median steps
//! over the seeds that converged is fitted against `W ln W`, and, so that the comparison is
//! honest, against `W` and `W^2` and a free power law `steps = c W^alpha`. The routine reports
//! all of these; it does not assume any of them holds.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{check_value, Result, TheoryError};
use crate::numeric::softplus;

/// Parameters of the DNF scaling measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnfConfig {
    /// The widths `W` (number of terms) to measure; each `>= 2`.
    pub widths: Vec<usize>,
    /// Variables per term.
    pub literals: usize,
    /// Hidden units per term.
    pub hidden_per_term: usize,
    /// Samples per training step.
    pub batch: usize,
    /// Adam step size.
    pub learning_rate: f64,
    /// Accuracy on the held-out sample that counts as converged.
    pub target_accuracy: f64,
    /// Size of the held-out sample.
    pub eval_samples: usize,
    /// Minimum steps between held-out checks. A check runs only when the running accuracy on
    /// the last `eval_samples` freshly drawn training samples (scored before each update, so an
    /// honest estimate) has reached the target; the held-out accuracy decides.
    pub eval_every: usize,
    /// Steps after which a run counts as not converged.
    pub max_steps: usize,
    /// Independent runs per width.
    pub seeds: usize,
    /// Base seed.
    pub seed: u64,
}

impl Default for DnfConfig {
    fn default() -> Self {
        Self {
            widths: vec![2, 4, 6, 8, 12, 16],
            literals: 3,
            hidden_per_term: 8,
            batch: 16,
            learning_rate: 0.01,
            target_accuracy: 0.95,
            eval_samples: 1024,
            eval_every: 5,
            max_steps: 60_000,
            seeds: 5,
            seed: 0,
        }
    }
}

impl DnfConfig {
    /// Checks every field, naming the first bad one.
    ///
    /// # Errors
    /// [`TheoryError`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.widths.len() < 3 {
            return Err(TheoryError::Degenerate {
                field: "widths",
                reason: format!("{} widths; the fits need at least 3", self.widths.len()),
            });
        }
        for (index, &w) in self.widths.iter().enumerate() {
            if !(2..=4096).contains(&w) {
                return Err(TheoryError::InvalidElement {
                    field: "widths",
                    index,
                    value: w as f64,
                    expected: "an integer in [2, 4096]",
                });
            }
        }
        let count = |field: &'static str, v: usize, lo: usize, hi: usize| {
            check_value(
                field,
                v as f64,
                (lo..=hi).contains(&v),
                "an integer in its range",
            )
        };
        count("literals", self.literals, 1, 16)?;
        count("hidden_per_term", self.hidden_per_term, 1, 64)?;
        count("batch", self.batch, 1, 1 << 16)?;
        count("eval_samples", self.eval_samples, 16, 1 << 20)?;
        count("eval_every", self.eval_every, 1, usize::MAX)?;
        count("max_steps", self.max_steps, 1, usize::MAX)?;
        count("seeds", self.seeds, 1, 1000)?;
        check_value(
            "learning_rate",
            self.learning_rate,
            self.learning_rate.is_finite() && self.learning_rate > 0.0,
            "a finite number > 0",
        )?;
        check_value(
            "target_accuracy",
            self.target_accuracy,
            self.target_accuracy > 0.5 && self.target_accuracy <= 1.0,
            "a number in (0.5, 1]",
        )
    }
}

/// The runs at one width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidthResult {
    /// The width `W` (number of terms).
    pub width: usize,
    /// Input bits.
    pub inputs: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Per-bit firing probability.
    pub p: f64,
    /// Steps to the target per seed (`None`: not reached within `max_steps`).
    pub steps: Vec<Option<usize>>,
    /// Median over the converged seeds (`None` if none converged).
    pub median_steps: Option<f64>,
}

/// A least-squares fit `steps = slope * f(W) + intercept`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingFit {
    /// The regressor, in words: `"W ln W"`, `"W"` or `"W^2"`.
    pub model: String,
    /// Fitted slope.
    pub slope: f64,
    /// Fitted intercept.
    pub intercept: f64,
    /// Coefficient of determination.
    pub r2: f64,
}

/// A fit of `ln steps = alpha ln W + c`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerFit {
    /// The exponent.
    pub alpha: f64,
    /// Its standard error (0 with only two points).
    pub alpha_se: f64,
    /// Coefficient of determination on the log scale.
    pub r2: f64,
}

/// The outcome of the DNF scaling measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnfScaling {
    /// The parameters used.
    pub config: DnfConfig,
    /// Per width.
    pub widths: Vec<WidthResult>,
    /// Whether every seed at every width reached the target.
    pub all_converged: bool,
    /// The fit against `W ln W`, then `W` and `W^2`, over widths with a median.
    pub fits: Vec<ScalingFit>,
    /// The free power law.
    pub power: Option<PowerFit>,
    /// The regressor with the highest `R^2`.
    pub best_model: Option<String>,
}

/// One DNF task of a given width.
#[derive(Debug, Clone)]
struct Task {
    width: usize,
    literals: usize,
    p: f64,
}

impl Task {
    fn new(width: usize, literals: usize) -> Self {
        let term_rate = 1.0 - 0.5f64.powf(1.0 / width as f64);
        Self {
            width,
            literals,
            p: term_rate.powf(1.0 / literals as f64),
        }
    }

    fn inputs(&self) -> usize {
        self.width * self.literals
    }

    /// Draws one sample: the indices of its active bits into `active`, and its label.
    fn sample(&self, rng: &mut ChaCha8Rng, active: &mut Vec<u32>) -> bool {
        active.clear();
        let mut label = false;
        for t in 0..self.width {
            let mut all = true;
            for l in 0..self.literals {
                if rng.gen::<f64>() < self.p {
                    active.push((t * self.literals + l) as u32);
                } else {
                    all = false;
                }
            }
            label |= all;
        }
        label
    }
}

/// A one-hidden-layer ReLU network with a logistic output, and its Adam state.
#[derive(Debug, Clone)]
struct Mlp {
    n_in: usize,
    /// `[hidden, n_in]`.
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: f64,
}

#[derive(Debug, Clone)]
struct Adam {
    lr: f64,
    t: i32,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adam {
    fn new(len: usize, lr: f64) -> Self {
        Self {
            lr,
            t: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// One Adam update of `params` (concatenated views given as slices in order).
    fn step(&mut self, params: &mut [&mut [f64]], grads: &[&[f64]]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.t += 1;
        let c1 = 1.0 - B1.powi(self.t);
        let c2 = 1.0 - B2.powi(self.t);
        let mut off = 0;
        for (p, g) in params.iter_mut().zip(grads) {
            for (i, (pi, &gi)) in p.iter_mut().zip(g.iter()).enumerate() {
                let m = &mut self.m[off + i];
                let v = &mut self.v[off + i];
                *m = B1 * *m + (1.0 - B1) * gi;
                *v = B2 * *v + (1.0 - B2) * gi * gi;
                *pi -= self.lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
            }
            off += p.len();
        }
    }
}

impl Mlp {
    fn new(n_in: usize, hidden: usize, rng: &mut ChaCha8Rng) -> Self {
        let s1 = (2.0 / n_in as f64).sqrt();
        let s2 = (1.0 / hidden as f64).sqrt();
        let mut normal = || {
            let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let w1 = (0..hidden * n_in).map(|_| s1 * normal()).collect();
        let w2 = (0..hidden).map(|_| s2 * normal()).collect();
        Self {
            n_in,
            w1,
            b1: vec![0.0; hidden],
            w2,
            b2: 0.0,
        }
    }

    /// Hidden activations into `h`; returns the output logit.
    fn forward(&self, active: &[u32], h: &mut [f64]) -> f64 {
        h.copy_from_slice(&self.b1);
        for &i in active {
            let i = i as usize;
            for (j, hj) in h.iter_mut().enumerate() {
                *hj += self.w1[j * self.n_in + i];
            }
        }
        let mut z = self.b2;
        for (hj, w) in h.iter_mut().zip(&self.w2) {
            *hj = hj.max(0.0);
            z += *hj * w;
        }
        z
    }
}

/// Steps one seed needs to reach the target, or `None`.
fn train_one(task: &Task, cfg: &DnfConfig, seed: u64) -> Option<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let hidden = cfg.hidden_per_term * task.width;
    let mut net = Mlp::new(task.inputs(), hidden, &mut rng);
    let n_params = net.w1.len() + net.b1.len() + net.w2.len() + 1;
    let mut adam = Adam::new(n_params, cfg.learning_rate);

    // Held-out sample, drawn once from its own stream.
    let mut eval_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xE7A1_0000_0000_0001);
    let mut active = Vec::new();
    let eval: Vec<(Vec<u32>, bool)> = (0..cfg.eval_samples)
        .map(|_| {
            let y = task.sample(&mut eval_rng, &mut active);
            (active.clone(), y)
        })
        .collect();

    let mut h = vec![0.0; hidden];
    let mut g1 = vec![0.0; net.w1.len()];
    let mut gb1 = vec![0.0; hidden];
    let mut g2 = vec![0.0; hidden];
    let mut touched = vec![false; task.inputs()];
    let mut touched_list: Vec<u32> = Vec::new();
    // Prequential window: correctness of the last `eval_samples` training predictions.
    let mut window = vec![false; cfg.eval_samples];
    let (mut filled, mut right_in_window, mut pos) = (0usize, 0usize, 0usize);
    let mut last_check = 0usize;
    let accuracy = |net: &Mlp, h: &mut [f64]| {
        let right = eval
            .iter()
            .filter(|(x, y)| (net.forward(x, h) > 0.0) == *y)
            .count();
        right as f64 / eval.len() as f64
    };
    for step in 1..=cfg.max_steps {
        let mut gb2 = 0.0;
        for &i in &touched_list {
            let i = i as usize;
            touched[i] = false;
            for j in 0..hidden {
                g1[j * task.inputs() + i] = 0.0;
            }
        }
        touched_list.clear();
        gb1.fill(0.0);
        g2.fill(0.0);
        let scale = 1.0 / cfg.batch as f64;
        for _ in 0..cfg.batch {
            let y = task.sample(&mut rng, &mut active);
            let z = net.forward(&active, &mut h);
            let correct = (z > 0.0) == y;
            if filled == window.len() {
                right_in_window -= usize::from(window[pos]);
            } else {
                filled += 1;
            }
            window[pos] = correct;
            right_in_window += usize::from(correct);
            pos = (pos + 1) % window.len();
            // d(BCE)/dz = sigmoid(z) - y.
            let dz = scale * ((-softplus(-z)).exp() - f64::from(u8::from(y)));
            gb2 += dz;
            for j in 0..hidden {
                if h[j] > 0.0 {
                    g2[j] += dz * h[j];
                    let dh = dz * net.w2[j];
                    gb1[j] += dh;
                    for &i in &active {
                        g1[j * task.inputs() + i as usize] += dh;
                    }
                }
            }
            for &i in &active {
                if !touched[i as usize] {
                    touched[i as usize] = true;
                    touched_list.push(i);
                }
            }
        }
        let mut b2 = [net.b2];
        adam.step(
            &mut [&mut net.w1, &mut net.b1, &mut net.w2, &mut b2],
            &[&g1, &gb1, &g2, &[gb2]],
        );
        net.b2 = b2[0];
        let running = right_in_window as f64 / window.len() as f64;
        if filled == window.len()
            && running >= cfg.target_accuracy
            && step >= last_check + cfg.eval_every
        {
            last_check = step;
            if accuracy(&net, &mut h) >= cfg.target_accuracy {
                return Some(step);
            }
        }
    }
    None
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    })
}

/// OLS of `y` on `x` with intercept: `(slope, intercept, r2, slope_se)`.
fn ols(x: &[f64], y: &[f64]) -> (f64, f64, f64, f64) {
    let n = x.len() as f64;
    let xm = x.iter().sum::<f64>() / n;
    let ym = y.iter().sum::<f64>() / n;
    let sxx: f64 = x.iter().map(|a| (a - xm).powi(2)).sum();
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - xm) * (b - ym)).sum();
    let syy: f64 = y.iter().map(|b| (b - ym).powi(2)).sum();
    let slope = sxy / sxx;
    let intercept = ym - slope * xm;
    let ssr: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (b - intercept - slope * a).powi(2))
        .sum();
    let r2 = if syy > 0.0 { 1.0 - ssr / syy } else { 1.0 };
    let se = if x.len() > 2 {
        (ssr / (n - 2.0) / sxx).sqrt()
    } else {
        0.0
    };
    (slope, intercept, r2, se)
}

/// A named regressor `f(W)`.
type Regressor = (&'static str, fn(f64) -> f64);

/// Runs the measurement described in the [module docs](self).
///
/// # Errors
/// A [`TheoryError`] naming the first invalid field of `cfg`.
pub fn dnf_scaling(cfg: &DnfConfig) -> Result<DnfScaling> {
    cfg.validate()?;
    let mut widths = Vec::with_capacity(cfg.widths.len());
    for &w in &cfg.widths {
        let task = Task::new(w, cfg.literals);
        let steps: Vec<Option<usize>> = (0..cfg.seeds as u64)
            .map(|s| {
                let seed = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w as u64) << 32 ^ s;
                train_one(&task, cfg, seed)
            })
            .collect();
        let median_steps = median(steps.iter().flatten().map(|&s| s as f64).collect());
        widths.push(WidthResult {
            width: w,
            inputs: task.inputs(),
            hidden: cfg.hidden_per_term * w,
            p: task.p,
            steps,
            median_steps,
        });
    }
    let all_converged = widths.iter().all(|r| r.steps.iter().all(Option::is_some));
    let points: Vec<(f64, f64)> = widths
        .iter()
        .filter_map(|r| r.median_steps.map(|m| (r.width as f64, m)))
        .collect();
    let mut fits = Vec::new();
    let mut power = None;
    let mut distinct: Vec<f64> = points.iter().map(|p| p.0).collect();
    distinct.dedup();
    if points.len() >= 2 && distinct.len() >= 2 {
        let y: Vec<f64> = points.iter().map(|p| p.1).collect();
        let models: [Regressor; 3] = [("W ln W", |w| w * w.ln()), ("W", |w| w), ("W^2", |w| w * w)];
        for (model, f) in models {
            let x: Vec<f64> = points.iter().map(|p| f(p.0)).collect();
            let (slope, intercept, r2, _) = ols(&x, &y);
            fits.push(ScalingFit {
                model: model.to_string(),
                slope,
                intercept,
                r2,
            });
        }
        let lx: Vec<f64> = points.iter().map(|p| p.0.ln()).collect();
        let ly: Vec<f64> = y.iter().map(|v| v.ln()).collect();
        let (alpha, _, r2, alpha_se) = ols(&lx, &ly);
        power = Some(PowerFit {
            alpha,
            alpha_se,
            r2,
        });
    }
    let best_model = fits
        .iter()
        .max_by(|a, b| a.r2.total_cmp(&b.r2))
        .map(|f| f.model.clone());
    Ok(DnfScaling {
        config: cfg.clone(),
        widths,
        all_converged,
        fits,
        power,
        best_model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_balanced_at_every_width() {
        // 20000 labels: the positive rate has standard deviation 0.0035 around 1/2; the
        // tolerance 0.015 is over 4 standard deviations.
        for w in [2, 8, 32] {
            let task = Task::new(w, 3);
            let mut rng = ChaCha8Rng::seed_from_u64(w as u64);
            let mut active = Vec::new();
            let n = 20_000;
            let pos = (0..n)
                .filter(|_| task.sample(&mut rng, &mut active))
                .count();
            let rate = pos as f64 / n as f64;
            assert!(
                (rate - 0.5).abs() < 0.015,
                "width {w}: positive rate {rate}"
            );
        }
    }

    #[test]
    fn ols_recovers_an_exact_line() {
        let x = [1.0, 2.0, 4.0, 7.0];
        let y: Vec<f64> = x.iter().map(|x| 3.0 * x - 2.0).collect();
        let (slope, intercept, r2, se) = ols(&x, &y);
        assert!((slope - 3.0).abs() < 1e-12 && (intercept + 2.0).abs() < 1e-12);
        assert!((r2 - 1.0).abs() < 1e-12 && se < 1e-12);
    }
}
