//! The fused refresh (`refresh_targets`) against the three separate steps it replaces
//! (`edge_scores`, `apply_targets`, `sync_weights`): same mask, same weights and shadow bit for
//! bit, same counts; and what it does with non-finite values.

mod common;

use bb_actuators::{
    apply_targets, edge_scores, refresh_targets, sync_weights, ActuatorError, ActuatorScratch,
    BitMask, EdgeShape, Side, SyncStats,
};
use common::*;
use proptest::prelude::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A layer mid-training: live weights, dead weights exactly zero, a shadow holding values
/// for dead edges (and stale values for live ones).
struct Layer {
    shape: EdgeShape,
    mask: BitMask,
    w: Vec<f32>,
    h: Vec<f32>,
}

fn value(r: &mut ChaCha8Rng, mode: u8) -> f32 {
    match mode {
        0 => r.gen_range(-1.0f32..1.0),
        1 => r.gen_range(-3i32..=3) as f32 * 0.25,
        2 => {
            if r.gen_bool(0.5) {
                0.0
            } else {
                r.gen_range(1e-30f32..1e30) * if r.gen_bool(0.5) { -1.0 } else { 1.0 }
            }
        }
        _ => 1.0 + r.gen_range(0u32..3) as f32 * f32::EPSILON,
    }
}

fn layer(r: &mut ChaCha8Rng, out: usize, inp: usize, kernel: &[usize], mode: u8) -> Layer {
    let shape = EdgeShape::conv(out, inp, kernel);
    let kl = shape.kernel_len();
    let p = r.gen_range(0.0..1.0);
    let mut mask = BitMask::empty(out, inp);
    let (mut w, mut h) = (vec![0.0; shape.weight_len()], vec![0.0; shape.weight_len()]);
    for o in 0..out {
        for i in 0..inp {
            let live = r.gen_bool(p);
            mask.set(o, i, live);
            for t in 0..kl {
                let e = (o * inp + i) * kl + t;
                h[e] = value(r, mode);
                if live {
                    w[e] = value(r, mode);
                }
            }
        }
    }
    Layer { shape, mask, w, h }
}

fn separate(l: &Layer, side: Side, targets: &[u32], regrow: bool) -> (Layer, SyncStats) {
    let (mut mask, mut w, mut h) = (l.mask.clone(), l.w.clone(), l.h.clone());
    let mut scores = vec![0.0; l.shape.edges()];
    edge_scores(&l.shape, &w, &h, &mask, &mut scores).unwrap();
    let old = mask.clone();
    let mut scratch = ActuatorScratch::default();
    apply_targets(
        side,
        &l.shape,
        &scores,
        targets,
        regrow,
        &mut mask,
        &mut scratch,
    )
    .unwrap();
    let st = sync_weights(&l.shape, &old, &mask, &mut w, &mut h, false).unwrap();
    let shape = l.shape.clone();
    (Layer { shape, mask, w, h }, st)
}

