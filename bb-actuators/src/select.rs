//! O(n) top-k selection with a deterministic tie-break.
//!
//! Every candidate entry of a slab becomes one `u64` key: the bits of its (non-negative)
//! score in the high half and `u32::MAX - index` in the low half. Keys are then unique and
//! ordered by (score descending, index ascending), so "the k largest keys" is exactly
//! "the k largest scores, ties toward the lower index", and one `select_nth_unstable`
//! finds the threshold key in O(n) without sorting.

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
/// every slab: every use leaves them all zero again.
#[derive(Debug, Clone)]
pub struct Histogram(Box<[u32; 1 << RADIX_BITS]>);

impl Default for Histogram {
    fn default() -> Self {
        Self(Box::new([0; 1 << RADIX_BITS]))
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
    let hist = &mut *hist.0;
    let (mut len, mut need) = (keys.len(), k);
    // Bit 63 is always zero (scores are non-negative), so the levels start at bit 62.
    let mut top: u32 = 63;
    while len > SMALL_SLAB && top > 0 {
        let shift = top.saturating_sub(RADIX_BITS);
        let width = top - shift;
        for &key in &keys[..len] {
            hist[bucket_of(key, shift, width)] += 1;
        }
        let mut above = 0usize;
        let mut bucket = 0;
        for b in (0..1usize << width).rev() {
            let h = hist[b] as usize;
            if above + h >= need {
                bucket = b;
                break;
            }
            above += h;
        }
        need -= above;
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

/// The `width`-bit digit of `key` starting at bit `shift` (always below `1 << RADIX_BITS`).
#[inline(always)]
fn bucket_of(key: u64, shift: u32, width: u32) -> usize {
    ((key >> shift) as usize) & ((1usize << width) - 1) & ((1 << RADIX_BITS) - 1)
}

const RADIX_BITS: u32 = 11;
const SMALL_SLAB: usize = 384;

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
