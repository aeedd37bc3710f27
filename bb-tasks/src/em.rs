//! The EM synapse stand-in: generated electron-microscopy-like volumes with exact synapse
//! labels, and a 2-level 3-D U-Net with group-norm that predicts synaptic clefts voxel by
//! voxel.
//!
//! **This is a stand-in.** No biological EM volume (CREMI or similar) can be had offline, so
//! volumes are generated. Cells are the cells of a 3-D Voronoi partition (seeds a little
//! outside the volume too, so cells cross its faces); each cell has its own grey level plus a
//! smooth intracellular texture; cell membranes are the voxels near the bisector plane of the
//! two nearest seeds, drawn dark. Some cells hold a dark, mitochondrion-like blob. Synapses
//! are rare: a disc of the membrane between two cells drawn thicker and darker (the cleft),
//! with a cluster of small dark vesicles on the presynaptic side. Gaussian noise goes over
//! everything. The label is exact: a voxel is positive iff it belongs to a cleft (the voxels
//! painted with the cleft's level, which no other structure uses). Synapses are added to a
//! volume until about `positive_fraction` of its voxels are positive (1 % by default, drawn
//! per volume between half and one and a half times that). Training volumes depend on the
//! seed; validation and test volumes are the same for every seed and method.
//!
//! The network: two 3x3x3 conv + group-norm + ReLU units per level, a 2x2x2 max-pool between
//! the levels, nearest upsampling back and a skip concatenation into one decoder unit, and a
//! 1x1x1 conv to one logit per voxel, trained with a positive-weighted binary cross-entropy.
//! BB's SP-in acts on the encoder convs except the first (whose channels read one input
//! channel).
//!
//! Metrics, without any connected-component post-processing: the voxel F1 of the synapse
//! class at the threshold that maximizes F1 on the validation volumes, its precision and
//! recall, and the voxel precision-recall AUC (average precision) on the test volumes.

use crate::config::TrainConfig;
use crate::convkit::{ops, to_channel_major, Act, Conv, Ctx, GroupNorm, MaxPool, Upsample};
use crate::convkit::{ParamId, ParamStore, Tap};
use crate::convrun::{self, ArmSpec, ConvRunResult, ConvRunSpec, ConvTask};
use anyhow::{ensure, Result};
use bb_core::Topology;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

fn d_size() -> usize {
    24
}
fn d_train() -> usize {
    96
}
fn d_val() -> usize {
    8
}
fn d_test() -> usize {
    16
}
fn d_cell() -> f64 {
    8.0
}
fn d_membrane() -> f64 {
    0.8
}
fn d_fraction() -> f64 {
    0.01
}
fn d_cleft_radius() -> f64 {
    3.5
}
fn d_vesicles() -> usize {
    8
}
fn d_mito() -> f64 {
    0.3
}
fn d_texture() -> f32 {
    0.06
}
fn d_noise() -> f32 {
    0.08
}
fn d_eval_volumes() -> usize {
    4
}
fn d_eval_subset() -> usize {
    2
}

/// The `[data]` table: how volumes are generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmDataConfig {
    /// Volume side, voxels (even, 8..=64).
    #[serde(default = "d_size")]
    pub size: usize,
    /// Training volumes (drawn with the seed).
    #[serde(default = "d_train")]
    pub n_train: usize,
    /// Validation volumes (the threshold is chosen on them; the same for every seed).
    #[serde(default = "d_val")]
    pub n_val: usize,
    /// Test volumes (the same for every seed).
    #[serde(default = "d_test")]
    pub n_test: usize,
    /// Mean spacing of the Voronoi seeds (about a cell's diameter), voxels.
    #[serde(default = "d_cell")]
    pub cell_size: f64,
    /// Half-thickness of a membrane, voxels.
    #[serde(default = "d_membrane")]
    pub membrane: f64,
    /// Target share of positive (cleft) voxels per volume.
    #[serde(default = "d_fraction")]
    pub positive_fraction: f64,
    /// Radius of a cleft disc, voxels.
    #[serde(default = "d_cleft_radius")]
    pub cleft_radius: f64,
    /// Vesicles per synapse.
    #[serde(default = "d_vesicles")]
    pub vesicles: usize,
    /// Probability that a cell holds a mitochondrion-like dark blob.
    #[serde(default = "d_mito")]
    pub mito: f64,
    /// Amplitude of the intracellular texture.
    #[serde(default = "d_texture")]
    pub texture: f32,
    /// Standard deviation of the voxel noise.
    #[serde(default = "d_noise")]
    pub noise: f32,
    /// Validation volumes scored after every epoch (`metrics.jsonl`).
    #[serde(default = "d_eval_volumes")]
    pub eval_volumes: usize,
    /// Test volumes whose encoder activity is measured (entropy, decorrelation, balance).
    #[serde(default = "d_eval_subset")]
    pub eval_subset: usize,
}

fn d_c() -> [usize; 2] {
    [8, 16]
}
fn d_groups() -> usize {
    4
}

