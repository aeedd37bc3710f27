//! Compacted (sparse) inference for pruned dense layers.
//!
//! A [`CsrLayer`] keeps only the live weights of a masked `[out, in]` layer, row by row
//! (compressed sparse rows), with the SP-in rescale folded into the values, so
//! `y = s ⊙ ((W ⊙ M) x) + b` costs work and memory in proportion to the live edges. Column
//! indices are `u16` when the layer has at most 65 536 inputs (6 bytes per live edge instead
//! of 4 per edge dense), `u32` otherwise.

use crate::BbError;
use bb_actuators::{BitMask, EdgeShape};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Column indices of the live weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Columns {
    /// For layers with at most 65 536 inputs.
    U16(Vec<u16>),
    /// For wider layers.
    U32(Vec<u32>),
}

impl Columns {
    fn len(&self) -> usize {
        match self {
            Columns::U16(v) => v.len(),
            Columns::U32(v) => v.len(),
        }
    }
}

/// A pruned dense layer in compressed-sparse-row form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsrLayer {
    out: usize,
    inp: usize,
    /// `row_ptr[o]..row_ptr[o + 1]` indexes row `o`'s live weights.
    row_ptr: Vec<u32>,
    cols: Columns,
    vals: Vec<f32>,
    bias: Option<Vec<f32>>,
}

/// Rows per parallel task (and the cut-off under which one thread does everything).
const ROWS_PER_TASK: usize = 64;
const PARALLEL_MIN_WORK: usize = 1 << 16;

impl CsrLayer {
    /// Compacts `weights` (`[out, in]`) under `mask`, folding the per-row `scale` (the SP-in
    /// rescale, if any) into the values.
    pub fn from_masked(
        weights: &[f32],
        mask: &BitMask,
        scale: Option<&[f32]>,
        bias: Option<&[f32]>,
    ) -> Result<Self, BbError> {
        let (out, inp) = (mask.rows(), mask.cols());
        let shape = EdgeShape::dense(out, inp);
        if weights.len() != shape.weight_len() {
            return Err(BbError::config(
                "weights",
                format!("{} values for a [{out}, {inp}] layer", weights.len()),
            ));
        }
        if scale.is_some_and(|s| s.len() != out) {
            return Err(BbError::config("scale", format!("expected {out} factors")));
        }
        if bias.is_some_and(|b| b.len() != out) {
            return Err(BbError::config("bias", format!("expected {out} values")));
        }
        let nnz = mask.count();
        if nnz > u32::MAX as usize {
            return Err(BbError::config("mask", "more than 2^32 live edges"));
        }
        let mut row_ptr = Vec::with_capacity(out + 1);
        let mut vals = Vec::with_capacity(nnz);
        let mut idx: Vec<u32> = Vec::with_capacity(nnz);
        row_ptr.push(0u32);
        for o in 0..out {
            let s = scale.map_or(1.0, |s| s[o]);
            for (wi, &w) in mask.row_words(o).iter().enumerate() {
                let mut bits = w;
                while bits != 0 {
                    let c = wi * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    idx.push(c as u32);
                    vals.push(weights[o * inp + c] * s);
                }
            }
            row_ptr.push(vals.len() as u32);
        }
        let cols = if inp <= 1 << 16 {
            Columns::U16(idx.into_iter().map(|c| c as u16).collect())
        } else {
            Columns::U32(idx)
        };
        Ok(Self {
            out,
            inp,
            row_ptr,
            cols,
            vals,
            bias: bias.map(<[f32]>::to_vec),
        })
    }

    /// Output units.
    pub fn out(&self) -> usize {
        self.out
    }

    /// Input units.
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// Live weights.
    pub fn nnz(&self) -> usize {
        self.vals.len()
    }

    /// Row pointers, column indices (as u32) and values, for export.
    pub fn parts(&self) -> (&[u32], Vec<u32>, &[f32]) {
        let cols = match &self.cols {
            Columns::U16(v) => v.iter().map(|&c| c as u32).collect(),
            Columns::U32(v) => v.clone(),
        };
        (&self.row_ptr, cols, &self.vals)
    }

