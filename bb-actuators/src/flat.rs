//! The fused refresh of plain matrices (one weight per edge), on 32-bit score bits.
//!
//! An edge's score is the magnitude of its weight if live, of its shadow value if dead
//! (without regrowth dead edges are not candidates, and the shadow is not read at all); the
//! magnitude's bits, as a `u32`, order like the score, and a vector holds twice as many of
//! them as of the 64-bit selection keys. Every slab remembers the key range its threshold
//! fell in at the last refresh (its bracket, see [`crate::select`]).
//!
//! * **Rows (SP-in)**: one pass over a row's weights and shadow values writes its score bits,
//!   counts them against the bracket and keeps the few keys inside it. When the threshold is
//!   still in the bracket those keys are all that is selected among, and the new mask is
//!   the edges above the bracket (noted while scoring) plus those inside it at or above the
//!   threshold. Otherwise the row's 64-bit keys are built from the bits, selected from
//!   scratch, and a pass over the bits (still in cache) rebuilds the mask words. Either way
//!   the weights of edges that changed state are then moved.
//! * **Columns (SP-out)**: one streaming pass over all rows, two at a time, scores every
//!   column against its own bracket and keeps the keys inside; columns whose threshold left
//!   the bracket are gathered and selected from scratch. A second pass rebuilds every row
//!   against the columns' thresholds.
//!
//! The per-word loops are [`Kernels`]: portable code that the compiler vectorizes, and on
//! x86-64 CPUs with AVX-512 a version that reads mask words straight into vector lane masks.
//! Both give the same bits, and the results are those of the separate steps bit for bit.

use crate::actuator::{workers, ActuatorScratch};
use crate::fused::{add, sync_row};
use crate::select::{
    bracket_after, bracket_center, select_below, threshold_key_preserving, Histogram, SMALL_SLAB,
};
use crate::SyncStats;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
use avx2::Avx2;

/// The per-word loops of the refresh. `word` is a mask word, `w`/`h`/`bits` the (up to 64)
/// weights, shadow values and score bits of its columns, `c0` its first column.
trait Kernels {
    /// Scores a row (mask words `words`, values `w` and `h`, `w.len()` columns) word by
    /// word as [`Portable::score`] does: the score bits to `bits`, each word's edges at or
    /// above `hi` to `keys` (one word each), and the keys of the edges inside `lo..hi`
    /// (`bits << 32 | (u32::MAX - column)`) to `tmp`, in column order. Needs `lo <= hi`.
    #[allow(clippy::too_many_arguments)]
    fn score_row(
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        lo: u32,
        hi: u32,
        bits: &mut [u32],
        keys: &mut [u64],
        tmp: &mut [u64],
    ) -> RowScore;
    /// Which of the word's edges have keys at or above the threshold with score bits `ts`
    /// and index `ti`: bits above `ts`, or equal to it at a column no later than `ti`.
    fn select(bits: &[u32], c0: u32, ts: u32, ti: u32) -> u64;
    /// Which of the word's edges have score bits `>= lo`.
    fn at_least(bits: &[u32], lo: u32) -> u64;
    /// Columns: [`Portable::count_columns`] on every word of `N` rows (mask words `words`,
    /// `cols.div_ceil(64)` per row; values `w`/`h`, `cols` per row) against the columns'
    /// brackets `cut`: the edges at or above their column's bracket go to `pre` (one word
    /// per mask word), the keys inside it (rows' low key halves `key_rows`) to `keys`.
    /// Returns whether a scored value is non-finite (the other results are then
    /// unspecified).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn count_words<const N: usize>(
        cols: usize,
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        cut: Cuts<'_>,
        pre: &mut [u64],
        key_rows: [u64; N],
        keys: &mut Inside<'_>,
    ) -> bool {
        let mut bits = [[0u32; 64]; N];
        (0..cols.div_ceil(64)).any(|wi| {
            let cut = (cut.lo, cut.hi, &mut bits);
            count_word::<N>(cols, wi, words, w, h, regrow, cut, pre, key_rows, keys)
        })
    }
    /// Columns: the new mask word of row `r`, each column `j` against its own threshold
    /// (score bits `ts[j]`, row `ti[j]`), for the columns in `need` (the others' bits are
    /// unspecified, and their values need not be read).
    #[allow(clippy::too_many_arguments)]
    fn select_columns(
        word: u64,
        w: &[f32],
        h: &[f32],
        regrow: bool,
        r: u32,
        ts: &[u32],
        ti: &[u32],
        need: u64,
    ) -> u64;
}

/// SP-out's bracket ends for the counting pass: per column the low and high end (`lo`,
/// `hi`, score bits), and the same ends as signed bounds (`lo_gt`, `hi_gt`, see
/// [`at_least_bound`]) for kernels whose lanes compare signed.
#[derive(Clone, Copy)]
pub(crate) struct Cuts<'a> {
    lo: &'a [u32],
    hi: &'a [u32],
    lo_gt: &'a [i32],
    hi_gt: &'a [i32],
}

impl<'a> Cuts<'a> {
    /// From `[lo; cols]` then `[hi; cols]` in `cut`, and their signed bounds in the same
    /// layout in `gt`.
    fn new(cut: &'a [u32], gt: &'a [i32], cols: usize) -> Self {
        let (lo, hi) = cut[..2 * cols].split_at(cols);
        let (lo_gt, hi_gt) = gt[..2 * cols].split_at(cols);
        Cuts {
            lo,
            hi,
            lo_gt,
            hi_gt,
        }
    }
}

/// The signed bound `t` such that, for score bits `s` (at most `i32::MAX`), `s as i32 > t`
/// is `s >= lo` (for any `u32` `lo`).
#[inline(always)]
fn at_least_bound(lo: u32) -> i32 {
    lo.min(0x8000_0000).wrapping_sub(1) as i32
}

/// One word's edges against a bracket `lo..hi`, from [`Portable::score`].
struct WordScore {
    /// Whether a scored value is non-finite.
    non_finite: bool,
    /// How many score bits are `>= hi`.
    above_hi: u32,
    /// Which edges have bits `>= hi` (all candidates, as `hi > 0`).
    high: u64,
    /// Which edges have bits in `lo..hi`.
    inside: u64,
}

/// A row's edges against a bracket `lo..hi`, from [`Kernels::score_row`].
#[derive(Default)]
struct RowScore {
    /// Whether a scored value is non-finite (the other fields are then unspecified).
    non_finite: bool,
    /// How many score bits are `>= hi`.
    above_hi: usize,
    /// How many keys inside the bracket went to the list (with `above_hi`, the bits
    /// `>= lo`).
    inside: usize,
}

/// Writes the keys of word `wi`'s edges in `inside` (score bits `bc`) to `tmp` from `n`
/// on, in column order; returns the list's new length.
#[inline(always)]
fn log_inside(mut inside: u64, wi: usize, bc: &[u32], tmp: &mut [u64], mut n: usize) -> usize {
    while inside != 0 {
        let j = inside.trailing_zeros() as usize;
        inside &= inside - 1;
        let c = wi * 64 + j;
        tmp[n] = (u64::from(bc[j]) << 32) | (u64::from(u32::MAX) - c as u64);
        n += 1;
    }
    n
}

/// The score bits of an edge from its live bit (all ones or zero), weight and shadow
/// value, and whether the value scored is non-finite; 0 (and finite) for a non-candidate,
/// whose values are not looked at.
#[inline(always)]
fn lane(live: u32, cand: u32, x: f32, y: f32) -> (u32, bool) {
    let v = (x.to_bits() & live) | (y.to_bits() & !live);
    (
        v & 0x7fff_ffff & cand,
        (v & 0x7f80_0000 == 0x7f80_0000) & (cand != 0),
    )
}

/// [`Kernels::count_columns`] for one row, in plain loops.
#[inline(always)]
fn count_row(
    word: u64,
    w: &[f32],
    h: &[f32],
    regrow: bool,
    lo: &[u32],
    hi: &[u32],
    bits: &mut [u32; 64],
) -> (bool, u64, u64) {
    let all = u32::from(regrow).wrapping_neg();
    let h = if regrow { h } else { w };
    let (mut bad, mut inr, mut high) = (0u32, 0u64, 0u64);
    for (half, range) in [(0, 0..32), (1, 32..64)] {
        let end = range.end.min(w.len());
        if range.start >= end {
            break;
        }
        let live32 = (word >> (32 * half)) as u32;
        let (mut m, mut g) = (0u32, 0u32);
        for (b, c) in (range.start..end).enumerate() {
            let live = ((live32 >> b) & 1).wrapping_neg();
            let (s, nf) = lane(live, live | all, w[c], h[c]);
            bad |= u32::from(nf);
            bits[c] = s;
            let (a, z) = (s >= lo[c], s >= hi[c]);
            m |= u32::from(a & !z) << b;
            g |= u32::from(z) << b;
        }
        inr |= u64::from(m) << (32 * half);
        high |= u64::from(g) << (32 * half);
    }
    (bad != 0, inr, high)
}

/// Plain loops, vectorized by the compiler for whatever the build targets.
struct Portable;

impl Portable {
    /// Writes the score bits of one word's edges (0 for a non-candidate) and returns what
    /// it found against the bracket `lo..hi`.
    #[inline(always)]
    fn score(
        word: u64,
        w: &[f32],
        h: &[f32],
        regrow: bool,
        lo: u32,
        hi: u32,
        bits: &mut [u32],
    ) -> WordScore {
        let all = u32::from(regrow).wrapping_neg();
        // Without regrowth dead edges are not candidates: their shadow values are not read.
        let h = if regrow { h } else { w };
        let (mut bad, mut above_hi, mut inside) = (0u32, 0u32, 0u64);
        let mut high = 0u64;
        for (half, ((bh, wh), hh)) in bits
            .chunks_mut(32)
            .zip(w.chunks(32))
            .zip(h.chunks(32))
            .enumerate()
        {
            let live32 = (word >> (32 * half)) as u32;
            let (mut m, mut zm) = (0u32, 0u32);
            for (b, ((o, &x), &y)) in bh.iter_mut().zip(wh).zip(hh).enumerate() {
                let live = ((live32 >> b) & 1).wrapping_neg();
                let (s, nf) = lane(live, live | all, x, y);
                bad |= u32::from(nf);
                *o = s;
                let (a, z) = (s >= lo, s >= hi);
                above_hi += u32::from(z);
                m |= u32::from(a & !z) << b;
                zm |= u32::from(z) << b;
            }
            inside |= u64::from(m) << (32 * half);
            high |= u64::from(zm) << (32 * half);
        }
        WordScore {
            non_finite: bad != 0,
            above_hi,
            high,
            inside,
        }
    }

    /// Columns: scores the same word of `N` rows (mask words `words`, values `w`/`h`) into
    /// `bits` and returns for each row whether a scored value is non-finite, which columns
    /// lie in their `lo[j]..hi[j]` and which reach their `hi[j]`. Several rows at once
    /// share the loads of the columns' bracket ends.
    #[inline(always)]
    fn count_columns<const N: usize>(
        words: [u64; N],
        w: [&[f32]; N],
        h: [&[f32]; N],
        regrow: bool,
        lo: &[u32],
        hi: &[u32],
        bits: &mut [[u32; 64]; N],
    ) -> [(bool, u64, u64); N] {
        std::array::from_fn(|n| count_row(words[n], w[n], h[n], regrow, lo, hi, &mut bits[n]))
    }
}

