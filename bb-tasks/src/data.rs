//! Data sets: XOR with distractor inputs, DNF formulas over rare and common features, and the
//! UCI 8x8 handwritten digits shipped with the crate.
//!
//! Every data set is a pair of [`Dataset`]s (train, test) made deterministically from a seed.

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::Read;

/// Labelled samples, features batch-major `[n, features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Number of input features.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
    /// Inputs, `[n, features]` row-major.
    pub x: Vec<f32>,
    /// Class labels.
    pub y: Vec<usize>,
    /// Per-sample flag for a subgroup of interest (DNF: positives decided only by rare-feature
    /// terms); empty when the data set defines none.
    pub flagged: Vec<bool>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Copies the samples at `idx` into `x` and `y` (cleared first).
    pub fn gather(&self, idx: &[usize], x: &mut Vec<f32>, y: &mut Vec<usize>) {
        x.clear();
        y.clear();
        for &i in idx {
            x.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
            y.push(self.y[i]);
        }
    }

    /// Samples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes];
        for &y in &self.y {
            c[y] += 1;
        }
        c
    }
}

/// Per-feature description of the inputs, for reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureInfo {
    /// A group name per input feature (e.g. `signal`, `distractor`, `rare`, `common`).
    pub group: Vec<String>,
    /// The on-probability each feature was drawn with (binary features only).
    pub p_on: Vec<Option<f64>>,
}

/// A train/test pair with its description.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training samples.
    pub train: Dataset,
    /// Evaluation samples.
    pub test: Dataset,
    /// What the input features are.
    pub features: FeatureInfo,
    /// Name of the flagged subgroup, if the data set has one.
    pub flag_name: Option<String>,
}

/// Which data set, with its parameters (`[data]` table of an experiment config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// Label = XOR of two fair binary inputs; `distractors` more binary inputs carry no
    /// information, with on-probabilities spread evenly over `[p_min, p_max]`.
    Xor {
        /// Training samples.
        n_train: usize,
        /// Evaluation samples.
        n_test: usize,
        /// Number of distractor inputs.
        distractors: usize,
        /// Lowest distractor on-probability.
        #[serde(default = "default_p_min")]
        p_min: f64,
        /// Highest distractor on-probability.
        #[serde(default = "default_p_max")]
        p_max: f64,
    },
    /// Label = OR of AND-terms over binary features. Rare features are on with probability
    /// `p_rare`, common ones with `p_common`; the first `rare_terms` terms use only rare
    /// features (`rare_term_len` each), the next `common_terms` only common ones. Features not
    /// used by any term are distractors. Positives that no common term explains are flagged
    /// ("rare-decided").
    Dnf {
        /// Training samples.
        n_train: usize,
        /// Evaluation samples.
        n_test: usize,
        /// Number of rare features.
        rare_features: usize,
        /// Number of common features.
        common_features: usize,
        /// On-probability of a rare feature.
        #[serde(default = "default_p_rare")]
        p_rare: f64,
        /// On-probability of a common feature.
        #[serde(default = "default_p_common")]
        p_common: f64,
        /// Terms made only of rare features.
        rare_terms: usize,
        /// Literals per rare term.
        rare_term_len: usize,
        /// Terms made only of common features.
        common_terms: usize,
        /// Literals per common term.
        common_term_len: usize,
    },
    /// UCI 8x8 handwritten digits (1797 samples, shipped with the crate), pixels scaled to
    /// `[0, 1]`, split per class at random into train and test.
    Digits {
        /// Fraction of each class held out for evaluation.
        #[serde(default = "default_test_fraction")]
        test_fraction: f64,
    },
    /// MNIST from IDX files fetched by `scripts/fetch-data.sh`, optionally long-tailed
    /// (see [`crate::realdata`]).
    Mnist(crate::realdata::ImageDataConfig),
    /// Fashion-MNIST, as `mnist`.
    FashionMnist(crate::realdata::ImageDataConfig),
    /// The Statlog Shuttle rare-event table (see [`crate::realdata`]).
    Shuttle(crate::realdata::ShuttleConfig),
}