    /// Rebuilds a layer from exported parts (checked: consistent lengths, columns in range
    /// and strictly increasing within each row).
    pub fn from_parts(
        out: usize,
        inp: usize,
        row_ptr: Vec<u32>,
        cols: Vec<u32>,
        vals: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Self, BbError> {
        let ok = row_ptr.len() == out + 1
            && row_ptr.first() == Some(&0)
            && row_ptr.windows(2).all(|w| w[0] <= w[1])
            && *row_ptr.last().unwrap_or(&0) as usize == vals.len()
            && cols.len() == vals.len()
            && cols.iter().all(|&c| (c as usize) < inp)
            // Each row's columns strictly increasing (the blocked kernels count on it).
            && row_ptr.windows(2).all(|w| {
                cols[w[0] as usize..w[1] as usize].windows(2).all(|p| p[0] < p[1])
            })
            && bias.as_ref().is_none_or(|b| b.len() == out);
        if !ok {
            return Err(BbError::Parse(format!(
                "inconsistent sparse layer [{out}, {inp}]"
            )));
        }
        let cols = if inp <= 1 << 16 {
            Columns::U16(cols.into_iter().map(|c| c as u16).collect())
        } else {
            Columns::U32(cols)
        };
        debug_assert_eq!(cols.len(), vals.len());
        Ok(Self {
            out,
            inp,
            row_ptr,
            cols,
            vals,
            bias,
        })
    }

    /// `y = W x + b` for a batch: `x` is `[batch, in]`, `y` is `[batch, out]` (row-major).
    /// `scratch` holds the transposed input and output between calls.
    pub fn forward(
        &self,
        x: &[f32],
        batch: usize,
        y: &mut [f32],
        scratch: &mut SparseScratch,
    ) -> Result<(), BbError> {
        if x.len() != batch * self.inp || y.len() != batch * self.out {
            return Err(BbError::config(
                "x",
                format!(
                    "expected x [{batch}, {}] and y [{batch}, {}], got {} and {} values",
                    self.inp,
                    self.out,
                    x.len(),
                    y.len()
                ),
            ));
        }
        if batch == 1 {
            self.rows_into(x, 1, y);
        } else {
            // Transpose to [in, batch] so each live weight reads one contiguous batch vector.
            scratch.xt.resize(self.inp * batch, 0.0);
            transpose(x, batch, self.inp, &mut scratch.xt);
            scratch.yt.resize(self.out * batch, 0.0);
            let mut yt = std::mem::take(&mut scratch.yt);
            self.rows_into(&scratch.xt, batch, &mut yt);
            transpose(&yt, self.out, batch, y);
            scratch.yt = yt;
        }
        Ok(())
    }

    /// `yt[o, :] = sum_k val_k * xt[col_k, :] + b_o` with `xt` `[in, batch]`, `yt` `[out, batch]`.
    fn rows_into(&self, xt: &[f32], batch: usize, yt: &mut [f32]) {
        let work = self.nnz() * batch;
        let chunk = ROWS_PER_TASK * batch;
        let run =
            |(t, block): (usize, &mut [f32])| csr_block(self, t * ROWS_PER_TASK, xt, batch, block);
        if work < PARALLEL_MIN_WORK {
            yt.chunks_mut(chunk).enumerate().for_each(run);
        } else {
            yt.par_chunks_mut(chunk).enumerate().for_each(run);
        }
    }
}

/// Side of the square tiles of [`transpose`].
const TRANSPOSE_TILE: usize = 16;

/// `dst` (`[cols, rows]`) = `src` (`[rows, cols]`) transposed, in parallel over tiles of
/// `dst` rows when there is enough of it.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = TRANSPOSE_TILE;
    let run = |(t, chunk): (usize, &mut [f32])| transpose_tile(src, rows, cols, t * B, chunk);
    if rows * cols < PARALLEL_MIN_WORK {
        dst.chunks_mut(B * rows).enumerate().for_each(run);
    } else {
        dst.par_chunks_mut(B * rows).enumerate().for_each(run);
    }
}

