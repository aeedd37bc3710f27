use crate::{ActuatorError, BitMask};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Shape of a masked layer: an `[out, in]` edge matrix, optionally with kernel dims.
///
/// Weights are stored row-major as `[out, in, kernel...]` (dfdx and PyTorch layout). One
/// edge is one `(out, in)` pair; its mask bit is broadcast over the `kernel_len()` weights
/// of its kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeShape {
    /// Output units (rows).
    pub out: usize,
    /// Input units (columns).
    pub inp: usize,
    /// Kernel dims (`[]` for a dense layer, `[kh, kw]` or `[kd, kh, kw]` for convolutions).
    #[serde(default)]
    pub kernel: Vec<usize>,
}

impl EdgeShape {
    /// A dense `[out, in]` layer.
    pub fn dense(out: usize, inp: usize) -> Self {
        Self {
            out,
            inp,
            kernel: Vec::new(),
        }
    }

    /// A convolution `[out, in, kernel...]`.
    pub fn conv(out: usize, inp: usize, kernel: &[usize]) -> Self {
        Self {
            out,
            inp,
            kernel: kernel.to_vec(),
        }
    }

    /// Builds the shape from the dims of a weight tensor `[out, in, kernel...]`.
    pub fn from_weight_dims(dims: &[usize]) -> Result<Self, ActuatorError> {
        if dims.len() < 2 {
            return Err(ActuatorError::Shape(format!(
                "a weight tensor needs at least 2 dims [out, in], got {dims:?}"
            )));
        }
        let s = Self::conv(dims[0], dims[1], &dims[2..]);
        s.validate()?;
        Ok(s)
    }

    /// Checks that no dim is zero.
    pub fn validate(&self) -> Result<(), ActuatorError> {
        if self.out == 0 || self.inp == 0 || self.kernel.contains(&0) {
            return Err(ActuatorError::Shape(format!(
                "dims must be positive, got out={} in={} kernel={:?}",
                self.out, self.inp, self.kernel
            )));
        }
        Ok(())
    }

    /// Number of edges, `out * in`.
    pub fn edges(&self) -> usize {
        self.out * self.inp
    }

    /// Weights per edge (the product of the kernel dims; 1 for a dense layer).
    pub fn kernel_len(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Number of weights, `out * in * kernel_len`.
    pub fn weight_len(&self) -> usize {
        self.edges() * self.kernel_len()
    }

    /// Number of slabs on `side` (rows for SP-in, columns for SP-out).
    pub fn slabs(&self, side: crate::Side) -> usize {
        match side {
            crate::Side::Rows => self.out,
            crate::Side::Columns => self.inp,
        }
    }

    /// Full (dense) degree `D` of a slab on `side`.
    pub fn slab_len(&self, side: crate::Side) -> usize {
        match side {
            crate::Side::Rows => self.inp,
            crate::Side::Columns => self.out,
        }
    }
}

/// Writes the edge scores of a layer into `scores` (`[out * in]`, row-major).
///
/// `S[o,i] = sum over the kernel of |W[o,i,..]|` for live edges and the same sum over the
/// shadow store for dead ones, so a dead edge competes with the value it had when it died.
/// Fails on a length mismatch or a non-finite weight (naming the buffer and index).
pub fn edge_scores(
    shape: &EdgeShape,
    weights: &[f32],
    shadow: &[f32],
    mask: &BitMask,
    scores: &mut [f32],
) -> Result<(), ActuatorError> {
    let kl = shape.kernel_len();
    check_len("weights", shape.weight_len(), weights.len())?;
    check_len("shadow", shape.weight_len(), shadow.len())?;
    check_len("scores", shape.edges(), scores.len())?;
    check_mask(shape, mask)?;
    let (cols, wpr) = (shape.inp, mask.words_per_row());
    let bad = scores
        .par_chunks_mut(cols)
        .zip(weights.par_chunks(cols * kl))
        .zip(shadow.par_chunks(cols * kl))
        .enumerate()
        .with_min_len(16)
        .filter_map(|(o, ((srow, wrow), hrow))| {
            let words = &mask.words()[o * wpr..(o + 1) * wpr];
            (!score_row(words, kl, wrow, hrow, srow)).then_some(o)
        })
        .min();
    match bad {
        Some(o) => Err(first_non_finite(shape, weights, shadow, mask, true, o)),
        None => Ok(()),
    }
}

/// The error naming the first non-finite value (or non-finite kernel sum) of row `o`, whose
/// scores are known to hold one: the weights of live edges, the shadow of dead ones (which
/// are scored only with `regrow`).
pub(crate) fn first_non_finite(
    shape: &EdgeShape,
    weights: &[f32],
    shadow: &[f32],
    mask: &BitMask,
    regrow: bool,
    o: usize,
) -> ActuatorError {
    let (cols, kl) = (shape.inp, shape.kernel_len());
    for c in 0..cols {
        let e = o * cols + c;
        let (what, src) = if mask.get(o, c) {
            ("weights", weights)
        } else if regrow {
            ("shadow", shadow)
        } else {
            continue;
        };
        let w = &src[e * kl..(e + 1) * kl];
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return ActuatorError::NonFinite {
                what: what.into(),
                index: e * kl + i,
            };
        }
        if !w.iter().map(|x| x.abs()).sum::<f32>().is_finite() {
            return ActuatorError::NonFinite {
                what: what.into(),
                index: e * kl,
            };
        }
    }
    ActuatorError::NonFinite {
        what: "weights".into(),
        index: o * cols * kl,
    }
}

crate::multiversion! {
    /// Scores one row; returns whether every score is finite.
    fn score_row(words: &[u64], kl: usize, wrow: &[f32], hrow: &[f32], srow: &mut [f32]) -> bool {
        let mut finite = true;
        if kl == 1 {
            for (wi, sc) in srow.chunks_mut(64).enumerate() {
                let (word, lo) = (words[wi], wi * 64);
                let (wc, hc) = (&wrow[lo..lo + sc.len()], &hrow[lo..lo + sc.len()]);
                for (b, s) in sc.iter_mut().enumerate() {
                    let v = if (word >> b) & 1 == 1 { wc[b] } else { hc[b] };
                    finite &= v.is_finite();
                    *s = v.abs();
                }
            }
        } else {
            for (c, s) in srow.iter_mut().enumerate() {
                let src = if (words[c / 64] >> (c % 64)) & 1 == 1 { wrow } else { hrow };
                let v: f32 = src[c * kl..(c + 1) * kl].iter().map(|x| x.abs()).sum();
                finite &= v.is_finite();
                *s = v;
            }
        }
        finite
    }
}

/// Fails unless `mask` is `[out, in]` of `shape`.
pub(crate) fn check_mask(shape: &EdgeShape, mask: &BitMask) -> Result<(), ActuatorError> {
    if mask.rows() != shape.out || mask.cols() != shape.inp {
        return Err(ActuatorError::Shape(format!(
            "mask is [{}, {}] but the layer is [{}, {}]",
            mask.rows(),
            mask.cols(),
            shape.out,
            shape.inp
        )));
    }
    Ok(())
}

pub(crate) fn check_len(what: &str, expected: usize, got: usize) -> Result<(), ActuatorError> {
    if expected != got {
        return Err(ActuatorError::Length {
            what: what.into(),
            expected,
            got,
        });
    }
    Ok(())
}
