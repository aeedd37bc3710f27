//! Runs one refresh case repeatedly, for profiling (`perf record`):
//! `refresh_profile [sp_in|sp_out] [OUT] [IN] [ITERS] [KERNEL, e.g. 3x3]`.

use bb_bench::{median_time, random_vec, refresh_pruner, stream_sum};
use bb_core::EdgeShape;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let act = a.get(1).map_or("sp_in", String::as_str);
    let out: usize = a.get(2).map_or(4096, |s| s.parse().expect("OUT"));
    let inp: usize = a.get(3).map_or(4096, |s| s.parse().expect("IN"));
    let iters: usize = a.get(4).map_or(20, |s| s.parse().expect("ITERS"));
    let kernel: Vec<usize> = a.get(5).map_or(Vec::new(), |k| {
        k.split('x').map(|d| d.parse().expect("KERNEL")).collect()
    });
    let shape = EdgeShape::conv(out, inp, &kernel);
    let mut w = random_vec(7, shape.weight_len());
    let mut p = refresh_pruner(&shape, act, true, true);
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(p.refresh(&mut [&mut w[..]], None).expect("refresh"));
    }
    let per = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let floor = median_time(iters, || {
        std::hint::black_box(stream_sum(&w));
    })
    .as_secs_f64()
        * 1e3;
    println!(
        "{act} {out}x{inp}: {per:.3} ms per refresh, streaming pass {floor:.3} ms, ratio {:.2}",
        per / floor
    );
}