/// [`Portable::count_columns`] on word `wi` of `N` rows (the columns' bracket ends and a
/// buffer for the score bits in `cut`), the results handled as [`Kernels::count_words`]
/// does; returns whether a scored value is non-finite.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn count_word<const N: usize>(
    cols: usize,
    wi: usize,
    words: &[u64],
    w: &[f32],
    h: &[f32],
    regrow: bool,
    cut: (&[u32], &[u32], &mut [[u32; 64]; N]),
    pre: &mut [u64],
    key_rows: [u64; N],
    keys: &mut Inside<'_>,
) -> bool {
    let (lo, hi, bits) = cut;
    let wpr = cols.div_ceil(64);
    let (c0, c1) = (wi * 64, (wi * 64 + 64).min(cols));
    keys.reserve(N);
    let got = Portable::count_columns::<N>(
        std::array::from_fn(|n| words[n * wpr + wi]),
        std::array::from_fn(|n| &w[n * cols + c0..n * cols + c1]),
        std::array::from_fn(|n| &h[n * cols + c0..n * cols + c1]),
        regrow,
        &lo[c0..c1],
        &hi[c0..c1],
        bits,
    );
    for (n, &(bad, inside, high)) in got.iter().enumerate() {
        if bad {
            return true;
        }
        pre[n * wpr + wi] = high;
        keys.stage(c0, inside, &bits[n], key_rows[n]);
    }
    false
}

impl Kernels for Portable {
    #[inline(always)]
    fn score_row(
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        lo: u32,
        hi: u32,
        bits: &mut [u32],
        keys: &mut [u64],
        tmp: &mut [u64],
    ) -> RowScore {
        let mut rs = RowScore::default();
        for (wi, (&word, ((bc, wc), hc))) in words
            .iter()
            .zip(bits.chunks_mut(64).zip(w.chunks(64)).zip(h.chunks(64)))
            .enumerate()
        {
            let ws = Portable::score(word, wc, hc, regrow, lo, hi, bc);
            rs.non_finite |= ws.non_finite;
            rs.above_hi += ws.above_hi as usize;
            keys[wi] = ws.high;
            rs.inside = log_inside(ws.inside, wi, bc, tmp, rs.inside);
        }
        rs
    }

    #[inline(always)]
    fn select(bits: &[u32], c0: u32, ts: u32, ti: u32) -> u64 {
        let mut sel = 0u64;
        for (half, bh) in bits.chunks(32).enumerate() {
            let mut m = 0u32;
            for (b, &s) in bh.iter().enumerate() {
                let c = c0 + (32 * half + b) as u32;
                m |= u32::from((s > ts) | ((s == ts) & (c <= ti))) << b;
            }
            sel |= u64::from(m) << (32 * half);
        }
        sel
    }

    #[inline(always)]
    fn at_least(bits: &[u32], lo: u32) -> u64 {
        let mut m = 0u64;
        for (half, bh) in bits.chunks(32).enumerate() {
            let mut x = 0u32;
            for (b, &s) in bh.iter().enumerate() {
                x |= u32::from(s >= lo) << b;
            }
            m |= u64::from(x) << (32 * half);
        }
        m
    }

    #[inline(always)]
    fn select_columns(
        word: u64,
        w: &[f32],
        h: &[f32],
        regrow: bool,
        r: u32,
        ts: &[u32],
        ti: &[u32],
        _need: u64,
    ) -> u64 {
        let all = u32::from(regrow).wrapping_neg();
        let h = if regrow { h } else { w };
        let mut sel = 0u64;
        for (half, range) in [(0, 0..32), (1, 32..64)] {
            let end = range.end.min(w.len());
            if range.start >= end {
                break;
            }
            let live32 = (word >> (32 * half)) as u32;
            let mut m = 0u32;
            for (b, c) in (range.start..end).enumerate() {
                let live = ((live32 >> b) & 1).wrapping_neg();
                let (s, _) = lane(live, live | all, w[c], h[c]);
                m |= u32::from((s > ts[c]) | ((s == ts[c]) & (r <= ti[c]))) << b;
            }
            sel |= u64::from(m) << (32 * half);
        }
        sel & (word | u64::from(regrow).wrapping_neg())
    }
}

/// Asks for the cache line [`PREFETCH_AHEAD`] values past `w[at]` (and `h[at]` when the
/// shadow is read): the row loops' selection work between loads leaves the hardware
/// prefetchers behind (about 15 % of a 4096x4096 SP-in refresh on the build machine).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(w: &[f32], h: &[f32], shadow: bool, at: usize) {
    use std::arch::x86_64::*;
    // SAFETY: a prefetch never faults, and the address is only computed (wrapping), not
    // dereferenced.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(at + PREFETCH_AHEAD).cast());
        if shadow {
            _mm_prefetch::<_MM_HINT_T0>(h.as_ptr().wrapping_add(at + PREFETCH_AHEAD).cast());
        }
    }
}

/// Asks for `lines` cache lines from `p` on (an address only computed, never read here).
#[inline(always)]
fn prefetch_lines(p: *const u64, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in 0..lines {
        use std::arch::x86_64::*;
        // SAFETY: a prefetch never faults; the address is computed with wrapping arithmetic.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(8 * i).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}

/// How far ahead [`prefetch_ahead`] reaches, in values (4 KiB).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 1024;

/// The 16 values from `at` of a word's edges: weights where `live` has a bit, shadow values
/// elsewhere with regrowth (without it dead edges are not candidates: zero, and the shadow is
/// not read).
///
/// # Safety
/// `w` and `h` hold at least `at + 16` values; only for code compiled with `avx512f`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_values(
    w: &[f32],
    h: &[f32],
    at: usize,
    live: u16,
    regrow: bool,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract (16 values from `at` in both slices, AVX-512F).
    unsafe {
        if regrow {
            let x = _mm512_loadu_epi32(w.as_ptr().add(at).cast());
            let y = _mm512_loadu_epi32(h.as_ptr().add(at).cast());
            _mm512_mask_blend_epi32(live, y, x)
        } else {
            _mm512_maskz_loadu_epi32(live, w.as_ptr().add(at).cast())
        }
    }
}

/// The four 16-bit lane masks of a word's vectors as one word, joined in mask registers.
///
/// # Safety
/// Only for code compiled with `avx512bw` (see [`rows_flat_block`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn join(m: [u16; 4]) -> u64 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        _mm512_kunpackd(
            u64::from(_mm512_kunpackw(u32::from(m[3]), u32::from(m[2]))),
            u64::from(_mm512_kunpackw(u32::from(m[1]), u32::from(m[0]))),
        )
    }
}

/// Checks the slices of a vector kernel's [`Kernels::score_row`] for a row of `cols` edges
/// (`h` the values scored for dead edges).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn check_row(words: &[u64], h: &[f32], bits: &[u32], keys: &[u64], tmp: &[u64], cols: usize) {
    let wpr = cols.div_ceil(64);
    assert!(
        words.len() >= wpr
            && h.len() >= cols
            && bits.len() >= cols
            && keys.len() >= wpr
            && tmp.len() >= cols,
        "score_row: short slices"
    );
}

/// The end of a vector kernel's [`Kernels::score_row`]: the row's partial last word, if it
/// has one, through [`Portable::score`] against the bracket `cut`, added to what the whole
/// words gave (`rs`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn score_tail(
    words: &[u64],
    w: &[f32],
    h: &[f32],
    dead: bool,
    cut: (u32, u32),
    bits: &mut [u32],
    keys: &mut [u64],
    tmp: &mut [u64],
    mut rs: RowScore,
) -> RowScore {
    let (cols, full) = (w.len(), w.len() / 64);
    if 64 * full < cols {
        let at = 64 * full;
        let bc = &mut bits[at..cols];
        let ws = Portable::score(words[full], &w[at..], &h[at..cols], dead, cut.0, cut.1, bc);
        rs.non_finite |= ws.non_finite;
        rs.above_hi += ws.above_hi as usize;
        keys[full] = ws.high;
        rs.inside = log_inside(ws.inside, full, bc, tmp, rs.inside);
    }
    rs
}

/// AVX-512 versions: a mask word's 16-bit quarters are the lane masks of four vectors.
/// Only called from code compiled with `avx512f` and `avx512bw` (see [`rows_flat_block`]),
/// whose mask instructions join the four quarters into a word; partial words
/// (the end of a row whose length is not a multiple of 64) go to [`Portable`].
#[cfg(target_arch = "x86_64")]
struct Avx512;

/// [`Kernels::score_row`] for [`Avx512`], with regrowth (`DEAD`: dead edges are scored by
/// their shadow values) or without, in one loop over the row's whole words (no slices cut
/// per word). The edges inside the bracket are those at or above `lo` and not above `hi`,
/// counted as the keys listed; a non-finite value is looked for once, at the end, in the
/// largest score bits seen (a value's bits reach those of infinity only when it is not
/// finite). Only called from code compiled with `avx512f` and `avx512bw`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn avx512_score_row<const DEAD: bool>(
    words: &[u64],
    w: &[f32],
    h: &[f32],
    lo: u32,
    hi: u32,
    bits: &mut [u32],
    keys: &mut [u64],
    tmp: &mut [u64],
) -> RowScore {
    use std::arch::x86_64::*;
    debug_assert!(lo <= hi, "score_row: bracket {lo}..{hi}");
    let cols = w.len();
    let full = cols / 64;
    // Without regrowth dead edges are not candidates: their shadow values are not read.
    let h = if DEAD { h } else { w };
    check_row(words, h, bits, keys, tmp, cols);
    let (mut above_hi, mut n) = (0usize, 0usize);
    // SAFETY: the lengths were checked above (for `wi < full`, `at + 16 <= 64 * full <=
    // cols`, so `load_values` has 16 values from `at` and `bits` room for 16); AVX-512F and
    // BW are the caller's contract.
    let top = unsafe {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let (vlo, vhi) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(hi as i32));
        let mut top = _mm512_setzero_si512();
        for wi in 0..full {
            let word = *words.get_unchecked(wi);
            let (mut z, mut inside) = ([0u16; 4], [0u16; 4]);
            for q in 0..4 {
                let at = 64 * wi + 16 * q;
                prefetch_ahead(w, h, DEAD, at);
                // Without regrowth the dead lanes load as zero (non-candidates' bits).
                let v = load_values(w, h, at, (word >> (16 * q)) as u16, DEAD);
                let sv = _mm512_and_si512(v, abs);
                top = _mm512_max_epu32(top, sv);
                _mm512_storeu_epi32(bits.as_mut_ptr().add(at).cast(), sv);
                z[q] = _mm512_cmpge_epu32_mask(sv, vhi);
                inside[q] = _mm512_cmpge_epu32_mask(sv, vlo) & !z[q];
            }
            let high = join(z);
            *keys.get_unchecked_mut(wi) = high;
            above_hi += high.count_ones() as usize;
            let inside = join(inside);
            if inside != 0 {
                n = log_inside(inside, wi, &bits[64 * wi..64 * wi + 64], tmp, n);
            }
        }
        top
    };
    let rs = RowScore {
        // SAFETY: AVX-512F is the caller's contract.
        non_finite: unsafe { _mm512_cmpge_epu32_mask(top, _mm512_set1_epi32(0x7f80_0000)) } != 0,
        above_hi,
        inside: n,
    };
    score_tail(words, w, h, DEAD, (lo, hi), bits, keys, tmp, rs)
}