/// The `[model]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNet3dConfig {
    /// Channels of the two levels.
    #[serde(default = "d_c")]
    pub channels: [usize; 2],
    /// Group-norm groups (must divide both channel counts).
    #[serde(default = "d_groups")]
    pub groups: usize,
}

impl Default for UNet3dConfig {
    fn default() -> Self {
        Self {
            channels: d_c(),
            groups: d_groups(),
        }
    }
}

fn d_pos_weight() -> f32 {
    10.0
}

/// The `[loss]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmLossConfig {
    /// Weight of synapse voxels in the binary cross-entropy.
    #[serde(default = "d_pos_weight")]
    pub pos_weight: f32,
}

impl Default for EmLossConfig {
    fn default() -> Self {
        Self {
            pos_weight: d_pos_weight(),
        }
    }
}

/// An EM synapse experiment (`task = "em3d"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmConfig {
    /// Name (run folder prefix).
    pub name: String,
    /// Always `"em3d"`.
    pub task: String,
    /// One line for `bb presets`.
    #[serde(default)]
    pub description: String,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Volume generation.
    pub data: EmDataConfig,
    /// Network.
    #[serde(default)]
    pub model: UNet3dConfig,
    /// Loss.
    #[serde(default)]
    pub loss: EmLossConfig,
    /// Training.
    pub train: TrainConfig,
    /// Engine config shared by the arms.
    #[serde(default)]
    pub pruning: toml::Table,
    /// Compared methods.
    pub arms: Vec<ArmSpec>,
}

impl EmConfig {
    /// Parses a TOML config (unknown or missing fields are errors naming the field).
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = convrun::parse(text, "experiment config")?;
        ensure!(
            c.task == "em3d",
            "task must be \"em3d\" for this config, got {:?}",
            c.task
        );
        Ok(c)
    }

    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        convrun::validate_common(&self.name, &self.seeds, &self.train, &self.arms)?;
        let d = &self.data;
        ensure!(
            d.size >= 8 && d.size <= 64 && d.size.is_multiple_of(2),
            "data.size must be even and in 8..=64, got {}",
            d.size
        );
        ensure!(d.n_train >= 2, "data.n_train must be >= 2");
        ensure!(d.n_val >= 1, "data.n_val must be >= 1");
        ensure!(d.n_test >= 1, "data.n_test must be >= 1");
        ensure!(
            d.cell_size.is_finite() && d.cell_size >= 4.0 && d.cell_size <= 4.0 * d.size as f64,
            "data.cell_size must be in [4, 4 x data.size], got {}",
            d.cell_size
        );
        ensure!(
            d.membrane.is_finite() && d.membrane > 0.0 && d.membrane <= 3.0,
            "data.membrane must be in (0, 3], got {}",
            d.membrane
        );
        ensure!(
            d.positive_fraction > 0.0 && d.positive_fraction <= 0.1,
            "data.positive_fraction must be in (0, 0.1], got {}",
            d.positive_fraction
        );
        ensure!(
            d.cleft_radius.is_finite()
                && d.cleft_radius >= 1.0
                && d.cleft_radius <= d.size as f64 / 4.0,
            "data.cleft_radius must be in [1, data.size / 4], got {}",
            d.cleft_radius
        );
        ensure!(
            (1..=64).contains(&d.vesicles),
            "data.vesicles must be in 1..=64, got {}",
            d.vesicles
        );
        ensure!(
            (0.0..=1.0).contains(&d.mito),
            "data.mito must be in [0, 1], got {}",
            d.mito
        );
        for (f, v) in [("texture", d.texture), ("noise", d.noise)] {
            ensure!(
                v.is_finite() && (0.0..=0.5).contains(&v),
                "data.{f} must be in [0, 0.5], got {v}"
            );
        }
        ensure!(d.eval_volumes >= 1, "data.eval_volumes must be >= 1");
        ensure!(d.eval_subset >= 1, "data.eval_subset must be >= 1");
        let m = &self.model;
        for (i, &c) in m.channels.iter().enumerate() {
            ensure!(c > 0, "model.channels[{i}] must be > 0");
        }
        ensure!(
            m.groups > 0 && m.channels.iter().all(|c| c % m.groups == 0),
            "model.groups ({}) must divide both model.channels {:?}",
            m.groups,
            m.channels
        );
        ensure!(
            self.loss.pos_weight.is_finite() && self.loss.pos_weight > 0.0,
            "loss.pos_weight must be > 0"
        );
        Ok(())
    }
}

/// Generated volumes with their labels, each `[n, size^3]` (z, y, x order).
#[derive(Debug, Clone, PartialEq)]
pub struct Volumes {
    /// Volume side.
    pub size: usize,
    /// Intensities in `[0, 1]`.
    pub x: Vec<f32>,
    /// 1 on synaptic-cleft voxels.
    pub label: Vec<u8>,
    /// Synapses per volume.
    pub synapses: Vec<usize>,
}

impl Volumes {
    /// Voxels per volume.
    pub fn voxels(&self) -> usize {
        self.size * self.size * self.size
    }

    /// Number of volumes.
    pub fn len(&self) -> usize {
        self.synapses.len()
    }

