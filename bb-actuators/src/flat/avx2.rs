//! [`Kernels`] for x86-64 CPUs with AVX2 but without AVX-512: a mask word's bytes are the
//! lane masks of eight 8-lane vectors, and comparisons come back as bytes
//! (`vmovmskps`), eight to a word. The compiler's own vectorization of [`Portable`] builds
//! each word's bits lane by lane with variable shifts and horizontal ORs, several times the
//! work of these loops.
//!
//! Score bits are magnitudes (`0..=0x7fff_ffff`), so against a single bound they compare
//! as signed integers; against bounds read from memory (any `u32`) the unsigned order is
//! taken from `max_epu32`. Only called from code compiled with `avx2` (see
//! [`super::rows_flat_block`]).

use super::{
    check_row, count_word, log_inside, prefetch_ahead, score_tail, Inside, Kernels, Portable,
    RowScore,
};
use std::arch::x86_64::*;

/// The AVX2 kernel set.
pub(super) struct Avx2;

/// The live flags of 8 edges (bits 0..8 of `byte`, higher bits ignored), each in its lane's
/// sign bit, which is all that `vmaskmovps` and `vblendvps` look at.
#[inline(always)]
fn live_signs(byte: u32) -> __m256i {
    // SAFETY: AVX2 is the caller's contract (module doc).
    unsafe {
        _mm256_sllv_epi32(
            _mm256_set1_epi32(byte as i32),
            _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
        )
    }
}

/// The 8 values from `at` of a word's edges: weights where `byte` has a bit, shadow values
/// elsewhere with regrowth (without it dead edges are not candidates: zero, and the shadow
/// is not read).
///
/// # Safety
/// `w` and `h` hold at least `at + 8` values; only for code compiled with `avx2`.
#[inline(always)]
unsafe fn load8(w: &[f32], h: &[f32], at: usize, byte: u32, regrow: bool) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let live = live_signs(byte);
        let x = if regrow {
            _mm256_blendv_ps(
                _mm256_loadu_ps(h.as_ptr().add(at)),
                _mm256_loadu_ps(w.as_ptr().add(at)),
                _mm256_castsi256_ps(live),
            )
        } else {
            _mm256_maskload_ps(w.as_ptr().add(at), live)
        };
        _mm256_castps_si256(x)
    }
}

/// The sign bits of the 8 lanes as bits 0..8.
#[inline(always)]
fn bits8(v: __m256i) -> u64 {
    // SAFETY: AVX is the caller's contract (module doc).
    u64::from(unsafe { _mm256_movemask_ps(_mm256_castsi256_ps(v)) } as u8)
}

/// Lanes whose unsigned `a >= b`.
#[inline(always)]
fn ge_u32(a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: AVX2 is the caller's contract (module doc).
    unsafe { _mm256_cmpeq_epi32(_mm256_max_epu32(a, b), a) }
}

/// The signed bound `t` such that, for score bits `s` (at most `i32::MAX`), `s > t` is
/// `s >= lo` (for any `u32` `lo`).
#[inline(always)]
fn at_least_bound(lo: u32) -> i32 {
    lo.min(0x8000_0000).wrapping_sub(1) as i32
}

/// Which of the 64 columns from `c0` lie at or before column `ti`.
#[inline(always)]
fn up_to(c0: u32, ti: u32) -> u64 {
    match ti.checked_sub(c0) {
        None => 0,
        Some(d) if d >= 63 => u64::MAX,
        Some(d) => (2u64 << d) - 1,
    }
}