#[cfg(target_arch = "x86_64")]
impl Kernels for Avx512 {
    #[inline(always)]
    fn score_row(
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        lo: u32,
        hi: u32,
        bits: &mut [u32],
        keys: &mut [u64],
        tmp: &mut [u64],
    ) -> RowScore {
        if regrow {
            avx512_score_row::<true>(words, w, h, lo, hi, bits, keys, tmp)
        } else {
            avx512_score_row::<false>(words, w, h, lo, hi, bits, keys, tmp)
        }
    }

    #[inline(always)]
    fn select(bits: &[u32], c0: u32, ts: u32, ti: u32) -> u64 {
        use std::arch::x86_64::*;
        if bits.len() < 64 {
            return Portable::select(bits, c0, ts, ti);
        }
        let mut sel = [0u16; 4];
        // SAFETY: `bits` holds at least 64 values; AVX-512F and BW are the caller's contract.
        unsafe {
            let (vts, vti) = (_mm512_set1_epi32(ts as i32), _mm512_set1_epi32(ti as i32));
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            for (q, k) in sel.iter_mut().enumerate() {
                let s = _mm512_loadu_epi32(bits.as_ptr().add(16 * q).cast());
                let c = _mm512_add_epi32(_mm512_set1_epi32((c0 + 16 * q as u32) as i32), iota);
                let eq = _mm512_cmpeq_epi32_mask(s, vts);
                *k = _mm512_cmpgt_epu32_mask(s, vts) | _mm512_mask_cmple_epu32_mask(eq, c, vti);
            }
            join(sel)
        }
    }

    #[inline(always)]
    fn at_least(bits: &[u32], lo: u32) -> u64 {
        use std::arch::x86_64::*;
        if bits.len() < 64 {
            return Portable::at_least(bits, lo);
        }
        let mut m = [0u16; 4];
        // SAFETY: `bits` holds at least 64 values; AVX-512F and BW are the caller's contract.
        unsafe {
            let vlo = _mm512_set1_epi32(lo as i32);
            for (q, k) in m.iter_mut().enumerate() {
                let s = _mm512_loadu_epi32(bits.as_ptr().add(16 * q).cast());
                *k = _mm512_cmpge_epu32_mask(s, vlo);
            }
            join(m)
        }
    }

    #[inline(always)]
    fn count_words<const N: usize>(
        cols: usize,
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        cut: Cuts<'_>,
        pre: &mut [u64],
        key_rows: [u64; N],
        keys: &mut Inside<'_>,
    ) -> bool {
        use std::arch::x86_64::*;
        let (lo, hi) = (cut.lo, cut.hi);
        let (wpr, full) = (cols.div_ceil(64), cols / 64);
        let h = if regrow { h } else { w };
        assert!(
            words.len() >= N * wpr
                && w.len().min(h.len()) >= N * cols
                && lo.len().min(hi.len()) >= cols
                && pre.len() >= N * wpr,
            "count_words: short slices"
        );
        // The steps of [`Portable::count_columns`] on every whole word of the rows in one
        // loop (no slices cut per word); a non-finite value is looked for once, at the end.
        let mut bad = 0u16;
        let mut bits = [[0u32; 64]; N];
        // SAFETY: the lengths were checked above (every index below is under them:
        // `wi < full <= wpr`, `at + 16 <= 64 * full <= cols`, so `load_values` has 16 values
        // from `n * cols + at`); AVX-512F and BW are the caller's contract.
        unsafe {
            let exp = _mm512_set1_epi32(0x7f80_0000);
            let abs = _mm512_set1_epi32(0x7fff_ffff);
            for wi in 0..full {
                keys.reserve(N);
                let (mut above, mut high) = ([[0u16; 4]; N], [[0u16; 4]; N]);
                for q in 0..4 {
                    let at = 64 * wi + 16 * q;
                    let l = _mm512_loadu_epi32(lo.as_ptr().add(at).cast());
                    let u = _mm512_loadu_epi32(hi.as_ptr().add(at).cast());
                    for n in 0..N {
                        let live = (*words.get_unchecked(n * wpr + wi) >> (16 * q)) as u16;
                        let cand = if regrow { u16::MAX } else { live };
                        prefetch_ahead(w, h, regrow, n * cols + at);
                        let v = load_values(w, h, n * cols + at, live, regrow);
                        let sv = _mm512_maskz_and_epi32(cand, v, abs);
                        // A candidate is non-finite when its magnitude's bits reach those
                        // of infinity.
                        bad |= _mm512_cmpge_epu32_mask(sv, exp);
                        _mm512_storeu_epi32(bits[n].as_mut_ptr().add(16 * q).cast(), sv);
                        above[n][q] = _mm512_cmpge_epu32_mask(sv, l);
                        high[n][q] = _mm512_cmpge_epu32_mask(sv, u);
                    }
                }
                for n in 0..N {
                    let (a, z) = (join(above[n]), join(high[n]));
                    *pre.get_unchecked_mut(n * wpr + wi) = z;
                    keys.stage(64 * wi, a & !z, &bits[n], key_rows[n]);
                }
            }
        }
        if bad != 0 {
            return true;
        }
        if full == wpr {
            return false;
        }
        // The partial last word.
        let cut = (lo, hi, &mut bits);
        count_word::<N>(cols, full, words, w, h, regrow, cut, pre, key_rows, keys)
    }

    #[inline(always)]
    fn select_columns(
        word: u64,
        w: &[f32],
        h: &[f32],
        regrow: bool,
        r: u32,
        ts: &[u32],
        ti: &[u32],
        need: u64,
    ) -> u64 {
        use std::arch::x86_64::*;
        if [w.len(), h.len(), ts.len(), ti.len()]
            .iter()
            .any(|&n| n < 64)
        {
            return Portable::select_columns(word, w, h, regrow, r, ts, ti, need);
        }
        let mut sel = [0u16; 4];
        // SAFETY: every slice holds at least 64 values (checked above); AVX-512F and BW are
        // the caller's contract.
        let sel = unsafe {
            let abs = _mm512_set1_epi32(0x7fff_ffff);
            let vr = _mm512_set1_epi32(r as i32);
            for (q, k) in sel.iter_mut().enumerate() {
                let at = 16 * q;
                if (need >> at) as u16 == 0 {
                    // No column of this quarter is needed: its values are not read.
                    continue;
                }
                let live = (word >> at) as u16;
                let v = load_values(w, h, at, live, regrow);
                let sv = _mm512_and_si512(v, abs);
                let t = _mm512_loadu_epi32(ts.as_ptr().add(at).cast());
                let eq = _mm512_cmpeq_epi32_mask(sv, t);
                let tie = _mm512_mask_cmple_epu32_mask(
                    eq,
                    vr,
                    _mm512_loadu_epi32(ti.as_ptr().add(at).cast()),
                );
                *k = _mm512_cmpgt_epu32_mask(sv, t) | tie;
            }
            join(sel)
        };
        sel & (word | u64::from(regrow).wrapping_neg())
    }
}

/// Whether the CPU has the features [`Avx512`]'s entry points are compiled with.
#[cfg(target_arch = "x86_64")]
fn cpu_runs_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("popcnt")
}

/// Whether the CPU has the features [`Avx2`]'s entry points are compiled with.
#[cfg(target_arch = "x86_64")]
fn cpu_runs_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("popcnt")
        && std::is_x86_feature_detected!("bmi1")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("lzcnt")
}