fn default_p_min() -> f64 {
    0.05
}
fn default_p_max() -> f64 {
    0.95
}
fn default_p_rare() -> f64 {
    0.11
}
fn default_p_common() -> f64 {
    0.72
}
fn default_test_fraction() -> f64 {
    0.3
}

impl DataConfig {
    /// Short name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Xor { .. } => "xor",
            Self::Dnf { .. } => "dnf",
            Self::Digits { .. } => "digits",
            Self::Mnist(_) => "mnist",
            Self::FashionMnist(_) => "fashion_mnist",
            Self::Shuttle(_) => "shuttle",
        }
    }

    /// Checks the parameters; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let prob = |name: &str, p: f64| -> Result<()> {
            ensure!(
                p > 0.0 && p < 1.0,
                "data.{name} must be a probability in (0, 1), got {p}"
            );
            Ok(())
        };
        match *self {
            Self::Xor {
                n_train,
                n_test,
                p_min,
                p_max,
                ..
            } => {
                ensure!(n_train > 0, "data.n_train must be > 0");
                ensure!(n_test > 0, "data.n_test must be > 0");
                prob("p_min", p_min)?;
                prob("p_max", p_max)?;
                ensure!(
                    p_min <= p_max,
                    "data.p_min ({p_min}) must be <= data.p_max ({p_max})"
                );
            }
            Self::Dnf {
                n_train,
                n_test,
                rare_features,
                common_features,
                p_rare,
                p_common,
                rare_terms,
                rare_term_len,
                common_terms,
                common_term_len,
            } => {
                ensure!(n_train > 0, "data.n_train must be > 0");
                ensure!(n_test > 0, "data.n_test must be > 0");
                prob("p_rare", p_rare)?;
                prob("p_common", p_common)?;
                ensure!(
                    rare_terms + common_terms > 0,
                    "data.rare_terms + data.common_terms must be > 0"
                );
                ensure!(
                    rare_terms == 0 || rare_term_len > 0,
                    "data.rare_term_len must be > 0"
                );
                ensure!(
                    common_terms == 0 || common_term_len > 0,
                    "data.common_term_len must be > 0"
                );
                ensure!(
                    rare_terms * rare_term_len <= rare_features,
                    "data.rare_features ({rare_features}) must be at least rare_terms x rare_term_len ({})",
                    rare_terms * rare_term_len
                );
                ensure!(
                    common_terms * common_term_len <= common_features,
                    "data.common_features ({common_features}) must be at least common_terms x common_term_len ({})",
                    common_terms * common_term_len
                );
            }
            Self::Digits { test_fraction } => {
                ensure!(
                    test_fraction > 0.0 && test_fraction < 1.0,
                    "data.test_fraction must be in (0, 1), got {test_fraction}"
                );
            }
            Self::Mnist(ref c) | Self::FashionMnist(ref c) => c.validate()?,
            Self::Shuttle(ref c) => c.validate()?,
        }
        Ok(())
    }

    /// Makes the train/test split for `seed`.
    pub fn build(&self, seed: u64) -> Result<Split> {
        self.validate()?;
        match *self {
            Self::Xor {
                n_train,
                n_test,
                distractors,
                p_min,
                p_max,
            } => Ok(xor(n_train, n_test, distractors, p_min, p_max, seed)),
            Self::Dnf {
                n_train,
                n_test,
                rare_features,
                common_features,
                p_rare,
                p_common,
                rare_terms,
                rare_term_len,
                common_terms,
                common_term_len,
            } => {
                let spec = DnfSpec {
                    rare_features,
                    common_features,
                    p_rare,
                    p_common,
                    rare_terms,
                    rare_term_len,
                    common_terms,
                    common_term_len,
                };
                Ok(dnf(&spec, n_train, n_test, seed))
            }
            Self::Digits { test_fraction } => digits(test_fraction, seed),
            Self::Mnist(ref c) => {
                crate::realdata::image_split(crate::realdata::ImageSet::Mnist, c, seed)
            }
            Self::FashionMnist(ref c) => {
                crate::realdata::image_split(crate::realdata::ImageSet::FashionMnist, c, seed)
            }
            Self::Shuttle(ref c) => crate::realdata::shuttle_split(c, seed),
        }
    }
}

