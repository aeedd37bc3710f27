//! The face-identification stand-in: a small bottleneck ResNet trained to classify some
//! classes of an image set, then used as an embedding for open-set verification on classes it
//! never saw.
//!
//! **This is a stand-in.** No identity-labelled face set can be had offline (DATA.md), so the
//! paper's face identification is replaced by the same protocol on Fashion-MNIST or MNIST:
//! identities are classes, the held-out classes play the unseen identities.
//!
//! Protocol, per seed:
//! - training: `train_per_class` images of each seen class (drawn with the seed), softmax
//!   cross-entropy over the seen classes;
//! - identification: top-1 accuracy on the test images of the seen classes;
//! - verification: the test images of the held-out classes are split once (the same split for
//!   every seed and method) into a validation and a test half; in each half `verify_pairs`
//!   pairs are drawn, half from the same class and half from different classes. A pair's score
//!   is the cosine similarity of the two embeddings (the global average pool of the last
//!   block, the penultimate layer). Reported: ROC-AUC on the test pairs, and the accuracy on
//!   the test pairs at the threshold that maximizes accuracy on the validation pairs.
//!
//! BB's SP-in acts on the first 1x1 conv of every block, as in the paper; the baselines
//! (magnitude, RigL) prune the same layers to the same density.

use crate::config::TrainConfig;
use crate::convkit::{input, Ctx, ParamId, ParamStore, Tap};
use crate::convrun::{self, ArmSpec, ConvRunResult, ConvRunSpec, ConvTask};
use crate::model::contiguous_cross_entropy;
use crate::realdata::{data_dir, image_files, ImageSet, IMAGE_CLASSES};
use crate::resnet::{ResNet, ResNetConfig};
use anyhow::{anyhow, ensure, Result};
use bb_core::Topology;
use dfdx::prelude::*;
use dfdx::tensor::Cpu;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaceSource {
    /// Fashion-MNIST (fetched by `scripts/fetch-data.sh`).
    FashionMnist,
    /// MNIST (fetched by `scripts/fetch-data.sh`).
    Mnist,
    /// Generated class prototypes with jitter and noise (tests and CI; no files needed).
    Synthetic,
}

fn d_test_per_class() -> usize {
    1000
}
fn d_pairs() -> usize {
    2000
}
fn d_eval_subset() -> usize {
    256
}
fn d_syn_classes() -> usize {
    10
}
fn d_syn_size() -> usize {
    12
}
fn d_syn_per_class() -> usize {
    40
}

/// The `[data]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaceDataConfig {
    /// Image source.
    pub source: FaceSource,
    /// Folder holding the image sets (default: see [`crate::realdata`]).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Classes never trained on: the verification identities.
    pub heldout_classes: Vec<usize>,
    /// Training images per seen class (default: all).
    #[serde(default)]
    pub train_per_class: Option<usize>,
    /// Identification test images per seen class (default 1000, at most what exists).
    #[serde(default = "d_test_per_class")]
    pub test_per_class: usize,
    /// Verification pairs in each of the validation and test halves (half same-class).
    #[serde(default = "d_pairs")]
    pub verify_pairs: usize,
    /// Test images used to measure activity (entropy, decorrelation, balance).
    #[serde(default = "d_eval_subset")]
    pub eval_subset: usize,
    /// Synthetic source: number of classes.
    #[serde(default = "d_syn_classes")]
    pub synthetic_classes: usize,
    /// Synthetic source: image side.
    #[serde(default = "d_syn_size")]
    pub synthetic_size: usize,
    /// Synthetic source: training (and test) images per class.
    #[serde(default = "d_syn_per_class")]
    pub synthetic_per_class: usize,
}

/// A face-identification experiment (`task = "faceid"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaceIdConfig {
    /// Name (run folder prefix).
    pub name: String,
    /// Always `"faceid"`.
    pub task: String,
    /// One line for `bb presets`.
    #[serde(default)]
    pub description: String,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Data.
    pub data: FaceDataConfig,
    /// Network.
    pub model: ResNetConfig,
    /// Training.
    pub train: TrainConfig,
    /// Engine config shared by the arms.
    #[serde(default)]
    pub pruning: toml::Table,
    /// Compared methods.
    pub arms: Vec<ArmSpec>,
}

