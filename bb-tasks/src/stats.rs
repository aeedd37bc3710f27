//! Statistics for comparing methods over seeds: means with Student-t intervals, paired
//! differences, confusion matrices and macro-F1, precision-recall AUC, and head / mid / tail
//! class buckets for long-tailed data.
//!
//! Every interval here is two-sided with the t quantile computed exactly (regularized
//! incomplete beta function), so small seed counts get the wide intervals they deserve.

use serde::{Deserialize, Serialize};

/// Natural log of the gamma function (Lanczos approximation, g = 7, 9 terms; relative error
/// below 1e-14 for positive arguments).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // reflection
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// Regularized incomplete beta function `I_x(a, b)`.
pub fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// Cumulative distribution function of Student's t with `df` degrees of freedom.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(0.5 * df, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df > 0` degrees of freedom (`0 < p < 1`), by
/// bisection on the CDF (accurate to about 1e-12).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0 && df > 0.0, "t quantile: p={p}, df={df}");
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    let mut hi = 1.0;
    while student_t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-13 * hi.max(1.0) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// A mean with its two-sided t-interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Number of values.
    pub n: usize,
    /// Sample mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); `None` for one value.
    pub sd: Option<f64>,
    /// Half-width of the interval; `None` for one value (no interval exists).
    pub half_width: Option<f64>,
    /// Confidence level, e.g. 0.95.
    pub level: f64,
}

impl Interval {
    /// Lower end (the mean when there is no interval).
    pub fn lo(&self) -> f64 {
        self.mean - self.half_width.unwrap_or(0.0)
    }

    /// Upper end (the mean when there is no interval).
    pub fn hi(&self) -> f64 {
        self.mean + self.half_width.unwrap_or(0.0)
    }

    /// `mean ± half` scaled by `scale` (100 for percentages), with `digits` decimals.
    pub fn fmt(&self, scale: f64, digits: usize) -> String {
        match self.half_width {
            Some(h) => format!(
                "{:.*} ± {:.*}",
                digits,
                self.mean * scale,
                digits,
                h * scale
            ),
            None => format!("{:.*} (n=1)", digits, self.mean * scale),
        }
    }
}

/// Mean and two-sided t-interval at `level` (e.g. 0.95) of `xs`; `None` for no values or a
/// non-finite value.
pub fn mean_ci(xs: &[f64], level: f64) -> Option<Interval> {
    assert!(level > 0.0 && level < 1.0, "confidence level {level}");
    let n = xs.len();
    if n == 0 || xs.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some(Interval {
            n,
            mean,
            sd: None,
            half_width: None,
            level,
        });
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let sd = var.sqrt();
    let t = student_t_quantile(0.5 + level / 2.0, (n - 1) as f64);
    Some(Interval {
        n,
        mean,
        sd: Some(sd),
        half_width: Some(t * sd / (n as f64).sqrt()),
        level,
    })
}

/// [`mean_ci`] at 95 %.
pub fn mean_ci95(xs: &[f64]) -> Option<Interval> {
    mean_ci(xs, 0.95)
}

/// Paired differences `a - b` over the keys (seeds) both sides have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// The keys present on both sides, ascending.
    pub keys: Vec<u64>,
    /// `a[key] - b[key]`, in the order of `keys`.
    pub diffs: Vec<f64>,
    /// Mean difference with its 95 % interval; `None` without common keys.
    pub interval: Option<Interval>,
}

/// Pairs `a` and `b` by key (e.g. seed) and takes the interval of the differences `a - b`.
/// Keys present on one side only are left out; a key given twice on one side is an error.
pub fn paired_differences(a: &[(u64, f64)], b: &[(u64, f64)]) -> Result<Paired, String> {
    let to_map = |side: &str, xs: &[(u64, f64)]| {
        let mut m = std::collections::BTreeMap::new();
        for &(k, v) in xs {
            if m.insert(k, v).is_some() {
                return Err(format!(
                    "paired comparison: key {k} appears twice on side {side}"
                ));
            }
        }
        Ok(m)
    };
    let (ma, mb) = (to_map("a", a)?, to_map("b", b)?);
    let mut keys = Vec::new();
    let mut diffs = Vec::new();
    for (k, va) in &ma {
        if let Some(vb) = mb.get(k) {
            keys.push(*k);
            diffs.push(va - vb);
        }
    }
    let interval = mean_ci95(&diffs);
    Ok(Paired {
        keys,
        diffs,
        interval,
    })
}

/// The outcome of a comparison where higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The interval of the difference lies above zero.
    Win,
    /// The interval contains zero (or there is no interval).
    Tie,
    /// The interval lies below zero.
    Loss,
}

impl Verdict {
    /// Reads an interval of `ours - theirs` (higher is better).
    pub fn of(iv: Option<&Interval>) -> Self {
        match iv {
            Some(iv) if iv.half_width.is_some() && iv.lo() > 0.0 => Self::Win,
            Some(iv) if iv.half_width.is_some() && iv.hi() < 0.0 => Self::Loss,
            _ => Self::Tie,
        }
    }

    /// Lower-case word.
    pub fn word(self) -> &'static str {
        match self {
            Self::Win => "win",
            Self::Tie => "tie",
            Self::Loss => "loss",
        }
    }
}

/// A confusion matrix, `counts[truth * classes + predicted]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    /// Number of classes.
    pub classes: usize,
    /// Row-major counts, rows = true class.
    pub counts: Vec<u64>,
}

impl Confusion {
    /// An empty matrix.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// From parallel label lists (labels must be `< classes`).
    pub fn from_labels(classes: usize, truth: &[usize], predicted: &[usize]) -> Self {
        assert_eq!(
            truth.len(),
            predicted.len(),
            "confusion: label lists differ in length"
        );
        let mut c = Self::new(classes);
        for (&t, &p) in truth.iter().zip(predicted) {
            c.add(t, p);
        }
        c
    }