fn bernoulli_rows(
    rng: &mut ChaCha8Rng,
    n: usize,
    p: &[f64],
    label: impl Fn(&[f32]) -> (usize, bool),
) -> Dataset {
    let f = p.len();
    let mut x = Vec::with_capacity(n * f);
    let mut y = Vec::with_capacity(n);
    let mut flagged = Vec::with_capacity(n);
    let mut row = vec![0f32; f];
    for _ in 0..n {
        for (v, &pi) in row.iter_mut().zip(p) {
            *v = if rng.gen_bool(pi) { 1.0 } else { 0.0 };
        }
        let (l, fl) = label(&row);
        x.extend_from_slice(&row);
        y.push(l);
        flagged.push(fl);
    }
    Dataset {
        features: f,
        classes: 2,
        x,
        y,
        flagged,
    }
}

/// XOR of inputs 0 and 1 (each on with probability 1/2) plus `distractors` independent inputs
/// with on-probabilities evenly spaced over `[p_min, p_max]`.
pub fn xor(
    n_train: usize,
    n_test: usize,
    distractors: usize,
    p_min: f64,
    p_max: f64,
    seed: u64,
) -> Split {
    let mut p = vec![0.5, 0.5];
    for i in 0..distractors {
        let t = if distractors > 1 {
            i as f64 / (distractors - 1) as f64
        } else {
            0.5
        };
        p.push(p_min + t * (p_max - p_min));
    }
    let label = |r: &[f32]| (((r[0] > 0.5) != (r[1] > 0.5)) as usize, false);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0078_6f72);
    let mut train = bernoulli_rows(&mut rng, n_train, &p, label);
    let mut test = bernoulli_rows(&mut rng, n_test, &p, label);
    train.flagged.clear();
    test.flagged.clear();
    let mut group = vec!["signal".to_string(); 2];
    group.extend(std::iter::repeat_n("distractor".to_string(), distractors));
    Split {
        train,
        test,
        features: FeatureInfo {
            group,
            p_on: p.into_iter().map(Some).collect(),
        },
        flag_name: None,
    }
}

/// Parameters of a DNF task (see [`DataConfig::Dnf`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DnfSpec {
    /// Number of rare features (inputs `0..rare_features`).
    pub rare_features: usize,
    /// Number of common features (the inputs after the rare ones).
    pub common_features: usize,
    /// On-probability of a rare feature.
    pub p_rare: f64,
    /// On-probability of a common feature.
    pub p_common: f64,
    /// Terms over rare features only.
    pub rare_terms: usize,
    /// Literals per rare term.
    pub rare_term_len: usize,
    /// Terms over common features only.
    pub common_terms: usize,
    /// Literals per common term.
    pub common_term_len: usize,
}

impl DnfSpec {
    /// The terms as lists of input indices: rare terms first, then common terms. Term `t` of a
    /// kind uses the next `len` features of that kind, so the terms are disjoint.
    pub fn terms(&self) -> Vec<Vec<usize>> {
        let mut terms = Vec::new();
        for t in 0..self.rare_terms {
            terms.push((t * self.rare_term_len..(t + 1) * self.rare_term_len).collect());
        }
        let c0 = self.rare_features;
        for t in 0..self.common_terms {
            terms.push(
                (c0 + t * self.common_term_len..c0 + (t + 1) * self.common_term_len).collect(),
            );
        }
        terms
    }

