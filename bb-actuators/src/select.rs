//! O(n) top-k selection with a deterministic tie-break.
//!
//! Every candidate entry of a slab becomes one `u64` key: the bits of its (non-negative)
//! score in the high half and `u32::MAX - index` in the low half. Keys are then unique and
//! ordered by (score descending, index ascending), so "the k largest keys" is exactly
//! "the k largest scores, ties toward the lower index", and the threshold key is found in
//! O(n) without sorting: a radix select over the keys' digits narrows long slabs down to a
//! few keys, and `select_nth_unstable` finishes.

/// Key of an entry that must never be selected (a dead edge when regrowth is off).
pub const NOT_A_CANDIDATE: u64 = 0;

/// The selection key of a candidate with `score` at position `index` of its slab.
///
/// Negative and NaN scores are treated as 0 (scores are magnitudes; callers validate
/// finiteness before selecting). `index` must be below `u32::MAX`.
#[inline(always)]
pub fn key_of(score: f32, index: usize) -> u64 {
    debug_assert!(index < u32::MAX as usize);
    // `max` maps negatives (and NaN) to 0; the mask clears the sign bit of -0.0.
    let bits = score.max(0.0).to_bits() & 0x7fff_ffff;
    ((bits as u64) << 32) | (u32::MAX as u64 - index as u64)
}

/// Returns the threshold key that selects the `k` largest candidate keys of `keys`:
/// the selected entries are exactly those with `key >= threshold`.
///
/// `keys` is scratch: its contents are clobbered. With `k == 0` nothing is selected
/// (`u64::MAX`); with `k` at or above the number of candidates every candidate is selected
/// (threshold 1, above [`NOT_A_CANDIDATE`]).
///
/// Long slabs use a radix select: an 11-bit histogram of the keys' top bits finds the bucket
/// holding the k-th key, the keys of that bucket are compacted to the front, and the next 11
/// bits are examined, until few keys remain for `select_nth_unstable`. Each level is one pass
/// of plain loads and increments, so the whole selection costs about two passes over the slab.
#[inline]
pub fn threshold_key(keys: &mut [u64], k: usize) -> u64 {
    threshold_key_with(keys, k, &mut Histogram::default())
}

/// Bucket counts of the radix select, kept between calls so that they are not cleared for
/// every slab: every use leaves them all zero again. Two sets of bins, so that consecutive
/// keys can count into different memory and not wait on each other's increments.
#[derive(Debug, Clone)]
pub struct Histogram(Box<[u32; 2 << RADIX_BITS]>);

impl Default for Histogram {
    fn default() -> Self {
        Self(Box::new([0; 2 << RADIX_BITS]))
    }
}

/// [`threshold_key`] with a caller-owned (all-zero) histogram.
#[inline]
pub fn threshold_key_with(keys: &mut [u64], k: usize, hist: &mut Histogram) -> u64 {
    if k == 0 {
        return u64::MAX;
    }
    if k >= keys.len() {
        return 1;
    }
    // Bit 63 is always zero (scores are non-negative), so the levels start at bit 62.
    select_below(keys, k, 63, hist)
}

/// The `need`-th largest of `keys` (`1 <= need <= keys.len()`), which all agree above bit
/// `top`, at least 1.
pub(crate) fn select_below(keys: &mut [u64], need: usize, top: u32, hist: &mut Histogram) -> u64 {
    let hist = &mut *hist.0;
    let (mut len, mut need, mut top) = (keys.len(), need, top);
    while len > SMALL_SLAB && top > 0 {
        let (shift, width) = digit(top);
        let bucket = pick_bucket(&keys[..len], shift, width, &mut need, hist);
        // Branch-free compaction of the chosen bucket's keys to the front; the counts are
        // cleared on the way, leaving the histogram zero for the next level or call.
        let mut j = 0;
        for i in 0..len {
            let key = keys[i];
            let b = bucket_of(key, shift, width);
            hist[b] = 0;
            keys[j] = key;
            j += usize::from(b == bucket);
        }
        len = j;
        top = shift;
    }
    let (_, kth, _) = keys[..len].select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    (*kth).max(1)
}