/// [`Kernels::score_row`] for [`Avx2`], with regrowth (`DEAD`: dead edges are scored by
/// their shadow values) or without, in one loop over the row's whole words; the tail word
/// goes to [`Portable::score`]. A non-finite value is looked for once, at the end, in the
/// largest score bits seen.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn score_row<const DEAD: bool>(
    words: &[u64],
    w: &[f32],
    h: &[f32],
    lo: u32,
    hi: u32,
    bits: &mut [u32],
    keys: &mut [u64],
    tmp: &mut [u64],
) -> RowScore {
    debug_assert!(lo <= hi, "score_row: bracket {lo}..{hi}");
    let cols = w.len();
    let full = cols / 64;
    // Without regrowth dead edges are not candidates: their shadow values are not read.
    let h = if DEAD { h } else { w };
    check_row(words, h, bits, keys, tmp, cols);
    let (mut above_hi, mut n) = (0usize, 0usize);
    // SAFETY: the lengths were checked above (for `wi < full`, `at + 8 <= 64 * full <=
    // cols`, so `load8` has 8 values from `at` and `bits` room for 8); AVX2 is the caller's
    // contract.
    let top = unsafe {
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        let vlo = _mm256_set1_epi32(at_least_bound(lo));
        let vhi = _mm256_set1_epi32(at_least_bound(hi));
        let mut top = _mm256_setzero_si256();
        for wi in 0..full {
            let word = *words.get_unchecked(wi);
            let (mut high, mut above) = (0u64, 0u64);
            for e in 0..8 {
                let at = 64 * wi + 8 * e;
                if e % 2 == 0 {
                    prefetch_ahead(w, h, DEAD, at);
                }
                // Without regrowth the dead lanes load as zero (non-candidates' bits).
                let v = load8(w, h, at, (word >> (8 * e)) as u32, DEAD);
                let sv = _mm256_and_si256(v, abs);
                top = _mm256_max_epu32(top, sv);
                _mm256_storeu_si256(bits.as_mut_ptr().add(at).cast(), sv);
                high |= bits8(_mm256_cmpgt_epi32(sv, vhi)) << (8 * e);
                above |= bits8(_mm256_cmpgt_epi32(sv, vlo)) << (8 * e);
            }
            *keys.get_unchecked_mut(wi) = high;
            above_hi += high.count_ones() as usize;
            let inside = above & !high;
            if inside != 0 {
                n = log_inside(inside, wi, &bits[64 * wi..64 * wi + 64], tmp, n);
            }
        }
        top
    };
    let rs = RowScore {
        // SAFETY: AVX2 is the caller's contract.
        non_finite: bits8(unsafe { _mm256_cmpgt_epi32(top, _mm256_set1_epi32(0x7f7f_ffff)) }) != 0,
        above_hi,
        inside: n,
    };
    score_tail(words, w, h, DEAD, (lo, hi), bits, keys, tmp, rs)
}

