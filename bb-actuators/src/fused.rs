//! The whole degree-target refresh of one layer in as few passes over its weights as the
//! side allows.
//!
//! [`refresh_targets`] does what [`crate::edge_scores`], [`crate::apply_targets`] and
//! [`crate::sync_weights`] do in sequence, with the same result bit for bit, but without the
//! `[out * in]` score buffer and its extra passes:
//!
//! * **rows (SP-in)**: each row is read once from memory. Its keys are computed straight
//!   from the weights, the shadow store and the mask, its threshold is selected while the row
//!   is still in cache, and its mask words and weights are rewritten on the spot;
//! * **columns (SP-out)**: one pass gathers strips of columns and selects their thresholds,
//!   a second pass rebuilds every row and moves its weights.

use crate::actuator::{edge_key, ensure_keys, workers, ActuatorScratch, SyncStats, COLUMN_BLOCK};
use crate::select::{threshold_key_bracketed, Histogram};
use crate::shape::{check_len, check_mask, first_non_finite};
use crate::{ActuatorError, BitMask, EdgeShape, Side};
use rayon::prelude::*;

/// SP-out gathers up to this many strips of a plain matrix in one pass over the rows...
const MAX_GROUP: usize = 16;
/// ... as long as their keys take at most this many (16 MiB of each worker's scratch; a
/// strip of a 2048-row layer takes 1 MiB).
const GROUP_KEYS: usize = 1 << 21;

/// Re-selects `mask` so that slab `j` on `side` keeps its `min(targets[j], D)` strongest
/// candidates, and moves the weights of every edge that changed state: one that dies is
/// saved to `shadow` and zeroed, one that returns gets its shadow value back.
///
/// The result equals [`crate::edge_scores`] followed by [`crate::apply_targets`] and
/// [`crate::sync_weights`] (without growing from zero), bit for bit.
///
/// `hints` is the layer's memory between refreshes: the key range each slab's threshold fell
/// in last time, so that the next selection can start there, and on plain matrices the keys
/// of the dead edges near it, so that the shadow need not be read while it stays there (per
/// row for SP-in; for SP-out while every column's threshold does). It changes only the speed, never the result, as long as the shadow values of dead
/// edges change only through this function (a mask changed by other means is noticed):
/// start with an empty vector, keep it with the layer, and clear it after writing to the
/// shadow directly.
///
/// A non-finite score is an error naming the buffer and flat index of the first bad value.
/// With columns nothing has changed when it is returned; with rows, every row holding a
/// non-finite value is left exactly as it was and the other rows have been refreshed (each
/// row's mask and weights stay consistent either way). Without `regrow` only live edges are
/// candidates: the shadow values of dead ones are neither read nor checked (they cannot
/// come back, and a dead edge that is kept dead is not moved).
#[allow(clippy::too_many_arguments)]
pub fn refresh_targets(
    side: Side,
    shape: &EdgeShape,
    weights: &mut [f32],
    shadow: &mut [f32],
    targets: &[u32],
    regrow: bool,
    mask: &mut BitMask,
    scratch: &mut ActuatorScratch,
    hints: &mut Vec<u64>,
) -> Result<SyncStats, ActuatorError> {
    check_len("weights", shape.weight_len(), weights.len())?;
    check_len("shadow", shape.weight_len(), shadow.len())?;
    check_len("targets", shape.slabs(side), targets.len())?;
    check_mask(shape, mask)?;
    if shape.edges() == 0 {
        return Ok(SyncStats::default());
    }
    let bad = match side {
        Side::Rows => {
            hints.resize(row_hints(shape) * shape.out, 0);
            fused_rows(
                shape, weights, shadow, targets, regrow, mask, scratch, hints,
            )
        }
        Side::Columns => {
            // Brackets, then (plain matrices) the columns' dead-key caches.
            let caches = if shape.kernel_len() == 1 {
                crate::flat::column_cache_len(shape.out, shape.inp)
            } else {
                0
            };
            hints.resize(2 * shape.inp + caches, 0);
            fused_columns(
                shape, weights, shadow, targets, regrow, mask, scratch, hints,
            )
        }
    };
    bad.map_err(|row| first_non_finite(shape, weights, shadow, mask, regrow, row))
}

