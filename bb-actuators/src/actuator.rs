use crate::mask::fill_words;
use crate::select::{key_of, threshold_key_with, Histogram};
use crate::shape::{check_len, check_mask};
use crate::{ActuatorError, BitMask, EdgeShape};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Which slabs of the edge matrix an actuator selects over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Rows: the fan-in of each output unit (SP-in).
    Rows,
    /// Columns: the fan-out, into this layer, of each input unit (SP-out).
    Columns,
}

/// Compensation of a unit's pre-activation for its lost fan-in.
///
/// The factor of output unit `j` with `k_j` of `D` inputs live multiplies its pre-activation
/// `W_j . x` (before the bias): `sqrt(D / k_j)`, `D / k_j`, or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rescale {
    /// `sqrt(D / k)` (default for SP-in).
    Sqrt,
    /// `D / k`.
    Linear,
    /// No rescale (default for SP-out).
    None,
}

/// The actuator of a layer: which side BB's degree targets apply to, and how.
///
/// In TOML: `[actuator] kind = "sp_in"`, `regrow = true`, `rescale = "sqrt"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Actuator {
    /// Dendritic pruning: keep the `k_j` strongest entries of row `j` of the producing
    /// layer. Lowers the unit's activity.
    SpIn {
        /// Top-k over the whole row, dead entries included (scored by their stored value).
        #[serde(default = "default_true")]
        regrow: bool,
        /// Pre-activation rescale.
        #[serde(default = "default_sqrt")]
        rescale: Rescale,
    },
    /// Axonal pruning: keep the `k_j` strongest entries of column `j` of the consuming
    /// layer. Lowers the unit's audience.
    SpOut {
        /// Top-k over the whole column, dead entries included.
        #[serde(default = "default_true")]
        regrow: bool,
        /// Pre-activation rescale of the consuming layer's rows.
        #[serde(default = "default_none")]
        rescale: Rescale,
    },
}

fn default_true() -> bool {
    true
}
fn default_sqrt() -> Rescale {
    Rescale::Sqrt
}
fn default_none() -> Rescale {
    Rescale::None
}

impl Default for Actuator {
    fn default() -> Self {
        Actuator::SpIn {
            regrow: true,
            rescale: Rescale::Sqrt,
        }
    }
}

impl Actuator {
    /// SP-in with the defaults (regrowth on, `sqrt` rescale).
    pub fn sp_in() -> Self {
        Self::default()
    }

    /// SP-out with the defaults (regrowth on, no rescale).
    pub fn sp_out() -> Self {
        Actuator::SpOut {
            regrow: true,
            rescale: Rescale::None,
        }
    }

    /// The config name (`"sp_in"` / `"sp_out"`).
    pub fn name(&self) -> &'static str {
        match self {
            Actuator::SpIn { .. } => "sp_in",
            Actuator::SpOut { .. } => "sp_out",
        }
    }

    /// Rows for SP-in, columns for SP-out.
    pub fn side(&self) -> Side {
        match self {
            Actuator::SpIn { .. } => Side::Rows,
            Actuator::SpOut { .. } => Side::Columns,
        }
    }

    /// Whether dead edges compete in the top-k.
    pub fn regrow(&self) -> bool {
        match self {
            Actuator::SpIn { regrow, .. } | Actuator::SpOut { regrow, .. } => *regrow,
        }
    }

    /// The rescale rule.
    pub fn rescale(&self) -> Rescale {
        match self {
            Actuator::SpIn { rescale, .. } | Actuator::SpOut { rescale, .. } => *rescale,
        }
    }
}

/// Reusable buffers of the selection kernels: one per worker thread, grown on first use
/// and kept, so refreshes after the first allocate nothing.
#[derive(Debug, Default, Clone)]
pub struct ActuatorScratch {
    pub(crate) keys: Vec<Vec<u64>>,
    pub(crate) hists: Vec<Histogram>,
    pub(crate) thresholds: Vec<u64>,
    /// Per worker: one row's scores as magnitude bits (the fused SP-in refresh).
    pub(crate) bits: Vec<Vec<u32>>,
    /// Per column: SP-out's bracket ends, then its thresholds split into two halves.
    pub(crate) cut: Vec<u32>,
    /// SP-out: the bracket ends of `cut` as signed bounds (see [`crate::flat::Cuts`]).
    pub(crate) cut_gt: Vec<i32>,
    /// Per worker: SP-out's column counts and bracket keys.
    pub(crate) columns: Vec<crate::flat::ColumnScratch>,
    /// SP-out: the mask words of the columns that kept their brackets (one per mask word).
    pub(crate) pre: Vec<u64>,
    /// SP-out: per mask-word column, the columns that kept their brackets.
    pub(crate) kept: Vec<u64>,
    /// SP-out, per worker: `(column << 32) | row` of the dead edges its cached keys bring back.
    pub(crate) born: Vec<Vec<u64>>,
}