impl FaceIdConfig {
    /// Parses a TOML config (unknown or missing fields are errors naming the field).
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = convrun::parse(text, "experiment config")?;
        ensure!(
            c.task == "faceid",
            "task must be \"faceid\" for this config, got {:?}",
            c.task
        );
        Ok(c)
    }

    fn classes(&self) -> usize {
        match self.data.source {
            FaceSource::Synthetic => self.data.synthetic_classes,
            _ => IMAGE_CLASSES,
        }
    }

    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        convrun::validate_common(&self.name, &self.seeds, &self.train, &self.arms)?;
        self.model.validate()?;
        let d = &self.data;
        let k = self.classes();
        ensure!(
            d.source != FaceSource::Synthetic || (2..=64).contains(&d.synthetic_classes),
            "data.synthetic_classes must be in 2..=64"
        );
        ensure!(
            d.source != FaceSource::Synthetic || d.synthetic_size >= 4,
            "data.synthetic_size must be >= 4"
        );
        ensure!(
            d.source != FaceSource::Synthetic || d.synthetic_per_class >= 2,
            "data.synthetic_per_class must be >= 2"
        );
        ensure!(
            d.heldout_classes.len() >= 2,
            "data.heldout_classes: give at least two classes (different-class pairs need two)"
        );
        for (i, &c) in d.heldout_classes.iter().enumerate() {
            ensure!(
                c < k,
                "data.heldout_classes[{i}] = {c}, but there are {k} classes"
            );
            ensure!(
                !d.heldout_classes[..i].contains(&c),
                "data.heldout_classes: {c} appears twice"
            );
        }
        ensure!(
            k - d.heldout_classes.len() >= 2,
            "data.heldout_classes leaves fewer than two classes to train on"
        );
        ensure!(
            d.train_per_class != Some(0),
            "data.train_per_class must be >= 1"
        );
        ensure!(d.test_per_class >= 1, "data.test_per_class must be >= 1");
        ensure!(d.verify_pairs >= 2, "data.verify_pairs must be >= 2");
        ensure!(d.eval_subset >= 1, "data.eval_subset must be >= 1");
        Ok(())
    }
}

/// The images of one seed.
#[derive(Debug, Clone)]
pub struct FaceData {
    /// Image grid.
    pub hw: (usize, usize),
    /// Original class ids of the seen classes (model class `i` is `seen[i]`).
    pub seen: Vec<usize>,
    /// Training images `[n, h*w]` in `[0, 1]`.
    pub train_x: Vec<f32>,
    /// Model classes of the training images.
    pub train_y: Vec<usize>,
    /// Identification test images.
    pub test_x: Vec<f32>,
    /// Their model classes.
    pub test_y: Vec<usize>,
    /// Verification images (held-out classes).
    pub verify_x: Vec<f32>,
    /// Their original classes.
    pub verify_y: Vec<usize>,
    /// Validation pairs `(i, j, same)` into the verification images.
    pub val_pairs: Vec<(usize, usize, bool)>,
    /// Test pairs.
    pub test_pairs: Vec<(usize, usize, bool)>,
}

impl FaceData {
    /// Pixels per image.
    pub fn pixels(&self) -> usize {
        self.hw.0 * self.hw.1
    }
}