/// Hint words per row for SP-in: plain matrices keep a dead-key cache besides the bracket
/// (see [`crate::flat::row_hint_len`]).
fn row_hints(shape: &EdgeShape) -> usize {
    if shape.kernel_len() == 1 {
        crate::flat::row_hint_len(shape.inp)
    } else {
        2
    }
}

/// The score of edge `c` of a row: kernel-summed `|value|` from the weights if live, from
/// the shadow store if dead.
#[inline(always)]
fn score(kl: usize, live: bool, w: &[f32], h: &[f32], c: usize) -> f32 {
    let src = if live { w } else { h };
    if kl == 1 {
        src[c].abs()
    } else {
        src[c * kl..(c + 1) * kl].iter().map(|x| x.abs()).sum()
    }
}

/// The keys of up to 64 consecutive edges of a dense row (mask `word`, first index `lo`),
/// as [`crate::key_of`] of their score times whether they are candidates; returns whether every
/// score is finite. Written with bit operations only, so that it vectorizes.
#[inline(always)]
fn keys_word(word: u64, w: &[f32], h: &[f32], lo: usize, regrow: bool, keys: &mut [u64]) -> bool {
    let all = u64::from(regrow).wrapping_neg();
    // Without regrowth the dead edges are not candidates: their shadow values are not read.
    let h = if regrow { h } else { w };
    let mut bad = 0u32;
    for (b, ((key, &x), &y)) in keys.iter_mut().zip(w).zip(h).enumerate() {
        let live = ((word >> b) & 1).wrapping_neg();
        let bits = (x.to_bits() & live as u32) | (y.to_bits() & !(live as u32));
        bad |= u32::from(bits & 0x7f80_0000 == 0x7f80_0000) & ((live | all) as u32 & 1);
        // key_of(|v|, index): the magnitude's bits above the reversed index.
        let k = (u64::from(bits & 0x7fff_ffff) << 32) | (u64::from(u32::MAX) - (lo + b) as u64);
        *key = k & (live | all);
    }
    bad == 0
}

/// A key from [`keys_word`] (numbered by column) renumbered for its column's selection, by
/// row `r`; non-candidates stay 0.
#[inline(always)]
fn by_row(key: u64, r: usize) -> u64 {
    let idx = u64::from(u32::MAX) - r as u64;
    (key & !u64::from(u32::MAX)) | (idx * u64::from(key != 0))
}

/// Moves the weights of one row's edges whose bits differ between `old` and `new` words.
#[inline(always)]
pub(crate) fn sync_row(
    old: &[u64],
    new: &[u64],
    kl: usize,
    w: &mut [f32],
    h: &mut [f32],
) -> SyncStats {
    let mut st = SyncStats::default();
    for (wi, (&a, &b)) in old.iter().zip(new).enumerate() {
        let mut diff = a ^ b;
        while diff != 0 {
            let bit = diff.trailing_zeros() as usize;
            diff &= diff - 1;
            let c = wi * 64 + bit;
            let range = c * kl..(c + 1) * kl;
            if (b >> bit) & 1 == 1 {
                st.born += 1;
                w[range.clone()].copy_from_slice(&h[range]);
            } else {
                st.died += 1;
                h[range.clone()].copy_from_slice(&w[range.clone()]);
                w[range].fill(0.0);
            }
        }
    }
    st
}

pub(crate) fn add(a: SyncStats, b: SyncStats) -> SyncStats {
    SyncStats {
        died: a.died + b.died,
        born: a.born + b.born,
    }
}

