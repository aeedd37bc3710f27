//! Runs one refresh case repeatedly, for profiling (`perf record`):
//! `refresh_profile [sp_in|sp_out] [OUT] [IN] [ITERS] [KERNEL, e.g. 3x3 or -] [DRIFT]`.
//!
//! With `DRIFT` (e.g. 0.01) every weight is multiplied by its own random factor in
//! `1 ± DRIFT` before each refresh (untimed; the factors alternate with their inverses), so
//! that thresholds move between refreshes as they do in training, and the refresh is timed
//! against the streaming pass after each drift.

use bb_actuators::{refresh_targets, ActuatorScratch, BitMask, Side};
use bb_bench::{drift_times, median_time, random_vec, refresh_pruner, stream_sum};
use bb_core::EdgeShape;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let act = a.get(1).map_or("sp_in", String::as_str);
    let out: usize = a.get(2).map_or(4096, |s| s.parse().expect("OUT"));
    let inp: usize = a.get(3).map_or(4096, |s| s.parse().expect("IN"));
    let iters: usize = a.get(4).map_or(20, |s| s.parse().expect("ITERS"));
    let kernel: Vec<usize> = match a.get(5).map(String::as_str) {
        None | Some("-") => Vec::new(),
        Some(k) => k.split('x').map(|d| d.parse().expect("KERNEL")).collect(),
    };
    let drift: f32 = a.get(6).map_or(0.0, |s| s.parse().expect("DRIFT"));
    let shape = EdgeShape::conv(out, inp, &kernel);
    if drift > 0.0 {
        let (per, floor, churn) = drift_times(&shape, act, drift, iters);
        let (per, floor) = (per.as_secs_f64() * 1e3, floor.as_secs_f64() * 1e3);
        println!(
            "{act} {out}x{inp}, drift {drift}: {per:.3} ms per refresh, streaming pass {floor:.3} ms, ratio {:.2}, mean churn {churn:.2e}",
            per / floor
        );
        return;
    }
    let mut w = random_vec(7, shape.weight_len());
    let mut p = refresh_pruner(&shape, act, true, true);
    let per = median_time(iters, || {
        std::hint::black_box(p.refresh(&mut [&mut w[..]], None).expect("refresh"));
    })
    .as_secs_f64()
        * 1e3;
    let floor = median_time(iters, || {
        std::hint::black_box(stream_sum(&w));
    })
    .as_secs_f64()
        * 1e3;
    println!(
        "{act} {out}x{inp}: {per:.3} ms per refresh, streaming pass {floor:.3} ms, ratio {:.2}",
        per / floor
    );
    // The actuator alone (no policy, no bookkeeping): every slab keeps half its entries.
    let side = if act == "sp_in" {
        Side::Rows
    } else {
        Side::Columns
    };
    let targets = vec![(shape.slab_len(side) / 2) as u32; shape.slabs(side)];
    let mut w = random_vec(7, shape.weight_len());
    let mut shadow = vec![0.0f32; w.len()];
    let mut mask = BitMask::full(shape.out, shape.inp);
    let (mut scratch, mut hints) = (ActuatorScratch::default(), Vec::new());
    let raw = median_time(iters, || {
        let st = refresh_targets(
            side,
            &shape,
            &mut w,
            &mut shadow,
            &targets,
            true,
            &mut mask,
            &mut scratch,
            &mut hints,
        );
        std::hint::black_box(st.expect("refresh_targets"));
    })
    .as_secs_f64()
        * 1e3;
    println!(
        "{act} {out}x{inp}: refresh_targets alone {raw:.3} ms, ratio {:.2}",
        raw / floor
    );
}