/// Synthetic identities: each class is a fixed pattern of a few bright blobs; a sample is its
/// class pattern shifted by up to one pixel, with random brightness and noise.
fn synthetic(k: usize, side: usize, per_class: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut proto_rng = ChaCha8Rng::seed_from_u64(0x5359_4e46);
    let protos: Vec<Vec<(f32, f32, f32)>> = (0..k)
        .map(|_| {
            (0..3)
                .map(|_| {
                    (
                        proto_rng.gen_range(1.0..side as f32 - 1.0),
                        proto_rng.gen_range(1.0..side as f32 - 1.0),
                        proto_rng.gen_range(0.8..2.0),
                    )
                })
                .collect()
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..per_class {
        for (c, p) in protos.iter().enumerate() {
            let (dy, dx) = (rng.gen_range(-1.0..1.0f32), rng.gen_range(-1.0..1.0f32));
            let gain = rng.gen_range(0.7..1.0f32);
            for r in 0..side {
                for col in 0..side {
                    let v: f32 = p
                        .iter()
                        .map(|&(py, px, s)| {
                            let d2 = (r as f32 - py - dy).powi(2) + (col as f32 - px - dx).powi(2);
                            (-d2 / (2.0 * s * s)).exp()
                        })
                        .sum();
                    x.push((gain * v + rng.gen_range(0.0..0.15)).min(1.0));
                }
            }
            y.push(c);
        }
    }
    (x, y)
}

/// Draws `n` pairs among `idx` (classes in `labels`): `n / 2` same-class pairs, the rest
/// different-class pairs.
fn draw_pairs(
    idx: &[usize],
    labels: &[usize],
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<(usize, usize, bool)>> {
    let mut by: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in idx {
        by.entry(labels[i]).or_default().push(i);
    }
    let classes: Vec<usize> = by.keys().copied().collect();
    ensure!(
        classes.len() >= 2,
        "verification needs images of two classes at least"
    );
    let same_ok: Vec<usize> = classes
        .iter()
        .copied()
        .filter(|c| by[c].len() >= 2)
        .collect();
    ensure!(
        !same_ok.is_empty(),
        "verification needs two images of one class at least"
    );
    let mut pairs = Vec::with_capacity(n);
    for p in 0..n {
        if p < n / 2 {
            let c = same_ok[rng.gen_range(0..same_ok.len())];
            let v = &by[&c];
            let a = rng.gen_range(0..v.len());
            let mut b = rng.gen_range(0..v.len() - 1);
            if b >= a {
                b += 1;
            }
            pairs.push((v[a], v[b], true));
        } else {
            let a = rng.gen_range(0..classes.len());
            let mut b = rng.gen_range(0..classes.len() - 1);
            if b >= a {
                b += 1;
            }
            let (va, vb) = (&by[&classes[a]], &by[&classes[b]]);
            pairs.push((
                va[rng.gen_range(0..va.len())],
                vb[rng.gen_range(0..vb.len())],
                false,
            ));
        }
    }
    Ok(pairs)
}

/// Builds the data of one seed (see the module docs).
pub fn build_data(cfg: &FaceIdConfig, seed: u64) -> Result<FaceData> {
    let d = &cfg.data;
    let k = cfg.classes();
    let (hw, trx, try_, tex, tey) = match d.source {
        FaceSource::Synthetic => {
            let s = d.synthetic_size;
            let (a, b) = synthetic(k, s, d.synthetic_per_class, 1);
            let (c, e) = synthetic(k, s, d.synthetic_per_class, 2);
            ((s, s), a, b, c, e)
        }
        FaceSource::Mnist | FaceSource::FashionMnist => {
            let set = if d.source == FaceSource::Mnist {
                ImageSet::Mnist
            } else {
                ImageSet::FashionMnist
            };
            let f = image_files(set, &data_dir(d.data_dir.as_deref()))?;
            let side = (f.pixels as f64).sqrt().round() as usize;
            ensure!(
                side * side == f.pixels,
                "{}: images of {} pixels are not square",
                set.title(),
                f.pixels
            );
            let conv = |x: &[u8]| x.iter().map(|&v| v as f32 / 255.0).collect::<Vec<_>>();
            let lab = |y: &[u8]| y.iter().map(|&v| v as usize).collect::<Vec<_>>();
            (
                (side, side),
                conv(&f.train_x),
                lab(&f.train_y),
                conv(&f.test_x),
                lab(&f.test_y),
            )
        }
    };
    let px = hw.0 * hw.1;
    let seen: Vec<usize> = (0..k).filter(|c| !d.heldout_classes.contains(c)).collect();
    let pick = |labels: &[usize], c: usize| -> Vec<usize> {
        labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == c)
            .map(|(i, _)| i)
            .collect()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4641_4345);
    let (mut train_x, mut train_y) = (Vec::new(), Vec::new());
    let (mut test_x, mut test_y) = (Vec::new(), Vec::new());
    let mut train_idx = Vec::new();
    for (m, &c) in seen.iter().enumerate() {
        let mut pool = pick(&try_, c);
        if let Some(n) = d.train_per_class {
            ensure!(
                n <= pool.len(),
                "data.train_per_class = {n}, but class {c} has {} training images",
                pool.len()
            );
            pool.shuffle(&mut rng);
            pool.truncate(n);
        }
        train_idx.extend(pool.into_iter().map(|i| (i, m)));
        // the same identification test set for every seed: the first images of the class
        for &i in pick(&tey, c).iter().take(d.test_per_class) {
            test_x.extend_from_slice(&tex[i * px..(i + 1) * px]);
            test_y.push(m);
        }
    }
    train_idx.sort_unstable();
    for (i, m) in train_idx {
        train_x.extend_from_slice(&trx[i * px..(i + 1) * px]);
        train_y.push(m);
    }
    // verification: every test image of the held-out classes, split in halves once
    let mut vidx: Vec<usize> = (0..tey.len())
        .filter(|&i| d.heldout_classes.contains(&tey[i]))
        .collect();
    let mut fixed = ChaCha8Rng::seed_from_u64(0x5645_5249);
    vidx.shuffle(&mut fixed);
    let (mut verify_x, mut verify_y) = (Vec::new(), Vec::new());
    for &i in &vidx {
        verify_x.extend_from_slice(&tex[i * px..(i + 1) * px]);
        verify_y.push(tey[i]);
    }
    let half = vidx.len() / 2;
    let all: Vec<usize> = (0..vidx.len()).collect();
    let val_pairs = draw_pairs(&all[..half], &verify_y, d.verify_pairs, &mut fixed)
        .map_err(|e| anyhow!("data.heldout_classes (validation half): {e}"))?;
    let test_pairs = draw_pairs(&all[half..], &verify_y, d.verify_pairs, &mut fixed)
        .map_err(|e| anyhow!("data.heldout_classes (test half): {e}"))?;
    ensure!(!train_y.is_empty(), "no training images");
    ensure!(!test_y.is_empty(), "no identification test images");
    Ok(FaceData {
        hw,
        seen,
        train_x,
        train_y,
        test_x,
        test_y,
        verify_x,
        verify_y,
        val_pairs,
        test_pairs,
    })
}

/// ROC-AUC of `scores` for `positive` (Mann-Whitney, ties counted half); `None` without both
/// classes or when the lengths differ.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    if scores.len() != positive.len() {
        return None;
    }
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0; // ranks i+1..=j
        rank_sum += order[i..j].iter().filter(|&&k| positive[k]).count() as f64 * avg;
        i = j;
    }
    Some((rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos * n_neg) as f64)
}