fn fused(
    l: &Layer,
    side: Side,
    targets: &[u32],
    regrow: bool,
) -> (Layer, Result<SyncStats, ActuatorError>) {
    let (mut mask, mut w, mut h) = (l.mask.clone(), l.w.clone(), l.h.clone());
    let mut scratch = ActuatorScratch::default();
    let st = refresh_targets(
        side,
        &l.shape,
        &mut w,
        &mut h,
        targets,
        regrow,
        &mut mask,
        &mut scratch,
        &mut Vec::new(),
    );
    let shape = l.shape.clone();
    (Layer { shape, mask, w, h }, st)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A random target in `0..=D` for every slab of `side`.
fn random_targets(r: &mut ChaCha8Rng, l: &Layer, side: Side) -> Vec<u32> {
    let d = l.shape.slab_len(side) as u32;
    (0..l.shape.slabs(side))
        .map(|_| r.gen_range(0..=d))
        .collect()
}

/// The fused refresh of `l` equals the three separate steps: stats, mask, weights and shadow.
fn assert_fused_equals_separate(l: &Layer, side: Side, targets: &[u32], regrow: bool, what: &str) {
    let (a, sa) = separate(l, side, targets, regrow);
    let (b, sb) = fused(l, side, targets, regrow);
    assert_eq!(sb.unwrap(), sa, "{what}");
    assert!(a.mask == b.mask, "{what}");
    assert_eq!(bits(&a.w), bits(&b.w), "{what}");
    assert_eq!(bits(&a.h), bits(&b.h), "{what}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fused_refresh_equals_the_three_steps(
        out in 1usize..24,
        inp in 1usize..700,
        conv in any::<bool>(),
        rows in any::<bool>(),
        regrow in any::<bool>(),
        mode in 0u8..4,
        seed in any::<u64>(),
    ) {
        let mut r = rng(seed);
        let kernel: &[usize] = if conv { &[3, 2] } else { &[] };
        let l = layer(&mut r, out, inp, kernel, mode);
        let side = if rows { Side::Rows } else { Side::Columns };
        let d = l.shape.slab_len(side) as u32;
        let targets: Vec<u32> = (0..l.shape.slabs(side)).map(|_| r.gen_range(0..=d + 1)).collect();
        let (a, sa) = separate(&l, side, &targets, regrow);
        let (b, sb) = fused(&l, side, &targets, regrow);
        prop_assert_eq!(sb.unwrap(), sa);
        prop_assert!(a.mask == b.mask, "masks differ");
        prop_assert_eq!(bits(&a.w), bits(&b.w));
        prop_assert_eq!(bits(&a.h), bits(&b.h));
    }
}

/// Rows long enough for the radix path, on the parallel path (more than 2^15 edges), with
/// every value mode: the same as the separate steps.
#[test]
fn long_rows_and_columns_equal_the_three_steps() {
    for (mode, regrow) in [(0, true), (1, true), (2, false), (3, true), (0, false)] {
        let mut r = rng(40 + mode as u64);
        let l = layer(&mut r, 24, 3000, &[], mode);
        for side in [Side::Rows, Side::Columns] {
            let targets = random_targets(&mut r, &l, side);
            assert_fused_equals_separate(
                &l,
                side,
                &targets,
                regrow,
                &format!("mode {mode} {side:?}"),
            );
        }
    }
}

/// Layers with kernel dims large enough for several workers: SP-out's rebuild reads the keys
/// its selection gathered when each worker's columns fit one group of strips (40x1000: 8
/// strips a worker) and scores the edges again otherwise (20x2200: 18 strips a worker).
#[test]
fn kernel_layers_over_several_workers_equal_the_three_steps() {
    let mut r = rng(83);
    for (out, inp) in [(40usize, 1000usize), (20, 2200)] {
        let l = layer(&mut r, out, inp, &[3, 2], 0);
        for (side, regrow) in [
            (Side::Columns, true),
            (Side::Columns, false),
            (Side::Rows, true),
        ] {
            let targets = random_targets(&mut r, &l, side);
            let what = format!("{out}x{inp} {side:?} regrow={regrow}");
            assert_fused_equals_separate(&l, side, &targets, regrow, &what);
        }
    }
}

/// A non-finite value is named. Columns: nothing changes. Rows: the bad row is left as it
/// was, the others are refreshed as usual.
#[test]
fn non_finite_values_are_named_and_bad_rows_left_alone() {
    let mut r = rng(7);
    let mut l = layer(&mut r, 6, 200, &[], 0);
    // A live weight of row 3 becomes NaN.
    let c = (0..200).find(|&c| l.mask.get(3, c)).unwrap();
    l.w[3 * 200 + c] = f32::NAN;
    let targets = vec![50u32; 6];
    let (b, st) = fused(&l, Side::Rows, &targets, true);
    assert_eq!(
        st.unwrap_err(),
        ActuatorError::NonFinite {
            what: "weights".into(),
            index: 3 * 200 + c
        }
    );
    assert_eq!(b.mask.row_words(3), l.mask.row_words(3));
    assert_eq!(bits(&b.w[600..800]), bits(&l.w[600..800]));
    assert_eq!(bits(&b.h[600..800]), bits(&l.h[600..800]));
    for o in [0, 1, 2, 4, 5] {
        assert_eq!(b.mask.row_count(o), 50, "row {o} was refreshed");
    }
    let targets = vec![3u32; 200];
    let (b, st) = fused(&l, Side::Columns, &targets, true);
    assert!(matches!(st, Err(ActuatorError::NonFinite { index, .. }) if index == 3 * 200 + c));
    assert!(b.mask == l.mask);
    assert_eq!(bits(&b.w), bits(&l.w));
    assert_eq!(bits(&b.h), bits(&l.h));
    // A dead edge's stored value is checked too, and named as the shadow.
    let mut l = layer(&mut r, 4, 100, &[], 0);
    let c = (0..100).find(|&c| !l.mask.get(1, c)).unwrap();
    l.h[100 + c] = f32::INFINITY;
    let (_, st) = fused(&l, Side::Rows, &[10; 4], true);
    assert_eq!(
        st.unwrap_err(),
        ActuatorError::NonFinite {
            what: "shadow".into(),
            index: 100 + c
        }
    );
}

/// SP-out names the first row's non-finite value when several columns, rows and workers meet
/// one: the columns are gathered a group of strips at a time, a block of rows at a time.
#[test]
fn columns_name_the_first_of_many_non_finite_values() {
    let mut r = rng(29);
    // Two workers of 2048 columns each (32 strips: two groups of 16).
    let mut l = layer(&mut r, 16, 4096, &[], 0);
    // (row, column): rows 9 and 10 in one block of one group, row 12 in the next group of the
    // same worker, row 11 in the other worker; row 9 is the first.
    for (o, i) in [(10, 300), (9, 100), (12, 1100), (11, 2100)] {
        l.mask.set(o, i, true);
        l.w[o * 4096 + i] = f32::NAN;
    }
    let (b, st) = fused(&l, Side::Columns, &vec![5u32; 4096], true);
    assert_eq!(
        st.unwrap_err(),
        ActuatorError::NonFinite {
            what: "weights".into(),
            index: 9 * 4096 + 100
        }
    );
    assert!(b.mask == l.mask);
    assert_eq!(bits(&b.w), bits(&l.w));
}

/// Without regrowth dead edges are not candidates: a non-finite shadow value of a dead edge
/// is not an error (the refresh equals the one with that value finite, which equals the
/// separate steps), while a non-finite live weight still is, and with regrowth the same
/// shadow value is named.
#[test]
fn without_regrowth_dead_shadow_values_are_not_read() {
    let mut r = rng(61);
    // Plain rows and columns (whole 64-column words, several workers for the columns) and
    // a conv layer.
    for (out, inp, kernel) in [
        (40usize, 1000usize, &[][..]),
        (300, 130, &[][..]),
        (12, 70, &[3, 3][..]),
    ] {
        let l = layer(&mut r, out, inp, kernel, 0);
        let kl = l.shape.kernel_len();
        let dead: Vec<(usize, usize)> = (0..out)
            .flat_map(|o| (0..inp).map(move |i| (o, i)))
            .filter(|&(o, i)| !l.mask.get(o, i))
            .step_by(7)
            .collect();
        assert!(dead.len() > 3, "the layer has dead edges");
        let mut bad = Layer {
            shape: l.shape.clone(),
            mask: l.mask.clone(),
            w: l.w.clone(),
            h: l.h.clone(),
        };
        for (n, &(o, i)) in dead.iter().enumerate() {
            let v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][n % 3];
            bad.h[(o * inp + i) * kl + n % kl] = v;
        }
        for side in [Side::Rows, Side::Columns] {
            let targets = random_targets(&mut r, &l, side);
            let (a, sa) = separate(&l, side, &targets, false);
            let (b, sb) = fused(&bad, side, &targets, false);
            let what = format!("{out}x{inp} {kernel:?} {side:?}");
            assert_eq!(sb.unwrap(), sa, "{what}");
            assert!(a.mask == b.mask, "{what}");
            assert_eq!(bits(&a.w), bits(&b.w), "{what}");
            // The dead edges stay dead, so their shadow values are untouched.
            let mut want = bits(&a.h);
            for (x, y) in want.iter_mut().zip(&bad.h) {
                if !y.is_finite() {
                    *x = y.to_bits();
                }
            }
            assert_eq!(bits(&b.h), want, "{what}");
            let (_, st) = fused(&bad, side, &targets, true);
            assert!(
                matches!(st, Err(ActuatorError::NonFinite { ref what, .. }) if what == "shadow"),
                "{what}: {st:?}"
            );
        }
        // A non-finite live weight is still an error without regrowth.
        let (o, i) = (0..out)
            .flat_map(|o| (0..inp).map(move |i| (o, i)))
            .find(|&(o, i)| l.mask.get(o, i))
            .expect("a live edge");
        bad.w[(o * inp + i) * kl] = f32::NAN;
        for side in [Side::Rows, Side::Columns] {
            let targets = vec![1u32; l.shape.slabs(side)];
            let (_, st) = fused(&bad, side, &targets, false);
            assert_eq!(
                st.unwrap_err(),
                ActuatorError::NonFinite {
                    what: "weights".into(),
                    index: (o * inp + i) * kl
                },
                "{out}x{inp} {side:?}"
            );
        }
    }
}