bb_actuators::multiversion! {
    /// Rows `c0..` of the transposed `src` into `chunk`, in square tiles so that both sides
    /// are read and written a cache line at a time.
    fn transpose_tile(src: &[f32], rows: usize, cols: usize, c0: usize, chunk: &mut [f32]) {
        const B: usize = TRANSPOSE_TILE;
        let width = chunk.len() / rows;
        for r0 in (0..rows).step_by(B) {
            let r1 = (r0 + B).min(rows);
            for (c, line) in chunk.chunks_exact_mut(rows).enumerate().take(width) {
                for (r, d) in (r0..r1).zip(&mut line[r0..r1]) {
                    *d = src[r * cols + c0 + c];
                }
            }
        }
    }
}

/// Rows `o0..` of `yt` (one `batch`-long slice per row).
fn csr_block(layer: &CsrLayer, o0: usize, xt: &[f32], batch: usize, block: &mut [f32]) {
    if batch == 1 {
        csr_single(layer, o0, xt, block);
    } else if column_block(layer, batch) >= layer.inp {
        csr_rows(layer, o0, xt, batch, block);
    } else {
        csr_tiled(layer, o0, xt, batch, block);
    }
}

fn bias_of(layer: &CsrLayer, o: usize) -> f32 {
    layer.bias.as_ref().map_or(0.0, |v| v[o])
}

bb_actuators::multiversion! {
    /// Rows `o0..` for a single input vector.
    fn csr_single(layer: &CsrLayer, o0: usize, x: &[f32], block: &mut [f32]) {
        for (r, acc) in block.iter_mut().enumerate() {
            let o = o0 + r;
            let (a, b) = (layer.row_ptr[o] as usize, layer.row_ptr[o + 1] as usize);
            *acc = match &layer.cols {
                Columns::U16(c) => row_dot1(&c[a..b], &layer.vals[a..b], x),
                Columns::U32(c) => row_dot1(&c[a..b], &layer.vals[a..b], x),
            } + bias_of(layer, o);
        }
    }
}

bb_actuators::multiversion! {
    fused LANES;
    /// Rows `o0..` for a batch whose transposed input fits in cache, one row at a time.
    fn csr_rows(layer: &CsrLayer, o0: usize, xt: &[f32], batch: usize, block: &mut [f32]) {
        for (r, acc) in block.chunks_mut(batch).enumerate() {
            let o = o0 + r;
            let (a, b) = (layer.row_ptr[o] as usize, layer.row_ptr[o + 1] as usize);
            let bias = Some(bias_of(layer, o));
            match &layer.cols {
                Columns::U16(c) => row_tiles::<_, LANES>(&c[a..b], &layer.vals[a..b], None, bias, xt, batch, acc),
                Columns::U32(c) => row_tiles::<_, LANES>(&c[a..b], &layer.vals[a..b], None, bias, xt, batch, acc),
            };
        }
    }
}

bb_actuators::multiversion! {
    fused LANES;
    /// Rows `o0..` for a batch (`xt` is `[in, batch]`).
    ///
    /// Column blocks: every row of the task adds the products of its live weights in one
    /// block of inputs before the next block is touched, so that block of the input stays
    /// in the nearest cache while the rows reuse it.
    fn csr_tiled(layer: &CsrLayer, o0: usize, xt: &[f32], batch: usize, block: &mut [f32]) {
        let rows = block.len() / batch;
        let kb = column_block(layer, batch);
        let mut cur = [0usize; ROWS_PER_TASK];
        for (r, acc) in block.chunks_mut(batch).enumerate() {
            acc.fill(bias_of(layer, o0 + r));
            cur[r] = layer.row_ptr[o0 + r] as usize;
        }
        let mut c_end = 0;
        while c_end < layer.inp {
            c_end = (c_end + kb).min(layer.inp);
            for (r, acc) in block.chunks_mut(batch).enumerate().take(rows) {
                if r + PREFETCH_ROWS < rows {
                    prefetch_segment(layer, o0 + r + PREFETCH_ROWS, cur[r + PREFETCH_ROWS], kb);
                }
                let (a, b) = (cur[r], layer.row_ptr[o0 + r + 1] as usize);
                cur[r] = match &layer.cols {
                    Columns::U16(c) => row_tiles::<_, LANES>(&c[a..b], &layer.vals[a..b], Some((c_end, kb)), None, xt, batch, acc),
                    Columns::U32(c) => row_tiles::<_, LANES>(&c[a..b], &layer.vals[a..b], Some((c_end, kb)), None, xt, batch, acc),
                } + a;
            }
        }
    }
}