/// Defines `pub(crate) fn $name(args) -> ret` running `$inner::<Avx512>` on CPUs with
/// AVX-512, `$inner::<Avx2>` on CPUs with AVX2, and `$inner::<Portable>` elsewhere.
macro_rules! kernel_entry {
    ($(#[$m:meta])* fn $name:ident = $inner:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma,popcnt")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn widest($($arg: $ty),*) -> $ret {
                    $inner::<Avx512>($($arg),*)
                }
                if cpu_runs_avx512() {
                    // SAFETY: `widest` only needs the CPU features checked just above.
                    return unsafe { widest($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2,lzcnt")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $inner::<Avx2>($($arg),*)
                }
                if cpu_runs_avx2() {
                    // SAFETY: `avx2` only needs the CPU features checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            crate::multiversion! {
                #[allow(clippy::too_many_arguments)]
                fn portable($($arg: $ty),*) -> $ret {
                    $inner::<Portable>($($arg),*)
                }
            }
            portable($($arg),*)
        }
    };
}

kernel_entry! {
    /// Refreshes rows `r0..` of a plain `[rows, cols]` matrix: mask words `words` (`wpr` per
    /// row), weights `w`, shadow `h`, each row to `targets[r]` edges. `buffers` are a
    /// worker's key buffer, selection scratch and score bits (each at least `cols` long).
    /// Returns the stats and the first row left alone for a non-finite score.
    fn rows_flat_block = flat_rows(
        cols: usize,
        targets: &[u32],
        regrow: bool,
        r0: usize,
        wpr: usize,
        words: &mut [u64],
        w: &mut [f32],
        h: &mut [f32],
        buffers: (&mut [u64], &mut [u64], &mut [u32]),
        hist: &mut Histogram,
        hints: &mut [u64],
    ) -> (SyncStats, Option<usize>)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn flat_rows<K: Kernels>(
    cols: usize,
    targets: &[u32],
    regrow: bool,
    r0: usize,
    wpr: usize,
    words: &mut [u64],
    w: &mut [f32],
    h: &mut [f32],
    buffers: (&mut [u64], &mut [u64], &mut [u32]),
    hist: &mut Histogram,
    hints: &mut [u64],
) -> (SyncStats, Option<usize>) {
    let (keys, tmp, bits) = buffers;
    let bits = &mut bits[..cols];
    let mut st = SyncStats::default();
    let mut bad = None;
    let all = u64::from(regrow).wrapping_neg();
    let (hl, cap) = (row_hint_len(cols), row_hint_len(cols) - 4);
    let mut new = [0u64; 64];
    for (i, ((mw, wr), hr)) in words
        .chunks_mut(wpr)
        .zip(w.chunks_mut(cols))
        .zip(h.chunks_mut(cols))
        .enumerate()
    {
        let r = r0 + i;
        let k = targets[r] as usize;
        let hint = &mut hints[i * hl..(i + 1) * hl];
        // The bracket's ends have zero low halves (see `bracket_after`), so for a
        // candidate "key >= end" is "score bits >= the end's high half". A zero lower end
        // would also count the non-candidates (bits 0): such a bracket is not used.
        let (slo, shi) = ((hint[0] >> 32) as u32, (hint[1] >> 32) as u32);
        let usable = slo > 0 && slo < shi && k > 0 && k < cols;
        let (slo, shi) = if usable {
            (slo, shi)
        } else {
            (u32::MAX, u32::MAX)
        };
        // The dead-key cache (see `row_hint_len`) stands in for the shadow when it reaches
        // below the bracket and was built for this very mask row.
        let (cache_lo, cached) = ((hint[2] >> 32) as u32, (hint[2] & 0xffff) as usize);
        let mut use_cache = regrow
            && usable
            && cache_lo > 0
            && cache_lo <= slo
            && cached <= cap
            && hint[3] == fingerprint(mw);
        let (mut n, mut above_lo, mut above_hi, mut non_finite);
        loop {
            // With the cache only the live edges are scored (the shadow is not read). The
            // words of the edges above the bracket are kept in `keys` and the keys inside it
            // gathered, in case the threshold is still there: then every edge above it
            // stays, and only the keys inside need a look.
            let score_dead = regrow && !use_cache;
            let rs = K::score_row(mw, wr, hr, score_dead, slo, shi, bits, keys, tmp);
            (n, above_hi, non_finite) = (rs.inside, rs.above_hi, rs.non_finite);
            above_lo = above_hi + n;
            if non_finite {
                break;
            }
            let n_live = n;
            if use_cache {
                // The cached dead keys inside the bracket join the live ones (branch-free).
                // A cache is built below its row's threshold, so none reaches the bracket's
                // high end; if one did, the row is scored in full.
                let mut high = false;
                if n + cached <= tmp.len() {
                    for &key in &hint[4..4 + cached] {
                        let s = (key >> 32) as u32;
                        high |= s >= shi;
                        tmp[n] = key;
                        n += usize::from(s >= slo);
                    }
                } else {
                    high = true;
                }
                above_lo += n - n_live;
                if high || !(above_hi < k && k <= above_lo && n <= SMALL_SLAB) {
                    // The threshold left the bracket: score the dead edges too.
                    use_cache = false;
                    continue;
                }
            }
            break;
        }
        if non_finite {
            // The row, its hint included, is left as it was.
            bad.get_or_insert(r);
            continue;
        }
        let thr = if usable && above_hi < k && k <= above_lo {
            // A long list is reordered by the radix select; a short one only permuted.
            let short = n <= SMALL_SLAB;
            let guess = bracket_center([hint[0], hint[1]]);
            let thr = pick_near(&mut tmp[..n], k - above_hi, guess, hist);
            if short {
                // The new words: the edges above the bracket, and those inside it from the
                // threshold up (all of them candidates).
                for &key in &tmp[..n] {
                    let c = (u64::from(u32::MAX) - (key & u64::from(u32::MAX))) as usize;
                    keys[c / 64] |= u64::from(key >= thr) << (c % 64);
                }
                let (born, died) = (st.born, st.died);
                for (blk, ow) in mw.chunks_mut(64).enumerate() {
                    let nw = &keys[blk * 64..blk * 64 + ow.len()];
                    let off = blk * 64 * 64;
                    st = add(st, sync_row(ow, nw, 1, &mut wr[off..], &mut hr[off..]));
                    ow.copy_from_slice(nw);
                }
                let changed = (st.born > born, st.died > died);
                update_cache::<K>(hint, thr, regrow, use_cache.then_some(changed), mw, bits);
                continue;
            }
            thr
        } else {
            // Otherwise the row's 64-bit keys from the bits, selected from scratch.
            for (wi, (&word, kc)) in mw.iter().zip(keys.chunks_mut(64)).enumerate() {
                let cand = word | all;
                for (b, (key, &s)) in kc.iter_mut().zip(&bits[wi * 64..]).enumerate() {
                    let c = (wi * 64 + b) as u64;
                    let full = (u64::from(s) << 32) | (u64::from(u32::MAX) - c);
                    *key = full & ((cand >> b) & 1).wrapping_neg();
                }
            }
            threshold_key_preserving(&keys[..cols], k, hist, tmp)
        };
        let (ts, ti) = split_threshold(thr);
        // Mask words are rebuilt in blocks of up to 64 words (4096 columns), each block
        // synced against the old words before they are overwritten.
        for (blk, (ow, bb)) in mw.chunks_mut(64).zip(bits.chunks(64 * 64)).enumerate() {
            let nw = &mut new[..ow.len()];
            for (wi, ((x, bc), &old)) in nw.iter_mut().zip(bb.chunks(64)).zip(ow.iter()).enumerate()
            {
                let c0 = ((blk * 64 + wi) * 64) as u32;
                *x = K::select(bc, c0, ts, ti) & (old | all);
            }
            let off = blk * 64 * 64;
            st = add(st, sync_row(ow, nw, 1, &mut wr[off..], &mut hr[off..]));
            ow.copy_from_slice(nw);
        }
        update_cache::<K>(hint, thr, regrow, None, mw, bits);
    }
    (st, bad)
}

/// How far below its bracket a row's dead-key cache reaches when it is built from a full
/// scoring (in score bits, as the bracket's own margin): the threshold may fall this far
/// before the shadow must be read again.
const CACHE_MARGIN: u32 = 1 << 17;

/// Hint words per row of a plain matrix refreshed by rows (SP-in): the bracket's two ends,
/// then a cache of the row's dead edges that stands in for its shadow values while the
/// threshold stays near: its low end and length (`lo << 32 | len`, 0 when there is no
/// cache), a fingerprint of the mask row it was built for, and the keys of every dead edge
/// at or above that low end (up to `row_hint_len - 4` of them).
///
/// Dead edges keep their shadow values between refreshes (only a refresh moves them), so
/// with the cache a refresh reads the weights only. It is used only with regrowth, when the
/// row's mask is the one it was built for and it reaches below the bracket; when the
/// threshold leaves the bracket the row is scored again with its shadow, and the cache is
/// rebuilt from that. The mask fingerprint guards against a mask changed by other means;
/// shadow values changed by other means call for fresh hints. Room for `cols / 16` keys
/// (between 32 and 1024) costs about half a byte per edge, next to the eight of weight and
/// shadow; a row with more dead keys in range goes without a cache.
pub(crate) fn row_hint_len(cols: usize) -> usize {
    4 + (cols / 16).clamp(32, 1024)
}

crate::multiversion! {
    /// A fingerprint of a mask row, for the dead-key caches: eight independent lanes of
    /// multiply-xor-rotate, so that the multiplies overlap (and vectorize), folded into one
    /// word with the length.
    fn fingerprint(words: &[u64]) -> u64 {
        const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut f = [
            0x243f_6a88_85a3_08d3u64,
            0x1319_8a2e_0370_7344,
            0xa409_3822_299f_31d0,
            0x082e_fa98_ec4e_6c89,
            0x4528_21e6_38d0_1377,
            0xbe54_66cf_34e9_0c6c,
            0xc0ac_29b7_c97c_50dd,
            0x3f84_d5b5_b547_0917,
        ];
        let (body, tail) = words.split_at(words.len() / 8 * 8);
        for run in body.chunks_exact(8) {
            for (a, &x) in f.iter_mut().zip(run) {
                *a = (*a ^ x).wrapping_mul(MIX).rotate_left(29);
            }
        }
        for (a, &x) in f.iter_mut().zip(tail) {
            *a = (*a ^ x).wrapping_mul(MIX).rotate_left(29);
        }
        f.iter().fold(words.len() as u64, |g, &a| (g ^ a).wrapping_mul(MIX).rotate_left(29))
    }
}

/// Row `r`'s part in the fingerprint of a whole mask (for SP-out's dead-key caches): the
/// mask's fingerprint is the number of rows and every row's part joined by exclusive or, so
/// that the passes over the rows can take it as they go, split among any number of workers.
#[inline(always)]
fn row_part(r: usize, words: &[u64]) -> u64 {
    (fingerprint(words) ^ r as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(29)
}

/// After a row's refresh to threshold `thr` (mask words `mw` already new): its new bracket,
/// and its dead-key cache rebuilt. `bits` are the row's score bits as scored: all edges,
/// or (`from_cache = Some((born, died))`, whether any edge of the row came back or died)
/// the live ones only, the old cache holding the dead ones.
#[inline(always)]
fn update_cache<K: Kernels>(
    hint: &mut [u64],
    thr: u64,
    regrow: bool,
    from_cache: Option<(bool, bool)>,
    mw: &[u64],
    bits: &[u32],
) {
    // Wider after a threshold that moved far, back to the least margin once it stays.
    let bracket = bracket_after([hint[0], hint[1]], thr);
    let old_lo = (hint[2] >> 32) as u32;
    let old_len = (hint[2] & 0xffff) as usize;
    (hint[0], hint[1]) = (bracket[0], bracket[1]);
    hint[2] = 0;
    let lo = (bracket[0] >> 32) as u32;
    if !regrow || lo == 0 {
        return;
    }
    let mut cl = lo.saturating_sub(CACHE_MARGIN).max(1);
    if from_cache.is_some() {
        // The old cache knows the dead edges down to its own low end only.
        cl = cl.max(old_lo);
        if cl > lo {
            return;
        }
    }
    if from_cache == Some((false, false)) && cl == old_lo {
        // Nothing moved and the low end stays: the same cache, for the same mask row.
        hint[2] = (u64::from(cl) << 32) | old_len as u64;
        return;
    }
    let (head, slots) = hint.split_at_mut(4);
    let is_live = |key: u64| {
        let c = (u64::from(u32::MAX) - (key & u64::from(u32::MAX))) as usize;
        (mw[c / 64] >> (c % 64)) & 1 == 1
    };
    // The old cache's keys still dead and high enough, then the newly scored dead edges
    // (with a full scoring all of them; from the cache, those that died now: the others
    // were not scored, their bits are 0).
    let mut len = 0;
    if from_cache.is_some() {
        for j in 0..old_len {
            let key = slots[j];
            if (key >> 32) as u32 >= cl && !is_live(key) {
                slots[len] = key;
                len += 1;
            }
        }
    }
    // (From the cache, with no edge dead now there is nothing more.)
    let scan = if matches!(from_cache, Some((_, false))) {
        0
    } else {
        mw.len()
    };
    for (wi, (&word, bc)) in mw[..scan].iter().zip(bits.chunks(64)).enumerate() {
        let mut dead = K::at_least(bc, cl) & !word;
        while dead != 0 {
            let j = dead.trailing_zeros() as usize;
            dead &= dead - 1;
            if len == slots.len() {
                return;
            }
            let c = wi * 64 + j;
            slots[len] = (u64::from(bc[j]) << 32) | (u64::from(u32::MAX) - c as u64);
            len += 1;
        }
    }
    head[2] = (u64::from(cl) << 32) | len as u64;
    head[3] = fingerprint(mw);
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so that the tests need no dependency.
    fn lcg(state: &mut u64) -> u32 {
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (*state >> 33) as u32
    }

    /// Random mask words of a `[rows, cols]` matrix, padding bits zero.
    fn random_words(s: &mut u64, rows: usize, cols: usize) -> Vec<u64> {
        let wpr = cols.div_ceil(64);
        (0..rows * wpr)
            .map(|i| {
                let x = (u64::from(lcg(s)) << 32) | u64::from(lcg(s));
                x & crate::mask::lanes(cols - (i % wpr) * 64)
            })
            .collect()
    }

    /// A kernel set.
    #[derive(Clone, Copy, Debug, PartialEq)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    enum Set {
        Portable,
        Avx2,
        Avx512,
    }

    /// The kernel sets this CPU runs (see [`rows_flat_block`]), the portable one first.
    fn kernel_sets() -> Vec<Set> {
        let mut sets = vec![Set::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if cpu_runs_avx2() {
                sets.push(Set::Avx2);
            }
            if cpu_runs_avx512() {
                sets.push(Set::Avx512);
            }
        }
        sets
    }

    /// `f::<K>(args)` with the kernels `K` of a [`Set`].
    macro_rules! with_set {
        ($set:expr, $f:ident($($a:expr),* $(,)?)) => {
            match $set {
                #[cfg(target_arch = "x86_64")]
                Set::Avx512 => $f::<Avx512>($($a),*),
                #[cfg(target_arch = "x86_64")]
                Set::Avx2 => $f::<Avx2>($($a),*),
                _ => $f::<Portable>($($a),*),
            }
        };
    }

    /// [`count_columns_rows`] with kernel set `set`, on the bracket ends `cut` (`[lo; cols]`
    /// then `[hi; cols]`) and their signed bounds (see [`Cuts`]).
    #[allow(clippy::too_many_arguments)]
    fn count_with(
        set: Set,
        cols: usize,
        r0: usize,
        regrow: bool,
        words: &[u64],
        w: &[f32],
        h: &[f32],
        cut: &[u32],
        pre: &mut [u64],
        cs: &mut ColumnScratch,
    ) {
        let gt: Vec<i32> = cut.iter().map(|&b| at_least_bound(b)).collect();
        let cut = Cuts::new(cut, &gt, cols);
        with_set!(
            set,
            count_columns_rows(cols, r0, regrow, words, w, h, cut, pre, cs)
        );
    }

    /// What [`Kernels::score_row`] gives, in a comparable form: the score, bits, words
    /// above the bracket and the keys listed inside it.
    type Scored = ((bool, usize, usize), Vec<u32>, Vec<u64>, Vec<u64>);

    fn score_with<K: Kernels>(
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        lo: u32,
        hi: u32,
    ) -> Scored {
        let cols = w.len();
        let (mut bits, mut keys, mut tmp) =
            (vec![0; cols], vec![0; cols.div_ceil(64)], vec![0; cols]);
        let rs = K::score_row(words, w, h, regrow, lo, hi, &mut bits, &mut keys, &mut tmp);
        tmp.truncate(rs.inside);
        ((rs.non_finite, rs.above_hi, rs.inside), bits, keys, tmp)
    }

    /// [`Kernels::select`], [`Kernels::at_least`] and [`Kernels::select_columns`] (the
    /// columns in `need` only) on one word.
    #[allow(clippy::too_many_arguments)]
    fn word_with<K: Kernels>(
        bits: &[u32],
        c0: u32,
        (ts, ti): (u32, u32),
        lo: u32,
        (word, w, h, regrow): (u64, &[f32], &[f32], bool),
        (r, cts, cti, need): (u32, &[u32], &[u32], u64),
    ) -> (u64, u64, u64) {
        (
            K::select(bits, c0, ts, ti),
            K::at_least(bits, lo),
            K::select_columns(word, w, h, regrow, r, cts, cti, need) & need,
        )
    }

    /// Every kernel method of every kernel set the CPU has agrees with the portable one
    /// edge by edge, on values at, just below and just above the bounds they are compared
    /// with (ties at the bracket ends and thresholds, zeros, the largest finite magnitude),
    /// bounds at 0 and past every magnitude, ties on either side of the tie-break index, and
    /// rows with a partial last word.
    #[test]
    fn kernel_methods_agree_at_the_bounds() {
        let mut s = 3u64;
        let pool = [
            0u32,
            1,
            0x3f00_0000,
            0x3f00_0001,
            0x3f80_0000,
            0x7f7f_ffff,
            0x8000_0000,
            u32::MAX,
        ];
        let pick = |s: &mut u64, xs: &[u32]| xs[lcg(s) as usize % xs.len()];
        let sets = kernel_sets();
        for trial in 0..600 {
            let cols = [64, 128, 200][trial % 3];
            let regrow = trial % 2 == 0;
            let (a, b) = (pick(&mut s, &pool), pick(&mut s, &pool));
            let (lo, hi) = (a.min(b), a.max(b));
            // Magnitudes near the bounds, zeros and others, all finite, either sign.
            let near = |s: &mut u64| {
                let any = lcg(s) & 0x7f7f_ffff;
                let base = pick(s, &[lo, hi, 0, any]);
                let m = base
                    .wrapping_add(lcg(s) % 3)
                    .wrapping_sub(1)
                    .min(0x7f7f_ffff);
                f32::from_bits(m | (lcg(s) & 1) << 31)
            };
            let w: Vec<f32> = (0..cols).map(|_| near(&mut s)).collect();
            let h: Vec<f32> = (0..cols).map(|_| near(&mut s)).collect();
            let words = random_words(&mut s, 1, cols);
            let want = score_with::<Portable>(&words, &w, &h, regrow, lo, hi);
            assert!(!want.0 .0, "trial {trial}: finite values");
            for &set in &sets[1..] {
                let got = with_set!(set, score_with(&words, &w, &h, regrow, lo, hi));
                assert_eq!(got, want, "trial {trial}, {set:?}: score_row");
            }
            // A non-finite value anywhere (live, or dead with regrowth) is found.
            let mut bad = w.clone();
            let c = lcg(&mut s) as usize % cols;
            bad[c] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][trial % 3];
            let mut live = words.clone();
            live[c / 64] |= 1 << (c % 64);
            for &set in &sets {
                let got = with_set!(set, score_with(&live, &bad, &h, regrow, lo, hi));
                assert!(got.0 .0, "trial {trial}, {set:?}: column {c} is not finite");
            }
            // One word: thresholds on its own scores, tie-break indexes around its columns.
            // (Selection and counting also see the largest magnitude, a NaN's.)
            let mut bits = want.1[..64].to_vec();
            bits[lcg(&mut s) as usize % 64] |= 0x7fff_ffff * (trial as u32 % 2);
            let bits = &bits[..];
            let c0 = 64 * (lcg(&mut s) % 4);
            let own = bits[lcg(&mut s) as usize % 64];
            let ts = pick(&mut s, &[own, lo, hi, 0x7fff_ffff]);
            let ti = c0.wrapping_add(lcg(&mut s) % 70).wrapping_sub(3);
            let r = lcg(&mut s) % 4;
            let cts: Vec<u32> = bits
                .iter()
                .map(|&b| {
                    pick(
                        &mut s,
                        &[b, b.wrapping_add(1), b.wrapping_sub(1), 0, u32::MAX],
                    )
                })
                .collect();
            let cti: Vec<u32> = (0..64)
                .map(|_| r.wrapping_add(lcg(&mut s) % 3).wrapping_sub(1))
                .collect();
            let need = match trial % 4 {
                0 => u64::MAX,
                1 => 1 << (lcg(&mut s) % 64),
                _ => {
                    (u64::from(lcg(&mut s)) << 32 | u64::from(lcg(&mut s)))
                        & (u64::from(lcg(&mut s)) << 32 | u64::from(lcg(&mut s)))
                }
            };
            let args = |set: Set| {
                let one = (words[0], &w[..64], &h[..64], regrow);
                with_set!(
                    set,
                    word_with(bits, c0, (ts, ti), lo, one, (r, &cts, &cti, need))
                )
            };
            let want = args(Set::Portable);
            for &set in &sets[1..] {
                assert_eq!(args(set), want, "trial {trial}, {set:?}: one word");
            }
        }
    }

    /// Rows with ties, zeros and a tail word, refreshed twice (so that the second pass
    /// starts from brackets): every kernel set the CPU has gives the same masks, weights,
    /// shadow, stats and hints as the portable one.
    #[test]
    fn every_kernel_set_gives_the_same_rows() {
        let (rows, cols) = (9usize, 1000usize);
        let wpr = cols.div_ceil(64);
        let mut s = 7u64;
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|_| match lcg(&mut s) % 4 {
                0 => 0.0,
                1 => 0.5,
                _ => (lcg(&mut s) % 1000) as f32 / 1000.0 - 0.5,
            })
            .collect();
        let mut h: Vec<f32> = w.iter().map(|x| x * 0.75).collect();
        let mut words = random_words(&mut s, rows, cols);
        for (i, x) in w.iter_mut().enumerate() {
            if words[(i / cols) * wpr + (i % cols) / 64] >> (i % cols % 64) & 1 == 0 {
                *x = 0.0;
            }
        }
        // Non-finite values: a dead edge's shadow in row 2 (scored only with regrowth), live
        // weights in row 4 (in the last, partial word) and row 6.
        let dead = (0..cols).find(|c| words[2 * wpr + c / 64] >> (c % 64) & 1 == 0);
        h[2 * cols + dead.expect("row 2 has a dead edge")] = f32::NAN;
        for (r, c, x) in [(4, 999, f32::NAN), (6, 130, f32::NEG_INFINITY)] {
            words[r * wpr + c / 64] |= 1 << (c % 64);
            w[r * cols + c] = x;
        }
        let targets: Vec<u32> = (0..rows).map(|r| (r * 120) as u32).collect();
        let run = |set: Set, regrow: bool| {
            let (mut words, mut w, mut h) = (words.clone(), w.clone(), h.clone());
            let (mut keys, mut tmp, mut bits) = (vec![0; cols], vec![0; cols], vec![0; cols]);
            let (mut hist, mut hints) =
                (Histogram::default(), vec![0u64; row_hint_len(cols) * rows]);
            let mut out = Vec::new();
            for _ in 0..2 {
                let args = (&mut keys[..], &mut tmp[..], &mut bits[..]);
                let res = with_set!(
                    set,
                    flat_rows(
                        cols, &targets, regrow, 0, wpr, &mut words, &mut w, &mut h, args,
                        &mut hist, &mut hints,
                    )
                );
                out.push((res, words.clone(), hints.clone()));
                // Drift the weights a little between the passes.
                for x in &mut w {
                    *x *= 1.001;
                }
            }
            let wb: Vec<u32> = w.iter().map(|x| x.to_bits()).collect();
            let hb: Vec<u32> = h.iter().map(|x| x.to_bits()).collect();
            (out, wb, hb)
        };
        for regrow in [true, false] {
            let portable = run(Set::Portable, regrow);
            let first_bad = if regrow { 2 } else { 4 };
            assert_eq!(portable.0[0].0 .1, Some(first_bad), "regrow {regrow}");
            assert!(
                portable.0[1].2.iter().any(|&x| x != 0),
                "brackets were kept"
            );
            for set in kernel_sets().into_iter().skip(1) {
                assert_eq!(run(set, regrow), portable, "regrow {regrow}, {set:?}");
            }
        }
    }

    /// SP-out's counting pass names the first row with a non-finite score, in row order,
    /// whichever word it lies in, with every kernel set.
    #[test]
    fn the_first_non_finite_row_is_named_in_row_order() {
        let (rows, cols) = (71usize, 192usize);
        let wpr = cols.div_ceil(64);
        let words = vec![u64::MAX; rows * wpr];
        let h = vec![0.5f32; rows * cols];
        let cut: Vec<u32> = [vec![1u32; cols], vec![2u32; cols]].concat();
        // Row 5 in the first word, row 4 (scored together with row 5) in the last, row 17
        // in the first; then rows of a later chunk only (the row scored alone at the end
        // after one in a pair); infinities, whose bits are the smallest non-finite ones.
        for (bad, first, x) in [
            (&[(5, 10), (4, 150), (17, 0)][..], 4, f32::NAN),
            (&[(70, 100), (47, 191)][..], 47, f32::NAN),
            (&[(30, 64), (12, 70)][..], 12, f32::NEG_INFINITY),
            (&[(9, 1)][..], 9, f32::INFINITY),
        ] {
            let mut w = vec![0.25f32; rows * cols];
            for &(r, c) in bad {
                w[r * cols + c] = x;
            }
            for set in kernel_sets() {
                let mut cs = ColumnScratch::default();
                let mut pre = vec![0u64; rows * wpr];
                count_with(set, cols, 7, true, &words, &w, &h, &cut, &mut pre, &mut cs);
                assert_eq!(cs.bad, Some(7 + first), "{set:?}");
            }
        }
    }

    /// SP-out's counting pass puts every key inside its column's bracket on the column's
    /// list, in row order, and in the log while the log has room (brackets around a few
    /// scores), or says that it ran out of room (brackets around nearly all of them), and
    /// counts each column's edges above its bracket (over more rows than one chunk), with
    /// every kernel set, with and without regrowth.
    #[test]
    fn inside_keys_reach_lists_and_log() {
        let (rows, cols, r0) = (37usize, 200usize, 5usize);
        let wpr = cols.div_ceil(64);
        let mut s = 13u64;
        let val = |s: &mut u64| (lcg(s) % 1000) as f32 / 1000.0 - 0.5;
        let h: Vec<f32> = (0..rows * cols).map(|_| val(&mut s)).collect();
        let words = random_words(&mut s, rows, cols);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let live = (words[(i / cols) * wpr + (i % cols) / 64] >> (i % cols % 64)) & 1;
                if live == 1 {
                    val(&mut s)
                } else {
                    0.0
                }
            })
            .collect();
        let bits_of = |x: f32| x.to_bits() & 0x7fff_ffff;
        for (wide, regrow) in [(false, true), (false, false), (true, true), (true, false)] {
            let mut cut = vec![u32::MAX; 2 * cols];
            for c in 0..cols {
                let (lo, hi) = if wide {
                    (1, bits_of(0.45))
                } else {
                    let lo = bits_of(0.1 + (lcg(&mut s) % 300) as f32 / 1000.0);
                    (lo, lo + (1 << 18))
                };
                (cut[c], cut[cols + c]) = (lo, hi);
            }
            // The keys inside, column by column in row order; the edges above.
            let mut want = vec![Vec::new(); cols];
            let mut high = vec![0u64; rows * wpr];
            for r in 0..rows {
                for (c, list) in want.iter_mut().enumerate() {
                    let live = (words[r * wpr + c / 64] >> (c % 64)) & 1 == 1;
                    if !live && !regrow {
                        continue;
                    }
                    let b = bits_of(if live {
                        w[r * cols + c]
                    } else {
                        h[r * cols + c]
                    });
                    if b >= cut[cols + c] {
                        high[r * wpr + c / 64] |= 1 << (c % 64);
                    } else if b >= cut[c] {
                        list.push((u64::from(b) << 32) | (u64::from(u32::MAX) - (r0 + r) as u64));
                    }
                }
            }
            for set in kernel_sets() {
                let mut cs = ColumnScratch::default();
                let mut pre = vec![0u64; rows * wpr];
                count_with(
                    set, cols, r0, regrow, &words, &w, &h, &cut, &mut pre, &mut cs,
                );
                let case = format!("wide {wide}, regrow {regrow}, {set:?}");
                assert_eq!(cs.bad, None, "{case}");
                assert_eq!(pre, high, "{case}");
                let mut logged: Vec<(u64, u32)> = Vec::new();
                for (c, list) in want.iter().enumerate() {
                    let above = (0..rows).filter(|r| (high[r * wpr + c / 64] >> (c % 64)) & 1 == 1);
                    assert_eq!(cs.counts[c] as usize, above.count(), "{case}: column {c}");
                    assert!(list.len() <= LIST_CAP, "{case}");
                    assert_eq!(
                        cs.counts[cols + c] as usize,
                        list.len(),
                        "{case}: column {c}"
                    );
                    assert_eq!(
                        cs.lists[c * LIST_CAP..][..list.len()],
                        list[..],
                        "{case}: column {c}"
                    );
                    logged.extend(list.iter().map(|&k| (k, c as u32)));
                }
                let total = logged.len();
                assert!(total > 0, "{case}: no key inside");
                match cs.logged {
                    Some(n) => {
                        assert!(!wide, "{case}: {total} keys cannot all be logged");
                        let mut got: Vec<(u64, u32)> = cs.log[..n]
                            .iter()
                            .copied()
                            .zip(cs.log_cols[..n].iter().copied())
                            .collect();
                        got.sort_unstable();
                        logged.sort_unstable();
                        assert_eq!(got, logged, "{case}");
                    }
                    None => assert!(wide, "{case}: {total} keys fit the log"),
                }
            }
        }
    }

    /// SP-out's two row passes (counting against brackets, rebuilding against thresholds)
    /// give the same counts, bracket keys, pre-selected words, masks, weights and shadow with
    /// the AVX-512 loops (where the CPU has them) as with the portable ones, with and without
    /// regrowth, over whole words and a partial one, with some columns kept from `pre`.
    #[test]
    fn every_kernel_set_gives_the_same_columns() {
        let (rows, cols) = (37usize, 200usize);
        let wpr = cols.div_ceil(64);
        let mut s = 11u64;
        let val = |s: &mut u64| (lcg(s) % 1000) as f32 / 1000.0 - 0.5;
        let w0: Vec<f32> = (0..rows * cols).map(|_| val(&mut s)).collect();
        let h: Vec<f32> = (0..rows * cols).map(|_| val(&mut s)).collect();
        let words = random_words(&mut s, rows, cols);
        let mut w = w0.clone();
        for (i, x) in w.iter_mut().enumerate() {
            if (words[(i / cols) * wpr + (i % cols) / 64] >> (i % cols % 64)) & 1 == 0 {
                *x = 0.0;
            }
        }
        // Brackets around scores 0.1-0.4 (a tenth of the columns without one), thresholds
        // near the same scores with a row for ties.
        let bits_of = |x: f32| x.to_bits();
        let mut cut = vec![u32::MAX; 2 * cols];
        let mut thr = vec![0u32; 2 * cols];
        for c in 0..cols {
            let lo = bits_of(0.1 + (lcg(&mut s) % 300) as f32 / 1000.0);
            if c % 10 != 3 {
                (cut[c], cut[cols + c]) = (lo, lo + (1 << 19));
            }
            thr[c] = lo + (lcg(&mut s) % (1 << 20));
            thr[cols + c] = lcg(&mut s) % rows as u32;
        }
        let kept: Vec<u64> = (0..wpr)
            .map(|wi| {
                let x = (u64::from(lcg(&mut s)) << 32) | u64::from(lcg(&mut s));
                x & crate::mask::lanes(cols - wi * 64)
            })
            .collect();
        let run = |set: Set, regrow: bool| {
            let mut cs = ColumnScratch::default();
            let mut pre = vec![0u64; rows * wpr];
            let (mut mw, mut wv, mut hv) = (words.clone(), w.clone(), h.clone());
            count_with(
                set, cols, 0, regrow, &words, &w, &h, &cut, &mut pre, &mut cs,
            );
            let st = with_set!(
                set,
                rebuild_columns_rows(cols, 0, regrow, &thr, &kept, &pre, &mut mw, &mut wv, &mut hv)
            );
            let lists: Vec<Vec<u64>> = (0..cols)
                .map(|c| {
                    let l = (cs.counts[cols + c] as usize).min(LIST_CAP);
                    cs.lists[c * LIST_CAP..c * LIST_CAP + l].to_vec()
                })
                .collect();
            let wb: Vec<u32> = wv.iter().map(|x| x.to_bits()).collect();
            let hb: Vec<u32> = hv.iter().map(|x| x.to_bits()).collect();
            (cs.counts.clone(), lists, cs.bad, pre, st, mw, wb, hb)
        };
        for regrow in [true, false] {
            let portable = run(Set::Portable, regrow);
            assert!(portable.0.iter().any(|&n| n > 0), "columns were counted");
            assert!(
                (portable.4).0.died + (portable.4).0.born > 0,
                "the rebuild changed edges"
            );
            for set in kernel_sets().into_iter().skip(1) {
                assert_eq!(run(set, regrow), portable, "regrow {regrow}, {set:?}");
            }
        }
    }
}