    /// Whether there are no volumes.
    pub fn is_empty(&self) -> bool {
        self.synapses.is_empty()
    }

    /// Fraction of positive voxels.
    pub fn positive_fraction(&self) -> f64 {
        self.label.iter().filter(|&&m| m == 1).count() as f64 / self.label.len().max(1) as f64
    }
}

/// Grey level of a synaptic cleft (used by nothing else, so with neither texture nor noise
/// the label is exactly the set of voxels at this level).
pub const CLEFT_LEVEL: f32 = 0.12;
/// Grey level of a membrane.
pub const MEMBRANE_LEVEL: f32 = 0.3;
/// Grey level of a mitochondrion-like blob.
pub const MITO_LEVEL: f32 = 0.38;
/// Grey level of a vesicle.
pub const VESICLE_LEVEL: f32 = 0.44;
/// Range of the cells' own grey levels.
pub const CELL_LEVELS: (f32, f32) = (0.55, 0.8);

fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

type P3 = [f64; 3];

fn sub(a: P3, b: P3) -> P3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn dot(a: P3, b: P3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn norm(a: P3) -> f64 {
    dot(a, a).sqrt()
}
fn scaled(a: P3, k: f64) -> P3 {
    [a[0] * k, a[1] * k, a[2] * k]
}
fn add(a: P3, b: P3) -> P3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

/// Two unit vectors orthogonal to the unit vector `n` and to each other.
fn basis(n: P3) -> (P3, P3) {
    let a = if n[0].abs() < 0.9 {
        [1.0, 0.0, 0.0]
    } else {
        [0.0, 1.0, 0.0]
    };
    let e1 = sub(a, scaled(n, dot(a, n)));
    let e1 = scaled(e1, 1.0 / norm(e1));
    let e2 = [
        n[1] * e1[2] - n[2] * e1[1],
        n[2] * e1[0] - n[0] * e1[2],
        n[0] * e1[1] - n[1] * e1[0],
    ];
    (e1, e2)
}

/// A smooth random field in about `[-1, 1]`: trilinear interpolation of a coarse random grid.
fn smooth_field(s: usize, spacing: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let g = s / spacing + 2;
    let grid: Vec<f32> = (0..g * g * g).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut v = vec![0f32; s * s * s];
    let at = |z: usize, y: usize, x: usize| grid[(z * g + y) * g + x];
    for z in 0..s {
        let (gz, fz) = (z / spacing, (z % spacing) as f32 / spacing as f32);
        for y in 0..s {
            let (gy, fy) = (y / spacing, (y % spacing) as f32 / spacing as f32);
            for x in 0..s {
                let (gx, fx) = (x / spacing, (x % spacing) as f32 / spacing as f32);
                let mut acc = 0f32;
                for (dz, wz) in [(0, 1.0 - fz), (1, fz)] {
                    for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
                        for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
                            acc += wz * wy * wx * at(gz + dz, gy + dy, gx + dx);
                        }
                    }
                }
                v[(z * s + y) * s + x] = acc;
            }
        }
    }
    v
}