/// [`threshold_key_with`] that leaves `keys` as they are, using `tmp` (at least as long as
/// `keys`) as scratch.
///
/// Made for slabs that are selected right after their keys are computed: the first digit
/// spans only the range of the candidate keys (so the bins are spread over the values that
/// occur rather than the whole exponent range), and the keys of the chosen bin are gathered
/// with branch-free range tests. It is inlined into its caller, so that a caller compiled
/// for wide vector units (see `multiversion!`) gets wide loops here too.
#[inline(always)]
pub fn threshold_key_preserving(
    keys: &[u64],
    k: usize,
    hist: &mut Histogram,
    tmp: &mut [u64],
) -> u64 {
    if k == 0 {
        return u64::MAX;
    }
    if k >= keys.len() {
        return 1;
    }
    if keys.len() <= SMALL_SLAB {
        let tmp = &mut tmp[..keys.len()];
        tmp.copy_from_slice(keys);
        return select_below(tmp, k, 63, hist);
    }
    let (lo, hi, candidates) = candidate_range(keys);
    if k >= candidates {
        return 1;
    }
    // The smallest shift that puts every candidate in the first BINS - 1 bins; the last bin
    // takes the non-candidates.
    let dummy = (1usize << RADIX_BITS) - 1;
    let mut shift = 0;
    while (hi >> shift) - (lo >> shift) >= dummy as u64 {
        shift += 1;
    }
    let base = lo >> shift;
    let top = ((hi >> shift) - base) as usize;
    // The bins first, in a loop of plain vector operations, then the counting alone.
    let bins = &mut tmp[..keys.len()];
    for (b, &key) in bins.iter_mut().zip(keys) {
        let d = (key >> shift).wrapping_sub(base) & dummy as u64;
        *b = if key == 0 { dummy as u64 } else { d };
    }
    let (h0, h1) = hist.0.split_at_mut(1 << RADIX_BITS);
    let pairs = bins.chunks_exact(2);
    if let [last] = pairs.remainder() {
        h0[*last as usize & dummy] += 1;
    }
    for p in pairs {
        h0[p[0] as usize & dummy] += 1;
        h1[p[1] as usize & dummy] += 1;
    }
    let (mut above, mut bucket) = (0usize, 0usize);
    for b in (0..=top).rev() {
        let c = (h0[b] + h1[b]) as usize;
        if above + c >= k {
            bucket = b;
            break;
        }
        above += c;
    }
    for h in [h0, h1] {
        h[..=top].fill(0);
        h[dummy] = 0;
    }
    let need = k - above;
    let blo = ((base + bucket as u64) << shift).max(1);
    let bhi = ((base + bucket as u64) << shift) + ((1u64 << shift) - 1);
    let n = gather_range(keys, blo, bhi, tmp);
    // A bin of equal scores (typically exact zeros): its keys, gathered in index order, are
    // already in descending key order.
    let score = tmp[0] >> 32;
    if tmp[..n].iter().fold(0, |d, &key| d | ((key >> 32) ^ score)) == 0 {
        return tmp[need - 1].max(1);
    }
    // The bin's keys agree above bit `shift`.
    select_below(&mut tmp[..n], need, shift, hist)
}

/// [`threshold_key_preserving`] that first tries `bracket`, a key range remembered from the
/// slab's previous selection: when the `k`-th largest key still lies in it, two counting
/// passes and the keys inside it are all the work. Otherwise it selects from scratch. Either
/// way `bracket` is then set around the new threshold (a relative margin on its score that
/// grows with how far the threshold moved), and the result is the same as without a
/// bracket: any bracket, `[0, 0]` included, is valid input.
#[inline(always)]
pub fn threshold_key_bracketed(
    keys: &[u64],
    k: usize,
    bracket: &mut [u64; 2],
    hist: &mut Histogram,
    tmp: &mut [u64],
) -> u64 {
    let thr = match bracketed(keys, k, *bracket, hist, tmp) {
        Some(t) => t,
        None => threshold_key_preserving(keys, k, hist, tmp),
    };
    *bracket = bracket_after(*bracket, thr);
    thr
}