/// Kept hints notice a mask changed between refreshes by other means: after `sync_weights`
/// kills and revives edges (moving their values), the next refresh equals one with fresh
/// hints.
#[test]
fn kept_hints_notice_a_mask_changed_elsewhere() {
    for side in [Side::Rows, Side::Columns] {
        let mut r = rng(77);
        let (l, target) = if side == Side::Rows {
            (layer(&mut r, 16, 700, &[], 0), 300u32)
        } else {
            (layer(&mut r, 700, 64, &[], 0), 300u32)
        };
        let targets = vec![target; l.shape.slabs(side)];
        let (rows, cols) = (l.shape.out, l.shape.inp);
        let mut kf = KeptAndFresh::new(&l);
        // Three refreshes of the same weights: the caches are in use by the last.
        for _ in 0..3 {
            kf.refresh(side, &targets, true, "before the change");
        }
        // Flip a few edges of every row: the strongest dead ones come back, some live ones
        // die.
        for copy in [&mut kf.kept, &mut kf.fresh] {
            let mut other = copy.0.clone();
            for o in 0..rows {
                for i in ((o % 37)..cols).step_by(37) {
                    other.set(o, i, !copy.0.get(o, i));
                }
            }
            sync_weights(&l.shape, &copy.0, &other, &mut copy.1, &mut copy.2, false).unwrap();
            copy.0 = other;
        }
        let st = kf.refresh(side, &targets, true, &format!("{side:?}"));
        assert!(st.born > 0, "{side:?}: edges came back");
    }
}

