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
    at_least_bound, check_row, count_word, log_inside, prefetch_ahead, score_tail, Cuts, Inside,
    Kernels, Portable, RowScore,
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

/// The live flags of the 32 edges of a half mask word (`half`), 8 at a time: vector `e`'s
/// lanes hold bits `8 * e..8 * e + 8` in their sign bits. One broadcast serves all four
/// (each is then one variable shift).
#[inline(always)]
fn half_signs(half: u32) -> [__m256i; 4] {
    // SAFETY: AVX2 is the caller's contract (module doc).
    unsafe {
        let b = _mm256_set1_epi32(half as i32);
        [
            _mm256_sllv_epi32(b, _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24)),
            _mm256_sllv_epi32(b, _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16)),
            _mm256_sllv_epi32(b, _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8)),
            _mm256_sllv_epi32(b, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)),
        ]
    }
}

/// The sign bits of four vectors' 32 lanes (`v[0]` first) as bits 0..32: two signed
/// packs keep every sign, one lane permutation puts the bytes back in order, and one
/// `vpmovmskb` reads them (a `vmovmskps` per vector would take three more steps each to
/// place its byte).
#[inline(always)]
fn bits32(v: [__m256i; 4]) -> u64 {
    // SAFETY: AVX2 is the caller's contract (module doc).
    unsafe {
        // Per 128-bit lane: v0, v1 (words), then v0, v1, v2, v3 (bytes), four values each.
        let a = _mm256_packs_epi32(v[0], v[1]);
        let b = _mm256_packs_epi32(v[2], v[3]);
        let c = _mm256_packs_epi16(a, b);
        let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        u64::from(_mm256_movemask_epi8(c) as u32)
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
    unsafe { load8_signs(w, h, at, live_signs(byte), regrow) }
}

/// [`load8`] with the live flags in the lanes' sign bits.
///
/// # Safety
/// As for [`load8`].
#[inline(always)]
unsafe fn load8_signs(w: &[f32], h: &[f32], at: usize, live: __m256i, regrow: bool) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
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
    // cols`, so `load8_signs` has 8 values from `at` and `bits` room for 8); AVX2 is the caller's
    // contract.
    let top = unsafe {
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        let vlo = _mm256_set1_epi32(at_least_bound(lo));
        let vhi = _mm256_set1_epi32(at_least_bound(hi));
        let mut top = _mm256_setzero_si256();
        for wi in 0..full {
            let word = *words.get_unchecked(wi);
            let (mut high, mut above) = (0u64, 0u64);
            for half in 0..2 {
                let live = half_signs((word >> (32 * half)) as u32);
                let zero = _mm256_setzero_si256();
                let (mut ge_lo, mut ge_hi) = ([zero; 4], [zero; 4]);
                for e in 0..4 {
                    let at = 64 * wi + 32 * half + 8 * e;
                    if e % 2 == 0 {
                        prefetch_ahead(w, h, DEAD, at);
                    }
                    // Without regrowth the dead lanes load as zero (non-candidates' bits).
                    let v = load8_signs(w, h, at, live[e], DEAD);
                    let sv = _mm256_and_si256(v, abs);
                    top = _mm256_max_epu32(top, sv);
                    _mm256_storeu_si256(bits.as_mut_ptr().add(at).cast(), sv);
                    // Signs of `bound - s`: see `count_words`.
                    ge_hi[e] = _mm256_sub_epi32(vhi, sv);
                    ge_lo[e] = _mm256_sub_epi32(vlo, sv);
                }
                high |= bits32(ge_hi) << (32 * half);
                above |= bits32(ge_lo) << (32 * half);
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
        cut: Cuts<'_>,
        pre: &mut [u64],
        key_rows: [u64; N],
        keys: &mut Inside<'_>,
    ) -> bool {
        let (wpr, full) = (cols.div_ceil(64), cols / 64);
        let h = if regrow { h } else { w };
        assert!(
            words.len() >= N * wpr
                && w.len().min(h.len()) >= N * cols
                && cut.lo_gt.len().min(cut.hi_gt.len()) >= cols
                && pre.len() >= N * wpr,
            "count_words: short slices"
        );
        // The steps of [`Portable::count_columns`] on every whole word of the rows in one
        // loop, 32 values of a row at a time (one broadcast of their live flags, one mask
        // of each comparison); a non-finite value is looked for once, at the end.
        let mut bits = [[0u32; 64]; N];
        // SAFETY: the lengths were checked above (`wi < full <= wpr`, `at + 8 <= 64 * full
        // <= cols`, so `load8_signs` has 8 values from `n * cols + at` and the bounds 8 from
        // `at`); AVX2 is the caller's contract.
        let top = unsafe {
            let abs = _mm256_set1_epi32(0x7fff_ffff);
            let mut top = _mm256_setzero_si256();
            for wi in 0..full {
                keys.reserve(N);
                let (mut above, mut high) = ([0u64; N], [0u64; N]);
                for half in 0..2 {
                    let c0 = 64 * wi + 32 * half;
                    for n in 0..N {
                        let word = *words.get_unchecked(n * wpr + wi);
                        let live = half_signs((word >> (32 * half)) as u32);
                        let zero = _mm256_setzero_si256();
                        let (mut ge_lo, mut ge_hi) = ([zero; 4], [zero; 4]);
                        for e in 0..4 {
                            let at = c0 + 8 * e;
                            if e % 2 == 0 {
                                prefetch_ahead(w, h, regrow, n * cols + at);
                            }
                            let v = load8_signs(w, h, n * cols + at, live[e], regrow);
                            let sv = _mm256_and_si256(v, abs);
                            top = _mm256_max_epu32(top, sv);
                            let b = bits[n].as_mut_ptr().add(32 * half + 8 * e);
                            _mm256_storeu_si256(b.cast(), sv);
                            let l = _mm256_loadu_si256(cut.lo_gt.as_ptr().add(at).cast());
                            let u = _mm256_loadu_si256(cut.hi_gt.as_ptr().add(at).cast());
                            // The sign of `bound - s` is `s > bound` (no overflow:
                            // `s` is at most `i32::MAX`, a bound at least -1). As a
                            // difference, not a comparison, the compiler keeps the packs
                            // in `bits32` (with comparisons it rebuilds each mask first).
                            ge_lo[e] = _mm256_sub_epi32(l, sv);
                            ge_hi[e] = _mm256_sub_epi32(u, sv);
                        }
                        above[n] |= bits32(ge_lo) << (32 * half);
                        high[n] |= bits32(ge_hi) << (32 * half);
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
        let cut = (cut.lo, cut.hi, &mut bits);
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