/// A bracket's margin either side of its threshold's score, in score bits: at least about
/// 1.5 % of the score (the score's bits count 2^23 steps per doubling, so 2^17 of them are a
/// relative step of 2^-6 at any magnitude) ...
const MARGIN_MIN: u64 = 1 << 17;
/// ... and at most about 12 %.
const MARGIN_MAX: u64 = 1 << 20;

/// The bracket around threshold key `thr` with `margin` score bits either side (`[0, 0]`, no
/// bracket, for the select-nothing and select-everything thresholds): a key range whose ends
/// have zero low halves, so that "key at or above an end" depends on the score alone.
#[inline(always)]
fn bracket_with(thr: u64, margin: u64) -> [u64; 2] {
    if thr <= 1 || thr == u64::MAX {
        [0, 0]
    } else {
        let score = thr >> 32;
        [
            (score.saturating_sub(margin) << 32).max(1),
            (score + margin + 1) << 32,
        ]
    }
}

/// The bracket remembered around threshold key `thr` after a selection that had bracket
/// `old`: its margin twice the distance the threshold's score moved from `old`'s centre or
/// half `old`'s margin, whichever is more, within [`MARGIN_MIN`]..=[`MARGIN_MAX`] (the
/// least without an old bracket). Thresholds that move between refreshes, as they do in
/// training, then tend to stay in their brackets, at the price of more keys inside them;
/// steady ones return to narrow brackets.
#[inline(always)]
pub(crate) fn bracket_after(old: [u64; 2], thr: u64) -> [u64; 2] {
    let center = bracket_center(old) >> 32;
    let margin = if center == 0 {
        MARGIN_MIN
    } else {
        let old_margin = (old[1] >> 32).saturating_sub(old[0] >> 32) / 2;
        (2 * (thr >> 32).abs_diff(center))
            .max(old_margin / 2)
            .clamp(MARGIN_MIN, MARGIN_MAX)
    };
    bracket_with(thr, margin)
}

/// The lowest key with the score of the threshold a bracket from [`bracket_after`] was built
/// around (0 for no bracket).
#[inline(always)]
pub(crate) fn bracket_center([lo, hi]: [u64; 2]) -> u64 {
    let (lo, hi) = (lo >> 32, hi >> 32);
    if hi == 0 {
        0
    } else if lo == 0 {
        // The low end was cut at zero: taken as the least margin (a guess; no selection's
        // result depends on it).
        hi.saturating_sub(MARGIN_MIN + 1) << 32
    } else {
        ((lo + hi) / 2) << 32
    }
}

/// The threshold if the `k`-th largest key lies in `lo..hi`.
#[inline(always)]
fn bracketed(
    keys: &[u64],
    k: usize,
    [lo, hi]: [u64; 2],
    hist: &mut Histogram,
    tmp: &mut [u64],
) -> Option<u64> {
    if k == 0 || k >= keys.len() || lo == 0 || lo >= hi {
        return None;
    }
    let (mut above_hi, mut above_lo) = (0usize, 0usize);
    for &key in keys {
        above_hi += usize::from(key >= hi);
        above_lo += usize::from(key >= lo);
    }
    if !(above_hi < k && k <= above_lo) {
        return None;
    }
    let n = gather_range(keys, lo, hi - 1, tmp);
    let need = k - above_hi;
    let score = tmp[0] >> 32;
    if tmp[..n].iter().fold(0, |d, &key| d | ((key >> 32) ^ score)) == 0 {
        return Some(tmp[need - 1]);
    }
    Some(select_below(&mut tmp[..n], need, 63, hist))
}

/// The smallest and largest candidate (non-zero) key and the number of candidates.
#[inline(always)]
fn candidate_range(keys: &[u64]) -> (u64, u64, usize) {
    let (mut lo, mut hi, mut n) = (u64::MAX, 0u64, 0usize);
    for &key in keys {
        let z = key == 0;
        lo = lo.min(if z { u64::MAX } else { key });
        hi = hi.max(key);
        n += usize::from(!z);
    }
    (lo, hi, n)
}