/// How many rows ahead [`csr_tiled`] asks for a row's next live weights.
const PREFETCH_ROWS: usize = 4;

/// Asks for the live weights of row `o` from position `from` that one column block of `kb`
/// inputs is likely to hold (the row's share of them, and a few more). Going down the rows
/// block by block, a row's weights are read in short runs a whole task's rows apart, which
/// the CPU's own prefetchers do not see coming.
#[inline(always)]
fn prefetch_segment(layer: &CsrLayer, o: usize, from: usize, kb: usize) {
    let end = layer.row_ptr[o + 1] as usize;
    let len = end - layer.row_ptr[o] as usize;
    let next = from..(from + len * kb / layer.inp.max(1) + 16).min(end);
    bb_actuators::prefetch_near(&layer.vals[next.clone()]);
    match &layer.cols {
        Columns::U16(c) => bb_actuators::prefetch_near(&c[next]),
        Columns::U32(c) => bb_actuators::prefetch_near(&c[next]),
    }
}

/// Inputs per column block.
///
/// All inputs are taken at once while their transposed batch vectors fill at most 32 KiB, the
/// nearest cache. Beyond that, narrow batches (under 64 lanes) take blocks of about 32 KiB
/// when such a block holds at least 128 live weights per row on average: enough work to pay
/// for going down the task's rows once per block. Sparser layers take all inputs while they
/// fill at most half of a core's mid-level cache (256 KiB, for CPUs with 512 KiB). Reading
/// all inputs from the mid-level cache depends on what else fills it: 4096x4096 and
/// 1024x1024 layers at density 0.5 and batch 16 have read 2x their usual time that way after
/// the rest of `bb bench` had run in the same process (results/bench.md).
///
/// Wide batches (64 lanes or more, several cache lines per live weight) always work on
/// blocks of about 32 KiB. Blocks hold at least about 16 live weights per row on average.
fn column_block(layer: &CsrLayer, batch: usize) -> usize {
    const NEAR: usize = 32 * 1024;
    let density = layer.nnz() as f64 / (layer.out * layer.inp).max(1) as f64;
    let by_cache = (NEAR / 4) / batch.max(1);
    if layer.inp * batch * 4 <= NEAR {
        return layer.inp.max(1);
    }
    if batch < 64 {
        if by_cache as f64 * density >= 128.0 {
            return by_cache.clamp(16, layer.inp.max(16));
        }
        if layer.inp * batch * 4 <= 256 * 1024 {
            return layer.inp.max(1);
        }
    }
    let by_work = (16.0 / density.max(1e-6)).ceil() as usize;
    by_cache.max(by_work).clamp(16, layer.inp.max(16))
}

/// One output row with a single input: `sum_k vals[k] * x[cols[k]]`.
#[inline(always)]
fn row_dot1<C: Copy + Into<u32>>(cols: &[C], vals: &[f32], xt: &[f32]) -> f32 {
    // Four independent sums keep the FMA pipes busy.
    let mut s = [0.0f32; 4];
    let (cq, cr) = cols.split_at(cols.len() / 4 * 4);
    let (vq, vr) = vals.split_at(cq.len());
    for (c4, v4) in cq.chunks_exact(4).zip(vq.chunks_exact(4)) {
        for l in 0..4 {
            s[l] += v4[l] * xt[c4[l].into() as usize];
        }
    }
    let mut t = (s[0] + s[1]) + (s[2] + s[3]);
    for (&c, &v) in cr.iter().zip(vr) {
        t += v * xt[c.into() as usize];
    }
    t
}

