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
#[inline]
pub fn key_of(score: f32, index: usize) -> u64 {
    debug_assert!(index < u32::MAX as usize);
    let s = if score > 0.0 { score } else { 0.0 };
    ((s.to_bits() as u64) << 32) | (u32::MAX as u64 - index as u64)
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
pub fn threshold_key(keys: &mut [u64], k: usize) -> u64 {
    if k == 0 {
        return u64::MAX;
    }
    if k >= keys.len() {
        return 1;
    }
    let (mut len, mut need) = (keys.len(), k);
    let mut hist = [0u32; 1 << RADIX_BITS];
    // Bit 63 is always zero (scores are non-negative), so the levels start at bit 62.
    let mut top: u32 = 63;
    while len > SMALL_SLAB && top > 0 {
        let shift = top.saturating_sub(RADIX_BITS);
        let mask = (1u64 << (top - shift)) - 1;
        hist.fill(0);
        for &key in &keys[..len] {
            hist[((key >> shift) & mask) as usize] += 1;
        }
        let mut above = 0usize;
        let mut bucket = 0;
        for b in (0..=mask as usize).rev() {
            let h = hist[b] as usize;
            if above + h >= need {
                bucket = b as u64;
                break;
            }
            above += h;
        }
        need -= above;
        let mut j = 0;
        for i in 0..len {
            let key = keys[i];
            if (key >> shift) & mask == bucket {
                keys[j] = key;
                j += 1;
            }
        }
        len = j;
        top = shift;
    }
    let (_, kth, _) = keys[..len].select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    (*kth).max(1)
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