/// Rows: one fused pass. Returns the stats, or the first row with a non-finite score.
#[allow(clippy::too_many_arguments)]
fn fused_rows(
    shape: &EdgeShape,
    weights: &mut [f32],
    shadow: &mut [f32],
    targets: &[u32],
    regrow: bool,
    mask: &mut BitMask,
    scratch: &mut ActuatorScratch,
    hints: &mut [u64],
) -> Result<SyncStats, usize> {
    let (cols, kl, wpr) = (shape.inp, shape.kernel_len(), mask.words_per_row());
    let n = workers(shape.edges());
    // Two key buffers per worker: the row's keys, and the selection's scratch.
    ensure_keys(scratch, n, 2 * cols);
    // And, for plain matrices, the row's scores as bits.
    if scratch.bits.len() < n {
        scratch.bits.resize_with(n, Vec::new);
    }
    if kl == 1 {
        for b in &mut scratch.bits[..n] {
            if b.len() < cols {
                b.resize(cols, 0);
            }
        }
    }
    let rows_per = shape.out.div_ceil(n);
    let rl = cols * kl;
    let (stats, bad) = mask
        .words_mut()
        .par_chunks_mut(rows_per * wpr)
        .zip(weights.par_chunks_mut(rows_per * rl))
        .zip(shadow.par_chunks_mut(rows_per * rl))
        .zip(hints.par_chunks_mut(rows_per * row_hints(shape)))
        .zip(
            scratch.keys[..n]
                .par_iter_mut()
                .zip(scratch.hists[..n].par_iter_mut())
                .zip(scratch.bits[..n].par_iter_mut()),
        )
        .enumerate()
        .map(|(b, ((((words, w), h), hints), ((keys, hist), bits)))| {
            let (keys, tmp) = keys.split_at_mut(cols);
            let tmp = &mut tmp[..cols];
            let r0 = b * rows_per;
            if kl == 1 {
                return crate::flat::rows_flat_block(
                    cols,
                    targets,
                    regrow,
                    r0,
                    wpr,
                    words,
                    w,
                    h,
                    (keys, tmp, &mut bits[..cols]),
                    hist,
                    hints,
                );
            }
            rows_fused_block(
                cols, kl, targets, regrow, r0, wpr, words, w, h, keys, tmp, hist, hints,
            )
        })
        .reduce(
            || (SyncStats::default(), None),
            |a, b| (add(a.0, b.0), a.1.into_iter().chain(b.1).min()),
        );
    match bad {
        Some(r) => Err(r),
        None => Ok(stats),
    }
}

crate::multiversion! {
    /// Refreshes rows `r0..` of a layer with kernel dims (mask words `words`, weights `w`,
    /// shadow `h`; plain matrices go to `flat.rs`); returns the stats and the first row left
    /// alone for a non-finite score.
    #[allow(clippy::too_many_arguments)]
    fn rows_fused_block(
        cols: usize,
        kl: usize,
        targets: &[u32],
        regrow: bool,
        r0: usize,
        wpr: usize,
        words: &mut [u64],
        w: &mut [f32],
        h: &mut [f32],
        keys: &mut [u64],
        tmp: &mut [u64],
        hist: &mut Histogram,
        hints: &mut [u64],
    ) -> (SyncStats, Option<usize>) {
        let mut st = SyncStats::default();
        let mut bad = None;
        let rl = cols * kl;
        let mut new = [0u64; 64];
        for (i, ((mw, wr), hr)) in words
            .chunks_mut(wpr)
            .zip(w.chunks_mut(rl))
            .zip(h.chunks_mut(rl))
            .enumerate()
        {
            let r = r0 + i;
            let mut finite = true;
            // Dead edges are not candidates without regrowth: their shadow is not read.
            let dead: &[f32] = if regrow { hr } else { wr };
            for (wi, (&word, kc)) in mw.iter().zip(keys.chunks_mut(64)).enumerate() {
                let lo = wi * 64;
                for (b, key) in kc.iter_mut().enumerate() {
                    let live = (word >> b) & 1 == 1;
                    let v = score(kl, live, wr, dead, lo + b);
                    finite &= v.is_finite() | !(live | regrow);
                    *key = edge_key(v, lo + b, live, regrow);
                }
            }
            if !finite {
                bad.get_or_insert(r);
                continue;
            }
            let bracket: &mut [u64; 2] = (&mut hints[2 * i..2 * i + 2]).try_into().expect("two");
            let thr = threshold_key_bracketed(keys, targets[r] as usize, bracket, hist, tmp);
            // Mask words are rebuilt in blocks of up to 64 words (4096 columns), each block
            // synced against the old words before they are overwritten.
            for (blk, (ow, kb)) in mw.chunks_mut(64).zip(keys.chunks(64 * 64)).enumerate() {
                let nw = &mut new[..ow.len()];
                for (x, kc) in nw.iter_mut().zip(kb.chunks(64)) {
                    let mut bits = 0u64;
                    for (b, &key) in kc.iter().enumerate() {
                        bits |= u64::from(key >= thr) << b;
                    }
                    *x = bits;
                }
                let off = blk * 64 * 64 * kl;
                st = add(st, sync_row(ow, nw, kl, &mut wr[off..], &mut hr[off..]));
                ow.copy_from_slice(nw);
            }
        }
        (st, bad)
    }
}