/// One generated volume: intensities, labels and the number of synapses.
fn volume(cfg: &EmDataConfig, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<u8>, usize) {
    let s = cfg.size;
    let n = s * s * s;
    let m = cfg.cell_size.ceil();
    let span = s as f64 + 2.0 * m;
    let cells = ((span / cfg.cell_size).powi(3)).round().max(2.0) as usize;
    let seeds: Vec<P3> = (0..cells)
        .map(|_| {
            [
                rng.gen_range(-m..s as f64 + m),
                rng.gen_range(-m..s as f64 + m),
                rng.gen_range(-m..s as f64 + m),
            ]
        })
        .collect();
    let level: Vec<f32> = (0..cells)
        .map(|_| rng.gen_range(CELL_LEVELS.0..CELL_LEVELS.1))
        .collect();
    let pos = |v: usize| -> P3 { [(v / (s * s)) as f64, (v / s % s) as f64, (v % s) as f64] };
    // nearest and second-nearest seed, and the distance to their bisector plane
    let mut owner = vec![0u32; n];
    let mut second = vec![0u32; n];
    let mut plane = vec![0f64; n];
    for v in 0..n {
        let p = pos(v);
        let (mut b1, mut b2) = ((f64::INFINITY, 0usize), (f64::INFINITY, 0usize));
        for (i, c) in seeds.iter().enumerate() {
            let d = sub(p, *c);
            let d2 = dot(d, d);
            if d2 < b1.0 {
                b2 = b1;
                b1 = (d2, i);
            } else if d2 < b2.0 {
                b2 = (d2, i);
            }
        }
        owner[v] = b1.1 as u32;
        second[v] = b2.1 as u32;
        let sep = norm(sub(seeds[b1.1], seeds[b2.1])).max(1e-9);
        plane[v] = (b2.0 - b1.0) / (2.0 * sep);
    }
    let field = smooth_field(s, 4, rng);
    let mut img: Vec<f32> = (0..n)
        .map(|v| level[owner[v] as usize] + cfg.texture * field[v])
        .collect();
    let mem = cfg.membrane;
    for v in 0..n {
        if plane[v] < mem {
            img[v] = MEMBRANE_LEVEL;
        }
    }
    // mitochondrion-like blobs: an ellipsoid near the seed of some cells, inside the cell
    for (i, c) in seeds.iter().enumerate() {
        if !rng.gen_bool(cfg.mito) {
            continue;
        }
        let r = [
            rng.gen_range(1.2..2.2),
            rng.gen_range(1.2..2.2),
            rng.gen_range(2.0..4.0),
        ];
        let ctr = add(
            *c,
            [
                rng.gen_range(-2.0..2.0),
                rng.gen_range(-2.0..2.0),
                rng.gen_range(-2.0..2.0),
            ],
        );
        paint_ellipsoid(
            s,
            ctr,
            r,
            |v, img_v: &mut f32| {
                if owner[v] as usize == i && plane[v] > mem + 1.0 {
                    *img_v = MITO_LEVEL;
                }
            },
            &mut img,
        );
    }
    // synapses until the volume's positive target is reached (not overshot by more than it
    // would undershoot)
    let target = cfg.positive_fraction * n as f64 * rng.gen_range(0.5..1.5);
    let mut label = vec![0u8; n];
    let mut count = 0usize;
    let mut centres: Vec<P3> = Vec::new();
    let cleft_half = mem + 0.5;
    let rad = cfg.cleft_radius;
    let mut synapses = 0;
    for _ in 0..400 {
        if count as f64 >= target {
            break;
        }
        let v = rng.gen_range(0..n);
        if plane[v] >= 0.5 {
            continue;
        }
        let p = pos(v);
        if centres.iter().any(|c| norm(sub(*c, p)) < 2.0 * rad + 4.0) {
            continue;
        }
        let (a, b) = (owner[v] as usize, second[v] as usize);
        let (pre, post) = if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
        let cleft: Vec<usize> = within(s, p, rad + 0.5)
            .filter(|&u| {
                let pair = (owner[u] as usize, second[u] as usize);
                (pair == (a, b) || pair == (b, a))
                    && plane[u] < cleft_half
                    && norm(sub(pos(u), p)) <= rad
            })
            .collect();
        let fresh = cleft.iter().filter(|&&u| label[u] == 0).count();
        if fresh < 4 {
            continue;
        }
        let after = (count + fresh) as f64;
        if after > target && after - target > target - count as f64 {
            break;
        }
        // vesicles: small balls on the presynaptic side, 2 to 2 + radius voxels from the cleft
        let nrm = sub(seeds[pre], seeds[post]);
        let nrm = scaled(nrm, 1.0 / norm(nrm).max(1e-9));
        let (e1, e2) = basis(nrm);
        for _ in 0..cfg.vesicles {
            let depth = rng.gen_range(mem + 1.5..mem + 1.5 + rad);
            let (l1, l2) = (rng.gen_range(-rad..rad), rng.gen_range(-rad..rad));
            let ctr = add(
                add(p, scaled(nrm, depth)),
                add(scaled(e1, l1), scaled(e2, l2)),
            );
            let rv = rng.gen_range(0.7..1.1);
            paint_ellipsoid(
                s,
                ctr,
                [rv; 3],
                |u, img_u: &mut f32| {
                    if owner[u] as usize == pre && plane[u] > mem {
                        *img_u = VESICLE_LEVEL;
                    }
                },
                &mut img,
            );
        }
        for &u in &cleft {
            label[u] = 1;
        }
        count += fresh;
        centres.push(p);
        synapses += 1;
    }
    // clefts last: their level marks exactly the labelled voxels
    for v in 0..n {
        if label[v] == 1 {
            img[v] = CLEFT_LEVEL;
        }
    }
    if cfg.noise > 0.0 {
        for t in &mut img {
            *t += cfg.noise * gauss(rng);
        }
    }
    for t in &mut img {
        *t = t.clamp(0.0, 1.0);
    }
    (img, label, synapses)
}

/// The voxels (flat indices) of the cube around `c` of half-side `r`, inside the volume.
fn within(s: usize, c: P3, r: f64) -> impl Iterator<Item = usize> {
    let lo = |x: f64| (x - r).ceil().clamp(0.0, s as f64) as usize;
    let hi = |x: f64| ((x + r).floor() + 1.0).clamp(0.0, s as f64) as usize;
    let (z0, z1, y0, y1, x0, x1) = (lo(c[0]), hi(c[0]), lo(c[1]), hi(c[1]), lo(c[2]), hi(c[2]));
    (z0..z1)
        .flat_map(move |z| (y0..y1).flat_map(move |y| (x0..x1).map(move |x| (z * s + y) * s + x)))
}