    /// Label of a row and whether it is a positive that only rare terms decide.
    pub fn label(&self, row: &[f32]) -> (usize, bool) {
        let terms = self.terms();
        let on = |t: &Vec<usize>| t.iter().all(|&i| row[i] > 0.5);
        let rare_hit = terms[..self.rare_terms].iter().any(on);
        let common_hit = terms[self.rare_terms..].iter().any(on);
        ((rare_hit || common_hit) as usize, rare_hit && !common_hit)
    }
}

/// The DNF task of [`DataConfig::Dnf`].
pub fn dnf(spec: &DnfSpec, n_train: usize, n_test: usize, seed: u64) -> Split {
    let mut p = vec![spec.p_rare; spec.rare_features];
    p.extend(std::iter::repeat_n(spec.p_common, spec.common_features));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0064_6e66);
    let label = |r: &[f32]| spec.label(r);
    let train = bernoulli_rows(&mut rng, n_train, &p, label);
    let test = bernoulli_rows(&mut rng, n_test, &p, label);
    let mut group = vec!["rare".to_string(); spec.rare_features];
    group.extend(std::iter::repeat_n(
        "common".to_string(),
        spec.common_features,
    ));
    Split {
        train,
        test,
        features: FeatureInfo {
            group,
            p_on: p.into_iter().map(Some).collect(),
        },
        flag_name: Some("rare-decided positives".to_string()),
    }
}

/// The UCI 8x8 digits file, shipped with the crate (see `data/README.md`).
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Samples per class in the UCI 8x8 digits file, as documented by its source.
pub const DIGITS_CLASS_COUNTS: [usize; 10] = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180];

/// All 1797 digits: pixels scaled to `[0, 1]` (64 features), labels 0..=9.
pub fn digits_all() -> Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .context("digits: cannot decompress data/digits.csv.gz")?;
    let mut x = Vec::with_capacity(1797 * 64);
    let mut y = Vec::with_capacity(1797);
    for (ln, line) in text.lines().enumerate() {
        let vals: Vec<&str> = line.trim().split(',').collect();
        if vals.len() != 65 {
            bail!(
                "digits: line {} has {} values, expected 65",
                ln + 1,
                vals.len()
            );
        }
        for v in &vals[..64] {
            let p: u8 = v
                .parse()
                .with_context(|| format!("digits: line {}: bad pixel {v:?}", ln + 1))?;
            ensure!(p <= 16, "digits: line {}: pixel {p} out of 0..=16", ln + 1);
            x.push(p as f32 / 16.0);
        }
        let l: usize = vals[64]
            .parse()
            .with_context(|| format!("digits: line {}: bad label", ln + 1))?;
        ensure!(l < 10, "digits: line {}: label {l} out of 0..=9", ln + 1);
        y.push(l);
    }
    let ds = Dataset {
        features: 64,
        classes: 10,
        x,
        y,
        flagged: Vec::new(),
    };
    ensure!(
        ds.class_counts() == DIGITS_CLASS_COUNTS,
        "digits: class counts {:?} differ from the documented {:?}",
        ds.class_counts(),
        DIGITS_CLASS_COUNTS
    );
    Ok(ds)
}

