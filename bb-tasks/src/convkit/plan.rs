//! Geometry of a sliding window over a channel-major activation, and the row tables built
//! from it: the im2col table of a convolution (as runs of contiguous rows), the window table
//! of max-pooling and the table of nearest upsampling.
//!
//! An activation of `C` channels over a `D x H x W` grid is a `(C·D·H·W, B)` matrix: one row
//! per (channel, position), the `B` samples of the batch contiguous in the row. Every table
//! here maps rows to rows, so it does not depend on the batch size.

use anyhow::{bail, ensure, Result};

/// A sliding window: `c` channels over an input grid `[d, h, w]`, window `[kd, kh, kw]`,
/// per-dimension stride and zero padding, and the output grid it produces.
///
/// 2-D geometries have `d = kd = stride[0] = 1` and `pad[0] = 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geom {
    /// Input channels.
    pub c: usize,
    /// Input grid `[d, h, w]`.
    pub inp: [usize; 3],
    /// Window `[kd, kh, kw]`.
    pub k: [usize; 3],
    /// Stride per dimension.
    pub stride: [usize; 3],
    /// Zero padding per dimension (both sides).
    pub pad: [usize; 3],
    /// Output grid `[do, ho, wo]`.
    pub out: [usize; 3],
}

impl Geom {
    /// Checks the parameters and computes the output grid
    /// (`out = (in + 2 pad - k) / stride + 1` per dimension). `what` names the layer in errors.
    pub fn new(
        what: &str,
        c: usize,
        inp: [usize; 3],
        k: [usize; 3],
        stride: [usize; 3],
        pad: [usize; 3],
    ) -> Result<Self> {
        ensure!(c > 0, "{what}: input channels must be > 0");
        let mut out = [0; 3];
        for i in 0..3 {
            ensure!(
                inp[i] > 0,
                "{what}: input size must be > 0 in every dimension, got {inp:?}"
            );
            ensure!(
                k[i] > 0,
                "{what}: kernel size must be > 0 in every dimension, got {k:?}"
            );
            ensure!(
                stride[i] > 0,
                "{what}: stride must be > 0 in every dimension, got {stride:?}"
            );
            ensure!(
                pad[i] < k[i],
                "{what}: padding {pad:?} must be smaller than the kernel {k:?}"
            );
            let span = inp[i] + 2 * pad[i];
            if span < k[i] {
                bail!(
                    "{what}: kernel {k:?} is larger than the padded input {:?}",
                    [
                        inp[0] + 2 * pad[0],
                        inp[1] + 2 * pad[1],
                        inp[2] + 2 * pad[2]
                    ]
                );
            }
            out[i] = (span - k[i]) / stride[i] + 1;
        }
        let rows = c
            .checked_mul(k.iter().product())
            .and_then(|r| r.checked_mul(out.iter().product()));
        ensure!(
            rows.is_some_and(|r| r < u32::MAX as usize),
            "{what}: the window table would exceed 2^32 rows"
        );
        Ok(Self {
            c,
            inp,
            k,
            stride,
            pad,
            out,
        })
    }

    /// A 2-D window: square kernel `k`, the same stride and padding in both dimensions.
    pub fn square(
        what: &str,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Self::new(
            what,
            c,
            [1, h, w],
            [1, k, k],
            [1, stride, stride],
            [0, pad, pad],
        )
    }

    /// Input positions per channel.
    pub fn in_spatial(&self) -> usize {
        self.inp.iter().product()
    }

    /// Output positions per channel.
    pub fn out_spatial(&self) -> usize {
        self.out.iter().product()
    }

    /// Window size `kd·kh·kw`.
    pub fn kernel_len(&self) -> usize {
        self.k.iter().product()
    }

    /// Rows of the input activation, `c · d·h·w`.
    pub fn rows_in(&self) -> usize {
        self.c * self.in_spatial()
    }

    /// The input row read by window element `kidx` (in `kz, ky, kx` order) of channel `ch` at
    /// output position `o` (in `oz, oy, ox` order), or `None` where the window hangs over the
    /// border (the zero padding).
    pub fn source(&self, ch: usize, kidx: usize, o: usize) -> Option<usize> {
        let [_, kh, kw] = self.k;
        let [_, ho, wo] = self.out;
        let (kz, ky, kx) = (kidx / (kh * kw), kidx / kw % kh, kidx % kw);
        let (oz, oy, ox) = (o / (ho * wo), o / wo % ho, o % wo);
        let mut pos = [0usize; 3];
        for (i, (kk, oo)) in [(kz, oz), (ky, oy), (kx, ox)].into_iter().enumerate() {
            let p = (oo * self.stride[i] + kk) as isize - self.pad[i] as isize;
            if p < 0 || p >= self.inp[i] as isize {
                return None;
            }
            pos[i] = p as usize;
        }
        let [_, h, w] = self.inp;
        Some(ch * self.in_spatial() + (pos[0] * h + pos[1]) * w + pos[2])
    }

    /// Whether the window is the identity (1x1x1 kernel, stride 1, no padding): a
    /// convolution with it needs no gather.
    pub fn is_pointwise(&self) -> bool {
        self.k == [1, 1, 1] && self.stride == [1, 1, 1] && self.pad == [0, 0, 0]
    }
}

/// `n` consecutive rows copied from `src..src+n` to `dst..dst+n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First output row.
    pub dst: u32,
    /// First input row.
    pub src: u32,
    /// Rows.
    pub len: u32,
}