/// Adds `vals[k] * xt[cols[k] * batch + b]` to `acc[b]` for the leading live weights of a row
/// whose columns are below `c_end.0` (all of them without one; the block the columns come
/// from is `c_end.1` wide); returns how many that was.
/// With `bias`, the sums start from it instead of from `acc`.
#[inline(always)]
fn row_tiles<C: Copy + Into<u32>, const LANES: usize>(
    cols: &[C],
    vals: &[f32],
    c_end: Option<(usize, usize)>,
    bias: Option<f32>,
    xt: &[f32],
    batch: usize,
    acc: &mut [f32],
) -> usize {
    // The columns are distinct and sorted, so at most `width` of them lie in a block that
    // is `width` wide: counting those below the end needs no search, and whole runs of 16
    // below it are known from their last.
    let n = c_end.map_or(cols.len(), |(e, width)| {
        let head = &cols[..cols.len().min(width)];
        let below = |c: &C| ((*c).into() as usize) < e;
        let mut n = 0;
        for run in head.chunks(16) {
            if run.last().is_some_and(below) {
                n += run.len();
            } else {
                n += run.iter().filter(|c| below(c)).count();
                break;
            }
        }
        n
    });
    let (cols, vals) = (&cols[..n], &vals[..n]);
    if n == 0 && bias.is_none() {
        return 0;
    }
    // Batch tiles of fixed width keep the accumulators in registers; narrow tiles split a
    // row's live weights over several partial sums (P), so that consecutive multiply-adds
    // do not wait on each other.
    let mut b0 = 0;
    if LANES >= 16 {
        while batch - b0 >= 128 {
            tile::<C, 128, 1, true>(cols, vals, xt, batch, b0, bias, &mut acc[b0..b0 + 128]);
            b0 += 128;
        }
    }
    if LANES >= 16 {
        narrow_tiles::<C, true, true>(cols, vals, xt, batch, b0, bias, acc);
    } else if LANES >= 8 {
        narrow_tiles::<C, true, false>(cols, vals, xt, batch, b0, bias, acc);
    } else {
        narrow_tiles::<C, false, false>(cols, vals, xt, batch, b0, bias, acc);
    }
    n
}

/// [`row_tiles`]' tiles of 64 lanes and narrower, from lane `b0` to the end of the batch.
/// With 16-lane registers (`WIDE`) the 32- and 16-lane tiles keep 64 partial sums; with
/// narrower ones they keep 32 or 16: the compiler leaves 64 split over several sums in
/// memory, lane by lane, for 8-lane registers (a 4096x4096 layer at density 0.5 and batch
/// 16 took 1.7x the dense layer's time on an AVX2 CPU, against 0.5x with 32 sums).
#[inline(always)]
fn narrow_tiles<C: Copy + Into<u32>, const F: bool, const WIDE: bool>(
    cols: &[C],
    vals: &[f32],
    xt: &[f32],
    batch: usize,
    mut b0: usize,
    bias: Option<f32>,
    acc: &mut [f32],
) {
    while batch - b0 >= 64 {
        tile::<C, 64, 1, F>(cols, vals, xt, batch, b0, bias, &mut acc[b0..b0 + 64]);
        b0 += 64;
    }
    while batch - b0 >= 32 {
        let out = &mut acc[b0..b0 + 32];
        if WIDE {
            tile::<C, 32, 2, F>(cols, vals, xt, batch, b0, bias, out);
        } else {
            tile::<C, 32, 1, F>(cols, vals, xt, batch, b0, bias, out);
        }
        b0 += 32;
    }
    while batch - b0 >= 16 {
        let out = &mut acc[b0..b0 + 16];
        if WIDE {
            tile::<C, 16, 4, F>(cols, vals, xt, batch, b0, bias, out);
        } else {
            tile::<C, 16, 2, F>(cols, vals, xt, batch, b0, bias, out);
        }
        b0 += 16;
    }
    while batch - b0 >= 4 {
        tile::<C, 4, 4, F>(cols, vals, xt, batch, b0, bias, &mut acc[b0..b0 + 4]);
        b0 += 4;
    }
    while b0 < batch {
        tile::<C, 1, 4, F>(cols, vals, xt, batch, b0, bias, &mut acc[b0..b0 + 1]);
        b0 += 1;
    }
}

