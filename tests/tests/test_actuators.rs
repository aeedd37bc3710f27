//! SP-in / SP-out selection: exact degrees, top-k by score with ties toward the lower
//! index, regrowth semantics, conv slabs, weight/shadow bookkeeping.

mod common;

use bb_actuators::{
    apply_targets, edge_scores, key_of, rescale_factors, select_top_k, sync_weights, threshold_key,
    threshold_key_preserving, zero_dead, ActuatorScratch, BitMask, EdgeShape, Histogram, Rescale,
    Side,
};
use common::*;
use proptest::prelude::*;
use rand::Rng;

fn scores_of(shape: &EdgeShape, w: &[f32]) -> Vec<f32> {
    let mut s = vec![0.0; shape.edges()];
    let shadow = vec![0.0; w.len()];
    edge_scores(
        shape,
        w,
        &shadow,
        &BitMask::full(shape.out, shape.inp),
        &mut s,
    )
    .unwrap();
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Property 1: after SP-in / SP-out with targets k every slab has exactly min(k, D) live
    /// edges, and they are the k largest scores (ties by index).
    #[test]
    fn slabs_keep_exactly_their_top_k(
        out in 1usize..40, inp in 1usize..150, seed in any::<u64>(), ties in any::<bool>(), cols in any::<bool>()
    ) {
        let mut r = rng(seed);
        let shape = EdgeShape::dense(out, inp);
        let w = random_weights(&mut r, shape.edges(), ties);
        let s = scores_of(&shape, &w);
        let side = if cols { Side::Columns } else { Side::Rows };
        let d = shape.slab_len(side);
        let targets: Vec<u32> = (0..shape.slabs(side)).map(|_| r.gen_range(0..=d as u32 + 3)).collect();
        let mut mask = BitMask::full(out, inp);
        apply_targets(side, &shape, &s, &targets, true, &mut mask, &mut ActuatorScratch::default()).unwrap();
        for (j, &k) in targets.iter().enumerate() {
            let (live, slab): (Vec<usize>, Vec<f32>) = match side {
                Side::Rows => (row(&mask, j), s[j * inp..(j + 1) * inp].to_vec()),
                Side::Columns => (col(&mask, j), (0..out).map(|o| s[o * inp + j]).collect()),
            };
            prop_assert_eq!(live.len(), (k as usize).min(d));
            prop_assert_eq!(live, naive_top_k(&slab, k as usize));
        }
    }

    /// Property 2a: without regrowth no edge is ever added, whatever the targets.
    #[test]
    fn no_regrow_never_adds(out in 1usize..30, inp in 1usize..100, seed in any::<u64>(), cols in any::<bool>()) {
        let mut r = rng(seed);
        let shape = EdgeShape::dense(out, inp);
        let s = scores_of(&shape, &random_weights(&mut r, shape.edges(), true));
        let mut mask = BitMask::empty(out, inp);
        for o in 0..out { for i in 0..inp { if r.gen_bool(0.5) { mask.set(o, i, true); } } }
        let before = mask.clone();
        let side = if cols { Side::Columns } else { Side::Rows };
        let targets: Vec<u32> = (0..shape.slabs(side)).map(|_| r.gen_range(0..=shape.slab_len(side) as u32)).collect();
        apply_targets(side, &shape, &s, &targets, false, &mut mask, &mut ActuatorScratch::default()).unwrap();
        for o in 0..out { for i in 0..inp { prop_assert!(before.get(o, i) || !mask.get(o, i)); } }
        // Each slab keeps min(k, live) of its live entries, the strongest ones.
        for (j, &k) in targets.iter().enumerate() {
            let (was, now) = match side { Side::Rows => (row(&before, j), row(&mask, j)), Side::Columns => (col(&before, j), col(&mask, j)) };
            prop_assert_eq!(now.len(), (k as usize).min(was.len()));
            let cand: Vec<f32> = was.iter().map(|&x| match side { Side::Rows => s[j * inp + x], Side::Columns => s[x * inp + j] }).collect();
            let want: Vec<usize> = naive_top_k(&cand, k as usize).into_iter().map(|t| was[t]).collect();
            prop_assert_eq!(now, want);
        }
    }
}

