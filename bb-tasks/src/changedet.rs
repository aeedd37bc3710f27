//! The change-detection stand-in: generated image pairs with exact change masks, and a
//! Siamese network with shared encoder weights and a decoder fed with the concatenated
//! features of both branches (FC-Siam-conc style).
//!
//! **This is a stand-in.** No labelled change-detection pairs (LEVIR-CD or similar) can be had
//! offline (DATA.md), so pairs are generated: a procedural texture background with a few
//! objects (clothing or digit images from Fashion-MNIST / MNIST, or generated blobs) at time 1;
//! at time 2 objects are added, removed or moved (none in a share of the pairs); both times get
//! their own photometric jitter (gain, offset, noise) and a small global shift. The change mask
//! is exact: the pixels covered by an object at one time and not at the other (in the
//! unshifted frame). Changes are rare: a few percent of the pixels. Training pairs use objects
//! from the image set's training split, test pairs objects from its test split; the test pairs
//! are the same for every seed and method.
//!
//! The network runs its encoder once on both images (the batch `[x1 | x2]`, so the weights are
//! shared exactly), folds the two halves of each skip feature into channels, and decodes with
//! upsampling and skip concatenation into one logit per pixel, trained with a positive-weighted
//! binary cross-entropy. BB's SP-in acts on the encoder convs (as in the paper) except the
//! first, whose output channels read a single input channel.
//!
//! Metrics (change class, threshold 0.5): IoU and F1 pooled over all test pixels and averaged
//! per image (over the images where truth or prediction has a changed pixel), and the pixel
//! precision-recall AUC (average precision).

use crate::config::TrainConfig;
use crate::convkit::{ops, BatchNorm, Conv2d, Ctx, MaxPool, ParamId, ParamStore, Tap, Upsample};
use crate::convkit::{to_channel_major, Act};
use crate::convrun::{self, ArmSpec, ConvRunResult, ConvRunSpec, ConvTask};
use crate::realdata::{data_dir, image_files, ImageSet};
use anyhow::{anyhow, bail, ensure, Context, Result};
use bb_core::Topology;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectSource {
    /// Fashion-MNIST clothing images.
    FashionMnist,
    /// MNIST digits.
    Mnist,
    /// Generated blobs (tests and CI; no files needed).
    Synthetic,
}

fn d_size() -> usize {
    40
}
fn d_object() -> usize {
    14
}
fn d_train() -> usize {
    2000
}
fn d_test() -> usize {
    500
}
fn d_objects() -> [usize; 2] {
    [2, 4]
}
fn d_unchanged() -> f64 {
    0.2
}
fn d_two() -> f64 {
    0.3
}
fn d_noise() -> f32 {
    0.03
}
fn d_shift() -> usize {
    1
}
fn d_eval_pairs() -> usize {
    200
}
fn d_eval_subset() -> usize {
    32
}

/// The `[data]` table: how pairs are generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeDataConfig {
    /// Object images.
    pub source: ObjectSource,
    /// Folder holding the image sets (default: see [`crate::realdata`]).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Image side (a multiple of 4).
    #[serde(default = "d_size")]
    pub size: usize,
    /// Object side (objects are resampled to it).
    #[serde(default = "d_object")]
    pub object_size: usize,
    /// Training pairs (drawn with the seed).
    #[serde(default = "d_train")]
    pub n_train: usize,
    /// Test pairs (the same for every seed).
    #[serde(default = "d_test")]
    pub n_test: usize,
    /// Objects at time 1, `[min, max]`.
    #[serde(default = "d_objects")]
    pub objects: [usize; 2],
    /// Share of pairs without any change.
    #[serde(default = "d_unchanged")]
    pub p_unchanged: f64,
    /// Share of changed pairs with two change events (the others have one).
    #[serde(default = "d_two")]
    pub p_two_changes: f64,
    /// Standard deviation of the pixel noise.
    #[serde(default = "d_noise")]
    pub noise: f32,
    /// Largest global shift of each image, pixels.
    #[serde(default = "d_shift")]
    pub max_shift: usize,
    /// Test pairs scored after every epoch (`metrics.jsonl`).
    #[serde(default = "d_eval_pairs")]
    pub eval_pairs: usize,
    /// Test pairs whose encoder activity is measured (entropy, decorrelation, balance).
    #[serde(default = "d_eval_subset")]
    pub eval_subset: usize,
}

fn d_c() -> [usize; 3] {
    [8, 16, 32]
}

/// The `[model]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiamConfig {
    /// Channels of the three encoder levels.
    #[serde(default = "d_c")]
    pub channels: [usize; 3],
}

fn d_pos_weight() -> f32 {
    5.0
}

/// The `[loss]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of changed pixels in the binary cross-entropy.
    #[serde(default = "d_pos_weight")]
    pub pos_weight: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            pos_weight: d_pos_weight(),
        }
    }
}

fn d_compare() -> [String; 2] {
    ["bb_sp_in".to_string(), "dense".to_string()]
}
fn d_panel_density() -> f64 {
    0.7
}
fn d_panel_rows() -> usize {
    4
}

/// The `[panels]` table: which two methods the image panels compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PanelConfig {
    /// `[method, other]`; `other` may be the dense arm.
    #[serde(default = "d_compare")]
    pub compare: [String; 2],
    /// Density of the pruned arms compared.
    #[serde(default = "d_panel_density")]
    pub density: f64,
    /// Pairs per panel.
    #[serde(default = "d_panel_rows")]
    pub rows: usize,
}

