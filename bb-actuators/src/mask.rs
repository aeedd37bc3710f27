use serde::{Deserialize, Serialize};

/// A binary mask over an `[rows, cols]` edge matrix, stored at 1 bit per edge.
///
/// Each row starts on a fresh `u64` word so that rows can be processed independently (and
/// in parallel); the padding bits at the end of a row are always zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitMask {
    rows: usize,
    cols: usize,
    words_per_row: usize,
    bits: Vec<u64>,
}

impl BitMask {
    /// A mask with every edge live.
    pub fn full(rows: usize, cols: usize) -> Self {
        let mut m = Self::empty(rows, cols);
        for r in 0..rows {
            m.fill_row(r, true);
        }
        m
    }

    /// A mask with every edge dead.
    pub fn empty(rows: usize, cols: usize) -> Self {
        let words_per_row = cols.div_ceil(64);
        Self {
            rows,
            cols,
            words_per_row,
            bits: vec![0; rows * words_per_row],
        }
    }

    /// Builds a mask from 0/1 bytes in row-major order (any non-zero byte is live).
    ///
    /// Returns `None` if `values.len() != rows * cols`.
    pub fn from_bytes(rows: usize, cols: usize, values: &[u8]) -> Option<Self> {
        if values.len() != rows * cols {
            return None;
        }
        let mut m = Self::empty(rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                if values[r * cols + c] != 0 {
                    m.set(r, c, true);
                }
            }
        }
        Some(m)
    }

    /// The mask as 0/1 bytes in row-major order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(u8::from(self.get(r, c)));
            }
        }
        out
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of `u64` words per row.
    pub fn words_per_row(&self) -> usize {
        self.words_per_row
    }

    /// Bytes used by the bit storage.
    pub fn storage_bytes(&self) -> usize {
        self.bits.len() * 8
    }

    /// Whether edge `(r, c)` is live.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> bool {
        debug_assert!(r < self.rows && c < self.cols);
        (self.bits[r * self.words_per_row + c / 64] >> (c % 64)) & 1 == 1
    }

    /// Sets edge `(r, c)`.
    #[inline]
    pub fn set(&mut self, r: usize, c: usize, live: bool) {
        debug_assert!(r < self.rows && c < self.cols);
        let w = &mut self.bits[r * self.words_per_row + c / 64];
        let b = 1u64 << (c % 64);
        if live {
            *w |= b;
        } else {
            *w &= !b;
        }
    }

    /// Sets every edge of row `r`.
    pub fn fill_row(&mut self, r: usize, live: bool) {
        let cols = self.cols;
        fill_words(self.row_words_mut(r), cols, live);
    }

    /// The words of row `r`.
    #[inline]
    pub fn row_words(&self, r: usize) -> &[u64] {
        &self.bits[r * self.words_per_row..(r + 1) * self.words_per_row]
    }

    /// The words of row `r`, mutably. Callers must keep the padding bits zero.
    #[inline]
    pub fn row_words_mut(&mut self, r: usize) -> &mut [u64] {
        &mut self.bits[r * self.words_per_row..(r + 1) * self.words_per_row]
    }

    /// All words, row after row (for parallel per-row processing with `chunks_mut`).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.bits
    }

    /// All words, row after row.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Live edges in row `r` (the fan-in of output unit `r`).
    pub fn row_count(&self, r: usize) -> usize {
        popcount(self.row_words(r))
    }

    /// Live edges in column `c` (the fan-out of input unit `c` into this layer).
    pub fn col_count(&self, c: usize) -> usize {
        (0..self.rows).filter(|&r| self.get(r, c)).count()
    }

    /// Writes the live count of every row into `out` (`len == rows`).
    pub fn row_counts_into(&self, out: &mut [u32]) {
        for (r, o) in out.iter_mut().enumerate().take(self.rows) {
            *o = self.row_count(r) as u32;
        }
    }

    /// Writes the live count of every column into `out` (`len == cols`).
    pub fn col_counts_into(&self, out: &mut [u32]) {
        let (wpr, cols) = (self.words_per_row, self.cols);
        if self.bits.len() < 1 << 16 || wpr < 2 {
            col_counts(&self.bits, wpr, 0, cols, out);
            return;
        }
        // Large masks: word columns split over the pool, each counting its own 64 columns.
        use rayon::prelude::*;
        let span = wpr.div_ceil(rayon::current_num_threads().max(1));
        out[..cols]
            .par_chunks_mut(64 * span)
            .enumerate()
            .for_each(|(i, o)| col_counts(&self.bits, wpr, i * span, cols, o));
    }

    /// Total live edges.
    pub fn count(&self) -> usize {
        popcount(&self.bits)
    }

    /// Live fraction of edges (1 for an empty shape).
    pub fn density(&self) -> f64 {
        let n = self.rows * self.cols;
        if n == 0 {
            1.0
        } else {
            self.count() as f64 / n as f64
        }
    }

    /// Number of edges whose state differs between `self` and `other` (same shape).
    pub fn hamming(&self, other: &BitMask) -> usize {
        debug_assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        self.bits
            .iter()
            .zip(&other.bits)
            .map(|(a, b)| (a ^ b).count_ones() as usize)
            .sum()
    }
}