/// Calls `f` on every voxel inside the axis-aligned ellipsoid with radii `r` around `c`.
fn paint_ellipsoid(s: usize, c: P3, r: [f64; 3], f: impl Fn(usize, &mut f32), img: &mut [f32]) {
    let rmax = r.iter().fold(0f64, |a, &b| a.max(b));
    for v in within(s, c, rmax) {
        let p = [(v / (s * s)) as f64, (v / s % s) as f64, (v % s) as f64];
        let d = sub(p, c);
        let q = (d[0] / r[0]).powi(2) + (d[1] / r[1]).powi(2) + (d[2] / r[2]).powi(2);
        if q <= 1.0 {
            f(v, &mut img[v]);
        }
    }
}

/// Generates `n` volumes (see the module docs); the same `seed` gives the same volumes.
pub fn generate(cfg: &EmDataConfig, n: usize, seed: u64) -> Volumes {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vox = cfg.size.pow(3);
    let mut out = Volumes {
        size: cfg.size,
        x: Vec::with_capacity(n * vox),
        label: Vec::with_capacity(n * vox),
        synapses: Vec::with_capacity(n),
    };
    for _ in 0..n {
        let (x, l, k) = volume(cfg, &mut rng);
        out.x.extend(x);
        out.label.extend(l);
        out.synapses.push(k);
    }
    out
}

/// The seed of the validation volumes (the same for every run).
const VAL_SEED: u64 = 0x5641_4c33;
/// The seed of the test volumes (the same for every run).
const TEST_SEED: u64 = 0x5445_5333;

/// Training volumes of `seed`, and the validation and test volumes.
pub fn build_volumes(cfg: &EmDataConfig, seed: u64) -> (Volumes, Volumes, Volumes) {
    (
        generate(cfg, cfg.n_train, seed ^ 0x454d_3344),
        generate(cfg, cfg.n_val, VAL_SEED),
        generate(cfg, cfg.n_test, TEST_SEED),
    )
}

/// A 3-D conv + group-norm + ReLU unit.
#[derive(Debug, Clone)]
struct Cgr {
    conv: Conv,
    gn: GroupNorm,
}

impl Cgr {
    fn new(
        st: &mut ParamStore,
        rng: &mut ChaCha8Rng,
        name: &str,
        (inp, out, groups): (usize, usize, usize),
        dhw: [usize; 3],
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv::new_3d(st, rng, name, inp, out, dhw, 3, 1, 1, false)?,
            gn: GroupNorm::new(st, &format!("{name}.gn"), out, groups)?,
        })
    }

    fn forward<T: Tape<f32, Cpu>>(&self, st: &ParamStore, x: Act<T>) -> Result<Act<T>> {
        let y = self.conv.forward(st, x)?;
        Ok(self.gn.forward(st, y)?.relu())
    }
}

/// The 2-level 3-D U-Net (see the module docs).
#[derive(Debug, Clone)]
pub struct UNet3d {
    size: usize,
    c: [usize; 2],
    enc: Vec<Cgr>,
    pool: MaxPool,
    up: Upsample,
    d1: Cgr,
    out: Conv,
}