impl Default for PanelConfig {
    fn default() -> Self {
        Self {
            compare: d_compare(),
            density: d_panel_density(),
            rows: d_panel_rows(),
        }
    }
}

/// A change-detection experiment (`task = "changedet"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeDetConfig {
    /// Name (run folder prefix).
    pub name: String,
    /// Always `"changedet"`.
    pub task: String,
    /// One line for `bb presets`.
    #[serde(default)]
    pub description: String,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Pair generation.
    pub data: ChangeDataConfig,
    /// Network.
    #[serde(default = "SiamConfig::default_model")]
    pub model: SiamConfig,
    /// Loss.
    #[serde(default)]
    pub loss: LossConfig,
    /// Training.
    pub train: TrainConfig,
    /// Engine config shared by the arms.
    #[serde(default)]
    pub pruning: toml::Table,
    /// Compared methods.
    pub arms: Vec<ArmSpec>,
    /// Image panels of the report.
    #[serde(default)]
    pub panels: PanelConfig,
}

impl SiamConfig {
    fn default_model() -> Self {
        Self { channels: d_c() }
    }
}

impl ChangeDetConfig {
    /// Parses a TOML config (unknown or missing fields are errors naming the field).
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = convrun::parse(text, "experiment config")?;
        ensure!(
            c.task == "changedet",
            "task must be \"changedet\" for this config, got {:?}",
            c.task
        );
        Ok(c)
    }

    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        convrun::validate_common(&self.name, &self.seeds, &self.train, &self.arms)?;
        let d = &self.data;
        ensure!(
            d.size >= 8 && d.size.is_multiple_of(4),
            "data.size must be a multiple of 4 and at least 8, got {}",
            d.size
        );
        ensure!(
            d.object_size >= 3 && d.object_size <= d.size / 2,
            "data.object_size must be in 3..={}, got {}",
            d.size / 2,
            d.object_size
        );
        ensure!(d.n_train >= 2, "data.n_train must be >= 2");
        ensure!(d.n_test >= 1, "data.n_test must be >= 1");
        ensure!(
            d.objects[0] <= d.objects[1] && d.objects[1] <= 16,
            "data.objects must be [min, max] with min <= max <= 16, got {:?}",
            d.objects
        );
        for (f, v) in [
            ("p_unchanged", d.p_unchanged),
            ("p_two_changes", d.p_two_changes),
        ] {
            ensure!(
                (0.0..=1.0).contains(&v),
                "data.{f} must be in [0, 1], got {v}"
            );
        }
        ensure!(
            d.noise.is_finite() && d.noise >= 0.0,
            "data.noise must be >= 0"
        );
        ensure!(d.max_shift <= 4, "data.max_shift must be <= 4");
        ensure!(d.eval_pairs >= 1, "data.eval_pairs must be >= 1");
        ensure!(d.eval_subset >= 1, "data.eval_subset must be >= 1");
        for (i, &c) in self.model.channels.iter().enumerate() {
            ensure!(c > 0, "model.channels[{i}] must be > 0");
        }
        ensure!(
            self.loss.pos_weight.is_finite() && self.loss.pos_weight > 0.0,
            "loss.pos_weight must be > 0"
        );
        ensure!(
            self.panels.density > 0.0 && self.panels.density <= 1.0,
            "panels.density must be in (0, 1]"
        );
        Ok(())
    }
}

/// Generated image pairs with their change masks, each `[n, size * size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pairs {
    /// Image side.
    pub size: usize,
    /// Time-1 images in `[0, 1]`.
    pub t1: Vec<f32>,
    /// Time-2 images.
    pub t2: Vec<f32>,
    /// 1 where the pixel changed.
    pub mask: Vec<u8>,
}

impl Pairs {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.mask.len() / (self.size * self.size)
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }

    /// Fraction of changed pixels.
    pub fn changed_fraction(&self) -> f64 {
        self.mask.iter().filter(|&&m| m == 1).count() as f64 / self.mask.len().max(1) as f64
    }
}

/// Resamples a `side x side` image to `out x out` by averaging the covered source area.
fn resample(img: &[f32], side: usize, out: usize) -> Vec<f32> {
    let f = side as f32 / out as f32;
    let mut v = vec![0f32; out * out];
    for r in 0..out {
        for c in 0..out {
            let (y0, y1) = (r as f32 * f, (r + 1) as f32 * f);
            let (x0, x1) = (c as f32 * f, (c + 1) as f32 * f);
            let (mut s, mut w) = (0f32, 0f32);
            for y in y0.floor() as usize..(y1.ceil() as usize).min(side) {
                let wy = (y1.min(y as f32 + 1.0) - y0.max(y as f32)).max(0.0);
                for x in x0.floor() as usize..(x1.ceil() as usize).min(side) {
                    let wx = (x1.min(x as f32 + 1.0) - x0.max(x as f32)).max(0.0);
                    s += wy * wx * img[y * side + x];
                    w += wy * wx;
                }
            }
            v[r * out + c] = if w > 0.0 { s / w } else { 0.0 };
        }
    }
    v
}