/// The threshold (predict "same" when `score >= t`) that maximizes accuracy on the given
/// scores, and that accuracy. Candidates are midpoints between consecutive distinct scores
/// (and below the lowest); ties go to the lowest threshold. `None` without scores or when the
/// lengths differ.
pub fn best_threshold(scores: &[f64], positive: &[bool]) -> Option<(f64, f64)> {
    if scores.is_empty() || scores.len() != positive.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let n = scores.len() as f64;
    // threshold below everything: all predicted same
    let mut correct = positive.iter().filter(|&&p| p).count() as f64;
    let mut best = (scores[order[0]] - 1.0, correct / n);
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            // this sample moves to "different"
            correct += if positive[order[i]] { -1.0 } else { 1.0 };
            i += 1;
        }
        let t = if i < order.len() {
            0.5 * (s + scores[order[i]])
        } else {
            s + 1.0
        };
        if correct / n > best.1 {
            best = (t, correct / n);
        }
    }
    Some(best)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// The task for one seed.
#[derive(Debug)]
pub struct FaceIdTask {
    cfg: FaceIdConfig,
    data: FaceData,
    dev: Cpu,
}

const EVAL_CHUNK: usize = 256;

impl FaceIdTask {
    /// The task with its data for `seed`.
    pub fn new(cfg: &FaceIdConfig, seed: u64, dev: &Cpu) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            data: build_data(cfg, seed)?,
            dev: dev.clone(),
        })
    }

    /// The data.
    pub fn data(&self) -> &FaceData {
        &self.data
    }

    /// Eval-mode pass over `x` in chunks: logits `[n, K]` and embeddings `[n, E]`, both
    /// batch-major; taps of the first chunk when `tap` is set.
    fn infer(
        &self,
        m: &ResNet,
        st: &ParamStore,
        x: &[f32],
        tap: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<Tap>)> {
        let px = self.data.pixels();
        let n = x.len() / px;
        let e = m.embedding_dim();
        let (mut logits, mut emb) = (Vec::new(), vec![0f32; n * e]);
        let taps = Ctx::eval_in_chunks(n, EVAL_CHUNK, tap, |start, idx, ctx| {
            let (b, end) = (idx.len(), start + idx.len());
            let out = m.forward(st, input(&self.dev, &x[start * px..end * px], b, px)?, ctx)?;
            logits.extend(out.logits.as_vec());
            let ev = out.embedding.as_vec(); // (E, b)
            for j in 0..e {
                for i in 0..b {
                    emb[(start + i) * e + j] = ev[j * b + i];
                }
            }
            Ok(())
        })?;
        Ok((logits, emb, taps))
    }

    fn top1(&self, logits: &[f32]) -> f64 {
        let k = self.data.seen.len();
        let hit = logits
            .chunks_exact(k)
            .zip(&self.data.test_y)
            .filter(|(z, &y)| crate::stats::argmax(z) == y)
            .count();
        hit as f64 / self.data.test_y.len() as f64
    }
}