impl UNet3d {
    /// Builds the network for single-channel `size^3` volumes (`size` even).
    pub fn new(cfg: &UNet3dConfig, st: &mut ParamStore, size: usize, seed: u64) -> Result<Self> {
        let [c0, c1] = cfg.channels;
        let g = cfg.groups;
        ensure!(
            size >= 2 && size.is_multiple_of(2),
            "data.size must be even, got {size}"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let full = [size; 3];
        let half = [size / 2; 3];
        let enc = vec![
            Cgr::new(st, &mut rng, "e1a", (1, c0, g), full)?,
            Cgr::new(st, &mut rng, "e1b", (c0, c0, g), full)?,
            Cgr::new(st, &mut rng, "e2a", (c0, c1, g), half)?,
            Cgr::new(st, &mut rng, "e2b", (c1, c1, g), half)?,
        ];
        Ok(Self {
            size,
            c: cfg.channels,
            enc,
            pool: MaxPool::new_3d("pool1", c0, full, 2, 2)?,
            up: Upsample::new_3d("up1", c1, half, 2)?,
            d1: Cgr::new(st, &mut rng, "d1", (c1 + c0, c0, g), full)?,
            out: Conv::new_3d(st, &mut rng, "out", c0, 1, full, 1, 1, 0, true)?,
        })
    }

    /// The layers BB prunes: the encoder convs after the first.
    pub fn prunable(&self) -> Vec<String> {
        self.enc[1..].iter().map(|e| e.conv.name.clone()).collect()
    }

    /// The encoder populations reported (the ones SP-in acts on).
    pub fn reported(&self) -> Vec<String> {
        self.prunable()
    }

    fn layers(&self) -> Vec<(&Conv, &str, &str)> {
        let e = |i: usize| self.enc[i].conv.name.as_str();
        vec![
            (&self.enc[0].conv, "input", e(0)),
            (&self.enc[1].conv, e(0), e(1)),
            (&self.enc[2].conv, e(1), e(2)),
            (&self.enc[3].conv, e(2), e(3)),
            (&self.d1.conv, "d1.in", "d1"),
            (&self.out, "d1", "out"),
        ]
    }

    /// The engine's view: the encoder channels are populations; the decoder's input (the
    /// upsampled bottleneck next to the skip features) is a population of its own (`d1.in`),
    /// so encoder traffic counts only the encoder's own consumers.
    pub fn topology(&self) -> Topology {
        let [c0, c1] = self.c;
        let mut t = Topology::new()
            .population("input", 1)
            .population("d1.in", c1 + c0)
            .population("d1", c0)
            .population("out", 1);
        for e in &self.enc {
            t = t.population(&e.conv.name, e.conv.out);
        }
        for (conv, i, o) in self.layers() {
            t = t.conv_layer(&conv.name, i, o, &conv.kernel());
        }
        t
    }

    /// Conv weights in the order of [`Self::topology`]'s layers.
    pub fn layer_weights(&self) -> Vec<ParamId> {
        self.layers().iter().map(|(c, _, _)| c.w).collect()
    }

    /// `x`: `(size³, B)`. Returns the synapse logits `(size³, B)`.
    pub fn forward<T: Tape<f32, Cpu>>(
        &self,
        st: &ParamStore,
        x: Act<T>,
        ctx: &mut Ctx,
    ) -> Result<Act<T>> {
        let rows = x.shape().0;
        let vox = self.size.pow(3);
        ensure!(
            rows == vox,
            "em3d: input has {rows} rows, expected {vox} voxels"
        );
        let mut h = x;
        let mut skip = None;
        for (i, e) in self.enc.iter().enumerate() {
            if i == 2 {
                // the skip shares the tensor (and its gradient) by id; the tape goes on with
                // the pooled path, and the concatenation merges both again
                skip = Some(h.with_empty_tape());
                h = self.pool.forward(h)?;
            }
            h = e.forward(st, h)?;
            ctx.tap(&e.conv.name, &h, e.conv.out)?;
        }
        let y = self.up.forward(h)?;
        let skip = skip.expect("the encoder has a second level");
        let y = ops::concat_rows(vec![y, skip], "d1.in")?;
        let y = self.d1.forward(st, y)?;
        self.out.forward(st, y)
    }
}

/// Voxel counts of the synapse class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VoxelCounts {
    /// Positive and predicted positive.
    pub tp: u64,
    /// Negative, predicted positive.
    pub fp: u64,
    /// Positive, predicted negative.
    pub fn_: u64,
}

impl VoxelCounts {
    /// Counts of `prob >= threshold` against the truth. Errors when the lengths differ.
    pub fn at(prob: &[f32], truth: &[u8], threshold: f32) -> Result<Self> {
        ensure!(
            prob.len() == truth.len(),
            "voxel counts: {} probabilities for {} labels",
            prob.len(),
            truth.len()
        );
        let mut c = Self::default();
        for (&p, &t) in prob.iter().zip(truth) {
            match (p >= threshold, t == 1) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                _ => {}
            }
        }
        Ok(c)
    }

    /// F1 (0 when there is neither a positive nor a predicted positive).
    pub fn f1(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 {
            0.0
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }

    /// Precision (0 without predicted positives).
    pub fn precision(&self) -> f64 {
        let d = self.tp + self.fp;
        if d == 0 {
            0.0
        } else {
            self.tp as f64 / d as f64
        }
    }

    /// Recall (0 without positives).
    pub fn recall(&self) -> f64 {
        let d = self.tp + self.fn_;
        if d == 0 {
            0.0
        } else {
            self.tp as f64 / d as f64
        }
    }
}

/// The threshold `t` (one of the scores) for which `prob >= t` has the highest F1, and that
/// F1; `None` without positives. Ties between thresholds go to the higher one.
pub fn best_threshold(prob: &[f32], truth: &[u8]) -> Result<Option<(f32, f64)>> {
    ensure!(
        prob.len() == truth.len(),
        "threshold: {} probabilities for {} labels",
        prob.len(),
        truth.len()
    );
    let pos = truth.iter().filter(|&&t| t == 1).count();
    if pos == 0 {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..prob.len()).collect();
    order.sort_by(|&i, &j| prob[j].total_cmp(&prob[i]));
    let (mut tp, mut seen, mut i) = (0usize, 0usize, 0usize);
    let mut best = (f32::INFINITY, 0.0f64);
    while i < order.len() {
        let s = prob[order[i]];
        while i < order.len() && prob[order[i]] == s {
            tp += (truth[order[i]] == 1) as usize;
            seen += 1;
            i += 1;
        }
        let f1 = 2.0 * tp as f64 / (seen + pos) as f64;
        if f1 > best.1 {
            best = (s, f1);
        }
    }
    Ok(Some(best))
}