/// Object sprites (`object_size^2` values in `[0, 1]`) of one split.
pub fn objects(cfg: &ChangeDataConfig, train: bool, limit: usize) -> Result<Vec<Vec<f32>>> {
    let os = cfg.object_size;
    match cfg.source {
        ObjectSource::Synthetic => {
            let mut rng = ChaCha8Rng::seed_from_u64(if train { 0x4f42_4a31 } else { 0x4f42_4a32 });
            Ok((0..limit.min(200))
                .map(|_| {
                    let blobs: Vec<(f32, f32, f32)> = (0..rng.gen_range(1..4))
                        .map(|_| {
                            (
                                rng.gen_range(0.25..0.75) * os as f32,
                                rng.gen_range(0.25..0.75) * os as f32,
                                rng.gen_range(0.1..0.25) * os as f32,
                            )
                        })
                        .collect();
                    (0..os * os)
                        .map(|i| {
                            let (y, x) = ((i / os) as f32, (i % os) as f32);
                            blobs
                                .iter()
                                .map(|&(by, bx, r)| {
                                    let d2 = (y - by).powi(2) + (x - bx).powi(2);
                                    (1.5 - d2 / (r * r)).clamp(0.0, 1.0)
                                })
                                .fold(0.0f32, f32::max)
                        })
                        .collect()
                })
                .collect())
        }
        ObjectSource::Mnist | ObjectSource::FashionMnist => {
            let set = if cfg.source == ObjectSource::Mnist {
                ImageSet::Mnist
            } else {
                ImageSet::FashionMnist
            };
            let f = image_files(set, &data_dir(cfg.data_dir.as_deref()))?;
            let side = (f.pixels as f64).sqrt().round() as usize;
            ensure!(
                side * side == f.pixels,
                "{}: images are not square",
                set.title()
            );
            let x = if train { &f.train_x } else { &f.test_x };
            Ok(x.chunks_exact(f.pixels)
                .take(limit)
                .map(|im| {
                    let v: Vec<f32> = im.iter().map(|&p| p as f32 / 255.0).collect();
                    resample(&v, side, os)
                })
                .collect())
        }
    }
}

/// An object placed in a scene.
#[derive(Debug, Clone, Copy)]
struct Placed {
    obj: usize,
    y: usize,
    x: usize,
    gain: f32,
}

/// Pixels of an object that count as covered.
const COVER: f32 = 0.35;

fn overlaps(a: &Placed, y: usize, x: usize, os: usize) -> bool {
    // bounding boxes with a one-pixel margin
    let (ay0, ay1, ax0, ax1) = (a.y, a.y + os + 1, a.x, a.x + os + 1);
    !(y + os < ay0 || y >= ay1 || x + os < ax0 || x >= ax1)
}

fn free_spot(
    scene: &[Placed],
    size: usize,
    os: usize,
    rng: &mut ChaCha8Rng,
) -> Option<(usize, usize)> {
    (0..100)
        .map(|_| (rng.gen_range(0..=size - os), rng.gen_range(0..=size - os)))
        .find(|&(y, x)| scene.iter().all(|p| !overlaps(p, y, x, os)))
}

fn texture(size: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let g = 5;
    let grid: Vec<f32> = (0..g * g).map(|_| rng.gen_range(0.0..1.0)).collect();
    let waves: Vec<(f32, f32, f32, f32)> = (0..2)
        .map(|_| {
            (
                rng.gen_range(-3.0..3.0),
                rng.gen_range(-3.0..3.0),
                rng.gen_range(0.0..std::f32::consts::TAU),
                rng.gen_range(0.02..0.08),
            )
        })
        .collect();
    let level = rng.gen_range(0.1..0.3);
    let mut v = vec![0f32; size * size];
    for r in 0..size {
        for c in 0..size {
            let (gy, gx) = (
                r as f32 / (size - 1) as f32 * (g - 1) as f32,
                c as f32 / (size - 1) as f32 * (g - 1) as f32,
            );
            let (y0, x0) = ((gy as usize).min(g - 2), (gx as usize).min(g - 2));
            let (fy, fx) = (gy - y0 as f32, gx - x0 as f32);
            let n = grid[y0 * g + x0] * (1.0 - fy) * (1.0 - fx)
                + grid[y0 * g + x0 + 1] * (1.0 - fy) * fx
                + grid[(y0 + 1) * g + x0] * fy * (1.0 - fx)
                + grid[(y0 + 1) * g + x0 + 1] * fy * fx;
            let w: f32 = waves
                .iter()
                .map(|&(ky, kx, ph, a)| {
                    a * (std::f32::consts::TAU * (ky * r as f32 + kx * c as f32) / size as f32 + ph)
                        .sin()
                })
                .sum();
            v[r * size + c] = level + 0.2 * n + w;
        }
    }
    v
}

fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn cover(scene: &[Placed], objs: &[Vec<f32>], size: usize, os: usize) -> Vec<bool> {
    let mut m = vec![false; size * size];
    for p in scene {
        for i in 0..os {
            for j in 0..os {
                if objs[p.obj][i * os + j] > COVER {
                    m[(p.y + i) * size + p.x + j] = true;
                }
            }
        }
    }
    m
}

/// Renders a scene over `bg`, shifted by `(sy, sx)`, with gain, offset and noise.
#[allow(clippy::too_many_arguments)]
fn render(
    scene: &[Placed],
    objs: &[Vec<f32>],
    bg: &[f32],
    size: usize,
    os: usize,
    shift: (isize, isize),
    noise: f32,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let mut clean = bg.to_vec();
    for p in scene {
        for i in 0..os {
            for j in 0..os {
                let a = objs[p.obj][i * os + j];
                let k = (p.y + i) * size + p.x + j;
                clean[k] = clean[k] * (1.0 - a) + a * p.gain;
            }
        }
    }
    let gain = rng.gen_range(0.85..1.15f32);
    let off = rng.gen_range(-0.08..0.08f32);
    let mut out = vec![0f32; size * size];
    for r in 0..size {
        for c in 0..size {
            let sr = (r as isize - shift.0).clamp(0, size as isize - 1) as usize;
            let sc = (c as isize - shift.1).clamp(0, size as isize - 1) as usize;
            let v = gain * clean[sr * size + sc] + off + noise * gauss(rng);
            out[r * size + c] = v.clamp(0.0, 1.0);
        }
    }
    out
}