/// The same layer refreshed twice over: once keeping its hints, once with fresh ones every
/// time. `refresh` asserts that both give the same stats, mask, weights and shadow.
struct KeptAndFresh {
    shape: EdgeShape,
    kept: (BitMask, Vec<f32>, Vec<f32>),
    fresh: (BitMask, Vec<f32>, Vec<f32>),
    scratch: (ActuatorScratch, ActuatorScratch),
    hints: Vec<u64>,
}

impl KeptAndFresh {
    fn new(l: &Layer) -> Self {
        let copy = || (l.mask.clone(), l.w.clone(), l.h.clone());
        Self {
            shape: l.shape.clone(),
            kept: copy(),
            fresh: copy(),
            scratch: Default::default(),
            hints: Vec::new(),
        }
    }

    /// Multiplies each weight of both copies by the next factor from `f`.
    fn drift(&mut self, mut f: impl FnMut() -> f32) {
        for (x, y) in self.kept.1.iter_mut().zip(self.fresh.1.iter_mut()) {
            let g = f();
            *x *= g;
            *y *= g;
        }
    }

    fn refresh(&mut self, side: Side, targets: &[u32], regrow: bool, what: &str) -> SyncStats {
        let (a, b) = (&mut self.kept, &mut self.fresh);
        let ra = refresh_targets(
            side,
            &self.shape,
            &mut a.1,
            &mut a.2,
            targets,
            regrow,
            &mut a.0,
            &mut self.scratch.0,
            &mut self.hints,
        )
        .unwrap();
        let rb = refresh_targets(
            side,
            &self.shape,
            &mut b.1,
            &mut b.2,
            targets,
            regrow,
            &mut b.0,
            &mut self.scratch.1,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(ra, rb, "{what}");
        assert!(a.0 == b.0, "{what}");
        assert_eq!(bits(&a.1), bits(&b.1), "{what}");
        assert_eq!(bits(&a.2), bits(&b.2), "{what}");
        ra
    }
}

/// The hints a layer keeps between refreshes change nothing: a run of refreshes with the
/// weights drifting and the targets changing now and then (so that remembered brackets
/// sometimes hold and sometimes miss) gives the same masks, weights and shadow as the same
/// run with the hints thrown away every time.
#[test]
fn hints_kept_between_refreshes_change_nothing() {
    // `shrink`: every weight also shrinks by 0.7 % per refresh, so that thresholds fall
    // steadily and dead edges come back (SP-in's cache of dead keys must follow).
    for (mode, regrow, side, shrink) in [
        (0u8, true, Side::Rows, false),
        (1, true, Side::Rows, false),
        (2, true, Side::Rows, false),
        (0, false, Side::Rows, false),
        (0, true, Side::Rows, true),
        (0, true, Side::Columns, false),
        (2, true, Side::Columns, false),
        (1, true, Side::Columns, false),
        (0, false, Side::Columns, false),
        (0, true, Side::Columns, true),
    ] {
        let mut r = rng(90 + mode as u64);
        // Wide enough for whole 64-column words and a partial one, and (for columns) more
        // than 2^15 edges, so that several workers count and their bracket keys are merged.
        let l = if side == Side::Rows {
            layer(&mut r, 12, 1500, &[], mode)
        } else {
            layer(&mut r, 1500, if mode == 2 { 12 } else { 130 }, &[], mode)
        };
        let mut pair = KeptAndFresh::new(&l);
        let mut targets = Vec::new();
        for step in 0..12 {
            // New targets every fourth refresh: in between, most brackets hold (for columns,
            // whole mask words of them, which are then rebuilt without reading the weights).
            if step % 4 == 0 {
                targets = (0..l.shape.slabs(side))
                    .map(|_| r.gen_range(600..900))
                    .collect();
            }
            // Drift: small relative changes of every live weight, a few large ones.
            let trend = if shrink { 0.993 } else { 1.0 };
            pair.drift(|| {
                trend
                    * if r.gen_bool(0.01) {
                        r.gen_range(0.5f32..2.0)
                    } else {
                        r.gen_range(0.995f32..1.005)
                    }
            });
            pair.refresh(
                side,
                &targets,
                regrow,
                &format!("mode {mode} shrink {shrink} step {step}"),
            );
        }
        if regrow {
            assert!(pair.hints.iter().any(|&x| x != 0), "hints were kept");
        }
    }
}

/// SP-out's dead-key caches change nothing: weights that rise and fall together by 0.3 %
/// per refresh (every column keeps its bracket, so after a rise the caches stand in for the
/// shadow, and after a fall dead edges come back from them) give the same masks, weights and
/// shadow as refreshes with fresh hints every time.
#[test]
fn column_caches_change_nothing() {
    let mut r = rng(123);
    // More than 2^15 edges: several workers count, and their keys are merged.
    let l = layer(&mut r, 1500, 130, &[], 0);
    let targets: Vec<u32> = (0..130).map(|_| r.gen_range(600..900)).collect();
    let mut pair = KeptAndFresh::new(&l);
    let mut born = 0;
    for step in 0..16 {
        let trend = if step % 2 == 0 { 1.003 } else { 0.997 };
        pair.drift(|| trend * r.gen_range(0.9999f32..1.0001));
        born += pair
            .refresh(Side::Columns, &targets, true, &format!("step {step}"))
            .born;
    }
    assert!(born > 0, "dead edges came back");
}

/// A wide SP-out layer (2500 columns, few rows): refreshes that keep their brackets give the
/// same masks, weights and shadow as refreshes from scratch, with and without regrowth, while
/// weights drift and targets change.
#[test]
fn wide_column_layers_keep_brackets_exactly() {
    for regrow in [true, false] {
        let mut r = rng(321 + u64::from(regrow));
        // 40 words per row, the last one partial; more than 2^15 edges (several workers).
        let l = layer(&mut r, 40, 2500, &[], 0);
        let mut pair = KeptAndFresh::new(&l);
        let mut targets = Vec::new();
        for step in 0..10 {
            if step % 4 == 0 {
                targets = (0..2500).map(|_| r.gen_range(12..30)).collect();
            }
            pair.drift(|| {
                if r.gen_bool(0.01) {
                    r.gen_range(0.5f32..2.0)
                } else {
                    r.gen_range(0.998f32..1.002)
                }
            });
            pair.refresh(
                Side::Columns,
                &targets,
                regrow,
                &format!("regrow {regrow} step {step}"),
            );
        }
        assert!(pair.hints.iter().any(|&x| x != 0), "hints were kept");
    }
}

/// SP-out with every score inside its column's bracket (nearly equal weights that barely
/// move): the brackets hold, but the keys inside them outgrow the counting pass's log, and
/// the kept columns' selections are completed from the per-column lists instead. The masks,
/// weights and shadow equal those of refreshes from scratch.
#[test]
fn crowded_brackets_change_nothing() {
    for regrow in [true, false] {
        let mut r = rng(77 + u64::from(regrow));
        // 150 rows (75 per worker: within a column's list), 600 columns: more than 2^15
        // edges, so that two workers count.
        let l = layer(&mut r, 150, 600, &[], 3);
        let targets: Vec<u32> = (0..600).map(|_| r.gen_range(40..110)).collect();
        let mut pair = KeptAndFresh::new(&l);
        for step in 0..6 {
            pair.drift(|| r.gen_range(0.9999f32..1.0001));
            pair.refresh(
                Side::Columns,
                &targets,
                regrow,
                &format!("regrow {regrow} step {step}"),
            );
        }
        assert!(pair.hints.iter().any(|&x| x != 0), "hints were kept");
    }
}

/// SP-out's dead-key caches after a mask change made elsewhere that keeps every column's
/// live count: in each column the weakest live edge and the strongest dead one trade places
/// (both inside the column's bracket). Counting the live edges alone would keep the traded
/// places; the changed mask is noticed and the refresh equals one from scratch, which trades
/// them back.
#[test]
fn column_caches_notice_a_trade_at_the_threshold() {
    let mut r = rng(505);
    let l = layer(&mut r, 700, 64, &[], 0);
    let targets = vec![300u32; 64];
    let mut kf = KeptAndFresh::new(&l);
    // Three refreshes of the same weights: the caches are in use by the last.
    for _ in 0..3 {
        kf.refresh(Side::Columns, &targets, true, "before the trade");
    }
    let before = kf.kept.0.clone();
    for copy in [&mut kf.kept, &mut kf.fresh] {
        let mut other = copy.0.clone();
        for i in 0..64 {
            let score = |o: usize| {
                if copy.0.get(o, i) {
                    copy.1[o * 64 + i].abs()
                } else {
                    copy.2[o * 64 + i].abs()
                }
            };
            let (live, dead): (Vec<usize>, Vec<usize>) = (0..700).partition(|&o| copy.0.get(o, i));
            let weakest = *live
                .iter()
                .min_by(|&&a, &&b| score(a).total_cmp(&score(b)))
                .unwrap();
            let strongest = *dead
                .iter()
                .max_by(|&&a, &&b| score(a).total_cmp(&score(b)))
                .unwrap();
            other.set(weakest, i, false);
            other.set(strongest, i, true);
        }
        sync_weights(&l.shape, &copy.0, &other, &mut copy.1, &mut copy.2, false).unwrap();
        copy.0 = other;
    }
    let st = kf.refresh(Side::Columns, &targets, true, "after the trade");
    assert_eq!((st.born, st.died), (64, 64), "every trade was undone");
    assert!(kf.kept.0 == before, "the mask from before the trade");
}

/// With its dead-key caches in use, a settled SP-out layer's refresh does not read the
/// shadow values of dead edges well below its brackets: planted non-finite values there
/// (which a refresh from scratch reports) go unread.
#[test]
fn settled_column_caches_stand_in_for_the_shadow() {
    let mut r = rng(606);
    let l = layer(&mut r, 700, 64, &[], 0);
    let targets = vec![300u32; 64];
    let (mut mask, mut w, mut h) = (l.mask.clone(), l.w.clone(), l.h.clone());
    let (mut scratch, mut hints) = (ActuatorScratch::default(), Vec::new());
    let mut refresh =
        |mask: &mut BitMask, w: &mut Vec<f32>, h: &mut Vec<f32>, hints: &mut Vec<u64>| {
            refresh_targets(
                Side::Columns,
                &l.shape,
                w,
                h,
                &targets,
                true,
                mask,
                &mut scratch,
                hints,
            )
        };
    for _ in 0..3 {
        refresh(&mut mask, &mut w, &mut h, &mut hints).unwrap();
    }
    let mut planted = 0;
    for i in 0..64 {
        let weakest = (0..700)
            .filter(|&o| mask.get(o, i))
            .map(|o| w[o * 64 + i].abs())
            .fold(f32::INFINITY, f32::min);
        for o in (0..700).filter(|&o| !mask.get(o, i)) {
            if h[o * 64 + i].abs() < 0.5 * weakest {
                h[o * 64 + i] = f32::NAN;
                planted += 1;
            }
        }
    }
    assert!(planted > 0);
    let (m0, w0, h0) = (mask.clone(), w.clone(), h.clone());
    refresh(&mut mask, &mut w, &mut h, &mut hints).expect("the shadow was not read");
    assert!(mask == m0, "nothing changed");
    let (mut m1, mut w1, mut h1) = (m0, w0, h0);
    let err = refresh(&mut m1, &mut w1, &mut h1, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, ActuatorError::NonFinite { .. }), "{err:?}");
}