/// Columns: thresholds from gathered strips, then every row rebuilt and synced.
#[allow(clippy::too_many_arguments)]
fn fused_columns(
    shape: &EdgeShape,
    weights: &mut [f32],
    shadow: &mut [f32],
    targets: &[u32],
    regrow: bool,
    mask: &mut BitMask,
    scratch: &mut ActuatorScratch,
    hints: &mut [u64],
) -> Result<SyncStats, usize> {
    let (rows, cols, kl, wpr) = (
        shape.out,
        shape.inp,
        shape.kernel_len(),
        mask.words_per_row(),
    );
    let n = workers(shape.edges());
    // The brackets, then (plain matrices) the dead-key caches.
    let (hints, caches) = hints.split_at_mut(2 * cols);
    // A strip's keys, and the selection's scratch (more below if strips are gathered).
    ensure_keys(scratch, n, (COLUMN_BLOCK + 1) * rows);
    // 0 marks a column whose threshold is still to be selected.
    scratch.thresholds.clear();
    scratch.thresholds.resize(cols, 0);
    if kl == 1 {
        // Plain matrices: columns whose thresholds stayed in their brackets are done in one
        // streaming pass; only the others are gathered below.
        crate::flat::column_brackets(
            rows,
            cols,
            mask.words(),
            weights,
            shadow,
            targets,
            regrow,
            hints,
            caches,
            scratch,
        )?;
    }
    // Per mask-word column, the columns that kept their brackets: their new bits are in
    // `scratch.pre`, and their values need not be read again.
    scratch.kept.clear();
    scratch.kept.extend(scratch.thresholds.chunks(64).map(|t| {
        t.iter()
            .enumerate()
            .fold(0, |k, (j, &x)| k | (u64::from(kl == 1 && x != 0) << j))
    }));
    let cols_per = cols.div_ceil(n).div_ceil(COLUMN_BLOCK) * COLUMN_BLOCK;
    // Strips are gathered `group` at a time in one pass over the rows: each row's read is
    // then that many strips long (a run the hardware prefetcher follows), not one strip.
    let strips_left = scratch
        .kept
        .iter()
        .enumerate()
        .filter(|&(i, &k)| !k & crate::mask::lanes(cols - 64 * i) != 0)
        .count();
    // Layers with kernel dims gather every column; when each worker's columns fit one group,
    // their keys all stay in the scratch after the selection, and the rebuild reads them
    // instead of summing every kernel again.
    let keep_keys = kl > 1 && cols_per / COLUMN_BLOCK <= MAX_GROUP;
    let group = if kl == 1 {
        (GROUP_KEYS / (COLUMN_BLOCK * rows.max(1))).clamp(1, MAX_GROUP.min(strips_left.max(1)))
    } else if keep_keys {
        cols_per / COLUMN_BLOCK
    } else {
        1
    };
    ensure_keys(scratch, n, (group * COLUMN_BLOCK + 1) * rows);
    // Pass 1: every column's threshold; nothing is written to the layer yet.
    let bad = {
        let (m, w, h): (&BitMask, &[f32], &[f32]) = (mask, weights, shadow);
        let kept = &scratch.kept;
        scratch
            .thresholds
            .par_chunks_mut(cols_per)
            .zip(hints.par_chunks_mut(2 * cols_per))
            .zip(
                scratch.keys[..n]
                    .par_iter_mut()
                    .zip(scratch.hists[..n].par_iter_mut()),
            )
            .enumerate()
            .map(|(b, ((thr, hints), (keys, hist)))| {
                let c0 = b * cols_per;
                let mut bad: Option<usize> = None;
                // The strips still to be gathered, `group` at a time: `(first column, width,
                // columns needed)`.
                let mut pending = [(0usize, 0usize, 0u64); MAX_GROUP];
                let mut len = 0;
                let n_strips = thr.len().div_ceil(COLUMN_BLOCK);
                for s in 0..n_strips {
                    let s0 = c0 + s * COLUMN_BLOCK;
                    let width = COLUMN_BLOCK.min(thr.len() - s * COLUMN_BLOCK);
                    let need = !kept[s0 / 64] & crate::mask::lanes(width);
                    if need != 0 {
                        pending[len] = (s0, width, need);
                        len += 1;
                    }
                    if len == 0 || (len < group && s + 1 < n_strips) {
                        continue;
                    }
                    let strips = &pending[..len];
                    len = 0;
                    if let Some(r) = gather_strips_fused(
                        w,
                        h,
                        m.words(),
                        (rows, cols, kl, wpr),
                        strips,
                        regrow,
                        keys,
                    ) {
                        bad = Some(bad.map_or(r, |x| x.min(r)));
                        continue;
                    }
                    let (keys, tmp) = keys.split_at_mut(strips.len() * COLUMN_BLOCK * rows);
                    for (i, &(s0, width, _)) in strips.iter().enumerate() {
                        let (l0, l1) = (s0 - c0, s0 - c0 + width);
                        strip_thresholds(
                            &keys[i * COLUMN_BLOCK * rows..],
                            rows,
                            &targets[s0..s0 + width],
                            hist,
                            tmp,
                            &mut hints[2 * l0..2 * l1],
                            &mut thr[l0..l1],
                        );
                    }
                }
                bad
            })
            .reduce(|| None, |a, b| a.into_iter().chain(b).min())
    };
    if let Some(r) = bad {
        return Err(r);
    }
    // Pass 2: rebuild and sync every row.
    let thresholds = &scratch.thresholds;
    let rows_per = 16;
    let rl = cols * kl;
    // Blocks of `rows_per` rows in parallel: `f(first row, mask words, weights, shadow)`.
    let mut blocks = |f: &BlockFn<'_>| {
        mask.words_mut()
            .par_chunks_mut(rows_per * wpr)
            .zip(weights.par_chunks_mut(rows_per * rl))
            .zip(shadow.par_chunks_mut(rows_per * rl))
            .enumerate()
            .map(|(b, ((words, w), h))| f(b * rows_per, words, w, h))
            .reduce(
                || (SyncStats::default(), 0),
                |(a, x), (b, y)| (add(a, b), x ^ y),
            )
    };
    if kl == 1 {
        let cut = &mut scratch.cut;
        cut.resize(2 * cols, 0);
        for (c, &t) in thresholds.iter().enumerate() {
            (cut[c], cut[cols + c]) = crate::flat::split_threshold(t);
        }
        let (cut, kept, pre) = (&scratch.cut, &scratch.kept, &scratch.pre);
        let (st, parts) = blocks(&|r0, words, w, h| {
            let pre = if kept.iter().any(|&k| k != 0) {
                &pre[r0 * wpr..]
            } else {
                &[]
            };
            crate::flat::rebuild_columns_block(cols, r0, regrow, cut, kept, pre, words, w, h)
        });
        crate::flat::seal_column_caches(caches, rows, parts, regrow);
        return Ok(st);
    }
    let kept_keys: &[Vec<u64>] = if keep_keys { &scratch.keys[..n] } else { &[] };
    Ok(blocks(&|r0, words, w, h| {
        let keys = (kept_keys, cols_per, rows);
        let st = rebuild_rows_fused(cols, kl, wpr, r0, regrow, thresholds, keys, words, w, h);
        (st, 0)
    })
    .0)
}