    /// Counts one prediction.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        assert!(
            truth < self.classes && predicted < self.classes,
            "label out of range"
        );
        self.counts[truth * self.classes + predicted] += 1;
    }

    fn at(&self, t: usize, p: usize) -> u64 {
        self.counts[t * self.classes + p]
    }

    /// Samples counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Fraction on the diagonal.
    pub fn accuracy(&self) -> f64 {
        let hit: u64 = (0..self.classes).map(|c| self.at(c, c)).sum();
        hit as f64 / self.total().max(1) as f64
    }

    /// True samples of class `c`.
    pub fn support(&self, c: usize) -> u64 {
        (0..self.classes).map(|p| self.at(c, p)).sum()
    }

    /// Recall (per-class accuracy) of class `c`; `None` without support.
    pub fn recall(&self, c: usize) -> Option<f64> {
        let s = self.support(c);
        (s > 0).then(|| self.at(c, c) as f64 / s as f64)
    }

    /// Precision of class `c`; `None` when nothing was predicted as `c`.
    pub fn precision(&self, c: usize) -> Option<f64> {
        let p: u64 = (0..self.classes).map(|t| self.at(t, c)).sum();
        (p > 0).then(|| self.at(c, c) as f64 / p as f64)
    }

    /// F1 of class `c` (0 when the class has support but is never predicted correctly);
    /// `None` without support.
    pub fn f1(&self, c: usize) -> Option<f64> {
        let r = self.recall(c)?;
        let p = self.precision(c).unwrap_or(0.0);
        Some(if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        })
    }

    /// Unweighted mean of the F1 of the classes that have support.
    pub fn macro_f1(&self) -> f64 {
        let f: Vec<f64> = (0..self.classes).filter_map(|c| self.f1(c)).collect();
        f.iter().sum::<f64>() / f.len().max(1) as f64
    }
}

/// The index of the first largest value of `z` (0 when `z` is empty; a NaN never wins
/// unless it comes first).
pub fn argmax(z: &[f32]) -> usize {
    (0..z.len()).fold(0, |b, c| if z[c] > z[b] { c } else { b })
}

/// Area under the precision-recall curve as average precision:
/// `AP = sum_n (R_n - R_{n-1}) P_n` over the distinct score thresholds, highest first
/// (samples with equal scores enter together). `None` when there is no positive.
pub fn average_precision(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(
        scores.len(),
        positive.len(),
        "average precision: lengths differ"
    );
    let n_pos = positive.iter().filter(|&&p| p).count();
    if n_pos == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
    let (mut tp, mut seen) = (0usize, 0usize);
    let mut ap = 0.0;
    let mut prev_recall = 0.0;
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            tp += positive[order[i]] as usize;
            seen += 1;
            i += 1;
        }
        let recall = tp as f64 / n_pos as f64;
        let precision = tp as f64 / seen as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    Some(ap)
}

/// Classes grouped by training frequency: the third with the most training samples (head),
/// the third with the fewest (tail) and the rest (mid). With `C` classes the tail and head
/// hold `floor(C / 3)` classes each; ties in count go to the lower class index first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    /// Most frequent classes.
    pub head: Vec<usize>,
    /// The others.
    pub mid: Vec<usize>,
    /// Least frequent classes.
    pub tail: Vec<usize>,
}

impl Buckets {
    /// Buckets from per-class training counts.
    pub fn from_counts(counts: &[usize]) -> Self {
        let mut order: Vec<usize> = (0..counts.len()).collect();
        // most frequent first; equal counts: lower class first
        order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
        let k = counts.len() / 3;
        let mut head = order[..k].to_vec();
        let mut mid = order[k..counts.len() - k].to_vec();
        let mut tail = order[counts.len() - k..].to_vec();
        head.sort_unstable();
        mid.sort_unstable();
        tail.sort_unstable();
        Self { head, mid, tail }
    }

    /// Whether the counts actually differ between head and tail (on balanced data the
    /// buckets carry no meaning).
    pub fn is_imbalanced(counts: &[usize]) -> bool {
        counts.iter().max() != counts.iter().min()
    }

    /// Mean per-class accuracy over each bucket: `(head, mid, tail)`. A bucket without
    /// classes (fewer than three classes) gives `None`.
    pub fn accuracy(&self, per_class: &[f64]) -> (Option<f64>, Option<f64>, Option<f64>) {
        let mean = |cs: &[usize]| {
            (!cs.is_empty())
                .then(|| cs.iter().map(|&c| per_class[c]).sum::<f64>() / cs.len() as f64)
        };
        (mean(&self.head), mean(&self.mid), mean(&self.tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest() {
        assert_eq!(argmax(&[0.1, 0.7, -2.0, 0.7]), 1);
        assert_eq!(argmax(&[3.0]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 2.0]), 2);
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        for (n, f) in [(1.0, 1.0f64), (2.0, 1.0), (5.0, 24.0), (11.0, 3_628_800.0)] {
            assert!((ln_gamma(n) - f.ln()).abs() < 1e-12, "n={n}");
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn t_cdf_is_symmetric_and_matches_the_cauchy_case() {
        // df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
        for t in [-3.0, -0.5, 0.0, 0.7, 10.0] {
            let want = 0.5 + f64::atan(t) / std::f64::consts::PI;
            assert!((student_t_cdf(t, 1.0) - want).abs() < 1e-12, "t={t}");
        }
        assert!((student_t_cdf(1.3, 7.0) + student_t_cdf(-1.3, 7.0) - 1.0).abs() < 1e-14);
    }
}
