//! Compacted inference equals the masked dense layer (with the rescale folded in).

mod common;

use bb_core::sparse::{CsrLayer, SparseScratch};
use bb_core::BitMask;
use common::*;
use rand::Rng;

fn naive(w: &[f32], m: &BitMask, s: &[f32], b: &[f32], x: &[f32], batch: usize) -> Vec<f32> {
    let (out, inp) = (m.rows(), m.cols());
    let mut y = vec![0.0f32; batch * out];
    for bi in 0..batch {
        for o in 0..out {
            let mut acc = 0.0f64;
            for i in 0..inp {
                if m.get(o, i) {
                    acc += w[o * inp + i] as f64 * x[bi * inp + i] as f64;
                }
            }
            y[bi * out + o] = (acc * s[o] as f64) as f32 + b[o];
        }
    }
    y
}

#[test]
fn csr_forward_matches_masked_dense() {
    let mut r = rng(5);
    // The last three are wide enough for the column-blocked path at batch 128 (the first of
    // them dense enough that most of a block's columns are live); 300x600, 90x700 and 70x1500
    // at batch 16, and 90x700 at 37, are wide and dense enough for it with narrow batches.
    for (out, inp, density) in [
        (7, 9, 0.5),
        (130, 70, 0.1),
        (300, 600, 0.3),
        (64, 1, 1.0),
        (90, 700, 0.9),
        (70, 1500, 0.3),
        (20, 3000, 0.02),
    ] {
        let w = random_weights(&mut r, out * inp, false);
        let mut m = BitMask::empty(out, inp);
        for o in 0..out {
            for i in 0..inp {
                if r.gen_bool(density) {
                    m.set(o, i, true);
                }
            }
        }
        let s: Vec<f32> = (0..out).map(|_| r.gen_range(0.5f32..2.0)).collect();
        let b: Vec<f32> = (0..out).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        let csr = CsrLayer::from_masked(&w, &m, Some(&s), Some(&b)).unwrap();
        assert_eq!(csr.nnz(), m.count());
        let (rp, cols, vals) = csr.parts();
        let again =
            CsrLayer::from_parts(out, inp, rp.to_vec(), cols, vals.to_vec(), Some(b.clone()))
                .unwrap();
        let mut scratch = SparseScratch::default();
        // 373 = 2 * 128 + 64 + 32 + 16 + 4 + 1: every batch tile width.
        for batch in [1usize, 3, 16, 37, 128, 373] {
            let x = random_weights(&mut r, batch * inp, false);
            let want = naive(&w, &m, &s, &b, &x, batch);
            for layer in [&csr, &again] {
                let mut y = vec![0.0f32; batch * out];
                layer.forward(&x, batch, &mut y, &mut scratch).unwrap();
                for (a, e) in y.iter().zip(&want) {
                    assert!(
                        (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{out}x{inp} batch {batch}: {a} vs {e}"
                    );
                }
            }
        }
    }
    // Inconsistent parts and wrong buffer sizes are errors.
    assert!(CsrLayer::from_parts(2, 3, vec![0, 1], vec![0], vec![1.0], None).is_err());
    assert!(CsrLayer::from_parts(1, 3, vec![0, 1], vec![5], vec![1.0], None).is_err());
    // Columns out of order or repeated within a row.
    let two = vec![1.0, 2.0];
    assert!(CsrLayer::from_parts(1, 3, vec![0, 2], vec![2, 0], two.clone(), None).is_err());
    assert!(CsrLayer::from_parts(1, 3, vec![0, 2], vec![1, 1], two.clone(), None).is_err());
    assert!(CsrLayer::from_parts(2, 3, vec![0, 1, 2], vec![2, 0], two, None).is_ok());
    let csr = CsrLayer::from_masked(&[1.0; 6], &BitMask::full(2, 3), None, None).unwrap();
    assert!(csr
        .forward(&[0.0; 5], 2, &mut [0.0; 4], &mut SparseScratch::default())
        .is_err());
}