/// Work on one block of rows: `(first row, its mask words, weights, shadow)`, giving what it
/// moved and (plain matrices) its rows' parts of the new mask's fingerprint.
type BlockFn<'a> =
    dyn Fn(usize, &mut [u64], &mut [f32], &mut [f32]) -> (SyncStats, u64) + Sync + 'a;

crate::multiversion! {
    /// The threshold key of each column of a gathered strip (`rows` keys per column),
    /// starting from the column's hint.
    #[allow(clippy::too_many_arguments)]
    fn strip_thresholds(
        keys: &[u64],
        rows: usize,
        targets: &[u32],
        hist: &mut Histogram,
        tmp: &mut [u64],
        hints: &mut [u64],
        out: &mut [u64],
    ) {
        for (j, ((t, &k), hint)) in out.iter_mut().zip(targets).zip(hints.chunks_exact_mut(2)).enumerate() {
            if *t != 0 {
                continue;
            }
            let bracket: &mut [u64; 2] = hint.try_into().expect("two");
            *t = threshold_key_bracketed(&keys[j * rows..(j + 1) * rows], k as usize, bracket, hist, tmp);
        }
    }
}

crate::multiversion! {
    /// Keys of the strips `strips` (each `(first column, a multiple of 64; width; columns
    /// needed)`), column-major into `keys` (strip `i` from `i * COLUMN_BLOCK * rows`), for at
    /// least each strip's needed columns; returns the first row with a non-finite score, if
    /// any. Plain matrices read only the 16-column quarters of the rows that hold a needed
    /// column (the others' values were counted, and checked, in
    /// `crate::flat::column_brackets`), every strip of a block of rows before the next block.
    #[allow(clippy::too_many_arguments)]
    fn gather_strips_fused(
        w: &[f32],
        h: &[f32],
        words: &[u64],
        dims: (usize, usize, usize, usize),
        strips: &[(usize, usize, u64)],
        regrow: bool,
        keys: &mut [u64],
    ) -> Option<usize> {
        let (rows, cols, kl, wpr) = dims;
        let rl = cols * kl;
        let stride = COLUMN_BLOCK * rows;
        if kl == 1 {
            // Blocks of rows: each row's keys are built in one vector loop into a small tile,
            // then written column by column, a run of consecutive keys per column.
            const TR: usize = 8;
            let mut tiles = [[[0u64; 64]; TR]; MAX_GROUP];
            // The 16-column quarters of a strip that hold a needed column.
            let quarters = |width: usize, need: u64| {
                (0..width.div_ceil(16))
                    .map(move |q| 16 * q..(16 * q + 16).min(width))
                    .filter(move |q| (need >> q.start) as u16 != 0)
            };
            let mut r0 = 0;
            while r0 < rows {
                let n = TR.min(rows - r0);
                let mut bad: Option<usize> = None;
                for i in 0..n {
                    let r = r0 + i;
                    for (tile, &(s0, width, need)) in tiles.iter_mut().zip(strips) {
                        let t = &mut tile[i];
                        let word = words[r * wpr + s0 / 64];
                        let (wc, hc) = (&w[r * rl + s0..r * rl + s0 + width], &h[r * rl + s0..r * rl + s0 + width]);
                        for q in quarters(width, need) {
                            let (a, b) = (q.start, q.end);
                            if !keys_word(word >> a, &wc[a..b], &hc[a..b], a, regrow, &mut t[a..b]) {
                                bad.get_or_insert(r);
                            }
                            for k in &mut t[a..b] {
                                *k = by_row(*k, r);
                            }
                        }
                    }
                }
                if bad.is_some() {
                    return bad;
                }
                for (si, (tile, &(_, width, need))) in tiles.iter().zip(strips).enumerate() {
                    let keys = &mut keys[si * stride..(si + 1) * stride];
                    // Only the needed columns' keys are written (and later selected).
                    let mut left = need & crate::mask::lanes(width);
                    while left != 0 {
                        let j = left.trailing_zeros() as usize;
                        left &= left - 1;
                        let dst = &mut keys[j * rows + r0..j * rows + r0 + n];
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = tile[i][j];
                        }
                    }
                }
                r0 += n;
            }
            return None;
        }
        for (si, &(s0, width, _)) in strips.iter().enumerate() {
            let keys = &mut keys[si * stride..(si + 1) * stride];
            for r in 0..rows {
                let word = words[r * wpr + s0 / 64];
                let wr = &w[r * rl..(r + 1) * rl];
                let hr = if regrow { &h[r * rl..(r + 1) * rl] } else { wr };
                let mut finite = true;
                for j in 0..width {
                    let live = (word >> j) & 1 == 1;
                    let v = score(kl, live, wr, hr, s0 + j);
                    finite &= v.is_finite() | !(live | regrow);
                    keys[j * rows + r] = edge_key(v, r, live, regrow);
                }
                if !finite {
                    return Some(r);
                }
            }
        }
        None
    }
}