crate::multiversion! {
    /// Set bits in `words` (with the CPU's population-count instruction where it has one).
    fn popcount(words: &[u64]) -> usize {
        words.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// Column sums of a row-major bit matrix from word column `w0` on: adds bit `b` of every
/// row's word `wi` to `out[(wi - w0) * 64 + b]`, for as many word columns as `out` covers.
/// On CPUs with AVX-512 (F and BW), eight word columns at a time go down the rows: runs of
/// 15 rows are summed in bit planes, whose words then add their weights to byte counters
/// held in registers (widened into `out` every 255 rows); elsewhere (and for the last word
/// columns) [`col_counts_planes`].
pub(crate) fn col_counts(bits: &[u64], wpr: usize, w0: usize, cols: usize, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
        let groups = out.len().min(cols - w0 * 64) / 512;
        // SAFETY: the CPU has AVX-512F and BW (checked just above).
        unsafe { col_counts_avx512(bits, wpr, w0, &mut out[..groups * 512]) };
        let done = groups * 512;
        col_counts_planes(bits, wpr, w0 + groups * 8, cols, &mut out[done..]);
        return;
    }
    col_counts_planes(bits, wpr, w0, cols, out)
}

/// [`col_counts`] for whole groups of eight word columns (`out.len()` a multiple of 512).
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn col_counts_avx512(bits: &[u64], wpr: usize, w0: usize, out: &mut [u32]) {
    use std::arch::x86_64::*;
    for (g, o) in out.chunks_exact_mut(512).enumerate() {
        let wi = w0 + 8 * g;
        o.fill(0);
        // Byte counters overflow past 255 rows: blocks of 255, widened into `o` after each.
        for block in bits.chunks(255 * wpr) {
            let mut acc = [_mm512_setzero_si512(); 8];
            // Runs of up to 15 rows are first added up in four bit planes (a ripple-carry
            // adder on the eight words of a row at once), then each plane's words are the
            // lane masks of one byte addition of its weight.
            for run in block.chunks(15 * wpr) {
                let mut p = [_mm512_setzero_si512(); 4];
                for row in run.chunks_exact(wpr) {
                    let words: &[u64; 8] = row[wi..wi + 8].try_into().expect("eight words");
                    // SAFETY: eight words are readable at `words`.
                    let mut carry = unsafe { _mm512_loadu_epi64(words.as_ptr().cast()) };
                    for plane in &mut p {
                        let next = _mm512_and_si512(*plane, carry);
                        *plane = _mm512_xor_si512(*plane, carry);
                        carry = next;
                    }
                }
                let mut planes = [[0u64; 8]; 4];
                for (dst, v) in planes.iter_mut().zip(&p) {
                    // SAFETY: `dst` holds eight words.
                    unsafe { _mm512_storeu_epi64(dst.as_mut_ptr().cast(), *v) };
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    for (k, plane) in planes.iter().enumerate() {
                        *a = _mm512_mask_add_epi8(*a, plane[j], *a, _mm512_set1_epi8(1 << k));
                    }
                }
            }
            for (a, d) in acc.iter().zip(o.chunks_exact_mut(64)) {
                let quarters = [
                    _mm512_extracti32x4_epi32::<0>(*a),
                    _mm512_extracti32x4_epi32::<1>(*a),
                    _mm512_extracti32x4_epi32::<2>(*a),
                    _mm512_extracti32x4_epi32::<3>(*a),
                ];
                for (q, d) in quarters.iter().zip(d.chunks_exact_mut(16)) {
                    // SAFETY: `d` holds 16 values.
                    unsafe {
                        let p = d.as_mut_ptr().cast();
                        let sum = _mm512_add_epi32(_mm512_loadu_epi32(p), _mm512_cvtepu8_epi32(*q));
                        _mm512_storeu_epi32(p, sum);
                    }
                }
            }
        }
    }
}

/// Word columns that [`col_counts_planes`] takes down the rows together.
const PLANE_WORDS: usize = 4;

crate::multiversion! {
    /// [`col_counts`] [`PLANE_WORDS`] word columns (half a cache line of each row) at a time,
    /// down the rows: runs of up to 255 rows are summed in eight bit planes (a ripple-carry
    /// adder on those words of a row at once, one 256-bit vector per plane, so that the
    /// planes stay in registers), and each plane's bits then add their weight to the
    /// columns' counts in a branch-free loop over all 64 lanes of each word, which
    /// vectorizes. (Going down the rows one word column at a time would read every cache
    /// line of the mask eight times; the other half of a line is read again from the
    /// mid-level cache, as a run of 255 rows of a 4096-column mask is 128 KiB.)
    fn col_counts_planes(bits: &[u64], wpr: usize, w0: usize, cols: usize, out: &mut [u32]) {
        const G: usize = PLANE_WORDS;
        let mut acc = [0u32; 64 * G];
        for (g, o) in out.chunks_mut(64 * G).enumerate() {
            let wi = w0 + G * g;
            acc.fill(0);
            for run in bits.chunks(255 * wpr) {
                let mut planes = [[0u64; G]; 8];
                for row in run.chunks_exact(wpr) {
                    // (A copy of a runtime length would be a library call per row.)
                    let mut carry = match row[wi..].first_chunk::<G>() {
                        Some(c) => *c,
                        None => std::array::from_fn(|j| row.get(wi + j).copied().unwrap_or(0)),
                    };
                    for plane in &mut planes {
                        for (p, c) in plane.iter_mut().zip(&mut carry) {
                            let next = *p & *c;
                            *p ^= *c;
                            *c = next;
                        }
                    }
                }
                for (k, plane) in planes.iter().enumerate() {
                    for (&w, a) in plane.iter().zip(acc.chunks_exact_mut(64)) {
                        for (b, a) in a.iter_mut().enumerate() {
                            *a += (((w >> b) & 1) as u32) << k;
                        }
                    }
                }
            }
            let n = (cols - wi * 64).min(o.len()).min(64 * G);
            o[..n].copy_from_slice(&acc[..n]);
        }
    }
}

/// The mask of the first `n` lanes of a word (all of them from 64 on).
#[inline(always)]
pub(crate) fn lanes(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

/// Sets the first `cols` bits of `words` to `live` and the padding bits to zero.
pub(crate) fn fill_words(words: &mut [u64], cols: usize, live: bool) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = if live {
            lanes(cols.saturating_sub(i * 64))
        } else {
            0
        };
    }
}

/// For each byte value, eight lane masks: all ones where the byte's bit is set, else zero.
static BYTE_LANES: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut v = 0;
    while v < 256 {
        let mut b = 0;
        while b < 8 {
            if (v >> b) & 1 == 1 {
                t[v][b] = u32::MAX;
            }
            b += 1;
        }
        v += 1;
    }
    t
};

/// The eight bits of `byte` as lane masks (lane `b` is all ones if bit `b` is set, else
/// zero). ANDing an `f32`'s bits with its lane keeps the value or makes it `+0.0`; loops
/// written that way vectorize to one load, AND and store per eight values.
#[inline]
pub fn byte_lanes(byte: u8) -> &'static [u32; 8] {
    &BYTE_LANES[byte as usize]
}