/// The `need`-th largest of `keys` (the keys found inside a bracket), first trying the
/// threshold's old score `guess` (the lowest key of that score, see
/// [`crate::select::bracket_center`]): when exactly `need` keys reach it, the answer is the
/// least of them, found in one branch-free pass instead of a selection.
#[inline(always)]
fn pick_near(keys: &mut [u64], need: usize, guess: u64, hist: &mut Histogram) -> u64 {
    let (mut count, mut least) = (0usize, u64::MAX);
    for &key in keys.iter() {
        let hit = key >= guess;
        count += usize::from(hit);
        least = least.min(if hit { key } else { u64::MAX });
    }
    if guess > 0 && count == need {
        least
    } else {
        pick(keys, need, hist)
    }
}

/// The `need`-th largest of `keys`, the keys found inside a bracket in index order.
#[inline(always)]
fn pick(keys: &mut [u64], need: usize, hist: &mut Histogram) -> u64 {
    // Keys of equal scores, gathered in index order, are already in descending key order.
    let score = keys[0] >> 32;
    if keys.iter().fold(0, |d, &key| d | ((key >> 32) ^ score)) == 0 {
        keys[need - 1]
    } else {
        select_below(keys, need, 63, hist)
    }
}

/// Keys a column can keep from one worker's rows inside its bracket; a column with more
/// is selected from scratch.
const LIST_CAP: usize = 96;