impl ConvTask for FaceIdTask {
    type Model = ResNet;

    fn n_train(&self) -> usize {
        self.data.train_y.len()
    }

    fn build(&self, store: &mut ParamStore, seed: u64) -> Result<ResNet> {
        ResNet::new(
            &self.cfg.model,
            store,
            1,
            self.data.hw,
            self.data.seen.len(),
            seed,
        )
    }

    fn topology(&self, m: &ResNet) -> Topology {
        m.topology()
    }

    fn layer_weights(&self, m: &ResNet) -> Vec<ParamId> {
        m.layer_weights()
    }

    fn train_batch(
        &self,
        m: &ResNet,
        st: &ParamStore,
        idx: &[usize],
        ctx: &mut Ctx,
    ) -> Result<(Gradients<f32, Cpu>, f64)> {
        let (px, k, b) = (self.data.pixels(), self.data.seen.len(), idx.len());
        let mut xb = Vec::with_capacity(b * px);
        let mut onehot = vec![0f32; b * k];
        for (r, &i) in idx.iter().enumerate() {
            xb.extend_from_slice(&self.data.train_x[i * px..(i + 1) * px]);
            onehot[r * k + self.data.train_y[i]] = 1.0;
        }
        let x = input(&self.dev, &xb, b, px)?.leaky_traced();
        let out = m.forward(st, x, ctx)?;
        let loss = contiguous_cross_entropy(out.logits, self.dev.tensor_from_vec(onehot, (b, k)));
        let v = loss.array() as f64;
        Ok((loss.backward(), v))
    }

    fn epoch_metrics(&self, m: &ResNet, st: &ParamStore) -> Result<BTreeMap<String, f64>> {
        let (logits, _, _) = self.infer(m, st, &self.data.test_x, None)?;
        Ok(BTreeMap::from([("top1".to_string(), self.top1(&logits))]))
    }

    fn finish(
        &self,
        m: &ResNet,
        st: &ParamStore,
        _dir: &Path,
    ) -> Result<(BTreeMap<String, f64>, Vec<Tap>)> {
        let sub = self.cfg.data.eval_subset.min(self.data.test_y.len());
        let (logits, _, taps) = self.infer(m, st, &self.data.test_x, Some(sub))?;
        let top1 = self.top1(&logits);
        let (_, emb, _) = self.infer(m, st, &self.data.verify_x, None)?;
        let e = m.embedding_dim();
        let score = |pairs: &[(usize, usize, bool)]| -> (Vec<f64>, Vec<bool>) {
            pairs
                .iter()
                .map(|&(a, b, s)| {
                    (
                        cosine(&emb[a * e..(a + 1) * e], &emb[b * e..(b + 1) * e]),
                        s,
                    )
                })
                .unzip()
        };
        let (vs, vl) = score(&self.data.val_pairs);
        let (ts, tl) = score(&self.data.test_pairs);
        let (thr, val_acc) =
            best_threshold(&vs, &vl).ok_or_else(|| anyhow!("no validation pairs"))?;
        let test_acc = ts
            .iter()
            .zip(&tl)
            .filter(|(&s, &l)| (s >= thr) == l)
            .count() as f64
            / ts.len() as f64;
        let mut metrics = BTreeMap::from([
            ("top1".to_string(), top1),
            ("verify_acc".to_string(), test_acc),
            ("verify_val_acc".to_string(), val_acc),
            ("verify_threshold".to_string(), thr),
        ]);
        if let Some(a) = roc_auc(&ts, &tl) {
            metrics.insert("verify_auc".to_string(), a);
        }
        let pops = m.block_populations();
        Ok((
            metrics,
            taps.into_iter()
                .filter(|t| pops.contains(&t.population))
                .collect(),
        ))
    }
}