/// A settled SP-out layer whose mask was changed elsewhere, with a non-finite shadow value at
/// a dead edge of an early row and a non-finite weight at a live edge of a later row: the
/// refresh names the first of the two (the shadow value), as a refresh from scratch does.
#[test]
fn a_changed_mask_with_caches_names_the_first_non_finite_score() {
    let mut r = rng(707);
    let l = layer(&mut r, 700, 64, &[], 0);
    let targets = vec![300u32; 64];
    let (mut mask, mut w, mut h) = (l.mask.clone(), l.w.clone(), l.h.clone());
    let (mut scratch, mut hints) = (ActuatorScratch::default(), Vec::new());
    for _ in 0..3 {
        refresh_targets(
            Side::Columns,
            &l.shape,
            &mut w,
            &mut h,
            &targets,
            true,
            &mut mask,
            &mut scratch,
            &mut hints,
        )
        .unwrap();
    }
    // Flip a few edges elsewhere, then plant the two values.
    let mut other = mask.clone();
    for o in (0..700).step_by(13) {
        other.set(o, o % 64, !mask.get(o, o % 64));
    }
    sync_weights(&l.shape, &mask, &other, &mut w, &mut h, false).unwrap();
    mask = other;
    let dead = (0..64)
        .find(|&i| !mask.get(2, i))
        .expect("a dead edge in row 2");
    let live = (0..64)
        .find(|&i| mask.get(500, i))
        .expect("a live edge in row 500");
    h[2 * 64 + dead] = f32::NAN;
    w[500 * 64 + live] = f32::INFINITY;
    let err = refresh_targets(
        Side::Columns,
        &l.shape,
        &mut w,
        &mut h,
        &targets,
        true,
        &mut mask,
        &mut scratch,
        &mut hints,
    )
    .unwrap_err();
    assert_eq!(
        err,
        ActuatorError::NonFinite {
            what: "shadow".into(),
            index: 2 * 64 + dead
        }
    );
}