/// One worker's buffers for [`column_brackets`].
#[derive(Debug, Default, Clone)]
pub(crate) struct ColumnScratch {
    /// Per column, over the worker's rows: how many score bits reach the bracket's high
    /// end, then how many lie inside it (both `cols` long).
    counts: Vec<u32>,
    /// Per column, the first [`LIST_CAP`] keys inside its bracket, in row order.
    lists: Vec<u64>,
    /// Every key inside its column's bracket in the order the pass met them (rows nearly in
    /// order), and its column; `logged` of them when there was room for all: the keys
    /// that reach their column's threshold join `pre` from here, in a walk through the
    /// worker's rows rather than a jump between rows for every key.
    log: Vec<u64>,
    log_cols: Vec<u32>,
    logged: Option<usize>,
    /// One chunk's column sums of `pre` bits (see [`count_columns_rows`]).
    chunk_counts: Vec<u32>,
    /// The worker's rows' parts of the mask fingerprint (see [`row_part`]).
    parts: u64,
    /// The first row with a non-finite score.
    bad: Option<usize>,
}

/// What [`count_rows`] keeps of the keys inside their brackets (see [`ColumnScratch`]).
///
/// The pass writes every key to the log only, and the keys go on to their columns' lists in
/// a loop of their own: a scattered store to a list (and its length) for every key, amid the
/// streaming pass, took about a third of the pass's time. (Writing a word's first two keys
/// without a branch, the log's position moving only for real ones, was slower than the
/// plain loop.)
struct Inside<'a> {
    lens: &'a mut [u32],
    lists: &'a mut [u64],
    /// The keys in the pass's order; `log[done..at]` are not on their lists yet.
    log: &'a mut [u64],
    log_cols: &'a mut [u32],
    at: usize,
    done: usize,
    /// Whether the log ran out of room (and was written over).
    spilled: bool,
    /// The rows' parts of the mask fingerprint, joined.
    parts: u64,
}