impl Kernels for Avx2 {
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
            score_row::<true>(words, w, h, lo, hi, bits, keys, tmp)
        } else {
            score_row::<false>(words, w, h, lo, hi, bits, keys, tmp)
        }
    }

    #[inline(always)]
    fn select(bits: &[u32], c0: u32, ts: u32, ti: u32) -> u64 {
        if bits.len() < 64 {
            return Portable::select(bits, c0, ts, ti);
        }
        let (mut gt, mut eq) = (0u64, 0u64);
        // SAFETY: `bits` holds at least 64 values; AVX2 is the caller's contract.
        unsafe {
            // Score bits are at most `i32::MAX`: none is above a larger `ts`.
            let vgt = _mm256_set1_epi32(ts.min(0x7fff_ffff) as i32);
            let vts = _mm256_set1_epi32(ts as i32);
            for e in 0..8 {
                let s = _mm256_loadu_si256(bits.as_ptr().add(8 * e).cast());
                gt |= bits8(_mm256_cmpgt_epi32(s, vgt)) << (8 * e);
                eq |= bits8(_mm256_cmpeq_epi32(s, vts)) << (8 * e);
            }
        }
        gt | (eq & up_to(c0, ti))
    }

    #[inline(always)]
    fn at_least(bits: &[u32], lo: u32) -> u64 {
        if bits.len() < 64 {
            return Portable::at_least(bits, lo);
        }
        let mut m = 0u64;
        // SAFETY: `bits` holds at least 64 values; AVX2 is the caller's contract.
        unsafe {
            let vlo = _mm256_set1_epi32(at_least_bound(lo));
            for e in 0..8 {
                let s = _mm256_loadu_si256(bits.as_ptr().add(8 * e).cast());
                m |= bits8(_mm256_cmpgt_epi32(s, vlo)) << (8 * e);
            }
        }
        m
    }

    #[inline(always)]
    fn count_words<const N: usize>(
        cols: usize,
        words: &[u64],
        w: &[f32],
        h: &[f32],
        regrow: bool,
        lo: &[u32],
        hi: &[u32],
        pre: &mut [u64],
        key_rows: [u64; N],
        keys: &mut Inside<'_>,
    ) -> bool {
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
        // loop; a non-finite value is looked for once, at the end.
        let mut bits = [[0u32; 64]; N];
        // SAFETY: the lengths were checked above (`wi < full <= wpr`, `at + 8 <= 64 * full
        // <= cols`, so `load8` has 8 values from `n * cols + at`); AVX2 is the caller's
        // contract.
        let top = unsafe {
            let abs = _mm256_set1_epi32(0x7fff_ffff);
            let mut top = _mm256_setzero_si256();
            for wi in 0..full {
                keys.reserve(N);
                let (mut above, mut high) = ([0u64; N], [0u64; N]);
                for e in 0..8 {
                    let at = 64 * wi + 8 * e;
                    let l = _mm256_loadu_si256(lo.as_ptr().add(at).cast());
                    let u = _mm256_loadu_si256(hi.as_ptr().add(at).cast());
                    for n in 0..N {
                        let live = (*words.get_unchecked(n * wpr + wi) >> (8 * e)) as u32;
                        if e % 2 == 0 {
                            prefetch_ahead(w, h, regrow, n * cols + at);
                        }
                        let v = load8(w, h, n * cols + at, live, regrow);
                        let sv = _mm256_and_si256(v, abs);
                        top = _mm256_max_epu32(top, sv);
                        _mm256_storeu_si256(bits[n].as_mut_ptr().add(8 * e).cast(), sv);
                        above[n] |= bits8(ge_u32(sv, l)) << (8 * e);
                        high[n] |= bits8(ge_u32(sv, u)) << (8 * e);
                    }
                }
                for n in 0..N {
                    *pre.get_unchecked_mut(n * wpr + wi) = high[n];
                    keys.stage(64 * wi, above[n] & !high[n], &bits[n], key_rows[n]);
                }
            }
            top
        };
        // SAFETY: AVX2 is the caller's contract.
        if bits8(unsafe { _mm256_cmpgt_epi32(top, _mm256_set1_epi32(0x7f7f_ffff)) }) != 0 {
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
        if [w.len(), h.len(), ts.len(), ti.len()]
            .iter()
            .any(|&n| n < 64)
        {
            return Portable::select_columns(word, w, h, regrow, r, ts, ti, need);
        }
        let mut kept = 0u64;
        // SAFETY: every slice holds at least 64 values (checked above); AVX2 is the
        // caller's contract.
        unsafe {
            let abs = _mm256_set1_epi32(0x7fff_ffff);
            let vr = _mm256_set1_epi32(r as i32);
            for e in 0..8 {
                let at = 8 * e;
                if (need >> at) as u8 == 0 {
                    // No column of these 8 is needed: their values are not read.
                    continue;
                }
                let v = load8(w, h, at, (word >> at) as u32, regrow);
                let sv = _mm256_and_si256(v, abs);
                let t = _mm256_loadu_si256(ts.as_ptr().add(at).cast());
                let i = _mm256_loadu_si256(ti.as_ptr().add(at).cast());
                // Kept: above the threshold, or equal to it at a row no later than its own;
                // that is, not (at most the threshold and not such a tie).
                let tie = _mm256_and_si256(_mm256_cmpeq_epi32(sv, t), ge_u32(i, vr));
                let dropped = _mm256_andnot_si256(tie, ge_u32(t, sv));
                kept |= (!bits8(dropped) & 0xff) << at;
            }
        }
        kept & (word | u64::from(regrow).wrapping_neg())
    }
}