/// Copies the keys in `lo..=hi` to the front of `out` (in order); returns how many.
#[inline(always)]
fn gather_range(keys: &[u64], lo: u64, hi: u64, out: &mut [u64]) -> usize {
    let mut j = 0;
    for (ci, chunk) in keys.chunks(64).enumerate() {
        let mut bits = 0u64;
        for (b, &key) in chunk.iter().enumerate() {
            bits |= u64::from((key >= lo) & (key <= hi)) << b;
        }
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            out[j] = keys[ci * 64 + b];
            j += 1;
        }
    }
    j
}

/// Shift and width of the radix digit just below bit `top`.
#[inline(always)]
fn digit(top: u32) -> (u32, u32) {
    let shift = top.saturating_sub(RADIX_BITS);
    (shift, top - shift)
}

/// Counts `keys` by digit into `hist` and returns the bucket holding the `need`-th largest
/// key; `need` becomes its rank within that bucket. The counts are left for the caller to
/// clear.
#[inline(always)]
fn pick_bucket(keys: &[u64], shift: u32, width: u32, need: &mut usize, hist: &mut [u32]) -> usize {
    for &key in keys {
        hist[bucket_of(key, shift, width)] += 1;
    }
    let mut above = 0usize;
    let mut bucket = 0;
    for b in (0..1usize << width).rev() {
        let h = hist[b] as usize;
        if above + h >= *need {
            bucket = b;
            break;
        }
        above += h;
    }
    *need -= above;
    bucket
}

/// The `width`-bit digit of `key` starting at bit `shift` (always below `1 << RADIX_BITS`).
#[inline(always)]
fn bucket_of(key: u64, shift: u32, width: u32) -> usize {
    ((key >> shift) as usize) & ((1usize << width) - 1) & ((1 << RADIX_BITS) - 1)
}

const RADIX_BITS: u32 = 11;
/// Slabs this short go straight to `select_nth_unstable` (only permuted, never compacted).
pub(crate) const SMALL_SLAB: usize = 384;

/// Indices (ascending) of the `k` largest `scores`, ties toward the lower index.
///
/// A convenience over [`key_of`] and [`threshold_key`] for whole-slab selections; `keys`
/// is scratch that is reused between calls.
pub fn select_top_k(scores: &[f32], k: usize, keys: &mut Vec<u64>) -> Vec<usize> {
    keys.clear();
    keys.extend(scores.iter().enumerate().map(|(i, &s)| key_of(s, i)));
    let thr = threshold_key(keys, k);
    scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| key_of(s, i) >= thr)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn margin([lo, hi]: [u64; 2]) -> u64 {
        ((hi >> 32) - (lo >> 32) - 1) / 2
    }

    /// Brackets widen to twice a threshold's move, hold a repeat of that move, shrink by half
    /// while the threshold stays put, and keep within their bounds.
    #[test]
    fn brackets_follow_how_far_thresholds_move() {
        let key = |score: u64| (score << 32) | 77;
        let s = 0x3f00_0000u64; // a score far from zero
                                // No old bracket: the least margin.
        let b = bracket_after([0, 0], key(s));
        assert_eq!(b, bracket_with(key(s), MARGIN_MIN));
        assert_eq!(margin(b), MARGIN_MIN);
        assert_eq!(bracket_center(b), s << 32);
        // A move of 3 * 2^17 score bits: the margin is twice that, and the same move again
        // stays inside.
        let d = 3 * MARGIN_MIN;
        let b = bracket_after(b, key(s + d));
        assert_eq!(margin(b), 2 * d);
        assert_eq!(bracket_center(b), (s + d) << 32);
        assert!(b[0] <= key(s + 2 * d) && key(s + 2 * d) < b[1]);
        assert!(b[0] <= key(s) && key(s) < b[1]);
        // Standing still: half the margin each time, down to the least.
        let b = bracket_after(b, key(s + d));
        assert_eq!(margin(b), d);
        let mut b = b;
        for _ in 0..8 {
            b = bracket_after(b, key(s + d));
        }
        assert_eq!(margin(b), MARGIN_MIN);
        // A huge move: the most.
        let b = bracket_after(b, key(s + 100 * MARGIN_MAX));
        assert_eq!(margin(b), MARGIN_MAX);
        // Select-nothing and select-everything thresholds have no bracket.
        assert_eq!(bracket_after(b, u64::MAX), [0, 0]);
        assert_eq!(bracket_after(b, 1), [0, 0]);
    }
}