/// Adds the products of a row's live weights to `T` batch lanes from `b0` on, with `P`
/// partial sums (live weight `k` goes to sum `k % P`, the tail to the first), added
/// pairwise at the end.
#[inline(always)]
fn tile<C: Copy + Into<u32>, const T: usize, const P: usize, const F: bool>(
    cols: &[C],
    vals: &[f32],
    xt: &[f32],
    batch: usize,
    b0: usize,
    bias: Option<f32>,
    out: &mut [f32],
) {
    let x_at = |c: C| -> &[f32; T] {
        xt[c.into() as usize * batch + b0..][..T]
            .try_into()
            .expect("tile width")
    };
    let start: [f32; T] = match bias {
        Some(b) => [b; T],
        None => out.try_into().expect("tile width"),
    };
    if P == 1 {
        // One sum: the plain loop, whose accumulators stay in registers.
        let mut acc = start;
        for (&c, &v) in cols.iter().zip(vals) {
            let x = x_at(c);
            for l in 0..T {
                acc[l] = madd::<F>(v, x[l], acc[l]);
            }
        }
        out.copy_from_slice(&acc);
        return;
    }
    let mut acc = [[0.0f32; T]; P];
    acc[0] = start;
    let (cq, cr) = cols.split_at(cols.len() / P * P);
    let (vq, vr) = vals.split_at(cq.len());
    for (c, v) in cq.chunks_exact(P).zip(vq.chunks_exact(P)) {
        for p in 0..P {
            let x = x_at(c[p]);
            for l in 0..T {
                acc[p][l] = madd::<F>(v[p], x[l], acc[p][l]);
            }
        }
    }
    for (&c, &v) in cr.iter().zip(vr) {
        let x = x_at(c);
        for l in 0..T {
            acc[0][l] = madd::<F>(v, x[l], acc[0][l]);
        }
    }
    let mut width = P;
    while width > 1 {
        width /= 2;
        let (low, high) = acc.split_at_mut(width);
        for (a, b) in low.iter_mut().zip(high.iter()) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }
    out.copy_from_slice(&acc[0]);
}

/// `a * b + c`, fused (rounded once) with `F`.
#[inline(always)]
fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        c + a * b
    }
}

/// Buffers reused by [`CsrLayer::forward`].
#[derive(Debug, Default, Clone)]
pub struct SparseScratch {
    xt: Vec<f32>,
    yt: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row over `inp` inputs with every `step`-th one live.
    fn strided(inp: usize, step: usize) -> CsrLayer {
        let cols: Vec<u32> = (0..inp as u32).step_by(step).collect();
        let n = cols.len();
        CsrLayer::from_parts(1, inp, vec![0, n as u32], cols, vec![1.0; n], None).unwrap()
    }

    /// Narrow batches go through the inputs in blocks that stay in the nearest cache when the
    /// layer is wide and dense enough, all at once otherwise; wide batches always in blocks.
    #[test]
    fn column_blocks_follow_width_density_and_batch() {
        // 4096 inputs at batch 16: 256 KiB; blocks of 512 inputs (32 KiB) at density 0.5
        // (256 live weights per row and block) and 0.25 (128), all inputs at 0.1 (51) and
        // 0.125 (64).
        assert_eq!(column_block(&strided(4096, 2), 16), 512);
        assert_eq!(column_block(&strided(4096, 4), 16), 512);
        assert_eq!(column_block(&strided(4096, 10), 16), 4096);
        assert_eq!(column_block(&strided(4096, 8), 16), 4096);
        // 32 KiB of inputs or less: all at once, however dense; more: blocks.
        assert_eq!(column_block(&strided(512, 1), 16), 512);
        assert_eq!(column_block(&strided(1024, 1), 16), 512);
        // More than half the mid-level cache and sparse: blocks of at least 16 live weights.
        assert_eq!(column_block(&strided(16384, 10), 16), 512);
        assert_eq!(column_block(&strided(16384, 128), 16), 2048);
        // Batch 128: 64 inputs per 32 KiB, more where they hold fewer than 16 live weights.
        assert_eq!(column_block(&strided(4096, 2), 128), 64);
        assert_eq!(column_block(&strided(4096, 8), 128), 128);
        assert_eq!(column_block(&strided(32, 1), 128), 32);
    }
}