/// A row gather `out[r] = in[table[r]]` (a missing source gives a zero row), stored as runs
/// of consecutive rows. One plan serves any batch size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    rows_in: usize,
    rows_out: usize,
    runs: Vec<Run>,
}

impl RowPlan {
    /// Builds the runs of a table (one entry per output row). Errors when a source row is out
    /// of range.
    pub fn from_table(rows_in: usize, table: &[Option<usize>]) -> Result<Self> {
        ensure!(
            rows_in < u32::MAX as usize && table.len() < u32::MAX as usize,
            "row table too large"
        );
        let mut runs: Vec<Run> = Vec::new();
        for (d, s) in table.iter().enumerate() {
            let Some(s) = *s else { continue };
            ensure!(
                s < rows_in,
                "row table entry {d} reads row {s} of {rows_in}"
            );
            match runs.last_mut() {
                Some(r) if (r.dst + r.len) as usize == d && (r.src + r.len) as usize == s => {
                    r.len += 1
                }
                _ => runs.push(Run {
                    dst: d as u32,
                    src: s as u32,
                    len: 1,
                }),
            }
        }
        Ok(Self {
            rows_in,
            rows_out: table.len(),
            runs,
        })
    }

    /// The im2col plan of a convolution: output rows in `(ch, kz, ky, kx)` then
    /// `(oz, oy, ox)` order, so that `cols.reshape(C·K, OSP·B)` multiplies the weights
    /// `[O, C, kd, kh, kw]` flattened to `(O, C·K)`.
    pub fn im2col(g: &Geom) -> Result<Self> {
        let (kl, osp) = (g.kernel_len(), g.out_spatial());
        let mut table = Vec::with_capacity(g.c * kl * osp);
        for ch in 0..g.c {
            for k in 0..kl {
                for o in 0..osp {
                    table.push(g.source(ch, k, o));
                }
            }
        }
        Self::from_table(g.rows_in(), &table)
    }

    /// Nearest upsampling by integer factors `[fd, fh, fw]` of `c` channels over `inp`.
    pub fn upsample(what: &str, c: usize, inp: [usize; 3], f: [usize; 3]) -> Result<Self> {
        ensure!(
            c > 0 && inp.iter().all(|&n| n > 0),
            "{what}: channels and input size must be > 0, got {c} x {inp:?}"
        );
        ensure!(
            f.iter().all(|&n| n > 0),
            "{what}: upsampling factors must be > 0, got {f:?}"
        );
        let out = [inp[0] * f[0], inp[1] * f[1], inp[2] * f[2]];
        let (isp, osp): (usize, usize) = (inp.iter().product(), out.iter().product());
        let mut table = Vec::with_capacity(c * osp);
        for ch in 0..c {
            for z in 0..out[0] {
                for y in 0..out[1] {
                    for x in 0..out[2] {
                        let (iz, iy, ix) = (z / f[0], y / f[1], x / f[2]);
                        table.push(Some(ch * isp + (iz * inp[1] + iy) * inp[2] + ix));
                    }
                }
            }
        }
        Self::from_table(c * isp, &table)
    }

    /// Rows of the input.
    pub fn rows_in(&self) -> usize {
        self.rows_in
    }

    /// Rows of the output.
    pub fn rows_out(&self) -> usize {
        self.rows_out
    }

    /// The runs, in output order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The table back from the runs (`None`: zero row).
    pub fn table(&self) -> Vec<Option<usize>> {
        let mut t = vec![None; self.rows_out];
        for r in &self.runs {
            for i in 0..r.len as usize {
                t[r.dst as usize + i] = Some(r.src as usize + i);
            }
        }
        t
    }
}

/// Max-pooling windows: for output row `(ch, o)` the input rows of its window (border
/// positions left out). One plan serves any batch size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    rows_in: usize,
    rows_out: usize,
    window: usize,
    /// `rows_out x window` source rows, `u32::MAX` where the window hangs over the border.
    src: Vec<u32>,
}

/// Marks a window element outside the input.
pub(crate) const NO_ROW: u32 = u32::MAX;

impl PoolPlan {
    /// The windows of `g`. Errors when some window lies entirely in the padding.
    pub fn new(what: &str, g: &Geom) -> Result<Self> {
        let (kl, osp) = (g.kernel_len(), g.out_spatial());
        let mut src = Vec::with_capacity(g.c * osp * kl);
        for ch in 0..g.c {
            for o in 0..osp {
                let start = src.len();
                src.extend((0..kl).map(|k| g.source(ch, k, o).map_or(NO_ROW, |r| r as u32)));
                ensure!(
                    src[start..].iter().any(|&r| r != NO_ROW),
                    "{what}: pooling window {o} lies entirely in the padding"
                );
            }
        }
        Ok(Self {
            rows_in: g.rows_in(),
            rows_out: g.c * osp,
            window: kl,
            src,
        })
    }

    /// Rows of the input.
    pub fn rows_in(&self) -> usize {
        self.rows_in
    }

    /// Rows of the output.
    pub fn rows_out(&self) -> usize {
        self.rows_out
    }

    /// Window elements per output row.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The source rows of output row `r` (`u32::MAX` marks the border).
    pub fn sources(&self, r: usize) -> &[u32] {
        &self.src[r * self.window..(r + 1) * self.window]
    }
}