crate::multiversion! {
    /// Rebuilds rows `r0..` of a layer with kernel dims from per-column threshold keys and
    /// moves their weights (plain matrices go to `flat.rs`). `keys = (per worker, columns per
    /// worker, rows)`: the edges' keys as the selection gathered them (column-major over each
    /// worker's columns), or no workers to score the edges again.
    #[allow(clippy::too_many_arguments)]
    fn rebuild_rows_fused(
        cols: usize,
        kl: usize,
        wpr: usize,
        r0: usize,
        regrow: bool,
        thresholds: &[u64],
        keys: (&[Vec<u64>], usize, usize),
        words: &mut [u64],
        w: &mut [f32],
        h: &mut [f32],
    ) -> SyncStats {
        let mut st = SyncStats::default();
        let rl = cols * kl;
        for (i, ((mw, wr), hr)) in words
            .chunks_mut(wpr)
            .zip(w.chunks_mut(rl))
            .zip(h.chunks_mut(rl))
            .enumerate()
        {
            let r = r0 + i;
            for (wi, ow) in mw.iter_mut().enumerate() {
                let lo = wi * 64;
                let hi = (lo + 64).min(cols);
                let old = *ow;
                let mut bits = 0u64;
                let dead: &[f32] = if regrow { hr } else { wr };
                let (kept, cols_per, rows) = keys;
                for (b, &thr) in thresholds[lo..hi].iter().enumerate() {
                    let c = lo + b;
                    let key = if kept.is_empty() {
                        let live = (old >> b) & 1 == 1;
                        edge_key(score(kl, live, wr, dead, c), r, live, regrow)
                    } else {
                        kept[c / cols_per][(c % cols_per) * rows + r]
                    };
                    bits |= u64::from(key >= thr) << b;
                }
                let off = lo * kl;
                st = add(
                    st,
                    sync_row(&[old], &[bits], kl, &mut wr[off..], &mut hr[off..]),
                );
                *ow = bits;
            }
        }
        st
    }
}