/// Digits split per class: `round(test_fraction * class size)` of each class for evaluation.
pub fn digits(test_fraction: f64, seed: u64) -> Result<Split> {
    let all = digits_all()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6469_6769);
    let (mut tr, mut te) = (Vec::new(), Vec::new());
    for c in 0..all.classes {
        let mut idx: Vec<usize> = (0..all.len()).filter(|&i| all.y[i] == c).collect();
        idx.shuffle(&mut rng);
        let n_test = (test_fraction * idx.len() as f64).round() as usize;
        te.extend_from_slice(&idx[..n_test]);
        tr.extend_from_slice(&idx[n_test..]);
    }
    tr.sort_unstable();
    te.sort_unstable();
    let pick = |idx: &[usize]| {
        let mut d = Dataset {
            features: all.features,
            classes: all.classes,
            x: Vec::new(),
            y: Vec::new(),
            flagged: Vec::new(),
        };
        all.gather(idx, &mut d.x, &mut d.y);
        d
    };
    Ok(Split {
        train: pick(&tr),
        test: pick(&te),
        features: FeatureInfo {
            group: vec!["pixel".to_string(); 64],
            p_on: vec![None; 64],
        },
        flag_name: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_labels_are_the_xor_of_the_two_signal_inputs() {
        let s = xor(500, 100, 6, 0.1, 0.9, 3);
        assert_eq!(s.train.features, 8);
        for (row, &y) in s.train.x.chunks(8).zip(&s.train.y) {
            assert_eq!(y, ((row[0] == 1.0) ^ (row[1] == 1.0)) as usize);
        }
        // distractor on-rates follow their configured probabilities
        let n = 20000;
        let big = xor(n, 1, 3, 0.1, 0.9, 1);
        for (j, p) in [(2usize, 0.1), (3, 0.5), (4, 0.9)] {
            let rate = big.train.x.iter().skip(j).step_by(5).sum::<f32>() as f64 / n as f64;
            assert!((rate - p).abs() < 0.02, "feature {j}: {rate} vs {p}");
        }
    }

    #[test]
    fn dnf_rare_terms_decide_some_positives_and_features_have_their_rates() {
        let spec = DnfSpec {
            rare_features: 8,
            common_features: 8,
            p_rare: 0.11,
            p_common: 0.72,
            rare_terms: 3,
            rare_term_len: 2,
            common_terms: 2,
            common_term_len: 4,
        };
        let s = dnf(&spec, 40000, 10, 5);
        let n = s.train.len() as f64;
        let rate = |j: usize| s.train.x.iter().skip(j).step_by(16).sum::<f32>() as f64 / n;
        assert!((rate(0) - 0.11).abs() < 0.01);
        assert!((rate(12) - 0.72).abs() < 0.01);
        let flagged = s.train.flagged.iter().filter(|&&f| f).count();
        assert!(flagged > 0);
        // every flagged sample is a positive with all common terms false
        let terms = spec.terms();
        for (i, &f) in s.train.flagged.iter().enumerate() {
            let row = &s.train.x[i * 16..(i + 1) * 16];
            let any = |ts: &[Vec<usize>]| ts.iter().any(|t| t.iter().all(|&k| row[k] == 1.0));
            assert_eq!(f, any(&terms[..3]) && !any(&terms[3..]));
            assert_eq!(s.train.y[i] == 1, any(&terms));
        }
        // the positive rate matches the closed form 1 - prod(1 - p^len)
        let p_pos = 1.0 - (1.0 - 0.11f64.powi(2)).powi(3) * (1.0 - 0.72f64.powi(4)).powi(2);
        let got = s.train.y.iter().sum::<usize>() as f64 / n;
        assert!((got - p_pos).abs() < 0.01, "{got} vs {p_pos}");
    }

    #[test]
    fn digits_load_and_split_stratified() {
        let all = digits_all().unwrap();
        assert_eq!(all.len(), 1797);
        let s = digits(0.3, 0).unwrap();
        assert_eq!(s.train.len() + s.test.len(), 1797);
        for (c, &n) in DIGITS_CLASS_COUNTS.iter().enumerate() {
            assert_eq!(s.test.class_counts()[c], (0.3 * n as f64).round() as usize);
        }
        assert!(s.train.x.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // different seeds give different splits, the same seed the same one
        assert_ne!(digits(0.3, 1).unwrap().test.y, s.test.y);
        assert_eq!(digits(0.3, 0).unwrap().test.x, s.test.x);
    }

    #[test]
    fn bad_data_config_names_the_field() {
        let c = DataConfig::Xor {
            n_train: 10,
            n_test: 10,
            distractors: 2,
            p_min: 0.9,
            p_max: 0.1,
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("p_min"), "{e}");
    }
}