impl Inside<'_> {
    /// Makes room in the log for the keys of `n` more words.
    #[inline(always)]
    fn reserve(&mut self, n: usize) {
        if self.at + 64 * n > self.log.len() {
            self.flush();
            (self.at, self.done, self.spilled) = (0, 0, true);
        }
    }

    /// Logs the keys of the edges `inside` of one word (first column `c0`, score bits
    /// `bits`) of the row whose keys' low half is `key_row`; room was reserved.
    #[inline(always)]
    fn stage(&mut self, c0: usize, mut inside: u64, bits: &[u32; 64], key_row: u64) {
        while inside != 0 {
            let j = inside.trailing_zeros() as usize;
            inside &= inside - 1;
            self.log[self.at] = (u64::from(bits[j]) << 32) | key_row;
            self.log_cols[self.at] = (c0 + j) as u32;
            self.at += 1;
        }
    }

    /// Puts the logged keys not yet on their columns' lists there.
    fn flush(&mut self) {
        for (&key, &c) in self.log[self.done..self.at]
            .iter()
            .zip(&self.log_cols[self.done..self.at])
        {
            let c = c as usize;
            let k = self.lens[c] as usize;
            if k < LIST_CAP {
                self.lists[c * LIST_CAP + k] = key;
            }
            self.lens[c] = self.lens[c].saturating_add(1);
        }
        self.done = self.at;
    }
}

/// SP-out on a plain `[rows, cols]` matrix, first pass: one streaming pass over the rows
/// counts every column's scores against its remembered bracket and keeps the few keys
/// inside. Each column whose threshold is still in its bracket gets it in `thresholds`
/// (and a new bracket in `hints`); the others are left at 0 for a selection from scratch.
///
/// The same pass writes `scratch.pre` (one word per mask word): the edges at or above
/// their column's bracket, to which the edges inside it that reach the column's threshold
/// are then added. For a word whose columns all kept their brackets that is the new mask
/// word, and the last pass need not read its weights again.
/// Returns the first row with a non-finite score (nothing is written to the layer).
#[allow(clippy::too_many_arguments)]
pub(crate) fn column_brackets(
    rows: usize,
    cols: usize,
    words: &[u64],
    w: &[f32],
    h: &[f32],
    targets: &[u32],
    regrow: bool,
    hints: &mut [u64],
    cache: &mut [u64],
    scratch: &mut ActuatorScratch,
) -> Result<(), usize> {
    let wpr = cols.div_ceil(64);
    let cap = column_cache_cap(rows);
    let cut = &mut scratch.cut;
    cut.clear();
    cut.resize(2 * cols, u32::MAX);
    let mut any = false;
    for (c, (hint, &k)) in hints.chunks_exact(2).zip(targets).enumerate() {
        // As for rows: the ends have zero low halves, and a zero low end is not used.
        let (lo, hi) = ((hint[0] >> 32) as u32, (hint[1] >> 32) as u32);
        if lo > 0 && lo < hi && k > 0 && (k as usize) < rows {
            (cut[c], cut[cols + c]) = (lo, hi);
            any = true;
        }
    }
    let (fingerprint_slot, caches) = cache.split_last_mut().expect("a fingerprint slot");
    if !any {
        caches.chunks_exact_mut(1 + cap).for_each(|c| c[0] = 0);
        return Ok(());
    }
    // The dead-key caches stand in for the shadow when every column with a bracket has one
    // that reaches below it, all built for this very mask. Whether it is that mask is seen
    // after the counting pass, which takes the mask's fingerprint as it goes: the pass first
    // scores the live edges alone, and again with the shadow if the mask turns out to have
    // changed.
    let heads = regrow
        && cut[..cols]
            .iter()
            .zip(caches.chunks_exact(1 + cap))
            .all(|(&lo, c)| {
                let (cl, len) = ((c[0] >> 32) as u32, (c[0] & 0xffff_ffff) as usize);
                lo == u32::MAX || (cl > 0 && cl <= lo && len <= cap)
            });
    let n = workers(rows * cols);
    let rows_per = rows.div_ceil(n);
    let used = rows.div_ceil(rows_per);
    if scratch.columns.len() < used {
        scratch.columns.resize_with(used, ColumnScratch::default);
    }
    scratch.cut_gt.clear();
    let gt = scratch.cut.iter().map(|&b| at_least_bound(b));
    scratch.cut_gt.extend(gt);
    let cut = &scratch.cut;
    let cuts = Cuts::new(cut, &scratch.cut_gt, cols);
    // Every word is written by the counting pass below.
    scratch.pre.resize(rows * wpr, 0);
    // With the caches only the live edges are scored.
    let mut score_dead = regrow && !heads;
    let cached = loop {
        words
            .par_chunks(rows_per * wpr)
            .zip(w.par_chunks(rows_per * cols))
            .zip(h.par_chunks(rows_per * cols))
            .zip(scratch.pre.par_chunks_mut(rows_per * wpr))
            .zip(scratch.columns[..used].par_iter_mut())
            .enumerate()
            .for_each(|(b, ((((mw, wr), hr), pre), cs))| {
                count_columns_block(cols, b * rows_per, score_dead, mw, wr, hr, cuts, pre, cs);
            });
        let columns = &scratch.columns[..used];
        if let Some(r) = columns.iter().filter_map(|cs| cs.bad).min() {
            if score_dead || !heads {
                return Err(r);
            }
            // The pass stopped before it could tell whether the mask changed: look at the
            // dead edges too, so that the first non-finite score of all is named.
            score_dead = true;
            continue;
        }
        let mask = columns.iter().fold(rows as u64, |f, cs| f ^ cs.parts);
        let cached = heads && *fingerprint_slot == mask;
        if cached || score_dead || !regrow {
            break cached;
        }
        // The mask changed since the caches were built: score the dead edges too.
        score_dead = true;
    };
    let columns = &scratch.columns[..used];
    let cols_per = cols.div_ceil(n);
    if scratch.born.len() < n {
        scratch.born.resize_with(n, Vec::new);
    }
    scratch
        .thresholds
        .par_chunks_mut(cols_per)
        .zip(hints.par_chunks_mut(2 * cols_per))
        .zip(caches.par_chunks_mut(cols_per * (1 + cap)))
        .zip(
            scratch.keys[..n]
                .par_iter_mut()
                .zip(scratch.hists[..n].par_iter_mut())
                .zip(scratch.born[..n].par_iter_mut()),
        )
        .enumerate()
        .for_each(|(b, (((thr, hints), caches), ((tmp, hist), born)))| {
            born.clear();
            for (j, ((t, hint), cache)) in thr
                .iter_mut()
                .zip(hints.chunks_exact_mut(2))
                .zip(caches.chunks_exact_mut(1 + cap))
                .enumerate()
            {
                let c = b * cols_per + j;
                // The column after next: its cache and its keys from every worker, whose
                // places lie far apart (the loads would otherwise wait one after another).
                let next = c + 2;
                prefetch_lines(cache.as_ptr().wrapping_add(2 * (1 + cap)), 4);
                for cs in columns {
                    prefetch_lines(cs.lists.as_ptr().wrapping_add(next * LIST_CAP), 2);
                }
                // Rebuilt below if the column keeps its bracket.
                let old = std::mem::replace(&mut cache[0], 0);
                if cut[c] == u32::MAX {
                    continue;
                }
                let (lo, hi) = (cut[c], cut[cols + c]);
                let k = targets[c] as usize;
                let (mut above_lo, mut above_hi, mut full) = (0usize, 0usize, false);
                let mut len = 0;
                for cs in columns {
                    let l = cs.counts[cols + c] as usize;
                    above_hi += cs.counts[c] as usize;
                    above_lo += cs.counts[c] as usize + l;
                    full |= l > LIST_CAP;
                    if !full {
                        tmp[len..len + l]
                            .copy_from_slice(&cs.lists[c * LIST_CAP..c * LIST_CAP + l]);
                        len += l;
                    }
                }
                let n_counted = len;
                // The cache's keys (dead edges), when they stand in for the shadow.
                let mut dead: &[u64] = &[];
                if cached && !full {
                    dead = &cache[1..1 + (old & 0xffff_ffff) as usize];
                    // (Room enough for any column's keys: `ensure_keys` above.)
                    full |= len + dead.len() > tmp.len();
                }
                if !full {
                    // None reaches the bracket's high end (a cache is built below its
                    // column's threshold; if one did, the column is selected from scratch).
                    for &key in dead {
                        let s = (key >> 32) as u32;
                        full |= s >= hi;
                        tmp[len] = key;
                        len += usize::from(s >= lo);
                    }
                    above_lo += len - n_counted;
                }
                if full || !(above_hi < k && k <= above_lo) {
                    continue;
                }
                let guess = bracket_center([hint[0], hint[1]]);
                *t = pick_near(&mut tmp[..len], k - above_hi, guess, hist);
                hint.copy_from_slice(&bracket_after([hint[0], hint[1]], *t));
                // Dead edges from the cache that come back join `pre` below (the counted
                // keys are those of live edges: with the caches only live edges are scored).
                for &key in dead.iter().filter(|&&key| key >= *t) {
                    let r = u64::from(u32::MAX) - (key & u64::from(u32::MAX));
                    born.push(((c as u64) << 32) | r);
                }
                // The inside keys under the threshold are the column's dead edges from its
                // bracket's low end up (every candidate there was counted or cached): its
                // new cache. (Every key is written to the next free slot, which moves on only
                // for those under the threshold: about half, in no order, so not a branch.)
                let mut m = 0;
                for &key in &tmp[..len] {
                    if m < cap {
                        cache[1 + m] = key;
                    }
                    m += usize::from(key < *t);
                }
                if regrow && m <= cap {
                    cache[0] = (u64::from(lo) << 32) | m as u64;
                }
            }
        });
    // The inside keys that reach their column's threshold join `pre`, each worker in its
    // own rows.
    let thresholds = &scratch.thresholds;
    scratch
        .pre
        .par_chunks_mut(rows_per * wpr)
        .zip(columns.par_iter())
        .enumerate()
        .for_each(|(b, (pre, cs))| {
            let r0 = b * rows_per;
            if let Some(logged) = cs.logged {
                for (&key, &c) in cs.log[..logged].iter().zip(&cs.log_cols[..logged]) {
                    let (c, t) = (c as usize, thresholds[c as usize]);
                    let r = (u64::from(u32::MAX) - (key & u64::from(u32::MAX))) as usize;
                    pre[(r - r0) * wpr + c / 64] |= u64::from(t != 0 && key >= t) << (c % 64);
                }
                return;
            }
            // The log ran out of room: column by column from the lists.
            for (c, &t) in thresholds.iter().enumerate() {
                if t == 0 {
                    continue;
                }
                let l = cs.counts[cols + c] as usize;
                // Without a branch: about half the keys reach the threshold, in no order.
                for &key in &cs.lists[c * LIST_CAP..c * LIST_CAP + l] {
                    let r = (u64::from(u32::MAX) - (key & u64::from(u32::MAX))) as usize;
                    pre[(r - r0) * wpr + c / 64] |= u64::from(key >= t) << (c % 64);
                }
            }
        });
    for &x in scratch.born[..n].iter().flatten() {
        let (c, r) = ((x >> 32) as usize, (x & u64::from(u32::MAX)) as usize);
        scratch.pre[r * wpr + c / 64] |= 1 << (c % 64);
    }
    Ok(())
}

/// Keys per column in SP-out's dead-key caches (see [`column_cache_len`]).
fn column_cache_cap(rows: usize) -> usize {
    (rows / 16).clamp(32, 1024)
}

