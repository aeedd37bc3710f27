//! Times the phases of one refresh of a 4096x4096 layer.
use bb_actuators::*;
use bb_bench::*;
use std::time::Instant;

fn main() {
    let shape = EdgeShape::dense(4096, 4096);
    let w = random_vec(7, shape.weight_len());
    let shadow = vec![0.0f32; w.len()];
    let mut mask = BitMask::full(4096, 4096);
    let mut scores = vec![0.0f32; shape.edges()];
    let mut scratch = ActuatorScratch::default();
    let targets = vec![2048u32; 4096];
    for _ in 0..3 {
        let t = Instant::now();
        edge_scores(&shape, &w, &shadow, &mask, &mut scores).unwrap();
        let t1 = t.elapsed();
        let t = Instant::now();
        apply_targets(
            Side::Rows,
            &shape,
            &scores,
            &targets,
            true,
            &mut mask,
            &mut scratch,
        )
        .unwrap();
        let t2 = t.elapsed();
        let t = Instant::now();
        apply_targets(
            Side::Columns,
            &shape,
            &scores,
            &targets,
            true,
            &mut mask,
            &mut scratch,
        )
        .unwrap();
        let t3 = t.elapsed();
        let t = Instant::now();
        let mut keys = vec![0u64; 4096];
        let mut acc = 0u64;
        for r in 0..4096 {
            for (c, k) in keys.iter_mut().enumerate() {
                *k = key_of(scores[r * 4096 + c], c);
            }
            acc ^= threshold_key(&mut keys, 2048);
        }
        let t4 = t.elapsed();
        let t = Instant::now();
        let s = stream_sum(&w);
        let t5 = t.elapsed();
        println!(
            "scores {t1:?} rows {t2:?} cols {t3:?} serial-threshold {t4:?} floor {t5:?} {acc} {s}"
        );
    }
}