/// Property 2b: with regrowth a dead edge whose stored magnitude beats the k-th live one
/// comes back, with its stored value; without regrowth it stays dead.
#[test]
fn regrow_returns_a_dead_edge_that_beats_a_live_one() {
    let shape = EdgeShape::dense(1, 4);
    let mut mask = BitMask::full(1, 4);
    let mut w = vec![0.9f32, 0.8, 0.7, 0.6];
    let mut shadow = vec![0.0f32; 4];
    let mut scratch = ActuatorScratch::default();
    // Prune to 3: edge 3 dies and its value goes to the shadow store.
    let s = scores_of(&shape, &w);
    let old = mask.clone();
    apply_targets(Side::Rows, &shape, &s, &[3], true, &mut mask, &mut scratch).unwrap();
    sync_weights(&shape, &old, &mask, &mut w, &mut shadow, false).unwrap();
    assert_eq!(w, vec![0.9, 0.8, 0.7, 0.0]);
    assert_eq!(shadow[3], 0.6);
    // Live weights shrink below the stored 0.6.
    w[1] = 0.1;
    let mut s = vec![0.0; 4];
    edge_scores(&shape, &w, &shadow, &mask, &mut s).unwrap();
    assert_eq!(s, vec![0.9, 0.1, 0.7, 0.6]);
    let mut no_regrow = mask.clone();
    apply_targets(
        Side::Rows,
        &shape,
        &s,
        &[3],
        false,
        &mut no_regrow,
        &mut scratch,
    )
    .unwrap();
    assert!(
        !no_regrow.get(0, 3),
        "prune-only must not bring edge 3 back"
    );
    let old = mask.clone();
    apply_targets(Side::Rows, &shape, &s, &[3], true, &mut mask, &mut scratch).unwrap();
    let st = sync_weights(&shape, &old, &mask, &mut w, &mut shadow, false).unwrap();
    assert!(mask.get(0, 3) && !mask.get(0, 1));
    assert_eq!((st.born, st.died), (1, 1));
    assert_eq!(
        w,
        vec![0.9, 0.0, 0.7, 0.6],
        "edge 3 returns with its stored value, edge 1 is zeroed"
    );
    assert_eq!(shadow[1], 0.1);
}

#[test]
fn ties_break_toward_the_lower_index() {
    let shape = EdgeShape::dense(2, 6);
    let s = vec![1.0f32; 12];
    let mut mask = BitMask::full(2, 6);
    apply_targets(
        Side::Rows,
        &shape,
        &s,
        &[2, 4],
        true,
        &mut mask,
        &mut ActuatorScratch::default(),
    )
    .unwrap();
    assert_eq!(row(&mask, 0), vec![0, 1]);
    assert_eq!(row(&mask, 1), vec![0, 1, 2, 3]);
    let mut mask = BitMask::full(2, 6);
    apply_targets(
        Side::Columns,
        &shape,
        &s,
        &[1, 1, 1, 2, 0, 1],
        true,
        &mut mask,
        &mut ActuatorScratch::default(),
    )
    .unwrap();
    assert_eq!(row(&mask, 0), vec![0, 1, 2, 3, 5]);
    assert_eq!(row(&mask, 1), vec![3]);
}

/// Large layers take the parallel path; the result must equal the naive per-slab answer.
#[test]
fn parallel_path_matches_naive_on_a_large_layer() {
    let mut r = rng(7);
    let shape = EdgeShape::dense(300, 257);
    let w = random_weights(&mut r, shape.edges(), true);
    let s = scores_of(&shape, &w);
    for side in [Side::Rows, Side::Columns] {
        let d = shape.slab_len(side) as u32;
        let targets: Vec<u32> = (0..shape.slabs(side)).map(|_| r.gen_range(0..=d)).collect();
        let mut mask = BitMask::full(shape.out, shape.inp);
        apply_targets(
            side,
            &shape,
            &s,
            &targets,
            true,
            &mut mask,
            &mut ActuatorScratch::default(),
        )
        .unwrap();
        for (j, &k) in targets.iter().enumerate() {
            let (live, slab): (Vec<usize>, Vec<f32>) = match side {
                Side::Rows => (
                    row(&mask, j),
                    s[j * shape.inp..(j + 1) * shape.inp].to_vec(),
                ),
                Side::Columns => (
                    col(&mask, j),
                    (0..shape.out).map(|o| s[o * shape.inp + j]).collect(),
                ),
            };
            assert_eq!(live, naive_top_k(&slab, k as usize), "{side:?} slab {j}");
        }
    }
}