/// Hint words of a plain SP-out layer after its brackets: per column a cache of the dead
/// edges at or above its bracket's low end (a header `lo << 32 | len`, 0 when there is none,
/// then up to `column_cache_cap(rows)` keys), and one fingerprint of the mask they were built
/// for. As for rows (see [`row_hint_len`]), dead edges keep their shadow values between
/// refreshes: when every column with a bracket has a cache that reaches below it, the counting
/// pass reads the live weights only. A column's cache is rebuilt from its bracket's keys when
/// it keeps its bracket, and dropped otherwise (then the next refresh reads the shadow).
pub(crate) fn column_cache_len(rows: usize, cols: usize) -> usize {
    cols * (1 + column_cache_cap(rows)) + 1
}

/// After an SP-out refresh of a plain layer of `rows` rows: the fingerprint of its new mask
/// from its rows' parts (`parts`, see [`row_part`]), for the caches (see
/// [`column_cache_len`]; without regrowth there are none, every header is 0).
pub(crate) fn seal_column_caches(cache: &mut [u64], rows: usize, parts: u64, regrow: bool) {
    if let (true, Some(slot)) = (regrow, cache.last_mut()) {
        *slot = rows as u64 ^ parts;
    }
}

kernel_entry! {
    /// [`column_brackets`]' pass over rows `r0..` (mask words `words`, weights `w`, shadow
    /// `h`), with the columns' bracket ends in `cut`; the edges at or above their column's
    /// bracket go to `pre` (one word per mask word).
    fn count_columns_block = count_columns_rows(
        cols: usize,
        r0: usize,
        regrow: bool,
        words: &[u64],
        w: &[f32],
        h: &[f32],
        cut: Cuts<'_>,
        pre: &mut [u64],
        cs: &mut ColumnScratch,
    ) -> ()
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn count_columns_rows<K: Kernels>(
    cols: usize,
    r0: usize,
    regrow: bool,
    words: &[u64],
    w: &[f32],
    h: &[f32],
    cut: Cuts<'_>,
    pre: &mut [u64],
    cs: &mut ColumnScratch,
) {
    let wpr = cols.div_ceil(64);
    cs.counts.clear();
    cs.counts.resize(2 * cols, 0);
    if cs.lists.len() < cols * LIST_CAP {
        cs.lists.resize(cols * LIST_CAP, 0);
    }
    cs.bad = None;
    // Room in the log for about 3 % of the block's edges (twice what settled brackets hold
    // with uniform scores), and for the words of a group of rows beyond.
    let room = words.len() / wpr * cols / 32 + 64 * GROUP;
    cs.log.resize(room, 0);
    cs.log_cols.resize(room, 0);
    let (ch, lens) = cs.counts.split_at_mut(cols);
    let mut inside = Inside {
        lens,
        lists: &mut cs.lists,
        log: &mut cs.log,
        log_cols: &mut cs.log_cols,
        at: 0,
        done: 0,
        spilled: false,
        parts: 0,
    };
    let keys = &mut inside;
    cs.chunk_counts.resize(cols, 0);
    let rows = words.len() / wpr;
    // Chunks of CHUNK rows, in groups of GROUP (the last few alone); after each chunk the
    // edges at or above their column's bracket, the bits of its `pre` words, are summed per
    // column while those words are still in cache. (A counter per column in the counting
    // loop itself cost more: its loads and stores outweighed the loop's other work.)
    let mut bad = None;
    for c0 in (0..rows).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(rows);
        let (words, w, h) = (
            &words[c0 * wpr..c1 * wpr],
            &w[c0 * cols..c1 * cols],
            &h[c0 * cols..c1 * cols],
        );
        let pre = &mut pre[c0 * wpr..c1 * wpr];
        let g = GROUP * ((c1 - c0) / GROUP);
        let (wg, wt) = words.split_at(g * wpr);
        let (pg, pt) = pre.split_at_mut(g * wpr);
        bad = wg
            .chunks(GROUP * wpr)
            .zip(w.chunks(GROUP * cols))
            .zip(h.chunks(GROUP * cols))
            .zip(pg.chunks_mut(GROUP * wpr))
            .enumerate()
            .find_map(|(i, (((mw, wr), hr), pw))| {
                let r = r0 + c0 + GROUP * i;
                count_rows::<K, GROUP>(cols, r, regrow, mw, wr, hr, cut, pw, keys)
            })
            .or_else(|| {
                wt.chunks(wpr)
                    .zip(w[g * cols..].chunks(cols))
                    .zip(h[g * cols..].chunks(cols))
                    .zip(pt.chunks_mut(wpr))
                    .enumerate()
                    .find_map(|(i, (((mw, wr), hr), pw))| {
                        let r = r0 + c0 + g + i;
                        count_rows::<K, 1>(cols, r, regrow, mw, wr, hr, cut, pw, keys)
                    })
            });
        if bad.is_some() {
            break;
        }
        crate::mask::col_counts(pre, wpr, 0, cols, &mut cs.chunk_counts);
        for (n, &m) in ch.iter_mut().zip(&cs.chunk_counts) {
            *n += m;
        }
    }
    inside.flush();
    cs.logged = (!inside.spilled).then_some(inside.at);
    cs.parts = inside.parts;
    cs.bad = bad;
}

/// [`count_columns_rows`] on `N` consecutive rows from row `r` (their mask words, values
/// and `pre` words), all of them together ([`Kernels::count_words`]): the keys inside the
/// brackets go to the log (see [`Inside`]). Returns the first row with a non-finite score,
/// if any.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn count_rows<K: Kernels, const N: usize>(
    cols: usize,
    r: usize,
    regrow: bool,
    words: &[u64],
    w: &[f32],
    h: &[f32],
    cut: Cuts<'_>,
    pre: &mut [u64],
    inside_keys: &mut Inside<'_>,
) -> Option<usize> {
    let wpr = cols.div_ceil(64);
    for (n, row) in words.chunks(wpr).enumerate() {
        inside_keys.parts ^= row_part(r + n, row);
    }
    let key_rows = std::array::from_fn(|n| u64::from(u32::MAX) - (r + n) as u64);
    if !K::count_words::<N>(cols, words, w, h, regrow, cut, pre, key_rows, inside_keys) {
        return None;
    }
    // The first row with a non-finite score.
    Some(
        (0..N)
            .find(|&m| {
                row_non_finite(
                    &words[m * wpr..],
                    &w[m * cols..],
                    &h[m * cols..],
                    cols,
                    regrow,
                )
            })
            .map_or(r, |m| r + m),
    )
}

/// Rows of SP-out's counting pass between two column sums of their `pre` words: few enough
/// that the words are still in the mid-level cache (127 KiB for 4096 columns), as many as
/// one run of [`crate::mask::col_counts`]' byte-wide planes takes (at most 255), and a
/// multiple of [`GROUP`]. (Sums after every 30 rows spent more on widening the planes into
/// the counts than they saved; one sum over all of a worker's rows read its words back from
/// the last-level cache.)
const CHUNK: usize = 254;

/// Rows scored together by SP-out's counting pass: they share the loads of the columns'
/// bracket ends, and their values stream in side by side.
const GROUP: usize = 2;

/// Whether the first row of `words`/`w`/`h` (`cols` edges) has a non-finite score.
fn row_non_finite(words: &[u64], w: &[f32], h: &[f32], cols: usize, regrow: bool) -> bool {
    (0..cols).any(|c| {
        let live = (words[c / 64] >> (c % 64)) & 1 == 1;
        (live || regrow) && !(if live { w[c] } else { h[c] }).is_finite()
    })
}

kernel_entry! {
    /// SP-out's last pass on rows `r0..` of a plain matrix: every mask word rebuilt against
    /// the columns' thresholds (`cut`: score bits `[ts; cols]`, then rows `[ti; cols]`), and
    /// the weights of edges that changed state moved. The columns that kept their brackets
    /// (`kept[word]`) take their bits from `pre` (see
    /// [`column_brackets`]; the block's rows, one word per mask word, needed only where a
    /// word has such columns), without reading their weights.
    fn rebuild_columns_block = rebuild_columns_rows(
        cols: usize,
        r0: usize,
        regrow: bool,
        cut: &[u32],
        kept: &[u64],
        pre: &[u64],
        words: &mut [u64],
        w: &mut [f32],
        h: &mut [f32],
    ) -> (SyncStats, u64)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rebuild_columns_rows<K: Kernels>(
    cols: usize,
    r0: usize,
    regrow: bool,
    cut: &[u32],
    kept: &[u64],
    pre: &[u64],
    words: &mut [u64],
    w: &mut [f32],
    h: &mut [f32],
) -> (SyncStats, u64) {
    let wpr = cols.div_ceil(64);
    let (ts, ti) = cut.split_at(cols);
    let mut st = SyncStats::default();
    // The new rows' parts of the mask fingerprint, for the caches (with regrowth).
    let mut parts = 0;
    let mut take_part = |i: usize, row: &[u64]| {
        if regrow {
            parts ^= row_part(r0 + i, row);
        }
    };
    let lanes = |wi: usize| crate::mask::lanes(cols - wi * 64);
    if kept.iter().enumerate().all(|(wi, &k)| k == lanes(wi)) {
        // Every column kept its bracket (as between refreshes of a settled layer): the new
        // words are those of `pre`, and only the words that differ are visited.
        for (i, ((mw, wr), hr)) in words
            .chunks_mut(wpr)
            .zip(w.chunks_mut(cols))
            .zip(h.chunks_mut(cols))
            .enumerate()
        {
            let pr = &pre[i * wpr..(i + 1) * wpr];
            if mw != pr {
                for (wi, (ow, &new)) in mw.iter_mut().zip(pr).enumerate() {
                    if *ow != new {
                        let (c0, c1) = (wi * 64, (wi * 64 + 64).min(cols));
                        let moved = sync_row(&[*ow], &[new], 1, &mut wr[c0..c1], &mut hr[c0..c1]);
                        st = add(st, moved);
                        *ow = new;
                    }
                }
            }
            take_part(i, mw);
        }
        return (st, parts);
    }
    for (i, ((mw, wr), hr)) in words
        .chunks_mut(wpr)
        .zip(w.chunks_mut(cols))
        .zip(h.chunks_mut(cols))
        .enumerate()
    {
        let r = (r0 + i) as u32;
        for (wi, (ow, &k)) in mw.iter_mut().zip(kept).enumerate() {
            let (c0, c1) = (wi * 64, (wi * 64 + 64).min(cols));
            let old = *ow;
            let from_pre = if k != 0 { pre[i * wpr + wi] & k } else { 0 };
            let new = if k == lanes(wi) {
                from_pre
            } else {
                let sel = K::select_columns(
                    old,
                    &wr[c0..c1],
                    &hr[c0..c1],
                    regrow,
                    r,
                    &ts[c0..c1],
                    &ti[c0..c1],
                    !k,
                );
                from_pre | (sel & !k)
            };
            if new != old {
                st = add(
                    st,
                    sync_row(&[old], &[new], 1, &mut wr[c0..c1], &mut hr[c0..c1]),
                );
                *ow = new;
            }
        }
        take_part(i, mw);
    }
    (st, parts)
}

/// The selection rule of a threshold key as (score bits, last index kept at those bits):
/// a key `(bits, u32::MAX - i)` reaches `thr` when its bits exceed the first, or equal it
/// with `i` at most the second.
#[inline(always)]
pub(crate) fn split_threshold(thr: u64) -> (u32, u32) {
    (
        (thr >> 32) as u32,
        (u64::from(u32::MAX) - (thr & u64::from(u32::MAX))) as u32,
    )
}