/// The synapse metrics of test probabilities at a threshold chosen on validation: F1,
/// precision and recall at `threshold`, F1 at 0.5, and the PR-AUC (average precision).
pub fn synapse_metrics(
    prob: &[f32],
    truth: &[u8],
    threshold: f32,
) -> Result<BTreeMap<String, f64>> {
    let c = VoxelCounts::at(prob, truth, threshold)?;
    let mut m = BTreeMap::from([
        ("f1".to_string(), c.f1()),
        ("precision".to_string(), c.precision()),
        ("recall".to_string(), c.recall()),
        (
            "f1_at_half".to_string(),
            VoxelCounts::at(prob, truth, 0.5)?.f1(),
        ),
        ("threshold".to_string(), threshold as f64),
    ]);
    let scores: Vec<f64> = prob.iter().map(|&p| p as f64).collect();
    let pos: Vec<bool> = truth.iter().map(|&t| t == 1).collect();
    if let Some(ap) = crate::stats::average_precision(&scores, &pos) {
        m.insert("pr_auc".to_string(), ap);
    }
    Ok(m)
}

/// Volumes per forward pass in evaluation.
const EVAL_CHUNK: usize = 4;

/// The task for one seed.
#[derive(Debug)]
pub struct EmTask {
    cfg: EmConfig,
    train: Volumes,
    val: Volumes,
    test: Volumes,
    dev: Cpu,
}

impl EmTask {
    /// The task with its volumes for `seed`.
    pub fn new(cfg: &EmConfig, seed: u64, dev: &Cpu) -> Result<Self> {
        let (train, val, test) = build_volumes(&cfg.data, seed);
        Ok(Self {
            cfg: cfg.clone(),
            train,
            val,
            test,
            dev: dev.clone(),
        })
    }

    /// The training volumes.
    pub fn train(&self) -> &Volumes {
        &self.train
    }

    /// The validation volumes.
    pub fn val(&self) -> &Volumes {
        &self.val
    }

    /// The test volumes.
    pub fn test(&self) -> &Volumes {
        &self.test
    }

    fn batch_input(&self, v: &Volumes, idx: &[usize]) -> Result<Act<NoneTape>> {
        let n = v.voxels();
        let mut x = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            x.extend_from_slice(&v.x[i * n..(i + 1) * n]);
        }
        Ok(self
            .dev
            .tensor_from_vec(to_channel_major(&x, idx.len(), n)?, (n, idx.len())))
    }

    /// Probabilities `[n, voxels]` of the first `n` volumes of `v`; taps of the first `tap`.
    fn predict(
        &self,
        m: &UNet3d,
        st: &ParamStore,
        v: &Volumes,
        n: usize,
        tap: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<Tap>)> {
        let vox = v.voxels();
        let mut prob = vec![0f32; n * vox];
        let taps = Ctx::eval_in_chunks(n, EVAL_CHUNK, tap, |start, idx, ctx| {
            let z = m.forward(st, self.batch_input(v, idx)?, ctx)?.as_vec();
            crate::convkit::sigmoid_batch_major(&z, vox, idx.len(), &mut prob[start * vox..])
        })?;
        Ok((prob, taps))
    }
}

impl ConvTask for EmTask {
    type Model = UNet3d;

    fn n_train(&self) -> usize {
        self.train.len()
    }

    fn build(&self, store: &mut ParamStore, seed: u64) -> Result<UNet3d> {
        UNet3d::new(&self.cfg.model, store, self.cfg.data.size, seed)
    }

    fn topology(&self, m: &UNet3d) -> Topology {
        m.topology()
    }

    fn layer_weights(&self, m: &UNet3d) -> Vec<ParamId> {
        m.layer_weights()
    }

    fn train_batch(
        &self,
        m: &UNet3d,
        st: &ParamStore,
        idx: &[usize],
        ctx: &mut Ctx,
    ) -> Result<(Gradients<f32, Cpu>, f64)> {
        let v = &self.train;
        let target = crate::convkit::channel_major_targets(&v.label, v.voxels(), idx);
        let x = self.batch_input(v, idx)?.leaky_traced();
        let z = m.forward(st, x, ctx)?;
        let (loss, l) =
            ops::weighted_bce_with_logits(z, &target, self.cfg.loss.pos_weight, "loss")?;
        Ok((loss.backward(), l))
    }

    fn epoch_metrics(&self, m: &UNet3d, st: &ParamStore) -> Result<BTreeMap<String, f64>> {
        let n = self.cfg.data.eval_volumes.min(self.val.len());
        let (prob, _) = self.predict(m, st, &self.val, n, None)?;
        let truth = &self.val.label[..n * self.val.voxels()];
        let mut out = BTreeMap::new();
        if let Some((t, f1)) = best_threshold(&prob, truth)? {
            out.insert("val_f1".to_string(), f1);
            out.insert("val_threshold".to_string(), t as f64);
        }
        let scores: Vec<f64> = prob.iter().map(|&p| p as f64).collect();
        let pos: Vec<bool> = truth.iter().map(|&t| t == 1).collect();
        if let Some(ap) = crate::stats::average_precision(&scores, &pos) {
            out.insert("val_pr_auc".to_string(), ap);
        }
        Ok(out)
    }