/// Conv slabs: scores are kernel sums of |W| and a dead edge zeroes its whole kernel, for 2-D
/// and 3-D kernels.
#[test]
fn conv_edges_are_scored_by_kernel_sums_and_masked_whole() {
    for kernel in [vec![3usize, 3], vec![2, 2, 2]] {
        let mut r = rng(3);
        let shape = EdgeShape::conv(4, 5, &kernel);
        let kl = shape.kernel_len();
        let mut w = random_weights(&mut r, shape.weight_len(), false);
        let s = scores_of(&shape, &w);
        for e in 0..shape.edges() {
            let want: f32 = w[e * kl..(e + 1) * kl].iter().map(|x| x.abs()).sum();
            assert!((s[e] - want).abs() < 1e-6);
        }
        let mut mask = BitMask::full(4, 5);
        let old = mask.clone();
        apply_targets(
            Side::Rows,
            &shape,
            &s,
            &[2, 2, 2, 2],
            true,
            &mut mask,
            &mut ActuatorScratch::default(),
        )
        .unwrap();
        let mut shadow = vec![0.0; w.len()];
        let before = w.clone();
        sync_weights(&shape, &old, &mask, &mut w, &mut shadow, false).unwrap();
        for o in 0..4 {
            assert_eq!(row(&mask, o), naive_top_k(&s[o * 5..o * 5 + 5], 2));
            for i in 0..5 {
                let e = o * 5 + i;
                let k = &w[e * kl..(e + 1) * kl];
                if mask.get(o, i) {
                    assert_eq!(k, &before[e * kl..(e + 1) * kl]);
                } else {
                    assert!(k.iter().all(|&x| x == 0.0));
                    assert_eq!(&shadow[e * kl..(e + 1) * kl], &before[e * kl..(e + 1) * kl]);
                }
            }
        }
    }
}

#[test]
fn zero_dead_and_rescale() {
    let shape = EdgeShape::dense(2, 70);
    let mut mask = BitMask::full(2, 70);
    for c in (0..70).step_by(3) {
        mask.set(0, c, false);
    }
    mask.fill_row(1, false);
    mask.set(1, 65, true);
    let mut buf = vec![1.0f32; 140];
    zero_dead(&shape, &mask, &mut buf).unwrap();
    for c in 0..70 {
        assert_eq!(buf[c] == 1.0, mask.get(0, c));
        assert_eq!(buf[70 + c] == 1.0, c == 65);
    }
    let mut f = vec![0.0; 2];
    rescale_factors(Rescale::Sqrt, &mask, &mut f);
    assert!((f[0] - (70.0f32 / 46.0).sqrt()).abs() < 1e-6 && (f[1] - 70f32.sqrt()).abs() < 1e-5);
    rescale_factors(Rescale::Linear, &mask, &mut f);
    assert!((f[1] - 70.0).abs() < 1e-4);
    rescale_factors(Rescale::None, &mask, &mut f);
    assert_eq!(f, vec![1.0, 1.0]);
    // Layers large enough to be split over threads, dense and with a kernel.
    let mut r = rng(9);
    // (77 columns: a last mask word of 13 bits, one full byte and a 5-bit tail)
    for shape in [
        EdgeShape::dense(37, 2000),
        EdgeShape::dense(5, 77),
        EdgeShape::conv(33, 700, &[3]),
    ] {
        let mut mask = BitMask::empty(shape.out, shape.inp);
        for o in 0..shape.out {
            for i in 0..shape.inp {
                mask.set(o, i, r.gen_bool(0.4));
            }
        }
        // signed values, including -0.0 and NaN: dead ones must become exactly +0.0
        let value = |j: usize| match j % 5 {
            0 => -0.0,
            1 => f32::NAN,
            2 => -2.5,
            _ => 2.5,
        };
        let mut buf: Vec<f32> = (0..shape.weight_len()).map(value).collect();
        zero_dead(&shape, &mask, &mut buf).unwrap();
        let kl = shape.kernel_len();
        for (j, &v) in buf.iter().enumerate() {
            let e = j / kl;
            let live = mask.get(e / shape.inp, e % shape.inp);
            let want = if live { value(j) } else { 0.0 };
            assert_eq!(v.to_bits(), want.to_bits(), "{shape:?} value {j}");
        }
    }
}

#[test]
fn select_top_k_matches_sort() {
    let mut r = rng(11);
    let mut keys = Vec::new();
    for _ in 0..50 {
        let n = r.gen_range(1..200);
        let s = random_weights(&mut r, n, true)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>();
        let k = r.gen_range(0..=n);
        assert_eq!(select_top_k(&s, k, &mut keys), naive_top_k(&s, k));
    }
}

#[test]
fn masks_use_one_bit_per_edge() {
    let m = BitMask::full(4096, 4096);
    assert_eq!(m.storage_bytes(), 4096 * 4096 / 8);
    assert_eq!(m.count(), 4096 * 4096);
    let bytes = m.to_bytes();
    assert_eq!(BitMask::from_bytes(4096, 4096, &bytes).unwrap(), m);
}