/// Layers with fewer edges than this are processed on the calling thread.
const PARALLEL_MIN_EDGES: usize = 1 << 15;
/// Columns gathered together by SP-out (one cache-friendly strip of each row).
pub(crate) const COLUMN_BLOCK: usize = 64;

pub(crate) fn workers(edges: usize) -> usize {
    if edges < PARALLEL_MIN_EDGES {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// Re-selects `mask` so that slab `j` on `side` keeps its `min(targets[j], D)` highest-scoring
/// candidates (ties toward the lower index).
///
/// With `regrow` every entry of the slab is a candidate; without it only the currently live
/// ones are, so no edge is ever added (a slab with fewer live entries than its target keeps
/// them all). `scores` is the `[out * in]` edge-score matrix from [`crate::edge_scores`].
pub fn apply_targets(
    side: Side,
    shape: &EdgeShape,
    scores: &[f32],
    targets: &[u32],
    regrow: bool,
    mask: &mut BitMask,
    scratch: &mut ActuatorScratch,
) -> Result<(), ActuatorError> {
    check_len("scores", shape.edges(), scores.len())?;
    check_len("targets", shape.slabs(side), targets.len())?;
    check_mask(shape, mask)?;
    match side {
        Side::Rows => select_rows(shape, scores, targets, regrow, mask, scratch),
        Side::Columns => select_columns(shape, scores, targets, regrow, mask, scratch),
    }
    Ok(())
}

#[inline(always)]
pub(crate) fn edge_key(score: f32, index: usize, live: bool, regrow: bool) -> u64 {
    // Branch-free, so the loops around it vectorize: 0 (NOT_A_CANDIDATE) for a dead edge
    // without regrowth.
    key_of(score, index) * u64::from(regrow | live)
}

/// The new bits of one mask word whose first column is `lo`: entry `c` stays or becomes live
/// when its key (slab index `key_index(c)`) reaches `thr(c)`.
#[inline(always)]
fn rebuild_word(
    old: u64,
    scores: &[f32],
    lo: usize,
    regrow: bool,
    key_index: impl Fn(usize) -> usize,
    thr: impl Fn(usize) -> u64,
) -> u64 {
    let mut new = 0u64;
    for (b, &s) in scores.iter().enumerate() {
        let c = lo + b;
        if edge_key(s, key_index(c), (old >> b) & 1 == 1, regrow) >= thr(c) {
            new |= 1 << b;
        }
    }
    new
}

pub(crate) fn ensure_keys(scratch: &mut ActuatorScratch, n: usize, len: usize) {
    if scratch.keys.len() < n {
        scratch.keys.resize_with(n, Vec::new);
        scratch.hists.resize_with(n, Histogram::default);
    }
    for k in &mut scratch.keys[..n] {
        if k.len() < len {
            k.resize(len, 0);
        }
    }
}

fn select_rows(
    shape: &EdgeShape,
    scores: &[f32],
    targets: &[u32],
    regrow: bool,
    mask: &mut BitMask,
    scratch: &mut ActuatorScratch,
) {
    let (cols, wpr) = (shape.inp, mask.words_per_row());
    let n = workers(shape.edges());
    ensure_keys(scratch, n, cols);
    let rows_per = shape.out.div_ceil(n);
    mask.words_mut()
        .par_chunks_mut(rows_per * wpr)
        .zip(
            scratch.keys[..n]
                .par_iter_mut()
                .zip(scratch.hists[..n].par_iter_mut()),
        )
        .enumerate()
        .for_each(|(b, (chunk, (keys, hist)))| {
            rows_block(
                scores,
                cols,
                targets,
                regrow,
                b * rows_per,
                wpr,
                chunk,
                keys,
                hist,
            );
        });
}

crate::multiversion! {
    /// Re-selects the rows `r0..` whose mask words are `chunk` (`wpr` words per row).
    #[allow(clippy::too_many_arguments)]
    fn rows_block(
        scores: &[f32],
        cols: usize,
        targets: &[u32],
        regrow: bool,
        r0: usize,
        wpr: usize,
        chunk: &mut [u64],
        keys: &mut [u64],
        hist: &mut Histogram,
    ) {
        for (i, words) in chunk.chunks_mut(wpr).enumerate() {
            let r = r0 + i;
            let srow = &scores[r * cols..(r + 1) * cols];
            let k = targets[r] as usize;
            if regrow && k >= cols {
                fill_words(words, cols, true);
                continue;
            }
            let keys = &mut keys[..cols];
            for (wi, (&w, kc)) in words.iter().zip(keys.chunks_mut(64)).enumerate() {
                let lo = wi * 64;
                for (b, key) in kc.iter_mut().enumerate() {
                    *key = edge_key(srow[lo + b], lo + b, (w >> b) & 1 == 1, regrow);
                }
            }
            let thr = threshold_key_with(keys, k, hist);
            for (wi, w) in words.iter_mut().enumerate() {
                let lo = wi * 64;
                let hi = (lo + 64).min(cols);
                *w = rebuild_word(*w, &srow[lo..hi], lo, regrow, |c| c, |_| thr);
            }
        }
    }
}

fn select_columns(
    shape: &EdgeShape,
    scores: &[f32],
    targets: &[u32],
    regrow: bool,
    mask: &mut BitMask,
    scratch: &mut ActuatorScratch,
) {
    let (rows, cols, wpr) = (shape.out, shape.inp, mask.words_per_row());
    let n = workers(shape.edges());
    ensure_keys(scratch, n, COLUMN_BLOCK * rows);
    scratch.thresholds.resize(cols, 0);
    // Pass 1: the threshold key of every column, gathering strips of COLUMN_BLOCK columns.
    let cols_per = cols.div_ceil(n).div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
    {
        let m: &BitMask = mask;
        scratch
            .thresholds
            .par_chunks_mut(cols_per)
            .zip(
                scratch.keys[..n]
                    .par_iter_mut()
                    .zip(scratch.hists[..n].par_iter_mut()),
            )
            .enumerate()
            .for_each(|(b, (thr, (keys, hist)))| {
                let c0 = b * cols_per;
                for (s, strip) in thr.chunks_mut(COLUMN_BLOCK).enumerate() {
                    let s0 = c0 + s * COLUMN_BLOCK;
                    gather_strip(
                        scores,
                        m.words(),
                        wpr,
                        rows,
                        cols,
                        s0,
                        strip.len(),
                        regrow,
                        keys,
                    );
                    for (j, t) in strip.iter_mut().enumerate() {
                        let k = targets[s0 + j] as usize;
                        *t = threshold_key_with(&mut keys[j * rows..(j + 1) * rows], k, hist);
                    }
                }
            });
    }
    // Pass 2: rebuild every row from the thresholds.
    let thresholds = &scratch.thresholds;
    let rows_per = 32;
    mask.words_mut()
        .par_chunks_mut(rows_per * wpr)
        .enumerate()
        .for_each(|(b, chunk)| {
            rebuild_rows(scores, cols, wpr, b * rows_per, regrow, thresholds, chunk)
        });
}

crate::multiversion! {
    /// Keys of the `width` columns starting at `s0` (a multiple of 64: one mask word per row),
    /// column-major into `keys` (`rows` keys per column).
    #[allow(clippy::too_many_arguments)]
    fn gather_strip(
        scores: &[f32],
        words: &[u64],
        wpr: usize,
        rows: usize,
        cols: usize,
        s0: usize,
        width: usize,
        regrow: bool,
        keys: &mut [u64],
    ) {
        for r in 0..rows {
            let srow = &scores[r * cols + s0..r * cols + s0 + width];
            let w = words[r * wpr + s0 / 64];
            for (j, &sc) in srow.iter().enumerate() {
                keys[j * rows + r] = edge_key(sc, r, (w >> j) & 1 == 1, regrow);
            }
        }
    }
}

crate::multiversion! {
    /// Rebuilds rows `r0..` (mask words `chunk`) from per-column threshold keys.
    fn rebuild_rows(scores: &[f32], cols: usize, wpr: usize, r0: usize, regrow: bool, thresholds: &[u64], chunk: &mut [u64]) {
        for (i, words) in chunk.chunks_mut(wpr).enumerate() {
            let r = r0 + i;
            let srow = &scores[r * cols..(r + 1) * cols];
            for (wi, w) in words.iter_mut().enumerate() {
                let lo = wi * 64;
                let hi = (lo + 64).min(cols);
                *w = rebuild_word(*w, &srow[lo..hi], lo, regrow, |_| r, |c| thresholds[c]);
            }
        }
    }
}

/// What [`sync_weights`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Edges that went from live to dead.
    pub died: usize,
    /// Edges that went from dead to live.
    pub born: usize,
}

/// Moves weights between the layer and its shadow store after a mask change.
///
/// An edge that dies has its weights saved to `shadow` and zeroed in `weights`; an edge that
/// comes back gets its shadow values (or zeros, with `grow_from_zero`, as RigL and SET
/// grow). Every dead edge's weights are left at exactly zero.
pub fn sync_weights(
    shape: &EdgeShape,
    old: &BitMask,
    new: &BitMask,
    weights: &mut [f32],
    shadow: &mut [f32],
    grow_from_zero: bool,
) -> Result<SyncStats, ActuatorError> {
    check_len("weights", shape.weight_len(), weights.len())?;
    check_len("shadow", shape.weight_len(), shadow.len())?;
    let (cols, kl) = (shape.inp, shape.kernel_len());
    let row_len = cols * kl;
    let stats = weights
        .par_chunks_mut(row_len)
        .zip(shadow.par_chunks_mut(row_len))
        .enumerate()
        .with_min_len(16)
        .map(|(r, (w, s))| {
            let mut st = SyncStats::default();
            for (wi, (&a, &b)) in old.row_words(r).iter().zip(new.row_words(r)).enumerate() {
                let mut diff = a ^ b;
                while diff != 0 {
                    let bit = diff.trailing_zeros() as usize;
                    diff &= diff - 1;
                    let c = wi * 64 + bit;
                    let range = c * kl..(c + 1) * kl;
                    if (b >> bit) & 1 == 1 {
                        st.born += 1;
                        if grow_from_zero {
                            w[range].fill(0.0);
                        } else {
                            w[range.clone()].copy_from_slice(&s[range]);
                        }
                    } else {
                        st.died += 1;
                        s[range.clone()].copy_from_slice(&w[range.clone()]);
                        w[range].fill(0.0);
                    }
                }
            }
            st
        })
        .reduce(SyncStats::default, |a, b| SyncStats {
            died: a.died + b.died,
            born: a.born + b.born,
        });
    Ok(stats)
}

/// Writes the rescale factor of every output unit (row) into `out`: `sqrt(D / k)`, `D / k`
/// or 1, with `k` the row's live count and `D` the number of columns (1 for an empty row).
pub fn rescale_factors(rescale: Rescale, mask: &BitMask, out: &mut [f32]) {
    let d = mask.cols() as f64;
    for (r, f) in out.iter_mut().enumerate().take(mask.rows()) {
        let k = mask.row_count(r) as f64;
        *f = if k == 0.0 {
            1.0
        } else {
            match rescale {
                Rescale::Sqrt => (d / k).sqrt() as f32,
                Rescale::Linear => (d / k) as f32,
                Rescale::None => 1.0,
            }
        };
    }
}

/// Sets the values of every dead edge of `buf` (weights or their gradients,
/// `[out, in, kernel...]`) to zero. This is the per-training-step hot path: it walks the
/// dead bits word by word and allocates nothing. It runs on the calling thread: handing
/// work to the thread pool from outside it allocates now and then, which the per-step path
/// must not do.
pub fn zero_dead(shape: &EdgeShape, mask: &BitMask, buf: &mut [f32]) -> Result<(), ActuatorError> {
    check_len("buffer", shape.weight_len(), buf.len())?;
    zero_dead_rows(shape.inp, shape.kernel_len(), 0, mask, buf);
    Ok(())
}

crate::multiversion! {
    /// Zeroes the dead values of the rows `r0..` held in `buf`.
    fn zero_dead_rows(cols: usize, kl: usize, r0: usize, mask: &BitMask, buf: &mut [f32]) {
        for (r, row) in buf.chunks_mut(cols * kl).enumerate() {
            for (wi, &w) in mask.row_words(r0 + r).iter().enumerate() {
                let lo = wi * 64;
                let n = (cols - lo).min(64);
                let dead = !w & crate::mask::lanes(n);
                if dead == 0 {
                    continue;
                }
                let seg = &mut row[lo * kl..(lo + n) * kl];
                if kl == 1 {
                    // Eight values per mask byte: AND with the byte's expanded lane mask
                    // (vectorizes to one load, AND and store per eight values).
                    let mut chunks = seg.chunks_exact_mut(8);
                    for (chunk, byte) in chunks.by_ref().zip(w.to_le_bytes()) {
                        let keep = crate::mask::byte_lanes(byte);
                        for (x, &k) in chunk.iter_mut().zip(keep) {
                            *x = f32::from_bits(x.to_bits() & k);
                        }
                    }
                    let done = n - n % 8;
                    for (b, x) in chunks.into_remainder().iter_mut().enumerate() {
                        if (w >> (done + b)) & 1 == 0 {
                            *x = 0.0;
                        }
                    }
                } else {
                    let mut d = dead;
                    while d != 0 {
                        let c = d.trailing_zeros() as usize;
                        d &= d - 1;
                        seg[c * kl..(c + 1) * kl].fill(0.0);
                    }
                }
            }
        }
    }
}