/// Generates `n` pairs from `objs` (see the module docs); the same `seed` gives the same pairs.
pub fn generate(cfg: &ChangeDataConfig, objs: &[Vec<f32>], n: usize, seed: u64) -> Result<Pairs> {
    ensure!(
        objs.len() >= 2,
        "data.source: need at least two object images"
    );
    let (size, os) = (cfg.size, cfg.object_size);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Pairs {
        size,
        t1: Vec::with_capacity(n * size * size),
        t2: Vec::with_capacity(n * size * size),
        mask: Vec::with_capacity(n * size * size),
    };
    for _ in 0..n {
        let bg = texture(size, &mut rng);
        let mut s1: Vec<Placed> = Vec::new();
        for _ in 0..rng.gen_range(cfg.objects[0]..=cfg.objects[1]) {
            if let Some((y, x)) = free_spot(&s1, size, os, &mut rng) {
                s1.push(Placed {
                    obj: rng.gen_range(0..objs.len()),
                    y,
                    x,
                    gain: rng.gen_range(0.6..1.0),
                });
            }
        }
        let mut s2 = s1.clone();
        let events = if rng.gen_bool(cfg.p_unchanged) {
            0
        } else if rng.gen_bool(cfg.p_two_changes) {
            2
        } else {
            1
        };
        for _ in 0..events {
            let kind = if s2.is_empty() {
                0
            } else {
                rng.gen_range(0..3)
            };
            match kind {
                0 => {
                    if let Some((y, x)) = free_spot(&s2, size, os, &mut rng) {
                        s2.push(Placed {
                            obj: rng.gen_range(0..objs.len()),
                            y,
                            x,
                            gain: rng.gen_range(0.6..1.0),
                        });
                    }
                }
                1 => {
                    let i = rng.gen_range(0..s2.len());
                    s2.remove(i);
                }
                _ => {
                    let i = rng.gen_range(0..s2.len());
                    let p = s2.remove(i);
                    if let Some((y, x)) = free_spot(&s2, size, os, &mut rng) {
                        s2.push(Placed { y, x, ..p });
                    } else {
                        s2.insert(i, p);
                    }
                }
            }
        }
        let mut shift = || {
            let m = cfg.max_shift as isize;
            (rng.gen_range(-m..=m), rng.gen_range(-m..=m))
        };
        let (h1, h2) = (shift(), shift());
        let (c1, c2) = (cover(&s1, objs, size, os), cover(&s2, objs, size, os));
        out.t1
            .extend(render(&s1, objs, &bg, size, os, h1, cfg.noise, &mut rng));
        out.t2
            .extend(render(&s2, objs, &bg, size, os, h2, cfg.noise, &mut rng));
        out.mask
            .extend(c1.iter().zip(&c2).map(|(&a, &b)| (a != b) as u8));
    }
    Ok(out)
}

/// The seed of the test pairs (the same for every run).
const TEST_SEED: u64 = 0x5445_5354;

/// Training pairs of `seed` and the test pairs.
pub fn build_pairs(cfg: &ChangeDataConfig, seed: u64) -> Result<(Pairs, Pairs)> {
    let tr = objects(cfg, true, 20_000)?;
    let te = objects(cfg, false, 5_000)?;
    Ok((
        generate(cfg, &tr, cfg.n_train, seed ^ 0x4348_4e47)?,
        generate(cfg, &te, cfg.n_test, TEST_SEED)?,
    ))
}

/// A conv + batch-norm + ReLU unit.
#[derive(Debug, Clone)]
struct Cbr {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Cbr {
    fn new(
        st: &mut ParamStore,
        rng: &mut ChaCha8Rng,
        name: &str,
        inp: usize,
        out: usize,
        hw: (usize, usize),
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(st, rng, name, inp, out, hw, 3, 1, 1, false)?,
            bn: BatchNorm::new(st, &format!("{name}.bn"), out)?,
        })
    }

    fn forward<T: Tape<f32, Cpu>>(
        &self,
        st: &ParamStore,
        x: Act<T>,
        ctx: &mut Ctx,
    ) -> Result<Act<T>> {
        let y = self.conv.forward(st, x)?;
        Ok(self.bn.forward(st, y, ctx)?.relu())
    }
}

/// The Siamese change-detection network (FC-Siam-conc style; see the module docs).
#[derive(Debug, Clone)]
pub struct SiamNet {
    size: usize,
    c: [usize; 3],
    enc: Vec<Cbr>,
    pools: [MaxPool; 2],
    d3: Cbr,
    up3: Upsample,
    d2: Cbr,
    up2: Upsample,
    d1: Cbr,
    out: Conv2d,
}