#[test]
fn bad_buffers_are_errors_not_panics() {
    let shape = EdgeShape::dense(3, 4);
    let mut s = vec![0.0; 12];
    let err =
        edge_scores(&shape, &[0.0; 11], &[0.0; 12], &BitMask::full(3, 4), &mut s).unwrap_err();
    assert!(err.to_string().contains("weights"), "{err}");
    let mut w = vec![0.0; 12];
    w[5] = f32::NAN;
    let err = edge_scores(&shape, &w, &[0.0; 12], &BitMask::full(3, 4), &mut s).unwrap_err();
    assert!(err.to_string().contains("index 5"), "{err}");
    let err = apply_targets(
        Side::Rows,
        &shape,
        &s,
        &[1, 2],
        true,
        &mut BitMask::full(3, 4),
        &mut ActuatorScratch::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("targets"), "{err}");
    assert!(EdgeShape::from_weight_dims(&[3]).is_err());
    assert!(EdgeShape::from_weight_dims(&[3, 0]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Long slabs take the radix-select path: still exactly the sorted top-k, with heavy ties,
    /// zeros, tiny and huge magnitudes.
    #[test]
    fn long_slabs_select_like_a_sort(n in 385usize..6000, seed in any::<u64>(), mode in 0u8..4) {
        let mut r = rng(seed);
        let s: Vec<f32> = (0..n)
            .map(|_| match mode {
                0 => r.gen_range(0.0f32..1.0),
                1 => r.gen_range(0i32..4) as f32 * 0.25,
                2 => if r.gen_bool(0.7) { 0.0 } else { r.gen_range(1e-30f32..1e30) },
                _ => 1.0 + r.gen_range(0u32..3) as f32 * f32::EPSILON,
            })
            .collect();
        let mut keys = Vec::new();
        let all: Vec<u64> = s.iter().enumerate().map(|(i, &v)| key_of(v, i)).collect();
        let (mut hist, mut tmp) = (Histogram::default(), vec![0u64; n]);
        for k in [0, 1, r.gen_range(1..n), n / 2, n - 1, n] {
            prop_assert_eq!(select_top_k(&s, k, &mut keys), naive_top_k(&s, k), "k={}", k);
            // The selection that keeps its keys finds the same threshold.
            let mut clobbered = all.clone();
            prop_assert_eq!(
                threshold_key_preserving(&all, k, &mut hist, &mut tmp),
                threshold_key(&mut clobbered, k),
                "k={}", k
            );
        }
    }
}

#[test]
fn long_slabs_without_regrow_keep_the_strongest_live_edges() {
    let mut r = rng(21);
    let shape = EdgeShape::dense(40, 1500);
    let s = scores_of(&shape, &random_weights(&mut r, shape.edges(), true));
    let mut mask = BitMask::empty(40, 1500);
    for o in 0..40 {
        for i in 0..1500 {
            if r.gen_bool(0.6) {
                mask.set(o, i, true);
            }
        }
    }
    let before = mask.clone();
    let targets: Vec<u32> = (0..40).map(|_| r.gen_range(0..1500)).collect();
    apply_targets(
        Side::Rows,
        &shape,
        &s,
        &targets,
        false,
        &mut mask,
        &mut ActuatorScratch::default(),
    )
    .unwrap();
    for (o, &k) in targets.iter().enumerate() {
        let was = row(&before, o);
        let cand: Vec<f32> = was.iter().map(|&c| s[o * 1500 + c]).collect();
        let want: Vec<usize> = naive_top_k(&cand, k as usize)
            .into_iter()
            .map(|t| was[t])
            .collect();
        assert_eq!(row(&mask, o), want, "row {o}");
    }
}

#[test]
fn row_and_column_counts_match_naive_counts() {
    let mut r = rng(33);
    // (300, 520) counts a group of eight word columns (over more than 255 rows) and a partial
    // word on one thread; the last shape is large enough for the column counts to be split
    // over the pool.
    for (rows, cols) in [
        (1, 1),
        (3, 64),
        (17, 65),
        (40, 200),
        (5, 130),
        (300, 520),
        (1100, 4100),
    ] {
        let mut m = BitMask::empty(rows, cols);
        for o in 0..rows {
            for i in 0..cols {
                // Every seventh column full: counts that reach every power of two the
                // column counters pass through.
                if i % 7 == 3 || r.gen_bool(0.4) {
                    m.set(o, i, true);
                }
            }
        }
        let (mut rc, mut cc) = (vec![0u32; rows], vec![0u32; cols]);
        m.row_counts_into(&mut rc);
        m.col_counts_into(&mut cc);
        assert_eq!(
            rc,
            (0..rows)
                .map(|o| row(&m, o).len() as u32)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            cc,
            (0..cols)
                .map(|i| col(&m, i).len() as u32)
                .collect::<Vec<_>>()
        );
    }
}