/// Validates the config and resolves its runs (building a model to learn its layers).
pub fn plan(cfg: &FaceIdConfig, dev: &Cpu) -> Result<(Vec<ConvRunSpec>, FaceIdTask)> {
    cfg.validate()?;
    let seed = cfg.seeds[0];
    let task = FaceIdTask::new(cfg, seed, dev)?;
    let runs = convrun::plan_runs(
        &task,
        dev,
        seed,
        &cfg.pruning,
        &cfg.arms,
        &cfg.seeds,
        &cfg.train,
        "images",
        |m| m.prunable(),
    )?;
    Ok((runs, task))
}

const METRICS: [(&str, &str, f64); 3] = [
    ("top1", "identification top-1 (%)", 100.0),
    ("verify_auc", "verification ROC-AUC (%)", 100.0),
    ("verify_acc", "verification accuracy (%)", 100.0),
];

/// The report of a finished face-identification experiment.
pub fn report(cfg: &FaceIdConfig, data: &FaceData, runs: &[ConvRunResult]) -> Result<String> {
    let arms = convrun::summarise(runs);
    let mut w = String::new();
    let src = match cfg.data.source {
        FaceSource::FashionMnist => "Fashion-MNIST",
        FaceSource::Mnist => "MNIST",
        FaceSource::Synthetic => "synthetic class prototypes",
    };
    writeln!(
        w,
        "# {}: face identification and verification (stand-in)\n",
        cfg.name
    )?;
    writeln!(
        w,
        "**This is a stand-in.** No identity-labelled face data set can be obtained offline, so \
         the paper's face-identification experiment is replaced by the same protocol on \
         {src}: classes play identities, and the held-out classes {:?} play identities never \
         seen in training. Numbers here say nothing about faces.\n",
        cfg.data.heldout_classes
    )?;
    if !cfg.description.is_empty() {
        writeln!(w, "{}\n", cfg.description)?;
    }
    writeln!(
        w,
        "Setup: a bottleneck ResNet (stem {} channels, blocks {}) trained with softmax \
         cross-entropy on {} images of the {} seen classes ({} epochs, batch {}, lr {}); \
         identification top-1 on {} test images of those classes; verification by cosine \
         similarity of the global-average-pooled embedding ({} dims) on {} test pairs of \
         held-out-class images (half same-class), at the threshold that maximizes accuracy on \
         {} validation pairs drawn from the other half of those images. Seeds: {:?}. BB's \
         SP-in acts on the first 1x1 conv of every block; the baselines prune the same layers \
         to the same density.\n",
        cfg.model.stem,
        cfg.model
            .blocks
            .iter()
            .map(|b| format!("{}->{}/s{}", b.mid, b.out, b.stride))
            .collect::<Vec<_>>()
            .join(", "),
        data.train_y.len(),
        data.seen.len(),
        cfg.train.epochs,
        cfg.train.batch_size,
        cfg.train.lr,
        data.test_y.len(),
        cfg.model.blocks.last().map_or(0, |b| b.out),
        data.test_pairs.len(),
        data.val_pairs.len(),
        cfg.seeds
    )?;
    writeln!(w, "## Results (mean ± 95 % t-interval over seeds)\n")?;
    convrun::write_common_tables(&mut w, &arms, &METRICS)?;
    convrun::write_paired_section(&mut w, &arms, &METRICS, None)?;
    writeln!(
        w,
        "## Sparsity: target vs achieved density per pruned layer (first seed)\n"
    )?;
    convrun::write_layer_table(&mut w, runs)?;
    convrun::write_time(&mut w, runs)?;
    Ok(w)
}