impl SiamNet {
    /// Builds the network for `size x size` single-channel images.
    pub fn new(cfg: &SiamConfig, st: &mut ParamStore, size: usize, seed: u64) -> Result<Self> {
        let c = cfg.channels;
        ensure!(size.is_multiple_of(4), "data.size must be a multiple of 4");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let hw = |k: usize| (size / k, size / k);
        let enc = vec![
            Cbr::new(st, &mut rng, "e1a", 1, c[0], hw(1))?,
            Cbr::new(st, &mut rng, "e1b", c[0], c[0], hw(1))?,
            Cbr::new(st, &mut rng, "e2a", c[0], c[1], hw(2))?,
            Cbr::new(st, &mut rng, "e2b", c[1], c[1], hw(2))?,
            Cbr::new(st, &mut rng, "e3a", c[1], c[2], hw(4))?,
            Cbr::new(st, &mut rng, "e3b", c[2], c[2], hw(4))?,
        ];
        Ok(Self {
            size,
            c,
            enc,
            pools: [
                MaxPool::new("pool1", c[0], hw(1), 2, 2)?,
                MaxPool::new("pool2", c[1], hw(2), 2, 2)?,
            ],
            d3: Cbr::new(st, &mut rng, "d3", 2 * c[2], c[1], hw(4))?,
            up3: Upsample::new("up3", c[1], hw(4), 2)?,
            d2: Cbr::new(st, &mut rng, "d2", 3 * c[1], c[0], hw(2))?,
            up2: Upsample::new("up2", c[0], hw(2), 2)?,
            d1: Cbr::new(st, &mut rng, "d1", 3 * c[0], c[0], hw(1))?,
            out: Conv2d::new(st, &mut rng, "out", c[0], 1, hw(1), 1, 1, 0, true)?,
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

    fn layers(&self) -> Vec<(&Conv2d, &str, &str)> {
        let e = |i: usize| self.enc[i].conv.name.as_str();
        vec![
            (&self.enc[0].conv, "input", e(0)),
            (&self.enc[1].conv, e(0), e(1)),
            (&self.enc[2].conv, e(1), e(2)),
            (&self.enc[3].conv, e(2), e(3)),
            (&self.enc[4].conv, e(3), e(4)),
            (&self.enc[5].conv, e(4), e(5)),
            (&self.d3.conv, "d3.in", "d3"),
            (&self.d2.conv, "d2.in", "d2"),
            (&self.d1.conv, "d1.in", "d1"),
            (&self.out, "d1", "out"),
        ]
    }

    /// The engine's view. Encoder populations are the channels of the shared encoder (their
    /// activity is measured over both images). The decoder's inputs are concatenations of
    /// both branches' skip features, which the engine sees as separate populations
    /// (`d3.in`, `d2.in`, `d1.in`), so encoder traffic counts only the encoder's own
    /// consumers.
    pub fn topology(&self) -> Topology {
        let c = self.c;
        let mut t = Topology::new()
            .population("input", 1)
            .population("d3.in", 2 * c[2])
            .population("d2.in", 3 * c[1])
            .population("d1.in", 3 * c[0])
            .population("d3", c[1])
            .population("d2", c[0])
            .population("d1", c[0])
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

    /// `x`: `(size², 2B)`, the time-1 images in the first `B` columns and the time-2 images in
    /// the last `B`. Returns the change logits `(size², B)`.
    pub fn forward<T: Tape<f32, Cpu>>(
        &self,
        st: &ParamStore,
        x: Act<T>,
        ctx: &mut Ctx,
    ) -> Result<Act<T>> {
        let (rows, b2) = *x.shape();
        ensure!(
            rows == self.size * self.size,
            "changedet: input has {rows} rows, expected {}",
            self.size * self.size
        );
        ensure!(
            b2 % 2 == 0,
            "changedet: the batch must hold both images of every pair"
        );
        let mut h = x;
        let mut skips = Vec::new();
        for (i, e) in self.enc.iter().enumerate() {
            if i == 2 || i == 4 {
                h = self.pools[i / 2 - 1].forward(h)?;
            }
            h = e.forward(st, h, ctx)?;
            ctx.tap(&e.conv.name, &h, e.conv.out)?;
            if i == 1 || i == 3 {
                skips.push(ops::fold_halves(
                    h.with_empty_tape(),
                    &format!("{}.fold", e.conv.name),
                )?);
            }
        }
        let y = ops::fold_halves(h, "e3b.fold")?;
        let y = self.d3.forward(st, y, ctx)?;
        let y = self.up3.forward(y)?;
        let s2 = skips.pop().expect("two skips");
        let y = ops::concat_rows(vec![y, s2], "d2.in")?;
        let y = self.d2.forward(st, y, ctx)?;
        let y = self.up2.forward(y)?;
        let s1 = skips.pop().expect("two skips");
        let y = ops::concat_rows(vec![y, s1], "d1.in")?;
        let y = self.d1.forward(st, y, ctx)?;
        self.out.forward(st, y)
    }
}

/// The task for one seed.
#[derive(Debug)]
pub struct ChangeDetTask {
    cfg: ChangeDetConfig,
    train: Pairs,
    test: Pairs,
    dev: Cpu,
}

const EVAL_CHUNK: usize = 64;

/// Pixel counts of the change class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Changed and predicted changed.
    pub tp: u64,
    /// Unchanged, predicted changed.
    pub fp: u64,
    /// Changed, predicted unchanged.
    pub fn_: u64,
}

impl Counts {
    /// Counts of one prediction (`prob >= 0.5` is "changed").
    pub fn of(prob: &[f32], truth: &[u8]) -> Self {
        let mut c = Self::default();
        for (&p, &t) in prob.iter().zip(truth) {
            match (p >= 0.5, t == 1) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                _ => {}
            }
        }
        c
    }

    /// IoU, `None` when truth and prediction are both empty.
    pub fn iou(&self) -> Option<f64> {
        let d = self.tp + self.fp + self.fn_;
        (d > 0).then(|| self.tp as f64 / d as f64)
    }

    /// F1, `None` when truth and prediction are both empty.
    pub fn f1(&self) -> Option<f64> {
        let d = 2 * self.tp + self.fp + self.fn_;
        (d > 0).then(|| 2.0 * self.tp as f64 / d as f64)
    }
}

/// The change metrics of predicted probabilities against truth (both `[n, pixels]`).
pub fn change_metrics(prob: &[f32], truth: &[u8], pixels: usize) -> Result<BTreeMap<String, f64>> {
    ensure!(
        pixels > 0 && prob.len() == truth.len() && prob.len().is_multiple_of(pixels),
        "change metrics: {} probabilities and {} truth values are not whole images of {pixels} pixels",
        prob.len(),
        truth.len()
    );
    let mut pooled = Counts::default();
    let (mut iou, mut f1, mut empty) = (Vec::new(), Vec::new(), 0usize);
    for (p, t) in prob.chunks_exact(pixels).zip(truth.chunks_exact(pixels)) {
        let c = Counts::of(p, t);
        pooled.tp += c.tp;
        pooled.fp += c.fp;
        pooled.fn_ += c.fn_;
        match (c.iou(), c.f1()) {
            (Some(a), Some(b)) => {
                iou.push(a);
                f1.push(b);
            }
            _ => empty += 1,
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut m = BTreeMap::from([
        ("iou_pooled".to_string(), pooled.iou().unwrap_or(0.0)),
        ("f1_pooled".to_string(), pooled.f1().unwrap_or(0.0)),
        ("iou_per_image".to_string(), mean(&iou)),
        ("f1_per_image".to_string(), mean(&f1)),
        ("images_both_empty".to_string(), empty as f64),
    ]);
    let scores: Vec<f64> = prob.iter().map(|&p| p as f64).collect();
    let pos: Vec<bool> = truth.iter().map(|&t| t == 1).collect();
    if let Some(ap) = crate::stats::average_precision(&scores, &pos) {
        m.insert("pr_auc".to_string(), ap);
    }
    Ok(m)
}

impl ChangeDetTask {
    /// The task with its pairs for `seed`.
    pub fn new(cfg: &ChangeDetConfig, seed: u64, dev: &Cpu) -> Result<Self> {
        let (train, test) = build_pairs(&cfg.data, seed)?;
        Ok(Self {
            cfg: cfg.clone(),
            train,
            test,
            dev: dev.clone(),
        })
    }

    /// The test pairs.
    pub fn test(&self) -> &Pairs {
        &self.test
    }

    /// The training pairs.
    pub fn train(&self) -> &Pairs {
        &self.train
    }

    fn batch_input(&self, p: &Pairs, idx: &[usize]) -> Result<Act<NoneTape>> {
        let px = p.size * p.size;
        let mut x = Vec::with_capacity(2 * idx.len() * px);
        for &i in idx {
            x.extend_from_slice(&p.t1[i * px..(i + 1) * px]);
        }
        for &i in idx {
            x.extend_from_slice(&p.t2[i * px..(i + 1) * px]);
        }
        let b2 = 2 * idx.len();
        Ok(self
            .dev
            .tensor_from_vec(to_channel_major(&x, b2, px)?, (px, b2)))
    }

    /// Probabilities `[n, pixels]` of the first `n` test pairs; taps of the first `tap` pairs.
    fn predict(
        &self,
        m: &SiamNet,
        st: &ParamStore,
        n: usize,
        tap: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<Tap>)> {
        let p = &self.test;
        let px = p.size * p.size;
        let mut prob = vec![0f32; n * px];
        let taps = Ctx::eval_in_chunks(n, EVAL_CHUNK, tap, |start, idx, ctx| {
            let z = m.forward(st, self.batch_input(p, idx)?, ctx)?.as_vec(); // (px, b)
            crate::convkit::sigmoid_batch_major(&z, px, idx.len(), &mut prob[start * px..])
        })?;
        Ok((prob, taps))
    }
}

impl ConvTask for ChangeDetTask {
    type Model = SiamNet;

    fn n_train(&self) -> usize {
        self.train.len()
    }

    fn build(&self, store: &mut ParamStore, seed: u64) -> Result<SiamNet> {
        SiamNet::new(&self.cfg.model, store, self.cfg.data.size, seed)
    }

    fn topology(&self, m: &SiamNet) -> Topology {
        m.topology()
    }

    fn layer_weights(&self, m: &SiamNet) -> Vec<ParamId> {
        m.layer_weights()
    }

    fn train_batch(
        &self,
        m: &SiamNet,
        st: &ParamStore,
        idx: &[usize],
        ctx: &mut Ctx,
    ) -> Result<(Gradients<f32, Cpu>, f64)> {
        let p = &self.train;
        let target = crate::convkit::channel_major_targets(&p.mask, p.size * p.size, idx);
        let x = self.batch_input(p, idx)?.leaky_traced();
        let z = m.forward(st, x, ctx)?;
        let (loss, v) =
            ops::weighted_bce_with_logits(z, &target, self.cfg.loss.pos_weight, "loss")?;
        Ok((loss.backward(), v))
    }

    fn epoch_metrics(&self, m: &SiamNet, st: &ParamStore) -> Result<BTreeMap<String, f64>> {
        let n = self.cfg.data.eval_pairs.min(self.test.len());
        let (prob, _) = self.predict(m, st, n, None)?;
        let px = self.test.size * self.test.size;
        let all = change_metrics(&prob, &self.test.mask[..n * px], px)?;
        Ok(all
            .into_iter()
            .filter(|(k, _)| k == "f1_pooled" || k == "pr_auc")
            .collect())
    }

    fn finish(
        &self,
        m: &SiamNet,
        st: &ParamStore,
        dir: &Path,
    ) -> Result<(BTreeMap<String, f64>, Vec<Tap>)> {
        let n = self.test.len();
        let sub = self.cfg.data.eval_subset.min(n);
        let (prob, taps) = self.predict(m, st, n, Some(sub))?;
        let px = self.test.size * self.test.size;
        let mut metrics = change_metrics(&prob, &self.test.mask, px)?;
        metrics.insert("changed_fraction".to_string(), self.test.changed_fraction());
        let q: Vec<u8> = prob.iter().map(|&p| (p * 255.0).round() as u8).collect();
        let arr = crate::npy::array(&[n, self.test.size, self.test.size], q)?;
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
pub fn plan(cfg: &ChangeDetConfig, dev: &Cpu) -> Result<(Vec<ConvRunSpec>, ChangeDetTask)> {
    cfg.validate()?;
    let seed = cfg.seeds[0];
    let task = ChangeDetTask::new(cfg, seed, dev)?;
    let runs = convrun::plan_runs(
        &task,
        dev,
        seed,
        &cfg.pruning,
        &cfg.arms,
        &cfg.seeds,
        &cfg.train,
        "pairs",
        |m| m.prunable(),
    )?;
    Ok((runs, task))
}

/// Writes an RGB PNG.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    ensure!(
        rgb.len() == width * height * 3,
        "png: {} bytes for {width}x{height}",
        rgb.len()
    );
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| anyhow!("png: {e}"))?;
        w.write_image_data(rgb).map_err(|e| anyhow!("png: {e}"))?;
    }
    crate::io::write_atomic(path, &buf)
}

/// Scale of the panel tiles.
const ZOOM: usize = 4;
/// Gap between tiles, pixels.
const GAP: usize = 4;

/// Panel rows `[t1 | t2 | truth | a | b]` of the given pairs. Prediction tiles: green = change
/// found, red = change missed, blue = false alarm, black = no change.
pub fn panel(test: &Pairs, rows: &[usize], a: &[u8], b: &[u8]) -> Result<(usize, usize, Vec<u8>)> {
    let s = test.size;
    let px = s * s;
    ensure!(
        a.len() == test.mask.len() && b.len() == test.mask.len(),
        "panel: predictions do not match the {} test pairs",
        test.len()
    );
    if let Some(&r) = rows.iter().find(|&&r| r >= test.len()) {
        bail!("panel: pair {r} of {}", test.len());
    }
    let tile = s * ZOOM;
    let w = 5 * tile + 6 * GAP;
    let h = rows.len() * tile + (rows.len() + 1) * GAP;
    let mut img = vec![255u8; w * h * 3];
    for (r, &i) in rows.iter().enumerate() {
        let truth = &test.mask[i * px..(i + 1) * px];
        let tiles: [Box<dyn Fn(usize) -> [u8; 3]>; 5] = [
            Box::new(|k| {
                let v = (test.t1[i * px + k] * 255.0) as u8;
                [v, v, v]
            }),
            Box::new(|k| {
                let v = (test.t2[i * px + k] * 255.0) as u8;
                [v, v, v]
            }),
            Box::new(|k| {
                if truth[k] == 1 {
                    [255, 255, 255]
                } else {
                    [0, 0, 0]
                }
            }),
            Box::new(|k| color(a[i * px + k] >= 128, truth[k] == 1)),
            Box::new(|k| color(b[i * px + k] >= 128, truth[k] == 1)),
        ];
        for (t, f) in tiles.iter().enumerate() {
            let (x0, y0) = (GAP + t * (tile + GAP), GAP + r * (tile + GAP));
            for y in 0..tile {
                for x in 0..tile {
                    let c = f((y / ZOOM) * s + x / ZOOM);
                    let o = ((y0 + y) * w + x0 + x) * 3;
                    img[o..o + 3].copy_from_slice(&c);
                }
            }
        }
    }
    Ok((w, h, img))
}

fn color(pred: bool, truth: bool) -> [u8; 3] {
    match (pred, truth) {
        (true, true) => [40, 200, 60],
        (false, true) => [230, 40, 40],
        (true, false) => [50, 90, 240],
        (false, false) => [0, 0, 0],
    }
}

/// The pairs where `a` finds most changed pixels that `b` misses (most first; at most
/// `rows`, only pairs with at least one such pixel).
pub fn most_found(test: &Pairs, a: &[u8], b: &[u8], rows: usize) -> Result<Vec<(usize, usize)>> {
    ensure!(
        a.len() == test.mask.len() && b.len() == test.mask.len(),
        "most_found: predictions do not match the {} test pairs",
        test.len()
    );
    let px = test.size * test.size;
    let mut v: Vec<(usize, usize)> = (0..test.len())
        .map(|i| {
            let n = (0..px)
                .filter(|&k| {
                    let j = i * px + k;
                    test.mask[j] == 1 && a[j] >= 128 && b[j] < 128
                })
                .count();
            (i, n)
        })
        .filter(|&(_, n)| n > 0)
        .collect();
    v.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    v.truncate(rows);
    Ok(v)
}

const METRICS: [(&str, &str, f64); 5] = [
    ("iou_pooled", "IoU pooled (%)", 100.0),
    ("f1_pooled", "F1 pooled (%)", 100.0),
    ("iou_per_image", "IoU per image (%)", 100.0),
    ("f1_per_image", "F1 per image (%)", 100.0),
    ("pr_auc", "PR-AUC (%)", 100.0),
];

fn read_probs(dir: &Path, n: usize, px: usize) -> Result<Vec<u8>> {
    let p = dir.join("test_prob.npy");
    let a: ndarray::ArrayD<u8> =
        ndarray_npy::read_npy(&p).with_context(|| format!("cannot read {}", p.display()))?;
    ensure!(
        a.len() == n * px,
        "{}: {} values, expected {}",
        p.display(),
        a.len(),
        n * px
    );
    Ok(a.iter().copied().collect())
}

/// Writes the report (and its panels) of a finished experiment into `dir`.
pub fn report(
    cfg: &ChangeDetConfig,
    test: &Pairs,
    train: &Pairs,
    runs: &[ConvRunResult],
    dir: &Path,
) -> Result<String> {
    let arms = convrun::summarise(runs);
    let mut w = String::new();
    let src = match cfg.data.source {
        ObjectSource::FashionMnist => "Fashion-MNIST clothing images",
        ObjectSource::Mnist => "MNIST digits",
        ObjectSource::Synthetic => "generated blobs",
    };
    writeln!(w, "# {}: change detection (stand-in)\n", cfg.name)?;
    writeln!(
        w,
        "**This is a stand-in.** No labelled change-detection pairs (such as LEVIR-CD) can be \
         obtained offline, so the paper's experiment is replaced by generated pairs with exact \
         change masks: procedural texture backgrounds with {src} as objects, added, removed or \
         moved between the two times, with photometric jitter, pixel noise (sd {}) and global \
         shifts of up to {} pixel(s) on both images. Numbers here say nothing about remote \
         sensing.\n",
        cfg.data.noise, cfg.data.max_shift
    )?;
    if !cfg.description.is_empty() {
        writeln!(w, "{}\n", cfg.description)?;
    }
    writeln!(
        w,
        "Setup: {} training pairs (per seed) and {} test pairs (the same for every run) of \
         {s}x{s} pixels, objects resampled to {o}x{o}; changed pixels: {:.2} % of the test \
         pixels and {:.2} % of the first seed's training pixels. A Siamese encoder (channels \
         {:?}, weights shared by running it on both images as one batch) and a decoder fed with \
         the concatenated skip features of both branches (FC-Siam-conc style), trained with \
         binary cross-entropy (changed pixels weighted {}) for {} epochs (batch {}, lr {}). \
         Seeds: {:?}. BB's SP-in acts on the encoder convs after the first (whose channels read \
         one input channel); magnitude pruning prunes the same layers to the same density. \
         Threshold 0.5; per-image means leave out the images where neither truth nor \
         prediction has a changed pixel.\n",
        cfg.data.n_train,
        cfg.data.n_test,
        100.0 * test.changed_fraction(),
        100.0 * train.changed_fraction(),
        cfg.model.channels,
        cfg.loss.pos_weight,
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        cfg.seeds,
        s = cfg.data.size,
        o = cfg.data.object_size,
    )?;
    writeln!(w, "## Results (mean ± 95 % t-interval over seeds)\n")?;
    convrun::write_common_tables(&mut w, &arms, &METRICS)?;
    convrun::write_paired_section(&mut w, &arms, &METRICS, None)?;
    // panels
    let [ma, mb] = &cfg.panels.compare;
    let find = |m: &str| {
        runs.iter().find(|r| {
            r.method == m
                && r.seed == cfg.seeds[0]
                && r.density
                    .is_none_or(|d| (d - cfg.panels.density).abs() < 1e-12)
        })
    };
    writeln!(w, "## Where the two differ most (first seed)\n")?;
    match (find(ma), find(mb)) {
        (Some(ra), Some(rb)) => {
            let px = test.size * test.size;
            let pa = read_probs(
                &dir.join(format!("{}/seed-{}", ra.arm, ra.seed)),
                test.len(),
                px,
            )?;
            let pb = read_probs(
                &dir.join(format!("{}/seed-{}", rb.arm, rb.seed)),
                test.len(),
                px,
            )?;
            std::fs::create_dir_all(dir.join("panels"))?;
            writeln!(
                w,
                "Columns: time 1, time 2, true change, {}, {}. Prediction tiles: green = change \
                 found, red = change missed, blue = false alarm.\n",
                rb.arm, ra.arm
            )?;
            for (title, file, found, missed) in [
                (
                    format!("Changes {} finds and {} misses", ra.arm, rb.arm),
                    "a-finds.png",
                    &pa,
                    &pb,
                ),
                (
                    format!("Changes {} finds and {} misses", rb.arm, ra.arm),
                    "b-finds.png",
                    &pb,
                    &pa,
                ),
            ] {
                let rows = most_found(test, found, missed, cfg.panels.rows)?;
                writeln!(w, "### {title}\n")?;
                if rows.is_empty() {
                    writeln!(w, "No test pair has such pixels.\n")?;
                    continue;
                }
                let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
                let (pw, ph, img) = panel(test, &idx, &pb, &pa)?;
                write_png(&dir.join("panels").join(file), pw, ph, &img)?;
                writeln!(
                    w,
                    "Test pairs {} ({} such pixels).\n\n![{title}](panels/{file})\n",
                    idx.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    rows.iter()
                        .map(|r| r.1.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )?;
            }
        }
        _ => writeln!(
            w,
            "No panels: the experiment has no {ma} and {mb} runs at density {} with seed {}.\n",
            cfg.panels.density, cfg.seeds[0]
        )?,
    }
    writeln!(
        w,
        "## Sparsity: target vs achieved density per pruned layer (first seed)\n"
    )?;
    convrun::write_layer_table(&mut w, runs)?;
    convrun::write_time(&mut w, runs)?;
    Ok(w)
}