    fn finish(
        &self,
        m: &UNet3d,
        st: &ParamStore,
        dir: &Path,
    ) -> Result<(BTreeMap<String, f64>, Vec<Tap>)> {
        let (vp, _) = self.predict(m, st, &self.val, self.val.len(), None)?;
        let (threshold, val_f1) = best_threshold(&vp, &self.val.label)?.unwrap_or((0.5, 0.0));
        let n = self.test.len();
        let sub = self.cfg.data.eval_subset.min(n);
        let (prob, taps) = self.predict(m, st, &self.test, n, Some(sub))?;
        let mut metrics = synapse_metrics(&prob, &self.test.label, threshold)?;
        metrics.insert("val_f1".to_string(), val_f1);
        metrics.insert(
            "positive_fraction".to_string(),
            self.test.positive_fraction(),
        );
        let s = self.test.size;
        let q: Vec<u8> = prob.iter().map(|&p| (p * 255.0).round() as u8).collect();
        let arr = crate::npy::array(&[n, s, s, s], q)?;
        crate::npy::write_atomic(&dir.join("test_prob.npy"), &arr)?;
        let rep = m.reported();
        Ok((
            metrics,
            taps.into_iter()
                .filter(|t| rep.contains(&t.population))
                .collect(),
        ))
    }
}

/// Validates the config and resolves its runs.
pub fn plan(cfg: &EmConfig, dev: &Cpu) -> Result<(Vec<ConvRunSpec>, EmTask)> {
    cfg.validate()?;
    let seed = cfg.seeds[0];
    let task = EmTask::new(cfg, seed, dev)?;
    let runs = convrun::plan_runs(
        &task,
        dev,
        seed,
        &cfg.pruning,
        &cfg.arms,
        &cfg.seeds,
        &cfg.train,
        "volumes",
        |m| m.prunable(),
    )?;
    Ok((runs, task))
}

const METRICS: [(&str, &str, f64); 5] = [
    ("f1", "F1 at val. threshold (%)", 100.0),
    ("pr_auc", "PR-AUC (%)", 100.0),
    ("precision", "precision (%)", 100.0),
    ("recall", "recall (%)", 100.0),
    ("val_f1", "val. F1 (%)", 100.0),
];

/// Writes the report of a finished experiment.
pub fn report(
    cfg: &EmConfig,
    train: &Volumes,
    test: &Volumes,
    runs: &[ConvRunResult],
) -> Result<String> {
    let arms = convrun::summarise(runs);
    let d = &cfg.data;
    let mut w = String::new();
    writeln!(
        w,
        "# {}: synapse prediction in EM volumes (stand-in)\n",
        cfg.name
    )?;
    writeln!(
        w,
        "**This is a stand-in.** No biological electron-microscopy volume (such as CREMI) can be \
         obtained offline, so the paper's experiment is replaced by generated EM-like volumes \
         with exact labels: cells of a 3-D Voronoi partition (mean seed spacing {} voxels) with \
         their own grey levels and a smooth intracellular texture (amplitude {}), dark \
         membranes (half-thickness {} voxels), mitochondrion-like blobs in {:.0} % of the \
         cells, and rare synapses: a darker, thicker disc of membrane (radius {} voxels, the \
         positive label) between two cells with {} small vesicles on the presynaptic side; \
         voxel noise sd {}. Numbers here say nothing about real EM data.\n",
        d.cell_size,
        d.texture,
        d.membrane,
        100.0 * d.mito,
        d.cleft_radius,
        d.vesicles,
        d.noise
    )?;
    if !cfg.description.is_empty() {
        writeln!(w, "{}\n", cfg.description)?;
    }
    writeln!(
        w,
        "Setup: {} training volumes (per seed), {} validation and {} test volumes (the same for \
         every run) of {s}^3 voxels; positive (cleft) voxels: {:.2} % of the test voxels and \
         {:.2} % of the first seed's training voxels. A 2-level 3-D U-Net (channels {:?}, \
         3x3x3 convs, group-norm with {} groups, 2x2x2 max-pool, nearest upsampling, one skip \
         concatenation) trained with binary cross-entropy (positive voxels weighted {}) for {} \
         epochs (batch {}, lr {}). Seeds: {:?}. BB's SP-in acts on the encoder convs after the \
         first (whose channels read one input channel); magnitude pruning prunes the same \
         layers to the same density. F1, precision and recall are voxel-wise at the threshold \
         that maximizes F1 on the validation volumes; PR-AUC is the average precision over the \
         test voxels. No connected-component post-processing.\n",
        d.n_train,
        d.n_val,
        d.n_test,
        100.0 * test.positive_fraction(),
        100.0 * train.positive_fraction(),
        cfg.model.channels,
        cfg.model.groups,
        cfg.loss.pos_weight,
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.seeds,
        s = d.size,
    )?;
    writeln!(w, "## Results (mean ± 95 % t-interval over seeds)\n")?;
    convrun::write_common_tables(&mut w, &arms, &METRICS)?;
    convrun::write_paired_section(&mut w, &arms, &METRICS[..2], Some("F1 and PR-AUC"))?;
    writeln!(
        w,
        "## Sparsity: target vs achieved density per pruned layer (first seed)\n"
    )?;
    convrun::write_layer_table(&mut w, runs)?;
    convrun::write_time(&mut w, runs)?;
    Ok(w)
}
